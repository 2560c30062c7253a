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

use anyhow::Context as _;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tracing::Instrument as _;

use crate::ftp::{ControlState, FtpStats, Secondaries};

mod control;
mod kernel_lines;
mod sockets;
use control::{ftp_control, resume};
pub use kernel_lines::HandedLines;
use sockets::{out_of_descriptors, Spare};

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
