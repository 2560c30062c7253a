//! IPv4 fragments of tracked flows.
//!
//! Only a datagram's first fragment carries the ports, so the datapath
//! remembers them, under the datagram's identity (RFC 791: source,
//! destination, protocol and identification), when it forwards the first
//! fragment; a later fragment takes its flow from there and is translated
//! like the first (addresses only; the L4 checksum, which covers the whole
//! datagram, was fixed in the first). Nothing is reassembled: a later
//! fragment that arrives before its first, or whose first was not forwarded,
//! is dropped.

use crate::{IPPROTO_TCP, IPPROTO_UDP};

/// Key of the FRAGMENTS map: a datagram as it arrives, before translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    /// The IPv4 identification field, host byte order.
    pub id: u16,
    pub protocol: u8,
    pub _pad: u8,
}

impl FragKey {
    pub const fn new(protocol: u8, src_addr: [u8; 4], dst_addr: [u8; 4], id: u16) -> Self {
        Self {
            src_addr,
            dst_addr,
            id,
            protocol,
            _pad: 0,
        }
    }
}

/// The ports (an echo's identifier as a flow key holds it) of the datagram's
/// first fragment, and when it was forwarded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragValue {
    pub src_port: u16,
    pub dst_port: u16,
    pub _pad: u32,
    /// bpf_ktime_get_coarse_ns of the first fragment.
    pub first_ns: u64,
}

/// How long after its first fragment a later one is still translated: the
/// Linux default reassembly timeout (`net.ipv4.ipfrag_time`), after which the
/// receiver has given the datagram up anyway.
pub const FRAGMENT_LIFETIME_NS: u64 = 30_000_000_000;

/// Where a packet stands in its datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Fragment {
    /// Not fragmented.
    Whole = 0,
    /// Offset 0, more fragments follow: carries the L4 header.
    First = 1,
    /// A non-zero offset: no L4 header.
    Later = 2,
}

/// Reads the flags/fragment-offset field. A later fragment that starts inside
/// the L4 header the first fragment carried (RFC 1858's overlapping
/// fragment: offset 8 rewrites TCP's flags) is refused (`None`): whatever the
/// datapath forwards, the receiver must reassemble into what was judged.
#[inline(always)]
pub const fn classify(frags: u16, protocol: u8) -> Option<Fragment> {
    let offset_bytes = ((frags & 0x1fff) as usize) << 3;
    let more = frags & 0x2000 != 0;
    if offset_bytes == 0 {
        return Some(if more {
            Fragment::First
        } else {
            Fragment::Whole
        });
    }
    // The smallest header the first fragment must have carried whole.
    let header = match protocol {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        _ => 8,
    };
    if offset_bytes < header {
        None
    } else {
        Some(Fragment::Later)
    }
}

/// Whether a remembered first fragment (forwarded at `first_ns`) still
/// speaks for a later fragment arriving at `now_ns`.
#[inline(always)]
pub const fn fresh(first_ns: u64, now_ns: u64) -> bool {
    // Another CPU's coarse clock may read a little behind: not stale.
    now_ns.saturating_sub(first_ns) <= FRAGMENT_LIFETIME_NS
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields and explicit padding only.
    unsafe impl aya::Pod for super::FragKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragValue {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IPPROTO_ICMP;

    #[test]
    fn classifies_by_offset_and_more_fragments() {
        assert_eq!(classify(0, IPPROTO_UDP), Some(Fragment::Whole));
        assert_eq!(classify(0x4000, IPPROTO_TCP), Some(Fragment::Whole), "DF");
        assert_eq!(classify(0x2000, IPPROTO_UDP), Some(Fragment::First));
        assert_eq!(classify(0x0001, IPPROTO_UDP), Some(Fragment::Later));
        assert_eq!(classify(0x20b9, IPPROTO_ICMP), Some(Fragment::Later));
        assert_eq!(classify(0x1fff, IPPROTO_TCP), Some(Fragment::Later));
    }

    #[test]
    fn refuses_fragments_inside_the_l4_header() {
        // Offset 8 and 16 overlap TCP's 20-byte header (its flags at 13).
        assert_eq!(classify(0x0001, IPPROTO_TCP), None);
        assert_eq!(classify(0x2002, IPPROTO_TCP), None);
        assert_eq!(classify(0x0003, IPPROTO_TCP), Some(Fragment::Later));
    }

    #[test]
    fn a_first_fragment_speaks_for_thirty_seconds() {
        assert!(fresh(5, 5));
        assert!(fresh(5, 5 + FRAGMENT_LIFETIME_NS));
        assert!(!fresh(5, 6 + FRAGMENT_LIFETIME_NS));
        // Another CPU's clock a little behind.
        assert!(fresh(10, 9));
    }

    #[test]
    fn the_key_has_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<FragKey>(), 12);
        assert_eq!(core::mem::size_of::<FragValue>(), 16);
    }
}
