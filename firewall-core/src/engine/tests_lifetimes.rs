//! The per-client quota, transparent redirects, withdrawing unused
//! pinholes, and forgetting ended objects.

use super::tests::*;
use super::*;
use crate::ports::NoReservation;

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
    assert!(e.maps().busy.is_empty());
    established(&mut e, m, "198.51.100.7", 1001);
    assert_eq!(
        e.maps().busy.get(&client),
        Some(&BusyClientValue {
            established_tcp: 2,
            quota: 2
        })
    );
    assert!(e
        .take_relay_cmds()
        .iter()
        .any(|c| matches!(c, RelayCmd::ClientBusy { client: c, busy: true } if *c == client)));
    let first = children(&e, m)[0];
    e.kill(first).unwrap();
    assert!(e.maps().busy.is_empty(), "below the quota again");
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
    let udp: Vec<ObjectInfo> = e
        .objects()
        .into_iter()
        .filter(|o| o.parent == Some(u))
        .collect();
    assert_eq!(udp.len(), 3);
    let ended: Vec<_> = udp
        .iter()
        .filter(|o| o.state == State::Terminated)
        .map(|o| (o.peer.unwrap().port(), o.reason.clone()))
        .collect();
    assert_eq!(ended, [(2000, Some("client-quota".to_string()))]);
    assert!(e.maps().busy.is_empty(), "UDP never marks the client busy");

    // A restarted engine starts counting afresh.
    e.maps_mut().busy.insert(client, BusyClientValue::default());
    let e2 = Engine::new(
        cfg(),
        std::mem::take(e.maps_mut()),
        PortPool::new(20000..=20999, NoReservation),
        clock(),
    )
    .unwrap();
    assert!(e2.maps().busy.is_empty());
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
    assert!(e.maps().pinholes.contains_key(&key));
    e.cancel(r.actions[0].id).unwrap();
    assert!(e.maps().pinholes.is_empty());
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

#[test]
fn a_redirect_made_again_at_the_port_it_was_announced_at() {
    let (mut e, s) = engine();
    let server: Ipv4Addr = "198.51.100.7".parse().unwrap();
    let req = RedirectRequest {
        internal: Some(server),
        ..redirect(s, &["198.51.100.7:6000"])
    };
    let r = e.redirect_connections_at(&req, Some(20500)).unwrap();
    assert_eq!(r.internal_address, SocketAddrV4::new(server, 20500));
    let k = pinhole(&e, r.actions[0].id);
    assert_eq!((k.addr, k.port), (server.octets(), 20500));
    // Taken: refused whole, nothing more made.
    let objects = e.objects().len();
    assert_eq!(
        kind(e.redirect_connections_at(&req, Some(20500))),
        ErrorKind::AddressInUse
    );
    // Only one single-use redirect can be given a port.
    let two = redirect(s, &["198.51.100.7:6000", "198.51.100.7:6001"]);
    assert_eq!(
        kind(e.redirect_connections_at(&two, Some(20600))),
        ErrorKind::InvalidArgument
    );
    let multiple = RedirectRequest {
        flags: ConnFlags::ALLOW_MULTIPLE,
        ..req.clone()
    };
    assert_eq!(
        kind(e.redirect_connections_at(&multiple, Some(20600))),
        ErrorKind::InvalidArgument
    );
    assert_eq!(e.objects().len(), objects);
    assert_eq!(e.maps().pinholes.len(), 1);
}

#[test]
fn still_waiting_reads_the_pinholes() {
    let (mut e, s) = engine();
    let waiting = bound(&mut e, s, "10.1.0.2:5001");
    let won = bound(&mut e, s, "10.1.0.2:5002");
    let used = bound(&mut e, s, "10.1.0.2:5003");
    // A first packet won this pinhole; its event has not arrived yet.
    let k = pinhole(&e, won);
    e.maps_mut().pinholes.get_mut(&k).unwrap().remaining = 0;
    established(&mut e, used, "198.51.100.7", 1000);
    assert_eq!(e.still_waiting(&[waiting, won, used, 999]), vec![waiting]);
}
