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
        let task = match job.transport {
            Transport::Tcp => {
                socket.listen(job.backlog.clamp(1, 65535) as i32)?;
                socket.set_nonblocking(true)?;
                let listener = TcpListener::from_std(std::net::TcpListener::from(socket))?;
                tokio::spawn(async move {
                    relay
                        .serve_tcp(
                            listener,
                            job.owner,
                            job.admit,
                            target_rx,
                            job.source,
                            job.multiple,
                            job.filters,
                            job.event.zip(job.hook),
                        )
                        .await
                })
            }
            Transport::Udp => {
                // The reservation kept the buffer minimal; a relayed endpoint
                // gets a small default, or 64 KiB with INCREASE_RECEIVE_BUFFER.
                socket.set_recv_buffer_size(job.recv_buffer.unwrap_or(DEFAULT_UDP_BUFFER))?;
                socket.set_nonblocking(true)?;
                let socket = UdpSocket::from_std(std::net::UdpSocket::from(socket))?;

                tokio::spawn(async move {
                    relay
                        .serve_udp(
                            Arc::new(socket),
                            job.owner,
                            job.admit,
                            target_rx,
                            job.source,
                            job.multiple,
                            job.idle,
                            job.filters,
                            job.event.zip(job.hook),
                        )
                        .await
                })
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

    /// Sets the target of a placeholder endpoint.
    /// Starts an emulated connection (EmulateConnection): connects to the
    /// client and lets the filter's emulator answer in place of `remote`.
    pub fn emulate(&self, job: Emulation) {
        let (owner, conn) = (job.owner, self.next_conn.fetch_add(1, Ordering::Relaxed));
        let relay = self.clone();
        let mut t = self.tasks();
        let task = tokio::spawn(async move { relay.emulated_connection(conn, job).await });
        t.conns.insert((owner, conn), task.abort_handle());
    }

    async fn emulated_connection(self, conn: u64, job: Emulation) {
        let Emulation {
            owner,
            multiple,
            remote,
            target,
            source,
            peer,
        } = job;
        match connect_from(source, target).await {
            Err(e) => {
                log::info!("relay {owner}: emulation: connecting to {target} failed: {e}");
                if !multiple {
                    self.send(RelayEvent::Denied {
                        owner,
                        from: remote,
                        reason: "emulation-failed",
                    });
                }
            }
            Ok(client) => {
                return self
                    .run_emulation(owner, conn, client, remote, target, peer)
                    .await
            }
        }
        self.tasks().conns.remove(&(owner, conn));
        self.send(RelayEvent::Closed { owner, conn });
    }

    /// An emulator talking to the one real socket of an emulated connection
    /// (the client's, or the external peer's for an emulated accept).
    async fn run_emulation(
        self,
        owner: u64,
        conn: u64,
        mut stream: TcpStream,
        from: SocketAddrV4,
        to: SocketAddrV4,
        mut peer: Box<dyn EmulatedPeer>,
    ) {
        let bytes = self.established(owner, conn, from, to);
        match emulate_exchange(&mut stream, peer.as_mut(), &bytes).await {
            Ok(()) => {
                let _ = stream.shutdown().await;
            }
            Err(reason) => {
                log::info!(
                    "relay {owner}: emulator {} ended the connection: {reason}",
                    peer.name()
                );
                reset(SockRef::from(&stream));
            }
        }
        self.tasks().conns.remove(&(owner, conn));
        self.send(RelayEvent::Closed { owner, conn });
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

    #[allow(clippy::too_many_arguments)]
    async fn serve_tcp(
        self,
        listener: TcpListener,
        owner: u64,
        admit: Admit,
        target: watch::Receiver<Option<SocketAddrV4>>,
        source: SocketAddrV4,
        multiple: bool,
        filters: Vec<Arc<dyn DataFilterFactory>>,
        event: Option<(EventKind, ConnectionHook)>,
    ) {
        // Bytes read from the accepted socket come from this side.
        let accepted_from = match admit {
            Admit::Peers(_) => Direction::FromExternal,
            Admit::Client(_) => Direction::FromInternal,
        };
        loop {
            let (peer, from) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    log::warn!("relay {owner}: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let from = v4(from);
            if !admit.allows(*from.ip()) {
                reset(SockRef::from(&peer));
                self.refuse(owner, from, "not an allowed peer");
                continue;
            }
            let Some(to) = *target.borrow() else {
                reset(SockRef::from(&peer));
                self.refuse(owner, from, "the client address is still the placeholder");
                continue;
            };
            let client = match admit {
                Admit::Peers(_) => *to.ip(),
                Admit::Client(_) => *from.ip(),
            };
            if self.tasks().busy.contains(&client) {
                reset(SockRef::from(&peer));
                self.refuse(owner, from, "the client is at its connection quota");
                continue;
            }
            if !self.claim(owner) {
                reset(SockRef::from(&peer));
                return;
            }
            // The accept (bind) or connect (redirect) event: filters may abort
            // the connection or attach data filters to it.
            let mut attached = Vec::new();
            let mut emulator = None;
            if let Some((kind, hook)) = &event {
                let address = if matches!(admit, Admit::Peers(_)) {
                    from
                } else {
                    to
                };
                match hook(owner, *kind, address) {
                    Ok(d) if d.denied_by.is_none() && d.emulated_by.is_none() => {
                        attached = d.data_filters
                    }
                    Ok(d) if d.denied_by.is_none() && d.emulator.is_some() => emulator = d.emulator,
                    outcome => {
                        // Denied, or a handler failed (§15 68): the accept fails
                        // either way, and uses up a single-use opening.
                        let (reason, why) = match outcome {
                            Err(e) => {
                                log::warn!("relay {owner}: {}", e.message);
                                ("filter-failed", "a filter failed handling the connection")
                            }
                            Ok(d) if d.denied_by.is_none() => (
                                "emulated-without-source",
                                "emulated by a filter that gave no data source",
                            ),
                            Ok(_) => ("denied", "denied by a filter"),
                        };
                        reset(SockRef::from(&peer));
                        self.refuse(owner, from, why);
                        if !multiple {
                            let _ = SockRef::from(&listener).shutdown(std::net::Shutdown::Read);
                            self.send(RelayEvent::Denied {
                                owner,
                                from,
                                reason,
                            });
                            std::future::pending::<()>().await;
                        }
                        continue;
                    }
                }
            }
            let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
            let relay = self.clone();
            let chain = Chain::new(&filters).with(attached);
            let task = tokio::spawn(async move {
                match emulator {
                    // An emulated accept: the client is never connected.
                    Some(e) => relay.run_emulation(owner, conn, peer, from, to, e).await,
                    None => {
                        relay
                            .tcp_connection(
                                owner,
                                conn,
                                peer,
                                from,
                                to,
                                source,
                                chain,
                                accepted_from,
                            )
                            .await
                    }
                }
            });
            self.tasks()
                .conns
                .insert((owner, conn), task.abort_handle());
            if !multiple {
                // Single use: stop listening but keep the port bound (reserved);
                // later SYNs are answered with a reset.
                let _ = SockRef::from(&listener).shutdown(std::net::Shutdown::Read);
                std::future::pending::<()>().await;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn tcp_connection(
        self,
        owner: u64,
        conn: u64,
        peer: TcpStream,
        from: SocketAddrV4,
        to: SocketAddrV4,
        source: SocketAddrV4,
        mut chain: Chain,
        accepted_from: Direction,
    ) {
        let client = match connect_from(source, to).await {
            Ok(c) => c,
            Err(e) => {
                log::info!("relay {owner}: connecting {from} to {to} failed: {e}");
                reset(SockRef::from(&peer));
                self.send(RelayEvent::Closed { owner, conn });
                return;
            }
        };
        keepalive(&peer);
        keepalive(&client);
        let bytes = self.established(owner, conn, from, to);
        if !chain.is_empty() {
            if let Some(sockets) = sockets_of(&peer, &client, accepted_from) {
                chain.set_sockets(&sockets);
            }
        }
        if chain.is_empty() {
            pump(peer, client, bytes).await;
        } else if let Err(reason) = pump_filtered(peer, client, bytes, chain, accepted_from).await {
            log::warn!("relay {owner}: a data filter ended the connection from {from}: {reason}");
            self.send(RelayEvent::Blocked {
                owner,
                conn,
                reason,
            });
        }
        self.tasks().conns.remove(&(owner, conn));
        self.send(RelayEvent::Closed { owner, conn });
    }

    #[allow(clippy::too_many_arguments)]
    async fn serve_udp(
        self,
        socket: Arc<UdpSocket>,
        owner: u64,
        admit: Admit,
        target: watch::Receiver<Option<SocketAddrV4>>,
        source: SocketAddrV4,
        multiple: bool,
        idle: Option<Duration>,
        filters: Vec<Arc<dyn DataFilterFactory>>,
        event: Option<(EventKind, ConnectionHook)>,
    ) {
        let peer_side = match admit {
            Admit::Peers(_) => Direction::FromExternal,
            Admit::Client(_) => Direction::FromInternal,
        };
        let target_side = match peer_side {
            Direction::FromExternal => Direction::FromInternal,
            Direction::FromInternal => Direction::FromExternal,
        };
        // One connected socket toward the target per peer, with its filters.
        type Mapping = (Arc<UdpSocket>, u64, Option<Arc<Mutex<Chain>>>);
        let mut peers: HashMap<SocketAddrV4, Mapping> = HashMap::new();
        let mut used = false;
        let mut buf = vec![0u8; DATAGRAM];
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    log::debug!("relay {owner}: recv: {e}");
                    continue;
                }
            };
            let from = v4(from);
            peers.retain(|_, (_, c, _)| self.tasks().conns.contains_key(&(owner, *c)));
            if let Some((inner, conn, chain)) = peers.get(&from) {
                match filter_datagram(chain.as_ref(), peer_side, &buf[..n]) {
                    Ok(d) if d.is_empty() => {}
                    Ok(d) => {
                        let _ = inner.send(&d).await;
                    }
                    Err(reason) => {
                        self.send(RelayEvent::Blocked {
                            owner,
                            conn: *conn,
                            reason,
                        });
                        self.stop_conn(owner, *conn);
                        self.send(RelayEvent::Closed { owner, conn: *conn });
                    }
                }
                continue;
            }
            if !admit.allows(*from.ip()) {
                self.refuse(owner, from, "not an allowed peer");
                continue;
            }
            if used && !multiple {
                self.refuse(owner, from, "single use: another peer was admitted");
                continue;
            }
            let Some(to) = *target.borrow() else {
                self.refuse(owner, from, "the client address is still the placeholder");
                continue;
            };
            // A new destination (redirects: fwx_Udp_Destination): filters may
            // refuse it (its datagrams are dropped) or attach data filters.
            let mut attached = Vec::new();
            if let Some((kind, hook)) = &event {
                match hook(owner, *kind, to) {
                    Ok(d) if d.denied_by.is_some() => {
                        self.refuse(owner, from, "denied by a filter");
                        continue;
                    }
                    Ok(d) => attached = d.data_filters,
                    Err(e) => {
                        log::warn!("relay {owner}: {}", e.message);
                        self.refuse(owner, from, "a filter failed handling the destination");
                        continue;
                    }
                }
            }
            let inner = match async {
                let s = UdpSocket::bind(SocketAddr::V4(source)).await?;
                s.connect(SocketAddr::V4(to)).await?;
                Ok::<_, io::Error>(Arc::new(s))
            }
            .await
            {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("relay {owner}: UDP socket toward {to}: {e}");
                    continue;
                }
            };
            if !self.claim(owner) {
                return;
            }
            used = true;
            let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
            let chain = (!filters.is_empty() || !attached.is_empty()).then(|| {
                let mut chain = Chain::new(&filters).with(attached);
                if let (Ok(here), Ok(there)) = (socket.local_addr(), inner.local_addr()) {
                    chain.set_sockets(&oriented(peer_side, (v4(here), from), (v4(there), to)));
                }
                Arc::new(Mutex::new(chain))
            });
            let first = filter_datagram(chain.as_ref(), peer_side, &buf[..n]);
            if let Ok(d) = &first {
                if !d.is_empty() {
                    let _ = inner.send(d).await;
                }
            }
            let bytes = self.established(owner, conn, from, to);
            bytes.fetch_add(n as u64, Ordering::Relaxed);
            if let Err(reason) = first {
                self.send(RelayEvent::Blocked {
                    owner,
                    conn,
                    reason,
                });
                self.send(RelayEvent::Closed { owner, conn });
                continue;
            }
            let relay = self.clone();
            let (out, back, back_chain) = (socket.clone(), inner.clone(), chain.clone());
            let task = tokio::spawn(async move {
                let mut buf = vec![0u8; DATAGRAM];
                loop {
                    let got = match idle {
                        Some(d) => match tokio::time::timeout(d, back.recv(&mut buf)).await {
                            Ok(r) => r,
                            Err(_) => break,
                        },
                        None => back.recv(&mut buf).await,
                    };
                    match got {
                        Ok(n) => match filter_datagram(back_chain.as_ref(), target_side, &buf[..n])
                        {
                            Ok(d) => {
                                bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                                if !d.is_empty() {
                                    let _ = out.send_to(&d, SocketAddr::V4(from)).await;
                                }
                            }
                            Err(reason) => {
                                relay.send(RelayEvent::Blocked {
                                    owner,
                                    conn,
                                    reason,
                                });
                                break;
                            }
                        },
                        // ICMP errors from the target (port unreachable) are not fatal.
                        Err(_) => continue,
                    }
                }
                relay.tasks().conns.remove(&(owner, conn));
                relay.send(RelayEvent::Closed { owner, conn });
            });
            self.tasks()
                .conns
                .insert((owner, conn), task.abort_handle());
            peers.insert(from, (inner, conn, chain));
        }
    }
}

/// A datagram through a connection's filters (none: unchanged).
fn filter_datagram(
    chain: Option<&Arc<Mutex<Chain>>>,
    dir: Direction,
    data: &[u8],
) -> Result<Vec<u8>, String> {
    match chain {
        None => Ok(data.to_vec()),
        Some(c) => match c
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .data(dir, data.to_vec())
        {
            Action::Forward(d) => Ok(d),
            Action::Close(reason) => Err(reason),
        },
    }
}

/// `pump` with a data-filter chain between the sides: every byte passes the
/// filters, which may change, hold or end the stream. `accepted_from` says
/// which side `a` is. Ends with the reason when a filter closed it.
pub async fn pump_filtered(
    a: TcpStream,
    b: TcpStream,
    bytes: Arc<AtomicU64>,
    chain: Chain,
    accepted_from: Direction,
) -> Result<(), String> {
    let other_side = match accepted_from {
        Direction::FromExternal => Direction::FromInternal,
        Direction::FromInternal => Direction::FromExternal,
    };
    let chain = Mutex::new(chain);
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let ab = one_way_filtered(ar, bw, accepted_from, &chain, bytes.clone());
    let ba = one_way_filtered(br, aw, other_side, &chain, bytes);
    tokio::pin!(ab, ba);
    let (first, other) = tokio::select! {
        r = &mut ab => (r, ba),
        r = &mut ba => (r, ab),
    };
    let end = match first {
        Ok(()) => other.await,
        e => e,
    };
    match end {
        Ok(()) => Ok(()),
        Err(Stop::Filter(reason)) => Err(reason),
        Err(Stop::Io(e)) => {
            log::debug!("relay pump ended: {e}");
            Ok(())
        }
    }
}

enum Stop {
    Io(io::Error),
    Filter(String),
}

async fn one_way_filtered(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    dir: Direction,
    chain: &Mutex<Chain>,
    bytes: Arc<AtomicU64>,
) -> Result<(), Stop> {
    let mut buf = vec![0u8; PUMP_BUFFER];
    let lock = || chain.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let (action, eof) = match from.read(&mut buf).await {
            Ok(0) => (lock().end(dir), true),
            Ok(n) => (lock().data(dir, buf[..n].to_vec()), false),
            Err(e) => {
                reset(SockRef::from(to.as_ref()));
                to.forget();
                return Err(Stop::Io(e));
            }
        };
        match action {
            Action::Forward(out) => {
                if let Err(e) = to.write_all(&out).await {
                    reset(SockRef::from(from.as_ref()));
                    reset(SockRef::from(to.as_ref()));
                    to.forget();
                    return Err(Stop::Io(e));
                }
                bytes.fetch_add(out.len() as u64, Ordering::Relaxed);
            }
            Action::Close(reason) => {
                // A filter ends the connection: both sides are reset.
                reset(SockRef::from(from.as_ref()));
                reset(SockRef::from(to.as_ref()));
                to.forget();
                return Err(Stop::Filter(reason));
            }
        }
        if eof {
            let _ = to.shutdown().await;
            return Ok(());
        }
    }
}

/// Connects to `to` from `source` (port 0: any), within CONNECT_TIMEOUT.
async fn connect_from(source: SocketAddrV4, to: SocketAddrV4) -> io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::V4(source))?;
    tokio::time::timeout(CONNECT_TIMEOUT, s.connect(SocketAddr::V4(to)))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Plays an emulated connection: the emulator's answers go to the client,
/// the client's bytes to the emulator. `Err` carries why it ended abnormally.
async fn emulate_exchange(
    client: &mut TcpStream,
    peer: &mut dyn EmulatedPeer,
    bytes: &AtomicU64,
) -> Result<(), String> {
    let mut answer = peer.on_connected();
    let mut buf = vec![0u8; PUMP_BUFFER];
    loop {
        let out = match answer {
            Action::Forward(b) => b,
            Action::Close(reason) => return Err(reason),
        };
        if !out.is_empty() {
            client.write_all(&out).await.map_err(|e| e.to_string())?;
            bytes.fetch_add(out.len() as u64, Ordering::Relaxed);
        }
        let n = client.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return match peer.on_client_end() {
                Action::Forward(b) => {
                    client.write_all(&b).await.map_err(|e| e.to_string())?;
                    bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                    Ok(())
                }
                Action::Close(reason) => Err(reason),
            };
        }
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        answer = peer.on_client_data(buf[..n].to_vec());
    }
}

/// The sockets of a relayed TCP connection as its data filters see them: the
/// accepted socket is external for binds, internal for redirects.
fn sockets_of(accepted: &TcpStream, made: &TcpStream, accepted_from: Direction) -> Option<Sockets> {
    Some(oriented(
        accepted_from,
        (
            v4(accepted.local_addr().ok()?),
            v4(accepted.peer_addr().ok()?),
        ),
        (v4(made.local_addr().ok()?), v4(made.peer_addr().ok()?)),
    ))
}

/// Sockets from the (own address, peer) of the socket that received the
/// connection and of the one the relay made: the receiving one is external
/// for binds (`FromExternal`), internal for redirects.
fn oriented(
    received_from: Direction,
    received: (SocketAddrV4, SocketAddrV4),
    made: (SocketAddrV4, SocketAddrV4),
) -> Sockets {
    let (ext, int) = match received_from {
        Direction::FromExternal => (received, made),
        Direction::FromInternal => (made, received),
    };
    Sockets {
        external_name: ext.0,
        external_peer: ext.1,
        internal_name: int.0,
        internal_peer: int.1,
    }
}

/// Moves bytes both ways until both sides are done. A half-close (FIN) is
/// passed on as one; a reset on either side resets the other.
pub async fn pump(a: TcpStream, b: TcpStream, bytes: Arc<AtomicU64>) {
    // Both directions run in this task: cancelling it (Kill) closes both
    // sockets at once.
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let ab = one_way_spliced(ar, bw, bytes.clone());
    let ba = one_way_spliced(br, aw, bytes);
    tokio::pin!(ab, ba);
    let (first, other) = tokio::select! {
        r = &mut ab => (r, ba),
        r = &mut ba => (r, ab),
    };
    log::debug!("relay pump: first direction ended: {first:?}");
    if first.is_ok() {
        let _ = other.await;
    }
    // On an error the other direction is dropped here, unfinished: its
    // socket closes too (with a reset where one was set).
}

/// One direction without copying through user space: splice(2) moves the
/// bytes socket → pipe → socket inside the kernel. Same half-close and reset
/// handling as `one_way`, which it falls back to if no pipe can be made.
async fn one_way_spliced(
    from: OwnedReadHalf,
    to: OwnedWriteHalf,
    bytes: Arc<AtomicU64>,
) -> io::Result<()> {
    let Ok((pipe_out, pipe_in)) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) else {
        return one_way(from, to, bytes).await;
    };
    // A pipe holds 64 KiB by default; asking for more is only an optimisation.
    let _ = fcntl(
        pipe_in.as_raw_fd(),
        FcntlArg::F_SETPIPE_SZ(PUMP_BUFFER as i32),
    );
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let src = from.as_ref();
        let filled = loop {
            if let Err(e) = src.readable().await {
                break Err(e);
            }
            match src.try_io(Interest::READABLE, || {
                splice(src, None, &pipe_in, None, PUMP_BUFFER, flags).map_err(io::Error::from)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => break r,
            }
        };
        let n = match filled {
            Ok(0) => return reading_ended(to, Ok(())).await,
            Ok(n) => n,
            Err(e) => return reading_ended(to, Err(e)).await,
        };
        // The pipe is drained completely before the next fill.
        let mut left = n;
        while left > 0 {
            let dst = to.as_ref();
            let r = match dst.writable().await {
                Ok(()) => dst.try_io(Interest::WRITABLE, || {
                    splice(&pipe_out, None, dst, None, left, flags).map_err(io::Error::from)
                }),
                Err(e) => Err(e),
            };
            match r {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return writing_failed(&from, to, e),
            }
        }
        bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The read side of a direction ended: a FIN is passed on as a half-close
/// (the other side may still send); an error resets the other side.
async fn reading_ended(mut to: OwnedWriteHalf, read: io::Result<()>) -> io::Result<()> {
    match read {
        Ok(()) => {
            let _ = to.shutdown().await;
            Ok(())
        }
        Err(e) => {
            reset(SockRef::from(to.as_ref()));
            // Dropping a write half sends a FIN first; the close must be the reset.
            to.forget();
            Err(e)
        }
    }
}

/// Writing failed: both sockets are reset.
fn writing_failed(from: &OwnedReadHalf, to: OwnedWriteHalf, e: io::Error) -> io::Result<()> {
    reset(SockRef::from(from.as_ref()));
    reset(SockRef::from(to.as_ref()));
    to.forget();
    Err(e)
}

/// One direction, copying through a buffer.
async fn one_way(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    bytes: Arc<AtomicU64>,
) -> io::Result<()> {
    let mut buf = vec![0u8; PUMP_BUFFER];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => return reading_ended(to, Ok(())).await,
            Ok(n) => n,
            Err(e) => return reading_ended(to, Err(e)).await,
        };
        if let Err(e) = to.write_all(&buf[..n]).await {
            return writing_failed(&from, to, e);
        }

        bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap());
        let (a, b) = tokio::join!(l.accept(), c);
        (a.unwrap().0, b.unwrap())
    }

    /// peer <-> [x | pump | y] <-> client
    async fn relayed() -> (TcpStream, TcpStream, Arc<AtomicU64>) {
        let (peer, x) = pair().await;
        let (y, client) = pair().await;
        let bytes = Arc::new(AtomicU64::new(0));
        tokio::spawn(pump(x, y, bytes.clone()));
        (peer, client, bytes)
    }

    #[tokio::test]
    async fn bytes_both_ways_and_half_close() {
        let (mut peer, mut client, bytes) = relayed().await;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let d2 = data.clone();
        let writer = tokio::spawn(async move {
            peer.write_all(&d2).await.unwrap();
            peer.shutdown().await.unwrap(); // half-close
            let mut back = Vec::new();
            peer.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "byte for byte");
        // After the peer's FIN the client can still answer.
        client.write_all(b"after half-close").await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"after half-close");
        assert_eq!(bytes.load(Ordering::Relaxed), data.len() as u64 + 16);
    }

    #[tokio::test]
    async fn a_reset_on_either_side_reaches_the_other() {
        for peer_resets in [true, false] {
            let (peer, client, _) = relayed().await;
            let (resetting, mut other) = if peer_resets {
                (peer, client)
            } else {
                (client, peer)
            };
            reset(SockRef::from(&resetting));
            drop(resetting);
            let mut buf = [0u8; 16];
            let r = other.read(&mut buf).await;
            assert!(
                matches!(r, Err(ref e) if e.kind() == io::ErrorKind::ConnectionReset),
                "peer resets: {peer_resets}: {r:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_slow_reader_holds_the_sender_back() {
        let (mut peer, mut client, bytes) = relayed().await;
        // The client reads nothing: the peer can only get so far ahead
        // (socket buffers plus the pump's bounded buffer), then blocks.
        let sent = Arc::new(AtomicU64::new(0));
        let s2 = sent.clone();
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            loop {
                if peer.write_all(&chunk).await.is_err() {
                    break;
                }
                s2.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stalled = sent.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            sent.load(Ordering::Relaxed),
            stalled,
            "the sender is blocked"
        );
        assert!(
            stalled < 64 * 1024 * 1024,
            "bounded: {stalled} bytes in flight"
        );
        // Reading drains it and nothing is lost.
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        while total < stalled {
            let n = client.read(&mut buf).await.unwrap();
            assert!(buf[..n].iter().all(|b| *b == 7));
            total += n as u64;
        }
        writer.abort();
        assert!(bytes.load(Ordering::Relaxed) >= stalled);
    }
}
