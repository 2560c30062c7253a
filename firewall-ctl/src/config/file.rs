//! The file as the operator writes it: every key optional, unknown keys
//! refused, values typed (they check themselves as they are read).

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::Deserialize;

use super::types::{AllowedAddresses, ControlMode, DataConnections, Network, PortRange, Timeout};
use crate::policy::Transport;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    #[serde(default)]
    pub addresses: AddressesFile,
    #[serde(default)]
    pub maps: MapsFile,
    #[serde(default)]
    pub timeouts: TimeoutsFile,
    #[serde(default)]
    pub ports: PortsFile,
    #[serde(default)]
    pub policy: PolicyFile,
    pub protocols: Option<Vec<ProtocolFile>>,
    pub networks: Option<BTreeMap<String, Vec<Network>>>,
    #[serde(default)]
    pub scan: ScanFile,
    #[serde(default)]
    pub ftp: FtpFile,
    #[serde(default)]
    pub tftp: TftpFile,
    #[serde(default)]
    pub interception: InterceptionFile,
    #[serde(default)]
    pub nat: NatFile,
    #[serde(default)]
    pub wall: WallFile,
    pub publish: Option<Vec<PublishFile>>,
    pub rule: Option<Vec<super::rules::RuleFile>>,
    #[serde(default)]
    pub metrics: MetricsFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MetricsFile {
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PublishFile {
    pub transport: Transport,
    pub port: u16,
    pub server: std::net::SocketAddrV4,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NatFile {
    pub ports: Option<PortRange>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WallFile {
    pub outbound_from: Option<Vec<Network>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FtpFile {
    pub enabled: Option<bool>,
    pub ports: Option<Vec<u16>>,
    #[serde(default)]
    pub data_connections: DataConnections,
    /// Where plain control lines are forwarded (the same two words).
    #[serde(default)]
    pub control_lines: DataConnections,
    /// How outbound control connections are read.
    #[serde(default)]
    pub control: ControlMode,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TftpFile {
    pub ports: Option<Vec<u16>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InterceptionFile {
    pub fwmark: Option<u32>,
    pub route_table: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ScanFile {
    pub block_executables: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AddressesFile {
    pub internal_networks: Option<Vec<Network>>,
    pub external_addresses: Option<Vec<Ipv4Addr>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MapsFile {
    pub flows: Option<u64>,
    pub pinholes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TimeoutsFile {
    pub tcp_established: Option<Timeout>,
    pub tcp_closing: Option<Timeout>,
    pub tcp_transitory: Option<Timeout>,
    pub udp_idle: Option<Timeout>,
    pub udp_mapping: Option<Timeout>,
    pub pinhole: Option<Timeout>,
    pub udp_pinhole_idle: Option<Timeout>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PortsFile {
    pub range: Option<PortRange>,
    pub snat_block: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyFile {
    #[serde(default)]
    pub default_allowed_addresses: Vec<AllowedAddresses>,
    pub client_quota: Option<u64>,
    pub max_pending_per_session: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ProtocolFile {
    pub name: String,
    pub transport: Transport,
    #[serde(default)]
    pub ports: Vec<u16>,
    pub clients: Option<Vec<Network>>,
}
