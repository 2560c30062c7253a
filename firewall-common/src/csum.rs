//! Internet checksum arithmetic (RFC 1071, RFC 1624), shared by the datapath
//! and the host-side tests.
//!
//! Convention: a 16-bit "word" is two packet bytes read big-endian
//! (`u16::from_be_bytes`), and a checksum field is read and written the same way.
//! Sums are accumulated in a `u32`/`u64` and folded at the end.

/// Folds a ones'-complement accumulator to 16 bits.
#[inline(always)]
pub const fn fold(sum: u64) -> u16 {
    let s = (sum & 0xffff_ffff) + (sum >> 32);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The two words of an IPv4 address.
#[inline(always)]
pub const fn addr_sum(a: [u8; 4]) -> u32 {
    u16::from_be_bytes([a[0], a[1]]) as u32 + u16::from_be_bytes([a[2], a[3]]) as u32
}

/// RFC 1624 eqn. 3: updates a *final* checksum when one 16-bit word changes
/// from `old` to `new`: HC' = ~(~HC + ~m + m').
#[inline(always)]
pub const fn replace_u16(check: u16, old: u16, new: u16) -> u16 {
    !fold(!check as u64 + !old as u64 + new as u64)
}

/// RFC 1624 eqn. 3 for a 32-bit field (an IPv4 address).
#[inline(always)]
pub const fn replace_addr(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let old_lo = u16::from_be_bytes([old[0], old[1]]);
    let old_hi = u16::from_be_bytes([old[2], old[3]]);
    let new_lo = u16::from_be_bytes([new[0], new[1]]);
    let new_hi = u16::from_be_bytes([new[2], new[3]]);
    !fold(!check as u64 + !old_lo as u64 + !old_hi as u64 + new_lo as u64 + new_hi as u64)
}

/// Sum of the IPv4 pseudo header (RFC 793/768): addresses, protocol, L4 length.
#[inline(always)]
pub const fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], protocol: u8, l4_len: u16) -> u32 {
    addr_sum(src) + addr_sum(dst) + protocol as u32 + l4_len as u32
}

/// Whether an L4 checksum field holds only the folded pseudo-header sum, i.e.
/// the packet was built with CHECKSUM_PARTIAL (a local socket whose checksum
/// the NIC, or nobody on veth, was to finish).
///
/// XDP cannot see `skb->ip_summed`, and XDP_REDIRECT drops it, so such a packet
/// must leave with a checksum computed in full. A final checksum matches this
/// pattern by chance once in 65536 packets; recomputing it in full is correct
/// too, just slower, so the test needs no certainty.
#[inline(always)]
pub const fn looks_partial(
    check: u16,
    src: [u8; 4],
    dst: [u8; 4],
    protocol: u8,
    l4_len: u16,
) -> bool {
    check == fold(pseudo_header_sum(src, dst, protocol, l4_len) as u64)
}

/// Ones'-complement sum of a byte string as big-endian words; an odd final
/// byte is padded with zero (RFC 1071).
pub fn sum_bytes(data: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u64) << 8;
    }
    sum
}

/// Checksum of a TCP or UDP segment from scratch (the field inside `segment`
/// must be zero). For UDP a result of 0 must be sent as 0xffff (see `udp_final`).
pub fn l4_checksum(src: [u8; 4], dst: [u8; 4], protocol: u8, segment: &[u8]) -> u16 {
    !fold(pseudo_header_sum(src, dst, protocol, segment.len() as u16) as u64 + sum_bytes(segment))
}

/// IPv4 header checksum from scratch (the field inside `header` must be zero).
pub fn ipv4_header_checksum(header: &[u8]) -> u16 {
    !fold(sum_bytes(header))
}

/// UDP transmits a computed checksum of 0 as 0xffff; 0 means "no checksum".
#[inline(always)]
pub const fn udp_final(check: u16) -> u16 {
    if check == 0 {
        0xffff
    } else {
        check
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (no dependency needed).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn bytes<const N: usize>(&mut self) -> [u8; N] {
            core::array::from_fn(|_| self.next() as u8)
        }
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3 example: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum_bytes(&data)), 0xddf2);
    }

    #[test]
    fn known_ipv4_header() {
        // A header from Wikipedia's IPv4 checksum example (checksum b861).
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header_checksum(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(
            fold(sum_bytes(&h)),
            0xffff,
            "a valid header sums to all ones"
        );
    }

    #[test]
    fn incremental_matches_scratch() {
        let mut rng = Lcg(7);
        for _ in 0..20_000 {
            let src: [u8; 4] = rng.bytes();
            let dst: [u8; 4] = rng.bytes();
            let new_src: [u8; 4] = rng.bytes();
            let mut seg: [u8; 24] = rng.bytes();
            seg[16] = 0;
            seg[17] = 0;
            let check = l4_checksum(src, dst, 6, &seg);
            let old_port = u16::from_be_bytes([seg[0], seg[1]]);
            let new_port = rng.next() as u16;
            let mut c = replace_addr(check, src, new_src);
            c = replace_u16(c, old_port, new_port);
            seg[0..2].copy_from_slice(&new_port.to_be_bytes());
            let scratch = l4_checksum(new_src, dst, 6, &seg);
            // 0x0000 and 0xffff are the same ones'-complement number; a
            // receiver accepts either, but RFC 1624 eqn. 3 never yields 0xffff
            // where scratch yields 0x0000 except for an all-zero sum.
            assert!(
                c == scratch || (c ^ scratch) == 0xffff && (c == 0 || scratch == 0),
                "{c:04x} {scratch:04x}"
            );
        }
    }

    #[test]
    fn partial_detection() {
        let (s, d) = ([10, 1, 0, 2], [10, 2, 0, 2]);
        let partial = fold(pseudo_header_sum(s, d, 17, 40) as u64);
        assert!(looks_partial(partial, s, d, 17, 40));
        assert!(!looks_partial(partial, s, d, 17, 41));
        assert!(!looks_partial(!partial, s, d, 17, 40));
    }

    #[test]
    fn udp_zero_is_sent_as_ffff() {
        assert_eq!(udp_final(0), 0xffff);
        assert_eq!(udp_final(0x1234), 0x1234);
    }
}

/// An ICMP echo's identifier before and after translation: the flow key
/// carries it as the request's source port or the reply's destination port
/// (the other one is 0), and the flow value its translation likewise.
#[inline(always)]
pub const fn echo_ids(key: &crate::flow::FlowKey, flow: &crate::flow::FlowValue) -> (u16, u16) {
    (
        key.src_port | key.dst_port,
        flow.nat_src_port | flow.nat_dst_port,
    )
}

#[cfg(test)]
mod echo_tests {
    use super::*;
    use crate::flow::{FlowKey, FlowValue};

    #[test]
    fn echo_identifiers_come_from_either_port() {
        let req = FlowKey::new(1, [10, 1, 0, 2], 77, [10, 2, 0, 2], 0);
        let out = FlowValue::forward([10, 2, 0, 1], 5000, [10, 2, 0, 2], 0);
        assert_eq!(echo_ids(&req, &out), (77, 5000));
        let reply = FlowKey::new(1, [10, 2, 0, 2], 0, [10, 2, 0, 1], 5000);
        let back = FlowValue::forward([10, 2, 0, 2], 0, [10, 1, 0, 2], 77);
        assert_eq!(echo_ids(&reply, &back), (5000, 77));
    }
}

/// A checksum difference in the kernel's convention (`__wsum`): 32-bit
/// ones'-complement sums of fields as the CPU loads them from the packet
/// (`u32::from_ne_bytes` of the bytes). What `bpf_l3_csum_replace` and
/// `bpf_l4_csum_replace` take with a size of 0: one helper call then applies
/// the changes of several fields, each as the helper would with its size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wsum(pub u32);

impl Wsum {
    /// Ones'-complement addition with end-around carry (`csum_add`).
    #[inline(always)]
    pub const fn add(self, v: u32) -> Self {
        let (s, carry) = self.0.overflowing_add(v);
        Self(s.wrapping_add(carry as u32))
    }

    /// A 4-byte field changing from `old` to `new` (the helpers' size 4).
    #[inline(always)]
    pub const fn replace4(self, old: [u8; 4], new: [u8; 4]) -> Self {
        self.add(!u32::from_ne_bytes(old))
            .add(u32::from_ne_bytes(new))
    }

    /// A 2-byte field changing from `old` to `new`, both as the packet holds
    /// them (the helpers' size 2, which widens each to 32 bits).
    /// The kernel's `csum_replace_by_diff`: a final checksum `field`, as the
    /// packet holds it, updated by this difference.
    #[inline(always)]
    pub const fn apply(self, field: [u8; 2]) -> [u8; 2] {
        let sum = self.add(!(u16::from_ne_bytes(field) as u32)).0 as u64;
        (!fold(sum)).to_ne_bytes()
    }

    #[inline(always)]
    pub const fn replace2(self, old: [u8; 2], new: [u8; 2]) -> Self {
        self.add(!(u16::from_ne_bytes(old) as u32))
            .add(u16::from_ne_bytes(new) as u32)
    }
}

#[cfg(test)]
mod wsum_tests {
    use super::*;

    fn by_diff(field: [u8; 2], diff: Wsum) -> [u8; 2] {
        diff.apply(field)
    }

    proptest::proptest! {
        /// Any addresses, ports and starting checksum: one difference in the
        /// kernel's convention does what our field-by-field updates (the
        /// XDP path's) do, equal as ones'-complement numbers (0x0000 and
        /// 0xffff are both zero).
        #[test]
        fn one_diff_does_what_the_sized_replacements_do(
            sa: [u8; 4], sa2: [u8; 4], da: [u8; 4], da2: [u8; 4],
            sp: u16, sp2: u16, dp: u16, dp2: u16, check: u16,
        ) {
            let mut want = replace_addr(check, sa, sa2);
            want = replace_addr(want, da, da2);
            want = replace_u16(want, sp, sp2);
            want = replace_u16(want, dp, dp2);
            let diff = Wsum::default()
                .replace4(sa, sa2)
                .replace4(da, da2)
                .replace2(sp.to_be_bytes(), sp2.to_be_bytes())
                .replace2(dp.to_be_bytes(), dp2.to_be_bytes());
            let got = u16::from_be_bytes(by_diff(check.to_be_bytes(), diff));
            proptest::prop_assert!(
                got == want || (got | want == 0xffff && got & want == 0),
                "{check:#x}: {got:#x} vs {want:#x}"
            );
        }
    }

    #[test]
    fn a_diff_is_the_sum_of_its_parts() {
        let a = Wsum::default().replace4([1, 2, 3, 4], [5, 6, 7, 8]);
        let b = Wsum::default().replace2([0, 80], [31, 144]);
        let both = Wsum::default()
            .replace4([1, 2, 3, 4], [5, 6, 7, 8])
            .replace2([0, 80], [31, 144]);
        assert_eq!(
            by_diff(by_diff([0x12, 0x34], a), b),
            by_diff([0x12, 0x34], both)
        );
    }
}
