//! What the API reports: the daemon's status and the kernel tables' entries
//! as listed.

use std::net::{Ipv4Addr, SocketAddrV4};

use firewall_common::{
    flow::{FlowKey, FlowValue},
    pinhole::{pinhole_flags, side, PinholeKey, PinholeValue},
    IPPROTO_TCP,
};
use serde::{Deserialize, Serialize};

use crate::{config::Config, datapath::AttachMode, netif::Interface};

/// What `status` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub version: String,
    pub interfaces: Vec<InterfaceStatus>,
    pub internal_networks: Vec<String>,
    pub external_addresses: Vec<String>,
    pub maps: Vec<MapStatus>,
    pub counters: Vec<CounterStatus>,
    /// Flows removed by the sweeper since the daemon started, by reason.
    pub flows_expired: crate::sweeper::SweepStats,
    /// Transfers the executable blocker stopped.
    #[serde(default)]
    pub executables_blocked: u64,
    /// The FTP filter: ports intercepted (none: off) and its counters.
    #[serde(default)]
    pub ftp_ports: Vec<u16>,
    #[serde(default)]
    pub ftp: crate::ftp::FtpStatsView,
    /// The TFTP helper's server ports (none: off).
    #[serde(default)]
    pub tftp_ports: Vec<u16>,
    /// API connections open now (this one included).
    #[serde(default)]
    pub api_connections: u64,
    /// The wall's settings and how many of the flow entries are primary.
    #[serde(default)]
    pub wall: WallStatus,
}

/// What the wall does with new connections (`status`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WallStatus {
    /// Sources that may open connections out.
    pub outbound_from: Vec<String>,
    /// The access rules, in order, one line each.
    #[serde(default)]
    pub rules: Vec<String>,
    /// The address and ports they are translated to.
    pub nat_address: String,
    pub nat_ports: String,
    /// Published servers, as "tcp 8080 -> 10.1.0.2:80".
    pub published: Vec<String>,
    /// Flow entries of primary connections (two per connection).
    pub primary_flows: u64,
}

impl WallStatus {
    pub fn new(config: &Config, primary_flows: u64) -> Self {
        Self {
            outbound_from: config.outbound_from.iter().map(|n| n.to_string()).collect(),
            rules: config.rules.iter().map(|r| r.describe()).collect(),
            nat_address: config.external_addresses[0].to_string(),
            nat_ports: format!(
                "{}-{}",
                config.nat_port_range.start(),
                config.nat_port_range.end()
            ),
            published: config
                .published
                .iter()
                .map(|p| {
                    format!(
                        "{} {} -> {}{}",
                        p.transport.name(),
                        p.port,
                        p.server,
                        if p.ftp { " (FTP filter)" } else { "" }
                    )
                })
                .collect(),
            primary_flows,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub side: String,
    pub name: String,
    pub ifindex: u32,
    pub addresses: Vec<String>,
    pub xdp_program: String,
    pub xdp_mode: AttachMode,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapStatus {
    pub name: String,
    pub pinned: String,
    pub entries: u64,
    pub capacity: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CounterStatus {
    pub name: String,
    pub verdict: String,
    pub packets: u64,
    pub bytes: u64,
    pub help: String,
}

impl InterfaceStatus {
    pub fn new(side: crate::datapath::Side, iface: &Interface, mode: AttachMode) -> Self {
        Self {
            side: side.name().into(),
            name: iface.name.clone(),
            ifindex: iface.index,
            addresses: iface.networks.iter().map(|n| n.to_string()).collect(),
            xdp_program: mode.program(side).into(),
            xdp_mode: mode,
        }
    }
}

impl Status {
    pub fn config_fields(config: &Config) -> (Vec<String>, Vec<String>) {
        (
            config
                .internal_networks
                .iter()
                .map(|n| n.to_string())
                .collect(),
            config
                .external_addresses
                .iter()
                .map(|a| a.to_string())
                .collect(),
        )
    }
}

fn proto_name(p: u8) -> &'static str {
    match p {
        IPPROTO_TCP => "tcp",
        firewall_common::IPPROTO_UDP => "udp",
        firewall_common::IPPROTO_ICMP => "icmp",
        _ => "other",
    }
}

fn sa(addr: [u8; 4], port: u16) -> String {
    SocketAddrV4::new(addr.into(), port).to_string()
}

/// A pinhole as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinholeView {
    pub protocol: String,
    /// The firewall endpoint the first packet targets.
    pub address: String,
    pub side: String,
    pub target: String,
    pub flags: Vec<String>,
    pub snat: Option<String>,
    pub peer_filter: u32,
    pub remaining: u64,
    pub uses: u64,
    pub owner: u64,
    /// Milliseconds until the TIMEOUT deadline (None: no deadline).
    pub expires_in_ms: Option<i64>,
}

impl PinholeView {
    pub fn new(k: &PinholeKey, v: &PinholeValue, now_ns: u64) -> Self {
        let names = [
            (pinhole_flags::MULTIPLE, "multiple"),
            (pinhole_flags::BIDIRECTIONAL, "bidirectional"),
            (pinhole_flags::CLIENT_ONLY, "client-only"),
            (pinhole_flags::NO_TARGET, "no-target"),
        ];
        Self {
            protocol: proto_name(k.protocol).into(),
            address: sa(k.addr, k.port),
            side: if k.side == side::INTERNAL {
                "internal"
            } else {
                "external"
            }
            .into(),
            target: sa(v.target_addr, v.target_port),
            flags: names
                .iter()
                .filter(|(b, _)| v.flags & b != 0)
                .map(|(_, n)| n.to_string())
                .collect(),
            snat: (v.snat_port_count > 0).then(|| {
                format!(
                    "{}:{}-{}",
                    Ipv4Addr::from(v.snat_addr),
                    v.snat_port_base,
                    v.snat_port_base as u32 + v.snat_port_count as u32 - 1
                )
            }),
            peer_filter: v.peer_filter,
            remaining: v.remaining,
            uses: v.uses,
            owner: v.owner,
            expires_in_ms: (v.deadline_ns != 0)
                .then(|| (v.deadline_ns as i64 - now_ns as i64) / 1_000_000),
        }
    }
}

/// A flow entry as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowView {
    pub protocol: String,
    pub from: String,
    pub to: String,
    /// After translation.
    pub nat_from: String,
    pub nat_to: String,
    pub packets: u64,
    pub bytes: u64,
    pub idle_ms: u64,
    pub owner: u64,
    /// "primary" (tracked by the wall) or "secondary" (made from a pinhole
    /// or by the control plane).
    #[serde(default)]
    pub kind: String,
}

impl FlowView {
    pub fn new(k: &FlowKey, v: &FlowValue, now_ns: u64) -> Self {
        Self {
            protocol: proto_name(k.protocol).into(),
            from: sa(k.src_addr, k.src_port),
            to: sa(k.dst_addr, k.dst_port),
            nat_from: sa(v.nat_src_addr, v.nat_src_port),
            nat_to: sa(v.nat_dst_addr, v.nat_dst_port),
            packets: v.packets,
            bytes: v.bytes,
            idle_ms: now_ns.saturating_sub(v.last_seen_ns) / 1_000_000,
            owner: v.owner,
            kind: firewall_common::flow::flow_kind::name(v.kind).into(),
        }
    }
}
