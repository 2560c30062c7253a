//! IPv4 fragments of tracked flows: the first fragment's ports, remembered
//! for the later fragments of its datagram (see `firewall_common::frag`).

use aya_ebpf::{
    btf_maps::LruHashMap, helpers::generated::bpf_ktime_get_coarse_ns, macros::btf_map,
};
use firewall_common::{
    frag::{fresh, FragKey, FragValue},
    map_sizes,
};

use crate::parse::Packet;

#[btf_map]
pub static FRAGMENTS: LruHashMap<FragKey, FragValue, { map_sizes::FRAGMENTS as usize }> =
    LruHashMap::new();

#[inline(always)]
fn key(pkt: &Packet) -> FragKey {
    let k = &pkt.key;
    FragKey::new(k.protocol, k.src_addr, k.dst_addr, pkt.ip_id)
}

/// A first fragment is being forwarded: its datagram's later fragments may
/// follow it. A full table evicts the oldest datagram (an LRU map), whose
/// later fragments are then dropped. Not inlined: the key and value would
/// take stack room the pipeline has not.
#[inline(never)]
pub fn remember(pkt: &Packet, now_ns: u64) {
    let v = FragValue {
        src_port: pkt.key.src_port,
        dst_port: pkt.key.dst_port,
        _pad: 0,
        first_ns: now_ns,
    };
    let _ = FRAGMENTS.insert(key(pkt), v, 0);
}

/// Gives a later fragment its datagram's ports, if the first fragment was
/// forwarded within the reassembly timeout. (A bool and the key filled in,
/// not an `Option` of the ports: LLVM leaves the `None` payload undefined,
/// and the verifier refuses reading it.)
#[inline(never)]
pub fn later(pkt: &mut Packet) -> bool {
    let Some(v) = FRAGMENTS.get_ptr(key(pkt)) else {
        return false;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: a FRAGMENTS value; map values stay valid for the program's run.
    let v = unsafe { &*v };
    if !fresh(v.first_ns, now) {
        return false;
    }
    pkt.key.src_port = v.src_port;
    pkt.key.dst_port = v.dst_port;
    true
}
