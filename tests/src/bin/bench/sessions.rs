//! Section 5, the FTP session rate: many short sessions (log in, EPSV or
//! PORT, RETR a 4 KiB file, QUIT) from one client host, at several
//! concurrencies, through the firewall with its default configuration and
//! with control connections read in place, netfilter and plain routing.

use std::time::Duration;

use anyhow::{bail, Context as _};
use firewall_tests::{
    ftp::FtpServer,
    ftp_load::{self, DataMode, Load},
    lab::{addr, unique_prefix, Lab},
    traffic::prime_neighbours,
};

use crate::{cpu_busy_ns, prepare, Opts, Results, Setup};

const FILE_SIZE: u64 = 4096;
pub const CONCURRENCY: [usize; 3] = [1, 16, 64];
pub const SECTION: &str = "ftp sessions";

/// CPU time (user + system) a process has used, in nanoseconds.
fn process_cpu_ns(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15, so 11 and 12 here.
    let ticks = f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0);
    ticks * 10_000_000 // USER_HZ = 100
}

pub fn name(mode: DataMode, concurrency: usize) -> String {
    format!("{} sessions, concurrency {concurrency}", mode.name())
}

pub fn run(opts: &Opts, r: &mut Results) -> anyhow::Result<()> {
    let lab = Lab::create_direct(&unique_prefix("benchftp")).context("creating the lab")?;
    prime_neighbours(&lab);
    let server = FtpServer::start(&lab.server, &lab.prefix)?;
    server.random_file("small.bin", FILE_SIZE)?;
    let seconds = if opts.quick { 1 } else { 5 };
    let reps = if opts.quick { 2 } else { 3 };
    for setup in [
        Setup::Plain,
        Setup::Netfilter,
        Setup::Kernel,
        Setup::InPlace,
    ] {
        println!(" setup {}", setup.name());
        let prepared = prepare(&lab, setup)?;
        let daemon = prepared.fw.as_ref().and_then(|f| f.pid());
        for mode in [DataMode::Passive, DataMode::Active] {
            for concurrency in CONCURRENCY {
                let load = |sessions, duration| Load {
                    server: format!("{}:21", addr::SERVER).parse().expect("address"),
                    file: "small.bin".into(),
                    size: FILE_SIZE,
                    mode,
                    concurrency,
                    sessions,
                    duration,
                    step_timeout: Duration::from_secs(10),
                };
                // Untimed warm-up: the first sessions after a change run slow.
                ftp_load::run(&lab.client, &load(Some(20), None))?;
                let (mut rate, mut cpu, mut dcpu, mut failed) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for _ in 0..reps {
                    let cpu0 = cpu_busy_ns();
                    let d0 = daemon.map(process_cpu_ns);
                    let out = ftp_load::run(
                        &lab.client,
                        &load(None, Some(Duration::from_secs(seconds))),
                    )?;
                    let used = cpu_busy_ns().saturating_sub(cpu0) as f64;
                    if let Some(e) = out.errors.first() {
                        println!(
                            "  {}: {} of {} sessions failed, e.g. {e}",
                            setup.name(),
                            out.failed,
                            out.failed + out.completed
                        );
                    }
                    if out.completed == 0 {
                        bail!("{}: no session completed", setup.name());
                    }
                    rate.push(out.per_second());
                    cpu.push(used / out.completed as f64 / 1000.0);
                    failed.push(out.failed as f64);
                    if let (Some(pid), Some(d0)) = (daemon, d0) {
                        let d = process_cpu_ns(pid).saturating_sub(d0) as f64;
                        dcpu.push(d / out.completed as f64 / 1000.0);
                    }
                }
                let n = name(mode, concurrency);
                r.add(SECTION, &n, setup.name(), "sessions/s", rate);
                r.add(
                    SECTION,
                    &format!("{n}: CPU per session (all CPUs)"),
                    setup.name(),
                    "µs",
                    cpu,
                );
                r.add(
                    SECTION,
                    &format!("{n}: failed sessions"),
                    setup.name(),
                    "sessions",
                    failed,
                );
                if !dcpu.is_empty() {
                    r.add(
                        SECTION,
                        &format!("{n}: daemon CPU per session"),
                        setup.name(),
                        "µs",
                        dcpu,
                    );
                }
            }
        }
        prepared.down(&lab)?;
    }
    drop(server);
    drop(lab);
    Ok(())
}

/// Section 5 of the report: a row per load, the three setups side by side.
pub fn report(r: &Results, o: &mut String) {
    use std::fmt::Write as _;
    if !r.figures.iter().any(|f| f.section == SECTION) {
        return;
    }
    let _ = writeln!(
        o,
        "\n## 5. FTP session rate (default configuration; control connections in place)\n"
    );
    let _ = writeln!(
        o,
        "Short sessions (log in, EPSV or PORT, RETR 4 KiB, QUIT) from one client host; ratios to netfilter in this run.\n"
    );
    let _ = writeln!(
        o,
        "| Load | firewall | in place | netfilter | plain | CPU/session fw / in place / nf / plain (µs) | daemon CPU/session fw / in place (µs) | failed fw / in place / nf |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
    let med = |n: &str, s: &str| r.get(n, s).map(|f| f.median).unwrap_or(f64::NAN);
    for mode in [DataMode::Passive, DataMode::Active] {
        for c in CONCURRENCY {
            let n = name(mode, c);
            let cpu = format!("{n}: CPU per session (all CPUs)");
            let failed = format!("{n}: failed sessions");
            let daemon = format!("{n}: daemon CPU per session");
            let fig = |n: &str, s: &str| r.get(n, s).map_or("–".to_string(), crate::fmt_fig);
            let worst = |s: &str| r.get(&failed, s).map_or(f64::NAN, |f| f.max);
            let _ = writeln!(
                o,
                "| {n} | {} = **{:.2}×** nf | {} = **{:.2}×** nf | {} | {} | {:.0} / {:.0} / {:.0} / {:.0} | {} / {} | {:.0} / {:.0} / {:.0} |",
                fig(&n, "kernel"),
                med(&n, "kernel") / med(&n, "netfilter"),
                fig(&n, "in-place"),
                med(&n, "in-place") / med(&n, "netfilter"),
                fig(&n, "netfilter"),
                fig(&n, "plain"),
                med(&cpu, "kernel"),
                med(&cpu, "in-place"),
                med(&cpu, "netfilter"),
                med(&cpu, "plain"),
                fig(&daemon, "kernel"),
                fig(&daemon, "in-place"),
                worst("kernel"),
                worst("in-place"),
                worst("netfilter"),
            );
        }
    }
}

/// The session-rate targets: (target, measured, met?), for the default
/// configuration and for control connections read in place.
pub fn targets(r: &Results) -> Vec<(String, String, bool)> {
    let mut out = targets_of(r, "kernel", "default configuration");
    out.extend(targets_of(r, "in-place", "control = \"in-place\""));
    out
}

fn targets_of(r: &Results, setup: &str, label: &str) -> Vec<(String, String, bool)> {
    let mut worst_ratio = f64::INFINITY;
    let mut worst_cpu: f64 = 0.0;
    let mut failures = 0.0;
    let mut measured = false;
    for mode in [DataMode::Passive, DataMode::Active] {
        for c in CONCURRENCY {
            let n = name(mode, c);
            let (Some(fw), Some(nf)) = (r.get(&n, setup), r.get(&n, "netfilter")) else {
                continue;
            };
            measured = true;
            worst_ratio = worst_ratio.min(fw.median / nf.median);
            if let Some(d) = r.get(&format!("{n}: daemon CPU per session"), setup) {
                worst_cpu = worst_cpu.max(d.median);
            }
            if let Some(f) = r.get(&format!("{n}: failed sessions"), setup) {
                failures += f.values.iter().sum::<f64>();
            }
        }
    }
    if !measured {
        return Vec::new();
    }
    vec![
        (
            format!("FTP sessions/s ≥ 1× netfilter at every concurrency (worst load; {label})"),
            format!("{worst_ratio:.2}×"),
            worst_ratio >= 1.0,
        ),
        (
            format!("Daemon CPU per FTP session ≤ 150 µs (worst load; {label})"),
            format!("{worst_cpu:.0} µs"),
            worst_cpu <= 150.0,
        ),
        (
            format!("No failed FTP session through the firewall ({label})"),
            format!("{failures:.0} failed"),
            failures == 0.0,
        ),
    ]
}
