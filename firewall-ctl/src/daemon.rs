//! The daemon behind `firewall-ctl up`, and the teardown behind `down`.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use std::net::Ipv4Addr;

use anyhow::Context as _;
use firewall_common::{
    intercept::{InterceptConf, InterceptKey, InterceptValue},
    pinhole::event_kind,
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::AsyncWriteExt as _,
    net::{UnixListener, UnixStream},
    sync::{broadcast, watch},
};

use crate::{
    api::{
        self, ApiError, CounterStatus, ErrorKind, FlowView, InterfaceStatus, ListWhat, MapStatus,
        PinholeView, Request, Response, Status,
    },
    config::Config,
    datapath::{
        self, AttachMode, Datapath, FlowTable, InterceptTables, KernelMaps, PinPaths, PinholeTable,
        Side, Stats,
    },
    engine::{Engine, Event, RelayCmd},
    filters::{DataFilterFactory, ExecutableBlockerFactory},
    ftp::{FtpStats, Secondaries},
    lock::{DaemonLock, LOCK_FILE},
    neighbours::Resolver,
    netif::{self, Interface},
    ports::PortPool,
    primary::{self, Interception, LocalDelivery},
    relay::{Relay, RelayEvent},
    sweeper,
};

/// Where `up` records what it changed, so `down` can undo it even after a crash.
pub const STATE_FILE: &str = "/run/firewall/state.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub pid: u32,
    pub internal: String,
    pub internal_ifindex: u32,
    pub external: String,
    pub external_ifindex: u32,
    pub xdp_mode: AttachMode,
    pub socket: PathBuf,
    /// Sysctls `up` changed, with the values they had before.
    pub saved_sysctls: BTreeMap<String, String>,
    /// The policy routing `up` added for intercepted connections.
    #[serde(default)]
    pub local_delivery: Option<LocalDelivery>,
}

impl State {
    pub fn read() -> Option<State> {
        let text = fs::read_to_string(STATE_FILE).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn write(&self) -> anyhow::Result<()> {
        let path = Path::new(STATE_FILE);
        fs::create_dir_all(path.parent().expect("has parent"))?;
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        fs::rename(&tmp, path).with_context(|| format!("writing {STATE_FILE}"))
    }
}

pub struct UpOptions {
    pub internal: String,
    pub external: String,
    pub config: Option<PathBuf>,
    pub socket: PathBuf,
    pub xdp_mode: AttachMode,
    /// Leave the datapath attached when the daemon exits (for restarts/upgrades).
    pub keep_datapath: bool,
}

/// Shared by the API handlers and the daemon's tasks.
struct Shared {
    pins: PinPaths,
    config: Config,
    interfaces: Vec<InterfaceStatus>,
    shutdown: watch::Sender<bool>,
    engine: Arc<std::sync::Mutex<Engine<KernelMaps>>>,
    events: broadcast::Sender<Event>,
    neighbours: Resolver,
    internal_ifindex: u32,
    relay: Relay,
    executables_blocked: Arc<std::sync::atomic::AtomicU64>,
    ftp: Arc<FtpStats>,
}

impl Shared {
    fn engine(&self) -> std::sync::MutexGuard<'_, Engine<KernelMaps>> {
        // A panic while holding the lock is a bug; the engine's state is
        // still consistent (every step commits or rolls back), so go on.
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Carries out what the engine decided: relay work, and events to the
    /// followers.
    fn publish(&self, engine: &mut Engine<KernelMaps>) {
        for cmd in engine.take_relay_cmds() {
            match cmd {
                RelayCmd::Start(mut job) => {
                    let owner = job.owner;
                    if job.event.is_some() {
                        let engine = self.engine.clone();
                        job.hook = Some(Arc::new(move |owner, kind, address| {
                            engine
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .on_connection_event(owner, kind, address)
                        }));
                    }
                    if let Err(e) = self.relay.start(job) {
                        log::error!("relay for {owner} failed to start: {e}");
                        let _ = engine.kill(owner).or_else(|_| engine.cancel(owner));
                    }
                }
                RelayCmd::SetTarget { owner, target } => self.relay.set_target(owner, target),
                RelayCmd::Stop { owner } => self.relay.stop(owner),
                RelayCmd::ClientBusy { client, busy } => self.relay.set_client_busy(client, busy),
                RelayCmd::Emulate(job) => self.relay.emulate(job),
                RelayCmd::StopConn { owner, conn } => self.relay.stop_conn(owner, conn),
                RelayCmd::Withdraw { owner, reason } => self.relay.withdraw(owner, reason),
            }
        }
        for e in engine.take_events() {
            if log::log_enabled!(log::Level::Debug) {
                log::debug!("event: {}", serde_json::to_string(&e).unwrap_or_default());
            }
            let _ = self.events.send(e);
        }
    }
}

/// Raises the soft limit of open files to the hard one: every intercepted
/// control connection holds two sockets and every pinhole a port socket, so
/// the usual soft limit of 1024 (systemd's too) is far too low.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => log::info!("open files: soft limit raised from {soft} to {hard}"),
            Err(e) => log::warn!("open files: cannot raise the soft limit {soft} to {hard}: {e}"),
        },
        Ok((soft, _)) => log::info!("open files: limit {soft}"),
        Err(e) => log::warn!("open files: cannot read the limit: {e}"),
    }
}

/// Runs the daemon until SIGINT/SIGTERM or a `shutdown` request.
pub async fn run(opts: UpOptions) -> anyhow::Result<()> {
    raise_fd_limit();
    let invalid = |e: anyhow::Error| {
        anyhow::Error::new(ApiError::new(ErrorKind::InvalidArgument, format!("{e:#}")))
    };
    if opts.internal == opts.external {
        return Err(invalid(anyhow::anyhow!(
            "--internal and --external must be different interfaces (both are {:?})",
            opts.internal
        )));
    }
    let internal = Interface::by_name(&opts.internal)
        .context("--internal")
        .map_err(invalid)?;
    let external = Interface::by_name(&opts.external)
        .context("--external")
        .map_err(invalid)?;
    let config = match &opts.config {
        Some(path) => Config::load(path, &internal, &external).map_err(invalid)?,
        None => Config::defaults(&internal, &external)
            .map_err(|e| invalid(anyhow::anyhow!("embedded defaults: {e}")))?,
    };

    // One daemon per host, whatever socket each is given: a second one would
    // take over the running one's datapath and empty its pinholes.
    let _lock = match DaemonLock::acquire().context("taking the daemon lock")? {
        Some(l) => l,
        None => {
            return Err(anyhow::Error::new(ApiError::new(
                ErrorKind::AlreadyRunning,
                format!("{}; stop it with `firewall-ctl down`", describe_running()),
            )))
        }
    };
    if api::Client::new(&opts.socket).is_alive() {
        return Err(anyhow::Error::new(ApiError::new(
            ErrorKind::AlreadyRunning,
            format!(
                "another program answers on {}; choose another --socket",
                opts.socket.display()
            ),
        )));
    }

    let pins = PinPaths::default();
    datapath::check_bpffs(&pins.dir)?;
    // Pins left by a daemon that died: re-adopt them if they belong to the same
    // interfaces (established flows keep forwarding), otherwise clear them.
    let previous = State::read();
    let adopt = match &previous {
        Some(s)
            if pins.any_exists()
                && s.internal_ifindex == internal.index
                && s.external_ifindex == external.index
                && s.xdp_mode == opts.xdp_mode =>
        {
            log::info!("re-adopting the datapath left by daemon pid {}", s.pid);
            true
        }
        _ => {
            if pins.any_exists() {
                log::warn!(
                    "removing stale pins under {} (they belong to other interfaces or mode)",
                    pins.dir.display()
                );
                datapath::unpin_all(&pins)?;
            }
            false
        }
    };

    let mut saved_sysctls = match &previous {
        Some(s) if adopt => s.saved_sysctls.clone(),
        _ => BTreeMap::new(),
    };
    for (k, v) in netif::set_sysctls(&netif::forwarding_sysctls(&[&internal, &external]))? {
        saved_sysctls.entry(k).or_insert(v);
    }

    let mut state = State {
        pid: std::process::id(),
        internal: internal.name.clone(),
        internal_ifindex: internal.index,
        external: external.name.clone(),
        external_ifindex: external.index,
        xdp_mode: opts.xdp_mode,
        socket: opts.socket.clone(),
        saved_sysctls,
        local_delivery: None,
    };
    // Written before attaching, so that `down` can undo a half-done `up`.
    state.write()?;

    let mut dp = match start_datapath(&pins, &config, &internal, &external, opts.xdp_mode, adopt) {
        Ok(dp) => dp,
        Err(e) => {
            // Nothing half-allocated stays behind.
            let _ = teardown(&pins, Some(&state));
            return Err(e);
        }
    };
    state.pid = std::process::id();
    state.write()?;

    let executables_blocked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let engine = match KernelMaps::open(&pins).and_then(|maps| {
        let mut engine = Engine::new(
            config.engine_config(&internal, &external),
            maps,
            PortPool::new(config.port_range.clone(), crate::reserve::KernelReserver),
            Arc::new(crate::netif::MonotonicClock),
        )?;
        for protocol in &config.block_executables {
            let f: Arc<dyn DataFilterFactory> = Arc::new(ExecutableBlockerFactory {
                blocked: executables_blocked.clone(),
            });
            engine.register_data_filter(protocol, f);
            log::info!("scanning {protocol} secondary connections for executables (user mode)");
        }
        Ok(engine)
    }) {
        Ok(e) => e,
        Err(e) => {
            drop(dp);
            let _ = teardown(&pins, Some(&state));
            return Err(e.context("starting the engine"));
        }
    };
    let listener = bind_socket(&opts.socket)?;
    let (relay_tx, relay_rx) = tokio::sync::mpsc::unbounded_channel();
    let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        pins: pins.clone(),
        config: config.clone(),
        interfaces: vec![
            InterfaceStatus::new(Side::Internal, &internal, opts.xdp_mode),
            InterfaceStatus::new(Side::External, &external, opts.xdp_mode),
        ],
        shutdown: shutdown_tx,
        engine: Arc::new(std::sync::Mutex::new(engine)),
        events: broadcast::channel(1024).0,
        neighbours: Resolver::new(),
        internal_ifindex: internal.index,
        relay: Relay::new(relay_tx),
        executables_blocked,
        ftp: Arc::new(FtpStats::default()),
    });
    let interception_task =
        match start_interception(&mut dp, &config, &internal, &external, &shared, &mut state) {
            Ok(t) => t,
            Err(e) => {
                drop(dp);
                let _ = teardown(&pins, Some(&state));
                let _ = fs::remove_file(&opts.socket);
                return Err(e.context("starting the interception of primary connections"));
            }
        };
    let relay_task = tokio::spawn(read_relay_events(relay_rx, shared.clone()));
    log::info!(
        "firewall up: internal {} (ifindex {}), external {} (ifindex {}), XDP {:?}; API on {}",
        internal.name,
        internal.index,
        external.name,
        external.index,
        opts.xdp_mode,
        opts.socket.display()
    );

    let log_task = dp
        .logger
        .take()
        .map(|logger| tokio::spawn(poll_ebpf_log(logger)));
    let tick_task = tokio::spawn(tick(shared.clone()));
    let events_task = dp
        .events
        .take()
        .map(|rb| tokio::spawn(read_datapath_events(rb, shared.clone())));
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut keep = opts.keep_datapath;
    loop {
        tokio::select! {
            _ = sigint.recv() => { log::info!("SIGINT"); break; }
            _ = sigterm.recv() => { log::info!("SIGTERM"); break; }
            _ = shutdown_rx.changed() => { log::info!("shutdown requested over the API"); keep = false; break; }
            conn = listener.accept() => match conn {
                Ok((stream, _)) => { tokio::spawn(serve_connection(stream, shared.clone())); }
                Err(e) => log::warn!("API accept failed: {e}"),
            },
        }
    }

    if let Some(t) = log_task {
        t.abort();
    }
    tick_task.abort();
    relay_task.abort();
    if let Some(p) = interception_task {
        p.stop();
    }
    if let Some(t) = events_task {
        t.abort();
    }
    // Stop accepting; the socket file goes last, so that `down`, which waits
    // for it to disappear, sees a finished teardown.
    drop(listener);
    drop(dp);
    let result = if keep {
        log::info!("leaving the datapath attached and pinned (--keep-datapath); `firewall-ctl down` removes it");
        remove_transparent_sockets();
        Ok(())
    } else {
        teardown(&pins, Some(&state)).map(|removed| {
            log::info!(
                "firewall down: removed {} pins, restored {} sysctls",
                removed.len(),
                state.saved_sysctls.len()
            );
        })
    };
    let _ = fs::remove_file(&opts.socket);
    result
}

fn start_datapath(
    pins: &PinPaths,
    config: &Config,
    internal: &Interface,
    external: &Interface,
    mode: AttachMode,
    adopt: bool,
) -> anyhow::Result<Datapath> {
    let mut dp = Datapath::load(
        pins,
        datapath::MapSizes {
            flows: config.flow_table_size,
            pinholes: config.pinhole_table_size,
        },
    )?;
    dp.attach(Side::Internal, internal, mode, adopt)?;
    dp.attach(Side::External, external, mode, adopt)?;
    Ok(dp)
}

/// Intercepts the primary connections of the FTP filter's ports (or turns
/// interception off when the filter is off).
fn start_interception(
    dp: &mut Datapath,
    config: &Config,
    internal: &Interface,
    external: &Interface,
    shared: &Arc<Shared>,
    state: &mut State,
) -> anyhow::Result<Option<primary::Proxy>> {
    let mut tables = InterceptTables::open(dp.pins())?;
    if config.ftp_ports.is_empty() {
        tables.set(InterceptConf::default(), &[])?;
        log::info!("FTP filter off: no interception");
        return Ok(None);
    }
    let delivery = LocalDelivery {
        fwmark: config.fwmark,
        table: config.route_table,
    };
    // Recorded first, so that `down` removes it even if `up` dies halfway.
    state.local_delivery = Some(delivery);
    state.write()?;
    delivery.install()?;
    let (listener, at) = primary::listener()?;
    let ports: Vec<(InterceptKey, InterceptValue)> = config
        .ftp_ports
        .iter()
        .map(|p| {
            (
                InterceptKey::new(firewall_common::IPPROTO_TCP, *p),
                InterceptValue {
                    listener_addr: at.ip().octets(),
                    listener_port: at.port(),
                    _pad: 0,
                },
            )
        })
        .collect();
    tables.set(
        InterceptConf {
            mark: config.fwmark,
            egress_ifindex: external.index,
        },
        &ports,
    )?;
    dp.attach_interception(internal, &listener)?;
    let ctx = Arc::new(Interception {
        api: shared.clone(),
        stats: shared.ftp.clone(),
        external: config.external_addresses[0],
        ftp_ports: config.ftp_ports.clone(),
        ftp_user_mode: config.ftp_user_mode,
    });
    log::info!(
        "FTP filter on: TCP ports {:?} from {} intercepted (listener {at}, fwmark {:#x}, table {})",
        config.ftp_ports,
        internal.name,
        config.fwmark,
        config.route_table
    );
    Ok(Some(primary::Proxy::start(listener, ctx)?))
}

/// The FTP filter's calls go to the engine like the API's.
impl Secondaries for Shared {
    fn session(&self, client: Ipv4Addr) -> Result<u64, ApiError> {
        self.engine().open_session(client)
    }

    fn bind_for_client(
        &self,
        req: &crate::engine::BindRequest,
    ) -> Result<crate::engine::BindResult, ApiError> {
        let mut engine = self.engine();
        let r = engine.bind_for_client(req);
        if let Ok(r) = &r {
            for c in &r.connections {
                self.neighbours
                    .resolve(self.internal_ifindex, *c.client.ip());
            }
        }
        self.publish(&mut engine);
        r
    }

    fn redirect_connections(
        &self,
        req: &crate::engine::RedirectRequest,
    ) -> Result<crate::engine::RedirectResult, ApiError> {
        let mut engine = self.engine();
        let r = engine.redirect_connections(req);
        self.publish(&mut engine);
        r
    }

    fn withdraw_unused(&self, ids: &[u64]) {
        let mut engine = self.engine();
        engine.withdraw_unused(ids, "control connection ended");
        self.publish(&mut engine);
    }
}

/// Removes the sockets that answered for servers' addresses: left behind,
/// they would stall forwarded connections of the same 5-tuples.
fn remove_transparent_sockets() {
    match crate::timewait::destroy_transparent() {
        Ok(0) => {}
        Ok(n) => log::info!("closed {n} sockets of intercepted connections"),
        Err(e) => log::warn!("closing the sockets of intercepted connections: {e:#}"),
    }
}

/// Unpins everything, restores sysctls and removes the state file.
pub fn teardown(pins: &PinPaths, state: Option<&State>) -> anyhow::Result<Vec<PathBuf>> {
    if let Some(d) = state.and_then(|s| s.local_delivery) {
        d.remove();
    }
    remove_transparent_sockets();
    let removed = datapath::unpin_all(pins)?;
    if let Some(s) = state {
        for (k, v) in &s.saved_sysctls {
            if let Err(e) = netif::write_sysctl(k, v) {
                // The interface may be gone (a deleted namespace); nothing to restore then.
                log::debug!("not restoring {k}: {e}");
            }
        }
    }
    let _ = fs::remove_file(STATE_FILE);
    Ok(removed)
}

fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Nobody answered on it (checked above): a leftover from a crash.
    let _ = fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the API socket {}", path.display()))?;
    // The API controls the firewall: root only.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers one API connection, a request per line. Lines are framed by a
/// codec that refuses an over-long line while it arrives (nothing of it is
/// kept), so no client can make the daemon buffer without bound.
async fn serve_connection(stream: UnixStream, shared: Arc<Shared>) {
    use futures_util::StreamExt as _;
    use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
    let (read, mut write) = stream.into_split();
    let mut lines = FramedRead::new(
        read,
        LinesCodec::new_with_max_length(api::MAX_REQUEST_BYTES),
    );
    loop {
        let (response, last) = match lines.next().await {
            None => return,
            Some(Ok(line)) => match api::parse_request(&line) {
                Ok(Request::Events) => {
                    follow_events(&mut write, &shared).await;
                    return;
                }
                Ok(req) => (answer(req, &shared).await, false),
                Err(e) => (Response::Error(e), false),
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
        let mut out = serde_json::to_string(&response).expect("responses serialize");
        out.push('\n');
        if write.write_all(out.as_bytes()).await.is_err() || last {
            return;
        }
    }
}

/// Answers a request: in place when it is quick (a few syscalls at most,
/// which saves two thread hand-offs, most of an API call's latency), on the
/// blocking pool when it reads whole maps.
async fn answer(req: Request, shared: &Arc<Shared>) -> Response {
    let result = if req.is_quick() {
        handle(req, shared)
    } else {
        let s = shared.clone();
        match tokio::task::spawn_blocking(move || handle(req, &s)).await {
            Ok(r) => r,
            Err(e) => Err(ApiError::new(
                ErrorKind::Internal,
                format!("the request handler failed: {e}"),
            )),
        }
    };
    match result {
        Ok(v) => Response::Ok(v),
        Err(e) => Response::Error(e),
    }
}

/// Streams events to a follower until it disconnects.
async fn follow_events(write: &mut tokio::net::unix::OwnedWriteHalf, shared: &Arc<Shared>) {
    let mut rx = shared.events.subscribe();
    if write
        .write_all(b"{\"ok\":{\"following\":true}}\n")
        .await
        .is_err()
    {
        return;
    }
    loop {
        let line = match rx.recv().await {
            Ok(e) => serde_json::to_string(&e).expect("events serialize"),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                serde_json::json!({ "event": "lost", "count": n }).to_string()
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if write
            .write_all(format!("{line}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

fn internal(e: anyhow::Error) -> ApiError {
    ApiError::new(ErrorKind::Internal, format!("{e:#}"))
}

fn to_json<T: serde::Serialize>(v: T) -> Result<serde_json::Value, ApiError> {
    serde_json::to_value(v)
        .map_err(|e| ApiError::new(ErrorKind::Internal, format!("serializing the answer: {e}")))
}

fn handle(req: Request, shared: &Shared) -> Result<serde_json::Value, ApiError> {
    let mut engine = shared.engine();
    let result = match req {
        Request::Status => {
            drop(engine);
            return to_json(status(shared).map_err(internal)?);
        }
        Request::Shutdown => {
            let _ = shared.shutdown.send(true);
            Ok(serde_json::json!({ "shutting_down": true }))
        }
        Request::Events => unreachable!("served by serve_connection"),
        Request::SessionOpen { client } => engine
            .open_session(client)
            .map(|id| serde_json::json!({ "session": id, "client": client })),
        Request::SessionClose { session } => engine
            .close_session(session)
            .map(|()| serde_json::json!({ "closed": session })),
        Request::BindForClient(req) => engine.bind_for_client(&req).and_then(|r| {
            // The targets are known now: resolve them before the first packet.
            for c in r
                .connections
                .iter()
                .filter(|c| !c.client.ip().is_unspecified())
            {
                shared
                    .neighbours
                    .resolve(shared.internal_ifindex, *c.client.ip());
            }
            to_json(r)
        }),
        Request::RedirectConnections(req) => engine.redirect_connections(&req).and_then(to_json),
        Request::Kill { id } => engine
            .kill(id)
            .map(|()| serde_json::json!({ "killed": id })),
        Request::Cancel { id } => engine
            .cancel(id)
            .map(|()| serde_json::json!({ "cancelled": id })),
        Request::SetClientAddress { id, address } => engine
            .set_client_address(id, address)
            .map(|()| serde_json::json!({ "id": id, "client": address })),
        Request::List { what } => list(&engine, what),
    };
    shared.publish(&mut engine);
    result
}

fn list(engine: &Engine<KernelMaps>, what: ListWhat) -> Result<serde_json::Value, ApiError> {
    let now = crate::netif::monotonic_ns();
    match what {
        ListWhat::Sessions => to_json(engine.sessions()),
        ListWhat::Connections => to_json(engine.objects()),
        ListWhat::Pinholes => {
            let entries = engine.maps().pinholes.entries().map_err(internal)?;
            to_json(
                entries
                    .iter()
                    .map(|(k, v)| PinholeView::new(k, v, now))
                    .collect::<Vec<_>>(),
            )
        }
        ListWhat::Flows => {
            let entries = engine.maps().flows.all().map_err(internal)?;
            to_json(
                entries
                    .iter()
                    .map(|(k, v)| FlowView::new(k, v, now))
                    .collect::<Vec<_>>(),
            )
        }
    }
}

fn status(shared: &Shared) -> anyhow::Result<Status> {
    let flows = FlowTable::open(&shared.pins)?;
    let pinholes = PinholeTable::open(&shared.pins)?;
    let stats = Stats::open(&shared.pins)?;
    let (internal_networks, external_addresses) = Status::config_fields(&shared.config);
    Ok(Status {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").into(),
        interfaces: shared.interfaces.clone(),
        internal_networks,
        external_addresses,
        maps: vec![
            MapStatus {
                name: firewall_common::map_names::FLOWS.into(),
                pinned: shared
                    .pins
                    .map(firewall_common::map_names::FLOWS)
                    .display()
                    .to_string(),
                entries: flows.all()?.len() as u64,
                capacity: flows.capacity() as u64,
            },
            MapStatus {
                name: firewall_common::map_names::PINHOLES.into(),
                pinned: shared
                    .pins
                    .map(firewall_common::map_names::PINHOLES)
                    .display()
                    .to_string(),
                entries: pinholes.entries()?.len() as u64,
                capacity: pinholes.capacity() as u64,
            },
        ],
        flows_expired: shared.engine().expired().clone(),
        executables_blocked: shared
            .executables_blocked
            .load(std::sync::atomic::Ordering::Relaxed),
        ftp_ports: shared.config.ftp_ports.clone(),
        ftp: shared.ftp.view(),
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
}

/// Entries of the flow table the timers read per tick, as the safety net
/// for flows no timer knows (lost events, an earlier daemon's flows): a full
/// pass over a table of N entries takes N / SCAN_BATCH ticks.
const SCAN_BATCH: usize = 1024;
const TICK: Duration = Duration::from_secs(1);

/// The engine's timers, once a second. The kernel's flow table is read
/// without the engine's lock: only the flows of due timers, and a bounded
/// batch of the table.
async fn tick(shared: Arc<Shared>) {
    let mut state = match FlowTable::open(&shared.pins) {
        Ok(t) => (t, crate::mapops::Scan::default()),
        Err(e) => {
            log::error!("engine timers: cannot open the flow table: {e:#}");
            return;
        }
    };
    loop {
        tokio::time::sleep(TICK).await;
        let s = shared.clone();
        let result = tokio::task::spawn_blocking(move || {
            let r = tick_once(&s, &state.0, &mut state.1);
            (r, state)
        })
        .await;
        match result {
            Ok((r, st)) => {
                state = st;
                if let Err(e) = r {
                    log::warn!("engine timers: {e:#}");
                }
            }
            Err(e) => {
                log::error!("engine timers panicked: {e}");
                return;
            }
        }
    }
}

fn tick_once(
    shared: &Shared,
    flows: &FlowTable,
    scan: &mut crate::mapops::Scan,
) -> anyhow::Result<()> {
    let now = crate::netif::monotonic_ns();
    let keys = shared.engine().timers_due(now);
    let mut readings = crate::engine::Readings::new();
    for k in keys {
        match flows.get(&k) {
            Ok(v) => {
                readings.insert(k, v);
            }
            Err(e) => log::debug!("engine timers: reading {k:?}: {e:#}"),
        }
    }
    let mut batch = flows.scan(scan, SCAN_BATCH)?;
    for k in sweeper::missing_peers(&batch) {
        if let Some(v) = flows.get(&k)? {
            batch.push((k, v));
        }
    }
    let mut engine = shared.engine();
    let r = engine.timers_apply(now, &readings, &batch);
    shared.publish(&mut engine);
    r.map_err(|e| anyhow::anyhow!("{e}"))
}

/// Hands the relay's connection events to the engine.
async fn read_relay_events(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<RelayEvent>,
    shared: Arc<Shared>,
) {
    while let Some(ev) = rx.recv().await {
        let mut engine = shared.engine();
        engine.on_relay_event(ev);
        // Whatever else queued up meanwhile, in one go.
        while let Ok(ev) = rx.try_recv() {
            engine.on_relay_event(ev);
        }
        shared.publish(&mut engine);
    }
}

/// How often the daemon reads the datapath's events. The datapath submits
/// them without waking the reader: a wake-up is an irq_work interrupt, which
/// cost 5 of the 6.8 µs of a connection's first packet here (measured in the
/// benchmark); bookkeeping a few milliseconds late costs nothing.
const EVENT_POLL: Duration = Duration::from_millis(10);

/// Hands the datapath's establishment events to the engine.
async fn read_datapath_events(mut rb: aya::maps::RingBuf<aya::maps::MapData>, shared: Arc<Shared>) {
    let mut every = tokio::time::interval(EVENT_POLL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let mut batch = Vec::new();
        while let Some(item) = rb.next() {
            batch.extend(datapath::decode_event(&item));
        }
        if batch.is_empty() {
            continue;
        }
        let (neigh, conns): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|e| e.kind == event_kind::NEED_NEIGHBOUR);
        for e in neigh {
            shared
                .neighbours
                .resolve(e.owner as u32, Ipv4Addr::from(e.forward.dst_addr));
        }
        if !conns.is_empty() {
            let mut engine = shared.engine();
            for ev in &conns {
                engine.on_datapath_event(ev);
            }
            shared.publish(&mut engine);
        }
    }
}

/// Forwards the datapath's aya-log records to the daemon's logger.
async fn poll_ebpf_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    use tokio::io::unix::AsyncFd;
    // SAFETY: the logger owns the ring buffer fd and moves into the AsyncFd,
    // which keeps it open for as long as it is registered.
    let mut fd =
        match unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
            Ok(fd) => fd,
            Err(e) => {
                log::warn!("cannot poll the eBPF log: {e}");
                return;
            }
        };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// The running daemon, as its state file describes it.
fn describe_running() -> String {
    match State::read() {
        Some(s) => format!(
            "a firewall daemon is running (pid {}, internal {}, external {}, API socket {})",
            s.pid,
            s.internal,
            s.external,
            s.socket.display()
        ),
        None => format!("a firewall daemon is running (it holds {LOCK_FILE})"),
    }
}

/// What `down` does: ask the running daemon to stop (at the socket it
/// recorded, whatever `socket` says), then remove whatever is left (also
/// after a crash), and restore the sysctls `up` changed. A daemon that runs
/// but does not stop keeps its datapath: `down` then fails.
pub fn down(socket: &Path) -> anyhow::Result<DownReport> {
    let mut stopped_daemon = false;
    if DaemonLock::held()? {
        let recorded = State::read().map(|s| s.socket);
        let at = recorded.as_deref().unwrap_or(socket);
        let client = api::Client::new(at).with_timeout(Duration::from_secs(5));
        match client.call(Request::Shutdown) {
            Ok(_) => {
                stopped_daemon = true;
                // The daemon releases its lock when it has torn down.
                for _ in 0..200 {
                    if !DaemonLock::held()? {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Err(e) => log::warn!("asking the daemon to stop: {e}"),
        }
        if DaemonLock::held()? {
            return Err(anyhow::Error::new(ApiError::new(
                ErrorKind::AlreadyRunning,
                format!(
                    "{}, but it did not stop when asked on {}: its datapath is left alone (stop the process first)",
                    describe_running(),
                    at.display()
                ),
            )));
        }
    }
    let state = State::read();
    let pins = PinPaths::default();
    let removed = teardown(&pins, state.as_ref())?;
    let _ = fs::remove_file(socket);
    Ok(DownReport {
        stopped_daemon,
        removed_pins: removed.iter().map(|p| p.display().to_string()).collect(),
    })
}

#[derive(Debug, Serialize)]
pub struct DownReport {
    pub stopped_daemon: bool,
    pub removed_pins: Vec<String>,
}
