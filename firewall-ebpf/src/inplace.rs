//! FTP control connections forwarded in place (`firewall_common::inplace`):
//! a segment of such a connection, already translated, is forwarded with
//! its sequence and acknowledgment numbers shifted while it is a plain line
//! at its direction's next byte, and otherwise handed to the daemon through
//! `INPLACE_SEGMENTS` (the packet dropped; the daemon sends what the filter
//! makes of it).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{HashMap, ProgramArray, RingBuf},
    macros::btf_map,
};
use firewall_common::{
    csum::Wsum,
    flow::{FlowAction, FlowKey, FlowValue},
    frag::Fragment,
    ftp_lines::{plain, KERNEL_LINE_MAX},
    inplace::{
        InPlaceAdjust, InPlaceDir, InPlaceSegment, InPlaceState, LineMark, Offer, SegmentHead,
        DIR_COMMANDS, DIR_REPLIES, LINE_MARKS, SEGMENT_DATA_MAX, TCP_HEADER_MAX,
    },
    intercept::InterceptKey,
    map_sizes,
    seqadj::{seq_before, SeqAdjust, Span},
    stats::Counter,
    IPPROTO_TCP,
};

use crate::{
    flow,
    hook::Hook,
    parse::{self, Packet},
    pipeline::{send_on, Outcome},
    scratch::{self, Scratch},
    stats,
};

/// What `decide` leaves for `apply` (in the per-CPU scratch space).
#[repr(C)]
pub struct Renumber {
    /// 1: there is something to write.
    pub changed: u32,
    /// Bytes of options to write back from `header` (0: none).
    pub options_len: u32,
    /// The checksum's difference (`Wsum`).
    pub diff: u32,
    pub _pad: u32,
    /// The TCP header as it is to leave: its sequence and acknowledgment
    /// numbers (bytes 4..12) are always written back.
    pub header: [u8; TCP_HEADER_MAX],
}

/// Destination ports whose new outbound connections are forwarded in place.
#[btf_map]
static INPLACE_PORTS: HashMap<InterceptKey, u32, { map_sizes::INTERCEPT as usize }> =
    HashMap::new();

/// Each connection's state, by the client's key (the datapath writes it).
/// Not an LRU: one would evict live connections' entries (the kernel's LRU
/// lists are per CPU and may run dry while others hold free nodes); the
/// sweeper deletes them with the connection's flows.
#[btf_map]
static INPLACE: HashMap<
    FlowKey,
    InPlaceState,
    { map_sizes::INPLACE as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Each connection's translation and offers (the daemon writes them, whole;
/// the datapath makes the first, with nothing rewritten, with the state).
#[btf_map]
static INPLACE_ADJUST: HashMap<
    FlowKey,
    InPlaceAdjust,
    { map_sizes::INPLACE as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// `xdp_inplace` and `tc_inplace`, each in slot 0 of its own array (a
/// program array serves programs of one type), filled by the daemon.
#[btf_map]
pub static INPLACE_PROGS_XDP: ProgramArray<1> = ProgramArray::new();
#[btf_map]
pub static INPLACE_PROGS_TC: ProgramArray<1> = ProgramArray::new();

/// Segments for the daemon.
#[btf_map]
static INPLACE_SEGMENTS: RingBuf<InPlaceSegment, { 1024 * 1024 }> = RingBuf::new();

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_OPT_SACK_PERMITTED: u8 = 4;
const TCP_FLAG_ACK: u8 = 0x10;

/// The packet again from the start, in the program of its own: its flow
/// says `InPlace` (the pipeline found it so).
#[inline(always)]
pub fn process<H: Hook>(ctx: &H) -> Outcome {
    ctx.prepare();
    let Ok(pkt) = parse::parse_range(ctx.data(), ctx.data_end(), ctx.len() as usize) else {
        return Counter::DropMalformed.into();
    };
    let Some(flow_ptr) = flow::lookup(&pkt.key) else {
        return Counter::DropInPlaceState.into();
    };
    // SAFETY: a FLOWS entry found for this packet.
    if unsafe { (*flow_ptr).action } != FlowAction::InPlace as u32 {
        return Counter::DropFlowAction.into();
    }
    match decide(ctx, &pkt, flow_ptr) {
        Counter::Redirected => {}
        c => return c.into(),
    }
    send_on::<H, true>(ctx, &pkt, flow_ptr, Counter::Redirected)
}

/// Whether a new outbound connection (its SYN) is to be forwarded in place.
#[inline(always)]
fn wanted(pkt: &Packet) -> bool {
    let k = &pkt.key;
    // SAFETY: a presence check; nothing is read.
    k.protocol == IPPROTO_TCP
        && unsafe { INPLACE_PORTS.get(InterceptKey::new(IPPROTO_TCP, k.dst_port)) }.is_some()
}

/// A connection's first values, built in scratch space (the wall's stack
/// has no room for them).
#[repr(C)]
pub struct Start {
    pub state: InPlaceState,
    pub adjust: InPlaceAdjust,
    /// The reply entry's key, and a byte of the SYN's header.
    pub reply: FlowKey,
    pub byte: [u8; 8],
}

/// For a new outbound connection whose reply entry is in `FLOWS` and whose
/// forward entry `v` is about to be: if it is to be read in place, its state
/// made and both entries marked `InPlace`. `Redirected` to go on, else the
/// counter that drops its SYN. (Called after the port search: what the
/// verifier follows twice from here on is the last insert only.)
#[inline(always)]
// By reference: copies of the keys would take stack room there is not.
#[allow(clippy::needless_borrows_for_generic_args)]
pub fn mark<H: Hook>(ctx: &H, pkt: &Packet, new: &mut Start, v: &mut FlowValue) -> Counter {
    if !pkt.syn_only || !wanted(pkt) {
        return Counter::Redirected;
    }
    if let Err(c) = start(ctx, pkt, new) {
        return c;
    }
    let k = &pkt.key;
    new.reply = FlowKey::new(
        k.protocol,
        k.dst_addr,
        k.dst_port,
        v.nat_src_addr,
        v.nat_src_port,
    );
    let Some(reply) = flow::lookup(&new.reply) else {
        // The SYN goes no further: nothing may be left of it.
        let _ = INPLACE.remove(&pkt.key);
        let _ = INPLACE_ADJUST.remove(&pkt.key);
        return Counter::DropInPlaceState;
    };
    // SAFETY: the FLOWS entry the wall made a moment ago for this SYN,
    // which no packet uses yet (the SYN has not left).
    unsafe { (*reply).action = FlowAction::InPlace as u32 };
    v.action = FlowAction::InPlace as u32;
    Counter::Redirected
}

/// The connection's state, made with its flows from the client's SYN.
#[inline(always)]
#[allow(clippy::needless_borrows_for_generic_args)]
fn start<H: Hook>(ctx: &H, pkt: &Packet, new: &mut Start) -> Result<(), Counter> {
    let st = &mut new.state;
    // SAFETY: the parser bounds-checked the whole TCP header at `l4`.
    let isn = u32::from_be_bytes(unsafe { *(pkt.l4.add(4) as *const [u8; 4]) });
    // Its data offset through the helper (what the verifier knows of `l4`
    // here ends before it).
    if !ctx.load(pkt.l4_off as usize + 12, new.byte.as_mut_ptr(), 1) {
        return Err(Counter::DropMalformed);
    }
    let doff = ((new.byte[0] >> 4) as u16) << 2;
    if pkt.l4_len > doff || pkt.fragment != Fragment::Whole {
        // Data in the SYN (TCP Fast Open), or a fragment: bytes that could
        // not be judged. The client tries again without.
        return Err(Counter::DropInPlaceState);
    }
    st.dir[DIR_COMMANDS] = InPlaceDir {
        kernel: 1,
        next: isn.wrapping_add(1),
        started: 1,
        first: isn.wrapping_add(1),
        ..InPlaceDir::default()
    };
    st.dir[DIR_REPLIES] = InPlaceDir {
        kernel: 1,
        ..InPlaceDir::default()
    };
    // By reference: a copy would take stack room there is not.
    INPLACE
        .insert(pkt.key, &*st, 0)
        .map_err(|_| Counter::DropInPlaceState)?;
    // Nothing rewritten yet; the daemon replaces it. Always there, so
    // that the datapath has one way through, not two.
    new.adjust = InPlaceAdjust::default();
    INPLACE_ADJUST
        .insert(pkt.key, &new.adjust, 0)
        .map_err(|_| Counter::DropInPlaceState)
}

/// A segment of a connection forwarded in place, before its translation:
/// `Redirected` to forward it (its new numbers left in the scratch space
/// for `apply`), or the counter that ends it (handed to the daemon, or its
/// state gone). A function of its own: the many ways through it end in two
/// outcomes, from which the verifier goes on once each.
#[inline(never)]
pub fn decide<H: Hook>(ctx: &H, pkt: &Packet, flow_ptr: *mut FlowValue) -> Counter {
    match decide_inner(ctx, pkt, flow_ptr) {
        Ok(()) => Counter::Redirected,
        Err(c) => c,
    }
}

#[inline(always)]
// By reference: copies of the keys would take stack room there is not.
#[allow(clippy::needless_borrows_for_generic_args)]
fn decide_inner<H: Hook>(ctx: &H, pkt: &Packet, flow_ptr: *mut FlowValue) -> Result<(), Counter> {
    // SAFETY: a FLOWS entry found for this packet.
    let flow = unsafe { &*flow_ptr };
    let key = &pkt.key;
    if key.protocol != IPPROTO_TCP {
        return Err(Counter::DropInPlaceState);
    }
    if pkt.fragment != Fragment::Whole {
        // Its bytes cannot all be judged here (later fragments carry the
        // rest of the segment): never forwarded, and its later fragments,
        // whose first was not, are dropped with it (`drop_fragment`).
        return Err(Counter::DropFragment);
    }
    let sc = scratch::get().ok_or(Counter::DropInPlaceState)?;
    sc.renumber.changed = 0;
    // The commands arrive under the client's key; the replies under the
    // server's, whose translation names the client.
    let reply = FlowKey::new(
        IPPROTO_TCP,
        flow.nat_dst_addr,
        flow.nat_dst_port,
        flow.nat_src_addr,
        flow.nat_src_port,
    );
    let (st, dir, client) = match INPLACE.get_ptr_mut(key) {
        Some(st) => (st, DIR_COMMANDS, *key),
        None => match INPLACE.get_ptr_mut(&reply) {
            Some(st) => (st, DIR_REPLIES, reply),
            None => return Err(Counter::DropInPlaceState),
        },
    };
    let off = pkt.l4_off as usize;
    // Through the helper (a callee cannot rely on the parser's bounds),
    // into scratch space (the stack has no room).
    let h = &mut sc.renumber.header;
    if !ctx.load(off, h.as_mut_ptr(), 20) {
        return Err(Counter::DropMalformed);
    }
    let seq = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    let ack = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    let (doff, flags) = (((h[12] >> 4) as usize) << 2, h[13]);
    let l4_len = pkt.l4_len as usize;
    if doff < 20 || doff > l4_len {
        return Err(Counter::DropMalformed);
    }
    let payload = (l4_len - doff) as u32;
    // Judged here, before the ways through this function part: the
    // verifier then follows the classifier from a few states, not from
    // every one that reaches the decision.
    let plain = is_plain(ctx, &mut sc.line, off + doff, payload, dir);
    // SAFETY: an entry of a map the datapath alone writes, found above;
    // directions are written by the CPU that forwards them, and a race
    // between two CPUs on one connection's direction at worst diverts a
    // segment the kernel could have forwarded.
    let st = unsafe { &mut *st };
    if flags & TCP_FLAG_SYN != 0 {
        if dir == DIR_REPLIES {
            let d = &mut st.dir[DIR_REPLIES];
            if d.started == 0 {
                d.next = seq.wrapping_add(1);
                d.first = d.next;
                d.started = 1;
            }
            // Without SACK-permitted in the SYN-ACK neither end sends SACK
            // blocks, whose edges would need taking back like the
            // acknowledgment (RFC 2018).
            strip_sack_permitted(ctx, &mut sc.renumber, off, doff as u32);
        } else if flags & TCP_FLAG_ACK == 0 && st.dir[DIR_COMMANDS].first != seq.wrapping_add(1) {
            // A new connection on the flows of one that ended (the client
            // reused its port while they wait out their closing time): its
            // state and translation start afresh.
            restart(&raw mut *st, seq, &client);
        }
        return Ok(());
    }
    // SAFETY: a value the daemon only replaces whole, in a map that frees
    // replaced values only after every reader is done.
    let Some(a) = (unsafe { INPLACE_ADJUST.get(&client) }) else {
        return Err(Counter::DropInPlaceState);
    };
    // The parts below are functions of their own: the verifier follows each
    // one's ways through once, not every combination of them.
    let new_seq = if payload > 0 {
        sc.head = SegmentHead {
            client,
            dir: dir as u32,
            diverted: 0,
            acked: 0,
            acked_set: 0,
            src_addr: flow.nat_src_addr,
            dst_addr: flow.nat_dst_addr,
            src_port: flow.nat_src_port,
            dst_port: flow.nat_dst_port,
            tcp_len: doff as u16,
            data_len: payload.min(SEGMENT_DATA_MAX as u32) as u16,
            payload_len: payload as u16,
            _pad: 0,
            conn: st.dir[DIR_COMMANDS].first,
        };
        sc.seq = seq;
        sc.plain = plain as u32;
        let sc_ptr: *mut Scratch = sc;
        let out = data_seq(&raw mut st.dir[dir], &a.offer[dir], &a.adjust[dir], sc_ptr);
        if out > u32::MAX as u64 {
            // Here, not in `data_seq`: one call deep less (the stack).
            divert(ctx, &sc.head, off);
            return Err(Counter::DropFtpDiverted);
        }
        out as u32
    } else {
        bare_seq(&a.adjust[dir], seq)
    };
    let new_ack = if flags & TCP_FLAG_ACK != 0 {
        take_back_ack(&raw mut st.dir[1 - dir], &a.adjust[1 - dir], ack)
    } else {
        ack
    };
    if new_seq == seq && new_ack == ack {
        return Ok(());
    }
    let r = &mut sc.renumber;
    r.changed = 1;
    r.options_len = 0;
    r.header[4..8].copy_from_slice(&new_seq.to_be_bytes());
    r.header[8..12].copy_from_slice(&new_ack.to_be_bytes());
    r.diff = Wsum::default()
        .replace4(seq.to_be_bytes(), new_seq.to_be_bytes())
        .replace4(ack.to_be_bytes(), new_ack.to_be_bytes())
        .0;
    Ok(())
}

/// After the translation: the new numbers `decide` left, written, and the
/// checksum fixed.
#[inline(always)]
pub fn apply<H: Hook>(ctx: &H, l4_off: u16) -> Result<(), Counter> {
    let sc = scratch::get().ok_or(Counter::DropInPlaceState)?;
    let r = &sc.renumber;
    if r.changed == 0 {
        return Ok(());
    }
    let off = l4_off as usize;
    if !ctx.store(off + 4, r.header[4..].as_ptr(), 8) {
        return Err(Counter::DropMalformed);
    }
    let n = bounded(r.options_len, 40);
    if n > 0 && !ctx.store(off + 20, r.header[20..].as_ptr(), n) {
        return Err(Counter::DropMalformed);
    }
    ctx.l4_csum_diff(off + 16, Wsum(r.diff))
}

/// A segment with payload (its head and numbers in `sc`): its new sequence
/// number if the kernel forwards it, or above `u32::MAX` if it goes to the
/// daemon (the direction with it; the head completed).
#[inline(never)]
fn data_seq(d: *mut InPlaceDir, offer: &Offer, own: &SeqAdjust, sc: *mut Scratch) -> u64 {
    // SAFETY: the connection's direction and this CPU's scratch space, which
    // the caller does not touch until this returns.
    let (d, sc) = unsafe { (&mut *d, &mut *sc) };
    let (seq, payload) = (sc.seq, sc.head.payload_len as u32);
    if d.kernel == 0 && offer.valid == 1 && offer.diverted == d.diverted {
        d.kernel = 1;
        d.next = offer.next;
    }
    let span = if own.is_identity() {
        Span::After
    } else {
        own.span(seq, payload)
    };
    // Only new bytes, in order: a segment sent again may carry other bytes
    // than the first time, which a receiver that missed the first (a bad
    // checksum is enough) would take unjudged; the daemon, which knows what
    // was sent, answers it.
    let forwarded =
        d.kernel == 1 && d.started == 1 && span != Span::Rewriter && seq == d.next && sc.plain == 1;
    if !forwarded {
        d.kernel = 0;
        d.diverted = d.diverted.wrapping_add(1);
        sc.head.diverted = d.diverted;
        sc.head.acked = d.acked;
        sc.head.acked_set = d.acked_set;
        return u64::MAX;
    }
    d.next = seq.wrapping_add(payload);
    // Where the line lay, for the daemon to answer it sent again.
    if let Some(m) = d.lines.get_mut(d.marks as usize % LINE_MARKS) {
        *m = LineMark { seq, len: payload };
    }
    d.marks = d.marks.wrapping_add(1);
    own.seq_out(seq, span) as u64
}

/// The state of a connection opened anew on the same flows by the client's
/// SYN `seq`, and its translation back to nothing rewritten. (Field by
/// field: a whole `InPlaceDir` would take stack room there is not.)
#[inline(never)]
fn restart(st: *mut InPlaceState, seq: u32, client: &FlowKey) {
    // SAFETY: the connection's entry in INPLACE (see `decide`).
    let st = unsafe { &mut *st };
    for (i, d) in st.dir.iter_mut().enumerate() {
        let commands = i == DIR_COMMANDS;
        d.kernel = 1;
        d.next = if commands { seq.wrapping_add(1) } else { 0 };
        d.diverted = 0;
        d.acked = 0;
        d.acked_set = 0;
        d.started = commands as u32;
        d.marks = 0;
        d.first = d.next;
        for m in d.lines.iter_mut() {
            m.len = 0;
        }
    }
    if let Some(a) = INPLACE_ADJUST.get_ptr_mut(client) {
        // SAFETY: the connection's entry; the daemon replaces it whole, and
        // has nothing to say of a connection that has just begun.
        unsafe { *a = InPlaceAdjust::default() };
    }
}

/// A segment without payload: its new sequence number (a function of its
/// own, for the verifier).
#[inline(never)]
fn bare_seq(own: &SeqAdjust, seq: u32) -> u32 {
    own.seq_out_bare(seq)
}

/// An acknowledgment of the other direction's bytes, taken back by its
/// translation; the highest taken back exactly is recorded in `o`.
#[inline(never)]
fn take_back_ack(o: *mut InPlaceDir, other: &SeqAdjust, ack: u32) -> u32 {
    let identity = other.is_identity();
    let back = if identity { ack } else { other.ack_in(ack) };
    if identity || other.ack_trusted(ack) {
        // SAFETY: the connection's other direction (see `decide`).
        let o = unsafe { &mut *o };
        if o.acked_set == 0 || seq_before(o.acked, back) {
            o.acked = back;
            o.acked_set = 1;
        }
    }
    back
}

/// Turns a SACK-permitted option in the segment's TCP options into two NOPs,
/// for `apply` to write (`r`: the header, how many option bytes, the
/// checksum's difference). A function of its own, as `is_plain`; its loop
/// steps over at most 20 options.
#[inline(never)]
fn strip_sack_permitted<H: Hook>(ctx: &H, r: &mut Renumber, off: usize, doff: u32) {
    let whole = bounded(doff, TCP_HEADER_MAX as u32);
    if whole <= 20 || !ctx.load(off, r.header.as_mut_ptr(), whole) {
        return;
    }
    let doff = whole as usize;
    let mut at = 20;
    for _ in 0..20 {
        if at + 1 >= doff {
            return;
        }
        let (Some(&kind), Some(&len)) = (r.header.get(at), r.header.get(at + 1)) else {
            return;
        };
        if kind == 0 {
            return;
        }
        if kind == 1 {
            at += 1;
            continue;
        }
        if kind == TCP_OPT_SACK_PERMITTED {
            break;
        }
        if len < 2 {
            return;
        }
        at += len as usize;
    }
    let Some(option) = r.header.get_mut(at..at + 2) else {
        return;
    };
    if option[0] != TCP_OPT_SACK_PERMITTED {
        return;
    }
    option.fill(1);
    // (4, 2) became (1, 1); at an odd offset the two bytes straddle two
    // 16-bit words of the checksum, each in the other half.
    let (old, new) = if at % 2 == 0 {
        ([TCP_OPT_SACK_PERMITTED, 2], [1, 1])
    } else {
        ([2, TCP_OPT_SACK_PERMITTED], [1, 1])
    };
    r.changed = 1;
    r.options_len = whole - 20;
    r.diff = Wsum::default().replace2(old, new).0;
}

/// `n` if at most `max`, else 0, checked where the verifier sees it: read
/// back through memory, so that the compiler cannot drop the check for
/// one it made before on the same value.
#[inline(always)]
fn bounded(n: u32, max: u32) -> u32 {
    // SAFETY: a read of a local.
    let n = unsafe { core::ptr::read_volatile(&n) };
    if n > max {
        0
    } else {
        n
    }
}

/// Whether the payload is exactly one line the filter would pass as it is.
/// A function of its own: its loop ends after any number of bytes, and
/// only the answer goes back, so the verifier goes on from one state, not
/// from one per length.
#[inline(never)]
fn is_plain<H: Hook>(
    ctx: &H,
    buf: &mut [u8; KERNEL_LINE_MAX],
    at: usize,
    len: u32,
    dir: usize,
) -> bool {
    if len == 0 || len as usize > KERNEL_LINE_MAX {
        return false;
    }
    let n = bounded(len, KERNEL_LINE_MAX as u32);
    if n == 0 || !ctx.load(at, buf.as_mut_ptr(), n) {
        return false;
    }
    match buf.get(..len as usize) {
        Some(seg) => plain(dir as u32, seg),
        None => false,
    }
}

/// The segment into the daemon's ring (or, with no room, nowhere: the
/// sender sends it again). A function of its own: its loads' outcomes
/// stay here.
#[inline(never)]
fn divert<H: Hook>(ctx: &H, head: &SegmentHead, off: usize) {
    let Some(mut e) = INPLACE_SEGMENTS.reserve(0) else {
        stats::count_event_lost();
        return;
    };
    let p = e.as_mut_ptr();
    // SAFETY: `p` is the reserved record, writable until submitted; the
    // loads write at most the sizes of the arrays they fill (`bounded`).
    let ok = unsafe {
        (*p).head = *head;
        let hdr_len = bounded(head.tcp_len as u32, TCP_HEADER_MAX as u32);
        hdr_len >= 20 && ctx.load(off, (&raw mut (*p).tcp).cast(), hdr_len) && {
            let n = bounded(head.data_len as u32, SEGMENT_DATA_MAX as u32);
            n == 0 || ctx.load(off + hdr_len as usize, (&raw mut (*p).data).cast(), n)
        }
    };
    if ok {
        e.submit(0);
    } else {
        e.discard(0);
    }
}
