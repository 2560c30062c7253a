//! Where the pipeline runs: XDP (the default) or TC (tcx ingress).
//!
//! The pipeline (`process` in main.rs) is the same; what differs is how the
//! packet is reached, translated and sent on. At TC the stack hands over
//! GRO'd/GSO super-packets and veth keeps its offloads (an XDP program on a
//! veth turns off GSO on its peer), so bulk TCP is forwarded 64 KiB at a time;
//! checksums there are fixed with the kernel's helpers, which know whether the
//! skb carries a final or a partial (pseudo-header) checksum.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
    EbpfContext as _,
};
use firewall_common::{flow::FlowValue, stats::Counter, IPPROTO_TCP};

use crate::{fib::NextHop, nat, parse::Packet};

/// Ethernet + VLAN + IPv4 with options + TCP with options.
const HEADERS_MAX: u32 = 18 + 60 + 60;

pub trait Hook {
    fn ctx_ptr(&self) -> *mut c_void;
    fn ingress_ifindex(&self) -> u32;
    /// Makes the headers directly readable (TC: they may sit in paged data).
    fn prepare(&self);
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Bytes of the packet (L2), for the counters.
    fn len(&self) -> u64;
    /// `tot_len` for the FIB's MTU check: XDP the packet's; TC 0, so that the
    /// kernel checks the skb itself (GSO-aware).
    fn fib_tot_len(&self, l3_len: u16) -> u16;
    /// Rewrites addresses, ports and TTL as the flow says, checksums fixed.
    fn translate(&self, pkt: &Packet, flow: &FlowValue) -> Result<(), Counter>;
    fn set_macs(&self, pkt: &Packet, hop: &NextHop) -> Result<(), Counter>;
    /// A VLAN tag the NIC took off into the skb (TC): redirected, the frame
    /// would leave tagged.
    fn vlan_offloaded(&self) -> bool {
        false
    }
}

impl Hook for XdpContext {
    #[inline(always)]
    fn ctx_ptr(&self) -> *mut c_void {
        self.as_ptr()
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
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
    fn set_macs(&self, pkt: &Packet, hop: &NextHop) -> Result<(), Counter> {
        unsafe {
            (*pkt.eth).dst_addr = hop.dmac;
            (*pkt.eth).src_addr = hop.smac;
        }
        Ok(())
    }
}

impl Hook for TcContext {
    #[inline(always)]
    fn ctx_ptr(&self) -> *mut c_void {
        self.as_ptr()
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        unsafe { (*self.skb.skb).ingress_ifindex }
    }
    #[inline(always)]
    fn prepare(&self) {
        let len = TcContext::len(self);
        let _ = self.pull_data(if len < HEADERS_MAX { len } else { HEADERS_MAX });
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

    /// With helpers only: they invalidate packet pointers, so every offset and
    /// old value is taken from `pkt` before the first one.
    #[inline(always)]
    fn translate(&self, pkt: &Packet, flow: &FlowValue) -> Result<(), Counter> {
        let k = &pkt.key;
        let l3 = pkt.l3_off;
        let l4 = pkt.l4_off;
        let is_tcp = k.protocol == IPPROTO_TCP;
        let check_off = l4 + if is_tcp { 16 } else { 6 };
        let old_check = u16::from_be_bytes(unsafe { *pkt.l4_check });
        let ttl = pkt.ttl;
        let proto = k.protocol;
        let addr = |a: [u8; 4]| u32::from_ne_bytes(a) as u64;
        let port = |p: u16| p.to_be() as u64;
        let fail = |_| Counter::DropChecksum;

        if is_tcp || old_check != 0 {
            let mangled = if is_tcp {
                0
            } else {
                BPF_F_MARK_MANGLED_0 as u64
            };
            let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
            self.l4_csum_replace(check_off, addr(k.src_addr), addr(flow.nat_src_addr), pseudo)
                .map_err(fail)?;
            self.l4_csum_replace(check_off, addr(k.dst_addr), addr(flow.nat_dst_addr), pseudo)
                .map_err(fail)?;
            self.l4_csum_replace(
                check_off,
                port(k.src_port),
                port(flow.nat_src_port),
                mangled | 2,
            )
            .map_err(fail)?;
            self.l4_csum_replace(
                check_off,
                port(k.dst_port),
                port(flow.nat_dst_port),
                mangled | 2,
            )
            .map_err(fail)?;
        }
        let ip_check = l3 + 10;
        self.l3_csum_replace(ip_check, addr(k.src_addr), addr(flow.nat_src_addr), 4)
            .map_err(fail)?;
        self.l3_csum_replace(ip_check, addr(k.dst_addr), addr(flow.nat_dst_addr), 4)
            .map_err(fail)?;
        let word = |t: u8| u16::from_ne_bytes([t, proto]) as u64;
        self.l3_csum_replace(ip_check, word(ttl), word(ttl - 1), 2)
            .map_err(fail)?;
        self.store(l3 + 8, &(ttl - 1), 0).map_err(fail)?;
        self.store(l3 + 12, &flow.nat_src_addr, 0).map_err(fail)?;
        self.store(l3 + 16, &flow.nat_dst_addr, 0).map_err(fail)?;
        self.store(l4, &flow.nat_src_port.to_be_bytes(), 0)
            .map_err(fail)?;
        self.store(l4 + 2, &flow.nat_dst_port.to_be_bytes(), 0)
            .map_err(fail)?;
        Ok(())
    }

    #[inline(always)]
    fn vlan_offloaded(&self) -> bool {
        unsafe { (*self.skb.skb).vlan_present != 0 }
    }

    #[inline(always)]
    fn set_macs(&self, _pkt: &Packet, hop: &NextHop) -> Result<(), Counter> {
        self.store(0, &hop.dmac, 0)
            .map_err(|_| Counter::DropRedirectFailed)?;
        self.store(6, &hop.smac, 0)
            .map_err(|_| Counter::DropRedirectFailed)?;
        Ok(())
    }
}
