//! A published FTP server's control connection: the client outside, the
//! server inside, the firewall a full proxy between them (the server sees
//! the firewall's internal address). The secondary connections mirror an
//! internal client's: the server's passive port is bound on the external
//! address (BindForClient, PROXY_MODE: the data connection reaches the
//! server from the firewall's internal address, as the control connection
//! does, which servers check), and the client's active port is reached
//! through the firewall's internal address (RedirectConnections).

use std::net::SocketAddrV4;

use ipnet::Ipv4Net;

use super::{Control, Output, PROTOCOL};
use crate::{
    engine::{BindRequest, RedirectRequest},
    flags::ConnFlags,
    policy::{IpFilter, Transport},
};

impl Control {
    /// PORT/EPRT from the outside client (its own address, checked): the
    /// server connects to the firewall's internal address instead, and the
    /// firewall on to the client from the external address.
    pub(super) fn published_active(&mut self, verb: &str, a: SocketAddrV4, out: &mut Output) {
        let req = RedirectRequest {
            session: self.session,
            connects: vec![a],
            proxy_external: Some(SocketAddrV4::new(self.external, 0)),
            internal: None,
            protocol: Transport::Tcp,
            flags: ConnFlags::TIMEOUT | self.extra_flags,
            protocol_name: PROTOCOL.into(),
            notify: false,
            context: None,
        };
        match self.api.redirect_connections(&req) {
            Ok(r) => {
                let i = r.internal_address;
                self.opened_active(r.actions[0].id, verb, a, i, out);
            }
            Err(e) => self.call_failed("data connection", &e, out),
        }
    }

    /// 227/229 from the published server (its own address, checked): the
    /// client connects to the external address, the firewall on to the
    /// server's data port from its internal address.
    pub(super) fn published_passive(&mut self, extended: bool, a: SocketAddrV4, out: &mut Output) {
        let req = BindRequest {
            session: self.session,
            clients: vec![a],
            proxy: Some(SocketAddrV4::new(self.external, 0)),
            protocol: Transport::Tcp,
            flags: ConnFlags::TIMEOUT | ConnFlags::PROXY_MODE | self.extra_flags,
            backlog: Some(1),
            protocol_name: PROTOCOL.into(),
            ip_filter: Some(IpFilter {
                include: vec![Ipv4Net::from(*self.client.ip())],
                exclude: Vec::new(),
            }),
            notify: false,
            context: None,
        };
        match self.api.bind_for_client(&req) {
            Ok(r) => {
                let p = r.proxy_address;
                self.opened_passive(r.connections[0].id, extended, a, p, out);
            }
            Err(e) => self.call_failed("passive connection", &e, out),
        }
    }
}
