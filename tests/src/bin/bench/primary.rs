//! Section 6: primary connections through the wall, RFC 9693's figures side
//! by side with netfilter (conntrack + masquerade, `ct state
//! established,related accept`, policy drop) and plain forwarding without
//! NAT, in the same run: the TCP connection-establishment rate (short
//! connections), CPU per connection, and for established connections TCP
//! bulk and 64-byte UDP frames. The connections are the client's own, to
//! the server, tracked and translated by whoever forwards: no FTP, no
//! pinhole, no call to the firewall's API.

use std::{
    io::Read as _,
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use crate::*;

/// Server ports the short connections spread over: NAT ports are taken per
/// server endpoint, as a busy client host's connections spread over servers.
const CONN_PORTS: u16 = 8;
const CONN_PORT_BASE: u16 = 7100;
/// Client threads opening connections (one per CPU).
const CONNECTORS: usize = 2;
const IPERF_PORT: u16 = 5201;

const SETUPS: [Setup; 5] = [
    Setup::Plain,
    Setup::TcBound,
    Setup::Netfilter,
    Setup::KernelTc,
    Setup::Kernel,
];

pub(crate) const CONN_RATE: &str = "primary: new TCP connections/s";
pub(crate) const CONN_CPU: &str = "primary: CPU time per connection (all CPUs)";
pub(crate) const BULK: &str = "primary: TCP bulk (iperf3, server to client)";
pub(crate) const FRAMES: &str = "primary: UDP 64-byte frames delivered, per generating core";
const FRAME_CPU: &str = "primary: CPU time per delivered UDP frame (all CPUs)";

pub(crate) fn run(opts: &Opts, r: &mut Results) -> anyhow::Result<()> {
    let lab = Lab::create_direct(&unique_prefix("benchpri")).context("creating the lab")?;
    prime_neighbours(&lab);
    let acceptors = Acceptors::start(&lab.server)?;
    let mut progs = BenchPrograms::load()?;
    let seconds = if opts.quick { 1.0 } else { 3.0 };
    let packets: u32 = if opts.quick { 200_000 } else { 5_000_000 };
    pin_to_cpu(1);
    for setup in SETUPS {
        println!(" setup {}", setup.name());
        let prepared = prepare(&lab, setup)?;
        if setup == Setup::TcBound {
            attach_bound(&lab, &mut progs)?;
        }
        let (mut rate, mut cpu) = (Vec::new(), Vec::new());
        // One untimed round first (neighbours, caches, the first flows).
        for rep in 0..=opts.reps() {
            let (made, failed, cpu_ns) = connection_burst(&lab.client, seconds)?;
            if failed > made / 100 {
                r.notes.push(format!(
                    "{}: {failed} of {} short connections failed in one repetition",
                    setup.name(),
                    made + failed
                ));
            }
            if rep > 0 && made > 0 {
                rate.push(made as f64 / seconds);
                cpu.push(cpu_ns as f64 / made as f64 / 1000.0);
            }
        }
        r.add(
            "primary connections",
            CONN_RATE,
            setup.name(),
            "conn/s",
            rate,
        );
        r.add("primary connections", CONN_CPU, setup.name(), "µs", cpu);
        if let Some(fw) = &prepared.fw {
            // What the datapath dropped meanwhile says why a rate is low.
            let drops = drop_counters(fw);
            if !drops.is_empty() {
                r.notes
                    .push(format!("{} (connection bursts): {drops}", setup.name()));
            }
        }

        let mut gbits = Vec::new();
        for _ in 0..opts.reps() {
            gbits.push(iperf(&lab, seconds)?);
        }
        r.add("primary connections", BULK, setup.name(), "Gbit/s", gbits);

        let (pps, frame_cpu) = udp_frames(&lab, &mut progs, (SERVER, 9), packets, opts.reps())?;
        r.add("primary connections", FRAMES, setup.name(), "Mpps", pps);
        r.add(
            "primary connections",
            FRAME_CPU,
            setup.name(),
            "ns",
            frame_cpu,
        );
        if setup == Setup::TcBound {
            in_netns(&lab.fw.path(), || progs.detach_forward())??;
        }
        prepared.down(&lab)?;
    }
    acceptors.stop(&lab.server);
    Ok(())
}

/// The bound forwarder on both firewall interfaces, each to the other with
/// the MACs of the host behind it.
fn attach_bound(lab: &Lab, progs: &mut BenchPrograms) -> anyhow::Result<()> {
    let (vfi, vfe) = (addr::IF_INTERNAL, addr::IF_EXTERNAL);
    let (fi, fe) = (ifindex(&lab.fw, vfi)?, ifindex(&lab.fw, vfe)?);
    let (mi, me) = (mac(&lab.fw, vfi)?, mac(&lab.fw, vfe)?);
    let (client, server) = (mac(&lab.client, "eth0")?, mac(&lab.server, "eth0")?);
    in_netns(&lab.fw.path(), || -> anyhow::Result<()> {
        progs.attach_forward(vfi, fe, server, me)?;
        progs.attach_forward(vfe, fi, client, mi)
    })?
}

/// Listeners on the server that close every connection as soon as it is
/// accepted (the client then resets: `abort`).
struct Acceptors {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Acceptors {
    fn start(server: &Ns) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..CONN_PORTS {
            let addr = SocketAddrV4::new(addr::SERVER.parse()?, CONN_PORT_BASE + i);
            let listener = in_netns(&server.path(), || TcpListener::bind(addr))??;
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                for s in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    drop(s);
                }
            }));
        }
        Ok(Self { stop, threads })
    }

    fn stop(self, server: &Ns) {
        self.stop.store(true, Ordering::Relaxed);
        // A last connection each, from the server itself, wakes the accepts.
        let _ = in_netns(&server.path(), || {
            for i in 0..CONN_PORTS {
                let _ = TcpStream::connect((addr::SERVER, CONN_PORT_BASE + i));
            }
        });
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Opens short connections from the client for `seconds` (connect, wait for
/// the server's close, reset): (completed, failed, busy CPU ns of the
/// whole machine meanwhile).
fn connection_burst(client: &Ns, seconds: f64) -> anyhow::Result<(u64, u64, u64)> {
    let made = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_busy_ns();
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let threads: Vec<_> = (0..CONNECTORS)
        .map(|t| {
            let (made, failed, path) = (made.clone(), failed.clone(), client.path());
            std::thread::spawn(move || {
                in_netns(&path, || {
                    let mut i = t as u16;
                    let mut buf = [0u8; 16];
                    while Instant::now() < end {
                        let port = CONN_PORT_BASE + i % CONN_PORTS;
                        i = i.wrapping_add(1);
                        let to = SocketAddr::from((SERVER, port));
                        match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
                            Ok(mut s) => {
                                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                                // EOF: the server's close came through too.
                                match s.read(&mut buf) {
                                    Ok(0) => made.fetch_add(1, Ordering::Relaxed),
                                    _ => failed.fetch_add(1, Ordering::Relaxed),
                                };
                                abort(&s);
                            }
                            Err(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a connecting thread panicked"))??;
    }
    let cpu = cpu_busy_ns().saturating_sub(cpu0);
    Ok((
        made.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        cpu,
    ))
}

/// Closes with a reset (SO_LINGER 0), as connection-rate testers do: no
/// TIME_WAIT stays behind on either host. A server's TIME_WAIT would outlive
/// the setup that made it, and the next setup's connections from reused
/// addresses and ports, with other TCP timestamps, would meet its PAWS check.
fn abort(s: &TcpStream) {
    let zero = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::Linger, &zero);
}

/// The datapath's non-zero drop counters, "name packets, ...".
fn drop_counters(fw: &Firewall) -> String {
    let status = fw.status();
    let mut out = Vec::new();
    for c in status["counters"].as_array().into_iter().flatten() {
        let (Some(name), Some(packets)) = (c["name"].as_str(), c["packets"].as_u64()) else {
            continue;
        };
        if name.starts_with("drop_") && packets > 0 {
            out.push(format!("{name} {packets}"));
        }
    }
    out.join(", ")
}

/// One iperf3 run of `seconds`, the server sending to the client (`-R`):
/// the client's connection, the bulk on its reply direction. Gbit/s received.
fn iperf(lab: &Lab, seconds: f64) -> anyhow::Result<f64> {
    let mut server = lab.server.spawn(&format!(
        "exec iperf3 -s -1 -B {} -p {IPERF_PORT} >/dev/null 2>&1",
        addr::SERVER
    ))?;
    wait_listening(&lab.server, IPERF_PORT);
    let out = lab.client.sh(&format!(
        "iperf3 -c {} -p {IPERF_PORT} -R -t {seconds} -J",
        addr::SERVER
    ));
    let _ = server.kill();
    let _ = server.wait();
    let out = out?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3's JSON")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 reported no throughput: {out}"))?;
    Ok(bps / 1e9)
}

/// Section 6 of the report: a row per figure, the setups side by side with
/// their ratio to netfilter's.
pub(crate) fn report(r: &Results, o: &mut String) {
    use std::fmt::Write as _;
    const SECTION: &str = "primary connections";
    if !r.figures.iter().any(|f| f.section == SECTION) {
        return;
    }
    let _ = writeln!(o, "\n## 6. Primary connections (RFC 9693)\n");
    let _ = writeln!(
        o,
        "`tc-bound`: plain routing with only new MACs and a redirect at tcx ingress, the bound of any datapath there.\n"
    );
    let setups = ["kernel", "kernel-tc", "tc-bound", "netfilter", "plain"];
    let _ = writeln!(o, "| Figure | {} |", setups.join(" | "));
    let _ = writeln!(o, "|---|{}", "---|".repeat(setups.len()));
    for name in [CONN_RATE, CONN_CPU, BULK, FRAMES, FRAME_CPU] {
        let nf = r.get(name, "netfilter").map(|f| f.median);
        let unit = r.get(name, "netfilter").map_or("", |f| f.unit.as_str());
        let mut row = format!("| {name} ({unit}) |");
        for setup in setups {
            let cell = match (r.get(name, setup), nf) {
                (Some(f), Some(n)) if setup != "netfilter" && n > 0.0 => {
                    format!(" {} = **{:.2}×** |", crate::fmt_fig(f), f.median / n)
                }
                (Some(f), _) => format!(" {} |", crate::fmt_fig(f)),
                (None, _) => " – |".into(),
            };
            row.push_str(&cell);
        }
        let _ = writeln!(o, "{row}");
    }
}

/// The section's targets: kernel modes against netfilter, as RFC 9693
/// figures of the same run.
pub(crate) fn targets(r: &Results) -> Vec<(String, String, bool)> {
    let ratio = |name: &str, setup: &str| -> Option<f64> {
        Some(r.get(name, setup)?.median / r.get(name, "netfilter")?.median)
    };
    let mut rows = Vec::new();
    for (setup, mode) in [
        ("kernel", "XDP, the default on NICs"),
        ("kernel-tc", "TC, the default on virtual interfaces"),
    ] {
        for (name, what, want) in [
            (CONN_RATE, "new-connection rate", 1.0),
            (FRAMES, "small-packet rate per generating core", 3.0),
            (BULK, "TCP bulk throughput", 1.0),
        ] {
            if let Some(x) = ratio(name, setup) {
                rows.push((
                    format!("Primary connections ({mode}): {what} ≥ {want}× netfilter's"),
                    format!("{x:.2}×"),
                    x >= want,
                ));
            }
        }
    }
    rows
}
