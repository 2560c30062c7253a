//! `cargo xtask bench [--quick]`: the firewall measured against netfilter and
//! plain forwarding, in one run on one machine.
//!
//! 1. Secondary-connection data path in the namespace lab, four setups: our
//!    kernel mode (XDP), our user mode (relay, no data filter), netfilter (the
//!    `ftp` conntrack helper and masquerade) and plain forwarding without NAT:
//!    TCP bulk (an FTP data transfer) and 64-byte UDP frames across a UDP
//!    pinhole, generated with BPF_PROG_RUN live frames and counted by an XDP
//!    sink on the server.
//! 2. Per-packet cost of the XDP program (BPF_PROG_RUN, many repetitions).
//! 3. Control plane: calls per second and latency, in-process and through the
//!    API; whether a pinhole is live when its call returns.
//! 4. Scale: map memory and lookup cost from 1 k to 1 M pinholes and flows.
//! 5. FTP session rate: many short sessions from one client host, with
//!    netfilter and plain routing in the same run (`sessions.rs`).
//!
//! Writes `results.json`, `report.md` and `chart.svg` into the output
//! directory. Several repetitions per figure; medians with min–max.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use firewall_common::{
    flow::{FlowKey, FlowValue},
    pinhole::{side, PinholeKey, PinholeValue},
    IPPROTO_TCP, IPPROTO_UDP,
};
use firewall_ctl::{
    api::{Client, Request},
    datapath::{BenchPrograms, KernelMaps, MapSizes, Side},
    engine::{BindRequest, Engine, EngineConfig, RedirectRequest},
    flags::ConnFlags,
    policy::{IpFilter, Transport},
    ports::PortPool,
};
use firewall_tests::{
    daemon::Firewall,
    fixture::{Fixture, CLIENT, FW_EXTERNAL, SERVER, XDP_DROP, XDP_PASS, XDP_REDIRECT},
    ftp::FtpServer,
    lab::{addr, unique_prefix, Lab, Ns},
    netns::in_netns,
    packet::{Spec, TCP_ACK, TCP_SYN},
    traffic::prime_neighbours,
};
use serde::Serialize;

mod sessions;

struct Opts {
    quick: bool,
    out: PathBuf,
    /// Sections to run (all when empty): data, xdp, control, scale.
    only: Vec<String>,
}

impl Opts {
    fn runs(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }

    fn reps(&self) -> usize {
        if self.quick {
            2
        } else {
            5
        }
    }
}

/// One measured figure: its repetitions and their summary.
#[derive(Serialize, serde::Deserialize, Clone)]
struct Figure {
    section: String,
    name: String,
    setup: String,
    unit: String,
    values: Vec<f64>,
    median: f64,
    min: f64,
    max: f64,
}

#[derive(Serialize, serde::Deserialize, Default)]
struct Results {
    started: String,
    quick: bool,
    machine: BTreeMap<String, String>,
    figures: Vec<Figure>,
    notes: Vec<String>,
}

impl Results {
    fn add(&mut self, section: &str, name: &str, setup: &str, unit: &str, mut values: Vec<f64>) {
        values.retain(|v| v.is_finite());
        let mut sorted = values.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let median = if sorted.is_empty() {
            f64::NAN
        } else {
            sorted[sorted.len() / 2]
        };
        let fig = Figure {
            section: section.into(),
            name: name.into(),
            setup: setup.into(),
            unit: unit.into(),
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
            median,
            values,
        };
        println!(
            "  {:<44} {:<10} {:>12.3} {:<10} [{:.3} – {:.3}]",
            fig.name, fig.setup, fig.median, fig.unit, fig.min, fig.max
        );
        self.figures.push(fig);
    }

    fn get(&self, name: &str, setup: &str) -> Option<&Figure> {
        self.figures
            .iter()
            .find(|f| f.name == name && f.setup == setup)
    }
}

/// The sections `--only` can name.
const SECTIONS: [&str; 5] = ["data", "xdp", "control", "scale", "sessions"];

fn main() {
    let mut opts = Opts {
        quick: false,
        out: PathBuf::from("bench-results"),
        only: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--from" => match args.next() {
                // Renders report.md and chart.svg again from a run's results.json.
                Some(d) => {
                    let dir = PathBuf::from(d);
                    if let Err(e) = rerender(&dir) {
                        die(&format!("{e:#}"));
                    }
                    return;
                }
                None => die("--from needs a results directory"),
            },
            "--only" => match args.next() {
                Some(s) if SECTIONS.contains(&s.as_str()) => opts.only.push(s),
                _ => die(&format!("--only needs one of {}", SECTIONS.join(", "))),
            },
            "--out" => match args.next() {
                Some(d) => opts.out = d.into(),
                None => die("--out needs a directory"),
            },
            other => die(&format!(
                "unknown argument {other:?} (use --quick, --out DIR, --only SECTION)"
            )),
        }
    }
    if let Err(e) = run(&opts) {
        die(&format!("{e:#}"));
    }
}

fn rerender(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join("results.json");
    let r: Results = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    std::fs::write(dir.join("report.md"), report(&r))?;
    std::fs::write(dir.join("chart.svg"), chart(&r))?;
    println!("rendered {}/report.md and chart.svg", dir.display());
    Ok(())
}

fn die(msg: &str) -> ! {
    eprintln!("bench: {msg}");
    std::process::exit(1);
}

fn sh(cmd: &str) -> String {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn run(opts: &Opts) -> anyhow::Result<()> {
    if !xtask::is_root() {
        bail!("the benchmark needs root (BPF, network namespaces)");
    }
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let mut r = Results {
        started: sh("date -u +%Y-%m-%dT%H:%M:%SZ"),
        quick: opts.quick,
        ..Default::default()
    };
    r.machine.insert("kernel".into(), sh("uname -r"));
    r.machine.insert("cpus".into(), sh("nproc"));
    r.machine.insert(
        "cpu".into(),
        sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
    );
    r.machine.insert(
        "build".into(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .into(),
    );

    if opts.runs("data") {
        println!("[1/5] data path in the lab (kernel, user, netfilter, plain forwarding)");
        data_path(opts, &mut r).context("data path")?;
    }
    if opts.runs("xdp") {
        println!("[2/5] per-packet cost of the XDP program (BPF_PROG_RUN)");
        xdp_cost(opts, &mut r).context("XDP cost")?;
    }
    if opts.runs("control") {
        println!("[3/5] control plane");
        control_plane(opts, &mut r).context("control plane")?;
        let lab = Lab::create_direct(&unique_prefix("benchapi")).context("creating the lab")?;
        let fw = Firewall::up(&lab, &[])?;
        api_latency(opts, &mut r, &fw).context("API latency")?;
    }
    if opts.runs("scale") {
        println!("[4/5] scale");
        scale(opts, &mut r).context("scale")?;
    }
    if opts.runs("sessions") {
        println!("[5/5] FTP session rate (default configuration, netfilter, plain)");
        sessions::run(opts, &mut r).context("FTP sessions")?;
    }

    std::fs::write(
        opts.out.join("results.json"),
        serde_json::to_vec_pretty(&r)?,
    )?;
    std::fs::write(opts.out.join("report.md"), report(&r))?;
    std::fs::write(opts.out.join("chart.svg"), chart(&r))?;
    println!(
        "\nresults: {}/results.json, report.md, chart.svg",
        opts.out.display()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 1. Data path
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Setup {
    Kernel,
    /// Kernel mode with the datapath at tcx ingress instead of XDP.
    KernelTc,
    User,
    Netfilter,
    Plain,
}

impl Setup {
    const ALL: [Setup; 5] = [
        Setup::Plain,
        Setup::Netfilter,
        Setup::User,
        Setup::KernelTc,
        Setup::Kernel,
    ];

    fn name(self) -> &'static str {
        match self {
            Setup::Kernel => "kernel",
            Setup::KernelTc => "kernel-tc",
            Setup::User => "user",
            Setup::Netfilter => "netfilter",
            Setup::Plain => "plain",
        }
    }
}

/// The netfilter baseline of lab.md: the ftp helper and masquerade.
const NFT_RULESET: &str = r#"table ip fw {
  ct helper ftp-std {
    type "ftp" protocol tcp
  }
  chain prec {
    type filter hook prerouting priority 0;
    tcp dport 21 ct helper set "ftp-std"
  }
  chain fwdc {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "vfi" oifname "vfe" accept
  }
  chain postc {
    type nat hook postrouting priority 100;
    oifname "vfe" masquerade
  }
}
"#;

/// What a setup changed in the lab, undone by `down`.
struct Prepared {
    setup: Setup,
    fw: Option<Firewall>,
}

fn prepare(lab: &Lab, setup: Setup) -> anyhow::Result<Prepared> {
    let fw = match setup {
        Setup::Kernel => Some(Firewall::up(lab, &[])?),
        Setup::KernelTc => Some(Firewall::up(lab, &["--xdp-mode", "tc"])?),
        Setup::User => {
            let cfg = std::env::temp_dir().join(format!("{}-user.toml", lab.prefix));
            std::fs::write(&cfg, "[ftp]\ndata_connections = \"user\"\n")?;
            let fw = Firewall::up(lab, &["--config", cfg.to_str().expect("utf-8")]);
            let _ = std::fs::remove_file(&cfg);
            Some(fw?)
        }
        Setup::Netfilter => {
            lab.fw.sh("modprobe nf_conntrack_ftp 2>/dev/null; modprobe nf_nat_ftp 2>/dev/null; sysctl -qw net.ipv4.conf.all.forwarding=1")?;
            let path = std::env::temp_dir().join(format!("{}-fw.nft", lab.prefix));
            std::fs::write(&path, NFT_RULESET)?;
            lab.fw.sh(&format!("nft -f {}", path.display()))?;
            let _ = std::fs::remove_file(&path);
            None
        }
        Setup::Plain => {
            lab.fw.sh("sysctl -qw net.ipv4.conf.all.forwarding=1")?;
            lab.server.sh(&format!(
                "ip route add 10.1.0.0/24 via {}",
                addr::FW_EXTERNAL
            ))?;
            None
        }
    };
    prime_neighbours(lab);
    Ok(Prepared { setup, fw })
}

impl Prepared {
    fn down(self, lab: &Lab) -> anyhow::Result<()> {
        drop(self.fw);
        match self.setup {
            Setup::Netfilter => {
                lab.fw.sh("nft delete table ip fw; sysctl -qw net.ipv4.conf.all.forwarding=0; conntrack -F 2>/dev/null || true")?;
            }
            Setup::Plain => {
                lab.fw.sh("sysctl -qw net.ipv4.conf.all.forwarding=0")?;
                lab.server.sh("ip route del 10.1.0.0/24")?;
            }
            _ => {}
        }
        Ok(())
    }
}

fn ifindex(ns: &Ns, name: &str) -> anyhow::Result<u32> {
    Ok(in_netns(&ns.path(), || {
        nix::net::if_::if_nametoindex(name)
    })??)
}

fn mac(ns: &Ns, name: &str) -> anyhow::Result<[u8; 6]> {
    // nsenter keeps the host's /sys: ask ip instead.
    let text = ns.sh(&format!(
        "ip -o link show dev {name} | grep -o 'link/ether [0-9a-f:]*' | cut -d' ' -f2"
    ))?;
    let mut m = [0u8; 6];
    for (i, part) in text.trim().split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(m)
}

/// Busy CPU time of the whole machine so far, in nanoseconds (/proc/stat).
fn cpu_busy_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|i| f.get(*i)).sum();
    let hz = 100; // USER_HZ
    busy * 1_000_000_000 / hz
}

fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

fn data_path(opts: &Opts, r: &mut Results) -> anyhow::Result<()> {
    let lab = Lab::create_direct(&unique_prefix("bench")).context("creating the lab")?;
    prime_neighbours(&lab);
    let server = FtpServer::start(&lab.server, &lab.prefix)?;
    let size: u64 = if opts.quick { 256 << 20 } else { 2 << 30 };
    // Sparse: vsftpd sends it with sendfile, the disk plays no part.
    sh(&format!(
        "truncate -s {size} '{}' && chmod 644 '{}'",
        server.root.join("big.bin").display(),
        server.root.join("big.bin").display()
    ));
    let client_if = ifindex(&lab.client, "eth0")?;
    let server_if = ifindex(&lab.server, "eth0")?;
    let client_mac = mac(&lab.client, "eth0")?;
    let fw_mac = mac(&lab.fw, addr::IF_INTERNAL)?;
    let mut progs = BenchPrograms::load()?;
    let packets: u32 = if opts.quick { 200_000 } else { 5_000_000 };
    pin_to_cpu(1);

    for setup in Setup::ALL {
        println!(" setup {}", setup.name());
        let prepared = prepare(&lab, setup)?;
        // TCP bulk: an FTP (EPSV) data transfer of the sparse file, after
        // one untimed transfer (the first after a setup change runs slow).
        let mut gbits = Vec::new();
        for rep in 0..=opts.reps() {
            let out = lab.client.sh(&format!(
                "curl -sS --max-time 120 -o /dev/null -w '%{{speed_download}} %{{size_download}}' ftp://{}/big.bin",
                addr::SERVER
            ))?;
            let mut it = out.split_whitespace();
            let speed: f64 = it.next().unwrap_or("0").parse().unwrap_or(0.0);
            let got: u64 = it.next().unwrap_or("0").parse().unwrap_or(0);
            if got != size {
                bail!("{}: FTP transfer got {got} of {size} bytes", setup.name());
            }
            if rep > 0 {
                gbits.push(speed * 8.0 / 1e9);
            }
        }
        r.add(
            "data path",
            "TCP bulk (FTP data)",
            setup.name(),
            "Gbit/s",
            gbits,
        );

        // 64-byte UDP frames across a UDP pinhole (or the equivalent flow).
        let (dst, dport) = match &prepared.fw {
            Some(fw) => {
                let s = fw.session(addr::CLIENT);
                let mut args = vec![
                    "redirect-connections",
                    "--session",
                    &s,
                    "--connect",
                    "10.2.0.2:9",
                    "--protocol",
                    "udp",
                ];
                if setup == Setup::User {
                    args.extend(["--flags", "no-kernel-mode"]);
                }
                let rc = fw.ok(&args);
                let internal: std::net::SocketAddrV4 = rc["internal_address"]
                    .as_str()
                    .context("internal address")?
                    .parse()?;
                (internal.ip().octets(), internal.port())
            }
            None => (SERVER, 9),
        };
        let mut spec = Spec::udp(CLIENT, 5555, dst, dport);
        spec.payload = vec![0x5a; 18]; // 14 + 20 + 8 + 18 = 60 bytes, 64 on the wire
        let mut frame = spec.build();
        frame[0..6].copy_from_slice(&fw_mac);
        frame[6..12].copy_from_slice(&client_mac);
        in_netns(&lab.server.path(), || progs.attach_sink(server_if))??;
        // The first packet opens the pinhole (or the conntrack entry).
        in_netns(&lab.client.path(), || progs.generate(&frame, client_if, 10))??;
        std::thread::sleep(Duration::from_millis(300));
        let (mut pps, mut cpu) = (Vec::new(), Vec::new());
        for _ in 0..opts.reps() {
            let before = progs.sink_count()?;
            let cpu0 = cpu_busy_ns();
            let took = in_netns(&lab.client.path(), || {
                progs.generate(&frame, client_if, packets)
            })??;
            std::thread::sleep(Duration::from_millis(200));
            let delivered = progs.sink_count()? - before;
            let cpu_used = cpu_busy_ns().saturating_sub(cpu0);
            pps.push(delivered as f64 / took.as_secs_f64() / 1e6);
            if delivered > 0 {
                cpu.push(cpu_used as f64 / delivered as f64);
            }
        }
        in_netns(&lab.server.path(), || progs.detach_sink())??;
        r.add(
            "data path",
            "UDP 64-byte frames delivered, per generating core",
            setup.name(),
            "Mpps",
            pps,
        );
        r.add(
            "data path",
            "CPU time per delivered UDP frame (all CPUs)",
            setup.name(),
            "ns",
            cpu,
        );
        prepared.down(&lab)?;
    }
    drop(server);
    drop(lab);
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. Per-packet cost of the XDP program
// ---------------------------------------------------------------------------

const NAT_PORT: u16 = 61000;

fn flow_pair(fx: &mut Fixture, cport: u16) {
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
fn repeatable(fx: &mut Fixture, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) {
    fx.flows
        .insert(
            &FlowKey::new(IPPROTO_TCP, src, sport, dst, dport),
            &FlowValue::forward(src, sport, dst, dport),
        )
        .expect("flow");
}

fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
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
const REPEAT: u32 = 250;
/// Calls per value for forwarded frames. Every XDP test run swaps the
/// kernel's XDP dispatcher in and out (an RCU grace period, milliseconds
/// here), so calls are few and long.
const CALLS: usize = 40;

/// Kernel-measured ns per packet, `reps` values, checking the verdict. A
/// frame that is not forwarded runs `packets` times in one call; a forwarded
/// one in CALLS calls of REPEAT runs on fresh copies (median of the calls).
fn timed(
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
fn pinhole(fx: &mut Fixture, port: u16, peer_filter: u32) -> PinholeKey {
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
fn first_packet_ns(fx: &mut Fixture, runs: usize) -> anyhow::Result<f64> {
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

fn xdp_cost(opts: &Opts, r: &mut Results) -> anyhow::Result<()> {
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
    let miss = tcp(CLIENT, 34000, SERVER, 443, TCP_ACK);
    let v = timed(&mut fx, Side::Internal, &miss, repeat, reps, XDP_PASS)?;
    r.add(
        "xdp cost",
        "miss: no flow, no pinhole (pass)",
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
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. Control plane
// ---------------------------------------------------------------------------

fn engine_config(fx: &Fixture) -> EngineConfig {
    EngineConfig {
        internal_ifindex: fx.in_ifindex,
        external_ifindex: fx.ex_ifindex,
        snat_block: 64,
        networks: Vec::new(),
        ..EngineConfig::lab()
    }
}

fn bind_request(session: u64, port: u16) -> BindRequest {
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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Calls/s, p50 and p99 (µs) of `calls` timed calls, in batches that are
/// then undone (untimed) so that the port range never runs out.
fn measure_calls(
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

fn control_plane(opts: &Opts, r: &mut Results) -> anyhow::Result<()> {
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
fn api_latency(opts: &Opts, r: &mut Results, fw: &Firewall) -> anyhow::Result<()> {
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

fn memlock(pins_dir: &Path, map: &str) -> f64 {
    let out = sh(&format!(
        "bpftool -j map show pinned {}/{map}",
        pins_dir.display()
    ));
    serde_json::from_str::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| v["bytes_memlock"].as_f64())
        .unwrap_or(f64::NAN)
        / (1024.0 * 1024.0)
}

fn scale(opts: &Opts, r: &mut Results) -> anyhow::Result<()> {
    let levels: &[u32] = if opts.quick {
        &[1_000, 10_000]
    } else {
        &[1_000, 10_000, 100_000, 1_000_000]
    };
    let repeat = if opts.quick { 100_000 } else { 1_000_000 };
    for &n in levels {
        let label = if n >= 1_000_000 {
            format!("{}M", n / 1_000_000)
        } else {
            format!("{}k", n / 1000)
        };
        println!(" {label} pinholes and {label} flows");
        let mut fx = Fixture::with_sizes(
            &format!("sc{label}"),
            MapSizes {
                // LRU tables evict before they are full; leave room.
                flows: n + n / 4,
                // Room for the first-packet measurement's own pinholes.
                pinholes: n + 1024,
            },
        )?;
        let t = Instant::now();
        for i in 0..n / 2 {
            // n/2 connections of two flow entries each.
            let src = [10, 1, (i >> 16) as u8, (i >> 8) as u8];
            let sport = 1024 + (i & 0xff) as u16 * 200;
            let k = FlowKey::new(IPPROTO_TCP, src, sport, SERVER, 80);
            fx.flows.insert(
                &k,
                &FlowValue::forward(FW_EXTERNAL, 1024 + (i % 60000) as u16, SERVER, 80),
            )?;
            let b = FlowKey::new(
                IPPROTO_TCP,
                SERVER,
                80,
                FW_EXTERNAL,
                1024 + (i % 60000) as u16,
            );
            let mut bv = FlowValue::forward(SERVER, 80, src, sport);
            bv.owner = i as u64;
            fx.flows.insert(&b, &bv)?;
        }
        for i in 0..n {
            let key = PinholeKey::new(
                IPPROTO_UDP,
                [10, 2, (i >> 16) as u8 | 0x80, (i >> 8) as u8],
                (i & 0xff) as u16 + 1,
                side::EXTERNAL,
            );
            fx.pinholes.insert(
                &key,
                &PinholeValue {
                    target_addr: CLIENT,
                    target_port: 5001,
                    remaining: 1,
                    owner: i as u64,
                    ..Default::default()
                },
            )?;
        }
        r.notes.push(format!(
            "{label}: filling the tables took {:.1} s (one syscall per entry)",
            t.elapsed().as_secs_f64()
        ));
        let flows_mib = memlock(&fx.pins.dir, "FLOWS");
        let pinholes_mib = memlock(&fx.pins.dir, "PINHOLES");
        r.add("scale", "FLOWS map memory", &label, "MiB", vec![flows_mib]);
        r.add(
            "scale",
            "PINHOLES map memory",
            &label,
            "MiB",
            vec![pinholes_mib],
        );
        r.add(
            "scale",
            "FLOWS + PINHOLES map memory",
            &label,
            "MiB",
            vec![flows_mib + pinholes_mib],
        );
        // A flow in the middle of the filled table.
        let i = n / 4;
        let src = [10, 1, (i >> 16) as u8, (i >> 8) as u8];
        let sport = 1024 + (i & 0xff) as u16 * 200;
        let hit = tcp(src, sport, SERVER, 80, TCP_ACK);
        let nat_port = 1024 + (i % 60000) as u16;
        repeatable(&mut fx, FW_EXTERNAL, nat_port, SERVER, 80);
        let v = timed(
            &mut fx,
            Side::Internal,
            &hit,
            repeat,
            opts.reps(),
            XDP_REDIRECT,
        )?;
        r.add("scale", "established flow hit", &label, "ns/packet", v);
        let miss = tcp(CLIENT, 34000, SERVER, 443, TCP_ACK);
        let v = timed(
            &mut fx,
            Side::Internal,
            &miss,
            repeat,
            opts.reps(),
            XDP_PASS,
        )?;
        r.add(
            "scale",
            "miss (flow and pinhole lookups)",
            &label,
            "ns/packet",
            v,
        );
        let v = (0..opts.reps())
            .map(|_| first_packet_ns(&mut fx, 40))
            .collect::<anyhow::Result<Vec<_>>>()?;
        r.add(
            "scale",
            "first packet matching a pinhole",
            &label,
            "ns/packet",
            v,
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Report and chart
// ---------------------------------------------------------------------------

fn fmt_fig(f: &Figure) -> String {
    let digits = if f.median >= 100.0 {
        0
    } else if f.median >= 10.0 {
        1
    } else {
        2
    };
    format!(
        "{:.*} [{:.*}–{:.*}]",
        digits, f.median, digits, f.min, digits, f.max
    )
}

fn report(r: &Results) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# Benchmark report\n");
    let _ =
        writeln!(
        o,
        "Run {} on {} CPUs ({}), kernel {}, {} build{}. Medians of the repetitions, [min–max].\n",
        r.started,
        r.machine.get("cpus").map_or("?", |s| s.as_str()),
        r.machine.get("cpu").map_or("?", |s| s.trim()),
        r.machine.get("kernel").map_or("?", |s| s.as_str()),
        r.machine.get("build").map_or("?", |s| s.as_str()),
        if r.quick { ", quick mode (small sizes, 2 repetitions)" } else { "" }
    );
    let _ = writeln!(o, "## 1. Secondary-connection data path (lab, veth)\n");
    let _ = writeln!(
        o,
        "Same lab, same traffic; ratios are to netfilter (ftp helper + masquerade) measured in this run.\n"
    );
    let _ = writeln!(
        o,
        "| Metric | kernel (XDP) | kernel (TC) | user (relay) | netfilter | plain forwarding |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|");
    for name in [
        "TCP bulk (FTP data)",
        "UDP 64-byte frames delivered, per generating core",
        "CPU time per delivered UDP frame (all CPUs)",
    ] {
        let nf = r.get(name, "netfilter").map(|f| f.median);
        let unit = r.get(name, "netfilter").map_or("", |f| f.unit.as_str());
        let mut row = format!("| {name} ({unit}) |");
        for setup in ["kernel", "kernel-tc", "user", "netfilter", "plain"] {
            match r.get(name, setup) {
                Some(f) => {
                    let ratio = nf
                        .filter(|n| *n > 0.0)
                        .map(|n| format!(" = **{:.2}×** nf", f.median / n))
                        .unwrap_or_default();
                    let _ = write!(
                        row,
                        " {}{} |",
                        fmt_fig(f),
                        if setup == "netfilter" {
                            String::new()
                        } else {
                            ratio
                        }
                    );
                }
                None => row.push_str(" – |"),
            }
        }
        let _ = writeln!(o, "{row}");
    }
    for (title, section) in [
        (
            "## 2. Per-packet cost of the XDP program (BPF_PROG_RUN)",
            "xdp cost",
        ),
        ("## 3. Control plane", "control plane"),
        ("## 4. Scale", "scale"),
    ] {
        let _ = writeln!(o, "\n{title}\n");
        let _ = writeln!(o, "| Figure | Level | Value |");
        let _ = writeln!(o, "|---|---|---|");
        for f in r.figures.iter().filter(|f| f.section == section) {
            let _ = writeln!(
                o,
                "| {} | {} | {} {} |",
                f.name,
                f.setup,
                fmt_fig(f),
                f.unit
            );
        }
    }
    sessions::report(r, &mut o);
    let _ = writeln!(o, "\n## Targets\n");
    let med = |n: &str, s: &str| r.get(n, s).map(|f| f.median).unwrap_or(f64::NAN);
    let pps_ratio = med(
        "UDP 64-byte frames delivered, per generating core",
        "kernel",
    ) / med(
        "UDP 64-byte frames delivered, per generating core",
        "netfilter",
    );
    let tcp_ratio = med("TCP bulk (FTP data)", "kernel") / med("TCP bulk (FTP data)", "netfilter");
    let tcp_ratio_tc =
        med("TCP bulk (FTP data)", "kernel-tc") / med("TCP bulk (FTP data)", "netfilter");
    let pps_ratio_tc = med(
        "UDP 64-byte frames delivered, per generating core",
        "kernel-tc",
    ) / med(
        "UDP 64-byte frames delivered, per generating core",
        "netfilter",
    );
    let hit = med("established flow, outbound (SNAT)", "kernel")
        .max(med("established flow, reply (DNAT)", "kernel"));
    let calls = med("BindForClient in-process", "kernel");
    let api_p99 = med("BindForClient through the API p99", "kernel");
    let inproc_p99 = med("BindForClient in-process p99", "kernel");
    let mem = med("FLOWS + PINHOLES map memory", "1M");
    let scale_ratio = med("established flow hit", "1M") / med("established flow hit", "1k");
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    let rows = [
        (
            "Kernel mode (XDP) ≥ 3× netfilter's small-packet rate per generating core".to_string(),
            format!("{pps_ratio:.2}×"),
            verdict(pps_ratio >= 3.0),
        ),
        (
            "Kernel mode (TC) ≥ 3× netfilter's small-packet rate per generating core".to_string(),
            format!("{pps_ratio_tc:.2}×"),
            verdict(pps_ratio_tc >= 3.0),
        ),
        (
            "Kernel mode (XDP) ≥ netfilter's TCP bulk throughput".to_string(),
            format!("{tcp_ratio:.2}×"),
            verdict(tcp_ratio >= 1.0),
        ),
        (
            "Kernel mode (TC) ≥ netfilter's TCP bulk throughput".to_string(),
            format!("{tcp_ratio_tc:.2}×"),
            verdict(tcp_ratio_tc >= 1.0),
        ),
        (
            "Established-flow hit ≤ 100 ns per packet".to_string(),
            format!("{hit:.0} ns"),
            verdict(hit <= 100.0),
        ),
        (
            "≥ 100 000 BindForClient calls/s in-process".to_string(),
            format!("{calls:.0}/s"),
            verdict(calls >= 100_000.0),
        ),
        (
            "The API adds < 100 µs at p99".to_string(),
            format!("{:.0} µs", api_p99 - inproc_p99),
            verdict(api_p99 - inproc_p99 < 100.0),
        ),
        (
            "1 M pinholes + 1 M flows in ≤ 512 MiB".to_string(),
            if mem.is_nan() {
                "not measured (quick)".into()
            } else {
                format!("{mem:.0} MiB")
            },
            if mem.is_nan() {
                "–"
            } else {
                verdict(mem <= 512.0)
            },
        ),
        (
            "Lookup at 1 M within 2× of 1 k".to_string(),
            if scale_ratio.is_nan() {
                "not measured (quick)".into()
            } else {
                format!("{scale_ratio:.2}×")
            },
            if scale_ratio.is_nan() {
                "–"
            } else {
                verdict(scale_ratio <= 2.0)
            },
        ),
    ];
    let _ = writeln!(o, "| Target | Measured | |");
    let _ = writeln!(o, "|---|---|---|");
    for (t, m, v) in rows {
        let _ = writeln!(o, "| {t} | {m} | {v} |");
    }
    for (t, m, ok) in sessions::targets(r) {
        let _ = writeln!(o, "| {t} | {m} | {} |", verdict(ok));
    }
    if !r.notes.is_empty() {
        let _ = writeln!(o, "\n## Notes\n");
        for n in &r.notes {
            let _ = writeln!(o, "- {n}");
        }
    }
    o
}

/// Two bar groups (TCP Gbit/s, UDP Mpps) for the four setups, with min–max whiskers.
fn chart(r: &Results) -> String {
    let setups = ["kernel", "kernel-tc", "user", "netfilter", "plain"];
    let colors = ["#1f77b4", "#17becf", "#ff7f0e", "#7f7f7f", "#2ca02c"];
    let panels = [
        ("TCP bulk (FTP data)", "TCP bulk, Gbit/s"),
        (
            "UDP 64-byte frames delivered, per generating core",
            "64-byte UDP, Mpps per core",
        ),
    ];
    let (w, h, pw) = (760.0, 360.0, 360.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (p, (name, title)) in panels.iter().enumerate() {
        let x0 = 20.0 + p as f64 * (pw + 20.0);
        let figs: Vec<Option<&Figure>> = setups.iter().map(|st| r.get(name, st)).collect();
        let top = figs
            .iter()
            .flatten()
            .map(|f| f.max)
            .fold(0.0f64, f64::max)
            .max(1e-9);
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"22\" font-size=\"14\" text-anchor=\"middle\">{title}</text>",
            x0 + pw / 2.0
        );
        let (base, height) = (h - 50.0, h - 90.0);
        let _ = writeln!(
            s,
            "<line x1=\"{x0}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"black\"/>",
            x0 + pw
        );
        for (i, f) in figs.iter().enumerate() {
            let Some(f) = f else { continue };
            let slot = pw / setups.len() as f64;
            let bw = slot - 14.0;
            let x = x0 + 7.0 + i as f64 * slot;
            let y = |v: f64| base - v / top * height;
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{:.1}\" fill=\"{}\"/>",
                y(f.median),
                base - y(f.median),
                colors[i]
            );
            let cx = x + bw / 2.0;
            let _ = writeln!(
                s,
                "<line x1=\"{cx:.1}\" y1=\"{:.1}\" x2=\"{cx:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
                y(f.min),
                y(f.max)
            );
            let _ = writeln!(
                s,
                "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.2}</text>",
                y(f.max) - 4.0,
                f.median
            );
            let _ = writeln!(
                s,
                "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                base + 16.0,
                setups[i]
            );
        }
    }
    s.push_str("</svg>\n");
    s
}
