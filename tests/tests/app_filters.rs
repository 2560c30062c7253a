//! Application filters with real connections: the engine and the user-mode
//! relay run in-process inside the lab's firewall namespace (no BPF needed:
//! user-mode connections never use the datapath), with filters registered
//! the way in-process filters are. Peers are real processes (socat).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use firewall_common::IPPROTO_TCP;
use firewall_ctl::{
    api::{ApiError, ErrorKind},
    engine::{BindRequest, Engine, EngineConfig, MemMaps},
    engine_owner::{EngineHandle, Outlets},
    filters::{
        Action, AppFilter, DataFilter, Direction, EmulatedPeer, EventContext, EventKind, EventMask,
        PriorityClass, Sockets,
    },
    flags::ConnFlags,
    policy::Transport,
    ports::PortPool,
    relay::Relay,
};
use firewall_tests::{
    lab::{addr, unique_prefix, Lab},
    netns::in_netns,
    require_root,
    traffic::{echo_server, send},
};

/// Upper-cases what comes from the external side; records its sockets.
struct Shout(Arc<Mutex<Option<Sockets>>>);
impl DataFilter for Shout {
    fn name(&self) -> &str {
        "shout"
    }
    fn set_sockets(&mut self, sockets: &Sockets) {
        *self.0.lock().unwrap() = Some(*sockets);
    }
    fn on_data(&mut self, dir: Direction, data: Vec<u8>) -> Action {
        match dir {
            Direction::FromExternal => Action::Forward(data.to_ascii_uppercase()),
            Direction::FromInternal => Action::Forward(data),
        }
    }
}

/// Attaches `Shout` to accepted connections from the server, denies the
/// second external host; once `failing` is set its handler fails (the way an
/// out-of-memory handler would). Records the terminating events it sees.
#[derive(Default)]
struct Gate {
    failing: AtomicBool,
    terminated: Mutex<Vec<u64>>,
    sockets: Arc<Mutex<Option<Sockets>>>,
    /// Emulate accepted connections (EmulateForBind at accept, with a source).
    emulating: AtomicBool,
    heard: Arc<Mutex<Vec<u8>>>,
}
impl AppFilter for Gate {
    fn name(&self) -> &str {
        "gate"
    }
    fn events(&self) -> EventMask {
        EventMask::ACCEPTED_CONNECTION
    }
    fn on_event(&self, ev: &mut EventContext<'_>) -> Result<(), ApiError> {
        assert_eq!(ev.kind, EventKind::AcceptedConnection);
        assert!(ev.is_secondary);
        assert_eq!(ev.protocol_name, "ftp", "the protocol reaches the events");
        // No external socket name before the connection exists.
        assert_eq!(
            ev.external_socket_name().unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
        if self.emulating.load(Ordering::Relaxed) {
            return ev.emulate_accepted(Box::new(Greeter(self.heard.clone())));
        }
        if self.failing.load(Ordering::Relaxed) {
            return Err(ApiError {
                kind: ErrorKind::Exhausted,
                message: "gate: out of memory".into(),
            });
        }
        if *ev.address.ip() == addr::EXTERNAL2.parse::<Ipv4Addr>().unwrap() {
            ev.deny(0)
        } else {
            ev.attach_data_filter(Box::new(Shout(self.sockets.clone())), PriorityClass::Middle)
        }
    }
    fn on_terminating(&self, connection: u64) {
        self.terminated.lock().unwrap().push(connection);
    }
}

/// Emulates TCP binds while `on` is set (EmulateForBind in fwx_Bind_Tcp).
#[derive(Default)]
struct Emulator {
    on: AtomicBool,
}
impl AppFilter for Emulator {
    fn name(&self) -> &str {
        "emulator"
    }
    fn events(&self) -> EventMask {
        EventMask::BIND_TCP
    }
    fn on_event(&self, ev: &mut EventContext<'_>) -> Result<(), ApiError> {
        if self.on.load(Ordering::Relaxed) {
            ev.emulate_for_bind()?;
        }
        Ok(())
    }
}

/// The data source of an emulated connection: greets the client and ends
/// once the client has echoed the greeting.
struct Greeter(Arc<Mutex<Vec<u8>>>);
impl EmulatedPeer for Greeter {
    fn name(&self) -> &str {
        "greeter"
    }
    fn on_connected(&mut self) -> Action {
        Action::Forward(b"hello from the emulator\n".to_vec())
    }
    fn on_client_data(&mut self, data: Vec<u8>) -> Action {
        let mut got = self.0.lock().unwrap();
        got.extend(data);
        if String::from_utf8_lossy(&got).contains("hello from the emulator\n") {
            Action::Close("done".into())
        } else {
            Action::Forward(Vec::new())
        }
    }
}

#[test]
fn accept_events_deny_or_attach_data_filters_on_real_connections() {
    // Attach at accept (user mode: the data filter sees the bytes) and deny
    // at accept (aborted: the single-use opening is used up).
    require_root();
    let _turn = firewall_tests::exclusive();
    let lab = Lab::create(&unique_prefix("apf")).unwrap();
    let fw_path = lab.fw.path();
    let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    let sa = |s: &str| s.parse::<SocketAddrV4>().unwrap();

    in_netns(&fw_path, || {
        // Threads the runtime starts from here live in the firewall's namespace too.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let cfg = EngineConfig {
            internal_ifindex: nix::net::if_::if_nametoindex(addr::IF_INTERNAL).unwrap(),
            external_ifindex: nix::net::if_::if_nametoindex(addr::IF_EXTERNAL).unwrap(),
            ..EngineConfig::lab()
        };
        let mut engine = Engine::new(
            cfg,
            MemMaps::default(),
            PortPool::new(30000..=30099, firewall_ctl::reserve::KernelReserver),
            Arc::new(firewall_ctl::netif::MonotonicClock),
        )
        .unwrap();
        let gate = Arc::new(Gate::default());
        engine.register_filter(gate.clone());
        let emulator = Arc::new(Emulator::default());
        engine.register_filter(emulator.clone());
        rt.block_on(async {
            // The engine's owner, as the daemon runs it: it carries out the
            // relay work each call decides.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let engine = EngineHandle::spawn(
                engine,
                Outlets {
                    relay: Relay::new(tx),
                    events: tokio::sync::broadcast::channel(64).0,
                    runtime: tokio::runtime::Handle::current(),
                },
            )
            .unwrap();
            let e2 = engine.clone();
            tokio::spawn(async move {
                while let Some(ev) = rx.recv().await {
                    e2.send(move |e| e.on_relay_event(ev));
                }
            });
            let client = ip(addr::CLIENT);
            let session = engine
                .call(move |e| e.open_session(client))
                .await
                .unwrap()
                .unwrap();
            let bind = |client: &str| BindRequest {
                session,
                clients: vec![sa(client)],
                proxy: None,
                protocol: Transport::Tcp,
                flags: ConnFlags::empty(),
                backlog: None,
                protocol_name: "ftp".into(),
                ip_filter: None,
                notify: true,
                context: None,
            };

            // Attach: the registered accept filter makes it user mode; bytes from the server are shouted.
            let b = engine
                .call({
                    let req = bind("10.1.0.2:5001");
                    move |e| e.bind_for_client(&req)
                })
                .await
                .unwrap()
                .unwrap();
            let port = b.proxy_address.port();
            let got = tokio::task::spawn_blocking({
                let lab_client = lab.client.clone();
                let lab_server = lab.server.clone();
                move || {
                    let mut c = echo_server(&lab_client, IPPROTO_TCP, addr::CLIENT, 5001);
                    let got = send(
                        &lab_server,
                        IPPROTO_TCP,
                        (addr::SERVER, 25001),
                        (addr::FW_EXTERNAL, port),
                        "quiet words",
                    );
                    let _ = c.wait();
                    got
                }
            })
            .await
            .unwrap();
            // The client echoes what it received (upper-cased on the way in);
            // the echo travels back unchanged (FromInternal).
            assert!(
                got.ends_with("QUIET WORDS\n"),
                "the attached data filter saw the bytes: {got:?}"
            );
            // The data filter learnt the external socket's name (E:p) and peer.
            let sockets = gate
                .sockets
                .lock()
                .unwrap()
                .expect("set_sockets was called");
            assert_eq!(
                sockets.external_name,
                SocketAddrV4::new(ip(addr::FW_EXTERNAL), port)
            );
            assert_eq!(sockets.external_peer, sa("10.2.0.2:25001"));
            assert_eq!(sockets.internal_peer, sa("10.1.0.2:5001"));
            assert_eq!(*sockets.internal_name.ip(), ip(addr::FW_INTERNAL));

            // Deny: the second external host is aborted, and the single-use opening is used up.
            let d = engine
                .call({
                    let req = bind("10.1.0.2:5002");
                    move |e| e.bind_for_client(&req)
                })
                .await
                .unwrap()
                .unwrap();
            let id = d.connections[0].id;
            let dport = d.proxy_address.port();
            let (denied, after) = tokio::task::spawn_blocking({
                let (client, ext2, server) = (
                    lab.client.clone(),
                    lab.external2.clone(),
                    lab.server.clone(),
                );
                move || {
                    let _c = echo_server(&client, IPPROTO_TCP, addr::CLIENT, 5002);
                    let denied = probe(&ext2, dport);
                    std::thread::sleep(Duration::from_millis(300));
                    (denied, probe(&server, dport))
                }
            })
            .await
            .unwrap();
            assert!(
                !denied.contains("hi"),
                "the denied peer got nothing: {denied:?}"
            );
            assert!(
                !after.contains("hi"),
                "the opening was used up by the denied connection: {after:?}"
            );
            let objects = engine.call(|e| e.objects()).await.unwrap();
            let o = objects.iter().find(|o| o.id == id).unwrap();
            assert_eq!(o.reason.as_deref(), Some("denied"), "{o:?}");
            assert!(gate.terminated.lock().unwrap().contains(&id));

            // A handler that fails at accept → the accept fails, the
            // single-use opening is used up, and terminating is still delivered.
            gate.failing.store(true, Ordering::Relaxed);
            let f = engine
                .call({
                    let req = bind("10.1.0.2:5003");
                    move |e| e.bind_for_client(&req)
                })
                .await
                .unwrap()
                .unwrap();
            let fid = f.connections[0].id;
            let fport = f.proxy_address.port();
            let failed = tokio::task::spawn_blocking({
                let (client, server) = (lab.client.clone(), lab.server.clone());
                move || {
                    let _c = echo_server(&client, IPPROTO_TCP, addr::CLIENT, 5003);
                    probe(&server, fport)
                }
            })
            .await
            .unwrap();
            assert!(
                !failed.contains("hi"),
                "the failed accept carried nothing: {failed:?}"
            );
            // The relay's event reaches the engine asynchronously.
            let mut reason = None;
            for _ in 0..50 {
                let objects = engine.call(|e| e.objects()).await.unwrap();
                reason = objects
                    .iter()
                    .find(|o| o.id == fid)
                    .and_then(|o| o.reason.clone());
                if reason.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(reason.as_deref(), Some("filter-failed"));
            assert!(
                gate.terminated.lock().unwrap().contains(&fid),
                "terminating delivered for the failed accept"
            );

            // Emulation: the bind is emulated (nothing listens), and
            // EmulateConnection connects the client to the filter's data source.
            gate.failing.store(false, Ordering::Relaxed);
            emulator.on.store(true, Ordering::Relaxed);
            let e = engine
                .call({
                    let req = bind("10.1.0.2:5004");
                    move |e| e.bind_for_client(&req)
                })
                .await
                .unwrap()
                .unwrap();
            let eid = e.connections[0].id;
            emulator.on.store(false, Ordering::Relaxed);
            let eport = e.proxy_address.port();
            let nothing = tokio::task::spawn_blocking({
                let server = lab.server.clone();
                move || probe(&server, eport)
            })
            .await
            .unwrap();
            assert!(
                nothing.is_empty(),
                "an emulated bind listens nowhere: {nothing:?}"
            );
            let plain = engine
                .call({
                    let req = bind("10.1.0.2:5005");
                    move |e| e.bind_for_client(&req)
                })
                .await
                .unwrap()
                .unwrap()
                .connections[0]
                .id;
            assert_eq!(
                engine
                    .call(move |e| e.emulate_connection(
                        plain,
                        sa("198.51.100.9:20"),
                        Box::new(Greeter(Default::default()))
                    ))
                    .await
                    .unwrap()
                    .unwrap_err()
                    .kind,
                ErrorKind::NotEmulated
            );
            let _echo = tokio::task::spawn_blocking({
                let client = lab.client.clone();
                move || echo_server(&client, IPPROTO_TCP, addr::CLIENT, 5004)
            })
            .await
            .unwrap();
            let heard = Arc::new(Mutex::new(Vec::new()));
            let greeter = Box::new(Greeter(heard.clone()));
            engine
                .call(move |e| e.emulate_connection(eid, sa("198.51.100.9:20"), greeter))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                engine
                    .call(move |e| e.emulate_connection(
                        eid,
                        sa("198.51.100.9:20"),
                        Box::new(Greeter(Default::default()))
                    ))
                    .await
                    .unwrap()
                    .unwrap_err()
                    .kind,
                ErrorKind::Terminating,
                "a single-use bind is used up by the call"
            );
            let mut reason = None;
            for _ in 0..60 {
                let objects = engine.call(|e| e.objects()).await.unwrap();
                reason = objects
                    .iter()
                    .find(|o| o.id == eid)
                    .and_then(|o| o.reason.clone());
                if reason.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let heard = String::from_utf8_lossy(&heard.lock().unwrap()).into_owned();
            assert!(
                heard.starts_with(addr::FW_INTERNAL),
                "the client was connected from the firewall's internal address: {heard:?}"
            );
            assert!(heard.ends_with("hello from the emulator\n"), "{heard:?}");
            assert_eq!(reason.as_deref(), Some("closed"), "established, then ended");

            // Emulation at accept: the external peer is answered by the
            // filter's data source; the client is never connected.
            gate.emulating.store(true, Ordering::Relaxed);
            let a = engine
                .call({
                    let req = bind("10.1.0.2:5006");
                    move |e| e.bind_for_client(&req)
                })
                .await
                .unwrap()
                .unwrap();
            let aport = a.proxy_address.port();
            let answered = tokio::task::spawn_blocking({
                let server = lab.server.clone();
                move || {
                    send(
                        &server,
                        IPPROTO_TCP,
                        (addr::SERVER, 25006),
                        (addr::FW_EXTERNAL, aport),
                        "knock knock",
                    )
                }
            })
            .await
            .unwrap();
            assert_eq!(answered, "hello from the emulator\n");
            assert_eq!(
                String::from_utf8_lossy(&gate.heard.lock().unwrap()),
                "knock knock\n"
            );
        });
        rt.shutdown_timeout(Duration::from_secs(1));
    })
    .unwrap();
}

/// Sends "hi" from `ns` to the firewall's external address and returns what came back.
fn probe(ns: &firewall_tests::lab::Ns, port: u16) -> String {
    let o = ns
        .cmd("sh")
        .args([
            "-c",
            &format!(
                "printf hi | socat -T2 - TCP:{}:{port},connect-timeout=2",
                addr::FW_EXTERNAL
            ),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}
