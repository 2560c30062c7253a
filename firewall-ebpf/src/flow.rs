//! The flow table and its per-packet bookkeeping.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{btf_maps::LruHashMap, macros::btf_map};
use firewall_common::flow::{FlowKey, FlowValue};

/// Default size; the control plane sets the real one from its config at load time.
pub const DEFAULT_FLOWS: usize = 262_144;

#[btf_map]
pub static FLOWS: LruHashMap<FlowKey, FlowValue, DEFAULT_FLOWS> = LruHashMap::new();

#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<*mut FlowValue> {
    FLOWS.get_ptr_mut(key)
}

/// Accounts a forwarded packet on its flow entry, which all CPUs share.
#[inline(always)]
pub fn account(flow: *mut FlowValue, bytes: u64, tcp_flags: u8, now_ns: u64) {
    unsafe {
        // BPF_ATOMIC add: core's AtomicU64 has no fetch_add on the bpf target.
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*flow).packets, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*flow).bytes, bytes);
        (*flow).last_seen_ns = now_ns;
        // Flags only accumulate; skip the store (and the cache-line write) when nothing is new.
        let seen = (*flow).tcp_flags_seen;
        if seen | tcp_flags != seen {
            (*flow).tcp_flags_seen = seen | tcp_flags;
        }
    }
}

/// Creates or replaces an entry (the datapath does so for pinholes).
#[inline(always)]
pub fn insert(key: &FlowKey, value: &FlowValue) -> Result<(), firewall_common::stats::Counter> {
    FLOWS
        .insert(key, value, 0)
        .map_err(|_| firewall_common::stats::Counter::DropNatPortsBusy)
}
