//! Route lookup in the kernel FIB and the redirect out of the egress interface.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LKUP_RET_UNREACHABLE,
    },
    helpers::generated::bpf_fib_lookup,
    programs::XdpContext,
    EbpfContext as _,
};
use firewall_common::{flow::FlowValue, stats::Counter};

use crate::parse::Packet;

const AF_INET: u8 = 2;

/// Where a translated packet leaves.
pub struct NextHop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// Looks up the route of the packet as it will be after translation.
#[inline(always)]
pub fn lookup(ctx: &XdpContext, pkt: &Packet, flow: &FlowValue) -> Result<NextHop, Counter> {
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = pkt.key.protocol;
    p.sport = flow.nat_src_port.to_be();
    p.dport = flow.nat_dst_port.to_be();
    p.__bindgen_anon_1.tot_len = pkt.l4_len + ((pkt.l4_off as u16).wrapping_sub(l3_offset(pkt)));
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(flow.nat_src_addr);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(flow.nat_dst_addr);

    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr() as *mut _,
            &mut p,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(NextHop {
            ifindex: p.ifindex,
            smac: p.smac,
            dmac: p.dmac,
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            // The lookup left the egress interface and the next hop in `p`.
            crate::events::need_neighbour(
                p.ifindex,
                unsafe { p.__bindgen_anon_4.ipv4_dst }.to_ne_bytes(),
            );
            Err(Counter::DropNoNeighbour)
        }
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            Err(Counter::DropNoRoute)
        }
        // With DF the stack, forwarding the original packet, answers with ICMP
        // "fragmentation needed" so path MTU discovery keeps working.
        BPF_FIB_LKUP_RET_FRAG_NEEDED if pkt.dont_fragment => Err(Counter::PassFragNeeded),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(Counter::DropFragNeeded),
        _ => Err(Counter::DropNotForwarded),
    }
}

/// Offset of the IPv4 header (Ethernet plus an optional VLAN tag).
#[inline(always)]
fn l3_offset(pkt: &Packet) -> u16 {
    if pkt.vlan_tagged {
        18
    } else {
        14
    }
}
