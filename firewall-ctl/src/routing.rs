//! What the firewall asks of the kernel's routing, over rtnetlink: the
//! policy routing that delivers intercepted segments locally, and the
//! resolution of neighbours the datapath found unresolved.

use std::{
    collections::HashMap,
    io,
    net::Ipv4Addr,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::{
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
    AddressFamily, RouteNetlinkMessage,
};
use serde::{Deserialize, Serialize};

use crate::netlink::{Netlink, NETLINK_ROUTE};

/// Priority of the policy-routing rule: before the main table (32766).
const RULE_PRIORITY: u32 = 9000;

fn rtnetlink() -> io::Result<Netlink> {
    Netlink::open(NETLINK_ROUTE)
}

/// The policy routing that delivers marked segments locally: a rule
/// `fwmark MARK lookup TABLE`, and in TABLE `local 0.0.0.0/0 dev lo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalDelivery {
    pub fwmark: u32,
    pub table: u32,
}

impl LocalDelivery {
    /// Installs the route and the rule (replacing any left by a crash).
    pub fn install(&self) -> anyhow::Result<()> {
        let mut nl = rtnetlink().context("opening rtnetlink")?;
        let lo = nix::net::if_::if_nametoindex("lo").context("the loopback interface")?;
        nl.ack(
            RouteNetlinkMessage::NewRoute(self.local_route(lo)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .with_context(|| format!("adding local 0.0.0.0/0 dev lo to table {}", self.table))?;
        self.remove_rules(&mut nl)?;
        nl.ack(
            RouteNetlinkMessage::NewRule(self.rule()),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .with_context(|| {
            format!(
                "adding the rule fwmark {:#x} lookup {}",
                self.fwmark, self.table
            )
        })
    }

    /// Removes what `install` added; missing pieces are fine.
    pub fn remove(&self) {
        let result = rtnetlink().and_then(|mut nl| {
            self.remove_rules(&mut nl)?;
            self.flush_table(&mut nl)
        });
        if let Err(e) = result {
            log::warn!("removing the policy routing of table {}: {e}", self.table);
        }
    }

    fn rule(&self) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.action = RuleAction::ToTable;
        m.attributes = vec![
            RuleAttribute::FwMark(self.fwmark),
            RuleAttribute::Table(self.table),
            RuleAttribute::Priority(RULE_PRIORITY),
        ];
        m
    }

    fn local_route(&self, lo: u32) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.table = RouteHeader::RT_TABLE_UNSPEC;
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = RouteScope::Host;
        m.header.kind = RouteType::Local;
        m.attributes = vec![RouteAttribute::Table(self.table), RouteAttribute::Oif(lo)];
        m
    }

    /// Every rule `fwmark MARK lookup TABLE`, whatever its priority.
    fn remove_rules(&self, nl: &mut Netlink) -> io::Result<()> {
        let mut ask = RuleMessage::default();
        ask.header.family = AddressFamily::Inet;
        for m in nl.dump(RouteNetlinkMessage::GetRule(ask))? {
            let RouteNetlinkMessage::NewRule(rule) = m else {
                continue;
            };
            let ours = rule
                .attributes
                .contains(&RuleAttribute::FwMark(self.fwmark))
                && rule_table(&rule) == self.table;
            if ours {
                ignore_missing(nl.ack(RouteNetlinkMessage::DelRule(rule), 0))?;
            }
        }
        Ok(())
    }

    /// Every IPv4 route in TABLE.
    fn flush_table(&self, nl: &mut Netlink) -> io::Result<()> {
        let mut ask = RouteMessage::default();
        ask.header.address_family = AddressFamily::Inet;
        for m in nl.dump(RouteNetlinkMessage::GetRoute(ask))? {
            let RouteNetlinkMessage::NewRoute(route) = m else {
                continue;
            };
            if route_table(&route) == self.table {
                ignore_missing(nl.ack(RouteNetlinkMessage::DelRoute(route), 0))?;
            }
        }
        Ok(())
    }
}

fn rule_table(r: &RuleMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(r.header.table as u32)
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(r.header.table as u32)
}

/// Gone already (removed by someone else meanwhile): fine.
fn ignore_missing(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => Ok(()),
        r => r,
    }
}

/// Neighbour (ARP) resolution for next hops the datapath found unresolved.
///
/// XDP cannot make the kernel resolve a neighbour; it drops the packet
/// (`drop_no_neighbour`) and reports the next hop. The daemon then asks the
/// kernel to resolve it (RTM_NEWNEIGH with NTF_USE: the kernel sends its ARP
/// request and fills the entry in), so the sender's retransmission goes
/// through. Requests are deduplicated per second.
pub struct Resolver {
    recent: Mutex<HashMap<(u32, Ipv4Addr), Instant>>,
}

const AGAIN_AFTER: Duration = Duration::from_secs(1);

impl Default for Resolver {
    fn default() -> Self {
        Self::new()
    }
}

impl Resolver {
    pub fn new() -> Self {
        Self {
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a request for this next hop should go out now.
    fn due(&self, ifindex: u32, addr: Ipv4Addr) -> bool {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        recent.retain(|_, t| now.duration_since(*t) < AGAIN_AFTER);
        if recent.contains_key(&(ifindex, addr)) {
            return false;
        }
        recent.insert((ifindex, addr), now);
        true
    }

    /// Starts resolution of `addr` on interface `ifindex` (the kernel
    /// resolves it in the background).
    pub fn resolve(&self, ifindex: u32, addr: Ipv4Addr) {
        if addr.is_unspecified() || !self.due(ifindex, addr) {
            return;
        }
        log::debug!("resolving neighbour {addr} on ifindex {ifindex}");
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.ifindex = ifindex;
        m.header.state = NeighbourState::Permanent;
        m.header.flags = NeighbourFlags::Use;
        m.attributes = vec![NeighbourAttribute::Destination(NeighbourAddress::Inet(
            addr,
        ))];
        let sent = rtnetlink().and_then(|mut nl| {
            nl.ack(
                RouteNetlinkMessage::NewNeighbour(m),
                NLM_F_CREATE | NLM_F_REPLACE,
            )
        });
        if let Err(e) = sent {
            log::warn!("resolving neighbour {addr} on ifindex {ifindex}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_deduplicated() {
        let r = Resolver::new();
        let a = Ipv4Addr::new(10, 2, 0, 2);
        assert!(r.due(3, a));
        assert!(!r.due(3, a));
        assert!(r.due(4, a), "another interface");
    }

    #[test]
    fn tables_above_255_travel_as_attributes() {
        let d = LocalDelivery {
            fwmark: 0x4657_0021,
            table: 18_007,
        };
        assert_eq!(rule_table(&d.rule()), 18_007);
        assert_eq!(route_table(&d.local_route(1)), 18_007);
    }
}
