//! Connection objects: kill, placeholders, establishment, timers, sessions,
//! redirects, restarts, and user mode.

use firewall_common::flow::FlowValue;

use super::tests::*;
use super::*;
use crate::ports::NoReservation;

#[test]
fn kill_is_idempotent_and_raises_terminating_once() {
    let (mut e, s) = engine();
    let id = bound(&mut e, s, "10.1.0.2:5001");
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
    let id = bound(&mut e, s, "0.0.0.0:0");
    let v = *e.maps().pinholes.values().next().unwrap();
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
        e.maps().pinholes.values().next().unwrap().flags & pinhole_flags::NO_TARGET,
        0,
        "still unusable"
    );
    e.set_client_address(id, a("10.1.0.2:5001")).unwrap();
    let v = *e.maps().pinholes.values().next().unwrap();
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
    let id = bound(&mut e, s, "10.1.0.2:5001");
    established(&mut e, id, "198.51.100.7", 20);
    let ev = e.take_events();
    assert!(
        matches!(&ev[0], Event::Established { connection, from, to, context: Some(c), parent: None, .. }
        if *connection == id && *from == a("198.51.100.7:20") && *to == a("10.1.0.2:5001") && c == "ctx"),
        "{ev:?}"
    );
    assert_eq!(state(&e, id), State::Established);

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
    let children: Vec<u64> = children(&e, m);
    assert_eq!(children.len(), 3);
    assert_eq!(state(&e, m), State::Listening, "still accepting");
    // Killing the parent ends the children and removes their flows.
    e.kill(m).unwrap();
    assert!(children.iter().all(|c| state(&e, *c) == State::Terminated));

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
    let keep = bound(&mut e, s, "10.1.0.2:5002");
    let now = T0;
    e.tick(now + 30_000_000_000).unwrap();
    assert_eq!(state(&e, t), State::Listening, "at 30 s still there");
    e.tick(now + 61_000_000_000).unwrap();
    assert_eq!(state(&e, t), State::Terminated, "at 61 s closed");
    assert_eq!(reason(&e, t).as_deref(), Some("timeout"));
    assert_eq!(
        state(&e, keep),
        State::Listening,
        "no TIMEOUT: lives until Kill"
    );

    // A TCP connection whose flows saw FIN both ways ends after tcp_closing.
    let (f, r) = established(&mut e, keep, "198.51.100.7", 20);
    for k in [f, r] {
        e.maps_mut().flows.get_mut(&k).unwrap().tcp_flags_seen =
            firewall_common::flow::tcp_seen::FIN;
    }
    e.take_events();
    e.tick(T0 + 11_000_000_000).unwrap();
    assert_eq!(state(&e, keep), State::Terminated);
    assert!(e.maps().flows.is_empty());
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
    assert_eq!(state(&e, id), State::Established);
    assert_eq!(e.maps().flows.len(), 2);
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
    assert_eq!(state(&e, t), State::Terminated);
    assert_eq!(state(&e, id), State::Established);
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
        let v = e.maps().pinholes[&k];
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
        e.maps().pinholes[&k].snat_port_count,
        4,
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
    assert!(e.maps().pinholes.is_empty());
    assert_eq!(e.maps().flows.len(), 1);
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
    assert!(e.maps().pinholes.is_empty(), "user mode writes no pinhole");
    assert!(e.maps().rules.is_empty());
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
    assert!(e.maps().flows.is_empty(), "never in the flow table");
    e.on_relay_event(RelayEvent::Closed { owner: id, conn: 9 });
    assert_eq!(state(&e, id), State::Terminated);
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
    assert_eq!(reason(&e, t).as_deref(), Some("timeout"));
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
    let child = children(&e, m)[0];
    e.kill(child).unwrap();
    assert!(
        matches!(e.take_relay_cmds()[..], [RelayCmd::StopConn { owner, conn: 1 }] if owner == m)
    );
    assert_eq!(state(&e, m), State::Listening);
    // Redirects too; an explicit external port is not supported in user mode.
    let rr = e
        .redirect_connections(&RedirectRequest {
            flags: ConnFlags::NO_KERNEL_MODE,
            ..redirect(s, &["198.51.100.7:2000"])
        })
        .unwrap();
    assert!(e.maps().pinholes.is_empty());
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
