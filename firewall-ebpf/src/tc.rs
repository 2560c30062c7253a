//! The datapath at tcx ingress (`--xdp-mode tc`). The stack hands over
//! GRO'd/GSO super-packets and veth keeps its offloads (an XDP program on a
//! veth turns off GSO on its peer), so bulk TCP is forwarded 64 KiB at a
//! time; the L4 checksum is fixed with the kernel's helper
//! (`nat::translate_skb`), which knows whether the skb carries a final or a
//! partial (pseudo-header) checksum.

use aya_ebpf::{
    bindings::{tcx_action_base, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::generated::{bpf_redirect, bpf_skb_load_bytes, bpf_skb_store_bytes},
    macros::classifier,
    programs::TcContext,
    EbpfContext as _,
};
use firewall_common::{csum::Wsum, flow::FlowValue, pinhole::side, stats::Counter};

use crate::{
    fib::NextHop,
    hook::Hook,
    inplace, nat,
    parse::Packet,
    pipeline::{finish, process},
};

/// Ethernet + VLAN + IPv4 with options + TCP with options.
const HEADERS_MAX: u32 = 18 + 60 + 60;
/// An ICMP error's headers: Ethernet, IPv4 with options, ICMP, and the
/// quoted IPv4 header with options and TCP header.
const ICMP_ERROR_MAX: u32 = 14 + 60 + 8 + 60 + 20;

/// The datapath at tcx ingress instead of XDP, internal side.
#[classifier]
pub fn tc_forward_internal(ctx: TcContext) -> i32 {
    finish(&ctx, process(&ctx, side::INTERNAL))
}

/// The datapath at tcx ingress instead of XDP, external side.
#[classifier]
pub fn tc_forward_external(ctx: TcContext) -> i32 {
    finish(&ctx, process(&ctx, side::EXTERNAL))
}

/// Tail-called by both for a connection read in place.
#[classifier]
pub fn tc_inplace(ctx: TcContext) -> i32 {
    finish(&ctx, inplace::process(&ctx))
}

impl Hook for TcContext {
    type Action = i32;
    /// On to the next tcx program (the interception), then the stack.
    const PASS: i32 = tcx_action_base::TCX_NEXT;
    const DROP: i32 = TC_ACT_SHOT;

    #[inline(always)]
    fn redirect(&self, ifindex: u32) -> Option<i32> {
        // SAFETY: a helper taking plain values.
        let action = unsafe { bpf_redirect(ifindex, 0) } as i32;
        (action == TC_ACT_REDIRECT).then_some(action)
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: the skb the kernel passed; the field is readable at TC.
        unsafe { (*self.skb.skb).ingress_ifindex }
    }
    #[inline(always)]
    fn prepare(&self) {
        let len = TcContext::len(self);
        let _ = self.pull_data(if len < HEADERS_MAX { len } else { HEADERS_MAX });
    }
    #[inline(always)]
    fn prepare_icmp_error(&self) {
        let len = TcContext::len(self);
        let _ = self.pull_data(if len < ICMP_ERROR_MAX {
            len
        } else {
            ICMP_ERROR_MAX
        });
    }
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u64 {
        TcContext::len(self) as u64
    }
    #[inline(always)]
    fn fib_tot_len(&self, _l3_len: u16) -> u16 {
        0
    }

    #[inline(always)]
    fn translate(&self, pkt: &Packet, flow: &FlowValue) -> Result<(), Counter> {
        nat::translate_skb(self, pkt, flow)
    }

    #[inline(always)]
    fn tail_call_in_place(&self) {
        // SAFETY: the array holds TC programs only.
        unsafe { inplace::INPLACE_PROGS_TC.tail_call(self, 0) };
    }

    #[inline(always)]
    fn load(&self, offset: usize, dst: *mut u8, len: u32) -> bool {
        // SAFETY: the helper checks the skb's bounds; the caller gives `dst`
        // room for `len` bytes.
        unsafe { bpf_skb_load_bytes(self.as_ptr().cast(), offset as u32, dst.cast(), len) == 0 }
    }

    #[inline(always)]
    fn store(&self, offset: usize, src: *const u8, len: u32) -> bool {
        // SAFETY: the helper checks the skb's bounds; the caller gives `src`
        // `len` readable bytes.
        unsafe {
            bpf_skb_store_bytes(self.as_ptr().cast(), offset as u32, src as *const _, len, 0) == 0
        }
    }

    #[inline(always)]
    fn l4_csum_diff(&self, check_off: usize, diff: Wsum) -> Result<(), Counter> {
        // Not a pseudo-header field: on a partial checksum the helper
        // leaves the field alone, as it must.
        self.l4_csum_replace(check_off, 0, diff.0 as u64, 0)
            .map_err(|_| Counter::DropChecksum)
    }

    #[inline(always)]
    fn vlan_offloaded(&self) -> bool {
        // SAFETY: as for `ingress_ifindex`.
        unsafe { (*self.skb.skb).vlan_present != 0 }
    }

    #[inline(always)]
    fn set_macs(&self, _pkt: &Packet, hop: &NextHop) -> Result<(), Counter> {
        // The checksum helpers of `translate` invalidated the parser's
        // pointers: the frame's start is read and checked again.
        let (start, end) = (TcContext::data(self), TcContext::data_end(self));
        if start + 12 > end {
            return Err(Counter::DropRedirectFailed);
        }
        // SAFETY: the two MACs lie within the frame (checked above), which
        // `prepare` made writable.
        unsafe {
            *(start as *mut [u8; 6]) = hop.dmac;
            *((start + 6) as *mut [u8; 6]) = hop.smac;
        }
        Ok(())
    }
}
