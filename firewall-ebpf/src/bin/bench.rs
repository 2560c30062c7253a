//! The benchmark's eBPF object, apart from the datapath's so that the
//! daemon's object carries only what it attaches. Two tiny programs for
//! `cargo xtask bench`:
//! a packet generator for BPF_PROG_RUN's live-frames mode (as xdp-trafficgen
//! does: the frame given to the run is transmitted, again and again), and a
//! receiver that counts and drops, so that receive-side costs common to every
//! setup measured do not dilute the comparison. Two hash lookups that
//! differ only in their key's size, the measurement behind the flow key's
//! layout for a second address family (docs/ipv6.md). And the least a
//! forwarder at tcx ingress can do (new MACs, redirect): the bound of any
//! datapath at that hook.

#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK},
    btf_maps::{Array, HashMap, PerCpuArray},
    helpers::generated::bpf_redirect,
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use firewall_common::stats::StatValue;

/// Length of the generated frames: 64 bytes on the wire with the FCS.
const BENCH_FRAME_LEN: usize = 60;

/// Packets and bytes the sink dropped, per CPU.
#[btf_map]
static BENCH_SINK: PerCpuArray<StatValue, 1> = PerCpuArray::new();

/// The frame to send. Live-frames mode recycles its pages without resetting
/// them, and whoever forwards a frame rewrites it in place (MACs, TTL, NAT),
/// so the generator writes the frame afresh before each transmission.
#[btf_map]
static BENCH_FRAME: Array<[u8; BENCH_FRAME_LEN], 1> = Array::new();

#[xdp]
pub fn xdp_bench_tx(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + BENCH_FRAME_LEN > end {
        return xdp_action::XDP_ABORTED;
    }
    let Some(tmpl) = BENCH_FRAME.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: the frame holds BENCH_FRAME_LEN bytes (checked above), and the
    // template is a map value of that size.
    unsafe {
        core::ptr::copy_nonoverlapping(tmpl.as_ptr(), start as *mut u8, BENCH_FRAME_LEN);
    }
    xdp_action::XDP_TX
}

#[xdp]
pub fn xdp_bench_sink(ctx: XdpContext) -> u32 {
    // ARP goes on: the host must keep answering its neighbours, or the
    // firewall's entry for it fails during a long run and forwarding stops.
    let (start, end) = (ctx.data(), ctx.data_end());
    // SAFETY: the EtherType's two bytes lie within the frame (checked first).
    if start + 14 <= end && unsafe { *((start + 12) as *const [u8; 2]) } == [0x08, 0x06] {
        return xdp_action::XDP_PASS;
    }
    if let Some(v) = BENCH_SINK.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU map; nothing else writes it.
        unsafe {
            (*v).packets += 1;
            (*v).bytes += (ctx.data_end() - ctx.data()) as u64;
        }
    }
    xdp_action::XDP_DROP
}

/// Entries of the lookup measurement's tables (the default flow table's).
const LOOKUP_ENTRIES: usize = 65536;

/// Keys the size of the IPv4 flow key.
#[btf_map]
static BENCH_KEYS16: HashMap<[u8; 16], u64, LOOKUP_ENTRIES> = HashMap::new();

/// Keys the size of a flow key for either family (two 16-byte addresses,
/// ports, protocol and family).
#[btf_map]
static BENCH_KEYS40: HashMap<[u8; 40], u64, LOOKUP_ENTRIES> = HashMap::new();

/// Looks the frame's first 16 bytes up in BENCH_KEYS16: drop when found.
#[xdp]
pub fn xdp_bench_lookup16(ctx: XdpContext) -> u32 {
    lookup(&ctx, &BENCH_KEYS16)
}

/// Looks the frame's first 40 bytes up in BENCH_KEYS40: drop when found.
#[xdp]
pub fn xdp_bench_lookup40(ctx: XdpContext) -> u32 {
    lookup(&ctx, &BENCH_KEYS40)
}

#[inline(always)]
fn lookup<const N: usize>(ctx: &XdpContext, keys: &HashMap<[u8; N], u64, LOOKUP_ENTRIES>) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + N > end {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: N bytes of the frame (checked above), copied to the stack.
    let key = unsafe { *(start as *const [u8; N]) };
    // SAFETY: a presence check; nothing is read from the value.
    match unsafe { keys.get(key) } {
        Some(_) => xdp_action::XDP_DROP,
        None => xdp_action::XDP_PASS,
    }
}

/// Per ingress ifindex: the destination and source MACs to write (12
/// bytes) and the egress ifindex (4 bytes, native order).
#[btf_map]
static BENCH_FORWARD: HashMap<u32, [u8; 16], 4> = HashMap::new();

/// Forwards every IPv4 frame arriving at an interface of BENCH_FORWARD to
/// its egress with new MACs: no parsing beyond the EtherType, no lookup of
/// a flow, no translation, no TTL. What this forwards per second bounds what
/// any datapath at tcx ingress can forward on the same interfaces.
#[classifier]
pub fn tc_bench_forward(ctx: TcContext) -> i32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 14 > end {
        return TC_ACT_OK;
    }
    // SAFETY: the EtherType's two bytes lie within the frame (checked above).
    if unsafe { *((start + 12) as *const [u8; 2]) } != [0x08, 0x00] {
        return TC_ACT_OK;
    }
    // SAFETY: the skb the kernel passed; the field is readable at TC.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is copied out at once.
    let Some(cfg) = (unsafe { BENCH_FORWARD.get(ingress) }).copied() else {
        return TC_ACT_OK;
    };
    // SAFETY: 12 bytes within the frame (14 checked above), written in place.
    unsafe {
        core::ptr::copy_nonoverlapping(cfg.as_ptr(), start as *mut u8, 12);
    }
    let egress = u32::from_ne_bytes([cfg[12], cfg[13], cfg[14], cfg[15]]);
    // SAFETY: a helper taking plain values.
    unsafe { bpf_redirect(egress, 0) as i32 }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program; the verifier rejects any path to it.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
