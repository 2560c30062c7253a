//! `firewall-ctl`: runs the firewall daemon (`up`) and talks to it.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use firewall_ctl::{
    api::{self, ApiError, ErrorKind, Request},
    daemon,
    datapath::AttachMode,
    output,
};

#[derive(Parser)]
#[command(
    name = "firewall-ctl",
    version,
    about = "eBPF firewall for secondary connections (FTP, SIP, ...)"
)]
struct Cli {
    /// The daemon's API socket.
    #[arg(long, global = true, default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// JSON output, for scripts.
    #[arg(short = 'j', long = "json", global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the datapath, then run the daemon in the foreground until SIGINT/SIGTERM.
    Up {
        /// Interface facing the internal networks.
        #[arg(long)]
        internal: String,
        /// Interface facing the external networks.
        #[arg(long)]
        external: String,
        /// Configuration file (TOML); without it, defaults come from the interfaces.
        #[arg(long)]
        config: Option<PathBuf>,
        /// XDP attach mode.
        #[arg(long, value_enum, default_value = "native")]
        xdp_mode: AttachMode,
        /// Leave the datapath attached when the daemon exits, for a restart or upgrade
        /// without interrupting established flows.
        #[arg(long)]
        keep_datapath: bool,
    },
    /// Stop the daemon, detach the programs and remove every pin (also after a crash).
    Down,
    /// Interfaces, attach mode, map fill levels and counters.
    Status,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let json = std::env::args().any(|a| a == "-j" || a == "--json");
            if json && e.use_stderr() {
                output::print_error(
                    true,
                    &ApiError::new(ErrorKind::InvalidArgument, e.to_string().trim().to_string()),
                );
                return ExitCode::from(2);
            }
            e.exit();
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let json = cli.json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            output::print_error(json, &e);
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), ApiError> {
    let internal_error = |e: anyhow::Error| ApiError::new(ErrorKind::Internal, format!("{e:#}"));
    match cli.command {
        Command::Up {
            internal,
            external,
            config,
            xdp_mode,
            keep_datapath,
        } => {
            let opts = daemon::UpOptions {
                internal,
                external,
                config,
                socket: cli.socket,
                xdp_mode,
                keep_datapath,
            };
            let rt = tokio::runtime::Runtime::new().map_err(|e| internal_error(e.into()))?;
            // The daemon marks the caller's mistakes (interfaces, config) with
            // their kind; anything else failed inside (kernel, bpffs).
            rt.block_on(daemon::run(opts))
                .map_err(|e| match e.downcast::<ApiError>() {
                    Ok(api_error) => api_error,
                    Err(e) => internal_error(e),
                })
        }
        Command::Down => {
            let report = daemon::down(&cli.socket).map_err(internal_error)?;
            if cli.json {
                println!("{}", serde_json::to_string(&report).expect("serializes"));
            } else if report.stopped_daemon {
                println!("firewall down: daemon stopped, programs detached, pins removed");
            } else if report.removed_pins.is_empty() {
                println!("firewall was not up; nothing to remove");
            } else {
                println!(
                    "firewall down: no daemon was running; removed {} pins it left",
                    report.removed_pins.len()
                );
            }
            Ok(())
        }
        Command::Status => {
            let v = api::Client::new(&cli.socket).call(Request::Status)?;
            if cli.json {
                println!("{v}");
            } else {
                let s: api::Status = serde_json::from_value(v).map_err(|e| {
                    ApiError::new(ErrorKind::Internal, format!("unreadable status: {e}"))
                })?;
                print!("{}", output::status_text(&s));
            }
            Ok(())
        }
    }
}
