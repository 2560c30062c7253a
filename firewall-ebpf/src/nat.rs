//! Address/port translation with checksum maintenance, for both hooks.
//!
//! At XDP (`translate`) final checksums are updated incrementally (RFC 1624).
//! A checksum that only holds the pseudo-header sum (CHECKSUM_PARTIAL from a
//! local socket, see `csum::looks_partial`) is recomputed over the whole
//! segment instead, because XDP_REDIRECT forgets that the kernel was still to
//! finish it. At TC (`translate_skb`) the kernel's helper updates the L4
//! checksum, knowing the skb's checksum state.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    btf_maps::PerCpuArray,
    helpers::generated::{bpf_csum_diff, bpf_xdp_load_bytes},
    macros::btf_map,
    programs::{TcContext, XdpContext},
    EbpfContext as _,
};
use firewall_common::{
    csum, flow::FlowValue, frag::Fragment, stats::Counter, IPPROTO_ICMP, IPPROTO_TCP,
};

use crate::parse::Packet;

/// Bytes the checksum helper takes at once (its limit).
const CHUNK: usize = 512;
/// Longest segment we recompute in full: jumbo frames up to 9216 bytes.
const MAX_CHUNKS: usize = 18;

/// Per-CPU scratch buffer for full checksum recomputation.
#[btf_map]
static CSUM_SCRATCH: PerCpuArray<[u8; CHUNK], 1> = PerCpuArray::new();

/// Rewrites addresses and ports as the flow says, decrements the TTL and fixes
/// the IPv4 and L4 checksums.
#[inline(always)]
pub fn translate(ctx: &XdpContext, pkt: &Packet, flow: &FlowValue) -> Result<(), Counter> {
    if pkt.fragment == Fragment::Later {
        // The L4 header and its checksum went with the first fragment.
        rewrite_ip(pkt, flow);
        return Ok(());
    }
    let key = &pkt.key;
    let is_tcp = key.protocol == IPPROTO_TCP;
    let check_ptr = pkt.l4_check;
    // SAFETY: `l4_check` was bounds-checked by the parser.
    let old_check = u16::from_be_bytes(unsafe { *check_ptr });
    let is_icmp = key.protocol == IPPROTO_ICMP;

    if is_icmp {
        // The echo identifier (one of the two "ports" is 0); the ICMP
        // checksum has no pseudo-header, so only the identifier changes it.
        let (old_id, new_id) = csum::echo_ids(key, flow);
        // SAFETY: the identifier lies within the echo header the parser bounds-checked.
        unsafe {
            *(pkt.l4.add(4) as *mut [u8; 2]) = new_id.to_be_bytes();
            *check_ptr = csum::replace_u16(old_check, old_id, new_id).to_be_bytes();
        }
    } else {
        // Ports: they sit at the same offsets in TCP and UDP.
        // SAFETY: the ports lie within the L4 header the parser bounds-checked.
        unsafe {
            *(pkt.l4 as *mut [u8; 2]) = flow.nat_src_port.to_be_bytes();
            *(pkt.l4.add(2) as *mut [u8; 2]) = flow.nat_dst_port.to_be_bytes();
        }
    }

    rewrite_ip(pkt, flow);

    if is_icmp || (!is_tcp && old_check == 0) {
        // UDP without checksum stays without checksum.
        return Ok(());
    }
    // A fragment's checksum is final: the sender computed it over the whole
    // datagram before fragmenting it.
    let new_check = if pkt.fragment == Fragment::Whole
        && csum::looks_partial(
            old_check,
            key.src_addr,
            key.dst_addr,
            key.protocol,
            pkt.l4_len,
        ) {
        full_l4_checksum(ctx, pkt, flow, old_check)?
    } else {
        let mut c = csum::replace_addr(old_check, key.src_addr, flow.nat_src_addr);
        c = csum::replace_addr(c, key.dst_addr, flow.nat_dst_addr);
        c = csum::replace_u16(c, key.src_port, flow.nat_src_port);
        csum::replace_u16(c, key.dst_port, flow.nat_dst_port)
    };
    let new_check = if is_tcp {
        new_check
    } else {
        csum::udp_final(new_check)
    };
    // SAFETY: as for the read above.
    unsafe { *check_ptr = new_check.to_be_bytes() };
    Ok(())
}

/// The IPv4 header: addresses and TTL, incremental header checksum.
#[inline(always)]
fn rewrite_ip(pkt: &Packet, flow: &FlowValue) {
    let key = &pkt.key;
    // SAFETY: `pkt.ip` was bounds-checked by the parser; nothing else points at it here.
    let ip = unsafe { &mut *pkt.ip };
    let mut ip_check = u16::from_be_bytes(ip.check);
    ip_check = csum::replace_addr(ip_check, key.src_addr, flow.nat_src_addr);
    ip_check = csum::replace_addr(ip_check, key.dst_addr, flow.nat_dst_addr);
    let ttl_proto_old = u16::from_be_bytes([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    ip_check = csum::replace_u16(
        ip_check,
        ttl_proto_old,
        u16::from_be_bytes([ip.ttl, ip.proto]),
    );
    ip.src_addr = flow.nat_src_addr;
    ip.dst_addr = flow.nat_dst_addr;
    ip.check = ip_check.to_be_bytes();
}

/// Checksum of the (already translated) segment from scratch. `field` is the
/// value the checksum field holds while the segment is summed.
#[inline(always)]
fn full_l4_checksum(
    ctx: &XdpContext,
    pkt: &Packet,
    flow: &FlowValue,
    field: u16,
) -> Result<u16, Counter> {
    let len = pkt.l4_len as usize;
    if len > CHUNK * MAX_CHUNKS {
        return Err(Counter::DropChecksum);
    }
    let buf = CSUM_SCRATCH.get_ptr_mut(0).ok_or(Counter::DropChecksum)? as *mut u8;
    let mut sum = csum::pseudo_header_sum(
        flow.nat_src_addr,
        flow.nat_dst_addr,
        pkt.key.protocol,
        pkt.l4_len,
    ) as u64;
    for i in 0..MAX_CHUNKS {
        let off = i * CHUNK;
        if off >= len {
            break;
        }
        let rest = len - off;
        let n = if rest > CHUNK { CHUNK } else { rest };
        // n is in 1..=CHUNK here; spell it so the verifier can see it too.
        let n = ((n - 1) & (CHUNK - 1)) + 1;
        // The sum helper takes whole 32-bit words: zero the word holding the
        // last byte first, so the (at most 3) bytes past it are zero padding.
        // SAFETY: (n - 1) & (CHUNK - 4) + 4 <= CHUNK: the word lies within the scratch buffer.
        unsafe { *(buf.add((n - 1) & (CHUNK - 4)) as *mut u32) = 0 };
        // SAFETY: at most n <= CHUNK bytes into the CHUNK-byte scratch buffer.
        let rc = unsafe {
            bpf_xdp_load_bytes(
                ctx.as_ptr() as *mut _,
                (pkt.l4_off as usize + off) as u32,
                buf as *mut _,
                n as u32,
            )
        };
        if rc != 0 {
            return Err(Counter::DropChecksum);
        }
        // LLVM knows padded <= CHUNK and would drop the check the verifier
        // needs; black_box keeps it.
        let padded = core::hint::black_box((n + 3) & !3);
        if padded == 0 || padded > CHUNK {
            return Err(Counter::DropChecksum);
        }
        let s =
            // SAFETY: `padded` <= CHUNK bytes of the scratch buffer (checked above).
            unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, buf as *mut u32, padded as u32, 0) };
        if s < 0 {
            return Err(Counter::DropChecksum);
        }
        // The helper adds words as the CPU loads them (little endian); our
        // convention is big-endian words, and byte-swapping commutes with
        // ones'-complement addition.
        sum += csum::fold(s as u64).swap_bytes() as u64;
    }
    // Take out what the checksum field contributed to the sum.
    sum += !field as u64;
    Ok(!csum::fold(sum))
}

/// `translate` at TC. The bytes are written directly, as at XDP (the
/// headers are linear and writable: `Hook::prepare` pulled them), and so is
/// the IPv4 header checksum, which is always final. The L4 checksum is left to
/// the kernel's helper, which knows the skb's checksum state (final, or only
/// the pseudo-header sum: CHECKSUM_PARTIAL, where port changes must not touch
/// it; CHECKSUM_COMPLETE, whose `skb->csum` it keeps in step): at most two
/// calls, each the sum of its fields' changes. The helpers invalidate packet
/// pointers, so they come last and nothing here reads the packet after them.
#[inline(always)]
pub fn translate_skb(ctx: &TcContext, pkt: &Packet, flow: &FlowValue) -> Result<(), Counter> {
    if pkt.fragment == Fragment::Later {
        // The L4 header and its checksum went with the first fragment.
        rewrite_ip(pkt, flow);
        return Ok(());
    }
    let k = &pkt.key;
    let l4 = pkt.l4_off as usize;
    let is_tcp = k.protocol == IPPROTO_TCP;
    let is_icmp = k.protocol == IPPROTO_ICMP;
    let check_off = l4
        + if is_tcp {
            16
        } else if is_icmp {
            2
        } else {
            6
        };
    // SAFETY: `l4_check` was bounds-checked by the parser, and no helper
    // that moves packet data has run since.
    let old_check = u16::from_be_bytes(unsafe { *pkt.l4_check });
    let fail = |_| Counter::DropChecksum;

    if is_icmp {
        let (old_id, new_id) = csum::echo_ids(k, flow);
        // SAFETY: the identifier lies within the echo header the parser bounds-checked.
        unsafe { *(pkt.l4.add(4) as *mut [u8; 2]) = new_id.to_be_bytes() };
        rewrite_ip(pkt, flow);
        let port = |p: u16| p.to_be() as u64;
        return ctx
            .l4_csum_replace(check_off, port(old_id), port(new_id), 2)
            .map_err(fail);
    }
    // SAFETY: the ports lie within the L4 header the parser bounds-checked.
    unsafe {
        *(pkt.l4 as *mut [u8; 2]) = flow.nat_src_port.to_be_bytes();
        *(pkt.l4.add(2) as *mut [u8; 2]) = flow.nat_dst_port.to_be_bytes();
    }
    rewrite_ip(pkt, flow);
    if !is_tcp && old_check == 0 {
        // UDP without checksum stays without checksum.
        return Ok(());
    }
    let mangled = if is_tcp {
        0
    } else {
        BPF_F_MARK_MANGLED_0 as u64
    };
    if k.src_addr != flow.nat_src_addr || k.dst_addr != flow.nat_dst_addr {
        let addrs = csum::Wsum::default()
            .replace4(k.src_addr, flow.nat_src_addr)
            .replace4(k.dst_addr, flow.nat_dst_addr);
        // Size 0: `to` is the difference, `from` must be 0.
        ctx.l4_csum_replace(
            check_off,
            0,
            addrs.0 as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled,
        )
        .map_err(fail)?;
    }
    if k.src_port != flow.nat_src_port || k.dst_port != flow.nat_dst_port {
        let ports = csum::Wsum::default()
            .replace2(k.src_port.to_be_bytes(), flow.nat_src_port.to_be_bytes())
            .replace2(k.dst_port.to_be_bytes(), flow.nat_dst_port.to_be_bytes());
        ctx.l4_csum_replace(check_off, 0, ports.0 as u64, mangled)
            .map_err(fail)?;
    }
    Ok(())
}
