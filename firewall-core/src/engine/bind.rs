//! BindForClient: firewall ports for a client to receive secondary
//! connections on.

use super::*;

impl<M: Maps> Engine<M> {
    // ----- BindForClient -----

    /// BindForClient made by an in-process filter: it alone is told when a
    /// connection is established (with `req.notify`).
    pub fn bind_for_client_by(
        &mut self,
        caller: Arc<dyn AppFilter>,
        req: &BindRequest,
    ) -> Result<BindResult, ApiError> {
        let r = self.bind_for_client(req)?;
        for c in &r.connections {
            self.objects.get_mut(&c.id).expect("just made").caller = Some(caller.clone());
        }
        Ok(r)
    }

    pub fn bind_for_client(&mut self, req: &BindRequest) -> Result<BindResult, ApiError> {
        let client_ip = self.live_session(req.session)?;
        let n = req.clients.len();
        check_shape("BindForClient", "client", n, req.flags)?;
        self.check_not_busy(client_ip, req.protocol)?;
        self.check_pending(req.session, n)?;
        let f = req.flags;
        if f.contains(ConnFlags::ADDRESS_BASED) {
            return Err(invalid(
                "flag address-based does not apply to BindForClient (AllowFutureConnect only)",
            ));
        }
        if req.protocol == Transport::Tcp {
            for only_udp in [ConnFlags::BIDIRECTIONAL, ConnFlags::INCREASE_RECEIVE_BUFFER] {
                if f.contains(only_udp) {
                    return Err(invalid(format!(
                        "flag {} is valid only for UDP",
                        only_udp.names()[0]
                    )));
                }
            }
        }
        if req.backlog.is_some_and(|b| b > 65535) {
            return Err(invalid(format!(
                "backlog {} is above 65535",
                req.backlog.unwrap_or_default()
            )));
        }
        let own = self.cfg.own_addrs();
        let clients: Vec<Option<SocketAddrV4>> = req
            .clients
            .iter()
            .enumerate()
            .map(|(i, a)| policy::check_client_endpoint(i, *a, &own))
            .collect::<Result<_, _>>()?;

        let proxy = req
            .proxy
            .unwrap_or(SocketAddrV4::new(self.cfg.external_addrs[0], 0));
        if proxy.port() != 0 && n > 1 {
            return Err(invalid(format!(
                "an explicit proxy port ({proxy}) is allowed only with one client address, not {n}"
            )));
        }
        let (pside, routed) = if self.cfg.external_addrs.contains(proxy.ip()) {
            (side::EXTERNAL, false)
        } else if self.cfg.internal_addrs.contains(proxy.ip()) {
            (side::INTERNAL, false)
        } else if self.cfg.is_internal(*proxy.ip()) && !proxy.ip().is_unspecified() {
            (side::EXTERNAL, true)
        } else {
            return Err(err(
                ErrorKind::AddressNotAvailable,
                format!("proxy address {} is neither an address of the firewall nor an internal client (routed network)", proxy.ip()),
            ));
        };
        if routed
            && self.user_mode(
                f,
                &req.protocol_name,
                Self::resulting_event(Kind::Bind, req.protocol),
            )
        {
            return Err(invalid(format!("a routed proxy address ({proxy}) is the client's own: the firewall has no socket to relay it in user mode")));
        }
        if routed {
            for (i, c) in clients.iter().enumerate() {
                match c {
                    Some(c) if c.ip() == proxy.ip() && (proxy.port() == 0 || proxy.port() == c.port()) => {}
                    _ => return Err(invalid(format!("with a routed proxy address ({proxy}), client address {i} must be that host itself (and the same port)"))),
                }
            }
        }

        // The FTP-bounce guard: all targets must pass, or the call fails whole.
        let effective = f | self.cfg.default_allowed;
        for c in clients.iter().flatten() {
            policy::check_allowed_target(client_ip, *c.ip(), effective, &self.cfg.networks).inspect_err(|e| {
                log::warn!("bounce attempt refused: session {} (client {client_ip}) asked to bind for {c}: {}", req.session, e.message);
            })?;
        }
        policy::check_protocol(&self.cfg.protocols, &req.protocol_name, client_ip)?;

        let user = self.user_mode(
            f,
            &req.protocol_name,
            Self::resulting_event(Kind::Bind, req.protocol),
        );
        let plan = BindPlan {
            clients,
            proxy,
            side: pside,
            routed,
            effective,
            user,
        };
        let mut undo = Undo::default();
        match self.bind_apply(req, &plan, &mut undo) {
            Ok(r) => Ok(r),
            Err(e) => {
                self.rollback(undo);
                Err(e)
            }
        }
    }

    /// Everything that can fail, recorded in `undo`; then the commit, which
    /// cannot.
    fn bind_apply(
        &mut self,
        req: &BindRequest,
        plan: &BindPlan,
        undo: &mut Undo,
    ) -> Result<BindResult, ApiError> {
        let endpoints = self.bind_endpoints(req, plan, undo)?;
        let snat = self.bind_snat(req, plan, undo)?;
        let filter = if plan.user {
            None
        } else {
            self.install_peer_filter(req.ip_filter.as_ref(), undo)?
        };
        let ctx = BindCtx {
            req,
            plan,
            filter,
            deadline: self.deadline(req.flags, req.protocol),
            source: SocketAddrV4::new(
                self.cfg
                    .internal_addrs
                    .first()
                    .copied()
                    .unwrap_or(Ipv4Addr::UNSPECIFIED),
                0,
            ),
        };
        let mut made = Vec::new();
        for (i, ep) in endpoints.iter().enumerate() {
            made.push(self.bind_one(&ctx, i, *ep, snat.get(i).map(Vec::as_slice), undo)?);
        }
        Ok(self.bind_commit(&ctx, endpoints[0], made))
    }

    /// The external endpoints: the clients themselves (routed), the one
    /// port asked for, or a block of consecutive ports.
    fn bind_endpoints(
        &mut self,
        req: &BindRequest,
        plan: &BindPlan,
        undo: &mut Undo,
    ) -> Result<Vec<SocketAddrV4>, ApiError> {
        let proxy = plan.proxy;
        if plan.routed {
            return Ok(plan.clients.iter().flatten().copied().collect());
        }
        if proxy.port() != 0 {
            let l = self
                .ports
                .reserve_exact(*proxy.ip(), req.protocol, proxy.port())?;
            undo.leases.push(l);
            return Ok(vec![l.endpoint()]);
        }
        let n = plan.clients.len() as u16;
        let block = self.ports.reserve_block(*proxy.ip(), req.protocol, n)?;
        undo.leases.extend(&block);
        Ok(block.iter().map(|l| l.endpoint()).collect())
    }

    /// PROXY_MODE in the kernel: the client sees the firewall's internal
    /// address as the source, from a port (block) reserved per endpoint. In
    /// user mode the relay always connects from that address anyway.
    fn bind_snat(
        &mut self,
        req: &BindRequest,
        plan: &BindPlan,
        undo: &mut Undo,
    ) -> Result<Vec<Vec<Lease>>, ApiError> {
        if !req.flags.contains(ConnFlags::PROXY_MODE) || plan.user {
            return Ok(Vec::new());
        }
        let int = *self.cfg.internal_addrs.first().ok_or_else(|| {
            err(
                ErrorKind::AddressNotAvailable,
                "the internal interface has no address for proxy-mode",
            )
        })?;
        let count = if req.flags.contains(ConnFlags::ALLOW_MULTIPLE) {
            self.cfg.snat_block
        } else {
            1
        };
        let mut snat = Vec::new();
        for _ in 0..plan.clients.len() {
            let block = self.ports.reserve_block(int, req.protocol, count)?;
            undo.leases.extend(&block);
            snat.push(block);
        }
        Ok(snat)
    }

    /// One endpoint: the filters' say (fwx_Bind_Tcp / fwx_Bind_Udp), then a
    /// pinhole in the kernel or a relay job in user mode.
    fn bind_one(
        &mut self,
        ctx: &BindCtx,
        i: usize,
        ep: SocketAddrV4,
        snat: Option<&[Lease]>,
        undo: &mut Undo,
    ) -> Result<Made, ApiError> {
        let req = ctx.req;
        let id = self.new_id();
        let target = ctx.plan.clients[i];
        let t = target.unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        let mut leases: Vec<Lease> = undo
            .leases
            .iter()
            .filter(|l| l.endpoint() == ep && l.transport == req.protocol)
            .copied()
            .collect();
        let bind_event = if req.protocol == Transport::Tcp {
            EventKind::BindTcp
        } else {
            EventKind::BindUdp
        };
        let decision = filters::raise(
            &self.app_filters,
            bind_event,
            id,
            req.session,
            ep,
            &req.protocol_name,
        )?;
        if let Some(by) = decision.denied_by {
            return Err(err(
                ErrorKind::AddressInUse,
                format!("the bind of {ep} was denied by filter {by}"),
            ));
        }
        // A factory registered before the call for this endpoint expects a
        // data filter: user mode (UDP takes it now, TCP at the accept).
        let expected = if req.protocol == Transport::Tcp {
            EventKind::AcceptedConnection
        } else {
            EventKind::BindUdp
        };
        let user = ctx.plan.user
            || !decision.data_filters.is_empty()
            || decision.emulated_by.is_some()
            || self.factory_for(expected, ep).is_some();
        let emulated = decision.emulated_by.is_some();
        let mut job = None;
        let mut pinhole = None;
        if emulated {
            // Nothing listens: the emulating filter is the data source
            // (emulate_connection); the port stays reserved by its lease.
        } else if user {
            let mut factories = self.filters_for(&req.protocol_name);
            if req.protocol == Transport::Udp {
                factories.extend(self.take_factory(EventKind::BindUdp, ep));
            }
            factories.extend(decision.data_filters.into_iter().map(|(p, f)| {
                Arc::new(filters::Attached::new(p, f)) as Arc<dyn DataFilterFactory>
            }));
            job = Some(Job {
                owner: id,
                transport: req.protocol,
                socket: leases.first().and_then(|l| self.ports.take_socket(l)),
                backlog: req.backlog.unwrap_or(DEFAULT_BACKLOG),
                admit: Admit::Peers(req.ip_filter.clone()),
                target,
                source: ctx.source,
                multiple: req.flags.contains(ConnFlags::ALLOW_MULTIPLE),
                idle: (req.protocol == Transport::Udp && req.flags.contains(ConnFlags::TIMEOUT))
                    .then_some(self.cfg.timeouts.udp_pinhole_idle),
                recv_buffer: req
                    .flags
                    .contains(ConnFlags::INCREASE_RECEIVE_BUFFER)
                    .then_some(INCREASED_RECEIVE_BUFFER),
                filters: factories,
                event: Self::resulting_event(Kind::Bind, req.protocol),
                hook: None,
            });
        } else {
            let (key, value) = self.bind_pinhole(ctx, id, ep, target, snat);
            self.maps.put_pinhole(&key, &value)?;
            undo.pinholes.push(key);
            pinhole = Some(key);
        }
        if let Some(b) = snat {
            leases.extend(b);
        }
        let object = Object {
            target,
            pinhole,
            peer_filter: ctx.filter,
            leases,
            notify: req.notify,
            context: req.context.clone(),
            mode: if user { Mode::User } else { Mode::Kernel },
            emulated,
            ..Object::new(
                req.session,
                Kind::Bind,
                req.protocol,
                &req.protocol_name,
                ctx.plan.effective,
                ep,
            )
        };
        let bound = BoundConnection {
            id,
            external: ep,
            client: t,
        };
        Ok(Made {
            id,
            object,
            bound,
            job,
        })
    }

    /// The pinhole that admits the first packet to `ep` in the kernel.
    fn bind_pinhole(
        &self,
        ctx: &BindCtx,
        id: u64,
        ep: SocketAddrV4,
        target: Option<SocketAddrV4>,
        snat: Option<&[Lease]>,
    ) -> (PinholeKey, PinholeValue) {
        let req = ctx.req;
        let key = PinholeKey::new(
            req.protocol.ipproto(),
            ep.ip().octets(),
            ep.port(),
            ctx.plan.side,
        );
        let mut flags = 0u16;
        if req.flags.contains(ConnFlags::ALLOW_MULTIPLE) {
            flags |= pinhole_flags::MULTIPLE;
        }
        if req.flags.contains(ConnFlags::BIDIRECTIONAL) {
            flags |= pinhole_flags::BIDIRECTIONAL;
        }
        if target.is_none() {
            flags |= pinhole_flags::NO_TARGET;
        }
        let t = target.unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        let (snat_addr, snat_port_base, snat_port_count) =
            snat.filter(|b| !b.is_empty()).map_or(([0; 4], 0, 0), |b| {
                (b[0].addr.octets(), b[0].port, b.len() as u16)
            });
        let value = PinholeValue {
            target_addr: t.ip().octets(),
            target_port: t.port(),
            flags,
            snat_addr,
            snat_port_base,
            snat_port_count,
            peer_filter: ctx.filter.unwrap_or(0),
            egress_ifindex: self.cfg.internal_ifindex,
            remaining: 1,
            owner: id,
            deadline_ns: ctx.deadline,
            ..Default::default()
        };
        (key, value)
    }

    /// Committed: from here on nothing fails.
    fn bind_commit(
        &mut self,
        ctx: &BindCtx,
        proxy_address: SocketAddrV4,
        made: Vec<Made>,
    ) -> BindResult {
        let req = ctx.req;
        if let Some(fid) = ctx.filter {
            let rules = req
                .ip_filter
                .as_ref()
                .map(|f| f.rules())
                .unwrap_or_default();
            self.filters.insert(fid, (rules, made.len()));
        }
        *self.pending.entry(req.session).or_default() += made.len();
        let mut out = Vec::with_capacity(made.len());
        for m in made {
            self.objects.insert(m.id, m.object.with_span(m.id));
            if ctx.deadline != 0 {
                self.timers
                    .at(ctx.deadline, timers::Timer::PinholeTimeout(m.id));
            }
            self.relay.extend(m.job.map(RelayCmd::Start));
            out.push(m.bound);
        }
        // fwx_Listen: filters hear of it but cannot refuse it.
        if req.protocol == Transport::Tcp {
            for c in &out {
                if let Err(e) = filters::raise(
                    &self.app_filters,
                    EventKind::Listen,
                    c.id,
                    req.session,
                    c.external,
                    &req.protocol_name,
                ) {
                    log::warn!("{}", e.message);
                }
            }
        }
        BindResult {
            proxy_address,
            connections: out,
        }
    }
}

/// A BindForClient request once checked.
struct BindPlan {
    clients: Vec<Option<SocketAddrV4>>,
    proxy: SocketAddrV4,
    /// The side of the firewall the pinholes wait on.
    side: u8,
    /// The proxy address is an internal client's own (a routed network).
    routed: bool,
    /// The flags with the configured defaults added.
    effective: ConnFlags,
    user: bool,
}

/// What every endpoint of one call shares.
struct BindCtx<'a> {
    req: &'a BindRequest,
    plan: &'a BindPlan,
    filter: Option<u32>,
    deadline: u64,
    source: SocketAddrV4,
}

/// One endpoint made, not yet committed.
struct Made {
    id: u64,
    object: Object,
    bound: BoundConnection,
    job: Option<Job>,
}
