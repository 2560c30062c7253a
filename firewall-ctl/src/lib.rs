//! firewall-ctl: the control plane of the secondary-connection firewall.
//!
//! The library holds everything the daemon and the CLI share: the datapath
//! loader and typed map access, configuration, the local API, and the daemon.

pub mod api;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod engine;
pub mod filters;
pub mod flags;
pub mod ftp;
pub mod lock;
pub mod mapops;
pub mod neighbours;
pub mod netif;
pub mod output;
pub mod policy;
pub mod ports;
pub mod primary;
pub mod relay;
pub mod sweeper;
pub mod timewait;
