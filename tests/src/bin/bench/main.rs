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
//! 5. FTP session rate: many short sessions from one client host, the
//!    default configuration and control connections read in place, with
//!    netfilter and plain routing in the same run (`sessions.rs`).
//! 6. Primary connections through the wall (RFC 9693): new connections per
//!    second, CPU per connection, TCP bulk and small packets of established
//!    connections, against netfilter's conntrack + masquerade (`primary.rs`).
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
    rules::{rule_action, Rule, RULE_SLOTS},
    wall::NatEndpoint,
    IPPROTO_TCP, IPPROTO_UDP,
};
use firewall_ctl::{
    api::{Client, Request},
    datapath::{BenchPrograms, KernelMaps, MapSizes, Side, UdpMappings},
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
    traffic::{prime_neighbours, wait_listening},
};
use serde::Serialize;

mod control;
mod data;
mod primary;
mod results;
mod scale;
mod sessions;
mod setups;
mod xdp;

use control::*;
use data::*;
use results::*;
use scale::*;
use setups::*;
use xdp::*;

struct Opts {
    quick: bool,
    out: PathBuf,
    /// Sections to run (all when empty): `SECTIONS`.
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

/// The sections `--only` can name.
const SECTIONS: [&str; 6] = ["data", "xdp", "control", "scale", "sessions", "primary"];

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
    if !firewall_lab::is_root() {
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
        println!("[1/6] data path in the lab (kernel, user, netfilter, plain forwarding)");
        data_path(opts, &mut r).context("data path")?;
    }
    if opts.runs("xdp") {
        println!("[2/6] per-packet cost of the XDP program (BPF_PROG_RUN)");
        xdp_cost(opts, &mut r).context("XDP cost")?;
    }
    if opts.runs("control") {
        println!("[3/6] control plane");
        control_plane(opts, &mut r).context("control plane")?;
        let lab = Lab::create_direct(&unique_prefix("benchapi")).context("creating the lab")?;
        let fw = Firewall::up(&lab, &[])?;
        api_latency(opts, &mut r, &fw).context("API latency")?;
    }
    if opts.runs("scale") {
        println!("[4/6] scale");
        scale(opts, &mut r).context("scale")?;
    }
    if opts.runs("sessions") {
        println!("[5/6] FTP session rate (default configuration, in place, netfilter, plain)");
        sessions::run(opts, &mut r).context("FTP sessions")?;
    }
    if opts.runs("primary") {
        println!("[6/6] primary connections through the wall (kernel, netfilter, plain)");
        primary::run(opts, &mut r).context("primary connections")?;
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
