//! Disguised commands against real servers: what the FTP filter forwards,
//! every server reads the way the filter did. vsftpd (which takes lines as
//! they come) and ProFTPD (which removes Telnet commands anywhere in a line),
//! both set to connect to hosts other than the client, so that a PORT the
//! filter let through unchecked would make them connect to a third party.

use std::{process::Stdio, time::Duration};

use firewall_tests::{
    daemon::LabRun,
    ftp::{check, python, sha256, Client, FtpServer},
    lab::addr,
    traffic::{wait_listening, Peer},
};

/// The third party a bounce would reach: a listener on the second external
/// host that prints a line for each connection it gets.
fn third_party(run: &LabRun) -> (Peer, std::path::PathBuf) {
    let log = std::env::temp_dir().join(format!("{}-third", run.lab.prefix));
    let _ = std::fs::remove_file(&log);
    let peer = Peer::new(
        run.lab
            .external2
            .cmd("sh")
            .args([
                "-c",
                &format!(
                    "exec socat -T2 TCP-LISTEN:5001,bind={},reuseaddr,fork SYSTEM:'echo hit >> {}'",
                    addr::EXTERNAL2,
                    log.display()
                ),
            ])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(&run.lab.external2, 5001);
    (peer, log)
}

/// Python: logs in, sends each disguised command, prints the reply, and
/// asks for a listing after each (which would use a PORT the server took).
const DISGUISED: &str = r#"
import socket, sys
s = socket.create_connection(("SERVER", 21), timeout=15)
f = s.makefile("rb")
def reply():
    while True:
        l = f.readline()
        if not l:
            sys.exit("connection closed")
        if l[3:4] == b" ":
            return l
reply()
s.sendall(b"USER anonymous\r\n"); r = reply()
if r.startswith(b"331"):
    s.sendall(b"PASS x@\r\n"); reply()
for cmd in [
    b"PO\xff\xf4RT 10,2,0,3,19,137\r\n",
    b"PORT\xff\xf2 10,2,0,3,19,137\r\n",
    b"  PORT 10,2,0,3,19,137\r\n",
    b"NOOP\rPORT 10,2,0,3,19,137\r\n",
    b"NOOP\0PORT 10,2,0,3,19,137\r\n",
    b"PORT 10,2,0,3,19,137\xff\xff\r\n",
    b"EP\xff\xf1RT |1|10.2.0.3|5001|\r\n",
    b"LPRT 4,4,10,2,0,3,2,19,137\r\n",
    b"PORT 10,2,0,3,19," + b"1" * 5000 + b"\r\n",
]:
    s.sendall(cmd)
    r = reply()
    print(repr(cmd[:24]), "->", r.decode(errors="replace").strip())
    if not r.startswith(b"5"):
        sys.exit("not refused")
    s.sendall(b"LIST\r\n")
    r = reply()
    print("  LIST ->", r.decode(errors="replace").strip())
    if r.startswith(b"150"):
        reply()
s.sendall(b"QUIT\r\n"); reply()
"#;

fn disguised_commands_reach_no_server(run: &LabRun, server: &str) {
    let (_third, log) = third_party(run);
    let out = python(&run.lab.client, &DISGUISED.replace("SERVER", addr::SERVER));
    check(&format!("disguised commands against {server}"), &out);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !log.exists(),
        "{server} connected to the third party: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stats = &run.fw.status()["ftp"];
    assert_eq!(stats["active_opened"], 0, "{stats}");
    assert!(run.fw.list("pinholes").is_empty());
    let _ = std::fs::remove_file(&log);
}

fn a_real_transfer_still_works(run: &LabRun, server: &FtpServer) {
    let file = server.random_file("ok.bin", 1 << 20).unwrap();
    for c in [Client::FtplibActive, Client::CurlPassive] {
        let got = std::env::temp_dir().join(format!("{}-ok", run.lab.prefix));
        check(c.name(), &c.download(&run.lab.client, "ok.bin", &got));
        assert_eq!(sha256(&got), sha256(&file));
        let _ = std::fs::remove_file(&got);
    }
}

#[test]
fn disguised_commands_never_reach_vsftpd() {
    let run = LabRun::start("hardv", &[]);
    let server = FtpServer::start_promiscuous(&run.lab.server, &run.lab.prefix).unwrap();
    disguised_commands_reach_no_server(&run, "vsftpd");
    a_real_transfer_still_works(&run, &server);
}

#[test]
fn disguised_commands_never_reach_proftpd() {
    let run = LabRun::start("hardp", &[]);
    let server = FtpServer::start_proftpd(&run.lab.server, &run.lab.prefix).unwrap();
    disguised_commands_reach_no_server(&run, "ProFTPD");
    a_real_transfer_still_works(&run, &server);
}
