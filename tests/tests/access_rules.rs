//! Access rules with the real daemon and real programs: only what a rule
//! allows goes out, the FTP filter sees only FTP a rule lets out, a reload
//! changes the rules, and `status` lists them.

use firewall_common::IPPROTO_UDP;
use firewall_tests::{daemon::LabRun, ftp::FtpServer, lab::addr, traffic::*};

const WEB_AND_PING: &str = r#"
[[rule]]
name = "web"
action = "allow"
protocol = "tcp"
ports = ["8000"]

[[rule]]
action = "allow"
protocol = "icmp"
"#;

const FTP: &str = r#"
[[rule]]
name = "ftp"
action = "allow"
protocol = "tcp"
ports = ["21"]
"#;

#[test]
fn only_what_a_rule_allows_goes_out() {
    let (mut run, path) = LabRun::with_config_file("rules", WEB_AND_PING);
    let LabRun { lab, fw, .. } = &mut run;
    prime_neighbours(lab);

    let _http = HttpServer::start(&lab.server, addr::SERVER, "allowed\n");
    let body = http_get(&lab.client, addr::SERVER, 8000);
    assert_eq!(body, "allowed\n");
    lab.client
        .sh(&format!("ping -c1 -W2 {}", addr::SERVER))
        .expect("ping: an icmp rule allows it");

    let _tcp = echo_server(
        &lab.server,
        firewall_common::IPPROTO_TCP,
        addr::SERVER,
        9000,
    );
    assert!(
        !tcp_connects(&lab.client, &format!("{}:9000", addr::SERVER)),
        "TCP to a port no rule allows got out"
    );
    let _udp = echo_server(&lab.server, IPPROTO_UDP, addr::SERVER, 9001);
    let got = send(
        &lab.client,
        IPPROTO_UDP,
        (addr::CLIENT, 5001),
        (addr::SERVER, 9001),
        "denied",
    );
    assert_eq!(got, "", "UDP no rule allows got an answer");

    // FTP: no rule lets it out, so the filter never sees it.
    let server = FtpServer::start(&lab.server, &lab.prefix).unwrap();
    server.random_file("f.bin", 4096).unwrap();
    let ftp = format!(
        "curl -sS --max-time 4 -o /dev/null ftp://{}/f.bin",
        addr::SERVER
    );
    assert!(!lab.client.try_sh(&ftp), "FTP got out without a rule");
    let drops = fw.counter("drop_rule");
    assert!(
        drops >= 3,
        "TCP, UDP and FTP SYNs dropped by the rules: {drops}"
    );
    assert_eq!(
        fw.status()["ftp"]["control_connections"]
            .as_u64()
            .unwrap_or(0),
        0
    );

    // A reload adds FTP; the filter then handles it (passive, in the kernel).
    std::fs::write(&path, format!("{WEB_AND_PING}{FTP}")).unwrap();
    let answer = fw.call(&["reload"]).unwrap();
    assert!(
        answer.to_string().contains("rule"),
        "the reload applied the rules: {answer}"
    );
    lab.client.sh(&ftp).expect("FTP after the reload");
    assert!(
        fw.status()["ftp"]["control_connections"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    );

    let text = String::from_utf8_lossy(&fw.ctl(&["status"]).stdout).into_owned();
    assert!(
        text.contains("rule 1: allow tcp from 10.1.0.0/24 to any ports 8000 (web)")
            && text.contains("rule 3: allow tcp from 10.1.0.0/24 to any ports 21 (ftp)"),
        "{text}"
    );
    std::fs::remove_file(&path).ok();
}
