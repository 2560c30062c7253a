//! Per-CPU counters: one slot per verdict reason, indexed by `Counter`.
//!
//! Every packet the datapath sees is counted exactly once, under the reason of
//! its verdict (Cilium style: every drop has a reason and a counter).

/// Packets and bytes (L2 frame length) counted under one reason, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatValue {
    pub packets: u64,
    pub bytes: u64,
}

/// The XDP verdict a counter belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
    Redirect,
}

impl Verdict {
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Drop => "drop",
            Verdict::Redirect => "redirect",
        }
    }
}

macro_rules! counters {
    ($($variant:ident = $idx:literal, $verdict:ident, $name:literal, $help:literal;)*) => {
        /// Why a packet got its verdict. The discriminant is the index in the STATS map.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter { $($variant = $idx,)* }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)*];
            pub const fn verdict(self) -> Verdict { match self { $(Counter::$variant => Verdict::$verdict,)* } }
            /// Stable snake_case name used in CLI/JSON output.
            pub const fn name(self) -> &'static str { match self { $(Counter::$variant => $name,)* } }
            pub const fn help(self) -> &'static str { match self { $(Counter::$variant => $help,)* } }
        }
    };
}

counters! {
    PassNotIpv4 = 0, Pass, "pass_not_ipv4", "not IPv4 and not to be forwarded (ARP, IPv6 for the firewall itself, ...): the stack's";
    DropVlan = 1, Drop, "drop_vlan", "a VLAN-tagged frame (also one whose tag the NIC took off): a VLAN is firewalled on its own interface";
    PassFragment = 2, Pass, "pass_fragment", "IPv4 fragment addressed to the firewall itself: the stack's";
    PassNotTcpUdp = 3, Pass, "pass_not_tcp_udp", "IPv4 but neither TCP nor UDP (ICMP, ...), addressed to the firewall itself";
    PassNoFlow = 4, Pass, "pass_no_flow", "TCP/UDP without a flow entry, addressed to the firewall itself or one of its sockets (interception, relay)";
    PassTtlExceeded = 5, Pass, "pass_ttl_exceeded", "TTL <= 1: the stack answers with ICMP time exceeded";
    PassFragNeeded = 6, Pass, "pass_frag_needed", "larger than the egress MTU with DF set: the stack answers ICMP";
    Redirected = 7, Redirect, "redirected", "translated and redirected out of the egress interface";
    DropMalformed = 8, Drop, "drop_malformed", "truncated or inconsistent IPv4/TCP/UDP header";
    DropFlowAction = 9, Drop, "drop_flow_action", "the flow entry says drop";
    DropNoNeighbour = 10, Drop, "drop_no_neighbour", "next hop has no resolved neighbour entry";
    DropNoRoute = 11, Drop, "drop_no_route", "no route (unreachable, blackhole, prohibit) for the translated packet";
    DropNotForwarded = 12, Drop, "drop_not_forwarded", "translated packet would not be forwarded (local, forwarding off, unsupported)";
    DropEgressMismatch = 13, Drop, "drop_egress_mismatch", "the route leaves through another interface than the flow allows";
    DropFragNeeded = 14, Drop, "drop_frag_needed", "larger than the egress MTU without DF (would need fragmenting)";
    DropChecksum = 15, Drop, "drop_checksum", "checksum could not be recomputed (segment too long)";
    DropRedirectFailed = 16, Drop, "drop_redirect_failed", "bpf_redirect refused the egress interface";
    PinholeEstablished = 17, Redirect, "redirect_pinhole_established", "first packet of a secondary connection: flows created, then redirected";
    DropPinholeExpired = 18, Drop, "drop_pinhole_expired", "the pinhole's TIMEOUT deadline has passed";
    DropPinholeUsed = 19, Drop, "drop_pinhole_used", "a single-use pinhole was already used (no ALLOW_MULTIPLE)";
    DropPinholeSource = 20, Drop, "drop_pinhole_source", "a redirect used by another host than the session's client";
    DropPeerFiltered = 21, Drop, "drop_peer_filtered", "the peer is outside the pinhole's IP filter";
    DropPinholeNoTarget = 22, Drop, "drop_pinhole_no_target", "the client address is still the placeholder (SetClientAddress not called)";
    DropPinholeNotSyn = 23, Drop, "drop_pinhole_not_syn", "a TCP segment other than SYN tried to open a pinhole";
    DropNatPortsBusy = 24, Drop, "drop_nat_ports_busy", "all SNAT ports of the pinhole are in use";
    DropClientQuota = 25, Drop, "drop_client_quota", "the client has its quota of concurrent secondary TCP connections";
    PassIntercepted = 26, Pass, "pass_intercepted", "TC: a primary connection's SYN handed to the daemon (also counted by XDP as it passed)";
    PassTransparent = 27, Pass, "pass_transparent", "TC: a segment for a socket the daemon answers for transparently, delivered locally";
    DropNoInterceptor = 28, Drop, "drop_no_interceptor", "a primary connection to intercept, but the daemon's listener is gone";
    DropReplyPathsFull = 29, Drop, "drop_reply_paths_full", "a bidirectional UDP pinhole gave its most reply paths to other peers";
    PrimaryEstablished = 30, Redirect, "redirect_primary_established", "first packet of an allowed outbound connection: tracked, its flows created, translated";
    DropNoFlow = 31, Drop, "drop_no_flow", "to be forwarded, but no flow, pinhole or rule allows it (default deny)";
    DropNotAllowed = 32, Drop, "drop_not_allowed", "a new connection from a source no rule allows (or before the wall is configured)";
    DropNatExhausted = 33, Drop, "drop_nat_exhausted", "no free NAT port for a new outbound connection";
    DropFragment = 34, Drop, "drop_fragment", "an IPv4 fragment to be forwarded that no forwarded first fragment speaks for (arrived first, its first refused or 30 s old), or one overlapping the L4 header";
    DropNotTcpUdp = 35, Drop, "drop_not_tcp_udp", "ICMP other than echo and errors, or another protocol, to be forwarded (not tracked)";
    DropIpv6 = 36, Drop, "drop_ipv6", "IPv6 to be forwarded (not tracked yet)";
    PublishedEstablished = 37, Redirect, "redirect_published_established", "first packet of a connection to a published server: its flows created, forwarded to the server";
    PassIcmpError = 38, Pass, "pass_icmp_error", "an ICMP error quoting no tracked flow, addressed to the firewall itself: the stack's";
    RedirectedIcmpError = 39, Redirect, "redirect_icmp_error", "an ICMP error quoting a tracked flow: outer and quoted headers translated, forwarded (RFC 5508)";
    DropIcmpUnrelated = 40, Drop, "drop_icmp_unrelated", "an ICMP error to be forwarded that quotes no tracked flow, or not addressed to the quoted packet's source";
    RedirectedFragment = 41, Redirect, "redirect_fragment", "a later fragment of a datagram whose first fragment was forwarded: its addresses translated, forwarded";
    DropRule = 42, Drop, "drop_rule", "a new outbound connection no access rule allows (a deny rule matched, or none did)";
    TftpEstablished = 43, Redirect, "redirect_tftp_established", "a TFTP server's first answer from its transfer port, to the endpoint that asked it: tracked, its flows created, translated";
    DropFtpDiverted = 44, Drop, "drop_ftp_diverted", "a segment of an FTP control connection forwarded in place that is not a plain line at its direction's next byte: handed to the daemon, which sends what the filter makes of it";
    DropInPlaceState = 45, Drop, "drop_ftp_inplace_state", "a segment of an FTP control connection forwarded in place whose state is gone, or could not be made (also a SYN to it carrying data or fragmented: bytes that could not be judged)";
}

/// Number of slots in the STATS map.
pub const COUNTER_SLOTS: u32 = 64;
const _: () = assert!(Counter::ALL.len() as u32 <= COUNTER_SLOTS);
/// The STATS slot that counts events the EVENTS ring had no room for (not a
/// verdict: `packets` counts lost events). The last slot, after every counter.
pub const EVENTS_LOST_SLOT: u32 = COUNTER_SLOTS - 1;
/// The STATS slot of the FTP control lines the stream verdict forwarded from
/// one of the proxy's sockets to the other (`packets` counts lines, `bytes`
/// their payload): not a verdict on a packet, so not among the counters.
pub const FTP_LINES_SLOT: u32 = COUNTER_SLOTS - 2;
const _: () = assert!((Counter::ALL.len() as u32) < FTP_LINES_SLOT);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields only.
    unsafe impl aya::Pod for super::StatValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discriminants_are_dense_and_names_unique() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{c:?}");
            for d in &Counter::ALL[i + 1..] {
                assert_ne!(c.name(), d.name());
            }
            let prefix = c.verdict().name();
            assert!(c.name().starts_with(prefix), "{} vs {prefix}", c.name());
        }
    }
}
