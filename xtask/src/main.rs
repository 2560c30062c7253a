//! `cargo xtask <task>`: setup, test, demo, lab.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use xtask::{lab, setup};

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
            cargo(&["build", "--bins"])?;
            // The lab tests share one pin directory and so run one firewall at a
            // time; they serialize themselves, the rest runs in parallel.
            std::env::set_var("FIREWALL_CTL", ctl_binary());
            let mut args = vec!["test", "--workspace", "--no-fail-fast"];
            if let Some(f) = filter.as_deref() {
                args.extend(["--", f]);
            }
            cargo(&args)
        }
        Task::Demo => {
            setup::setup()?;
            cargo(&["build", "--bins"])?;
            std::env::set_var("FIREWALL_CTL", ctl_binary());
            cargo(&["run", "--quiet", "-p", "firewall-tests", "--bin", "demo"])
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
