//! XDP datapath of the firewall: parse → flow lookup → FIB → NAT rewrite → redirect.
//!
//! Every packet leaves through `finish`, which counts it under exactly one
//! `Counter` and turns that counter into the XDP verdict.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod bench;
mod events;
mod fib;
mod flow;
mod hook;
mod intercept;
mod nat;
mod parse;
mod pinhole;
mod stats;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_ktime_get_coarse_ns, bpf_redirect},
    macros::{classifier, sk_lookup, xdp},
    programs::{SkLookupContext, TcContext, XdpContext},
};
use hook::Hook;

use firewall_common::{
    flow::FlowAction,
    pinhole::side,
    stats::{Counter, Verdict},
};

/// Attached to the interface facing the internal networks.
#[xdp]
pub fn xdp_internal(ctx: XdpContext) -> u32 {
    finish(&ctx, process(&ctx, side::INTERNAL))
}

/// Attached to the interface facing the external networks.
#[xdp]
pub fn xdp_external(ctx: XdpContext) -> u32 {
    finish(&ctx, process(&ctx, side::EXTERNAL))
}

/// TC (tcx) ingress on the internal interface: hands primary connections of
/// intercepted protocols to the daemon (see `intercept`).
#[classifier]
pub fn tc_internal(ctx: TcContext) -> i32 {
    intercept::process(&ctx)
}

/// The listener lookup of the firewall's network namespace: intercepted
/// SYNs go to the daemon's listener (see `intercept`).
#[sk_lookup]
pub fn sk_lookup_intercept(ctx: SkLookupContext) -> u32 {
    intercept::lookup(&ctx)
}

/// The datapath at tcx ingress instead of XDP (`--xdp-mode tc`), internal side.
#[classifier]
pub fn tc_forward_internal(ctx: TcContext) -> i32 {
    finish_tc(&ctx, process(&ctx, side::INTERNAL))
}

/// The datapath at tcx ingress instead of XDP, external side.
#[classifier]
pub fn tc_forward_external(ctx: TcContext) -> i32 {
    finish_tc(&ctx, process(&ctx, side::EXTERNAL))
}

/// tcx: go on to the next program (the interception), then the stack.
const TCX_NEXT: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

#[inline(always)]
fn finish_tc(ctx: &TcContext, out: Outcome) -> i32 {
    let len = ctx.len() as u64;
    match out.counter.verdict() {
        Verdict::Pass => {
            stats::count(out.counter, len);
            TCX_NEXT
        }
        Verdict::Drop => {
            stats::count(out.counter, len);
            TC_ACT_SHOT
        }
        Verdict::Redirect => {
            let action = unsafe { bpf_redirect(out.ifindex, 0) } as i32;
            if action == TC_ACT_REDIRECT {
                stats::count(out.counter, len);
                action
            } else {
                stats::count(Counter::DropRedirectFailed, len);
                TC_ACT_SHOT
            }
        }
    }
}

/// Outcome of processing: the counter, and for redirects the egress interface.
struct Outcome {
    counter: Counter,
    ifindex: u32,
}

impl From<Counter> for Outcome {
    #[inline(always)]
    fn from(counter: Counter) -> Self {
        Self {
            counter,
            ifindex: 0,
        }
    }
}

#[inline(always)]
fn process<H: Hook>(ctx: &H, side: u8) -> Outcome {
    ctx.prepare();
    let pkt = match parse::parse_range(ctx.data(), ctx.data_end(), ctx.len() as usize) {
        Ok(p) => p,
        Err(c) => return c.into(),
    };
    if pkt.vlan_tagged || ctx.vlan_offloaded() {
        // XDP cannot transmit on VLAN sub-interfaces: such frames are the
        // stack's, before anything (a single-use pinhole) is spent on them.
        return Counter::PassVlanUnsupported.into();
    }
    // An existing flow first; otherwise a pinhole may create one. A SYN on a
    // flow that has ended is a new connection reusing the 5-tuple (its ports
    // were released at close while the old flows wait out their closing
    // time): a pinhole opened for it wins over the old translation.
    let found = flow::lookup(&pkt.key);
    let (flow_ptr, counter) = match found {
        Some(f) if !(pkt.syn_only && flow::ended(f)) => (f, Counter::Redirected),
        _ => match (pinhole::admit(&pkt, side), found) {
            (Ok(f), _) => (f, Counter::PinholeEstablished),
            // No pinhole for it: the old flow goes on as before.
            (Err(Counter::PassNoFlow), Some(old)) => (old, Counter::Redirected),
            (Err(c), _) => return c.into(),
        },
    };
    // SAFETY: a FLOWS entry found or created for this packet.
    let flow = unsafe { &*flow_ptr };
    if FlowAction::from_u32(flow.action) != Some(FlowAction::Forward) {
        // Drop, or an action this datapath does not know: fail closed.
        return Counter::DropFlowAction.into();
    }
    if pkt.ttl <= 1 {
        return Counter::PassTtlExceeded.into();
    }
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let now_units = (now >> 20) as u32;
    let hop = match fib::cached(flow, &pkt, now_units) {
        Some(h) => h,
        None => {
            let h = match fib::lookup(ctx, &pkt, flow) {
                Ok(h) => h,
                Err(c) => return c.into(),
            };
            if flow.egress_ifindex != 0 && flow.egress_ifindex != h.ifindex {
                return Counter::DropEgressMismatch.into();
            }
            fib::remember(flow_ptr, &pkt, &h, now_units);
            h
        }
    };
    if let Err(c) = ctx.translate(&pkt, flow) {
        return c.into();
    }
    if let Err(c) = ctx.set_macs(&pkt, &hop) {
        return c.into();
    }
    flow::account(flow_ptr, &pkt.key, ctx.len(), pkt.tcp_flags, now);
    Outcome {
        counter,
        ifindex: hop.ifindex,
    }
}

#[inline(always)]
fn finish(ctx: &XdpContext, out: Outcome) -> u32 {
    let len = Hook::len(ctx);
    match out.counter.verdict() {
        Verdict::Pass => {
            stats::count(out.counter, len);
            xdp_action::XDP_PASS
        }
        Verdict::Drop => {
            stats::count(out.counter, len);
            xdp_action::XDP_DROP
        }
        Verdict::Redirect => {
            let action = unsafe { bpf_redirect(out.ifindex, 0) } as u32;
            if action == xdp_action::XDP_REDIRECT {
                stats::count(out.counter, len);
                action
            } else {
                // Rare (a vanished interface); worth a line in the daemon's log.
                aya_log_ebpf::warn!(ctx, "redirect to ifindex {} failed", out.ifindex);
                stats::count(Counter::DropRedirectFailed, len);
                xdp_action::XDP_DROP
            }
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program; the verifier rejects any path to it.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
