//! The FTP filter end to end: control connections proxied (the default;
//! `control = "proxy"` named where the test is about the proxy itself, and
//! read in place too where it is about both, `ftp_in_place.rs` for the
//! rest), real clients (curl, lftp, ftplib) against vsftpd, active and
//! passive, kernel and user mode, and the bounce attempts refused.

use std::{process::Stdio, time::Duration};

use firewall_tests::{
    daemon::LabRun,
    ftp::{
        bounces_refused, check, eventually, every_client, four_clients_download, ftp_stat, python,
        scratch, sha256, Client, FtpServer, IN_PLACE, PROXY,
    },
    lab::addr,
    traffic::{wait_listening, Peer},
};

#[test]
fn every_client_downloads_lists_and_uploads_in_kernel_mode() {
    let run = LabRun::with_config("ftpk", PROXY);
    let server = FtpServer::start(&run.lab.server, &run.lab.prefix).unwrap();
    every_client(&run, &server);
    // Each data connection was opened by its first packet in XDP.
    assert!(run.fw.counter("redirect_pinhole_established") >= 24);
    // Most of each control connection's lines went through the kernel
    // (342 for the 24 connections when measured).
    let in_kernel = run.fw.status()["ftp"]["kernel_lines"].as_u64().unwrap();
    assert!(
        in_kernel >= 100,
        "{in_kernel} lines forwarded in the kernel"
    );
    assert!(run.fw.counter("pass_intercepted") >= 24);
    let modes: Vec<String> = run
        .fw
        .list("connections")
        .iter()
        .map(|c| c["mode"].as_str().unwrap().to_string())
        .collect();
    assert!(modes.iter().all(|m| m == "kernel"), "{modes:?}");
}

#[test]
fn every_client_works_in_user_mode_when_ftp_is_scanned() {
    let run = LabRun::with_config("ftpu", "[scan]\nblock_executables = [\"ftp\"]\n");
    let server = FtpServer::start(&run.lab.server, &run.lab.prefix).unwrap();
    every_client(&run, &server);
    assert_eq!(run.fw.counter("redirect_pinhole_established"), 0);
    let conns = run.fw.list("connections");
    assert!(!conns.is_empty());
    assert!(conns.iter().all(|c| c["mode"] == "user"), "{conns:?}");
    // The scanner sees the data: an executable is stopped, in both directions.
    let exe = server.root.join("setup.exe");
    let mut bytes = b"MZ\x90\x00".to_vec();
    bytes.extend((0..300_000u32).map(|i| i as u8));
    std::fs::write(&exe, &bytes).unwrap();
    for c in [Client::CurlPassive, Client::CurlActive] {
        let got = scratch(&run, "exe");
        let out = c.download(&run.lab.client, "setup.exe", &got);
        let received = std::fs::metadata(&got).map(|m| m.len()).unwrap_or(0);
        assert!(
            !out.status.success() || received < bytes.len() as u64,
            "{}: the executable went through",
            c.name()
        );
    }
    assert!(run.fw.status()["executables_blocked"].as_u64().unwrap() >= 2);
}

#[test]
fn data_connections_can_be_put_in_user_mode_without_a_filter() {
    let run = LabRun::with_config("ftpum", "[ftp]\ndata_connections = \"user\"\n");
    let server = FtpServer::start(&run.lab.server, &run.lab.prefix).unwrap();
    let file = server.random_file("setup.exe", 2 * 1024 * 1024).unwrap();
    std::fs::write(
        &file,
        [b"MZ".as_slice(), &std::fs::read(&file).unwrap()].concat(),
    )
    .unwrap();
    let want = sha256(&file);
    for c in [Client::CurlPassive, Client::CurlActive] {
        let got = scratch(&run, "um");
        check(c.name(), &c.download(&run.lab.client, "setup.exe", &got));
        // No scanner: even an executable goes through, relayed.
        assert_eq!(sha256(&got), want, "{}", c.name());
        let _ = std::fs::remove_file(&got);
    }
    let conns = run.fw.list("connections");
    assert_eq!(conns.len(), 2);
    assert!(conns.iter().all(|c| c["mode"] == "user"), "{conns:?}");
    assert_eq!(run.fw.counter("redirect_pinhole_established"), 0);
}

#[test]
fn big_transfers_are_exact_and_visible_in_the_flow_table() {
    let run = LabRun::start("ftpbig", &[]);
    let server = FtpServer::start(&run.lab.server, &run.lab.prefix).unwrap();
    let size = 256 * 1024 * 1024;
    let file = server.random_file("big.bin", size).unwrap();
    let want = sha256(&file);
    for c in [Client::CurlPassive, Client::CurlActive] {
        let got = scratch(&run, "big");
        let url = format!("ftp://{}/big.bin", addr::SERVER);
        // Slowed down, so the maps can be read while it runs.
        let mut transfer = Peer::new(
            run.lab
                .client
                .cmd("sh")
                .args([
                    "-c",
                    &format!(
                        "curl -sS --limit-rate 64M {} -o '{}' '{url}'",
                        if c.active() { "-P -" } else { "" },
                        got.display()
                    ),
                ])
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Both directions of the data connection are in FLOWS, counting.
        let data_flow = |flows: &[serde_json::Value]| {
            flows
                .iter()
                .filter(|f| f["packets"].as_u64().unwrap_or(0) > 1000)
                .count()
        };
        assert!(
            eventually(30, || data_flow(&run.fw.list("flows")) >= 2),
            "{}: no busy flows: {:?}",
            c.name(),
            run.fw.list("flows")
        );
        let dump = run
            .lab
            .fw
            .sh("bpftool -j map dump pinned /sys/fs/bpf/firewall/FLOWS")
            .unwrap();
        assert!(dump.contains("\"packets\""), "{dump}");
        assert!(transfer.wait().unwrap().success(), "{}", c.name());
        assert_eq!(std::fs::metadata(&got).unwrap().len(), size);
        assert_eq!(sha256(&got), want, "{}", c.name());
        let _ = std::fs::remove_file(&got);
    }
    // And up, at full speed.
    let src = scratch(&run, "up-src");
    std::fs::copy(&file, &src).unwrap();
    check(
        "upload",
        &Client::FtplibActive.upload(&run.lab.client, &src, "big-up.bin"),
    );
    assert_eq!(sha256(&server.uploaded("big-up.bin")), want);
    let _ = std::fs::remove_file(&src);
}

#[test]
fn many_transfers_rest_and_abor_on_one_control_connection() {
    let run = LabRun::start("ftpmany", &[]);
    let server = FtpServer::start(&run.lab.server, &run.lab.prefix).unwrap();
    let file = server.random_file("f.bin", 2 * 1024 * 1024).unwrap();
    let want = std::fs::read(&file).unwrap();
    server.random_file("huge.bin", 64 * 1024 * 1024).unwrap();
    let out = python(
        &run.lab.client,
        &format!(
            "want=open('{file}','rb').read()\n\
             f=ftplib.FTP('{server}', timeout=30); f.login()\n\
             for i in range(10):\n\
             \x20   f.set_pasv(i % 2 == 0)\n\
             \x20   got=bytearray(); f.retrbinary('RETR f.bin', got.extend)\n\
             \x20   assert bytes(got) == want, ('transfer', i, len(got))\n\
             got=bytearray(); f.retrbinary('RETR f.bin', got.extend, rest=1000)\n\
             assert bytes(got) == want[1000:], ('rest', len(got))\n\
             conn=f.transfercmd('RETR huge.bin'); conn.recv(65536)\n\
             try:\n\
             \x20   print('ABOR:', f.abort())\n\
             except ftplib.all_errors as e:\n\
             \x20   print('ABOR:', e)\n\
             conn.close()\n\
             try:\n\
             \x20   print(f.voidresp())\n\
             except ftplib.all_errors as e:\n\
             \x20   print(e)\n\
             got=bytearray(); f.retrbinary('RETR f.bin', got.extend)\n\
             assert bytes(got) == want, 'after ABOR'\n\
             print(f.sendcmd('NOOP')); f.quit()",
            file = file.display(),
            server = addr::SERVER,
        ),
    );
    check("ftplib session", &out);
    // The ABOR reached the busy server (as urgent data) and got an answer.
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("ABOR: "), "{said}");
    assert_eq!(ftp_stat(&run, "control_connections"), 1);
    assert!(ftp_stat(&run, "active_opened") + ftp_stat(&run, "passive_opened") >= 13);
    let _ = want;
}

#[test]
fn bounces_are_refused_and_counted() {
    let run = LabRun::with_config("ftpbnc", PROXY);
    let _server = FtpServer::start(&run.lab.server, &run.lab.prefix).unwrap();
    // Client side: PORT/EPRT naming another internal host, an external third
    // party, or a privileged port. Each answered 5xx by the firewall.
    bounces_refused(&run, "only your own address");
}

#[test]
fn a_server_steering_passive_mode_elsewhere_is_refused() {
    let run = LabRun::start("ftppsv", &[]);
    // A hostile "FTP server": its 227 names another host.
    let _evil = Peer::new(
        run.lab
            .server
            .cmd("python3")
            .args([
                "-c",
                &format!(
                    "import socket\n\
                     s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                     s.bind(('{}', 21)); s.listen(1)\n\
                     c,_=s.accept(); f=c.makefile('rb')\n\
                     c.sendall(b'220 evil\\r\\n')\n\
                     for line in f:\n\
                     \x20   v=line.split()[0].upper()\n\
                     \x20   if v==b'PASV': c.sendall(b'227 Entering Passive Mode (10,2,0,3,0,25).\\r\\n')\n\
                     \x20   elif v==b'EPSV': c.sendall(b'229 Entering Extended Passive Mode (|1|10.2.0.3|25|)\\r\\n')\n\
                     \x20   elif v==b'QUIT': c.sendall(b'221 bye\\r\\n'); break\n\
                     \x20   else: c.sendall(b'230 ok\\r\\n')\n",
                    addr::SERVER
                ),
            ])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(&run.lab.server, 21);
    let out = python(
        &run.lab.client,
        &format!(
            "f=ftplib.FTP('{}', timeout=30); f.login()\n\
             for cmd in ['PASV', 'EPSV']:\n\
             \x20   try:\n\
             \x20       sys.exit('not refused: ' + f.sendcmd(cmd))\n\
             \x20   except ftplib.error_perm as e:\n\
             \x20       print(cmd, '->', e)\n\
             f.quit()",
            addr::SERVER
        ),
    );
    check("passive steering", &out);
    assert_eq!(ftp_stat(&run, "bounces_refused"), 1);
    assert_eq!(ftp_stat(&run, "commands_refused"), 1);
    assert!(run.fw.list("pinholes").is_empty());
}

#[test]
fn unused_pinholes_end_with_the_control_connection() {
    unused_pinholes_end(&LabRun::start("ftpend", &[]));
}

#[test]
fn unused_pinholes_end_with_the_control_connection_read_in_place() {
    // Its end is read from its flows (FIN both ways).
    unused_pinholes_end(&LabRun::with_config("ftpendip", IN_PLACE));
}

fn unused_pinholes_end(run: &LabRun) {
    let _server = FtpServer::start(&run.lab.server, &run.lab.prefix).unwrap();
    let out = python(
        &run.lab.client,
        &format!(
            "import time\n\
             f=ftplib.FTP('{}', timeout=30); f.login()\n\
             print(f.sendcmd('PASV'))\n\
             f.sendport('10.1.0.2', 40123)\n\
             print(open('/dev/stdin').read() if False else 'open')\n\
             f.close()",
            addr::SERVER
        ),
    );
    check("ftplib", &out);
    // Both the passive redirect and the active bind go long before their 60 s TIMEOUT.
    assert!(
        eventually(5, || run.fw.list("pinholes").is_empty()),
        "{:?}",
        run.fw.list("pinholes")
    );
    let reasons: Vec<String> = run
        .fw
        .list("connections")
        .iter()
        .map(|c| c["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        reasons,
        ["control connection ended", "control connection ended"]
    );
}

#[test]
fn only_ftp_to_external_servers_is_intercepted() {
    let run = LabRun::start("ftpscope", &[]);
    let _server = FtpServer::start(&run.lab.server, &run.lab.prefix).unwrap();
    // The firewall's own address: not a connection through it (nothing listens: refused).
    let own = run.lab.client.try_sh(&format!(
        "curl -sS --connect-timeout 3 ftp://{}/",
        addr::FW_INTERNAL
    ));
    assert!(!own);
    // Another port: left to the stack (which forwards it untranslated; the
    // server has no route back, so it fails).
    let other = run.lab.client.try_sh(&format!(
        "curl -sS --connect-timeout 3 ftp://{}:2121/",
        addr::SERVER
    ));
    assert!(!other);
    assert_eq!(ftp_stat(&run, "control_connections"), 0);
    assert_eq!(run.fw.counter("pass_intercepted"), 0);
}

#[test]
fn with_the_ftp_filter_off_nothing_is_intercepted() {
    let run = LabRun::with_config("ftpoff", "[ftp]\nenabled = false\n");
    let _server = FtpServer::start(&run.lab.server, &run.lab.prefix).unwrap();
    // Without the filter FTP is one more outbound TCP connection: the wall
    // translates it (and the passive data connection, outbound too), nothing
    // is intercepted, and no pinhole is opened.
    let reached = run.lab.client.try_sh(&format!(
        "curl -sS --connect-timeout 3 ftp://{}/",
        addr::SERVER
    ));
    assert!(reached, "passive FTP through the NAT alone");
    assert_eq!(run.fw.counter("pass_intercepted"), 0);
    let primary = run
        .fw
        .list("flows")
        .iter()
        .filter(|f| f["kind"] == "primary")
        .count();
    assert!(
        primary >= 4,
        "control and data connection, both directions: {primary}"
    );
    assert!(run.fw.list("pinholes").is_empty());
    let text = run.fw.ctl(&["status"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("ftp filter: off"));
    // No policy routing left behind either.
    let rules = run.lab.fw.sh("ip rule").unwrap();
    assert!(!rules.contains("18007"), "{rules}");
}

#[test]
fn the_config_chooses_the_ftp_ports() {
    let run = LabRun::with_config("ftpport", "[ftp]\nports = [2121]\n");
    let server = FtpServer::start_on(&run.lab.server, &run.lab.prefix, 2121).unwrap();
    let file = server.random_file("p.bin", 1024 * 1024).unwrap();
    for flags in ["", "-P -"] {
        let got = scratch(&run, "port");
        let out = run
            .lab
            .client
            .cmd("sh")
            .args([
                "-c",
                &format!(
                    "curl -sS --connect-timeout 5 {flags} -o '{}' ftp://{}:2121/p.bin",
                    got.display(),
                    addr::SERVER
                ),
            ])
            .output()
            .unwrap();
        check(&format!("curl {flags} on port 2121"), &out);
        assert_eq!(sha256(&got), sha256(&file));
        let _ = std::fs::remove_file(&got);
    }
    assert_eq!(ftp_stat(&run, "control_connections"), 2);
    assert_eq!(run.fw.status()["ftp_ports"], serde_json::json!([2121]));
}

#[test]
fn down_removes_the_policy_routing() {
    let mut run = LabRun::start("ftpdown", &[]);
    let rules = run.lab.fw.sh("ip rule; ip route show table 18007").unwrap();
    assert!(
        rules.contains("lookup 18007") && rules.contains("local default"),
        "{rules}"
    );
    run.fw.crash();
    std::thread::sleep(Duration::from_millis(200));
    let out = run.fw.down();
    assert!(out.status.success());
    let rules = run.lab.fw.sh("ip rule; ip route show table 18007").unwrap();
    assert!(
        !rules.contains("18007") && !rules.contains("local default"),
        "{rules}"
    );
}

#[test]
fn the_tc_datapath_carries_ftp_too() {
    // `--xdp-mode tc`: the same pipeline at tcx ingress (GSO kept on veth).
    let run = LabRun::with_config_and_args("ftptc", PROXY, &["--xdp-mode", "tc"]);
    let server = FtpServer::start(&run.lab.server, &run.lab.prefix).unwrap();
    let file = server.random_file("tc.bin", 64 * 1024 * 1024 + 5).unwrap();
    four_clients_download(&run, &file, "tc.bin");
    let want = sha256(&file);
    check(
        "upload",
        &Client::CurlActive.upload(&run.lab.client, &file, "tc-up.bin"),
    );
    assert_eq!(sha256(&server.uploaded("tc-up.bin")), want);
    assert!(run.fw.counter("redirect_pinhole_established") >= 5);
    assert!(run.fw.counter("pass_intercepted") >= 5);
    // Two forwarding links and the interception's, all tcx (link type 11); no XDP.
    let links = run.lab.fw.sh("bpftool -j link show").unwrap();
    assert_eq!(links.matches("\"type\":11").count(), 3, "{links}");
    assert!(!run.lab.fw.sh("ip link show vfi").unwrap().contains("xdp"));
    assert!(run.fw.status()["interfaces"][0]["xdp_program"] == "tc_forward_internal");
}
