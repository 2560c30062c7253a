//! The lifetime of UDP mappings (RFC 4787: REQ-5, REQ-6).
//!
//! The datapath creates a mapping (an internal endpoint's external port,
//! the same toward every destination) with its first flow and stamps it
//! whenever another flow is created under it; packets stamp only their
//! flows, so that the fast path writes one entry per packet, not two. The
//! daemon carries the flows' stamps over to their mapping as its sweeper
//! reads the flow table (`refreshes`), and ends a mapping once it has been
//! quiet for the mapping timeout (`expired`): both directions count, as the
//! flows' own timeout counts them. A port whose owner no mapping names (a
//! daemon stopped between ending a mapping and freeing its port) is freed
//! once it and its flows have been quiet as long (`Orphans`).

use std::{collections::HashMap, time::Duration};

use firewall_common::{
    flow::{flow_kind, FlowKey, FlowValue},
    wall::{NatEndpoint, UdpMapping},
    IPPROTO_UDP,
};

/// The latest activity of UDP primary flows, by the internal endpoint and
/// the NAT port they were translated to.
pub type Activity = HashMap<(NatEndpoint, u16), u64>;

/// The latest activity of the flows in `batch` (`Activity`). `nat_addr` is
/// the address primary connections are translated to.
pub fn refreshes(batch: &[(FlowKey, FlowValue)], nat_addr: [u8; 4]) -> Activity {
    let mut out = Activity::new();
    for (k, v) in batch {
        if k.protocol != IPPROTO_UDP || v.kind != flow_kind::PRIMARY {
            continue;
        }
        let (ep, port) = if v.nat_src_addr == nat_addr && k.src_addr != nat_addr {
            // Outbound: from the internal endpoint, translated to the port.
            (NatEndpoint::new(k.src_addr, k.src_port), v.nat_src_port)
        } else if k.dst_addr == nat_addr {
            // The answers: to the port, translated back to the endpoint.
            (NatEndpoint::new(v.nat_dst_addr, v.nat_dst_port), k.dst_port)
        } else {
            continue;
        };
        let seen = out.entry((ep, port)).or_insert(0);
        *seen = (*seen).max(v.last_seen_ns);
    }
    out
}

/// The stamp `m` should carry given the latest activity `seen` of flows
/// translated to `port` (`refreshes`), if that is newer and the flows are
/// the mapping's own (same port); None: nothing to write.
pub fn raised(m: &UdpMapping, port: u16, seen: u64) -> Option<u64> {
    (port == m.nat_port && seen > m.last_seen_ns).then_some(seen)
}

/// How long a mapping must be quiet before it ends at `now_ns`. The
/// sweeper carries a flow's activity over only when it reads that flow, up
/// to `sweep_lag` later: the wait covers that too, so a mapping never ends
/// while one of its flows (removed after `udp_idle`) may still be in use.
pub fn quiet_needed(udp_mapping: Duration, udp_idle: Duration, sweep_lag: Duration) -> Duration {
    udp_mapping.max(udp_idle + sweep_lag)
}

/// The mappings of `entries` that have been quiet for `quiet` at `now_ns`.
pub fn expired(
    entries: &[(NatEndpoint, UdpMapping)],
    now_ns: u64,
    quiet: Duration,
) -> Vec<(NatEndpoint, u16)> {
    let quiet = quiet.as_nanos() as u64;
    entries
        .iter()
        .filter(|(_, m)| now_ns.saturating_sub(m.last_seen_ns) >= quiet)
        .map(|(ep, m)| (*ep, m.nat_port))
        .collect()
}

/// NAT ports whose owner (`UDP_PORT_OWNERS`) no mapping names, watched
/// until they may be freed: since first seen so, or since their flows were
/// last active, whichever is later, for the mapping's quiet time. Fed a
/// batch of the owners table at a time, as the sweeper reads it.
#[derive(Debug, Default)]
pub struct Orphans {
    /// (port, owner) → (quiet since, the pass of the owners table it was
    /// last seen in).
    watched: HashMap<(u16, NatEndpoint), (u64, u64)>,
    pass: u64,
}

impl Orphans {
    /// Flows still translated to a watched port keep it.
    pub fn touch(&mut self, seen: &Activity) {
        for ((ep, port), t) in seen {
            if let Some(w) = self.watched.get_mut(&(*port, *ep)) {
                w.0 = w.0.max(*t);
            }
        }
    }

    /// A batch of the owners table: each port, its owner, and the port the
    /// owner's mapping names now (None: it has none). The orphans quiet for
    /// `quiet` at `now`: to be freed (if they still are orphans then).
    pub fn batch(
        &mut self,
        owners: &[(u16, NatEndpoint, Option<u16>)],
        now: u64,
        quiet: Duration,
    ) -> Vec<(u16, NatEndpoint)> {
        let quiet = quiet.as_nanos() as u64;
        let mut free = Vec::new();
        for &(port, ep, mapped) in owners {
            if mapped == Some(port) {
                self.watched.remove(&(port, ep));
                continue;
            }
            let w = self.watched.entry((port, ep)).or_insert((now, self.pass));
            w.1 = self.pass;
            if now.saturating_sub(w.0) >= quiet {
                free.push((port, ep));
            }
        }
        free
    }

    /// The owners table was read to its end: those not seen in this pass
    /// are gone (freed, or their mapping ended).
    pub fn pass_done(&mut self) {
        let pass = self.pass;
        self.watched.retain(|_, w| w.1 == pass);
        self.pass += 1;
    }

    /// A port was freed.
    pub fn freed(&mut self, port: u16, ep: NatEndpoint) {
        self.watched.remove(&(port, ep));
    }

    pub fn len(&self) -> usize {
        self.watched.len()
    }

    pub fn is_empty(&self) -> bool {
        self.watched.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use firewall_common::IPPROTO_TCP;

    use super::*;

    const NAT: [u8; 4] = [192, 0, 2, 1];
    const IN: [u8; 4] = [10, 1, 0, 2];
    const PEER: [u8; 4] = [198, 51, 100, 7];
    const SEC: u64 = 1_000_000_000;

    /// Both entries of an outbound UDP flow from IN:5000 to PEER:port,
    /// translated to NAT:nat_port, last seen at `out` and `back`.
    fn pair(peer_port: u16, nat_port: u16, out: u64, back: u64) -> [(FlowKey, FlowValue); 2] {
        let k = FlowKey::new(IPPROTO_UDP, IN, 5000, PEER, peer_port);
        let mut v = FlowValue::forward(NAT, nat_port, PEER, peer_port);
        v.kind = flow_kind::PRIMARY;
        v.last_seen_ns = out;
        let rk = FlowKey::new(IPPROTO_UDP, PEER, peer_port, NAT, nat_port);
        let mut rv = FlowValue::forward(PEER, peer_port, IN, 5000);
        rv.kind = flow_kind::PRIMARY;
        rv.last_seen_ns = back;
        [(k, v), (rk, rv)]
    }

    #[test]
    fn the_latest_flow_of_either_direction_refreshes_its_mapping() {
        let mut batch = Vec::new();
        batch.extend(pair(53, 7000, 10 * SEC, 12 * SEC));
        batch.extend(pair(3478, 7000, 40 * SEC, 5 * SEC));
        let r = refreshes(&batch, NAT);
        assert_eq!(r.len(), 1);
        assert_eq!(r[&(NatEndpoint::new(IN, 5000), 7000)], 40 * SEC);
        // Only the inbound entry of a pair in this batch still counts.
        let r = refreshes(&batch[1..2], NAT);
        assert_eq!(r[&(NatEndpoint::new(IN, 5000), 7000)], 12 * SEC);
        // Flows of one endpoint on two ports (two CPUs mapped it at once)
        // are told apart.
        batch.extend(pair(123, 7005, 50 * SEC, 0));
        let r = refreshes(&batch, NAT);
        assert_eq!(r[&(NatEndpoint::new(IN, 5000), 7000)], 40 * SEC);
        assert_eq!(r[&(NatEndpoint::new(IN, 5000), 7005)], 50 * SEC);
    }

    #[test]
    fn other_flows_refresh_nothing() {
        let mut batch = Vec::new();
        // TCP, and a secondary connection's UDP flow.
        let mut tcp = pair(80, 7000, SEC, SEC);
        for (k, _) in tcp.iter_mut() {
            k.protocol = IPPROTO_TCP;
        }
        batch.extend(tcp);
        let mut secondary = pair(53, 7001, SEC, SEC);
        for (_, v) in secondary.iter_mut() {
            v.kind = flow_kind::STATIC;
        }
        batch.extend(secondary);
        assert!(refreshes(&batch, NAT).is_empty());
        // Flows of another port than the mapping's are not its own.
        let m = UdpMapping {
            nat_port: 7002,
            last_seen_ns: SEC,
            ..Default::default()
        };
        assert_eq!(raised(&m, 7000, 9 * SEC), None);
        assert_eq!(raised(&m, 7002, 9 * SEC), Some(9 * SEC));
        assert_eq!(raised(&m, 7002, SEC), None, "not newer");
    }

    #[test]
    fn a_mapping_ends_after_its_quiet_time_and_not_before_its_flows() {
        let m = |port, seen| {
            (
                NatEndpoint::new(IN, port),
                UdpMapping {
                    nat_port: port,
                    last_seen_ns: seen,
                    ..Default::default()
                },
            )
        };
        let quiet = quiet_needed(
            Duration::from_secs(300),
            Duration::from_secs(60),
            Duration::from_secs(64),
        );
        assert_eq!(quiet, Duration::from_secs(300));
        let now = 1000 * SEC;
        let entries = [m(7000, now - 300 * SEC), m(7001, now - 299 * SEC)];
        assert_eq!(
            expired(&entries, now, quiet),
            vec![(NatEndpoint::new(IN, 7000), 7000)]
        );
        // A long udp_idle and a slow sweep stretch the wait.
        assert_eq!(
            quiet_needed(
                Duration::from_secs(300),
                Duration::from_secs(280),
                Duration::from_secs(64)
            ),
            Duration::from_secs(344)
        );
        // A stamp from the future (a clock read before it) is not expired.
        assert!(expired(&[m(7000, now + SEC)], now, quiet).is_empty());
    }

    #[test]
    fn an_orphaned_port_is_freed_once_it_and_its_flows_are_quiet() {
        let ep = NatEndpoint::new(IN, 5000);
        let other = NatEndpoint::new(IN, 5001);
        let quiet = Duration::from_secs(300);
        let mut o = Orphans::default();
        // 7000 is its mapping's; 7001's owner has no mapping; 7002's owner
        // is mapped to another port.
        let owners = [
            (7000, ep, Some(7000)),
            (7001, other, None),
            (7002, ep, Some(7000)),
        ];
        let t0 = 1000 * SEC;
        assert!(o.batch(&owners, t0, quiet).is_empty(), "first seen now");
        assert_eq!(o.len(), 2);
        // A flow still translated to 7002 keeps it.
        o.touch(&Activity::from([((ep, 7002), t0 + 100 * SEC)]));
        assert_eq!(o.batch(&owners, t0 + 300 * SEC, quiet), vec![(7001, other)]);
        o.freed(7001, other);
        assert_eq!(o.batch(&owners[2..], t0 + 399 * SEC, quiet), vec![]);
        assert_eq!(
            o.batch(&owners[2..], t0 + 400 * SEC, quiet),
            vec![(7002, ep)]
        );
        // Mapped again meanwhile: no longer watched.
        assert!(o
            .batch(&[(7002, ep, Some(7002))], t0 + 500 * SEC, quiet)
            .is_empty());
        assert!(o.is_empty());
    }

    #[test]
    fn a_port_not_seen_in_a_whole_pass_is_forgotten() {
        let ep = NatEndpoint::new(IN, 5000);
        let quiet = Duration::from_secs(300);
        let mut o = Orphans::default();
        o.batch(&[(7001, ep, None)], SEC, quiet);
        o.pass_done();
        assert_eq!(o.len(), 1, "seen in the pass that ended");
        o.batch(&[(7003, ep, None)], 2 * SEC, quiet);
        o.pass_done();
        assert_eq!(o.len(), 1, "7001 was freed by someone else");
        // Seen again later: watched from then, not from before.
        assert!(o.batch(&[(7001, ep, None)], 400 * SEC, quiet).is_empty());
    }
}
