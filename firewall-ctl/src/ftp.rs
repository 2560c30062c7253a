//! The built-in FTP filter: the control connection's commands and replies,
//! and the secondary connections they negotiate (spec §12).
//!
//! - `PORT`/`EPRT` from the client: BindForClient for the client's own
//!   address (single use, TIMEOUT, IP filter = the server), and the command
//!   rewritten to the firewall's external address and port.
//! - `227`/`229` from the server: RedirectConnections to the server's data
//!   address from the control connection's external address, and the reply
//!   rewritten to the address and port where the firewall takes the data
//!   connection (229: the port only). That address is the server's own, which
//!   the firewall answers for transparently, as it does for the control
//!   connection: EPSV carries no address, and curl ignores 227's.
//! - Anti-bounce: a PORT/EPRT naming another address than the client's own,
//!   or a port below 1024, is answered with a 5xx reply and never forwarded;
//!   a 227/229 naming another address than the server's is refused.
//!
//! Sans-IO: bytes in, bytes out for each side, so every case is unit-tested;
//! the interception module owns the sockets. Lines are parsed however TCP
//! splits them; unknown commands and replies pass unchanged, long lines too
//! (except the four this filter must understand, which are refused).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
};

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::{
    api::ApiError,
    engine::{BindRequest, BindResult, RedirectRequest, RedirectResult},
    flags::ConnFlags,
    policy::{IpFilter, Transport},
};

/// Longest command or reply line parsed (vsftpd's own limit).
pub const MAX_LINE: usize = 4096;

/// The protocol name of FTP's connections (its rule in `[[protocols]]`).
pub const PROTOCOL: &str = "ftp";

/// What the FTP filter needs from the firewall.
pub trait Secondaries: Send + Sync {
    /// The SecureNAT session of `client` (opened if needed).
    fn session(&self, client: Ipv4Addr) -> Result<u64, ApiError>;
    fn bind_for_client(&self, req: &BindRequest) -> Result<BindResult, ApiError>;
    fn redirect_connections(&self, req: &RedirectRequest) -> Result<RedirectResult, ApiError>;
    /// Ends those of `ids` that are still waiting for their connection;
    /// established ones go on.
    fn withdraw_unused(&self, ids: &[u64]);
}

/// Counters of the FTP filter (in `firewall-ctl status`).
#[derive(Debug, Default)]
pub struct FtpStats {
    pub control_connections: AtomicU64,
    pub active_opened: AtomicU64,
    pub passive_opened: AtomicU64,
    pub bounces_refused: AtomicU64,
    pub commands_refused: AtomicU64,
    pub failed_calls: AtomicU64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FtpStatsView {
    /// Control connections intercepted.
    pub control_connections: u64,
    /// PORT/EPRT rewritten (BindForClient).
    pub active_opened: u64,
    /// 227/229 rewritten (RedirectConnections).
    pub passive_opened: u64,
    /// PORT/EPRT/227/229 naming a third address (FTP bounce), refused.
    pub bounces_refused: u64,
    /// Other refusals: bad syntax, low ports, IPv6, overlong lines.
    pub commands_refused: u64,
    /// BindForClient/RedirectConnections that failed (answered 425).
    pub failed_calls: u64,
}

impl FtpStats {
    pub fn view(&self) -> FtpStatsView {
        FtpStatsView {
            control_connections: self.control_connections.load(Relaxed),
            active_opened: self.active_opened.load(Relaxed),
            passive_opened: self.passive_opened.load(Relaxed),
            bounces_refused: self.bounces_refused.load(Relaxed),
            commands_refused: self.commands_refused.load(Relaxed),
            failed_calls: self.failed_calls.load(Relaxed),
        }
    }
}

/// Bytes to send on after feeding one side.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Output {
    pub to_server: Vec<u8>,
    pub to_client: Vec<u8>,
    /// The byte of `to_server` at this index goes as TCP urgent data (an
    /// ABOR, which makes a busy server read its control connection).
    pub urgent_at: Option<usize>,
}

/// A piece of a line-oriented stream.
#[derive(Debug, PartialEq, Eq)]
enum Piece {
    /// A whole line with its terminator.
    Line(Vec<u8>),
    /// The first MAX_LINE bytes of a longer line.
    LongStart(Vec<u8>),
    /// More of a long line; `true` when it includes the line's end.
    LongMore(Vec<u8>, bool),
}

/// Splits a stream into lines, however the bytes arrive.
#[derive(Default)]
struct Lines {
    buf: Vec<u8>,
    /// Inside a line longer than MAX_LINE.
    in_long: bool,
}

impl Lines {
    fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    fn next(&mut self) -> Option<Piece> {
        let eol = self.buf.iter().position(|b| *b == b'\n');
        if self.in_long {
            let end = eol.map_or(self.buf.len(), |i| i + 1);
            if end == 0 {
                return None;
            }
            let part: Vec<u8> = self.buf.drain(..end).collect();
            self.in_long = eol.is_none();
            return Some(Piece::LongMore(part, eol.is_some()));
        }
        match eol {
            Some(i) if i < MAX_LINE => Some(Piece::Line(self.buf.drain(..=i).collect())),
            _ if self.buf.len() >= MAX_LINE => {
                self.in_long = true;
                Some(Piece::LongStart(self.buf.drain(..MAX_LINE).collect()))
            }
            _ => None,
        }
    }
}

/// The command verb (upper case) and its argument, past any Telnet
/// commands in front (IAC IP, IAC DM before ABOR).
fn command(line: &[u8]) -> (String, &[u8]) {
    let mut rest = line;
    while rest.first() == Some(&0xff) {
        let skip = match rest.get(1) {
            Some(0xfb..=0xfe) => 3,
            _ => 2,
        };
        rest = rest.get(skip..).unwrap_or(&[]);
    }
    let end = rest
        .iter()
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(rest.len());
    let verb = String::from_utf8_lossy(&rest[..end]).to_ascii_uppercase();
    let arg = rest[end..].strip_prefix(b" ").unwrap_or(&rest[end..]);
    (verb, trim_eol(arg))
}

fn trim_eol(b: &[u8]) -> &[u8] {
    let b = b.strip_suffix(b"\n").unwrap_or(b);
    b.strip_suffix(b"\r").unwrap_or(b)
}

/// The reply code of a final reply line ("227 ..."), if it is one.
fn reply_code(line: &[u8]) -> Option<u16> {
    let code = line.get(..3)?;
    if !code.iter().all(u8::is_ascii_digit) || line.get(3) != Some(&b' ') {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// "h1,h2,h3,h4,p1,p2" (PORT's argument, and the numbers in a 227 reply).
fn parse_host_port(s: &[u8]) -> Option<SocketAddrV4> {
    let text = std::str::from_utf8(s).ok()?;
    let mut n = [0u8; 6];
    let mut parts = text.split(',');
    for v in n.iter_mut() {
        *v = parts.next()?.trim().parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(SocketAddrV4::new(
        Ipv4Addr::new(n[0], n[1], n[2], n[3]),
        u16::from_be_bytes([n[4], n[5]]),
    ))
}

fn host_port(a: SocketAddrV4) -> String {
    let o = a.ip().octets();
    let p = a.port().to_be_bytes();
    format!("{},{},{},{},{},{}", o[0], o[1], o[2], o[3], p[0], p[1])
}

/// EPRT's argument: `<d>af<d>address<d>port<d>`.
enum Eprt {
    V4(SocketAddrV4),
    /// Another address family (IPv6: 2).
    Family(String),
}

fn parse_eprt(s: &[u8]) -> Option<Eprt> {
    let text = std::str::from_utf8(s).ok()?;
    let d = text.chars().next().filter(|c| ('!'..='~').contains(c))?;
    let fields: Vec<&str> = text.split(d).collect();
    // "", af, address, port, ""
    if fields.len() != 5 || !fields[0].is_empty() || !fields[4].is_empty() {
        return None;
    }
    if fields[1] != "1" {
        return Some(Eprt::Family(fields[1].to_string()));
    }
    let ip: Ipv4Addr = fields[2].parse().ok()?;
    let port: u16 = fields[3].parse().ok()?;
    Some(Eprt::V4(SocketAddrV4::new(ip, port)))
}

/// The port of a 229 reply: `(<d><d><d>port<d>)`.
fn parse_epsv(line: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(line).ok()?;
    let open = text.find('(')?;
    let inner = &text[open + 1..text[open..].find(')')? + open];
    let d = inner.chars().next()?;
    let fields: Vec<&str> = inner.split(d).collect();
    if fields.len() != 5 || fields[..3].iter().any(|f| !f.is_empty()) || !fields[4].is_empty() {
        return None;
    }
    fields[3].parse().ok()
}

/// The address and port of a 227 reply: the six numbers after the code
/// (in parentheses or not, RFC 1123 4.1.2.6).
fn parse_pasv(line: &[u8]) -> Option<SocketAddrV4> {
    let body = line.get(4..)?;
    let start = body.iter().position(u8::is_ascii_digit)?;
    let end = body[start..]
        .iter()
        .position(|b| !(b.is_ascii_digit() || *b == b',' || *b == b' '))
        .map_or(body.len(), |i| start + i);
    parse_host_port(&body[start..end])
}

/// One intercepted FTP control connection.
pub struct Control {
    api: Arc<dyn Secondaries>,
    stats: Arc<FtpStats>,
    session: u64,
    /// The client, as it connected.
    client: SocketAddrV4,
    /// The server, as the client dialled it.
    server: SocketAddrV4,
    /// The external address the control connection leaves from.
    external: Ipv4Addr,
    /// Added to every call's flags (no-kernel-mode when so configured).
    extra_flags: ConnFlags,
    from_client: Lines,
    from_server: Lines,
    /// The verb of a long client line being dropped (refused when it ends).
    dropping_client: Option<String>,
    /// A long server reply being dropped (refused when it ends).
    dropping_server: bool,
    /// Pinholes made for this control connection.
    opened: Vec<u64>,
    /// What it did, for the line logged at its end.
    tally: Tally,
}

/// What one control connection did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    active: u32,
    passive: u32,
    refused: u32,
    failed: u32,
}

impl Control {
    pub fn new(
        api: Arc<dyn Secondaries>,
        stats: Arc<FtpStats>,
        client: SocketAddrV4,
        server: SocketAddrV4,
        external: Ipv4Addr,
        extra_flags: ConnFlags,
    ) -> Result<Self, ApiError> {
        let session = api.session(*client.ip())?;
        stats.control_connections.fetch_add(1, Relaxed);
        Ok(Self {
            api,
            stats,
            session,
            client,
            server,
            external,
            extra_flags,
            from_client: Lines::default(),
            from_server: Lines::default(),
            dropping_client: None,
            dropping_server: false,
            opened: Vec::new(),
            tally: Tally::default(),
        })
    }

    /// Bytes from the client.
    pub fn client_data(&mut self, data: &[u8], out: &mut Output) {
        self.from_client.feed(data);
        while let Some(piece) = self.from_client.next() {
            match piece {
                Piece::Line(line) => self.client_line(&line, out),
                Piece::LongStart(start) => {
                    let (verb, _) = command(&start);
                    if matches!(verb.as_str(), "PORT" | "EPRT") {
                        self.dropping_client = Some(verb);
                    } else {
                        out.to_server.extend_from_slice(&start);
                    }
                }
                Piece::LongMore(more, ended) => match &self.dropping_client {
                    Some(verb) if ended => {
                        let verb = verb.clone();
                        self.dropping_client = None;
                        self.refuse(&verb, None, "500 Command line too long.", out);
                    }
                    Some(_) => {}
                    None => out.to_server.extend_from_slice(&more),
                },
            }
        }
    }

    /// Bytes from the server.
    pub fn server_data(&mut self, data: &[u8], out: &mut Output) {
        self.from_server.feed(data);
        while let Some(piece) = self.from_server.next() {
            match piece {
                Piece::Line(line) => self.server_line(&line, out),
                Piece::LongStart(start) => {
                    if matches!(reply_code(&start), Some(227 | 229)) {
                        self.dropping_server = true;
                    } else {
                        out.to_client.extend_from_slice(&start);
                    }
                }
                Piece::LongMore(more, ended) => {
                    if !self.dropping_server {
                        out.to_client.extend_from_slice(&more);
                    } else if ended {
                        self.dropping_server = false;
                        self.stats.commands_refused.fetch_add(1, Relaxed);
                        log::warn!(
                            "ftp {} → {}: refused an overlong passive reply",
                            self.client,
                            self.server
                        );
                        out.to_client.extend_from_slice(
                            b"500 Firewall refused an overlong passive reply.\r\n",
                        );
                    }
                }
            }
        }
    }

    /// What the connection did, in a few words (for its log line).
    pub fn summary(&self) -> String {
        let t = self.tally;
        format!(
            "{} active and {} passive data connections opened, {} commands or replies refused, {} openings failed",
            t.active, t.passive, t.refused, t.failed
        )
    }

    /// The control connection ended: its pinholes that were not used go.
    pub fn finish(&mut self) {
        if !self.opened.is_empty() {
            self.api.withdraw_unused(&self.opened);
            self.opened.clear();
        }
    }

    fn client_line(&mut self, line: &[u8], out: &mut Output) {
        let (verb, arg) = command(line);
        match verb.as_str() {
            "PORT" => match parse_host_port(arg) {
                Some(a) => self.active(&verb, a, out),
                None => self.refuse(&verb, None, "501 Syntax error in PORT parameters.", out),
            },
            "EPRT" => match parse_eprt(arg) {
                Some(Eprt::V4(a)) => self.active(&verb, a, out),
                Some(Eprt::Family(f)) => self.refuse(
                    &verb,
                    None,
                    &format!(
                        "522 Network protocol {f} not supported through this firewall, use (1)"
                    ),
                    out,
                ),
                None => self.refuse(&verb, None, "501 Syntax error in EPRT parameters.", out),
            },
            "ABOR" => {
                // Clients send ABOR as urgent data (RFC 959 4.1.3) so that
                // a busy server reads it; we read urgent data in line, so
                // the urgency is sent afresh, on the line's last byte (as
                // ftplib does).
                out.to_server.extend_from_slice(line);
                out.urgent_at = Some(out.to_server.len() - 1);
            }
            _ => out.to_server.extend_from_slice(line),
        }
    }

    fn server_line(&mut self, line: &[u8], out: &mut Output) {
        match reply_code(line) {
            Some(227) => match parse_pasv(line) {
                Some(a) => self.passive(false, a, out),
                None => self.refuse_reply("an unreadable 227 reply", out),
            },
            Some(229) => match parse_epsv(line) {
                Some(port) => self.passive(true, SocketAddrV4::new(*self.server.ip(), port), out),
                None => self.refuse_reply("an unreadable 229 reply", out),
            },
            _ => out.to_client.extend_from_slice(line),
        }
    }

    /// Answers the client instead of forwarding its command.
    fn refuse(&mut self, verb: &str, bounce: Option<SocketAddrV4>, reply: &str, out: &mut Output) {
        self.tally.refused += 1;
        if bounce.is_some() {
            self.stats.bounces_refused.fetch_add(1, Relaxed);
        } else {
            self.stats.commands_refused.fetch_add(1, Relaxed);
        }
        log::warn!(
            "ftp {} → {}: refused {verb}{}: {reply}",
            self.client,
            self.server,
            bounce.map(|a| format!(" naming {a}")).unwrap_or_default()
        );
        out.to_client.extend_from_slice(reply.as_bytes());
        out.to_client.extend_from_slice(b"\r\n");
    }

    fn refuse_reply(&mut self, what: &str, out: &mut Output) {
        self.tally.refused += 1;
        self.stats.commands_refused.fetch_add(1, Relaxed);
        log::warn!("ftp {} → {}: refused {what}", self.client, self.server);
        out.to_client
            .extend_from_slice(format!("500 Firewall refused {what}.\r\n").as_bytes());
    }

    /// One data connection at a time per control connection (RFC 959): a
    /// new PORT or passive reply makes the unused earlier pinholes void.
    fn replace_unused(&mut self, id: u64) {
        self.finish();
        self.opened.push(id);
    }

    /// PORT/EPRT: the server will connect to the client at `a`.
    fn active(&mut self, verb: &str, a: SocketAddrV4, out: &mut Output) {
        if a.ip() != self.client.ip() {
            let reply = format!(
                "500 Illegal {verb} command: the firewall allows only your own address ({}).",
                self.client.ip()
            );
            return self.refuse(verb, Some(a), &reply, out);
        }
        if a.port() < 1024 {
            let reply = format!(
                "500 Illegal {verb} command: port {} is below 1024.",
                a.port()
            );
            return self.refuse(verb, None, &reply, out);
        }
        let req = BindRequest {
            session: self.session,
            clients: vec![a],
            proxy: Some(SocketAddrV4::new(self.external, 0)),
            protocol: Transport::Tcp,
            flags: ConnFlags::TIMEOUT | self.extra_flags,
            backlog: Some(1),
            protocol_name: PROTOCOL.into(),
            ip_filter: Some(IpFilter {
                include: vec![Ipv4Net::from(*self.server.ip())],
                exclude: Vec::new(),
            }),
            notify: false,
            context: None,
        };
        match self.api.bind_for_client(&req) {
            Ok(r) => {
                self.replace_unused(r.connections[0].id);
                self.stats.active_opened.fetch_add(1, Relaxed);
                self.tally.active += 1;
                let p = r.proxy_address;
                log::debug!(
                    "ftp {} → {}: {verb} {a} opened as {p}",
                    self.client,
                    self.server
                );
                let cmd = if verb == "PORT" {
                    format!("PORT {}\r\n", host_port(p))
                } else {
                    format!("EPRT |1|{}|{}|\r\n", p.ip(), p.port())
                };
                out.to_server.extend_from_slice(cmd.as_bytes());
            }
            Err(e) => self.call_failed("data connection", &e, out),
        }
    }

    /// 227/229: the client will connect to the server at `a`.
    fn passive(&mut self, extended: bool, a: SocketAddrV4, out: &mut Output) {
        if a.ip() != self.server.ip() {
            self.tally.refused += 1;
            self.stats.bounces_refused.fetch_add(1, Relaxed);
            log::warn!(
                "ftp {} → {}: refused a passive reply naming {a}",
                self.client,
                self.server
            );
            let reply = format!(
                "500 Firewall refused the passive address {}: not the server's.\r\n",
                a.ip()
            );
            out.to_client.extend_from_slice(reply.as_bytes());
            return;
        }
        if a.port() == 0 {
            return self.refuse_reply("a passive reply with port 0", out);
        }
        let req = RedirectRequest {
            session: self.session,
            connects: vec![a],
            proxy_external: Some(SocketAddrV4::new(self.external, 0)),
            // The client believes it talks to the server: the firewall
            // answers at the server's address. EPSV names no address, and
            // curl ignores 227's by default (--ftp-skip-pasv-ip), so any
            // other address would not be dialled.
            internal: Some(*self.server.ip()),
            protocol: Transport::Tcp,
            flags: ConnFlags::TIMEOUT | self.extra_flags,
            protocol_name: PROTOCOL.into(),
            notify: false,
            context: None,
        };
        match self.api.redirect_connections(&req) {
            Ok(r) => {
                self.replace_unused(r.actions[0].id);
                self.stats.passive_opened.fetch_add(1, Relaxed);
                self.tally.passive += 1;
                let i = r.internal_address;
                log::debug!(
                    "ftp {} → {}: passive {a} opened as {i}",
                    self.client,
                    self.server
                );
                let reply = if extended {
                    format!("229 Entering Extended Passive Mode (|||{}|)\r\n", i.port())
                } else {
                    format!("227 Entering Passive Mode ({}).\r\n", host_port(i))
                };
                out.to_client.extend_from_slice(reply.as_bytes());
            }
            Err(e) => self.call_failed("passive connection", &e, out),
        }
    }

    fn call_failed(&mut self, what: &str, e: &ApiError, out: &mut Output) {
        self.tally.failed += 1;
        self.stats.failed_calls.fetch_add(1, Relaxed);
        log::warn!(
            "ftp {} → {}: cannot open the {what}: {e}",
            self.client,
            self.server
        );
        let reply = format!("425 Can't open {what}: {}.\r\n", e.message);
        out.to_client.extend_from_slice(reply.as_bytes());
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests;
