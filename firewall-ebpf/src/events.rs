//! Events to the control plane, through the EVENTS ring buffer.

use aya_ebpf::{btf_maps::RingBuf, helpers::generated::bpf_ktime_get_coarse_ns, macros::btf_map};
use firewall_common::{
    flow::FlowKey,
    pinhole::{event_kind, DatapathEvent, PinholeKey},
};

#[btf_map]
static EVENTS: RingBuf<DatapathEvent, { 256 * 1024 }> = RingBuf::new();

/// Sends an event; when the ring is full it is lost (the control plane's
/// timers still reconcile: flows expire, pinholes count their uses). The
/// reader is not woken: it polls (a wake-up is an interrupt, most of the cost
/// of a connection's first packet).
#[inline(always)]
pub fn emit(kind: u32, owner: u64, forward: &FlowKey, reply: &FlowKey, pinhole: &PinholeKey) {
    if let Some(mut e) = EVENTS.reserve(0) {
        e.write(DatapathEvent {
            kind,
            _pad: 0,
            owner,
            forward: *forward,
            reply: *reply,
            pinhole: *pinhole,
            timestamp_ns: unsafe { bpf_ktime_get_coarse_ns() },
        });
        e.submit(aya_ebpf::bindings::BPF_RB_NO_WAKEUP as u64);
    }
}

/// Asks the control plane to resolve a next hop the FIB has no neighbour for.
#[inline(always)]
pub fn need_neighbour(ifindex: u32, next_hop: [u8; 4]) {
    let mut k = FlowKey::default();
    k.dst_addr = next_hop;
    emit(
        event_kind::NEED_NEIGHBOUR,
        ifindex as u64,
        &k,
        &FlowKey::default(),
        &PinholeKey::default(),
    );
}
