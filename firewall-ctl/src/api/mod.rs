//! The local API: one JSON object per line over a Unix stream socket.
//!
//! Every request carries the protocol version `v`; every response is either
//! `{"ok": ...}` or `{"error": {"kind", "message"}}`. The CLI and the tests are
//! clients of it.

use std::net::{Ipv4Addr, SocketAddrV4};

use serde::{Deserialize, Serialize};

pub use firewall_core::error::{ApiError, ErrorKind};

use crate::engine::{
    BindRequest, BindResult, FutureConnectRequest, FutureConnectResult, ObjectInfo,
    RedirectRequest, RedirectResult, SessionInfo,
};

mod client;
mod views;

pub use client::{Client, Connection};
pub use views::{
    CounterStatus, FlowView, InterfaceStatus, MapStatus, PinholeView, Status, WallStatus,
};

pub const API_VERSION: u32 = 1;
pub const DEFAULT_SOCKET: &str = "/run/firewall/ctl.sock";
/// Requests longer than this are refused (a line is one request).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Interfaces, attach mode, map fill levels and counters.
    Status,
    /// Detach, unpin and exit (what `firewall-ctl down` asks a running daemon).
    Shutdown,
    /// The session of a client address (opened if needed).
    SessionOpen {
        client: Ipv4Addr,
    },
    /// Ends a session and everything it owns.
    SessionClose {
        session: u64,
    },
    BindForClient(BindRequest),
    RedirectConnections(RedirectRequest),
    AllowFutureConnect(FutureConnectRequest),
    /// Ends a connection (idempotent).
    Kill {
        id: u64,
    },
    /// Withdraws a redirect or a permission.
    Cancel {
        id: u64,
    },
    /// Supplies a placeholder connection's client address.
    SetClientAddress {
        id: u64,
        address: SocketAddrV4,
    },
    List {
        what: ListWhat,
    },
    /// Follow events: the answer is followed by one event per line.
    Events,
    /// Read the configuration file again and apply it (what SIGHUP does).
    Reload,
    /// The flags of a primary connection (GetConnectionFlags), named by its
    /// endpoints as the client sees them.
    ConnectionFlags {
        transport: crate::policy::Transport,
        client: SocketAddrV4,
        server: SocketAddrV4,
    },
}

impl Request {
    /// The request's `op` (its name on the wire, and in metrics).
    pub const fn op(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Shutdown => "shutdown",
            Request::SessionOpen { .. } => "session-open",
            Request::SessionClose { .. } => "session-close",
            Request::BindForClient(_) => "bind-for-client",
            Request::RedirectConnections(_) => "redirect-connections",
            Request::AllowFutureConnect(_) => "allow-future-connect",
            Request::Kill { .. } => "kill",
            Request::Cancel { .. } => "cancel",
            Request::SetClientAddress { .. } => "set-client-address",
            Request::List { .. } => "list",
            Request::Events => "events",
            Request::Reload => "reload",
            Request::ConnectionFlags { .. } => "connection-flags",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ListWhat {
    Sessions,
    Connections,
    Pinholes,
    Flows,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    #[serde(flatten)]
    pub request: Request,
}

/// The answer to a request: `{"ok": ...}` or `{"error": {"kind", "message"}}`.
/// The daemon sends `Response<Answer>`; a client reads the `ok` as the type
/// its request answers with (`Response<T>`), or as JSON.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response<T = serde_json::Value> {
    Ok(T),
    Error(ApiError),
}

/// What each request answers with.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Answer {
    Status(Box<Status>),
    ShuttingDown(ShuttingDown),
    SessionOpened(SessionOpened),
    SessionClosed(SessionClosed),
    Bound(BindResult),
    Redirected(RedirectResult),
    Permitted(FutureConnectResult),
    Reloaded(Reloaded),
    Killed(Killed),
    Cancelled(Cancelled),
    ClientAddressSet(ClientAddressSet),
    Sessions(Vec<SessionInfo>),
    Connections(Vec<ObjectInfo>),
    Pinholes(Vec<PinholeView>),
    Flows(Vec<FlowView>),
    /// The first line of an event stream; events follow, one per line.
    Following(Following),
    ConnectionFlags(PrimaryConnection),
}

/// A primary connection and its flags (GetConnectionFlags).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PrimaryConnection {
    pub transport: crate::policy::Transport,
    pub client: SocketAddrV4,
    pub server: SocketAddrV4,
    /// How the firewall carries it.
    pub kind: PrimaryKind,
    /// `internal-address-translation` (FWX_CONNECTION_INTERNAL_ADDRESS_TRANSLATION):
    /// the server sees the firewall's internal address instead of the
    /// client's, a publishing rule's full proxy mode. A filter then passes
    /// PROXY_MODE to BindForClient for the connection's secondaries.
    pub flags: Vec<String>,
}

/// How the firewall carries a primary connection.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PrimaryKind {
    /// An FTP control connection to a published server, proxied by the FTP
    /// filter from the firewall's internal address (full proxy mode).
    PublishedProxy,
    /// A connection to a published server, forwarded in the kernel (DNAT:
    /// the server sees the client's address).
    Published,
    /// An outbound FTP control connection the FTP filter intercepts.
    Intercepted,
    /// An outbound connection tracked and translated in the kernel.
    Outbound,
}

impl PrimaryKind {
    /// The connection flags its kind implies.
    pub fn flags(self) -> Vec<String> {
        match self {
            PrimaryKind::PublishedProxy => vec!["internal-address-translation".into()],
            _ => Vec::new(),
        }
    }
}

/// What a reload changed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reloaded {
    /// The configuration keys that changed (empty: the file says what runs).
    pub changed: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShuttingDown {
    pub shutting_down: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionOpened {
    pub session: u64,
    pub client: Ipv4Addr,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionClosed {
    pub closed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Killed {
    pub killed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Cancelled {
    pub cancelled: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClientAddressSet {
    pub id: u64,
    pub client: SocketAddrV4,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Following {
    pub following: bool,
}

/// Parses one request line as the server sees it.
pub fn parse_request(line: &str) -> Result<Request, ApiError> {
    let value: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| ApiError::new(ErrorKind::BadRequest, format!("request is not JSON: {e}")))?;
    match value.get("v").and_then(|v| v.as_u64()) {
        Some(v) if v == API_VERSION as u64 => {}
        Some(v) => {
            return Err(ApiError::new(
                ErrorKind::BadRequest,
                format!("API version {v} is not supported (this daemon speaks {API_VERSION})"),
            ))
        }
        None => {
            return Err(ApiError::new(
                ErrorKind::BadRequest,
                "request has no API version field \"v\"",
            ))
        }
    }
    let mut obj = value;
    obj.as_object_mut().map(|o| o.remove("v"));
    check_values(&obj)?;
    serde_json::from_value(obj)
        .map_err(|e| ApiError::new(ErrorKind::BadRequest, format!("bad request: {e}")))
}

/// Flags and transports are arguments, not framing: an unknown one is an
/// `invalid-argument` naming it (the rest of a malformed request is a
/// `bad-request`).
fn check_values(obj: &serde_json::Value) -> Result<(), ApiError> {
    let invalid = |m: String| ApiError::new(ErrorKind::InvalidArgument, m);
    if let Some(flags) = obj.get("flags").and_then(|f| f.as_array()) {
        let names: Vec<&str> = flags.iter().filter_map(|f| f.as_str()).collect();
        crate::flags::ConnFlags::parse(&names).map_err(invalid)?;
    }
    if let Some(p) = obj.get("protocol").and_then(|p| p.as_str()) {
        if !matches!(p, "tcp" | "udp") {
            return Err(invalid(format!("unknown protocol {p:?} (tcp, udp)")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let line = serde_json::to_string(&Envelope {
            v: API_VERSION,
            request: Request::Status,
        })
        .unwrap();
        assert_eq!(line, r#"{"v":1,"op":"status"}"#);
        assert_eq!(parse_request(&line).unwrap(), Request::Status);
    }

    #[test]
    fn op_is_the_wire_name() {
        for r in [
            Request::Status,
            Request::Shutdown,
            Request::SessionOpen {
                client: Ipv4Addr::LOCALHOST,
            },
            Request::SessionClose { session: 1 },
            Request::Kill { id: 1 },
            Request::Cancel { id: 1 },
            Request::SetClientAddress {
                id: 1,
                address: "1.2.3.4:5".parse().unwrap(),
            },
            Request::List {
                what: ListWhat::Flows,
            },
            Request::Events,
            Request::Reload,
        ] {
            assert_eq!(serde_json::to_value(&r).unwrap()["op"], r.op());
        }
    }

    #[test]
    fn bad_requests_are_named() {
        for (line, want) in [
            ("nope", "not JSON"),
            (r#"{"op":"status"}"#, "no API version"),
            (r#"{"v":9,"op":"status"}"#, "version 9"),
            (r#"{"v":1,"op":"frobnicate"}"#, "frobnicate"),
            (r#"{"v":1}"#, "bad request"),
        ] {
            let e = parse_request(line).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest);
            assert!(e.message.contains(want), "{line}: {}", e.message);
        }
    }

    #[test]
    fn responses_have_the_documented_shape() {
        let r: Response = Response::Error(ApiError::new(ErrorKind::InvalidArgument, "x"));
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"error":{"kind":"invalid-argument","message":"x"}}"#
        );
    }
}

#[cfg(test)]
mod request_tests {
    use super::*;

    #[test]
    fn call_requests_parse_with_their_fields() {
        let line = r#"{"v":1,"op":"bind-for-client","session":3,"clients":["10.1.0.2:5001"],"protocol":"tcp","flags":["timeout"],"protocol_name":"ftp"}"#;
        match parse_request(line).unwrap() {
            Request::BindForClient(b) => {
                assert_eq!(b.session, 3);
                assert_eq!(b.clients, vec!["10.1.0.2:5001".parse().unwrap()]);
                assert_eq!(b.flags, crate::flags::ConnFlags::TIMEOUT);
            }
            r => panic!("{r:?}"),
        }
        let e = parse_request(r#"{"v":1,"op":"bind-for-client","session":3,"clients":["10.1.0.2:5001"],"protocol":"tcp","flags":["warp"],"protocol_name":"ftp"}"#).unwrap_err();
        assert!(e.message.contains("unknown flag \"warp\""), "{}", e.message);
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        let e = parse_request(r#"{"v":1,"op":"redirect-connections","session":3,"connects":["10.2.0.2:21"],"protocol":"sctp","protocol_name":"ftp"}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("\"sctp\""), "{}", e.message);
        let e = parse_request(r#"{"v":1,"op":"bind-for-client","session":3,"clients":["10.1.0.2"],"protocol":"tcp","protocol_name":"ftp"}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert!(matches!(
            parse_request(r#"{"v":1,"op":"kill","id":9}"#).unwrap(),
            Request::Kill { id: 9 }
        ));
        assert!(matches!(
            parse_request(r#"{"v":1,"op":"list","what":"flows"}"#).unwrap(),
            Request::List {
                what: ListWhat::Flows
            }
        ));
    }
}
