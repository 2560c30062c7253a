//! Types and constants that the eBPF datapath and the control plane must agree on.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding: hidden padding
//! would make hash lookups compare garbage and would not show up in BTF dumps.
//! Addresses are stored as `[u8; 4]` in packet order and ports in host order so
//! that `bpftool map dump` prints them readably.
#![no_std]

pub mod csum;
pub mod flow;
pub mod frag;
pub mod ftp_lines;
pub mod icmp;
pub mod inplace;
pub mod intercept;
pub mod pinhole;
pub mod rules;
pub mod seqadj;
pub mod stats;
pub mod tftp;
pub mod wall;

#[cfg(test)]
mod layout_tests;

/// bpffs directory under which every map and link of the firewall is pinned.
pub const PIN_DIR: &str = "/sys/fs/bpf/firewall";

/// Names of the pinned maps (also the names of the statics in firewall-ebpf).
pub mod map_names {
    pub const FLOWS: &str = "FLOWS";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const STATS: &str = "STATS";
    pub const CSUM_SCRATCH: &str = "CSUM_SCRATCH";
    pub const PINHOLES: &str = "PINHOLES";
    pub const PEER_FILTERS: &str = "PEER_FILTERS";
    pub const BUSY_CLIENTS: &str = "BUSY_CLIENTS";
    pub const EVENTS: &str = "EVENTS";
    pub const INTERCEPT: &str = "INTERCEPT";
    pub const INTERCEPT_CONF: &str = "INTERCEPT_CONF";
    pub const WALL_CONF: &str = "WALL_CONF";
    pub const WALL_SOURCES: &str = "WALL_SOURCES";
    pub const PUBLISHED: &str = "PUBLISHED";
    pub const RULES: &str = "RULES";
    pub const RULES_ACTIVE: &str = "RULES_ACTIVE";
    pub const UDP_MAPPINGS: &str = "UDP_MAPPINGS";
    pub const UDP_PORT_OWNERS: &str = "UDP_PORT_OWNERS";
    pub const TFTP_CONF: &str = "TFTP_CONF";
    /// FTP control lines forwarded in the kernel: the proxy's sockets (a
    /// SOCKMAP), their slots by socket cookie, and each slot's state.
    pub const LINE_SOCKS: &str = "LINE_SOCKS";
    pub const LINE_SLOTS: &str = "LINE_SLOTS";
    pub const LINE_STATE: &str = "LINE_STATE";
    /// FTP control connections forwarded in place: the ports, each
    /// connection's state (the datapath's) and translation (the daemon's),
    /// and the segments handed to the daemon (a ring).
    pub const INPLACE_PORTS: &str = "INPLACE_PORTS";
    pub const INPLACE: &str = "INPLACE";
    pub const INPLACE_ADJUST: &str = "INPLACE_ADJUST";
    pub const INPLACE_SEGMENTS: &str = "INPLACE_SEGMENTS";
    /// The programs the pipeline tail-calls for them, at XDP and at TC
    /// (slot 0 of each; not pinned).
    pub const INPLACE_PROGS_XDP: &str = "INPLACE_PROGS_XDP";
    pub const INPLACE_PROGS_TC: &str = "INPLACE_PROGS_TC";
    /// SYNs being intercepted (not pinned: they live with the daemon).
    pub const INTERCEPTING: &str = "INTERCEPTING";
    /// The daemon's interception listener (a SOCKMAP, not pinned).
    pub const INTERCEPT_LISTENER: &str = "INTERCEPT_LISTENER";
}

/// Capacities of the maps (entries). The datapath declares its maps with
/// them; the daemon resizes FLOWS and PINHOLES to the configured sizes
/// before loading, and names the capacity when a map is full.
pub mod map_sizes {
    /// One entry per direction of a connection.
    pub const FLOWS: u32 = 262_144;
    pub const PINHOLES: u32 = 65_536;
    /// Datagrams whose first fragment was forwarded, for their later fragments.
    pub const FRAGMENTS: u32 = 8192;
    /// Rules of every peer filter together.
    pub const PEER_FILTERS: u32 = 65_536;
    /// Clients at their connection quota.
    pub const BUSY_CLIENTS: u32 = 16_384;
    /// Intercepted ports.
    pub const INTERCEPT: u32 = 64;
    /// Source networks that may open outbound connections.
    pub const WALL_SOURCES: u32 = 1024;
    /// Published servers.
    pub const PUBLISHED: u32 = 1024;
    /// UDP mappings, and the NAT ports they own: one per port at most.
    pub const UDP_MAPPINGS: u32 = 65_536;
    /// SYNs on their way to the interception listener.
    pub const INTERCEPTING: u32 = 16_384;
    /// FTP control connections forwarded in place.
    pub const INPLACE: u32 = 65_536;
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    pub const XDP_INTERNAL: &str = "xdp_internal";
    pub const XDP_EXTERNAL: &str = "xdp_external";
    /// TC (tcx) ingress on the internal interface: transparent interception.
    pub const TC_INTERNAL: &str = "tc_internal";
    /// sk_lookup in the firewall's network namespace: intercepted SYNs to
    /// the daemon's listener.
    pub const SK_LOOKUP_INTERCEPT: &str = "sk_lookup_intercept";
    /// Connections read in place, tail-called from the pipeline (XDP, TC).
    pub const XDP_INPLACE: &str = "xdp_inplace";
    pub const TC_INPLACE: &str = "tc_inplace";
    /// The datapath at tcx ingress (`--xdp-mode tc`).
    pub const TC_FORWARD_INTERNAL: &str = "tc_forward_internal";
    pub const TC_FORWARD_EXTERNAL: &str = "tc_forward_external";
    /// Stream verdict on the FTP proxy's sockets: plain lines forwarded in
    /// the kernel.
    pub const FTP_LINES: &str = "ftp_lines";
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
