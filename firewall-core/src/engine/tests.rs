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
        e.maps().pinholes.is_empty(),
        "pinholes left: {:?}",
        e.maps().pinholes
    );
    assert!(e.maps().rules.is_empty(), "peer rules left");
    assert_eq!(
        e.ports().in_use(EXT, Transport::Tcp) + e.ports().in_use(INT, Transport::Tcp),
        0,
        "ports left"
    );
    assert!(
        e.objects().iter().all(|o| o.state == State::Terminated),
        "live objects left"
    );
}

/// The id of a single-address BindForClient for `client` (which must
/// succeed).
pub(super) fn bound(e: &mut Engine<MemMaps>, session: u64, client: &str) -> u64 {
    e.bind_for_client(&bind(session, &[client]))
        .unwrap()
        .connections[0]
        .id
}

/// An object's state, as listed.
pub(super) fn state(e: &Engine<MemMaps>, id: u64) -> State {
    e.info(id).expect("the object").state
}

/// An object's mode, as listed.
pub(super) fn mode(e: &Engine<MemMaps>, id: u64) -> Mode {
    e.info(id).expect("the object").mode
}

/// Why an object ended, as listed.
pub(super) fn reason(e: &Engine<MemMaps>, id: u64) -> Option<String> {
    e.info(id).expect("the object").reason
}

/// The pinhole object `id` owns in the maps, if any.
pub(super) fn pinhole_of(e: &Engine<MemMaps>, id: u64) -> Option<PinholeKey> {
    e.maps()
        .pinholes
        .iter()
        .find(|(_, v)| v.owner == id)
        .map(|(k, _)| *k)
}

/// The pinhole object `id` owns in the maps.
pub(super) fn pinhole(e: &Engine<MemMaps>, id: u64) -> PinholeKey {
    pinhole_of(e, id).expect("a pinhole of the object")
}

/// The connections accepted under `parent` (allow-multiple), as listed.
pub(super) fn children(e: &Engine<MemMaps>, parent: u64) -> Vec<u64> {
    e.objects()
        .iter()
        .filter(|o| o.parent == Some(parent))
        .map(|o| o.id)
        .collect()
}

pub(super) fn established(
    e: &mut Engine<MemMaps>,
    id: u64,
    peer: &str,
    peer_port: u16,
) -> (FlowKey, FlowKey) {
    let k = pinhole(e, id);
    let v = e.maps().pinholes[&k];
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
    let pip: Ipv4Addr = peer.parse().unwrap();
    let forward = FlowKey::new(k.protocol, pip.octets(), peer_port, k.addr, k.port);
    // The datapath's construction, with the first port of a SNAT block
    // (the datapath searches the block for a free one).
    let src = if v.snat_port_count > 0 {
        (v.snat_addr, v.snat_port_base)
    } else {
        (pip.octets(), peer_port)
    };
    let reply = v.reply_key(&forward, src);
    let (mut fv, mut rv) = (FlowValue::default(), FlowValue::default());
    v.forward_value(src, T0, &mut fv);
    v.reply_value(&forward, T0, &mut rv);
    e.maps_mut().flows.insert(forward, fv);
    e.maps_mut().flows.insert(reply, rv);
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
    let v = e.maps().pinholes[&key];
    assert_eq!((v.target_addr, v.target_port), ([10, 1, 0, 2], 5001));
    assert_eq!(v.flags & pinhole_flags::MULTIPLE, 0);
    assert_eq!(
        (v.remaining, v.owner, v.deadline_ns, v.egress_ifindex),
        (1, c.id, 0, 2)
    );
    assert_eq!(e.ports().in_use(EXT, Transport::Tcp), 1);
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
fn a_reloaded_rule_applies_to_the_next_call_and_spares_what_exists() {
    let (mut e, s) = engine();
    let bound = e.bind_for_client(&bind(s, &["10.1.0.2:5001"])).unwrap();
    let mut narrower = cfg();
    narrower.protocols[0].clients = vec!["10.1.0.99/32".parse().unwrap()];
    narrower.timeouts.udp_idle = Duration::from_secs(5);
    e.reconfigure(narrower);
    assert_eq!(
        kind(e.bind_for_client(&bind(s, &["10.1.0.2:5002"]))),
        ErrorKind::ProtocolDenied
    );
    assert_eq!(e.config().timeouts.udp_idle, Duration::from_secs(5));
    let id = bound.connections[0].id;
    assert!(e
        .objects()
        .iter()
        .any(|o| o.id == id && o.state == State::Listening));
    assert_eq!(e.maps().pinholes().unwrap().len(), 1);
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
    assert_eq!(e.ports().in_use(EXT, Transport::Tcp), 0);
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

/// A client host has one session until it is closed; the shared count of
/// closed sessions tells a caller that remembers ids when to ask again.
#[test]
fn a_clients_session_is_the_same_until_closed() {
    use std::sync::atomic::Ordering;
    let (mut e, s) = engine();
    let closed = e.sessions_closed();
    let client = CLIENT.parse().unwrap();
    assert_eq!(e.open_session(client).unwrap(), s);
    assert_eq!(closed.load(Ordering::Acquire), 0);
    e.close_session(s).unwrap();
    assert_eq!(closed.load(Ordering::Acquire), 1);
    e.close_session(s).unwrap();
    assert_eq!(
        closed.load(Ordering::Acquire),
        1,
        "closing again changes nothing"
    );
    let s2 = e.open_session(client).unwrap();
    assert_ne!(s2, s, "a new session after the close");
    assert!(e.bind_for_client(&bind(s, &["10.1.0.2:5001"])).is_err());
    assert!(e.bind_for_client(&bind(s2, &["10.1.0.2:5001"])).is_ok());
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
    // Two internal ports were taken before the engine started.
    let mut ports = PortPool::new(30000..=30003, NoReservation);
    for p in [30000, 30001] {
        ports.reserve_exact(INT, Transport::Tcp, p).unwrap();
    }
    let mut e = Engine::new(cfg(), MemMaps::default(), ports, clock()).unwrap();
    let s = e.open_session(CLIENT.parse().unwrap()).unwrap();
    let req = BindRequest {
        flags: ConnFlags::PROXY_MODE,
        ..bind(s, &["10.1.0.2:1", "10.1.0.2:2", "10.1.0.2:3", "10.1.0.2:4"])
    };
    assert_eq!(kind(e.bind_for_client(&req)), ErrorKind::Exhausted);
    assert!(e.maps().pinholes.is_empty());
    assert_eq!(e.ports().in_use(EXT, Transport::Tcp), 0);
    assert_eq!(
        e.ports().in_use(INT, Transport::Tcp),
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
    let v = *e.maps().pinholes.values().next().unwrap();
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
    let v = e.maps().pinholes.values().next().unwrap();
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
    let fid = e.maps().pinholes.values().next().unwrap().peer_filter;
    assert_ne!(fid, 0);
    assert_eq!(
        e.maps().rules.get(&(fid, "10.2.0.2/32".parse().unwrap())),
        Some(&true)
    );
    e.kill(r.connections[0].id).unwrap();
    assert_eq!(e.maps().rules.len(), 1, "still used by connection 1");
    e.kill(r.connections[1].id).unwrap();
    assert!(e.maps().rules.is_empty());
    // An empty filter: a filter id with no rules (nobody matches).
    e.bind_for_client(&BindRequest {
        ip_filter: Some(IpFilter::default()),
        ..bind(s, &["10.1.0.2:1"])
    })
    .unwrap();
    assert_ne!(e.maps().pinholes.values().next().unwrap().peer_filter, 0);
}
