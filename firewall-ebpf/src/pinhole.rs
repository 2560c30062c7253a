//! Pinholes: the first packet of an expected secondary connection creates the
//! connection's two flow entries here, in the kernel, and is then forwarded
//! like any flow packet. The control plane learns of it through EVENTS.

use core::intrinsics::{atomic_cxchg, atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    btf_maps::{lpm_trie::Key, HashMap, LpmTrie},
    helpers::generated::bpf_ktime_get_coarse_ns,
    macros::btf_map,
};
use firewall_common::{
    flow::{FlowKey, FlowValue},
    map_sizes,
    pinhole::{
        event_kind, pinhole_flags, BusyClientKey, BusyClientValue, PeerFilterKey, PeerFilterValue,
        PinholeKey, PinholeValue, MAX_REPLY_PATHS,
    },
    stats::Counter,
    IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{events::emit, flow, parse::Packet};

#[btf_map]
static PINHOLES: HashMap<PinholeKey, PinholeValue, { map_sizes::PINHOLES as usize }> =
    HashMap::new();

#[btf_map]
static PEER_FILTERS: LpmTrie<PeerFilterKey, PeerFilterValue, { map_sizes::PEER_FILTERS as usize }> =
    LpmTrie::new();

/// Clients at their quota of concurrent TCP secondaries (kept by the control
/// plane, which counts established connections).
#[btf_map]
static BUSY_CLIENTS: HashMap<BusyClientKey, BusyClientValue, { map_sizes::BUSY_CLIENTS as usize }> =
    HashMap::new();

/// How many SNAT ports a first packet tries before giving up.
const SNAT_TRIES: u32 = 8;

/// For a packet without a flow entry: `PinholeEstablished` once it opened a
/// pinhole and the flow entries are in `FLOWS`; otherwise the counter that
/// decides its fate (`PassNoFlow` when no pinhole matches). A function of its
/// own (a BPF-to-BPF call), so that its stack frame is not the pipeline's.
#[inline(never)]
pub fn admit(pkt: &Packet, side: u8) -> Counter {
    match admit_inner(pkt, side) {
        Ok(_) => Counter::PinholeEstablished,
        Err(c) => c,
    }
}

#[inline(always)]
fn admit_inner(pkt: &Packet, side: u8) -> Result<*mut FlowValue, Counter> {
    let key = &pkt.key;
    let pkey = PinholeKey::new(key.protocol, key.dst_addr, key.dst_port, side);
    let p = PINHOLES.get_ptr_mut(pkey).ok_or(Counter::PassNoFlow)?;
    // SAFETY: `p` is a PINHOLES value the lookup returned; map values stay valid for the
    // program's run.
    let (deadline, flags, allowed_src, peer_filter) = unsafe {
        (
            (*p).deadline_ns,
            (*p).flags,
            (*p).allowed_src,
            (*p).peer_filter,
        )
    };
    // A permission that does not apply leaves the packet to the wall.
    let refuse = |c| {
        if flags & pinhole_flags::PERMISSION != 0 {
            Counter::PassNoFlow
        } else {
            c
        }
    };
    // SAFETY: a helper without arguments.
    if deadline != 0 && unsafe { bpf_ktime_get_coarse_ns() } > deadline {
        return Err(refuse(Counter::DropPinholeExpired));
    }
    if flags & pinhole_flags::CLIENT_ONLY != 0 && key.src_addr != allowed_src {
        return Err(refuse(Counter::DropPinholeSource));
    }
    if peer_filter != 0 && !peer_allowed(peer_filter, key.src_addr) {
        return Err(Counter::DropPeerFiltered);
    }
    if flags & pinhole_flags::NO_TARGET != 0 {
        return Err(Counter::DropPinholeNoTarget);
    }
    if key.protocol == IPPROTO_TCP && !pkt.syn_only {
        return Err(refuse(Counter::DropPinholeNotSyn));
    }
    if key.protocol == IPPROTO_TCP {
        // The client a binding delivers to, or the one a redirect serves.
        let client = if flags & pinhole_flags::CLIENT_ONLY != 0 {
            allowed_src
        } else {
            // SAFETY: as above.
            unsafe { (*p).target_addr }
        };
        // SAFETY: a presence check of a map entry; nothing is read from it.
        if unsafe { BUSY_CLIENTS.get(BusyClientKey { addr: client }) }.is_some() {
            return Err(Counter::DropClientQuota);
        }
    }
    let single = flags & pinhole_flags::MULTIPLE == 0;
    if single {
        // Two first packets may race on two CPUs: exactly one wins the use.
        // SAFETY: BPF_ATOMIC cmpxchg on a field of the map value `p`.
        let (_, won) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                &raw mut (*p).remaining,
                1,
                0,
            )
        };
        if !won {
            if key.protocol == IPPROTO_UDP && flags & pinhole_flags::BIDIRECTIONAL != 0 {
                return Err(reply_path(pkt, p, &pkey));
            }
            return Err(refuse(Counter::DropPinholeUsed));
        }
    }
    let created = create_flows(pkt, p, &pkey);
    if created.is_err() && single {
        // Nothing was established: the use is not spent.
        // SAFETY: as above; only the winner of the use writes it.
        unsafe { (*p).remaining = 1 };
    }
    created
}

#[inline(always)]
fn peer_allowed(filter: u32, addr: [u8; 4]) -> bool {
    let k = Key::new(
        64,
        PeerFilterKey {
            filter: filter.to_be_bytes(),
            addr,
        },
    );
    PEER_FILTERS.get(&k).is_some_and(|v| v.allow != 0)
}

#[inline(always)]
fn create_flows(
    pkt: &Packet,
    p: *mut PinholeValue,
    pkey: &PinholeKey,
) -> Result<*mut FlowValue, Counter> {
    let key = &pkt.key;
    // SAFETY: `p` is a PINHOLES value the lookup returned.
    let v = unsafe { &*p };
    let src = if v.snat_port_count > 0 {
        (
            v.snat_addr,
            pick_snat_port(key, p).ok_or(Counter::DropNatPortsBusy)?,
        )
    } else {
        (key.src_addr, key.src_port)
    };
    let reply_key = v.reply_key(key, src);
    // Both entries are built in the scratch space, one after the other (the
    // stack has no room for them next to the pipeline).
    let e = &mut crate::scratch::get().ok_or(Counter::DropNatPortsBusy)?.flow;
    // Created counts as seen: an entry whose first packet is then dropped (no
    // neighbour yet) must not look idle since boot to the sweeper.
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    v.reply_value(key, now, e);
    flow::insert(&reply_key, e)?;
    v.forward_value(src, now, e);
    flow::insert(key, e)?;
    // SAFETY: an atomic add on a field of the map value `p`.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*p).uses, 1) };
    emit(event_kind::ESTABLISHED, v.owner, key, &reply_key, pkey);
    flow::lookup(key).ok_or(Counter::DropNatPortsBusy)
}

/// A SNAT port of the pinhole's block whose reply entry is free. The search
/// starts at a hash of the connection's source, so concurrent first packets of
/// different connections start apart without shared state.
#[inline(always)]
fn pick_snat_port(key: &FlowKey, p: *mut PinholeValue) -> Option<u16> {
    // SAFETY: `p` is a PINHOLES value the lookup returned.
    let (base, count, addr, taddr, tport) = unsafe {
        (
            (*p).snat_port_base,
            (*p).snat_port_count as u32,
            (*p).snat_addr,
            (*p).target_addr,
            (*p).target_port,
        )
    };
    if count == 0 {
        return None;
    }
    let start = u32::from_be_bytes(key.src_addr).wrapping_mul(0x9e37_79b1)
        ^ (key.src_port as u32).wrapping_mul(0x85eb_ca6b);
    for i in 0..SNAT_TRIES {
        let port = base.wrapping_add((start.wrapping_add(i) % count) as u16);
        if flow::lookup(&FlowKey::new(key.protocol, taddr, tport, addr, port)).is_none() {
            return Some(port);
        }
    }
    None
}

/// UDP BIDIRECTIONAL after the single use: the client may send to this other
/// peer too (its own datagram is still not delivered), up to MAX_REPLY_PATHS
/// peers per pinhole. Returns the counter of the datagram's drop.
#[inline(always)]
fn reply_path(pkt: &Packet, p: *mut PinholeValue, pkey: &PinholeKey) -> Counter {
    let key = &pkt.key;
    // SAFETY: a PINHOLES value the lookup returned.
    let v = unsafe { &*p };
    if v.snat_port_count > 0 {
        return Counter::DropPinholeUsed;
    }
    let client_to_peer = FlowKey::new(
        key.protocol,
        v.target_addr,
        v.target_port,
        key.src_addr,
        key.src_port,
    );
    let mut val = FlowValue::forward(key.dst_addr, key.dst_port, key.src_addr, key.src_port);
    val.owner = v.owner;
    if flow::lookup(&client_to_peer).is_some() {
        return Counter::DropPinholeUsed;
    }
    // One more reply path, counted with a compare-and-exchange (the baseline
    // instruction set has no fetch-and-add): a lost race counts as full.
    let given = v.reply_paths;
    if given >= MAX_REPLY_PATHS {
        return Counter::DropReplyPathsFull;
    }
    // SAFETY: as above; BPF_ATOMIC cmpxchg on the shared value.
    let (_, won) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
            &raw mut (*p).reply_paths,
            given,
            given + 1,
        )
    };
    if !won {
        return Counter::DropReplyPathsFull;
    }
    if flow::insert(&client_to_peer, &val).is_ok() {
        emit(event_kind::REPLY_PATH, v.owner, key, &client_to_peer, pkey);
    }
    Counter::DropPinholeUsed
}
