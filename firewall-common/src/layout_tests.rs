//! Every shared map type's fields fill it: no padding the compiler added on
//! its own. Hidden padding is never written on purpose, so map entries and
//! their BTF dumps would carry garbage, and `aya::Pod` (plain bytes) would
//! not hold.

use super::{
    flow::*, frag::*, ftp_lines::*, icmp::*, inplace::*, intercept::*, pinhole::*, rules::*,
    seqadj::*, stats::*, tftp::*, wall::*,
};

/// The size of the field `f` picks out of a `T`.
fn field<T, F>(_: fn(&T) -> &F) -> usize {
    core::mem::size_of::<F>()
}

macro_rules! fills {
    ($t:ty { $($f:ident),* $(,)? }) => {{
        let sum = 0 $(+ field::<$t, _>(|v: &$t| &v.$f))*;
        assert_eq!(
            sum,
            core::mem::size_of::<$t>(),
            concat!(stringify!($t), ": the fields do not fill it (hidden padding)")
        );
    }};
}

#[test]
fn shared_types_have_no_hidden_padding() {
    fills!(SeqAdjust {
        floor,
        start,
        end,
        before,
        after
    });
    fills!(InPlaceDir {
        kernel,
        next,
        diverted,
        acked,
        acked_set,
        started,
        marks,
        first,
        lines
    });
    fills!(LineMark { seq, len });
    fills!(InPlaceState { dir });
    fills!(Offer {
        valid,
        next,
        diverted,
        _pad
    });
    fills!(InPlaceAdjust { adjust, offer });
    fills!(SegmentHead {
        client,
        dir,
        diverted,
        acked,
        acked_set,
        src_addr,
        dst_addr,
        src_port,
        dst_port,
        tcp_len,
        data_len,
        payload_len,
        _pad,
        conn
    });
    fills!(InPlaceSegment { head, tcp, data });
    fills!(LineState {
        kernel,
        budget,
        passed,
        redirected,
        resume,
        lines,
        peer,
        role,
    });
    fills!(FlowKey {
        src_addr,
        dst_addr,
        src_port,
        dst_port,
        protocol,
        _pad
    });
    fills!(FlowValue {
        nat_src_addr,
        nat_dst_addr,
        nat_src_port,
        nat_dst_port,
        action,
        egress_ifindex,
        answered,
        owner,
        packets,
        bytes,
        last_seen_ns,
        tcp_flags_seen,
        kind,
        hop_len_ok,
        hop_ifindex,
        hop_dmac,
        hop_smac,
        hop_checked,
    });
    fills!(FragKey {
        src_addr,
        dst_addr,
        id,
        protocol,
        _pad
    });
    fills!(FragValue {
        src_port,
        dst_port,
        _pad,
        first_ns
    });
    fills!(ErrorRewrite {
        outer_src,
        outer_dst,
        inner_src,
        inner_src_port,
        inner_dst,
        inner_dst_port
    });
    fills!(InterceptKey {
        port,
        protocol,
        _pad
    });
    fills!(InterceptValue {
        listener_addr,
        listener_port,
        _pad
    });
    fills!(InterceptConf {
        mark,
        egress_ifindex
    });
    fills!(InterceptTuple {
        client_addr,
        server_addr,
        client_port,
        server_port
    });
    fills!(PinholeKey {
        addr,
        port,
        protocol,
        side
    });
    fills!(PinholeValue {
        target_addr,
        target_port,
        flags,
        snat_addr,
        snat_port_base,
        snat_port_count,
        allowed_src,
        peer_filter,
        egress_ifindex,
        _pad,
        remaining,
        reply_paths,
        owner,
        deadline_ns,
        uses,
    });
    fills!(PeerFilterKey { filter, addr });
    fills!(PeerFilterValue { allow });
    fills!(BusyClientKey { addr });
    fills!(BusyClientValue {
        established_tcp,
        quota
    });
    fills!(DatapathEvent {
        kind,
        detail,
        owner,
        forward,
        reply,
        pinhole,
        timestamp_ns
    });
    fills!(Rule {
        src_addr,
        src_mask,
        dst_addr,
        dst_mask,
        port_lo,
        port_hi,
        protocol,
        action,
        _pad
    });
    fills!(StatValue { packets, bytes });
    fills!(TftpConf { ports });
    fills!(WallConf {
        nat_addr,
        nat_port_lo,
        nat_port_hi,
        external_ifindex,
        port_secret
    });
    fills!(SourceValue { allow });
    fills!(PublishKey {
        addr,
        port,
        protocol,
        _pad
    });
    fills!(PublishValue {
        server_addr,
        server_port,
        _pad,
        egress_ifindex
    });
    fills!(NatEndpoint { addr, port, _pad });
    fills!(UdpMapping {
        nat_port,
        _pad,
        last_seen_ns
    });
}
