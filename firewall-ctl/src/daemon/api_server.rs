//! The API server: one request per line on the daemon's Unix socket, each
//! answered in turn; engine calls go to the engine's owner, table listings
//! are read from the kernel directly.

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::{
    io::AsyncWriteExt as _,
    net::{unix::OwnedWriteHalf, UnixListener, UnixStream},
    sync::broadcast,
};
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::{
    api::{
        self, Answer, ApiError, Cancelled, ClientAddressSet, CounterStatus, ErrorKind, FlowView,
        Following, Killed, ListWhat, MapStatus, PinholeView, PrimaryConnection, PrimaryKind,
        Request, Response, SessionClosed, SessionOpened, ShuttingDown, Status, WallStatus,
    },
    datapath::{FlowTable, PinholeTable, Stats, UdpMappings},
    policy::Transport,
};
use firewall_common::flow::{flow_kind, FlowKey};

/// API connections the daemon holds at once. When a new one would exceed
/// it, the connection idle the longest is closed (after a line saying why);
/// when none is idle, the new one is refused the same way.
pub const MAX_API_CONNECTIONS: usize = 1024;

/// The open API connections: how long each has been idle, and how to close it.
#[derive(Default)]
pub(super) struct Connections {
    open: Mutex<BTreeMap<u64, Slot>>,
    next: std::sync::atomic::AtomicU64,
}

struct Slot {
    /// Since when it waits for a request (None: answering one, or
    /// following events).
    idle_since: Option<Instant>,
    close: CancellationToken,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Slot>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection, making room if needed; None: no room.
    fn admit(&self, limit: usize) -> Option<(u64, CancellationToken)> {
        let mut open = self.lock();
        if open.len() >= limit {
            let oldest = open
                .iter()
                .filter_map(|(id, s)| s.idle_since.map(|t| (t, *id)))
                .min()?;
            if let Some(s) = open.remove(&oldest.1) {
                s.close.cancel();
            }
        }
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let close = CancellationToken::new();
        open.insert(
            id,
            Slot {
                idle_since: Some(Instant::now()),
                close: close.clone(),
            },
        );
        Some((id, close))
    }

    fn set_idle(&self, id: u64, idle: bool) {
        if let Some(s) = self.lock().get_mut(&id) {
            s.idle_since = idle.then(Instant::now);
        }
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}

fn room_error() -> ApiError {
    ApiError::new(
        ErrorKind::Exhausted,
        format!("the daemon holds {MAX_API_CONNECTIONS} API connections (its limit) and none is idle; try again"),
    )
}

fn evicted_error() -> ApiError {
    ApiError::new(
        ErrorKind::Exhausted,
        format!("closed: the daemon holds {MAX_API_CONNECTIONS} API connections (its limit), and this one was idle the longest"),
    )
}

/// Accepts API connections until the task is aborted.
pub(super) async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => match shared.api_connections.admit(MAX_API_CONNECTIONS) {
                Some((id, close)) => {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        serve_connection(stream, id, close, &shared).await;
                        shared.api_connections.remove(id);
                    });
                }
                None => {
                    tokio::spawn(async move {
                        let (_, mut write) = stream.into_split();
                        let _ = send(&mut write, &Response::<Answer>::Error(room_error())).await;
                    });
                }
            },
            Err(e) => {
                log::warn!("API accept failed: {e}");
                // Out of descriptors, most likely: let some close.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn send<T: serde::Serialize>(write: &mut OwnedWriteHalf, v: &T) -> std::io::Result<()> {
    let mut out = serde_json::to_string(v).expect("responses serialize");
    out.push('\n');
    write.write_all(out.as_bytes()).await
}

/// Answers one API connection, a request per line. Lines are framed by a
/// codec that refuses an over-long line while it arrives (nothing of it is
/// kept), so no client can make the daemon buffer without bound.
async fn serve_connection(
    stream: UnixStream,
    id: u64,
    close: CancellationToken,
    shared: &Arc<Shared>,
) {
    use futures_util::StreamExt as _;
    use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
    let (read, mut write) = stream.into_split();
    let mut lines = FramedRead::new(
        read,
        LinesCodec::new_with_max_length(api::MAX_REQUEST_BYTES),
    );
    loop {
        let next = tokio::select! {
            n = lines.next() => n,
            // Only ever while idle here: the slot was taken for a newcomer.
            _ = close.cancelled() => {
                let _ = send(&mut write, &Response::<Answer>::Error(evicted_error())).await;
                return;
            }
        };
        shared.api_connections.set_idle(id, false);
        let (response, last) = match next {
            None => return,
            Some(Ok(line)) => match api::parse_request(&line) {
                Ok(Request::Events) => {
                    follow_events(&mut write, shared).await;
                    return;
                }
                Ok(req) => {
                    let op = req.op();
                    let response = answer(req, shared).await;
                    shared.api_calls.record(
                        op,
                        match &response {
                            Response::Ok(_) => Ok(()),
                            Response::Error(e) => Err(e.kind),
                        },
                    );
                    (response, false)
                }
                Err(e) => {
                    shared.api_calls.record("unparsed", Err(e.kind));
                    (Response::Error(e), false)
                }
            },
            // Errors in the framing itself end the connection, after an
            // answer that says why.
            Some(Err(LinesCodecError::MaxLineLengthExceeded)) => (
                Response::Error(ApiError::new(
                    ErrorKind::BadRequest,
                    format!("request longer than {} bytes", api::MAX_REQUEST_BYTES),
                )),
                true,
            ),
            Some(Err(LinesCodecError::Io(e))) if e.kind() == std::io::ErrorKind::InvalidData => (
                Response::Error(ApiError::new(ErrorKind::BadRequest, "request is not UTF-8")),
                true,
            ),
            Some(Err(e)) => {
                log::debug!("API read: {e}");
                return;
            }
        };
        if send(&mut write, &response).await.is_err() || last {
            return;
        }
        shared.api_connections.set_idle(id, true);
    }
}

/// Answers a request.
async fn answer(req: Request, shared: &Arc<Shared>) -> Response<Answer> {
    match handle(req, shared).await {
        Ok(v) => Response::Ok(v),
        Err(e) => Response::Error(e),
    }
}

/// Streams events to a follower until it disconnects.
async fn follow_events(write: &mut OwnedWriteHalf, shared: &Arc<Shared>) {
    let mut rx = shared.events.subscribe();
    let first = Response::Ok(Answer::Following(Following { following: true }));
    if send(write, &first).await.is_err() {
        return;
    }
    loop {
        let line = match rx.recv().await {
            Ok(e) => serde_json::to_value(&e).expect("events serialize"),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                shared
                    .work
                    .events_lagged
                    .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                serde_json::json!({ "event": "lost", "count": n })
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if send(write, &line).await.is_err() {
            return;
        }
    }
}

fn internal(e: anyhow::Error) -> ApiError {
    ApiError::new(ErrorKind::Internal, format!("{e:#}"))
}

/// Runs blocking kernel reads (whole tables) off the runtime's workers.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(internal),
        Err(e) => Err(ApiError::new(
            ErrorKind::Internal,
            format!("the request handler failed: {e}"),
        )),
    }
}

async fn handle(req: Request, shared: &Arc<Shared>) -> Result<Answer, ApiError> {
    let engine = &shared.engine;
    Ok(match req {
        Request::Status => Answer::Status(Box::new(status(shared).await?)),
        Request::Shutdown => {
            let _ = shared.shutdown.send(true);
            Answer::ShuttingDown(ShuttingDown {
                shutting_down: true,
            })
        }
        Request::Events => unreachable!("served by serve_connection"),
        Request::Reload => Answer::Reloaded(super::reload::reload(shared).await?),
        Request::SessionOpen { client } => {
            let session = engine.call(move |e| e.open_session(client)).await??;
            Answer::SessionOpened(SessionOpened { session, client })
        }
        Request::SessionClose { session } => {
            engine.call(move |e| e.close_session(session)).await??;
            Answer::SessionClosed(SessionClosed { closed: session })
        }
        Request::BindForClient(req) => {
            let r = engine.call(move |e| e.bind_for_client(&req)).await??;
            // The targets are known now: resolve them before the first packet.
            for c in &r.connections {
                shared
                    .neighbours
                    .resolve(shared.internal.index, *c.client.ip());
            }
            Answer::Bound(r)
        }
        Request::RedirectConnections(req) => {
            Answer::Redirected(engine.call(move |e| e.redirect_connections(&req)).await??)
        }
        Request::AllowFutureConnect(req) => {
            Answer::Permitted(engine.call(move |e| e.allow_future_connect(&req)).await??)
        }
        Request::Kill { id } => {
            engine.call(move |e| e.kill(id)).await??;
            Answer::Killed(Killed { killed: id })
        }
        Request::Cancel { id } => {
            engine.call(move |e| e.cancel(id)).await??;
            Answer::Cancelled(Cancelled { cancelled: id })
        }
        Request::SetClientAddress { id, address } => {
            engine
                .call(move |e| e.set_client_address(id, address))
                .await??;
            Answer::ClientAddressSet(ClientAddressSet {
                id,
                client: address,
            })
        }
        Request::List { what } => list(shared, what).await?,
        Request::ConnectionFlags {
            transport,
            client,
            server,
        } => Answer::ConnectionFlags(primary_connection(shared, transport, client, server).await?),
    })
}

/// GetConnectionFlags of a primary connection: a control connection the FTP
/// filter proxies, or a connection the datapath tracks.
async fn primary_connection(
    shared: &Arc<Shared>,
    transport: Transport,
    client: SocketAddrV4,
    server: SocketAddrV4,
) -> Result<PrimaryConnection, ApiError> {
    let proxied = match transport {
        Transport::Tcp => shared.controls.published(client, server),
        Transport::Udp => None,
    };
    let kind = match proxied {
        Some(true) => Some(PrimaryKind::PublishedProxy),
        Some(false) => Some(PrimaryKind::Intercepted),
        None => {
            let pins = shared.pins.clone();
            let key = FlowKey::new(
                transport.ipproto(),
                client.ip().octets(),
                client.port(),
                server.ip().octets(),
                server.port(),
            );
            let flow = blocking(move || FlowTable::open(&pins)?.get(&key)).await?;
            flow.filter(|v| v.kind == flow_kind::PRIMARY).map(|v| {
                if (v.nat_dst_addr, v.nat_dst_port) != (key.dst_addr, key.dst_port) {
                    PrimaryKind::Published
                } else {
                    PrimaryKind::Outbound
                }
            })
        }
    };
    let kind = kind.ok_or_else(|| {
        ApiError::new(
            ErrorKind::InvalidArgument,
            format!(
                "no primary connection {} {client} -> {server} through the firewall",
                transport.name()
            ),
        )
    })?;
    Ok(PrimaryConnection {
        transport,
        client,
        server,
        kind,
        flags: kind.flags(),
    })
}

async fn list(shared: &Arc<Shared>, what: ListWhat) -> Result<Answer, ApiError> {
    let now = crate::netif::monotonic_ns();
    let pins = shared.pins.clone();
    Ok(match what {
        ListWhat::Sessions => Answer::Sessions(shared.engine.call(|e| e.sessions()).await?),
        ListWhat::Connections => Answer::Connections(shared.engine.call(|e| e.objects()).await?),
        ListWhat::Pinholes => Answer::Pinholes(
            blocking(move || {
                let entries = PinholeTable::open(&pins)?.entries()?;
                Ok(entries
                    .iter()
                    .map(|(k, v)| PinholeView::new(k, v, now))
                    .collect())
            })
            .await?,
        ),
        ListWhat::Flows => Answer::Flows(
            blocking(move || {
                let entries = FlowTable::open(&pins)?.all()?;
                Ok(entries
                    .iter()
                    .map(|(k, v)| FlowView::new(k, v, now))
                    .collect())
            })
            .await?,
        ),
    })
}

pub(super) async fn status(shared: &Arc<Shared>) -> Result<Status, ApiError> {
    let flows_expired = shared.engine.call(|e| e.expired().clone()).await?;
    let s = shared.clone();
    blocking(move || {
        let shared = &s;
        let flows = FlowTable::open(&shared.pins)?;
        let pinholes = PinholeTable::open(&shared.pins)?;
        let stats = Stats::open(&shared.pins)?;
        let udp_mappings = UdpMappings::open(&shared.pins)?.mappings.count()?;
        let config = shared.config();
        let (internal_networks, external_addresses) = Status::config_fields(&config);
        let map = |name: &str, entries: usize, capacity: u32| MapStatus {
            name: name.into(),
            pinned: shared.pins.map(name).display().to_string(),
            entries: entries as u64,
            capacity: capacity as u64,
        };
        let all_flows = flows.all()?;
        let primary = all_flows
            .iter()
            .filter(|(_, v)| v.kind == firewall_common::flow::flow_kind::PRIMARY)
            .count() as u64;
        Ok(Status {
            wall: WallStatus::new(&config, primary),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            interfaces: shared.interfaces.clone(),
            internal_networks,
            external_addresses,
            maps: vec![
                map(
                    firewall_common::map_names::FLOWS,
                    all_flows.len(),
                    flows.capacity(),
                ),
                map(
                    firewall_common::map_names::PINHOLES,
                    pinholes.entries()?.len(),
                    pinholes.capacity(),
                ),
                map(
                    firewall_common::map_names::UDP_MAPPINGS,
                    udp_mappings,
                    firewall_common::map_sizes::UDP_MAPPINGS,
                ),
            ],
            flows_expired,
            executables_blocked: shared
                .executables_blocked
                .load(std::sync::atomic::Ordering::Relaxed),
            ftp_ports: config.ftp_ports.clone(),
            ftp: {
                let lines = stats.ftp_lines()?;
                crate::ftp::FtpStatsView {
                    kernel_lines: lines.packets,
                    kernel_line_bytes: lines.bytes,
                    ..shared.ftp.view()
                }
            },
            tftp_ports: config.tftp_ports.clone(),
            api_connections: shared.api_connections.len() as u64,
            counters: stats
                .read()?
                .into_iter()
                .map(|(c, v)| CounterStatus {
                    name: c.name().into(),
                    verdict: c.verdict().name().into(),
                    packets: v.packets,
                    bytes: v.bytes,
                    help: c.help().into(),
                })
                .collect(),
        })
    })
    .await
}
