//! `firewall-ctl`: runs the firewall daemon (`up`) and talks to it.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::Parser as _;
use firewall_ctl::{
    api::{self, ApiError, ErrorKind, ListWhat, Request},
    daemon,
};

mod cli;

use cli::{
    args::{Cli, Command, SessionAction},
    output,
};

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
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "firewall-ctl",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => {
            let written = std::fs::create_dir_all(dir).and_then(|()| {
                clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), dir)
            });
            return match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    let e = ApiError::new(
                        ErrorKind::InvalidArgument,
                        format!("writing the manual pages into {}: {e}", dir.display()),
                    );
                    output::print_error(cli.json, &e);
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    firewall_ctl::logging::init(cli.log_format.into());
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
                xdp_mode: xdp_mode.named(),
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
            let client = api::Client::new(&cli.socket);
            if cli.json {
                println!("{}", client.call(Request::Status)?);
            } else {
                print!("{}", output::status_text(&client.status()?));
            }
            Ok(())
        }
        Command::Events { count, timeout } => {
            let client = api::Client::new(&cli.socket);
            let deadline = timeout.map(|t| Instant::now() + Duration::from_secs(t));
            if let Some(d) = deadline {
                // The stream blocks; a timer thread ends the process quietly.
                std::thread::spawn(move || {
                    std::thread::sleep(d.saturating_duration_since(Instant::now()));
                    std::process::exit(0);
                });
            }
            let mut seen = 0;
            client.follow(|ev| {
                if cli.json {
                    println!("{ev}");
                } else {
                    println!("{}", output::event_text(&ev));
                }
                seen += 1;
                count.is_none_or(|c| seen < c)
            })
        }
        command => {
            let client = api::Client::new(&cli.socket);
            let request = match command {
                Command::Session {
                    action: SessionAction::Open { client },
                } => Request::SessionOpen { client },
                Command::Session {
                    action: SessionAction::Close { id },
                } => Request::SessionClose { session: id },
                Command::BindForClient(a) => a.request()?,
                Command::RedirectConnections(a) => a.request()?,
                Command::AllowFutureConnect(a) => a.request()?,
                Command::Reload => Request::Reload,
                Command::Kill { id } => Request::Kill { id },
                Command::Cancel { id } => Request::Cancel { id },
                Command::SetClientAddress { id, address } => {
                    Request::SetClientAddress { id, address }
                }
                Command::List { what } => Request::List { what: what.into() },
                Command::ConnectionFlags {
                    protocol,
                    client,
                    server,
                } => Request::ConnectionFlags {
                    transport: protocol.into(),
                    client,
                    server,
                },
                Command::Up { .. }
                | Command::Down
                | Command::Status
                | Command::Events { .. }
                | Command::Completions { .. }
                | Command::Man { .. } => {
                    unreachable!("handled above")
                }
            };
            if cli.json {
                println!("{}", client.call(request)?);
                return Ok(());
            }
            let text = match request {
                Request::List { what } => match what {
                    ListWhat::Sessions => output::sessions_text(&client.sessions()?),
                    ListWhat::Connections => output::connections_text(&client.connections()?),
                    ListWhat::Pinholes => output::pinholes_text(&client.pinholes()?),
                    ListWhat::Flows => output::flows_text(&client.flows()?),
                },
                Request::BindForClient(_) => output::bound_text(&client.call_as(request)?),
                Request::RedirectConnections(_) => {
                    output::redirected_text(&client.call_as(request)?)
                }
                Request::AllowFutureConnect(_) => output::permitted_text(&client.call_as(request)?),
                Request::SessionOpen { .. } => output::session_text(&client.call_as(request)?),
                Request::SessionClose { session } => {
                    client.call(request)?;
                    format!("session {session} closed\n")
                }
                Request::Reload => {
                    let r: api::Reloaded = client.call_as(request)?;
                    if r.changed.is_empty() {
                        "configuration reloaded: nothing changed\n".to_string()
                    } else {
                        format!("configuration reloaded: {} applied\n", r.changed.join(", "))
                    }
                }
                Request::Kill { id } => {
                    client.call(request)?;
                    format!("connection {id} killed\n")
                }
                Request::Cancel { id } => {
                    client.call(request)?;
                    format!("action {id} cancelled\n")
                }
                Request::SetClientAddress { id, address } => {
                    client.call(request)?;
                    format!("connection {id}: client {address}\n")
                }
                Request::ConnectionFlags { .. } => output::primary_text(&client.call_as(request)?),
                other => unreachable!("{other:?} is handled above"),
            };
            print!("{text}");
            Ok(())
        }
    }
}
