//! AllowFutureConnect: permission for a client's expected outbound secondary
//! connection (the data connection after a passive-mode reply, say), sent
//! from a chosen external address — the primary connection's — whatever the
//! wall's general rules say. A pinhole on the internal side keyed by the
//! destination: the client's first packet to it creates the connection's
//! flows, translated like a redirect's, without the detour through an
//! address of the firewall. In user mode (no-kernel-mode, or a data filter
//! for the connection) the relay listens transparently at the destination
//! itself, takes the client's connection and makes its own from the
//! external address, so the bytes pass through the filters.

use super::*;

impl<M: Maps> Engine<M> {
    pub fn allow_future_connect(
        &mut self,
        req: &FutureConnectRequest,
    ) -> Result<FutureConnectResult, ApiError> {
        let client_ip = self.live_session(req.session)?;
        let f = req.flags;
        check_shape("AllowFutureConnect", "destination", 1, f)?;
        let foreign = f
            - (ConnFlags::ALLOW_MULTIPLE
                | ConnFlags::TIMEOUT
                | ConnFlags::NO_KERNEL_MODE
                | ConnFlags::ADDRESS_BASED
                | ConnFlags::ALLOWED_ADDRESSES);
        if !foreign.is_empty() {
            return Err(invalid(format!(
                "flag(s) {} do not apply to AllowFutureConnect (allow-multiple, timeout, no-kernel-mode, address-based, allow-addresses-*)",
                foreign.names().join(", ")
            )));
        }
        let a = req.address;
        if a.port() == 0 {
            return Err(invalid(format!("address {a} has port 0")));
        }
        policy::check_unicast("address", *a.ip(), &self.cfg.own_addrs())?;
        if self.cfg.is_internal(*a.ip()) {
            return Err(invalid(format!(
                "address {a} is on an internal network; AllowFutureConnect permits outbound connections"
            )));
        }
        // The policy is relative to the primary connection's external peer:
        // a server may name itself (or, widened, its neighbours), never steer
        // the client's connection to a third party.
        match req.peer {
            Some(peer) => policy::check_allowed_relative(
                (peer, "the primary connection's peer"),
                *a.ip(),
                f,
                &self.cfg.networks,
                "refusing to let a connection to a third party out",
            )?,
            None if f.contains(ConnFlags::ALLOW_ADDRESSES_ALL) => {}
            None => {
                return Err(err(
                    ErrorKind::AccessDenied,
                    format!("{a}: without the primary connection's peer (peer) only allow-addresses-all permits a destination"),
                ))
            }
        }
        let expected = Self::resulting_event(Kind::FutureConnect, req.protocol);
        let user = self.user_mode(f, &req.protocol_name, expected)
            || expected.is_some_and(|e| self.factory_for(e, a).is_some());
        self.check_not_busy(client_ip, req.protocol)?;
        self.check_pending(req.session, 1)?;
        let ext = self.proxy_external(req.proxy_external)?;
        if ext.port() != 0 && f.contains(ConnFlags::ALLOW_MULTIPLE) {
            return Err(invalid(format!(
                "an explicit proxy external port ({ext}) is allowed only for a single-use permission"
            )));
        }
        if ext.port() != 0 && user {
            return Err(invalid(format!("an explicit proxy external port ({ext}) is not supported in user mode (no-kernel-mode): the relay uses any port of that address")));
        }
        policy::check_protocol(&self.cfg.protocols, &req.protocol_name, client_ip)?;
        let key = PinholeKey::new(
            req.protocol.ipproto(),
            a.ip().octets(),
            a.port(),
            side::INTERNAL,
        );
        // One permission per destination: the pinhole is keyed by it.
        if self.maps.get_pinhole(&key)?.is_some() {
            return Err(err(
                ErrorKind::AddressInUse,
                format!(
                    "a permission for {} {a} is pending already (another client's, or this one's)",
                    req.protocol.name()
                ),
            ));
        }

        // The destination, as the firewall answers for it: bookkeeping in
        // kernel mode (one permission per destination, whichever mode), the
        // relay's transparent listener in user mode.
        self.ports.answer_transparently(*a.ip(), req.protocol);
        let hold = if user { Hold::Socket } else { Hold::Kernel };
        let dest = self
            .ports
            .reserve_exact_held(*a.ip(), req.protocol, a.port(), hold)
            .map_err(|e| match e.kind {
                ErrorKind::AddressInUse => err(
                    ErrorKind::AddressInUse,
                    format!(
                        "a permission for {} {a} is pending already (another client's, or this one's)",
                        req.protocol.name()
                    ),
                ),
                _ => e,
            })?;
        if user {
            return Ok(self.future_connect_user(req, client_ip, dest, ext, expected));
        }
        let snat = match self.snat_block(ext, req.protocol, f) {
            Ok(s) => s,
            Err(e) => {
                self.ports.release(&dest);
                return Err(e);
            }
        };
        let deadline = self.deadline(f, req.protocol);
        let id = self.new_id();
        let mut flags = pinhole_flags::CLIENT_ONLY | pinhole_flags::PERMISSION;
        if f.contains(ConnFlags::ALLOW_MULTIPLE) {
            flags |= pinhole_flags::MULTIPLE;
        }
        let value = PinholeValue {
            target_addr: a.ip().octets(),
            target_port: a.port(),
            flags,
            snat_addr: snat[0].addr.octets(),
            snat_port_base: snat[0].port,
            snat_port_count: snat.len() as u16,
            allowed_src: client_ip.octets(),
            egress_ifindex: self.cfg.external_ifindex,
            remaining: 1,
            owner: id,
            deadline_ns: deadline,
            ..Default::default()
        };
        let mut leases = snat;
        leases.push(dest);
        if let Err(e) = self.maps.put_pinhole(&key, &value) {
            self.rollback(Undo {
                leases,
                ..Undo::default()
            });
            return Err(e.into());
        }
        let external = leases[0].endpoint();
        self.permission_made(req, id, deadline, Some(key), leases, Mode::Kernel);
        Ok(FutureConnectResult {
            id,
            address: a,
            external,
        })
    }

    /// The user-mode permission: the relay listens at the destination
    /// `dest` (transparently; only the session's client is admitted) and
    /// connects to it from the external address `ext` (any port).
    fn future_connect_user(
        &mut self,
        req: &FutureConnectRequest,
        client_ip: Ipv4Addr,
        dest: Lease,
        ext: SocketAddrV4,
        event: Option<EventKind>,
    ) -> FutureConnectResult {
        let a = req.address;
        let f = req.flags;
        let deadline = self.deadline(f, req.protocol);
        let id = self.new_id();
        let job = Job {
            owner: id,
            transport: req.protocol,
            socket: self.ports.take_socket(&dest),
            backlog: DEFAULT_BACKLOG,
            admit: Admit::Client(client_ip),
            target: Some(a),
            source: SocketAddrV4::new(*ext.ip(), 0),
            multiple: f.contains(ConnFlags::ALLOW_MULTIPLE),
            idle: None,
            recv_buffer: None,
            filters: self.filters_for(&req.protocol_name),
            event,
            hook: None,
        };
        self.permission_made(req, id, deadline, None, vec![dest], Mode::User);
        self.relay.push(RelayCmd::Start(job));
        FutureConnectResult {
            id,
            address: a,
            external: SocketAddrV4::new(*ext.ip(), 0),
        }
    }

    /// Records a permission's object (pending until used, timed out at
    /// `deadline` when not 0).
    fn permission_made(
        &mut self,
        req: &FutureConnectRequest,
        id: u64,
        deadline: u64,
        pinhole: Option<PinholeKey>,
        leases: Vec<Lease>,
        mode: Mode,
    ) {
        let a = req.address;
        let o = Object {
            target: Some(a),
            pinhole,
            leases,
            notify: req.notify,
            context: req.context.clone(),
            mode,
            ..Object::new(
                req.session,
                Kind::FutureConnect,
                req.protocol,
                &req.protocol_name,
                req.flags,
                a,
            )
        };
        self.objects.insert(id, o.with_span(id));
        *self.pending.entry(req.session).or_default() += 1;
        if deadline != 0 {
            self.timers.at(deadline, timers::Timer::PinholeTimeout(id));
        }
    }
}
