//! The flow table and its per-packet bookkeeping.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{btf_maps::LruHashMap, macros::btf_map};
use firewall_common::{
    flow::{tcp_seen, FlowKey, FlowValue},
    map_sizes,
};

use crate::events;

/// Default size; the control plane sets the real one from its config at load time.
#[btf_map]
pub static FLOWS: LruHashMap<FlowKey, FlowValue, { map_sizes::FLOWS as usize }> = LruHashMap::new();

#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<*mut FlowValue> {
    FLOWS.get_ptr_mut(key)
}

/// Accounts a forwarded packet on its flow entry, which all CPUs share.
#[inline(always)]
pub fn account(flow: *mut FlowValue, key: &FlowKey, bytes: u64, tcp_flags: u8, now_ns: u64) {
    // SAFETY: `flow` points into a FLOWS entry found or created for this
    // packet; BPF map values stay valid for the program's run.
    let (seen, owner) = unsafe {
        // BPF_ATOMIC add: core's AtomicU64 has no fetch_add on the bpf target.
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*flow).packets, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*flow).bytes, bytes);
        (*flow).last_seen_ns = now_ns;
        ((*flow).tcp_flags_seen, (*flow).owner)
    };
    // Flags only accumulate; skip the store (and the cache-line write) when nothing is new.
    let new = tcp_flags & !seen;
    if new != 0 {
        // SAFETY: as above.
        unsafe { (*flow).tcp_flags_seen = seen | tcp_flags };
        if new & (tcp_seen::FIN | tcp_seen::RST) != 0 && owner != 0 {
            events::closing(owner, key, new);
        }
    }
}

/// Whether this direction of the flow has ended (FIN or RST seen): a SYN
/// that hits it opens a new connection, not the old one.
#[inline(always)]
pub fn ended(flow: *mut FlowValue) -> bool {
    // SAFETY: as in `account`.
    unsafe { (*flow).tcp_flags_seen & (tcp_seen::FIN | tcp_seen::RST) != 0 }
}

/// Creates or replaces an entry (the datapath does so for pinholes).
#[inline(always)]
pub fn insert(key: &FlowKey, value: &FlowValue) -> Result<(), firewall_common::stats::Counter> {
    FLOWS
        .insert(key, value, 0)
        .map_err(|_| firewall_common::stats::Counter::DropNatPortsBusy)
}
