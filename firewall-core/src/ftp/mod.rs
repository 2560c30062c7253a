//! The built-in FTP filter: the control connection's commands and replies,
//! and the secondary connections they negotiate.
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
//! - A published FTP server (`Control::published`) mirrors both: the client
//!   is outside, the server inside, and the firewall is a full proxy (the
//!   server sees the firewall's internal address, ISA's proxy-mode
//!   publishing). `227`/`229` from the server become a BindForClient for the
//!   server's data port with PROXY_MODE, rewritten to the external address
//!   and port; `PORT`/`EPRT` from the client become a RedirectConnections to
//!   the client's data port, rewritten to the firewall's internal address
//!   (`openings.rs`).
//! - Anti-bounce: a PORT/EPRT naming another address than the client's own,
//!   or a port below 1024, is answered with a 5xx reply and never forwarded;
//!   a 227/229 naming another address than the server's is refused.
//!
//! Sans-IO: bytes in, bytes out for each side, so every case is unit-tested;
//! the interception module owns the sockets. Lines are parsed however TCP
//! splits them and forwarded as every receiver will read them (`lines`):
//! Telnet commands removed, ambiguous and over-long lines refused, replies
//! with their multi-line structure kept unambiguous.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
};

use serde::Serialize;

use crate::{
    engine::{BindRequest, BindResult, RedirectRequest, RedirectResult},
    error::ApiError,
    flags::ConnFlags,
};

mod handover;
mod lines;
mod openings;
mod syntax;

pub use handover::ControlState;
pub use lines::MAX_LINE;
use lines::{Lines, Piece, Replies, Reply};
pub use openings::Opening;
use syntax::{host_port, parse_eprt, parse_epsv, parse_host_port, parse_pasv, Eprt};

/// What a connection forwarded in place sends the server for a command the
/// filter refused: a verb no server implements, which it answers with an
/// error (500); the client reads that error as the answer to its command.
pub const REFUSED_COMMAND: &[u8] = b"XFWREFUSED\r\n";

/// The protocol name of FTP's connections (its rule in `[[protocols]]`).
pub const PROTOCOL: &str = "ftp";

/// What the FTP filter needs from the firewall.
pub trait Secondaries: Send + Sync {
    /// The SecureNAT session of `client` (opened if needed).
    fn session(&self, client: Ipv4Addr) -> Result<u64, ApiError>;
    fn bind_for_client(&self, req: &BindRequest) -> Result<BindResult, ApiError>;
    fn redirect_connections(&self, req: &RedirectRequest) -> Result<RedirectResult, ApiError>;
    /// RedirectConnections taken at `internal_port` of the internal address
    /// (making again an opening a previous daemon announced).
    fn redirect_connections_at(
        &self,
        req: &RedirectRequest,
        internal_port: u16,
    ) -> Result<RedirectResult, ApiError>;
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
    /// Control connections whose plain lines the kernel forwards now.
    pub kernel_line_connections: AtomicU64,
    /// Control connections left with the daemon for want of a kernel slot.
    pub kernel_slots_exhausted: AtomicU64,
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
    /// Lines the kernel forwarded from one of the proxy's sockets to the
    /// other, and their bytes (filled in from the datapath's counters).
    #[serde(default)]
    pub kernel_lines: u64,
    #[serde(default)]
    pub kernel_line_bytes: u64,
    /// Control connections whose plain lines the kernel forwards now.
    #[serde(default)]
    pub kernel_line_connections: u64,
    /// Control connections whose every line went through the daemon because
    /// all of the kernel's slots were taken.
    #[serde(default)]
    pub kernel_slots_exhausted: u64,
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
            kernel_lines: 0,
            kernel_line_bytes: 0,
            kernel_line_connections: self.kernel_line_connections.load(Relaxed),
            kernel_slots_exhausted: self.kernel_slots_exhausted.load(Relaxed),
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
    /// A published server's: the client outside, the server inside.
    published: bool,
    /// Forwarded in place (the connection is not terminated): a refused
    /// command goes on as `REFUSED_COMMAND`, which the server answers with
    /// an error, instead of a reply the filter would put in the server's
    /// stream.
    in_place: bool,
    from_client: Lines,
    from_server: Lines,
    replies: Replies,
    /// Dropping a multi-line passive reply (refused at its last line).
    dropping_reply: bool,
    /// Data connections opened for this control connection (the unused
    /// ones end with it).
    opened: Vec<Opening>,
    /// What it did, for the line logged at its end.
    tally: Tally,
}

/// What one control connection did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Tally {
    active: u32,
    passive: u32,
    refused: u32,
    failed: u32,
}

impl Control {
    /// The client, as it connected.
    pub fn client(&self) -> SocketAddrV4 {
        self.client
    }

    /// The server, as the client dialled it.
    pub fn server(&self) -> SocketAddrV4 {
        self.server
    }

    pub fn new(
        api: Arc<dyn Secondaries>,
        stats: Arc<FtpStats>,
        client: SocketAddrV4,
        server: SocketAddrV4,
        external: Ipv4Addr,
        extra_flags: ConnFlags,
    ) -> Result<Self, ApiError> {
        Self::with_role(api, stats, (client, server), external, extra_flags, false)
    }

    /// An outbound control connection forwarded in place: the datapath
    /// forwards its plain lines and hands the others here, one direction's
    /// bytes at a time (`firewall_core::in_place`). Commands and replies
    /// each come out in their own direction only.
    pub fn in_place(
        api: Arc<dyn Secondaries>,
        stats: Arc<FtpStats>,
        client: SocketAddrV4,
        server: SocketAddrV4,
        external: Ipv4Addr,
        extra_flags: ConnFlags,
    ) -> Result<Self, ApiError> {
        let mut c = Self::new(api, stats, client, server, external, extra_flags)?;
        c.in_place = true;
        Ok(c)
    }

    /// A control connection to a published server: `client` outside,
    /// `server` the internal server (as the firewall connects to it).
    pub fn published(
        api: Arc<dyn Secondaries>,
        stats: Arc<FtpStats>,
        client: SocketAddrV4,
        server: SocketAddrV4,
        external: Ipv4Addr,
        extra_flags: ConnFlags,
    ) -> Result<Self, ApiError> {
        Self::with_role(api, stats, (client, server), external, extra_flags, true)
    }

    fn with_role(
        api: Arc<dyn Secondaries>,
        stats: Arc<FtpStats>,
        (client, server): (SocketAddrV4, SocketAddrV4),
        external: Ipv4Addr,
        extra_flags: ConnFlags,
        published: bool,
    ) -> Result<Self, ApiError> {
        let session = api.session(*session_host(published, &client, &server))?;
        stats.control_connections.fetch_add(1, Relaxed);
        Ok(Self {
            api,
            stats,
            session,
            client,
            server,
            external,
            extra_flags,
            published,
            in_place: false,
            from_client: Lines::default(),
            from_server: Lines::default(),
            replies: Replies::default(),
            dropping_reply: false,
            opened: Vec::new(),
            tally: Tally::default(),
        })
    }

    /// Bytes from the client.
    pub fn client_data(&mut self, data: &[u8], out: &mut Output) {
        self.from_client.feed(data);
        while let Some(piece) = self.from_client.next() {
            match piece {
                Piece::Line(line) => match lines::command(&line) {
                    Ok(cmd) => self.client_command(cmd, out),
                    Err(reply) => self.refuse("a command", None, reply, out),
                },
                Piece::TooLong => self.refuse("a command", None, "500 Command line too long.", out),
            }
        }
    }

    /// Bytes from the server.
    pub fn server_data(&mut self, data: &[u8], out: &mut Output) {
        self.from_server.feed(data);
        while let Some(piece) = self.from_server.next() {
            match piece {
                Piece::Line(line) => {
                    let reply = self.replies.read(&line);
                    self.server_reply(reply, out)
                }
                Piece::TooLong => self.refuse_reply("an overlong reply line", out),
            }
        }
    }

    /// Bytes held for unfinished lines (bounded: a line longer than
    /// MAX_LINE is dropped as it arrives).
    pub fn buffered(&self) -> usize {
        self.from_client.pending() + self.from_server.pending()
    }

    /// Bytes held for an unfinished line of the client's commands
    /// (`commands`) or of the server's replies.
    pub fn held(&self, commands: bool) -> usize {
        if commands {
            self.from_client.pending()
        } else {
            self.from_server.pending()
        }
    }

    /// Whether the filter is between two lines of the client's commands
    /// (`commands`) or of the server's replies, with nothing held and no
    /// multi-line reply open: where a line the kernel forwards byte for
    /// byte (`firewall_common::ftp_lines::plain`) would leave it as it is.
    pub fn at_line_boundary(&self, commands: bool) -> bool {
        if commands {
            self.from_client.idle()
        } else {
            self.from_server.idle() && self.replies.idle() && !self.dropping_reply
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
            let ids: Vec<u64> = self.opened.drain(..).map(|o| o.id()).collect();
            self.api.withdraw_unused(&ids);
        }
    }

    fn client_command(&mut self, cmd: lines::Command, out: &mut Output) {
        let verb = cmd.verb.as_str();
        let arg = cmd.arg.trim_ascii();
        match verb {
            "PORT" => match parse_host_port(arg) {
                Some(a) => self.active(verb, a, out),
                None => self.refuse(verb, None, "501 Syntax error in PORT parameters.", out),
            },
            "EPRT" => match parse_eprt(arg) {
                Some(Eprt::V4(a)) => self.active(verb, a, out),
                Some(Eprt::Family(f)) => self.refuse(
                    verb,
                    None,
                    &format!(
                        "522 Network protocol {f} not supported through this firewall, use (1)"
                    ),
                    out,
                ),
                None => self.refuse(verb, None, "501 Syntax error in EPRT parameters.", out),
            },
            // RFC 1639's long forms carry addresses this filter does not
            // translate: the client falls back to the RFC 959/2428 ones.
            "LPRT" => self.refuse(
                verb,
                None,
                "502 LPRT is not supported through this firewall, use PORT or EPRT.",
                out,
            ),
            "LPSV" => self.refuse(
                verb,
                None,
                "502 LPSV is not supported through this firewall, use PASV or EPSV.",
                out,
            ),
            "ABOR" => {
                // Clients send ABOR as urgent data (RFC 959 4.1.3) so that
                // a busy server reads it; we read urgent data in line, so
                // the urgency is sent afresh, on the line's last byte (as
                // ftplib does).
                out.to_server.extend_from_slice(&cmd.text);
                out.urgent_at = Some(out.to_server.len() - 1);
            }
            _ => out.to_server.extend_from_slice(&cmd.text),
        }
    }

    fn server_reply(&mut self, reply: Reply, out: &mut Output) {
        let passive = |c: u16| matches!(c, 227..=229);
        match reply {
            Reply::Opens(c, _) if passive(c) => self.dropping_reply = true,
            Reply::Text(_) if self.dropping_reply => {}
            Reply::Final(_, _) if self.dropping_reply => {
                self.dropping_reply = false;
                self.refuse_reply("a multi-line passive reply", out);
            }
            Reply::Final(227, text) => match parse_pasv(&text) {
                Some(a) => self.passive(false, a, out),
                None => self.refuse_reply("an unreadable 227 reply", out),
            },
            Reply::Final(229, text) => match parse_epsv(&text) {
                Some(port) => self.passive(true, SocketAddrV4::new(*self.server.ip(), port), out),
                None => self.refuse_reply("an unreadable 229 reply", out),
            },
            // The answer to LPSV, which clients are refused.
            Reply::Final(228, _) => self.refuse_reply("a 228 (LPSV) reply", out),
            Reply::Final(_, text) | Reply::Opens(_, text) | Reply::Text(text) => {
                out.to_client.extend_from_slice(&text);
                out.to_client.extend_from_slice(b"\r\n");
            }
            Reply::Garbage => {
                log::debug!(
                    "ftp {} → {}: dropped a server line that is no reply",
                    self.client,
                    self.server
                );
            }
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
        self.refused_command(reply, out);
    }

    /// The answer to a command the filter does not forward: `reply` to the
    /// client, or in place, a command the server refuses in its stead (the
    /// replies stay the server's, in order).
    pub(super) fn refused_command(&mut self, reply: &str, out: &mut Output) {
        if self.in_place {
            out.to_server.extend_from_slice(REFUSED_COMMAND);
        } else {
            out.to_client.extend_from_slice(reply.as_bytes());
            if !reply.ends_with('\n') {
                out.to_client.extend_from_slice(b"\r\n");
            }
        }
    }

    fn refuse_reply(&mut self, what: &str, out: &mut Output) {
        self.tally.refused += 1;
        self.stats.commands_refused.fetch_add(1, Relaxed);
        log::warn!("ftp {} → {}: refused {what}", self.client, self.server);
        out.to_client
            .extend_from_slice(format!("500 Firewall refused {what}.\r\n").as_bytes());
    }

    /// A data connection was opened. One at a time per control connection
    /// (RFC 959): a new PORT or passive reply makes the unused earlier
    /// pinholes void.
    fn track_opening(&mut self, opening: Opening) {
        self.finish();
        self.opened.push(opening);
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
        self.open_active(verb, a, out);
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
        self.open_passive(extended, a, out);
    }
}

/// The internal host whose SecureNAT session the secondary connections
/// belong to (ISA's "client"): the FTP client, or a published server.
fn session_host<'a>(
    published: bool,
    client: &'a SocketAddrV4,
    server: &'a SocketAddrV4,
) -> &'a Ipv4Addr {
    if published {
        server.ip()
    } else {
        client.ip()
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod tests_kernel_lines;
#[cfg(test)]
mod tests_published;
