//! Pinholes ("expectations"): permissions for the first packet of a secondary
//! connection, keyed by the firewall endpoint that packet targets.
//!
//! The XDP program that sees a matching, allowed first packet creates both flow
//! entries itself, consumes a single-use pinhole and reports the establishment
//! through the EVENTS ring buffer.

use crate::flow::{FlowKey, FlowValue};

/// Which interface a pinhole's first packet arrives on.
pub mod side {
    /// From the internal networks (RedirectConnections: the client dials the firewall's internal address).
    pub const INTERNAL: u8 = 0;
    /// From the external networks (BindForClient: a peer connects to the external address).
    pub const EXTERNAL: u8 = 1;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PinholeKey {
    /// The endpoint the first packet is addressed to.
    pub addr: [u8; 4],
    /// Host byte order.
    pub port: u16,
    pub protocol: u8,
    /// `side::INTERNAL` or `side::EXTERNAL`.
    pub side: u8,
}

impl PinholeKey {
    pub const fn new(protocol: u8, addr: [u8; 4], port: u16, side: u8) -> Self {
        Self {
            addr,
            port,
            protocol,
            side,
        }
    }
}

/// Bits of `PinholeValue::flags`.
pub mod pinhole_flags {
    /// Serve many connections (peers); without it, the first one consumes the pinhole.
    pub const MULTIPLE: u16 = 1 << 0;
    /// UDP: once used, other peers that send still get a reply path (no delivery).
    pub const BIDIRECTIONAL: u16 = 1 << 1;
    /// Only `allowed_src` may use it (RedirectConnections: the session's client).
    pub const CLIENT_ONLY: u16 = 1 << 2;
    /// The target is not known yet (BindForClient placeholder): refuse.
    pub const NO_TARGET: u16 = 1 << 3;
    /// A permission (AllowFutureConnect), keyed by an external destination:
    /// it claims only the connection it permits. Anything else to that
    /// destination (another client, a segment other than a SYN, after its
    /// use or deadline) is the wall's to judge, as if there were no pinhole.
    pub const PERMISSION: u16 = 1 << 4;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PinholeValue {
    /// Where the first packet's direction is sent (DNAT).
    pub target_addr: [u8; 4],
    /// Host byte order.
    pub target_port: u16,
    /// `pinhole_flags` bits.
    pub flags: u16,
    /// Source address the first packet's direction gets (SNAT); used when
    /// `snat_port_count` > 0, otherwise the peer's own source is kept.
    pub snat_addr: [u8; 4],
    /// First of `snat_port_count` ports reserved for SNAT, host byte order.
    pub snat_port_base: u16,
    pub snat_port_count: u16,
    /// With `CLIENT_ONLY`: the only source allowed.
    pub allowed_src: [u8; 4],
    /// Peer filter in PEER_FILTERS (0: any peer).
    pub peer_filter: u32,
    /// Interface the created flows must leave by (0: any).
    pub egress_ifindex: u32,
    pub _pad: u32,
    /// Uses left without `MULTIPLE` (1, then 0); changed atomically (the
    /// atomics of the baseline BPF instruction set are 64-bit).
    pub remaining: u64,
    /// UDP `BIDIRECTIONAL`: reply paths given to other peers so far; changed
    /// atomically, capped at `MAX_REPLY_PATHS`.
    pub reply_paths: u64,
    /// Connection object (or firewall action) that owns the pinhole and its flows.
    pub owner: u64,
    /// CLOCK_MONOTONIC deadline in ns (0: none).
    pub deadline_ns: u64,
    /// Connections established through it; changed atomically.
    pub uses: u64,
}

/// Most reply paths one `BIDIRECTIONAL` pinhole gives other peers: without an
/// IP filter any host could otherwise fill the flow table through it.
pub const MAX_REPLY_PATHS: u64 = 16;

/// Key of PEER_FILTERS, an LPM trie: (filter id, peer address). The prefix
/// length covers the 32 bits of the id plus the network's prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerFilterKey {
    /// Big-endian, so the id is the leading bits of the prefix.
    pub filter: [u8; 4],
    pub addr: [u8; 4],
}

/// Value of PEER_FILTERS: 1 allows, 0 denies (the longest prefix decides).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerFilterValue {
    pub allow: u32,
}

/// Key of BUSY_CLIENTS: an internal client that has reached its quota of
/// concurrent secondary TCP connections (the per-client quota). While its entry
/// exists, pinholes refuse new TCP connections for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BusyClientKey {
    pub addr: [u8; 4],
}

/// Value of BUSY_CLIENTS: what the control plane counted when it set the entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BusyClientValue {
    pub established_tcp: u32,
    pub quota: u32,
}

/// Kinds of `DatapathEvent`.
pub mod event_kind {
    /// A pinhole admitted a connection and the XDP program created its flows.
    pub const ESTABLISHED: u32 = 1;
    /// A UDP BIDIRECTIONAL pinhole gave a reply path to another peer.
    pub const REPLY_PATH: u32 = 2;
    /// A packet was dropped because its next hop has no neighbour entry:
    /// `owner` holds the egress ifindex, `forward.dst_addr` the next hop.
    pub const NEED_NEIGHBOUR: u32 = 3;
    /// A flow with an owner saw its first FIN or RST in this direction:
    /// `forward` is the flow's key, `detail` the `tcp_seen` bits new on it.
    pub const CLOSING: u32 = 4;
    /// `bpf_redirect` refused the egress interface in `owner` (it vanished).
    pub const REDIRECT_FAILED: u32 = 5;
}

/// What the datapath tells the control plane through the EVENTS ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DatapathEvent {
    pub kind: u32,
    /// Kind-specific (CLOSING: the `tcp_seen` bits newly seen).
    pub detail: u32,
    pub owner: u64,
    /// The entry for the first packet's direction (peer -> firewall endpoint).
    pub forward: FlowKey,
    /// The entry for the answers.
    pub reply: FlowKey,
    /// The pinhole that matched.
    pub pinhole: PinholeKey,
    pub timestamp_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields only, padding explicit.
    unsafe impl aya::Pod for super::PinholeKey {}
    unsafe impl aya::Pod for super::PinholeValue {}
    unsafe impl aya::Pod for super::PeerFilterKey {}
    unsafe impl aya::Pod for super::PeerFilterValue {}
    unsafe impl aya::Pod for super::BusyClientKey {}
    unsafe impl aya::Pod for super::BusyClientValue {}
    unsafe impl aya::Pod for super::DatapathEvent {}
}

const _: () = assert!(core::mem::size_of::<PinholeKey>() == 8);
const _: () = assert!(core::mem::size_of::<PinholeValue>() == 72);
const _: () = assert!(core::mem::size_of::<DatapathEvent>() == 64);

/// The flows of a connection admitted through a pinhole: what the datapath
/// writes on its first packet `key`, translated to source `src` (the SNAT
/// address and a port of the pinhole's block, or the packet's own source).
/// The values are written into `e` one at a time: the datapath builds them
/// in place, its stack has no room for two.
impl PinholeValue {
    /// The reply entry's key: from the target back to `src`.
    #[inline(always)]
    pub const fn reply_key(&self, key: &FlowKey, src: ([u8; 4], u16)) -> FlowKey {
        FlowKey::new(
            key.protocol,
            self.target_addr,
            self.target_port,
            src.0,
            src.1,
        )
    }

    /// The reply entry's value: back to the packet's source, from the
    /// endpoint it was addressed to.
    #[inline(always)]
    pub fn reply_value(&self, key: &FlowKey, now: u64, e: &mut FlowValue) {
        *e = FlowValue::forward(key.dst_addr, key.dst_port, key.src_addr, key.src_port);
        e.owner = self.owner;
        e.last_seen_ns = now;
    }

    /// The packet's own entry's value: from `src` to the target.
    #[inline(always)]
    pub fn forward_value(&self, src: ([u8; 4], u16), now: u64, e: &mut FlowValue) {
        *e = FlowValue::forward(src.0, src.1, self.target_addr, self.target_port);
        e.owner = self.owner;
        e.egress_ifindex = self.egress_ifindex;
        e.last_seen_ns = now;
    }
}
