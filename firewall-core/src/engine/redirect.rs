//! RedirectConnections: a client's secondary connections out through the
//! firewall, from the same external address as its primary connection.

use super::*;

impl<M: Maps> Engine<M> {
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
        self.redirect_connections_at(req, None)
    }

    /// RedirectConnections taken at a given port of the internal address
    /// (one single-use redirect): how a restarting daemon makes again an
    /// opening the previous one announced but that was not used yet. Not an
    /// API member: a caller of the API is given the port, as in ISA Server.
    pub fn redirect_connections_at(
        &mut self,
        req: &RedirectRequest,
        internal_port: Option<u16>,
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
        let ext = self.proxy_external(req.proxy_external)?;
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
        if let Some(p) = internal_port {
            if n > 1 || f.contains(ConnFlags::ALLOW_MULTIPLE) {
                return Err(invalid(format!(
                    "an explicit internal port ({p}) is allowed only for one single-use redirect"
                )));
            }
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
        match self.redirect_apply(req, client_ip, (int, internal_port), ext, &mut undo) {
            Ok(r) => Ok(r),
            Err(e) => {
                self.rollback(undo);
                Err(e)
            }
        }
    }

    pub(super) fn redirect_apply(
        &mut self,
        req: &RedirectRequest,
        client_ip: Ipv4Addr,
        (int, int_port): (Ipv4Addr, Option<u16>),
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
        let int_block = match int_port {
            Some(p) => vec![self.ports.reserve_exact_held(int, req.protocol, p, hold)?],
            None => self
                .ports
                .reserve_block_held(int, req.protocol, n as u16, hold)?,
        };
        undo.leases.extend(&int_block);
        let mut snat = Vec::new();
        for _ in 0..if user { 0 } else { n } {
            let block = self.snat_block(ext, req.protocol, req.flags)?;
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
                req.protocol.ipproto(),
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
                self.maps.put_pinhole(&key, &value)?;
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
            self.objects.insert(id, o.with_span(id));
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

    /// The external source of an outward secondary connection: the first
    /// external address when none or 0.0.0.0 is given, else one of the
    /// firewall's external addresses (port 0: any).
    pub(super) fn proxy_external(&self, p: Option<SocketAddrV4>) -> Result<SocketAddrV4, ApiError> {
        match p {
            None => Ok(SocketAddrV4::new(self.cfg.external_addrs[0], 0)),
            Some(p) if p.ip().is_unspecified() => {
                Ok(SocketAddrV4::new(self.cfg.external_addrs[0], p.port()))
            }
            Some(p) if self.cfg.external_addrs.contains(p.ip()) => Ok(p),
            Some(p) => Err(err(
                ErrorKind::AddressNotAvailable,
                format!(
                    "proxy external address {} is not an external address of the firewall",
                    p.ip()
                ),
            )),
        }
    }

    /// The SNAT ports of one outward pinhole: `port` exactly when non-zero,
    /// else one port, or a block for ALLOW_MULTIPLE.
    pub(super) fn snat_block(
        &mut self,
        ext: SocketAddrV4,
        t: Transport,
        flags: ConnFlags,
    ) -> Result<Vec<Lease>, ApiError> {
        if ext.port() != 0 {
            return Ok(vec![self.ports.reserve_exact(*ext.ip(), t, ext.port())?]);
        }
        let count = if flags.contains(ConnFlags::ALLOW_MULTIPLE) {
            self.cfg.snat_block
        } else {
            1
        };
        self.ports.reserve_block(*ext.ip(), t, count)
    }

    pub(super) fn deadline(&self, flags: ConnFlags, t: Transport) -> u64 {
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
    pub(super) fn install_peer_filter(
        &mut self,
        f: Option<&IpFilter>,
        undo: &mut Undo,
    ) -> Result<Option<u32>, ApiError> {
        let Some(f) = f else { return Ok(None) };
        let id = self.next_filter;
        self.next_filter = self.next_filter.wrapping_add(1).max(1);
        for (net, allow) in f.rules() {
            self.maps.put_peer_rule(id, net, allow)?;
            undo.rules.push((id, net));
        }
        Ok(Some(id))
    }

    pub(super) fn rollback(&mut self, undo: Undo) {
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
}
