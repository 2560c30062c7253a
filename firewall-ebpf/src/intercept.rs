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
        bpf_sock, bpf_sock_tuple, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_F_CURRENT_NETNS, TC_ACT_OK, TC_ACT_SHOT,
    },
    btf_maps::{Array, HashMap},
    helpers::generated::{bpf_sk_assign, bpf_sk_lookup_tcp, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::btf_map,
    programs::TcContext,
    EbpfContext as _,
};
use firewall_common::{
    intercept::{InterceptConf, InterceptKey, InterceptValue},
    stats::Counter,
    IPPROTO_TCP,
};

use crate::{fib, hook::Hook, parse, stats};

/// Intercepted destination ports.
#[btf_map]
static INTERCEPT: HashMap<InterceptKey, InterceptValue, 64> = HashMap::new();

#[btf_map]
static INTERCEPT_CONF: Array<InterceptConf, 1> = Array::new();

#[inline(always)]
pub fn process(ctx: &TcContext) -> i32 {
    let Some(conf) = INTERCEPT_CONF.get(0) else {
        return TC_ACT_OK as i32;
    };
    let mark = conf.mark;
    if mark == 0 {
        return TC_ACT_OK as i32;
    }
    let len = Hook::len(ctx);
    // Headers may sit in paged data: make them linear.
    ctx.prepare();
    let Ok(pkt) = parse::parse_range(ctx.data(), ctx.data_end(), len as usize) else {
        return TC_ACT_OK as i32;
    };
    if pkt.key.protocol != IPPROTO_TCP {
        return TC_ACT_OK as i32;
    }
    let k = &pkt.key;
    let mut tuple = tuple4(k.src_addr, k.src_port, k.dst_addr, k.dst_port);
    const TUPLE4: u32 = 12;
    // A socket of ours bound to exactly this destination (established,
    // handshaking, closing, or a transparent listener): deliver locally.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.as_ptr() as *mut _,
            &mut tuple,
            TUPLE4,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    } as *mut bpf_sock;
    if !sk.is_null() {
        let bound = unsafe { (*sk).src_ip4 };
        unsafe { bpf_sk_release(sk as *mut _) };
        if bound == u32::from_ne_bytes(k.dst_addr) {
            ctx.set_mark(mark);
            stats::count(Counter::PassTransparent, len);
            return TC_ACT_OK as i32;
        }
    }
    if !pkt.syn_only {
        return TC_ACT_OK as i32;
    }
    let Some(target) = (unsafe { INTERCEPT.get(&InterceptKey::new(IPPROTO_TCP, k.dst_port)) })
    else {
        return TC_ACT_OK as i32;
    };
    if !forwarded_out_of(ctx, &pkt, conf.egress_ifindex) {
        // Local destinations, or routes elsewhere: not a connection through the firewall.
        return TC_ACT_OK as i32;
    }
    let mut listener = tuple4(
        k.src_addr,
        k.src_port,
        target.listener_addr,
        target.listener_port,
    );
    let lsk = unsafe {
        bpf_sk_lookup_tcp(
            ctx.as_ptr() as *mut _,
            &mut listener,
            TUPLE4,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    } as *mut bpf_sock;
    if lsk.is_null() {
        // Fail closed: without the daemon the connection cannot be filtered.
        stats::count(Counter::DropNoInterceptor, len);
        return TC_ACT_SHOT as i32;
    }
    let rc = unsafe { bpf_sk_assign(ctx.as_ptr() as *mut _, lsk as *mut _, 0) };
    unsafe { bpf_sk_release(lsk as *mut _) };
    if rc != 0 {
        stats::count(Counter::DropNoInterceptor, len);
        return TC_ACT_SHOT as i32;
    }
    ctx.set_mark(mark);
    stats::count(Counter::PassIntercepted, len);
    TC_ACT_OK as i32
}

/// A socket-lookup tuple (addresses as in the packet, ports in host order).
#[inline(always)]
fn tuple4(saddr: [u8; 4], sport: u16, daddr: [u8; 4], dport: u16) -> bpf_sock_tuple {
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
