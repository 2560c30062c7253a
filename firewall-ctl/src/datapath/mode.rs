//! Which hook the datapath runs at, and how `up` chooses it by default.

use aya::programs::XdpMode;
use serde::{Deserialize, Serialize};

use super::Side;

/// Where the datapath runs: XDP native (in the driver), XDP generic (in the
/// stack, slower), or TC (tcx ingress: sees GRO/GSO super-packets, and keeps
/// veth's offloads, which XDP turns off on the peer; faster for bulk TCP on
/// veth, slower per packet).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Native,
    Generic,
    Tc,
}

impl AttachMode {
    pub(super) fn xdp(self) -> XdpMode {
        match self {
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Generic | AttachMode::Tc => XdpMode::Skb,
        }
    }

    /// The program of `side` in this mode.
    pub const fn program(self, side: Side) -> &'static str {
        match self {
            AttachMode::Tc => side.tc_program(),
            _ => side.program(),
        }
    }
}

/// The hook `up` takes when none is named, from the interfaces' kinds
/// (`Interface::link_kind`: None for a NIC), with the reason.
///
/// Native XDP on a NIC: the driver runs the program before any socket
/// buffer exists, and what it redirects leaves as the frames that came in.
/// On anything virtual, TC: a veth with an XDP program turns off its peer's
/// GSO and GRO, so bulk TCP crosses as MTU-sized packets (measured: 0.4× of
/// netfilter's bulk throughput at XDP, 1× at TC); bridges, bonds and VLANs
/// run XDP only in its generic form, which is slower than TC.
pub fn choose(internal: Option<&str>, external: Option<&str>) -> (AttachMode, String) {
    match (internal, external) {
        (None, None) => (AttachMode::Native, "both interfaces are NICs".into()),
        (Some(k), _) | (None, Some(k)) => (
            AttachMode::Tc,
            format!("a {k} interface keeps its offloads at TC, not at XDP"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nics_get_native_xdp_and_anything_virtual_tc() {
        assert_eq!(choose(None, None).0, AttachMode::Native);
        let (mode, why) = choose(Some("veth"), Some("veth"));
        assert_eq!(mode, AttachMode::Tc);
        assert!(why.contains("veth"), "{why}");
        assert_eq!(choose(None, Some("bond")).0, AttachMode::Tc);
        assert_eq!(choose(Some("vlan"), None).0, AttachMode::Tc);
    }
}
