//! BPF_PROG_RUN fixtures of the TFTP helper: a server's first answer from
//! its transfer port gets the request's flows copied for that port, at XDP
//! and at TC, once per request packet; nothing else gets in through it.

use firewall_common::{flow::FlowKey, stats::Counter, IPPROTO_UDP};
use firewall_ctl::datapath::{Side, WallTables};
use firewall_tests::{
    fixture::*,
    packet::{check_checksums, view, Spec},
};

const TC_REDIRECT: u32 = 7;
const STRANGER: [u8; 4] = [10, 2, 0, 77];

/// A fixture with the wall raised and the helper on port 69.
fn helper(name: &str) -> Fixture {
    let fx = Fixture::new(name).unwrap();
    fx.raise_wall(1024..=19999).unwrap();
    WallTables::open(&fx.pins).unwrap().set_tftp(&[69]).unwrap();
    fx
}

/// CLIENT:`sport` asks SERVER:`dport`; the NAT port the request left from.
fn request(fx: &mut Fixture, sport: u16, dport: u16) -> u16 {
    let r = fx.run(
        Side::Internal,
        &Spec::udp(CLIENT, sport, SERVER, dport).build(),
    );
    assert_eq!(r.action, XDP_REDIRECT);
    view(&r.frame).sport
}

#[test]
fn the_server_s_answer_from_its_transfer_port_reaches_the_client() {
    let mut fx = helper("tftpok");
    let p = request(&mut fx, 40000, 69);
    let r = fx.run(
        Side::External,
        &Spec::udp(SERVER, 50001, FW_EXTERNAL, p).build(),
    );
    assert_eq!(r.action, XDP_REDIRECT);
    let v = view(&r.frame);
    assert_eq!(
        (v.src, v.sport, v.dst, v.dport),
        (SERVER, 50001, CLIENT, 40000)
    );
    check_checksums(&r.frame).unwrap();
    assert_eq!(fx.counter(Counter::TftpEstablished), 1);
    // Both directions of the transfer are tracked from then on.
    let out = FlowKey::new(IPPROTO_UDP, CLIENT, 40000, SERVER, 50001);
    assert!(fx.flows.get(&out).unwrap().is_some());
    let r = fx.run(
        Side::Internal,
        &Spec::udp(CLIENT, 40000, SERVER, 50001).build(),
    );
    assert_eq!(r.action, XDP_REDIRECT);
    let v = view(&r.frame);
    assert_eq!(
        (v.src, v.sport, v.dst, v.dport),
        (FW_EXTERNAL, p, SERVER, 50001)
    );
    check_checksums(&r.frame).unwrap();
    let r = fx.run(
        Side::External,
        &Spec::udp(SERVER, 50001, FW_EXTERNAL, p).build(),
    );
    assert_eq!(r.action, XDP_REDIRECT);
    assert_eq!(fx.counter(Counter::TftpEstablished), 1, "an existing flow");
    // One answer per request packet: another port of the server's gets
    // nothing in until the client asks again (a retransmitted request,
    // which a server may answer from a new port).
    let r = fx.run(
        Side::External,
        &Spec::udp(SERVER, 50009, FW_EXTERNAL, p).build(),
    );
    assert_ne!(r.action, XDP_REDIRECT, "answered already");
    assert_eq!(request(&mut fx, 40000, 69), p, "the same request again");
    // The same at TC.
    let r = fx.run_tc(
        Side::External,
        &Spec::udp(SERVER, 50002, FW_EXTERNAL, p).build(),
    );
    assert_eq!(r.action, TC_REDIRECT);
    let v = view(&r.frame);
    assert_eq!((v.dst, v.dport), (CLIENT, 40000));
    check_checksums(&r.frame).unwrap();
    assert_eq!(fx.counter(Counter::TftpEstablished), 2);
}

#[test]
fn nothing_else_gets_in_through_the_helper() {
    let mut fx = helper("tftpno");
    let p = request(&mut fx, 40000, 69);
    let not_in = |fx: &mut Fixture, frame: Spec, what: &str| {
        let r = fx.run(Side::External, &frame.build());
        assert_ne!(r.action, XDP_REDIRECT, "{what}");
    };
    not_in(
        &mut fx,
        Spec::udp(STRANGER, 50001, FW_EXTERNAL, p),
        "another host than the asked server",
    );
    not_in(
        &mut fx,
        Spec::udp(SERVER, 50001, FW_EXTERNAL, p + 1),
        "another NAT port than the request's",
    );
    // A request to a port the helper does not serve opens nothing.
    let q = request(&mut fx, 40001, 70);
    not_in(
        &mut fx,
        Spec::udp(SERVER, 50001, FW_EXTERNAL, q),
        "an answer to a request on port 70",
    );
    // TCP is not TFTP.
    let mut syn = Spec::tcp(SERVER, 50001, FW_EXTERNAL, p);
    syn.tcp_flags = firewall_tests::packet::TCP_SYN;
    not_in(&mut fx, syn, "TCP");
    assert_eq!(fx.counter(Counter::TftpEstablished), 0);
    // Turned off, the helper lets nothing in; its flows made so far stay.
    WallTables::open(&fx.pins).unwrap().set_tftp(&[]).unwrap();
    not_in(
        &mut fx,
        Spec::udp(SERVER, 50001, FW_EXTERNAL, p),
        "the helper off",
    );
    assert_eq!(fx.counter(Counter::TftpEstablished), 0);
}

#[test]
fn a_secondary_connection_to_port_69_is_not_a_request() {
    // A pinhole's flows (kind static) to a server's port 69: the helper
    // copies only the wall's own tracked requests.
    let mut fx = helper("tftpsec");
    fx.install_pair(IPPROTO_UDP, 40000, 69);
    let r = fx.run(
        Side::Internal,
        &Spec::udp(CLIENT, 40000, SERVER, 69).build(),
    );
    assert_eq!(r.action, XDP_REDIRECT);
    let p = view(&r.frame).sport;
    let r = fx.run(
        Side::External,
        &Spec::udp(SERVER, 50001, FW_EXTERNAL, p).build(),
    );
    assert_ne!(r.action, XDP_REDIRECT);
    assert_eq!(fx.counter(Counter::TftpEstablished), 0);
}
