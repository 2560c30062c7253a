//! Route lookup in the kernel FIB and the redirect out of the egress interface.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE,
    },
    helpers::generated::bpf_fib_lookup,
};
use firewall_common::{
    flow::{FlowValue, HOP_RECHECK},
    stats::Counter,
};

use crate::{hook::Hook, parse::Packet};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Where a translated packet leaves.
#[repr(C)]
pub struct NextHop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// The flow's cached next hop, if the FIB confirmed it recently and for
/// packets `l3_len` bytes long.
#[inline(always)]
pub fn cached(flow: &FlowValue, l3_len: u16, now_units: u32) -> Option<NextHop> {
    let checked = flow.hop_checked;
    if checked == 0 || now_units.wrapping_sub(checked) > HOP_RECHECK || l3_len > flow.hop_len_ok {
        return None;
    }
    Some(NextHop {
        ifindex: flow.hop_ifindex,
        smac: flow.hop_smac,
        dmac: flow.hop_dmac,
    })
}

/// Caches what the FIB said for this flow (all CPUs share the entry; they
/// write the same values, the timestamp last).
#[inline(always)]
pub fn remember(flow: *mut FlowValue, pkt: &Packet, hop: &NextHop, now_units: u32) {
    // SAFETY: `flow` points into a FLOWS entry found or created for this packet; map values
    // stay valid for the program's run, and racing writers write the same values.
    unsafe {
        let f = &mut *flow;
        let len = l3_len(pkt);
        // A new next hop starts its MTU knowledge afresh; the same one only
        // learns that longer packets fit.
        let new_hop = f.hop_checked == 0 || f.hop_ifindex != hop.ifindex || f.hop_dmac != hop.dmac;
        if new_hop || len > f.hop_len_ok {
            f.hop_len_ok = len;
        }
        f.hop_ifindex = hop.ifindex;
        f.hop_dmac = hop.dmac;
        f.hop_smac = hop.smac;
        // 0 means "never": a clock reading of exactly 0 counts as 1.
        f.hop_checked = now_units.max(1);
    }
}

/// IPv4 total length of the packet.
#[inline(always)]
pub fn l3_len(pkt: &Packet) -> u16 {
    pkt.l4_len + (pkt.l4_off - pkt.l3_off)
}

/// Asks the kernel FIB for the route of a packet from `src` to `dst` that
/// arrived on the hook's ingress interface (`tot_len` for its MTU check).
#[inline(always)]
pub fn route<H: Hook>(
    ctx: &H,
    protocol: u8,
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    tot_len: u16,
) -> (u32, FibParams) {
    // SAFETY: bpf_fib_lookup params are plain integers; all-zero is valid.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    let rc = route_in(ctx, &mut p, protocol, src, dst, tot_len);
    (rc, p)
}

/// `route` with the parameters (and the answer) in `p`, which may live in a
/// map (stack space is scarce where it is called).
#[inline(always)]
pub fn route_in<H: Hook>(
    ctx: &H,
    p: &mut FibParams,
    protocol: u8,
    (src, sport): ([u8; 4], u16),
    (dst, dport): ([u8; 4], u16),
    tot_len: u16,
) -> u32 {
    // SAFETY: bpf_fib_lookup params are plain integers; all-zero is valid.
    *p = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = protocol;
    p.sport = sport.to_be();
    p.dport = dport.to_be();
    p.__bindgen_anon_1.tot_len = tot_len;
    p.ifindex = ctx.ingress_ifindex();
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: the helper reads and writes only `p`, which outlives the call.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr() as *mut _, p, size_of::<FibParams>() as i32, 0) };
    rc as u32
}

/// Whether the stack would forward a packet the FIB answered `rc` for,
/// rather than deliver it locally (or as broadcast/multicast), drop it or
/// answer it itself (forwarding off, blackhole, unreachable, prohibit).
#[inline(always)]
pub const fn forwards(rc: u32) -> bool {
    !matches!(
        rc,
        BPF_FIB_LKUP_RET_NOT_FWDED
            | BPF_FIB_LKUP_RET_FWD_DISABLED
            | BPF_FIB_LKUP_RET_BLACKHOLE
            | BPF_FIB_LKUP_RET_UNREACHABLE
            | BPF_FIB_LKUP_RET_PROHIBIT
    )
}

/// `route` for an IPv6 packet (no ports, no MTU check): only whether and
/// where the stack would forward it.
#[inline(always)]
pub fn route_v6<H: Hook>(
    ctx: &H,
    p: &mut FibParams,
    next_header: u8,
    src: *const [u8; 16],
    dst: *const [u8; 16],
) -> u32 {
    // SAFETY: bpf_fib_lookup params are plain integers; all-zero is valid.
    *p = unsafe { core::mem::zeroed() };
    p.family = AF_INET6;
    p.l4_protocol = next_header;
    p.ifindex = ctx.ingress_ifindex();
    // SAFETY: `src` and `dst` point at bounds-checked addresses in the
    // packet; the copies are byte-wise (no alignment assumed).
    unsafe {
        core::ptr::copy_nonoverlapping(
            src as *const u8,
            (&raw mut p.__bindgen_anon_3.ipv6_src) as *mut u8,
            16,
        );
        core::ptr::copy_nonoverlapping(
            dst as *const u8,
            (&raw mut p.__bindgen_anon_4.ipv6_dst) as *mut u8,
            16,
        );
    }
    // SAFETY: the helper reads and writes only `p`, which outlives the call.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr() as *mut _, p, size_of::<FibParams>() as i32, 0) };
    rc as u32
}

/// Looks up the route of the packet as it will be after translation.
#[inline(always)]
pub fn lookup<H: Hook>(ctx: &H, pkt: &Packet, flow: &FlowValue) -> Result<NextHop, Counter> {
    next_hop(
        ctx,
        pkt.key.protocol,
        (flow.nat_src_addr, flow.nat_src_port),
        (flow.nat_dst_addr, flow.nat_dst_port),
        l3_len(pkt),
        pkt.dont_fragment,
    )
}

/// The next hop of a packet from `src` to `dst`, `l3_len` bytes long, or
/// the counter that says why there is none.
#[inline(always)]
pub fn next_hop<H: Hook>(
    ctx: &H,
    protocol: u8,
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    l3_len: u16,
    dont_fragment: bool,
) -> Result<NextHop, Counter> {
    let p = &mut crate::scratch::get().ok_or(Counter::DropNotForwarded)?.fib;
    let rc = route_in(ctx, p, protocol, src, dst, ctx.fib_tot_len(l3_len));
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(NextHop {
            ifindex: p.ifindex,
            smac: p.smac,
            dmac: p.dmac,
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            // The lookup left the egress interface and the next hop in `p`.
            crate::events::need_neighbour(
                p.ifindex,
                // SAFETY: a union of plain integers; the helper filled the IPv4 member.
                unsafe { p.__bindgen_anon_4.ipv4_dst }.to_ne_bytes(),
            );
            Err(Counter::DropNoNeighbour)
        }
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            Err(Counter::DropNoRoute)
        }
        // With DF the stack, forwarding the original packet, answers with ICMP
        // "fragmentation needed" so path MTU discovery keeps working.
        BPF_FIB_LKUP_RET_FRAG_NEEDED if dont_fragment => Err(Counter::PassFragNeeded),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(Counter::DropFragNeeded),
        _ => Err(Counter::DropNotForwarded),
    }
}
