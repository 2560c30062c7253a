//! Reload: a rule changed while an FTP transfer runs. The transfer finishes,
//! the new rule applies to what comes after; a change only a restart applies
//! is refused naming its key, and nothing of it applies; SIGHUP does what
//! `firewall-ctl reload` does.

use std::time::Duration;

use firewall_common::IPPROTO_TCP;
use firewall_tests::{
    daemon::LabRun,
    ftp::{eventually, sha256, FtpServer},
    lab::addr,
    traffic::*,
};

const OPEN: &str = "[wall]\noutbound_from = [\"10.1.0.0/24\"]\n";
/// The client (10.1.0.2) may no longer open connections out, nor use FTP.
const CLOSED: &str = "[wall]\noutbound_from = [\"10.1.0.99/32\"]\n\n\
    [[protocols]]\nname = \"ftp\"\ntransport = \"tcp\"\nports = [21]\nclients = [\"10.1.0.99/32\"]\n";

#[test]
fn a_rule_changed_during_a_transfer_applies_after_it() {
    let (mut run, path) = LabRun::with_config_file("rld", OPEN);
    let LabRun { lab, fw, .. } = &mut run;
    prime_neighbours(lab);
    let got = exchange(lab, IPPROTO_TCP, 5000, 9000, "before");
    assert!(got.ends_with("before\n"), "{got:?}");

    // A 16 MiB passive download at 4 MiB/s: it runs through the reload.
    let server = FtpServer::start(&lab.server, &lab.prefix).unwrap();
    let file = server.random_file("big.bin", 16 << 20).unwrap();
    let dest = std::env::temp_dir().join(format!("{}-big.bin", lab.prefix));
    let mut transfer = Peer::new(
        lab.client
            .spawn(&format!(
                "exec curl -sS --max-time 60 --limit-rate 4M -o {} ftp://{}/big.bin",
                dest.display(),
                addr::SERVER
            ))
            .unwrap(),
    );
    assert!(
        eventually(10, || dest.metadata().map(|m| m.len() > 0).unwrap_or(false)),
        "the transfer did not start"
    );

    // A change only a restart applies: refused, naming the key; nothing applied.
    std::fs::write(&path, format!("{CLOSED}\n[maps]\nflows = 2048\n")).unwrap();
    let (kind, message) = fw.call(&["reload"]).unwrap_err();
    assert_eq!(kind, "invalid-argument");
    assert!(
        message.contains("maps.flows") && message.contains("restart"),
        "{message}"
    );
    let got = exchange(lab, IPPROTO_TCP, 5001, 9001, "still-open");
    assert!(got.ends_with("still-open\n"), "{got:?}");

    // The rule that shuts the client out.
    std::fs::write(&path, CLOSED).unwrap();
    let answer = fw.call(&["reload"]).unwrap();
    assert_eq!(
        answer["changed"],
        serde_json::json!(["protocols", "wall.outbound_from"]),
        "{answer}"
    );
    let out = fw.ctl(&["reload"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "configuration reloaded: nothing changed\n"
    );

    // The transfer in progress finishes, byte for byte.
    let status = transfer.wait().unwrap();
    assert!(status.success(), "curl: {status}");
    assert_eq!(sha256(&dest), sha256(&file));
    let _ = std::fs::remove_file(&dest);

    // What comes after meets the new rules.
    let dropped = fw.counter("drop_not_allowed");
    let _srv = echo_server(&lab.server, IPPROTO_TCP, addr::SERVER, 9002);
    assert!(!tcp_connects(
        &lab.client,
        &format!("{}:9002", addr::SERVER)
    ));
    assert!(fw.counter("drop_not_allowed") > dropped);
    let s = fw.session(addr::CLIENT);
    assert_eq!(
        fw.bind_fails(&s, "10.1.0.2:5001", "tcp", &[]),
        "protocol-denied"
    );

    // SIGHUP reloads the same way.
    std::fs::write(&path, OPEN).unwrap();
    let pid = fw.pid().unwrap();
    lab.fw.sh(&format!("kill -HUP {pid}")).unwrap();
    assert!(
        eventually(10, || tcp_connects(
            &lab.client,
            &format!("{}:9002", addr::SERVER)
        )),
        "SIGHUP did not reopen the wall: {}",
        fw.log_text()
    );
    assert!(fw
        .log_text()
        .contains("reload: applied protocols, wall.outbound_from"));
    std::thread::sleep(Duration::from_millis(100));
    std::fs::remove_file(&path).ok();
}
