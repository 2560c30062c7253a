//! Endpoint-independent mapping for UDP (RFC 4787, REQ-1): an internal
//! endpoint sends from the same external port to every destination while
//! its mapping lives, so that peer-to-peer protocols (STUN, ICE, games)
//! learn an address that works for every peer. Filtering stays
//! address-and-port dependent: only a destination the endpoint sent to gets
//! back in (its flow), the wall drops the rest.
//!
//! A NAT port belongs to one internal endpoint at a time (`UDP_PORT_OWNERS`,
//! claimed with BPF_NOEXIST so that two CPUs never share one, and an
//! endpoint two CPUs map at once keeps the first mapping); that keeps
//! every reply key distinct however many destinations a mapping reaches.
//! The daemon ends a mapping once it and its flows have been quiet for the
//! mapping timeout (`timeouts.udp_mapping`).

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    btf_maps::HashMap,
    helpers::generated::bpf_get_prandom_u32,
    macros::btf_map,
};
use firewall_common::{
    map_sizes,
    wall::{nat_port, NatEndpoint, UdpMapping, NAT_TRIES},
    IPPROTO_UDP,
};

use crate::wall::{self, WALL_CONF};

/// Internal endpoint → its mapping.
#[btf_map]
static UDP_MAPPINGS: HashMap<NatEndpoint, UdpMapping, { map_sizes::UDP_MAPPINGS as usize }> =
    HashMap::new();

/// NAT port → the internal endpoint whose mapping owns it.
#[btf_map]
static UDP_PORT_OWNERS: HashMap<u32, NatEndpoint, { map_sizes::UDP_MAPPINGS as usize }> =
    HashMap::new();

/// The external port of the internal endpoint `addr:port`'s mapping: the
/// one it has, or a free one claimed for it now (its own port when that is
/// in the NAT range, otherwise from a random start). 0: no port is free.
/// A function of its own (a BPF-to-BPF call), for the stack's sake.
#[inline(never)]
pub fn mapped_port(addr: u32, port: u16, now: u64) -> u32 {
    let ep = NatEndpoint::new(addr.to_ne_bytes(), port);
    let mut stale = false;
    if let Some(m) = UDP_MAPPINGS.get_ptr_mut(ep) {
        // SAFETY: a map value; a u16 read and a u64 write do not tear.
        let p = unsafe { (*m).nat_port };
        if owns(p, ep) {
            // SAFETY: as above.
            unsafe { (*m).last_seen_ns = now };
            return p as u32;
        }
        // The daemon took the port back (or another endpoint holds it):
        // a new mapping below replaces this one.
        stale = true;
    }
    let Some(conf) = WALL_CONF.get(0) else {
        return 0;
    };
    // SAFETY: a helper without arguments.
    let start = unsafe { bpf_get_prandom_u32() };
    for attempt in 0..NAT_TRIES {
        let candidate = nat_port(conf.nat_port_lo, conf.nat_port_hi, port, start, attempt);
        if wall::published(IPPROTO_UDP, conf.nat_addr, candidate) {
            continue;
        }
        if UDP_PORT_OWNERS
            .insert(candidate as u32, ep, BPF_NOEXIST as u64)
            .is_err()
        {
            continue;
        }
        let m = UdpMapping {
            nat_port: candidate,
            _pad: [0; 6],
            last_seen_ns: now,
        };
        // Another CPU may be mapping the same endpoint at this instant: the
        // first mapping stands and the other CPU gives its port back and
        // takes that one, so the endpoint keeps one port.
        let flags = if stale { BPF_ANY } else { BPF_NOEXIST };
        if UDP_MAPPINGS.insert(ep, m, flags as u64).is_err() {
            // Mapped meanwhile, or the mapping table is full (then 0). A
            // mapping just made names a port its claim holds for `ep`: no
            // owner check (and no stack for one).
            let _ = UDP_PORT_OWNERS.remove(candidate as u32);
            // SAFETY: a read of a map value written whole.
            return unsafe { UDP_MAPPINGS.get(ep) }.map_or(0, |m| m.nat_port as u32);
        }
        return candidate as u32;
    }
    0
}

/// Whether NAT port `p` is `ep`'s.
#[inline(always)]
fn owns(p: u16, ep: NatEndpoint) -> bool {
    // SAFETY: a read of a map value written whole.
    unsafe { UDP_PORT_OWNERS.get(p as u32) }.is_some_and(|o| *o == ep)
}
