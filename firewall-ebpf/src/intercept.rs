//! Transparent interception (TC ingress on the internal interface).
//!
//! The SYN of a connection to an intercepted port (FTP's 21) that would be
//! forwarded out of the external interface is assigned to the daemon's
//! transparent listener and marked, so that policy routing delivers it
//! locally; the accepted socket's local address is then the server's. Later
//! segments of such connections, and of the relay's transparent listeners
//! (EPSV in user mode), find their socket by lookup and are marked too. A
//! socket only counts when it is bound to exactly the packet's destination,
//! so a local wildcard listener never captures forwarded traffic.

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, sk_action::SK_PASS, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_F_CURRENT_NETNS, BPF_TCP_TIME_WAIT, TC_ACT_OK, TC_ACT_SHOT,
    },
    btf_maps::{Array, HashMap, LruHashMap, SockMap},
    helpers::generated::{bpf_sk_lookup_tcp, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::{btf_map, classifier, sk_lookup},
    programs::{SkLookupContext, TcContext},
    EbpfContext,
};
use firewall_common::{
    intercept::{InterceptConf, InterceptKey, InterceptTuple, InterceptValue},
    map_sizes,
    stats::Counter,
    IPPROTO_TCP,
};

use crate::{fib, hook::Hook, parse, stats};

/// Intercepted destination ports.
#[btf_map]
static INTERCEPT: HashMap<InterceptKey, InterceptValue, { map_sizes::INTERCEPT as usize }> =
    HashMap::new();

#[btf_map]
static INTERCEPT_CONF: Array<InterceptConf, 1> = Array::new();

/// TC (tcx) ingress on the internal interface: hands primary connections of
/// intercepted protocols to the daemon.
#[classifier]
pub fn tc_internal(ctx: TcContext) -> i32 {
    process(&ctx)
}

/// The listener lookup of the firewall's network namespace: intercepted
/// SYNs go to the daemon's listener.
#[sk_lookup]
pub fn sk_lookup_intercept(ctx: SkLookupContext) -> u32 {
    lookup(&ctx)
}

#[inline(always)]
fn process(ctx: &TcContext) -> i32 {
    let Some(conf) = INTERCEPT_CONF.get(0) else {
        return TC_ACT_OK;
    };
    let mark = conf.mark;
    if mark == 0 {
        return TC_ACT_OK;
    }
    let len = Hook::len(ctx);
    // Headers may sit in paged data: make them linear.
    ctx.prepare();
    let Ok(pkt) = parse::parse_range(ctx.data(), ctx.data_end(), len as usize) else {
        return TC_ACT_OK;
    };
    if pkt.key.protocol != IPPROTO_TCP {
        return TC_ACT_OK;
    }
    let k = &pkt.key;
    let mut tuple = tuple4(k.src_addr, k.src_port, k.dst_addr, k.dst_port);
    // A socket of ours bound to exactly this destination (established,
    // handshaking, closing, or a transparent listener): deliver locally.
    if let Some((bound, state)) = socket_for(ctx, &mut tuple) {
        // A SYN that meets a TIME_WAIT socket of an intercepted connection
        // (the client reuses its port) opens a new one: it is intercepted
        // like any, and the kernel retires the TIME_WAIT socket when the
        // listener lookup gives it our listener, as with netfilter's TPROXY.
        let reopening = pkt.syn_only && state == BPF_TCP_TIME_WAIT;
        if bound == u32::from_ne_bytes(k.dst_addr) && !reopening {
            ctx.set_mark(mark);
            stats::count(Counter::PassTransparent, len);
            return TC_ACT_OK;
        }
    }
    // SAFETY: a read of a map value the control plane only replaces whole.
    let Some(target) = (unsafe { INTERCEPT.get(InterceptKey::new(IPPROTO_TCP, k.dst_port)) })
    else {
        return TC_ACT_OK;
    };
    if !forwarded_out_of(ctx, &pkt, conf.egress_ifindex) {
        // Local destinations, or routes elsewhere: not a connection through the firewall.
        return TC_ACT_OK;
    }
    if !pkt.syn_only {
        // No socket of ours answers for it: the stack would forward it
        // untranslated, past the wall (the datapath passed it for us).
        stats::count(Counter::DropNoFlow, len);
        return TC_ACT_SHOT;
    }
    // The daemon's listener must be there to take it: without it the
    // connection cannot be filtered, and it is dropped (fail closed).
    let mut listener = tuple4(
        k.src_addr,
        k.src_port,
        target.listener_addr,
        target.listener_port,
    );
    if !listening(ctx, &mut listener) {
        aya_log_ebpf::warn!(
            ctx,
            "interception: no listener for a SYN to port {}: dropped",
            k.dst_port
        );
        stats::count(Counter::DropNoInterceptor, len);
        return TC_ACT_SHOT;
    }
    // Recorded for the listener lookup (`sk_lookup`), which the marked SYN
    // meets once policy routing has delivered it locally.
    let syn = InterceptTuple {
        client_addr: k.src_addr,
        server_addr: k.dst_addr,
        client_port: k.src_port,
        server_port: k.dst_port,
    };
    if INTERCEPTING.insert(syn, 1, 0).is_err() {
        stats::count(Counter::DropNoInterceptor, len);
        return TC_ACT_SHOT;
    }
    ctx.set_mark(mark);
    stats::count(Counter::PassIntercepted, len);
    TC_ACT_OK
}

/// SYNs the TC program decided to intercept, waiting for their listener
/// lookup (an entry per SYN; retransmissions record it again).
#[btf_map]
static INTERCEPTING: LruHashMap<InterceptTuple, u32, { map_sizes::INTERCEPTING as usize }> =
    LruHashMap::new();

/// The daemon's interception listener, at index 0.
#[btf_map]
static INTERCEPT_LISTENER: SockMap<1> = SockMap::new();

/// sk_lookup: the listener of a recorded SYN is the daemon's. Everything
/// else is left to the kernel's own lookup.
#[inline(always)]
fn lookup(ctx: &SkLookupContext) -> u32 {
    // SAFETY: the context the kernel passed; these fields are readable.
    let (protocol, remote, local, rport, lport) = unsafe {
        let l = &*ctx.lookup;
        (
            l.protocol,
            l.remote_ip4,
            l.local_ip4,
            l.remote_port,
            l.local_port,
        )
    };
    if protocol != IPPROTO_TCP as u32 {
        return SK_PASS;
    }
    let syn = InterceptTuple {
        client_addr: remote.to_ne_bytes(),
        server_addr: local.to_ne_bytes(),
        client_port: u16::from_be(rport),
        server_port: lport as u16,
    };
    // SAFETY: a plain value read from a map entry.
    if unsafe { INTERCEPTING.get(syn) }.is_none() {
        return SK_PASS;
    }
    let _ = INTERCEPTING.remove(syn);
    // No listener (the daemon is going): the kernel's lookup finds none and
    // the client gets a reset.
    let _ = INTERCEPT_LISTENER.redirect_sk_lookup(ctx, 0, 0);
    SK_PASS
}

/// For the wall, a TCP packet to be forwarded that no socket of ours is
/// bound for: `None` if it is not of an intercepted port routed out of the
/// interface interception watches; otherwise its counter — a SYN passes on
/// to the TC program if the daemon's listener is there and is dropped if not
/// (fail closed, as in TC: not even after a crash does the stack forward
/// it), and a later segment of no connection of ours is dropped.
#[inline(always)]
pub fn claim<H: Hook>(
    ctx: &H,
    pkt: &parse::Packet,
    egress_ifindex: u32,
    listener: &mut bpf_sock_tuple,
) -> Option<Counter> {
    let k = &pkt.key;
    if k.protocol != IPPROTO_TCP {
        return None;
    }
    let conf = INTERCEPT_CONF.get(0)?;
    if conf.mark == 0 || conf.egress_ifindex != egress_ifindex {
        return None;
    }
    // SAFETY: a read of a map value the control plane only replaces whole.
    let target = unsafe { INTERCEPT.get(InterceptKey::new(IPPROTO_TCP, k.dst_port)) }?;
    if !pkt.syn_only {
        // A later segment: passed only to a socket of ours that answers for
        // its destination, in any state (a handshake's request socket, an
        // intercepted connection, TIME_WAIT), which TC then marks.
        *listener = tuple4(k.src_addr, k.src_port, k.dst_addr, k.dst_port);
        let ours = socket_for(ctx, listener)
            .is_some_and(|(bound, _)| bound == u32::from_ne_bytes(k.dst_addr));
        return Some(if ours {
            Counter::PassNoFlow
        } else {
            Counter::DropNoFlow
        });
    }
    *listener = tuple4(
        k.src_addr,
        k.src_port,
        target.listener_addr,
        target.listener_port,
    );
    Some(if listening(ctx, listener) {
        Counter::PassNoFlow
    } else {
        Counter::DropNoInterceptor
    })
}

/// Size of the IPv4 part of `bpf_sock_tuple`.
pub const TUPLE4: u32 = 12;

/// The socket for a 4-tuple in any state (request socket and TIME_WAIT
/// too): the address it is bound to and its state.
#[inline(always)]
fn socket_for<C: EbpfContext>(ctx: &C, tuple: &mut bpf_sock_tuple) -> Option<(u32, u32)> {
    // SAFETY: `tuple` lives across the call; the returned socket is released below.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.as_ptr() as *mut _,
            tuple,
            TUPLE4,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a socket the lookup returned, released right after reading.
    let found = unsafe { ((*sk).src_ip4, (*sk).state) };
    unsafe { bpf_sk_release(sk as *mut _) };
    Some(found)
}

/// Whether a full socket (the daemon's listener) takes this 4-tuple.
#[inline(always)]
fn listening<C: EbpfContext>(ctx: &C, tuple: &mut bpf_sock_tuple) -> bool {
    // SAFETY: `tuple` lives across the call; the returned socket is released below.
    let sk = unsafe {
        bpf_sk_lookup_tcp(
            ctx.as_ptr() as *mut _,
            tuple,
            TUPLE4,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: the socket the lookup returned.
    unsafe { bpf_sk_release(sk as *mut _) };
    true
}

/// A socket-lookup tuple (addresses as in the packet, ports in host order).
#[inline(always)]
pub fn tuple4(saddr: [u8; 4], sport: u16, daddr: [u8; 4], dport: u16) -> bpf_sock_tuple {
    // SAFETY: the tuple is plain integers; all-zero is valid.
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    t.__bindgen_anon_1.ipv4.saddr = u32::from_ne_bytes(saddr);
    t.__bindgen_anon_1.ipv4.daddr = u32::from_ne_bytes(daddr);
    t.__bindgen_anon_1.ipv4.sport = sport.to_be();
    t.__bindgen_anon_1.ipv4.dport = dport.to_be();
    t
}

/// Whether the stack would forward the packet out of `ifindex`.
#[inline(always)]
fn forwarded_out_of(ctx: &TcContext, pkt: &parse::Packet, ifindex: u32) -> bool {
    let k = &pkt.key;
    let (rc, p) = fib::route(
        ctx,
        IPPROTO_TCP,
        (k.src_addr, k.src_port),
        (k.dst_addr, k.dst_port),
        ctx.fib_tot_len(fib::l3_len(pkt)),
    );
    (rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH) && p.ifindex == ifindex
}
