//! The daemon's configuration file (TOML) and its validation.
//!
//! Everything is optional: without a file the daemon runs on embedded defaults,
//! with addresses and networks read from the two interfaces. Values are typed
//! (networks, addresses, durations, port ranges read themselves); errors name
//! the key, its line, and the problem.

pub use firewall_core::timeouts::Timeouts;
use std::{net::Ipv4Addr, ops::RangeInclusive, path::Path};

use firewall_common::map_sizes;
use ipnet::Ipv4Net;
use serde::Serialize;

use crate::{
    flags::ConnFlags,
    netif::Interface,
    policy::{NetworkObject, ProtocolRule, Transport},
};

mod file;
mod helpers;
mod reload;
mod rules;
#[cfg(test)]
mod tests;
mod types;

use file::File;
pub use rules::{AccessRule, Action, RuleProtocol};
pub use types::{ControlMode, DataConnections, Network, PortRange, Timeout, TIMEOUT_RANGE};

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
    /// Ports primary connections are translated to (disjoint from
    /// `port_range`).
    pub nat_port_range: RangeInclusive<u16>,
    /// Source networks that may open connections out through the firewall
    /// (the wall's embedded rule: the internal networks).
    pub outbound_from: Vec<Ipv4Net>,
    /// Access rules for new outbound connections, in order (`[[rule]]`;
    /// without any, the embedded rule: anything out from `outbound_from`).
    pub rules: Vec<AccessRule>,
    /// Published servers: a port of the first external address forwarded to
    /// an internal server.
    pub published: Vec<Published>,
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
    /// Plain FTP control lines (commands and replies the filter forwards as
    /// they are) are forwarded by the kernel between the proxy's sockets
    /// (`[ftp] control_lines = "kernel"`, the default).
    pub ftp_kernel_lines: bool,
    /// Outbound control connections are forwarded in place by the
    /// datapath, not terminated (`[ftp] control = "in-place"`).
    pub ftp_in_place: bool,
    /// Server ports of the TFTP helper (`[tftp] ports`); empty: off.
    pub tftp_ports: Vec<u16>,
    /// Mark that makes policy routing deliver intercepted segments locally.
    pub fwmark: u32,
    /// The routing table holding the local route for marked segments.
    pub route_table: u32,
    /// Where the Prometheus metrics are served (`[metrics] listen`); None:
    /// not served.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// A published server (`[[publish]]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Published {
    pub transport: Transport,
    /// The port on the first external address.
    pub port: u16,
    pub server: std::net::SocketAddrV4,
    /// An FTP server (TCP, its port one of `ftp.ports`, the filter on): the
    /// daemon proxies its control connections through the FTP filter
    /// instead of forwarding them in the kernel.
    pub ftp: bool,
}

pub const DEFAULT_FTP_PORTS: &[u16] = &[21];
pub use helpers::DEFAULT_TFTP_PORTS;
/// "FW" and 0x21 (FTP's port); any value no other software on the machine uses.
pub const DEFAULT_FWMARK: u32 = 0x4657_0021;
pub const DEFAULT_ROUTE_TABLE: u32 = 18_007;

/// Shared with the datapath, which declares its maps at these sizes (the
/// daemon resizes them before loading).
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = map_sizes::FLOWS;
pub const DEFAULT_PINHOLE_TABLE_SIZE: u32 = map_sizes::PINHOLES;
pub const DEFAULT_PORT_RANGE: RangeInclusive<u16> = 20000..=59999;
/// Below the pinhole range, and below Linux's ephemeral ports (32768–60999),
/// so the firewall's own connections never meet a translated one.
pub const DEFAULT_NAT_PORT_RANGE: RangeInclusive<u16> = 1024..=19999;
pub const DEFAULT_SNAT_BLOCK: u16 = 64;
/// The shortest UDP mapping timeout (RFC 4787, REQ-5).
pub const MIN_UDP_MAPPING: std::time::Duration = std::time::Duration::from_secs(120);
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

fn ranged(
    key: &str,
    v: Option<u64>,
    range: RangeInclusive<u64>,
    default: u64,
) -> Result<u64, ConfigError> {
    match v {
        Some(n) if !range.contains(&n) => Err(err(
            key,
            format!("{n} is out of range {}..={}", range.start(), range.end()),
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

    /// The file at `path`, or the embedded defaults without one (what `up`
    /// and a reload read).
    pub fn read(
        path: Option<&Path>,
        internal: &Interface,
        external: &Interface,
    ) -> anyhow::Result<Self> {
        match path {
            Some(path) => Self::load(path, internal, external),
            None => Self::defaults(internal, external)
                .map_err(|e| anyhow::anyhow!("embedded defaults: {e}")),
        }
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
        let file = read_file(text)?;

        let internal_networks = match file.addresses.internal_networks {
            Some(nets) if nets.is_empty() => {
                return Err(err(
                    "addresses.internal_networks",
                    "must name at least one network",
                ))
            }
            Some(nets) => nets.into_iter().map(|n| n.0).collect(),
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
            Some(addrs) if addrs.is_empty() => {
                return Err(err(
                    "addresses.external_addresses",
                    "must name at least one address",
                ))
            }
            Some(addrs) => {
                for (i, a) in addrs.iter().enumerate() {
                    if !external.networks.iter().any(|n| n.addr() == *a) {
                        return Err(err(
                            format!("addresses.external_addresses[{i}]"),
                            format!("{a} is not an address of interface {}", external.name),
                        ));
                    }
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
        )? as u32;
        let pinhole_table_size = ranged(
            "maps.pinholes",
            file.maps.pinholes,
            PINHOLE_TABLE_RANGE,
            DEFAULT_PINHOLE_TABLE_SIZE as u64,
        )? as u32;

        let d = Timeouts::default();
        let t = &file.timeouts;
        let or = |v: Option<Timeout>, default| v.map_or(default, |t| t.0);
        let timeouts = Timeouts {
            tcp_established: or(t.tcp_established, d.tcp_established),
            tcp_closing: or(t.tcp_closing, d.tcp_closing),
            tcp_transitory: or(t.tcp_transitory, d.tcp_transitory),
            udp_idle: or(t.udp_idle, d.udp_idle),
            // Unset, it outlives a longer udp_idle too.
            udp_mapping: or(t.udp_mapping, d.udp_mapping.max(or(t.udp_idle, d.udp_idle))),
            pinhole: or(t.pinhole, d.pinhole),
            udp_pinhole_idle: or(t.udp_pinhole_idle, d.udp_pinhole_idle),
        };
        let mapping = timeouts.udp_mapping.as_secs();
        if timeouts.udp_mapping < MIN_UDP_MAPPING {
            let min = MIN_UDP_MAPPING.as_secs();
            let why = format!("{mapping} s is below RFC 4787's minimum of {min} s");
            return Err(err("timeouts.udp_mapping", why));
        }
        if timeouts.udp_mapping < timeouts.udp_idle {
            let idle = timeouts.udp_idle.as_secs();
            let why = format!(
                "{mapping} s is shorter than timeouts.udp_idle ({idle} s): a mapping must outlive its flows"
            );
            return Err(err("timeouts.udp_mapping", why));
        }

        let port_range = file.ports.range.map_or(DEFAULT_PORT_RANGE, |r| r.0);
        let snat_block = ranged(
            "ports.snat_block",
            file.ports.snat_block,
            1..=4096,
            DEFAULT_SNAT_BLOCK as u64,
        )? as u16;

        let nat_port_range = file.nat.ports.map_or(DEFAULT_NAT_PORT_RANGE, |r| r.0);
        if nat_port_range.start() <= port_range.end() && port_range.start() <= nat_port_range.end()
        {
            return Err(err(
                "nat.ports",
                format!(
                    "{}-{} overlaps the pinhole ports (ports.range {}-{}): a translated connection could take a pinhole's port",
                    nat_port_range.start(),
                    nat_port_range.end(),
                    port_range.start(),
                    port_range.end()
                ),
            ));
        }
        let outbound_from = match file.wall.outbound_from {
            None => internal_networks.clone(),
            Some(nets) => nets.into_iter().map(|n| n.0).collect(),
        };

        let rules = rules::read(file.rule, &outbound_from)?;

        let mut published: Vec<Published> = Vec::new();
        for (i, p) in file.publish.into_iter().flatten().enumerate() {
            let key = |f: &str| format!("publish[{i}].{f}");
            if p.port == 0 || port_range.contains(&p.port) {
                return Err(err(
                    key("port"),
                    format!(
                        "{} is 0 or one of the pinhole ports (ports.range {}-{})",
                        p.port,
                        port_range.start(),
                        port_range.end()
                    ),
                ));
            }
            if published
                .iter()
                .any(|q| q.transport == p.transport && q.port == p.port)
            {
                return Err(err(key("port"), format!("{} is published twice", p.port)));
            }
            if p.server.port() == 0 || !internal_networks.iter().any(|n| n.contains(p.server.ip()))
            {
                return Err(err(
                    key("server"),
                    format!(
                        "{} is not an address and port on an internal network",
                        p.server
                    ),
                ));
            }
            published.push(Published {
                transport: p.transport,
                port: p.port,
                server: p.server,
                ftp: false,
            });
        }

        let client_quota = ranged(
            "policy.client_quota",
            file.policy.client_quota,
            1..=1_000_000,
            DEFAULT_CLIENT_QUOTA as u64,
        )? as u32;
        let max_pending_per_session = ranged(
            "policy.max_pending_per_session",
            file.policy.max_pending_per_session,
            1..=65_535,
            DEFAULT_MAX_PENDING as u64,
        )? as u32;

        let default_allowed_addresses = file
            .policy
            .default_allowed_addresses
            .iter()
            .fold(ConnFlags::empty(), |all, f| all | f.0);

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
                    if p.ports.contains(&0) {
                        return Err(err(key("ports"), "port 0 is not a port"));
                    }
                    let clients = match p.clients {
                        None => internal_networks.clone(),
                        Some(c) => c.into_iter().map(|n| n.0).collect(),
                    };
                    rules.push(ProtocolRule {
                        name: p.name,
                        transport: p.transport,
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
            Some(map) => map
                .into_iter()
                .map(|(name, ranges)| NetworkObject {
                    name,
                    ranges: ranges.into_iter().map(|n| n.0).collect(),
                })
                .collect(),
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

        let ftp_ports = helpers::ftp_ports(&file.ftp, &protocols)?;
        let tftp_ports = helpers::tftp_ports(&file.tftp)?;
        let ftp_user_mode = file.ftp.data_connections == DataConnections::User;
        let ftp_kernel_lines = file.ftp.control_lines == DataConnections::Kernel;
        let ftp_in_place = file.ftp.control == ControlMode::InPlace;
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

        let metrics_listen = file.metrics.listen;
        if metrics_listen.is_some_and(|a| a.port() == 0) {
            return Err(err(
                "metrics.listen",
                "needs a port (9469 is the usual one)",
            ));
        }

        for p in &mut published {
            p.ftp = p.transport == Transport::Tcp && ftp_ports.contains(&p.server.port());
        }

        Ok(Config {
            metrics_listen,
            ftp_ports,
            ftp_user_mode,
            ftp_kernel_lines,
            ftp_in_place,
            tftp_ports,
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
            nat_port_range,
            outbound_from,
            rules,
            published,
            client_quota,
            max_pending_per_session,
            default_allowed_addresses,
            protocols,
            networks,
        })
    }
}

/// Reads the file into its typed form. An error names the key (its path,
/// like `addresses.internal_networks[1]`) and the line it is on.
fn read_file(text: &str) -> Result<File, ConfigError> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let line = inner.span().map(|s| describe_span(text, s));
        let key = match (path.as_str(), line) {
            (".", Some(line)) => line,
            (".", None) => "config".into(),
            (_, Some(line)) => format!("{path} ({line})"),
            (_, None) => path,
        };
        err(key, inner.message())
    })
}

/// "line N: TEXT" for a byte span, so errors point at the offending line.
fn describe_span(text: &str, span: std::ops::Range<usize>) -> String {
    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
    let snippet = text.lines().nth(line - 1).unwrap_or("").trim();
    format!("line {line}: {snippet}")
}

impl Config {
    /// The access rules as the datapath holds them.
    pub fn datapath_rules(&self) -> Vec<firewall_common::rules::Rule> {
        rules::compile(&self.rules)
    }

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
