//! The data connections a control connection opens, in either role.
//!
//! Which call an opening takes depends on which side is inside. For an
//! internal client (the usual case) its PORT is a BindForClient and the
//! server's passive reply a RedirectConnections. In front of a published
//! server (the client outside, the server inside, the firewall a full proxy
//! the server sees as its client) it is the mirror image: the server's
//! passive port is bound on the external address with PROXY_MODE (the data
//! connection reaches the server from the firewall's internal address, as
//! the control connection does, which servers check), and the client's
//! active port is reached through the firewall's internal address.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::Ordering::Relaxed;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::{host_port, Control, Output, PROTOCOL};
use crate::{
    engine::{BindRequest, RedirectRequest},
    error::ApiError,
    flags::ConnFlags,
    policy::{IpFilter, Transport},
};

impl Control {
    /// PORT/EPRT naming the client's own data endpoint `a` (checked): the
    /// command goes on naming where the server is to connect instead.
    pub(super) fn open_active(&mut self, verb: &str, a: SocketAddrV4, out: &mut Output) {
        let call = if self.published {
            Call::Redirect { a, internal: None }
        } else {
            Call::Bind {
                a,
                peer: *self.server.ip(),
                flags: ConnFlags::empty(),
            }
        };
        match self.open(call, None) {
            Ok(opening) => {
                let to = opening.at;
                self.track_opening(opening);
                self.stats.active_opened.fetch_add(1, Relaxed);
                self.tally.active += 1;
                log::debug!(
                    "ftp {} → {}: {verb} {a} opened as {to}",
                    self.client,
                    self.server
                );
                let cmd = if verb == "PORT" {
                    format!("PORT {}\r\n", host_port(to))
                } else {
                    format!("EPRT |1|{}|{}|\r\n", to.ip(), to.port())
                };
                out.to_server.extend_from_slice(cmd.as_bytes());
            }
            Err(e) => {
                let reply = self.call_failed("data connection", &e);
                self.refused_command(&reply, out);
            }
        }
    }

    /// 227/229 naming the server's own data endpoint `a` (checked): the
    /// reply goes on naming where the client is to connect instead (229:
    /// its port only).
    pub(super) fn open_passive(&mut self, extended: bool, a: SocketAddrV4, out: &mut Output) {
        let call = if self.published {
            Call::Bind {
                a,
                peer: *self.client.ip(),
                flags: ConnFlags::PROXY_MODE,
            }
        } else {
            // The client believes it talks to the server: the firewall
            // answers at the server's address. EPSV names no address, and
            // curl ignores 227's by default (--ftp-skip-pasv-ip), so any
            // other address would not be dialled.
            Call::Redirect {
                a,
                internal: Some(*self.server.ip()),
            }
        };
        match self.open(call, None) {
            Ok(opening) => {
                let to = opening.at;
                self.track_opening(opening);
                self.stats.passive_opened.fetch_add(1, Relaxed);
                self.tally.passive += 1;
                log::debug!(
                    "ftp {} → {}: passive {a} opened as {to}",
                    self.client,
                    self.server
                );
                let reply = if extended {
                    format!("229 Entering Extended Passive Mode (|||{}|)\r\n", to.port())
                } else {
                    format!("227 Entering Passive Mode ({}).\r\n", host_port(to))
                };
                out.to_client.extend_from_slice(reply.as_bytes());
            }
            Err(e) => {
                let reply = self.call_failed("passive connection", &e);
                out.to_client.extend_from_slice(reply.as_bytes());
            }
        }
    }

    /// Makes the call; `at`: where the opening must be taken (one a previous
    /// daemon announced), else anywhere the engine chooses.
    fn open(&self, call: Call, at: Option<SocketAddrV4>) -> Result<Opening, ApiError> {
        let (id, to) = match call {
            Call::Bind { a, peer, flags } => self.bind(a, peer, flags, at)?,
            Call::Redirect { a, internal } => self.redirect(a, internal, at)?,
        };
        if at.is_some_and(|at| at != to) {
            // Not where it was announced: no use to the client.
            self.api.withdraw_unused(&[id]);
            return Err(ApiError::new(
                crate::error::ErrorKind::AddressNotAvailable,
                format!("made at {to}, not where it was announced"),
            ));
        }
        Ok(Opening { id, call, at: to })
    }

    /// Makes again, in this daemon's engine, the openings a previous daemon
    /// announced that no connection had used yet; each goes back to where it
    /// was announced (the client or server was told that address). One that
    /// cannot be made is logged and counted as a failed call: the peer's
    /// connection will fail as it would have without the hand-over.
    pub(super) fn reopen(&mut self, pending: Vec<Opening>) {
        for p in pending {
            match self.open(p.call, Some(p.at)) {
                Ok(o) => {
                    log::debug!(
                        "ftp {} → {}: the opening at {} made again",
                        self.client,
                        self.server,
                        o.at
                    );
                    self.opened.push(o);
                }
                Err(e) => {
                    self.tally.failed += 1;
                    self.stats.failed_calls.fetch_add(1, Relaxed);
                    log::warn!(
                        "ftp {} → {}: the opening at {} announced before the restart is lost: {e}",
                        self.client,
                        self.server,
                        p.at
                    );
                }
            }
        }
    }

    /// BindForClient: `a` (inside) takes one connection from `peer`, at a
    /// port of the external address (`at`: that one); its id and that
    /// address.
    fn bind(
        &self,
        a: SocketAddrV4,
        peer: Ipv4Addr,
        flags: ConnFlags,
        at: Option<SocketAddrV4>,
    ) -> Result<(u64, SocketAddrV4), ApiError> {
        let req = BindRequest {
            session: self.session,
            clients: vec![a],
            proxy: Some(at.unwrap_or(SocketAddrV4::new(self.external, 0))),
            protocol: Transport::Tcp,
            flags: ConnFlags::TIMEOUT | flags | self.extra_flags,
            backlog: Some(1),
            protocol_name: PROTOCOL.into(),
            ip_filter: Some(IpFilter {
                include: vec![Ipv4Net::from(peer)],
                exclude: Vec::new(),
            }),
            notify: false,
            context: None,
        };
        let r = self.api.bind_for_client(&req)?;
        Ok((r.connections[0].id, r.proxy_address))
    }

    /// RedirectConnections: the inside host's connection to `a` (outside)
    /// goes through `internal` (none: the firewall's internal address) and
    /// leaves from the external address; its id and the address to dial
    /// (`at`: that one).
    fn redirect(
        &self,
        a: SocketAddrV4,
        internal: Option<Ipv4Addr>,
        at: Option<SocketAddrV4>,
    ) -> Result<(u64, SocketAddrV4), ApiError> {
        let req = RedirectRequest {
            session: self.session,
            connects: vec![a],
            proxy_external: Some(SocketAddrV4::new(self.external, 0)),
            internal: at.map(|at| *at.ip()).or(internal),
            protocol: Transport::Tcp,
            flags: ConnFlags::TIMEOUT | self.extra_flags,
            protocol_name: PROTOCOL.into(),
            notify: false,
            context: None,
        };
        let r = match at {
            Some(at) => self.api.redirect_connections_at(&req, at.port())?,
            None => self.api.redirect_connections(&req)?,
        };
        Ok((r.actions[0].id, r.internal_address))
    }

    /// Counts and logs a failed call; the reply that says so.
    fn call_failed(&mut self, what: &str, e: &ApiError) -> String {
        self.tally.failed += 1;
        self.stats.failed_calls.fetch_add(1, Relaxed);
        log::warn!(
            "ftp {} → {}: cannot open the {what}: {e}",
            self.client,
            self.server
        );
        format!("425 Can't open {what}: {}.\r\n", e.message)
    }
}

/// A data connection the filter opened and announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opening {
    /// The engine's id: meaningful only in the daemon that made it.
    #[serde(skip)]
    pub(super) id: u64,
    call: Call,
    /// Where the firewall takes the connection (what was announced).
    at: SocketAddrV4,
}

impl Opening {
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// The call that made an opening, to make it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "call")]
enum Call {
    /// BindForClient for `a` (inside), one connection from `peer`.
    Bind {
        a: SocketAddrV4,
        peer: Ipv4Addr,
        flags: ConnFlags,
    },
    /// RedirectConnections to `a` (outside), through `internal`.
    Redirect {
        a: SocketAddrV4,
        internal: Option<Ipv4Addr>,
    },
}
