//! Building test frames (Ethernet, optional 802.1Q, IPv4, TCP/UDP) and checking
//! frames the datapath produced, with checksums computed from scratch.

use firewall_common::{csum, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xbb];

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

/// Describes a frame to build.
#[derive(Clone, Debug)]
pub struct Spec {
    pub protocol: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
    pub ttl: u8,
    pub vlan: Option<u16>,
    /// Bytes of IPv4 options (a multiple of 4).
    pub ip_options: Vec<u8>,
    /// The flags/fragment-offset field.
    pub frag: u16,
    pub tcp_flags: u8,
    /// Write the checksum a CHECKSUM_PARTIAL skb carries (pseudo header only).
    pub partial_checksum: bool,
    /// UDP only: send without checksum (0).
    pub no_udp_checksum: bool,
    /// TCP sequence and acknowledgment numbers.
    pub seq: u32,
    pub ack: u32,
    /// TCP options (a multiple of 4 bytes).
    pub tcp_options: Vec<u8>,
}

impl Spec {
    pub fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Self {
        Self {
            protocol: IPPROTO_TCP,
            src,
            dst,
            sport,
            dport,
            payload: b"hello through the firewall".to_vec(),
            ttl: 64,
            vlan: None,
            ip_options: vec![],
            frag: 0x4000, // DF
            tcp_flags: TCP_ACK,
            partial_checksum: false,
            no_udp_checksum: false,
            seq: 1000,
            ack: 2000,
            tcp_options: vec![],
        }
    }

    pub fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Self {
        Self {
            protocol: IPPROTO_UDP,
            frag: 0,
            ..Self::tcp(src, sport, dst, dport)
        }
    }

    /// An ICMP echo request (or reply): `sport` holds the ICMP type (8 or 0),
    /// `dport` the identifier.
    pub fn echo(src: [u8; 4], dst: [u8; 4], id: u16, request: bool) -> Self {
        Self {
            protocol: IPPROTO_ICMP,
            frag: 0,
            ..Self::tcp(src, if request { 8 } else { 0 }, dst, id)
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&MAC_B);
        f.extend_from_slice(&MAC_A);
        if let Some(vid) = self.vlan {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        f.extend_from_slice(&0x0800u16.to_be_bytes());

        let mut l4 = Vec::new();
        if self.protocol == IPPROTO_ICMP {
            l4.extend_from_slice(&[self.sport as u8, 0, 0, 0]);
            l4.extend_from_slice(&self.dport.to_be_bytes());
            l4.extend_from_slice(&1u16.to_be_bytes()); // sequence
        } else if self.protocol == IPPROTO_TCP {
            l4.extend_from_slice(&self.sport.to_be_bytes());
            l4.extend_from_slice(&self.dport.to_be_bytes());
            l4.extend_from_slice(&self.seq.to_be_bytes());
            l4.extend_from_slice(&self.ack.to_be_bytes());
            l4.push(((5 + self.tcp_options.len() / 4) as u8) << 4); // data offset
            l4.push(self.tcp_flags);
            l4.extend_from_slice(&65535u16.to_be_bytes()); // window
            l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
            l4.extend_from_slice(&self.tcp_options);
        } else {
            l4.extend_from_slice(&self.sport.to_be_bytes());
            l4.extend_from_slice(&self.dport.to_be_bytes());
            l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend_from_slice(&self.payload);
        let check_off = match self.protocol {
            IPPROTO_TCP => 16,
            IPPROTO_ICMP => 2,
            _ => 6,
        };
        let check = if self.protocol == IPPROTO_ICMP {
            csum::ipv4_header_checksum(&l4)
        } else if self.no_udp_checksum && self.protocol == IPPROTO_UDP {
            0
        } else if self.partial_checksum {
            csum::fold(
                csum::pseudo_header_sum(self.src, self.dst, self.protocol, l4.len() as u16) as u64,
            )
        } else {
            let c = csum::l4_checksum(self.src, self.dst, self.protocol, &l4);
            if self.protocol == IPPROTO_UDP {
                csum::udp_final(c)
            } else {
                c
            }
        };
        l4[check_off..check_off + 2].copy_from_slice(&check.to_be_bytes());

        let ihl = 20 + self.ip_options.len();
        assert!(ihl.is_multiple_of(4) && ihl <= 60);
        let mut ip = vec![0u8; 20];
        ip[0] = 0x40 | (ihl / 4) as u8;
        ip[2..4].copy_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag.to_be_bytes());
        ip[8] = self.ttl;
        ip[9] = self.protocol;
        ip[12..16].copy_from_slice(&self.src);
        ip[16..20].copy_from_slice(&self.dst);
        ip.extend_from_slice(&self.ip_options);
        let hc = csum::ipv4_header_checksum(&ip);
        ip[10..12].copy_from_slice(&hc.to_be_bytes());

        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        f
    }
}

/// An ICMP error (`kind`, `code`, the 4 bytes after the checksum `rest`)
/// from `src` to `dst`, quoting the first `quote` bytes of the IPv4 packet
/// in `frame` (a frame `Spec::build` or the datapath made).
pub fn icmp_error(
    src: [u8; 4],
    dst: [u8; 4],
    (kind, code, rest): (u8, u8, [u8; 4]),
    frame: &[u8],
    quote: usize,
) -> Vec<u8> {
    let quoted = &frame[14..];
    let quoted = &quoted[..quote.min(quoted.len())];
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(quoted);
    let check = csum::ipv4_header_checksum(&icmp);
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = IPPROTO_ICMP;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let hc = csum::ipv4_header_checksum(&ip);
    ip[10..12].copy_from_slice(&hc.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&MAC_B);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// The packet an ICMP error in `frame` quotes, as a frame of its own (the
/// error's Ethernet header in front), for `view` and `check_checksums`
/// when the quote is whole.
pub fn quoted(frame: &[u8]) -> Vec<u8> {
    let ihl = ((frame[14] & 0xf) as usize) * 4;
    let mut f = frame[..14].to_vec();
    f.extend_from_slice(&frame[14 + ihl + 8..]);
    f
}

/// The fields of a built or transformed frame, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub ttl: u8,
    pub protocol: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub ip_check: u16,
    pub l4_check: u16,
    pub payload: Vec<u8>,
    /// TCP sequence and acknowledgment numbers (0 for other protocols).
    pub seq: u32,
    pub ack: u32,
}

/// Parses an untagged IPv4 TCP/UDP frame (as the fixtures produce).
pub fn view(frame: &[u8]) -> View {
    let ip = &frame[14..];
    let ihl = ((ip[0] & 0xf) as usize) * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let l4 = &ip[ihl..tot];
    let protocol = ip[9];
    let (check_off, hdr) = match protocol {
        IPPROTO_TCP => (16, ((l4[12] >> 4) as usize) * 4),
        IPPROTO_ICMP => (2, 8),
        _ => (6, 8),
    };
    // ICMP echo: "sport" is the type, "dport" the identifier.
    let (sport, dport) = if protocol == IPPROTO_ICMP {
        (l4[0] as u16, u16::from_be_bytes([l4[4], l4[5]]))
    } else {
        (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        )
    };
    View {
        dst_mac: frame[0..6].try_into().unwrap(),
        src_mac: frame[6..12].try_into().unwrap(),
        ttl: ip[8],
        protocol,
        src: ip[12..16].try_into().unwrap(),
        dst: ip[16..20].try_into().unwrap(),
        sport,
        dport,
        ip_check: u16::from_be_bytes([ip[10], ip[11]]),
        l4_check: u16::from_be_bytes([l4[check_off], l4[check_off + 1]]),
        payload: l4[hdr..].to_vec(),
        seq: tcp_word(protocol, l4, 4),
        ack: tcp_word(protocol, l4, 8),
    }
}

fn tcp_word(protocol: u8, l4: &[u8], at: usize) -> u32 {
    if protocol == IPPROTO_TCP {
        u32::from_be_bytes([l4[at], l4[at + 1], l4[at + 2], l4[at + 3]])
    } else {
        0
    }
}

/// Recomputes the IPv4 header and L4 checksums from scratch and compares them
/// with the ones in the frame.
pub fn check_checksums(frame: &[u8]) -> Result<(), String> {
    let ip = &frame[14..];
    let ihl = ((ip[0] & 0xf) as usize) * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let mut hdr = ip[..ihl].to_vec();
    let got_ip = u16::from_be_bytes([hdr[10], hdr[11]]);
    hdr[10] = 0;
    hdr[11] = 0;
    let want_ip = csum::ipv4_header_checksum(&hdr);
    if got_ip != want_ip {
        return Err(format!(
            "IPv4 header checksum {got_ip:04x}, from scratch {want_ip:04x}"
        ));
    }
    let protocol = ip[9];
    let src: [u8; 4] = ip[12..16].try_into().unwrap();
    let dst: [u8; 4] = ip[16..20].try_into().unwrap();
    let mut l4 = ip[ihl..tot].to_vec();
    let off = match protocol {
        IPPROTO_TCP => 16,
        IPPROTO_ICMP => 2,
        _ => 6,
    };
    let got = u16::from_be_bytes([l4[off], l4[off + 1]]);
    if protocol == IPPROTO_ICMP {
        l4[off] = 0;
        l4[off + 1] = 0;
        let want = csum::ipv4_header_checksum(&l4);
        return if got == want {
            Ok(())
        } else {
            Err(format!("ICMP checksum {got:04x}, from scratch {want:04x}"))
        };
    }
    if protocol == IPPROTO_UDP && got == 0 {
        return Ok(()); // no checksum
    }
    l4[off] = 0;
    l4[off + 1] = 0;
    let mut want = csum::l4_checksum(src, dst, protocol, &l4);
    if protocol == IPPROTO_UDP {
        want = csum::udp_final(want);
    }
    if got != want {
        return Err(format!("L4 checksum {got:04x}, from scratch {want:04x}"));
    }
    Ok(())
}

/// Splits the IPv4 packet in `frame` (untagged, no options) into fragments
/// of at most `chunk` payload bytes (a multiple of 8), as a sender's stack
/// does: each with its own header, offset, MF and header checksum.
pub fn fragments(frame: &[u8], chunk: usize) -> Vec<Vec<u8>> {
    assert!(chunk.is_multiple_of(8) && chunk > 0);
    let ip = &frame[14..];
    let ihl = ((ip[0] & 0xf) as usize) * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let payload = &ip[ihl..tot];
    let mut out = Vec::new();
    for (i, part) in payload.chunks(chunk).enumerate() {
        let offset = i * chunk;
        let more = offset + part.len() < payload.len();
        let mut hdr = ip[..ihl].to_vec();
        hdr[2..4].copy_from_slice(&((ihl + part.len()) as u16).to_be_bytes());
        let field = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
        hdr[6..8].copy_from_slice(&field.to_be_bytes());
        hdr[10] = 0;
        hdr[11] = 0;
        let hc = csum::ipv4_header_checksum(&hdr);
        hdr[10..12].copy_from_slice(&hc.to_be_bytes());
        let mut f = frame[..14].to_vec();
        f.extend_from_slice(&hdr);
        f.extend_from_slice(part);
        out.push(f);
    }
    out
}

/// Reassembles fragments (any order) into one unfragmented frame, as the
/// receiver's stack does, refusing what it would refuse: headers that
/// disagree on the datagram's identity, gaps, overlaps, a header checksum
/// that does not hold, no last fragment.
pub fn reassemble(frags: &[Vec<u8>]) -> Result<Vec<u8>, String> {
    let mut parts: Vec<(usize, bool, &[u8])> = Vec::new();
    let first = frags
        .iter()
        .find(|f| u16::from_be_bytes([f[20], f[21]]) & 0x1fff == 0)
        .ok_or("no first fragment")?;
    let identity = |f: &[u8]| {
        (
            f[14 + 4..14 + 6].to_vec(),
            f[14 + 9],
            f[14 + 12..14 + 20].to_vec(),
        )
    };
    for f in frags {
        let ip = &f[14..];
        let ihl = ((ip[0] & 0xf) as usize) * 4;
        if csum::ipv4_header_checksum(&ip[..ihl]) != 0 {
            return Err("a fragment's header checksum does not hold".into());
        }
        if identity(f) != identity(first) {
            return Err("fragments of different datagrams".into());
        }
        let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        let field = u16::from_be_bytes([ip[6], ip[7]]);
        parts.push((
            (field & 0x1fff) as usize * 8,
            field & 0x2000 != 0,
            &ip[ihl..tot],
        ));
    }
    parts.sort_by_key(|p| p.0);
    let mut payload = Vec::new();
    for (offset, _, data) in &parts {
        if *offset != payload.len() {
            return Err(format!("gap or overlap at {offset}"));
        }
        payload.extend_from_slice(data);
    }
    if parts.last().is_some_and(|p| p.1) {
        return Err("no last fragment".into());
    }
    let ip = &first[14..];
    let ihl = ((ip[0] & 0xf) as usize) * 4;
    let mut hdr = ip[..ihl].to_vec();
    hdr[2..4].copy_from_slice(&((ihl + payload.len()) as u16).to_be_bytes());
    hdr[6] = 0;
    hdr[7] = 0;
    hdr[10] = 0;
    hdr[11] = 0;
    let hc = csum::ipv4_header_checksum(&hdr);
    hdr[10..12].copy_from_slice(&hc.to_be_bytes());
    let mut f = first[..14].to_vec();
    f.extend_from_slice(&hdr);
    f.extend_from_slice(&payload);
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_have_valid_checksums() {
        for spec in [
            Spec::tcp([10, 1, 0, 2], 40000, [10, 2, 0, 2], 21),
            Spec::udp([10, 1, 0, 2], 5000, [10, 2, 0, 2], 53),
        ] {
            let f = spec.build();
            check_checksums(&f).unwrap();
            let v = view(&f);
            assert_eq!(
                (v.sport, v.dport, v.src, v.dst),
                (spec.sport, spec.dport, spec.src, spec.dst)
            );
            assert_eq!(v.payload, spec.payload);
        }
        let partial = Spec {
            partial_checksum: true,
            ..Spec::tcp([10, 1, 0, 2], 1, [10, 2, 0, 2], 2)
        }
        .build();
        assert!(check_checksums(&partial).is_err());
    }
}
