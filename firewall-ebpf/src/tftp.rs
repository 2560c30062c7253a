//! The TFTP helper (`firewall_common::tftp`): a TFTP server's first answer
//! from its transfer port, to the NAT endpoint a tracked request left from,
//! gets the request's flows copied for that port; the packet then takes its
//! flow like any other.

use aya_ebpf::{btf_maps::Array, helpers::generated::bpf_ktime_get_coarse_ns, macros::btf_map};
use firewall_common::{
    stats::Counter,
    tftp::{
        answer_out_key, answers, armed, mark_answered, request_key, request_reply_key, transfer,
        TftpConf,
    },
};

use crate::{
    flow::{self, FLOWS},
    parse::Packet,
    scratch,
};

/// The helper's server ports (written by the control plane; all 0: off).
#[btf_map]
static TFTP_CONF: Array<TftpConf, 1> = Array::new();

/// For a UDP packet from outside (the pipeline checks both) that no flow or
/// pinhole claims: `TftpEstablished` once the answer's flows are in `FLOWS`, otherwise
/// `PassNoFlow` (the wall decides). A BPF-to-BPF call: its frame is not
/// the pipeline's.
#[inline(never)]
pub fn admit(pkt: &Packet) -> Counter {
    let k = &pkt.key;
    let Some(conf) = TFTP_CONF.get(0) else {
        return Counter::PassNoFlow;
    };
    for port in conf.ports.iter() {
        let port = *port;
        if port == 0 || port == k.src_port {
            continue;
        }
        let Some(reply) = FLOWS.get_ptr(request_reply_key(k, port)) else {
            continue;
        };
        // SAFETY: a FLOWS value found just now; values stay valid for the
        // program's run (copied before any insert can recycle them).
        let reply = unsafe { &*reply };
        let Some(request) = FLOWS.get_ptr_mut(request_key(k, port, reply)) else {
            continue;
        };
        // SAFETY: as above; the one field written (`answered`) is the
        // helper's alone.
        let request = unsafe { &mut *request };
        if !answers(k, request, reply) {
            continue;
        }
        if !armed(request) {
            // Answered already: one answer per request packet.
            return Counter::PassNoFlow;
        }
        let Some(s) = scratch::get() else {
            return Counter::DropNoFlow;
        };
        // SAFETY: a helper without arguments.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        let out_key = answer_out_key(k, reply);
        s.flow = *reply;
        s.flow2 = *request;
        mark_answered(request);
        transfer(&mut s.flow2, &mut s.flow, k.src_port, now);
        if flow::insert(&out_key, &s.flow2).is_err() {
            return Counter::DropNatExhausted;
        }
        if flow::insert(k, &s.flow).is_err() {
            let _ = FLOWS.remove(out_key);
            return Counter::DropNatExhausted;
        }
        return Counter::TftpEstablished;
    }
    Counter::PassNoFlow
}
