//! The command line: what `firewall-ctl` accepts, and the API requests it
//! makes of it. The only place that knows clap.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
};

use clap::{Parser, Subcommand};
use firewall_ctl::{
    api::{self, ApiError, ErrorKind, ListWhat, Request},
    datapath::AttachMode,
    engine::{BindRequest, FutureConnectRequest, RedirectRequest},
    flags::ConnFlags,
    policy::{IpFilter, Transport},
};
use ipnet::Ipv4Net;

#[derive(Parser)]
#[command(
    name = "firewall-ctl",
    version,
    about = "eBPF firewall for secondary connections (FTP, SIP, ...)",
    long_about = "eBPF firewall for secondary connections (FTP, SIP, ...).\n\n\
`firewall-ctl up` attaches the datapath (XDP, or TC) to an internal and an external interface and runs the \
daemon: a default-deny stateful wall with NAT of outbound connections, published servers, and the \
secondary connections (FTP data connections and the filter API's BindForClient, RedirectConnections and \
AllowFutureConnect) forwarded in the kernel. The other subcommands talk to the running daemon over its \
API socket.",
    after_long_help = "FILES\n  \
/etc/firewall/firewall.toml   configuration (--config); every key optional\n  \
/run/firewall/ctl.sock        the daemon's API socket (root only)\n  \
/sys/fs/bpf/firewall/         pinned maps and links (bpftool map dump pinned ...)\n\n\
EXIT STATUS\n  \
0 on success; 1 when the daemon or the kernel refused (the error names its kind); 2 for bad arguments."
)]
pub struct Cli {
    /// The daemon's API socket.
    #[arg(long, global = true, default_value = api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// JSON output, for scripts.
    #[arg(short = 'j', long = "json", global = true)]
    pub json: bool,
    /// Log records as text, or as one JSON object per line with their fields and spans.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "FIREWALL_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormatArg,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

impl From<LogFormatArg> for firewall_ctl::logging::LogFormat {
    fn from(f: LogFormatArg) -> Self {
        match f {
            LogFormatArg::Text => Self::Text,
            LogFormatArg::Json => Self::Json,
        }
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Load and attach the datapath, then run the daemon in the foreground until SIGINT/SIGTERM.
    Up {
        /// Interface facing the internal networks.
        #[arg(long, env = "FIREWALL_INTERNAL")]
        internal: String,
        /// Interface facing the external networks.
        #[arg(long, env = "FIREWALL_EXTERNAL")]
        external: String,
        /// Configuration file (TOML); without it, defaults come from the interfaces.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where the datapath runs: auto (default: native XDP on NICs, tc on
        /// veth, bridges, bonds, VLANs), XDP native or generic, or tc (tcx
        /// ingress: keeps GRO/GSO, faster for bulk TCP on veth).
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: ModeArg,
        /// Leave the datapath attached when the daemon exits, for a restart or upgrade
        /// without interrupting established flows.
        #[arg(long)]
        keep_datapath: bool,
    },
    /// Stop the daemon, detach the programs and remove every pin (also after a crash).
    Down,
    /// Interfaces, attach mode, map fill levels and counters.
    Status,
    /// Read the configuration file again and apply it: rules, policy, timeouts, the wall's
    /// sources and published servers (what SIGHUP and `systemctl reload` do). Established flows
    /// and pending pinholes stay; a change only a restart applies is refused, naming its key.
    Reload,
    /// Open or close a client's session.
    Session {
        #[command(subcommand)]
        action: SessionAction,
    },
    /// Bind firewall ports for a client to receive inbound secondary connections.
    BindForClient(BindArgs),
    /// Let a client reach external addresses through the firewall's internal address.
    RedirectConnections(RedirectArgs),
    /// Permit a client's expected outbound connection to an external address.
    AllowFutureConnect(FutureConnectArgs),
    /// End a connection (idempotent).
    Kill { id: u64 },
    /// Withdraw a redirect or a permission (RedirectConnections, AllowFutureConnect).
    Cancel { id: u64 },
    /// Set the client address of a connection bound with a 0.0.0.0:0 placeholder.
    SetClientAddress { id: u64, address: SocketAddrV4 },
    /// The flags of a primary connection (GetConnectionFlags): how the
    /// firewall carries it, and whether the server sees the firewall's
    /// internal address (internal-address-translation: pass proxy-mode to
    /// bind-for-client for its secondaries).
    ConnectionFlags {
        #[arg(long, value_enum)]
        protocol: TransportArg,
        /// The client's endpoint, as the client sees it.
        #[arg(long)]
        client: SocketAddrV4,
        /// The server's endpoint, as the client dialled it.
        #[arg(long)]
        server: SocketAddrV4,
    },
    /// List sessions, connections (and actions), pinholes or flows.
    List {
        #[arg(value_enum)]
        what: ListArg,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (firewall-ctl.1 and one per subcommand) into a directory.
    #[command(hide = true)]
    Man { dir: PathBuf },
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
pub enum SessionAction {
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
pub struct BindArgs {
    #[arg(long)]
    pub session: u64,
    /// Client endpoint of connection i (repeat for N > 1; 0.0.0.0:0 is a placeholder).
    #[arg(long = "client", required = true)]
    pub clients: Vec<SocketAddrV4>,
    /// Firewall address to bind (port 0 or none: any port); default: the first external address.
    #[arg(long, value_parser = addr_opt_port)]
    pub proxy: Option<SocketAddrV4>,
    #[arg(long, value_enum)]
    pub protocol: TransportArg,
    /// Comma-separated: allow-multiple, timeout, no-kernel-mode, bidirectional, proxy-mode,
    /// allow-addresses-in-class-c-network, allow-addresses-in-network, allow-addresses-all,
    /// increase-receive-buffer.
    #[arg(long, default_value = "")]
    pub flags: String,
    /// TCP listen backlog (user mode).
    #[arg(long)]
    pub backlog: Option<u32>,
    /// Protocol the rules are checked for.
    #[arg(long, default_value = "ftp")]
    pub protocol_name: String,
    /// Remote peers allowed to connect (CIDR or address; repeatable). None given: anyone.
    #[arg(long = "allow-peer", value_parser = cidr)]
    pub allow_peers: Vec<Ipv4Net>,
    /// Exceptions to --allow-peer (the more specific network decides).
    #[arg(long = "deny-peer", value_parser = cidr)]
    pub deny_peers: Vec<Ipv4Net>,
    /// An empty peer filter: nobody may connect (until killed).
    #[arg(long, conflicts_with_all = ["allow_peers", "deny_peers"])]
    pub no_peers: bool,
    /// Report "established" events for these connections.
    #[arg(long)]
    pub notify: bool,
    /// Context handed back in the events (implies --notify).
    #[arg(long)]
    pub context: Option<String>,
}

#[derive(clap::Args)]
pub struct RedirectArgs {
    #[arg(long)]
    pub session: u64,
    /// Real destination of connection i (repeat for N > 1).
    #[arg(long = "connect", required = true)]
    pub connects: Vec<SocketAddrV4>,
    /// External source address (and port) of the relayed connections; default: any.
    #[arg(long, value_parser = addr_opt_port)]
    pub proxy_external: Option<SocketAddrV4>,
    /// The address the client dials; default: the firewall's first internal
    /// address. Another (external) address is answered for transparently.
    #[arg(long)]
    pub internal: Option<std::net::Ipv4Addr>,
    #[arg(long, value_enum)]
    pub protocol: TransportArg,
    /// Comma-separated: allow-multiple, timeout, no-kernel-mode.
    #[arg(long, default_value = "")]
    pub flags: String,
    #[arg(long, default_value = "ftp")]
    pub protocol_name: String,
    #[arg(long)]
    pub notify: bool,
    #[arg(long)]
    pub context: Option<String>,
}

#[derive(clap::Args)]
pub struct FutureConnectArgs {
    #[arg(long)]
    pub session: u64,
    /// The destination the client will connect to.
    #[arg(long)]
    pub address: SocketAddrV4,
    /// The primary connection's external peer (the allowed-address policy
    /// is relative to it); without it only allow-addresses-all permits.
    #[arg(long)]
    pub peer: Option<std::net::Ipv4Addr>,
    /// External source address (and port) of the connection; default: the
    /// first external address, any port.
    #[arg(long, value_parser = addr_opt_port)]
    pub proxy_external: Option<SocketAddrV4>,
    #[arg(long, value_enum)]
    pub protocol: TransportArg,
    /// Comma-separated: allow-multiple, timeout, address-based, allow-addresses-*.
    #[arg(long, default_value = "")]
    pub flags: String,
    #[arg(long, default_value = "ftp")]
    pub protocol_name: String,
    #[arg(long)]
    pub notify: bool,
    #[arg(long)]
    pub context: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum TransportArg {
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

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ModeArg {
    Auto,
    Native,
    Generic,
    Tc,
}

impl ModeArg {
    /// The mode named; None: the daemon chooses (`datapath::mode::choose`).
    pub fn named(self) -> Option<AttachMode> {
        match self {
            ModeArg::Auto => None,
            ModeArg::Native => Some(AttachMode::Native),
            ModeArg::Generic => Some(AttachMode::Generic),
            ModeArg::Tc => Some(AttachMode::Tc),
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ListArg {
    Sessions,
    Connections,
    Pinholes,
    Flows,
}

impl From<ListArg> for ListWhat {
    fn from(l: ListArg) -> Self {
        match l {
            ListArg::Sessions => ListWhat::Sessions,
            ListArg::Connections => ListWhat::Connections,
            ListArg::Pinholes => ListWhat::Pinholes,
            ListArg::Flows => ListWhat::Flows,
        }
    }
}

fn flags(s: String) -> Result<ConnFlags, ApiError> {
    ConnFlags::parse(&[s]).map_err(|e| ApiError::new(ErrorKind::InvalidArgument, e))
}

impl BindArgs {
    pub fn request(self) -> Result<Request, ApiError> {
        let a = self;
        Ok(Request::BindForClient(BindRequest {
            session: a.session,
            clients: a.clients,
            proxy: a.proxy,
            protocol: a.protocol.into(),
            flags: flags(a.flags)?,
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
        }))
    }
}

impl RedirectArgs {
    pub fn request(self) -> Result<Request, ApiError> {
        let a = self;
        Ok(Request::RedirectConnections(RedirectRequest {
            session: a.session,
            connects: a.connects,
            proxy_external: a.proxy_external,
            internal: a.internal,
            protocol: a.protocol.into(),
            flags: flags(a.flags)?,
            protocol_name: a.protocol_name,
            notify: a.notify || a.context.is_some(),
            context: a.context,
        }))
    }
}

impl FutureConnectArgs {
    pub fn request(self) -> Result<Request, ApiError> {
        let a = self;
        Ok(Request::AllowFutureConnect(FutureConnectRequest {
            session: a.session,
            address: a.address,
            peer: a.peer,
            proxy_external: a.proxy_external,
            protocol: a.protocol.into(),
            flags: flags(a.flags)?,
            protocol_name: a.protocol_name,
            notify: a.notify || a.context.is_some(),
            context: a.context,
        }))
    }
}
