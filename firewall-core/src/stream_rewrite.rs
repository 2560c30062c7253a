//! One direction of a TCP connection that is forwarded, not terminated,
//! while a filter rewrites its bytes in place (an FTP control connection
//! read in place): the segments the datapath hands over, put in order and
//! through the filter, and what to send the receiver in their place.
//!
//! The sender's bytes keep their numbers; the receiver's are translated by a
//! [`SeqAdjust`], which this side keeps and the datapath applies to what it
//! forwards itself. Bytes are *accounted* once the filter has written them
//! out: a line the filter holds part of is not sent on, nor acknowledged
//! until its sender sends it again while the receiver has everything before
//! it (a sender may wait for that acknowledgment before sending the rest of
//! the line). A segment beyond the next
//! expected byte (one before it was lost) is not kept: the sender sends it
//! again after the missing one.
//!
//! What the receiver was sent is remembered until the datapath has seen the
//! receiver acknowledge it (`acked`, which counts only acknowledgments the
//! adjustment takes back exactly): any of the sender's bytes sent again is
//! answered from there — a rewritten stretch's output again, whole; bytes
//! the datapath forwarded as below.
//!
//! Bytes the datapath forwarded itself and the sender sends again are
//! answered only as whole lines at the places the datapath recorded
//! (`LineMark`), each still a line the datapath would forward: this side
//! never saw them, so it cannot send what went out the first time.
//!
//! What this guarantees, checked by the property test under loss,
//! duplication, reordering and any segmentation of new bytes (bytes sent
//! again from their first segments' boundaries, as TCP senders do): the
//! receiver gets exactly the filter's output (bytes sent for the same
//! receiver numbers are always the same bytes), and gets all of it.
//!
//! The caller publishes [`StreamRewrite::adjust`] to the datapath before it
//! sends what a segment returned: the receiver's acknowledgments of the new
//! bytes must find the new adjustment.

use std::collections::VecDeque;

use firewall_common::{
    inplace::LineMark,
    seqadj::{seq_before, RewriteError, SeqAdjust},
};

/// A filter of one direction's bytes, working in lines.
pub trait LineFilter {
    /// Takes the next bytes of the direction, in order, and appends to
    /// `out` what is to go on: only for bytes it no longer holds.
    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>);
    /// Bytes taken but not written out yet (the start of a line).
    fn held(&self) -> usize;
    /// Whether `line` (one segment's bytes) is a line the datapath forwards
    /// as it is: one the filter would pass unchanged, whole.
    fn plain(&self, line: &[u8]) -> bool;
}

/// What to send for a segment the datapath handed over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Send {
    /// Bytes to the receiver at its sequence number `seq`.
    Data { seq: u32, bytes: Vec<u8> },
    /// An acknowledgment to the sender of its bytes before `ack`: bytes the
    /// filter removed without a trace, which the receiver never sees.
    Ack { ack: u32 },
}

/// Why a direction cannot go on (the connection is to be reset).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("a rewritten stretch is too long to translate")]
    TooLong,
    #[error("more than {HISTORY_MAX} bytes sent on and not acknowledged")]
    Unacknowledged,
}

impl From<RewriteError> for StreamError {
    fn from(_: RewriteError) -> Self {
        // Backwards cannot happen here: every stretch starts at the last
        // one's end.
        StreamError::TooLong
    }
}

/// How far back a direction taken over without a known acknowledgment
/// answers bytes sent again (a quarter of the sequence space).
const KEPT_UNKNOWN: u32 = 1 << 30;

/// What is remembered of the receiver's unacknowledged bytes, at most.
pub const HISTORY_MAX: usize = 256 * 1024;

/// Sender bytes `start..end` and what the receiver got for them.
#[derive(Clone, Debug)]
struct Region {
    start: u32,
    end: u32,
    sent: Sent,
}

#[derive(Clone, Debug)]
enum Sent {
    /// As they came, shifted by this.
    Kept(i32),
    /// This output, at the receiver's number `at`.
    Rewritten { at: u32, out: Vec<u8> },
}

/// One direction's state.
#[derive(Clone, Debug)]
pub struct StreamRewrite {
    adjust: SeqAdjust,
    /// The next sender byte the filter takes.
    next: u32,
    /// The first sender byte the receiver was sent nothing for yet (bytes
    /// from here to `next` the filter holds).
    accounted: u32,
    /// What the receiver has of the sender's bytes (before this), as far as
    /// this side knows: the datapath's `acked`, or further where this side
    /// acknowledged removed bytes itself.
    acked: u32,
    /// Contiguous, oldest first, up to `accounted`.
    history: VecDeque<Region>,
    history_bytes: usize,
}

impl StreamRewrite {
    /// From the sender's first byte (its initial sequence number + 1).
    pub fn new(first: u32) -> Self {
        StreamRewrite {
            adjust: SeqAdjust::new(first),
            next: first,
            accounted: first,
            acked: first,
            history: VecDeque::new(),
            history_bytes: 0,
        }
    }

    /// Taken over from the datapath, which forwarded the sender's bytes
    /// before `first` as they came, translated by `adjust` (the identity
    /// unless a previous daemon rewrote some); the receiver has those
    /// before `acked` (None: not known). Bytes between the two, after the
    /// last rewritten stretch, are sent on as they come if sent again.
    pub fn taken_over(adjust: SeqAdjust, acked: Option<u32>, first: u32) -> Self {
        let mut s = Self::new(first);
        let identity = adjust.is_identity();
        if !identity {
            s.adjust = adjust;
        }
        // Unknown: as far back as sequence arithmetic reaches safely.
        let mut from = acked.unwrap_or(first.wrapping_sub(KEPT_UNKNOWN));
        if !identity && seq_before(from, adjust.end) {
            from = adjust.end;
        }
        if seq_before(from, first) {
            s.acked = from;
            s.remember(Region {
                start: from,
                end: first,
                sent: Sent::Kept(s.adjust.after),
            });
        }
        s
    }

    /// The receiver acknowledged the sender's bytes before `acked` (an
    /// acknowledgment taken back exactly, in a segment the daemon sends on).
    pub fn acknowledged(&mut self, acked: u32) {
        if seq_before(self.acked, acked) {
            self.acked = acked;
        }
    }

    /// The translation the datapath is to apply.
    pub fn adjust(&self) -> &SeqAdjust {
        &self.adjust
    }

    /// The next sender byte the filter takes: where the datapath may take
    /// the direction back when the filter is between lines.
    pub fn next(&self) -> u32 {
        self.next
    }

    /// The datapath forwarded the sender's bytes from `next()` up to `to`
    /// itself, as they came (shifted by the adjustment's `after`), and hands
    /// the direction back at `to`.
    /// (The filter is between lines: nothing is held.)
    pub fn resume_at(&mut self, to: u32) {
        if seq_before(self.next, to) {
            self.remember(Region {
                start: self.next,
                end: to,
                sent: Sent::Kept(self.adjust.after),
            });
            // Kept bytes change no offset: the adjustment already holds
            // for them. Its end stays where the last stretch ended.
            self.next = to;
            self.accounted = to;
        }
    }

    /// A segment of the sender's, `data` at its sequence number `seq`:
    /// what to send in its place, each piece at most `mss` bytes. `acked`
    /// is the highest acknowledgment the datapath took back exactly (the
    /// sender's numbers): what is before it the receiver has. `forwarded`:
    /// where the last lines the datapath forwarded itself lie.
    pub fn segment<F: LineFilter>(
        &mut self,
        seq: u32,
        data: &[u8],
        filter: &mut F,
        mss: usize,
        acked: u32,
        forwarded: &[LineMark],
    ) -> Result<Vec<Send>, StreamError> {
        let mss = mss.max(1);
        let len = u32::try_from(data.len()).map_err(|_| StreamError::TooLong)?;
        let last = seq.wrapping_add(len);
        if seq_before(self.acked, acked) {
            self.acked = acked;
        }
        while let Some(r) = self.history.front() {
            if seq_before(self.acked, r.end) {
                break;
            }
            self.history_bytes -= region_bytes(r);
            self.history.pop_front();
        }
        let mut sends = Vec::new();
        // Bytes the receiver has: the sender missed the acknowledgment.
        let oldest = self.history.front().map_or(self.accounted, |r| r.start);
        if seq_before(seq, oldest) {
            sends.push(Send::Ack { ack: self.acked });
        }
        // Bytes sent again: answered as they were the first time.
        for r in &self.history {
            if !(seq_before(seq, r.end) && seq_before(r.start, last)) {
                continue;
            }
            match &r.sent {
                // Bytes the datapath forwarded, which this side never saw:
                // only whole lines it forwarded, at exactly their place,
                // that are still lines it would forward, go on. Whatever a
                // receiver puts together of them and of what it got the
                // first time is then whole plain lines; bytes at other
                // boundaries could spell a command the filter never read.
                Sent::Kept(offset) => {
                    let mut answered = false;
                    for m in forwarded {
                        let end = m.seq.wrapping_add(m.len);
                        let inside =
                            |lo: u32, hi: u32| !seq_before(m.seq, lo) && !seq_before(hi, end);
                        if m.len == 0 || !inside(r.start, r.end) || !inside(seq, last) {
                            continue;
                        }
                        let line =
                            &data[m.seq.wrapping_sub(seq) as usize..end.wrapping_sub(seq) as usize];
                        if filter.plain(line) {
                            push_data(&mut sends, m.seq.wrapping_add(*offset as u32), line, mss);
                            answered = true;
                        }
                    }
                    if !answered {
                        // Nothing to send: an empty segment at those bytes
                        // makes the receiver acknowledge what it has (RFC
                        // 9293 3.10.7.4), through the datapath to the
                        // sender, who may have missed it.
                        let lo = if seq_before(seq, r.start) {
                            r.start
                        } else {
                            seq
                        };
                        sends.push(Send::Data {
                            seq: lo.wrapping_add(*offset as u32),
                            bytes: Vec::new(),
                        });
                    }
                }
                Sent::Rewritten { at, out } if !out.is_empty() => {
                    push_data(&mut sends, *at, out, mss)
                }
                Sent::Rewritten { .. } => {
                    if !seq_before(self.acked, r.start) {
                        sends.push(Send::Ack { ack: r.end });
                    }
                }
            }
        }
        let nothing_new = !seq_before(self.next, last);
        // New bytes, if the segment reaches the next expected one.
        if !seq_before(self.next, seq) && seq_before(self.next, last) {
            let mut out = Vec::new();
            filter.feed(&data[self.next.wrapping_sub(seq) as usize..], &mut out);
            self.next = last;
            let held = u32::try_from(filter.held()).map_err(|_| StreamError::TooLong)?;
            let boundary = last.wrapping_sub(held);
            let start = self.accounted;
            if seq_before(start, boundary) {
                let at = start.wrapping_add(self.adjust.after as u32);
                let out_len = u32::try_from(out.len()).map_err(|_| StreamError::TooLong)?;
                self.adjust.rewrite(start, boundary, out_len)?;
                if !out.is_empty() {
                    push_data(&mut sends, at, &out, mss);
                } else if !seq_before(self.acked, start) {
                    // Nothing before it is missing and nothing of it will
                    // come: done with as far as the receiver goes.
                    sends.push(Send::Ack { ack: boundary });
                    self.acked = boundary;
                }
                self.accounted = boundary;
                self.remember(Region {
                    start,
                    end: boundary,
                    sent: Sent::Rewritten { at, out },
                });
            }
        }
        // The start of a line the filter holds, sent again with nothing
        // new: its sender waits for their acknowledgment before it sends
        // the rest (Nagle's algorithm does, after a small segment). With
        // nothing before them missing at the receiver they are
        // acknowledged: the filter has them, and writes them out with the
        // rest of the line.
        if nothing_new
            && seq_before(self.accounted, self.next)
            && !seq_before(seq, self.accounted)
            && !seq_before(self.acked, self.accounted)
        {
            sends.push(Send::Ack { ack: self.next });
        }
        if self.history_bytes > HISTORY_MAX {
            return Err(StreamError::Unacknowledged);
        }
        Ok(sends)
    }

    fn remember(&mut self, r: Region) {
        self.history_bytes += region_bytes(&r);
        self.history.push_back(r);
    }
}

/// What a region costs to remember (a kept one: its bookkeeping only).
fn region_bytes(r: &Region) -> usize {
    64 + match &r.sent {
        Sent::Kept(_) => 0,
        Sent::Rewritten { out, .. } => out.len(),
    }
}

fn push_data(sends: &mut Vec<Send>, seq: u32, bytes: &[u8], mss: usize) {
    let mut at = seq;
    for chunk in bytes.chunks(mss) {
        sends.push(Send::Data {
            seq: at,
            bytes: chunk.to_vec(),
        });
        at = at.wrapping_add(chunk.len() as u32);
    }
}

#[cfg(test)]
mod tests;
