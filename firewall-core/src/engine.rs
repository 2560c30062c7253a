//! The engine: sessions, connection objects and firewall actions, and the two
//! calls of the filter API, BindForClient and RedirectConnections.
//!
//! Data flows one way: a call validates, reserves ports, and writes pinholes
//! (and peer filters) into the maps; the datapath turns the first packet of an
//! expected connection into flow entries and reports it back (`on_datapath_event`);
//! `tick` runs the timers (TIMEOUT, idle, TCP teardown). Every failing call is
//! atomic: nothing it reserved or wrote stays behind.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use firewall_common::{
    flow::FlowKey,
    pinhole::{
        event_kind, pinhole_flags, side, BusyClientValue, DatapathEvent, PinholeKey, PinholeValue,
    },
    IPPROTO_TCP, IPPROTO_UDP,
};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{
    clock::Clock,
    error::{ApiError, ErrorKind},
    filters::{self, AppFilter, DataFilterFactory, EventKind},
    flags::ConnFlags,
    policy::{self, IpFilter, NetworkObject, ProtocolRule, Transport},
    ports::{Hold, Lease, PortPool},
    relay::{Admit, Job, RelayEvent},
    sweeper::SweepStats,
    timeouts::Timeouts,
};

/// Most addresses one call may ask for.
pub const MAX_ADDRESSES: usize = 64;

/// What the engine needs to know about the firewall.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub internal_addrs: Vec<Ipv4Addr>,
    pub external_addrs: Vec<Ipv4Addr>,
    pub internal_networks: Vec<Ipv4Net>,
    pub internal_ifindex: u32,
    pub external_ifindex: u32,
    pub timeouts: Timeouts,
    pub snat_block: u16,
    /// Concurrent secondary connections per client and transport.
    pub client_quota: u32,
    /// Pinholes a session may have waiting at once.
    pub max_pending: u32,
    pub default_allowed: ConnFlags,
    pub protocols: Vec<ProtocolRule>,
    pub networks: Vec<NetworkObject>,
}

impl EngineConfig {
    /// The firewall of the namespace lab that the tests, the demo and the
    /// benchmark build (internal 10.1.0.1 on 10.1.0.0/24, external 10.2.0.1),
    /// with the embedded defaults (the FTP protocol rule, the quota, the
    /// timeouts); the interface indexes are left 0 for the caller to set.
    pub fn lab() -> Self {
        let internal: Ipv4Net = "10.1.0.0/24".parse().expect("network");
        Self {
            internal_addrs: vec![Ipv4Addr::new(10, 1, 0, 1)],
            external_addrs: vec![Ipv4Addr::new(10, 2, 0, 1)],
            internal_networks: vec![internal],
            internal_ifindex: 0,
            external_ifindex: 0,
            timeouts: Timeouts::default(),
            snat_block: 4,
            client_quota: 160,
            max_pending: 255,
            default_allowed: ConnFlags::empty(),
            protocols: vec![ProtocolRule {
                name: "ftp".into(),
                transport: Transport::Tcp,
                ports: vec![21],
                clients: vec![internal],
            }],
            networks: vec![NetworkObject {
                name: "internal".into(),
                ranges: vec![internal],
            }],
        }
    }

    fn own_addrs(&self) -> Vec<Ipv4Addr> {
        self.internal_addrs
            .iter()
            .chain(&self.external_addrs)
            .copied()
            .collect()
    }

    fn is_internal(&self, ip: Ipv4Addr) -> bool {
        self.internal_networks.iter().any(|n| n.contains(&ip))
    }
}

/// BindForClient's arguments.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BindRequest {
    pub session: u64,
    /// Where connection i is delivered; 0.0.0.0:0 is a placeholder set later with SetClientAddress.
    pub clients: Vec<SocketAddrV4>,
    /// The firewall address to bind (port 0: any); default: the first external address.
    #[serde(default)]
    pub proxy: Option<SocketAddrV4>,
    pub protocol: Transport,
    #[serde(default)]
    pub flags: ConnFlags,
    /// TCP listen backlog (used in user mode).
    #[serde(default)]
    pub backlog: Option<u32>,
    pub protocol_name: String,
    /// Remote peers allowed to connect; none: anyone.
    #[serde(default)]
    pub ip_filter: Option<IpFilter>,
    /// Deliver "established" events for these connections (pSessionFilter).
    #[serde(default)]
    pub notify: bool,
    /// Handed back in the "established" events (punkContext).
    #[serde(default)]
    pub context: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BindResult {
    /// The bound address of connection 0 (the lowest port).
    pub proxy_address: SocketAddrV4,
    pub connections: Vec<BoundConnection>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BoundConnection {
    pub id: u64,
    pub external: SocketAddrV4,
    pub client: SocketAddrV4,
}

/// RedirectConnections' arguments.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedirectRequest {
    pub session: u64,
    /// Where connection i really goes.
    pub connects: Vec<SocketAddrV4>,
    /// External source of the relayed connections (same external IP as the
    /// primary); none or 0.0.0.0: the first external address; port 0: any.
    #[serde(default)]
    pub proxy_external: Option<SocketAddrV4>,
    /// The address the client dials (ISA 2000 took InternalAddress as an
    /// input); none: the firewall's first internal address. Another address
    /// is answered for transparently: the client dials an external host (the
    /// server of an intercepted primary connection) and the firewall takes
    /// the connection, as for EPSV, whose reply carries only a port.
    #[serde(default)]
    pub internal: Option<Ipv4Addr>,
    pub protocol: Transport,
    #[serde(default)]
    pub flags: ConnFlags,
    pub protocol_name: String,
    #[serde(default)]
    pub notify: bool,
    #[serde(default)]
    pub context: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RedirectResult {
    /// The firewall's internal address to dial instead (the lowest port).
    pub internal_address: SocketAddrV4,
    pub actions: Vec<RedirectAction>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RedirectAction {
    pub id: u64,
    pub internal: SocketAddrV4,
    pub connect: SocketAddrV4,
}

/// What an object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A BindForClient connection object (one bound port).
    Bind,
    /// A connection accepted through an ALLOW_MULTIPLE bind.
    Accepted,
    /// A RedirectConnections firewall action.
    Redirect,
    /// A connection made through an ALLOW_MULTIPLE redirect.
    Redirected,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// The pinhole waits for its connection(s).
    Listening,
    /// A connection was made (single use), or this is one (child).
    Established,
    /// Killed, cancelled, closed, timed out, or its session ended.
    Terminated,
}

/// Events for the callers (and `firewall-ctl events`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A connection made through a pinhole (fwx_EstablishedConnection); only
    /// for calls that asked to be notified.
    Established {
        connection: u64,
        parent: Option<u64>,
        session: u64,
        protocol: Transport,
        /// Who opened it: the external peer (bind) or the client (redirect).
        from: SocketAddrV4,
        /// Where it goes: the client (bind) or the real destination (redirect).
        to: SocketAddrV4,
        context: Option<String>,
    },
    /// An object ends (fwx_ConnectionTerminating); raised once per object.
    Terminating {
        connection: u64,
        session: u64,
        reason: String,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct SessionInfo {
    pub id: u64,
    pub client: Ipv4Addr,
    pub terminated: bool,
    pub objects: usize,
}

/// A connection object or firewall action, as listed.
#[derive(Clone, Debug, Serialize)]
pub struct ObjectInfo {
    pub id: u64,
    pub session: u64,
    pub kind: Kind,
    pub state: State,
    pub parent: Option<u64>,
    pub protocol: Transport,
    pub protocol_name: String,
    pub flags: ConnFlags,
    /// Kernel (flows in XDP) or user (relay); always kernel in this version.
    pub mode: Mode,
    /// The firewall endpoint the pinhole listens on.
    pub endpoint: SocketAddrV4,
    /// Bind: the client address (0.0.0.0:0 while a placeholder); redirect: the destination.
    pub target: SocketAddrV4,
    pub peer: Option<SocketAddrV4>,
    pub packets: u64,
    pub bytes: u64,
    pub reason: Option<String>,
}

struct Session {
    client: Ipv4Addr,
    terminated: bool,
}

struct Object {
    session: u64,
    kind: Kind,
    parent: Option<u64>,
    state: State,
    reason: Option<String>,
    transport: Transport,
    protocol_name: String,
    flags: ConnFlags,
    endpoint: SocketAddrV4,
    target: Option<SocketAddrV4>,
    pinhole: Option<PinholeKey>,
    peer_filter: Option<u32>,
    leases: Vec<Lease>,
    flows: Vec<FlowKey>,
    peer: Option<SocketAddrV4>,
    notify: bool,
    context: Option<String>,
    mode: Mode,
    /// User mode: the relay's id of this connection.
    relay_conn: Option<u64>,
    /// Order of establishment (for the UDP quota: the oldest goes first).
    established_seq: u64,
    /// A filter emulated the bind: nothing listens; connections come
    /// only from `emulate_connection`.
    emulated: bool,
    emulation_started: bool,
    /// User mode: bytes relayed.
    relayed: Option<Arc<AtomicU64>>,
    /// The filter that made the call: the only one told of establishments.
    caller: Option<Arc<dyn AppFilter>>,
    /// Connections made through this object (allow-multiple), so that ending
    /// it needs no scan of every object.
    children: Vec<u64>,
    /// When it was terminated (monotonic ns); the object is forgotten
    /// `FORGET_AFTER` later.
    ended_ns: u64,
    /// Counted against its client's quota: from establishment until the
    /// first FIN or RST (or its end).
    counted: bool,
    /// Which of `flows` (by index) saw a FIN.
    fins: u8,
}

/// How long a terminated object stays listed (and answers a second Cancel
/// with `terminating`) before the engine forgets it; unbounded, a daemon that
/// runs for months would keep every connection it ever made.
pub const FORGET_AFTER: Duration = Duration::from_secs(60);

impl Object {
    /// A listening object with nothing attached yet.
    fn new(
        session: u64,
        kind: Kind,
        transport: Transport,
        protocol_name: &str,
        flags: ConnFlags,
        endpoint: SocketAddrV4,
    ) -> Self {
        Self {
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

fn err(kind: ErrorKind, msg: impl Into<String>) -> ApiError {
    ApiError::new(kind, msg)
}

fn invalid(msg: impl Into<String>) -> ApiError {
    err(ErrorKind::InvalidArgument, msg)
}

fn internal(e: MapError) -> ApiError {
    e.into()
}

fn ipproto(t: Transport) -> u8 {
    match t {
        Transport::Tcp => IPPROTO_TCP,
        Transport::Udp => IPPROTO_UDP,
    }
}

fn sa(addr: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr.into(), port)
}

/// Everything a call has written so far, to undo it if a later step fails.
#[derive(Default)]
struct Undo {
    leases: Vec<Lease>,
    pinholes: Vec<PinholeKey>,
    rules: Vec<(u32, Ipv4Net)>,
}

pub struct Engine<M: Maps> {
    cfg: EngineConfig,
    maps: M,
    ports: PortPool,
    clock: std::sync::Arc<dyn Clock>,
    sessions: BTreeMap<u64, Session>,
    by_client: HashMap<Ipv4Addr, u64>,
    objects: BTreeMap<u64, Object>,
    /// Which object a flow entry belongs to.
    flow_owner: HashMap<FlowKey, u64>,
    /// Peer filters: their rules and how many objects use them.
    filters: HashMap<u32, (Vec<(Ipv4Net, bool)>, usize)>,
    next_id: u64,
    next_filter: u32,
    events: Vec<Event>,
    expired: SweepStats,
    /// Work for the user-mode relay, taken by the daemon.
    relay: Vec<RelayCmd>,
    /// Data-filter factories by protocol name.
    data_filters: HashMap<String, Vec<Arc<dyn DataFilterFactory>>>,
    /// Application filters, in registration order.
    app_filters: Vec<Arc<dyn AppFilter>>,
    /// Data-filter factories keyed by event and address (SetDataFilterFactory),
    /// by action id; each serves one connection.
    factories: BTreeMap<u64, AddressFactory>,
    /// Clients at their TCP quota (also in BUSY_CLIENTS and told to the relay).
    busy_clients: HashSet<Ipv4Addr>,
    /// Established connections per (client, transport).
    established_count: HashMap<(Ipv4Addr, Transport), usize>,
    next_established: u64,
    timers: timers::Timers,
    /// The object of each relayed connection (by the relay's id).
    relay_conns: HashMap<u64, u64>,
    /// Objects waiting for their connection, per session.
    pending: HashMap<u64, usize>,
}

/// A SetDataFilterFactory registration.
struct AddressFactory {
    event: EventKind,
    /// Bind address (bind, accept) or remote address (connect, destination);
    /// IP 0.0.0.0 or port 0 match any.
    address: SocketAddrV4,
    factory: Arc<dyn DataFilterFactory>,
}

fn address_matches(pattern: SocketAddrV4, a: SocketAddrV4) -> bool {
    (pattern.ip().is_unspecified() || pattern.ip() == a.ip())
        && (pattern.port() == 0 || pattern.port() == a.port())
}

impl<M: Maps> Engine<M> {
    /// A new engine. Pinholes left in the maps by an earlier daemon belong to
    /// objects that no longer exist (and whose ports are no longer reserved),
    /// so they are removed, as are the quota marks (the new engine counts
    /// afresh); established flows stay and expire normally.
    pub fn new(
        cfg: EngineConfig,
        mut maps: M,
        ports: PortPool,
        clock: std::sync::Arc<dyn Clock>,
    ) -> Result<Self, MapError> {
        for (k, _) in maps.pinholes()? {
            maps.del_pinhole(&k)?;
        }
        for client in maps.busy_clients()? {
            maps.set_client_busy(client, None)?;
        }
        // Owners in the surviving flows must not be reused.
        let next_id = maps
            .flows()?
            .iter()
            .map(|(_, v)| v.owner)
            .max()
            .unwrap_or(0)
            + 1;
        Ok(Self {
            cfg,
            maps,
            ports,
            clock,
            sessions: BTreeMap::new(),
            by_client: HashMap::new(),
            objects: BTreeMap::new(),
            flow_owner: HashMap::new(),
            filters: HashMap::new(),
            next_id,
            next_filter: 1,
            events: Vec::new(),
            expired: SweepStats::default(),
            relay: Vec::new(),
            data_filters: HashMap::new(),
            app_filters: Vec::new(),
            factories: BTreeMap::new(),
            busy_clients: HashSet::new(),
            established_count: HashMap::new(),
            next_established: 1,
            timers: timers::Timers::default(),
            relay_conns: HashMap::new(),
            pending: HashMap::new(),
        })
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// Events raised since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Relay work decided since the last call.
    pub fn take_relay_cmds(&mut self) -> Vec<RelayCmd> {
        std::mem::take(&mut self.relay)
    }

    /// A data filter for every future connection of `protocol`
    /// (SetDataFilterFactory by protocol): those connections go through the
    /// user-mode relay.
    pub fn register_data_filter(&mut self, protocol: &str, factory: Arc<dyn DataFilterFactory>) {
        self.data_filters
            .entry(protocol.to_string())
            .or_default()
            .push(factory);
    }

    /// An application filter: it gets the events it registered for.
    pub fn register_filter(&mut self, filter: Arc<dyn AppFilter>) {
        self.app_filters.push(filter);
    }

    /// SetDataFilterFactory: a data filter for the next connection whose
    /// `event` matches `address` (the bind address for `BindUdp` and
    /// `AcceptedConnection`, the remote address for `ConnectTcp` and
    /// `UdpDestination`). Returns a firewall action that `cancel` withdraws.
    /// The kernel/user decision of a call is taken when the call is made: a
    /// factory registered before the call makes its connections user mode; one
    /// registered (or cancelled) later only changes which data filters a
    /// user-mode connection gets.
    pub fn set_data_filter_factory(
        &mut self,
        event: EventKind,
        address: SocketAddrV4,
        factory: Arc<dyn DataFilterFactory>,
    ) -> Result<u64, ApiError> {
        if matches!(event, EventKind::BindTcp | EventKind::Listen) {
            return Err(invalid(format!("no data filter can be created for {event:?} events (TCP data filters attach at accept)")));
        }
        let id = self.new_id();
        self.factories.insert(
            id,
            AddressFactory {
                event,
                address,
                factory,
            },
        );
        Ok(id)
    }

    /// The factory registered for `event` at `address`, if any (not consumed).
    fn factory_for(&self, event: EventKind, address: SocketAddrV4) -> Option<u64> {
        self.factories
            .iter()
            .find(|(_, f)| f.event == event && address_matches(f.address, address))
            .map(|(id, _)| *id)
    }

    /// Takes the factory for `event` at `address` (it serves one connection).
    fn take_factory(
        &mut self,
        event: EventKind,
        address: SocketAddrV4,
    ) -> Option<Arc<dyn DataFilterFactory>> {
        let id = self.factory_for(event, address)?;
        self.factories.remove(&id).map(|f| f.factory)
    }

    fn filters_for(&self, protocol: &str) -> Vec<Arc<dyn DataFilterFactory>> {
        self.data_filters.get(protocol).cloned().unwrap_or_default()
    }

    /// The kernel/user decision, made when the call is: user mode when asked
    /// (NO_KERNEL_MODE), when a data filter is expected for the connection, or
    /// when a filter is registered for the event the connection will raise
    /// (it may attach a data filter then). Bind-time attachments decide per
    /// connection (see `bind_apply`).
    fn user_mode(&self, flags: ConnFlags, protocol: &str, resulting: Option<EventKind>) -> bool {
        flags.contains(ConnFlags::NO_KERNEL_MODE)
            || !self.filters_for(protocol).is_empty()
            || resulting.is_some_and(|k| filters::registered(&self.app_filters, k))
    }

    /// The event a connection raises when it is made: accept (TCP bind),
    /// connect (TCP redirect), destination (UDP redirect).
    fn resulting_event(kind: Kind, t: Transport) -> Option<EventKind> {
        match (kind, t) {
            (Kind::Bind, Transport::Tcp) => Some(EventKind::AcceptedConnection),
            (Kind::Bind, Transport::Udp) => None,
            (_, Transport::Tcp) => Some(EventKind::ConnectTcp),
            (_, Transport::Udp) => Some(EventKind::UdpDestination),
        }
    }

    /// Raises the event of a connection the relay is making (accept or
    /// connect), for the relay's hook: a deny aborts it, attached data filters
    /// join its chain.
    pub fn on_connection_event(
        &mut self,
        owner: u64,
        kind: EventKind,
        address: SocketAddrV4,
    ) -> Result<filters::Decision, ApiError> {
        let o = self.object(owner)?;
        if o.state == State::Terminated {
            return Err(err(
                ErrorKind::Terminating,
                format!("connection {owner} is terminated"),
            ));
        }
        let (session, protocol, endpoint) = (o.session, o.protocol_name.clone(), o.endpoint);
        let mut decision =
            filters::raise(&self.app_filters, kind, owner, session, address, &protocol)?;
        // A factory registered for this connection's event: accepts are keyed
        // by the bind address, connects by the destination.
        let key = if kind == EventKind::AcceptedConnection {
            endpoint
        } else {
            address
        };
        if decision.denied_by.is_none() {
            if let Some(f) = self.take_factory(kind, key) {
                decision.data_filters.push((f.priority(), f.create()));
            }
        }
        Ok(decision)
    }

    pub fn expired(&self) -> &SweepStats {
        &self.expired
    }

    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    // ----- sessions -----

    /// The session of a SecureNAT client (one per client address): the open
    /// one if there is one, else a new one.
    pub fn open_session(&mut self, client: Ipv4Addr) -> Result<u64, ApiError> {
        policy::check_unicast("client", client, &self.cfg.own_addrs())?;
        if !self.cfg.is_internal(client) {
            return Err(invalid(format!(
                "client {client} is not on an internal network ({})",
                nets(&self.cfg.internal_networks)
            )));
        }
        if let Some(id) = self.by_client.get(&client) {
            return Ok(*id);
        }
        let id = self.new_id();
        self.sessions.insert(
            id,
            Session {
                client,
                terminated: false,
            },
        );
        self.by_client.insert(client, id);
        Ok(id)
    }

    /// Ends a session and everything it owns. Closing it again is fine.
    pub fn close_session(&mut self, id: u64) -> Result<(), ApiError> {
        let s = self
            .sessions
            .get_mut(&id)
            .ok_or_else(|| invalid(format!("no session {id}")))?;
        if s.terminated {
            return Ok(());
        }
        s.terminated = true;
        let client = s.client;
        self.by_client.remove(&client);
        let owned: Vec<u64> = self
            .objects
            .iter()
            .filter(|(_, o)| o.session == id && o.parent.is_none())
            .map(|(k, _)| *k)
            .collect();
        for o in owned {
            self.terminate(o, "session closed");
        }
        Ok(())
    }

    /// A new TCP secondary for a client at its quota is refused at the call
    /// (the FTP filter then answers 425), not only by the datapath, which
    /// would drop the connection's SYN after the client was told to connect.
    fn check_not_busy(&self, client: Ipv4Addr, t: Transport) -> Result<(), ApiError> {
        if t == Transport::Tcp && self.busy_clients.contains(&client) {
            return Err(err(
                ErrorKind::Busy,
                format!(
                    "client {client} has its quota of {} concurrent secondary TCP connections",
                    self.cfg.client_quota
                ),
            ));
        }
        Ok(())
    }

    /// A session may have `max_pending` pinholes waiting at once (an FTP
    /// control connection keeps one): a call beyond it is refused.
    fn check_pending(&mut self, session: u64, n: usize) -> Result<(), ApiError> {
        let waiting = self.pending.get(&session).copied().unwrap_or(0);
        if waiting + n > self.cfg.max_pending as usize {
            self.expired.pending_refused += 1;
            return Err(err(
                ErrorKind::Exhausted,
                format!(
                    "session {session} has {waiting} pinholes waiting for their connection; at most {} (policy.max_pending_per_session)",
                    self.cfg.max_pending
                ),
            ));
        }
        Ok(())
    }

    /// An object of `session` stopped waiting for its connection.
    fn no_longer_pending(&mut self, session: u64) {
        if let Some(n) = self.pending.get_mut(&session) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pending.remove(&session);
            }
        }
    }

    fn live_session(&self, id: u64) -> Result<Ipv4Addr, ApiError> {
        match self.sessions.get(&id) {
            None => Err(invalid(format!("no session {id}"))),
            Some(s) if s.terminated => Err(err(
                ErrorKind::Terminating,
                format!("session {id} is terminated"),
            )),
            Some(s) => Ok(s.client),
        }
    }

    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.sessions
            .iter()
            .map(|(id, s)| SessionInfo {
                id: *id,
                client: s.client,
                terminated: s.terminated,
                objects: self.objects.values().filter(|o| o.session == *id).count(),
            })
            .collect()
    }

    // ----- BindForClient -----

    /// BindForClient made by an in-process filter: it alone is told when a
    /// connection is established (with `req.notify`).
    pub fn bind_for_client_by(
        &mut self,
        caller: Arc<dyn AppFilter>,
        req: &BindRequest,
    ) -> Result<BindResult, ApiError> {
        let r = self.bind_for_client(req)?;
        for c in &r.connections {
            self.objects.get_mut(&c.id).expect("just made").caller = Some(caller.clone());
        }
        Ok(r)
    }

    pub fn bind_for_client(&mut self, req: &BindRequest) -> Result<BindResult, ApiError> {
        let client_ip = self.live_session(req.session)?;
        let n = req.clients.len();
        check_shape("BindForClient", "client", n, req.flags)?;
        self.check_not_busy(client_ip, req.protocol)?;
        self.check_pending(req.session, n)?;
        let f = req.flags;
        if req.protocol == Transport::Tcp {
            for only_udp in [ConnFlags::BIDIRECTIONAL, ConnFlags::INCREASE_RECEIVE_BUFFER] {
                if f.contains(only_udp) {
                    return Err(invalid(format!(
                        "flag {} is valid only for UDP",
                        only_udp.names()[0]
                    )));
                }
            }
        }
        if req.backlog.is_some_and(|b| b > 65535) {
            return Err(invalid(format!(
                "backlog {} is above 65535",
                req.backlog.unwrap_or_default()
            )));
        }
        let own = self.cfg.own_addrs();
        let clients: Vec<Option<SocketAddrV4>> = req
            .clients
            .iter()
            .enumerate()
            .map(|(i, a)| policy::check_client_endpoint(i, *a, &own))
            .collect::<Result<_, _>>()?;

        let proxy = req
            .proxy
            .unwrap_or(SocketAddrV4::new(self.cfg.external_addrs[0], 0));
        if proxy.port() != 0 && n > 1 {
            return Err(invalid(format!(
                "an explicit proxy port ({proxy}) is allowed only with one client address, not {n}"
            )));
        }
        let (pside, routed) = if self.cfg.external_addrs.contains(proxy.ip()) {
            (side::EXTERNAL, false)
        } else if self.cfg.internal_addrs.contains(proxy.ip()) {
            (side::INTERNAL, false)
        } else if self.cfg.is_internal(*proxy.ip()) && !proxy.ip().is_unspecified() {
            (side::EXTERNAL, true)
        } else {
            return Err(err(
                ErrorKind::AddressNotAvailable,
                format!("proxy address {} is neither an address of the firewall nor an internal client (routed network)", proxy.ip()),
            ));
        };
        if routed
            && self.user_mode(
                f,
                &req.protocol_name,
                Self::resulting_event(Kind::Bind, req.protocol),
            )
        {
            return Err(invalid(format!("a routed proxy address ({proxy}) is the client's own: the firewall has no socket to relay it in user mode")));
        }
        if routed {
            for (i, c) in clients.iter().enumerate() {
                match c {
                    Some(c) if c.ip() == proxy.ip() && (proxy.port() == 0 || proxy.port() == c.port()) => {}
                    _ => return Err(invalid(format!("with a routed proxy address ({proxy}), client address {i} must be that host itself (and the same port)"))),
                }
            }
        }

        // The FTP-bounce guard: all targets must pass, or the call fails whole.
        let effective = f | self.cfg.default_allowed;
        for c in clients.iter().flatten() {
            policy::check_allowed_target(client_ip, *c.ip(), effective, &self.cfg.networks).inspect_err(|e| {
                log::warn!("bounce attempt refused: session {} (client {client_ip}) asked to bind for {c}: {}", req.session, e.message);
            })?;
        }
        policy::check_protocol(&self.cfg.protocols, &req.protocol_name, client_ip)?;

        let mut undo = Undo::default();
        match self.bind_apply(req, &clients, proxy, pside, routed, effective, &mut undo) {
            Ok(r) => Ok(r),
            Err(e) => {
                self.rollback(undo);
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn bind_apply(
        &mut self,
        req: &BindRequest,
        clients: &[Option<SocketAddrV4>],
        proxy: SocketAddrV4,
        pside: u8,
        routed: bool,
        effective: ConnFlags,
        undo: &mut Undo,
    ) -> Result<BindResult, ApiError> {
        let n = clients.len();
        let endpoints: Vec<SocketAddrV4> = if routed {
            clients
                .iter()
                .map(|c| c.expect("checked: routed has no placeholder"))
                .collect()
        } else if proxy.port() != 0 {
            let l = self
                .ports
                .reserve_exact(*proxy.ip(), req.protocol, proxy.port())?;
            undo.leases.push(l);
            vec![l.endpoint()]
        } else {
            let block = self
                .ports
                .reserve_block(*proxy.ip(), req.protocol, n as u16)?;
            undo.leases.extend(&block);
            block.iter().map(|l| l.endpoint()).collect()
        };
        // PROXY_MODE: the client sees the firewall's internal address as the
        // source (the relay always connects from it).
        let user = self.user_mode(
            req.flags,
            &req.protocol_name,
            Self::resulting_event(Kind::Bind, req.protocol),
        );
        let mut snat = Vec::new();
        if req.flags.contains(ConnFlags::PROXY_MODE) && !user {
            let int = *self.cfg.internal_addrs.first().ok_or_else(|| {
                err(
                    ErrorKind::AddressNotAvailable,
                    "the internal interface has no address for proxy-mode",
                )
            })?;
            let count = if req.flags.contains(ConnFlags::ALLOW_MULTIPLE) {
                self.cfg.snat_block
            } else {
                1
            };
            for _ in 0..n {
                let block = self.ports.reserve_block(int, req.protocol, count)?;
                undo.leases.extend(&block);
                snat.push(block);
            }
        }
        let filter = if user {
            None
        } else {
            self.install_peer_filter(req.ip_filter.as_ref(), undo)?
        };
        let deadline = self.deadline(req.flags, req.protocol);
        let source = SocketAddrV4::new(
            self.cfg
                .internal_addrs
                .first()
                .copied()
                .unwrap_or(Ipv4Addr::UNSPECIFIED),
            0,
        );

        let mut out = Vec::new();
        let mut created = Vec::new();
        let mut jobs = Vec::new();
        for (i, ep) in endpoints.iter().enumerate() {
            let id = self.new_id();
            let key = PinholeKey::new(ipproto(req.protocol), ep.ip().octets(), ep.port(), pside);
            let mut flags = 0u16;
            if req.flags.contains(ConnFlags::ALLOW_MULTIPLE) {
                flags |= pinhole_flags::MULTIPLE;
            }
            if req.flags.contains(ConnFlags::BIDIRECTIONAL) {
                flags |= pinhole_flags::BIDIRECTIONAL;
            }
            let target = clients[i];
            if target.is_none() {
                flags |= pinhole_flags::NO_TARGET;
            }
            let t = target.unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
            let (snat_addr, snat_base, snat_count) =
                snat.get(i).map_or(([0; 4], 0, 0), |b: &Vec<Lease>| {
                    (b[0].addr.octets(), b[0].port, b.len() as u16)
                });
            let value = PinholeValue {
                target_addr: t.ip().octets(),
                target_port: t.port(),
                flags,
                snat_addr,
                snat_port_base: snat_base,
                snat_port_count: snat_count,
                peer_filter: filter.unwrap_or(0),
                egress_ifindex: self.cfg.internal_ifindex,
                remaining: 1,
                owner: id,
                deadline_ns: deadline,
                ..Default::default()
            };
            let mut leases: Vec<Lease> = undo
                .leases
                .iter()
                .filter(|l| l.endpoint() == *ep && l.transport == req.protocol)
                .copied()
                .collect();
            // fwx_Bind_Tcp / fwx_Bind_Udp: a filter may deny the bind (the whole
            // call fails), attach a data filter (UDP) or emulate it.
            let bind_event = if req.protocol == Transport::Tcp {
                EventKind::BindTcp
            } else {
                EventKind::BindUdp
            };
            let decision = filters::raise(
                &self.app_filters,
                bind_event,
                id,
                req.session,
                *ep,
                &req.protocol_name,
            )?;
            if let Some(by) = decision.denied_by {
                return Err(err(
                    ErrorKind::AddressInUse,
                    format!("the bind of {ep} was denied by filter {by}"),
                ));
            }
            // A factory registered before the call for this endpoint expects a
            // data filter: user mode (UDP takes it now, TCP at the accept).
            let expected = if req.protocol == Transport::Tcp {
                EventKind::AcceptedConnection
            } else {
                EventKind::BindUdp
            };
            let user = user
                || !decision.data_filters.is_empty()
                || decision.emulated_by.is_some()
                || self.factory_for(expected, *ep).is_some();
            let emulated = decision.emulated_by.is_some();
            if emulated {
                // Nothing listens: the emulating filter is the data source
                // (emulate_connection); the port stays reserved by its lease.
            } else if user {
                let mut factories = self.filters_for(&req.protocol_name);
                if req.protocol == Transport::Udp {
                    factories.extend(self.take_factory(EventKind::BindUdp, *ep));
                }
                factories.extend(decision.data_filters.into_iter().map(|(p, f)| {
                    Arc::new(filters::Attached::new(p, f)) as Arc<dyn DataFilterFactory>
                }));
                jobs.push(Job {
                    owner: id,
                    transport: req.protocol,
                    socket: leases.first().and_then(|l| self.ports.take_socket(l)),
                    backlog: req.backlog.unwrap_or(DEFAULT_BACKLOG),
                    admit: Admit::Peers(req.ip_filter.clone()),
                    target,
                    source,
                    multiple: req.flags.contains(ConnFlags::ALLOW_MULTIPLE),
                    idle: (req.protocol == Transport::Udp
                        && req.flags.contains(ConnFlags::TIMEOUT))
                    .then_some(self.cfg.timeouts.udp_pinhole_idle),
                    recv_buffer: req
                        .flags
                        .contains(ConnFlags::INCREASE_RECEIVE_BUFFER)
                        .then_some(INCREASED_RECEIVE_BUFFER),
                    filters: factories,
                    event: Self::resulting_event(Kind::Bind, req.protocol),
                    hook: None,
                });
            } else {
                self.maps.put_pinhole(&key, &value).map_err(internal)?;
                undo.pinholes.push(key);
            }
            if let Some(b) = snat.get(i) {
                leases.extend(b);
            }
            created.push((
                id,
                Object {
                    target,
                    pinhole: (!user).then_some(key),
                    peer_filter: filter,
                    leases,
                    notify: req.notify,
                    context: req.context.clone(),
                    mode: if user { Mode::User } else { Mode::Kernel },
                    emulated,

                    ..Object::new(
                        req.session,
                        Kind::Bind,
                        req.protocol,
                        &req.protocol_name,
                        effective,
                        *ep,
                    )
                },
            ));
            out.push(BoundConnection {
                id,
                external: *ep,
                client: t,
            });
        }
        // Committed: from here on nothing fails.
        if let Some(fid) = filter {
            self.filters.insert(
                fid,
                (
                    req.ip_filter
                        .as_ref()
                        .map(|f| f.rules())
                        .unwrap_or_default(),
                    created.len(),
                ),
            );
        }
        *self.pending.entry(req.session).or_default() += created.len();
        for (id, o) in created {
            self.objects.insert(id, o);
            if deadline != 0 {
                self.timers.at(deadline, timers::Timer::PinholeTimeout(id));
            }
        }
        self.relay.extend(jobs.into_iter().map(RelayCmd::Start));
        // fwx_Listen: filters hear of it but cannot refuse it.
        if req.protocol == Transport::Tcp {
            for c in &out {
                if let Err(e) = filters::raise(
                    &self.app_filters,
                    EventKind::Listen,
                    c.id,
                    req.session,
                    c.external,
                    &req.protocol_name,
                ) {
                    log::warn!("{}", e.message);
                }
            }
        }
        Ok(BindResult {
            proxy_address: endpoints[0],
            connections: out,
        })
    }

    // ----- RedirectConnections -----

    /// RedirectConnections made by an in-process filter (see `bind_for_client_by`).
    pub fn redirect_connections_by(
        &mut self,
        caller: Arc<dyn AppFilter>,
        req: &RedirectRequest,
    ) -> Result<RedirectResult, ApiError> {
        let r = self.redirect_connections(req)?;
        for a in &r.actions {
            self.objects.get_mut(&a.id).expect("just made").caller = Some(caller.clone());
        }
        Ok(r)
    }

    pub fn redirect_connections(
        &mut self,
        req: &RedirectRequest,
    ) -> Result<RedirectResult, ApiError> {
        let client_ip = self.live_session(req.session)?;
        let n = req.connects.len();
        check_shape("RedirectConnections", "connect", n, req.flags)?;
        self.check_not_busy(client_ip, req.protocol)?;
        self.check_pending(req.session, n)?;
        let f = req.flags;
        let foreign =
            f - (ConnFlags::ALLOW_MULTIPLE | ConnFlags::TIMEOUT | ConnFlags::NO_KERNEL_MODE);
        if !foreign.is_empty() {
            return Err(invalid(format!("flag(s) {} do not apply to RedirectConnections (allow-multiple, timeout, no-kernel-mode)", foreign.names().join(", "))));
        }
        let own = self.cfg.own_addrs();
        for (i, c) in req.connects.iter().enumerate() {
            if c.port() == 0 {
                return Err(invalid(format!("connect address {i} ({c}) has port 0")));
            }
            policy::check_unicast(&format!("connect address {i}"), *c.ip(), &own)?;
            if self.cfg.is_internal(*c.ip()) {
                return Err(invalid(format!("connect address {i} ({c}) is on an internal network; RedirectConnections relays outward")));
            }
        }
        let ext = match req.proxy_external {
            None => SocketAddrV4::new(self.cfg.external_addrs[0], 0),
            Some(p) if p.ip().is_unspecified() => {
                SocketAddrV4::new(self.cfg.external_addrs[0], p.port())
            }
            Some(p) if self.cfg.external_addrs.contains(p.ip()) => p,
            Some(p) => {
                return Err(err(
                    ErrorKind::AddressNotAvailable,
                    format!(
                        "proxy external address {} is not an external address of the firewall",
                        p.ip()
                    ),
                ))
            }
        };
        if ext.port() != 0
            && self.user_mode(
                f,
                &req.protocol_name,
                Self::resulting_event(Kind::Redirect, req.protocol),
            )
        {
            return Err(invalid(format!("an explicit proxy external port ({ext}) is not supported in user mode (no-kernel-mode): the relay uses any port of that address")));
        }
        if ext.port() != 0 && (n > 1 || f.contains(ConnFlags::ALLOW_MULTIPLE)) {
            return Err(invalid(format!("an explicit proxy external port ({ext}) is allowed only for one single-use redirect")));
        }
        policy::check_protocol(&self.cfg.protocols, &req.protocol_name, client_ip)?;
        let int = match req.internal {
            None => *self.cfg.internal_addrs.first().ok_or_else(|| {
                err(
                    ErrorKind::AddressNotAvailable,
                    "the internal interface has no IPv4 address",
                )
            })?,
            Some(a) if self.cfg.internal_addrs.contains(&a) => a,
            Some(a) => {
                policy::check_unicast("internal address", a, &own)?;
                if self.cfg.is_internal(a) {
                    return Err(invalid(format!("internal address {a} is on an internal network: a transparent internal address stands for an external host")));
                }
                self.ports.answer_transparently(a, req.protocol);
                a
            }
        };

        let mut undo = Undo::default();
        match self.redirect_apply(req, client_ip, int, ext, &mut undo) {
            Ok(r) => Ok(r),
            Err(e) => {
                self.rollback(undo);
                Err(e)
            }
        }
    }

    fn redirect_apply(
        &mut self,
        req: &RedirectRequest,
        client_ip: Ipv4Addr,
        int: Ipv4Addr,
        ext: SocketAddrV4,
        undo: &mut Undo,
    ) -> Result<RedirectResult, ApiError> {
        let n = req.connects.len();
        // User mode: the relay's outward sockets take ephemeral ports of the
        // external address; no SNAT block is needed.
        let expected = Self::resulting_event(Kind::Redirect, req.protocol);
        let user = self.user_mode(req.flags, &req.protocol_name, expected)
            || req
                .connects
                .iter()
                .any(|c| expected.is_some_and(|e| self.factory_for(e, *c).is_some()));
        let hold = if user { Hold::Socket } else { Hold::Kernel };
        let int_block = self
            .ports
            .reserve_block_held(int, req.protocol, n as u16, hold)?;
        undo.leases.extend(&int_block);
        let mut snat = Vec::new();
        for _ in 0..if user { 0 } else { n } {
            let block = if ext.port() != 0 {
                vec![self
                    .ports
                    .reserve_exact(*ext.ip(), req.protocol, ext.port())?]
            } else {
                let count = if req.flags.contains(ConnFlags::ALLOW_MULTIPLE) {
                    self.cfg.snat_block
                } else {
                    1
                };
                self.ports.reserve_block(*ext.ip(), req.protocol, count)?
            };
            undo.leases.extend(&block);
            snat.push(block);
        }
        let deadline = self.deadline(req.flags, req.protocol);
        let mut created = Vec::new();
        let mut out = Vec::new();
        let mut jobs = Vec::new();
        for i in 0..n {
            let id = self.new_id();
            let ep = int_block[i].endpoint();
            let key = PinholeKey::new(
                ipproto(req.protocol),
                ep.ip().octets(),
                ep.port(),
                side::INTERNAL,
            );
            let connect = req.connects[i];
            let mut flags = pinhole_flags::CLIENT_ONLY;
            if req.flags.contains(ConnFlags::ALLOW_MULTIPLE) {
                flags |= pinhole_flags::MULTIPLE;
            }
            let mut leases = vec![int_block[i]];
            if user {
                jobs.push(Job {
                    owner: id,
                    transport: req.protocol,
                    socket: self.ports.take_socket(&int_block[i]),
                    backlog: DEFAULT_BACKLOG,
                    admit: Admit::Client(client_ip),
                    target: Some(connect),
                    source: SocketAddrV4::new(*ext.ip(), 0),
                    multiple: req.flags.contains(ConnFlags::ALLOW_MULTIPLE),
                    idle: None,
                    recv_buffer: None,
                    filters: self.filters_for(&req.protocol_name),
                    event: Self::resulting_event(Kind::Redirect, req.protocol),
                    hook: None,
                });
            } else {
                let value = PinholeValue {
                    target_addr: connect.ip().octets(),
                    target_port: connect.port(),
                    flags,
                    snat_addr: snat[i][0].addr.octets(),
                    snat_port_base: snat[i][0].port,
                    snat_port_count: snat[i].len() as u16,
                    allowed_src: client_ip.octets(),
                    egress_ifindex: self.cfg.external_ifindex,
                    remaining: 1,
                    owner: id,
                    deadline_ns: deadline,
                    ..Default::default()
                };
                self.maps.put_pinhole(&key, &value).map_err(internal)?;
                undo.pinholes.push(key);
                leases.extend(&snat[i]);
            }
            created.push((
                id,
                Object {
                    target: Some(connect),
                    pinhole: (!user).then_some(key),
                    leases,
                    notify: req.notify,
                    context: req.context.clone(),
                    mode: if user { Mode::User } else { Mode::Kernel },
                    ..Object::new(
                        req.session,
                        Kind::Redirect,
                        req.protocol,
                        &req.protocol_name,
                        req.flags,
                        ep,
                    )
                },
            ));
            out.push(RedirectAction {
                id,
                internal: ep,
                connect,
            });
        }
        *self.pending.entry(req.session).or_default() += created.len();
        for (id, o) in created {
            self.objects.insert(id, o);
            if deadline != 0 {
                self.timers.at(deadline, timers::Timer::PinholeTimeout(id));
            }
        }
        self.relay.extend(jobs.into_iter().map(RelayCmd::Start));
        Ok(RedirectResult {
            internal_address: int_block[0].endpoint(),
            actions: out,
        })
    }

    fn deadline(&self, flags: ConnFlags, t: Transport) -> u64 {
        if !flags.contains(ConnFlags::TIMEOUT) {
            return 0;
        }
        let after = match t {
            Transport::Tcp => self.cfg.timeouts.pinhole,
            Transport::Udp => self.cfg.timeouts.udp_pinhole_idle,
        };
        self.clock.now_ns() + after.as_nanos() as u64
    }

    /// Writes a peer filter's rules; the caller records it once committed.
    fn install_peer_filter(
        &mut self,
        f: Option<&IpFilter>,
        undo: &mut Undo,
    ) -> Result<Option<u32>, ApiError> {
        let Some(f) = f else { return Ok(None) };
        let id = self.next_filter;
        self.next_filter = self.next_filter.wrapping_add(1).max(1);
        for (net, allow) in f.rules() {
            self.maps.put_peer_rule(id, net, allow).map_err(internal)?;
            undo.rules.push((id, net));
        }
        Ok(Some(id))
    }

    fn rollback(&mut self, undo: Undo) {
        for k in undo.pinholes {
            let _ = self.maps.del_pinhole(&k);
        }
        for (id, net) in undo.rules {
            let _ = self.maps.del_peer_rule(id, net);
        }
        for l in undo.leases {
            self.ports.release(&l);
        }
    }

    // ----- connection objects and actions -----

    fn object(&self, id: u64) -> Result<&Object, ApiError> {
        self.objects
            .get(&id)
            .ok_or_else(|| invalid(format!("no connection or action {id}")))
    }

    /// Ends a connection (Kill). Always succeeds once the object exists; a
    /// second Kill changes nothing.
    pub fn kill(&mut self, id: u64) -> Result<(), ApiError> {
        if self.forgotten(id) {
            // Ended long ago: a second Kill changes nothing.
            return Ok(());
        }
        let o = self.object(id)?;
        if o.kind == Kind::Redirect {
            return Err(invalid(format!(
                "{id} is a firewall action (RedirectConnections): use cancel"
            )));
        }
        if o.state != State::Terminated {
            self.terminate(id, "killed");
        }
        Ok(())
    }

    /// EmulateConnection: for a bind a filter emulated, connects to the client
    /// (from the firewall's internal address) with `peer` as the data source
    /// standing for the external `remote`. The connection is the bind's own
    /// object (or a child with `allow-multiple`); its established and
    /// terminating events follow as for relayed connections. A single-use
    /// bind is used up by the call, also if the client cannot be reached.
    pub fn emulate_connection(
        &mut self,
        id: u64,
        remote: SocketAddrV4,
        peer: Box<dyn filters::EmulatedPeer>,
    ) -> Result<(), ApiError> {
        let o = self.object(id)?;
        if o.state == State::Terminated {
            return Err(err(
                ErrorKind::Terminating,
                format!("connection {id} is terminated"),
            ));
        }
        if !o.emulated {
            return Err(err(
                ErrorKind::NotEmulated,
                format!("the bind of connection {id} was not emulated by a filter"),
            ));
        }
        if o.transport != Transport::Tcp {
            return Err(invalid(format!(
                "connection {id} is UDP: emulated connections are TCP streams"
            )));
        }
        let multiple = o.flags.contains(ConnFlags::ALLOW_MULTIPLE);
        if o.state != State::Listening || (o.emulation_started && !multiple) {
            return Err(err(
                ErrorKind::Terminating,
                format!("connection {id} was already used (no allow-multiple)"),
            ));
        }
        let Some(target) = o.target else {
            return Err(invalid(format!(
                "connection {id} has no client address yet (SetClientAddress)"
            )));
        };
        let source = SocketAddrV4::new(self.cfg.internal_addrs[0], 0);
        self.objects.get_mut(&id).expect("exists").emulation_started = true;
        self.relay.push(RelayCmd::Emulate(crate::relay::Emulation {
            owner: id,
            multiple,
            remote,
            target,
            source,
            peer,
        }));
        Ok(())
    }

    /// An id handed out once that names nothing any more: a used or
    /// cancelled factory, or an object forgotten after it ended.
    fn forgotten(&self, id: u64) -> bool {
        id < self.next_id && !self.objects.contains_key(&id) && !self.sessions.contains_key(&id)
    }

    /// Ends those of `ids` that still wait for their connection (a primary
    /// connection ended, or made them void): listening binds are killed,
    /// unused redirects cancelled. Established connections go on; unknown or
    /// ended ids are skipped.
    ///
    /// An endpoint a connection is using at that moment is not unused: a
    /// kernel pinhole is taken out of the map atomically and judged by what
    /// it was (its establishment event may still be on its way), a relay
    /// endpoint is withdrawn by the relay, which knows whether it accepted.
    pub fn withdraw_unused(&mut self, ids: &[u64], reason: &'static str) {
        for id in ids {
            let Some(o) = self.objects.get_mut(id) else {
                continue;
            };
            if o.state != State::Listening {
                continue;
            }
            if o.mode == Mode::User {
                self.relay.push(RelayCmd::Withdraw { owner: *id, reason });
                continue;
            }
            let single = !o.flags.contains(ConnFlags::ALLOW_MULTIPLE);
            let used = match o.pinhole.take() {
                Some(key) => match self.maps.take_pinhole(&key) {
                    Ok(v) => single && v.is_some_and(|v| timers::pinhole_used(&v)),
                    Err(e) => {
                        log::warn!("taking the pinhole of {id}: {e:#}");
                        o.pinhole = Some(key);
                        false
                    }
                },
                None => false,
            };
            if used {
                // A first packet won it: its flows exist or are being made.
                log::debug!("connection {id}: in use as its control connection ends; kept");
                self.timers.at(
                    self.clock.now_ns() + 1_000_000_000,
                    timers::Timer::AwaitEstablished(*id, reason),
                );
            } else {
                self.terminate(*id, reason);
            }
        }
    }

    /// Withdraws a redirect (Cancel). An action that was already used (single
    /// use), cancelled, or timed out answers `terminating`.
    pub fn cancel(&mut self, id: u64) -> Result<(), ApiError> {
        if self.factories.remove(&id).is_some() {
            return Ok(());
        }
        if self.forgotten(id) {
            // A factory that was used or cancelled, or an object that ended
            // and was forgotten.
            return Err(err(
                ErrorKind::Terminating,
                format!("action {id} was already used or cancelled"),
            ));
        }
        let o = self.object(id)?;
        if o.kind != Kind::Redirect {
            return Err(invalid(format!(
                "{id} is a connection, not a firewall action: use kill"
            )));
        }
        match o.state {
            State::Listening => {
                self.terminate(id, "cancelled");
                Ok(())
            }
            State::Established => Err(err(
                ErrorKind::Terminating,
                format!("action {id} was used and cancelled itself"),
            )),
            State::Terminated => Err(err(
                ErrorKind::Terminating,
                format!(
                    "action {id} is already {}",
                    o.reason.as_deref().unwrap_or("cancelled")
                ),
            )),
        }
    }

    /// Supplies the real client address of a placeholder connection, once.
    pub fn set_client_address(&mut self, id: u64, addr: SocketAddrV4) -> Result<(), ApiError> {
        let o = self.object(id)?;
        if o.kind != Kind::Bind {
            return Err(invalid(format!("{id} is not a BindForClient connection")));
        }
        if o.state == State::Terminated {
            return Err(err(
                ErrorKind::Terminating,
                format!("connection {id} is terminated"),
            ));
        }
        if let Some(t) = o.target {
            return Err(invalid(format!(
                "the client address of connection {id} is already set ({t})"
            )));
        }
        let own = self.cfg.own_addrs();
        let Some(addr) = policy::check_client_endpoint(0, addr, &own)? else {
            return Err(invalid(
                "the client address must not be the placeholder 0.0.0.0:0",
            ));
        };
        let client = self.sessions[&o.session].client;
        policy::check_allowed_target(client, *addr.ip(), o.flags, &self.cfg.networks).inspect_err(
            |e| {
                log::warn!(
                    "bounce attempt refused: connection {id} asked for client address {addr}: {}",
                    e.message
                );
            },
        )?;
        if o.mode == Mode::User {
            self.relay.push(RelayCmd::SetTarget {
                owner: id,
                target: addr,
            });
            self.objects.get_mut(&id).expect("exists").target = Some(addr);
            return Ok(());
        }
        let key = o
            .pinhole
            .expect("a listening kernel-mode bind has its pinhole");
        let mut v = self
            .maps
            .get_pinhole(&key)
            .map_err(internal)?
            .ok_or_else(|| {
                err(
                    ErrorKind::Internal,
                    format!("pinhole of connection {id} vanished"),
                )
            })?;
        v.target_addr = addr.ip().octets();
        v.target_port = addr.port();
        v.flags &= !pinhole_flags::NO_TARGET;
        self.maps.put_pinhole(&key, &v).map_err(internal)?;
        self.objects.get_mut(&id).expect("exists").target = Some(addr);
        Ok(())
    }

    /// Removes everything an object holds and raises its terminating event
    /// (once). Children go first.
    fn terminate(&mut self, id: u64, reason: &str) {
        self.end(id, reason, true)
    }

    /// Ends a connection whose TCP teardown is done: its ports and quota
    /// share go now, its flows stay until they are quiet for tcp_closing (the
    /// last ACK, a retransmitted FIN), owned by no object.
    fn terminate_keeping_flows(&mut self, id: u64, reason: &str) {
        self.end(id, reason, false)
    }

    fn end(&mut self, id: u64, reason: &str, delete_flows: bool) {
        let children: Vec<u64> = self
            .objects
            .get(&id)
            .map(|o| o.children.clone())
            .unwrap_or_default();
        for c in children {
            self.end(c, reason, delete_flows);
        }
        let Some(o) = self.objects.get_mut(&id) else {
            return;
        };
        if o.state == State::Terminated {
            return;
        }
        let now = self.clock.now_ns();
        let was_pending = o.state == State::Listening && o.parent.is_none();
        o.state = State::Terminated;
        o.reason = Some(reason.to_string());
        o.ended_ns = now;
        if std::mem::take(&mut o.counted) {
            let (session, transport) = (o.session, o.transport);
            self.count_established(session, transport, false);
        }
        self.forget_later(id, now);
        if was_pending {
            let session = self.objects[&id].session;
            self.no_longer_pending(session);
        }
        let o = self.objects.get_mut(&id).expect("exists");
        let (pinhole, filter, leases, flows, session) = (
            o.pinhole.take(),
            o.peer_filter.take(),
            std::mem::take(&mut o.leases),
            std::mem::take(&mut o.flows),
            o.session,
        );
        if let Some(conn) = o.relay_conn {
            self.relay_conns.remove(&conn);
        }
        if o.mode == Mode::User {
            // Before the leases go: the relay closes the sockets it holds.
            match (o.parent, o.relay_conn) {
                (Some(parent), Some(conn)) => self.relay.push(RelayCmd::StopConn {
                    owner: parent,
                    conn,
                }),
                (None, _) => self.relay.push(RelayCmd::Stop { owner: id }),
                (Some(_), None) => {}
            }
        }

        if let Some(k) = pinhole {
            if let Err(e) = self.maps.del_pinhole(&k) {
                log::warn!("removing the pinhole of {id}: {e:#}");
            }
        }
        if let Some(fid) = filter {
            let last = self.filters.get_mut(&fid).is_some_and(|(_, users)| {
                *users -= 1;
                *users == 0
            });
            if last {
                for (net, _) in self
                    .filters
                    .remove(&fid)
                    .map(|(r, _)| r)
                    .unwrap_or_default()
                {
                    let _ = self.maps.del_peer_rule(fid, net);
                }
            }
        }
        // Only flows still its own: a new connection reusing the 5-tuple may
        // have taken one over.
        let flows: Vec<FlowKey> = flows
            .into_iter()
            .filter(|k| self.flow_owner.get(k) == Some(&id))
            .collect();
        for k in &flows {
            self.flow_owner.remove(k);
        }
        if delete_flows {
            if let Err(e) = self.maps.del_flows(&flows) {
                log::warn!("removing the flows of {id}: {e:#}");
            }
        } else if !flows.is_empty() {
            let closing = self.cfg.timeouts.tcp_closing.as_nanos() as u64;
            self.timers.at(
                now + closing,
                timers::Timer::Linger {
                    owner: id,
                    keys: flows,
                },
            );
        }
        for l in leases {
            self.ports.release(&l);
        }
        for f in &self.app_filters {
            f.on_terminating(id);
        }
        self.events.push(Event::Terminating {
            connection: id,
            session,
            reason: reason.to_string(),
        });
        let transport = self.objects[&id].transport;
        self.check_quota(session, transport);
    }

    /// Keeps the number of established connections per client and transport
    /// (what the quota compares), so no check has to scan the objects.
    fn count_established(&mut self, session: u64, transport: Transport, up: bool) {
        let Some(client) = self.sessions.get(&session).map(|s| s.client) else {
            return;
        };
        let key = (client, transport);
        let n = self.established_count.entry(key).or_default();
        if up {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.established_count.remove(&key);
            }
        }
    }

    /// The per-client quota (spec §15 59): a client with `client_quota`
    /// established TCP secondaries is marked busy, so the datapath and the
    /// relay refuse its next ones until one ends; a UDP secondary beyond the
    /// quota ends the client's oldest UDP one instead.
    fn check_quota(&mut self, session: u64, transport: Transport) {
        let Some(client) = self.sessions.get(&session).map(|s| s.client) else {
            return;
        };
        let count = self
            .established_count
            .get(&(client, transport))
            .copied()
            .unwrap_or(0);
        let quota = self.cfg.client_quota as usize;
        match transport {
            Transport::Udp => {
                if count > quota {
                    // Rare (only beyond the quota): find the oldest.
                    let mut established: Vec<(u64, u64)> = self
                        .objects
                        .iter()
                        .filter(|(_, o)| {
                            o.state == State::Established
                                && o.transport == transport
                                && self.sessions.get(&o.session).map(|s| s.client) == Some(client)
                        })
                        .map(|(id, o)| (o.established_seq, *id))
                        .collect();
                    established.sort_unstable();
                    let excess = established.len() - quota;
                    for (_, id) in established.into_iter().take(excess) {
                        log::info!("client {client}: UDP quota of {quota} reached; ending its oldest mapping, connection {id}");
                        self.expired.client_quota += 1;
                        self.terminate(id, "client-quota");
                    }
                }
            }
            Transport::Tcp => {
                let busy = count >= quota;
                if busy == self.busy_clients.contains(&client) {
                    return;
                }
                let value = busy.then_some(BusyClientValue {
                    established_tcp: count as u32,
                    quota: self.cfg.client_quota,
                });
                if let Err(e) = self.maps.set_client_busy(client, value) {
                    log::warn!("client {client}: updating BUSY_CLIENTS: {e:#}");
                    return;
                }
                if busy {
                    log::info!("client {client}: TCP quota of {quota} concurrent secondary connections reached; refusing new ones");
                    self.busy_clients.insert(client);
                } else {
                    log::info!("client {client}: below its TCP quota again");
                    self.busy_clients.remove(&client);
                }
                self.relay.push(RelayCmd::ClientBusy { client, busy });
            }
        }
    }

    /// Records a connection made through `owner`'s pinhole or relay endpoint:
    /// a child object with `allow-multiple`, else the object itself becomes
    /// established. `fill` adds what the path knows (flows, relay handle).
    /// Raises "established" for calls that asked, and tells the calling
    /// filter (only it). Returns the connection's object id.
    fn connection_made(
        &mut self,
        owner: u64,
        from: SocketAddrV4,
        fill: impl FnOnce(&mut Object),
    ) -> u64 {
        let o = self.objects.get(&owner).expect("checked by the caller");
        let to = o
            .target
            .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        let id = if o.flags.contains(ConnFlags::ALLOW_MULTIPLE) {
            let mut child = Object {
                parent: Some(owner),
                state: State::Established,
                target: o.target,
                peer: Some(from),
                notify: o.notify,
                context: o.context.clone(),
                caller: o.caller.clone(),
                mode: o.mode,
                ..Object::new(
                    o.session,
                    if o.kind == Kind::Redirect {
                        Kind::Redirected
                    } else {
                        Kind::Accepted
                    },
                    o.transport,
                    &o.protocol_name,
                    o.flags,
                    o.endpoint,
                )
            };
            fill(&mut child);
            let id = self.new_id();
            self.objects.insert(id, child);
            if let Some(parent) = self.objects.get_mut(&owner) {
                parent.children.push(id);
            }
            id
        } else {
            let o = self.objects.get_mut(&owner).expect("exists");
            o.state = State::Established;
            o.peer = Some(from);
            fill(o);
            let session = o.session;
            self.no_longer_pending(session);
            owner
        };
        let seq = self.next_established;
        self.next_established += 1;
        let o = self.objects.get_mut(&id).expect("exists");
        o.established_seq = seq;
        o.counted = true;
        let (session, transport, flags, mode) = (o.session, o.transport, o.flags, o.mode);
        if mode == Mode::Kernel {
            if let Some(idle) = self.idle_timeout(transport, flags) {
                self.timers
                    .at(self.clock.now_ns() + idle, timers::Timer::Idle(id));
            }
        }
        self.count_established(session, transport, true);
        self.check_quota(session, transport);
        if self.objects[&id].state == State::Terminated {
            return id;
        }
        let o = &self.objects[&id];
        if o.notify {
            if let Some(c) = &o.caller {
                c.on_established(id, o.context.as_deref());
            }
            self.events.push(Event::Established {
                connection: id,
                parent: (id != owner).then_some(owner),
                session: o.session,
                protocol: o.transport,
                from,
                to,
                context: o.context.clone(),
            });
        }
        id
    }

    /// Learns of connections the datapath established and closed.
    pub fn on_datapath_event(&mut self, ev: &DatapathEvent) {
        if ev.kind == event_kind::CLOSING {
            return self.on_closing(&ev.forward, ev.detail as u8);
        }
        let owner = ev.owner;
        let Some(o) = self.objects.get(&owner) else {
            log::debug!("datapath event for unknown owner {owner}");
            return;
        };
        if o.state == State::Terminated {
            // The packet matched just before the pinhole went: its flows are stale.
            let _ = self.maps.del_flow(&ev.forward);
            let _ = self.maps.del_flow(&ev.reply);
            return;
        }
        match ev.kind {
            event_kind::ESTABLISHED => {
                let from = sa(ev.forward.src_addr, ev.forward.src_port);
                let id =
                    self.connection_made(owner, from, |o| o.flows.extend([ev.forward, ev.reply]));
                self.flow_owner.insert(ev.forward, id);
                self.flow_owner.insert(ev.reply, id);
            }
            event_kind::REPLY_PATH => {
                self.objects
                    .get_mut(&owner)
                    .expect("exists")
                    .flows
                    .push(ev.reply);
                self.flow_owner.insert(ev.reply, owner);
            }
            k => log::debug!("unknown datapath event kind {k}"),
        }
    }

    /// A flow saw its first FIN or RST in one direction (`new`: the
    /// `tcp_seen` bits new on it). The connection stops counting against its
    /// client's quota at once; when both directions have sent FIN, or either
    /// a RST, it ends: its ports go, its flows wait out tcp_closing.
    fn on_closing(&mut self, key: &FlowKey, new: u8) {
        use firewall_common::flow::tcp_seen;
        let Some(&id) = self.flow_owner.get(key) else {
            return;
        };
        let Some(o) = self.objects.get_mut(&id) else {
            return;
        };
        if o.state != State::Established {
            return;
        }
        if std::mem::take(&mut o.counted) {
            let (session, transport) = (o.session, o.transport);
            self.count_established(session, transport, false);
            self.check_quota(session, transport);
        }
        let o = self.objects.get_mut(&id).expect("exists");
        if new & tcp_seen::FIN != 0 {
            if let Some(i) = o.flows.iter().position(|k| k == key) {
                o.fins |= 1 << i.min(7);
            }
        }
        let both = o.flows.len() >= 2 && o.fins & 0b11 == 0b11;
        if new & tcp_seen::RST != 0 || both {
            self.terminate_keeping_flows(id, "closed");
        }
    }

    /// Learns of connections the user-mode relay made and ended.
    pub fn on_relay_event(&mut self, ev: RelayEvent) {
        match ev {
            RelayEvent::Established {
                owner,
                conn,
                from,
                to: _,
                bytes,
            } => {
                let Some(o) = self.objects.get(&owner) else {
                    return;
                };
                if o.state == State::Terminated {
                    self.relay.push(RelayCmd::StopConn { owner, conn });
                    return;
                }
                let id = self.connection_made(owner, from, |o| {
                    o.mode = Mode::User;
                    o.relay_conn = Some(conn);
                    o.relayed = Some(bytes);
                });
                self.relay_conns.insert(conn, id);
            }
            RelayEvent::Closed { owner, conn } => {
                let ended = self.relay_conns.get(&conn).copied().filter(|id| {
                    self.objects.get(id).is_some_and(|o| {
                        o.relay_conn == Some(conn) && (*id == owner || o.parent == Some(owner))
                    })
                });
                if let Some(id) = ended {
                    self.relay_conns.remove(&conn);
                    let o = self.objects.get_mut(&id).expect("exists");
                    // The relay has closed it already.
                    o.relay_conn = None;
                    // A single-use object, or a child, ends with its connection.
                    self.terminate(id, "closed");
                }
            }
            RelayEvent::Refused { .. } => self.expired.relay_refused += 1,
            RelayEvent::Denied {
                owner,
                from,
                reason,
            } => {
                log::info!("connection {owner}: the connection from {from} was refused ({reason}); the single-use opening is used up");
                if self
                    .objects
                    .get(&owner)
                    .is_some_and(|o| o.state == State::Listening)
                {
                    self.terminate(owner, reason);
                }
            }
            RelayEvent::Blocked { .. } => self.expired.relay_blocked += 1,
            RelayEvent::Withdrawn { owner, reason } => {
                if self
                    .objects
                    .get(&owner)
                    .is_some_and(|o| o.state == State::Listening)
                {
                    self.terminate(owner, reason);
                }
            }
        }
    }

    // ----- listing -----

    pub fn objects(&self) -> Vec<ObjectInfo> {
        self.objects
            .iter()
            .map(|(id, o)| {
                let (packets, mut bytes) = o
                    .flows
                    .iter()
                    .filter_map(|k| self.maps.get_flow(k).ok().flatten())
                    .fold((0, 0), |(p, b), v| (p + v.packets, b + v.bytes));
                // User mode counts payload bytes relayed (no packets).
                if let Some(r) = &o.relayed {
                    bytes += r.load(Ordering::Relaxed);
                }

                ObjectInfo {
                    id: *id,
                    session: o.session,
                    kind: o.kind,
                    state: o.state,
                    parent: o.parent,
                    protocol: o.transport,
                    protocol_name: o.protocol_name.clone(),
                    flags: o.flags,
                    mode: o.mode,
                    endpoint: o.endpoint,
                    target: o
                        .target
                        .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
                    peer: o.peer,
                    packets,
                    bytes,
                    reason: o.reason.clone(),
                }
            })
            .collect()
    }
}

/// What both calls check first: 1..=MAX_ADDRESSES addresses, and not
/// TIMEOUT together with ALLOW_MULTIPLE.
fn check_shape(call: &str, what: &str, n: usize, flags: ConnFlags) -> Result<(), ApiError> {
    if n == 0 {
        return Err(invalid(format!(
            "no {what} address: {call} needs at least one (N >= 1)"
        )));
    }
    if n > MAX_ADDRESSES {
        return Err(invalid(format!(
            "{n} {what} addresses: at most {MAX_ADDRESSES}"
        )));
    }
    if flags.contains(ConnFlags::TIMEOUT | ConnFlags::ALLOW_MULTIPLE) {
        return Err(invalid(
            "flags timeout and allow-multiple cannot be combined",
        ));
    }
    Ok(())
}

fn nets(n: &[Ipv4Net]) -> String {
    n.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

const DEFAULT_BACKLOG: u32 = 16;
const INCREASED_RECEIVE_BUFFER: usize = 64 * 1024;

/// Where a connection is forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Flows in the XDP datapath.
    Kernel,
    /// Sockets of the user-mode relay.
    User,
}

/// Work for the user-mode relay, in the order the engine decided it.
pub enum RelayCmd {
    Start(Job),
    SetTarget {
        owner: u64,
        target: SocketAddrV4,
    },
    Stop {
        owner: u64,
    },
    StopConn {
        owner: u64,
        conn: u64,
    },
    /// Stop an endpoint unless it accepted a connection already; the relay
    /// answers with `RelayEvent::Withdrawn` when it stopped it.
    Withdraw {
        owner: u64,
        reason: &'static str,
    },
    /// An emulated connection to start.
    Emulate(crate::relay::Emulation),
    /// A client reached its TCP quota (or is below it again).
    ClientBusy {
        client: Ipv4Addr,
        busy: bool,
    },
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_closing;
mod timers;

pub use timers::Readings;

pub use crate::maps::{MapError, Maps, MemMaps};
