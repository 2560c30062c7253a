//! What callers do to connection objects and actions (Kill, Cancel,
//! SetClientAddress, EmulateConnection, withdrawing), and how objects end.

use super::*;

impl<M: Maps> Engine<M> {
    // ----- connection objects and actions -----

    pub(super) fn object(&self, id: u64) -> Result<&Object, ApiError> {
        self.objects
            .get(&id)
            .ok_or_else(|| invalid(format!("no connection or action {id}")))
    }

    /// Ends a connection (Kill). Always succeeds once the object exists; a
    /// second Kill changes nothing.
    pub fn kill(&mut self, id: u64) -> Result<(), ApiError> {
        if self.forgotten(id) {
            // Ended long ago: a second Kill changes nothing.
            return Ok(());
        }
        let o = self.object(id)?;
        if o.kind.is_action() {
            return Err(invalid(format!(
                "{id} is a firewall action (RedirectConnections, AllowFutureConnect): use cancel"
            )));
        }
        if o.state != State::Terminated {
            self.terminate(id, "killed");
        }
        Ok(())
    }

    /// EmulateConnection: for a bind a filter emulated, connects to the client
    /// (from the firewall's internal address) with `peer` as the data source
    /// standing for the external `remote`. The connection is the bind's own
    /// object (or a child with `allow-multiple`); its established and
    /// terminating events follow as for relayed connections. A single-use
    /// bind is used up by the call, also if the client cannot be reached.
    pub fn emulate_connection(
        &mut self,
        id: u64,
        remote: SocketAddrV4,
        peer: Box<dyn filters::EmulatedPeer>,
    ) -> Result<(), ApiError> {
        let o = self.object(id)?;
        if o.state == State::Terminated {
            return Err(err(
                ErrorKind::Terminating,
                format!("connection {id} is terminated"),
            ));
        }
        if !o.emulated {
            return Err(err(
                ErrorKind::NotEmulated,
                format!("the bind of connection {id} was not emulated by a filter"),
            ));
        }
        if o.transport != Transport::Tcp {
            return Err(invalid(format!(
                "connection {id} is UDP: emulated connections are TCP streams"
            )));
        }
        let multiple = o.flags.contains(ConnFlags::ALLOW_MULTIPLE);
        if o.state != State::Listening || (o.emulation_started && !multiple) {
            return Err(err(
                ErrorKind::Terminating,
                format!("connection {id} was already used (no allow-multiple)"),
            ));
        }
        let Some(target) = o.target else {
            return Err(invalid(format!(
                "connection {id} has no client address yet (SetClientAddress)"
            )));
        };
        let source = SocketAddrV4::new(self.cfg.internal_addrs[0], 0);
        self.objects.get_mut(&id).expect("exists").emulation_started = true;
        self.relay.push(RelayCmd::Emulate(crate::relay::Emulation {
            owner: id,
            multiple,
            remote,
            target,
            source,
            peer,
        }));
        Ok(())
    }

    /// An id handed out once that names nothing any more: a used or
    /// cancelled factory, or an object forgotten after it ended.
    pub(super) fn forgotten(&self, id: u64) -> bool {
        id < self.next_id && !self.objects.contains_key(&id) && !self.sessions.contains_key(&id)
    }

    /// Ends those of `ids` that still wait for their connection (a primary
    /// connection ended, or made them void): listening binds are killed,
    /// unused redirects cancelled. Established connections go on; unknown or
    /// ended ids are skipped.
    ///
    /// An endpoint a connection is using at that moment is not unused: a
    /// kernel pinhole is taken out of the map atomically and judged by what
    /// it was (its establishment event may still be on its way), a relay
    /// endpoint is withdrawn by the relay, which knows whether it accepted.
    pub fn withdraw_unused(&mut self, ids: &[u64], reason: &'static str) {
        for id in ids {
            let Some(o) = self.objects.get_mut(id) else {
                continue;
            };
            if o.state != State::Listening {
                continue;
            }
            if o.mode == Mode::User {
                self.relay.push(RelayCmd::Withdraw { owner: *id, reason });
                continue;
            }
            let single = !o.flags.contains(ConnFlags::ALLOW_MULTIPLE);
            let used = match o.pinhole.take() {
                Some(key) => match self.maps.take_pinhole(&key) {
                    Ok(v) => single && v.is_some_and(|v| timers::pinhole_used(&v)),
                    Err(e) => {
                        log::warn!("taking the pinhole of {id}: {e:#}");
                        o.pinhole = Some(key);
                        false
                    }
                },
                None => false,
            };
            if used {
                // A first packet won it: its flows exist or are being made.
                log::debug!("connection {id}: in use as its control connection ends; kept");
                self.timers.at(
                    self.clock.now_ns() + 1_000_000_000,
                    timers::Timer::AwaitEstablished(*id, reason),
                );
            } else {
                self.terminate(*id, reason);
            }
        }
    }

    /// Those of `ids` that still wait for their first connection: listening,
    /// and their kernel pinhole not yet won by a packet (read from the map,
    /// which is ahead of the establishment events). What a restarting daemon
    /// asks before handing a control connection's announced openings on.
    pub fn still_waiting(&self, ids: &[u64]) -> Vec<u64> {
        ids.iter()
            .copied()
            .filter(|id| {
                let Some(o) = self.objects.get(id) else {
                    return false;
                };
                if o.state != State::Listening {
                    return false;
                }
                match &o.pinhole {
                    Some(key) => matches!(
                        self.maps.get_pinhole(key),
                        Ok(Some(v)) if !timers::pinhole_used(&v)
                    ),
                    None => true,
                }
            })
            .collect()
    }

    /// Withdraws a redirect (Cancel). An action that was already used (single
    /// use), cancelled, or timed out answers `terminating`.
    pub fn cancel(&mut self, id: u64) -> Result<(), ApiError> {
        if self.factories.remove(&id).is_some() {
            return Ok(());
        }
        if self.forgotten(id) {
            // A factory that was used or cancelled, or an object that ended
            // and was forgotten.
            return Err(err(
                ErrorKind::Terminating,
                format!("action {id} was already used or cancelled"),
            ));
        }
        let o = self.object(id)?;
        if !o.kind.is_action() {
            return Err(invalid(format!(
                "{id} is a connection, not a firewall action: use kill"
            )));
        }
        match o.state {
            State::Listening => {
                self.terminate(id, "cancelled");
                Ok(())
            }
            State::Established => Err(err(
                ErrorKind::Terminating,
                format!("action {id} was used and cancelled itself"),
            )),
            State::Terminated => Err(err(
                ErrorKind::Terminating,
                format!(
                    "action {id} is already {}",
                    o.reason.as_deref().unwrap_or("cancelled")
                ),
            )),
        }
    }

    /// Supplies the real client address of a placeholder connection, once.
    pub fn set_client_address(&mut self, id: u64, addr: SocketAddrV4) -> Result<(), ApiError> {
        let o = self.object(id)?;
        if o.kind != Kind::Bind {
            return Err(invalid(format!("{id} is not a BindForClient connection")));
        }
        if o.state == State::Terminated {
            return Err(err(
                ErrorKind::Terminating,
                format!("connection {id} is terminated"),
            ));
        }
        if let Some(t) = o.target {
            return Err(invalid(format!(
                "the client address of connection {id} is already set ({t})"
            )));
        }
        let own = self.cfg.own_addrs();
        let Some(addr) = policy::check_client_endpoint(0, addr, &own)? else {
            return Err(invalid(
                "the client address must not be the placeholder 0.0.0.0:0",
            ));
        };
        let client = self.sessions[&o.session].client;
        policy::check_allowed_target(client, *addr.ip(), o.flags, &self.cfg.networks).inspect_err(
            |e| {
                log::warn!(
                    "bounce attempt refused: connection {id} asked for client address {addr}: {}",
                    e.message
                );
            },
        )?;
        if o.mode == Mode::User {
            self.relay.push(RelayCmd::SetTarget {
                owner: id,
                target: addr,
            });
            self.objects.get_mut(&id).expect("exists").target = Some(addr);
            return Ok(());
        }
        let key = o
            .pinhole
            .expect("a listening kernel-mode bind has its pinhole");
        let mut v = self.maps.get_pinhole(&key)?.ok_or_else(|| {
            err(
                ErrorKind::Internal,
                format!("pinhole of connection {id} vanished"),
            )
        })?;
        v.target_addr = addr.ip().octets();
        v.target_port = addr.port();
        v.flags &= !pinhole_flags::NO_TARGET;
        self.maps.put_pinhole(&key, &v)?;
        self.objects.get_mut(&id).expect("exists").target = Some(addr);
        Ok(())
    }

    /// Removes everything an object holds and raises its terminating event
    /// (once). Children go first.
    pub(super) fn terminate(&mut self, id: u64, reason: &str) {
        self.end(id, reason, true)
    }

    /// Ends a connection whose TCP teardown is done: its ports and quota
    /// share go now, its flows stay until they are quiet for tcp_closing (the
    /// last ACK, a retransmitted FIN), owned by no object.
    pub(super) fn terminate_keeping_flows(&mut self, id: u64, reason: &str) {
        self.end(id, reason, false)
    }

    pub(super) fn end(&mut self, id: u64, reason: &str, delete_flows: bool) {
        let span = self.objects.get(&id).map(|o| o.span.clone());
        let _entered = span.as_ref().map(|s| s.enter());
        let children: Vec<u64> = self
            .objects
            .get(&id)
            .map(|o| o.children.clone())
            .unwrap_or_default();
        for c in children {
            self.end(c, reason, delete_flows);
        }
        let Some(o) = self.objects.get_mut(&id) else {
            return;
        };
        if o.state == State::Terminated {
            return;
        }
        tracing::debug!(reason, "ends");
        let now = self.clock.now_ns();
        let was_pending = o.state == State::Listening && o.parent.is_none();
        o.state = State::Terminated;
        o.reason = Some(reason.to_string());
        o.ended_ns = now;
        if std::mem::take(&mut o.counted) {
            let (session, transport) = (o.session, o.transport);
            self.count_established(session, transport, false);
        }
        self.forget_later(id, now);
        if was_pending {
            let session = self.objects[&id].session;
            self.no_longer_pending(session);
        }
        let o = self.objects.get_mut(&id).expect("exists");
        let (pinhole, filter, leases, flows, session) = (
            o.pinhole.take(),
            o.peer_filter.take(),
            std::mem::take(&mut o.leases),
            std::mem::take(&mut o.flows),
            o.session,
        );
        if let Some(conn) = o.relay_conn {
            self.relay_conns.remove(&conn);
        }
        if o.mode == Mode::User {
            // Before the leases go: the relay closes the sockets it holds.
            match (o.parent, o.relay_conn) {
                (Some(parent), Some(conn)) => self.relay.push(RelayCmd::StopConn {
                    owner: parent,
                    conn,
                }),
                (None, _) => self.relay.push(RelayCmd::Stop { owner: id }),
                (Some(_), None) => {}
            }
        }

        if let Some(k) = pinhole {
            if let Err(e) = self.maps.del_pinhole(&k) {
                log::warn!("removing the pinhole of {id}: {e:#}");
            }
        }
        if let Some(fid) = filter {
            let last = self.filters.get_mut(&fid).is_some_and(|(_, users)| {
                *users -= 1;
                *users == 0
            });
            if last {
                for (net, _) in self
                    .filters
                    .remove(&fid)
                    .map(|(r, _)| r)
                    .unwrap_or_default()
                {
                    let _ = self.maps.del_peer_rule(fid, net);
                }
            }
        }
        // Only flows still its own: a new connection reusing the 5-tuple may
        // have taken one over.
        let flows: Vec<FlowKey> = flows
            .into_iter()
            .filter(|k| self.flow_owner.get(k) == Some(&id))
            .collect();
        for k in &flows {
            self.flow_owner.remove(k);
        }
        if delete_flows {
            if let Err(e) = self.maps.del_flows(&flows) {
                log::warn!("removing the flows of {id}: {e:#}");
            }
        } else if !flows.is_empty() {
            let closing = self.cfg.timeouts.tcp_closing.as_nanos() as u64;
            self.timers.at(
                now + closing,
                timers::Timer::Linger {
                    owner: id,
                    keys: flows,
                },
            );
        }
        for l in leases {
            self.ports.release(&l);
        }
        for f in &self.app_filters {
            f.on_terminating(id);
        }
        self.events.push(Event::Terminating {
            connection: id,
            session,
            reason: reason.to_string(),
        });
        let transport = self.objects[&id].transport;
        self.check_quota(session, transport);
    }
}
