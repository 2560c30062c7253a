//! A published FTP server: vsftpd inside, reached from outside at the
//! firewall's external address through the FTP filter in its published role
//! (a full proxy: vsftpd sees the firewall's internal address and checks
//! every data connection against it), passive and active, with curl.

use firewall_tests::{
    daemon::LabRun,
    ftp::{sha256, FtpServer},
    lab::addr,
    traffic::*,
};

#[test]
fn a_published_ftp_server_serves_passive_and_active_clients() {
    let mut run = LabRun::with_config(
        "pubftp",
        &format!(
            "[[publish]]\ntransport = \"tcp\"\nport = 21\nserver = \"{}:21\"\n",
            addr::CLIENT
        ),
    );
    let LabRun { lab, fw, .. } = &mut run;
    prime_neighbours(lab);
    let server = FtpServer::start_inside(&lab.client, &lab.prefix).unwrap();
    let file = server.random_file("pub.bin", 1 << 20).unwrap();
    let want = sha256(&file);
    for (mode, args) in [
        ("EPSV", ""),
        ("PASV", "--disable-epsv"),
        ("EPRT", "--ftp-port -"),
        ("PORT", "--ftp-port - --disable-eprt"),
    ] {
        let dest = std::env::temp_dir().join(format!("{}-pub-{mode}.bin", lab.prefix));
        lab.server
            .sh(&format!(
                "curl -sS --max-time 20 {args} -o {} ftp://{}/pub.bin",
                dest.display(),
                addr::FW_EXTERNAL
            ))
            .unwrap_or_else(|e| panic!("{mode}: {e:#}"));
        assert_eq!(sha256(&dest), want, "{mode}");
        std::fs::remove_file(&dest).ok();
    }
    let ftp = &fw.status()["ftp"];
    assert_eq!(ftp["control_connections"], 4, "{ftp}");
    assert_eq!(ftp["passive_opened"], 2, "{ftp}");
    assert_eq!(ftp["active_opened"], 2, "{ftp}");
    let wall = &fw.status()["wall"];
    assert_eq!(
        wall["published"][0],
        format!("tcp 21 -> {}:21 (FTP filter)", addr::CLIENT),
        "{wall}"
    );
    // An uploaded file arrives whole too (passive).
    let up = std::env::temp_dir().join(format!("{}-pub-up.bin", lab.prefix));
    std::fs::copy(&file, &up).unwrap();
    lab.server
        .sh(&format!(
            "curl -sS --max-time 20 -T {} ftp://{}/incoming/up.bin",
            up.display(),
            addr::FW_EXTERNAL
        ))
        .unwrap();
    assert_eq!(sha256(&server.uploaded("up.bin")), want);
    std::fs::remove_file(&up).ok();
}

/// A TCP connection from `from` (address, port) to `to`, held open for a
/// few seconds by a process in `ns`.
fn hold(ns: &firewall_tests::lab::Ns, from: (&str, u16), to: (&str, u16)) -> Peer {
    Peer::new(
        ns.spawn(&format!(
            "exec python3 -c \"import socket, time; s = socket.create_connection(('{}', {}), 5, ('{}', {})); time.sleep(20)\"",
            to.0, to.1, from.0, from.1
        ))
        .unwrap(),
    )
}

/// GetConnectionFlags: a control connection to a published FTP server is in
/// full proxy mode (the server sees the firewall's internal address), a
/// published server's connection forwarded in the kernel and an outbound
/// connection are not; a connection the firewall does not carry is an error.
#[test]
fn connection_flags_tell_full_proxy_mode() {
    let mut run = LabRun::with_config(
        "pubflg",
        &format!(
            "[[publish]]\ntransport = \"tcp\"\nport = 21\nserver = \"{0}:21\"\n\
             [[publish]]\ntransport = \"tcp\"\nport = 8080\nserver = \"{0}:8000\"\n",
            addr::CLIENT
        ),
    );
    let LabRun { lab, fw, .. } = &mut run;
    prime_neighbours(lab);
    let _ftp = FtpServer::start_inside(&lab.client, &lab.prefix).unwrap();
    let _http = HttpServer::start(&lab.client, addr::CLIENT, "inside\n");
    let _outside = Peer::new(
        lab.server
            .spawn("exec socat TCP-LISTEN:9000,reuseaddr,fork SYSTEM:'sleep 20'")
            .unwrap(),
    );
    wait_listening(&lab.server, 9000);

    let _a = hold(&lab.server, (addr::SERVER, 40021), (addr::FW_EXTERNAL, 21));
    let _b = hold(
        &lab.server,
        (addr::SERVER, 40080),
        (addr::FW_EXTERNAL, 8080),
    );
    let _c = hold(&lab.client, (addr::CLIENT, 45001), (addr::SERVER, 9000));
    let flags = |client: &str, server: &str| {
        fw.call(&[
            "connection-flags",
            "--protocol",
            "tcp",
            "--client",
            client,
            "--server",
            server,
        ])
    };
    let wait = |client: String, server: String| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match flags(&client, &server) {
                Ok(v) => return v,
                Err(e) if std::time::Instant::now() > deadline => {
                    panic!("{client} -> {server}: {e:?}")
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
            }
        }
    };
    let proxy = wait(
        format!("{}:40021", addr::SERVER),
        format!("{}:21", addr::FW_EXTERNAL),
    );
    assert_eq!(proxy["kind"], "published-proxy", "{proxy}");
    assert_eq!(proxy["flags"][0], "internal-address-translation", "{proxy}");
    let published = wait(
        format!("{}:40080", addr::SERVER),
        format!("{}:8080", addr::FW_EXTERNAL),
    );
    assert_eq!(published["kind"], "published", "{published}");
    assert_eq!(published["flags"].as_array().unwrap().len(), 0);
    let outbound = wait(
        format!("{}:45001", addr::CLIENT),
        format!("{}:9000", addr::SERVER),
    );
    assert_eq!(outbound["kind"], "outbound", "{outbound}");

    let (kind, message) = flags(
        &format!("{}:40999", addr::SERVER),
        &format!("{}:21", addr::FW_EXTERNAL),
    )
    .unwrap_err();
    assert_eq!(kind, "invalid-argument");
    assert!(message.contains("no primary connection"), "{message}");
    // The CLI's text.
    let out = fw.ctl(&[
        "connection-flags",
        "--protocol",
        "tcp",
        "--client",
        &format!("{}:40021", addr::SERVER),
        "--server",
        &format!("{}:21", addr::FW_EXTERNAL),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("published-proxy; flags: internal-address-translation"),
        "{text}"
    );
}
