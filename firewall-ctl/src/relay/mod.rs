//! The user-mode relay: connections that must pass through user space
//! (NO_KERNEL_MODE now; data filters later) are terminated on real sockets of
//! the firewall and their bytes pumped between the two sides.
//!
//! The engine decides and describes the work (`Job`); the relay runs it on the
//! tokio runtime and reports back (`RelayEvent`). The XDP datapath has no
//! pinhole and no flow for these connections, so their packets reach the
//! stack and these sockets.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use nix::{
    fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags},
    unistd::pipe2,
};
use socket2::{SockRef, TcpKeepalive};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, Interest},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpListener, TcpSocket, TcpStream, UdpSocket,
    },
    sync::{mpsc, watch},
    task::AbortHandle,
};

use crate::{
    filters::{Action, Chain, DataFilterFactory, Direction, EmulatedPeer, EventKind, Sockets},
    policy::Transport,
};

/// Bytes a pump holds per direction: a slow reader stops the other side
/// (TCP back-pressure) instead of growing a buffer.
const PUMP_BUFFER: usize = 64 * 1024;
/// Largest datagram relayed.
const DATAGRAM: usize = 65_535;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Receive buffer of a relayed UDP endpoint without INCREASE_RECEIVE_BUFFER.
const DEFAULT_UDP_BUFFER: usize = 16 * 1024;

pub use firewall_core::relay::{Admit, ConnectionHook, Emulation, Job, RelayEvent};

mod emulation;
mod pump;
mod tcp;
mod udp;

pub use pump::{pump, pump_filtered};

/// What an endpoint's task serves, from its job.
struct Service {
    owner: u64,
    admit: Admit,
    /// The client address (None: a placeholder, until set).
    target: watch::Receiver<Option<SocketAddrV4>>,
    source: SocketAddrV4,
    multiple: bool,
    /// UDP: a peer's mapping closes after this much quiet.
    idle: Option<Duration>,
    filters: Vec<Arc<dyn DataFilterFactory>>,
    event: Option<(EventKind, ConnectionHook)>,
}

struct Endpoint {
    task: AbortHandle,
    target: watch::Sender<Option<SocketAddrV4>>,
    /// A connection came through it (what `withdraw` must not undo).
    used: bool,
}

#[derive(Default)]
struct Tasks {
    endpoints: HashMap<u64, Endpoint>,
    conns: HashMap<(u64, u64), AbortHandle>,
    /// Clients at their TCP quota: their new TCP connections are refused.
    busy: HashSet<Ipv4Addr>,
}

/// Runs relay jobs; cheap to clone.
#[derive(Clone)]
pub struct Relay {
    events: mpsc::UnboundedSender<RelayEvent>,
    tasks: Arc<Mutex<Tasks>>,
    next_conn: Arc<AtomicU64>,
}

fn v4(a: SocketAddr) -> SocketAddrV4 {
    match a {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => SocketAddrV4::new(
            a.ip().to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
            a.port(),
        ),
    }
}

/// Closes a TCP socket with a reset (SO_LINGER 0), as an abort should.
fn reset(s: SockRef<'_>) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

fn keepalive(s: &TcpStream) {
    let ka = TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    let _ = SockRef::from(s).set_tcp_keepalive(&ka);
}

impl Relay {
    pub fn new(events: mpsc::UnboundedSender<RelayEvent>) -> Self {
        Self {
            events,
            tasks: Arc::default(),
            next_conn: Arc::new(AtomicU64::new(1)),
        }
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, Tasks> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts serving an endpoint (in the current tokio runtime).
    pub fn start(&self, job: Job) -> io::Result<()> {
        let owner = job.owner;
        let (target_tx, target_rx) = watch::channel(job.target);
        let relay = self.clone();
        let socket = job.socket.and_then(crate::reserve::socket).ok_or_else(|| {
            io::Error::other(format!("no reserved socket for endpoint of {owner}"))
        })?;
        let service = Service {
            owner,
            admit: job.admit,
            target: target_rx,
            source: job.source,
            multiple: job.multiple,
            idle: job.idle,
            filters: job.filters,
            event: job.event.zip(job.hook),
        };
        let task = match job.transport {
            Transport::Tcp => {
                socket.listen(job.backlog.clamp(1, 65535) as i32)?;
                socket.set_nonblocking(true)?;
                let listener = TcpListener::from_std(std::net::TcpListener::from(socket))?;
                tokio::spawn(async move { relay.serve_tcp(listener, service).await })
            }
            Transport::Udp => {
                // The reservation kept the buffer minimal; a relayed endpoint
                // gets a small default, or 64 KiB with INCREASE_RECEIVE_BUFFER.
                socket.set_recv_buffer_size(job.recv_buffer.unwrap_or(DEFAULT_UDP_BUFFER))?;
                socket.set_nonblocking(true)?;
                let socket = UdpSocket::from_std(std::net::UdpSocket::from(socket))?;

                tokio::spawn(async move { relay.serve_udp(Arc::new(socket), service).await })
            }
        };
        self.tasks().endpoints.insert(
            owner,
            Endpoint {
                task: task.abort_handle(),
                target: target_tx,
                used: false,
            },
        );
        Ok(())
    }

    /// Reports a connection made; returns its relayed-bytes counter.
    fn established(
        &self,
        owner: u64,
        conn: u64,
        from: SocketAddrV4,
        to: SocketAddrV4,
    ) -> Arc<AtomicU64> {
        let bytes = Arc::new(AtomicU64::new(0));
        self.send(RelayEvent::Established {
            owner,
            conn,
            from,
            to,
            bytes: bytes.clone(),
        });
        bytes
    }

    /// Marks a client as at its TCP quota, or below it again.
    pub fn set_client_busy(&self, client: Ipv4Addr, busy: bool) {
        let mut t = self.tasks();
        if busy {
            t.busy.insert(client);
        } else {
            t.busy.remove(&client);
        }
    }

    pub fn set_target(&self, owner: u64, target: SocketAddrV4) {
        if let Some(e) = self.tasks().endpoints.get(&owner) {
            let _ = e.target.send(Some(target));
        }
    }

    /// Stops an endpoint and every connection made through it.
    pub fn stop(&self, owner: u64) {
        let mut t = self.tasks();
        if let Some(e) = t.endpoints.remove(&owner) {
            e.task.abort();
        }
        let conns: Vec<(u64, u64)> = t
            .conns
            .keys()
            .filter(|(o, _)| *o == owner)
            .copied()
            .collect();
        for k in conns {
            if let Some(a) = t.conns.remove(&k) {
                a.abort();
            }
        }
    }

    /// Stops an endpoint that no connection came through yet, and reports it
    /// withdrawn; one that was used is left to its connection. Atomic with
    /// `claim`, so a connection being accepted is never cut off.
    pub fn withdraw(&self, owner: u64, reason: &'static str) {
        let mut t = self.tasks();
        if t.endpoints.get(&owner).is_some_and(|e| e.used) {
            return;
        }
        if let Some(e) = t.endpoints.remove(&owner) {
            e.task.abort();
        }
        drop(t);
        self.send(RelayEvent::Withdrawn { owner, reason });
    }

    /// Marks an endpoint used by a connection it admits; false when it was
    /// withdrawn meanwhile (the connection is refused).
    fn claim(&self, owner: u64) -> bool {
        match self.tasks().endpoints.get_mut(&owner) {
            Some(e) => {
                e.used = true;
                true
            }
            None => false,
        }
    }

    /// Stops one connection.
    pub fn stop_conn(&self, owner: u64, conn: u64) {
        if let Some(a) = self.tasks().conns.remove(&(owner, conn)) {
            a.abort();
        }
    }

    fn send(&self, e: RelayEvent) {
        let _ = self.events.send(e);
    }

    fn refuse(&self, owner: u64, from: SocketAddrV4, why: &'static str) {
        log::info!("relay {owner}: refused {from}: {why}");
        self.send(RelayEvent::Refused { owner, from, why });
    }
}
