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
    pub _pad: u32,
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

/// How many NAT ports the first packet of a connection tries.
pub const NAT_TRIES: u32 = 16;

/// The `attempt`-th NAT port to try (0-based) for a connection from
/// `src_port`, in `lo..=hi`: the source port itself first when it lies in the
/// range (port preservation), otherwise from `random` on; then the ports
/// after it, wrapping around.
#[inline(always)]
pub const fn nat_port(lo: u16, hi: u16, src_port: u16, random: u32, attempt: u32) -> u16 {
    // Wrapping arithmetic: the datapath has no panics (callers check lo <= hi).
    let span = (hi.wrapping_sub(lo) as u32).wrapping_add(1);
    let first = if src_port >= lo && src_port <= hi {
        src_port.wrapping_sub(lo) as u32
    } else {
        random % span
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
}

const _: () = assert!(core::mem::size_of::<WallConf>() == 16);
const _: () = assert!(core::mem::size_of::<PublishKey>() == 8);
const _: () = assert!(core::mem::size_of::<PublishValue>() == 12);

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
            _pad: 0,
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
