//! Bounds-checked, cursor-style parsing of Ethernet (one 802.1Q tag), IPv4, TCP and UDP.
//!
//! Every read goes through `Cursor::take`, which proves to the verifier that the
//! header lies inside the packet before a pointer to it exists.

use core::mem::size_of;

use firewall_common::{
    flow::tcp_seen,
    flow::FlowKey,
    frag::{self, Fragment},
    icmp,
    stats::Counter,
    IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IP_DF: u16 = 0x4000;

/// The start of an ICMP echo request or reply (RFC 792).
#[repr(C)]
struct IcmpEcho {
    kind: u8,
    code: u8,
    check: [u8; 2],
    id: [u8; 2],
    seq: [u8; 2],
}

/// A parsed TCP, UDP or ICMP echo over IPv4 packet: where its headers are and its flow key.
///
/// A later fragment (`fragment == Later`) has no L4 header: its key's ports
/// are 0 until `frag::later` fills them in, and `l4`/`l4_check` point at the
/// IPv4 header (valid, never used for it).
pub struct Packet {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    /// Offset of the IPv4 header from the start of the packet.
    pub l3_off: u16,
    /// Offset of the L4 header from the start of the packet.
    pub l4_off: u16,
    /// Pointer to the L4 header (at least a full TCP or UDP header is in bounds).
    pub l4: *mut u8,
    /// The L4 checksum field, derived where its header was bounds-checked (the
    /// verifier cannot tie a TCP offset to a later protocol test).
    pub l4_check: *mut [u8; 2],
    /// Length of the L4 segment (IPv4 total length minus header length).
    pub l4_len: u16,
    pub key: FlowKey,
    pub ttl: u8,
    pub dont_fragment: bool,
    pub vlan_tagged: bool,
    /// `tcp_seen` bits of this segment (0 for UDP).
    pub tcp_flags: u8,
    /// A TCP SYN without ACK, or an ICMP echo request: the only packets
    /// that may open a connection.
    pub syn_only: bool,
    pub fragment: Fragment,
    /// The IPv4 identification (a fragment's datagram).
    pub ip_id: u16,
}

struct Cursor {
    pos: usize,
    end: usize,
}

impl Cursor {
    #[inline(always)]
    fn take<T>(&mut self) -> Option<*mut T> {
        let start = self.pos;
        if start + size_of::<T>() > self.end {
            return None;
        }
        self.pos = start + size_of::<T>();
        Some(start as *mut T)
    }
}

/// Parses the packet, or says which counter (and so which verdict) it gets
/// without further processing. `start..end` are the bytes directly readable
/// (XDP: the packet; TC: the linear part of the skb) and `len` the packet's
/// whole length (TC: with its paged data, a GSO super-packet's too).
#[inline(always)]
pub fn parse_range(start: usize, end: usize, len: usize) -> Result<Packet, Counter> {
    let mut cur = Cursor { pos: start, end };

    // A frame too short for Ethernet is not ours to judge.
    let eth: *mut EthHdr = cur.take().ok_or(Counter::PassNotIpv4)?;
    // SAFETY: `take` bounds-checked the Ethernet header.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut vlan_tagged = false;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let vlan: *mut VlanHdr = cur.take().ok_or(Counter::DropMalformed)?;
        // SAFETY: `take` bounds-checked the VLAN header.
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
            return Err(Counter::DropVlan);
        }
        vlan_tagged = true;
    }
    if ether_type != ETH_P_IP {
        return Err(Counter::PassNotIpv4);
    }

    let l3_off = cur.pos - start;
    let ip: *mut Ipv4Hdr = cur.take().ok_or(Counter::DropMalformed)?;
    // SAFETY: `take` bounds-checked the IPv4 header.
    let (vihl, tot_len, ip_id, frags, ttl, protocol, src_addr, dst_addr) = unsafe {
        let h = &*ip;
        (
            h.vihl,
            u16::from_be_bytes(h.tot_len),
            u16::from_be_bytes(h.id),
            u16::from_be_bytes(h.frags),
            h.ttl,
            h.proto,
            h.src_addr,
            h.dst_addr,
        )
    };
    let ihl = ((vihl & 0x0f) as usize) << 2;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(Counter::DropMalformed);
    }
    // The frame may carry Ethernet padding beyond tot_len, never less than tot_len.
    if (tot_len as usize) < ihl || l3_off + tot_len as usize > len {
        return Err(Counter::DropMalformed);
    }
    let fragment = frag::classify(frags, protocol);
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP && protocol != IPPROTO_ICMP {
        return Err(if fragment == Some(Fragment::Whole) {
            Counter::PassNotTcpUdp
        } else {
            Counter::PassFragment
        });
    }
    let Some(fragment) = fragment else {
        return Err(Counter::DropMalformed);
    };

    let l4_off = l3_off + ihl;
    let l4_len = tot_len - ihl as u16;
    if fragment == Fragment::Later {
        // No L4 header; the datagram's first fragment had it.
        return Ok(Packet {
            eth,
            ip,
            l3_off: l3_off as u16,
            l4_off: l4_off as u16,
            l4: ip as *mut u8,
            // SAFETY: a field of the bounds-checked IPv4 header; no reference is made.
            l4_check: unsafe { &raw mut (*ip).check },
            l4_len,
            key: FlowKey::new(protocol, src_addr, 0, dst_addr, 0),
            ttl,
            dont_fragment: false,
            vlan_tagged,
            tcp_flags: 0,
            syn_only: false,
            fragment,
            ip_id,
        });
    }
    let mut l4cur = Cursor {
        pos: start + l4_off,
        end,
    };
    let (l4, l4_check, src_port, dst_port, tcp_flags, syn_only) = if protocol == IPPROTO_TCP {
        let tcp: *mut TcpHdr = l4cur.take().ok_or(Counter::DropMalformed)?;
        // SAFETY: `take` bounds-checked the TCP header.
        let t = unsafe { &*tcp };
        let doff = (t.doff() as usize) << 2;
        if doff < TcpHdr::LEN || doff > l4_len as usize {
            return Err(Counter::DropMalformed);
        }
        let mut seen = 0u8;
        if t.syn() != 0 {
            seen |= tcp_seen::SYN;
        }
        if t.fin() != 0 {
            seen |= tcp_seen::FIN;
        }
        if t.rst() != 0 {
            seen |= tcp_seen::RST;
        }
        // SAFETY: a field of the bounds-checked TCP header; no reference is made.
        let check = unsafe { &raw mut (*tcp).check };
        let syn_only = t.syn() != 0 && t.ack() == 0;
        (
            tcp as *mut u8,
            check,
            u16::from_be_bytes(t.source),
            u16::from_be_bytes(t.dest),
            seen,
            syn_only,
        )
    } else if protocol == IPPROTO_ICMP {
        let icmp: *mut IcmpEcho = l4cur.take().ok_or(Counter::DropMalformed)?;
        if (l4_len as usize) < size_of::<IcmpEcho>() {
            return Err(Counter::DropMalformed);
        }
        // SAFETY: `take` bounds-checked the echo header.
        let e = unsafe { &*icmp };
        let id = u16::from_be_bytes(e.id);
        // The identifier plays the port. Errors are about a flow
        // (`icmp_error`); other ICMP is not tracked.
        let (src_port, dst_port) = match icmp::echo_ports(e.kind, e.code, id) {
            Some(ports) => ports,
            // A fragmented error is not translated (errors are short).
            None if icmp::is_error(e.kind) && fragment == Fragment::Whole => {
                return Err(Counter::PassIcmpError)
            }
            None if icmp::is_error(e.kind) => return Err(Counter::PassFragment),
            None => return Err(Counter::PassNotTcpUdp),
        };
        let request = e.kind == icmp::ECHO_REQUEST;
        // SAFETY: a field of the bounds-checked header; no reference is made.
        let check = unsafe { &raw mut (*icmp).check };
        (icmp as *mut u8, check, src_port, dst_port, 0, request)
    } else {
        let udp: *mut UdpHdr = l4cur.take().ok_or(Counter::DropMalformed)?;
        // SAFETY: `take` bounds-checked the UDP header.
        let u = unsafe { &*udp };
        let len = u16::from_be_bytes(u.len) as usize;
        // A first fragment holds only the start of the datagram the length
        // covers.
        let whole = fragment == Fragment::Whole;
        if len < UdpHdr::LEN
            || (whole && len > l4_len as usize)
            || (!whole && len <= l4_len as usize)
        {
            return Err(Counter::DropMalformed);
        }
        // SAFETY: a field of the bounds-checked UDP header; no reference is made.
        let check = unsafe { &raw mut (*udp).check };
        (
            udp as *mut u8,
            check,
            u16::from_be_bytes(u.src),
            u16::from_be_bytes(u.dst),
            0,
            false,
        )
    };

    Ok(Packet {
        eth,
        ip,
        l3_off: l3_off as u16,
        l4_off: l4_off as u16,
        l4,
        l4_check,
        l4_len,
        key: FlowKey::new(protocol, src_addr, src_port, dst_addr, dst_port),
        ttl,
        dont_fragment: frags & IP_DF != 0,
        vlan_tagged,
        tcp_flags,
        syn_only,
        fragment,
        ip_id,
    })
}

/// An ICMP error (`icmp::is_error`) and the packet it quotes, every header
/// bounds-checked.
pub struct IcmpError {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    /// The outer IPv4 total length.
    pub tot_len: u16,
    pub dont_fragment: bool,
    /// Type, code, checksum and the 4 bytes after them.
    pub icmp: *mut [u8; 8],
    pub inner: *mut Ipv4Hdr,
    /// The quoted L4 header's first 8 bytes, which every error quotes:
    /// TCP/UDP ports (and the UDP checksum), or an echo's header.
    pub inner_l4: *mut [u8; 8],
    /// The quoted TCP checksum when the error quotes that far, else null.
    pub inner_tcp_check: *mut [u8; 2],
    /// The key of the flow the error travels with: the quoted packet's,
    /// reversed (`icmp::error_flow_key`).
    pub key: FlowKey,
}

/// Parses an ICMP error that `parse_range` announced (`PassIcmpError`).
/// A quote the datapath cannot read is `PassIcmpError`: the stack's, if it
/// is addressed to the firewall, dropped otherwise.
#[inline(always)]
pub fn icmp_error(start: usize, end: usize) -> Result<IcmpError, Counter> {
    let mut cur = Cursor { pos: start, end };
    let eth: *mut EthHdr = cur.take().ok_or(Counter::DropMalformed)?;
    // SAFETY: `take` bounds-checked the Ethernet header.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        // `parse_range` found IPv4: only a VLAN tag stands in between.
        return Err(Counter::DropVlan);
    }
    let ip: *mut Ipv4Hdr = cur.take().ok_or(Counter::DropMalformed)?;
    // SAFETY: `take` bounds-checked the IPv4 header.
    let (vihl, tot_len, frags) = unsafe {
        let h = &*ip;
        (
            h.vihl,
            u16::from_be_bytes(h.tot_len),
            u16::from_be_bytes(h.frags),
        )
    };
    // `parse_range` checked the header length and the total length.
    let ihl = ((vihl & 0x0f) as usize) << 2;
    let message_end = start + EthHdr::LEN + tot_len as usize;
    cur.pos = start + EthHdr::LEN + ihl;
    let icmp: *mut [u8; 8] = cur.take().ok_or(Counter::DropMalformed)?;
    let inner: *mut Ipv4Hdr = cur.take().ok_or(Counter::PassIcmpError)?;
    // SAFETY: `take` bounds-checked the quoted IPv4 header.
    let (inner_vihl, inner_frags, protocol, src_addr, dst_addr) = unsafe {
        let h = &*inner;
        (
            h.vihl,
            u16::from_be_bytes(h.frags),
            h.proto,
            h.src_addr,
            h.dst_addr,
        )
    };
    let inner_ihl = ((inner_vihl & 0x0f) as usize) << 2;
    // A quoted fragment other than the first has no ports to read.
    if inner_vihl >> 4 != 4 || inner_ihl < Ipv4Hdr::LEN || inner_frags & 0x1fff != 0 {
        return Err(Counter::PassIcmpError);
    }
    cur.pos = inner as usize + inner_ihl;
    let inner_l4: *mut [u8; 8] = cur.take().ok_or(Counter::PassIcmpError)?;
    if cur.pos > message_end {
        return Err(Counter::PassIcmpError);
    }
    // SAFETY: `take` bounds-checked the 8 quoted bytes.
    let l4 = unsafe { &*inner_l4 };
    let (src_port, dst_port) = match protocol {
        IPPROTO_TCP | IPPROTO_UDP => (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ),
        IPPROTO_ICMP => icmp::echo_ports(l4[0], l4[1], u16::from_be_bytes([l4[4], l4[5]]))
            .ok_or(Counter::PassIcmpError)?,
        _ => return Err(Counter::PassIcmpError),
    };
    let mut inner_tcp_check = core::ptr::null_mut();
    if protocol == IPPROTO_TCP {
        let mut tcp = Cursor {
            pos: inner_l4 as usize + 16,
            end,
        };
        if let Some(check) = tcp.take::<[u8; 2]>() {
            if tcp.pos <= message_end {
                inner_tcp_check = check;
            }
        }
    }
    Ok(IcmpError {
        eth,
        ip,
        tot_len,
        dont_fragment: frags & IP_DF != 0,
        icmp,
        inner,
        inner_l4,
        inner_tcp_check,
        key: icmp::error_flow_key(&FlowKey::new(
            protocol, src_addr, src_port, dst_addr, dst_port,
        )),
    })
}

/// What the FIB needs to know about an IP packet the pipeline does not
/// translate (IPv4 other than TCP/UDP, a fragment, IPv6): whether it is the
/// firewall's own or would be forwarded.
pub enum Bare {
    V4 {
        protocol: u8,
        src: [u8; 4],
        dst: [u8; 4],
    },
    /// The addresses stay in the packet (bounds-checked): copied byte by
    /// byte where needed, they cost no stack.
    V6 {
        next_header: u8,
        src: *const [u8; 16],
        dst: *const [u8; 16],
    },
}

/// Reads the addresses of an untagged IPv4 or IPv6 frame; `None` for
/// anything else (ARP, LLDP, ...), which no router forwards.
#[inline(always)]
pub fn bare(start: usize, end: usize) -> Option<Bare> {
    let mut cur = Cursor { pos: start, end };
    let eth: *mut EthHdr = cur.take()?;
    // SAFETY: `take` bounds-checked the Ethernet header.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    if ether_type == ETH_P_IP {
        let ip: *mut Ipv4Hdr = cur.take()?;
        // SAFETY: `take` bounds-checked the IPv4 header.
        let h = unsafe { &*ip };
        Some(Bare::V4 {
            protocol: h.proto,
            src: h.src_addr,
            dst: h.dst_addr,
        })
    } else if ether_type == ETH_P_IPV6 {
        let ip: *mut Ipv6Hdr = cur.take()?;
        // SAFETY: `take` bounds-checked the IPv6 header.
        let h = unsafe { &*ip };
        Some(Bare::V6 {
            next_header: h.next_hdr,
            src: &raw const h.src_addr,
            dst: &raw const h.dst_addr,
        })
    } else {
        None
    }
}
