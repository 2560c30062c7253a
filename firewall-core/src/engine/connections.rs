//! Connections made and ended: what the datapath and the relay report.

use super::*;

impl<M: Maps> Engine<M> {
    /// Records a connection made through `owner`'s pinhole or relay endpoint:
    /// a child object with `allow-multiple`, else the object itself becomes
    /// established. `fill` adds what the path knows (flows, relay handle).
    /// Raises "established" for calls that asked, and tells the calling
    /// filter (only it). Returns the connection's object id.
    pub(super) fn connection_made(
        &mut self,
        owner: u64,
        from: SocketAddrV4,
        fill: impl FnOnce(&mut Object),
    ) -> u64 {
        let o = self.objects.get(&owner).expect("checked by the caller");
        let span = o.span.clone();
        let _entered = span.enter();
        let to = o
            .target
            .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        let id = if o.flags.contains(ConnFlags::ALLOW_MULTIPLE) {
            let mut child = Object {
                parent: Some(owner),
                state: State::Established,
                target: o.target,
                peer: Some(from),
                notify: o.notify,
                context: o.context.clone(),
                caller: o.caller.clone(),
                mode: o.mode,
                ..Object::new(
                    o.session,
                    if o.kind.is_action() {
                        Kind::Redirected
                    } else {
                        Kind::Accepted
                    },
                    o.transport,
                    &o.protocol_name,
                    o.flags,
                    o.endpoint,
                )
            };
            fill(&mut child);
            let id = self.new_id();
            self.objects.insert(id, child.with_span(id));
            if let Some(parent) = self.objects.get_mut(&owner) {
                parent.children.push(id);
            }
            id
        } else {
            let o = self.objects.get_mut(&owner).expect("exists");
            o.state = State::Established;
            o.peer = Some(from);
            fill(o);
            let session = o.session;
            // A used permission is spent: its destination is free for the next
            // (in user mode once the relay's socket there closes, with the
            // connection).
            let spent = if o.kind == Kind::FutureConnect {
                o.pinhole.take()
            } else {
                None
            };
            let dest = match (spent, o.target) {
                (Some(_), Some(t)) => o
                    .leases
                    .iter()
                    .position(|l| l.addr == *t.ip() && l.port == t.port())
                    .map(|i| o.leases.remove(i)),
                _ => None,
            };
            if let Some(l) = dest {
                self.ports.release(&l);
            }
            if let Some(k) = spent {
                if let Err(e) = self.maps.del_pinhole(&k) {
                    log::warn!("removing the used permission {owner}: {e:#}");
                }
            }
            self.no_longer_pending(session);
            owner
        };
        let seq = self.next_established;
        self.next_established += 1;
        let o = self.objects.get_mut(&id).expect("exists");
        o.established_seq = seq;
        o.counted = true;
        let (session, transport, flags, mode) = (o.session, o.transport, o.flags, o.mode);
        if mode == Mode::Kernel {
            if let Some(idle) = self.idle_timeout(transport, flags) {
                self.timers
                    .at(self.clock.now_ns() + idle, timers::Timer::Idle(id));
            }
        }
        self.count_established(session, transport, true);
        self.check_quota(session, transport);
        if self.objects[&id].state == State::Terminated {
            return id;
        }
        let o = &self.objects[&id];
        if o.notify {
            if let Some(c) = &o.caller {
                c.on_established(id, o.context.as_deref());
            }
            self.events.push(Event::Established {
                connection: id,
                parent: (id != owner).then_some(owner),
                session: o.session,
                protocol: o.transport,
                from,
                to,
                context: o.context.clone(),
            });
        }
        id
    }

    /// Learns of connections the datapath established and closed.
    pub fn on_datapath_event(&mut self, ev: &DatapathEvent) {
        if ev.kind == event_kind::CLOSING {
            return self.on_closing(&ev.forward, ev.detail as u8);
        }
        let owner = ev.owner;
        let Some(o) = self.objects.get(&owner) else {
            log::debug!("datapath event for unknown owner {owner}");
            return;
        };
        if o.state == State::Terminated {
            // The packet matched just before the pinhole went: its flows are stale.
            let _ = self.maps.del_flow(&ev.forward);
            let _ = self.maps.del_flow(&ev.reply);
            return;
        }
        match ev.kind {
            event_kind::ESTABLISHED => {
                let from = sa(ev.forward.src_addr, ev.forward.src_port);
                let id =
                    self.connection_made(owner, from, |o| o.flows.extend([ev.forward, ev.reply]));
                self.flow_owner.insert(ev.forward, id);
                self.flow_owner.insert(ev.reply, id);
            }
            event_kind::REPLY_PATH => {
                self.objects
                    .get_mut(&owner)
                    .expect("exists")
                    .flows
                    .push(ev.reply);
                self.flow_owner.insert(ev.reply, owner);
            }
            k => log::debug!("unknown datapath event kind {k}"),
        }
    }

    /// A flow saw its first FIN or RST in one direction (`new`: the
    /// `tcp_seen` bits new on it). The connection stops counting against its
    /// client's quota at once; when both directions have sent FIN, or either
    /// a RST, it ends: its ports go, its flows wait out tcp_closing.
    pub(super) fn on_closing(&mut self, key: &FlowKey, new: u8) {
        use firewall_common::flow::tcp_seen;
        let Some(&id) = self.flow_owner.get(key) else {
            return;
        };
        let Some(o) = self.objects.get_mut(&id) else {
            return;
        };
        if o.state != State::Established {
            return;
        }
        if std::mem::take(&mut o.counted) {
            let (session, transport) = (o.session, o.transport);
            self.count_established(session, transport, false);
            self.check_quota(session, transport);
        }
        let o = self.objects.get_mut(&id).expect("exists");
        if new & tcp_seen::FIN != 0 {
            if let Some(i) = o.flows.iter().position(|k| k == key) {
                o.fins |= 1 << i.min(7);
            }
        }
        let both = o.flows.len() >= 2 && o.fins & 0b11 == 0b11;
        if new & tcp_seen::RST != 0 || both {
            self.terminate_keeping_flows(id, "closed");
        }
    }

    /// Learns of connections the user-mode relay made and ended.
    pub fn on_relay_event(&mut self, ev: RelayEvent) {
        match ev {
            RelayEvent::Established {
                owner,
                conn,
                from,
                to: _,
                bytes,
            } => {
                let Some(o) = self.objects.get(&owner) else {
                    return;
                };
                if o.state == State::Terminated {
                    self.relay.push(RelayCmd::StopConn { owner, conn });
                    return;
                }
                let id = self.connection_made(owner, from, |o| {
                    o.mode = Mode::User;
                    o.relay_conn = Some(conn);
                    o.relayed = Some(bytes);
                });
                self.relay_conns.insert(conn, id);
            }
            RelayEvent::Closed { owner, conn } => {
                let ended = self.relay_conns.get(&conn).copied().filter(|id| {
                    self.objects.get(id).is_some_and(|o| {
                        o.relay_conn == Some(conn) && (*id == owner || o.parent == Some(owner))
                    })
                });
                if let Some(id) = ended {
                    self.relay_conns.remove(&conn);
                    let o = self.objects.get_mut(&id).expect("exists");
                    // The relay has closed it already.
                    o.relay_conn = None;
                    // A single-use object, or a child, ends with its connection.
                    self.terminate(id, "closed");
                }
            }
            RelayEvent::Refused { .. } => self.expired.relay_refused += 1,
            RelayEvent::Denied {
                owner,
                from,
                reason,
            } => {
                log::info!("connection {owner}: the connection from {from} was refused ({reason}); the single-use opening is used up");
                if self
                    .objects
                    .get(&owner)
                    .is_some_and(|o| o.state == State::Listening)
                {
                    self.terminate(owner, reason);
                }
            }
            RelayEvent::Blocked { .. } => self.expired.relay_blocked += 1,
            RelayEvent::Withdrawn { owner, reason } => {
                if self
                    .objects
                    .get(&owner)
                    .is_some_and(|o| o.state == State::Listening)
                {
                    self.terminate(owner, reason);
                }
            }
        }
    }
}
