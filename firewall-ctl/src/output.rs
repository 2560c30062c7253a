//! Human and JSON output (`-j`), like `ip -j` and `bpftool -j`.

use std::fmt::Write as _;

use crate::api::{ApiError, Status};

/// Prints an error: the kind and the message, or `{"error": {...}}` with `-j`.
pub fn print_error(json: bool, e: &ApiError) {
    if json {
        println!("{}", serde_json::json!({ "error": e }));
    } else {
        eprintln!("error: {}: {}", e.kind.as_str(), e.message);
    }
}

pub fn status_text(s: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "firewall daemon pid {} (version {})", s.pid, s.version);
    for i in &s.interfaces {
        let _ = writeln!(
            o,
            "  {:<8} {:<12} ifindex {:<4} xdp {} ({:?})  {}",
            i.side,
            i.name,
            i.ifindex,
            i.xdp_program,
            i.xdp_mode,
            i.addresses.join(" ")
        );
    }
    let _ = writeln!(o, "  internal networks: {}", s.internal_networks.join(", "));
    let _ = writeln!(
        o,
        "  external addresses: {}",
        s.external_addresses.join(", ")
    );
    let _ = writeln!(o, "maps:");
    for m in &s.maps {
        let _ = writeln!(
            o,
            "  {:<14} {:>9} / {:<9} {}",
            m.name, m.entries, m.capacity, m.pinned
        );
    }
    let e = &s.flows_expired;
    let _ = writeln!(
        o,
        "  flows expired: {} tcp closed, {} tcp idle, {} udp idle",
        e.tcp_closed, e.tcp_idle, e.udp_idle
    );
    let _ = writeln!(o, "counters (packets, bytes):");
    for c in &s.counters {
        let _ = writeln!(o, "  {:<24} {:>12} {:>16}", c.name, c.packets, c.bytes);
    }
    o
}
