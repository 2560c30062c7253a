use proptest::prelude::*;

use firewall_common::{inplace::LINE_MARKS, seqadj::Span};

use super::*;

/// Lines ending in `\n`: `P…` comes out twice as long, `D…` not at all,
/// `S…` as `s\n`, the rest as it is.
#[derive(Default)]
struct Fake {
    line: Vec<u8>,
}

impl LineFilter for Fake {
    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        for &b in data {
            self.line.push(b);
            if b == b'\n' {
                let body = &self.line[..self.line.len() - 1];
                match body.first() {
                    Some(b'P') => {
                        out.extend_from_slice(body);
                        out.extend_from_slice(body);
                        out.push(b'\n');
                    }
                    Some(b'D') => {}
                    Some(b'S') => out.extend_from_slice(b"s\n"),
                    _ => out.extend_from_slice(&self.line),
                }
                self.line.clear();
            }
        }
    }

    fn held(&self) -> usize {
        self.line.len()
    }

    /// Lines starting `a` or `b`, whole (kept as they are).
    fn plain(&self, line: &[u8]) -> bool {
        matches!(line.first(), Some(b'a' | b'b'))
            && line.iter().position(|&b| b == b'\n') == Some(line.len() - 1)
    }
}

fn data(sends: &[Send]) -> Vec<(u32, Vec<u8>)> {
    sends
        .iter()
        .filter_map(|s| match s {
            Send::Data { seq, bytes } => Some((*seq, bytes.clone())),
            Send::Ack { .. } => None,
        })
        .collect()
}

#[test]
fn a_longer_line_then_a_kept_one() {
    let mut f = Fake::default();
    let mut s = StreamRewrite::new(100);
    let out = s.segment(100, b"Pab\n", &mut f, 1460, 100, &[]).unwrap();
    assert_eq!(data(&out), vec![(100, b"PabPab\n".to_vec())]);
    assert_eq!(
        (s.adjust().start, s.adjust().end, s.adjust().after),
        (100, 104, 3)
    );
    let out = s.segment(104, b"ok\n", &mut f, 1460, 100, &[]).unwrap();
    assert_eq!(data(&out), vec![(107, b"ok\n".to_vec())]);
    // The first line again: its output again, whole.
    let out = s.segment(100, b"Pa", &mut f, 1460, 100, &[]).unwrap();
    assert_eq!(data(&out), vec![(100, b"PabPab\n".to_vec())]);
    // Once the receiver acknowledged it, it is forgotten, and a copy is
    // answered with the acknowledgment the sender missed.
    assert_eq!(
        s.segment(100, b"Pab\n", &mut f, 1460, 104, &[]).unwrap(),
        vec![Send::Ack { ack: 104 }]
    );
}

#[test]
fn half_a_line_waits_for_the_rest() {
    let mut f = Fake::default();
    let mut s = StreamRewrite::new(0);
    assert!(s
        .segment(0, b"Pa", &mut f, 1460, 0, &[])
        .unwrap()
        .is_empty());
    // Sent again with nothing new: acknowledged (the filter has it; a
    // sender may wait for this before it sends the rest).
    assert_eq!(
        s.segment(0, b"Pa", &mut f, 1460, 0, &[]).unwrap(),
        vec![Send::Ack { ack: 2 }]
    );
    assert!(
        s.segment(5, b"x\n", &mut f, 1460, 0, &[])
            .unwrap()
            .is_empty(),
        "beyond a gap"
    );
    let out = s.segment(0, b"Pab\n", &mut f, 1460, 0, &[]).unwrap();
    assert_eq!(data(&out), vec![(0, b"PabPab\n".to_vec())]);
    assert_eq!(s.next(), 4);
}

#[test]
fn a_removed_line_is_acknowledged_to_its_sender() {
    let mut f = Fake::default();
    let mut s = StreamRewrite::new(0);
    assert_eq!(
        s.segment(0, b"Dxx\n", &mut f, 1460, 0, &[]).unwrap(),
        vec![Send::Ack { ack: 4 }]
    );
    // Sent again: acknowledged again (nothing before it is missing).
    assert_eq!(
        s.segment(0, b"Dxx\n", &mut f, 1460, 0, &[]).unwrap(),
        vec![Send::Ack { ack: 4 }]
    );
    let out = s.segment(4, b"ok\n", &mut f, 1460, 0, &[]).unwrap();
    assert_eq!(data(&out), vec![(0, b"ok\n".to_vec())]);
    // After a line the receiver has not acknowledged, a removed one waits
    // for the receiver's acknowledgment instead.
    assert!(s
        .segment(7, b"Dy\n", &mut f, 1460, 0, &[])
        .unwrap()
        .is_empty());
}

#[test]
fn output_is_cut_to_the_segment_size_and_bytes_the_kernel_forwarded_come_back_shifted() {
    let mut f = Fake::default();
    let mut s = StreamRewrite::new(0);
    let out = s.segment(0, b"Pabc\n", &mut f, 4, 0, &[]).unwrap();
    assert_eq!(
        data(&out),
        vec![
            (0, b"Pabc".to_vec()),
            (4, b"Pabc".to_vec()),
            (8, b"\n".to_vec())
        ]
    );
    // The datapath forwarded 5..9 itself (+4) and hands back at 9.
    s.resume_at(9);
    let marks = [LineMark { seq: 5, len: 4 }];
    let out = s
        .segment(5, b"abk\nSzz\n", &mut f, 1460, 0, &marks)
        .unwrap();
    assert_eq!(
        data(&out),
        vec![(9, b"abk\n".to_vec()), (13, b"s\n".to_vec())]
    );
    let a = s.adjust();
    assert_eq!(
        (a.floor, a.start, a.end, a.before, a.after),
        (5, 9, 13, 4, 2)
    );
}

#[test]
fn bytes_the_kernel_forwarded_go_on_again_only_as_the_lines_it_recorded() {
    let mut f = Fake::default();
    let mut s = StreamRewrite::new(0);
    let out = s.segment(0, b"Px\n", &mut f, 1460, 0, &[]).unwrap();
    assert_eq!(data(&out), vec![(0, b"PxPx\n".to_vec())]);
    // The datapath forwarded `aa\n` and `bbb\n` (3..10) itself, shifted by 2.
    s.resume_at(10);
    let marks = [LineMark { seq: 3, len: 3 }, LineMark { seq: 6, len: 4 }];
    // Sent again whole, as they were: both go on, in their places.
    let out = s.segment(3, b"aa\nbbb\n", &mut f, 1460, 0, &marks).unwrap();
    assert_eq!(
        data(&out),
        vec![(5, b"aa\n".to_vec()), (8, b"bbb\n".to_vec())]
    );
    // At other boundaries (a line that spans both places), or no longer a
    // line the datapath would forward: nothing goes on.
    for (seq, bytes) in [
        (4u32, &b"aPORT1\n"[..]),
        (3, b"aa\nb"),
        (3, b"Pa\nbbb\n"),
        (6, b"bb\nb"),
    ] {
        let out = s.segment(seq, bytes, &mut f, 1460, 0, &marks).unwrap();
        let sent: Vec<_> = data(&out).into_iter().filter(|(at, _)| *at < 12).collect();
        assert!(
            sent.iter()
                .all(|(_, b)| b.is_empty() || b == b"aa\n" || b == b"bbb\n"),
            "{:?}: {sent:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    // Without the datapath's records, nothing of it: an empty segment, which
    // makes the receiver say what it has.
    let out = s.segment(3, b"aa\nbbb\n", &mut f, 1460, 0, &[]).unwrap();
    assert_eq!(data(&out), vec![(5, Vec::new())]);
}

#[test]
fn too_much_unacknowledged_ends_the_direction() {
    let mut f = Fake::default();
    let mut s = StreamRewrite::new(0);
    let line = [b"P".as_slice(), &[b'x'; 1000], b"\n"].concat();
    let mut seq = 0u32;
    let mut result = Ok(Vec::new());
    for _ in 0..200 {
        result = s.segment(seq, &line, &mut f, 1460, 0, &[]);
        if result.is_err() {
            break;
        }
        seq += line.len() as u32;
    }
    assert_eq!(result, Err(StreamError::Unacknowledged));
}

/// A sender, this side in the datapath's place, and a receiver, over a
/// network that loses, duplicates and reorders; the adjustment translates
/// the receiver's acknowledgments as the datapath would.
struct Sim {
    first: u32,
    stream: Vec<u8>,
    expected: Vec<u8>,
    una: u32,
    nxt: u32,
    rw: StreamRewrite,
    filter: Fake,
    acked: u32,
    got: Vec<Option<u8>>,
    to_rw: Vec<(u32, Vec<u8>)>,
    to_rcv: Vec<(u32, Vec<u8>)>,
    to_snd: Vec<u32>,
    /// The direction is the datapath's from this sender byte on.
    kernel: Option<u32>,
    /// The sender's segments of new bytes, `[start, end)` in its offsets,
    /// in order: it sends bytes again from their boundaries, as TCP does.
    segs: Vec<(u32, u32)>,
    /// The lines the datapath forwarded (the last `LINE_MARKS`).
    marks: Vec<LineMark>,
}

impl Sim {
    /// New bytes from `nxt`, at most `len`.
    fn send_new(&mut self, len: u32) {
        let from = self.nxt;
        let to = (from + len).min(self.stream.len() as u32);
        if from < to {
            self.segs.push((from, to));
            self.push(from, to);
            self.nxt = to;
        }
    }

    /// Bytes sent again from the first unacknowledged one, to the end of
    /// the `count`th segment from there (a retransmission, collapsed).
    fn send_again(&mut self, count: usize) {
        let una = self.una;
        let Some(i) = self.segs.iter().position(|&(s, e)| s <= una && una < e) else {
            return;
        };
        let end = self.segs[(i + count.max(1) - 1).min(self.segs.len() - 1)].1;
        self.push(una, end);
    }

    fn push(&mut self, from: u32, to: u32) {
        self.to_rw.push((
            self.first.wrapping_add(from),
            self.stream[from as usize..to as usize].to_vec(),
        ));
    }

    /// A segment through the datapath: while the direction is the kernel's,
    /// a segment that is exactly one line the filter keeps, at the next
    /// byte, is forwarded there and its place recorded; anything else goes
    /// to this side, and the direction with it.
    fn deliver_sent(&mut self, i: usize) -> Result<(), TestCaseError> {
        if self.to_rw.is_empty() {
            return Ok(());
        }
        let (seq, bytes) = self.to_rw.remove(i % self.to_rw.len());
        if let Some(next) = self.kernel {
            let a = *self.rw.adjust();
            let span = a.span(seq, bytes.len() as u32);
            let last = seq.wrapping_add(bytes.len() as u32);
            if span != Span::Rewriter && seq == next && self.filter.plain(&bytes) {
                self.to_rcv.push((a.seq_out(seq, span), bytes.clone()));
                self.kernel = Some(last);
                if self.marks.len() == LINE_MARKS {
                    self.marks.remove(0);
                }
                self.marks.push(LineMark {
                    seq,
                    len: bytes.len() as u32,
                });
                return Ok(());
            }
            self.rw.resume_at(next);
            self.kernel = None;
        }
        let sends = self
            .rw
            .segment(seq, &bytes, &mut self.filter, 5, self.acked, &self.marks)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        for s in sends {
            match s {
                Send::Data { seq, bytes } => self.to_rcv.push((seq, bytes)),
                Send::Ack { ack } => {
                    let ack = ack.wrapping_sub(self.first);
                    prop_assert!(ack <= self.nxt, "acknowledged unsent bytes");
                    self.una = self.una.max(ack);
                }
            }
        }
        Ok(())
    }

    fn deliver_out(&mut self, i: usize) -> Result<(), TestCaseError> {
        if self.to_rcv.is_empty() {
            return Ok(());
        }
        let (seq, bytes) = self.to_rcv.remove(i % self.to_rcv.len());
        let at = seq.wrapping_sub(self.first) as usize;
        for (k, &b) in bytes.iter().enumerate() {
            prop_assert!(at + k < self.expected.len(), "a byte past the output's end");
            prop_assert_eq!(self.expected[at + k], b, "byte {} of the output", at + k);
            self.got[at + k] = Some(b);
        }
        let rcv_nxt = self.got.iter().take_while(|b| b.is_some()).count() as u32;
        self.to_snd.push(rcv_nxt);
        Ok(())
    }

    fn ack_to_sender(&mut self, i: usize) -> Result<(), TestCaseError> {
        if self.to_snd.is_empty() {
            return Ok(());
        }
        let x = self
            .first
            .wrapping_add(self.to_snd.remove(i % self.to_snd.len()));
        let a = *self.rw.adjust();
        let back = a.ack_in(x);
        if a.ack_trusted(x) && seq_before(self.acked, back) {
            self.acked = back;
        }
        let back = back.wrapping_sub(self.first);
        // An acknowledgment taken back inexactly may land below what the
        // sender had acknowledged (ignored) but never past what it sent.
        if (back as i32) >= 0 {
            prop_assert!(back <= self.nxt, "acknowledged unsent bytes");
            self.una = self.una.max(back);
        }
        Ok(())
    }

    fn done(&self) -> bool {
        self.una == self.stream.len() as u32 && self.got.iter().all(|b| b.is_some())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_receiver_gets_the_filters_output(
        first in any::<u32>(),
        lines in prop::collection::vec((0u8..5, 0usize..12), 1..=LINE_MARKS),
        ops in prop::collection::vec((0u8..8, 0usize..64), 0..160),
    ) {
        run_case(first, &lines, &ops)?;
    }
}

fn run_case(first: u32, lines: &[(u8, usize)], ops: &[(u8, usize)]) -> Result<(), TestCaseError> {
    let mut stream = Vec::new();
    for &(kind, len) in lines {
        stream.push(b"PDSab"[kind as usize]);
        stream.extend(std::iter::repeat_n(b'x', len));
        stream.push(b'\n');
    }
    let mut expected = Vec::new();
    Fake::default().feed(&stream, &mut expected);
    let mut sim = Sim {
        first: first.wrapping_add(1),
        got: vec![None; expected.len()],
        stream,
        expected,
        una: 0,
        nxt: 0,
        rw: StreamRewrite::new(first.wrapping_add(1)),
        filter: Fake::default(),
        acked: first.wrapping_add(1),
        to_rw: Vec::new(),
        to_rcv: Vec::new(),
        to_snd: Vec::new(),
        kernel: None,
        segs: Vec::new(),
        marks: Vec::new(),
    };
    for &(op, n) in ops {
        match op {
            0 => sim.send_new(1 + n as u32 % 20),
            1 => sim.send_again(1 + n % 3),
            2 => sim.deliver_sent(n)?,
            3 => {
                if !sim.to_rw.is_empty() {
                    let i = n % sim.to_rw.len();
                    sim.to_rw.remove(i);
                }
            }
            4 => sim.deliver_out(n)?,
            5 => {
                if !sim.to_rcv.is_empty() {
                    let i = n % sim.to_rcv.len();
                    let d = sim.to_rcv[i].clone();
                    sim.to_rcv.push(d);
                }
            }
            6 => sim.ack_to_sender(n)?,
            7 if n % 2 == 0 => {
                // This side hands the direction back between lines.
                if sim.kernel.is_none() && sim.filter.held() == 0 {
                    sim.kernel = Some(sim.rw.next());
                }
            }
            _ => {
                if !sim.to_snd.is_empty() {
                    let i = n % sim.to_snd.len();
                    sim.to_snd.remove(i);
                }
            }
        }
    }
    // Then a network that loses nothing: the sender sends again from
    // its first unacknowledged byte (as a retransmission timer would),
    // or what it has not sent yet, and everything arrives.
    for _ in 0..400 {
        if sim.done() {
            break;
        }
        sim.send_again(1);
        sim.send_new(16);
        while !sim.to_rw.is_empty() {
            sim.deliver_sent(0)?;
        }
        while !sim.to_rcv.is_empty() {
            sim.deliver_out(0)?;
        }
        while !sim.to_snd.is_empty() {
            sim.ack_to_sender(0)?;
        }
    }
    prop_assert!(
        sim.done(),
        "stalled: una {} of {}, got {:?}",
        sim.una,
        sim.stream.len(),
        sim.got
            .iter()
            .map(|b| b.is_some() as u8)
            .collect::<Vec<_>>()
    );
    Ok(())
}
