//! Section 2: the XDP program's per-packet cost (BPF_PROG_RUN).

use crate::*;

pub(crate) const NAT_PORT: u16 = 61000;

pub(crate) fn flow_pair(fx: &mut Fixture, cport: u16) {
    let out = FlowKey::new(IPPROTO_TCP, CLIENT, cport, SERVER, 80);
    fx.flows
        .insert(&out, &FlowValue::forward(FW_EXTERNAL, NAT_PORT, SERVER, 80))
        .expect("flow");
    let back = FlowKey::new(IPPROTO_TCP, SERVER, 80, FW_EXTERNAL, NAT_PORT);
    fx.flows
        .insert(&back, &FlowValue::forward(SERVER, 80, CLIENT, cport))
        .expect("flow");
    repeatable(fx, FW_EXTERNAL, NAT_PORT, SERVER, 80);
    repeatable(fx, SERVER, 80, CLIENT, cport);
}

/// BPF_PROG_RUN repeats run on the frame as the previous run left it, so the
/// translated frame needs a flow too: one that translates to itself (the same
/// work: lookup, FIB, rewrite with incremental checksums, MACs).
pub(crate) fn repeatable(fx: &mut Fixture, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) {
    fx.flows
        .insert(
            &FlowKey::new(IPPROTO_TCP, src, sport, dst, dport),
            &FlowValue::forward(src, sport, dst, dport),
        )
        .expect("flow");
}

pub(crate) fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    Spec {
        tcp_flags: flags,
        payload: vec![0; 6],
        // Forwarding decrements it once per BPF_PROG_RUN repetition.
        ttl: 255,
        ..Spec::tcp(src, sport, dst, dport)
    }
    .build()
}

/// Repetitions per BPF_PROG_RUN call of a forwarded frame: it loses a TTL
/// step each time.
pub(crate) const REPEAT: u32 = 250;
/// Calls per value for forwarded frames. Every XDP test run swaps the
/// kernel's XDP dispatcher in and out (an RCU grace period, milliseconds
/// here), so calls are few and long.
pub(crate) const CALLS: usize = 40;

/// Kernel-measured ns per packet, `reps` values, checking the verdict. A
/// frame that is not forwarded runs `packets` times in one call; a forwarded
/// one in CALLS calls of REPEAT runs on fresh copies (median of the calls).
pub(crate) fn timed(
    fx: &mut Fixture,
    side: Side,
    frame: &[u8],
    packets: u32,
    reps: usize,
    want: u32,
) -> anyhow::Result<Vec<f64>> {
    let forwarded = want == XDP_REDIRECT;
    let (calls, repeat) = if forwarded {
        (CALLS, REPEAT)
    } else {
        (1, packets)
    };
    let mut v = Vec::new();
    for _ in 0..reps {
        let mut times = Vec::new();
        for _ in 0..calls {
            let out = fx.time(side, frame, repeat);
            if out.action != want {
                let counters: Vec<String> = firewall_common::stats::Counter::ALL
                    .iter()
                    .filter(|c| fx.counter(**c) > 0)
                    .map(|c| format!("{}={}", c.name(), fx.counter(*c)))
                    .collect();
                bail!(
                    "verdict {} instead of {want} ({})",
                    out.action,
                    counters.join(" ")
                );
            }
            times.push(out.duration.as_nanos() as f64);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        v.push(times[times.len() / 2]);
    }
    Ok(v)
}

/// A BindForClient-like pinhole on FW_EXTERNAL:port delivering to CLIENT:5001.
pub(crate) fn pinhole(fx: &mut Fixture, port: u16, peer_filter: u32) -> PinholeKey {
    let key = PinholeKey::new(IPPROTO_TCP, FW_EXTERNAL, port, side::EXTERNAL);
    let v = PinholeValue {
        target_addr: CLIENT,
        target_port: 5001,
        remaining: 1,
        owner: 7,
        peer_filter,
        egress_ifindex: fx.in_ifindex,
        ..Default::default()
    };
    fx.pinholes.insert(&key, &v).expect("pinhole");
    key
}

/// The first-packet path: one run per fresh pinhole (it is consumed).
pub(crate) fn first_packet_ns(fx: &mut Fixture, runs: usize) -> anyhow::Result<f64> {
    let mut v = Vec::new();
    for i in 0..runs {
        let port = 40000 + (i % 1000) as u16;
        pinhole(fx, port, 0);
        let sport = 20000 + (i % 20000) as u16;
        let out = fx.run(
            Side::External,
            &tcp(SERVER, sport, FW_EXTERNAL, port, TCP_SYN),
        );
        if out.action != XDP_REDIRECT {
            bail!("first packet: verdict {}", out.action);
        }
        v.push(out.duration.as_nanos() as f64);
        // Its flows go, so that the next run takes the same path.
        let fwd = FlowKey::new(IPPROTO_TCP, SERVER, sport, FW_EXTERNAL, port);
        let back = FlowKey::new(IPPROTO_TCP, CLIENT, 5001, SERVER, sport);
        let _ = fx.flows.remove(&fwd);
        let _ = fx.flows.remove(&back);
        let _ = fx.events();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[v.len() / 2])
}

pub(crate) fn xdp_cost(opts: &Opts, r: &mut Results) -> anyhow::Result<()> {
    let mut fx = Fixture::new("bench")?;
    let repeat = if opts.quick { 100_000 } else { 1_000_000 };
    let reps = opts.reps();
    let mut progs = BenchPrograms::load()?;
    let frame = tcp(CLIENT, 33000, SERVER, 80, TCP_ACK);
    let v = (0..reps)
        .map(|_| progs.empty_run(&frame, repeat).map(|d| d.as_nanos() as f64))
        .collect::<anyhow::Result<Vec<_>>>()?;
    r.add(
        "xdp cost",
        "reference: an XDP program that only returns",
        "kernel",
        "ns/packet",
        v,
    );
    // The flow key's size for a second address family (docs/ipv6.md): one
    // hash lookup that finds its key among 64 Ki, by the key's size.
    for (len, what) in [
        (16, "16-byte key (the IPv4 flow key)"),
        (40, "40-byte key (a flow key for either family)"),
    ] {
        let frame = progs.fill_lookup(len, 65536)?;
        let mut v = Vec::new();
        for _ in 0..reps {
            let (d, found) = progs.lookup_run(len, &frame, repeat)?;
            if !found {
                bail!("the {len}-byte lookup did not find its key");
            }
            v.push(d.as_nanos() as f64);
        }
        r.add(
            "xdp cost",
            &format!("one hash lookup among 64 Ki entries, {what}"),
            "kernel",
            "ns/packet",
            v,
        );
    }
    flow_pair(&mut fx, 33000);
    let out = tcp(CLIENT, 33000, SERVER, 80, TCP_ACK);
    let v = timed(&mut fx, Side::Internal, &out, repeat, reps, XDP_REDIRECT)?;
    r.add(
        "xdp cost",
        "established flow, outbound (SNAT)",
        "kernel",
        "ns/packet",
        v,
    );
    let back = tcp(SERVER, 80, FW_EXTERNAL, NAT_PORT, TCP_ACK);
    let v = timed(&mut fx, Side::External, &back, repeat, reps, XDP_REDIRECT)?;
    r.add(
        "xdp cost",
        "established flow, reply (DNAT)",
        "kernel",
        "ns/packet",
        v,
    );
    // A later fragment: its first fragment (and, since repetitions run on
    // the translated frame, the translated datagram's) seen before.
    let fragment = |src, sport, frag| {
        Spec {
            tcp_flags: TCP_ACK,
            payload: vec![0; 6],
            ttl: 255,
            frag,
            ..Spec::tcp(src, sport, SERVER, 80)
        }
        .build()
    };
    for (src, sport) in [(CLIENT, 33000), (FW_EXTERNAL, NAT_PORT)] {
        let first = fx.run(Side::Internal, &fragment(src, sport, 0x2000));
        anyhow::ensure!(
            first.action == XDP_REDIRECT,
            "a first fragment was not forwarded"
        );
    }
    let later = fragment(CLIENT, 33000, 0x0040);
    let v = timed(&mut fx, Side::Internal, &later, repeat, reps, XDP_REDIRECT)?;
    r.add(
        "xdp cost",
        "later fragment of a tracked datagram",
        "kernel",
        "ns/packet",
        v,
    );
    let miss = tcp(CLIENT, 34000, SERVER, 443, TCP_ACK);
    let v = timed(&mut fx, Side::Internal, &miss, repeat, reps, XDP_DROP)?;
    r.add(
        "xdp cost",
        "miss: no flow, no pinhole (dropped by the wall)",
        "kernel",
        "ns/packet",
        v,
    );
    // What an attacker outside spends the datapath on: a SYN to an internal
    // host that nothing expects.
    let unsolicited = tcp(SERVER, 80, CLIENT, 34000, TCP_SYN);
    let v = timed(
        &mut fx,
        Side::External,
        &unsolicited,
        repeat,
        reps,
        XDP_DROP,
    )?;
    r.add(
        "xdp cost",
        "unsolicited from outside (dropped by the wall)",
        "kernel",
        "ns/packet",
        v,
    );
    pinhole(&mut fx, 45000, 5);
    fx.peers.insert(5, "10.2.0.2/32".parse()?, true)?;
    let stranger = tcp([10, 2, 0, 77], 20, FW_EXTERNAL, 45000, TCP_SYN);
    let v = timed(&mut fx, Side::External, &stranger, repeat, reps, XDP_DROP)?;
    r.add(
        "xdp cost",
        "drop by IP filter (pinhole)",
        "kernel",
        "ns/packet",
        v,
    );
    let runs = if opts.quick { 50 } else { 200 };
    let v = (0..reps)
        .map(|_| first_packet_ns(&mut fx, runs))
        .collect::<anyhow::Result<Vec<_>>>()?;
    r.add(
        "xdp cost",
        "first packet matching a pinhole (creates the flows)",
        "kernel",
        "ns/packet",
        v,
    );
    fx.raise_wall(1024..=19999)?;
    let v = (0..reps)
        .map(|_| primary_first_packet_ns(&mut fx, runs))
        .collect::<anyhow::Result<Vec<_>>>()?;
    r.add(
        "xdp cost",
        "first packet of an outbound connection (the wall creates the flows)",
        "kernel",
        "ns/packet",
        v,
    );
    for (what, one_endpoint) in [
        (
            "first packet of an outbound UDP flow, new endpoint (claims a mapping)",
            false,
        ),
        (
            "first packet of an outbound UDP flow, mapped endpoint, new destination",
            true,
        ),
    ] {
        let v = (0..reps)
            .map(|_| udp_first_packet_ns(&mut fx, runs, one_endpoint))
            .collect::<anyhow::Result<Vec<_>>>()?;
        r.add("xdp cost", what, "kernel", "ns/packet", v);
    }
    tftp_costs(&mut fx, r, runs, reps, repeat)?;
    // The rules' worst case: every entry read, the last one allows.
    let mut rules = vec![
        Rule {
            protocol: IPPROTO_UDP,
            ..Rule::everything(rule_action::DENY)
        };
        RULE_SLOTS as usize - 1
    ];
    rules.push(Rule::everything(rule_action::ALLOW));
    fx.set_rules(&rules)?;
    let v = (0..reps)
        .map(|_| primary_first_packet_ns(&mut fx, runs))
        .collect::<anyhow::Result<Vec<_>>>()?;
    r.add(
        "xdp cost",
        "first packet of an outbound connection, 64 access rules (the last allows)",
        "kernel",
        "ns/packet",
        v,
    );
    Ok(())
}

/// The TFTP helper: a server's first answer from its transfer port (the
/// helper copies the request's flows, removed after each run), and what it
/// adds to a datagram from outside to a NAT port that answers no request
/// (left to the stack), with the helper on and off.
fn tftp_costs(
    fx: &mut Fixture,
    r: &mut Results,
    runs: usize,
    reps: usize,
    repeat: u32,
) -> anyhow::Result<()> {
    let mut wall = firewall_ctl::datapath::WallTables::open(&fx.pins)?;
    wall.set_tftp(&[69])?;
    let ask = Spec::udp(CLIENT, 45000, SERVER, 69).build();
    let request = fx.run(Side::Internal, &ask);
    if request.action != XDP_REDIRECT {
        bail!("TFTP request: verdict {}", request.action);
    }
    let nat = firewall_tests::packet::view(&request.frame).sport;
    let v = (0..reps)
        .map(|_| {
            let mut v = Vec::new();
            for i in 0..runs {
                // One answer per request packet: the client asks again.
                fx.run(Side::Internal, &ask);
                let tid = 50000 + (i % 10000) as u16;
                let out = fx.run(
                    Side::External,
                    &Spec::udp(SERVER, tid, FW_EXTERNAL, nat).build(),
                );
                if out.action != XDP_REDIRECT {
                    bail!("TFTP answer: verdict {}", out.action);
                }
                v.push(out.duration.as_nanos() as f64);
                let _ = fx
                    .flows
                    .remove(&FlowKey::new(IPPROTO_UDP, SERVER, tid, FW_EXTERNAL, nat));
                let _ = fx
                    .flows
                    .remove(&FlowKey::new(IPPROTO_UDP, CLIENT, 45000, SERVER, tid));
            }
            v.sort_by(|a, b| a.total_cmp(b));
            Ok(v[v.len() / 2])
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    r.add(
        "xdp cost",
        "a TFTP server's first answer (the helper copies the request's flows)",
        "kernel",
        "ns/packet",
        v,
    );
    let stray = Spec::udp([10, 2, 0, 77], 53, FW_EXTERNAL, nat).build();
    for (what, ports) in [
        (
            "UDP from outside to a NAT port, no request (TFTP helper on)",
            &[69][..],
        ),
        (
            "UDP from outside to a NAT port, no request (TFTP helper off)",
            &[][..],
        ),
    ] {
        wall.set_tftp(ports)?;
        let v = timed(fx, Side::External, &stray, repeat, reps, XDP_PASS)?;
        r.add("xdp cost", what, "kernel", "ns/packet", v);
    }
    Ok(())
}

/// The wall's first-packet path: an outbound SYN creates both flows (which
/// are removed after each run, so that every run takes the same path).
pub(crate) fn primary_first_packet_ns(fx: &mut Fixture, runs: usize) -> anyhow::Result<f64> {
    let mut v = Vec::new();
    for i in 0..runs {
        let sport = 40000 + (i % 20000) as u16;
        let out = fx.run(Side::Internal, &tcp(CLIENT, sport, SERVER, 80, TCP_SYN));
        if out.action != XDP_REDIRECT {
            bail!("outbound first packet: verdict {}", out.action);
        }
        v.push(out.duration.as_nanos() as f64);
        let key = FlowKey::new(IPPROTO_TCP, CLIENT, sport, SERVER, 80);
        if let Some(f) = fx.flows.get(&key)? {
            let back = FlowKey::new(IPPROTO_TCP, SERVER, 80, FW_EXTERNAL, f.nat_src_port);
            let _ = fx.flows.remove(&back);
        }
        let _ = fx.flows.remove(&key);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[v.len() / 2])
}

// ---------------------------------------------------------------------------
// 3. Control plane
// ---------------------------------------------------------------------------

/// The wall's first-packet path for UDP: from a new endpoint each run (its
/// mapping ended after the run), or from one endpoint to a new destination
/// each run (its mapping kept). The flows are removed after each run.
pub(crate) fn udp_first_packet_ns(
    fx: &mut Fixture,
    runs: usize,
    one_endpoint: bool,
) -> anyhow::Result<f64> {
    let mut mappings = UdpMappings::open(&fx.pins)?;
    let mut v = Vec::new();
    for i in 0..runs {
        let (sport, dport) = if one_endpoint {
            (40000, 1000 + (i % 20000) as u16)
        } else {
            (40000 + (i % 20000) as u16, 53)
        };
        let frame = Spec::udp(CLIENT, sport, SERVER, dport).build();
        let out = fx.run(Side::Internal, &frame);
        if out.action != XDP_REDIRECT {
            bail!("outbound UDP first packet: verdict {}", out.action);
        }
        v.push(out.duration.as_nanos() as f64);
        let key = FlowKey::new(IPPROTO_UDP, CLIENT, sport, SERVER, dport);
        if let Some(f) = fx.flows.get(&key)? {
            let back = FlowKey::new(IPPROTO_UDP, SERVER, dport, FW_EXTERNAL, f.nat_src_port);
            let _ = fx.flows.remove(&back);
            if !one_endpoint {
                mappings.end(&NatEndpoint::new(CLIENT, sport), f.nat_src_port)?;
            }
        }
        let _ = fx.flows.remove(&key);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[v.len() / 2])
}
