//! ICMP errors about tracked flows (RFC 5508): a router's "time exceeded"
//! (traceroute), "fragmentation needed" (path MTU discovery), a host's "port
//! unreachable". The error quotes a packet as it travelled on the far side
//! of the NAT; its flow entry says how to translate the error back: the
//! outer header as the flow's packets are, the quoted header the other way.
//! Only the changed fields' checksums are updated, incrementally — the ICMP
//! checksum covers the quote, so it follows every change there. Errors do
//! not refresh the flow (an attacker's errors must not keep a mapping alive).
//!
//! Both hooks write the packet directly: `Hook::prepare_icmp_error` makes
//! the whole error readable, and no helper between the reads and the
//! writes invalidates the pointers.

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use firewall_common::{
    csum,
    flow::{FlowAction, FlowValue},
    icmp::{self, ErrorRewrite},
    stats::Counter,
    IPPROTO_ICMP, IPPROTO_UDP,
};

use crate::{
    fib, flow,
    hook::Hook,
    parse::{self, IcmpError},
    pipeline::Outcome,
    scratch,
};

/// An ICMP error translated and on its way (`RedirectedIcmpError`), or the
/// counter that decides it; `PassIcmpError` when it quotes no flow. Two
/// functions of their own, one after the other (each with its own stack
/// frame, which the 512-byte limit next to the pipeline's requires): the
/// first finds the flow and decides, the second finds the next hop and
/// rewrites the packet. Between them the results wait in the scratch map.
#[inline(always)]
pub fn forward<H: Hook>(ctx: &H) -> Outcome {
    let decided = decide(ctx);
    if decided != Counter::RedirectedIcmpError {
        return decided.into();
    }
    let done = rewrite(ctx);
    match scratch::get() {
        Some(s) if done == Counter::RedirectedIcmpError => Outcome::redirect(done, s.hop.ifindex),
        _ => done.into(),
    }
}

/// Whether the error is about a flow, and how it is translated
/// (`Scratch::icmp`); the flow's next hop if it knows one (`Scratch::hop`,
/// ifindex 0 otherwise) and the egress it allows (`Scratch::icmp_egress`).
#[inline(never)]
fn decide<H: Hook>(ctx: &H) -> Counter {
    match decide_inner(ctx) {
        Ok(()) => Counter::RedirectedIcmpError,
        Err(c) => c,
    }
}

#[inline(always)]
fn decide_inner<H: Hook>(ctx: &H) -> Result<(), Counter> {
    // First, before the packet is read: with nothing before them, the
    // compiler hoists the context reads into the caller and passes the
    // packet pointers as 32-bit values, which the verifier rejects.
    let scratch = scratch::get().ok_or(Counter::DropNotForwarded)?;
    ctx.prepare_icmp_error();
    if ctx.vlan_offloaded() {
        return Err(Counter::DropVlan);
    }
    // Only what deciding needs, out of the parse: the whole of it kept in
    // memory would hold the packet's start in a 32-bit slot (the compiler
    // knows its upper half is zero), which the verifier refuses.
    let (key, ip, tot_len) = {
        let e = parse::icmp_error(ctx.data(), ctx.data_end())?;
        (e.key, e.ip, e.tot_len)
    };
    let flow_ptr = flow::lookup(&key).ok_or(Counter::PassIcmpError)?;
    // SAFETY: a FLOWS entry; map values stay valid for the program's run.
    let flow: &FlowValue = unsafe { &*flow_ptr };
    if FlowAction::from_u32(flow.action) != Some(FlowAction::Forward) {
        return Err(Counter::DropFlowAction);
    }
    // SAFETY: `ip` was bounds-checked by the parser.
    let (outer_src, outer_dst, ttl) = unsafe { ((*ip).src_addr, (*ip).dst_addr, (*ip).ttl) };
    let rw = icmp::rewrite(outer_src, outer_dst, &key, flow).ok_or(Counter::PassIcmpError)?;
    if ttl <= 1 {
        return Err(Counter::PassTtlExceeded);
    }
    scratch.icmp = rw;
    scratch.icmp_egress = flow.egress_ifindex;
    // The error goes where the flow's packets go: their next hop serves.
    // SAFETY: a helper without arguments.
    let now_units = (unsafe { bpf_ktime_get_coarse_ns() } >> 20) as u32;
    match fib::cached(flow, tot_len, now_units) {
        Some(h) => scratch.hop = h,
        None => scratch.hop.ifindex = 0,
    }
    Ok(())
}

/// Finds the next hop `decide` did not know, then rewrites the error:
/// MACs, outer header, quote.
#[inline(never)]
fn rewrite<H: Hook>(ctx: &H) -> Counter {
    let Some(scratch) = scratch::get() else {
        return Counter::DropNotForwarded;
    };
    // The same packet `decide` parsed.
    let e = match parse::icmp_error(ctx.data(), ctx.data_end()) {
        Ok(e) => e,
        Err(c) => return c,
    };
    if scratch.hop.ifindex == 0 {
        let rw = &scratch.icmp;
        match fib::next_hop(
            ctx,
            IPPROTO_ICMP,
            (rw.outer_src, 0),
            (rw.outer_dst, 0),
            e.tot_len,
            e.dont_fragment,
        ) {
            Ok(h) => scratch.hop = h,
            Err(c) => return c,
        }
    }
    let (hop, rw) = (&scratch.hop, &scratch.icmp);
    if scratch.icmp_egress != 0 && scratch.icmp_egress != hop.ifindex {
        return Counter::DropEgressMismatch;
    }
    // SAFETY: the parser bounds-checked both headers; nothing else points at them now.
    unsafe {
        (*e.eth).dst_addr = hop.dmac;
        (*e.eth).src_addr = hop.smac;
        let ip = &mut *e.ip;
        let (outer_src, outer_dst, ttl) = (ip.src_addr, ip.dst_addr, ip.ttl);
        let mut check = u16::from_be_bytes(ip.check);
        check = csum::replace_addr(check, outer_src, rw.outer_src);
        check = csum::replace_addr(check, outer_dst, rw.outer_dst);
        let old = u16::from_be_bytes([ttl, ip.proto]);
        // `decide` saw a TTL above 1.
        ip.ttl = ttl.wrapping_sub(1);
        check = csum::replace_u16(check, old, u16::from_be_bytes([ip.ttl, ip.proto]));
        ip.src_addr = rw.outer_src;
        ip.dst_addr = rw.outer_dst;
        ip.check = check.to_be_bytes();
    }
    rewrite_quote(&e, rw);
    Counter::RedirectedIcmpError
}

/// The quoted packet's addresses and ports (or echo identifier) and the
/// checksums over them: its IPv4 header's, its L4 checksum where quoted,
/// and the error's own.
#[inline(always)]
fn rewrite_quote(e: &IcmpError, rw: &ErrorRewrite) {
    // The quoted packet's key is the flow's, reversed (read in place: no
    // stack for a copy).
    let k = &e.key;
    let (q_src, q_sport, q_dst, q_dport) = (k.dst_addr, k.dst_port, k.src_addr, k.src_port);
    // SAFETY: the parser bounds-checked the ICMP header, the quoted IPv4
    // header and the 8 quoted L4 bytes; they do not overlap.
    let (icmp, inner, l4) = unsafe { (&mut *e.icmp, &mut *e.inner, &mut *e.inner_l4) };
    let mut icmp_check = u16::from_be_bytes([icmp[2], icmp[3]]);

    let old_ip_check = u16::from_be_bytes(inner.check);
    let mut ip_check = csum::replace_addr(old_ip_check, q_src, rw.inner_src);
    ip_check = csum::replace_addr(ip_check, q_dst, rw.inner_dst);
    inner.src_addr = rw.inner_src;
    inner.dst_addr = rw.inner_dst;
    inner.check = ip_check.to_be_bytes();
    icmp_check = csum::replace_addr(icmp_check, q_src, rw.inner_src);
    icmp_check = csum::replace_addr(icmp_check, q_dst, rw.inner_dst);
    icmp_check = csum::replace_u16(icmp_check, old_ip_check, ip_check);

    if k.protocol == IPPROTO_ICMP {
        // The echo's identifier and the echo's own checksum (no pseudo-header).
        let old_id = q_sport | q_dport;
        let new_id = rw.inner_src_port | rw.inner_dst_port;
        let old_echo = u16::from_be_bytes([l4[2], l4[3]]);
        let echo = csum::replace_u16(old_echo, old_id, new_id);
        l4[2..4].copy_from_slice(&echo.to_be_bytes());
        l4[4..6].copy_from_slice(&new_id.to_be_bytes());
        icmp_check = csum::replace_u16(icmp_check, old_id, new_id);
        icmp_check = csum::replace_u16(icmp_check, old_echo, echo);
    } else {
        l4[0..2].copy_from_slice(&rw.inner_src_port.to_be_bytes());
        l4[2..4].copy_from_slice(&rw.inner_dst_port.to_be_bytes());
        icmp_check = csum::replace_u16(icmp_check, q_sport, rw.inner_src_port);
        icmp_check = csum::replace_u16(icmp_check, q_dport, rw.inner_dst_port);
        // The quoted L4 checksum covers the pseudo-header and the ports.
        let field = if k.protocol == IPPROTO_UDP {
            Some((e.inner_l4 as *mut u8).wrapping_add(6) as *mut [u8; 2])
        } else {
            Some(e.inner_tcp_check).filter(|p| !p.is_null())
        };
        if let Some(field) = field {
            // SAFETY: within the quoted UDP header, or the TCP checksum the parser bounds-checked.
            let old = u16::from_be_bytes(unsafe { *field });
            // A UDP datagram sent without checksum is quoted without one.
            if !(k.protocol == IPPROTO_UDP && old == 0) {
                let mut c = csum::replace_addr(old, q_src, rw.inner_src);
                c = csum::replace_addr(c, q_dst, rw.inner_dst);
                c = csum::replace_u16(c, q_sport, rw.inner_src_port);
                c = csum::replace_u16(c, q_dport, rw.inner_dst_port);
                if k.protocol == IPPROTO_UDP {
                    c = csum::udp_final(c);
                }
                // SAFETY: as for the read.
                unsafe { *field = c.to_be_bytes() };
                icmp_check = csum::replace_u16(icmp_check, old, c);
            }
        }
    }
    icmp[2..4].copy_from_slice(&icmp_check.to_be_bytes());
}
