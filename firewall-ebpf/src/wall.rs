//! The wall: the fate of a packet that neither a flow nor a pinhole claims.
//!
//! The FIB says whether the stack would forward it. If not (addressed to the
//! firewall itself, broadcast, forwarding off, no route), it is the stack's,
//! where the operator's own input rules apply. If it would be forwarded, it is
//! this datapath's alone: the first packet of a new outbound TCP, UDP or ICMP
//! echo connection from an allowed source network creates the connection's
//! two flow entries here (source NAT to the external address; no round trip
//! to user space); a socket of the firewall's own (the interception, the
//! relay's transparent listeners) takes what is addressed to it; everything
//! else is dropped under a named counter. A published server's endpoint is
//! checked first (it is one of the firewall's own addresses). Nothing the
//! pipeline cannot parse is left to the stack's forwarding.

use aya_ebpf::{
    bindings::{bpf_sock_tuple, BPF_F_CURRENT_NETNS, BPF_NOEXIST},
    btf_maps::{lpm_trie::Key, Array, HashMap, LpmTrie},
    helpers::generated::{
        bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_sk_lookup_tcp, bpf_sk_lookup_udp,
        bpf_sk_release,
    },
    macros::btf_map,
};
use firewall_common::{
    flow::{flow_kind, FlowKey, FlowValue},
    map_sizes,
    pinhole::side,
    rules::{rule_action, Rule, RULE_BANKS, RULE_SLOTS},
    stats::Counter,
    wall::{
        counter_slot, nat_port, nat_start, PublishKey, PublishValue, SourceValue, WallConf,
        NAT_COUNTER_SLOTS, NAT_TRIES,
    },
    IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    fib,
    flow::{self, FLOWS},
    hook::Hook,
    inplace, intercept,
    parse::{Bare, Packet},
    scratch, udp_nat,
};

#[btf_map]
pub(crate) static WALL_CONF: Array<WallConf, 1> = Array::new();

/// Published servers: external endpoints forwarded to internal servers.
#[btf_map]
static PUBLISHED: HashMap<PublishKey, PublishValue, { map_sizes::PUBLISHED as usize }> =
    HashMap::new();

/// Connections so far per destination slot (`wall::counter_slot`): where
/// the next connection's NAT port search starts (`wall::nat_start`).
#[btf_map]
static NAT_COUNTERS: Array<u32, { NAT_COUNTER_SLOTS as usize }> = Array::new();

/// Source networks that may open connections through the firewall.
#[btf_map]
static WALL_SOURCES: LpmTrie<[u8; 4], SourceValue, { map_sizes::WALL_SOURCES as usize }> =
    LpmTrie::new();

/// Access rules for new outbound connections, two banks (`rules`).
#[btf_map]
static RULES: Array<Rule, { (RULE_SLOTS * RULE_BANKS) as usize }> = Array::new();

/// The bank of `RULES` in force (0 or 1).
#[btf_map]
static RULES_ACTIVE: Array<u32, 1> = Array::new();

/// For a parsed packet without a flow or pinhole: `PrimaryEstablished` (or
/// `PublishedEstablished`) once the new connection's flows are in `FLOWS`,
/// otherwise the counter that decides the packet. A function of its own (a
/// BPF-to-BPF call): its stack frame is not the pipeline's, which the
/// 512-byte limit requires.
#[inline(never)]
pub fn admit<H: Hook>(ctx: &H, pkt: &Packet, side: u8) -> Counter {
    if side == side::EXTERNAL && pkt.key.protocol != IPPROTO_ICMP {
        let k = &pkt.key;
        // SAFETY: a read of a map value the control plane only replaces whole.
        if let Some(p) =
            unsafe { PUBLISHED.get(PublishKey::new(k.protocol, k.dst_addr, k.dst_port)) }
        {
            return match publish(ctx, pkt, p) {
                Ok(()) => Counter::PublishedEstablished,
                Err(c) => c,
            };
        }
    }
    match admit_inner(ctx, pkt, side) {
        Ok(()) => Counter::PrimaryEstablished,
        Err(c) => c,
    }
}

/// Both entries of a connection to a published server: the packet's
/// direction forwarded to the server (destination translated), the server's
/// answers sent back from the published endpoint.
#[inline(always)]
fn publish<H: Hook>(ctx: &H, pkt: &Packet, p: &PublishValue) -> Result<(), Counter> {
    let k = &pkt.key;
    if k.protocol == IPPROTO_TCP && !pkt.syn_only {
        return Err(Counter::DropNoFlow);
    }
    let v = &mut scratch::get().ok_or(Counter::DropNoFlow)?.flow;
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let rk = FlowKey::new(
        k.protocol,
        p.server_addr,
        p.server_port,
        k.src_addr,
        k.src_port,
    );
    *v = FlowValue::forward(k.dst_addr, k.dst_port, k.src_addr, k.src_port);
    v.kind = flow_kind::PRIMARY;
    v.egress_ifindex = ctx.ingress_ifindex();
    v.last_seen_ns = now;
    let reply: &FlowValue = v;
    // The server's own connection to the same peer endpoint would own the
    // reply key already: not taken over.
    if FLOWS.insert(rk, reply, BPF_NOEXIST as u64).is_err() {
        return Err(Counter::DropNatExhausted);
    }
    v.nat_src_addr = k.src_addr;
    v.nat_src_port = k.src_port;
    v.nat_dst_addr = p.server_addr;
    v.nat_dst_port = p.server_port;
    v.egress_ifindex = p.egress_ifindex;
    flow::insert(k, v)
}

#[inline(always)]
fn admit_inner<H: Hook>(ctx: &H, pkt: &Packet, side: u8) -> Result<(), Counter> {
    let k = &pkt.key;
    let scratch = scratch::get().ok_or(Counter::DropNotAllowed)?;
    let rc = fib::route_in(
        ctx,
        &mut scratch.fib,
        k.protocol,
        (k.src_addr, k.src_port),
        (k.dst_addr, k.dst_port),
        ctx.fib_tot_len(fib::l3_len(pkt)),
    );
    if !fib::forwards(rc) {
        return Err(if k.protocol == IPPROTO_ICMP {
            Counter::PassNotTcpUdp
        } else {
            Counter::PassNoFlow
        });
    }
    if side != side::INTERNAL {
        // Unsolicited from outside: nothing may open a connection in (and
        // no socket of ours answers forwarded traffic there: only the
        // internal side's TC program marks packets for local delivery).
        return Err(Counter::DropNoFlow);
    }
    let egress = scratch.fib.ifindex;
    if k.protocol != IPPROTO_ICMP && own_socket(ctx, &pkt.key, &mut scratch.tuple) {
        // The stack delivers it to the socket (TC marks it for local delivery).
        return Err(Counter::PassNoFlow);
    }
    let Some(conf) = WALL_CONF.get(0) else {
        return Err(Counter::DropNotAllowed);
    };
    // Before the interception: the FTP filter sees only connections the
    // rules let out (its own connection to the server is the firewall's).
    if !conf.admits() || !source_allowed(k.src_addr) {
        return Err(Counter::DropNotAllowed);
    }
    if egress == conf.external_ifindex && !rules_allow(k) {
        return Err(Counter::DropRule);
    }
    if let Some(c) = intercept::claim(ctx, pkt, egress, &mut scratch.tuple) {
        return Err(c);
    }
    if egress != conf.external_ifindex || (k.protocol != IPPROTO_UDP && !pkt.syn_only) {
        // Between internal networks (not tracked), or TCP/ICMP that opens nothing.
        return Err(Counter::DropNoFlow);
    }
    create_flows(ctx, pkt, conf, &mut scratch.flow, &mut scratch.inplace)
}

/// For an IP packet the pipeline does not translate (the counter `parsed`
/// gave it): the stack's if not to be forwarded, otherwise dropped.
#[inline(never)]
pub fn untracked<H: Hook>(ctx: &H, parsed: Counter) -> Counter {
    let Some(scratch) = scratch::get() else {
        return parsed;
    };
    let p = &mut scratch.fib;
    let forwarded = match crate::parse::bare(ctx.data(), ctx.data_end()) {
        // ARP and the like: no router forwards them.
        None => return parsed,
        Some(Bare::V4 { protocol, src, dst }) => {
            fib::forwards(fib::route_in(ctx, p, protocol, (src, 0), (dst, 0), 0))
        }
        Some(Bare::V6 {
            next_header,
            src,
            dst,
        }) => fib::forwards(fib::route_v6(ctx, p, next_header, src, dst)),
    };
    if !forwarded {
        return parsed;
    }
    match parsed {
        Counter::PassFragment => Counter::DropFragment,
        Counter::PassNotTcpUdp => Counter::DropNotTcpUdp,
        Counter::PassIcmpError => Counter::DropIcmpUnrelated,
        Counter::PassNotIpv4 => Counter::DropIpv6,
        other => other,
    }
}

/// The first entry of the active bank that matches decides; the end of the
/// list or no match denies (`rules::allows` is the same on the host).
#[inline(always)]
fn rules_allow(k: &FlowKey) -> bool {
    let bank = match RULES_ACTIVE.get(0) {
        Some(b) if *b < RULE_BANKS => *b,
        _ => return false,
    };
    for i in 0..RULE_SLOTS {
        let Some(r) = RULES.get(bank * RULE_SLOTS + i) else {
            return false;
        };
        if r.action == rule_action::END {
            return false;
        }
        if r.matches(k.protocol, k.src_addr, k.dst_addr, k.dst_port) {
            return r.action == rule_action::ALLOW;
        }
    }
    false
}

#[inline(always)]
fn source_allowed(addr: [u8; 4]) -> bool {
    let k = Key::new(32, addr);
    WALL_SOURCES.get(&k).is_some_and(|v| v.allow != 0)
}

/// Whether a socket of the firewall is bound to exactly the packet's
/// destination (a wildcard listener never captures forwarded traffic).
#[inline(always)]
fn own_socket<H: Hook>(ctx: &H, k: &FlowKey, tuple: &mut bpf_sock_tuple) -> bool {
    *tuple = intercept::tuple4(k.src_addr, k.src_port, k.dst_addr, k.dst_port);
    // SAFETY: `tuple` lives across the call; a returned socket is released below.
    let sk = unsafe {
        // Full sockets only (not bpf_skc_lookup_tcp): both branches then
        // return the same pointer type, which the verifier requires of the
        // one load below.
        if k.protocol == IPPROTO_TCP {
            bpf_sk_lookup_tcp(
                ctx.as_ptr() as *mut _,
                tuple as *mut bpf_sock_tuple,
                intercept::TUPLE4,
                BPF_F_CURRENT_NETNS as u64,
                0,
            )
        } else {
            bpf_sk_lookup_udp(
                ctx.as_ptr() as *mut _,
                tuple as *mut bpf_sock_tuple,
                intercept::TUPLE4,
                BPF_F_CURRENT_NETNS as u64,
                0,
            )
        }
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket the lookup returned, released right after reading.
    let bound = unsafe { (*sk).src_ip4 };
    unsafe { bpf_sk_release(sk as *mut _) };
    bound == u32::from_ne_bytes(k.dst_addr)
}

/// Both entries of a new primary connection: the reply's first, under a
/// free NAT port (taken with BPF_NOEXIST, so two CPUs never share one).
/// UDP sends from its source endpoint's mapping (`udp_nat`); TCP and ICMP
/// echo take a port per destination (`nat_start`).
#[inline(always)]
fn create_flows<H: Hook>(
    ctx: &H,
    pkt: &Packet,
    conf: &WallConf,
    v: &mut FlowValue,
    in_place: &mut inplace::Start,
) -> Result<(), Counter> {
    let k = &pkt.key;
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // One value on the stack, the reply's first and then the packet's.
    *v = FlowValue::forward(k.dst_addr, k.dst_port, k.src_addr, k.src_port);
    v.kind = flow_kind::PRIMARY;
    v.egress_ifindex = ctx.ingress_ifindex();
    // Created counts as seen (the sweeper must not find it idle since boot).
    v.last_seen_ns = now;
    let mut port = 0u16;
    // By reference: a copy would take stack room there is not.
    let reply: &FlowValue = v;
    if k.protocol == IPPROTO_UDP {
        let mapped = udp_nat::mapped_port(u32::from_ne_bytes(k.src_addr), k.src_port, now) as u16;
        // The port is the endpoint's alone: its reply key is free unless
        // this very flow was made meanwhile (another CPU).
        if mapped != 0 && claim_reply(k, conf, mapped, reply) {
            port = mapped;
        }
    } else {
        let secret = conf.port_secret;
        let slot = counter_slot(secret, k.protocol, k.dst_addr, k.dst_port);
        // A plain read and write, not atomic: two CPUs that read the same count
        // start at the same port, and the second takes the next free one.
        let count = match NAT_COUNTERS.get_ptr_mut(slot) {
            // SAFETY: a slot of the array; u32 reads and writes do not tear.
            Some(c) => unsafe {
                let n = *c;
                *c = n.wrapping_add(1);
                n
            },
            // SAFETY: a helper without arguments (unreachable: the slot is in range).
            None => unsafe { bpf_get_prandom_u32() },
        };
        let start = nat_start(secret, k.protocol, k.dst_addr, k.dst_port, count);
        for attempt in 0..NAT_TRIES {
            let candidate = nat_port(
                conf.nat_port_lo,
                conf.nat_port_hi,
                k.src_port,
                start,
                attempt,
            );
            if published(k.protocol, conf.nat_addr, candidate) {
                continue;
            }
            if claim_reply(k, conf, candidate, reply) {
                port = candidate;
                break;
            }
        }
    }
    if port == 0 {
        return Err(Counter::DropNatExhausted);
    }
    v.nat_src_addr = conf.nat_addr;
    v.nat_src_port = port;
    v.nat_dst_addr = k.dst_addr;
    v.nat_dst_port = k.dst_port;
    v.egress_ifindex = conf.external_ifindex;
    // A connection to be read in place: its state, and both entries say
    // so. Decided after the port search, so that the verifier does not
    // follow the search once for each kind of flow.
    match inplace::mark(ctx, pkt, in_place, v) {
        Counter::Redirected => {}
        c => return Err(c),
    }
    flow::insert(k, v)
}

/// Whether `addr:port` is a published server's: never a translation's.
#[inline(always)]
pub(crate) fn published(protocol: u8, addr: [u8; 4], port: u16) -> bool {
    // SAFETY: a presence check; nothing is read.
    unsafe { PUBLISHED.get(PublishKey::new(protocol, addr, port)) }.is_some()
}

/// Inserts the reply entry of `k` translated to NAT port `port`, unless
/// that key is taken.
#[inline(always)]
fn claim_reply(k: &FlowKey, conf: &WallConf, port: u16, reply: &FlowValue) -> bool {
    let rk = FlowKey::new(k.protocol, k.dst_addr, k.dst_port, conf.nat_addr, port);
    // A lookup first: a failed insert into an LRU map may evict an entry.
    FLOWS.get_ptr(rk).is_none() && FLOWS.insert(rk, reply, BPF_NOEXIST as u64).is_ok()
}
