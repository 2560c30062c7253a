//! AllowFutureConnect: permission for a client's expected outbound secondary
//! connection (the data connection after a passive-mode reply, say), sent
//! from a chosen external address — the primary connection's — whatever the
//! wall's general rules say. A pinhole on the internal side keyed by the
//! destination: the client's first packet to it creates the connection's
//! flows, translated like a redirect's, without the detour through an
//! address of the firewall.

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
        if self.user_mode(f, &req.protocol_name, expected)
            || expected.is_some_and(|e| self.factory_for(e, a).is_some())
        {
            return Err(err(
                ErrorKind::NotSupported,
                "AllowFutureConnect in user mode (no-kernel-mode, or a data filter for this protocol) is not supported yet: RedirectConnections relays such connections through the firewall",
            ));
        }
        self.check_not_busy(client_ip, req.protocol)?;
        self.check_pending(req.session, 1)?;
        let ext = self.proxy_external(req.proxy_external)?;
        if ext.port() != 0 && f.contains(ConnFlags::ALLOW_MULTIPLE) {
            return Err(invalid(format!(
                "an explicit proxy external port ({ext}) is allowed only for a single-use permission"
            )));
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

        let snat = self.snat_block(ext, req.protocol, f)?;
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
        if let Err(e) = self.maps.put_pinhole(&key, &value) {
            self.rollback(Undo {
                leases: snat,
                ..Undo::default()
            });
            return Err(e.into());
        }
        let external = snat[0].endpoint();
        self.objects.insert(
            id,
            Object {
                target: Some(a),
                pinhole: Some(key),
                leases: snat,
                notify: req.notify,
                context: req.context.clone(),
                ..Object::new(
                    req.session,
                    Kind::FutureConnect,
                    req.protocol,
                    &req.protocol_name,
                    f,
                    a,
                )
            }
            .with_span(id),
        );
        *self.pending.entry(req.session).or_default() += 1;
        if deadline != 0 {
            self.timers.at(deadline, timers::Timer::PinholeTimeout(id));
        }
        Ok(FutureConnectResult {
            id,
            address: a,
            external,
        })
    }
}
