//! Per-CPU scratch space for what does not fit on the BPF stack: the
//! pipeline and each function it calls share 512 bytes.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, bpf_sock_tuple},
    btf_maps::PerCpuArray,
    macros::btf_map,
};
use firewall_common::{flow::FlowValue, icmp::ErrorRewrite};

use crate::{fib::NextHop, inplace::Renumber};

#[repr(C)]
pub struct Scratch {
    /// FIB lookups (the pipeline's next hop, the wall's verdict).
    pub fib: FibParams,
    /// Socket lookups.
    pub tuple: bpf_sock_tuple,
    /// A flow entry being built, and a second (the TFTP helper copies two).
    pub flow: FlowValue,
    pub flow2: FlowValue,
    /// An ICMP error's translation, next hop and the egress its flow allows.
    pub icmp: ErrorRewrite,
    pub hop: NextHop,
    pub icmp_egress: u32,
    /// A connection read in place: a line to judge, and its segment's new
    /// numbers between `inplace::decide` and `inplace::apply`.
    pub line: [u8; firewall_common::ftp_lines::KERNEL_LINE_MAX],
    /// A connection's state being made (`inplace::start`).
    pub inplace: crate::inplace::Start,
    /// A segment read in place: its record's head (for the daemon, if it
    /// goes there), sequence number, and whether it is a plain line.
    pub head: firewall_common::inplace::SegmentHead,
    pub seq: u32,
    pub plain: u32,
    pub renumber: Renumber,
}

#[btf_map]
static SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();

/// This CPU's scratch space. A program runs to completion on its CPU, so
/// callers use it one after the other, never at once.
#[inline(always)]
pub fn get() -> Option<&'static mut Scratch> {
    let p = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot of a per-CPU map; the program's functions use
    // it in turn (none holds it across a call to another that does).
    Some(unsafe { &mut *p })
}
