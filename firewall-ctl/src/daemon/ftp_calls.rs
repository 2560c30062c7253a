//! The FTP filter's calls into the engine, made from the interception's own
//! thread: they wait there for the engine's answer, so each costs the proxy
//! a round trip to the engine's thread. A client host's session is the same
//! for every control connection until it is closed, so it is remembered
//! here instead of asked for at every control connection.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use crate::{
    api::ApiError,
    datapath::KernelMaps,
    engine::{BindRequest, BindResult, RedirectRequest, RedirectResult},
    engine_owner::EngineHandle,
    ftp::Secondaries,
    routing::Resolver,
};

/// Client hosts remembered at most; past it the memory starts over.
const SESSIONS_REMEMBERED: usize = 65_536;

pub(super) struct FtpCalls {
    engine: EngineHandle<KernelMaps>,
    neighbours: Arc<Resolver>,
    internal_ifindex: u32,
    sessions: Sessions,
}

impl FtpCalls {
    /// The calls of the running daemon's FTP filter (its count of closed
    /// sessions: `Engine::sessions_closed`).
    pub(super) fn for_daemon(shared: &super::Shared) -> Self {
        Self {
            engine: shared.engine.clone(),
            neighbours: shared.neighbours.clone(),
            internal_ifindex: shared.internal.index,
            sessions: Sessions::new(shared.sessions_closed.clone()),
        }
    }
}

impl Secondaries for FtpCalls {
    fn session(&self, client: Ipv4Addr) -> Result<u64, ApiError> {
        self.sessions.get_or_open(client, || {
            self.engine.call_blocking(move |e| e.open_session(client))?
        })
    }

    fn bind_for_client(&self, req: &BindRequest) -> Result<BindResult, ApiError> {
        let req = req.clone();
        let r = self
            .engine
            .call_blocking(move |e| e.bind_for_client(&req))??;
        for c in &r.connections {
            self.neighbours
                .resolve(self.internal_ifindex, *c.client.ip());
        }
        Ok(r)
    }

    fn redirect_connections(&self, req: &RedirectRequest) -> Result<RedirectResult, ApiError> {
        let req = req.clone();
        self.engine
            .call_blocking(move |e| e.redirect_connections(&req))?
    }

    fn redirect_connections_at(
        &self,
        req: &RedirectRequest,
        internal_port: u16,
    ) -> Result<RedirectResult, ApiError> {
        let req = req.clone();
        self.engine
            .call_blocking(move |e| e.redirect_connections_at(&req, Some(internal_port)))?
    }

    fn withdraw_unused(&self, ids: &[u64]) {
        let ids = ids.to_vec();
        self.engine
            .send(move |e| e.withdraw_unused(&ids, "control connection ended"));
    }
}

/// The session of each client host as the engine answered it, with the
/// engine's count of closed sessions at the time: once that count moved,
/// any of them may be gone, and each is asked for again.
struct Sessions {
    closed: Arc<AtomicU64>,
    known: Mutex<HashMap<Ipv4Addr, (u64, u64)>>,
}

impl Sessions {
    fn new(closed: Arc<AtomicU64>) -> Self {
        Self {
            closed,
            known: Mutex::new(HashMap::new()),
        }
    }

    /// The remembered session of `client`, or the one `open` gets (not
    /// remembered if it fails). No lock is held while `open` runs.
    fn get_or_open(
        &self,
        client: Ipv4Addr,
        open: impl FnOnce() -> Result<u64, ApiError>,
    ) -> Result<u64, ApiError> {
        // Read before asking: a close racing with `open` leaves an entry of
        // the older count, asked for again next time.
        let closed = self.closed.load(Ordering::Acquire);
        if let Some(&(id, at)) = self.lock().get(&client) {
            if at == closed {
                return Ok(id);
            }
        }
        let id = open()?;
        let mut known = self.lock();
        if known.len() >= SESSIONS_REMEMBERED {
            known.clear();
        }
        known.insert(client, (id, closed));
        Ok(id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Ipv4Addr, (u64, u64)>> {
        // The map holds no invariant a panic could break halfway.
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ErrorKind;

    #[test]
    fn a_session_is_asked_for_once_until_one_is_closed() {
        let closed = Arc::new(AtomicU64::new(0));
        let s = Sessions::new(closed.clone());
        let (a, b): (Ipv4Addr, Ipv4Addr) =
            ("10.1.0.2".parse().unwrap(), "10.1.0.3".parse().unwrap());
        let asked = std::cell::Cell::new(0);
        let open = |id| {
            asked.set(asked.get() + 1);
            Ok(id)
        };
        assert_eq!(s.get_or_open(a, || open(7)).unwrap(), 7);
        assert_eq!(s.get_or_open(a, || open(99)).unwrap(), 7, "remembered");
        assert_eq!(s.get_or_open(b, || open(8)).unwrap(), 8);
        assert_eq!(asked.get(), 2);
        // A session was closed somewhere: every client is asked for again.
        closed.fetch_add(1, Ordering::Release);
        assert_eq!(s.get_or_open(a, || open(9)).unwrap(), 9);
        assert_eq!(s.get_or_open(a, || open(99)).unwrap(), 9);
        assert_eq!(s.get_or_open(b, || open(10)).unwrap(), 10);
        assert_eq!(asked.get(), 4);
    }

    #[test]
    fn a_refused_session_is_not_remembered() {
        let s = Sessions::new(Arc::new(AtomicU64::new(0)));
        let c: Ipv4Addr = "192.0.2.9".parse().unwrap();
        let refused = || Err(ApiError::new(ErrorKind::InvalidArgument, "not internal"));
        assert!(s.get_or_open(c, refused).is_err());
        assert_eq!(s.get_or_open(c, || Ok(3)).unwrap(), 3);
    }
}
