//! Many short FTP sessions through the firewall with its default
//! configuration, as an operator's workload would be: sequential and
//! concurrent sessions, a client reusing its port, a control connection
//! closed while its transfer runs, the quota of live connections, no
//! socket left behind by `down`, and the client's session closed between
//! sessions.

use firewall_tests::{
    daemon::LabRun,
    ftp::{check, ftp_stat, python, sha256, FtpServer, IN_PLACE},
    ftp_load::{self, many_sessions_all_succeed, DataMode},
    lab::{addr, Ns},
};

#[test]
fn a_thousand_sequential_and_64_concurrent_sessions_all_succeed() {
    let run = LabRun::start("ftpmany", &[]);
    let server = FtpServer::start(&run.lab.server, &run.lab.prefix).unwrap();
    many_sessions_all_succeed(&run, &server);
}

#[test]
fn a_thousand_sequential_and_64_concurrent_sessions_all_succeed_read_in_place() {
    let run = LabRun::with_config("ftpmanyip", IN_PLACE);
    let server = FtpServer::start(&run.lab.server, &run.lab.prefix).unwrap();
    many_sessions_all_succeed(&run, &server);
    // Nothing intercepted.
    assert_eq!(run.fw.counter("pass_intercepted"), 0);
}

/// Python: a control connection from `port` that lets the server (and so
/// the firewall) close first, as a client that waits for the end of the
/// stream after 221 does; the firewall's leg then waits in TIME_WAIT.
fn session_from_port(port: u16) -> String {
    format!(
        "import socket\n\
         s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{client}', {port})); s.settimeout(10); s.connect(('{server}', 21))\n\
         f=s.makefile('rb'); assert f.readline().startswith(b'220')\n\
         s.sendall(b'QUIT\\r\\n'); assert f.readline().startswith(b'221')\n\
         f.read(); f.close(); s.close()\n",
        client = addr::CLIENT,
        server = addr::SERVER
    )
}

/// A TCP counter of `nstat` in a namespace (absolute value).
fn nstat(ns: &Ns, name: &str) -> u64 {
    ns.sh(&format!("nstat -az {name} | awk '/{name}/ {{print $2}}'"))
        .unwrap()
        .trim()
        .parse()
        .unwrap_or(0)
}

/// The FTP filter remembers each client host's session rather than asking
/// the engine at every control connection; an operator closing that session
/// (which ends what it owns) must not leave the next sessions with the old
/// one: they get a new session and work.
#[test]
fn sessions_go_on_after_the_clients_session_is_closed() {
    let run = LabRun::start("ftpclose", &[]);
    let server = FtpServer::start(&run.lab.server, &run.lab.prefix).unwrap();
    server.random_file("small.bin", 4096).unwrap();
    let some = |n| {
        let out = ftp_load::run(
            &run.lab.client,
            &ftp_load::short_sessions(DataMode::Passive, 1, n),
        )
        .unwrap();
        assert_eq!((out.completed, out.failed), (n, 0), "{:?}", out.errors);
    };
    some(5);
    // `session open` answers the client's existing session: the filter's.
    let first = run.fw.session(addr::CLIENT);
    run.fw.ok(&["session", "close", &first]);
    some(5);
    assert_ne!(run.fw.session(addr::CLIENT), first, "a new session");
    assert_eq!(ftp_stat(&run, "failed_calls"), 0);
}

#[test]
fn a_client_reusing_its_port_connects_at_once_and_down_leaves_no_socket() {
    reusing_a_port(LabRun::start("ftpreuse", &[]), true);
}

#[test]
fn a_client_reusing_its_port_connects_at_once_read_in_place() {
    // The firewall holds no socket at all: the SYN on the old connection's
    // flows starts the new connection.
    reusing_a_port(LabRun::with_config("ftpreuseip", IN_PLACE), false);
}

fn reusing_a_port(mut run: LabRun, proxy: bool) {
    let _server = FtpServer::start(&run.lab.server, &run.lab.prefix).unwrap();
    check(
        "first session",
        &python(&run.lab.client, &session_from_port(41000)),
    );
    let tw = run
        .lab
        .fw
        .sh("ss -Htan state time-wait '( sport = :21 )'")
        .unwrap();
    if proxy {
        // The firewall's leg to the client waits out TIME_WAIT.
        assert!(tw.contains(":41000"), "{tw}");
    } else {
        assert!(tw.trim().is_empty(), "{tw}");
    }
    let (syn_retrans, rsts) = (
        nstat(&run.lab.client, "TcpExtTCPSynRetrans"),
        nstat(&run.lab.client, "TcpOutRsts"),
    );
    // The same 4-tuple again, twice: answered by the listener at once, not
    // by the old socket (whose stale ACK the client would reset, then
    // retransmit its SYN).
    for _ in 0..2 {
        check(
            "port reused",
            &python(&run.lab.client, &session_from_port(41000)),
        );
    }
    assert_eq!(
        (
            nstat(&run.lab.client, "TcpExtTCPSynRetrans") - syn_retrans,
            nstat(&run.lab.client, "TcpOutRsts") - rsts
        ),
        (0, 0),
        "no SYN was retransmitted and no reset sent"
    );

    // `down` removes the sockets that answered for the server: none is left
    // to catch the forwarded packets of the same 4-tuple afterwards.
    assert!(run.fw.down().status.success());
    let left = run
        .lab
        .fw
        .sh(&format!("ss -Htan src {}", addr::SERVER))
        .unwrap();
    assert!(left.trim().is_empty(), "{left}");
    // With plain routing instead of the firewall, the same 4-tuple is
    // forwarded at once.
    run.lab.fw.sh("sysctl -qw net.ipv4.ip_forward=1").unwrap();
    run.lab
        .server
        .sh(&format!(
            "ip route add 10.1.0.0/24 via {}",
            addr::FW_EXTERNAL
        ))
        .unwrap();
    let syn_retrans = nstat(&run.lab.client, "TcpExtTCPSynRetrans");
    let out = python(&run.lab.client, &session_from_port(41000));
    run.lab.server.sh("ip route del 10.1.0.0/24").unwrap();
    run.lab.fw.sh("sysctl -qw net.ipv4.ip_forward=0").unwrap();
    check("forwarded after down", &out);
    assert_eq!(nstat(&run.lab.client, "TcpExtTCPSynRetrans"), syn_retrans);
}

/// Python: RETR `name` through `mode` (True: passive), closing the control
/// connection as soon as the data connection is up; prints the size and
/// SHA-256 of what arrived.
fn retr_closing_control(name: &str, passive: bool) -> String {
    format!(
        "import hashlib\n\
         f=ftplib.FTP('{server}', timeout=60); f.login(); f.set_pasv({passive}); f.voidcmd('TYPE I')\n\
         conn=f.transfercmd('RETR {name}')\n\
         f.file.close(); f.sock.close()\n\
         h=hashlib.sha256(); n=0\n\
         while True:\n\
         \x20   b=conn.recv(1<<20)\n\
         \x20   if not b: break\n\
         \x20   h.update(b); n+=len(b)\n\
         print(n, h.hexdigest())\n",
        server = addr::SERVER,
        passive = if passive { "True" } else { "False" }
    )
}

#[test]
fn a_transfer_outlives_its_control_connection() {
    let run = LabRun::start("ftpoutl", &[]);
    let server = FtpServer::start(&run.lab.server, &run.lab.prefix).unwrap();
    let big = server.random_file("big.bin", 100 << 20).unwrap();
    let small = server.random_file("one.bin", 1 << 20).unwrap();
    for passive in [true, false] {
        let out = python(&run.lab.client, &retr_closing_control("big.bin", passive));
        check("100 MiB after the control connection closed", &out);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{} {}", 100 << 20, sha256(&big)),
            "passive: {passive}"
        );
        // The control connection ends within milliseconds of the data
        // connection's first packet, before its establishment is read.
        for _ in 0..10 {
            let out = python(&run.lab.client, &retr_closing_control("one.bin", passive));
            check("1 MiB, control closed at once", &out);
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                format!("{} {}", 1 << 20, sha256(&small))
            );
        }
    }
    let withdrawn_used = run
        .fw
        .list("connections")
        .iter()
        .filter(|c| c["reason"] == "control connection ended" && c["peer"].is_string())
        .count();
    assert_eq!(
        withdrawn_used, 0,
        "no connection that existed was withdrawn"
    );
}

#[test]
fn a_client_over_its_quota_is_told_425() {
    over_quota(
        &LabRun::with_config("ftpquota", "[policy]\nclient_quota = 2\n"),
        "425",
    );
}

#[test]
fn a_client_over_its_quota_is_told_425_for_pasv_read_in_place() {
    // A refused PORT reaches the server as a command it refuses (the
    // filter writes only in a line's own direction), so the client reads
    // the server's 500 for it.
    over_quota(
        &LabRun::with_config(
            "ftpquotaip",
            &format!("[policy]\nclient_quota = 2\n{IN_PLACE}"),
        ),
        "500",
    );
}

/// A quota of 2 live data connections per client: a third session's PASV
/// is answered 425 and its PORT `port_answer`, until one of the two ends.
fn over_quota(run: &LabRun, port_answer: &str) {
    let server = FtpServer::start(&run.lab.server, &run.lab.prefix).unwrap();
    server.random_file("big.bin", 64 << 20).unwrap();
    let out = python(
        &run.lab.client,
        &format!(
            "import time\n\
             def session():\n\
             \x20   f=ftplib.FTP('{server}', timeout=30); f.login(); f.voidcmd('TYPE I'); return f\n\
             held=[]\n\
             for i in range(2):\n\
             \x20   f=session(); held.append((f, f.transfercmd('RETR big.bin')))\n\
             # The daemon reads the datapath's events every 10 ms.\n\
             time.sleep(0.2)\n\
             third=session()\n\
             try:\n\
             \x20   sys.exit('not refused: ' + third.sendcmd('PASV'))\n\
             except ftplib.error_temp as e:\n\
             \x20   print('refused:', e)\n\
             try:\n\
             \x20   third.sendport('{client}', 40500); sys.exit('PORT not refused')\n\
             except (ftplib.error_temp, ftplib.error_perm) as e:\n\
             \x20   print('refused:', e)\n\
             # One ends: below the quota again, at once.\n\
             f, conn = held.pop(); conn.close(); f.close()\n\
             for i in range(50):\n\
             \x20   try:\n\
             \x20       print('accepted:', third.sendcmd('PASV')); break\n\
             \x20   except ftplib.error_temp:\n\
             \x20       time.sleep(0.1)\n\
             else:\n\
             \x20   sys.exit('still refused')\n\
             third.close()\n",
            server = addr::SERVER,
            client = addr::CLIENT
        ),
    );
    check("quota", &out);
    let text = String::from_utf8_lossy(&out.stdout);
    let refused: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("refused: "))
        .collect();
    assert_eq!(refused.len(), 2, "{text}");
    assert!(
        refused[0].starts_with("refused: 425 Can't open passive"),
        "{text}"
    );
    assert!(
        refused[1].starts_with(&format!("refused: {port_answer}")),
        "{text}"
    );
    assert!(text.contains("quota of 2"), "{text}");
    assert!(text.contains("accepted: 227"), "{text}");
    // Two refusals, and the retries until the end of the held connection was read.
    assert!(ftp_stat(run, "failed_calls") >= 2);
    // Refused at the call: no SYN was dropped in the datapath.
    assert_eq!(run.fw.counter("drop_client_quota"), 0);
}
