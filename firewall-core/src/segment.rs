//! The IPv4 packets the daemon sends in place of a segment the datapath
//! handed over (`firewall_common::inplace`): the filter's output, numbered
//! as `stream_rewrite` says, from the translated addresses and ports, with
//! the sender's TCP header otherwise as it came (its flags, window and
//! options: timestamps must go on, PAWS checks them), checksums computed in
//! full. Sent through a raw socket (`IP_HDRINCL`); the kernel routes it.

use firewall_common::{csum, inplace::SegmentHead, IPPROTO_TCP};

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const IPV4_HEADER: usize = 20;
const TTL: u8 = 64;
const DONT_FRAGMENT: u16 = 0x4000;

/// A segment handed over cannot be answered from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("the TCP header's length ({0}) is not 20 to 60 bytes, a multiple of 4")]
    Header(usize),
    #[error("{0} bytes do not fit in one IPv4 packet")]
    TooLong(usize),
}

/// What goes into one packet.
#[derive(Clone, Copy, Debug)]
pub struct Piece<'a> {
    pub seq: u32,
    pub ack: u32,
    pub payload: &'a [u8],
    /// Carry the sender's FIN (only on the piece that ends its bytes).
    pub fin: bool,
}

/// The packet for `piece`, from the handed-over segment's `head` and TCP
/// header `tcp` (as the sender sent it).
pub fn build(head: &SegmentHead, tcp: &[u8], piece: &Piece) -> Result<Vec<u8>, SegmentError> {
    let hlen = tcp.len();
    if !(20..=60).contains(&hlen) || !hlen.is_multiple_of(4) {
        return Err(SegmentError::Header(hlen));
    }
    let l4_len = hlen + piece.payload.len();
    let total = IPV4_HEADER + l4_len;
    if total > u16::MAX as usize {
        return Err(SegmentError::TooLong(total));
    }
    let mut p = Vec::with_capacity(total);
    // IPv4 header: no options, DF (the connection's path MTU is the
    // sender's business; the output is at most what it sent plus a line).
    p.push(0x45);
    p.push(0);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&DONT_FRAGMENT.to_be_bytes());
    p.push(TTL);
    p.push(IPPROTO_TCP);
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&head.src_addr);
    p.extend_from_slice(&head.dst_addr);
    let ip_check = csum::ipv4_header_checksum(&p[..IPV4_HEADER]);
    p[10..12].copy_from_slice(&ip_check.to_be_bytes());
    // TCP header: the sender's, translated and renumbered.
    let at = p.len();
    p.extend_from_slice(tcp);
    p[at..at + 2].copy_from_slice(&head.src_port.to_be_bytes());
    p[at + 2..at + 4].copy_from_slice(&head.dst_port.to_be_bytes());
    p[at + 4..at + 8].copy_from_slice(&piece.seq.to_be_bytes());
    p[at + 8..at + 12].copy_from_slice(&piece.ack.to_be_bytes());
    let mut flags = tcp[13] & !TCP_FIN;
    if piece.fin {
        flags |= TCP_FIN;
    }
    if !piece.payload.is_empty() {
        flags |= TCP_PSH;
    }
    p[at + 13] = flags | TCP_ACK;
    p[at + 16..at + 20].copy_from_slice(&[0, 0, 0, 0]);
    p.extend_from_slice(piece.payload);
    let check = csum::l4_checksum(head.src_addr, head.dst_addr, IPPROTO_TCP, &p[at..]);
    p[at + 16..at + 18].copy_from_slice(&check.to_be_bytes());
    Ok(p)
}

#[cfg(test)]
mod tests {
    use firewall_common::flow::FlowKey;

    use super::*;

    fn head() -> SegmentHead {
        SegmentHead {
            client: FlowKey::new(IPPROTO_TCP, [10, 1, 0, 2], 40000, [10, 2, 0, 2], 21),
            src_addr: [10, 2, 0, 1],
            dst_addr: [10, 2, 0, 2],
            src_port: 5000,
            dst_port: 21,
            ..SegmentHead::default()
        }
    }

    /// A sender's header: ports as they came, timestamps, PSH|ACK|FIN.
    fn sent() -> Vec<u8> {
        let mut t = vec![0u8; 32];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&21u16.to_be_bytes());
        t[12] = 8 << 4;
        t[13] = TCP_ACK | TCP_PSH | TCP_FIN;
        t[14..16].copy_from_slice(&502u16.to_be_bytes());
        t[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9]);
        t
    }

    #[test]
    fn a_piece_is_translated_renumbered_and_checksummed() {
        let piece = Piece {
            seq: 1101,
            ack: 5029,
            payload: b"PORT 10,2,0,1,19,136\r\n",
            fin: false,
        };
        let p = build(&head(), &sent(), &piece).unwrap();
        assert_eq!(p.len(), 20 + 32 + piece.payload.len());
        assert_eq!(
            csum::ipv4_header_checksum(&p[..20]),
            0,
            "IPv4 header checksum"
        );
        let tcp = &p[20..];
        assert_eq!(
            csum::l4_checksum([10, 2, 0, 1], [10, 2, 0, 2], IPPROTO_TCP, tcp),
            0,
            "TCP checksum"
        );
        assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 5000);
        assert_eq!(u32::from_be_bytes(tcp[4..8].try_into().unwrap()), 1101);
        assert_eq!(u32::from_be_bytes(tcp[8..12].try_into().unwrap()), 5029);
        assert_eq!(tcp[13], TCP_ACK | TCP_PSH, "the FIN only where asked");
        assert_eq!(&tcp[20..32], &sent()[20..32], "options as they came");
        assert_eq!(&tcp[32..], piece.payload);
        let fin = build(&head(), &sent(), &Piece { fin: true, ..piece }).unwrap();
        assert_eq!(fin[20 + 13], TCP_ACK | TCP_PSH | TCP_FIN);
    }

    #[test]
    fn bad_headers_and_sizes_are_refused() {
        let piece = Piece {
            seq: 0,
            ack: 0,
            payload: b"",
            fin: false,
        };
        assert_eq!(
            build(&head(), &[0; 18], &piece),
            Err(SegmentError::Header(18))
        );
        assert_eq!(
            build(&head(), &[0; 22], &piece),
            Err(SegmentError::Header(22))
        );
        let big = vec![b'x'; 65_535];
        assert_eq!(
            build(
                &head(),
                &sent(),
                &Piece {
                    payload: &big,
                    ..piece
                }
            ),
            Err(SegmentError::TooLong(20 + 32 + 65_535))
        );
    }
}
