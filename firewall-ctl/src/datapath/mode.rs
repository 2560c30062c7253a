//! Which hook the datapath runs at, and how `up` chooses it by default.

use aya::programs::XdpMode;
use serde::{Deserialize, Serialize};

use super::Side;
use crate::netdev_genl::XdpFeatures;

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

/// What `up` knows of an interface when it chooses the hook by itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkFacts {
    pub name: String,
    /// The kind rtnetlink gives a virtual interface ("veth", "bond", …);
    /// None for a NIC.
    pub kind: Option<String>,
    /// What its driver announces at XDP; None when the kernel does not say
    /// (before Linux 6.3).
    pub xdp: Option<XdpFeatures>,
}

/// The hook `up` takes when none is named, with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub mode: AttachMode,
    pub why: String,
}

/// Chooses the hook from the interfaces' kinds and drivers.
///
/// Native XDP where both are NICs whose drivers run XDP and redirect out of
/// it: the driver runs the program before any socket buffer exists, and
/// what it redirects leaves as the frames that came in. Whether a driver
/// also takes redirected frames (`ndo-xmit`) many drivers (virtio_net,
/// veth) announce only once a program is attached, so that is checked after
/// attaching (`redirect_targets_missing`). TC otherwise: a veth with an XDP
/// program turns off its peer's GSO and GRO, so bulk TCP crosses as
/// MTU-sized packets (measured: 0.4× of netfilter's bulk throughput at XDP,
/// 1× at TC); bridges, bonds and VLANs run XDP only in its generic form,
/// which is slower than TC; and a driver without XDP runs it only there too.
pub fn choose(internal: &LinkFacts, external: &LinkFacts) -> Choice {
    let tc = |why: String| Choice {
        mode: AttachMode::Tc,
        why,
    };
    for l in [internal, external] {
        if let Some(k) = &l.kind {
            return tc(format!(
                "a {k} interface keeps its offloads at TC, not at XDP"
            ));
        }
    }
    let needed = XdpFeatures::BASIC | XdpFeatures::REDIRECT;
    for l in [internal, external] {
        if let Some(f) = l.xdp.filter(|f| !f.contains(needed)) {
            return tc(format!(
                "the driver of {} has no native XDP redirect (it offers: {})",
                l.name,
                f.names()
            ));
        }
    }
    let why = if internal.xdp.is_some() && external.xdp.is_some() {
        "both interfaces are NICs whose drivers redirect at XDP"
    } else {
        "both interfaces are NICs (the kernel does not say what their drivers do at XDP)"
    };
    Choice {
        mode: AttachMode::Native,
        why: why.into(),
    }
}

/// With the programs attached in the driver: the interfaces into which
/// frames cannot be redirected (their drivers do not announce `ndo-xmit`),
/// where the datapath's forwarding would fail. Interfaces whose kernel does
/// not say are taken as able.
pub fn redirect_targets_missing<'a>(
    links: impl IntoIterator<Item = (&'a str, Option<XdpFeatures>)>,
) -> Vec<String> {
    links
        .into_iter()
        .filter(|(_, f)| f.is_some_and(|f| !f.contains(XdpFeatures::NDO_XMIT)))
        .map(|(name, f)| {
            format!(
                "the driver of {name} takes no redirected frames (it offers: {})",
                f.map(XdpFeatures::names).unwrap_or_default()
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, kind: Option<&str>, xdp: Option<XdpFeatures>) -> LinkFacts {
        LinkFacts {
            name: name.into(),
            kind: kind.map(Into::into),
            xdp,
        }
    }

    const VIRTIO: XdpFeatures = XdpFeatures::BASIC
        .union(XdpFeatures::REDIRECT)
        .union(XdpFeatures::RX_SG);

    #[test]
    fn nics_whose_drivers_redirect_get_native_xdp() {
        let c = choose(
            &link("eth0", None, Some(VIRTIO)),
            &link("eth1", None, Some(VIRTIO)),
        );
        assert_eq!(c.mode, AttachMode::Native);
        let c = choose(&link("eth0", None, None), &link("eth1", None, None));
        assert_eq!(
            c.mode,
            AttachMode::Native,
            "a kernel that does not say: try"
        );
        assert!(c.why.contains("does not say"), "{}", c.why);
    }

    #[test]
    fn anything_virtual_gets_tc() {
        let c = choose(
            &link("a", Some("veth"), Some(VIRTIO)),
            &link("b", Some("veth"), None),
        );
        assert_eq!(c.mode, AttachMode::Tc);
        assert!(c.why.contains("veth"), "{}", c.why);
        let nic = link("eth0", None, Some(VIRTIO));
        assert_eq!(
            choose(&nic, &link("bond0", Some("bond"), None)).mode,
            AttachMode::Tc
        );
        assert_eq!(
            choose(&link("v", Some("vlan"), None), &nic).mode,
            AttachMode::Tc
        );
    }

    #[test]
    fn a_nic_without_xdp_in_its_driver_gets_tc() {
        let nic = link("eth0", None, Some(VIRTIO));
        let c = choose(&nic, &link("eth1", None, Some(XdpFeatures::empty())));
        assert_eq!(c.mode, AttachMode::Tc);
        assert!(
            c.why.contains("eth1") && c.why.contains("none"),
            "{}",
            c.why
        );
        let c = choose(&link("eth2", None, Some(XdpFeatures::BASIC)), &nic);
        assert_eq!(c.mode, AttachMode::Tc);
        assert!(
            c.why.contains("eth2") && c.why.contains("basic"),
            "{}",
            c.why
        );
    }

    #[test]
    fn redirect_targets_are_checked_once_attached() {
        let ok = VIRTIO | XdpFeatures::NDO_XMIT;
        assert!(redirect_targets_missing([("eth0", Some(ok)), ("eth1", None)]).is_empty());
        let missing = redirect_targets_missing([("eth0", Some(ok)), ("eth1", Some(VIRTIO))]);
        assert_eq!(missing.len(), 1);
        assert!(missing[0].contains("eth1"), "{missing:?}");
    }
}
