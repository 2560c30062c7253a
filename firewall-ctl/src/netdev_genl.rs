//! What a network driver says it does at XDP, from the kernel's `netdev`
//! generic-netlink family (Linux 6.3 and later): `up` runs the datapath in
//! the driver only where both drivers can redirect frames to each other.

use std::io;

use bitflags::bitflags;
use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, Nla, NlasIterator, Parseable, ParseableParametrized,
};
use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST};
use netlink_packet_generic::{
    ctrl::{nlas::GenlCtrlAttrs, GenlCtrl, GenlCtrlCmd},
    GenlFamily, GenlHeader, GenlMessage,
};

use crate::netlink::Netlink;

bitflags! {
    /// `enum netdev_xdp_act` of the kernel's uapi.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct XdpFeatures: u64 {
        /// XDP_PASS, XDP_DROP, XDP_TX and XDP_ABORTED in the driver.
        const BASIC = 1;
        /// XDP_REDIRECT from this device.
        const REDIRECT = 2;
        /// Frames redirected from elsewhere can be sent here (`ndo_xdp_xmit`).
        const NDO_XMIT = 4;
        const XSK_ZEROCOPY = 8;
        const HW_OFFLOAD = 16;
        /// Multi-buffer frames on receive.
        const RX_SG = 32;
        const NDO_XMIT_SG = 64;
    }
}

impl XdpFeatures {
    /// What the datapath needs of a driver to run in it: its own verdicts,
    /// redirects out of it, and redirects into it (each side forwards to the
    /// other).
    pub const FORWARDING: Self = Self::BASIC.union(Self::REDIRECT).union(Self::NDO_XMIT);

    /// The kernel's names of the features, for log lines.
    pub fn names(self) -> String {
        // The kernel's spelling: "NDO_XMIT" is "ndo-xmit".
        let names: Vec<String> = self
            .iter_names()
            .map(|(n, _)| n.to_lowercase().replace('_', "-"))
            .collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }
}

const FAMILY: &str = "netdev";
const CMD_DEV_GET: u8 = 1;
const A_DEV_IFINDEX: u16 = 1;
const A_DEV_XDP_FEATURES: u16 = 3;

/// A `netdev` family message: `dev-get` for one interface, or its answer.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NetdevDev {
    cmd: u8,
    ifindex: Option<u32>,
    xdp_features: Option<u64>,
}

impl GenlFamily for NetdevDev {
    fn family_name() -> &'static str {
        FAMILY
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        1
    }
}

impl NetdevDev {
    fn attributes(&self) -> Vec<DefaultNla> {
        let mut out = Vec::new();
        if let Some(i) = self.ifindex {
            out.push(DefaultNla::new(A_DEV_IFINDEX, i.to_ne_bytes().to_vec()));
        }
        if let Some(f) = self.xdp_features {
            out.push(DefaultNla::new(
                A_DEV_XDP_FEATURES,
                f.to_ne_bytes().to_vec(),
            ));
        }
        out
    }
}

impl Emitable for NetdevDev {
    fn buffer_len(&self) -> usize {
        self.attributes().as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attributes().as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for NetdevDev {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let mut dev = NetdevDev {
            cmd: header.cmd,
            ifindex: None,
            xdp_features: None,
        };
        for nla in NlasIterator::new(buf) {
            let nla = DefaultNla::parse(&nla?)?;
            let mut value = vec![0; nla.value_len()];
            nla.emit_value(&mut value);
            match (nla.kind(), value.len()) {
                (A_DEV_IFINDEX, 4) => {
                    dev.ifindex = Some(u32::from_ne_bytes(
                        value[..4].try_into().unwrap_or_default(),
                    ))
                }
                (A_DEV_XDP_FEATURES, 8) => {
                    dev.xdp_features = Some(u64::from_ne_bytes(
                        value[..8].try_into().unwrap_or_default(),
                    ))
                }
                _ => {}
            }
        }
        Ok(dev)
    }
}

/// The XDP features the driver of interface `ifindex` announces; None when
/// the kernel has no `netdev` family (before Linux 6.3) and so does not say.
pub fn xdp_features(ifindex: u32) -> io::Result<Option<XdpFeatures>> {
    let mut nl = Netlink::open(netlink_sys::protocols::NETLINK_GENERIC)?;
    let ask = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(FAMILY.into())],
    });
    let family = match nl.request(ask, NLM_F_REQUEST | NLM_F_ACK) {
        Ok(answer) => answer
            .into_iter()
            .flat_map(|m| m.payload.nlas)
            .find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(id),
                _ => None,
            }),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
        Err(e) => return Err(e),
    };
    let Some(family) = family else {
        return Ok(None);
    };
    let mut ask = GenlMessage::from_payload(NetdevDev {
        cmd: CMD_DEV_GET,
        ifindex: Some(ifindex),
        xdp_features: None,
    });
    ask.set_resolved_family_id(family);
    let answer = nl.request(ask, NLM_F_REQUEST | NLM_F_ACK)?;
    Ok(answer
        .into_iter()
        .find_map(|m| m.payload.xdp_features)
        .map(XdpFeatures::from_bits_retain))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_round_trips() {
        let m = NetdevDev {
            cmd: CMD_DEV_GET,
            ifindex: Some(7),
            xdp_features: Some(0x25),
        };
        let mut buf = vec![0; m.buffer_len()];
        m.emit(&mut buf);
        let back = NetdevDev::parse_with_param(
            &buf,
            GenlHeader {
                cmd: CMD_DEV_GET,
                version: 1,
            },
        )
        .unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn features_are_named_as_the_kernel_names_them() {
        assert_eq!(XdpFeatures::empty().names(), "none");
        assert_eq!(
            (XdpFeatures::BASIC | XdpFeatures::REDIRECT | XdpFeatures::RX_SG).names(),
            "basic, redirect, rx-sg"
        );
        assert!(XdpFeatures::FORWARDING.contains(XdpFeatures::NDO_XMIT));
    }

    /// The loopback device has no XDP in its driver; a kernel with the
    /// `netdev` family says so (this one has it: Linux 6.3+).
    #[test]
    fn loopback_announces_no_xdp() {
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        match xdp_features(lo).unwrap() {
            Some(f) => assert_eq!(f, XdpFeatures::empty()),
            None => panic!("this kernel has no netdev generic-netlink family (Linux 6.3+ needed)"),
        }
    }
}
