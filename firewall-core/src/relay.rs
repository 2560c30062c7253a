//! The engine's contract with the user-mode relay: the work it describes
//! (`Job`, `Emulation`) and what the relay reports back (`RelayEvent`). The
//! relay itself, with its sockets, is an adapter of firewall-ctl.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};

use crate::{
    filters::{DataFilterFactory, Decision, EmulatedPeer, EventKind},
    policy::{IpFilter, Transport},
};

/// Who may open connections through a relayed endpoint.
#[derive(Clone, Debug)]
pub enum Admit {
    /// BindForClient: remote peers, limited by the IP filter (None: anyone).
    Peers(Option<IpFilter>),
    /// RedirectConnections: only the session's client.
    Client(Ipv4Addr),
}

impl Admit {
    pub fn allows(&self, ip: Ipv4Addr) -> bool {
        match self {
            Admit::Peers(None) => true,
            Admit::Peers(Some(f)) => f.allows(ip),
            Admit::Client(c) => *c == ip,
        }
    }
}

/// A relayed endpoint: connections arriving on `socket` go to the target.
pub struct Job {
    /// The connection object (or action) that owns it.
    pub owner: u64,
    pub transport: Transport,
    /// Bound to the firewall endpoint (the pool's reservation socket; None
    /// only where the pool reserves nothing in the kernel, in unit tests).
    pub socket: Option<crate::ports::PortHandle>,
    pub backlog: u32,
    pub admit: Admit,
    /// Where connections go; None: a placeholder (refused until set).
    pub target: Option<SocketAddrV4>,
    /// Local address the relay connects to the target from (port 0: any).
    pub source: SocketAddrV4,
    pub multiple: bool,
    /// UDP: close a peer's mapping after this much quiet (TIMEOUT).
    pub idle: Option<Duration>,
    /// UDP: receive buffer of the bound socket (INCREASE_RECEIVE_BUFFER).
    pub recv_buffer: Option<usize>,
    /// Data filters each connection gets (a chain per connection).
    pub filters: Vec<Arc<dyn DataFilterFactory>>,
    /// The event each TCP connection raises (accept or connect), through `hook`.
    pub event: Option<EventKind>,
    /// Raises `event` for a connection (set by the daemon): its decision may
    /// abort the connection or add data filters.
    pub hook: Option<ConnectionHook>,
}

/// An emulated connection to start (see `Relay::emulate`).
pub struct Emulation {
    pub owner: u64,
    /// Without it, a failed connect still uses up the bind.
    pub multiple: bool,
    /// The external peer the emulator stands for (what the client is told).
    pub remote: SocketAddrV4,
    /// The client.
    pub target: SocketAddrV4,
    /// The firewall's internal address the connection comes from (port 0: any).
    pub source: SocketAddrV4,
    pub peer: Box<dyn EmulatedPeer>,
}

/// Raises a connection's event in the engine: (owner, event, peer) → the
/// decision, once the engine's owner has made it.
pub type ConnectionHook = Arc<dyn Fn(u64, EventKind, SocketAddrV4) -> HookFuture + Send + Sync>;

/// The answer of a `ConnectionHook`.
pub type HookFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Decision, crate::error::ApiError>> + Send>,
>;

/// What the relay reports to the engine.
#[derive(Clone, Debug)]
pub enum RelayEvent {
    Established {
        owner: u64,
        conn: u64,
        from: SocketAddrV4,
        to: SocketAddrV4,
        bytes: Arc<AtomicU64>,
    },
    Closed {
        owner: u64,
        conn: u64,
    },
    /// A single-use endpoint's connection was denied by a filter, or a filter
    /// failed handling it: the opening is used up (the endpoint stopped
    /// listening). `reason` is "denied" or "filter-failed".
    Denied {
        owner: u64,
        from: SocketAddrV4,
        reason: &'static str,
    },
    /// A data filter ended a connection.
    Blocked {
        owner: u64,
        conn: u64,
        reason: String,
    },
    /// An unused endpoint was withdrawn (`RelayCmd::Withdraw`).
    Withdrawn {
        owner: u64,
        reason: &'static str,
    },
    /// A connection attempt that was turned away (logged and counted).
    Refused {
        owner: u64,
        from: SocketAddrV4,
        why: &'static str,
    },
}
