//! BPF_PROG_RUN fixtures of the wall: default deny for what would be
//! forwarded, and primary connections tracked and translated in the kernel.

use firewall_common::{
    flow::{flow_kind, FlowKey},
    pinhole::{pinhole_flags, side, PinholeKey, PinholeValue},
    stats::Counter,
    IPPROTO_TCP,
};
use firewall_ctl::datapath::Side;
use firewall_tests::{
    fixture::*,
    packet::{check_checksums, view, Spec, TCP_ACK, TCP_SYN},
};

const TC_REDIRECT: u32 = 7;

fn syn(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Spec {
    Spec {
        tcp_flags: TCP_SYN,
        ..Spec::tcp(src, sport, dst, dport)
    }
}

/// Nothing the datapath does not translate is left to the stack's
/// forwarding: what would be forwarded without a flow, pinhole or rule is
/// dropped under its reason.
#[test]
fn what_would_be_forwarded_untracked_is_dropped_and_counted() {
    let mut fx = Fixture::new("wall").unwrap();
    fx.install_pair(IPPROTO_TCP, 40000, 21);
    let tcp = Spec::tcp(CLIENT, 40000, SERVER, 21);
    // ICMP other than echo (a timestamp request) is not tracked.
    let icmp = Spec::echo(CLIENT, SERVER, 1, true);
    let icmp = Spec { sport: 13, ..icmp }.build();
    let frag = |frag| {
        Spec {
            frag,
            ..tcp.clone()
        }
        .build()
    };
    let qinq = {
        let mut f = Spec {
            vlan: Some(10),
            ..tcp.clone()
        }
        .build();
        f.splice(16..16, [0x81, 0x00, 0x00, 0x14]);
        f
    };
    let vlan_flow = Spec {
        vlan: Some(10),
        ..tcp.clone()
    }
    .build();
    let cases: Vec<(&str, Side, Vec<u8>, Counter)> = vec![
        ("icmp through", Side::Internal, icmp, Counter::DropNotTcpUdp),
        (
            "a later fragment whose first was not seen",
            Side::Internal,
            frag(0x0010),
            Counter::DropFragment,
        ),
        (
            "a TCP fragment rewriting the header's flags",
            Side::Internal,
            frag(0x0001),
            Counter::DropMalformed,
        ),
        ("two VLAN tags", Side::Internal, qinq, Counter::DropVlan),
        (
            "VLAN-tagged flow",
            Side::Internal,
            vlan_flow,
            Counter::DropVlan,
        ),
        (
            "unsolicited SYN from outside",
            Side::External,
            Spec {
                tcp_flags: TCP_SYN,
                ..Spec::tcp(SERVER, 4444, CLIENT, 22)
            }
            .build(),
            Counter::DropNoFlow,
        ),
        (
            "unsolicited UDP from outside",
            Side::External,
            Spec::udp(SERVER, 53, CLIENT, 5353).build(),
            Counter::DropNoFlow,
        ),
        (
            "outbound before the wall is configured",
            Side::Internal,
            Spec {
                tcp_flags: TCP_SYN,
                ..Spec::tcp(CLIENT, 40001, SERVER, 80)
            }
            .build(),
            Counter::DropNotAllowed,
        ),
    ];
    for (name, side, frame, counter) in cases {
        let before = fx.counter(counter);
        let r = fx.run(side, &frame);
        assert_eq!(r.action, XDP_DROP, "{name}");
        assert_eq!(
            fx.counter(counter),
            before + 1,
            "{name}: counted under {}",
            counter.name()
        );
    }
}

/// The first packet of an outbound connection creates both flows in the
/// kernel; the answer comes back translated; checksums hold both ways.
#[test]
fn an_outbound_syn_creates_both_flows_and_is_translated() {
    let mut fx = Fixture::new("wallsyn").unwrap();
    fx.raise_wall(1024..=19999).unwrap();
    let spec = syn(CLIENT, 40000, SERVER, 80);
    let r = fx.run(Side::Internal, &spec.build());
    assert_eq!(r.action, XDP_REDIRECT);
    assert_eq!(fx.counter(Counter::PrimaryEstablished), 1);
    let v = view(&r.frame);
    assert_eq!(v.src, FW_EXTERNAL, "source translated");
    assert!((1024..=19999).contains(&v.sport), "NAT port {}", v.sport);
    assert_eq!((v.dst, v.dport), (SERVER, 80));
    assert_eq!((v.dst_mac, v.src_mac), (SERVER_MAC, EX_MAC));
    check_checksums(&r.frame).unwrap();
    let nat_port = v.sport;

    let out = fx
        .flows
        .get(&FlowKey::new(IPPROTO_TCP, CLIENT, 40000, SERVER, 80))
        .unwrap()
        .expect("the outbound flow");
    assert_eq!(out.kind, flow_kind::PRIMARY);
    assert_eq!(
        (out.nat_src_addr, out.nat_src_port),
        (FW_EXTERNAL, nat_port)
    );
    assert_eq!(out.egress_ifindex, fx.ex_ifindex);
    let back_key = FlowKey::new(IPPROTO_TCP, SERVER, 80, FW_EXTERNAL, nat_port);
    let back = fx.flows.get(&back_key).unwrap().expect("the reply flow");
    assert_eq!(back.kind, flow_kind::PRIMARY);
    assert_eq!((back.nat_dst_addr, back.nat_dst_port), (CLIENT, 40000));
    assert_eq!(back.egress_ifindex, fx.in_ifindex);

    // The SYN-ACK comes back to the client.
    let reply = Spec {
        tcp_flags: TCP_SYN | TCP_ACK,
        ..Spec::tcp(SERVER, 80, FW_EXTERNAL, nat_port)
    };
    let r = fx.run(Side::External, &reply.build());
    assert_eq!(r.action, XDP_REDIRECT);
    let v = view(&r.frame);
    assert_eq!(
        (v.src, v.sport, v.dst, v.dport),
        (SERVER, 80, CLIENT, 40000)
    );
    assert_eq!((v.dst_mac, v.src_mac), (CLIENT_MAC, IN_MAC));
    check_checksums(&r.frame).unwrap();
    // The rest of the connection rides the flows.
    let r = fx.run(
        Side::Internal,
        &Spec::tcp(CLIENT, 40000, SERVER, 80).build(),
    );
    assert_eq!(r.action, XDP_REDIRECT);
    assert_eq!(fx.counter(Counter::Redirected), 2);

    // UDP too, and the same at tcx ingress.
    let r = fx.run(Side::Internal, &Spec::udp(CLIENT, 5353, SERVER, 53).build());
    assert_eq!(r.action, XDP_REDIRECT);
    assert_eq!(view(&r.frame).src, FW_EXTERNAL);
    check_checksums(&r.frame).unwrap();
    let r = fx.run_tc(Side::Internal, &syn(CLIENT, 40002, SERVER, 443).build());
    assert_eq!(r.action, TC_REDIRECT);
    assert_eq!(view(&r.frame).src, FW_EXTERNAL);
    check_checksums(&r.frame).unwrap();
    assert_eq!(fx.counter(Counter::PrimaryEstablished), 3);
}

/// A source port inside the NAT range is kept when free; a second client
/// with the same port to the same server gets the next one.
#[test]
fn source_ports_are_preserved_when_free() {
    let mut fx = Fixture::new("wallport").unwrap();
    fx.raise_wall(1024..=19999).unwrap();
    let r = fx.run(Side::Internal, &syn(CLIENT, 5000, SERVER, 80).build());
    assert_eq!(view(&r.frame).sport, 5000);
    let other = [10, 1, 0, 3];
    let r = fx.run(Side::Internal, &syn(other, 5000, SERVER, 80).build());
    assert_eq!(r.action, XDP_REDIRECT);
    assert_eq!(view(&r.frame).sport, 5001);
    // Another server: the same port is free there.
    let r = fx.run(Side::Internal, &syn(other, 5000, SERVER, 81).build());
    assert_eq!(view(&r.frame).sport, 5000);
    // Ports outside the range: connections to one server take the NAT ports
    // in turn (a port toward it is reused only after the whole range).
    let ports: Vec<u16> = (0..4)
        .map(|i| {
            let r = fx.run(Side::Internal, &syn(CLIENT, 40000 + i, SERVER, 443).build());
            assert_eq!(r.action, XDP_REDIRECT);
            view(&r.frame).sport
        })
        .collect();
    for w in ports.windows(2) {
        assert_eq!(
            w[1],
            if w[0] == 19999 { 1024 } else { w[0] + 1 },
            "{ports:?}"
        );
    }
}

/// What the wall refuses: TCP that opens nothing, a source no rule allows,
/// and a connection for which no NAT port is free.
#[test]
fn the_wall_refuses_what_no_rule_allows_and_counts_exhaustion() {
    let mut fx = Fixture::new("wallno").unwrap();
    fx.raise_wall(7000..=7000).unwrap();
    let cases = [
        (
            "an ACK without a flow",
            Spec::tcp(CLIENT, 40000, SERVER, 80),
            Counter::DropNoFlow,
        ),
        (
            "a spoofed source",
            syn([10, 9, 9, 9], 40000, SERVER, 80),
            Counter::DropNotAllowed,
        ),
    ];
    for (what, spec, counter) in cases {
        let r = fx.run(Side::Internal, &spec.build());
        assert_eq!(r.action, XDP_DROP, "{what}");
        assert_eq!(fx.counter(counter), 1, "{what}");
    }
    // One NAT port: the first connection takes it, the second finds none.
    assert_eq!(
        fx.run(Side::Internal, &syn(CLIENT, 40000, SERVER, 80).build())
            .action,
        XDP_REDIRECT
    );
    let r = fx.run(Side::Internal, &syn(CLIENT, 40001, SERVER, 80).build());
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(fx.counter(Counter::DropNatExhausted), 1);
    assert!(
        fx.flows
            .get(&FlowKey::new(IPPROTO_TCP, CLIENT, 40001, SERVER, 80))
            .unwrap()
            .is_none(),
        "nothing half-made"
    );
    // UDP to another server still has the port.
    assert_eq!(
        fx.run(
            Side::Internal,
            &Spec::udp(CLIENT, 40001, SERVER, 53).build()
        )
        .action,
        XDP_REDIRECT
    );
}

/// ICMP echo is tracked like a connection: the request's identifier is the
/// "port" (kept when in the NAT range), the reply comes back translated.
#[test]
fn an_echo_request_is_tracked_and_its_reply_translated() {
    let mut fx = Fixture::new("wallping").unwrap();
    fx.raise_wall(1024..=19999).unwrap();
    let r = fx.run(
        Side::Internal,
        &Spec::echo(CLIENT, SERVER, 4242, true).build(),
    );
    assert_eq!(r.action, XDP_REDIRECT);
    let v = view(&r.frame);
    assert_eq!(
        (v.src, v.dst, v.sport, v.dport),
        (FW_EXTERNAL, SERVER, 8, 4242)
    );
    check_checksums(&r.frame).unwrap();
    let r = fx.run(
        Side::External,
        &Spec::echo(SERVER, FW_EXTERNAL, 4242, false).build(),
    );
    assert_eq!(r.action, XDP_REDIRECT);
    let v = view(&r.frame);
    assert_eq!((v.src, v.dst, v.sport, v.dport), (SERVER, CLIENT, 0, 4242));
    check_checksums(&r.frame).unwrap();
    // An identifier outside the range is translated into it; at TC too.
    let r = fx.run_tc(
        Side::Internal,
        &Spec::echo(CLIENT, SERVER, 40000, true).build(),
    );
    assert_eq!(r.action, TC_REDIRECT);
    let v = view(&r.frame);
    assert!((1024..=19999).contains(&v.dport), "{v:?}");
    check_checksums(&r.frame).unwrap();
    // A reply nobody asked for, from outside, is dropped.
    let r = fx.run(
        Side::External,
        &Spec::echo(SERVER, CLIENT, 9, false).build(),
    );
    assert_eq!(r.action, XDP_DROP);
    // So is an unsolicited echo request from outside.
    let r = fx.run(Side::External, &Spec::echo(SERVER, CLIENT, 9, true).build());
    assert_eq!(r.action, XDP_DROP);
}

/// A published server: a SYN from outside to the published port reaches the
/// internal server (destination translated), the answers leave from the
/// published endpoint; other ports of the external address stay the stack's.
#[test]
fn a_published_server_is_reached_from_outside() {
    let mut fx = Fixture::new("wallpub").unwrap();
    fx.raise_wall_publishing(1024..=19999, &[(IPPROTO_TCP, 8080, CLIENT, 80)])
        .unwrap();
    let r = fx.run(
        Side::External,
        &syn(SERVER, 4444, FW_EXTERNAL, 8080).build(),
    );
    assert_eq!(r.action, XDP_REDIRECT);
    assert_eq!(fx.counter(Counter::PublishedEstablished), 1);
    let v = view(&r.frame);
    assert_eq!((v.src, v.sport, v.dst, v.dport), (SERVER, 4444, CLIENT, 80));
    assert_eq!((v.dst_mac, v.src_mac), (CLIENT_MAC, IN_MAC));
    check_checksums(&r.frame).unwrap();
    let answer = Spec {
        tcp_flags: TCP_SYN | TCP_ACK,
        ..Spec::tcp(CLIENT, 80, SERVER, 4444)
    };
    let r = fx.run(Side::Internal, &answer.build());
    assert_eq!(r.action, XDP_REDIRECT);
    let v = view(&r.frame);
    assert_eq!(
        (v.src, v.sport, v.dst, v.dport),
        (FW_EXTERNAL, 8080, SERVER, 4444)
    );
    check_checksums(&r.frame).unwrap();
    // A segment that opens nothing, and another port: not the server's.
    let r = fx.run(
        Side::External,
        &Spec::tcp(SERVER, 4445, FW_EXTERNAL, 8080).build(),
    );
    assert_eq!(r.action, XDP_DROP);
    let r = fx.run(
        Side::External,
        &syn(SERVER, 4444, FW_EXTERNAL, 8081).build(),
    );
    assert_eq!(r.action, XDP_PASS, "the firewall's own port: the stack's");
    // The NAT never hands out a published port: a client whose source port
    // is 8080 is translated to another.
    let r = fx.run(Side::Internal, &syn(CLIENT, 8080, SERVER, 443).build());
    assert_eq!(r.action, XDP_REDIRECT);
    assert_ne!(view(&r.frame).sport, 8080);
}

/// A permission (AllowFutureConnect): a pinhole keyed by an external
/// destination that claims only the permitted client's connection; the
/// rest goes to the wall as if there were no pinhole, even after its use.
#[test]
fn a_permission_claims_only_what_it_permits() {
    let mut fx = Fixture::new("wallperm").unwrap();
    fx.raise_wall(1024..=19999).unwrap();
    let key = PinholeKey::new(IPPROTO_TCP, SERVER, 2121, side::INTERNAL);
    let permission = PinholeValue {
        target_addr: SERVER,
        target_port: 2121,
        flags: pinhole_flags::CLIENT_ONLY | pinhole_flags::PERMISSION,
        snat_addr: FW_EXTERNAL,
        snat_port_base: 20500,
        snat_port_count: 1,
        allowed_src: CLIENT,
        remaining: 1,
        owner: 77,
        egress_ifindex: fx.ex_ifindex,
        ..Default::default()
    };
    fx.pinholes.insert(&key, &permission).unwrap();
    // Another client: not refused, the wall's (primary NAT, not the permission's port).
    let r = fx.run(
        Side::Internal,
        &syn([10, 1, 0, 3], 40000, SERVER, 2121).build(),
    );
    assert_eq!(r.action, XDP_REDIRECT);
    assert_ne!(view(&r.frame).sport, 20500);
    assert_eq!(fx.counter(Counter::PrimaryEstablished), 1);
    assert_eq!(fx.counter(Counter::DropPinholeSource), 0);
    // A segment other than a SYN from the permitted client: the wall's too.
    let r = fx.run(
        Side::Internal,
        &Spec::tcp(CLIENT, 40001, SERVER, 2121).build(),
    );
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(fx.counter(Counter::DropNoFlow), 1);
    assert_eq!(fx.counter(Counter::DropPinholeNotSyn), 0);
    // The permitted connection: from the permission's source port, reported.
    let r = fx.run(Side::Internal, &syn(CLIENT, 40002, SERVER, 2121).build());
    assert_eq!(r.action, XDP_REDIRECT);
    let v = view(&r.frame);
    assert_eq!(
        (v.src, v.sport, v.dst, v.dport),
        (FW_EXTERNAL, 20500, SERVER, 2121)
    );
    check_checksums(&r.frame).unwrap();
    assert_eq!(fx.counter(Counter::PinholeEstablished), 1);
    // Used up: the client's next connection there is an ordinary one.
    let r = fx.run(Side::Internal, &syn(CLIENT, 40003, SERVER, 2121).build());
    assert_eq!(r.action, XDP_REDIRECT);
    assert_ne!(view(&r.frame).sport, 20500);
    assert_eq!(fx.counter(Counter::PrimaryEstablished), 2);
    assert_eq!(fx.counter(Counter::DropPinholeUsed), 0);
}
