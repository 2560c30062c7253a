//! BPF_PROG_RUN fixtures for pinholes: the first packet of an expected connection creates its
//! flows in the kernel; everything else is refused with a reason and leaves the pinhole as it was.

use firewall_common::{
    flow::FlowKey,
    pinhole::{
        event_kind, pinhole_flags, side, BusyClientKey, BusyClientValue, PinholeKey, PinholeValue,
    },
    stats::Counter,
    IPPROTO_TCP, IPPROTO_UDP,
};
use firewall_ctl::datapath::Side;
use firewall_tests::{
    fixture::*,
    packet::{check_checksums, view, Spec, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const EXT_PORT: u16 = 40001;
const OWNER: u64 = 7;

/// A BindForClient pinhole: peers connect to FW_EXTERNAL:EXT_PORT, delivered to CLIENT:5001.
fn bind_pinhole(fx: &mut Fixture, protocol: u8, flags: u16) -> PinholeKey {
    let key = PinholeKey::new(protocol, FW_EXTERNAL, EXT_PORT, side::EXTERNAL);
    let v = PinholeValue {
        target_addr: CLIENT,
        target_port: 5001,
        flags,
        remaining: 1,
        owner: OWNER,
        egress_ifindex: fx.in_ifindex,
        ..Default::default()
    };
    fx.pinholes.insert(&key, &v).unwrap();
    key
}

fn syn(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Spec {
    Spec {
        tcp_flags: TCP_SYN,
        ..Spec::tcp(src, sport, dst, dport)
    }
}

#[test]
fn bind_pinhole_admits_one_connection_and_creates_both_flows() {
    let mut fx = Fixture::new("phbind").unwrap();
    let key = bind_pinhole(&mut fx, IPPROTO_TCP, 0);

    let first = syn(SERVER, 20, FW_EXTERNAL, EXT_PORT);
    let r = fx.run(Side::External, &first.build());
    assert_eq!(r.action, XDP_REDIRECT);
    let v = view(&r.frame);
    assert_eq!(
        (v.src, v.sport, v.dst, v.dport),
        (SERVER, 20, CLIENT, 5001),
        "DNAT to the client, peer kept"
    );
    assert_eq!((v.dst_mac, v.src_mac), (CLIENT_MAC, IN_MAC));
    check_checksums(&r.frame).unwrap();
    assert_eq!(fx.counter(Counter::PinholeEstablished), 1);

    // Both directions are now flows owned by the connection object.
    let fwd = fx
        .flows
        .get(&FlowKey::new(
            IPPROTO_TCP,
            SERVER,
            20,
            FW_EXTERNAL,
            EXT_PORT,
        ))
        .unwrap()
        .expect("forward flow");
    let back = fx
        .flows
        .get(&FlowKey::new(IPPROTO_TCP, CLIENT, 5001, SERVER, 20))
        .unwrap()
        .expect("reply flow");
    assert_eq!((fwd.owner, back.owner), (OWNER, OWNER));
    assert_eq!(fwd.packets, 1);
    // Created counts as seen, also for the reply entry no packet has used yet:
    // a timestamp of 0 would look idle since boot to the sweeper.
    assert!(back.last_seen_ns > 0 && back.last_seen_ns <= fwd.last_seen_ns);
    let p = fx.pinholes.get(&key).unwrap().unwrap();
    assert_eq!((p.remaining, p.uses), (0, 1), "single use consumed");

    // The client's answer leaves from the external address and port.
    let r = fx.run(
        Side::Internal,
        &Spec {
            tcp_flags: TCP_SYN | TCP_ACK,
            ..Spec::tcp(CLIENT, 5001, SERVER, 20)
        }
        .build(),
    );
    assert_eq!(r.action, XDP_REDIRECT);
    let v = view(&r.frame);
    assert_eq!(
        (v.src, v.sport, v.dst, v.dport),
        (FW_EXTERNAL, EXT_PORT, SERVER, 20)
    );
    check_checksums(&r.frame).unwrap();
    // The rest of the connection uses the flow.
    assert_eq!(
        fx.run(
            Side::External,
            &Spec::tcp(SERVER, 20, FW_EXTERNAL, EXT_PORT).build()
        )
        .action,
        XDP_REDIRECT
    );

    // A second connection is refused: no ALLOW_MULTIPLE.
    let r = fx.run(
        Side::External,
        &syn(SERVER, 21, FW_EXTERNAL, EXT_PORT).build(),
    );
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(fx.counter(Counter::DropPinholeUsed), 1);

    // The control plane heard of exactly one establishment.
    let ev = fx.events();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(
        (ev[0].kind, ev[0].owner, ev[0].pinhole),
        (event_kind::ESTABLISHED, OWNER, key)
    );
    assert_eq!(
        ev[0].forward,
        FlowKey::new(IPPROTO_TCP, SERVER, 20, FW_EXTERNAL, EXT_PORT)
    );
    assert_eq!(
        ev[0].reply,
        FlowKey::new(IPPROTO_TCP, CLIENT, 5001, SERVER, 20)
    );
}

#[test]
fn refusals_leave_the_pinhole_unused() {
    let mut fx = Fixture::new("phrefuse").unwrap();
    let key = bind_pinhole(&mut fx, IPPROTO_TCP, 0);
    // Only the server may connect: an LPM filter with one /32.
    let mut p = fx.pinholes.get(&key).unwrap().unwrap();
    p.peer_filter = 5;
    fx.pinholes.insert(&key, &p).unwrap();
    fx.peers
        .insert(5, "10.2.0.2/32".parse().unwrap(), true)
        .unwrap();

    let cases: Vec<(&str, Spec, Counter)> = vec![
        (
            "a peer outside the IP filter",
            syn([10, 2, 0, 99], 20, FW_EXTERNAL, EXT_PORT),
            Counter::DropPeerFiltered,
        ),
        (
            "a TCP segment that is not a SYN",
            Spec {
                tcp_flags: TCP_ACK,
                ..Spec::tcp(SERVER, 20, FW_EXTERNAL, EXT_PORT)
            },
            Counter::DropPinholeNotSyn,
        ),
    ];
    for (what, spec, counter) in cases {
        let r = fx.run(Side::External, &spec.build());
        assert_eq!(r.action, XDP_DROP, "{what}");
        assert_eq!(fx.counter(counter), 1, "{what}");
    }
    // A VLAN-tagged first packet is dropped, the pinhole unconsumed.
    let r = fx.run(
        Side::External,
        &Spec {
            vlan: Some(5),
            ..syn(SERVER, 20, FW_EXTERNAL, EXT_PORT)
        }
        .build(),
    );
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(
        fx.pinholes.get(&key).unwrap().unwrap().remaining,
        1,
        "still unused"
    );
    // The same pinhole on the other side's program does not match.
    assert_eq!(
        fx.run(
            Side::Internal,
            &syn(SERVER, 20, FW_EXTERNAL, EXT_PORT).build()
        )
        .action,
        XDP_PASS
    );
    // The server itself gets in.
    assert_eq!(
        fx.run(
            Side::External,
            &syn(SERVER, 20, FW_EXTERNAL, EXT_PORT).build()
        )
        .action,
        XDP_REDIRECT
    );

    // An empty filter (an id without rules) lets nobody in.
    fx.flows
        .remove(&FlowKey::new(
            IPPROTO_TCP,
            SERVER,
            20,
            FW_EXTERNAL,
            EXT_PORT,
        ))
        .unwrap();
    p.peer_filter = 6;
    fx.pinholes.insert(&key, &p).unwrap();
    assert_eq!(
        fx.run(
            Side::External,
            &syn(SERVER, 20, FW_EXTERNAL, EXT_PORT).build()
        )
        .action,
        XDP_DROP
    );
    assert_eq!(fx.counter(Counter::DropPeerFiltered), 2);
}

#[test]
fn deadlines_and_placeholders() {
    let mut fx = Fixture::new("phtime").unwrap();
    let key = bind_pinhole(&mut fx, IPPROTO_TCP, 0);
    let mut p = fx.pinholes.get(&key).unwrap().unwrap();
    p.deadline_ns = 1; // long past
    fx.pinholes.insert(&key, &p).unwrap();
    assert_eq!(
        fx.run(
            Side::External,
            &syn(SERVER, 20, FW_EXTERNAL, EXT_PORT).build()
        )
        .action,
        XDP_DROP
    );
    assert_eq!(fx.counter(Counter::DropPinholeExpired), 1);
    p.deadline_ns = u64::MAX;
    p.flags = pinhole_flags::NO_TARGET;
    fx.pinholes.insert(&key, &p).unwrap();
    assert_eq!(
        fx.run(
            Side::External,
            &syn(SERVER, 20, FW_EXTERNAL, EXT_PORT).build()
        )
        .action,
        XDP_DROP
    );
    assert_eq!(fx.counter(Counter::DropPinholeNoTarget), 1);
    p.flags = 0;
    fx.pinholes.insert(&key, &p).unwrap();
    assert_eq!(
        fx.run(
            Side::External,
            &syn(SERVER, 20, FW_EXTERNAL, EXT_PORT).build()
        )
        .action,
        XDP_REDIRECT
    );
}

/// A RedirectConnections pinhole: the client dials FW_INTERNAL:30000, relayed
/// to SERVER:2000 from FW_EXTERNAL (SNAT ports from a block).
fn redirect_pinhole(fx: &mut Fixture, flags: u16, snat_count: u16) -> PinholeKey {
    let key = PinholeKey::new(IPPROTO_TCP, FW_INTERNAL, 30000, side::INTERNAL);
    let v = PinholeValue {
        target_addr: SERVER,
        target_port: 2000,
        flags: flags | pinhole_flags::CLIENT_ONLY,
        snat_addr: FW_EXTERNAL,
        snat_port_base: 50000,
        snat_port_count: snat_count,
        allowed_src: CLIENT,
        remaining: 1,
        owner: OWNER,
        egress_ifindex: fx.ex_ifindex,
        ..Default::default()
    };
    fx.pinholes.insert(&key, &v).unwrap();
    key
}

#[test]
fn redirect_pinhole_relays_outward_for_the_client_only() {
    let mut fx = Fixture::new("phredir").unwrap();
    redirect_pinhole(&mut fx, 0, 1);
    // Another internal host may not use the client's redirect.
    assert_eq!(
        fx.run(
            Side::Internal,
            &syn([10, 1, 0, 3], 40000, FW_INTERNAL, 30000).build()
        )
        .action,
        XDP_DROP
    );
    assert_eq!(fx.counter(Counter::DropPinholeSource), 1);

    let r = fx.run(
        Side::Internal,
        &syn(CLIENT, 40000, FW_INTERNAL, 30000).build(),
    );
    assert_eq!(r.action, XDP_REDIRECT);
    let v = view(&r.frame);
    assert_eq!(
        (v.src, v.sport, v.dst, v.dport),
        (FW_EXTERNAL, 50000, SERVER, 2000),
        "same external address as the primary"
    );
    assert_eq!(v.dst_mac, SERVER_MAC);
    check_checksums(&r.frame).unwrap();
    // The server's answer returns to the client, seemingly from the internal address.
    let r = fx.run(
        Side::External,
        &Spec {
            tcp_flags: TCP_SYN | TCP_ACK,
            ..Spec::tcp(SERVER, 2000, FW_EXTERNAL, 50000)
        }
        .build(),
    );
    assert_eq!(r.action, XDP_REDIRECT);
    let v = view(&r.frame);
    assert_eq!(
        (v.src, v.sport, v.dst, v.dport),
        (FW_INTERNAL, 30000, CLIENT, 40000)
    );
    check_checksums(&r.frame).unwrap();
}

#[test]
fn multiple_connections_get_distinct_snat_ports_until_the_block_is_used_up() {
    let mut fx = Fixture::new("phmulti").unwrap();
    let key = redirect_pinhole(&mut fx, pinhole_flags::MULTIPLE, 4);
    let mut ports = std::collections::BTreeSet::new();
    for cport in 40000..40004 {
        let r = fx.run(
            Side::Internal,
            &syn(CLIENT, cport, FW_INTERNAL, 30000).build(),
        );
        assert_eq!(r.action, XDP_REDIRECT, "connection from {cport}");
        ports.insert(view(&r.frame).sport);
    }
    assert_eq!(
        ports,
        (50000..50004).collect(),
        "four connections, four SNAT ports"
    );
    assert_eq!(fx.pinholes.get(&key).unwrap().unwrap().uses, 4);
    assert_eq!(
        fx.run(
            Side::Internal,
            &syn(CLIENT, 40004, FW_INTERNAL, 30000).build()
        )
        .action,
        XDP_DROP
    );
    assert_eq!(fx.counter(Counter::DropNatPortsBusy), 1);
    assert_eq!(fx.events().len(), 4);
}

#[test]
fn udp_bidirectional_gives_other_senders_a_reply_path_only() {
    let mut fx = Fixture::new("phudp").unwrap();
    bind_pinhole(&mut fx, IPPROTO_UDP, pinhole_flags::BIDIRECTIONAL);
    const P2: [u8; 4] = [10, 2, 0, 2];
    // P1 (the server, port 7000) is first: admitted.
    assert_eq!(
        fx.run(
            Side::External,
            &Spec::udp(SERVER, 7000, FW_EXTERNAL, EXT_PORT).build()
        )
        .action,
        XDP_REDIRECT
    );
    // P2 (same host, another port; any other peer works the same) is not delivered...
    assert_eq!(
        fx.run(
            Side::External,
            &Spec::udp(P2, 7001, FW_EXTERNAL, EXT_PORT).build()
        )
        .action,
        XDP_DROP
    );
    assert_eq!(fx.counter(Counter::DropPinholeUsed), 1);
    // ...but the client may send to it, from the external address and port.
    let r = fx.run(Side::Internal, &Spec::udp(CLIENT, 5001, P2, 7001).build());
    assert_eq!(r.action, XDP_REDIRECT);
    let v = view(&r.frame);
    assert_eq!(
        (v.src, v.sport, v.dst, v.dport),
        (FW_EXTERNAL, EXT_PORT, P2, 7001)
    );
    // A peer that never sent gets nothing from the client through the firewall.
    assert_eq!(
        fx.run(Side::Internal, &Spec::udp(CLIENT, 5001, P2, 7002).build())
            .action,
        XDP_DROP
    );
    let kinds: Vec<u32> = fx.events().iter().map(|e| e.kind).collect();
    assert_eq!(kinds, vec![event_kind::ESTABLISHED, event_kind::REPLY_PATH]);

    // Without BIDIRECTIONAL the second sender gets no reply path.
    let mut fx = Fixture::new("phudp2").unwrap();
    bind_pinhole(&mut fx, IPPROTO_UDP, 0);
    fx.run(
        Side::External,
        &Spec::udp(SERVER, 7000, FW_EXTERNAL, EXT_PORT).build(),
    );
    assert_eq!(
        fx.run(
            Side::External,
            &Spec::udp(P2, 7001, FW_EXTERNAL, EXT_PORT).build()
        )
        .action,
        XDP_DROP
    );
    assert_eq!(
        fx.run(Side::Internal, &Spec::udp(CLIENT, 5001, P2, 7001).build())
            .action,
        XDP_DROP
    );
}

#[test]
fn a_client_at_its_quota_gets_no_new_tcp_connections() {
    // The per-client quota: while the control plane marks the client busy, both a binding
    // delivering to it and its own redirect refuse new TCP connections,
    // unconsumed; UDP is not refused here (the oldest mapping goes instead).
    let mut fx = Fixture::new("phquota").unwrap();
    let bkey = bind_pinhole(&mut fx, IPPROTO_TCP, 0);
    let rkey = redirect_pinhole(&mut fx, 0, 1);
    let ukey = PinholeKey::new(IPPROTO_UDP, FW_EXTERNAL, EXT_PORT + 1, side::EXTERNAL);
    let mut u = fx.pinholes.get(&bkey).unwrap().unwrap();
    u.remaining = 1;
    fx.pinholes.insert(&ukey, &u).unwrap();
    let client = BusyClientKey { addr: CLIENT };
    fx.busy
        .insert(
            &client,
            &BusyClientValue {
                established_tcp: 160,
                quota: 160,
            },
        )
        .unwrap();

    let bind_syn = syn(SERVER, 20, FW_EXTERNAL, EXT_PORT).build();
    let redirect_syn = syn(CLIENT, 40000, FW_INTERNAL, 30000).build();
    assert_eq!(fx.run(Side::External, &bind_syn).action, XDP_DROP);
    assert_eq!(fx.run(Side::Internal, &redirect_syn).action, XDP_DROP);
    assert_eq!(fx.counter(Counter::DropClientQuota), 2);
    for k in [bkey, rkey] {
        assert_eq!(fx.pinholes.get(&k).unwrap().unwrap().remaining, 1, "unused");
    }
    let r = fx.run(
        Side::External,
        &Spec::udp(SERVER, 69, FW_EXTERNAL, EXT_PORT + 1).build(),
    );
    assert_eq!(r.action, XDP_REDIRECT, "UDP is not refused");

    // Below the quota again: the same SYNs get through.
    fx.busy.remove(&client).unwrap();
    assert_eq!(fx.run(Side::External, &bind_syn).action, XDP_REDIRECT);
    assert_eq!(fx.run(Side::Internal, &redirect_syn).action, XDP_REDIRECT);
}

#[test]
fn teardown_is_reported_once_per_direction_and_flag() {
    let mut fx = Fixture::new("phclose").unwrap();
    bind_pinhole(&mut fx, IPPROTO_TCP, 0);
    let fwd = FlowKey::new(IPPROTO_TCP, SERVER, 20, FW_EXTERNAL, EXT_PORT);
    let back = FlowKey::new(IPPROTO_TCP, CLIENT, 5001, SERVER, 20);
    let from_server = |flags| Spec {
        tcp_flags: flags,
        ..Spec::tcp(SERVER, 20, FW_EXTERNAL, EXT_PORT)
    };
    let from_client = |flags| Spec {
        tcp_flags: flags,
        ..Spec::tcp(CLIENT, 5001, SERVER, 20)
    };
    assert_eq!(
        fx.run(
            Side::External,
            &syn(SERVER, 20, FW_EXTERNAL, EXT_PORT).build()
        )
        .action,
        XDP_REDIRECT
    );
    for (side, spec) in [
        (Side::External, from_server(TCP_ACK)),
        (Side::External, from_server(TCP_FIN | TCP_ACK)),
        (Side::External, from_server(TCP_FIN | TCP_ACK)),
        (Side::Internal, from_client(TCP_ACK)),
        (Side::Internal, from_client(TCP_RST)),
    ] {
        assert_eq!(fx.run(side, &spec.build()).action, XDP_REDIRECT);
    }
    let closing: Vec<(FlowKey, u32)> = fx
        .events()
        .into_iter()
        .filter(|e| e.kind == event_kind::CLOSING)
        .map(|e| {
            assert_eq!(e.owner, OWNER);
            (e.forward, e.detail)
        })
        .collect();
    // The server's first FIN (not its retransmission), the client's RST.
    assert_eq!(
        closing,
        [
            (fwd, firewall_common::flow::tcp_seen::FIN as u32),
            (back, firewall_common::flow::tcp_seen::RST as u32)
        ]
    );
}

#[test]
fn a_syn_reusing_an_ended_flow_opens_the_new_pinhole() {
    let mut fx = Fixture::new("phreuse").unwrap();
    let key = bind_pinhole(&mut fx, IPPROTO_TCP, 0);
    let fwd = FlowKey::new(IPPROTO_TCP, SERVER, 20, FW_EXTERNAL, EXT_PORT);
    let first = syn(SERVER, 20, FW_EXTERNAL, EXT_PORT).build();
    assert_eq!(fx.run(Side::External, &first).action, XDP_REDIRECT);
    let fin = Spec {
        tcp_flags: TCP_FIN | TCP_ACK,
        ..Spec::tcp(SERVER, 20, FW_EXTERNAL, EXT_PORT)
    };
    assert_eq!(fx.run(Side::External, &fin.build()).action, XDP_REDIRECT);
    // The old connection's port went to a new BindForClient for another
    // client port (same external port) while its flows wait out closing.
    fx.pinholes
        .insert(
            &key,
            &PinholeValue {
                target_addr: CLIENT,
                target_port: 5002,
                remaining: 1,
                owner: OWNER + 1,
                egress_ifindex: fx.in_ifindex,
                ..Default::default()
            },
        )
        .unwrap();
    let r = fx.run(Side::External, &first);
    assert_eq!(r.action, XDP_REDIRECT);
    assert_eq!(
        view(&r.frame).dport,
        5002,
        "delivered to the new connection"
    );
    assert_eq!(fx.counter(Counter::PinholeEstablished), 2);
    assert_eq!(fx.flows.get(&fwd).unwrap().unwrap().owner, OWNER + 1);
    // Without a pinhole, a SYN on the ended flow goes on as before.
    fx.pinholes.remove(&key).unwrap();
    let fin = Spec {
        tcp_flags: TCP_FIN | TCP_ACK,
        ..Spec::tcp(SERVER, 20, FW_EXTERNAL, EXT_PORT)
    };
    assert_eq!(fx.run(Side::External, &fin.build()).action, XDP_REDIRECT);
    let r = fx.run(Side::External, &first);
    assert_eq!(r.action, XDP_REDIRECT);
    assert_eq!(view(&r.frame).dport, 5002);
}

#[test]
fn a_bidirectional_pinhole_gives_at_most_so_many_reply_paths() {
    // Without an IP filter, any host could otherwise fill the flow table
    // through one pinhole.
    let mut fx = Fixture::new("phcap").unwrap();
    let key = bind_pinhole(&mut fx, IPPROTO_UDP, pinhole_flags::BIDIRECTIONAL);
    let cap = firewall_common::pinhole::MAX_REPLY_PATHS;
    assert_eq!(
        fx.run(
            Side::External,
            &Spec::udp(SERVER, 7000, FW_EXTERNAL, EXT_PORT).build()
        )
        .action,
        XDP_REDIRECT
    );
    for peer in 0..cap + 10 {
        let r = fx.run(
            Side::External,
            &Spec::udp([10, 2, 1, peer as u8], 9000, FW_EXTERNAL, EXT_PORT).build(),
        );
        assert_eq!(r.action, XDP_DROP);
    }
    assert_eq!(fx.counter(Counter::DropPinholeUsed), cap);
    assert_eq!(fx.counter(Counter::DropReplyPathsFull), 10);
    let paths = fx
        .events()
        .iter()
        .filter(|e| e.kind == event_kind::REPLY_PATH)
        .count() as u64;
    assert_eq!(paths, cap);
    assert!(fx.pinholes.get(&key).unwrap().unwrap().reply_paths >= cap);
}
