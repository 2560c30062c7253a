//! The flow table: one entry per direction of a forwarded connection.

/// Key of the flow table: the 5-tuple of a packet as it arrives on either interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    /// Host byte order.
    pub src_port: u16,
    /// Host byte order.
    pub dst_port: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub protocol: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    pub const fn new(
        protocol: u8,
        src_addr: [u8; 4],
        src_port: u16,
        dst_addr: [u8; 4],
        dst_port: u16,
    ) -> Self {
        Self {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            protocol,
            _pad: [0; 3],
        }
    }
}

/// What the datapath does with a packet that hits a flow.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowAction {
    /// Translate, look the route up in the kernel FIB and redirect out of the egress interface.
    Forward = 0,
    /// Drop (counted). Used to block a flow without removing its entry.
    Drop = 1,
    /// Forward as `Forward`, for a connection read in place: its segments
    /// are numbered as the daemon's rewrites say, and what is not a plain
    /// line goes to the daemon (`inplace`).
    InPlace = 2,
}

impl FlowAction {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Forward),
            1 => Some(Self::Drop),
            2 => Some(Self::InPlace),
            _ => None,
        }
    }
}

/// TCP flags seen on a flow (`FlowValue::tcp_flags_seen`), for teardown detection.
pub mod tcp_seen {
    pub const SYN: u8 = 1 << 0;
    pub const FIN: u8 = 1 << 1;
    pub const RST: u8 = 1 << 2;
}

/// Who made a flow entry (`FlowValue::kind`).
pub mod flow_kind {
    /// Written by the control plane: a secondary connection's flows (their
    /// `owner` is the connection object) or a static translation.
    pub const STATIC: u8 = 0;
    /// A primary connection tracked by the datapath's wall (owner 0).
    pub const PRIMARY: u8 = 1;

    pub const fn name(kind: u8) -> &'static str {
        match kind {
            STATIC => "secondary",
            PRIMARY => "primary",
            _ => "unknown",
        }
    }
}

/// Value of the flow table: how to translate, where to send, and what was seen.
///
/// The control plane writes the first block; the datapath only updates the
/// counters, the timestamp and `tcp_flags_seen`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    /// Source address after translation (equal to the key's for no SNAT).
    pub nat_src_addr: [u8; 4],
    /// Destination address after translation (equal to the key's for no DNAT).
    pub nat_dst_addr: [u8; 4],
    /// Host byte order.
    pub nat_src_port: u16,
    /// Host byte order.
    pub nat_dst_port: u16,
    /// A `FlowAction` as u32.
    pub action: u32,
    /// When non-zero, the FIB must route the translated packet out of this
    /// interface or the packet is dropped (guards against route changes
    /// sending a flow out of the wrong side).
    pub egress_ifindex: u32,
    /// A TFTP request's own flow: its packet count (low 32 bits) plus one
    /// when the TFTP helper last let a server's answer in; 0: never. An
    /// answer needs a request packet after the last one answered
    /// (`tftp::armed`). 0 in every other flow.
    pub answered: u32,
    /// Connection object that owns this entry (0: none, e.g. a static flow).
    pub owner: u64,
    /// Packets and bytes forwarded (L2 frame length), updated atomically.
    pub packets: u64,
    pub bytes: u64,
    /// `bpf_ktime_get_coarse_ns()` of the last packet (CLOCK_MONOTONIC).
    pub last_seen_ns: u64,
    /// Bits of `tcp_seen` observed in this direction.
    pub tcp_flags_seen: u8,
    /// A `flow_kind`: who made the entry.
    pub kind: u8,
    /// The next hop the FIB gave for this flow, cached by the datapath (the
    /// FIB lookup is most of a packet's cost): the largest L3 length the FIB
    /// accepted for it (longer packets ask the FIB again, which keeps its
    /// MTU check), the egress interface and MACs, and when the FIB confirmed
    /// it, in units of 2^20 ns (about 1 ms) of `bpf_ktime_get_coarse_ns`; 0:
    /// never. Older than `HOP_RECHECK` units, the FIB is asked again, so route
    /// and neighbour changes apply within about a second.
    pub hop_len_ok: u16,
    pub hop_ifindex: u32,
    pub hop_dmac: [u8; 6],
    pub hop_smac: [u8; 6],
    pub hop_checked: u32,
}

/// Age (in 2^20 ns units) after which a cached next hop is looked up again.
pub const HOP_RECHECK: u32 = 1000;

impl FlowValue {
    /// A forwarding entry translating to the given addresses and ports.
    pub const fn forward(
        nat_src_addr: [u8; 4],
        nat_src_port: u16,
        nat_dst_addr: [u8; 4],
        nat_dst_port: u16,
    ) -> Self {
        Self {
            nat_src_addr,
            nat_dst_addr,
            nat_src_port,
            nat_dst_port,
            action: FlowAction::Forward as u32,
            egress_ifindex: 0,
            answered: 0,
            owner: 0,
            packets: 0,
            bytes: 0,
            last_seen_ns: 0,
            tcp_flags_seen: 0,
            kind: flow_kind::STATIC,
            hop_len_ok: 0,
            hop_ifindex: 0,
            hop_dmac: [0; 6],
            hop_smac: [0; 6],
            hop_checked: 0,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields only, padding explicit.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<FlowValue>() == 80);
