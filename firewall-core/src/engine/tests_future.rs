//! AllowFutureConnect: a permission for one outbound connection, keyed by
//! its destination on the internal side.

use super::tests::*;
use super::*;

const SERVER: &str = "10.2.0.2";

fn permit(session: u64, address: &str) -> FutureConnectRequest {
    FutureConnectRequest {
        session,
        address: a(address),
        peer: Some(SERVER.parse().unwrap()),
        proxy_external: None,
        protocol: Transport::Tcp,
        flags: ConnFlags::TIMEOUT,
        protocol_name: "ftp".into(),
        notify: true,
        context: None,
    }
}

#[test]
fn a_permission_is_a_pinhole_keyed_by_the_destination() {
    let (mut e, s) = engine();
    let r = e
        .allow_future_connect(&permit(s, "10.2.0.2:40000"))
        .unwrap();
    assert_eq!(r.address, a("10.2.0.2:40000"));
    assert_eq!(*r.external.ip(), EXT, "the primary's external address");
    let key = PinholeKey::new(IPPROTO_TCP, [10, 2, 0, 2], 40000, side::INTERNAL);
    let v = e.maps().pinholes[&key];
    assert_eq!((v.target_addr, v.target_port), ([10, 2, 0, 2], 40000));
    assert_eq!(v.allowed_src, [10, 1, 0, 2], "only the session's client");
    assert_eq!(
        v.flags & pinhole_flags::CLIENT_ONLY,
        pinhole_flags::CLIENT_ONLY
    );
    assert_eq!(
        (v.snat_addr, v.snat_port_base, v.snat_port_count),
        (EXT.octets(), r.external.port(), 1)
    );
    assert_eq!(
        v.deadline_ns,
        T0 + 60_000_000_000,
        "timeout: about a minute"
    );
    let listed = e.objects();
    assert_eq!(listed[0].kind, Kind::FutureConnect);

    // The client's first packet: the permission is used up, the connection
    // is the action's (and cancels nothing any more).
    let client = "10.1.0.2";
    established(&mut e, r.id, client, 45000);
    assert!(!e.maps().pinholes.contains_key(&key), "single use");
    assert_eq!(state(&e, r.id), State::Established);
    assert_eq!(kind(e.cancel(r.id)), ErrorKind::Terminating);
    assert_eq!(kind(e.kill(r.id)), ErrorKind::InvalidArgument);
}

#[test]
fn the_destination_must_be_the_primarys_peer_unless_widened() {
    let (mut e, s) = engine();
    // A server naming a third party (the bounce the policy guards against).
    assert_eq!(
        kind(e.allow_future_connect(&permit(s, "10.2.0.77:25"))),
        ErrorKind::AccessDenied
    );
    let mut wide = permit(s, "10.2.0.77:25");
    wide.flags |= ConnFlags::ALLOW_ADDRESSES_IN_CLASS_C_NETWORK;
    e.allow_future_connect(&wide).unwrap();
    // Without the peer, only ALL permits.
    let mut blind = permit(s, "10.2.0.2:40001");
    blind.peer = None;
    assert_eq!(
        kind(e.allow_future_connect(&blind)),
        ErrorKind::AccessDenied
    );
    blind.flags |= ConnFlags::ALLOW_ADDRESSES_ALL;
    e.allow_future_connect(&blind).unwrap();
}

#[test]
fn bad_permissions_are_refused_and_leave_nothing_behind() {
    let (mut e, s) = engine();
    let cases: Vec<(FutureConnectRequest, ErrorKind)> = vec![
        (permit(s, "10.2.0.2:0"), ErrorKind::InvalidArgument),
        (permit(s, "10.1.0.9:80"), ErrorKind::InvalidArgument),
        (permit(s, "10.2.0.1:80"), ErrorKind::InvalidArgument),
        (permit(s, "255.255.255.255:80"), ErrorKind::InvalidArgument),
        (
            FutureConnectRequest {
                flags: ConnFlags::TIMEOUT | ConnFlags::ALLOW_MULTIPLE,
                ..permit(s, "10.2.0.2:40000")
            },
            ErrorKind::InvalidArgument,
        ),
        (
            FutureConnectRequest {
                flags: ConnFlags::BIDIRECTIONAL,
                ..permit(s, "10.2.0.2:40000")
            },
            ErrorKind::InvalidArgument,
        ),
        (
            FutureConnectRequest {
                proxy_external: Some(a("192.0.2.1:0")),
                ..permit(s, "10.2.0.2:40000")
            },
            ErrorKind::AddressNotAvailable,
        ),
        (
            FutureConnectRequest {
                flags: ConnFlags::NO_KERNEL_MODE,
                proxy_external: Some(a("10.2.0.1:30000")),
                ..permit(s, "10.2.0.2:40000")
            },
            ErrorKind::InvalidArgument,
        ),
        (
            FutureConnectRequest {
                session: 999,
                ..permit(s, "10.2.0.2:40000")
            },
            ErrorKind::InvalidArgument,
        ),
    ];
    for (req, want) in cases {
        assert_eq!(kind(e.allow_future_connect(&req)), want, "{req:?}");
    }
    assert_clean(&e);
}

#[test]
fn one_permission_per_destination_and_cancel_withdraws_it() {
    let (mut e, s) = engine();
    let r = e
        .allow_future_connect(&permit(s, "10.2.0.2:40000"))
        .unwrap();
    // The same destination again (this client or another): refused whole.
    let other = e.open_session("10.1.0.3".parse().unwrap()).unwrap();
    assert_eq!(
        kind(e.allow_future_connect(&permit(other, "10.2.0.2:40000"))),
        ErrorKind::AddressInUse
    );
    // UDP to the same endpoint is another destination.
    let udp = FutureConnectRequest {
        protocol: Transport::Udp,
        ..permit(other, "10.2.0.2:40000")
    };
    let u = e.allow_future_connect(&udp).unwrap();
    e.cancel(r.id).unwrap();
    e.cancel(u.id).unwrap();
    assert_clean(&e);
    // Withdrawn, the destination is free again.
    e.allow_future_connect(&permit(other, "10.2.0.2:40000"))
        .unwrap();
}

#[test]
fn allow_multiple_takes_a_block_and_makes_connections_of_its_own() {
    let (mut e, s) = engine();
    let req = FutureConnectRequest {
        flags: ConnFlags::ALLOW_MULTIPLE,
        ..permit(s, "10.2.0.2:40000")
    };
    let r = e.allow_future_connect(&req).unwrap();
    let key = pinhole(&e, r.id);
    assert_eq!(
        e.maps().pinholes[&key].snat_port_count,
        e.config().snat_block
    );
    established(&mut e, r.id, "10.1.0.2", 45000);
    established(&mut e, r.id, "10.1.0.2", 45001);
    let children: Vec<_> = e
        .objects()
        .into_iter()
        .filter(|o| o.parent == Some(r.id))
        .collect();
    assert_eq!(children.len(), 2);
    assert!(children.iter().all(|c| c.kind == Kind::Redirected));
    assert!(e.maps().pinholes.contains_key(&key), "still permitted");
    e.cancel(r.id).unwrap();
    assert!(!e.maps().pinholes.contains_key(&key));
}

#[test]
fn address_based_belongs_to_allow_future_connect_only() {
    let (mut e, s) = engine();
    let mut b = bind(s, &["10.1.0.2:5001"]);
    b.flags = ConnFlags::ADDRESS_BASED;
    assert_eq!(kind(e.bind_for_client(&b)), ErrorKind::InvalidArgument);
    let mut r = redirect(s, &["198.51.100.7:2000"]);
    r.flags = ConnFlags::ADDRESS_BASED;
    assert_eq!(kind(e.redirect_connections(&r)), ErrorKind::InvalidArgument);
    let p = FutureConnectRequest {
        flags: ConnFlags::ADDRESS_BASED,
        ..permit(s, "10.2.0.2:40000")
    };
    e.allow_future_connect(&p).unwrap();
}

/// User mode: no pinhole; the relay listens at the destination itself
/// (transparently) for the session's client only and connects out from the
/// external address; the destination stays the permission's until it ends.
#[test]
fn a_user_mode_permission_is_a_relay_listening_at_the_destination() {
    let (mut e, s) = engine();
    let dest: Ipv4Addr = SERVER.parse().unwrap();
    e.take_relay_cmds();
    let r = e
        .allow_future_connect(&FutureConnectRequest {
            flags: ConnFlags::NO_KERNEL_MODE | ConnFlags::TIMEOUT,
            ..permit(s, "10.2.0.2:40000")
        })
        .unwrap();
    assert_eq!(r.external, SocketAddrV4::new(EXT, 0), "any port of it");
    assert!(e.maps().pinholes.is_empty(), "no pinhole");
    assert_eq!(mode(&e, r.id), Mode::User);
    assert_eq!(e.ports().in_use(dest, Transport::Tcp), 1);
    let cmds = e.take_relay_cmds();
    assert!(
        matches!(&cmds[..], [RelayCmd::Start(j)] if j.owner == r.id
            && j.target == Some(a("10.2.0.2:40000"))
            && j.source == SocketAddrV4::new(EXT, 0)
            && matches!(j.admit, Admit::Client(c) if c == "10.1.0.2".parse::<Ipv4Addr>().unwrap())
            && !j.multiple),
        "{}",
        cmds.len()
    );
    // The same destination is taken, in either mode.
    let other = e.open_session("10.1.0.3".parse().unwrap()).unwrap();
    assert_eq!(
        kind(e.allow_future_connect(&permit(other, "10.2.0.2:40000"))),
        ErrorKind::AddressInUse
    );
    // Withdrawn: the relay is told, and the destination is free again.
    e.cancel(r.id).unwrap();
    assert!(e
        .take_relay_cmds()
        .iter()
        .any(|c| matches!(c, RelayCmd::Stop { owner, .. } if *owner == r.id)));
    assert_eq!(e.ports().in_use(dest, Transport::Tcp), 0);
    e.allow_future_connect(&permit(other, "10.2.0.2:40000"))
        .unwrap();
}

/// Kernel mode: a used permission frees its destination at once.
#[test]
fn a_used_permission_frees_its_destination() {
    let (mut e, s) = engine();
    let dest: Ipv4Addr = SERVER.parse().unwrap();
    let r = e
        .allow_future_connect(&permit(s, "10.2.0.2:40000"))
        .unwrap();
    assert_eq!(e.ports().in_use(dest, Transport::Tcp), 1);
    established(&mut e, r.id, "10.1.0.2", 45000);
    assert_eq!(e.ports().in_use(dest, Transport::Tcp), 0);
    e.allow_future_connect(&permit(s, "10.2.0.2:40000"))
        .unwrap();
}
