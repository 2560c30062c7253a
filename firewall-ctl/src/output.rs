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
        "  flows expired: {} tcp closed, {} tcp idle, {} udp idle; {} unused pinholes timed out",
        e.tcp_closed, e.tcp_idle, e.udp_idle, e.pinholes_timed_out
    );
    if s.ftp_ports.is_empty() {
        let _ = writeln!(o, "ftp filter: off");
    } else {
        let f = &s.ftp;
        let ports: Vec<String> = s.ftp_ports.iter().map(u16::to_string).collect();
        let _ = writeln!(
            o,
            "ftp filter: tcp port {}: {} control connections, {} active and {} passive data connections opened, {} bounces and {} other commands refused, {} failed",
            ports.join(","),
            f.control_connections,
            f.active_opened,
            f.passive_opened,
            f.bounces_refused,
            f.commands_refused,
            f.failed_calls
        );
    }
    let _ = writeln!(o, "counters (packets, bytes):");
    for c in &s.counters {
        let _ = writeln!(o, "  {:<24} {:>12} {:>16}", c.name, c.packets, c.bytes);
    }
    o
}

/// One event as a line a person reads.
pub fn event_text(ev: &serde_json::Value) -> String {
    let s = |k: &str| {
        ev.get(k)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .unwrap_or_default()
    };
    match ev.get("event").and_then(|e| e.as_str()) {
        Some("established") => format!(
            "established  connection {} (session {}, {}): {} -> {}{}",
            s("connection"),
            s("session"),
            s("protocol"),
            s("from"),
            s("to"),
            ev.get("context")
                .and_then(|c| c.as_str())
                .map(|c| format!("  context {c:?}"))
                .unwrap_or_default()
        ),
        Some("terminating") => format!(
            "terminating  connection {} (session {}): {}",
            s("connection"),
            s("session"),
            s("reason")
        ),
        _ => ev.to_string(),
    }
}

/// The answer of a call, for people.
pub fn answer_text(v: &serde_json::Value, list: Option<crate::api::ListWhat>) -> String {
    use crate::api::ListWhat;
    let mut o = String::new();
    let s = |v: &serde_json::Value, k: &str| {
        v.get(k)
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| x.to_string())
            })
            .unwrap_or_default()
    };
    let rows = v.as_array().cloned().unwrap_or_default();
    match list {
        Some(ListWhat::Sessions) => {
            let _ = writeln!(o, "{:>6}  {:<15}  {:<10}  objects", "id", "client", "state");
            for r in &rows {
                let state = if r["terminated"].as_bool().unwrap_or(false) {
                    "terminated"
                } else {
                    "open"
                };
                let _ = writeln!(
                    o,
                    "{:>6}  {:<15}  {:<10}  {}",
                    s(r, "id"),
                    s(r, "client"),
                    state,
                    s(r, "objects")
                );
            }
        }
        Some(ListWhat::Connections) => {
            let _ = writeln!(
                o,
                "{:>6} {:>5}  {:<10} {:<11} {:<4} {:<21} {:<21} {:<21} {:>8} {:>10}  flags",
                "id",
                "sess",
                "kind",
                "state",
                "prot",
                "endpoint",
                "target",
                "peer",
                "packets",
                "bytes"
            );
            for r in &rows {
                let flags: Vec<String> = r["flags"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|f| f.as_str().map(str::to_string))
                    .collect();
                let peer = r["peer"].as_str().unwrap_or("-").to_string();
                let _ = writeln!(
                    o,
                    "{:>6} {:>5}  {:<10} {:<11} {:<4} {:<21} {:<21} {:<21} {:>8} {:>10}  {}",
                    s(r, "id"),
                    s(r, "session"),
                    s(r, "kind"),
                    s(r, "state"),
                    s(r, "protocol"),
                    s(r, "endpoint"),
                    s(r, "target"),
                    peer,
                    s(r, "packets"),
                    s(r, "bytes"),
                    flags.join(",")
                );
            }
        }
        Some(ListWhat::Pinholes) => {
            let _ = writeln!(
                o,
                "{:<4} {:<21} {:<8} {:<21} {:>5} {:>5} {:>6}  flags",
                "prot", "address", "side", "target", "left", "uses", "owner"
            );
            for r in &rows {
                let flags: Vec<String> = r["flags"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|f| f.as_str().map(str::to_string))
                    .collect();
                let _ = writeln!(
                    o,
                    "{:<4} {:<21} {:<8} {:<21} {:>5} {:>5} {:>6}  {}",
                    s(r, "protocol"),
                    s(r, "address"),
                    s(r, "side"),
                    s(r, "target"),
                    s(r, "remaining"),
                    s(r, "uses"),
                    s(r, "owner"),
                    flags.join(",")
                );
            }
        }
        Some(ListWhat::Flows) => {
            let _ = writeln!(
                o,
                "{:<4} {:<21} {:<21} => {:<21} {:<21} {:>9} {:>12} {:>8} {:>6}",
                "prot", "from", "to", "as from", "as to", "packets", "bytes", "idle ms", "owner"
            );
            for r in &rows {
                let _ = writeln!(
                    o,
                    "{:<4} {:<21} {:<21} => {:<21} {:<21} {:>9} {:>12} {:>8} {:>6}",
                    s(r, "protocol"),
                    s(r, "from"),
                    s(r, "to"),
                    s(r, "nat_from"),
                    s(r, "nat_to"),
                    s(r, "packets"),
                    s(r, "bytes"),
                    s(r, "idle_ms"),
                    s(r, "owner")
                );
            }
        }
        None => {
            // BindForClient and RedirectConnections answers: an address, then
            // one line per connection or action.
            let shapes = [
                (
                    "proxy_address",
                    "proxy address",
                    "connections",
                    "connection",
                    "external",
                    "client",
                ),
                (
                    "internal_address",
                    "internal address",
                    "actions",
                    "action",
                    "internal",
                    "connect",
                ),
            ];
            if let Some((p, (_, title, list, item, from, to))) =
                shapes.iter().find_map(|sh| v.get(sh.0).map(|p| (p, sh)))
            {
                let _ = writeln!(o, "{title} {}", p.as_str().unwrap_or_default());
                for c in v[*list].as_array().into_iter().flatten() {
                    let _ = writeln!(o, "  {item} {}: {} -> {}", s(c, "id"), s(c, from), s(c, to));
                }
            } else if let Some(id) = v.get("session") {
                let _ = writeln!(o, "session {id} (client {})", s(v, "client"));
            } else {
                let _ = writeln!(o, "{v}");
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_and_redirect_answers_read_as_lines() {
        let bind = serde_json::json!({
            "proxy_address": "10.2.0.1:20000",
            "connections": [{"id": 2, "external": "10.2.0.1:20000", "client": "10.1.0.2:5001"}]
        });
        assert_eq!(
            answer_text(&bind, None),
            "proxy address 10.2.0.1:20000\n  connection 2: 10.2.0.1:20000 -> 10.1.0.2:5001\n"
        );
        let redirect = serde_json::json!({
            "internal_address": "10.1.0.1:20000",
            "actions": [{"id": 3, "internal": "10.1.0.1:20000", "connect": "198.51.100.7:2000"}]
        });
        assert_eq!(
            answer_text(&redirect, None),
            "internal address 10.1.0.1:20000\n  action 3: 10.1.0.1:20000 -> 198.51.100.7:2000\n"
        );
    }
}
