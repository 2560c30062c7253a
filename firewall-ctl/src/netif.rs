//! Network interfaces: index, IPv4 addresses, and the sysctls the datapath needs.

use std::{collections::BTreeMap, fs, net::Ipv4Addr};

use anyhow::{bail, Context as _};
use ipnet::Ipv4Net;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    /// The interface's IPv4 addresses with their prefix length.
    pub networks: Vec<Ipv4Net>,
}

impl Interface {
    /// Looks an interface up by name in the current network namespace.
    pub fn by_name(name: &str) -> anyhow::Result<Self> {
        validate_name(name)?;
        let index = nix::net::if_::if_nametoindex(name).map_err(|_| {
            anyhow::anyhow!("interface {name:?} does not exist in this network namespace")
        })?;
        let mut networks = Vec::new();
        for ifa in nix::ifaddrs::getifaddrs().context("getifaddrs")? {
            if ifa.interface_name != name {
                continue;
            }
            let (Some(addr), Some(mask)) = (ifa.address, ifa.netmask) else {
                continue;
            };
            let (Some(a), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) else {
                continue;
            };
            let prefix = u32::from(m.ip()).leading_ones() as u8;
            networks.push(Ipv4Net::new(a.ip(), prefix).expect("prefix <= 32"));
        }
        Ok(Self {
            name: name.to_string(),
            index,
            networks,
        })
    }

    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.networks.iter().map(|n| n.addr())
    }

    /// The kind of a virtual interface as rtnetlink names it ("veth",
    /// "bridge", "bond", "vlan", …); None for a device with a driver of its
    /// own (a NIC).
    pub fn link_kind(&self) -> anyhow::Result<Option<String>> {
        use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST};
        use netlink_packet_route::{
            link::{LinkAttribute, LinkInfo, LinkMessage},
            RouteNetlinkMessage,
        };
        let mut nl = crate::netlink::Netlink::open(crate::netlink::NETLINK_ROUTE)
            .context("opening rtnetlink")?;
        let mut ask = LinkMessage::default();
        ask.header.index = self.index;
        let answer = nl
            .request(RouteNetlinkMessage::GetLink(ask), NLM_F_REQUEST | NLM_F_ACK)
            .with_context(|| format!("reading link {} from rtnetlink", self.name))?;
        for m in answer {
            let RouteNetlinkMessage::NewLink(link) = m else {
                continue;
            };
            for a in link.attributes {
                if let LinkAttribute::LinkInfo(infos) = a {
                    for i in infos {
                        if let LinkInfo::Kind(kind) = i {
                            return Ok(Some(kind.to_string()));
                        }
                    }
                }
            }
        }
        Ok(None)
    }
}

/// Rejects names the kernel could never have (and paths in disguise).
pub fn validate_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 15
        || name.contains(['/', ' ', '\0'])
        || name == "."
        || name == ".."
    {
        bail!("{name:?} is not a valid interface name (1-15 characters, no '/' or spaces)");
    }
    Ok(())
}

fn sysctl_path(key: &str) -> String {
    format!("/proc/sys/{}", key.replace('.', "/"))
}

pub fn read_sysctl(key: &str) -> anyhow::Result<String> {
    Ok(fs::read_to_string(sysctl_path(key))
        .with_context(|| format!("reading sysctl {key}"))?
        .trim()
        .to_string())
}

pub fn write_sysctl(key: &str, value: &str) -> anyhow::Result<()> {
    fs::write(sysctl_path(key), value).with_context(|| format!("setting sysctl {key}={value}"))
}

/// Sets sysctls, recording in `saved` the values they had (the first
/// recorded value of a key stays), for restoring later — also those set
/// before one failed.
pub fn set_sysctls(
    wanted: &[(String, String)],
    saved: &mut BTreeMap<String, String>,
) -> anyhow::Result<()> {
    for (key, value) in wanted {
        let old = read_sysctl(key)?;
        if &old != value {
            write_sysctl(key, value)?;
            saved.entry(key.clone()).or_insert(old);
        }
    }
    Ok(())
}

/// The kernel FIB lookup in XDP refuses to route packets that arrive on an
/// interface with IPv4 forwarding off, so both firewall interfaces need it.
pub fn forwarding_sysctls(interfaces: &[&Interface]) -> Vec<(String, String)> {
    interfaces
        .iter()
        .map(|i| {
            (
                format!("net.ipv4.conf.{}.forwarding", i.name),
                "1".to_string(),
            )
        })
        .collect()
}

/// The clock the engine runs on: CLOCK_MONOTONIC, the clock of the
/// datapath's `bpf_ktime_get_coarse_ns`.
pub struct MonotonicClock;

impl firewall_core::clock::Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        monotonic_ns()
    }
}

/// CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("eth0").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("../etc").is_err());
        assert!(validate_name("averyveryverylongname").is_err());
    }

    #[test]
    fn loopback_exists() {
        let lo = Interface::by_name("lo").unwrap();
        assert!(lo.index > 0);
        assert!(lo.addresses().any(|a| a.is_loopback()));
        assert!(Interface::by_name("nosuchif0")
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
    }
}
