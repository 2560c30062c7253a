//! The daemon's configuration file (TOML) and its validation.
//!
//! Everything is optional: without a file the daemon runs on embedded defaults,
//! with addresses and networks read from the two interfaces. Errors name the
//! key and the problem.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::netif::Interface;

/// The file as written by the operator. Unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    addresses: AddressesFile,
    #[serde(default)]
    maps: MapsFile,
    #[serde(default)]
    timeouts: TimeoutsFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddressesFile {
    internal_networks: Option<Vec<String>>,
    external_addresses: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MapsFile {
    flows: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeoutsFile {
    tcp_established: Option<u64>,
    tcp_closing: Option<u64>,
    udp_idle: Option<u64>,
}

/// The validated configuration the daemon runs with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Config {
    /// Networks behind the internal interface.
    pub internal_networks: Vec<Ipv4Net>,
    /// The firewall's own external addresses.
    pub external_addresses: Vec<Ipv4Addr>,
    /// Capacity of the flow table (entries, one per direction).
    pub flow_table_size: u32,
    pub timeouts: Timeouts,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Timeouts {
    /// Idle time after which an established TCP flow is removed.
    #[serde(with = "secs")]
    pub tcp_established: Duration,
    /// Time a TCP flow lives after FIN or RST was seen.
    #[serde(with = "secs")]
    pub tcp_closing: Duration,
    /// Idle time after which a UDP flow is removed.
    #[serde(with = "secs")]
    pub udp_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        // The same orders of magnitude as netfilter's conntrack defaults.
        Self {
            tcp_established: Duration::from_secs(7200),
            tcp_closing: Duration::from_secs(10),
            udp_idle: Duration::from_secs(60),
        }
    }
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
}

pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 262_144;
const FLOW_TABLE_RANGE: std::ops::RangeInclusive<u64> = 1024..=16_777_216;
const TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 1..=604_800;

/// A configuration error: which key, and what is wrong with it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

fn err(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        problem: problem.into(),
    }
}

impl Config {
    /// Reads and validates a config file; `internal`/`external` provide defaults.
    pub fn load(path: &Path, internal: &Interface, external: &Interface) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        Self::parse(&text, internal, external)
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }

    /// The embedded defaults: networks and addresses of the two interfaces.
    pub fn defaults(internal: &Interface, external: &Interface) -> Result<Self, ConfigError> {
        Self::parse("", internal, external)
    }

    pub fn parse(
        text: &str,
        internal: &Interface,
        external: &Interface,
    ) -> Result<Self, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| {
            // toml's message already names the key (and line) for unknown
            // fields and type errors; keep it on one line.
            let msg = e.message().to_string();
            let key = e
                .span()
                .map(|s| describe_span(text, s))
                .unwrap_or_else(|| "config".into());
            err(key, msg)
        })?;

        let internal_networks = match file.addresses.internal_networks {
            Some(list) => {
                let mut nets = Vec::new();
                for (i, s) in list.iter().enumerate() {
                    let net: Ipv4Net = s.parse().map_err(|_| {
                        err(
                            format!("addresses.internal_networks[{i}]"),
                            format!("{s:?} is not an IPv4 network in CIDR form (like 10.1.0.0/24)"),
                        )
                    })?;
                    if net != net.trunc() {
                        return Err(err(
                            format!("addresses.internal_networks[{i}]"),
                            format!("{s:?} has host bits set; did you mean {}?", net.trunc()),
                        ));
                    }
                    nets.push(net);
                }
                if nets.is_empty() {
                    return Err(err(
                        "addresses.internal_networks",
                        "must name at least one network",
                    ));
                }
                nets
            }
            None => {
                let nets: Vec<Ipv4Net> = internal.networks.iter().map(|n| n.trunc()).collect();
                if nets.is_empty() {
                    return Err(err(
                        "addresses.internal_networks",
                        format!(
                            "not set, and interface {} has no IPv4 address to take it from",
                            internal.name
                        ),
                    ));
                }
                nets
            }
        };

        let external_addresses = match file.addresses.external_addresses {
            Some(list) => {
                let mut addrs = Vec::new();
                for (i, s) in list.iter().enumerate() {
                    let a: Ipv4Addr = s.parse().map_err(|_| {
                        err(
                            format!("addresses.external_addresses[{i}]"),
                            format!("{s:?} is not an IPv4 address"),
                        )
                    })?;
                    if !external.networks.iter().any(|n| n.addr() == a) {
                        return Err(err(
                            format!("addresses.external_addresses[{i}]"),
                            format!("{a} is not an address of interface {}", external.name),
                        ));
                    }
                    addrs.push(a);
                }
                if addrs.is_empty() {
                    return Err(err(
                        "addresses.external_addresses",
                        "must name at least one address",
                    ));
                }
                addrs
            }
            None => {
                let addrs: Vec<Ipv4Addr> = external.networks.iter().map(|n| n.addr()).collect();
                if addrs.is_empty() {
                    return Err(err(
                        "addresses.external_addresses",
                        format!(
                            "not set, and interface {} has no IPv4 address to take it from",
                            external.name
                        ),
                    ));
                }
                addrs
            }
        };

        let flow_table_size = match file.maps.flows {
            Some(n) if !FLOW_TABLE_RANGE.contains(&n) => {
                return Err(err(
                    "maps.flows",
                    format!(
                        "{n} is out of range {}..={}",
                        FLOW_TABLE_RANGE.start(),
                        FLOW_TABLE_RANGE.end()
                    ),
                ));
            }
            Some(n) => n as u32,
            None => DEFAULT_FLOW_TABLE_SIZE,
        };

        let d = Timeouts::default();
        let timeout =
            |key: &str, v: Option<u64>, default: Duration| -> Result<Duration, ConfigError> {
                match v {
                    Some(s) if !TIMEOUT_RANGE.contains(&s) => Err(err(
                        format!("timeouts.{key}"),
                        format!(
                            "{s} s is out of range {}..={} s",
                            TIMEOUT_RANGE.start(),
                            TIMEOUT_RANGE.end()
                        ),
                    )),
                    Some(s) => Ok(Duration::from_secs(s)),
                    None => Ok(default),
                }
            };
        let timeouts = Timeouts {
            tcp_established: timeout(
                "tcp_established",
                file.timeouts.tcp_established,
                d.tcp_established,
            )?,
            tcp_closing: timeout("tcp_closing", file.timeouts.tcp_closing, d.tcp_closing)?,
            udp_idle: timeout("udp_idle", file.timeouts.udp_idle, d.udp_idle)?,
        };

        Ok(Config {
            internal_networks,
            external_addresses,
            flow_table_size,
            timeouts,
        })
    }
}

/// "line N" for a byte span, so parse errors point at the offending line.
fn describe_span(text: &str, span: std::ops::Range<usize>) -> String {
    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
    let snippet = text.lines().nth(line - 1).unwrap_or("").trim();
    format!("line {line} ({snippet})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifs() -> (Interface, Interface) {
        let i = Interface {
            name: "in0".into(),
            index: 2,
            networks: vec!["10.1.0.1/24".parse().unwrap()],
        };
        let e = Interface {
            name: "ex0".into(),
            index: 3,
            networks: vec!["10.2.0.1/24".parse().unwrap()],
        };
        (i, e)
    }

    #[test]
    fn defaults_come_from_interfaces() {
        let (i, e) = ifs();
        let c = Config::defaults(&i, &e).unwrap();
        assert_eq!(
            c.internal_networks,
            vec!["10.1.0.0/24".parse::<Ipv4Net>().unwrap()]
        );
        assert_eq!(c.external_addresses, vec![Ipv4Addr::new(10, 2, 0, 1)]);
        assert_eq!(c.flow_table_size, DEFAULT_FLOW_TABLE_SIZE);
    }

    #[test]
    fn full_file() {
        let (i, e) = ifs();
        let c = Config::parse(
            "[addresses]\ninternal_networks = [\"10.1.0.0/16\", \"192.168.0.0/24\"]\nexternal_addresses = [\"10.2.0.1\"]\n[maps]\nflows = 4096\n[timeouts]\nudp_idle = 30\n",
            &i,
            &e,
        )
        .unwrap();
        assert_eq!(c.internal_networks.len(), 2);
        assert_eq!(c.flow_table_size, 4096);
        assert_eq!(c.timeouts.udp_idle, Duration::from_secs(30));
    }

    #[test]
    fn the_documented_example_is_valid() {
        let (i, e) = ifs();
        let c = Config::parse(include_str!("../../docs/firewall.example.toml"), &i, &e).unwrap();
        assert_eq!(c.flow_table_size, DEFAULT_FLOW_TABLE_SIZE);
        assert_eq!(c.timeouts, Timeouts::default());
    }

    #[test]
    fn errors_name_the_key() {
        let (i, e) = ifs();
        let cases = [
            (
                "[addresses]\ninternal_networks = [\"10.1.0.0/24\", \"nope\"]",
                "addresses.internal_networks[1]",
            ),
            (
                "[addresses]\ninternal_networks = [\"10.1.0.1/24\"]",
                "host bits",
            ),
            (
                "[addresses]\nexternal_addresses = [\"10.9.9.9\"]",
                "not an address of interface ex0",
            ),
            ("[maps]\nflows = 3", "maps.flows"),
            ("[timeouts]\nudp_idle = 0", "timeouts.udp_idle"),
            ("[maps]\nflowz = 3", "unknown field `flowz`"),
            ("[maps]\nflows = \"many\"", "line 2"),
            ("[addresses]\ninternal_networks = []", "at least one"),
        ];
        for (text, want) in cases {
            let got = Config::parse(text, &i, &e).unwrap_err().to_string();
            assert!(got.contains(want), "{text:?}: {got}");
        }
    }
}
