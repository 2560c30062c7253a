//! The datapath at XDP (the default): the driver hands over each frame
//! before the stack allocates anything for it; headers are rewritten in
//! place with incremental checksums (`nat::translate`).

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_redirect, bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    macros::xdp,
    programs::XdpContext,
};
use firewall_common::{csum::Wsum, flow::FlowValue, pinhole::side, stats::Counter};

use crate::{
    fib::NextHop,
    hook::Hook,
    inplace, nat,
    parse::Packet,
    pipeline::{finish, process},
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

/// Tail-called by both for a connection read in place.
#[xdp]
pub fn xdp_inplace(ctx: XdpContext) -> u32 {
    finish(&ctx, inplace::process(&ctx))
}

impl Hook for XdpContext {
    type Action = u32;
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;

    #[inline(always)]
    fn redirect(&self, ifindex: u32) -> Option<u32> {
        // SAFETY: a helper taking plain values.
        let action = unsafe { bpf_redirect(ifindex, 0) } as u32;
        (action == xdp_action::XDP_REDIRECT).then_some(action)
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: the context the kernel passed; the field is readable.
        unsafe { (*self.ctx).ingress_ifindex }
    }
    #[inline(always)]
    fn prepare(&self) {}
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u64 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u64
    }
    #[inline(always)]
    fn fib_tot_len(&self, l3_len: u16) -> u16 {
        l3_len
    }
    #[inline(always)]
    fn translate(&self, pkt: &Packet, flow: &FlowValue) -> Result<(), Counter> {
        nat::translate(self, pkt, flow)
    }
    #[inline(always)]
    fn tail_call_in_place(&self) {
        // SAFETY: the array holds XDP programs only.
        unsafe { inplace::INPLACE_PROGS_XDP.tail_call(self, 0) };
    }
    #[inline(always)]
    fn load(&self, offset: usize, dst: *mut u8, len: u32) -> bool {
        // SAFETY: the helper checks the packet's bounds; the caller gives
        // `dst` room for `len` bytes.
        unsafe { bpf_xdp_load_bytes(self.ctx, offset as u32, dst.cast(), len) == 0 }
    }
    #[inline(always)]
    fn store(&self, offset: usize, src: *const u8, len: u32) -> bool {
        // SAFETY: the helper checks the packet's bounds; the caller gives
        // `src` `len` readable bytes.
        unsafe { bpf_xdp_store_bytes(self.ctx, offset as u32, src as *mut _, len) == 0 }
    }
    #[inline(always)]
    fn l4_csum_diff(&self, check_off: usize, diff: Wsum) -> Result<(), Counter> {
        // After `translate` the checksum is final (a partial one was
        // computed in full), so the kernel's csum_replace_by_diff applies.
        let mut field = [0u8; 2];
        if !self.load(check_off, field.as_mut_ptr(), 2) {
            return Err(Counter::DropChecksum);
        }
        let field = diff.apply(field);
        if !self.store(check_off, field.as_ptr(), 2) {
            return Err(Counter::DropChecksum);
        }
        Ok(())
    }
    #[inline(always)]
    fn set_macs(&self, pkt: &Packet, hop: &NextHop) -> Result<(), Counter> {
        // SAFETY: `pkt.eth` was bounds-checked by the parser.
        unsafe {
            (*pkt.eth).dst_addr = hop.dmac;
            (*pkt.eth).src_addr = hop.smac;
        }
        Ok(())
    }
}
