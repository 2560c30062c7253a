//! BPF_PROG_RUN fixtures for IPv4 fragments: a datagram's fragments follow
//! the flow of its first, translated so that the receiver reassembles the
//! datagram the datapath judged; anything else fragmented is dropped.

use firewall_common::{stats::Counter, IPPROTO_ICMP};
use firewall_ctl::datapath::Side;
use firewall_tests::{
    fixture::*,
    packet::{check_checksums, fragments, reassemble, view, Spec, TCP_SYN},
};

const TC_REDIRECT: u32 = 7;

fn big_udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Spec {
    Spec {
        payload: (0..1200u32).map(|i| (i * 7) as u8).collect(),
        ..Spec::udp(src, sport, dst, dport)
    }
}

/// Runs each fragment at XDP or TC and returns the frames that left.
fn through(fx: &mut Fixture, tc: bool, side: Side, frags: &[Vec<u8>]) -> Vec<Vec<u8>> {
    frags
        .iter()
        .map(|f| {
            let r = if tc {
                fx.run_tc(side, f)
            } else {
                fx.run(side, f)
            };
            let want = if tc { TC_REDIRECT } else { XDP_REDIRECT };
            assert_eq!(r.action, want, "a fragment was not forwarded");
            r.frame
        })
        .collect()
}

/// An outbound UDP datagram in three fragments opens its connection with
/// the first and leaves translated whole: the reassembled datagram has the
/// external address, the NAT port and a checksum that holds; the fragmented
/// answer comes back to the client the same way. At XDP and at TC.
#[test]
fn a_fragmented_datagram_is_translated_whole_both_ways() {
    for tc in [false, true] {
        let mut fx = Fixture::new(if tc { "fragtc" } else { "fragxdp" }).unwrap();
        fx.raise_wall(1024..=19999).unwrap();
        let request = big_udp(CLIENT, 40000, SERVER, 53).build();
        let out = through(&mut fx, tc, Side::Internal, &fragments(&request, 512));
        assert_eq!(out.len(), 3);
        for f in &out {
            assert_eq!(f[14 + 12..14 + 16], FW_EXTERNAL, "every fragment's source");
        }
        let whole = reassemble(&out).unwrap();
        check_checksums(&whole).unwrap();
        let v = view(&whole);
        assert_eq!((v.src, v.dst, v.dport), (FW_EXTERNAL, SERVER, 53));
        assert_eq!(v.payload, view(&request).payload);
        let nat_port = v.sport;
        assert_eq!(fx.counter(Counter::PrimaryEstablished), 1);
        assert_eq!(fx.counter(Counter::RedirectedFragment), 2);

        let answer = big_udp(SERVER, 53, FW_EXTERNAL, nat_port).build();
        let back = through(&mut fx, tc, Side::External, &fragments(&answer, 600));
        let whole = reassemble(&back).unwrap();
        check_checksums(&whole).unwrap();
        let v = view(&whole);
        assert_eq!(
            (v.src, v.sport, v.dst, v.dport),
            (SERVER, 53, CLIENT, 40000)
        );
        assert_eq!(back.len(), 3);
        assert_eq!(fx.counter(Counter::RedirectedFragment), 4);
    }
}

/// A large ping: the echo identifier is in the first fragment only.
#[test]
fn a_fragmented_echo_request_is_translated() {
    let mut fx = Fixture::new("fragping").unwrap();
    fx.raise_wall(1024..=19999).unwrap();
    let ping = Spec {
        payload: vec![0xa5; 3000],
        ..Spec::echo(CLIENT, SERVER, 777, true)
    }
    .build();
    let out = through(&mut fx, false, Side::Internal, &fragments(&ping, 1480));
    let whole = reassemble(&out).unwrap();
    check_checksums(&whole).unwrap();
    let v = view(&whole);
    assert_eq!(
        (v.protocol, v.src, v.dst),
        (IPPROTO_ICMP, FW_EXTERNAL, SERVER)
    );
}

/// Nothing is reassembled: a later fragment that arrives before its first
/// is dropped (the sender's retransmission gets through); one after its
/// first is forwarded.
#[test]
fn a_later_fragment_before_its_first_is_dropped() {
    let mut fx = Fixture::new("fragorder").unwrap();
    fx.raise_wall(1024..=19999).unwrap();
    let frags = fragments(&big_udp(CLIENT, 40001, SERVER, 53).build(), 512);
    let r = fx.run(Side::Internal, &frags[2]);
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(fx.counter(Counter::DropFragment), 1);
    let out = through(&mut fx, false, Side::Internal, &frags);
    reassemble(&out).unwrap();
}

/// Fragments never open anything: the first fragment of an unsolicited
/// datagram from outside is judged like a whole packet (dropped), and its
/// later fragments find no first; another datagram of the same host pair
/// (another identification) does not borrow a tracked datagram's flow.
#[test]
fn fragments_open_nothing_and_borrow_no_flow() {
    let mut fx = Fixture::new("fragdeny").unwrap();
    fx.raise_wall(1024..=19999).unwrap();
    let frags = fragments(&big_udp(SERVER, 53, CLIENT, 40002).build(), 512);
    let r = fx.run(Side::External, &frags[0]);
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(fx.counter(Counter::DropNoFlow), 1);
    for f in &frags[1..] {
        assert_eq!(fx.run(Side::External, f).action, XDP_DROP);
    }
    assert_eq!(fx.counter(Counter::DropFragment), 2);

    // A tracked datagram's first fragment, then a later fragment of
    // another identification between the same hosts.
    let ours = fragments(&big_udp(CLIENT, 40003, SERVER, 53).build(), 512);
    through(&mut fx, false, Side::Internal, &ours[..1]);
    let mut other = ours[1].clone();
    other[14 + 4] ^= 0xff; // identification
    other[14 + 10] ^= 0xff; // keep the header checksum true
    assert_eq!(fx.run(Side::Internal, &other).action, XDP_DROP);
    assert_eq!(fx.counter(Counter::DropFragment), 3);
}

/// A first fragment must carry its whole L4 header, and no later fragment
/// may start inside it (RFC 1858: offset 8 would rewrite TCP's flags after
/// the datapath read them).
#[test]
fn tiny_and_overlapping_fragments_are_refused() {
    let mut fx = Fixture::new("fragtiny").unwrap();
    fx.raise_wall(1024..=19999).unwrap();
    let syn = Spec {
        tcp_flags: TCP_SYN,
        frag: 0,
        ..Spec::tcp(CLIENT, 40004, SERVER, 80)
    }
    .build();
    // 8 bytes in the first fragment: the ports, no flags.
    let tiny = fragments(&syn, 8);
    let r = fx.run(Side::Internal, &tiny[0]);
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(fx.counter(Counter::DropMalformed), 1);
    // Offset 8 of a TCP datagram.
    let r = fx.run(Side::Internal, &tiny[1]);
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(fx.counter(Counter::DropMalformed), 2);
    assert_eq!(fx.counter(Counter::PrimaryEstablished), 0);
}
