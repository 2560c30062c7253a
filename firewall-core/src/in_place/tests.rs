use std::sync::Arc;

use firewall_common::inplace::{InPlaceAdjust, LineMark, DIR_COMMANDS, DIR_REPLIES};

use super::*;
use crate::{
    flags::ConnFlags,
    ftp::{
        tests::{Fake, CLIENT, EXT, SERVER},
        FtpStats, REFUSED_COMMAND,
    },
};

fn control(fake: Arc<Fake>) -> Control {
    Control::in_place(
        fake,
        Arc::new(FtpStats::default()),
        CLIENT.parse().unwrap(),
        SERVER.parse().unwrap(),
        EXT,
        ConnFlags::empty(),
    )
    .unwrap()
}

fn connection() -> (Connection, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let c = control(fake.clone());
    (Connection::new(c, InPlaceAdjust::default()), fake)
}

/// A segment of `dir` at `seq` that the datapath diverted at its `next`
/// (`kernel_next`), the `n`th of its direction.
fn seg(dir: usize, seq: u32, kernel_next: u32, n: u32, data: &[u8]) -> Segment<'_> {
    Segment {
        dir,
        seq,
        ack: 5000,
        fin: false,
        data,
        diverted: n,
        acked: Some(kernel_next),
        kernel_next,
        mss: 1400,
        forwarded: &[],
    }
}

fn data(p: &Packet) -> (u32, &[u8], bool) {
    match p {
        Packet::Data {
            seq, payload, fin, ..
        } => (*seq, payload, *fin),
        other => panic!("not data: {other:?}"),
    }
}

#[test]
fn a_port_command_is_rewritten_and_the_direction_offered_back() {
    let (mut c, fake) = connection();
    let port = b"PORT 10,1,0,2,4,1\r\n";
    let r = c.segment(&seg(DIR_COMMANDS, 1000, 1000, 1, port)).unwrap();
    assert_eq!(fake.binds.lock().unwrap().len(), 1);
    assert_eq!(r.packets.len(), 1);
    let (seq, out, fin) = data(&r.packets[0]);
    assert_eq!(
        (seq, out, fin),
        (1000, &b"PORT 10,2,0,1,156,65\r\n"[..], false)
    );
    // Three bytes longer from here on; the kernel may take over at the end.
    let a = r.adjust.adjust[DIR_COMMANDS];
    assert_eq!(a.after, 3);
    assert_eq!(
        a.seq_out_bare(1000 + port.len() as u32),
        1003 + port.len() as u32
    );
    assert!(r.adjust.adjust[DIR_REPLIES].is_identity());
    let o = r.adjust.offer[DIR_COMMANDS];
    assert_eq!(
        (o.valid, o.next, o.diverted),
        (1, 1000 + port.len() as u32, 1)
    );
    assert_eq!(r.adjust.offer[DIR_REPLIES].valid, 0);
}

#[test]
fn a_refused_command_goes_on_as_one_the_server_refuses() {
    let (mut c, fake) = connection();
    // Another host's address: a bounce.
    let r = c
        .segment(&seg(DIR_COMMANDS, 1000, 1000, 1, b"PORT 10,9,9,9,4,1\r\n"))
        .unwrap();
    assert!(fake.binds.lock().unwrap().is_empty());
    let (seq, out, _) = data(&r.packets[0]);
    assert_eq!((seq, out), (1000, REFUSED_COMMAND));
    assert_eq!(r.adjust.offer[DIR_COMMANDS].valid, 1);
    // And when the call fails (no port free), the same.
    *fake.fail.lock().unwrap() = true;
    let at = 1000 + 19;
    let r = c
        .segment(&seg(DIR_COMMANDS, at, at, 2, b"PORT 10,1,0,2,4,1\r\n"))
        .unwrap();
    assert_eq!(data(&r.packets[0]).1, REFUSED_COMMAND);
}

#[test]
fn a_passive_reply_is_rewritten_in_its_direction() {
    let (mut c, fake) = connection();
    let reply = b"229 Entering Extended Passive Mode (|||30000|)\r\n";
    let r = c.segment(&seg(DIR_REPLIES, 7000, 7000, 1, reply)).unwrap();
    assert_eq!(fake.redirects.lock().unwrap().len(), 1);
    let (seq, out, _) = data(&r.packets[0]);
    assert_eq!(seq, 7000);
    assert_eq!(out, b"229 Entering Extended Passive Mode (|||50001|)\r\n");
    assert_eq!(r.adjust.offer[DIR_REPLIES].valid, 1);
    assert_eq!(r.adjust.offer[DIR_COMMANDS].valid, 0);
}

#[test]
fn a_line_in_pieces_is_held_until_whole_and_not_offered_meanwhile() {
    let (mut c, _) = connection();
    let r = c
        .segment(&seg(DIR_COMMANDS, 1000, 1000, 1, b"PORT 10,1,"))
        .unwrap();
    assert!(r.packets.is_empty());
    assert_eq!(r.adjust.offer[DIR_COMMANDS].valid, 0);
    let r = c
        .segment(&seg(DIR_COMMANDS, 1010, 1000, 2, b"0,2,4,1\r\n"))
        .unwrap();
    let (seq, out, _) = data(&r.packets[0]);
    assert_eq!((seq, out), (1000, &b"PORT 10,2,0,1,156,65\r\n"[..]));
    assert_eq!(r.adjust.offer[DIR_COMMANDS].diverted, 2);
}

#[test]
fn bytes_the_kernel_forwarded_after_an_offer_are_accounted() {
    let (mut c, _) = connection();
    let port = b"PORT 10,1,0,2,4,1\r\n";
    c.segment(&seg(DIR_COMMANDS, 1000, 1000, 1, port)).unwrap();
    // The kernel took the offer and forwarded `TYPE I\r\n` (8 bytes) itself,
    // shifted by 3; the next PORT is diverted after it.
    let at = 1000 + port.len() as u32 + 8;
    let r = c
        .segment(&seg(DIR_COMMANDS, at, at, 2, b"PORT 10,1,0,2,4,2\r\n"))
        .unwrap();
    let (seq, out, _) = data(&r.packets[0]);
    assert_eq!(seq, at + 3);
    assert_eq!(out, b"PORT 10,2,0,1,156,66\r\n");
    assert_eq!(r.adjust.adjust[DIR_COMMANDS].after, 6);
}

#[test]
fn an_acknowledgment_is_taken_back_for_its_sender() {
    let (mut c, _) = connection();
    let port = b"PORT 10,1,0,2,4,1\r\n";
    c.segment(&seg(DIR_COMMANDS, 1000, 1000, 1, port)).unwrap();
    // The server's reply acknowledges the rewritten output (22 bytes).
    let mut s = seg(DIR_REPLIES, 7000, 7000, 1, b"227 x (10,2,0,2,117,48)\r\n");
    s.ack = 1022;
    let r = c.segment(&s).unwrap();
    match &r.packets[0] {
        Packet::Data { ack, .. } => assert_eq!(*ack, 1000 + port.len() as u32),
        p => panic!("{p:?}"),
    }
}

#[test]
fn a_fin_goes_on_the_piece_that_ends_the_bytes() {
    let (mut c, _) = connection();
    let mut s = seg(DIR_COMMANDS, 1000, 1000, 1, b"PORT 10,1,0,2,4,1\r\n");
    s.fin = true;
    let r = c.segment(&s).unwrap();
    assert!(data(&r.packets[0]).2);
    // Not while part of a line is held.
    let (mut c, _) = connection();
    let mut s = seg(DIR_COMMANDS, 1000, 1000, 1, b"PORT 10");
    s.fin = true;
    assert!(c.segment(&s).unwrap().packets.is_empty());
}

#[test]
fn bytes_sent_again_are_answered_as_they_went_out() {
    let (mut c, _) = connection();
    let port = b"PORT 10,1,0,2,4,1\r\n";
    let first = c.segment(&seg(DIR_COMMANDS, 1000, 1000, 1, port)).unwrap();
    let again = c.segment(&seg(DIR_COMMANDS, 1000, 1000, 2, port)).unwrap();
    assert_eq!(first.packets, again.packets);
}

#[test]
fn unused_openings_end_with_the_connection() {
    let (mut c, fake) = connection();
    c.segment(&seg(DIR_COMMANDS, 1000, 1000, 1, b"PORT 10,1,0,2,4,1\r\n"))
        .unwrap();
    c.finish();
    assert_eq!(fake.withdrawn.lock().unwrap().len(), 1);
}

#[test]
fn a_connection_taken_up_goes_on_from_the_published_translation() {
    let (mut c, _) = connection();
    let port = b"PORT 10,1,0,2,4,1\r\n";
    let r = c.segment(&seg(DIR_COMMANDS, 1000, 1000, 1, port)).unwrap();
    // A new daemon finds the translation published and the kernel further on.
    let mut next = Connection::new(control(Arc::new(Fake::default())), r.adjust);
    let at = 1000 + port.len() as u32 + 8;
    let r2 = next
        .segment(&seg(DIR_COMMANDS, at, at, 2, b"PORT 10,1,0,2,4,2\r\n"))
        .unwrap();
    assert_eq!(data(&r2.packets[0]).0, at + 3);
    assert_eq!(r2.adjust.adjust[DIR_COMMANDS].after, 6);
}

#[test]
fn a_line_the_kernel_forwarded_sent_again_goes_on_only_where_it_lay() {
    let (mut c, _) = connection();
    let port = b"PORT 10,1,0,2,4,1\r\n";
    c.segment(&seg(DIR_COMMANDS, 1000, 1000, 1, port)).unwrap();
    // The kernel forwarded `TYPE I` after the PORT (shifted by 3), then the
    // client sends it again: it goes on where it went, as it is.
    let at = 1000 + port.len() as u32;
    let marks = [LineMark { seq: at, len: 8 }];
    let mut s = seg(DIR_COMMANDS, at, at + 8, 2, b"TYPE I\r\n");
    s.forwarded = &marks;
    s.acked = Some(at);
    let r = c.segment(&s).unwrap();
    assert_eq!(data(&r.packets[0]), (at + 3, &b"TYPE I\r\n"[..], false));
    // Other bytes in its place that are no plain line: none of them (an
    // empty segment only, for the server to say what it has).
    let mut s = seg(DIR_COMMANDS, at, at + 8, 3, b"PORT 1\r\n");
    s.forwarded = &marks;
    s.acked = Some(at);
    let r = c.segment(&s).unwrap();
    assert_eq!(r.packets.len(), 1);
    assert_eq!(data(&r.packets[0]), (at + 3, &b""[..], false));
}

#[test]
fn a_restarting_daemon_hands_over_the_openings_and_the_role() {
    let (mut c, fake) = connection();
    let port = b"PORT 10,1,0,2,4,1\r\n";
    c.segment(&seg(DIR_COMMANDS, 1000, 1000, 1, port)).unwrap();
    let state = c.into_control().hand_over().between_lines();
    assert!(
        fake.withdrawn.lock().unwrap().is_empty(),
        "nothing withdrawn at a hand-over"
    );
    let json = serde_json::to_string(&state).unwrap();
    let state: crate::ftp::ControlState = serde_json::from_str(&json).unwrap();
    // The next daemon: the opening made again where it was announced, and
    // a refusal still goes on in the commands' own direction.
    let next = Control::resume(fake.clone(), Arc::new(FtpStats::default()), state).unwrap();
    let binds = fake.binds.lock().unwrap().clone();
    assert_eq!(binds.len(), 2);
    assert_eq!(binds[1].proxy, Some("10.2.0.1:40001".parse().unwrap()));
    let mut c = Connection::new(next, InPlaceAdjust::default());
    let at = 1000 + port.len() as u32;
    let r = c
        .segment(&seg(DIR_COMMANDS, at, at, 2, b"PORT 10,9,9,9,4,1\r\n"))
        .unwrap();
    assert_eq!(data(&r.packets[0]).1, REFUSED_COMMAND);
}

#[test]
fn a_first_line_the_kernel_forwarded_and_lost_goes_on_when_sent_again() {
    // The banner: the datapath forwarded it (and recorded it) but the
    // packet was lost after it (no neighbour yet); the server sends it
    // again, the first segment of the direction the daemon sees.
    let (mut c, _) = connection();
    let banner = b"220 (vsFTPd 3.0.3)\r\n";
    let marks = [LineMark {
        seq: 7000,
        len: banner.len() as u32,
    }];
    let end = 7000 + banner.len() as u32;
    for acked in [None, Some(7000)] {
        let mut s = seg(DIR_REPLIES, 7000, end, 1, banner);
        s.forwarded = &marks;
        s.acked = acked;
        let r = c.segment(&s).unwrap();
        assert_eq!(
            data(&r.packets[0]),
            (7000, &banner[..], false),
            "acked {acked:?}"
        );
    }
}
