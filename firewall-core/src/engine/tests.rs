//! Engine rules without BPF: the maps are in memory.

use std::time::Duration;

use super::*;
use crate::ports::NoReservation;
use firewall_common::flow::FlowValue;

pub(super) const CLIENT: &str = "10.1.0.2";
/// The tests' "now": the engine's clock stands still there, and ticks are
/// given times from it.
pub(super) const T0: u64 = 1_000_000_000_000;

pub(super) fn clock() -> std::sync::Arc<dyn crate::clock::Clock> {
    std::sync::Arc::new(crate::clock::ManualClock::at(T0))
}
pub(super) const EXT: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);
pub(super) const INT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);

pub(super) fn cfg() -> EngineConfig {
    EngineConfig {
        internal_networks: vec!["10.1.0.0/16".parse().unwrap()],
        internal_ifindex: 2,
        external_ifindex: 3,
        timeouts: Timeouts {
            pinhole: Duration::from_secs(60),
            ..Timeouts::default()
        },
        networks: vec![NetworkObject {
            name: "lan".into(),
            ranges: vec!["10.1.0.0/23".parse().unwrap()],
        }],
        ..EngineConfig::lab()
    }
}

pub(super) fn engine_with(
    cfg: EngineConfig,
    range: std::ops::RangeInclusive<u16>,
) -> (Engine<MemMaps>, u64) {
    let mut e = Engine::new(
        cfg,
        MemMaps::default(),
        PortPool::new(range, NoReservation),
        clock(),
    )
    .unwrap();
    let s = e.open_session(CLIENT.parse().unwrap()).unwrap();
    (e, s)
}

pub(super) fn engine() -> (Engine<MemMaps>, u64) {
    engine_with(cfg(), 20000..=20999)
}

pub(super) fn a(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

pub(super) fn bind(session: u64, clients: &[&str]) -> BindRequest {
    BindRequest {
        session,
        clients: clients.iter().map(|c| a(c)).collect(),
        proxy: None,
        protocol: Transport::Tcp,
        flags: ConnFlags::empty(),
        backlog: None,
        protocol_name: "ftp".into(),
        ip_filter: None,
        notify: true,
        context: Some("ctx".into()),
    }
}

pub(super) fn redirect(session: u64, connects: &[&str]) -> RedirectRequest {
    RedirectRequest {
        session,
        connects: connects.iter().map(|c| a(c)).collect(),
        proxy_external: None,
        internal: None,
        protocol: Transport::Tcp,
        flags: ConnFlags::empty(),
        protocol_name: "ftp".into(),
        notify: true,
        context: None,
    }
}

pub(super) fn kind(r: Result<impl std::fmt::Debug, ApiError>) -> ErrorKind {
    r.expect_err("should fail").kind
}

/// Nothing reserved, written or created.
pub(super) fn assert_clean(e: &Engine<MemMaps>) {
    assert!(
        e.maps.pinholes.is_empty(),
        "pinholes left: {:?}",
        e.maps.pinholes
    );
    assert!(e.maps.rules.is_empty(), "peer rules left");
    assert_eq!(
        e.ports.in_use(EXT, Transport::Tcp) + e.ports.in_use(INT, Transport::Tcp),
        0,
        "ports left"
    );
    assert!(
        e.objects.values().all(|o| o.state == State::Terminated),
        "live objects left"
    );
}

pub(super) fn established(
    e: &mut Engine<MemMaps>,
    id: u64,
    peer: &str,
    peer_port: u16,
) -> (FlowKey, FlowKey) {
    let k = e.objects[&id].pinhole.unwrap();
    let v = e.maps.pinholes[&k];
    established_through(e, id, k, v, peer, peer_port)
}

/// What the datapath does on the first packet through pinhole `k` (value
/// `v`): two flow entries and an event.
pub(super) fn established_through(
    e: &mut Engine<MemMaps>,
    id: u64,
    k: PinholeKey,
    v: PinholeValue,
    peer: &str,
    peer_port: u16,
) -> (FlowKey, FlowKey) {
    let proto = k.protocol;
    let pip: Ipv4Addr = peer.parse().unwrap();
    let forward = FlowKey::new(proto, pip.octets(), peer_port, k.addr, k.port);
    let reply = FlowKey::new(proto, v.target_addr, v.target_port, pip.octets(), peer_port);
    let mut fv = FlowValue::forward(pip.octets(), peer_port, v.target_addr, v.target_port);
    fv.owner = id;
    fv.last_seen_ns = T0;
    let mut rv = FlowValue::forward(k.addr, k.port, pip.octets(), peer_port);
    rv.owner = id;
    rv.last_seen_ns = fv.last_seen_ns;
    e.maps.flows.insert(forward, fv);
    e.maps.flows.insert(reply, rv);
    e.on_datapath_event(&DatapathEvent {
        kind: event_kind::ESTABLISHED,
        owner: id,
        forward,
        reply,
        pinhole: k,
        ..Default::default()
    });
    (forward, reply)
}

#[test]
fn bind_for_client_installs_a_pinhole_per_address() {
    let (mut e, s) = engine();
    let r = e.bind_for_client(&bind(s, &["10.1.0.2:5001"])).unwrap();
    assert_eq!(*r.proxy_address.ip(), EXT);
    assert_ne!(r.proxy_address.port(), 0);
    assert_eq!(r.connections.len(), 1);
    let c = &r.connections[0];
    assert_eq!(
        (c.external, c.client),
        (r.proxy_address, a("10.1.0.2:5001"))
    );
    let key = PinholeKey::new(
        IPPROTO_TCP,
        EXT.octets(),
        r.proxy_address.port(),
        side::EXTERNAL,
    );
    let v = e.maps.pinholes[&key];
    assert_eq!((v.target_addr, v.target_port), ([10, 1, 0, 2], 5001));
    assert_eq!(v.flags & pinhole_flags::MULTIPLE, 0);
    assert_eq!(
        (v.remaining, v.owner, v.deadline_ns, v.egress_ifindex),
        (1, c.id, 0, 2)
    );
    assert_eq!(e.ports.in_use(EXT, Transport::Tcp), 1);
}

#[test]
fn consecutive_aligned_ports_for_n_addresses() {
    for n in [2usize, 3, 4] {
        let (mut e, s) = engine();
        let clients: Vec<String> = (0..n).map(|i| format!("10.1.0.2:{}", 5000 + i)).collect();
        let refs: Vec<&str> = clients.iter().map(String::as_str).collect();
        let r = e.bind_for_client(&bind(s, &refs)).unwrap();
        let p = r.proxy_address.port();
        assert_eq!(p as usize % n, 0, "lowest port a multiple of {n}");
        for (i, c) in r.connections.iter().enumerate() {
            assert_eq!(c.external.port(), p + i as u16, "consecutive");
            assert_eq!(
                c.client.port(),
                5000 + i as u16,
                "connection i goes to client address i"
            );
        }
    }
}

#[test]
fn argument_errors_are_invalid_argument_and_leave_nothing() {
    let (mut e, s) = engine();
    let mut cases: Vec<(&str, BindRequest)> = Vec::new();
    cases.push(("N = 0", bind(s, &[])));
    let many: Vec<String> = (0..65).map(|i| format!("10.1.0.2:{}", 5000 + i)).collect();
    cases.push((
        "N = 65",
        bind(s, &many.iter().map(String::as_str).collect::<Vec<_>>()),
    ));
    cases.push((
        "timeout + allow-multiple",
        BindRequest {
            flags: ConnFlags::TIMEOUT | ConnFlags::ALLOW_MULTIPLE,
            ..bind(s, &["10.1.0.2:5001"])
        },
    ));
    cases.push((
        "bidirectional with TCP",
        BindRequest {
            flags: ConnFlags::BIDIRECTIONAL,
            ..bind(s, &["10.1.0.2:5001"])
        },
    ));
    cases.push((
        "increase-receive-buffer with TCP",
        BindRequest {
            flags: ConnFlags::INCREASE_RECEIVE_BUFFER,
            ..bind(s, &["10.1.0.2:5001"])
        },
    ));
    cases.push((
        "a routed proxy in user mode",
        BindRequest {
            flags: ConnFlags::NO_KERNEL_MODE,
            proxy: Some(a("10.1.0.2:0")),
            ..bind(s, &["10.1.0.2:5001"])
        },
    ));
    cases.push(("client port 0", bind(s, &["10.1.0.2:0"])));
    cases.push(("IP 0 with a port", bind(s, &["0.0.0.0:21"])));
    for bad in [
        "255.255.255.255:1",
        "127.0.0.1:1",
        "224.0.0.1:1",
        "10.1.0.1:1",
        "10.2.0.1:1",
    ] {
        cases.push(("not a unicast client", bind(s, &[bad])));
    }
    cases.push((
        "explicit port with N > 1",
        BindRequest {
            proxy: Some(a("10.2.0.1:45002")),
            ..bind(s, &["10.1.0.2:5001", "10.1.0.2:5002"])
        },
    ));
    cases.push((
        "unknown protocol",
        BindRequest {
            protocol_name: "gopher".into(),
            ..bind(s, &["10.1.0.2:5001"])
        },
    ));
    cases.push((
        "backlog",
        BindRequest {
            backlog: Some(1 << 20),
            ..bind(s, &["10.1.0.2:5001"])
        },
    ));
    for (what, req) in cases {
        assert_eq!(
            kind(e.bind_for_client(&req)),
            ErrorKind::InvalidArgument,
            "{what}"
        );
        assert_clean(&e);
    }

    assert_eq!(
        kind(e.bind_for_client(&bind(999, &["10.1.0.2:5001"]))),
        ErrorKind::InvalidArgument,
        "unknown session"
    );
}

#[test]
fn the_bounce_guard_and_its_widening_flags() {
    let (mut e, s) = engine();
    let deny = |e: &mut Engine<MemMaps>, clients: &[&str], f: ConnFlags| {
        kind(e.bind_for_client(&BindRequest {
            flags: f,
            ..bind(s, clients)
        }))
    };
    assert_eq!(
        deny(&mut e, &["10.1.0.9:25"], ConnFlags::empty()),
        ErrorKind::AccessDenied
    );
    assert_eq!(
        deny(
            &mut e,
            &["10.1.1.9:5001"],
            ConnFlags::ALLOW_ADDRESSES_IN_CLASS_C_NETWORK
        ),
        ErrorKind::AccessDenied
    );
    assert_eq!(
        deny(
            &mut e,
            &["10.1.2.9:5001"],
            ConnFlags::ALLOW_ADDRESSES_IN_NETWORK
        ),
        ErrorKind::AccessDenied
    );
    // A mixed array fails whole: neither port stays bound.
    assert_eq!(
        deny(
            &mut e,
            &["10.1.0.2:5001", "10.1.0.9:5002"],
            ConnFlags::empty()
        ),
        ErrorKind::AccessDenied
    );
    assert_clean(&e);
    for (c, f) in [
        (
            "10.1.0.9:5001",
            ConnFlags::ALLOW_ADDRESSES_IN_CLASS_C_NETWORK,
        ),
        ("10.1.1.9:5001", ConnFlags::ALLOW_ADDRESSES_IN_NETWORK),
        ("172.16.9.9:5001", ConnFlags::ALLOW_ADDRESSES_ALL),
        ("10.1.0.2:21", ConnFlags::empty()),
    ] {
        e.bind_for_client(&BindRequest {
            flags: f,
            ..bind(s, &[c])
        })
        .unwrap_or_else(|e| panic!("{c}: {e}"));
    }
    // The administrator's default is OR-ed in.
    let (mut e, s) = engine_with(
        EngineConfig {
            default_allowed: ConnFlags::ALLOW_ADDRESSES_IN_CLASS_C_NETWORK,
            ..cfg()
        },
        20000..=20999,
    );
    e.bind_for_client(&bind(s, &["10.1.0.9:5001"])).unwrap();
}

#[test]
fn protocol_rules_and_addresses() {
    let (mut e, _) = engine();
    // 10.1.1.5 is internal but not allowed FTP by the rules (10.1.0.0/24 only).
    let s2 = e.open_session("10.1.1.5".parse().unwrap()).unwrap();
    assert_eq!(
        kind(e.bind_for_client(&bind(s2, &["10.1.1.5:5001"]))),
        ErrorKind::ProtocolDenied
    );
    let (mut e, s) = engine();
    assert_eq!(
        kind(e.bind_for_client(&BindRequest {
            proxy: Some(a("192.0.2.1:0")),
            ..bind(s, &["10.1.0.2:5001"])
        })),
        ErrorKind::AddressNotAvailable
    );
    // An internal client address as the proxy (routed): no firewall port is allocated.
    let r = e
        .bind_for_client(&BindRequest {
            proxy: Some(a("10.1.0.2:0")),
            ..bind(s, &["10.1.0.2:5001"])
        })
        .unwrap();
    assert_eq!(r.proxy_address, a("10.1.0.2:5001"));
    assert_eq!(e.ports.in_use(EXT, Transport::Tcp), 0);
    assert_eq!(
        kind(e.bind_for_client(&BindRequest {
            proxy: Some(a("10.1.0.2:0")),
            ..bind(s, &["10.1.0.3:5001"])
        })),
        ErrorKind::InvalidArgument
    );
    // Sessions only for internal clients.
    assert_eq!(
        kind(e.open_session("192.0.2.9".parse().unwrap())),
        ErrorKind::InvalidArgument
    );
}

#[test]
fn explicit_ports_conflicts_and_exhaustion() {
    let (mut e, s) = engine_with(cfg(), 30000..=30009);
    let one = |p: &str| BindRequest {
        proxy: Some(a(p)),
        ..bind(s, &["10.1.0.2:5001"])
    };
    assert_eq!(
        e.bind_for_client(&one("10.2.0.1:45000"))
            .unwrap()
            .proxy_address,
        a("10.2.0.1:45000")
    );
    assert_eq!(
        kind(e.bind_for_client(&one("10.2.0.1:45000"))),
        ErrorKind::AddressInUse
    );
    // The other protocol is a separate space.
    e.bind_for_client(&BindRequest {
        protocol: Transport::Udp,
        ..one("10.2.0.1:45000")
    })
    .unwrap();
    // Ten ports in the pool: ten binds, then exhausted; a Kill frees one.
    let ids: Vec<u64> = (0..10)
        .map(|_| {
            e.bind_for_client(&bind(s, &["10.1.0.2:5001"]))
                .unwrap()
                .connections[0]
                .id
        })
        .collect();
    assert_eq!(
        kind(e.bind_for_client(&bind(s, &["10.1.0.2:5001"]))),
        ErrorKind::Exhausted
    );
    e.kill(ids[4]).unwrap();
    e.bind_for_client(&bind(s, &["10.1.0.2:5001"])).unwrap();
    // A redirect's port on the same address/protocol conflicts too.
    let (mut e, s) = engine();
    let r = e
        .redirect_connections(&RedirectRequest {
            proxy_external: Some(a("10.2.0.1:45100")),
            ..redirect(s, &["198.51.100.7:2000"])
        })
        .unwrap();
    assert_eq!(
        kind(e.bind_for_client(&one("10.2.0.1:45100"))),
        ErrorKind::AddressInUse
    );
    e.cancel(r.actions[0].id).unwrap();
    e.bind_for_client(&one("10.2.0.1:45100")).unwrap();
}

#[test]
fn a_failure_at_the_last_allocation_leaves_nothing() {
    // Proxy mode needs a SNAT port on the internal address per connection;
    // with 2 internal ports free, N = 4 fails after the external block was taken.
    let (mut e, s) = engine_with(cfg(), 30000..=30003);
    let req = BindRequest {
        flags: ConnFlags::PROXY_MODE,
        ..bind(s, &["10.1.0.2:1", "10.1.0.2:2", "10.1.0.2:3", "10.1.0.2:4"])
    };
    for p in [30000, 30001] {
        e.ports.reserve_exact(INT, Transport::Tcp, p).unwrap();
    }
    assert_eq!(kind(e.bind_for_client(&req)), ErrorKind::Exhausted);
    assert!(e.maps.pinholes.is_empty());
    assert_eq!(e.ports.in_use(EXT, Transport::Tcp), 0);
    assert_eq!(
        e.ports.in_use(INT, Transport::Tcp),
        2,
        "only what was taken before"
    );
    assert!(e.take_events().is_empty(), "no events for a failed call");
}

#[test]
fn flags_reach_the_pinholes() {
    let (mut e, s) = engine();
    let r = e
        .bind_for_client(&BindRequest {
            flags: ConnFlags::ALLOW_MULTIPLE | ConnFlags::PROXY_MODE,
            ..bind(s, &["10.1.0.2:5001"])
        })
        .unwrap();
    let v = *e.maps.pinholes.values().next().unwrap();
    assert_ne!(v.flags & pinhole_flags::MULTIPLE, 0);
    assert_eq!(
        (v.snat_addr, v.snat_port_count),
        (INT.octets(), 4),
        "proxy-mode: SNAT to the internal address, a block for multiple"
    );
    e.kill(r.connections[0].id).unwrap();
    let r = e
        .bind_for_client(&BindRequest {
            protocol: Transport::Udp,
            flags: ConnFlags::TIMEOUT
                | ConnFlags::BIDIRECTIONAL
                | ConnFlags::INCREASE_RECEIVE_BUFFER,
            ..bind(s, &["10.1.0.2:6000"])
        })
        .unwrap();
    let v = e.maps.pinholes.values().next().unwrap();
    assert_ne!(v.flags & pinhole_flags::BIDIRECTIONAL, 0);
    assert!(v.deadline_ns > T0, "TIMEOUT sets a deadline");
    assert_eq!(v.remaining, 1);
    e.kill(r.connections[0].id).unwrap();
    // The IP filter becomes peer rules, removed with the last connection using them.
    let f = IpFilter {
        include: vec!["10.2.0.2/32".parse().unwrap()],
        exclude: vec![],
    };
    let r = e
        .bind_for_client(&BindRequest {
            ip_filter: Some(f),
            ..bind(s, &["10.1.0.2:1", "10.1.0.2:2"])
        })
        .unwrap();
    let fid = e.maps.pinholes.values().next().unwrap().peer_filter;
    assert_ne!(fid, 0);
    assert_eq!(
        e.maps.rules.get(&(fid, "10.2.0.2/32".parse().unwrap())),
        Some(&true)
    );
    e.kill(r.connections[0].id).unwrap();
    assert_eq!(e.maps.rules.len(), 1, "still used by connection 1");
    e.kill(r.connections[1].id).unwrap();
    assert!(e.maps.rules.is_empty());
    // An empty filter: a filter id with no rules (nobody matches).
    e.bind_for_client(&BindRequest {
        ip_filter: Some(IpFilter::default()),
        ..bind(s, &["10.1.0.2:1"])
    })
    .unwrap();
    assert_ne!(e.maps.pinholes.values().next().unwrap().peer_filter, 0);
}

#[test]
fn kill_is_idempotent_and_raises_terminating_once() {
    let (mut e, s) = engine();
    let id = e
        .bind_for_client(&bind(s, &["10.1.0.2:5001"]))
        .unwrap()
        .connections[0]
        .id;
    e.take_events();
    e.kill(id).unwrap();
    e.kill(id).unwrap();
    let ev = e.take_events();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert!(matches!(ev[0], Event::Terminating { connection, .. } if connection == id));
    assert_clean(&e);
    assert_eq!(
        kind(e.set_client_address(id, a("10.1.0.2:1"))),
        ErrorKind::Terminating
    );
    assert_eq!(kind(e.kill(12345)), ErrorKind::InvalidArgument);
}

#[test]
fn placeholders_and_set_client_address() {
    let (mut e, s) = engine();
    let id = e
        .bind_for_client(&bind(s, &["0.0.0.0:0"]))
        .unwrap()
        .connections[0]
        .id;
    let v = *e.maps.pinholes.values().next().unwrap();
    assert_ne!(
        v.flags & pinhole_flags::NO_TARGET,
        0,
        "refuses connections until the address is known"
    );
    assert_eq!(
        kind(e.set_client_address(id, a("10.1.0.9:25"))),
        ErrorKind::AccessDenied,
        "the bounce guard applies"
    );
    assert_ne!(
        e.maps.pinholes.values().next().unwrap().flags & pinhole_flags::NO_TARGET,
        0,
        "still unusable"
    );
    e.set_client_address(id, a("10.1.0.2:5001")).unwrap();
    let v = *e.maps.pinholes.values().next().unwrap();
    assert_eq!(
        (
            v.flags & pinhole_flags::NO_TARGET,
            v.target_addr,
            v.target_port
        ),
        (0, [10, 1, 0, 2], 5001)
    );
    assert_eq!(
        kind(e.set_client_address(id, a("10.1.0.2:5002"))),
        ErrorKind::InvalidArgument,
        "only once"
    );
}

#[test]
fn established_single_and_multiple() {
    let (mut e, s) = engine();
    let id = e
        .bind_for_client(&bind(s, &["10.1.0.2:5001"]))
        .unwrap()
        .connections[0]
        .id;
    established(&mut e, id, "198.51.100.7", 20);
    let ev = e.take_events();
    assert!(
        matches!(&ev[0], Event::Established { connection, from, to, context: Some(c), parent: None, .. }
        if *connection == id && *from == a("198.51.100.7:20") && *to == a("10.1.0.2:5001") && c == "ctx"),
        "{ev:?}"
    );
    assert_eq!(e.objects[&id].state, State::Established);

    // ALLOW_MULTIPLE: each connection gets its own object and event.
    let m = e
        .bind_for_client(&BindRequest {
            flags: ConnFlags::ALLOW_MULTIPLE,
            ..bind(s, &["10.1.0.2:5002"])
        })
        .unwrap()
        .connections[0]
        .id;
    for port in [1000, 1001, 1002] {
        established(&mut e, m, "198.51.100.7", port);
    }
    let ev = e.take_events();
    assert_eq!(ev.len(), 3);
    let children: Vec<u64> = e
        .objects
        .iter()
        .filter(|(_, o)| o.parent == Some(m))
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(children.len(), 3);
    assert_eq!(e.objects[&m].state, State::Listening, "still accepting");
    // Killing the parent ends the children and removes their flows.
    e.kill(m).unwrap();
    assert!(children
        .iter()
        .all(|c| e.objects[c].state == State::Terminated));

    // Without notify there is no established event (pSessionFilter = NULL).
    let q = e
        .bind_for_client(&BindRequest {
            notify: false,
            ..bind(s, &["10.1.0.2:5003"])
        })
        .unwrap()
        .connections[0]
        .id;
    e.take_events();
    established(&mut e, q, "198.51.100.7", 21);
    assert!(e.take_events().is_empty());
}

#[test]
fn timers_end_unused_and_closed_connections() {
    let (mut e, s) = engine();
    let t = e
        .bind_for_client(&BindRequest {
            flags: ConnFlags::TIMEOUT,
            ..bind(s, &["10.1.0.2:5001"])
        })
        .unwrap()
        .connections[0]
        .id;
    let keep = e
        .bind_for_client(&bind(s, &["10.1.0.2:5002"]))
        .unwrap()
        .connections[0]
        .id;
    let now = T0;
    e.tick(now + 30_000_000_000).unwrap();
    assert_eq!(e.objects[&t].state, State::Listening, "at 30 s still there");
    e.tick(now + 61_000_000_000).unwrap();
    assert_eq!(e.objects[&t].state, State::Terminated, "at 61 s closed");
    assert_eq!(e.objects[&t].reason.as_deref(), Some("timeout"));
    assert_eq!(
        e.objects[&keep].state,
        State::Listening,
        "no TIMEOUT: lives until Kill"
    );

    // A TCP connection whose flows saw FIN both ways ends after tcp_closing.
    let (f, r) = established(&mut e, keep, "198.51.100.7", 20);
    for k in [f, r] {
        e.maps.flows.get_mut(&k).unwrap().tcp_flags_seen = firewall_common::flow::tcp_seen::FIN;
    }
    e.take_events();
    e.tick(T0 + 11_000_000_000).unwrap();
    assert_eq!(e.objects[&keep].state, State::Terminated);
    assert!(e.maps.flows.is_empty());
    assert!(
        matches!(e.take_events()[..], [Event::Terminating { ref reason, .. }] if reason == "closed")
    );
    assert_clean(&e);
}

#[test]
fn udp_without_timeout_lives_until_kill() {
    let (mut e, s) = engine();
    let id = e
        .bind_for_client(&BindRequest {
            protocol: Transport::Udp,
            ..bind(s, &["10.1.0.2:6000"])
        })
        .unwrap()
        .connections[0]
        .id;
    established(&mut e, id, "198.51.100.7", 7000);
    e.tick(T0 + 3_600_000_000_000).unwrap();
    assert_eq!(e.objects[&id].state, State::Established);
    assert_eq!(e.maps.flows.len(), 2);
    // With TIMEOUT it ends when idle.
    let t = e
        .bind_for_client(&BindRequest {
            protocol: Transport::Udp,
            flags: ConnFlags::TIMEOUT,
            ..bind(s, &["10.1.0.2:6001"])
        })
        .unwrap()
        .connections[0]
        .id;
    established(&mut e, t, "198.51.100.7", 7001);
    e.tick(T0 + 61_000_000_000).unwrap();
    assert_eq!(e.objects[&t].state, State::Terminated);
    assert_eq!(e.objects[&id].state, State::Established);
}

#[test]
fn sessions_close_everything() {
    let (mut e, s) = engine();
    e.bind_for_client(&bind(s, &["10.1.0.2:5001", "10.1.0.2:5002"]))
        .unwrap();
    e.redirect_connections(&redirect(s, &["198.51.100.7:2000"]))
        .unwrap();
    assert_eq!(
        e.open_session(CLIENT.parse().unwrap()).unwrap(),
        s,
        "one session per client"
    );
    e.close_session(s).unwrap();
    e.close_session(s).unwrap();
    assert_clean(&e);
    assert_eq!(
        kind(e.bind_for_client(&bind(s, &["10.1.0.2:5001"]))),
        ErrorKind::Terminating
    );
    assert_eq!(
        kind(e.redirect_connections(&redirect(s, &["198.51.100.7:2000"]))),
        ErrorKind::Terminating
    );
    assert_ne!(
        e.open_session(CLIENT.parse().unwrap()).unwrap(),
        s,
        "a new session after close"
    );
}

#[test]
fn redirect_connections() {
    let (mut e, s) = engine();
    let r = e
        .redirect_connections(&redirect(s, &["198.51.100.7:2000", "198.51.100.7:2001"]))
        .unwrap();
    assert_eq!(*r.internal_address.ip(), INT);
    assert_eq!(r.internal_address.port() % 2, 0);
    assert_eq!(r.actions[1].internal.port(), r.internal_address.port() + 1);
    for (i, act) in r.actions.iter().enumerate() {
        let k = PinholeKey::new(
            IPPROTO_TCP,
            INT.octets(),
            act.internal.port(),
            side::INTERNAL,
        );
        let v = e.maps.pinholes[&k];
        assert_eq!(
            (v.target_addr, v.target_port),
            ([198, 51, 100, 7], 2000 + i as u16)
        );
        assert_eq!(v.allowed_src, [10, 1, 0, 2], "only the session's client");
        assert_ne!(v.flags & pinhole_flags::CLIENT_ONLY, 0);
        assert_eq!(
            (v.snat_addr, v.snat_port_count, v.egress_ifindex),
            (EXT.octets(), 1, 3)
        );
    }
    // Cancel: once; again → terminating; a used single-use action cancels itself.
    e.cancel(r.actions[0].id).unwrap();
    assert_eq!(kind(e.cancel(r.actions[0].id)), ErrorKind::Terminating);
    established(&mut e, r.actions[1].id, "10.1.0.2", 40000);
    assert_eq!(kind(e.cancel(r.actions[1].id)), ErrorKind::Terminating);
    assert_eq!(
        kind(e.kill(r.actions[1].id)),
        ErrorKind::InvalidArgument,
        "actions are cancelled, not killed"
    );

    for (what, req) in [
        (
            "bidirectional",
            RedirectRequest {
                flags: ConnFlags::BIDIRECTIONAL,
                ..redirect(s, &["198.51.100.7:1"])
            },
        ),
        (
            "timeout + multiple",
            RedirectRequest {
                flags: ConnFlags::TIMEOUT | ConnFlags::ALLOW_MULTIPLE,
                ..redirect(s, &["198.51.100.7:1"])
            },
        ),
        ("N = 0", redirect(s, &[])),
        ("port 0", redirect(s, &["198.51.100.7:0"])),
        ("internal destination", redirect(s, &["10.1.0.9:21"])),
        (
            "explicit port with multiple",
            RedirectRequest {
                flags: ConnFlags::ALLOW_MULTIPLE,
                proxy_external: Some(a("10.2.0.1:45000")),
                ..redirect(s, &["198.51.100.7:1"])
            },
        ),
    ] {
        assert_eq!(
            kind(e.redirect_connections(&req)),
            ErrorKind::InvalidArgument,
            "{what}"
        );
    }
    assert_eq!(
        kind(e.redirect_connections(&RedirectRequest {
            proxy_external: Some(a("10.9.9.9:0")),
            ..redirect(s, &["198.51.100.7:1"])
        })),
        ErrorKind::AddressNotAvailable
    );
    // No proxy external address: any (the first external one).
    let r = e
        .redirect_connections(&RedirectRequest {
            proxy_external: None,
            flags: ConnFlags::ALLOW_MULTIPLE,
            ..redirect(s, &["198.51.100.7:3000"])
        })
        .unwrap();
    let k = PinholeKey::new(
        IPPROTO_TCP,
        INT.octets(),
        r.internal_address.port(),
        side::INTERNAL,
    );
    assert_eq!(
        e.maps.pinholes[&k].snat_port_count, 4,
        "a SNAT block for multiple connections"
    );
}

#[test]
fn a_restarted_engine_clears_orphaned_pinholes_and_keeps_flows() {
    let mut maps = MemMaps::default();
    maps.pinholes.insert(
        PinholeKey::new(6, EXT.octets(), 20000, 1),
        PinholeValue {
            owner: 7,
            ..Default::default()
        },
    );
    let mut v = FlowValue::forward([1; 4], 1, [2; 4], 2);
    v.owner = 41;
    maps.flows.insert(FlowKey::new(6, [1; 4], 1, [2; 4], 2), v);
    let mut e = Engine::new(
        cfg(),
        maps,
        PortPool::new(20000..=20999, NoReservation),
        clock(),
    )
    .unwrap();
    assert!(e.maps.pinholes.is_empty());
    assert_eq!(e.maps.flows.len(), 1);
    assert!(
        e.open_session(CLIENT.parse().unwrap()).unwrap() > 41,
        "ids after the surviving owners"
    );
}

#[test]
fn no_kernel_mode_goes_to_the_relay_and_never_to_the_maps() {
    let (mut e, s) = engine();
    let r = e
        .bind_for_client(&BindRequest {
            flags: ConnFlags::NO_KERNEL_MODE | ConnFlags::TIMEOUT,
            ..bind(s, &["0.0.0.0:0"])
        })
        .unwrap();
    let id = r.connections[0].id;
    assert!(e.maps.pinholes.is_empty(), "user mode writes no pinhole");
    assert!(e.maps.rules.is_empty());
    let cmds = e.take_relay_cmds();
    assert!(
        matches!(&cmds[..], [RelayCmd::Start(j)] if j.owner == id && j.transport == Transport::Tcp && j.target.is_none())
    );
    assert_eq!(e.objects()[0].mode, Mode::User);
    // The placeholder is set in the relay, not in a pinhole.
    e.set_client_address(id, a("10.1.0.2:5001")).unwrap();
    assert!(
        matches!(e.take_relay_cmds()[..], [RelayCmd::SetTarget { owner, target }] if owner == id && target == a("10.1.0.2:5001"))
    );
    // A connection through the relay: established, then closed.
    e.take_events();
    let bytes = Arc::new(AtomicU64::new(42));
    e.on_relay_event(RelayEvent::Established {
        owner: id,
        conn: 9,
        from: a("198.51.100.7:20"),
        to: a("10.1.0.2:5001"),
        bytes,
    });
    assert!(
        matches!(e.take_events()[..], [Event::Established { connection, .. }] if connection == id)
    );
    assert_eq!(e.objects()[0].bytes, 42);
    assert!(e.maps.flows.is_empty(), "never in the flow table");
    e.on_relay_event(RelayEvent::Closed { owner: id, conn: 9 });
    assert_eq!(e.objects[&id].state, State::Terminated);
    assert!(matches!(e.take_relay_cmds()[..], [RelayCmd::Stop { owner }] if owner == id));
    assert_clean(&e);

    // TIMEOUT on an unused user-mode endpoint; kill of a multiple's child.
    let t = e
        .bind_for_client(&BindRequest {
            flags: ConnFlags::NO_KERNEL_MODE | ConnFlags::TIMEOUT,
            ..bind(s, &["10.1.0.2:5002"])
        })
        .unwrap()
        .connections[0]
        .id;
    e.tick(T0 + 61_000_000_000).unwrap();
    assert_eq!(e.objects[&t].reason.as_deref(), Some("timeout"));
    let m = e
        .bind_for_client(&BindRequest {
            flags: ConnFlags::NO_KERNEL_MODE | ConnFlags::ALLOW_MULTIPLE,
            ..bind(s, &["10.1.0.2:5003"])
        })
        .unwrap()
        .connections[0]
        .id;
    e.take_relay_cmds();
    e.on_relay_event(RelayEvent::Established {
        owner: m,
        conn: 1,
        from: a("198.51.100.7:21"),
        to: a("10.1.0.2:5003"),
        bytes: Arc::default(),
    });
    let child = e
        .objects
        .iter()
        .find(|(_, o)| o.parent == Some(m))
        .map(|(k, _)| *k)
        .unwrap();
    e.kill(child).unwrap();
    assert!(
        matches!(e.take_relay_cmds()[..], [RelayCmd::StopConn { owner, conn: 1 }] if owner == m)
    );
    assert_eq!(e.objects[&m].state, State::Listening);
    // Redirects too; an explicit external port is not supported in user mode.
    let rr = e
        .redirect_connections(&RedirectRequest {
            flags: ConnFlags::NO_KERNEL_MODE,
            ..redirect(s, &["198.51.100.7:2000"])
        })
        .unwrap();
    assert!(e.maps.pinholes.is_empty());
    assert!(
        matches!(&e.take_relay_cmds()[..], [RelayCmd::Start(j)] if j.owner == rr.actions[0].id && matches!(j.admit, Admit::Client(c) if c == Ipv4Addr::new(10, 1, 0, 2)))
    );
    assert_eq!(
        kind(e.redirect_connections(&RedirectRequest {
            flags: ConnFlags::NO_KERNEL_MODE,
            proxy_external: Some(a("10.2.0.1:45000")),
            ..redirect(s, &["198.51.100.7:1"])
        })),
        ErrorKind::InvalidArgument
    );
}

/// What a scripted step returned: (event, step, result).
type StepResult = (EventKind, &'static str, Result<(), ErrorKind>);

/// A filter whose handler runs a script of calls and records the results.
struct Scripted {
    name: &'static str,
    mask: filters::EventMask,
    script: std::sync::Mutex<Vec<(EventKind, &'static str)>>,
    results: std::sync::Mutex<Vec<StepResult>>,
    terminated: std::sync::Mutex<Vec<u64>>,
}

impl Scripted {
    fn new(
        name: &'static str,
        mask: filters::EventMask,
        script: &[(EventKind, &'static str)],
    ) -> Arc<Self> {
        Arc::new(Self {
            name,
            mask,
            script: std::sync::Mutex::new(script.to_vec()),
            results: Default::default(),
            terminated: Default::default(),
        })
    }
    fn results(&self) -> Vec<StepResult> {
        self.results.lock().unwrap().clone()
    }
}

struct Nop;
impl filters::DataFilter for Nop {
    fn name(&self) -> &str {
        "nop"
    }
    fn on_data(&mut self, _d: filters::Direction, data: Vec<u8>) -> filters::Action {
        filters::Action::Forward(data)
    }
}

impl AppFilter for Scripted {
    fn name(&self) -> &str {
        self.name
    }
    fn events(&self) -> filters::EventMask {
        self.mask
    }
    fn on_event(&self, ev: &mut filters::EventContext<'_>) -> Result<(), ApiError> {
        let steps: Vec<&'static str> = self
            .script
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| *k == ev.kind)
            .map(|(_, s)| *s)
            .collect();
        for step in steps {
            let r = match step {
                "deny" => ev.deny(0),
                "deny1" => ev.deny(1),
                "attach" => ev.attach_data_filter(Box::new(Nop), filters::PriorityClass::Middle),
                "emulate" => ev.emulate_for_bind(),
                "fail" => return Err(ApiError::new(ErrorKind::Internal, "out of memory")),
                _ => Ok(()),
            };
            self.results
                .lock()
                .unwrap()
                .push((ev.kind, step, r.map_err(|e| e.kind)));
        }
        Ok(())
    }
    fn on_terminating(&self, connection: u64) {
        self.terminated.lock().unwrap().push(connection);
    }
}

#[test]
fn a_deny_in_the_bind_event_fails_the_call_with_nothing_left() {
    let (mut e, s) = engine();
    let f = Scripted::new(
        "denier",
        filters::EventMask::BIND_TCP,
        &[(EventKind::BindTcp, "deny")],
    );
    e.register_filter(f.clone());
    let err = e
        .bind_for_client(&bind(s, &["10.1.0.2:5001", "10.1.0.2:5002"]))
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::AddressInUse);
    assert!(
        err.message.contains("denied by filter denier"),
        "{}",
        err.message
    );
    assert_clean(&e);
    assert!(e.take_relay_cmds().is_empty());
}

#[test]
fn calls_are_valid_only_in_their_events() {
    let (mut e, s) = engine();
    let f = Scripted::new(
        "checker",
        filters::EventMask::BIND_TCP | filters::EventMask::BIND_UDP | filters::EventMask::LISTEN,
        &[
            (EventKind::Listen, "deny"),
            (EventKind::BindTcp, "deny1"),
            (EventKind::BindTcp, "attach"),
            (EventKind::BindUdp, "attach"),
            (EventKind::BindUdp, "emulate"),
            (EventKind::BindUdp, "emulate"),
        ],
    );
    e.register_filter(f.clone());
    let t = e.bind_for_client(&bind(s, &["10.1.0.2:5001"])).unwrap();
    assert_eq!(
        e.objects[&t.connections[0].id].state,
        State::Listening,
        "a deny in listen has no effect"
    );
    let u = e
        .bind_for_client(&BindRequest {
            protocol: Transport::Udp,
            ..bind(s, &["10.1.0.2:6000"])
        })
        .unwrap();
    let r = f.results();
    let get = |k: EventKind, step: &str| {
        r.iter()
            .filter(|(kk, ss, _)| *kk == k && *ss == step)
            .map(|(_, _, res)| *res)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        get(EventKind::Listen, "deny"),
        vec![Err(ErrorKind::BadContext)],
        "listen cannot be refused"
    );
    assert_eq!(
        get(EventKind::BindTcp, "deny1"),
        vec![Err(ErrorKind::InvalidArgument)],
        "Deny(1)"
    );
    assert_eq!(
        get(EventKind::BindTcp, "attach"),
        vec![Err(ErrorKind::BadContext)],
        "TCP data filters attach at accept, not bind"
    );
    assert_eq!(get(EventKind::BindUdp, "attach"), vec![Ok(())]);
    assert_eq!(
        get(EventKind::BindUdp, "emulate"),
        vec![Ok(()), Err(ErrorKind::AlreadyEmulated)]
    );
    // The UDP bind with a data filter attached is user mode; the TCP one is kernel.
    let mode = |id: u64| e.objects[&id].mode;
    assert_eq!(mode(t.connections[0].id), Mode::Kernel);
    assert_eq!(mode(u.connections[0].id), Mode::User);
    // Terminating reaches the filters without registration.
    e.kill(t.connections[0].id).unwrap();
    assert_eq!(*f.terminated.lock().unwrap(), vec![t.connections[0].id]);
}

#[test]
fn a_filter_registered_for_the_resulting_event_keeps_connections_in_user_mode() {
    // The decision rule: registered for accepts (TCP binds) or connects (TCP redirects).
    let (mut e, s) = engine();
    let k = e.bind_for_client(&bind(s, &["10.1.0.2:5001"])).unwrap();
    assert_eq!(
        e.objects[&k.connections[0].id].mode,
        Mode::Kernel,
        "nobody registered"
    );
    e.register_filter(Scripted::new(
        "watcher",
        filters::EventMask::ACCEPTED_CONNECTION,
        &[],
    ));
    let u = e.bind_for_client(&bind(s, &["10.1.0.2:5002"])).unwrap();
    assert_eq!(e.objects[&u.connections[0].id].mode, Mode::User);
    let r = e
        .redirect_connections(&redirect(s, &["198.51.100.7:2000"]))
        .unwrap();
    assert_eq!(
        e.objects[&r.actions[0].id].mode,
        Mode::Kernel,
        "redirects raise connect, not accept"
    );
    // The accept event through the relay's hook: a deny aborts, an attach adds a data filter.
    e.register_filter(Scripted::new(
        "gate",
        filters::EventMask::ACCEPTED_CONNECTION,
        &[(EventKind::AcceptedConnection, "deny")],
    ));
    let d = e
        .on_connection_event(
            u.connections[0].id,
            EventKind::AcceptedConnection,
            a("198.51.100.7:20"),
        )
        .unwrap();
    assert_eq!(d.denied_by.as_deref(), Some("gate"));
    // A failing handler fails the accept.
    e.register_filter(Scripted::new(
        "broken",
        filters::EventMask::ACCEPTED_CONNECTION,
        &[(EventKind::AcceptedConnection, "fail")],
    ));
    assert_eq!(
        e.on_connection_event(
            u.connections[0].id,
            EventKind::AcceptedConnection,
            a("198.51.100.7:20")
        )
        .unwrap_err()
        .kind,
        ErrorKind::Internal
    );
}

/// Records establishments it is told of.
struct Caller(&'static str, std::sync::Mutex<Vec<(u64, Option<String>)>>);

impl AppFilter for Caller {
    fn name(&self) -> &str {
        self.0
    }
    fn events(&self) -> filters::EventMask {
        filters::EventMask::all()
    }
    fn on_event(&self, _ev: &mut filters::EventContext<'_>) -> Result<(), ApiError> {
        Ok(())
    }
    fn on_established(&self, connection: u64, context: Option<&str>) {
        self.1
            .lock()
            .unwrap()
            .push((connection, context.map(str::to_string)));
    }
}

#[test]
fn established_goes_only_to_the_calling_filter() {
    // A filter registered for every event makes the connection
    // user mode (it could attach at accept), so the relay reports it.
    let (mut e, s) = engine();
    let caller = Arc::new(Caller("ftp", Default::default()));
    let other = Arc::new(Caller("other", Default::default()));
    e.register_filter(other.clone());
    e.register_filter(caller.clone());
    let made = |e: &mut Engine<MemMaps>, id: u64, conn: u64| {
        e.on_relay_event(RelayEvent::Established {
            owner: id,
            conn,
            from: a("198.51.100.7:20"),
            to: a("10.1.0.2:5001"),
            bytes: Arc::default(),
        });
    };
    let id = e
        .bind_for_client_by(caller.clone(), &bind(s, &["10.1.0.2:5001"]))
        .unwrap()
        .connections[0]
        .id;
    assert_eq!(e.objects[&id].mode, Mode::User);
    made(&mut e, id, 1);
    assert_eq!(
        *caller.1.lock().unwrap(),
        vec![(id, Some("ctx".to_string()))],
        "the caller, with its context"
    );
    assert!(
        other.1.lock().unwrap().is_empty(),
        "never another filter, even one registered for everything"
    );
    // Without a session filter to notify (pSessionFilter = NULL), nobody hears of it.
    let q = e
        .bind_for_client_by(
            caller.clone(),
            &BindRequest {
                notify: false,
                ..bind(s, &["10.1.0.2:5002"])
            },
        )
        .unwrap()
        .connections[0]
        .id;
    made(&mut e, q, 2);
    assert_eq!(caller.1.lock().unwrap().len(), 1);
}

struct NopFactory;
impl filters::DataFilterFactory for NopFactory {
    fn name(&self) -> &str {
        "nop"
    }
    fn priority(&self) -> filters::PriorityClass {
        filters::PriorityClass::Middle
    }
    fn create(&self) -> Box<dyn filters::DataFilter> {
        Box::new(Nop)
    }
}

#[test]
fn data_filter_factories_by_address() {
    // The kernel/user decision is taken at the
    // call; a factory only decides which data filter a connection gets.
    let (mut e, s) = engine();
    let f = || Arc::new(NopFactory) as Arc<dyn filters::DataFilterFactory>;
    // Registered before the call for the endpoint: user mode, and the accept gets the filter once.
    let fid = e
        .set_data_filter_factory(EventKind::AcceptedConnection, a("10.2.0.1:45000"), f())
        .unwrap();
    let id = e
        .bind_for_client(&BindRequest {
            proxy: Some(a("10.2.0.1:45000")),
            flags: ConnFlags::ALLOW_MULTIPLE,
            ..bind(s, &["10.1.0.2:5001"])
        })
        .unwrap()
        .connections[0]
        .id;
    assert_eq!(e.objects[&id].mode, Mode::User);
    let d = e
        .on_connection_event(id, EventKind::AcceptedConnection, a("198.51.100.7:20"))
        .unwrap();
    assert_eq!(d.data_filters.len(), 1, "created automatically");
    let d = e
        .on_connection_event(id, EventKind::AcceptedConnection, a("198.51.100.7:21"))
        .unwrap();
    assert!(d.data_filters.is_empty(), "one connection per factory");
    assert_eq!(
        kind(e.cancel(fid)),
        ErrorKind::Terminating,
        "used: cancelling again says so"
    );

    // Cancelled before the accept: no data filter; the connection stays user mode (the decision stands).
    let fid = e
        .set_data_filter_factory(EventKind::AcceptedConnection, a("10.2.0.1:45001"), f())
        .unwrap();
    let id = e
        .bind_for_client(&BindRequest {
            proxy: Some(a("10.2.0.1:45001")),
            ..bind(s, &["10.1.0.2:5002"])
        })
        .unwrap()
        .connections[0]
        .id;
    e.cancel(fid).unwrap();
    assert_eq!(kind(e.cancel(fid)), ErrorKind::Terminating);
    assert!(e
        .on_connection_event(id, EventKind::AcceptedConnection, a("198.51.100.7:22"))
        .unwrap()
        .data_filters
        .is_empty());
    assert_eq!(e.objects[&id].mode, Mode::User);

    // Without a factory at call time: kernel mode, and a later factory cannot change that.
    let k = e
        .bind_for_client(&BindRequest {
            proxy: Some(a("10.2.0.1:45002")),
            ..bind(s, &["10.1.0.2:5003"])
        })
        .unwrap()
        .connections[0]
        .id;
    e.set_data_filter_factory(EventKind::AcceptedConnection, a("10.2.0.1:45002"), f())
        .unwrap();
    assert_eq!(e.objects[&k].mode, Mode::Kernel);

    // UDP binds take theirs at bind time; redirects are keyed by the destination; any port with port 0.
    e.set_data_filter_factory(EventKind::BindUdp, a("10.2.0.1:0"), f())
        .unwrap();
    let u = e
        .bind_for_client(&BindRequest {
            protocol: Transport::Udp,
            ..bind(s, &["10.1.0.2:6000"])
        })
        .unwrap()
        .connections[0]
        .id;
    assert_eq!(e.objects[&u].mode, Mode::User);
    let cmds = e.take_relay_cmds();
    assert!(cmds
        .iter()
        .any(|c| matches!(c, RelayCmd::Start(j) if j.owner == u && j.filters.len() == 1)));
    e.set_data_filter_factory(EventKind::ConnectTcp, a("198.51.100.7:2000"), f())
        .unwrap();
    let r = e
        .redirect_connections(&redirect(s, &["198.51.100.7:2000"]))
        .unwrap();
    assert_eq!(e.objects[&r.actions[0].id].mode, Mode::User);
    assert_eq!(
        e.on_connection_event(
            r.actions[0].id,
            EventKind::ConnectTcp,
            a("198.51.100.7:2000")
        )
        .unwrap()
        .data_filters
        .len(),
        1
    );
    // TCP binds have no data filter at bind time.
    assert_eq!(
        kind(e.set_data_filter_factory(EventKind::BindTcp, a("10.2.0.1:0"), f())),
        ErrorKind::InvalidArgument
    );
}

#[test]
fn udp_destination_events_of_redirects() {
    // A filter registered for UDP destinations makes UDP redirects user mode;
    // in the event it may refuse the destination (IFWXUdpDestination::Deny)
    // or attach a data filter.
    let (mut e, s) = engine();
    let f = Scripted::new(
        "udp-gate",
        filters::EventMask::UDP_DESTINATION,
        &[
            (EventKind::UdpDestination, "deny"),
            (EventKind::UdpDestination, "attach"),
        ],
    );
    e.register_filter(f.clone());
    let r = e
        .redirect_connections(&RedirectRequest {
            protocol: Transport::Udp,
            ..redirect(s, &["198.51.100.7:2200"])
        })
        .unwrap();
    let id = r.actions[0].id;
    assert_eq!(e.objects[&id].mode, Mode::User);
    assert!(
        matches!(&e.take_relay_cmds()[..], [RelayCmd::Start(j)] if j.event == Some(EventKind::UdpDestination))
    );
    let d = e
        .on_connection_event(id, EventKind::UdpDestination, a("198.51.100.7:2200"))
        .unwrap();
    assert_eq!(d.denied_by.as_deref(), Some("udp-gate"));
    assert_eq!(d.data_filters.len(), 1);
    assert!(
        f.results().iter().all(|(_, _, r)| r.is_ok()),
        "{:?}",
        f.results()
    );
}

#[test]
fn the_per_client_quota() {
    // The per-client quota, 2 here: the client's second established TCP
    // secondary marks it busy (datapath map and relay); an end clears it.
    let (mut e, s) = engine_with(
        EngineConfig {
            client_quota: 2,
            ..cfg()
        },
        20000..=20999,
    );
    let client: Ipv4Addr = CLIENT.parse().unwrap();
    let m = e
        .bind_for_client(&BindRequest {
            flags: ConnFlags::ALLOW_MULTIPLE,
            ..bind(s, &["10.1.0.2:5002"])
        })
        .unwrap()
        .connections[0]
        .id;
    e.take_relay_cmds();
    established(&mut e, m, "198.51.100.7", 1000);
    assert!(e.maps.busy.is_empty());
    established(&mut e, m, "198.51.100.7", 1001);
    assert_eq!(
        e.maps.busy.get(&client),
        Some(&BusyClientValue {
            established_tcp: 2,
            quota: 2
        })
    );
    assert!(e
        .take_relay_cmds()
        .iter()
        .any(|c| matches!(c, RelayCmd::ClientBusy { client: c, busy: true } if *c == client)));
    let first = e
        .objects
        .iter()
        .find(|(_, o)| o.parent == Some(m))
        .map(|(k, _)| *k)
        .unwrap();
    e.kill(first).unwrap();
    assert!(e.maps.busy.is_empty(), "below the quota again");
    assert!(e
        .take_relay_cmds()
        .iter()
        .any(|c| matches!(c, RelayCmd::ClientBusy { busy: false, .. })));

    // UDP: a mapping beyond the quota ends the client's oldest one.
    let u = e
        .bind_for_client(&BindRequest {
            protocol: Transport::Udp,
            flags: ConnFlags::ALLOW_MULTIPLE,
            ..bind(s, &["10.1.0.2:6000"])
        })
        .unwrap()
        .connections[0]
        .id;
    for port in [2000, 2001, 2002] {
        established(&mut e, u, "198.51.100.7", port);
    }
    let udp: Vec<&Object> = e.objects.values().filter(|o| o.parent == Some(u)).collect();
    assert_eq!(udp.len(), 3);
    let ended: Vec<_> = udp
        .iter()
        .filter(|o| o.state == State::Terminated)
        .map(|o| (o.peer.unwrap().port(), o.reason.clone()))
        .collect();
    assert_eq!(ended, [(2000, Some("client-quota".to_string()))]);
    assert!(e.maps.busy.is_empty(), "UDP never marks the client busy");

    // A restarted engine starts counting afresh.
    e.maps.busy.insert(client, BusyClientValue::default());
    let e2 = Engine::new(
        cfg(),
        std::mem::take(&mut e.maps),
        PortPool::new(20000..=20999, NoReservation),
        clock(),
    )
    .unwrap();
    assert!(e2.maps.busy.is_empty());
}

#[test]
fn a_redirect_can_answer_for_an_external_address_transparently() {
    // EPSV through an intercepted FTP control connection: the client dials
    // the server's address, and the pinhole waits there.
    let (mut e, s) = engine();
    let server: Ipv4Addr = "198.51.100.7".parse().unwrap();
    let r = e
        .redirect_connections(&RedirectRequest {
            internal: Some(server),
            ..redirect(s, &["198.51.100.7:40000"])
        })
        .unwrap();
    assert_eq!(*r.internal_address.ip(), server);
    let key = PinholeKey::new(
        6,
        server.octets(),
        r.internal_address.port(),
        side::INTERNAL,
    );
    assert!(e.maps.pinholes.contains_key(&key));
    e.cancel(r.actions[0].id).unwrap();
    assert!(e.maps.pinholes.is_empty());
    // An address on an internal network, or the firewall's external one, cannot stand in.
    for bad in ["10.1.0.7", "10.2.0.1", "224.0.0.1", "0.0.0.0"] {
        assert_eq!(
            kind(e.redirect_connections(&RedirectRequest {
                internal: Some(bad.parse().unwrap()),
                ..redirect(s, &["198.51.100.7:40000"])
            })),
            ErrorKind::InvalidArgument,
            "{bad}"
        );
    }
    assert_clean(&e);
}

#[test]
fn withdraw_unused_keeps_established_connections() {
    let (mut e, s) = engine();
    let b1 = e.bind_for_client(&bind(s, &["10.1.0.2:5001"])).unwrap();
    let b2 = e.bind_for_client(&bind(s, &["10.1.0.2:5002"])).unwrap();
    let r = e
        .redirect_connections(&redirect(s, &["198.51.100.7:2000"]))
        .unwrap();
    let used = b1.connections[0].id;
    established(&mut e, used, "198.51.100.7", 20);
    let ids = [used, b2.connections[0].id, r.actions[0].id, 999_999];
    e.withdraw_unused(&ids, "control connection ended");
    let state = |id| {
        e.objects()
            .into_iter()
            .find(|o| o.id == id)
            .map(|o| o.state)
    };
    assert_eq!(state(used), Some(State::Established));
    assert_eq!(state(b2.connections[0].id), Some(State::Terminated));
    assert_eq!(state(r.actions[0].id), Some(State::Terminated));
}

#[test]
fn ended_objects_are_forgotten_after_a_while() {
    let (mut e, s) = engine();
    let b = e.bind_for_client(&bind(s, &["10.1.0.2:5001"])).unwrap();
    let r = e
        .redirect_connections(&redirect(s, &["198.51.100.7:2000"]))
        .unwrap();
    let (bid, rid) = (b.connections[0].id, r.actions[0].id);
    e.kill(bid).unwrap();
    e.cancel(rid).unwrap();
    // Listed (terminated) for a while, then gone: a long-running daemon does
    // not keep every connection it ever made.
    e.tick(T0).unwrap();
    assert_eq!(e.objects().len(), 2);
    let later = T0 + FORGET_AFTER.as_nanos() as u64 + 1_000_000_000;
    e.tick(later).unwrap();
    assert!(e.objects().is_empty());
    // The answers stay those of an ended object.
    e.kill(bid).unwrap();
    assert_eq!(kind(e.cancel(rid)), ErrorKind::Terminating);
    assert_eq!(kind(e.kill(999_999)), ErrorKind::InvalidArgument);
}
