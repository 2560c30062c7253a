//! firewall-ctl: the control plane of the secondary-connection firewall:
//! the adapters around firewall-core (the datapath and its maps, the relay,
//! interception, the API) and the daemon.
//!
//! The library holds everything the daemon and the CLI share: the datapath
//! loader and typed map access, configuration, the local API, and the daemon.

pub mod api;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod engine_owner;
pub mod in_place;
pub mod lock;
pub mod logging;
pub mod mapops;
pub mod netdev_genl;
pub mod netif;
pub mod netlink;
pub mod primary;
pub mod relay;
pub mod reserve;
pub mod routing;
pub mod timewait;

/// The logic, from firewall-core.
pub use firewall_core::{engine, filters, flags, ftp, policy, ports, sweeper};
