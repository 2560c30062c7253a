//! The TFTP helper. A TFTP server answers a request from a port of its own
//! (RFC 1350's transfer identifier), not the one it was asked on, so the
//! answer matches no flow of the request. The helper lets that answer in
//! when it comes from the very server the request went to, addressed to the
//! NAT endpoint the request left from, and tracks the transfer from then on
//! like any connection: the request's two flows, copied for the server's new
//! port. What netfilter's `nf_conntrack_tftp` expects, decided in the kernel
//! on the answer's first packet.

use crate::flow::{flow_kind, FlowKey, FlowValue};

/// Server ports of the TFTP helper at most (`TftpConf`).
pub const TFTP_PORTS: usize = 4;

/// Value of `TFTP_CONF` (one entry): the server ports (host order; 0 is
/// none) whose requests the helper lets the server answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TftpConf {
    pub ports: [u16; TFTP_PORTS],
}

/// For an answer (`answer`: the server's transfer port to a NAT endpoint),
/// the key of the request's reply flow on server port `port`: the flow whose
/// value names the internal endpoint that asked.
#[inline(always)]
pub const fn request_reply_key(answer: &FlowKey, port: u16) -> FlowKey {
    FlowKey::new(
        answer.protocol,
        answer.src_addr,
        port,
        answer.dst_addr,
        answer.dst_port,
    )
}

/// The key of the request's own flow (internal endpoint to the server's
/// port), from its reply flow's value.
#[inline(always)]
pub const fn request_key(answer: &FlowKey, port: u16, reply: &FlowValue) -> FlowKey {
    FlowKey::new(
        answer.protocol,
        reply.nat_dst_addr,
        reply.nat_dst_port,
        answer.src_addr,
        port,
    )
}

/// The answer's outbound key: the internal endpoint to the server's
/// transfer port.
#[inline(always)]
pub const fn answer_out_key(answer: &FlowKey, reply: &FlowValue) -> FlowKey {
    FlowKey::new(
        answer.protocol,
        reply.nat_dst_addr,
        reply.nat_dst_port,
        answer.src_addr,
        answer.src_port,
    )
}

/// Whether `request` (and its `reply`) are a tracked request that `answer`
/// may answer: both flows the wall's (a primary connection, not a pinhole's
/// or a published server's), the request translated to exactly the NAT
/// endpoint the answer is addressed to and sent to the answering server.
#[inline(always)]
pub fn answers(answer: &FlowKey, request: &FlowValue, reply: &FlowValue) -> bool {
    request.kind == flow_kind::PRIMARY
        && reply.kind == flow_kind::PRIMARY
        && request.nat_src_addr == answer.dst_addr
        && request.nat_src_port == answer.dst_port
        && request.nat_dst_addr == answer.src_addr
        && reply.nat_src_addr == answer.src_addr
}

/// Whether the request may be answered now: not yet, or the client asked
/// again since the last answer (a retransmitted request, which a server may
/// answer from a new port). One answer per request packet, as netfilter's
/// expectations: a server the client asked cannot open flows from every
/// port it has.
#[inline(always)]
pub fn armed(request: &FlowValue) -> bool {
    request.answered != (request.packets as u32).wrapping_add(1)
}

/// Records on the request's flow that its latest packet was answered.
#[inline(always)]
pub fn mark_answered(request: &mut FlowValue) {
    request.answered = (request.packets as u32).wrapping_add(1);
}

/// Turns copies of the request's flows (`out`: the request's own, `back`:
/// its reply's) into the transfer's: the server's port is its transfer
/// port `tid` instead of the asked one, the rest of the translation and the
/// next hop are the same, nothing is counted yet, both seen `now`.
#[inline(always)]
pub fn transfer(out: &mut FlowValue, back: &mut FlowValue, tid: u16, now_ns: u64) {
    out.nat_dst_port = tid;
    back.nat_src_port = tid;
    out.answered = 0;
    for v in [out, back] {
        v.packets = 0;
        v.bytes = 0;
        v.tcp_flags_seen = 0;
        v.owner = 0;
        v.last_seen_ns = now_ns;
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields only, no padding.
    unsafe impl aya::Pod for super::TftpConf {}
}

const _: () = assert!(core::mem::size_of::<TftpConf>() == 8);

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: [u8; 4] = [10, 1, 0, 3];
    const NAT: [u8; 4] = [10, 2, 0, 1];
    const SERVER: [u8; 4] = [10, 2, 0, 2];

    /// The flows the wall makes for CLIENT:5000 → SERVER:69 through NAT:5000.
    fn request() -> (FlowValue, FlowValue) {
        let mut out = FlowValue::forward(NAT, 5000, SERVER, 69);
        out.kind = flow_kind::PRIMARY;
        out.packets = 3;
        let mut back = FlowValue::forward(SERVER, 69, CLIENT, 5000);
        back.kind = flow_kind::PRIMARY;
        (out, back)
    }

    #[test]
    fn an_answer_from_the_asked_server_finds_the_request() {
        let answer = FlowKey::new(17, SERVER, 40001, NAT, 5000);
        let (out, back) = request();
        assert_eq!(
            request_reply_key(&answer, 69),
            FlowKey::new(17, SERVER, 69, NAT, 5000)
        );
        assert_eq!(
            request_key(&answer, 69, &back),
            FlowKey::new(17, CLIENT, 5000, SERVER, 69)
        );
        assert_eq!(
            answer_out_key(&answer, &back),
            FlowKey::new(17, CLIENT, 5000, SERVER, 40001)
        );
        assert!(answers(&answer, &out, &back));
    }

    #[test]
    fn only_the_wall_s_own_request_to_that_server_and_endpoint_counts() {
        let answer = FlowKey::new(17, SERVER, 40001, NAT, 5000);
        let (out, back) = request();
        let mut other = out;
        other.kind = flow_kind::STATIC;
        assert!(!answers(&answer, &other, &back), "a secondary connection's");
        let mut other = back;
        other.kind = flow_kind::STATIC;
        assert!(!answers(&answer, &out, &other));
        let mut other = out;
        other.nat_src_port = 5001;
        assert!(!answers(&answer, &other, &back), "left from another port");
        let mut other = out;
        other.nat_dst_addr = [10, 2, 0, 9];
        assert!(!answers(&answer, &other, &back), "sent to another server");
        let mut other = back;
        other.nat_src_addr = [10, 2, 0, 9];
        assert!(!answers(&answer, &out, &other));
    }

    #[test]
    fn one_answer_per_request_packet() {
        let (mut out, _) = request();
        assert!(armed(&out), "never answered");
        mark_answered(&mut out);
        assert!(!armed(&out), "answered, no request since");
        out.packets += 1;
        assert!(armed(&out), "the client asked again");
        mark_answered(&mut out);
        assert!(!armed(&out));
        out.packets = u64::from(u32::MAX);
        assert!(armed(&out));
        mark_answered(&mut out);
        assert_eq!(out.answered, 0, "wraps");
        assert!(!armed(&out));
    }

    #[test]
    fn the_transfer_s_flows_translate_to_the_transfer_port() {
        let (mut out, mut back) = request();
        out.owner = 9;
        out.answered = 4;
        back.tcp_flags_seen = 1;
        transfer(&mut out, &mut back, 40001, 77);
        // CLIENT:5000 → SERVER:40001 leaves as NAT:5000 → SERVER:40001.
        assert_eq!(
            (
                out.nat_src_addr,
                out.nat_src_port,
                out.nat_dst_addr,
                out.nat_dst_port
            ),
            (NAT, 5000, SERVER, 40001)
        );
        // SERVER:40001 → NAT:5000 arrives as SERVER:40001 → CLIENT:5000.
        assert_eq!(
            (
                back.nat_src_addr,
                back.nat_src_port,
                back.nat_dst_addr,
                back.nat_dst_port
            ),
            (SERVER, 40001, CLIENT, 5000)
        );
        for v in [out, back] {
            assert_eq!(
                (v.packets, v.bytes, v.owner, v.tcp_flags_seen),
                (0, 0, 0, 0)
            );
            assert_eq!((v.last_seen_ns, v.kind), (77, flow_kind::PRIMARY));
        }
    }
}
