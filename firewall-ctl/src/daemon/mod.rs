//! The daemon behind `firewall-ctl up`, and the teardown behind `down`.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use tokio::{
    net::UnixListener,
    sync::{broadcast, watch},
};

use crate::{
    api::{self, ApiError, ErrorKind, InterfaceStatus},
    config::Config,
    datapath::{self, AttachMode, KernelMaps, PinPaths, Side},
    engine::{Engine, Event},
    engine_owner::{EngineHandle, Outlets},
    filters::{DataFilterFactory, ExecutableBlockerFactory},
    ftp::FtpStats,
    lock::DaemonLock,
    netif::Interface,
    ports::PortPool,
    primary,
    relay::Relay,
    routing::Resolver,
};

mod api_server;
mod attach;
mod ftp_calls;
mod ftp_in_place;
mod handover;
mod interception;
mod metrics;
mod notify;
mod reload;
mod state;
mod tasks;
mod udp_sweep;
mod wall;

pub use api_server::MAX_API_CONNECTIONS;
use state::{describe_running, remove_transparent_sockets};
pub use state::{down, teardown, DownReport, State, STATE_FILE};

pub struct UpOptions {
    pub internal: String,
    pub external: String,
    pub config: Option<PathBuf>,
    pub socket: PathBuf,
    /// The hook named by `--xdp-mode`; None: chosen by the interfaces' kinds
    /// and drivers.
    pub xdp_mode: Option<AttachMode>,
    /// Leave the datapath attached when the daemon exits (for restarts/upgrades).
    pub keep_datapath: bool,
}

/// What the API server and the daemon's tasks share.
struct Shared {
    pins: PinPaths,
    /// The running configuration; a reload replaces it.
    config: std::sync::RwLock<Arc<Config>>,
    /// Where it was read from (None: the embedded defaults), for a reload.
    config_path: Option<PathBuf>,
    internal: Interface,
    external: Interface,
    reload_turn: tokio::sync::Mutex<()>,
    interfaces: Vec<InterfaceStatus>,
    shutdown: watch::Sender<bool>,
    engine: EngineHandle<KernelMaps>,
    events: broadcast::Sender<Event>,
    neighbours: Arc<Resolver>,
    /// The engine's count of closed sessions (the FTP calls remember
    /// sessions until it moves).
    sessions_closed: Arc<std::sync::atomic::AtomicU64>,
    executables_blocked: Arc<std::sync::atomic::AtomicU64>,
    ftp: Arc<FtpStats>,
    api_connections: api_server::Connections,
    api_calls: metrics::ApiCalls,
    work: metrics::Work,
    /// The control connections the FTP filter proxies (`connection-flags`).
    controls: Arc<primary::Controls>,
}

impl Shared {
    fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
    let config = Config::read(opts.config.as_deref(), &internal, &external).map_err(invalid)?;

    wall::check_nat_ports(&config).map_err(invalid)?;

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

    // Bound before anything is attached: a taken address fails `up` with
    // nothing to undo.
    let metrics_listener = match config.metrics_listen {
        Some(at) => Some(tokio::net::TcpListener::bind(at).await.map_err(|e| {
            invalid(anyhow::anyhow!(
                "metrics.listen: cannot listen on {at}: {e}"
            ))
        })?),
        None => None,
    };

    let pins = PinPaths::default();
    datapath::check_bpffs(&pins.dir)?;
    // Pins left by a daemon that died: re-adopt them if they belong to the same
    // interfaces (established flows keep forwarding), otherwise clear them.
    let previous = State::read();
    let hook = attach::mode(&opts, previous.as_ref(), &pins, &internal, &external);
    let adopt = match &previous {
        Some(s) if attach::left_here(s, &pins, &internal, &external) && s.xdp_mode == hook.mode => {
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

    // Forwarding is turned on last, once the wall stands (`wall::raise`).
    let saved_sysctls = match &previous {
        Some(s) if adopt => s.saved_sysctls.clone(),
        _ => BTreeMap::new(),
    };

    let mut state = State {
        pid: std::process::id(),
        internal: internal.name.clone(),
        internal_ifindex: internal.index,
        external: external.name.clone(),
        external_ifindex: external.index,
        xdp_mode: hook.mode,
        socket: opts.socket.clone(),
        saved_sysctls,
        local_delivery: None,
    };
    // Written before attaching, so that `down` can undo a half-done `up`.
    state.write()?;

    let mut dp = match attach::start(&pins, &config, &internal, &external, hook, adopt) {
        Ok((dp, mode)) => {
            state.xdp_mode = mode;
            dp
        }
        Err(e) => {
            // Nothing half-allocated stays behind.
            let _ = teardown(&pins, Some(&state));
            // A chosen native XDP that a driver refused was already tried at
            // TC (`attach::start`). A hook the driver cannot run, named or
            // kept: the operator's to change.
            if e.chain().any(|c| c.is::<datapath::DriverRefused>()) {
                return Err(invalid(e));
            }
            return Err(e);
        }
    };
    let mode = state.xdp_mode;
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
    let events = broadcast::channel(1024).0;
    let sessions_closed = engine.sessions_closed();
    let engine = EngineHandle::spawn(
        engine,
        Outlets {
            relay: Relay::new(relay_tx),
            events: events.clone(),
            runtime: tokio::runtime::Handle::current(),
        },
    )
    .context("starting the engine's thread")?;
    let shared = Arc::new(Shared {
        pins: pins.clone(),
        config: std::sync::RwLock::new(Arc::new(config.clone())),
        config_path: opts.config.clone(),
        internal: internal.clone(),
        external: external.clone(),
        reload_turn: Default::default(),
        interfaces: vec![
            InterfaceStatus::new(Side::Internal, &internal, mode),
            InterfaceStatus::new(Side::External, &external, mode),
        ],
        shutdown: shutdown_tx,
        engine: engine.clone(),
        events,
        neighbours: Arc::new(Resolver::new()),
        sessions_closed,
        executables_blocked,
        ftp: Arc::new(FtpStats::default()),
        api_connections: Default::default(),
        api_calls: Default::default(),
        work: Default::default(),
        controls: Default::default(),
    });
    // Control connections a restarting daemon left in systemd's store.
    let resumed = handover::take();
    let interception_task = match interception::start(
        &mut dp,
        &config,
        &internal,
        &external,
        &shared,
        &mut state,
        resumed.proxied,
    ) {
        Ok(t) => t,
        Err(e) => {
            engine.stop();
            drop(dp);
            let _ = teardown(&pins, Some(&state));
            let _ = fs::remove_file(&opts.socket);
            return Err(e.context("starting the interception of primary connections"));
        }
    };
    let started = ftp_in_place::start(&mut dp, &config, &shared, resumed.in_place)
        .context("reading FTP control connections in place")
        .and_then(|task| {
            let raised = wall::raise(
                &pins,
                &config,
                &internal,
                &external,
                &mut state.saved_sysctls,
            );
            // Written either way: what was changed before a failure is
            // restored too.
            match raised.and(state.write()) {
                Ok(()) => Ok(task),
                // (The in-place thread stops as `task` goes.)
                Err(e) => Err(e.context("raising the wall")),
            }
        });
    let in_place_task = match started {
        Ok(t) => t,
        Err(e) => {
            if let Some(p) = interception_task {
                p.stop();
            }
            engine.stop();
            drop(dp);
            let _ = teardown(&pins, Some(&state));
            let _ = fs::remove_file(&opts.socket);
            return Err(e);
        }
    };
    log::info!(
        "firewall up: internal {} (ifindex {}), external {} (ifindex {}), XDP {:?}; API on {}",
        internal.name,
        internal.index,
        external.name,
        external.index,
        mode,
        opts.socket.display()
    );

    let mut tasks = vec![
        tokio::spawn(tasks::read_relay_events(relay_rx, shared.clone())),
        tokio::spawn(tasks::tick(shared.clone())),
        tokio::spawn(api_server::serve(listener, shared.clone())),
    ];
    if let Some(l) = metrics_listener {
        log::info!("metrics on http://{}/metrics", l.local_addr()?);
        tasks.push(tokio::spawn(metrics::serve(l, shared.clone())));
    }
    tasks.extend(
        dp.logger
            .take()
            .map(|l| tokio::spawn(tasks::poll_ebpf_log(l))),
    );
    tasks.extend(
        dp.events
            .take()
            .map(|rb| tokio::spawn(tasks::read_datapath_events(rb, shared.clone()))),
    );
    if notify::enabled() {
        tasks.push(tokio::spawn(notify::keep_alive(shared.clone())));
    }
    notify::ready(&format!(
        "up: internal {}, external {}, {:?}",
        internal.name, external.name, mode
    ));
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut keep = opts.keep_datapath;
    loop {
        tokio::select! {
            _ = sigint.recv() => { log::info!("SIGINT"); break; }
            _ = sigterm.recv() => { log::info!("SIGTERM"); break; }
            _ = shutdown_rx.changed() => { log::info!("shutdown requested over the API"); keep = false; break; }
            // Errors are logged by the reload; the daemon runs on.
            _ = sighup.recv() => { log::info!("SIGHUP: reloading the configuration"); let _ = reload::reload(&shared).await; }
        }
    }
    notify::stopping();

    // A restart under systemd (the datapath stays): the control connections
    // go to its store for the next daemon instead of ending.
    let mut kept_sockets = Vec::new();
    let handing_over = keep && notify::enabled();
    // The in-place thread stops first: its filters call the engine.
    let mut in_place_handed = match in_place_task {
        Some(t) if handing_over => t.hand_over(),
        // Its thread ends, its connections' unused openings withdrawn
        // (connections read in place go on in the kernel either way).
        t => {
            drop(t);
            Vec::new()
        }
    };
    let mut handed = match interception_task {
        Some(p) if handing_over => p.hand_over(),
        Some(p) => {
            p.stop();
            Vec::new()
        }
        None => Vec::new(),
    };
    if handing_over {
        handover::keep_pending(
            handed
                .iter_mut()
                .map(|h| &mut h.state)
                .chain(in_place_handed.iter_mut().map(|h| &mut h.state))
                .collect(),
            &engine,
        )
        .await;
        kept_sockets = handover::client_sockets(&handed);
        match handover::store(handed) {
            Ok(0) => {}
            Ok(n) => {
                log::info!("{n} FTP control connections handed to the service manager's store")
            }
            Err(e) => {
                kept_sockets.clear();
                log::warn!("handing the FTP control connections over failed ({e:#}): they end");
            }
        }
        match handover::store_in_place(&in_place_handed) {
            Ok(0) => {}
            Ok(n) => log::info!(
                "{n} FTP control connections read in place handed to the service manager's store"
            ),
            Err(e) => log::warn!(
                "handing the FTP control connections read in place over failed ({e:#}): their unused openings are lost"
            ),
        }
    }
    // Stops accepting API connections too (the listener goes with its task).
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    engine.stop();
    // The socket file goes last, so that `down`, which waits for it to
    // disappear, sees a finished teardown.
    drop(dp);
    let result = if keep {
        log::info!("leaving the datapath attached and pinned (--keep-datapath); `firewall-ctl down` removes it");
        remove_transparent_sockets(&kept_sockets);
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
