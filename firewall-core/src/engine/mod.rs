//! The engine: sessions, connection objects and firewall actions, and the
//! calls of the filter API, BindForClient, RedirectConnections and
//! AllowFutureConnect.
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
};
use ipnet::Ipv4Net;
// The tests spell protocols as the datapath does.
#[cfg(test)]
use firewall_common::IPPROTO_TCP;
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

    pub(super) fn own_addrs(&self) -> Vec<Ipv4Addr> {
        self.internal_addrs
            .iter()
            .chain(&self.external_addrs)
            .copied()
            .collect()
    }

    pub(super) fn is_internal(&self, ip: Ipv4Addr) -> bool {
        self.internal_networks.iter().any(|n| n.contains(&ip))
    }
}

fn err(kind: ErrorKind, msg: impl Into<String>) -> ApiError {
    ApiError::new(kind, msg)
}

fn invalid(msg: impl Into<String>) -> ApiError {
    err(ErrorKind::InvalidArgument, msg)
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
    /// Sessions closed so far, shared with whoever remembers sessions
    /// (`sessions_closed`).
    sessions_closed: std::sync::Arc<std::sync::atomic::AtomicU64>,
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
            sessions_closed: Default::default(),
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

    /// The configuration in force (as last reconfigured).
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The port pool: what the engine's objects hold.
    pub fn ports(&self) -> &PortPool {
        &self.ports
    }

    /// The maps as the datapath shares them: what the kernel writes (flows,
    /// their counters and TCP flags, a pinhole's use) is written there, not
    /// by the engine. Tests play the datapath through it.
    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// How many sessions have been closed so far, as a counter shared with
    /// the caller: one that remembers a client's session (`open_session`
    /// answers the same id until that session is closed) asks again once
    /// the counter moved.
    pub fn sessions_closed(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.sessions_closed.clone()
    }

    /// A reloaded configuration: rules, policy and timeouts apply to the next
    /// call and the next timer; objects, pinholes and flows stay as they are
    /// (what they were granted stands). The interfaces and addresses are the
    /// running ones: changing them needs a restart.
    pub fn reconfigure(&mut self, cfg: EngineConfig) {
        self.cfg = EngineConfig {
            internal_addrs: std::mem::take(&mut self.cfg.internal_addrs),
            external_addrs: std::mem::take(&mut self.cfg.external_addrs),
            internal_networks: std::mem::take(&mut self.cfg.internal_networks),
            internal_ifindex: self.cfg.internal_ifindex,
            external_ifindex: self.cfg.external_ifindex,
            ..cfg
        };
    }

    /// What the calls since the last take decided: the owner carries it out
    /// (the relay's work first, then the events, in order).
    pub fn take_effects(&mut self) -> Effects {
        Effects {
            events: std::mem::take(&mut self.events),
            relay: std::mem::take(&mut self.relay),
        }
    }

    #[cfg(test)]
    pub(crate) fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    #[cfg(test)]
    pub(crate) fn take_relay_cmds(&mut self) -> Vec<RelayCmd> {
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
    pub(super) fn factory_for(&self, event: EventKind, address: SocketAddrV4) -> Option<u64> {
        self.factories
            .iter()
            .find(|(_, f)| f.event == event && address_matches(f.address, address))
            .map(|(id, _)| *id)
    }

    /// Takes the factory for `event` at `address` (it serves one connection).
    pub(super) fn take_factory(
        &mut self,
        event: EventKind,
        address: SocketAddrV4,
    ) -> Option<Arc<dyn DataFilterFactory>> {
        let id = self.factory_for(event, address)?;
        self.factories.remove(&id).map(|f| f.factory)
    }

    pub(super) fn filters_for(&self, protocol: &str) -> Vec<Arc<dyn DataFilterFactory>> {
        self.data_filters.get(protocol).cloned().unwrap_or_default()
    }

    /// The kernel/user decision, made when the call is: user mode when asked
    /// (NO_KERNEL_MODE), when a data filter is expected for the connection, or
    /// when a filter is registered for the event the connection will raise
    /// (it may attach a data filter then). Bind-time attachments decide per
    /// connection (see `bind_apply`).
    pub(super) fn user_mode(
        &self,
        flags: ConnFlags,
        protocol: &str,
        resulting: Option<EventKind>,
    ) -> bool {
        flags.contains(ConnFlags::NO_KERNEL_MODE)
            || !self.filters_for(protocol).is_empty()
            || resulting.is_some_and(|k| filters::registered(&self.app_filters, k))
    }

    /// The event a connection raises when it is made: accept (TCP bind),
    /// connect (TCP redirect), destination (UDP redirect).
    pub(super) fn resulting_event(kind: Kind, t: Transport) -> Option<EventKind> {
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

    pub(super) fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Flows in the XDP datapath.
    Kernel,
    /// Sockets of the user-mode relay.
    User,
}

/// The effects of engine calls: the engine itself does no I/O but through
/// its `Maps`; whoever owns it sends the events to followers and hands the
/// relay its work.
#[derive(Default)]
pub struct Effects {
    pub events: Vec<Event>,
    pub relay: Vec<RelayCmd>,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.relay.is_empty()
    }
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

mod actions;
mod bind;
mod books;
mod calls;
mod connections;
mod future;
mod listing;
mod object;
#[cfg(test)]
mod proptests;
mod quota;
mod redirect;
mod sessions;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_closing;
#[cfg(test)]
mod tests_filters;
#[cfg(test)]
mod tests_future;
#[cfg(test)]
mod tests_lifetimes;
#[cfg(test)]
mod tests_objects;
mod timers;

pub use calls::*;
pub use listing::Census;
pub use object::FORGET_AFTER;
use object::{Object, Session};
pub use timers::Readings;

pub use crate::maps::{MapError, Maps, MemMaps};
