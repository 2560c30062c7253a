//! Data filters: code that sees (and may modify, hold back or end) the bytes of
//! a user-mode connection, as `IFWXDataFilter` does.
//!
//! Filters of one connection form a chain ordered by priority class, from the
//! client side (`Nat`) to the Internet side (`Emulation`). Bytes from the
//! internal side pass the chain in that order, bytes from the external side in
//! the reverse order. A connection with a data filter is never offloaded to
//! the kernel.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use serde::{Deserialize, Serialize};

/// Where a filter sits, from the client side to the Internet side (FwxDataFilterPriorityClass).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PriorityClass {
    /// SecureNAT address editors (filters that call BindForClient).
    Nat,
    Internal,
    PostTrust,
    /// Virus scanners.
    Middle,
    PreTrust,
    External,
    /// Emulators, the data source.
    Emulation,
}

/// Which way bytes travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// From the internal host (the client) toward the external side.
    FromInternal,
    /// From the external side toward the internal host.
    FromExternal,
}

/// What a filter does with bytes it was given.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Pass these bytes on (possibly modified, possibly fewer: a filter may
    /// hold bytes back and pass them later).
    Forward(Vec<u8>),
    /// End the connection (both sides are reset); the reason is logged.
    Close(String),
}

/// The sockets of a relayed connection, given to its data filters once both
/// exist (IFWXDataFilter::SetSockets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sockets {
    /// The external socket's own address (getsockname: GetExternalSocketName).
    pub external_name: SocketAddrV4,
    /// The external socket's peer (getpeername: GetExternalPeerName).
    pub external_peer: SocketAddrV4,
    /// The internal socket's own address and its peer (the client).
    pub internal_name: SocketAddrV4,
    pub internal_peer: SocketAddrV4,
}

/// A data filter of one connection.
pub trait DataFilter: Send {
    fn name(&self) -> &str;
    /// Called once, before any data, when both sockets of the connection
    /// exist: the place to learn the external address (the spec's timing rule
    /// for GetExternalSocketName). UDP redirects: once per destination.
    fn set_sockets(&mut self, _sockets: &Sockets) {}
    /// Bytes travelling `dir`.
    fn on_data(&mut self, dir: Direction, data: Vec<u8>) -> Action;
    /// The `dir` side finished sending: a last chance to pass held bytes.
    fn on_end(&mut self, _dir: Direction) -> Action {
        Action::Forward(Vec::new())
    }
}

/// The data source of an emulated connection (EmulateConnection): it plays
/// the external side, at the emulation priority class; the client's socket is
/// the only real one.
pub trait EmulatedPeer: Send {
    fn name(&self) -> &str;
    /// What the client gets as soon as it is connected.
    fn on_connected(&mut self) -> Action {
        Action::Forward(Vec::new())
    }
    /// The client sent `data`: the answer (or the end of the connection).
    fn on_client_data(&mut self, data: Vec<u8>) -> Action;
    /// The client finished sending: last bytes, then the connection closes.
    fn on_client_end(&mut self) -> Action {
        Action::Forward(Vec::new())
    }
}

/// Creates a data filter for each connection it is attached to (the
/// factories registered for a protocol, as `SetDataFilterFactory` does).
pub trait DataFilterFactory: Send + Sync {
    fn name(&self) -> &str;
    fn priority(&self) -> PriorityClass;
    fn create(&self) -> Box<dyn DataFilter>;
}

/// The filters of one connection, in priority order.
pub struct Chain {
    filters: Vec<(PriorityClass, Box<dyn DataFilter>)>,
}

impl Chain {
    pub fn new(factories: &[Arc<dyn DataFilterFactory>]) -> Self {
        let mut filters: Vec<(PriorityClass, Box<dyn DataFilter>)> = factories
            .iter()
            .map(|f| (f.priority(), f.create()))
            .collect();
        // Stable: within one class, the order of attachment (the spec leaves it open).
        filters.sort_by_key(|(p, _)| *p);
        Self { filters }
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    fn order(
        &mut self,
        dir: Direction,
    ) -> Box<dyn Iterator<Item = &mut (PriorityClass, Box<dyn DataFilter>)> + '_> {
        match dir {
            Direction::FromInternal => Box::new(self.filters.iter_mut()),
            Direction::FromExternal => Box::new(self.filters.iter_mut().rev()),
        }
    }

    /// Tells every filter the connection's sockets.
    pub fn set_sockets(&mut self, sockets: &Sockets) {
        for (_, f) in &mut self.filters {
            f.set_sockets(sockets);
        }
    }

    /// Passes bytes through every filter in order for `dir`.
    pub fn data(&mut self, dir: Direction, data: Vec<u8>) -> Action {
        let mut bytes = data;
        for (_, f) in self.order(dir) {
            match f.on_data(dir, bytes) {
                Action::Forward(b) => bytes = b,
                close => return close,
            }
        }
        Action::Forward(bytes)
    }

    /// The end of `dir`: each filter may release what it held, which the
    /// filters after it see as data.
    pub fn end(&mut self, dir: Direction) -> Action {
        let mut pending: Vec<u8> = Vec::new();
        for (_, f) in self.order(dir) {
            if !pending.is_empty() {
                match f.on_data(dir, std::mem::take(&mut pending)) {
                    Action::Forward(b) => pending = b,
                    close => return close,
                }
            }
            match f.on_end(dir) {
                Action::Forward(b) => pending.extend(b),
                close => return close,
            }
        }
        Action::Forward(pending)
    }
}

/// The sample data filter: ends transfers whose first bytes mark a Windows
/// executable ("MZ", or "ZM"), in either direction — the way an operator
/// scans FTP transfers (ISA's ExeBlock sample).
pub struct ExecutableBlocker {
    /// The first bytes of each direction, until two are known.
    head: [Vec<u8>; 2],
    decided: [bool; 2],
    blocked: Arc<AtomicU64>,
}

fn index(dir: Direction) -> usize {
    match dir {
        Direction::FromInternal => 0,
        Direction::FromExternal => 1,
    }
}

impl DataFilter for ExecutableBlocker {
    fn name(&self) -> &str {
        "block-executables"
    }

    fn on_data(&mut self, dir: Direction, data: Vec<u8>) -> Action {
        let i = index(dir);
        if self.decided[i] {
            return Action::Forward(data);
        }
        self.head[i].extend(data);
        if self.head[i].len() < 2 {
            // Hold the one byte until the second tells.
            return Action::Forward(Vec::new());
        }
        self.decided[i] = true;
        if matches!(&self.head[i][..2], b"MZ" | b"ZM") {
            self.blocked.fetch_add(1, Ordering::Relaxed);
            return Action::Close(format!(
                "a Windows executable ({}) travelling {dir:?}",
                String::from_utf8_lossy(&self.head[i][..2])
            ));
        }
        Action::Forward(std::mem::take(&mut self.head[i]))
    }

    fn on_end(&mut self, dir: Direction) -> Action {
        // A one-byte stream is no executable.
        let i = index(dir);
        self.decided[i] = true;
        Action::Forward(std::mem::take(&mut self.head[i]))
    }
}

/// Makes an `ExecutableBlocker` per connection and counts what they blocked.
pub struct ExecutableBlockerFactory {
    pub blocked: Arc<AtomicU64>,
}

impl DataFilterFactory for ExecutableBlockerFactory {
    fn name(&self) -> &str {
        "block-executables"
    }

    fn priority(&self) -> PriorityClass {
        // Where ISA puts virus scanners.
        PriorityClass::Middle
    }

    fn create(&self) -> Box<dyn DataFilter> {
        Box::new(ExecutableBlocker {
            head: [Vec::new(), Vec::new()],
            decided: [false; 2],
            blocked: self.blocked.clone(),
        })
    }
}

// ----- application filters and their events -----

use std::net::SocketAddrV4;

use bitflags::bitflags;

use crate::error::{ApiError, ErrorKind};

bitflags! {
    /// Event kinds a filter registers for (FwxFirewallEventType).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct EventMask: u32 {
        const CONNECT_TCP = 0x001;
        const UDP_DESTINATION = 0x002;
        const BIND_TCP = 0x004;
        const BIND_UDP = 0x008;
        const LISTEN = 0x010;
        const ACCEPTED_CONNECTION = 0x020;
    }
}

/// The event a filter is handling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    ConnectTcp,
    UdpDestination,
    BindTcp,
    BindUdp,
    Listen,
    AcceptedConnection,
}

impl EventKind {
    pub fn mask(self) -> EventMask {
        match self {
            EventKind::ConnectTcp => EventMask::CONNECT_TCP,
            EventKind::UdpDestination => EventMask::UDP_DESTINATION,
            EventKind::BindTcp => EventMask::BIND_TCP,
            EventKind::BindUdp => EventMask::BIND_UDP,
            EventKind::Listen => EventMask::LISTEN,
            EventKind::AcceptedConnection => EventMask::ACCEPTED_CONNECTION,
        }
    }

    /// Where `Deny` works (bind, connect, accept; never listen).
    fn can_deny(self) -> bool {
        // For UDP destinations this is IFWXUdpDestination::Deny: datagrams are dropped.
        matches!(
            self,
            EventKind::AcceptedConnection
                | EventKind::BindUdp
                | EventKind::BindTcp
                | EventKind::ConnectTcp
                | EventKind::UdpDestination
        )
    }

    /// Where a data filter may be attached (TCP data filters attach at accept time, not at bind).
    fn can_attach(self) -> bool {
        matches!(
            self,
            EventKind::AcceptedConnection
                | EventKind::BindUdp
                | EventKind::ConnectTcp
                | EventKind::UdpDestination
        )
    }

    /// Where a filter may take over a bind (EmulateForBind).
    fn can_emulate(self) -> bool {
        matches!(
            self,
            EventKind::BindTcp | EventKind::BindUdp | EventKind::AcceptedConnection
        )
    }
}

/// What the handlers of one event decided.
#[derive(Default)]
pub struct Decision {
    pub denied_by: Option<String>,
    pub data_filters: Vec<(PriorityClass, Box<dyn DataFilter>)>,
    pub emulated_by: Option<String>,
    /// Accept-time emulation: the data source that answers the external peer.
    pub emulator: Option<Box<dyn EmulatedPeer>>,
}

impl std::fmt::Debug for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decision")
            .field("denied_by", &self.denied_by)
            .field(
                "data_filters",
                &self
                    .data_filters
                    .iter()
                    .map(|(p, d)| (p, d.name().to_string()))
                    .collect::<Vec<_>>(),
            )
            .field("emulated_by", &self.emulated_by)
            .finish()
    }
}

/// An event as a filter's handler sees it (FirewallEventHandler's argument),
/// with the calls that are valid only while it is handled. The context only
/// exists during the handler, so calling them "outside any handler" cannot
/// happen.
pub struct EventContext<'a> {
    pub kind: EventKind,
    /// The connection object the event is about.
    pub connection: u64,
    pub session: u64,
    /// Bind and listen: the firewall endpoint; accept: the remote peer;
    /// connect: the destination.
    pub address: SocketAddrV4,
    pub protocol_name: &'a str,
    /// Raised by the secondary-connection machinery (BindForClient, RedirectConnections).
    pub is_secondary: bool,
    filter: &'a str,
    decision: &'a mut Decision,
}

fn bad_context(what: &str, kind: EventKind) -> ApiError {
    ApiError::new(
        ErrorKind::BadContext,
        format!("{what} is not valid while handling {kind:?}"),
    )
}

impl<'a> EventContext<'a> {
    pub(crate) fn new(
        kind: EventKind,
        connection: u64,
        session: u64,
        address: SocketAddrV4,
        protocol_name: &'a str,
        filter: &'a str,
        decision: &'a mut Decision,
    ) -> Self {
        Self {
            kind,
            connection,
            session,
            address,
            protocol_name,
            is_secondary: true,
            filter,
            decision,
        }
    }

    /// Refuses what the event is about (IFWXConnection::Deny): a bind fails
    /// with `address-in-use`, an accepted connection is aborted. `reserved`
    /// must be 0.
    pub fn deny(&mut self, reserved: u32) -> Result<(), ApiError> {
        if !self.kind.can_deny() {
            return Err(bad_context("Deny", self.kind));
        }
        if reserved != 0 {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                format!("Deny's reserved argument must be 0, not {reserved}"),
            ));
        }
        self.decision
            .denied_by
            .get_or_insert_with(|| self.filter.to_string());
        Ok(())
    }

    /// Attaches a data filter to the resulting connection (which is then user mode).
    pub fn attach_data_filter(
        &mut self,
        filter: Box<dyn DataFilter>,
        priority: PriorityClass,
    ) -> Result<(), ApiError> {
        if !self.kind.can_attach() {
            return Err(bad_context("AttachDataFilter", self.kind));
        }
        self.decision.data_filters.push((priority, filter));
        Ok(())
    }

    /// GetExternalSocketName during event handling: the connection does not
    /// exist yet (it may still be denied), so this always fails; data filters
    /// get the names in `DataFilter::set_sockets`.
    pub fn external_socket_name(&self) -> Result<SocketAddrV4, ApiError> {
        Err(ApiError::new(
            ErrorKind::InvalidArgument,
            format!(
                "connection {} has no external socket while handling {:?}; \
                 a data filter learns it in set_sockets",
                self.connection, self.kind
            ),
        ))
    }

    /// EmulateForBind while handling an accepted connection, with the data
    /// source (the emulation-class data filter of the spec): the client is
    /// never connected; `peer` answers the external side instead.
    pub fn emulate_accepted(&mut self, peer: Box<dyn EmulatedPeer>) -> Result<(), ApiError> {
        if self.kind != EventKind::AcceptedConnection {
            return Err(bad_context("an emulated accept", self.kind));
        }
        self.emulate_for_bind()?;
        self.decision.emulator = Some(peer);
        Ok(())
    }

    /// Takes the bind over (EmulateForBind): no connection may be emulated twice.
    pub fn emulate_for_bind(&mut self) -> Result<(), ApiError> {
        if !self.kind.can_emulate() {
            return Err(bad_context("EmulateForBind", self.kind));
        }
        if let Some(by) = &self.decision.emulated_by {
            return Err(ApiError::new(
                ErrorKind::AlreadyEmulated,
                format!("connection {} is already emulated by {by}", self.connection),
            ));
        }
        self.decision.emulated_by = Some(self.filter.to_string());
        Ok(())
    }
}

/// An application filter living in the daemon (IFWXFilter plus its session
/// filters): it registers for event kinds and handles them.
pub trait AppFilter: Send + Sync {
    fn name(&self) -> &str;
    fn events(&self) -> EventMask;
    /// Handles an event it registered for. An error fails the request that
    /// raised the event (the spec's E_OUTOFMEMORY case).
    fn on_event(&self, ev: &mut EventContext<'_>) -> Result<(), ApiError>;
    /// A connection it saw is ending (no registration needed).
    fn on_terminating(&self, _connection: u64) {}
    /// A connection made through one of its own calls was established.
    fn on_established(&self, _connection: u64, _context: Option<&str>) {}
}

/// Runs the handlers registered for `kind`, in registration order; a deny
/// from any of them wins.
pub fn raise(
    filters: &[Arc<dyn AppFilter>],
    kind: EventKind,
    connection: u64,
    session: u64,
    address: SocketAddrV4,
    protocol_name: &str,
) -> Result<Decision, ApiError> {
    let mut decision = Decision::default();
    for f in filters.iter().filter(|f| f.events().contains(kind.mask())) {
        let name = f.name().to_string();
        let mut ctx = EventContext::new(
            kind,
            connection,
            session,
            address,
            protocol_name,
            &name,
            &mut decision,
        );
        f.on_event(&mut ctx).map_err(|e| {
            ApiError::new(
                e.kind,
                format!("filter {name} failed handling {kind:?}: {}", e.message),
            )
        })?;
    }
    Ok(decision)
}

/// Whether any filter is registered for `kind` (the kernel/user decision).
pub fn registered(filters: &[Arc<dyn AppFilter>], kind: EventKind) -> bool {
    filters.iter().any(|f| f.events().contains(kind.mask()))
}

/// A data filter attached in an event handler, as a factory for the one
/// connection it belongs to (later connections of the same endpoint get none).
pub struct Attached {
    priority: PriorityClass,
    filter: std::sync::Mutex<Option<Box<dyn DataFilter>>>,
}

impl Attached {
    pub fn new(priority: PriorityClass, filter: Box<dyn DataFilter>) -> Self {
        Self {
            priority,
            filter: std::sync::Mutex::new(Some(filter)),
        }
    }
}

/// Passes everything (what `Attached` makes once its filter was used).
struct PassThrough;

impl DataFilter for PassThrough {
    fn name(&self) -> &str {
        "pass-through"
    }
    fn on_data(&mut self, _dir: Direction, data: Vec<u8>) -> Action {
        Action::Forward(data)
    }
}

impl DataFilterFactory for Attached {
    fn name(&self) -> &str {
        "attached"
    }
    fn priority(&self) -> PriorityClass {
        self.priority
    }
    fn create(&self) -> Box<dyn DataFilter> {
        self.filter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| Box::new(PassThrough))
    }
}

impl Chain {
    /// The chain with more filters (attached in an accept or connect event).
    pub fn with(mut self, extra: Vec<(PriorityClass, Box<dyn DataFilter>)>) -> Self {
        self.filters.extend(extra);
        self.filters.sort_by_key(|(p, _)| *p);
        self
    }
}

#[cfg(test)]
mod tests;
