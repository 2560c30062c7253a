//! The lifetime of UDP mappings (RFC 4787: REQ-5, REQ-6).
//!
//! The datapath creates a mapping (an internal endpoint's external port,
//! the same toward every destination) with its first flow and stamps it
//! whenever another flow is created under it; packets stamp only their
//! flows, so that the fast path writes one entry per packet, not two. The
//! daemon carries the flows' stamps over to their mapping as its sweeper
//! reads the flow table (`refreshes`), and ends a mapping once it has been
//! quiet for the mapping timeout (`expired`): both directions count, as the
//! flows' own timeout counts them.

use std::{collections::HashMap, time::Duration};

use firewall_common::{
    flow::{flow_kind, FlowKey, FlowValue},
    wall::{NatEndpoint, UdpMapping},
    IPPROTO_UDP,
};

/// The latest activity of each mapping's flows in `batch`: internal
/// endpoint → (NAT port, last seen). `nat_addr` is the address primary
/// connections are translated to.
pub fn refreshes(
    batch: &[(FlowKey, FlowValue)],
    nat_addr: [u8; 4],
) -> HashMap<NatEndpoint, (u16, u64)> {
    let mut out: HashMap<NatEndpoint, (u16, u64)> = HashMap::new();
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
        let seen = out.entry(ep).or_insert((port, 0));
        if seen.0 == port {
            seen.1 = seen.1.max(v.last_seen_ns);
        }
    }
    out
}

/// The stamp `m` should carry given its flows' latest activity `seen`
/// (`refreshes`), if that is newer and the flows are the mapping's own
/// (same port); None: nothing to write.
pub fn raised(m: &UdpMapping, seen: (u16, u64)) -> Option<u64> {
    (seen.0 == m.nat_port && seen.1 > m.last_seen_ns).then_some(seen.1)
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
        assert_eq!(r[&NatEndpoint::new(IN, 5000)], (7000, 40 * SEC));
        // Only the inbound entry of a pair in this batch still counts.
        let r = refreshes(&batch[1..2], NAT);
        assert_eq!(r[&NatEndpoint::new(IN, 5000)], (7000, 12 * SEC));
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
        assert_eq!(raised(&m, (7000, 9 * SEC)), None);
        assert_eq!(raised(&m, (7002, 9 * SEC)), Some(9 * SEC));
        assert_eq!(raised(&m, (7002, SEC)), None, "not newer");
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
}
