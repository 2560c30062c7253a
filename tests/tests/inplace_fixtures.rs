//! BPF_PROG_RUN fixtures of FTP control connections forwarded in place (the
//! datapath's half): plain lines at the next byte are forwarded and their
//! places recorded, anything else goes to the daemon's ring with the
//! direction; once the daemon offers the direction back with a translation,
//! sequence and acknowledgment numbers are shifted and checksums kept, at
//! XDP and at TC; a new connection on the flows of an old one starts
//! afresh.

use firewall_common::{
    flow::FlowKey,
    inplace::{InPlaceAdjust, LineMark, Offer, DIR_COMMANDS, DIR_REPLIES},
    seqadj::SeqAdjust,
    stats::Counter,
    IPPROTO_TCP,
};
use firewall_ctl::datapath::{decode_segment, InPlaceMaps, Side, TestRunOutput};
use firewall_tests::{
    fixture::*,
    packet::{check_checksums, view, Spec, TCP_ACK, TCP_SYN},
};

const TC_REDIRECT: u32 = 7;
const CLIENT_PORT: u16 = 40000;
const CLIENT_ISN: u32 = 1000;
const SERVER_ISN: u32 = 5000;

fn client_key() -> FlowKey {
    FlowKey::new(IPPROTO_TCP, CLIENT, CLIENT_PORT, SERVER, 21)
}

fn command(seq: u32, ack: u32, line: &[u8]) -> Vec<u8> {
    Spec {
        seq,
        ack,
        payload: line.to_vec(),
        ..Spec::tcp(CLIENT, CLIENT_PORT, SERVER, 21)
    }
    .build()
}

fn reply(nat: u16, seq: u32, ack: u32, line: &[u8]) -> Vec<u8> {
    Spec {
        seq,
        ack,
        payload: line.to_vec(),
        ..Spec::tcp(SERVER, 21, FW_EXTERNAL, nat)
    }
    .build()
}

/// A fixture with port 21 read in place.
fn in_place(name: &str) -> Fixture {
    let mut fx = Fixture::new(name).unwrap();
    fx.datapath.load_in_place().unwrap();
    fx.raise_wall(1024..=19999).unwrap();
    InPlaceMaps::open(&fx.pins)
        .unwrap()
        .set_ports(&[21])
        .unwrap();
    fx
}

/// A fixture with port 21 read in place, and a connection through its
/// handshake, the server's SYN-ACK with `options`, at TC if `tc`: the NAT
/// port it took and the SYN-ACK as it left.
fn handshake(name: &str, options: &[u8], tc: bool) -> (Fixture, u16, TestRunOutput) {
    let mut fx = in_place(name);
    let syn = Spec {
        tcp_flags: TCP_SYN,
        seq: CLIENT_ISN,
        ack: 0,
        payload: vec![],
        ..Spec::tcp(CLIENT, CLIENT_PORT, SERVER, 21)
    };
    let r = fx.run(Side::Internal, &syn.build());
    assert_eq!(r.action, XDP_REDIRECT);
    assert_eq!(fx.counter(Counter::PrimaryEstablished), 1);
    let nat = view(&r.frame).sport;
    let synack = Spec {
        tcp_flags: TCP_SYN | TCP_ACK,
        seq: SERVER_ISN,
        ack: CLIENT_ISN + 1,
        payload: vec![],
        tcp_options: options.to_vec(),
        ..Spec::tcp(SERVER, 21, FW_EXTERNAL, nat)
    }
    .build();
    let r = if tc {
        fx.run_tc(Side::External, &synack)
    } else {
        fx.run(Side::External, &synack)
    };
    assert_eq!(r.action, if tc { TC_REDIRECT } else { XDP_REDIRECT });
    check_checksums(&r.frame).unwrap();
    (fx, nat, r)
}

/// Through the handshake at XDP, the state checked: the NAT port.
fn connected(name: &str) -> (Fixture, u16) {
    let (fx, nat, r) = handshake(name, &[], false);
    let v = view(&r.frame);
    assert_eq!(
        (v.dst, v.dport, v.seq, v.ack),
        (CLIENT, CLIENT_PORT, SERVER_ISN, CLIENT_ISN + 1)
    );
    let st = InPlaceMaps::open(&fx.pins)
        .unwrap()
        .state(&client_key())
        .unwrap()
        .expect("the connection's state");
    assert_eq!(
        (st.dir[DIR_COMMANDS].next, st.dir[DIR_REPLIES].next),
        (CLIENT_ISN + 1, SERVER_ISN + 1)
    );
    assert_eq!(st.dir[DIR_REPLIES].started, 1);
    (fx, nat)
}

#[test]
fn plain_lines_are_forwarded_and_the_rest_goes_to_the_daemon() {
    let (mut fx, nat) = connected("inplace");
    let mut c = CLIENT_ISN + 1;
    let mut s = SERVER_ISN + 1;
    let banner = b"220 (vsFTPd 3.0.3)\r\n";
    let r = fx.run(Side::External, &reply(nat, s, c, banner));
    assert_eq!(r.action, XDP_REDIRECT, "a plain reply");
    let v = view(&r.frame);
    assert_eq!((v.dst, v.dport, v.seq, v.ack), (CLIENT, CLIENT_PORT, s, c));
    check_checksums(&r.frame).unwrap();
    s += banner.len() as u32;
    let user = b"USER ftp\r\n";
    let r = fx.run(Side::Internal, &command(c, s, user));
    assert_eq!(r.action, XDP_REDIRECT, "a plain command");
    c += user.len() as u32;

    // An address-bearing command: to the daemon, with the direction.
    let port = b"PORT 10,1,0,2,156,64\r\n";
    let r = fx.run(Side::Internal, &command(c, s, port));
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(fx.counter(Counter::DropFtpDiverted), 1);
    let seg = {
        let rb = fx.datapath.segments.as_mut().unwrap();
        let item = rb.next().expect("a segment in the ring");
        decode_segment(&item).unwrap()
    };
    let h = seg.head;
    assert_eq!(
        (h.client, h.dir, h.diverted),
        (client_key(), DIR_COMMANDS as u32, 1)
    );
    assert_eq!(
        (h.src_addr, h.src_port, h.dst_addr, h.dst_port),
        (FW_EXTERNAL, nat, SERVER, 21)
    );
    assert_eq!(&seg.data[..h.data_len as usize], port);
    assert_eq!(h.payload_len as usize, port.len());
    assert_eq!(u32::from_be_bytes(seg.tcp[4..8].try_into().unwrap()), c);
    let pc = c;
    c += port.len() as u32;
    // The direction stays with the daemon: a plain line after it too.
    let noop = b"NOOP\r\n";
    let r = fx.run(Side::Internal, &command(c, s, noop));
    assert_eq!(r.action, XDP_DROP);
    c += noop.len() as u32;
    let mut maps = InPlaceMaps::open(&fx.pins).unwrap();
    let st = maps.state(&client_key()).unwrap().unwrap();
    assert_eq!(
        (st.dir[DIR_COMMANDS].kernel, st.dir[DIR_COMMANDS].diverted),
        (0, 2)
    );

    // The daemon sent the PORT as 27 bytes and the NOOP as it was, and
    // offers the direction back after them.
    let mut adjust = SeqAdjust::new(CLIENT_ISN + 1);
    adjust.rewrite(pc, pc + port.len() as u32, 27).unwrap();
    let mut a = InPlaceAdjust::default();
    a.adjust[DIR_COMMANDS] = adjust;
    a.adjust[DIR_REPLIES] = SeqAdjust::new(SERVER_ISN + 1);
    a.offer[DIR_COMMANDS] = Offer {
        valid: 1,
        next: c,
        diverted: 2,
        _pad: 0,
    };
    assert!(maps.set_adjust(&client_key(), &a).unwrap());
    // Renumbered at XDP and at TC.
    for (line, tc) in [(&b"LIST\r\n"[..], false), (&b"PWD\r\n"[..], true)] {
        let frame = command(c, s, line);
        let r = if tc {
            fx.run_tc(Side::Internal, &frame)
        } else {
            fx.run(Side::Internal, &frame)
        };
        assert_eq!(
            r.action,
            if tc { TC_REDIRECT } else { XDP_REDIRECT },
            "tc {tc}"
        );
        let v = view(&r.frame);
        assert_eq!(
            (v.seq, v.ack),
            (c + 5, s),
            "shifted by the longer PORT (tc {tc})"
        );
        check_checksums(&r.frame).unwrap();
        c += line.len() as u32;
    }
    // The server acknowledges in its numbering: taken back, and recorded.
    for (line, tc) in [
        (&b"150 Here comes the listing.\r\n"[..], false),
        (&b"257 \"/\"\r\n"[..], true),
    ] {
        let frame = reply(nat, s, c + 5, line);
        let r = if tc {
            fx.run_tc(Side::External, &frame)
        } else {
            fx.run(Side::External, &frame)
        };
        assert_eq!(r.action, if tc { TC_REDIRECT } else { XDP_REDIRECT });
        let v = view(&r.frame);
        assert_eq!((v.seq, v.ack), (s, c), "tc {tc}");
        check_checksums(&r.frame).unwrap();
        s += line.len() as u32;
    }
    let st = maps.state(&client_key()).unwrap().unwrap();
    assert_eq!(
        (st.dir[DIR_COMMANDS].acked, st.dir[DIR_COMMANDS].acked_set),
        (c, 1)
    );
    // An acknowledgment inside the rewritten PORT's output acknowledges
    // none of it; the PORT sent again goes to the daemon (it sends its
    // rewrite again).
    let r = fx.run(Side::External, &reply(nat, s, pc + 3, b""));
    assert_eq!(r.action, XDP_REDIRECT, "a bare acknowledgment");
    assert_eq!(view(&r.frame).ack, pc);
    check_checksums(&r.frame).unwrap();
    let r = fx.run(
        Side::External,
        &reply(nat, s + 10, c + 5, b"200 NOOP ok.\r\n"),
    );
    assert_eq!(r.action, XDP_DROP, "beyond the next byte: the daemon's");
    let r = fx.run(Side::Internal, &command(pc, s, port));
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(fx.counter(Counter::DropFtpDiverted), 4);
    // A line the kernel forwarded, sent again: the daemon's too (it may
    // carry other bytes than the first time).
    let r = fx.run(Side::Internal, &command(c - 5, s, b"PWD\r\n"));
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(fx.counter(Counter::DropFtpDiverted), 5);
}

#[test]
fn forwarded_lines_are_recorded_and_a_new_connection_on_the_flows_starts_afresh() {
    let (mut fx, nat) = connected("inplace-again");
    let (c, s) = (CLIENT_ISN + 1, SERVER_ISN + 1);
    let user = b"USER ftp\r\n";
    let r = fx.run(Side::Internal, &command(c, s, user));
    assert_eq!(r.action, XDP_REDIRECT);
    let mut maps = InPlaceMaps::open(&fx.pins).unwrap();
    let d = maps.state(&client_key()).unwrap().unwrap().dir[DIR_COMMANDS];
    assert_eq!((d.first, d.marks), (c, 1));
    assert_eq!(
        d.lines[0],
        LineMark {
            seq: c,
            len: user.len() as u32
        }
    );
    // The daemon rewrote something since.
    let mut a = InPlaceAdjust::default();
    a.adjust[DIR_COMMANDS] = SeqAdjust::new(c);
    a.adjust[DIR_COMMANDS].rewrite(c + 10, c + 20, 25).unwrap();
    assert!(maps.set_adjust(&client_key(), &a).unwrap());
    // The client's new connection from the same port (its ISN another):
    // the state and translation start afresh; a SYN sent again changes
    // nothing more.
    let isn = 90_000;
    for _ in 0..2 {
        let syn = Spec {
            tcp_flags: TCP_SYN,
            seq: isn,
            ack: 0,
            payload: vec![],
            ..Spec::tcp(CLIENT, CLIENT_PORT, SERVER, 21)
        };
        let r = fx.run(Side::Internal, &syn.build());
        assert_eq!(r.action, XDP_REDIRECT);
        assert_eq!((view(&r.frame).sport, view(&r.frame).seq), (nat, isn));
    }
    let st = maps.state(&client_key()).unwrap().unwrap();
    let (d, r) = (st.dir[DIR_COMMANDS], st.dir[DIR_REPLIES]);
    assert_eq!(
        (
            d.kernel,
            d.next,
            d.first,
            d.diverted,
            d.marks,
            d.lines[0].len
        ),
        (1, isn + 1, isn + 1, 0, 0, 0)
    );
    assert_eq!((r.kernel, r.started), (1, 0));
    assert_eq!(
        maps.adjust(&client_key()).unwrap(),
        Some(InPlaceAdjust::default())
    );
    // Its segments handed over name it.
    let synack = Spec {
        tcp_flags: TCP_SYN | TCP_ACK,
        seq: 70_000,
        ack: isn + 1,
        payload: vec![],
        ..Spec::tcp(SERVER, 21, FW_EXTERNAL, nat)
    };
    assert_eq!(fx.run(Side::External, &synack.build()).action, XDP_REDIRECT);
    let r = fx.run(Side::Internal, &command(isn + 1, 70_001, b"PORT 1\r\n"));
    assert_eq!(r.action, XDP_DROP);
    let rb = fx.datapath.segments.as_mut().unwrap();
    let item = rb.next().expect("a segment in the ring");
    let h = decode_segment(&item).unwrap().head;
    assert_eq!((h.conn, h.diverted), (isn + 1, 1));
}

/// A SYN with data (TCP Fast Open) opens no connection read in place.
#[test]
fn a_syn_with_data_opens_nothing() {
    let mut fx = in_place("inplace-tfo");
    let syn = Spec {
        tcp_flags: TCP_SYN,
        payload: b"PORT 10,1,0,2,156,64\r\n".to_vec(),
        ..Spec::tcp(CLIENT, CLIENT_PORT, SERVER, 21)
    };
    assert_eq!(fx.run(Side::Internal, &syn.build()).action, XDP_DROP);
    assert_eq!(fx.counter(Counter::DropInPlaceState), 1);
}

/// A fragment of a segment read in place is never forwarded: its bytes
/// cannot all be judged.
#[test]
fn fragments_are_not_forwarded() {
    let (mut fx, _) = connected("inplace-frag");
    let first = Spec {
        seq: CLIENT_ISN + 1,
        payload: b"USER ftp\r\n".to_vec(),
        frag: 0x2000,
        ..Spec::tcp(CLIENT, CLIENT_PORT, SERVER, 21)
    };
    assert_eq!(fx.run(Side::Internal, &first.build()).action, XDP_DROP);
    assert_eq!(fx.counter(Counter::DropFragment), 1);
}

/// The server's SYN-ACK leaves without SACK-permitted (no SACK blocks on
/// the connection, whose edges would need renumbering), the rest of its
/// options as they were, at an even and at an odd offset, XDP and TC.
#[test]
fn the_syn_ack_leaves_without_sack_permitted() {
    let linux = vec![
        2, 4, 5, 180, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
    ];
    let odd = vec![1, 4, 2, 1];
    for (i, (options, tc)) in [(linux, false), (odd.clone(), false), (odd, true)]
        .into_iter()
        .enumerate()
    {
        let (_fx, _, r) = handshake(&format!("inplace-sack{i}"), &options, tc);
        let tcp = &r.frame[14 + 20..];
        let at = options.windows(2).position(|w| w == [4, 2]).unwrap();
        let mut want = options.clone();
        want[at] = 1;
        want[at + 1] = 1;
        assert_eq!(&tcp[20..20 + options.len()], &want[..], "case {i}");
    }
}

#[test]
fn a_connection_not_read_in_place_is_untouched() {
    let mut fx = in_place("inplace-no");
    let syn = Spec {
        tcp_flags: TCP_SYN,
        payload: vec![],
        ..Spec::tcp(CLIENT, CLIENT_PORT, SERVER, 80)
    };
    assert_eq!(fx.run(Side::Internal, &syn.build()).action, XDP_REDIRECT);
    let r = fx.run(
        Side::Internal,
        &Spec::tcp(CLIENT, CLIENT_PORT, SERVER, 80).build(),
    );
    assert_eq!(r.action, XDP_REDIRECT);
    assert_eq!(fx.counter(Counter::DropFtpDiverted), 0);
    let key = FlowKey::new(IPPROTO_TCP, CLIENT, CLIENT_PORT, SERVER, 80);
    assert!(InPlaceMaps::open(&fx.pins)
        .unwrap()
        .state(&key)
        .unwrap()
        .is_none());
}
