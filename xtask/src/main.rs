//! `cargo xtask <task>`: setup, test, demo, lab.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use firewall_lab as lab;
use xtask::setup;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Project tasks of the firewall")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent): apt packages,
    /// rust-src, bpf-linker, bpffs.
    Setup,
    /// Setup, build, and run every test (unit, BPF_PROG_RUN fixtures, namespace lab).
    Test {
        /// Only tests whose name contains this (passed to the test harness).
        filter: Option<String>,
    },
    /// Setup, build, and run the self-contained demo in network namespaces.
    Demo,
    /// Formatting (`cargo fmt --check`) and clippy with `-D warnings` on the
    /// host crates and on the eBPF crate (nightly, bpfel target).
    Lint,
    /// Setup, build (release), and measure kernel mode against user mode,
    /// netfilter and plain forwarding; writes bench-results/<time>/.
    Bench {
        /// A short smoke run (small sizes, 2 repetitions, scale up to 10 k).
        #[arg(long)]
        quick: bool,
        /// Where the results go (default: bench-results/<UTC time>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Setup (with cargo-fuzz), then run every fuzz target of fuzz/ (the FTP
    /// filter, the API request parser, the configuration parser) for a while.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Stop a target after this many inputs instead (a long run).
        #[arg(long)]
        runs: Option<u64>,
        /// Build without AddressSanitizer: the code the targets exercise (the
        /// core crate, the API and configuration parsers) has no `unsafe`, so
        /// it has nothing to find there, and runs are about ten times faster
        /// (the oracles are assertions, checked either way).
        #[arg(long)]
        no_sanitizer: bool,
        /// Only this target.
        target: Option<String>,
    },
    /// Setup, build (release) and package: target/debian/firewall_VERSION_ARCH.deb
    /// with the unit, man pages and completions, checked by lintian.
    Package,
    /// Create or destroy the namespace lab by hand.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
}

#[derive(Subcommand)]
enum LabAction {
    /// Create a lab and leave it running; prints its namespaces.
    Create {
        #[arg(long, default_value = "fwlab")]
        prefix: String,
    },
    /// Destroy a lab by prefix, or every lab with --all.
    Destroy {
        #[arg(long, conflicts_with = "all")]
        prefix: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// List the labs present.
    List,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and ends with one total line
/// ("N passed, N failed"): the per-binary lines cargo prints end with a doc-test
/// run that has no tests, which reads as if nothing ran.
fn cargo_test(args: &[&str]) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut child = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split(';').find_map(|part| {
                    part.trim()
                        .strip_suffix(word)
                        .and_then(|n| n.trim().rsplit(' ').next()?.parse::<u64>().ok())
                })
            };
            passed += count("passed").unwrap_or(0);
            failed += count("failed").unwrap_or(0);
        }
    }
    let status = child.wait()?;
    println!("{passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// The fuzz targets, each with its libFuzzer dictionary (if any).
const FUZZ_TARGETS: &[(&str, Option<&str>)] = &[
    ("ftp_filter", Some("fuzz/ftp.dict")),
    ("api_request", None),
    ("config", None),
];

/// Runs the fuzz targets: each starts from its committed seeds
/// (fuzz/seeds/TARGET) and keeps what it finds in fuzz/corpus/TARGET; a
/// crash fails the run and leaves its input in fuzz/artifacts/TARGET.
fn fuzz(
    seconds: u64,
    runs: Option<u64>,
    no_sanitizer: bool,
    only: Option<&str>,
) -> anyhow::Result<()> {
    let root = workspace_root();
    let mut ran = 0;
    for (target, dict) in FUZZ_TARGETS {
        if only.is_some_and(|o| o != *target) {
            continue;
        }
        ran += 1;
        let corpus = root.join("fuzz/corpus").join(target);
        let seeds = root.join("fuzz/seeds").join(target);
        std::fs::create_dir_all(&corpus)?;
        let mut args = vec![
            "+nightly".to_string(),
            "fuzz".into(),
            "run".into(),
            "--fuzz-dir".into(),
            "fuzz".into(),
        ];
        if no_sanitizer {
            // Its own build directory, so that the two builds do not replace
            // each other.
            args.extend(
                ["--sanitizer", "none", "--target-dir", "fuzz/target-nosan"].map(String::from),
            );
        }
        args.extend([(*target).into(), corpus.display().to_string()]);
        if seeds.exists() {
            args.push(seeds.display().to_string());
        }
        args.push("--".into());
        match runs {
            Some(n) => args.push(format!("-runs={n}")),
            None => args.push(format!("-max_total_time={seconds}")),
        }
        if let Some(d) = dict {
            args.push(format!("-dict={}", root.join(d).display()));
        }
        // Inputs larger than a few lines teach nothing more.
        args.push("-max_len=8192".into());
        println!("xtask: fuzzing {target}");
        let status = Command::new("cargo")
            .args(&args)
            .current_dir(&root)
            .status()
            .context("running cargo fuzz")?;
        if !status.success() {
            bail!(
                "fuzz target {target} failed ({status}); the input is in fuzz/artifacts/{target}"
            );
        }
    }
    if ran == 0 {
        bail!(
            "no fuzz target {:?} (targets: {})",
            only.unwrap_or_default(),
            FUZZ_TARGETS
                .iter()
                .map(|t| t.0)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// UTC time as YYYYmmddTHHMMSSZ, from the system clock (no date crate needed).
fn chrono_free_stamp() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y%m%dT%H%M%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    out.filter(|s| !s.is_empty())
        .unwrap_or_else(|| "run".to_string())
}

fn ctl_binary() -> PathBuf {
    workspace_root().join("target/debug/firewall-ctl")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.task {
        Task::Setup => setup::setup(),
        Task::Test { filter } => {
            setup::setup()?;
            for p in lab::existing_prefixes() {
                println!("xtask: removing leftover lab {p}");
                lab::destroy_prefix(&p);
            }
            // The package test installs it.
            let deb = xtask::package::package(&workspace_root())?;
            std::env::set_var("FIREWALL_DEB", deb);
            cargo(&["build", "--bins"])?;
            // The lab tests share one pin directory and so run one firewall at a
            // time; they serialize themselves, the rest runs in parallel.
            std::env::set_var("FIREWALL_CTL", ctl_binary());
            // Default members: everything but firewall-ebpf, which only builds for BPF.
            let mut args = vec!["test", "--no-fail-fast"];
            if let Some(f) = filter.as_deref() {
                args.extend(["--", f]);
            }
            cargo_test(&args)
        }
        Task::Lint => {
            setup::setup()?;
            setup::lint_tools()?;
            cargo(&["fmt", "--all", "--", "--check"])?;
            cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
            // As firewall-ctl's build script builds it (aya-build), with a
            // target directory of its own.
            let status = Command::new("cargo")
                .args([
                    "+nightly",
                    "clippy",
                    "-p",
                    "firewall-ebpf",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--target-dir",
                    "target/ebpf-clippy",
                    "--",
                    "-D",
                    "warnings",
                ])
                .env("RUSTFLAGS", "--cfg=bpf_target_arch=\"x86_64\"")
                .current_dir(workspace_root())
                .status()
                .context("running clippy on the eBPF crate")?;
            if !status.success() {
                bail!("clippy on firewall-ebpf failed ({status})");
            }
            Ok(())
        }
        Task::Package => {
            setup::setup()?;
            xtask::package::package(&workspace_root()).map(|_| ())
        }
        Task::Demo => {
            setup::setup()?;
            cargo(&["build", "--bins"])?;
            std::env::set_var("FIREWALL_CTL", ctl_binary());
            cargo(&["run", "--quiet", "-p", "firewall-tests", "--bin", "demo"])
        }
        Task::Bench { quick, out } => {
            setup::setup()?;
            for p in lab::existing_prefixes() {
                println!("xtask: removing leftover lab {p}");
                lab::destroy_prefix(&p);
            }
            // Release builds: the control plane and the relay are measured too.
            cargo(&["build", "--release", "--bins"])?;
            std::env::set_var(
                "FIREWALL_CTL",
                workspace_root().join("target/release/firewall-ctl"),
            );
            let out = out.unwrap_or_else(|| {
                let stamp = chrono_free_stamp();
                workspace_root().join("bench-results").join(stamp)
            });
            let mut args = vec!["--out".to_string(), out.display().to_string()];
            if quick {
                args.push("--quick".into());
            }
            let status = Command::new(workspace_root().join("target/release/bench"))
                .args(&args)
                .status()
                .context("running the benchmark")?;
            if !status.success() {
                bail!("the benchmark failed ({status})");
            }
            Ok(())
        }
        Task::Fuzz {
            seconds,
            runs,
            no_sanitizer,
            target,
        } => {
            setup::setup()?;
            setup::cargo_fuzz()?;
            fuzz(seconds, runs, no_sanitizer, target.as_deref())
        }
        Task::Lab { action } => {
            match action {
                LabAction::Create { prefix } => {
                    let l = lab::Lab::create(&prefix)?;
                    println!(
                    "lab {prefix}: namespaces {} {} {} {} {} (firewall interfaces {} and {} in {})",
                    l.client.name, l.client2.name, l.fw.name, l.server.name, l.external2.name,
                    lab::addr::IF_INTERNAL, lab::addr::IF_EXTERNAL, l.fw.name
                );
                    println!(
                        "enter one with: nsenter --net=/run/netns/{} bash",
                        l.fw.name
                    );
                    l.keep();
                    Ok(())
                }
                LabAction::Destroy { prefix, all } => {
                    let prefixes = match (prefix, all) {
                        (Some(p), _) => vec![p],
                        (None, true) => lab::existing_prefixes(),
                        (None, false) => bail!("name a lab with --prefix, or use --all"),
                    };
                    for p in prefixes {
                        lab::destroy_prefix(&p);
                        println!("destroyed lab {p}");
                    }
                    Ok(())
                }
                LabAction::List => {
                    for p in lab::existing_prefixes() {
                        println!("{p}");
                    }
                    Ok(())
                }
            }
        }
    }
}
