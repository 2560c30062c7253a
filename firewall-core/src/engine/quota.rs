//! The per-client quota of live secondary connections.

use super::*;

impl<M: Maps> Engine<M> {
    /// How many live secondary connections of `client` over `transport`
    /// count against its quota.
    pub fn quota_count(&self, client: Ipv4Addr, transport: Transport) -> usize {
        self.established_count
            .get(&(client, transport))
            .copied()
            .unwrap_or(0)
    }

    /// Keeps the number of established connections per client and transport
    /// (what the quota compares), so no check has to scan the objects.
    pub(super) fn count_established(&mut self, session: u64, transport: Transport, up: bool) {
        let Some(client) = self.sessions.get(&session).map(|s| s.client) else {
            return;
        };
        let key = (client, transport);
        let n = self.established_count.entry(key).or_default();
        if up {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.established_count.remove(&key);
            }
        }
    }

    /// The per-client quota: a client with `client_quota`
    /// established TCP secondaries is marked busy, so the datapath and the
    /// relay refuse its next ones until one ends; a UDP secondary beyond the
    /// quota ends the client's oldest UDP one instead.
    pub(super) fn check_quota(&mut self, session: u64, transport: Transport) {
        let Some(client) = self.sessions.get(&session).map(|s| s.client) else {
            return;
        };
        let count = self
            .established_count
            .get(&(client, transport))
            .copied()
            .unwrap_or(0);
        let quota = self.cfg.client_quota as usize;
        match transport {
            Transport::Udp => {
                if count > quota {
                    // Rare (only beyond the quota): find the oldest.
                    let mut established: Vec<(u64, u64)> = self
                        .objects
                        .iter()
                        .filter(|(_, o)| {
                            o.state == State::Established
                                && o.transport == transport
                                && self.sessions.get(&o.session).map(|s| s.client) == Some(client)
                        })
                        .map(|(id, o)| (o.established_seq, *id))
                        .collect();
                    established.sort_unstable();
                    let excess = established.len() - quota;
                    for (_, id) in established.into_iter().take(excess) {
                        log::info!("client {client}: UDP quota of {quota} reached; ending its oldest mapping, connection {id}");
                        self.expired.client_quota += 1;
                        self.terminate(id, "client-quota");
                    }
                }
            }
            Transport::Tcp => {
                let busy = count >= quota;
                if busy == self.busy_clients.contains(&client) {
                    return;
                }
                let value = busy.then_some(BusyClientValue {
                    established_tcp: count as u32,
                    quota: self.cfg.client_quota,
                });
                if let Err(e) = self.maps.set_client_busy(client, value) {
                    log::warn!("client {client}: updating BUSY_CLIENTS: {e:#}");
                    return;
                }
                if busy {
                    log::info!("client {client}: TCP quota of {quota} concurrent secondary connections reached; refusing new ones");
                    self.busy_clients.insert(client);
                } else {
                    log::info!("client {client}: below its TCP quota again");
                    self.busy_clients.remove(&client);
                }
                self.relay.push(RelayCmd::ClientBusy { client, busy });
            }
        }
    }
}
