//! The calls' arguments and answers, the events, and objects as listed.

use super::*;

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

/// AllowFutureConnect's arguments.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FutureConnectRequest {
    pub session: u64,
    /// The destination the client will connect to.
    pub address: SocketAddrV4,
    /// The primary connection's external peer (the server of an FTP control
    /// connection): the allowed-address policy is relative to it.
    #[serde(default)]
    pub peer: Option<Ipv4Addr>,
    /// External source of the connection (the primary's external address);
    /// none or 0.0.0.0: the first external address; port 0: any.
    #[serde(default)]
    pub proxy_external: Option<SocketAddrV4>,
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
pub struct FutureConnectResult {
    /// The firewall action (cancel withdraws the permission).
    pub id: u64,
    pub address: SocketAddrV4,
    /// The external source the connection will have (the first port of the
    /// block for allow-multiple).
    pub external: SocketAddrV4,
}

/// What an object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A BindForClient connection object (one bound port).
    Bind,
    /// A connection accepted through an ALLOW_MULTIPLE bind.
    Accepted,
    /// A RedirectConnections firewall action.
    Redirect,
    /// A connection made through an ALLOW_MULTIPLE redirect or permission.
    Redirected,
    /// An AllowFutureConnect firewall action (a permission).
    FutureConnect,
}

impl Kind {
    /// A firewall action (cancelled, not killed): the calls that permit a
    /// connection rather than bind one.
    pub fn is_action(self) -> bool {
        matches!(self, Kind::Redirect | Kind::FutureConnect)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SessionInfo {
    pub id: u64,
    pub client: Ipv4Addr,
    pub terminated: bool,
    pub objects: usize,
}

/// A connection object or firewall action, as listed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ObjectInfo {
    pub id: u64,
    pub session: u64,
    pub kind: Kind,
    pub state: State,
    pub parent: Option<u64>,
    pub protocol: Transport,
    pub protocol_name: String,
    pub flags: ConnFlags,
    /// Kernel (flows in the datapath) or user (the relay).
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
