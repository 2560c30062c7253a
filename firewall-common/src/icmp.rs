//! ICMP errors about tracked flows (RFC 5508, RFC 792).
//!
//! A router or host that cannot deliver a packet answers its source with an
//! ICMP error quoting the packet's IP header and first L4 bytes. Behind a NAT
//! both the error's outer header and the quoted packet carry translated
//! addresses: the datapath finds the flow the quoted packet belongs to and
//! undoes, in the error, the translation that flow's packets get the other
//! way. This module holds that rule; the datapath applies it with
//! incremental checksum updates.

use crate::flow::{FlowKey, FlowValue};

pub const ECHO_REPLY: u8 = 0;
pub const DEST_UNREACHABLE: u8 = 3;
pub const ECHO_REQUEST: u8 = 8;
pub const TIME_EXCEEDED: u8 = 11;
pub const PARAMETER_PROBLEM: u8 = 12;

/// The ICMP errors that quote the packet they are about and that a NAT
/// forwards (RFC 5508): destination unreachable ("fragmentation needed"
/// among them, which path MTU discovery depends on), time exceeded and
/// parameter problem. Redirects and source quench are not forwarded.
#[inline(always)]
pub const fn is_error(kind: u8) -> bool {
    matches!(kind, DEST_UNREACHABLE | TIME_EXCEEDED | PARAMETER_PROBLEM)
}

/// The "ports" of an ICMP echo, as the flow keys hold them (the identifier
/// is the request's source port and the reply's destination port, so that a
/// reply's key is the reverse of its request's); `None` for any other ICMP
/// message.
#[inline(always)]
pub const fn echo_ports(kind: u8, code: u8, id: u16) -> Option<(u16, u16)> {
    match (kind, code) {
        (ECHO_REQUEST, 0) => Some((id, 0)),
        (ECHO_REPLY, 0) => Some((0, id)),
        _ => None,
    }
}

/// The flow an error travels with: the quoted packet went from its source
/// to its destination, the error goes back, as that connection's other
/// direction does.
#[inline(always)]
pub const fn error_flow_key(quoted: &FlowKey) -> FlowKey {
    FlowKey::new(
        quoted.protocol,
        quoted.dst_addr,
        quoted.dst_port,
        quoted.src_addr,
        quoted.src_port,
    )
}

/// What an ICMP error's addresses become.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorRewrite {
    pub outer_src: [u8; 4],
    pub outer_dst: [u8; 4],
    pub inner_src: [u8; 4],
    pub inner_src_port: u16,
    pub inner_dst: [u8; 4],
    pub inner_dst_port: u16,
}

/// The rewrite of an error from `outer_src` to `outer_dst` whose quoted
/// packet is the reverse of `key`, the flow it travels with (`flow` its
/// entry). `None` when the error is not addressed to the quoted packet's
/// source (an error goes back to where the packet it quotes came from).
///
/// The quoted packet left the far side as the reverse of what `flow`
/// produces, so it becomes `flow`'s translated tuple reversed; the outer
/// destination becomes where `flow` sends. The outer source is translated
/// where `flow` translates sources: a host or router on the inside hides
/// behind the address the connection has outside, one outside keeps its
/// own.
#[inline(always)]
pub fn rewrite(
    outer_src: [u8; 4],
    outer_dst: [u8; 4],
    key: &FlowKey,
    flow: &FlowValue,
) -> Option<ErrorRewrite> {
    if outer_dst != key.dst_addr {
        return None;
    }
    let outer_src = if flow.nat_src_addr != key.src_addr {
        flow.nat_src_addr
    } else {
        outer_src
    };
    Some(ErrorRewrite {
        outer_src,
        outer_dst: flow.nat_dst_addr,
        inner_src: flow.nat_dst_addr,
        inner_src_port: flow.nat_dst_port,
        inner_dst: flow.nat_src_addr,
        inner_dst_port: flow.nat_src_port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: [u8; 4] = [10, 1, 0, 2];
    const N: [u8; 4] = [10, 2, 0, 1];
    const S: [u8; 4] = [10, 2, 0, 2];
    const OUT_ROUTER: [u8; 4] = [10, 2, 0, 3];
    const IN_ROUTER: [u8; 4] = [10, 1, 0, 254];

    /// C:40000 → S:53 leaves as N:5000 → S:53; the two entries.
    fn outbound() -> (FlowKey, FlowValue, FlowKey, FlowValue) {
        (
            FlowKey::new(17, C, 40000, S, 53),
            FlowValue::forward(N, 5000, S, 53),
            FlowKey::new(17, S, 53, N, 5000),
            FlowValue::forward(S, 53, C, 40000),
        )
    }

    #[test]
    fn an_error_from_outside_reaches_the_client_about_its_own_packet() {
        let (_, _, back_key, back) = outbound();
        // A router past the firewall: time exceeded for N:5000 → S:53.
        let quoted = FlowKey::new(17, N, 5000, S, 53);
        assert_eq!(error_flow_key(&quoted), back_key);
        let rw = rewrite(OUT_ROUTER, N, &back_key, &back).unwrap();
        assert_eq!(
            rw,
            ErrorRewrite {
                outer_src: OUT_ROUTER,
                outer_dst: C,
                inner_src: C,
                inner_src_port: 40000,
                inner_dst: S,
                inner_dst_port: 53,
            }
        );
        // The server itself (port unreachable): its address stays.
        assert_eq!(rewrite(S, N, &back_key, &back).unwrap().outer_src, S);
        // Not addressed to the quoted packet's source: not about it.
        assert_eq!(rewrite(OUT_ROUTER, C, &back_key, &back), None);
    }

    #[test]
    fn an_error_from_inside_leaves_from_the_nat_address() {
        let (out_key, out, _, _) = outbound();
        // The client's port unreachable about S:53 → C:40000 (the reply as delivered).
        let quoted = FlowKey::new(17, S, 53, C, 40000);
        assert_eq!(error_flow_key(&quoted), out_key);
        let rw = rewrite(C, S, &out_key, &out).unwrap();
        assert_eq!(
            rw,
            ErrorRewrite {
                outer_src: N,
                outer_dst: S,
                inner_src: S,
                inner_src_port: 53,
                inner_dst: N,
                inner_dst_port: 5000,
            }
        );
        // A router on the inside hides behind the NAT address too.
        assert_eq!(rewrite(IN_ROUTER, S, &out_key, &out).unwrap().outer_src, N);
    }

    #[test]
    fn a_published_servers_errors_leave_from_the_published_endpoint() {
        // X:4444 → N:8080 is forwarded to C:80; C's answers leave from N:8080.
        let x = [192, 0, 2, 7];
        let back_key = FlowKey::new(6, C, 80, x, 4444);
        let back = FlowValue::forward(N, 8080, x, 4444);
        let quoted = FlowKey::new(6, x, 4444, C, 80);
        assert_eq!(error_flow_key(&quoted), back_key);
        let rw = rewrite(C, x, &back_key, &back).unwrap();
        assert_eq!((rw.outer_src, rw.outer_dst), (N, x));
        assert_eq!((rw.inner_src, rw.inner_src_port), (x, 4444));
        assert_eq!((rw.inner_dst, rw.inner_dst_port), (N, 8080));
    }

    #[test]
    fn quoted_echoes_carry_their_identifier_where_the_keys_do() {
        assert_eq!(echo_ports(ECHO_REQUEST, 0, 77), Some((77, 0)));
        assert_eq!(echo_ports(ECHO_REPLY, 0, 77), Some((0, 77)));
        assert_eq!(echo_ports(13, 0, 77), None);
        assert_eq!(echo_ports(ECHO_REQUEST, 1, 77), None);
        assert!(is_error(DEST_UNREACHABLE) && is_error(TIME_EXCEEDED));
        assert!(!is_error(5) && !is_error(4) && !is_error(ECHO_REPLY));
    }
}
