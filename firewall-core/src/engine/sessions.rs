//! Sessions (one per client address), and the limits a session's calls meet:
//! its client's quota, its pinholes waiting.

use super::*;

impl<M: Maps> Engine<M> {
    // ----- sessions -----

    /// The session of a SecureNAT client (one per client address): the open
    /// one if there is one, else a new one.
    pub fn open_session(&mut self, client: Ipv4Addr) -> Result<u64, ApiError> {
        policy::check_unicast("client", client, &self.cfg.own_addrs())?;
        if !self.cfg.is_internal(client) {
            return Err(invalid(format!(
                "client {client} is not on an internal network ({})",
                nets(&self.cfg.internal_networks)
            )));
        }
        if let Some(id) = self.by_client.get(&client) {
            return Ok(*id);
        }
        let id = self.new_id();
        self.sessions.insert(
            id,
            Session {
                client,
                terminated: false,
            },
        );
        self.by_client.insert(client, id);
        Ok(id)
    }

    /// Ends a session and everything it owns. Closing it again is fine.
    pub fn close_session(&mut self, id: u64) -> Result<(), ApiError> {
        let s = self
            .sessions
            .get_mut(&id)
            .ok_or_else(|| invalid(format!("no session {id}")))?;
        if s.terminated {
            return Ok(());
        }
        s.terminated = true;
        let client = s.client;
        self.by_client.remove(&client);
        self.sessions_closed
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        let owned: Vec<u64> = self
            .objects
            .iter()
            .filter(|(_, o)| o.session == id && o.parent.is_none())
            .map(|(k, _)| *k)
            .collect();
        for o in owned {
            self.terminate(o, "session closed");
        }
        Ok(())
    }

    /// A new TCP secondary for a client at its quota is refused at the call
    /// (the FTP filter then answers 425), not only by the datapath, which
    /// would drop the connection's SYN after the client was told to connect.
    pub(super) fn check_not_busy(&self, client: Ipv4Addr, t: Transport) -> Result<(), ApiError> {
        if t == Transport::Tcp && self.busy_clients.contains(&client) {
            return Err(err(
                ErrorKind::Busy,
                format!(
                    "client {client} has its quota of {} concurrent secondary TCP connections",
                    self.cfg.client_quota
                ),
            ));
        }
        Ok(())
    }

    /// A session may have `max_pending` pinholes waiting at once (an FTP
    /// control connection keeps one): a call beyond it is refused.
    pub(super) fn check_pending(&mut self, session: u64, n: usize) -> Result<(), ApiError> {
        let waiting = self.pending.get(&session).copied().unwrap_or(0);
        if waiting + n > self.cfg.max_pending as usize {
            self.expired.pending_refused += 1;
            return Err(err(
                ErrorKind::Exhausted,
                format!(
                    "session {session} has {waiting} pinholes waiting for their connection; at most {} (policy.max_pending_per_session)",
                    self.cfg.max_pending
                ),
            ));
        }
        Ok(())
    }

    /// An object of `session` stopped waiting for its connection.
    pub(super) fn no_longer_pending(&mut self, session: u64) {
        if let Some(n) = self.pending.get_mut(&session) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pending.remove(&session);
            }
        }
    }

    pub(super) fn live_session(&self, id: u64) -> Result<Ipv4Addr, ApiError> {
        match self.sessions.get(&id) {
            None => Err(invalid(format!("no session {id}"))),
            Some(s) if s.terminated => Err(err(
                ErrorKind::Terminating,
                format!("session {id} is terminated"),
            )),
            Some(s) => Ok(s.client),
        }
    }

    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.sessions
            .iter()
            .map(|(id, s)| SessionInfo {
                id: *id,
                client: s.client,
                terminated: s.terminated,
                objects: self.objects.values().filter(|o| o.session == *id).count(),
            })
            .collect()
    }
}
