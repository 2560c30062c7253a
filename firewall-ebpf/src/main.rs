//! The firewall's eBPF datapath. The same pipeline (`pipeline`) runs at
//! XDP (`xdp`, the default) or at TC ingress (`tc`); `intercept` hands the
//! primary connections of filtered protocols to the daemon; `wall` decides
//! what no flow or pinhole claims (default deny, tracked outbound NAT). The benchmark's
//! generator and sink are a separate object (`bench`), never loaded by the
//! daemon.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod events;
mod fib;
mod flow;
mod frag;
mod ftp_lines;
mod hook;
mod icmp_error;
mod inplace;
mod intercept;
mod nat;
mod parse;
mod pinhole;
mod pipeline;
mod scratch;
mod stats;
mod tc;
mod tftp;
mod udp_nat;
mod wall;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program; the verifier rejects any path to it.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
