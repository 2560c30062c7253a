//! TFTP through the firewall with real peers: tftpd-hpa in the server's
//! namespace, tftp-hpa and curl as clients inside. A TFTP server answers
//! from a transfer port of its own; the TFTP helper lets exactly that
//! answer in (`tftp_fixtures.rs` has the packets it refuses).

use std::{
    fs,
    path::{Path, PathBuf},
};

use firewall_tests::{
    daemon::LabRun,
    ftp::{eventually, sha256},
    lab::{addr, Ns},
    tftp::TftpServer,
    traffic::prime_neighbours,
};

/// tftp-hpa's `get` or `put` from the client, at most `secs` seconds.
fn tftp(client: &Ns, secs: u32, command: &str) -> bool {
    client.try_sh(&format!(
        "timeout {secs} tftp -m binary {} -c {command}",
        addr::SERVER
    ))
}

fn local(tag: &str, name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("{tag}-{name}"));
    let _ = fs::remove_file(&p);
    p
}

fn same(a: &Path, b: &Path) -> bool {
    b.exists() && sha256(a) == sha256(b)
}

#[test]
fn files_go_both_ways_through_the_tftp_helper() {
    both_ways("tftp", &[]);
}

#[test]
fn files_go_both_ways_through_the_tftp_helper_at_tc() {
    both_ways("tftptc", &["--xdp-mode", "tc"]);
}

fn both_ways(tag: &str, mode: &[&str]) {
    let run = LabRun::start(tag, mode);
    prime_neighbours(&run.lab);
    let tag = &run.lab.prefix;
    let server = TftpServer::start(&run.lab.server, tag).unwrap();
    // Many blocks of 512 bytes, each answered by the client.
    let file = server.random_file("f.bin", 200_000).unwrap();

    let got = local(tag, "got.bin");
    assert!(tftp(
        &run.lab.client,
        20,
        &format!("get f.bin {}", got.display())
    ));
    assert!(same(&file, &got), "tftp get");

    let up = local(tag, "up.bin");
    fs::copy(&file, &up).unwrap();
    assert!(tftp(
        &run.lab.client,
        20,
        &format!("put {} up.bin", up.display())
    ));
    assert!(
        eventually(5, || same(&up, &server.dir.join("up.bin"))),
        "tftp put"
    );

    let curled = local(tag, "curl.bin");
    assert!(run.lab.client.try_sh(&format!(
        "curl -s --max-time 20 -o {} tftp://{}/f.bin",
        curled.display(),
        addr::SERVER
    )));
    assert!(same(&file, &curled), "curl tftp://");

    // Each transfer's first answer came in through the helper.
    assert_eq!(run.fw.counter("redirect_tftp_established"), 3);
    let text = String::from_utf8_lossy(&run.fw.ctl(&["status"]).stdout).into_owned();
    assert!(
        text.contains("tftp helper: udp port 69: 3 transfers let in"),
        "{text}"
    );
    assert_eq!(run.fw.status()["tftp_ports"], serde_json::json!([69]));
    // The transfers are tracked like any connection: from a server port
    // other than 69, kind primary.
    let server = addr::SERVER.to_string();
    let transfers = run
        .fw
        .list("flows")
        .into_iter()
        .filter(|f| {
            f["protocol"] == "udp"
                && f["kind"] == "primary"
                && f["from"]
                    .as_str()
                    .is_some_and(|a| a.starts_with(&server) && !a.ends_with(":69"))
        })
        .count();
    assert!(transfers >= 3, "{transfers} transfers' flows listed");
    for f in [got, up, curled] {
        let _ = fs::remove_file(f);
    }
}

#[test]
fn turned_off_no_answer_gets_in_and_a_reload_turns_it_on() {
    let (run, path) = LabRun::with_config_file("tftpoff", "[tftp]\nports = []\n");
    prime_neighbours(&run.lab);
    let tag = &run.lab.prefix;
    let server = TftpServer::start(&run.lab.server, tag).unwrap();
    let file = server.random_file("f.bin", 3000).unwrap();
    let got = local(tag, "off.bin");
    assert!(!tftp(
        &run.lab.client,
        4,
        &format!("get f.bin {}", got.display())
    ));
    assert!(!same(&file, &got));
    assert_eq!(run.fw.counter("redirect_tftp_established"), 0);
    let text = String::from_utf8_lossy(&run.fw.ctl(&["status"]).stdout).into_owned();
    assert!(text.contains("tftp helper: off"), "{text}");

    fs::write(&path, "[tftp]\nports = [69]\n").unwrap();
    let answer = run.fw.call(&["reload"]).unwrap();
    assert_eq!(
        answer["changed"],
        serde_json::json!(["tftp.ports"]),
        "{answer}"
    );
    assert!(tftp(
        &run.lab.client,
        20,
        &format!("get f.bin {}", got.display())
    ));
    assert!(same(&file, &got));
    assert_eq!(run.fw.counter("redirect_tftp_established"), 1);
    let _ = fs::remove_file(&got);
    let _ = fs::remove_file(&path);
}
