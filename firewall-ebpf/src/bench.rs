//! Two tiny programs for `cargo xtask bench`, never attached by the daemon:
//! a packet generator for BPF_PROG_RUN's live-frames mode (as xdp-trafficgen
//! does: the frame given to the run is transmitted, again and again), and a
//! receiver that counts and drops, so that receive-side costs common to every
//! setup measured do not dilute the comparison.

use aya_ebpf::{
    bindings::xdp_action, btf_maps::PerCpuArray, macros::btf_map, macros::xdp, programs::XdpContext,
};
use firewall_common::stats::StatValue;

/// Packets and bytes the sink dropped, per CPU.
#[btf_map]
static BENCH_SINK: PerCpuArray<StatValue, 1> = PerCpuArray::new();

#[xdp]
pub fn xdp_bench_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

#[xdp]
pub fn xdp_bench_sink(ctx: XdpContext) -> u32 {
    if let Some(v) = BENCH_SINK.get_ptr_mut(0) {
        unsafe {
            (*v).packets += 1;
            (*v).bytes += (ctx.data_end() - ctx.data()) as u64;
        }
    }
    xdp_action::XDP_DROP
}
