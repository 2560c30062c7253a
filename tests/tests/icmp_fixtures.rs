//! BPF_PROG_RUN fixtures of ICMP errors (RFC 5508): an error quoting a
//! tracked flow is translated — outer header as the flow's packets are, the
//! quoted packet the other way, every checksum kept — and forwarded; one
//! quoting nothing tracked is the stack's if addressed to the firewall,
//! dropped otherwise.

use firewall_common::{flow::FlowKey, stats::Counter, IPPROTO_UDP};
use firewall_ctl::datapath::Side;
use firewall_tests::{
    fixture::*,
    packet::{check_checksums, icmp_error, quoted, view, Spec, TCP_SYN},
};

const TC_REDIRECT: u32 = 7;
/// A router past the firewall, on the external segment.
const ROUTER: [u8; 4] = [10, 2, 0, 3];
const TIME_EXCEEDED: (u8, u8, [u8; 4]) = (11, 0, [0; 4]);
const PORT_UNREACHABLE: (u8, u8, [u8; 4]) = (3, 3, [0; 4]);
/// "Fragmentation needed", next-hop MTU 1280.
const FRAG_NEEDED: (u8, u8, [u8; 4]) = (3, 4, [0, 0, 0x05, 0x00]);

/// The outbound packet as it left the firewall (translated), for the
/// error to quote.
fn leave(fx: &mut Fixture, spec: Spec) -> Vec<u8> {
    let r = fx.run(Side::Internal, &spec.build());
    assert_eq!(r.action, XDP_REDIRECT);
    r.frame
}

/// Checks a translated error: outer addresses, where it goes, what it
/// quotes, and every checksum from scratch.
fn assert_error(frame: &[u8], outer: ([u8; 4], [u8; 4]), dst_mac: [u8; 6], inner: (u16, u16)) {
    let v = view(frame);
    assert_eq!((v.src, v.dst), outer, "outer addresses");
    assert_eq!(v.dst_mac, dst_mac);
    assert_eq!(v.ttl, 63, "the error's TTL decremented");
    check_checksums(frame).expect("outer IPv4 and ICMP checksums");
    let q = quoted(frame);
    check_checksums(&q).expect("the quoted packet's checksums");
    let qv = view(&q);
    assert_eq!(qv.src, outer.1, "an error goes to its quote's source");
    assert_eq!((qv.sport, qv.dport), inner, "quoted ports");
}

#[test]
fn errors_from_outside_reach_the_client_translated() {
    let mut fx = Fixture::new("icmpout").unwrap();
    fx.raise_wall(1024..=19999).unwrap();

    // traceroute's UDP probe: time exceeded from a router past the firewall.
    let probe = leave(&mut fx, Spec::udp(CLIENT, 40000, SERVER, 33434));
    let nat_port = view(&probe).sport;
    let err = icmp_error(ROUTER, FW_EXTERNAL, TIME_EXCEEDED, &probe, 576);
    let r = fx.run(Side::External, &err);
    assert_eq!(r.action, XDP_REDIRECT);
    assert_eq!(fx.counter(Counter::RedirectedIcmpError), 1);
    assert_error(&r.frame, (ROUTER, CLIENT), CLIENT_MAC, (40000, 33434));
    let q = view(&quoted(&r.frame));
    assert_eq!(
        (q.src, q.dst),
        (CLIENT, SERVER),
        "the quote as the client sent it"
    );

    // The server's port unreachable: its own address stays.
    let err = icmp_error(SERVER, FW_EXTERNAL, PORT_UNREACHABLE, &probe, 576);
    let r = fx.run(Side::External, &err);
    assert_eq!(r.action, XDP_REDIRECT);
    assert_error(&r.frame, (SERVER, CLIENT), CLIENT_MAC, (40000, 33434));

    // Path MTU discovery: "fragmentation needed" about a TCP segment, the
    // MTU carried through; a quote of the whole TCP header (its checksum
    // fixed too) and one of the 8 bytes every router quotes.
    let syn = leave(
        &mut fx,
        Spec {
            tcp_flags: TCP_SYN,
            ..Spec::tcp(CLIENT, 40001, SERVER, 443)
        },
    );
    let err = icmp_error(ROUTER, FW_EXTERNAL, FRAG_NEEDED, &syn, 576);
    let r = fx.run(Side::External, &err);
    assert_eq!(r.action, XDP_REDIRECT);
    assert_error(&r.frame, (ROUTER, CLIENT), CLIENT_MAC, (40001, 443));
    assert_eq!(
        &r.frame[38..42],
        &[0, 0, 5, 0],
        "the MTU as the router said"
    );
    let short = icmp_error(ROUTER, FW_EXTERNAL, FRAG_NEEDED, &syn, 28);
    let r = fx.run_tc(Side::External, &short);
    assert_eq!(r.action, TC_REDIRECT);
    check_checksums(&r.frame).expect("ICMP checksum over a short quote");
    let inner = &r.frame[42..];
    assert_eq!(&inner[12..16], &CLIENT, "quoted source");
    assert_eq!(
        u16::from_be_bytes([inner[20], inner[21]]),
        40001,
        "quoted source port"
    );

    // ping with a small TTL: the quoted echo request's identifier too.
    let ping = leave(&mut fx, Spec::echo(CLIENT, SERVER, 40002, true));
    let err = icmp_error(ROUTER, FW_EXTERNAL, TIME_EXCEEDED, &ping, 576);
    let r = fx.run(Side::External, &err);
    assert_eq!(r.action, XDP_REDIRECT);
    let q = view(&quoted(&r.frame));
    assert_eq!((q.src, q.dst, q.dport), (CLIENT, SERVER, 40002));
    check_checksums(&quoted(&r.frame)).expect("the quoted echo's checksum");
    check_checksums(&r.frame).unwrap();

    assert_eq!(fx.counter(Counter::RedirectedIcmpError), 5);
    // Errors refresh nothing: the flow they travel with counted no packet.
    let back = fx
        .flows
        .get(&FlowKey::new(
            IPPROTO_UDP,
            SERVER,
            33434,
            FW_EXTERNAL,
            nat_port,
        ))
        .unwrap()
        .expect("the probe's reply flow");
    assert_eq!(back.packets, 0);
}

#[test]
fn errors_from_inside_leave_from_the_nat_address() {
    let mut fx = Fixture::new("icmpin").unwrap();
    fx.raise_wall(1024..=19999).unwrap();
    let out = leave(&mut fx, Spec::udp(CLIENT, 40000, SERVER, 53));
    let nat_port = view(&out).sport;
    // The server's answer, delivered to the client, which has closed its
    // socket: port unreachable, from the client's private address.
    let answer = Spec::udp(SERVER, 53, FW_EXTERNAL, nat_port).build();
    let r = fx.run(Side::External, &answer);
    assert_eq!(r.action, XDP_REDIRECT);
    let err = icmp_error(CLIENT, SERVER, PORT_UNREACHABLE, &r.frame, 576);
    let r = fx.run(Side::Internal, &err);
    assert_eq!(r.action, XDP_REDIRECT);
    let v = view(&r.frame);
    assert_eq!(
        (v.src, v.dst),
        (FW_EXTERNAL, SERVER),
        "no private address leaves"
    );
    assert_eq!(v.dst_mac, SERVER_MAC);
    check_checksums(&r.frame).unwrap();
    let q = quoted(&r.frame);
    check_checksums(&q).unwrap();
    let q = view(&q);
    assert_eq!(
        (q.src, q.sport, q.dst, q.dport),
        (SERVER, 53, FW_EXTERNAL, nat_port),
        "the quote as the server sent it"
    );
    // At TC the same.
    let r = fx.run_tc(Side::Internal, &err);
    assert_eq!(r.action, TC_REDIRECT);
    check_checksums(&r.frame).unwrap();
    assert_eq!(view(&r.frame).src, FW_EXTERNAL);
}

#[test]
fn errors_about_nothing_tracked_are_the_stacks_or_dropped() {
    let mut fx = Fixture::new("icmpno").unwrap();
    fx.raise_wall(1024..=19999).unwrap();
    let stray = Spec::udp(FW_EXTERNAL, 5000, SERVER, 53).build();
    // To the firewall itself (its own connections): the stack's.
    let err = icmp_error(ROUTER, FW_EXTERNAL, PORT_UNREACHABLE, &stray, 576);
    let r = fx.run(Side::External, &err);
    assert_eq!(r.action, XDP_PASS);
    assert_eq!(fx.counter(Counter::PassIcmpError), 1);
    // Through the firewall to an internal host: dropped and counted.
    let stray = Spec::udp(CLIENT, 5000, SERVER, 53).build();
    let err = icmp_error(SERVER, CLIENT, PORT_UNREACHABLE, &stray, 576);
    let r = fx.run(Side::External, &err);
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(fx.counter(Counter::DropIcmpUnrelated), 1);
    // A tracked flow's quote, but the error is addressed elsewhere than
    // the quoted packet's source: not about it.
    let probe = leave(&mut fx, Spec::udp(CLIENT, 40000, SERVER, 53));
    let err = icmp_error(ROUTER, CLIENT, PORT_UNREACHABLE, &probe, 576);
    let r = fx.run(Side::External, &err);
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(fx.counter(Counter::DropIcmpUnrelated), 2);
    // A quote too short to hold ports, and a redirect (never forwarded).
    let err = icmp_error(ROUTER, CLIENT, TIME_EXCEEDED, &probe, 24);
    assert_eq!(fx.run(Side::External, &err).action, XDP_DROP);
    let redirect = icmp_error(ROUTER, CLIENT, (5, 1, [10, 2, 0, 9]), &probe, 576);
    let r = fx.run(Side::External, &redirect);
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(fx.counter(Counter::DropNotTcpUdp), 1);
    assert_eq!(fx.counter(Counter::RedirectedIcmpError), 0);
}
