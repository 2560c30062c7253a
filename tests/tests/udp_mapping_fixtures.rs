//! BPF_PROG_RUN fixtures of UDP's endpoint-independent mapping (RFC 4787):
//! an internal endpoint sends from one external port to every destination,
//! a NAT port belongs to one endpoint at a time, and only the destinations
//! an endpoint sent to get back in.

use firewall_common::{
    flow::FlowKey,
    stats::Counter,
    wall::{NatEndpoint, UdpMapping},
    IPPROTO_UDP,
};
use firewall_ctl::datapath::{Side, UdpMappings};
use firewall_tests::{
    fixture::*,
    packet::{check_checksums, view, Spec, TCP_SYN},
};

const TC_REDIRECT: u32 = 7;
const OTHER_CLIENT: [u8; 4] = [10, 1, 0, 3];

/// The NAT port a UDP datagram from `src:sport` to SERVER:`dport` left
/// with (it must have been forwarded).
fn sent(fx: &mut Fixture, src: [u8; 4], sport: u16, dport: u16) -> u16 {
    let r = fx.run(
        Side::Internal,
        &Spec::udp(src, sport, SERVER, dport).build(),
    );
    assert_eq!(r.action, XDP_REDIRECT, "{src:?}:{sport} -> {dport}");
    check_checksums(&r.frame).unwrap();
    let v = view(&r.frame);
    assert_eq!(v.src, FW_EXTERNAL);
    v.sport
}

fn mapping(fx: &Fixture, addr: [u8; 4], port: u16) -> Option<UdpMapping> {
    UdpMappings::open(&fx.pins)
        .unwrap()
        .get(&NatEndpoint::new(addr, port))
        .unwrap()
}

#[test]
fn an_endpoint_keeps_its_port_toward_every_destination() {
    let mut fx = Fixture::new("eim").unwrap();
    fx.raise_wall(1024..=19999).unwrap();
    let p = sent(&mut fx, CLIENT, 40000, 53);
    assert!((1024..=19999).contains(&p), "{p}");
    for dport in [3478, 3479, 9000] {
        assert_eq!(sent(&mut fx, CLIENT, 40000, dport), p, "toward {dport}");
    }
    let m = mapping(&fx, CLIENT, 40000).expect("the mapping");
    assert_eq!(m.nat_port, p);
    assert!(m.last_seen_ns > 0);
    // At TC too.
    let r = fx.run_tc(
        Side::Internal,
        &Spec::udp(CLIENT, 40000, SERVER, 9001).build(),
    );
    assert_eq!(r.action, TC_REDIRECT);
    assert_eq!(view(&r.frame).sport, p);

    // The answers of each destination come back to the endpoint.
    let r = fx.run(
        Side::External,
        &Spec::udp(SERVER, 3478, FW_EXTERNAL, p).build(),
    );
    assert_eq!(r.action, XDP_REDIRECT);
    let v = view(&r.frame);
    assert_eq!(
        (v.src, v.sport, v.dst, v.dport),
        (SERVER, 3478, CLIENT, 40000)
    );
    check_checksums(&r.frame).unwrap();
    // Filtering stays address-and-port dependent: a port the endpoint never
    // sent to does not get in through the mapping; addressed to the
    // firewall, the datagram is the stack's (no socket there: port
    // unreachable, or the operator's input rules).
    let before = fx.counter(Counter::PassNoFlow);
    let r = fx.run(
        Side::External,
        &Spec::udp(SERVER, 5555, FW_EXTERNAL, p).build(),
    );
    assert_eq!(r.action, XDP_PASS);
    assert_eq!(fx.counter(Counter::PassNoFlow), before + 1);
    assert_eq!(fx.counter(Counter::PrimaryEstablished), 5);
}

#[test]
fn a_nat_port_belongs_to_one_endpoint() {
    let mut fx = Fixture::new("eimown").unwrap();
    fx.raise_wall(1024..=19999).unwrap();
    // Port preservation, as for TCP; but a UDP port taken by one endpoint is
    // not given to another, even toward another destination (TCP's is).
    assert_eq!(sent(&mut fx, CLIENT, 5000, 53), 5000);
    let other = sent(&mut fx, OTHER_CLIENT, 5000, 54);
    assert_ne!(other, 5000);
    assert_eq!(sent(&mut fx, OTHER_CLIENT, 5000, 55), other);
    // Another port of the same host is another endpoint.
    assert_eq!(sent(&mut fx, CLIENT, 6000, 53), 6000);
    // TCP keeps its own ports: 5000 toward another server port is free.
    let r = fx.run(
        Side::Internal,
        &Spec {
            tcp_flags: TCP_SYN,
            ..Spec::tcp(OTHER_CLIENT, 5000, SERVER, 80)
        }
        .build(),
    );
    assert_eq!(view(&r.frame).sport, 5000);

    // The daemon ends CLIENT:5000's mapping (quiet): the port is free again,
    // and the next endpoint to ask may take it.
    let mut maps = UdpMappings::open(&fx.pins).unwrap();
    assert!(maps.end(&NatEndpoint::new(CLIENT, 5000), 5000).unwrap());
    assert!(mapping(&fx, CLIENT, 5000).is_none());
    let third = [10, 1, 0, 4];
    assert_eq!(sent(&mut fx, third, 5000, 60), 5000);
    // CLIENT:5000's old flow still runs on its port; a new destination gets
    // a new mapping, on another port.
    assert_eq!(
        sent(&mut fx, CLIENT, 5000, 53),
        5000,
        "the flow that exists"
    );
    let renewed = sent(&mut fx, CLIENT, 5000, 61);
    assert_ne!(renewed, 5000);
    assert_eq!(mapping(&fx, CLIENT, 5000).unwrap().nat_port, renewed);
    // Ending the mapping on a port it no longer has ends nothing: neither
    // the new mapping nor the port's new owner.
    assert!(!maps.end(&NatEndpoint::new(CLIENT, 5000), 5000).unwrap());
    assert_eq!(mapping(&fx, CLIENT, 5000).unwrap().nat_port, renewed);
    assert_eq!(sent(&mut fx, third, 5000, 62), 5000);
    assert_eq!(sent(&mut fx, CLIENT, 5000, 63), renewed);
}

#[test]
fn exhaustion_leaves_nothing_half_made() {
    let mut fx = Fixture::new("eimfull").unwrap();
    // Two NAT ports, one of them published (a server's, never a mapping's).
    fx.raise_wall_publishing(7000..=7002, &[(IPPROTO_UDP, 7001, CLIENT, 53)])
        .unwrap();
    let a = sent(&mut fx, CLIENT, 40000, 53);
    let b = sent(&mut fx, OTHER_CLIENT, 40000, 53);
    let mut got = [a, b];
    got.sort();
    assert_eq!(got, [7000, 7002]);
    let third = [10, 1, 0, 4];
    let r = fx.run(Side::Internal, &Spec::udp(third, 40000, SERVER, 53).build());
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(fx.counter(Counter::DropNatExhausted), 1);
    assert!(mapping(&fx, third, 40000).is_none(), "no mapping");
    assert!(fx
        .flows
        .get(&FlowKey::new(IPPROTO_UDP, third, 40000, SERVER, 53))
        .unwrap()
        .is_none());
    // The mapped endpoints still reach new destinations; TCP has its ports.
    assert_eq!(sent(&mut fx, CLIENT, 40000, 54), a);
    let r = fx.run(
        Side::Internal,
        &Spec {
            tcp_flags: TCP_SYN,
            ..Spec::tcp(third, 40000, SERVER, 80)
        }
        .build(),
    );
    assert_eq!(r.action, XDP_REDIRECT);
}
