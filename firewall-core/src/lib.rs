//! The firewall's logic, without I/O (the quinn-proto of this project):
//! the engine (sessions, BindForClient and RedirectConnections, connection
//! objects, quota, timers), policy, the port allocator, the filter traits and
//! the FTP filter. Time comes in through a `Clock`, the kernel through the
//! `Maps` and `PortReserver` traits, and every call's effects (events, work
//! for the relay) go out as data. It builds and tests on the stable
//! toolchain: no eBPF, no sockets, no runtime.

pub mod clock;
pub mod engine;
pub mod error;
pub mod filters;
pub mod flags;
pub mod ftp;
pub mod in_place;
pub mod maps;
pub mod policy;
pub mod ports;
pub mod relay;
pub mod segment;
pub mod stream_rewrite;
pub mod sweeper;
pub mod timeouts;
pub mod udp_mappings;
