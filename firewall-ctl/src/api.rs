//! The local API: one JSON object per line over a Unix stream socket.
//!
//! Every request carries the protocol version `v`; every response is either
//! `{"ok": ...}` or `{"error": {"kind", "message"}}`. The CLI and the tests are
//! clients of it.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use std::net::{Ipv4Addr, SocketAddrV4};

use firewall_common::{
    flow::{FlowKey, FlowValue},
    pinhole::{pinhole_flags, side, PinholeKey, PinholeValue},
    IPPROTO_TCP,
};

pub use firewall_core::error::{ApiError, ErrorKind};

use crate::{
    config::Config,
    datapath::AttachMode,
    engine::{BindRequest, RedirectRequest},
    netif::Interface,
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
    /// Ends a connection (idempotent).
    Kill {
        id: u64,
    },
    /// Withdraws a redirect.
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
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
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

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    Ok(serde_json::Value),
    Error(ApiError),
}

/// What `status` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub version: String,
    pub interfaces: Vec<InterfaceStatus>,
    pub internal_networks: Vec<String>,
    pub external_addresses: Vec<String>,
    pub maps: Vec<MapStatus>,
    pub counters: Vec<CounterStatus>,
    /// Flows removed by the sweeper since the daemon started, by reason.
    pub flows_expired: crate::sweeper::SweepStats,
    /// Transfers the executable blocker stopped.
    #[serde(default)]
    pub executables_blocked: u64,
    /// The FTP filter: ports intercepted (none: off) and its counters.
    #[serde(default)]
    pub ftp_ports: Vec<u16>,
    #[serde(default)]
    pub ftp: crate::ftp::FtpStatsView,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub side: String,
    pub name: String,
    pub ifindex: u32,
    pub addresses: Vec<String>,
    pub xdp_program: String,
    pub xdp_mode: AttachMode,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapStatus {
    pub name: String,
    pub pinned: String,
    pub entries: u64,
    pub capacity: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CounterStatus {
    pub name: String,
    pub verdict: String,
    pub packets: u64,
    pub bytes: u64,
    pub help: String,
}

impl InterfaceStatus {
    pub fn new(side: crate::datapath::Side, iface: &Interface, mode: AttachMode) -> Self {
        Self {
            side: side.name().into(),
            name: iface.name.clone(),
            ifindex: iface.index,
            addresses: iface.networks.iter().map(|n| n.to_string()).collect(),
            xdp_program: mode.program(side).into(),
            xdp_mode: mode,
        }
    }
}

impl Status {
    pub fn config_fields(config: &Config) -> (Vec<String>, Vec<String>) {
        (
            config
                .internal_networks
                .iter()
                .map(|n| n.to_string())
                .collect(),
            config
                .external_addresses
                .iter()
                .map(|a| a.to_string())
                .collect(),
        )
    }
}

fn proto_name(p: u8) -> &'static str {
    if p == IPPROTO_TCP {
        "tcp"
    } else {
        "udp"
    }
}

fn sa(addr: [u8; 4], port: u16) -> String {
    SocketAddrV4::new(addr.into(), port).to_string()
}

/// A pinhole as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinholeView {
    pub protocol: String,
    /// The firewall endpoint the first packet targets.
    pub address: String,
    pub side: String,
    pub target: String,
    pub flags: Vec<String>,
    pub snat: Option<String>,
    pub peer_filter: u32,
    pub remaining: u64,
    pub uses: u64,
    pub owner: u64,
    /// Milliseconds until the TIMEOUT deadline (None: no deadline).
    pub expires_in_ms: Option<i64>,
}

impl PinholeView {
    pub fn new(k: &PinholeKey, v: &PinholeValue, now_ns: u64) -> Self {
        let names = [
            (pinhole_flags::MULTIPLE, "multiple"),
            (pinhole_flags::BIDIRECTIONAL, "bidirectional"),
            (pinhole_flags::CLIENT_ONLY, "client-only"),
            (pinhole_flags::NO_TARGET, "no-target"),
        ];
        Self {
            protocol: proto_name(k.protocol).into(),
            address: sa(k.addr, k.port),
            side: if k.side == side::INTERNAL {
                "internal"
            } else {
                "external"
            }
            .into(),
            target: sa(v.target_addr, v.target_port),
            flags: names
                .iter()
                .filter(|(b, _)| v.flags & b != 0)
                .map(|(_, n)| n.to_string())
                .collect(),
            snat: (v.snat_port_count > 0).then(|| {
                format!(
                    "{}:{}-{}",
                    Ipv4Addr::from(v.snat_addr),
                    v.snat_port_base,
                    v.snat_port_base as u32 + v.snat_port_count as u32 - 1
                )
            }),
            peer_filter: v.peer_filter,
            remaining: v.remaining,
            uses: v.uses,
            owner: v.owner,
            expires_in_ms: (v.deadline_ns != 0)
                .then(|| (v.deadline_ns as i64 - now_ns as i64) / 1_000_000),
        }
    }
}

/// A flow entry as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowView {
    pub protocol: String,
    pub from: String,
    pub to: String,
    /// After translation.
    pub nat_from: String,
    pub nat_to: String,
    pub packets: u64,
    pub bytes: u64,
    pub idle_ms: u64,
    pub owner: u64,
}

impl FlowView {
    pub fn new(k: &FlowKey, v: &FlowValue, now_ns: u64) -> Self {
        Self {
            protocol: proto_name(k.protocol).into(),
            from: sa(k.src_addr, k.src_port),
            to: sa(k.dst_addr, k.dst_port),
            nat_from: sa(v.nat_src_addr, v.nat_src_port),
            nat_to: sa(v.nat_dst_addr, v.nat_dst_port),
            packets: v.packets,
            bytes: v.bytes,
            idle_ms: now_ns.saturating_sub(v.last_seen_ns) / 1_000_000,
            owner: v.owner,
        }
    }
}

impl Request {
    /// Whether answering takes only a few syscalls (no whole-map reads).
    pub fn is_quick(&self) -> bool {
        !matches!(
            self,
            Request::Status | Request::List { .. } | Request::Events | Request::Shutdown
        )
    }
}

/// A blocking client (the CLI needs no runtime).
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            timeout: Duration::from_secs(30),
        }
    }

    /// How long to wait for each answer.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a daemon answers on the socket.
    pub fn is_alive(&self) -> bool {
        UnixStream::connect(&self.path).is_ok()
    }

    /// One request on a connection of its own (what the CLI does).
    pub fn call(&self, request: Request) -> Result<serde_json::Value, ApiError> {
        self.connect()?.call(request)
    }

    /// A connection for many requests, one after the other.
    pub fn connect(&self) -> Result<Connection, ApiError> {
        let stream = UnixStream::connect(&self.path).map_err(|e| not_running(&self.path, e))?;
        stream.set_read_timeout(Some(self.timeout)).ok();
        Ok(Connection {
            reader: BufReader::new(stream.try_clone().map_err(|e| not_running(&self.path, e))?),
            stream,
            path: self.path.clone(),
        })
    }
}

fn not_running(path: &Path, e: std::io::Error) -> ApiError {
    ApiError::new(
        ErrorKind::NotRunning,
        format!(
            "no firewall daemon answers on {} ({e}); start one with `firewall-ctl up`",
            path.display()
        ),
    )
}

/// An open connection to the daemon's API.
pub struct Connection {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    path: PathBuf,
}

impl Connection {
    pub fn call(&mut self, request: Request) -> Result<serde_json::Value, ApiError> {
        let mut line = serde_json::to_string(&Envelope {
            v: API_VERSION,
            request,
        })
        .expect("requests serialize");
        line.push('\n');
        self.stream
            .write_all(line.as_bytes())
            .map_err(|e| not_running(&self.path, e))?;
        let mut reply = String::new();
        self.reader
            .read_line(&mut reply)
            .map_err(|e| not_running(&self.path, e))?;
        if reply.is_empty() {
            return Err(ApiError::new(
                ErrorKind::Internal,
                "the daemon closed the connection without answering",
            ));
        }
        match serde_json::from_str::<Response>(&reply) {
            Ok(Response::Ok(v)) => Ok(v),
            Ok(Response::Error(e)) => Err(e),
            Err(e) => Err(ApiError::new(
                ErrorKind::Internal,
                format!("unreadable reply from the daemon: {e}"),
            )),
        }
    }
}

impl Client {
    /// Sends `Events` and calls `each` for every event line until it returns
    /// false or the daemon goes away.
    pub fn follow(&self, mut each: impl FnMut(serde_json::Value) -> bool) -> Result<(), ApiError> {
        let not_running = |e: std::io::Error| {
            ApiError::new(
                ErrorKind::NotRunning,
                format!(
                    "no firewall daemon answers on {} ({e})",
                    self.path.display()
                ),
            )
        };
        let mut stream = UnixStream::connect(&self.path).map_err(not_running)?;
        let mut line = serde_json::to_string(&Envelope {
            v: API_VERSION,
            request: Request::Events,
        })
        .expect("requests serialize");
        line.push('\n');
        stream.write_all(line.as_bytes()).map_err(not_running)?;
        let reader = BufReader::new(stream);
        let mut lines = reader.lines();
        match lines.next() {
            Some(Ok(first)) => match serde_json::from_str::<Response>(&first) {
                Ok(Response::Ok(_)) => {}
                Ok(Response::Error(e)) => return Err(e),
                Err(e) => {
                    return Err(ApiError::new(
                        ErrorKind::Internal,
                        format!("unreadable reply: {e}"),
                    ))
                }
            },
            _ => {
                return Err(ApiError::new(
                    ErrorKind::Internal,
                    "the daemon closed the event stream",
                ))
            }
        }
        for l in lines {
            let Ok(l) = l else { break };
            match serde_json::from_str(&l) {
                Ok(v) => {
                    if !each(v) {
                        break;
                    }
                }
                Err(e) => {
                    return Err(ApiError::new(
                        ErrorKind::Internal,
                        format!("unreadable event: {e}"),
                    ))
                }
            }
        }
        Ok(())
    }
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
        let r = Response::Error(ApiError::new(ErrorKind::InvalidArgument, "x"));
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
