//! Output for people, and the JSON of `-j` (like `ip -j` and `bpftool -j`).

use comfy_table::{presets, CellAlignment, Table};
use firewall_common::stats::Counter;
use firewall_ctl::{
    api::{ApiError, FlowView, PinholeView, SessionOpened, Status},
    engine::{BindResult, FutureConnectResult, ObjectInfo, RedirectResult, SessionInfo},
};

/// Prints an error: the kind and the message, or `{"error": {...}}` with `-j`.
pub fn print_error(json: bool, e: &ApiError) {
    if json {
        println!("{}", serde_json::json!({ "error": e }));
    } else {
        eprintln!("error: {}: {}", e.kind.as_str(), e.message);
    }
}

/// A table without borders, columns separated by spaces; the columns
/// listed in `right` are right-aligned (numbers).
fn table(header: &[&str], right: &[usize]) -> Table {
    let mut t = Table::new();
    t.load_style(presets::NOTHING).set_header(header.to_vec());
    for &c in right {
        if let Some(col) = t.column_mut(c) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// Adds the table, indented, with a trailing newline.
fn push_table(o: &mut String, t: &Table, indent: &str) {
    for line in t.lines() {
        o.push_str(indent);
        o.push_str(line.trim_end());
        o.push('\n');
    }
}

pub fn status_text(s: &Status) -> String {
    let mut o = format!("firewall daemon pid {} (version {})\n", s.pid, s.version);
    let mut t = table(
        &[
            "side",
            "interface",
            "ifindex",
            "program",
            "mode",
            "addresses",
        ],
        &[2],
    );
    for i in &s.interfaces {
        t.add_row(vec![
            i.side.clone(),
            i.name.clone(),
            i.ifindex.to_string(),
            i.xdp_program.clone(),
            format!("{:?}", i.xdp_mode).to_lowercase(),
            i.addresses.join(" "),
        ]);
    }
    push_table(&mut o, &t, "  ");
    o += &format!("  internal networks: {}\n", s.internal_networks.join(", "));
    o += &format!(
        "  external addresses: {}\n",
        s.external_addresses.join(", ")
    );
    o += &format!("  API connections: {}\n", s.api_connections);
    let w = &s.wall;
    o += &format!(
        "wall: connections out from {} translated to {} ports {} ({} primary flow entries)\n",
        w.outbound_from.join(", "),
        w.nat_address,
        w.nat_ports,
        w.primary_flows
    );
    for (i, r) in w.rules.iter().enumerate() {
        o += &format!("  rule {}: {r}\n", i + 1);
    }
    if !w.published.is_empty() {
        o += &format!("  published: {}\n", w.published.join("; "));
    }
    o += "maps:\n";
    let mut t = table(&["map", "entries", "capacity", "pinned at"], &[1, 2]);
    for m in &s.maps {
        t.add_row(vec![
            m.name.clone(),
            m.entries.to_string(),
            m.capacity.to_string(),
            m.pinned.clone(),
        ]);
    }
    push_table(&mut o, &t, "  ");
    let e = &s.flows_expired;
    o += &format!(
        "  flows expired: {} tcp closed, {} tcp idle, {} tcp unanswered, {} udp idle; {} unused pinholes timed out\n",
        e.tcp_closed, e.tcp_idle, e.tcp_unanswered, e.udp_idle, e.pinholes_timed_out
    );
    if s.ftp_ports.is_empty() {
        o += "ftp filter: off\n";
    } else {
        let f = &s.ftp;
        let ports: Vec<String> = s.ftp_ports.iter().map(u16::to_string).collect();
        o += &format!(
            "ftp filter: tcp port {}: {} control connections, {} active and {} passive data connections opened, {} bounces and {} other commands refused, {} failed\n",
            ports.join(","),
            f.control_connections,
            f.active_opened,
            f.passive_opened,
            f.bounces_refused,
            f.commands_refused,
            f.failed_calls
        );
        o += &format!(
            "  {} lines forwarded in the kernel; {} control connections there now, {} left with the daemon for want of a slot\n",
            f.kernel_lines, f.kernel_line_connections, f.kernel_slots_exhausted
        );
    }
    if s.tftp_ports.is_empty() {
        o += "tftp helper: off\n";
    } else {
        let ports: Vec<String> = s.tftp_ports.iter().map(u16::to_string).collect();
        let let_in = s
            .counters
            .iter()
            .find(|c| c.name == Counter::TftpEstablished.name())
            .map_or(0, |c| c.packets);
        o += &format!(
            "tftp helper: udp port {}: {let_in} transfers let in\n",
            ports.join(",")
        );
    }
    o += "counters:\n";
    let mut t = table(&["counter", "packets", "bytes"], &[1, 2]);
    for c in &s.counters {
        t.add_row(vec![
            c.name.clone(),
            c.packets.to_string(),
            c.bytes.to_string(),
        ]);
    }
    push_table(&mut o, &t, "  ");
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

/// A value as its JSON text without quotes (kebab-case enum names).
fn name<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(v) => v.to_string(),
        Err(_) => String::new(),
    }
}

fn render(t: Table) -> String {
    let mut o = String::new();
    push_table(&mut o, &t, "");
    o
}

pub fn sessions_text(rows: &[SessionInfo]) -> String {
    let mut t = table(&["id", "client", "state", "objects"], &[0, 3]);
    for r in rows {
        let state = if r.terminated { "terminated" } else { "open" };
        t.add_row(vec![
            r.id.to_string(),
            r.client.to_string(),
            state.into(),
            r.objects.to_string(),
        ]);
    }
    render(t)
}

pub fn connections_text(rows: &[ObjectInfo]) -> String {
    let mut t = table(
        &[
            "id", "session", "kind", "state", "proto", "mode", "endpoint", "target", "peer",
            "packets", "bytes", "flags",
        ],
        &[0, 1, 9, 10],
    );
    for r in rows {
        t.add_row(vec![
            r.id.to_string(),
            r.session.to_string(),
            name(&r.kind),
            name(&r.state),
            name(&r.protocol),
            name(&r.mode),
            r.endpoint.to_string(),
            r.target.to_string(),
            r.peer.map_or("-".into(), |p| p.to_string()),
            r.packets.to_string(),
            r.bytes.to_string(),
            r.flags.names().join(","),
        ]);
    }
    render(t)
}

pub fn pinholes_text(rows: &[PinholeView]) -> String {
    let mut t = table(
        &[
            "proto", "address", "side", "target", "left", "uses", "owner", "flags",
        ],
        &[4, 5, 6],
    );
    for r in rows {
        t.add_row(vec![
            r.protocol.clone(),
            r.address.clone(),
            r.side.clone(),
            r.target.clone(),
            r.remaining.to_string(),
            r.uses.to_string(),
            r.owner.to_string(),
            r.flags.join(","),
        ]);
    }
    render(t)
}

pub fn flows_text(rows: &[FlowView]) -> String {
    let mut t = table(
        &[
            "kind", "proto", "from", "to", "as from", "as to", "packets", "bytes", "idle ms",
            "owner",
        ],
        &[6, 7, 8, 9],
    );
    for r in rows {
        t.add_row(vec![
            r.kind.clone(),
            r.protocol.clone(),
            r.from.clone(),
            r.to.clone(),
            r.nat_from.clone(),
            r.nat_to.clone(),
            r.packets.to_string(),
            r.bytes.to_string(),
            r.idle_ms.to_string(),
            r.owner.to_string(),
        ]);
    }
    render(t)
}

pub fn bound_text(r: &BindResult) -> String {
    let mut o = format!("proxy address {}\n", r.proxy_address);
    for c in &r.connections {
        o += &format!("  connection {}: {} -> {}\n", c.id, c.external, c.client);
    }
    o
}

pub fn redirected_text(r: &RedirectResult) -> String {
    let mut o = format!("internal address {}\n", r.internal_address);
    for a in &r.actions {
        o += &format!("  action {}: {} -> {}\n", a.id, a.internal, a.connect);
    }
    o
}

pub fn permitted_text(r: &FutureConnectResult) -> String {
    format!("action {}: {} from {}\n", r.id, r.address, r.external)
}

pub fn session_text(s: &SessionOpened) -> String {
    format!("session {} (client {})\n", s.session, s.client)
}

/// A primary connection's kind and flags (`connection-flags`).
pub fn primary_text(p: &crate::api::PrimaryConnection) -> String {
    let kind = serde_json::to_value(p.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    format!(
        "{} {} -> {}: {kind}; flags: {}\n",
        p.transport.name(),
        p.client,
        p.server,
        if p.flags.is_empty() {
            "none".to_string()
        } else {
            p.flags.join(", ")
        }
    )
}

#[cfg(test)]
mod tests {
    use firewall_ctl::engine::{BoundConnection, RedirectAction};

    use super::*;

    #[test]
    fn bind_and_redirect_answers_read_as_lines() {
        let bind = BindResult {
            proxy_address: "10.2.0.1:20000".parse().unwrap(),
            connections: vec![BoundConnection {
                id: 2,
                external: "10.2.0.1:20000".parse().unwrap(),
                client: "10.1.0.2:5001".parse().unwrap(),
            }],
        };
        assert_eq!(
            bound_text(&bind),
            "proxy address 10.2.0.1:20000\n  connection 2: 10.2.0.1:20000 -> 10.1.0.2:5001\n"
        );
        let redirect = RedirectResult {
            internal_address: "10.1.0.1:20000".parse().unwrap(),
            actions: vec![RedirectAction {
                id: 3,
                internal: "10.1.0.1:20000".parse().unwrap(),
                connect: "198.51.100.7:2000".parse().unwrap(),
            }],
        };
        assert_eq!(
            redirected_text(&redirect),
            "internal address 10.1.0.1:20000\n  action 3: 10.1.0.1:20000 -> 198.51.100.7:2000\n"
        );
    }

    #[test]
    fn tables_align_their_columns() {
        let rows = vec![
            SessionInfo {
                id: 1,
                client: "10.1.0.2".parse().unwrap(),
                terminated: false,
                objects: 3,
            },
            SessionInfo {
                id: 12,
                client: "10.1.0.30".parse().unwrap(),
                terminated: true,
                objects: 0,
            },
        ];
        let text = sessions_text(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].contains("client") && lines[2].contains("terminated"));
        // Every row is as wide as the header's columns allow: the client
        // column starts at the same place in each.
        let at: Vec<usize> = lines[1..]
            .iter()
            .map(|l| l.find("10.1.0.").unwrap())
            .collect();
        assert_eq!(at[0], at[1], "{text}");
    }
}
