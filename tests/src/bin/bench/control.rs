//! Section 3: the control plane, in-process and through the API.

use crate::*;

pub(crate) fn engine_config(fx: &Fixture) -> EngineConfig {
    EngineConfig {
        internal_ifindex: fx.in_ifindex,
        external_ifindex: fx.ex_ifindex,
        snat_block: 64,
        networks: Vec::new(),
        ..EngineConfig::lab()
    }
}

pub(crate) fn bind_request(session: u64, port: u16) -> BindRequest {
    BindRequest {
        session,
        clients: vec![std::net::SocketAddrV4::new(CLIENT.into(), port)],
        proxy: None,
        protocol: Transport::Tcp,
        flags: ConnFlags::TIMEOUT,
        backlog: Some(1),
        protocol_name: "ftp".into(),
        ip_filter: Some(IpFilter {
            include: vec!["10.2.0.2/32".parse().expect("net")],
            exclude: Vec::new(),
        }),
        notify: false,
        context: None,
    }
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Calls/s, p50 and p99 (µs) of `calls` timed calls, in batches that are
/// then undone (untimed) so that the port range never runs out.
pub(crate) fn measure_calls(
    calls: usize,
    mut call: impl FnMut(usize) -> anyhow::Result<u64>,
    mut undo: impl FnMut(&[u64]),
) -> anyhow::Result<(f64, f64, f64)> {
    let mut lat = Vec::with_capacity(calls);
    let mut ids = Vec::new();
    for i in 0..calls {
        let t = Instant::now();
        let id = call(i)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        ids.push(id);
        // Below the daemon's default policy.max_pending_per_session (255).
        if ids.len() == 250 {
            undo(&ids);
            ids.clear();
        }
    }
    undo(&ids);
    let total: f64 = lat.iter().sum::<f64>() / 1e6;
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok((
        calls as f64 / total,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
    ))
}

pub(crate) fn control_plane(opts: &Opts, r: &mut Results) -> anyhow::Result<()> {
    let mut fx = Fixture::new("benchcp")?;
    let calls = if opts.quick { 5_000 } else { 100_000 };
    let path = fx.netns_path();
    let cfg = engine_config(&fx);
    let pins = fx.pins.clone();
    let (mut bind_rate, mut bind_p50, mut bind_p99) = (Vec::new(), Vec::new(), Vec::new());
    let (mut rc_rate, mut rc_p99) = (Vec::new(), Vec::new());
    let mut live = (0usize, 0usize);
    let mut to_live = Vec::new();
    for _ in 0..opts.reps() {
        // The engine reserves ports by binding sockets to the fixture's addresses.
        let mut engine = in_netns(&path, || -> anyhow::Result<_> {
            Ok(Engine::new(
                cfg.clone(),
                KernelMaps::open(&pins)?,
                PortPool::new(20000..=59999, firewall_ctl::reserve::KernelReserver),
                std::sync::Arc::new(firewall_ctl::netif::MonotonicClock),
            )?)
        })??;
        let session = engine.open_session(CLIENT.into())?;
        let (rate, p50, p99) = in_netns(&path, || {
            let e = std::cell::RefCell::new(&mut engine);
            measure_calls(
                calls,
                |i| {
                    let res = e
                        .borrow_mut()
                        .bind_for_client(&bind_request(session, 1024 + (i % 60000) as u16))
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    Ok(res.connections[0].id)
                },
                |ids| {
                    for id in ids {
                        let _ = e.borrow_mut().kill(*id);
                    }
                },
            )
        })??;
        bind_rate.push(rate);
        bind_p50.push(p50);
        bind_p99.push(p99);
        let (rate, _, p99) = in_netns(&path, || {
            let e = std::cell::RefCell::new(&mut engine);
            measure_calls(
                calls,
                |_| {
                    let res = e
                        .borrow_mut()
                        .redirect_connections(&RedirectRequest {
                            session,
                            connects: vec!["10.2.0.2:2000".parse().expect("addr")],
                            proxy_external: None,
                            internal: None,
                            protocol: Transport::Tcp,
                            flags: ConnFlags::TIMEOUT,
                            protocol_name: "ftp".into(),
                            notify: false,
                            context: None,
                        })
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    Ok(res.actions[0].id)
                },
                |ids| {
                    for id in ids {
                        let _ = e.borrow_mut().cancel(*id);
                    }
                },
            )
        })??;
        rc_rate.push(rate);
        rc_p99.push(p99);
        // Live at return: the pinhole's map entry is written before the call
        // returns; the server's SYN, run right after, must be forwarded.
        for i in 0..50u16 {
            let t = Instant::now();
            let res = in_netns(&path, || {
                engine.bind_for_client(&bind_request(session, 5000 + i))
            })?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            let proxy = res.proxy_address;
            let out = fx.run(
                Side::External,
                &tcp(
                    SERVER,
                    20000 + i,
                    proxy.ip().octets(),
                    proxy.port(),
                    TCP_SYN,
                ),
            );
            to_live.push(t.elapsed().as_secs_f64() * 1e6);
            live.1 += 1;
            if out.action == XDP_REDIRECT {
                live.0 += 1;
            }
            let _ = fx.events();
        }
    }
    r.add(
        "control plane",
        "BindForClient in-process",
        "kernel",
        "calls/s",
        bind_rate,
    );
    r.add(
        "control plane",
        "BindForClient in-process p50",
        "kernel",
        "µs",
        bind_p50,
    );
    r.add(
        "control plane",
        "BindForClient in-process p99",
        "kernel",
        "µs",
        bind_p99,
    );
    r.add(
        "control plane",
        "RedirectConnections in-process",
        "kernel",
        "calls/s",
        rc_rate,
    );
    r.add(
        "control plane",
        "RedirectConnections in-process p99",
        "kernel",
        "µs",
        rc_p99,
    );
    r.add(
        "control plane",
        "call start to first packet forwarded by its pinhole",
        "kernel",
        "µs",
        to_live,
    );
    r.notes.push(format!(
        "Pinholes live when their call returned: {} of {} (the map write precedes the reply).",
        live.0, live.1
    ));
    Ok(())
}

/// BindForClient through the daemon's API socket: one connection per call
/// (what the CLI does), and one connection for all calls (a filter process).
pub(crate) fn api_latency(opts: &Opts, r: &mut Results, fw: &Firewall) -> anyhow::Result<()> {
    let client = Client::new(&fw.socket);
    let session: u64 = fw.session(addr::CLIENT).parse()?;
    let calls = if opts.quick { 500 } else { 5_000 };
    let persistent = std::cell::RefCell::new(client.connect().map_err(|e| anyhow::anyhow!("{e}"))?);
    for (label, reuse) in [
        (
            "BindForClient through the API, a connection per call (CLI)",
            false,
        ),
        ("BindForClient through the API", true),
    ] {
        let call = |req: Request| -> anyhow::Result<serde_json::Value> {
            let v = if reuse {
                persistent.borrow_mut().call(req)
            } else {
                client.call(req)
            };
            v.map_err(|e| anyhow::anyhow!("{e}"))
        };
        let (mut rate, mut p50, mut p99) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..opts.reps() {
            let (a, b, c) = measure_calls(
                calls,
                |i| {
                    let v = call(Request::BindForClient(bind_request(
                        session,
                        1024 + (i % 60000) as u16,
                    )))?;
                    v["connections"][0]["id"].as_u64().context("connection id")
                },
                |ids| {
                    for id in ids {
                        let _ = call(Request::Kill { id: *id });
                    }
                },
            )?;
            rate.push(a);
            p50.push(b);
            p99.push(c);
        }
        r.add("control plane", label, "kernel", "calls/s", rate);
        r.add(
            "control plane",
            &format!("{label} p50"),
            "kernel",
            "µs",
            p50,
        );
        r.add(
            "control plane",
            &format!("{label} p99"),
            "kernel",
            "µs",
            p99,
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. Scale
// ---------------------------------------------------------------------------
