//! Events to the control plane, through the EVENTS ring buffer.

use aya_ebpf::{btf_maps::RingBuf, helpers::generated::bpf_ktime_get_coarse_ns, macros::btf_map};
use firewall_common::{
    flow::FlowKey,
    pinhole::{event_kind, DatapathEvent, PinholeKey},
};

#[btf_map]
static EVENTS: RingBuf<DatapathEvent, { 256 * 1024 }> = RingBuf::new();

/// Sends an event; when the ring is full it is lost and counted (the control
/// plane's timers still reconcile: flows expire, pinholes count their uses). The
/// reader is not woken: it polls (a wake-up is an interrupt, most of the cost
/// of a connection's first packet).
#[inline(always)]
pub fn emit(kind: u32, owner: u64, forward: &FlowKey, reply: &FlowKey, pinhole: &PinholeKey) {
    emit_detail(kind, 0, owner, forward, reply, pinhole)
}

#[inline(always)]
fn emit_detail(
    kind: u32,
    detail: u32,
    owner: u64,
    forward: &FlowKey,
    reply: &FlowKey,
    pinhole: &PinholeKey,
) {
    if let Some(mut e) = EVENTS.reserve(0) {
        // Field by field into the ring: a whole event built on the stack
        // first would take room the pipeline needs.
        let p = e.as_mut_ptr();
        // SAFETY: `p` is the reserved record, writable until submitted.
        unsafe {
            (*p).kind = kind;
            (*p).detail = detail;
            (*p).owner = owner;
            (*p).forward = *forward;
            (*p).reply = *reply;
            (*p).pinhole = *pinhole;
            (*p).timestamp_ns = bpf_ktime_get_coarse_ns();
        }
        e.submit(aya_ebpf::bindings::BPF_RB_NO_WAKEUP as u64);
    } else {
        crate::stats::count_event_lost();
    }
}

/// Asks the control plane to resolve a next hop the FIB has no neighbour for.
#[inline(always)]
pub fn need_neighbour(ifindex: u32, next_hop: [u8; 4]) {
    let k = FlowKey {
        dst_addr: next_hop,
        ..Default::default()
    };
    emit(
        event_kind::NEED_NEIGHBOUR,
        ifindex as u64,
        &k,
        &FlowKey::default(),
        &PinholeKey::default(),
    );
}

/// Tells the control plane that `bpf_redirect` refused an egress interface.
#[inline(always)]
pub fn redirect_failed(ifindex: u32) {
    emit(
        event_kind::REDIRECT_FAILED,
        ifindex as u64,
        &FlowKey::default(),
        &FlowKey::default(),
        &PinholeKey::default(),
    );
}

/// Tells the control plane that a flow saw its first FIN or RST in this
/// direction (`new` holds the `tcp_seen` bits new on it): the connection no
/// longer counts against its client's quota, and once both directions are
/// done its ports are released (the flows stay until they are quiet).
#[inline(always)]
pub fn closing(owner: u64, key: &FlowKey, new: u8) {
    emit_detail(
        event_kind::CLOSING,
        new as u32,
        owner,
        key,
        &FlowKey::default(),
        &PinholeKey::default(),
    );
}
