//! The daemon as an operator runs it: Prometheus scrapes /metrics and reads
//! what the traffic did; systemd hears READY and STOPPING.

use std::collections::BTreeMap;

use firewall_common::IPPROTO_TCP;
use firewall_tests::{
    daemon::{Firewall, LabRun},
    lab::{addr, Lab},
    notify::ServiceManager,
    traffic::*,
};

const METRICS: &str = "127.0.0.1:9469";

/// Python's reference parser of the OpenMetrics text format (the one
/// Prometheus' own client library ships): each sample as a JSON line.
const PARSER: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        print(json.dumps({"name": s.name, "labels": s.labels, "value": s.value, "type": family.type}))
"#;

type Samples = BTreeMap<String, f64>;

/// Scrapes /metrics in the firewall's namespace; samples by
/// `name{label="value",...}` (labels sorted).
fn scrape(lab: &Lab) -> Samples {
    let script = std::env::temp_dir().join(format!("{}-parse.py", lab.prefix));
    std::fs::write(&script, PARSER).unwrap();
    let out = lab
        .fw
        .sh(&format!(
            "curl -sSf --max-time 10 -o {page} http://{METRICS}/metrics && /usr/bin/python3 {} < {page}",
            script.display(),
            page = script.with_extension("txt").display()
        ))
        .unwrap_or_else(|e| {
            panic!("scrape or parse failed (python3-prometheus-client is a test prerequisite): {e:#}")
        });
    std::fs::remove_file(&script).ok();
    std::fs::remove_file(script.with_extension("txt")).ok();
    out.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let mut labels: Vec<String> = v["labels"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
                .collect();
            labels.sort();
            let key = format!("{}{{{}}}", v["name"].as_str().unwrap(), labels.join(","));
            (key, v["value"].as_f64().unwrap())
        })
        .collect()
}

fn get(s: &Samples, key: &str) -> f64 {
    s.get(key).copied().unwrap_or(0.0)
}

#[test]
fn prometheus_reads_what_the_traffic_did() {
    let mut run = LabRun::with_config("opmet", &format!("[metrics]\nlisten = \"{METRICS}\"\n"));
    let LabRun { lab, fw, .. } = &mut run;
    prime_neighbours(lab);
    let before = scrape(lab);
    assert_eq!(
        get(&before, "firewall_build_info{version=0.1.0}"),
        1.0,
        "{before:?}"
    );

    // Three connections out, tracked and translated; one attempt in, dropped.
    for port in [9000, 9001, 9002] {
        let got = exchange(lab, IPPROTO_TCP, 45000 + port - 9000, port, "hi");
        assert!(got.ends_with("hi\n"), "{got:?}");
    }
    lab.server
        .sh(&format!(
            "ip route add 10.1.0.0/24 via {}",
            addr::FW_EXTERNAL
        ))
        .unwrap();
    assert!(!tcp_connects(
        &lab.server,
        &format!("{}:8080", addr::CLIENT)
    ));
    // API calls: a bind that works, one the policy refuses.
    let s = fw.session(addr::CLIENT);
    fw.bind_ok(&s, "10.1.0.2:5001", "tcp", &[]);
    // A client that is not the session's.
    let refused = fw.bind_fails(&s, "10.1.0.9:5002", "tcp", &[]);

    let after = scrape(lab);
    let delta = |k: &str| get(&after, k) - get(&before, k);
    assert!(
        delta("firewall_datapath_packets_total{reason=primary_established,verdict=redirect}")
            >= 3.0,
        "{after:?}"
    );
    assert!(delta("firewall_datapath_packets_total{reason=redirected,verdict=redirect}") >= 6.0);
    assert!(
        delta("firewall_datapath_bytes_total{reason=redirected,verdict=redirect}") >= 6.0 * 40.0
    );
    assert!(delta("firewall_datapath_packets_total{reason=no_flow,verdict=drop}") >= 1.0);
    assert_eq!(
        delta("firewall_api_requests_total{op=bind-for-client,result=ok}"),
        1.0
    );
    assert_eq!(
        delta(&format!(
            "firewall_api_requests_total{{op=bind-for-client,result={refused}}}"
        )),
        1.0
    );
    assert_eq!(
        delta("firewall_api_requests_total{op=session-open,result=ok}"),
        1.0
    );
    assert_eq!(get(&after, "firewall_sessions{}"), 1.0);
    assert_eq!(
        get(
            &after,
            "firewall_connections{kind=bind,mode=kernel,state=listening}"
        ),
        1.0
    );
    assert!(get(&after, "firewall_map_entries{map=FLOWS}") >= 6.0);
    assert!(get(&after, "firewall_map_capacity{map=FLOWS}") >= 1024.0);
    assert!(get(&after, "firewall_map_entries{map=PINHOLES}") >= 1.0);
    assert!(get(&after, "firewall_primary_flows{}") >= 6.0);
    assert!(delta("firewall_sweeper_runs_total{}") >= 1.0);
    assert_eq!(get(&after, "firewall_datapath_events_lost_total{}"), 0.0);

    // Anything but GET /metrics is refused plainly.
    let code = |request: &str| {
        lab.fw
            .sh(&format!(
                "curl -s -o /dev/null -w '%{{http_code}}' {request}"
            ))
            .unwrap()
    };
    assert_eq!(code(&format!("http://{METRICS}/")), "404");
    assert_eq!(code(&format!("-X POST http://{METRICS}/metrics")), "405");
}

#[test]
fn a_taken_metrics_address_fails_up_naming_the_key() {
    firewall_tests::require_root();
    let _turn = firewall_tests::exclusive();
    let lab = Lab::create(&firewall_tests::lab::unique_prefix("opmtk")).unwrap();
    let _squatter = Peer::new(
        lab.fw
            .spawn("exec socat TCP-LISTEN:9469,bind=127.0.0.1,reuseaddr,fork -")
            .unwrap(),
    );
    wait_listening(&lab.fw, 9469);
    let config = std::env::temp_dir().join(format!("{}-metrics.toml", lab.prefix));
    std::fs::write(&config, format!("[metrics]\nlisten = \"{METRICS}\"\n")).unwrap();
    let err = match Firewall::up(&lab, &["--config", config.to_str().unwrap()]) {
        Ok(_) => panic!("up succeeded on a taken address"),
        Err(e) => format!("{e:#}"),
    };
    std::fs::remove_file(&config).ok();
    assert!(err.contains("metrics.listen"), "{err}");
    assert!(err.contains("invalid-argument"), "{err}");
    // Nothing was attached.
    assert!(!std::path::Path::new("/sys/fs/bpf/firewall/FLOWS").exists());
}

#[test]
fn logs_are_structured_records_with_spans() {
    firewall_tests::require_root();
    let _turn = firewall_tests::exclusive();
    let lab = Lab::create(&firewall_tests::lab::unique_prefix("oplog")).unwrap();
    let fw = Firewall::up_with_env(
        &lab,
        &["--log-format", "json"],
        &[(
            "RUST_LOG",
            "info,firewall::events=debug,firewall_core=debug",
        )],
    )
    .unwrap();
    prime_neighbours(&lab);
    let server = firewall_tests::ftp::FtpServer::start(&lab.server, &lab.prefix).unwrap();
    server.random_file("log.bin", 100_000).unwrap();
    let got = std::env::temp_dir().join(format!("{}-log.bin", lab.prefix));
    for c in [
        firewall_tests::ftp::Client::CurlPassive,
        firewall_tests::ftp::Client::CurlActive,
    ] {
        firewall_tests::ftp::check(c.name(), &c.download(&lab.client, "log.bin", &got));
    }
    std::fs::remove_file(&got).ok();
    // Their data connections end now rather than after the closing timeout.
    for c in fw.list("connections") {
        if c["state"] == "terminated" {
            continue;
        }
        let verb = if c["kind"] == "redirect" {
            "cancel"
        } else {
            "kill"
        };
        let out = fw.ctl(&[verb, &c["id"].to_string()]);
        assert!(out.status.success(), "{out:?}");
    }
    // The control connection's end, inside its span (read in place, the
    // daemon learns of it from its flows within seconds).
    let is_ftp_end = |r: &serde_json::Value| {
        r["span"]["name"] == "ftp"
            && r["message"]
                .as_str()
                .is_some_and(|m| m.contains("closed after"))
    };
    let parse = |text: &str| -> Vec<serde_json::Value> {
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    };
    firewall_tests::ftp::eventually(10, || parse(&fw.log_text()).iter().any(is_ftp_end));
    let text = fw.log_text();
    let records = parse(&text);
    let client = addr::CLIENT;
    let ftp_end = records.iter().find(|r| is_ftp_end(r));
    let ftp_end = ftp_end.unwrap_or_else(|| panic!("no record in an ftp span: {text}"));
    assert!(
        ftp_end["span"]["client"]
            .as_str()
            .unwrap()
            .starts_with(client),
        "{ftp_end}"
    );
    assert_eq!(ftp_end["span"]["server"], format!("{}:21", addr::SERVER));
    // The events stream, a record per event with its fields.
    let ended: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["target"] == "firewall::events" && r["event"] == "terminating")
        .collect();
    assert!(ended.len() >= 2, "{text}");
    assert!(ended
        .iter()
        .all(|r| r["connection"].as_u64().is_some() && r["reason"].is_string()));
    // What the engine says about a connection object carries its span.
    assert!(
        records.iter().any(|r| r["spans"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["name"] == "conn" && s["id"].is_u64()))),
        "no record in a conn span: {text}"
    );
}

#[test]
fn systemd_hears_ready_and_stopping() {
    firewall_tests::require_root();
    let _turn = firewall_tests::exclusive();
    let lab = Lab::create(&firewall_tests::lab::unique_prefix("opsd")).unwrap();
    let mut sm = ServiceManager::new(&lab.prefix);
    let mut fw = Firewall::up_with_env(
        &lab,
        &[],
        &[
            ("NOTIFY_SOCKET", sm.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "2000000"),
        ],
    )
    .unwrap();
    let seen = sm.until("READY=1", 30, &fw.log);
    assert!(seen.contains("STATUS=up: internal"), "{seen:?}");
    // The watchdog is petted while the engine answers (half of 2 s).
    sm.until("WATCHDOG=1", 30, &fw.log);
    let out = fw.down();
    assert!(out.status.success());
    sm.until("STOPPING=1", 30, &fw.log);
}
