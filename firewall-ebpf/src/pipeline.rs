//! The pipeline every forwarded packet takes, at XDP or at TC: parse →
//! flow lookup (or a pinhole's first packet, or the wall's verdict on what
//! nothing claims) → FIB → NAT rewrite → redirect. Every packet leaves through `finish`, which counts it under
//! exactly one `Counter` and turns that counter into the hook's verdict.

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use firewall_common::{
    flow::FlowAction,
    frag::Fragment,
    pinhole::side as sides,
    stats::{Counter, Verdict},
    IPPROTO_UDP,
};

use crate::{
    events, fib, flow, frag, hook::Hook, icmp_error, inplace, parse, pinhole, stats, tftp, wall,
};

/// Outcome of processing: the counter, and for redirects the egress interface.
pub struct Outcome {
    counter: Counter,
    ifindex: u32,
}

impl Outcome {
    #[inline(always)]
    pub fn redirect(counter: Counter, ifindex: u32) -> Self {
        Self { counter, ifindex }
    }
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
pub fn process<H: Hook>(ctx: &H, side: u8) -> Outcome {
    ctx.prepare();
    let mut pkt = match parse::parse_range(ctx.data(), ctx.data_end(), ctx.len() as usize) {
        Ok(p) => p,
        Err(Counter::PassIcmpError) => {
            let out = icmp_error::forward(ctx);
            return if out.counter == Counter::PassIcmpError {
                // About no flow: the firewall's own, or unrelated.
                wall::untracked(ctx, out.counter).into()
            } else {
                out
            };
        }
        Err(c) if c.verdict() == Verdict::Pass => return wall::untracked(ctx, c).into(),
        Err(c) => return c.into(),
    };
    if pkt.vlan_tagged || ctx.vlan_offloaded() {
        // Through a trunk the stack would forward a VLAN's traffic past the
        // wall: dropped before anything (a single-use pinhole) is spent on it.
        return Counter::DropVlan.into();
    }
    let claimed = if pkt.fragment == Fragment::Later {
        // Only through the flow its first fragment took: a fragment never
        // opens anything.
        let found = if frag::later(&mut pkt) {
            flow::lookup(&pkt.key)
        } else {
            None
        };
        match found {
            Some(f) => Ok((f, Counter::RedirectedFragment)),
            None => Err(wall::untracked(ctx, Counter::PassFragment).into()),
        }
    } else {
        claim(ctx, &pkt, side)
    };
    let (flow_ptr, counter) = match claimed {
        Ok(found) => found,
        Err(out) => return out,
    };
    forward(ctx, &pkt, flow_ptr, counter)
}

/// The flow a whole packet or first fragment takes: an existing flow first;
/// otherwise a pinhole or the wall may create one.
#[inline(always)]
fn claim<H: Hook>(
    ctx: &H,
    pkt: &parse::Packet,
    side: u8,
) -> Result<(*mut firewall_common::flow::FlowValue, Counter), Outcome> {
    // A SYN on a flow that has ended is a new connection reusing the 5-tuple
    // (its ports were released at close while the old flows wait out their
    // closing time): a pinhole opened for it wins over the old translation.
    let found = flow::lookup(&pkt.key);
    Ok(match found {
        Some(f) if !(pkt.syn_only && flow::ended(f)) => (f, Counter::Redirected),
        _ => match (pinhole::admit(pkt, side), found) {
            // No pinhole for it: the old flow goes on as before.
            (Counter::PassNoFlow, Some(old)) => (old, Counter::Redirected),
            (pinhole, _) => {
                // Nothing claims it: a TFTP server's answer, or the wall
                // decides. Each creates the flows in a function of its own;
                // the packet then takes its flow.
                let created = match pinhole {
                    Counter::PassNoFlow
                        if side == sides::EXTERNAL && pkt.key.protocol == IPPROTO_UDP =>
                    {
                        match tftp::admit(pkt) {
                            Counter::PassNoFlow => wall::admit(ctx, pkt, side),
                            answered => answered,
                        }
                    }
                    Counter::PassNoFlow => wall::admit(ctx, pkt, side),
                    pinhole => pinhole,
                };
                if !matches!(
                    created,
                    Counter::PinholeEstablished
                        | Counter::PrimaryEstablished
                        | Counter::PublishedEstablished
                        | Counter::TftpEstablished
                ) {
                    return Err(created.into());
                }
                match flow::lookup(&pkt.key) {
                    Some(f) => (f, created),
                    None => return Err(Counter::DropNatExhausted.into()),
                }
            }
        },
    })
}

/// The packet has its flow: translated and sent on as the flow says.
#[inline(always)]
fn forward<H: Hook>(
    ctx: &H,
    pkt: &parse::Packet,
    flow_ptr: *mut firewall_common::flow::FlowValue,
    counter: Counter,
) -> Outcome {
    // SAFETY: a FLOWS entry found or created for this packet.
    let flow = unsafe { &*flow_ptr };
    if flow.action != FlowAction::Forward as u32 {
        if flow.action != FlowAction::InPlace as u32 {
            // Drop, or an action this datapath does not know: fail closed.
            return Counter::DropFlowAction.into();
        }
        if counter == Counter::Redirected {
            // A program of its own, which the verifier checks on its own
            // (`inplace::process`); it does not return here.
            ctx.tail_call_in_place();
            return Counter::DropInPlaceState.into();
        }
        // The SYN that made the connection: nothing to renumber yet.
    }
    send_on::<H, false>(ctx, pkt, flow_ptr, counter)
}

/// Translated and sent on (`IN_PLACE`: with the numbers `inplace::decide`
/// left for it).
#[inline(always)]
pub fn send_on<H: Hook, const IN_PLACE: bool>(
    ctx: &H,
    pkt: &parse::Packet,
    flow_ptr: *mut firewall_common::flow::FlowValue,
    counter: Counter,
) -> Outcome {
    // SAFETY: a FLOWS entry found or created for this packet.
    let flow = unsafe { &*flow_ptr };
    if pkt.ttl <= 1 {
        return Counter::PassTtlExceeded.into();
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let now_units = (now >> 20) as u32;
    let hop = match fib::cached(flow, fib::l3_len(pkt), now_units) {
        Some(h) => h,
        None => {
            let h = match fib::lookup(ctx, pkt, flow) {
                Ok(h) => h,
                Err(c) => return c.into(),
            };
            if flow.egress_ifindex != 0 && flow.egress_ifindex != h.ifindex {
                return Counter::DropEgressMismatch.into();
            }
            fib::remember(flow_ptr, pkt, &h, now_units);
            h
        }
    };
    if let Err(c) = ctx.translate(pkt, flow) {
        return c.into();
    }
    if IN_PLACE {
        if let Err(c) = inplace::apply(ctx, pkt.l4_off) {
            return c.into();
        }
    }
    if let Err(c) = ctx.set_macs(pkt, &hop) {
        return c.into();
    }
    if pkt.fragment == Fragment::First {
        // Its untranslated key: later fragments arrive as it did.
        frag::remember(pkt, now);
    }
    flow::account(flow_ptr, &pkt.key, ctx.len(), pkt.tcp_flags, now);
    Outcome {
        counter,
        ifindex: hop.ifindex,
    }
}

/// Counts the packet under its counter and returns the hook's verdict for
/// it; a redirect that fails is counted as such and dropped.
#[inline(always)]
pub fn finish<H: Hook>(ctx: &H, out: Outcome) -> H::Action {
    let len = ctx.len();
    match out.counter.verdict() {
        Verdict::Pass => {
            stats::count(out.counter, len);
            H::PASS
        }
        Verdict::Drop => {
            stats::count(out.counter, len);
            H::DROP
        }
        Verdict::Redirect => match ctx.redirect(out.ifindex) {
            Some(action) => {
                stats::count(out.counter, len);
                action
            }
            None => {
                // Rare (a vanished interface); worth a line in the daemon's
                // log, which reads it from the event ring (an aya-log record
                // would not fit on the stack next to the pipeline).
                events::redirect_failed(out.ifindex);
                stats::count(Counter::DropRedirectFailed, len);
                H::DROP
            }
        },
    }
}
