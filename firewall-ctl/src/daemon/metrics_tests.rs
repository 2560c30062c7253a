//! The exposition's names, labels and values, from a made-up snapshot.

use super::*;
use crate::engine::{Kind, Mode, State};

fn snapshot() -> Snapshot {
    let status: Status = serde_json::from_value(serde_json::json!({
        "pid": 1,
        "version": "1.2.3",
        "interfaces": [],
        "internal_networks": [],
        "external_addresses": [],
        "maps": [{"name": "FLOWS", "pinned": "/sys/fs/bpf/firewall/FLOWS", "entries": 4, "capacity": 1024}],
        "counters": [
            {"name": "drop_no_flow", "verdict": "drop", "packets": 5, "bytes": 300, "help": "h"},
            {"name": "redirected", "verdict": "redirect", "packets": 7, "bytes": 700, "help": "h"}
        ],
        "flows_expired": {"tcp_closed": 2, "tcp_idle": 0, "udp_idle": 1},
        "ftp": {"control_connections": 3, "active_opened": 1, "passive_opened": 2,
                "bounces_refused": 0, "commands_refused": 0, "failed_calls": 0,
                "kernel_lines": 9, "kernel_line_bytes": 90, "kernel_line_connections": 6, "kernel_slots_exhausted": 8},
        "api_connections": 1,
        "wall": {"outbound_from": [], "nat_address": "", "nat_ports": "", "published": [], "primary_flows": 2}
    }))
    .unwrap();
    let mut census = Census {
        sessions: 1,
        ..Default::default()
    };
    census
        .objects
        .insert((Kind::Bind, Mode::Kernel, State::Established), 2);
    let mut api_calls = BTreeMap::new();
    api_calls.insert(("bind-for-client", "ok"), 2);
    api_calls.insert(("bind-for-client", "invalid-argument"), 1);
    Snapshot {
        status,
        census,
        api_calls,
        events_lost: 0,
        sweeps: 10,
        sweep_seconds: 0.5,
        sweep_errors: 0,
        udp_mappings_ended: 4,
        udp_orphan_ports_freed: 1,
        events_lagged: 0,
    }
}

#[test]
fn names_follow_the_conventions() {
    let text = render(&snapshot());
    for line in [
        "firewall_build_info{version=\"1.2.3\"} 1",
        "firewall_datapath_packets_total{verdict=\"drop\",reason=\"no_flow\"} 5",
        "firewall_datapath_bytes_total{verdict=\"drop\",reason=\"no_flow\"} 300",
        "firewall_datapath_packets_total{verdict=\"redirect\",reason=\"redirected\"} 7",
        "firewall_map_entries{map=\"FLOWS\"} 4",
        "firewall_map_capacity{map=\"FLOWS\"} 1024",
        "firewall_connections{kind=\"bind\",mode=\"kernel\",state=\"established\"} 2",
        "firewall_connections_ended_total{reason=\"tcp_closed\"} 2",
        "firewall_api_requests_total{op=\"bind-for-client\",result=\"invalid-argument\"} 1",
        "firewall_ftp_control_connections_total 3",
        "firewall_ftp_kernel_lines_total 9",
        "firewall_ftp_kernel_line_bytes_total 90",
        "firewall_ftp_kernel_line_connections 6",
        "firewall_ftp_kernel_slots_exhausted_total 8",
        "firewall_sweeper_seconds_total 0.5",
        "firewall_sessions 1",
        "firewall_primary_flows 2",
        "firewall_udp_mappings_ended_total 4",
        "firewall_udp_orphan_ports_freed_total 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing in:\n{text}"
        );
    }
    assert!(text.ends_with("# EOF\n"));
    // Every counter family ends in _total; every sample has a HELP.
    for l in text.lines().filter(|l| l.starts_with("# TYPE")) {
        let mut f = l.split(' ').skip(2);
        let (name, kind) = (f.next().unwrap(), f.next().unwrap());
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
        if kind == "counter" {
            assert!(
                text.contains(&format!("\n{name}_total")),
                "{name}: no _total sample"
            );
        }
    }
}

#[test]
fn api_calls_count_by_op_and_result() {
    let calls = ApiCalls::default();
    calls.record("kill", Ok(()));
    calls.record("kill", Ok(()));
    calls.record("kill", Err(ErrorKind::InvalidArgument));
    let s = calls.snapshot();
    assert_eq!(s[&("kill", "ok")], 2);
    assert_eq!(s[&("kill", "invalid-argument")], 1);
}
