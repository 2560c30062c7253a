//! The wall: what the datapath does with a packet that neither a flow nor a
//! pinhole claims. Addressed to the firewall itself, it is the stack's; the
//! first packet of a new outbound connection from an allowed source network
//! is tracked and translated in the kernel (both flow entries created there);
//! anything else that would be forwarded is dropped and counted.

/// The wall's settings (one entry, written by the control plane). All zero,
/// as at load: no new connection is admitted (fail closed), while what is
/// addressed to the firewall still reaches the stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WallConf {
    /// The external address primary connections are translated to.
    pub nat_addr: [u8; 4],
    /// NAT ports for primary connections (host order, inclusive), disjoint
    /// from the pinhole range and from the firewall's own ephemeral ports.
    pub nat_port_lo: u16,
    pub nat_port_hi: u16,
    /// Where new outbound connections must leave (the external interface).
    pub external_ifindex: u32,
    /// The secret of the NAT port selection's hashes (`nat_start`), random
    /// per `up`: an outside observer cannot predict where a destination's
    /// sequence of ports starts.
    pub port_secret: u32,
}

impl WallConf {
    /// Whether new outbound connections may be admitted at all.
    pub const fn admits(&self) -> bool {
        u32::from_ne_bytes(self.nat_addr) != 0
            && self.nat_port_lo != 0
            && self.nat_port_lo <= self.nat_port_hi
            && self.external_ifindex != 0
    }
}

/// Value of `WALL_SOURCES` (an LPM trie keyed by IPv4 address): a source network that may open connections
/// through the firewall (the embedded rule: the internal networks).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SourceValue {
    /// Non-zero: allowed.
    pub allow: u32,
}

/// Key of `PUBLISHED`: an external endpoint of the firewall forwarded to an
/// internal server (ISA's server publishing).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PublishKey {
    pub addr: [u8; 4],
    /// Host byte order.
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

impl PublishKey {
    pub const fn new(protocol: u8, addr: [u8; 4], port: u16) -> Self {
        Self {
            addr,
            port,
            protocol,
            _pad: 0,
        }
    }
}

/// Value of `PUBLISHED`: the internal server, and the interface it is behind.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PublishValue {
    pub server_addr: [u8; 4],
    /// Host byte order.
    pub server_port: u16,
    pub _pad: u16,
    pub egress_ifindex: u32,
}

/// An internal endpoint with a UDP mapping: the key of `UDP_MAPPINGS` and
/// the owner a NAT port names in `UDP_PORT_OWNERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NatEndpoint {
    pub addr: [u8; 4],
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

impl NatEndpoint {
    pub const fn new(addr: [u8; 4], port: u16) -> Self {
        Self {
            addr,
            port,
            _pad: 0,
        }
    }
}

/// Value of `UDP_MAPPINGS`: the external port an internal UDP endpoint
/// sends from to every destination (RFC 4787's endpoint-independent
/// mapping), and when the mapping was last known to be in use.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct UdpMapping {
    /// Host byte order.
    pub nat_port: u16,
    pub _pad: [u8; 6],
    /// CLOCK_MONOTONIC: set by the datapath when a flow is created under the
    /// mapping, raised by the daemon from the mapping's flows.
    pub last_seen_ns: u64,
}

/// How many NAT ports the first packet of a connection tries.
pub const NAT_TRIES: u32 = 16;

/// Slots of the NAT port selection's counters (`NAT_COUNTERS`).
pub const NAT_COUNTER_SLOTS: u32 = 4096;

/// A keyed mix of a destination endpoint (the murmur3 finalizer over the
/// secret and the endpoint's words): `seed` tells the two hashes apart.
#[inline(always)]
pub const fn destination_hash(
    secret: u32,
    seed: u32,
    protocol: u8,
    addr: [u8; 4],
    port: u16,
) -> u32 {
    let mut h = secret ^ seed.wrapping_mul(0x9e37_79b9);
    let words = [
        u32::from_be_bytes(addr),
        ((port as u32) << 8) | protocol as u32,
    ];
    let mut i = 0;
    while i < words.len() {
        h ^= words[i];
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^= h >> 16;
        i += 1;
    }
    h
}

/// Where the NAT port search starts for a connection to a destination
/// endpoint (RFC 6056 §3.3.4, "double-hash port selection"): a keyed hash of
/// the destination plus the count of connections so far that share its
/// counter slot (`counter_slot`). Connections to one destination take the
/// ports one after the other, so a port is used toward it again only after
/// the rest of the range was: a server keeps the TIME_WAIT of a connection it
/// closed for a minute, and a new connection from another client on that
/// same address and port (with its own TCP timestamps) would be refused by
/// its PAWS check. A random start reuses recently freed ports much sooner.
#[inline(always)]
pub const fn nat_start(secret: u32, protocol: u8, addr: [u8; 4], port: u16, count: u32) -> u32 {
    destination_hash(secret, 1, protocol, addr, port).wrapping_add(count)
}

/// The slot of `NAT_COUNTERS` that counts connections to this destination.
#[inline(always)]
pub const fn counter_slot(secret: u32, protocol: u8, addr: [u8; 4], port: u16) -> u32 {
    destination_hash(secret, 2, protocol, addr, port) % NAT_COUNTER_SLOTS
}

/// The `attempt`-th NAT port to try (0-based) for a connection from
/// `src_port`, in `lo..=hi`: the source port itself first when it lies in the
/// range (port preservation), otherwise from `start` (`nat_start`) on; then
/// the ports after it, wrapping around.
#[inline(always)]
pub const fn nat_port(lo: u16, hi: u16, src_port: u16, start: u32, attempt: u32) -> u16 {
    // Wrapping arithmetic: the datapath has no panics (callers check lo <= hi).
    let span = (hi.wrapping_sub(lo) as u32).wrapping_add(1);
    let first = if src_port >= lo && src_port <= hi {
        src_port.wrapping_sub(lo) as u32
    } else {
        start % span
    };
    lo.wrapping_add((first.wrapping_add(attempt) % span) as u16)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields only, padding explicit.
    unsafe impl aya::Pod for super::WallConf {}
    unsafe impl aya::Pod for super::SourceValue {}
    unsafe impl aya::Pod for super::PublishKey {}
    unsafe impl aya::Pod for super::PublishValue {}
    unsafe impl aya::Pod for super::NatEndpoint {}
    unsafe impl aya::Pod for super::UdpMapping {}
}

const _: () = assert!(core::mem::size_of::<WallConf>() == 16);
const _: () = assert!(core::mem::size_of::<PublishKey>() == 8);
const _: () = assert!(core::mem::size_of::<PublishValue>() == 12);
const _: () = assert!(core::mem::size_of::<NatEndpoint>() == 8);
const _: () = assert!(core::mem::size_of::<UdpMapping>() == 16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_port_in_the_range_is_kept() {
        assert_eq!(nat_port(1024, 19999, 5000, 77, 0), 5000);
        assert_eq!(nat_port(1024, 19999, 5000, 77, 1), 5001);
        assert_eq!(nat_port(1024, 19999, 19999, 77, 1), 1024, "wraps around");
    }

    #[test]
    fn other_source_ports_start_at_random_and_stay_in_range() {
        for random in [0, 1, 18975, 18976, u32::MAX] {
            for attempt in 0..NAT_TRIES {
                let p = nat_port(1024, 19999, 40000, random, attempt);
                assert!((1024..=19999).contains(&p), "{random} {attempt}: {p}");
            }
        }
        assert_eq!(nat_port(1024, 19999, 40000, 0, 0), 1024);
        // A one-port range always gives that port.
        assert_eq!(nat_port(7, 7, 40000, 12345, 3), 7);
    }

    #[test]
    fn connections_to_one_destination_take_the_ports_in_turn() {
        let (secret, s) = (0x1234_5678, [10, 2, 0, 2]);
        let span = 19999 - 1024 + 1;
        let first = |count| nat_port(1024, 19999, 40000, nat_start(secret, 6, s, 80, count), 0);
        // Consecutive connections: consecutive ports, a port again only after
        // the whole range.
        for count in 0..100 {
            let (a, b) = (first(count), first(count + 1));
            assert_eq!(b, if a == 19999 { 1024 } else { a + 1 });
        }
        assert_eq!(first(7), first(7 + span));
        // Other destinations start elsewhere, and the secret moves them.
        assert_ne!(
            first(0),
            nat_port(1024, 19999, 40000, nat_start(secret, 6, s, 81, 0), 0)
        );
        assert_ne!(
            first(0),
            nat_port(1024, 19999, 40000, nat_start(7, 6, s, 80, 0), 0)
        );
        assert_ne!(
            nat_start(secret, 6, s, 80, 0),
            nat_start(secret, 17, s, 80, 0),
            "the protocol counts"
        );
        for port in 0..2000u16 {
            assert!(counter_slot(secret, 6, s, port) < NAT_COUNTER_SLOTS);
        }
    }

    #[test]
    fn the_full_range_is_usable() {
        assert_eq!(nat_port(1, u16::MAX, 0, 0, 0), 1);
        assert_eq!(nat_port(1, u16::MAX, u16::MAX, 0, 1), 1);
    }

    #[test]
    fn an_unset_conf_admits_nothing() {
        assert!(!WallConf::default().admits());
        let c = WallConf {
            nat_addr: [192, 0, 2, 1],
            nat_port_lo: 1024,
            nat_port_hi: 19999,
            external_ifindex: 3,
            port_secret: 7,
        };
        assert!(c.admits());
        assert!(!WallConf {
            nat_port_lo: 0,
            ..c
        }
        .admits());
        assert!(!WallConf {
            nat_port_hi: 1000,
            ..c
        }
        .admits());
    }
}
