//! Per-CPU verdict counters, one slot per `Counter`.

use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};
use firewall_common::stats::{Counter, StatValue, COUNTER_SLOTS, EVENTS_LOST_SLOT, FTP_LINES_SLOT};

#[btf_map]
static STATS: PerCpuArray<StatValue, { COUNTER_SLOTS as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn count(counter: Counter, bytes: u64) {
    count_slot(counter as u32, bytes);
}

/// An FTP control line the stream verdict forwarded (its own slot: a line
/// is not a packet).
#[inline(always)]
pub fn count_ftp_line(bytes: u64) {
    count_slot(FTP_LINES_SLOT, bytes);
}

#[inline(always)]
fn count_slot(slot: u32, bytes: u64) {
    if let Some(v) = STATS.get_ptr_mut(slot) {
        // Per-CPU slot: no other CPU writes it, no atomics needed.
        // SAFETY: this CPU's slot of a per-CPU map; no other CPU writes it.
        unsafe {
            (*v).packets += 1;
            (*v).bytes += bytes;
        }
    }
}

/// An event the ring had no room for: the control plane's timers reconcile,
/// but an operator must see that it happens.
#[inline(always)]
pub fn count_event_lost() {
    if let Some(v) = STATS.get_ptr_mut(EVENTS_LOST_SLOT) {
        // SAFETY: this CPU's slot of a per-CPU map; no other CPU writes it.
        unsafe { (*v).packets += 1 };
    }
}
