//! Who may receive and make secondary connections: address sanity, the
//! allowed-address policy (the FTP-bounce guard), protocol rules, and peer IP filters.

use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{
    error::{ApiError, ErrorKind},
    flags::ConnFlags,
};

fn invalid(msg: String) -> ApiError {
    ApiError::new(ErrorKind::InvalidArgument, msg)
}

/// A forwardable unicast host address (not 0.0.0.0, broadcast, loopback,
/// multicast, link-local or reserved), and not one of the firewall's own.
pub fn check_unicast(what: &str, ip: Ipv4Addr, own: &[Ipv4Addr]) -> Result<(), ApiError> {
    let bad = if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_broadcast() {
        Some("the broadcast address")
    } else if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip.is_link_local() {
        Some("a link-local address")
    } else if ip.octets()[0] >= 240 {
        Some("a reserved address")
    } else if own.contains(&ip) {
        Some("an address of the firewall itself")
    } else {
        None
    };
    match bad {
        Some(why) => Err(invalid(format!(
            "{what} {ip} is {why}, not a forwardable host"
        ))),
        None => Ok(()),
    }
}

/// A client endpoint of BindForClient: a placeholder (0.0.0.0:0) or a unicast
/// address with a port. Returns None for the placeholder.
pub fn check_client_endpoint(
    i: usize,
    a: SocketAddrV4,
    own: &[Ipv4Addr],
) -> Result<Option<SocketAddrV4>, ApiError> {
    if a.ip().is_unspecified() && a.port() == 0 {
        return Ok(None);
    }
    if a.port() == 0 {
        return Err(invalid(format!("client address {i} ({a}) has port 0")));
    }
    check_unicast(&format!("client address {i}"), *a.ip(), own)?;
    Ok(Some(a))
}

/// The allowed-address policy of BindForClient: by default a target must be
/// the session's client itself; the flags widen it (all targets must pass).
pub fn check_allowed_target(
    client: Ipv4Addr,
    target: Ipv4Addr,
    flags: ConnFlags,
    networks: &[NetworkObject],
) -> Result<(), ApiError> {
    check_allowed_relative(
        (client, "the session's client"),
        target,
        flags,
        networks,
        "refusing a secondary connection to another host (FTP-bounce guard)",
    )
}

/// The allowed-address policy relative to `reference` (named `what`): the
/// target must be it, or in its /24 (CLASS_C), or in a network object with
/// it (NETWORK), or anything (ALL).
pub fn check_allowed_relative(
    (reference, what): (Ipv4Addr, &str),
    target: Ipv4Addr,
    flags: ConnFlags,
    networks: &[NetworkObject],
    why: &str,
) -> Result<(), ApiError> {
    if target == reference || flags.contains(ConnFlags::ALLOW_ADDRESSES_ALL) {
        return Ok(());
    }
    if flags.contains(ConnFlags::ALLOW_ADDRESSES_IN_CLASS_C_NETWORK)
        && reference.octets()[..3] == target.octets()[..3]
    {
        return Ok(());
    }
    if flags.contains(ConnFlags::ALLOW_ADDRESSES_IN_NETWORK)
        && networks
            .iter()
            .any(|n| n.contains(reference) && n.contains(target))
    {
        return Ok(());
    }
    let widened = (flags & ConnFlags::ALLOWED_ADDRESSES).names();
    Err(ApiError::new(
        ErrorKind::AccessDenied,
        format!(
            "{target} is not {what} {reference}{}: {why}",
            if widened.is_empty() {
                String::new()
            } else {
                format!(" and not allowed by {}", widened.join(", "))
            }
        ),
    ))
}

/// A named set of networks ("network object"): ALLOW_ADDRESSES_IN_NETWORK
/// accepts targets in the same object as the client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetworkObject {
    pub name: String,
    pub ranges: Vec<Ipv4Net>,
}

impl NetworkObject {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.ranges.iter().any(|n| n.contains(&ip))
    }
}

/// Transport of a protocol's primary connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    /// The IP protocol number (the datapath's keys carry it).
    pub const fn ipproto(self) -> u8 {
        match self {
            Transport::Tcp => firewall_common::IPPROTO_TCP,
            Transport::Udp => firewall_common::IPPROTO_UDP,
        }
    }

    /// The name the configuration and the API use ("tcp", "udp").
    pub const fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

/// A protocol definition: its primary ports, and which clients may use it
/// (for secondary connections too).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProtocolRule {
    pub name: String,
    pub transport: Transport,
    pub ports: Vec<u16>,
    pub clients: Vec<Ipv4Net>,
}

/// The rule check of the calls: the protocol must exist and the session's
/// client must be allowed to use it.
pub fn check_protocol(
    rules: &[ProtocolRule],
    name: &str,
    client: Ipv4Addr,
) -> Result<(), ApiError> {
    let Some(rule) = rules.iter().find(|r| r.name == name) else {
        let known: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
        return Err(invalid(format!(
            "unknown protocol {name:?} (configured: {})",
            known.join(", ")
        )));
    };
    if rule.clients.iter().any(|n| n.contains(&client)) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorKind::ProtocolDenied,
            format!("the protocol rules do not allow client {client} to use protocol {name:?}"),
        ))
    }
}

/// Which remote peers may use a pinhole (IFWXIpFilter): include and exclude
/// ranges; the most specific range decides, and an address in no range is
/// refused. No filter at all (None where it is used) means any peer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpFilter {
    #[serde(default)]
    pub include: Vec<Ipv4Net>,
    #[serde(default)]
    pub exclude: Vec<Ipv4Net>,
}

impl IpFilter {
    /// The LPM entries (network, allow) that implement it. An exclusion of the
    /// same network as an inclusion wins.
    pub fn rules(&self) -> Vec<(Ipv4Net, bool)> {
        let mut out: Vec<(Ipv4Net, bool)> =
            self.include.iter().map(|n| (n.trunc(), true)).collect();
        for n in &self.exclude {
            let n = n.trunc();
            out.retain(|(m, _)| *m != n);
            out.push((n, false));
        }
        out
    }

    /// What the datapath will decide for `ip` (longest prefix wins).
    pub fn allows(&self, ip: Ipv4Addr) -> bool {
        self.rules()
            .into_iter()
            .filter(|(n, _)| n.contains(&ip))
            .max_by_key(|(n, _)| n.prefix_len())
            .is_some_and(|(_, allow)| allow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn unicast_checks() {
        let own = [ip("10.2.0.1")];
        for bad in [
            "0.0.0.0",
            "255.255.255.255",
            "127.0.0.1",
            "224.0.0.1",
            "169.254.1.1",
            "240.0.0.1",
            "10.2.0.1",
        ] {
            assert_eq!(
                check_unicast("x", ip(bad), &own).unwrap_err().kind,
                ErrorKind::InvalidArgument,
                "{bad}"
            );
        }
        check_unicast("x", ip("10.1.0.2"), &own).unwrap();
        assert_eq!(
            check_client_endpoint(0, "0.0.0.0:0".parse().unwrap(), &own).unwrap(),
            None
        );
        assert!(
            check_client_endpoint(0, "10.1.0.2:0".parse().unwrap(), &own)
                .unwrap_err()
                .message
                .contains("port 0")
        );
        assert!(check_client_endpoint(0, "0.0.0.0:21".parse().unwrap(), &own).is_err());
    }

    #[test]
    fn allowed_address_policy() {
        let nets = vec![NetworkObject {
            name: "lan".into(),
            ranges: vec!["10.0.0.0/23".parse().unwrap()],
        }];
        let c = ip("10.0.0.5");
        let ok = |t: &str, f: ConnFlags| check_allowed_target(c, ip(t), f, &nets).is_ok();
        assert!(ok("10.0.0.5", ConnFlags::empty()));
        assert!(!ok("10.0.0.9", ConnFlags::empty()));
        assert!(ok(
            "10.0.0.9",
            ConnFlags::ALLOW_ADDRESSES_IN_CLASS_C_NETWORK
        ));
        assert!(!ok(
            "10.0.1.9",
            ConnFlags::ALLOW_ADDRESSES_IN_CLASS_C_NETWORK
        ));
        assert!(ok("10.0.1.9", ConnFlags::ALLOW_ADDRESSES_IN_NETWORK));
        assert!(!ok("10.0.2.9", ConnFlags::ALLOW_ADDRESSES_IN_NETWORK));
        assert!(ok("172.16.9.9", ConnFlags::ALLOW_ADDRESSES_ALL));
        let e = check_allowed_target(c, ip("10.0.0.9"), ConnFlags::empty(), &nets).unwrap_err();
        assert_eq!(e.kind, ErrorKind::AccessDenied);
        assert!(e.message.contains("10.0.0.9") && e.message.contains("bounce"));
    }

    #[test]
    fn protocol_rules() {
        let rules = vec![ProtocolRule {
            name: "ftp".into(),
            transport: Transport::Tcp,
            ports: vec![21],
            clients: vec!["10.1.0.0/24".parse().unwrap()],
        }];
        check_protocol(&rules, "ftp", ip("10.1.0.2")).unwrap();
        assert_eq!(
            check_protocol(&rules, "ftp", ip("10.9.0.2"))
                .unwrap_err()
                .kind,
            ErrorKind::ProtocolDenied
        );
        assert_eq!(
            check_protocol(&rules, "sip", ip("10.1.0.2"))
                .unwrap_err()
                .kind,
            ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn ip_filters() {
        let f = IpFilter {
            include: vec!["10.2.0.0/24".parse().unwrap()],
            exclude: vec!["10.2.0.128/25".parse().unwrap()],
        };
        assert!(f.allows(ip("10.2.0.2")));
        assert!(!f.allows(ip("10.2.0.200")));
        assert!(!f.allows(ip("192.0.2.1")));
        assert!(
            !IpFilter::default().allows(ip("10.2.0.2")),
            "an empty filter allows nobody"
        );
        let same = IpFilter {
            include: vec!["10.2.0.2/32".parse().unwrap()],
            exclude: vec!["10.2.0.2/32".parse().unwrap()],
        };
        assert!(!same.allows(ip("10.2.0.2")));
    }
}
