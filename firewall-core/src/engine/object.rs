//! Sessions and connection objects as the engine keeps them.

use super::*;

pub(super) struct Session {
    pub(super) client: Ipv4Addr,
    pub(super) terminated: bool,
}

pub(super) struct Object {
    /// The object's span: what the engine logs about it carries its id,
    /// kind, session and mode.
    pub(super) span: tracing::Span,
    pub(super) session: u64,
    pub(super) kind: Kind,
    pub(super) parent: Option<u64>,
    pub(super) state: State,
    pub(super) reason: Option<String>,
    pub(super) transport: Transport,
    pub(super) protocol_name: String,
    pub(super) flags: ConnFlags,
    pub(super) endpoint: SocketAddrV4,
    pub(super) target: Option<SocketAddrV4>,
    pub(super) pinhole: Option<PinholeKey>,
    pub(super) peer_filter: Option<u32>,
    pub(super) leases: Vec<Lease>,
    pub(super) flows: Vec<FlowKey>,
    pub(super) peer: Option<SocketAddrV4>,
    pub(super) notify: bool,
    pub(super) context: Option<String>,
    pub(super) mode: Mode,
    /// User mode: the relay's id of this connection.
    pub(super) relay_conn: Option<u64>,
    /// Order of establishment (for the UDP quota: the oldest goes first).
    pub(super) established_seq: u64,
    /// A filter emulated the bind: nothing listens; connections come
    /// only from `emulate_connection`.
    pub(super) emulated: bool,
    pub(super) emulation_started: bool,
    /// User mode: bytes relayed.
    pub(super) relayed: Option<Arc<AtomicU64>>,
    /// The filter that made the call: the only one told of establishments.
    pub(super) caller: Option<Arc<dyn AppFilter>>,
    /// Connections made through this object (allow-multiple), so that ending
    /// it needs no scan of every object.
    pub(super) children: Vec<u64>,
    /// When it was terminated (monotonic ns); the object is forgotten
    /// `FORGET_AFTER` later.
    pub(super) ended_ns: u64,
    /// Counted against its client's quota: from establishment until the
    /// first FIN or RST (or its end).
    pub(super) counted: bool,
    /// Which of `flows` (by index) saw a FIN.
    pub(super) fins: u8,
}

/// How long a terminated object stays listed (and answers a second Cancel
/// with `terminating`) before the engine forgets it; unbounded, a daemon that
/// runs for months would keep every connection it ever made.
pub const FORGET_AFTER: Duration = Duration::from_secs(60);

impl Object {
    /// The object under its id, with its span. A debug-level span: at the
    /// default level it costs nothing (measured: an info span per object
    /// took ~5 % of the daemon's CPU per FTP session).
    pub(super) fn with_span(mut self, id: u64) -> Self {
        self.span = tracing::debug_span!(
            "conn",
            id,
            kind = self.kind.name(),
            session = self.session,
            mode = self.mode.name(),
            parent = self.parent,
        );
        self
    }

    /// A listening object with nothing attached yet.
    pub(super) fn new(
        session: u64,
        kind: Kind,
        transport: Transport,
        protocol_name: &str,
        flags: ConnFlags,
        endpoint: SocketAddrV4,
    ) -> Self {
        Self {
            span: tracing::Span::none(),
            session,
            kind,
            parent: None,
            state: State::Listening,
            reason: None,
            transport,
            protocol_name: protocol_name.to_string(),
            flags,
            endpoint,
            target: None,
            pinhole: None,
            peer_filter: None,
            leases: Vec::new(),
            flows: Vec::new(),
            peer: None,
            notify: false,
            context: None,
            mode: Mode::Kernel,
            relay_conn: None,
            established_seq: 0,
            emulated: false,
            emulation_started: false,
            relayed: None,
            children: Vec::new(),
            ended_ns: 0,
            caller: None,
            counted: false,
            fins: 0,
        }
    }
}
