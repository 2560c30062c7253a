//! FTP control connections forwarded in place (not terminated): the
//! connection is a primary connection whose flows say `FlowAction::InPlace`;
//! the datapath forwards a segment itself while it is a plain line at the
//! direction's next byte (`ftp_lines::plain`), shifting sequence and
//! acknowledgment numbers by the directions' `SeqAdjust`, and hands anything
//! else to the daemon through the `INPLACE_SEGMENTS` ring (the packet itself
//! dropped), with the direction, until the daemon offers it back.
//!
//! Each map has one writer:
//! - `INPLACE` (`InPlaceState`, keyed by the client's `FlowKey`): the
//!   datapath, which creates it with the connection's flows;
//! - `INPLACE_ADJUST` (`InPlaceAdjust`, same key): the daemon, replacing
//!   the value whole (a hash map without preallocation, so a reader keeps
//!   the value it found). The datapath reads it, and makes the first one
//!   (nothing rewritten) with the state.
//!
//! The hand-back: the daemon offers a direction back at the sender's byte
//! `next` for the count of segments it received (`Offer::diverted`); the
//! datapath takes it only while its own count is still that (a segment
//! diverted since makes it larger), as the stream verdict's hand-back does.

use crate::{flow::FlowKey, seqadj::SeqAdjust};

/// `InPlaceState::dir` and `InPlaceAdjust::adjust`: the client's commands.
pub const DIR_COMMANDS: usize = 0;
/// The server's replies.
pub const DIR_REPLIES: usize = 1;

/// Payload bytes of a diverted segment the ring carries at most (the rest of
/// a longer one, which only a coalesced skb at TC can be, is left for the
/// sender to send again).
pub const SEGMENT_DATA_MAX: usize = 2048;

/// Longest TCP header (with options).
pub const TCP_HEADER_MAX: usize = 60;

/// One direction, as the datapath keeps it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InPlaceDir {
    /// 1 while the datapath forwards the direction's plain lines.
    pub kernel: u32,
    /// The sender's next byte the datapath expects (while `kernel`).
    pub next: u32,
    /// Segments handed to the daemon, in all.
    pub diverted: u32,
    /// The highest acknowledgment of the direction's bytes the datapath took
    /// back exactly (the sender's numbers; `SeqAdjust::ack_trusted`), valid
    /// once `acked_set` is 1.
    pub acked: u32,
    pub acked_set: u32,
    /// 1 once `next` is known: the commands' from the client's SYN, the
    /// replies' from the server's SYN-ACK.
    pub started: u32,
    /// Lines the datapath forwarded, in all; the last `LINE_MARKS` of them
    /// are in `lines` (the `marks % LINE_MARKS`th slot is the next to take).
    pub marks: u32,
    /// The direction's first byte once `started` (its sender's initial
    /// sequence number plus one): the commands' names the connection, which
    /// a new one reusing the flows (the client's port) changes.
    pub first: u32,
    pub lines: [LineMark; LINE_MARKS],
}

/// Lines forwarded by the datapath each direction remembers: the daemon
/// answers a sender that sends one of them again with its bytes at exactly
/// its place (see `stream_rewrite`), and sends on nothing else it cannot
/// compare with what went out.
pub const LINE_MARKS: usize = 8;

/// Where a line the datapath forwarded lies (the sender's numbers).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LineMark {
    pub seq: u32,
    pub len: u32,
}

/// Value of `INPLACE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InPlaceState {
    pub dir: [InPlaceDir; 2],
}

/// The daemon's offer to give a direction back to the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Offer {
    /// 1: an offer stands.
    pub valid: u32,
    /// The sender's byte from which the datapath forwards again.
    pub next: u32,
    /// The datapath's `diverted` the offer is for.
    pub diverted: u32,
    pub _pad: u32,
}

/// Value of `INPLACE_ADJUST`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InPlaceAdjust {
    pub adjust: [SeqAdjust; 2],
    pub offer: [Offer; 2],
}

/// What a segment handed to the daemon says besides its bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SegmentHead {
    /// The connection: the client's key, as `INPLACE`'s.
    pub client: FlowKey,
    /// `DIR_COMMANDS` or `DIR_REPLIES`.
    pub dir: u32,
    /// The direction's `diverted`, this segment counted.
    pub diverted: u32,
    /// The direction's `acked` and `acked_set` when it was diverted.
    pub acked: u32,
    pub acked_set: u32,
    /// The addresses and ports as the flow translates them (ports in host
    /// order); `tcp` has the ports as they came.
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    /// Bytes of `tcp` (the TCP header with its options; sequence and
    /// acknowledgment numbers as the sender sent them).
    pub tcp_len: u16,
    /// Bytes of `data`, and of the segment's payload in all.
    pub data_len: u16,
    pub payload_len: u16,
    pub _pad: u16,
    /// The connection's `first` of the commands when it was handed over:
    /// a segment of an earlier connection on the same flows has another.
    pub conn: u32,
}

/// A record of `INPLACE_SEGMENTS`: a segment handed to the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct InPlaceSegment {
    pub head: SegmentHead,
    pub tcp: [u8; TCP_HEADER_MAX],
    pub data: [u8; SEGMENT_DATA_MAX],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields only, padding explicit.
    unsafe impl aya::Pod for super::InPlaceState {}
    unsafe impl aya::Pod for super::InPlaceAdjust {}
    unsafe impl aya::Pod for super::SegmentHead {}
    unsafe impl aya::Pod for super::InPlaceSegment {}
}

const _: () = assert!(core::mem::size_of::<InPlaceDir>() == 32 + 8 * LINE_MARKS);
const _: () = assert!(core::mem::size_of::<InPlaceState>() == 2 * (32 + 8 * LINE_MARKS));
const _: () = assert!(core::mem::size_of::<InPlaceAdjust>() == 72);
const _: () = assert!(
    core::mem::size_of::<InPlaceSegment>()
        == 16 + 16 + 8 + 4 + 12 + TCP_HEADER_MAX + SEGMENT_DATA_MAX
);
