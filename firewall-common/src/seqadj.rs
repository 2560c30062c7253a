//! Sequence numbers of one direction of a TCP connection whose bytes were
//! rewritten in places (an FTP control connection read in place: a PORT
//! command or a 229 reply comes out longer or shorter than it went in).
//!
//! The sender numbers its bytes in its own space; the receiver sees the
//! rewritten stream, numbered from the same initial sequence number. Between
//! rewrites the two differ by a constant, so one direction needs only the
//! last rewritten stretch of the sender's bytes and the offsets on each side
//! of it (netfilter's `nf_ct_seqadj` keeps the same, without the stretch's
//! start):
//!
//! ```text
//! sender:    floor ........ start [rewritten] end ..........
//! receiver:  + before              (out bytes)   + after
//! ```
//!
//! - a segment lying wholly in `[floor, start)` is shifted by `before`, one
//!   lying wholly at or after `end` by `after`;
//! - anything else — a segment overlapping the stretch (the rewritten line
//!   sent again) or older than `floor` — must go to whoever did the
//!   rewriting, which re-sends what it wrote;
//! - the receiver's acknowledgments go back the other way; one that lands
//!   inside the rewritten output acknowledges none of the stretch (the
//!   sender sends it again until all of it is acknowledged), and one older
//!   than the stretch is taken back by `before`. That is exact from `floor`
//!   on. An older one (late, or a rewrite came before the receiver
//!   acknowledged the last) may be taken back into an earlier stretch: the
//!   sender then sends the rest of that stretch again, which goes to the
//!   rewriter (it is older than `floor`), and the rewriter sends that
//!   stretch's output again, whole, so the receiver still gets every byte.
//!   (netfilter's seqadj maps such acknowledgments the same way, and has no
//!   way back for the retransmission.)
//!
//! Sequence numbers wrap: every comparison is of the signed difference
//! (RFC 1982 serial arithmetic, as the kernel's `before()`/`after()`).
//!
//! Pure, `no_std`, used by the datapath and the daemon alike.

/// Where a segment of the sender lies against the last rewrite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Span {
    /// Wholly in `[floor, start)`: shifted by `before`.
    Before,
    /// Wholly at or after `end`: shifted by `after`.
    After,
    /// Overlapping the rewritten stretch, or older than `floor`: for the
    /// rewriter.
    Rewriter,
}

/// A rewrite that cannot be recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RewriteError {
    /// It starts before the end of the last one (rewrites go forward).
    Backwards,
    /// The stretch, or its output, is 1 GiB or more, or the offsets would
    /// leave an `i32`.
    TooLong,
}

/// One direction's translation (a map value: `#[repr(C)]`, no padding).
/// All zeros (`Default`) is the identity for any numbers.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SeqAdjust {
    /// First sender sequence number that `before` holds for.
    pub floor: u32,
    /// The last rewritten stretch of the sender's bytes: `[start, end)`.
    pub start: u32,
    pub end: u32,
    /// Added to the sender's numbers in `[floor, start)`.
    pub before: i32,
    /// Added from `end` on.
    pub after: i32,
}

const MAX_STRETCH: u32 = 1 << 30;

/// `a` is strictly before `b` in sequence space.
#[inline(always)]
pub const fn seq_before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

#[inline(always)]
const fn shift(seq: u32, by: i32) -> u32 {
    seq.wrapping_add(by as u32)
}

impl SeqAdjust {
    /// Nothing rewritten yet: every byte from `first` (the sender's initial
    /// sequence number + 1) passes as it is.
    pub const fn new(first: u32) -> Self {
        SeqAdjust {
            floor: first,
            start: first,
            end: first,
            before: 0,
            after: 0,
        }
    }

    /// Whether nothing was rewritten yet (the datapath then need not look
    /// at numbers at all). A rewrite of the same length is not nothing: a
    /// segment sent again over it must still go to the rewriter.
    #[inline(always)]
    pub const fn is_identity(&self) -> bool {
        self.start == self.end && self.before == 0 && self.after == 0
    }

    /// Where the sender's segment `[seq, seq + len)` lies. A segment of no
    /// length (a bare ACK, or the FIN's position) at `end` or later is
    /// `After`.
    #[inline(always)]
    pub const fn span(&self, seq: u32, len: u32) -> Span {
        let last = seq.wrapping_add(len);
        if !seq_before(seq, self.end) {
            Span::After
        } else if !seq_before(seq, self.floor) && !seq_before(self.start, last) {
            // floor <= seq and seq + len <= start
            Span::Before
        } else {
            Span::Rewriter
        }
    }

    /// The receiver's number for the sender's `seq`, for a segment that
    /// `span` put `Before` or `After` (`Rewriter` segments are not
    /// translated here: returns `seq` unchanged).
    #[inline(always)]
    pub const fn seq_out(&self, seq: u32, span: Span) -> u32 {
        match span {
            Span::Before => shift(seq, self.before),
            Span::After => shift(seq, self.after),
            Span::Rewriter => seq,
        }
    }

    /// The receiver's number for a segment without payload (a bare ACK, a
    /// FIN): one numbered inside a rewritten stretch is put after its
    /// output, which the receiver accepts either way.
    #[inline(always)]
    pub const fn seq_out_bare(&self, seq: u32) -> u32 {
        if self.is_identity() {
            return seq;
        }
        match self.span(seq, 0) {
            Span::Rewriter => shift(self.end, self.after),
            span => self.seq_out(seq, span),
        }
    }

    /// The sender's number for an acknowledgment (or a SACK edge) the
    /// receiver sent: never more than the receiver has of the sender's
    /// bytes.
    #[inline(always)]
    pub const fn ack_in(&self, ack: u32) -> u32 {
        let out_end = shift(self.end, self.after);
        let out_start = shift(self.start, self.before);
        if !seq_before(ack, out_end) {
            shift(ack, self.after.wrapping_neg())
        } else if !seq_before(out_start, ack) {
            shift(ack, self.before.wrapping_neg())
        } else {
            // Inside the rewritten output: none of the stretch yet.
            self.start
        }
    }

    /// Whether `ack_in` gives for `ack` no more than the receiver has: from
    /// the floor's output on. An older acknowledgment is taken back by
    /// `before`, which is right only if no rewrite before the last one
    /// changed a length, so it must not be relied on (the datapath records
    /// the highest trusted one for the daemon).
    #[inline(always)]
    pub const fn ack_trusted(&self, ack: u32) -> bool {
        !seq_before(ack, shift(self.floor, self.before))
    }

    /// Records that the sender's `[start, end)` went to the receiver as
    /// `out_len` bytes. The stretch starts at or after the last one's end;
    /// the sender's bytes between the two keep the offset they had.
    pub fn rewrite(&mut self, start: u32, end: u32, out_len: u32) -> Result<(), RewriteError> {
        if seq_before(start, self.end) {
            return Err(RewriteError::Backwards);
        }
        let len = end.wrapping_sub(start);
        if len >= MAX_STRETCH || out_len >= MAX_STRETCH {
            return Err(RewriteError::TooLong);
        }
        let delta = out_len as i64 - len as i64;
        let after = self.after as i64 + delta;
        if after > i32::MAX as i64 || after < i32::MIN as i64 {
            return Err(RewriteError::TooLong);
        }
        *self = SeqAdjust {
            floor: self.end,
            start,
            end,
            before: self.after,
            after: after as i32,
        };
        Ok(())
    }
}

#[cfg(test)]
#[path = "seqadj_tests.rs"]
mod tests;
