extern crate std;

use std::vec::Vec;

use super::*;

#[test]
fn nothing_rewritten_passes_as_it_is() {
    let a = SeqAdjust::new(1000);
    assert!(a.is_identity());
    assert_eq!(a.span(1000, 20), Span::After);
    assert_eq!(a.seq_out(1000, Span::After), 1000);
    assert_eq!(a.ack_in(1020), 1020);
    assert!(SeqAdjust::default().is_identity());
    let mut same = SeqAdjust::new(0);
    same.rewrite(10, 20, 10).unwrap();
    assert!(
        !same.is_identity(),
        "the stretch still goes to the rewriter"
    );
    assert_eq!(same.span(10, 10), Span::Rewriter);
}

#[test]
fn a_longer_line_shifts_what_follows() {
    // "PORT 10,1,0,2,156,64\r\n" (22) went out as 27 bytes at 1100.
    let mut a = SeqAdjust::new(1000);
    a.rewrite(1100, 1122, 27).unwrap();
    assert_eq!(a.span(1000, 100), Span::Before);
    assert_eq!(a.seq_out(1000, Span::Before), 1000);
    assert_eq!(a.span(1100, 22), Span::Rewriter, "the line sent again");
    assert_eq!(a.span(1090, 20), Span::Rewriter, "overlapping its start");
    assert_eq!(a.span(1122, 6), Span::After);
    assert_eq!(a.seq_out(1122, Span::After), 1127);
    assert_eq!(a.span(1122, 0), Span::After, "a bare ACK after it");
    // Acknowledgments: before, inside and after the new line.
    assert_eq!(a.ack_in(1100), 1100);
    assert_eq!(a.ack_in(1101), 1100);
    assert_eq!(a.ack_in(1126), 1100);
    assert_eq!(a.ack_in(1127), 1122);
    assert_eq!(a.ack_in(1133), 1128);
}

#[test]
fn a_shorter_line_and_a_second_rewrite() {
    let mut a = SeqAdjust::new(0);
    a.rewrite(10, 30, 12).unwrap(); // -8
    a.rewrite(50, 60, 15).unwrap(); // +5: -3 from 60
    assert_eq!(
        (a.floor, a.start, a.end, a.before, a.after),
        (30, 50, 60, -8, -3)
    );
    assert_eq!(a.span(30, 20), Span::Before);
    assert_eq!(a.seq_out(30, Span::Before), 22);
    assert_eq!(a.span(29, 1), Span::Rewriter, "older than the floor");
    assert_eq!(a.span(60, 1), Span::After);
    assert_eq!(a.seq_out(60, Span::After), 57);
    assert_eq!(a.ack_in(42), 50);
    assert_eq!(a.ack_in(50), 50, "inside the 15 bytes written");
    assert_eq!(a.ack_in(57), 60);
    assert!(a.ack_trusted(22));
    assert!(!a.ack_trusted(21), "older than the floor's output");
}

#[test]
fn a_line_removed_is_acknowledged_when_what_follows_is() {
    let mut a = SeqAdjust::new(0);
    a.rewrite(10, 20, 0).unwrap();
    assert_eq!(a.ack_in(10), 20, "nothing of it to wait for");
    assert_eq!(a.ack_in(9), 9);
    assert_eq!(a.seq_out(20, Span::After), 10);
}

#[test]
fn rewrites_go_forward_and_stay_small() {
    let mut a = SeqAdjust::new(0);
    a.rewrite(10, 20, 5).unwrap();
    assert_eq!(a.rewrite(15, 25, 5), Err(RewriteError::Backwards));
    assert_eq!(
        a.rewrite(20, 20 + MAX_STRETCH, 5),
        Err(RewriteError::TooLong)
    );
    assert_eq!(a.rewrite(20, 21, MAX_STRETCH), Err(RewriteError::TooLong));
    assert_eq!(
        a.rewrite(20, 21, 1),
        Ok(()),
        "a refused rewrite changed nothing"
    );
    assert_eq!(a.after, -5);
}

#[test]
fn a_bare_segment_inside_a_stretch_goes_after_it() {
    let mut a = SeqAdjust::new(0);
    assert_eq!(a.seq_out_bare(7), 7, "nothing rewritten");
    a.rewrite(10, 20, 25).unwrap();
    assert_eq!(a.seq_out_bare(5), 5);
    assert_eq!(a.seq_out_bare(15), 35);
    assert_eq!(a.seq_out_bare(20), 35);
}

#[test]
fn numbers_wrap() {
    let first = u32::MAX - 15;
    let mut a = SeqAdjust::new(first);
    a.rewrite(u32::MAX - 5, 4, 20).unwrap(); // 10 bytes across the wrap, +10
    assert_eq!(a.span(first, 10), Span::Before);
    assert_eq!(a.span(u32::MAX, 2), Span::Rewriter);
    assert_eq!(a.span(4, 100), Span::After);
    assert_eq!(a.seq_out(4, Span::After), 14);
    assert_eq!(a.ack_in(14), 4);
    assert_eq!(a.ack_in(3), u32::MAX - 5);
}

/// A sender's stream as lines (offsets from the first byte), each kept or
/// rewritten to some length.
struct Model {
    /// Sender offset, length, output length (None: kept).
    lines: Vec<(u32, u32, Option<u32>)>,
}

impl Model {
    /// For each sender byte of the first `n` lines, where it went if it was
    /// kept; and for each position (0..=sent), where a segment of no length
    /// at it lands, unless it is inside a rewritten line.
    fn places(&self, n: usize) -> (Vec<Option<u32>>, Vec<Option<u32>>) {
        let (mut kept, mut bound) = (Vec::new(), Vec::new());
        let mut out = 0;
        for &(_, len, rewritten) in &self.lines[..n] {
            match rewritten {
                None => {
                    for i in 0..len {
                        kept.push(Some(out + i));
                        bound.push(Some(out + i));
                    }
                    out += len;
                }
                Some(l) => {
                    bound.push(Some(out));
                    for _ in 0..len {
                        kept.push(None);
                    }
                    for _ in 1..len {
                        bound.push(None);
                    }
                    out += l;
                }
            }
        }
        bound.push(Some(out));
        (kept, bound)
    }

    fn out_of(&self, n: usize) -> u32 {
        self.lines[..n]
            .iter()
            .map(|&(_, len, out)| out.unwrap_or(len))
            .sum()
    }

    /// Sender bytes (offsets from `first`) the receiver has all of, having
    /// received the output's bytes below `x` (an offset too), counting the
    /// first `n` lines.
    fn delivered(&self, n: usize, x: u32) -> u32 {
        let mut out = 0;
        let mut got = 0;
        for &(at, len, rewritten) in &self.lines[..n] {
            match rewritten {
                None => {
                    let take = x.saturating_sub(out).min(len);
                    got = at + take;
                    if take < len {
                        return got;
                    }
                    out += len;
                }
                Some(l) => {
                    if out + l > x {
                        return got;
                    }
                    out += l;
                    got = at + len;
                }
            }
        }
        got
    }
}

proptest::proptest! {
    /// After each line the rewriter handled, every segment the adjustment
    /// translates holds kept bytes only and lands where they went, and every
    /// acknowledgment from the floor on gives back exactly what the receiver
    /// has of the sender's bytes.
    #[test]
    fn translation_matches_the_stream(
        first in proptest::prelude::any::<u32>(),
        shape in proptest::collection::vec((1u32..40, proptest::option::of(0u32..60)), 1..12),
        probes in proptest::collection::vec((0u32..600, 0u32..50), 1..40),
    ) {
        let mut lines = Vec::new();
        let mut at = 0;
        for &(len, out) in &shape {
            lines.push((at, len, out));
            at += len;
        }
        let m = Model { lines };
        let mut a = SeqAdjust::new(first);
        for n in 1..=m.lines.len() {
            let (at, len, rewritten) = m.lines[n - 1];
            if let Some(l) = rewritten {
                a.rewrite(first.wrapping_add(at), first.wrapping_add(at + len), l).unwrap();
            }
            let sent = at + len;
            let out_total = m.out_of(n);
            for &(off, len) in &probes {
                let (off, len) = (off % (sent + 1), len.min(sent - off % (sent + 1)));
                let span = a.span(first.wrapping_add(off), len);
                if span == Span::Rewriter {
                    continue;
                }
                // Every byte of a translated segment is kept and lands one
                // after the other where the model put it; a segment of no
                // length lands where the byte at its number went.
                let (kept, bound) = m.places(n);
                for b in off..off + len {
                    proptest::prop_assert!(kept[b as usize].is_some(), "translated rewritten byte {}", b);
                }
                let want = if len > 0 { kept[off as usize] } else { bound[off as usize] };
                proptest::prop_assert_eq!(
                    Some(a.seq_out(first.wrapping_add(off), span)),
                    want.map(|w| first.wrapping_add(w)),
                    "segment at {} len {} ({:?})", off, len, span
                );
                if len > 1 {
                    proptest::prop_assert_eq!(kept[(off + len - 1) as usize], want.map(|w| w + len - 1));
                }
            }
            // Acknowledgments from the floor's output on.
            let floor_out = a.floor.wrapping_add(a.before as u32).wrapping_sub(first);
            for x in floor_out..=out_total {
                proptest::prop_assert!(a.ack_trusted(first.wrapping_add(x)));
                proptest::prop_assert_eq!(
                    a.ack_in(first.wrapping_add(x)),
                    first.wrapping_add(m.delivered(n, x)),
                    "ack at output offset {}", x
                );
            }
        }
    }
}
