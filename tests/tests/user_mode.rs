//! Lab tests of the user-mode relay (NO_KERNEL_MODE): the daemon terminates
//! the secondary connection on real sockets and pumps the bytes; such
//! connections never enter the flow table.

use std::{thread, time::Duration};

use firewall_common::{IPPROTO_TCP, IPPROTO_UDP};
use firewall_tests::{
    daemon::LabRun,
    lab::addr,
    traffic::{echo_server, port_of, prime_neighbours, send, tcp_connects, wait_listening},
};
use serde_json::Value;

fn run(tag: &str) -> LabRun {
    LabRun::fast(tag)
}

/// Whether a message sent from `ns` to `to` comes back echoed (user-mode
/// refusals accept, then reset: only data tells them apart).
fn echoed(ns: &firewall_tests::lab::Ns, to: &str) -> bool {
    ns.cmd("sh")
        .args([
            "-c",
            &format!("printf through | socat -T2 - TCP:{to},connect-timeout=2"),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("through"))
        .unwrap_or(false)
}

fn s(v: &Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

/// A Python one-off in a namespace (the peers' behaviour needs more control than socat gives).
fn py(ns: &firewall_tests::lab::Ns, code: &str) -> std::process::Child {
    ns.cmd("python3")
        .args(["-c", code])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3")
}

fn output(c: std::process::Child) -> String {
    let o = c.wait_with_output().expect("python3");
    assert!(
        o.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn no_kernel_mode_relays_large_transfers_both_ways_outside_the_flow_table() {
    // Byte for byte both ways, never in the flow table.
    let r = run("umbig");
    let sess = r.fw.session(addr::CLIENT);
    let events = r.fw.follow_events(60);
    let b = r.fw.bind_ok(
        &sess,
        "10.1.0.2:5001",
        "tcp",
        &["--flags", "no-kernel-mode", "--notify"],
    );
    let (proxy, id) = (s(&b["proxy_address"]), b["connections"][0]["id"].clone());
    let conn =
        r.fw.list("connections")
            .into_iter()
            .find(|c| c["id"] == id)
            .unwrap();
    assert_eq!(conn["mode"], "user");

    // The client echoes back what it gets (sha256 of both directions compared).
    let dir = std::env::temp_dir().join(format!("{}-big", r.lab.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let (src, got_client, got_server) = (dir.join("src"), dir.join("client"), dir.join("server"));
    let data: Vec<u8> = (0..24 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 9) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    // Client: receive everything, then send it back and close.
    let client = py(&r.lab.client, &format!(
        "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('{c}', 5001)); s.listen(1)\n\
         c,a=s.accept(); print(a[0]); b=bytearray()\n\
         while True:\n  d=c.recv(1<<16)\n  if not d: break\n  b+=d\n\
         open('{out}','wb').write(b); c.sendall(b); c.close()",
        c = addr::CLIENT, out = got_client.display()));
    wait_listening(&r.lab.client, 5001);
    // Server: send, half-close, read the answer.
    let server = py(&r.lab.server, &format!(
        "import socket\ns=socket.create_connection(('{ip}', {port})); s.sendall(open('{src}','rb').read()); s.shutdown(socket.SHUT_WR)\n\
         b=bytearray()\nwhile True:\n  d=s.recv(1<<16)\n  if not d: break\n  b+=d\nopen('{out}','wb').write(b)",
        ip = addr::FW_EXTERNAL, port = port_of(&proxy), src = src.display(), out = got_server.display()));
    let seen_from = output(client);
    output(server);
    assert!(
        std::fs::read(&got_client).unwrap() == data,
        "server → client byte for byte"
    );
    assert!(
        std::fs::read(&got_server).unwrap() == data,
        "client → server byte for byte (after a half-close)"
    );
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(
        seen_from.trim(),
        addr::FW_INTERNAL,
        "the relay connects from the firewall's internal address"
    );

    assert!(
        r.fw.list("flows").is_empty(),
        "a user-mode connection never enters the flow table"
    );
    assert!(r.fw.list("pinholes").is_empty());
    let e = events.wait_for("established", |e| e["event"] == "established");
    assert_eq!(e["connection"], id);
    let t = events.wait_for("terminating", |e| {
        e["event"] == "terminating" && e["connection"] == id
    });
    assert_eq!(t["reason"], "closed");
    let conn =
        r.fw.list("connections")
            .into_iter()
            .find(|c| c["id"] == id)
            .unwrap();
    assert_eq!(
        conn["bytes"].as_u64().unwrap(),
        2 * data.len() as u64,
        "{conn}"
    );
}

#[test]
fn user_mode_udp_and_redirect() {
    let r = run("umudp");
    let sess = r.fw.session(addr::CLIENT);
    // UDP BindForClient through the relay: delivered, answered.
    let b = r.fw.bind_ok(
        &sess,
        "10.1.0.2:6000",
        "udp",
        &["--flags", "no-kernel-mode,increase-receive-buffer"],
    );
    let mut c = echo_server(&r.lab.client, IPPROTO_UDP, addr::CLIENT, 6000);
    let got = send(
        &r.lab.server,
        IPPROTO_UDP,
        (addr::SERVER, 7000),
        (addr::FW_EXTERNAL, port_of(&s(&b["proxy_address"]))),
        "udp-user",
    );
    let _ = c.wait();
    assert!(
        got.starts_with(&format!("{} ", addr::FW_INTERNAL)) && got.ends_with("udp-user\n"),
        "{got}"
    );
    // RedirectConnections through the relay: the server sees the external address.
    let rc = r.fw.redirect_ok(
        &sess,
        "10.2.0.2:2000",
        "tcp",
        &["--flags", "no-kernel-mode"],
    );
    let mut srv = echo_server(&r.lab.server, IPPROTO_TCP, addr::SERVER, 2000);
    let got = send(
        &r.lab.client,
        IPPROTO_TCP,
        (addr::CLIENT, 41000),
        (addr::FW_INTERNAL, port_of(&s(&rc["internal_address"]))),
        "rc-user",
    );
    let _ = srv.wait();
    assert!(
        got.starts_with(&format!("{} ", addr::FW_EXTERNAL)) && got.ends_with("rc-user\n"),
        "{got}"
    );
    // Only the session's client may use it.
    let rc2 = r.fw.redirect_ok(
        &sess,
        "10.2.0.2:2001",
        "tcp",
        &["--flags", "no-kernel-mode"],
    );
    let _srv2 = echo_server(&r.lab.server, IPPROTO_TCP, addr::SERVER, 2001);
    assert!(
        !echoed(&r.lab.client2, &s(&rc2["internal_address"])),
        "another internal host is reset"
    );
    assert!(
        echoed(&r.lab.client, &s(&rc2["internal_address"])),
        "the client gets through"
    );
    assert!(r.fw.list("flows").is_empty());
}

#[test]
fn user_mode_refusals_resets_and_kill() {
    let r = run("umref");
    let sess = r.fw.session(addr::CLIENT);
    // IP filter and single use, enforced by the relay.
    let b = r.fw.bind_ok(
        &sess,
        "10.1.0.2:5101",
        "tcp",
        &["--flags", "no-kernel-mode", "--allow-peer", addr::SERVER],
    );
    let proxy = s(&b["proxy_address"]);
    let mut c = echo_server(&r.lab.client, IPPROTO_TCP, addr::CLIENT, 5101);
    assert!(
        !echoed(&r.lab.external2, &proxy),
        "a peer outside the filter is reset"
    );

    let got = send(
        &r.lab.server,
        IPPROTO_TCP,
        (addr::SERVER, 24100),
        (addr::FW_EXTERNAL, port_of(&proxy)),
        "first",
    );
    let _ = c.wait();
    assert!(got.ends_with("first\n"), "{got}");
    let _c2 = echo_server(&r.lab.client, IPPROTO_TCP, addr::CLIENT, 5101);
    assert!(
        !tcp_connects(&r.lab.server, &proxy),
        "single use: the endpoint stopped listening"
    );
    assert!(
        r.fw.status()["flows_expired"]["relay_refused"]
            .as_u64()
            .unwrap()
            >= 1
    );

    // A placeholder refuses until its address is set.
    let p =
        r.fw.bind_ok(&sess, "0.0.0.0:0", "tcp", &["--flags", "no-kernel-mode"]);
    let (pproxy, pid) = (s(&p["proxy_address"]), s(&p["connections"][0]["id"]));
    let c3 = echo_server(&r.lab.client, IPPROTO_TCP, addr::CLIENT, 5102);
    assert!(!echoed(&r.lab.server, &pproxy), "no target yet: reset");
    drop(c3);

    r.fw.ok(&["set-client-address", &pid, "10.1.0.2:5102"]);
    let x = r.fw.bind_ok(
        &sess,
        "10.1.0.2:5103",
        "tcp",
        &["--flags", "no-kernel-mode"],
    );
    let (xproxy, xid) = (s(&x["proxy_address"]), s(&x["connections"][0]["id"]));

    // A reset on one side reaches the other; a kill ends a live connection.
    let client = py(&r.lab.client, &format!(
        "import socket,struct\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('{c}', 5102)); s.listen(1)\n\
                  c,a=s.accept(); c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0)); c.close()",
        c = addr::CLIENT));
    wait_listening(&r.lab.client, 5102);
    let server = py(
&r.lab.server, &format!(
        "import socket\ns=socket.create_connection(('{ip}', {port}))\ntry:\n  d=s.recv(10); print('eof' if d==b'' else 'data')\nexcept ConnectionResetError:\n  print('reset')",
        ip = addr::FW_EXTERNAL, port = port_of(&pproxy)));
    output(client);
    assert_eq!(
        output(server).trim(),
        "reset",
        "the client's reset reached the server"
    );

    let holder = py(&r.lab.client, &format!(
        "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('{c}', 5103)); s.listen(1)\n\
         c,a=s.accept(); c.settimeout(10)\ntry:\n  d=c.recv(10); print('eof' if d==b'' else 'data')\nexcept ConnectionResetError:\n  print('reset')",
        c = addr::CLIENT));
    wait_listening(&r.lab.client, 5103);
    let talker = py(
        &r.lab.server,
        &format!(
            "import socket,time\ns=socket.create_connection(('{ip}', {port})); time.sleep(20)",
            ip = addr::FW_EXTERNAL,
            port = port_of(&xproxy)
        ),
    );
    thread::sleep(Duration::from_millis(500));
    let conn =
        r.fw.list("connections")
            .into_iter()
            .find(|c| s(&c["id"]) == xid)
            .unwrap();
    assert_eq!(conn["state"], "established");
    r.fw.ok(&["kill", &xid]);
    let ended = output(holder);
    assert!(
        ended.trim() == "eof" || ended.trim() == "reset",
        "killing closed the client side: {ended}"
    );
    let mut talker = talker;
    let _ = talker.kill();
    let _ = talker.wait();
}

#[test]
fn scanned_connections_stop_executables_and_pass_text() {
    // The sample data filter, switched on for FTP in the config.
    let r = LabRun::with_config(
        "umexe",
        &format!(
            "{}[scan]\nblock_executables = [\"ftp\"]\n",
            firewall_tests::daemon::FAST_TIMERS
        ),
    );
    prime_neighbours(&r.lab);
    let sess = r.fw.session(addr::CLIENT);
    let dir = std::env::temp_dir().join(format!("{}-exe", r.lab.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let exe: Vec<u8> = b"MZ\x90\x00\x03\x00\x00\x00"
        .iter()
        .copied()
        .chain((0..200_000u32).map(|i| i as u8))
        .collect();
    let text: Vec<u8> = b"just text\n".repeat(50_000);
    let (exe_file, text_file) = (dir.join("setup.exe"), dir.join("readme.txt"));
    std::fs::write(&exe_file, &exe).unwrap();
    std::fs::write(&text_file, &text).unwrap();

    // The server sends a file to the client through a BindForClient (like an
    // active-mode FTP download); returns what the client received.
    let download = |file: &std::path::Path, port: u16| -> Vec<u8> {
        let b = r.fw.bind_ok(&sess, &format!("10.1.0.2:{port}"), "tcp", &[]);
        let conn =
            r.fw.list("connections")
                .into_iter()
                .find(|c| c["id"] == b["connections"][0]["id"])
                .unwrap();
        assert_eq!(
            conn["mode"], "user",
            "a scanned protocol goes through the relay"
        );
        let got = dir.join(format!("got-{port}"));
        let mut client = r
            .lab
            .client
            .spawn(&format!(
                "exec socat -u -T5 TCP-LISTEN:{port},bind={} CREATE:{}",
                addr::CLIENT,
                got.display()
            ))
            .unwrap();
        wait_listening(&r.lab.client, port);
        let _ = r
            .lab
            .server
            .cmd("sh")
            .args([
                "-c",
                &format!(
                    "socat -u -T5 OPEN:{} TCP:{}",
                    file.display(),
                    s(&b["proxy_address"])
                ),
            ])
            .status();
        let _ = client.wait();
        std::fs::read(&got).unwrap_or_default()
    };
    let got = download(&text_file, 5301);
    assert!(
        got == text,
        "the text file passed byte for byte ({} of {} bytes)",
        got.len(),
        text.len()
    );
    let got = download(&exe_file, 5302);
    assert!(
        got.len() < 2 || &got[..2] != b"MZ",
        "the executable did not reach the client ({} bytes)",
        got.len()
    );
    assert_eq!(r.fw.status()["executables_blocked"], 1);
    assert!(
        r.fw.status()["flows_expired"]["relay_blocked"]
            .as_u64()
            .unwrap()
            >= 1
    );

    // The same through a RedirectConnections (like a passive-mode download).
    let rc = r.fw.redirect_ok(&sess, "10.2.0.2:2100", "tcp", &[]);
    let mut srv = r
        .lab
        .server
        .spawn(&format!(
            "exec socat -u -T5 OPEN:{} TCP-LISTEN:2100,bind={},reuseaddr",
            exe_file.display(),
            addr::SERVER
        ))
        .unwrap();
    wait_listening(&r.lab.server, 2100);
    let out = r
        .lab
        .client
        .cmd("sh")
        .args([
            "-c",
            &format!(
                "socat -u -T5 TCP:{} - | head -c 2",
                s(&rc["internal_address"])
            ),
        ])
        .output()
        .unwrap();
    let _ = srv.kill();
    let _ = srv.wait();
    assert_ne!(&out.stdout[..], b"MZ", "blocked through the redirect too");
    assert_eq!(r.fw.status()["executables_blocked"], 2);
    assert!(
        r.fw.list("flows").is_empty(),
        "scanned connections never enter the flow table"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn increase_receive_buffer_gives_the_relayed_socket_64_kib() {
    let r = run("umbuf");
    let sess = r.fw.session(addr::CLIENT);
    let rcvbuf = |port: u16| -> u64 {
        // `ss -m` shows the socket memory: rb<bytes> (the kernel doubles what was set).
        let out = r
            .lab
            .fw
            .sh(&format!("ss -Huamn 'sport = :{port}'"))
            .unwrap();
        let rb = out
            .split([',', '(', ')'])
            .find_map(|f| f.strip_prefix("rb"))
            .unwrap_or_else(|| panic!("no rb in {out:?}"));
        rb.parse().unwrap()
    };
    let big = r.fw.bind_ok(
        &sess,
        "10.1.0.2:6100",
        "udp",
        &["--flags", "no-kernel-mode,increase-receive-buffer"],
    );
    let small = r.fw.bind_ok(
        &sess,
        "10.1.0.2:6101",
        "udp",
        &["--flags", "no-kernel-mode"],
    );
    thread::sleep(Duration::from_millis(200));
    let (b, sm) = (
        rcvbuf(port_of(&s(&big["proxy_address"]))),
        rcvbuf(port_of(&s(&small["proxy_address"]))),
    );
    assert!(b >= 64 * 1024, "with the flag: {b}");
    assert!(sm < b, "without it the buffer is smaller: {sm} vs {b}");
}
