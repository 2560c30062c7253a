//! Where the pipeline runs: XDP (`xdp`, the default) or TC (`tc`, tcx
//! ingress). The pipeline is the same; what differs is how the packet is
//! reached, translated and sent on, and the verdicts' values.

use aya_ebpf::EbpfContext;
use firewall_common::{csum::Wsum, flow::FlowValue, stats::Counter};

use crate::{fib::NextHop, parse::Packet};

pub trait Hook: EbpfContext {
    /// The program's return value.
    type Action: Copy;
    /// On to the stack.
    const PASS: Self::Action;

    const DROP: Self::Action;
    /// Sends the packet out of `ifindex`; None when the helper refused.
    fn redirect(&self, ifindex: u32) -> Option<Self::Action>;
    fn ingress_ifindex(&self) -> u32;
    /// Makes the headers directly readable (TC: they may sit in paged data).
    fn prepare(&self);
    /// The same for an ICMP error's headers and quote (more than `prepare`
    /// makes readable, which every packet pays for). Invalidates packet
    /// pointers taken before.
    fn prepare_icmp_error(&self) {}
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Bytes of the packet (L2), for the counters.
    fn len(&self) -> u64;
    /// `tot_len` for the FIB's MTU check: XDP the packet's; TC 0, so that the
    /// kernel checks the skb itself (GSO-aware).
    fn fib_tot_len(&self, l3_len: u16) -> u16;
    /// Rewrites addresses, ports and TTL as the flow says, checksums fixed.
    fn translate(&self, pkt: &Packet, flow: &FlowValue) -> Result<(), Counter>;
    fn set_macs(&self, pkt: &Packet, hop: &NextHop) -> Result<(), Counter>;
    /// Goes on in this hook's program for connections read in place
    /// (`inplace::process`); returns only if that program is missing.
    fn tail_call_in_place(&self);
    /// Copies `len` bytes of the packet from `offset` to `dst`; false when
    /// the packet is shorter (`dst` must have room for `len`).
    fn load(&self, offset: usize, dst: *mut u8, len: u32) -> bool;
    /// Writes `len` bytes from `src` into the packet at `offset` (no
    /// checksum is touched); false when the packet is shorter.
    fn store(&self, offset: usize, src: *const u8, len: u32) -> bool;
    /// The L4 checksum field at `check_off` updated for fields changed in
    /// place (outside the pseudo header) by `diff`, after `translate`.
    fn l4_csum_diff(&self, check_off: usize, diff: Wsum) -> Result<(), Counter>;
    /// A VLAN tag the NIC took off into the skb (TC): redirected, the frame
    /// would leave tagged.
    fn vlan_offloaded(&self) -> bool {
        false
    }
}
