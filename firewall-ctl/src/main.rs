//! `firewall-ctl`: runs the firewall daemon (`up`) and talks to it.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use firewall_ctl::{
    api::{self, ApiError, ErrorKind, ListWhat, Request},
    daemon,
    datapath::AttachMode,
    engine::{BindRequest, RedirectRequest},
    flags::ConnFlags,
    output,
    policy::{IpFilter, Transport},
};
use ipnet::Ipv4Net;

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
        /// Where the datapath runs: XDP native (default) or generic, or tc
        /// (tcx ingress: keeps GRO/GSO, faster for bulk TCP on veth).
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
    /// Open or close a client's session.
    Session {
        #[command(subcommand)]
        action: SessionAction,
    },
    /// Bind firewall ports for a client to receive inbound secondary connections.
    BindForClient(BindArgs),
    /// Let a client reach external addresses through the firewall's internal address.
    RedirectConnections(RedirectArgs),
    /// End a connection (idempotent).
    Kill { id: u64 },
    /// Withdraw a redirect (RedirectConnections action).
    Cancel { id: u64 },
    /// Set the client address of a connection bound with a 0.0.0.0:0 placeholder.
    SetClientAddress { id: u64, address: SocketAddrV4 },
    /// List sessions, connections (and actions), pinholes or flows.
    List {
        #[arg(value_enum)]
        what: ListWhat,
    },
    /// Follow established and terminating events.
    Events {
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
    },
}

#[derive(Subcommand)]
enum SessionAction {
    /// The session of a client (an existing one is returned).
    Open {
        #[arg(long)]
        client: Ipv4Addr,
    },
    /// Close a session and everything it owns.
    Close { id: u64 },
}

/// An address with an optional port (IP or IP:PORT).
fn addr_opt_port(s: &str) -> Result<SocketAddrV4, String> {
    s.parse::<SocketAddrV4>()
        .or_else(|_| s.parse::<Ipv4Addr>().map(|ip| SocketAddrV4::new(ip, 0)))
        .map_err(|_| format!("{s:?} is not an IPv4 address with optional port (IP or IP:PORT)"))
}

/// A CIDR, or a single address.
fn cidr(s: &str) -> Result<Ipv4Net, String> {
    s.parse::<Ipv4Net>()
        .or_else(|_| s.parse::<Ipv4Addr>().map(Ipv4Net::from))
        .map_err(|_| format!("{s:?} is not an IPv4 network (CIDR) or address"))
}

#[derive(clap::Args)]
struct BindArgs {
    #[arg(long)]
    session: u64,
    /// Client endpoint of connection i (repeat for N > 1; 0.0.0.0:0 is a placeholder).
    #[arg(long = "client", required = true)]
    clients: Vec<SocketAddrV4>,
    /// Firewall address to bind (port 0 or none: any port); default: the first external address.
    #[arg(long, value_parser = addr_opt_port)]
    proxy: Option<SocketAddrV4>,
    #[arg(long, value_enum)]
    protocol: TransportArg,
    /// Comma-separated: allow-multiple, timeout, no-kernel-mode, bidirectional, proxy-mode,
    /// allow-addresses-in-class-c-network, allow-addresses-in-network, allow-addresses-all,
    /// increase-receive-buffer.
    #[arg(long, default_value = "")]
    flags: String,
    /// TCP listen backlog (user mode).
    #[arg(long)]
    backlog: Option<u32>,
    /// Protocol the rules are checked for.
    #[arg(long, default_value = "ftp")]
    protocol_name: String,
    /// Remote peers allowed to connect (CIDR or address; repeatable). None given: anyone.
    #[arg(long = "allow-peer", value_parser = cidr)]
    allow_peers: Vec<Ipv4Net>,
    /// Exceptions to --allow-peer (the more specific network decides).
    #[arg(long = "deny-peer", value_parser = cidr)]
    deny_peers: Vec<Ipv4Net>,
    /// An empty peer filter: nobody may connect (until killed).
    #[arg(long, conflicts_with_all = ["allow_peers", "deny_peers"])]
    no_peers: bool,
    /// Report "established" events for these connections.
    #[arg(long)]
    notify: bool,
    /// Context handed back in the events (implies --notify).
    #[arg(long)]
    context: Option<String>,
}

#[derive(clap::Args)]
struct RedirectArgs {
    #[arg(long)]
    session: u64,
    /// Real destination of connection i (repeat for N > 1).
    #[arg(long = "connect", required = true)]
    connects: Vec<SocketAddrV4>,
    /// External source address (and port) of the relayed connections; default: any.
    #[arg(long, value_parser = addr_opt_port)]
    proxy_external: Option<SocketAddrV4>,
    /// The address the client dials; default: the firewall's first internal
    /// address. Another (external) address is answered for transparently.
    #[arg(long)]
    internal: Option<std::net::Ipv4Addr>,
    #[arg(long, value_enum)]
    protocol: TransportArg,
    /// Comma-separated: allow-multiple, timeout, no-kernel-mode.
    #[arg(long, default_value = "")]
    flags: String,
    #[arg(long, default_value = "ftp")]
    protocol_name: String,
    #[arg(long)]
    notify: bool,
    #[arg(long)]
    context: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TransportArg {
    Tcp,
    Udp,
}

impl From<TransportArg> for Transport {
    fn from(t: TransportArg) -> Self {
        match t {
            TransportArg::Tcp => Transport::Tcp,
            TransportArg::Udp => Transport::Udp,
        }
    }
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
            let json = cli.json;
            let request = match command {
                Command::Session {
                    action: SessionAction::Open { client },
                } => Request::SessionOpen { client },
                Command::Session {
                    action: SessionAction::Close { id },
                } => Request::SessionClose { session: id },
                Command::BindForClient(a) => Request::BindForClient(BindRequest {
                    session: a.session,
                    clients: a.clients,
                    proxy: a.proxy,
                    protocol: a.protocol.into(),
                    flags: ConnFlags::parse(&[a.flags])
                        .map_err(|e| ApiError::new(ErrorKind::InvalidArgument, e))?,
                    backlog: a.backlog,
                    protocol_name: a.protocol_name,
                    ip_filter: if a.no_peers {
                        Some(IpFilter::default())
                    } else if a.allow_peers.is_empty() && a.deny_peers.is_empty() {
                        None
                    } else {
                        Some(IpFilter {
                            include: a.allow_peers,
                            exclude: a.deny_peers,
                        })
                    },
                    notify: a.notify || a.context.is_some(),
                    context: a.context,
                }),
                Command::RedirectConnections(a) => Request::RedirectConnections(RedirectRequest {
                    session: a.session,
                    connects: a.connects,
                    proxy_external: a.proxy_external,
                    internal: a.internal,
                    protocol: a.protocol.into(),
                    flags: ConnFlags::parse(&[a.flags])
                        .map_err(|e| ApiError::new(ErrorKind::InvalidArgument, e))?,
                    protocol_name: a.protocol_name,
                    notify: a.notify || a.context.is_some(),
                    context: a.context,
                }),
                Command::Kill { id } => Request::Kill { id },
                Command::Cancel { id } => Request::Cancel { id },
                Command::SetClientAddress { id, address } => {
                    Request::SetClientAddress { id, address }
                }
                Command::List { what } => Request::List { what },
                Command::Up { .. } | Command::Down | Command::Status | Command::Events { .. } => {
                    unreachable!("handled above")
                }
            };
            let what = match &request {
                Request::List { what } => Some(*what),
                _ => None,
            };
            let v = api::Client::new(&cli.socket).call(request)?;
            if json {
                println!("{v}");
            } else {
                print!("{}", output::answer_text(&v, what));
            }
            Ok(())
        }
    }
}
