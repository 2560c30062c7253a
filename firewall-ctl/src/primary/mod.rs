//! Primary connections of filtered protocols, intercepted transparently.
//!
//! An internal client's connection to an external server's FTP port is
//! terminated here without any client configuration, and the daemon connects
//! to the server from the firewall's external address; the FTP filter sits in
//! between. How the packets get here without netfilter:
//!
//! 1. the TC program `tc_internal` assigns the SYN to our transparent
//!    listener (`bpf_sk_assign`) and marks it, and marks the later segments
//!    of sockets bound to exactly their destination;
//! 2. a policy-routing rule (`ip rule fwmark MARK lookup TABLE`, TABLE
//!    holding `local 0.0.0.0/0 dev lo`) delivers marked packets locally;
//! 3. the accepted socket's local address is the server's: the original
//!    destination, with no table to look it up in.
//!
//! A published FTP server's control connections come to a listener of the
//! daemon on the external address (the published port): the daemon connects
//! to the server from the firewall's internal address, and the FTP filter
//! works in its published role (a full proxy).

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{bail, Context as _};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::{
    io::Interest,
    net::{TcpListener, TcpSocket, TcpStream},
};
use tracing::Instrument as _;

use crate::ftp::{Control, ControlState, FtpStats, Output, Secondaries};

mod kernel_lines;
mod sockets;
pub use kernel_lines::HandedLines;
use kernel_lines::{KernelLines, Side};
use sockets::{
    out_of_descriptors, read_once, reset, send, shutdown_write, ClientSide, Spare, TOO_MANY,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The listener the TC program hands intercepted SYNs to: loopback, any
/// port, transparent (its connections answer from the servers' addresses).
pub fn listener() -> anyhow::Result<(std::net::TcpListener, SocketAddrV4)> {
    let s = Socket::new(Domain::IPV4, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    s.set_ip_transparent(true)
        .context("IP_TRANSPARENT on the interception listener (needs CAP_NET_ADMIN)")?;
    s.bind(&SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0).into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    let addr = s
        .local_addr()?
        .as_socket_ipv4()
        .context("the interception listener has no IPv4 address")?;
    Ok((s.into(), addr))
}

/// The proxy of intercepted control connections, on a thread of its own
/// with a single-threaded runtime: a control connection is a ping-pong of
/// short lines, and on one thread each exchange costs one wake-up instead
/// of hand-offs between worker threads (measured: most of a session's cost).
pub struct Proxy {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    handover: Arc<HandOver>,
}

/// A control connection handed from a daemon that restarts to the next one:
/// its two sockets and the filter's state between two reads.
pub struct Handed {
    pub client: std::net::TcpStream,
    pub server: std::net::TcpStream,
    pub state: ControlState,
    /// Its sockets' slots in the kernel's line forwarding, if they have.
    pub lines: Option<HandedLines>,
}

/// Control connections' hand-over: asked of every connection's task, which
/// leaves its sockets and state here at its next quiet moment.
struct HandOver {
    asked: tokio::sync::watch::Sender<bool>,
    handed: Mutex<Vec<Handed>>,
    /// Control connections' tasks running.
    live: AtomicUsize,
    controls: Arc<Controls>,
}

/// The control connections being proxied, by their (client, server)
/// endpoints as the client sees them (the server's as dialled): whether
/// each is a published server's, which the daemon dials from its internal
/// address (full proxy mode). What `connection-flags` answers from.
#[derive(Default)]
pub struct Controls(Mutex<HashMap<(SocketAddrV4, SocketAddrV4), bool>>);

impl Controls {
    /// Some(published) while the control connection is proxied.
    pub fn published(&self, client: SocketAddrV4, server: SocketAddrV4) -> Option<bool> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(client, server)).copied()
    }
}

/// The endpoint a control connection's client dialled, from the local
/// address of the firewall's client-side socket (a published server's is the
/// firewall's, not the server's): what `Controls` lists it under.
fn dialled(local: std::io::Result<SocketAddr>, server: SocketAddrV4) -> SocketAddrV4 {
    match local {
        Ok(SocketAddr::V4(a)) => a,
        _ => server,
    }
}

/// Counts a control connection's task while it runs, and lists it.
struct Live(Arc<HandOver>, (SocketAddrV4, SocketAddrV4));

impl Live {
    fn new(h: &Arc<HandOver>, client: SocketAddrV4, server: SocketAddrV4, published: bool) -> Self {
        h.live.fetch_add(1, SeqCst);
        let mut map = h.controls.0.lock().unwrap_or_else(|p| p.into_inner());
        map.insert((client, server), published);
        Self(h.clone(), (client, server))
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let mut map = self.0.controls.0.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&self.1);
        drop(map);
        self.0.live.fetch_sub(1, SeqCst);
    }
}

/// How long a hand-over waits for connections busy with a transfer of
/// control data (a line being written to a slow peer).
const HANDOVER_WAIT: Duration = Duration::from_secs(2);

impl Proxy {
    /// Starts the proxy; `resumed` are control connections a previous daemon
    /// handed over, filtered on from where it stopped.
    pub fn start(
        listener: std::net::TcpListener,
        ctx: Arc<Interception>,
        resumed: Vec<Handed>,
        published: Vec<PublishedFtp>,
        controls: Arc<Controls>,
    ) -> anyhow::Result<Self> {
        let handover = Arc::new(HandOver {
            asked: tokio::sync::watch::channel(false).0,
            handed: Mutex::new(Vec::new()),
            live: AtomicUsize::new(0),
            controls,
        });
        let ho = handover.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("the interception's runtime")?;
        let thread = std::thread::Builder::new()
            .name("ftp-proxy".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            log::error!("interception listener: {e}");
                            return;
                        }
                    };
                    for p in published {
                        match TcpListener::from_std(p.listener) {
                            Ok(l) => {
                                tokio::spawn(serve(l, Some(p.server), ctx.clone(), ho.clone()));
                            }
                            Err(e) => log::error!("published FTP server {}: {e}", p.server),
                        }
                    }
                    for h in resumed {
                        let (client, server) = (h.state.client, h.state.server);
                        let dialled = dialled(h.client.local_addr(), server);
                        let live = Live::new(&ho, client, dialled, h.state.published);
                        let ctx = ctx.clone();
                        spawn_control(client, server, async move {
                            if let Err(e) = resume(h, &ctx, live).await {
                                log::warn!("ftp {client} → {server}: not resumed: {e:#}");
                            }
                            Ok(())
                        });
                    }
                    tokio::select! {
                        _ = serve(listener, None, ctx, ho) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime ends every control connection's task.
            })
            .context("starting the interception thread")?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
            handover,
        })
    }

    /// Stops, handing the control connections over instead of ending them:
    /// each leaves its sockets and state at its next quiet moment (within
    /// HANDOVER_WAIT); the ones that do not are ended.
    pub fn hand_over(self) -> Vec<Handed> {
        let ho = self.handover.clone();
        ho.asked.send_replace(true);
        let start = std::time::Instant::now();
        while ho.live.load(SeqCst) > 0 && start.elapsed() < HANDOVER_WAIT {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.stop();
        let handed = std::mem::take(&mut *ho.handed.lock().unwrap_or_else(|p| p.into_inner()));
        handed
    }

    /// Stops accepting and ends the control connections.
    pub fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A published FTP server: the listener on its published port (the
/// external address), and the server.
pub struct PublishedFtp {
    pub listener: std::net::TcpListener,
    pub server: SocketAddrV4,
}

/// The listener of a published FTP server's port on `external`.
pub fn published_listener(
    external: Ipv4Addr,
    port: u16,
    server: SocketAddrV4,
) -> anyhow::Result<PublishedFtp> {
    let s = Socket::new(Domain::IPV4, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    // A restarted daemon binds it again while handed-over connections live.
    s.set_reuse_address(true)?;
    s.bind(&SocketAddrV4::new(external, port).into())
        .with_context(|| {
            format!("listening on {external}:{port} for the published FTP server {server}")
        })?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(PublishedFtp {
        listener: s.into(),
        server,
    })
}

/// What intercepted connections need.
pub struct Interception {
    pub api: Arc<dyn Secondaries>,
    pub stats: Arc<FtpStats>,
    /// The external address the daemon connects to servers from.
    pub external: Ipv4Addr,
    /// The internal address it connects to published servers from.
    pub internal: Ipv4Addr,
    pub ftp_ports: Vec<u16>,
    /// FTP data connections through the relay (no-kernel-mode).
    pub ftp_user_mode: bool,
    /// The maps of control lines forwarded in the kernel (`[ftp]
    /// control_lines`); None: the daemon forwards every line.
    pub lines: Option<Arc<crate::datapath::LineMaps>>,
    /// Whether new connections' plain lines go through the kernel (the
    /// maps are there for handed-over connections even when not).
    pub kernel_lines: bool,
}

/// Accepts control connections until the task is aborted: intercepted ones
/// (`published` none: the server is the accepted socket's local address, the
/// original destination) or a published FTP server's.
async fn serve(
    listener: TcpListener,
    published: Option<SocketAddrV4>,
    ctx: Arc<Interception>,
    ho: Arc<HandOver>,
) {
    let mut spare = Spare::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) if out_of_descriptors(&e) => {
                spare.refuse(&listener).await;
                continue;
            }
            Err(e) => {
                log::warn!("FTP control connections: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let SocketAddr::V4(client) = peer else {
            continue;
        };
        let server = match (published, stream.local_addr()) {
            (Some(server), _) => server,
            (None, Ok(SocketAddr::V4(s)))
                if !s.ip().is_loopback() && ctx.ftp_ports.contains(&s.port()) =>
            {
                s
            }
            (None, _) => {
                // Someone dialled the listener itself.
                log::debug!("interception: dropping a direct connection from {client}");
                continue;
            }
        };
        let dialled = dialled(stream.local_addr(), server);
        let (ctx, live) = (
            ctx.clone(),
            Live::new(&ho, client, dialled, published.is_some()),
        );
        spawn_control(client, server, async move {
            ftp_control(stream, client, server, &ctx, live, published.is_some()).await
        });
    }
}

/// Runs a control connection's task in its span: every record of the
/// connection carries its endpoints.
fn spawn_control(
    client: SocketAddrV4,
    server: SocketAddrV4,
    task: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
) {
    let span = tracing::info_span!("ftp", %client, %server);
    tokio::spawn(
        async move {
            if let Err(e) = task.await {
                log::info!("ftp {client} → {server}: {e:#}");
            }
        }
        .instrument(span),
    );
}

/// Control lines are short: reads go through one buffer of the proxy's
/// thread (a line longer than the filter's limit is refused anyway), so an
/// idle control connection holds no buffer of its own.
const CONTROL_BUFFER: usize = 4096;

thread_local! {
    static SCRATCH: std::cell::RefCell<Box<[u8; CONTROL_BUFFER]>> =
        std::cell::RefCell::new(Box::new([0; CONTROL_BUFFER]));
}

/// `Control::new` or `Control::published`.
type OpenControl = fn(
    Arc<dyn Secondaries>,
    Arc<FtpStats>,
    SocketAddrV4,
    SocketAddrV4,
    Ipv4Addr,
    crate::flags::ConnFlags,
) -> Result<Control, firewall_core::error::ApiError>;

async fn ftp_control(
    client_stream: TcpStream,
    client: SocketAddrV4,
    server: SocketAddrV4,
    ctx: &Interception,
    live: Live,
    published: bool,
) -> anyhow::Result<()> {
    let client_side = ClientSide::new(client_stream)?;
    let (open, from) = if published {
        (Control::published as OpenControl, ctx.internal)
    } else {
        (Control::new as OpenControl, ctx.external)
    };
    let control = match open(
        ctx.api.clone(),
        ctx.stats.clone(),
        client,
        server,
        ctx.external,
        if ctx.ftp_user_mode {
            crate::flags::ConnFlags::NO_KERNEL_MODE
        } else {
            crate::flags::ConnFlags::empty()
        },
    ) {
        Ok(c) => c,
        Err(e) => {
            reset(client_side.sock());
            bail!("not filtered: {e}");
        }
    };
    let server_stream = match connect_server(from, server).await {
        Ok(s) => s,
        Err(e) if out_of_descriptors(&e) => {
            log::error!("ftp {client} → {server}: out of file descriptors: refused with 421");
            client_side.try_write(TOO_MANY);
            bail!("connecting to the server: {e}");
        }
        Err(e) => {
            reset(client_side.sock());
            bail!("connecting to the server: {e}");
        }
    };
    log::debug!("ftp {client} → {server}: intercepted");
    let _ = server_stream.set_nodelay(true);
    let _ = client_side.sock().set_nodelay(true);
    let _ = SockRef::from(&server_stream).set_keepalive(true);
    let _ = client_side.sock().set_keepalive(true);
    let lines = match &ctx.lines {
        Some(maps) if ctx.kernel_lines => {
            KernelLines::join(maps, client_side.0.get_ref(), &server_stream)
        }
        _ => None,
    };
    relay(client_side, server_stream, control, live, lines).await;
    Ok(())
}

/// Goes on with a control connection a previous daemon handed over.
async fn resume(h: Handed, ctx: &Interception, live: Live) -> anyhow::Result<()> {
    let (client, server) = (h.state.client, h.state.server);
    let client_side = ClientSide::from_std(h.client)?;
    h.server.set_nonblocking(true)?;
    let server_stream = TcpStream::from_std(h.server)?;
    let control = match Control::resume(ctx.api.clone(), ctx.stats.clone(), h.state) {
        Ok(c) => c,
        Err(e) => {
            reset(client_side.sock());
            bail!("not filtered: {e}");
        }
    };
    let lines = match (h.lines, &ctx.lines) {
        (Some(l), Some(maps)) => Some(KernelLines::resume(maps, l, ctx.kernel_lines)),
        (Some(_), None) => bail!("its lines were forwarded in the kernel, whose maps are gone"),
        (None, _) => None,
    };
    log::info!("ftp {client} → {server}: resumed from the previous daemon");
    relay(client_side, server_stream, control, live, lines).await;
    Ok(())
}

/// Relays and filters a control connection until it ends or is handed over.
/// With `lines`, the kernel forwards the plain lines of a direction the
/// daemon offered it (`kernel_lines`).
async fn relay(
    client_side: ClientSide,
    server_stream: TcpStream,
    mut control: Control,
    live: Live,
    mut lines: Option<KernelLines>,
) {
    let started = std::time::Instant::now();
    let (client, server) = (control.client(), control.server());
    // One future for the whole connection, not one per read.
    let mut asked = live.0.asked.subscribe();
    let handover = asked.wait_for(|a| *a);
    tokio::pin!(handover);
    let mut handing_over = false;
    let (c, s) = (&client_side, &server_stream);
    let (mut client_open, mut server_open) = (true, true);
    let mut outcome = "closed";
    if let Some(l) = &lines {
        l.offer(Side::Client, c.0.get_ref(), control.at_line_boundary(true));
        l.offer(Side::Server, s, control.at_line_boundary(false));
    }
    while client_open || server_open {
        let mut out = Output::default();
        // The side whose stream ended: the other's write side is shut.
        let mut ended = None;
        tokio::select! {
            ready = c.0.ready(Interest::READABLE | Interest::PRIORITY), if client_open => {
                let got = ready.and_then(|mut r| {
                    SCRATCH.with_borrow_mut(|buf| {
                        let got = c.read_ready(&mut r, &mut buf[..]);
                        if let Ok(Some(n)) = got {
                            control.client_data(&buf[..n], &mut out);
                        }
                        got
                    })
                });
                match got {
                    Ok(None) => {}
                    Ok(Some(n @ 1..)) => count_read(&mut lines, Side::Client, n),
                    _ => {
                        client_open = false;
                        ended = Some(Side::Client);
                    }
                }
            },
            ready = s.ready(Interest::READABLE), if server_open => {
                let got = ready.and_then(|_| {
                    SCRATCH.with_borrow_mut(|buf| {
                        let got = read_once(s, &mut buf[..]);
                        if let Ok(Some(n)) = got {
                            control.server_data(&buf[..n], &mut out);
                        }
                        got
                    })
                });
                match got {
                    Ok(None) => {}
                    Ok(Some(n @ 1..)) => count_read(&mut lines, Side::Server, n),
                    _ => {
                        server_open = false;
                        ended = Some(Side::Server);
                    }
                }
            },
            // Only between two reads with nothing left to write: the
            // state is whole. A half-closed connection just ends.
            _ = &mut handover, if client_open && server_open => {
                handing_over = true;
                break;
            },
        }
        // A side that cannot take what is due ends the connection. What the
        // kernel forwarded into a socket goes before the daemon's bytes.
        if !out.to_server.is_empty() {
            if flushed(&lines, Side::Server, s).await.is_err()
                || send(s, &out.to_server, out.urgent_at).await.is_err()
            {
                outcome = "the server stopped taking data";
                break;
            }
            count_written(&mut lines, Side::Server, out.to_server.len());
        }
        if !out.to_client.is_empty() {
            if flushed(&lines, Side::Client, c.0.get_ref()).await.is_err()
                || c.write_all(&out.to_client).await.is_err()
            {
                outcome = "the client stopped taking data";
                break;
            }
            count_written(&mut lines, Side::Client, out.to_client.len());
        }
        match ended {
            Some(Side::Client) => {
                let _ = flushed(&lines, Side::Server, s).await;
                shutdown_write(SockRef::from(s));
            }
            Some(Side::Server) => {
                let _ = flushed(&lines, Side::Client, c.0.get_ref()).await;
                shutdown_write(c.sock());
            }
            None => {}
        }
        if let Some(l) = &lines {
            if client_open {
                l.offer(Side::Client, c.0.get_ref(), control.at_line_boundary(true));
            }
            if server_open {
                l.offer(Side::Server, s, control.at_line_boundary(false));
            }
        }
    }
    if handing_over {
        let client_std = client_side.0.into_inner();
        match server_stream.into_std() {
            Ok(server_std) => {
                log::debug!("ftp {client} → {server}: handed over");
                live.0
                    .handed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Handed {
                        client: client_std,
                        server: server_std,
                        state: control.hand_over(),
                        lines: lines.map(KernelLines::hand_over),
                    });
            }
            Err(e) => log::warn!("ftp {client} → {server}: could not be handed over: {e}"),
        }
        return;
    }
    control.finish();
    let in_kernel = lines.as_ref().map_or(0, KernelLines::lines);
    log::info!(
        "ftp {client} → {server}: {outcome} after {:.1} s; {}; {in_kernel} lines forwarded in the kernel",
        started.elapsed().as_secs_f64(),
        control.summary()
    );
}

fn count_read(lines: &mut Option<KernelLines>, side: Side, n: usize) {
    if let Some(l) = lines {
        l.read(side, n);
    }
}

fn count_written(lines: &mut Option<KernelLines>, side: Side, n: usize) {
    if let Some(l) = lines {
        l.wrote(side, n);
    }
}

async fn flushed(
    lines: &Option<KernelLines>,
    side: Side,
    fd: &impl std::os::fd::AsFd,
) -> std::io::Result<()> {
    match lines {
        Some(l) => l.flushed(side, fd).await,
        None => Ok(()),
    }
}

/// Connects to the server from `from` (the firewall's external address, or
/// its internal one for a published server).
async fn connect_server(from: Ipv4Addr, server: SocketAddrV4) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from.into(), 0))?;
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(server.into())).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer in {CONNECT_TIMEOUT:?}"),
        )),
    }
}
