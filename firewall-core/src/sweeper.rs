//! Expiry of flow entries: idle timeouts and TCP teardown.
//!
//! The datapath stamps `last_seen_ns` (CLOCK_MONOTONIC) and accumulates the TCP
//! flags it saw; the daemon periodically removes what is done. The two
//! directions of a connection expire together: a one-way UDP stream must not
//! lose its (idle) reply entry while it is still sending.

use std::collections::HashMap;

use firewall_common::{
    flow::{tcp_seen, FlowKey, FlowValue},
    IPPROTO_TCP,
};
use serde::Serialize;

use crate::timeouts::Timeouts;

/// Why a flow was removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Expiry {
    /// TCP with RST, or FIN in both directions, and quiet for `tcp_closing`.
    TcpClosed,
    /// Established TCP quiet for `tcp_established`.
    TcpIdle,
    /// TCP that one side never answered, quiet for `tcp_transitory`.
    TcpUnanswered,
    /// UDP quiet for `udp_idle`.
    UdpIdle,
}

/// Counts of removed flows by reason, since the daemon started.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct SweepStats {
    pub tcp_closed: u64,
    pub tcp_idle: u64,
    #[serde(default)]
    pub tcp_unanswered: u64,
    pub udp_idle: u64,
    /// Pinholes closed unused at their TIMEOUT deadline.
    #[serde(default)]
    pub pinholes_timed_out: u64,
    /// Connection attempts the user-mode relay turned away.
    #[serde(default)]
    pub relay_refused: u64,
    /// Connections a data filter ended.
    #[serde(default)]
    pub relay_blocked: u64,
    /// UDP mappings ended because their client went over its quota.
    #[serde(default)]
    pub client_quota: u64,
    /// Calls refused because their session had its most pinholes waiting.
    #[serde(default)]
    pub pending_refused: u64,
}

impl SweepStats {
    pub fn add(&mut self, e: Expiry) {
        match e {
            Expiry::TcpClosed => self.tcp_closed += 1,
            Expiry::TcpIdle => self.tcp_idle += 1,
            Expiry::TcpUnanswered => self.tcp_unanswered += 1,
            Expiry::UdpIdle => self.udp_idle += 1,
        }
    }
}

/// The key of the packets that answer `(key, value)`: they come from the
/// translated destination and go to the translated source.
pub fn reply_key(key: &FlowKey, value: &FlowValue) -> FlowKey {
    FlowKey::new(
        key.protocol,
        value.nat_dst_addr,
        value.nat_dst_port,
        value.nat_src_addr,
        value.nat_src_port,
    )
}

/// Whether the TCP connection of a flow `value` and its pair `peer` has
/// ended: RST in either direction, or FIN in both.
pub fn tcp_ended(value: &FlowValue, peer: Option<&FlowValue>) -> bool {
    let seen = |f: u8| {
        let mine = value.tcp_flags_seen & f != 0;
        let theirs = peer.is_some_and(|p| p.tcp_flags_seen & f != 0);
        (mine, theirs)
    };
    let (rst_mine, rst_theirs) = seen(tcp_seen::RST);
    let (fin_mine, fin_theirs) = seen(tcp_seen::FIN);
    rst_mine || rst_theirs || (fin_mine && fin_theirs)
}

/// The entries to remove at monotonic time `now_ns`, each with its reason.
pub fn expired(
    entries: &[(FlowKey, FlowValue)],
    now_ns: u64,
    t: &Timeouts,
) -> Vec<(FlowKey, Expiry)> {
    let by_key: HashMap<FlowKey, &FlowValue> = entries.iter().map(|(k, v)| (*k, v)).collect();
    let mut out = Vec::new();
    for (key, value) in entries {
        // The pair: this entry and the one for the answers, when it exists and
        // points back at this one.
        let rkey = reply_key(key, value);
        let peer = by_key.get(&rkey).filter(|r| reply_key(&rkey, r) == *key);
        let last_seen = peer.map_or(value.last_seen_ns, |p| {
            p.last_seen_ns.max(value.last_seen_ns)
        });
        let idle_ns = now_ns.saturating_sub(last_seen);
        let reason = if key.protocol == IPPROTO_TCP {
            // One direction never carried a packet: a SYN nobody answered.
            let unanswered = peer.is_some_and(|p| p.packets == 0 || value.packets == 0);
            if tcp_ended(value, peer.copied()) && idle_ns >= t.tcp_closing.as_nanos() as u64 {
                Some(Expiry::TcpClosed)
            } else if unanswered && idle_ns >= t.tcp_transitory.as_nanos() as u64 {
                Some(Expiry::TcpUnanswered)
            } else if idle_ns >= t.tcp_established.as_nanos() as u64 {
                Some(Expiry::TcpIdle)
            } else {
                None
            }
        } else if idle_ns >= t.udp_idle.as_nanos() as u64 {
            Some(Expiry::UdpIdle)
        } else {
            None
        };
        if let Some(r) = reason {
            out.push((*key, r));
        }
    }
    out
}

/// The reply keys of closing TCP entries of `batch` whose pair is not in it
/// (a batch of the table can split a pair): read them too, so that both
/// directions are judged together.
pub fn missing_peers(batch: &[(FlowKey, FlowValue)]) -> Vec<FlowKey> {
    let have: std::collections::HashSet<FlowKey> = batch.iter().map(|(k, _)| *k).collect();
    batch
        .iter()
        .filter(|(k, v)| {
            k.protocol == IPPROTO_TCP && v.tcp_flags_seen & (tcp_seen::FIN | tcp_seen::RST) != 0
        })
        .map(|(k, v)| reply_key(k, v))
        .filter(|r| !have.contains(r))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use firewall_common::IPPROTO_UDP;

    use super::*;

    #[test]
    fn a_tcp_connection_ends_at_rst_or_fin_both_ways() {
        let with = |flags: u8| FlowValue {
            tcp_flags_seen: flags,
            ..FlowValue::default()
        };
        let (fin, rst) = (tcp_seen::FIN, tcp_seen::RST);
        assert!(!tcp_ended(&with(fin), Some(&with(0))), "FIN one way");
        assert!(!tcp_ended(&with(fin), None), "FIN one way, no pair");
        assert!(tcp_ended(&with(fin), Some(&with(fin))));
        assert!(tcp_ended(&with(0), Some(&with(rst))));
        assert!(tcp_ended(&with(rst), None));
    }

    const S: u64 = 1_000_000_000;

    fn t() -> Timeouts {
        Timeouts {
            tcp_established: Duration::from_secs(100),
            tcp_closing: Duration::from_secs(10),
            tcp_transitory: Duration::from_secs(50),
            udp_idle: Duration::from_secs(30),
            ..Timeouts::default()
        }
    }

    /// A translated connection: client 10.1.0.2:1000 -> server 10.2.0.2:80 as 10.2.0.1:5000.
    fn pair(
        protocol: u8,
        out_seen: u64,
        back_seen: u64,
        out_flags: u8,
        back_flags: u8,
    ) -> Vec<(FlowKey, FlowValue)> {
        let (c, s, f) = ([10, 1, 0, 2], [10, 2, 0, 2], [10, 2, 0, 1]);
        let mut o = FlowValue::forward(f, 5000, s, 80);
        o.last_seen_ns = out_seen;
        o.tcp_flags_seen = out_flags;
        o.packets = 1;
        let mut b = FlowValue::forward(s, 80, c, 1000);
        b.last_seen_ns = back_seen;
        b.packets = 1;
        b.tcp_flags_seen = back_flags;
        vec![
            (FlowKey::new(protocol, c, 1000, s, 80), o),
            (FlowKey::new(protocol, s, 80, f, 5000), b),
        ]
    }

    #[test]
    fn reply_keys_pair_up() {
        let p = pair(IPPROTO_TCP, 0, 0, 0, 0);
        assert_eq!(reply_key(&p[0].0, &p[0].1), p[1].0);
        assert_eq!(reply_key(&p[1].0, &p[1].1), p[0].0);
    }

    #[test]
    fn directions_expire_together() {
        // Only the outbound direction is active: nothing expires.
        let p = pair(IPPROTO_UDP, 100 * S, 0, 0, 0);
        assert!(expired(&p, 110 * S, &t()).is_empty());
        // Both quiet for 30 s: both go.
        let gone = expired(&p, 131 * S, &t());
        assert_eq!(gone.len(), 2);
        assert!(gone.iter().all(|(_, r)| *r == Expiry::UdpIdle));
    }

    #[test]
    fn tcp_teardown_uses_the_short_timeout() {
        let fin = tcp_seen::FIN;
        // FIN one way only: still established.
        assert!(expired(&pair(IPPROTO_TCP, 100 * S, 100 * S, fin, 0), 120 * S, &t()).is_empty());
        // FIN both ways, 10 s quiet: closed.
        let gone = expired(
            &pair(IPPROTO_TCP, 100 * S, 100 * S, fin, fin),
            111 * S,
            &t(),
        );
        assert_eq!(gone.len(), 2);
        assert!(gone.iter().all(|(_, r)| *r == Expiry::TcpClosed));
        // RST in either direction is enough.
        assert_eq!(
            expired(
                &pair(IPPROTO_TCP, 100 * S, 100 * S, 0, tcp_seen::RST),
                111 * S,
                &t()
            )
            .len(),
            2
        );
        // Established and quiet for the long timeout.
        let gone = expired(
            &pair(IPPROTO_TCP, 100 * S, 100 * S, tcp_seen::SYN, 0),
            201 * S,
            &t(),
        );
        assert!(gone.iter().all(|(_, r)| *r == Expiry::TcpIdle) && gone.len() == 2);
    }

    #[test]
    fn a_syn_nobody_answered_goes_after_the_transitory_timeout() {
        let mut p = pair(IPPROTO_TCP, 100 * S, 100 * S, tcp_seen::SYN, 0);
        p[1].1.packets = 0;
        assert!(expired(&p, 149 * S, &t()).is_empty());
        let gone = expired(&p, 151 * S, &t());
        assert_eq!(gone.len(), 2);
        assert!(gone.iter().all(|(_, r)| *r == Expiry::TcpUnanswered));
        // Answered, it lives on to the established timeout.
        p[1].1.packets = 1;
        assert!(expired(&p, 151 * S, &t()).is_empty());
    }

    #[test]
    fn a_lone_entry_expires_on_its_own() {
        let p = pair(IPPROTO_UDP, 100 * S, 0, 0, 0);
        let gone = expired(&p[..1], 131 * S, &t());
        assert_eq!(gone.len(), 1);
    }
}
