//! Access rules: which new outbound connections the wall admits (ISA's access
//! rules). The control plane compiles the configuration's `[[rule]]`s into
//! entries of `RULES`, in order; the datapath takes the first entry that
//! matches a connection's first packet, and no match denies.
//!
//! `RULES` holds two banks of `RULE_SLOTS` entries and `RULES_ACTIVE` says
//! which one the datapath reads: a reload fills the other bank and then
//! switches, so no packet ever sees half of the old rules and half of the new.

use crate::IPPROTO_ICMP;

/// Entries per bank.
pub const RULE_SLOTS: u32 = 64;
/// Banks in `RULES`: the active one and the one a reload fills.
pub const RULE_BANKS: u32 = 2;

/// `Rule::action`.
pub mod rule_action {
    /// The end of the list (every entry after it is unused): deny.
    pub const END: u8 = 0;
    pub const ALLOW: u8 = 1;
    pub const DENY: u8 = 2;
}

/// One entry: a source network, a destination network, a protocol and a
/// destination port range. Addresses and masks in packet order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Rule {
    pub src_addr: [u8; 4],
    pub src_mask: [u8; 4],
    pub dst_addr: [u8; 4],
    pub dst_mask: [u8; 4],
    /// Destination ports (host order, inclusive); ICMP echo has none.
    pub port_lo: u16,
    pub port_hi: u16,
    /// IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, or 0 for any of them.
    pub protocol: u8,
    /// `rule_action`.
    pub action: u8,
    pub _pad: [u8; 2],
}

#[inline(always)]
const fn in_net(addr: [u8; 4], net: [u8; 4], mask: [u8; 4]) -> bool {
    u32::from_ne_bytes(addr) & u32::from_ne_bytes(mask) == u32::from_ne_bytes(net)
}

impl Rule {
    /// An entry for every connection: any source, destination, protocol
    /// and port.
    pub const fn everything(action: u8) -> Self {
        Self {
            src_addr: [0; 4],
            src_mask: [0; 4],
            dst_addr: [0; 4],
            dst_mask: [0; 4],
            port_lo: 0,
            port_hi: u16::MAX,
            protocol: 0,
            action,
            _pad: [0; 2],
        }
    }

    /// Whether the first packet of a connection (its protocol, source,
    /// destination and destination port) falls under this entry.
    #[inline(always)]
    pub const fn matches(&self, protocol: u8, src: [u8; 4], dst: [u8; 4], dst_port: u16) -> bool {
        in_net(src, self.src_addr, self.src_mask)
            && in_net(dst, self.dst_addr, self.dst_mask)
            && (self.protocol == 0 || self.protocol == protocol)
            && (protocol == IPPROTO_ICMP || (self.port_lo <= dst_port && dst_port <= self.port_hi))
    }
}

/// The decision of a list of entries, as the datapath takes it: the first
/// matching entry's action; the end of the list or no match denies.
pub fn allows(rules: &[Rule], protocol: u8, src: [u8; 4], dst: [u8; 4], dst_port: u16) -> bool {
    for r in rules.iter().take(RULE_SLOTS as usize) {
        if r.action == rule_action::END {
            return false;
        }
        if r.matches(protocol, src, dst, dst_port) {
            return r.action == rule_action::ALLOW;
        }
    }
    false
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields and explicit padding only.
    unsafe impl aya::Pod for super::Rule {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IPPROTO_TCP, IPPROTO_UDP};

    fn rule(action: u8, dst: [u8; 4], mask: [u8; 4], protocol: u8, ports: (u16, u16)) -> Rule {
        Rule {
            src_addr: [10, 1, 0, 0],
            src_mask: [255, 255, 255, 0],
            dst_addr: dst,
            dst_mask: mask,
            port_lo: ports.0,
            port_hi: ports.1,
            protocol,
            action,
            _pad: [0; 2],
        }
    }

    #[test]
    fn the_first_match_decides_and_no_match_denies() {
        let any = ([0; 4], [0; 4]);
        let rules = [
            rule(rule_action::DENY, [10, 2, 0, 9], [255; 4], 0, (0, 65535)),
            rule(rule_action::ALLOW, any.0, any.1, IPPROTO_TCP, (80, 80)),
            rule(rule_action::ALLOW, any.0, any.1, IPPROTO_TCP, (443, 443)),
            rule(rule_action::ALLOW, any.0, any.1, IPPROTO_ICMP, (0, 65535)),
        ];
        let client = [10, 1, 0, 2];
        let server = [10, 2, 0, 2];
        assert!(allows(&rules, IPPROTO_TCP, client, server, 80));
        assert!(allows(&rules, IPPROTO_TCP, client, server, 443));
        assert!(!allows(&rules, IPPROTO_TCP, client, server, 22));
        assert!(!allows(&rules, IPPROTO_UDP, client, server, 80));
        assert!(allows(&rules, IPPROTO_ICMP, client, server, 0));
        // The deny in front wins over the allows behind it.
        assert!(!allows(&rules, IPPROTO_TCP, client, [10, 2, 0, 9], 80));
        // Another source network matches nothing.
        assert!(!allows(&rules, IPPROTO_TCP, [10, 3, 0, 2], server, 80));
    }

    #[test]
    fn the_end_of_the_list_denies() {
        let mut rules = [Rule::default(); 2];
        assert!(!allows(
            &rules,
            IPPROTO_TCP,
            [10, 1, 0, 2],
            [1, 1, 1, 1],
            80
        ));
        rules[1] = rule(rule_action::ALLOW, [0; 4], [0; 4], 0, (0, 65535));
        assert!(
            !allows(&rules, IPPROTO_TCP, [10, 1, 0, 2], [1, 1, 1, 1], 80),
            "nothing after the end counts"
        );
    }

    #[test]
    fn an_entry_has_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<Rule>(), 24);
    }
}
