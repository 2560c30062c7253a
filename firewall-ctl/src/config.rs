//! The daemon's configuration file (TOML) and its validation.
//!
//! Everything is optional: without a file the daemon runs on embedded defaults,
//! with addresses and networks read from the two interfaces. Errors name the
//! key and the problem.

pub use firewall_core::timeouts::Timeouts;
use std::{net::Ipv4Addr, ops::RangeInclusive, path::Path, time::Duration};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{
    flags::ConnFlags,
    netif::Interface,
    policy::{NetworkObject, ProtocolRule, Transport},
};

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
    #[serde(default)]
    ports: PortsFile,
    #[serde(default)]
    policy: PolicyFile,
    protocols: Option<Vec<ProtocolFile>>,
    networks: Option<std::collections::BTreeMap<String, Vec<String>>>,
    #[serde(default)]
    scan: ScanFile,
    #[serde(default)]
    ftp: FtpFile,
    #[serde(default)]
    interception: InterceptionFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FtpFile {
    enabled: Option<bool>,
    ports: Option<Vec<u16>>,
    data_connections: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct InterceptionFile {
    fwmark: Option<u32>,
    route_table: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScanFile {
    block_executables: Option<Vec<String>>,
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
    pinholes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeoutsFile {
    tcp_established: Option<u64>,
    tcp_closing: Option<u64>,
    udp_idle: Option<u64>,
    pinhole: Option<u64>,
    udp_pinhole_idle: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortsFile {
    range: Option<String>,
    snat_block: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    default_allowed_addresses: Option<Vec<String>>,
    client_quota: Option<u64>,
    max_pending_per_session: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProtocolFile {
    name: String,
    transport: String,
    #[serde(default)]
    ports: Vec<u16>,
    clients: Option<Vec<String>>,
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
    /// Capacity of the pinhole table.
    pub pinhole_table_size: u32,
    pub timeouts: Timeouts,
    /// Ports handed out when a call asks for any port.
    pub port_range: RangeInclusive<u16>,
    /// SNAT ports reserved per ALLOW_MULTIPLE redirect or proxy-mode bind.
    pub snat_block: u16,
    /// Concurrent secondary connections per client and transport: a new TCP
    /// one beyond it is refused, a new UDP one replaces the client's oldest.
    pub client_quota: u32,
    /// Pinholes (and relay endpoints) of a session that may wait for their
    /// connection at once; beyond it a call fails with `exhausted`.
    pub max_pending_per_session: u32,
    /// Allowed-address flags OR-ed into every BindForClient
    /// (DefaultAllowedAddressesInBindForClient).
    pub default_allowed_addresses: ConnFlags,
    pub protocols: Vec<ProtocolRule>,
    /// Network objects for ALLOW_ADDRESSES_IN_NETWORK.
    pub networks: Vec<NetworkObject>,
    /// Protocols whose secondary connections are scanned for Windows
    /// executables (they go through the user-mode relay).
    pub block_executables: Vec<String>,
    /// Destination ports of FTP control connections that the built-in FTP
    /// filter intercepts; empty: the filter is off.
    pub ftp_ports: Vec<u16>,
    /// FTP data connections go through the user-mode relay even without a
    /// data filter (`[ftp] data_connections = "user"`).
    pub ftp_user_mode: bool,
    /// Mark that makes policy routing deliver intercepted segments locally.
    pub fwmark: u32,
    /// The routing table holding the local route for marked segments.
    pub route_table: u32,
}

pub const DEFAULT_FTP_PORTS: &[u16] = &[21];
/// "FW" and 0x21 (FTP's port); any value no other software on the machine uses.
pub const DEFAULT_FWMARK: u32 = 0x4657_0021;
pub const DEFAULT_ROUTE_TABLE: u32 = 18_007;

pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 262_144;
pub const DEFAULT_PINHOLE_TABLE_SIZE: u32 = 65_536;
pub const DEFAULT_PORT_RANGE: RangeInclusive<u16> = 20000..=59999;
pub const DEFAULT_SNAT_BLOCK: u16 = 64;
/// ISA Server 2004's per-client connection limit (KB 838706).
/// Concurrent live secondary connections per client and transport. ISA
/// Server 2004 had 160; counting only live connections (a connection stops
/// counting at its first FIN or RST), 1024 is beyond what one busy host
/// opens at once (a build server mirroring in parallel, a PBX with hundreds
/// of calls' media, a NAT gateway behind one address), and one abusive host
/// at its quota holds under 1 % of the default flow table.
pub const DEFAULT_CLIENT_QUOTA: u32 = 1024;

/// Unused pinholes per session (per client address) at once: netfilter
/// caps expectations at 255 per helper class; an FTP control connection
/// keeps one at a time, so this bounds what one client can hold open.
pub const DEFAULT_MAX_PENDING: u32 = 255;
const FLOW_TABLE_RANGE: RangeInclusive<u64> = 1024..=16_777_216;
const PINHOLE_TABLE_RANGE: RangeInclusive<u64> = 64..=16_777_216;
const TIMEOUT_RANGE: RangeInclusive<u64> = 1..=604_800;

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

fn parse_cidr(key: String, s: &str) -> Result<Ipv4Net, ConfigError> {
    let net: Ipv4Net = s.parse().map_err(|_| {
        err(
            &key,
            format!("{s:?} is not an IPv4 network in CIDR form (like 10.1.0.0/24)"),
        )
    })?;
    if net != net.trunc() {
        return Err(err(
            key,
            format!("{s:?} has host bits set; did you mean {}?", net.trunc()),
        ));
    }
    Ok(net)
}

fn ranged(
    key: &str,
    v: Option<u64>,
    range: RangeInclusive<u64>,
    default: u64,
    unit: &str,
) -> Result<u64, ConfigError> {
    match v {
        Some(n) if !range.contains(&n) => Err(err(
            key,
            format!(
                "{n}{unit} is out of range {}..={}{unit}",
                range.start(),
                range.end()
            ),
        )),
        Some(n) => Ok(n),
        None => Ok(default),
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
                let nets = list
                    .iter()
                    .enumerate()
                    .map(|(i, s)| parse_cidr(format!("addresses.internal_networks[{i}]"), s))
                    .collect::<Result<Vec<_>, _>>()?;
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
                    let key = format!("addresses.external_addresses[{i}]");
                    let a: Ipv4Addr = s
                        .parse()
                        .map_err(|_| err(&key, format!("{s:?} is not an IPv4 address")))?;
                    if !external.networks.iter().any(|n| n.addr() == a) {
                        return Err(err(
                            key,
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

        let flow_table_size = ranged(
            "maps.flows",
            file.maps.flows,
            FLOW_TABLE_RANGE,
            DEFAULT_FLOW_TABLE_SIZE as u64,
            "",
        )? as u32;
        let pinhole_table_size = ranged(
            "maps.pinholes",
            file.maps.pinholes,
            PINHOLE_TABLE_RANGE,
            DEFAULT_PINHOLE_TABLE_SIZE as u64,
            "",
        )? as u32;

        let d = Timeouts::default();
        let t = &file.timeouts;
        let secs =
            |key: &str, v: Option<u64>, default: Duration| -> Result<Duration, ConfigError> {
                Ok(Duration::from_secs(ranged(
                    &format!("timeouts.{key}"),
                    v,
                    TIMEOUT_RANGE,
                    default.as_secs(),
                    " s",
                )?))
            };
        let timeouts = Timeouts {
            tcp_established: secs("tcp_established", t.tcp_established, d.tcp_established)?,
            tcp_closing: secs("tcp_closing", t.tcp_closing, d.tcp_closing)?,
            udp_idle: secs("udp_idle", t.udp_idle, d.udp_idle)?,
            pinhole: secs("pinhole", t.pinhole, d.pinhole)?,
            udp_pinhole_idle: secs("udp_pinhole_idle", t.udp_pinhole_idle, d.udp_pinhole_idle)?,
        };

        let port_range = match &file.ports.range {
            None => DEFAULT_PORT_RANGE,
            Some(s) => {
                let bad = || {
                    err(
                        "ports.range",
                        format!("{s:?} is not a port range like \"20000-59999\""),
                    )
                };
                let (a, b) = s.split_once('-').ok_or_else(bad)?;
                let (a, b): (u16, u16) = (
                    a.trim().parse().map_err(|_| bad())?,
                    b.trim().parse().map_err(|_| bad())?,
                );
                if a < 1024 {
                    return Err(err(
                        "ports.range",
                        format!("starts at {a}: ports below 1024 are never handed out"),
                    ));
                }
                if b < a {
                    return Err(err("ports.range", format!("{s:?} ends before it starts")));
                }
                a..=b
            }
        };
        let snat_block = ranged(
            "ports.snat_block",
            file.ports.snat_block,
            1..=4096,
            DEFAULT_SNAT_BLOCK as u64,
            "",
        )? as u16;

        let client_quota = ranged(
            "policy.client_quota",
            file.policy.client_quota,
            1..=1_000_000,
            DEFAULT_CLIENT_QUOTA as u64,
            "",
        )? as u32;
        let max_pending_per_session = ranged(
            "policy.max_pending_per_session",
            file.policy.max_pending_per_session,
            1..=65_535,
            DEFAULT_MAX_PENDING as u64,
            "",
        )? as u32;

        let mut default_allowed_addresses = ConnFlags::empty();
        for (i, name) in file
            .policy
            .default_allowed_addresses
            .iter()
            .flatten()
            .enumerate()
        {
            let key = format!("policy.default_allowed_addresses[{i}]");
            let f = ConnFlags::from_kebab(name).map_err(|e| err(&key, e))?;
            if !ConnFlags::ALLOWED_ADDRESSES.contains(f) {
                return Err(err(key, format!("{name:?} is not an allowed-address flag (allow-addresses-in-class-c-network, allow-addresses-in-network, allow-addresses-all)")));
            }
            default_allowed_addresses |= f;
        }

        let protocols = match file.protocols {
            None => vec![ProtocolRule {
                name: "ftp".into(),
                transport: Transport::Tcp,
                ports: vec![21],
                clients: internal_networks.clone(),
            }],
            Some(list) => {
                let mut rules: Vec<ProtocolRule> = Vec::new();
                for (i, p) in list.into_iter().enumerate() {
                    let key = |f: &str| format!("protocols[{i}].{f}");
                    if p.name.is_empty()
                        || !p
                            .name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    {
                        return Err(err(
                            key("name"),
                            format!("{:?} must be a non-empty name of [A-Za-z0-9_-]", p.name),
                        ));
                    }
                    if rules.iter().any(|r| r.name == p.name) {
                        return Err(err(
                            key("name"),
                            format!("protocol {:?} is defined twice", p.name),
                        ));
                    }
                    let transport = match p.transport.as_str() {
                        "tcp" => Transport::Tcp,
                        "udp" => Transport::Udp,
                        other => {
                            return Err(err(
                                key("transport"),
                                format!("{other:?} is not \"tcp\" or \"udp\""),
                            ))
                        }
                    };
                    if p.ports.contains(&0) {
                        return Err(err(key("ports"), "port 0 is not a port"));
                    }
                    let clients = match p.clients {
                        None => internal_networks.clone(),
                        Some(c) => c
                            .iter()
                            .enumerate()
                            .map(|(j, s)| parse_cidr(format!("protocols[{i}].clients[{j}]"), s))
                            .collect::<Result<Vec<_>, _>>()?,
                    };
                    rules.push(ProtocolRule {
                        name: p.name,
                        transport,
                        ports: p.ports,
                        clients,
                    });
                }
                rules
            }
        };

        let networks = match file.networks {
            None => vec![NetworkObject {
                name: "internal".into(),
                ranges: internal_networks.clone(),
            }],
            Some(map) => {
                let mut objs = Vec::new();
                for (name, ranges) in map {
                    let ranges = ranges
                        .iter()
                        .enumerate()
                        .map(|(j, s)| parse_cidr(format!("networks.{name}[{j}]"), s))
                        .collect::<Result<Vec<_>, _>>()?;
                    objs.push(NetworkObject { name, ranges });
                }
                objs
            }
        };

        let mut block_executables = Vec::new();
        for (i, name) in file.scan.block_executables.iter().flatten().enumerate() {
            if !protocols.iter().any(|p| &p.name == name) {
                let known: Vec<&str> = protocols.iter().map(|p| p.name.as_str()).collect();
                return Err(err(
                    format!("scan.block_executables[{i}]"),
                    format!(
                        "{name:?} is not a configured protocol ({})",
                        known.join(", ")
                    ),
                ));
            }
            block_executables.push(name.clone());
        }

        let ftp_ports = if file.ftp.enabled.unwrap_or(true) {
            let ports = file.ftp.ports.unwrap_or_else(|| DEFAULT_FTP_PORTS.to_vec());
            if ports.is_empty() || ports.len() > 16 {
                return Err(err(
                    "ftp.ports",
                    "give 1 to 16 ports (or enabled = false to turn the FTP filter off)",
                ));
            }
            for (i, p) in ports.iter().enumerate() {
                if *p == 0 || ports[..i].contains(p) {
                    return Err(err(
                        format!("ftp.ports[{i}]"),
                        format!("{p} is 0 or listed twice"),
                    ));
                }
            }
            if !protocols.iter().any(|p| p.name == "ftp") {
                return Err(err(
                    "ftp.enabled",
                    "the FTP filter needs a protocol named \"ftp\" in [[protocols]] (or enabled = false)",
                ));
            }
            ports
        } else {
            Vec::new()
        };
        let ftp_user_mode = match file.ftp.data_connections.as_deref() {
            None | Some("kernel") => false,
            Some("user") => true,
            Some(other) => {
                return Err(err(
                    "ftp.data_connections",
                    format!("{other:?} is neither \"kernel\" nor \"user\""),
                ))
            }
        };
        let fwmark = file.interception.fwmark.unwrap_or(DEFAULT_FWMARK);
        if fwmark == 0 {
            return Err(err(
                "interception.fwmark",
                "0 means no mark; pick another value",
            ));
        }
        let route_table = file.interception.route_table.unwrap_or(DEFAULT_ROUTE_TABLE);
        if matches!(route_table, 0 | 253..=255) {
            return Err(err(
                "interception.route_table",
                format!("{route_table} is reserved (unspec, default, main, local)"),
            ));
        }

        Ok(Config {
            ftp_ports,
            ftp_user_mode,
            fwmark,
            route_table,
            block_executables,
            internal_networks,
            external_addresses,
            flow_table_size,
            pinhole_table_size,
            timeouts,
            port_range,
            snat_block,
            client_quota,
            max_pending_per_session,
            default_allowed_addresses,
            protocols,
            networks,
        })
    }
}

/// "line N" for a byte span, so parse errors point at the offending line.
fn describe_span(text: &str, span: std::ops::Range<usize>) -> String {
    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
    let snippet = text.lines().nth(line - 1).unwrap_or("").trim();
    format!("line {line} ({snippet})")
}

impl Config {
    /// What the engine needs of the configuration and the interfaces.
    pub fn engine_config(
        &self,
        internal: &Interface,
        external: &Interface,
    ) -> firewall_core::engine::EngineConfig {
        firewall_core::engine::EngineConfig {
            internal_addrs: internal.addresses().collect(),
            external_addrs: self.external_addresses.clone(),
            internal_networks: self.internal_networks.clone(),
            internal_ifindex: internal.index,
            external_ifindex: external.index,
            timeouts: self.timeouts,
            snat_block: self.snat_block,
            client_quota: self.client_quota,
            max_pending: self.max_pending_per_session,
            default_allowed: self.default_allowed_addresses,
            protocols: self.protocols.clone(),
            networks: self.networks.clone(),
        }
    }
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
        assert_eq!(c.port_range, DEFAULT_PORT_RANGE);
        assert_eq!(c.protocols[0].name, "ftp");
        assert_eq!(c.protocols[0].clients, c.internal_networks);
        assert_eq!(c.networks[0].ranges, c.internal_networks);
        assert!(c.default_allowed_addresses.is_empty());
    }

    #[test]
    fn full_file() {
        let (i, e) = ifs();
        let c = Config::parse(
            r#"
[addresses]
internal_networks = ["10.1.0.0/16", "192.168.0.0/24"]
external_addresses = ["10.2.0.1"]
[maps]
flows = 4096
pinholes = 1024
[timeouts]
udp_idle = 30
pinhole = 20
[ports]
range = "30000-30099"
snat_block = 8
[policy]
default_allowed_addresses = ["allow-addresses-in-class-c-network"]
[[protocols]]
name = "sip"
transport = "udp"
ports = [5060]
clients = ["10.1.0.0/24"]
[networks]
lan = ["10.1.0.0/23"]
dmz = ["192.168.0.0/24"]
[ftp]
enabled = false
"#,
            &i,
            &e,
        )
        .unwrap();
        assert_eq!(c.internal_networks.len(), 2);
        assert_eq!(c.flow_table_size, 4096);
        assert_eq!(c.pinhole_table_size, 1024);
        assert_eq!(c.timeouts.udp_idle, Duration::from_secs(30));
        assert_eq!(c.timeouts.pinhole, Duration::from_secs(20));
        assert_eq!(c.port_range, 30000..=30099);
        assert_eq!(c.snat_block, 8);
        assert_eq!(
            c.default_allowed_addresses,
            ConnFlags::ALLOW_ADDRESSES_IN_CLASS_C_NETWORK
        );
        assert_eq!(c.protocols.len(), 1);
        assert_eq!(c.protocols[0].transport, Transport::Udp);
        assert_eq!(c.networks.len(), 2);
        assert!(c.ftp_ports.is_empty());
    }

    #[test]
    fn the_documented_example_is_valid() {
        let (i, e) = ifs();
        let c = Config::parse(include_str!("../../docs/firewall.example.toml"), &i, &e).unwrap();
        assert_eq!(c.flow_table_size, DEFAULT_FLOW_TABLE_SIZE);
        assert_eq!(c.timeouts, Timeouts::default());
        assert_eq!(c.port_range, DEFAULT_PORT_RANGE);
        assert_eq!(c.client_quota, DEFAULT_CLIENT_QUOTA);
        assert_eq!(c.ftp_ports, DEFAULT_FTP_PORTS);
        assert_eq!(c.fwmark, DEFAULT_FWMARK);
    }

    #[test]
    fn ftp_filter_is_on_by_default_and_can_be_turned_off() {
        let (i, e) = ifs();
        assert_eq!(Config::defaults(&i, &e).unwrap().ftp_ports, vec![21]);
        let off = Config::parse("[ftp]\nenabled = false", &i, &e).unwrap();
        assert!(off.ftp_ports.is_empty());
        let other = Config::parse("[ftp]\nports = [21, 2121]", &i, &e).unwrap();
        assert_eq!(other.ftp_ports, vec![21, 2121]);
    }

    #[test]
    fn errors_name_the_key() {
        let (i, e) = ifs();
        let cases = [
            ("[addresses]\ninternal_networks = [\"10.1.0.0/24\", \"nope\"]", "addresses.internal_networks[1]"),
            ("[addresses]\ninternal_networks = [\"10.1.0.1/24\"]", "host bits"),
            ("[addresses]\nexternal_addresses = [\"10.9.9.9\"]", "not an address of interface ex0"),
            ("[maps]\nflows = 3", "maps.flows"),
            ("[maps]\npinholes = 3", "maps.pinholes"),
            ("[timeouts]\nudp_idle = 0", "timeouts.udp_idle"),
            ("[timeouts]\npinhole = 9999999", "timeouts.pinhole"),
            ("[maps]\nflowz = 3", "unknown field `flowz`"),
            ("[maps]\nflows = \"many\"", "line 2"),
            ("[addresses]\ninternal_networks = []", "at least one"),
            ("[ports]\nrange = \"80-90\"", "below 1024"),
            ("[ports]\nrange = \"9000\"", "ports.range"),
            ("[ports]\nrange = \"9000-2000\"", "ends before it starts"),
            ("[policy]\ndefault_allowed_addresses = [\"timeout\"]", "not an allowed-address flag"),
            ("[policy]\ndefault_allowed_addresses = [\"lots\"]", "policy.default_allowed_addresses[0]"),
            ("[[protocols]]\nname = \"x\"\ntransport = \"sctp\"", "protocols[0].transport"),
            ("[[protocols]]\nname = \"x y\"\ntransport = \"tcp\"", "protocols[0].name"),
            ("[[protocols]]\nname = \"x\"\ntransport = \"tcp\"\n[[protocols]]\nname = \"x\"\ntransport = \"udp\"", "defined twice"),
            ("[networks]\nlan = [\"10.0.0.0/99\"]", "networks.lan[0]"),
            ("[scan]\nblock_executables = [\"gopher\"]", "scan.block_executables[0]"),
            ("[scan]\nblock_everything = true", "unknown field `block_everything`"),
            ("[policy]\nclient_quota = 0", "policy.client_quota"),
            ("[ftp]\nports = [21, 21]", "ftp.ports[1]"),
            ("[ftp]\nports = []", "ftp.ports"),
            ("[ftp]\nports = [0]", "ftp.ports[0]"),
            ("[ftp]\nport = 21", "unknown field `port`"),
            ("[ftp]\ndata_connections = \"fast\"", "ftp.data_connections"),
            ("[[protocols]]\nname = \"tftp\"\ntransport = \"udp\"", "ftp.enabled"),
            ("[interception]\nfwmark = 0", "interception.fwmark"),
            ("[interception]\nroute_table = 254", "interception.route_table"),
        ];
        for (text, want) in cases {
            let got = Config::parse(text, &i, &e).unwrap_err().to_string();
            assert!(got.contains(want), "{text:?}: {got}");
        }
    }
}
