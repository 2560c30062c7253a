//! Lab tests of BindForClient and RedirectConnections through the CLI and
//! the real daemon, with real sockets on the hosts. Connections here are
//! kernel mode: the XDP program
//! creates their flows from the pinholes.

use std::{thread, time::Duration};

use firewall_common::IPPROTO_TCP;
use firewall_common::IPPROTO_UDP;
use firewall_tests::{
    daemon::LabRun,
    lab::addr,
    traffic::{client_server, echo_server, port_of, send, tcp_connects, Peer},
};
use serde_json::Value;

fn run(tag: &str) -> LabRun {
    LabRun::fast(tag)
}

/// A server on the client that names itself, then echoes.
fn counter(r: &LabRun, name: &str) -> u64 {
    r.fw.counter(name)
}

fn s(v: &Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

#[test]
fn bind_for_client_tcp_is_forwarded_in_the_kernel() {
    // Data both ways, translated, by XDP.
    let r = run("bfc");
    let sess = r.fw.session(addr::CLIENT);
    let events = r.fw.follow_events(30);
    let b = r.fw.bind_ok(
        &sess,
        "10.1.0.2:5001",
        "tcp",
        &["--allow-peer", addr::SERVER, "--context", "xfer-1"],
    );
    let proxy = s(&b["proxy_address"]);
    assert!(
        proxy.starts_with("10.2.0.1:") && port_of(&proxy) >= 20000,
        "{b}"
    );
    let id = b["connections"][0]["id"].as_u64().unwrap();
    assert_eq!(b["connections"][0]["client"], "10.1.0.2:5001");

    let mut c = client_server(&r.lab, IPPROTO_TCP, 5001);
    let got = send(
        &r.lab.server,
        IPPROTO_TCP,
        (addr::SERVER, 20020),
        (addr::FW_EXTERNAL, port_of(&proxy)),
        "from-the-server",
    );
    let _ = c.wait();
    assert_eq!(
        got,
        format!("client-5001 {}\nfrom-the-server\n", addr::SERVER),
        "the client answered and echoed"
    );

    // The connection's two flows carried the bytes; no socket in the firewall did.
    let flows: Vec<Value> =
        r.fw.list("flows")
            .into_iter()
            .filter(|f| f["owner"] == id)
            .collect();
    assert_eq!(flows.len(), 2, "{flows:?}");
    assert!(
        flows.iter().all(|f| f["packets"].as_u64().unwrap() >= 3),
        "{flows:?}"
    );
    assert!(
        r.lab
            .fw
            .sh("ss -Htn state established")
            .unwrap()
            .trim()
            .is_empty(),
        "no TCP connection terminates in the firewall"
    );
    assert!(counter(&r, "redirect_pinhole_established") >= 1);

    // The caller's established event, with its context.
    let e = events.wait_for("established", |e| e["event"] == "established");
    assert_eq!(
        (
            e["connection"].as_u64(),
            s(&e["from"]),
            s(&e["to"]),
            s(&e["context"])
        ),
        (
            Some(id),
            format!("{}:20020", addr::SERVER),
            "10.1.0.2:5001".into(),
            "xfer-1".into()
        )
    );

    // A second connection is refused: single use.
    let _c2 = client_server(&r.lab, IPPROTO_TCP, 5001);
    assert!(!tcp_connects(&r.lab.server, &proxy));
    // After the teardown (FIN both ways, tcp_closing) the connection ends once.
    let t = events.wait_for("terminating", |e| {
        e["event"] == "terminating" && e["connection"] == id
    });
    assert_eq!(t["reason"], "closed");
    let conns = r.fw.list("connections");
    assert_eq!(
        conns.iter().find(|c| c["id"] == id).unwrap()["state"],
        "terminated"
    );
    assert!(r.fw.list("pinholes").is_empty());
}

#[test]
fn n_addresses_get_aligned_consecutive_ports_each_to_its_own_client() {
    // N = 4.
    let r = run("nport");
    let sess = r.fw.session(addr::CLIENT);
    let mut args = vec!["bind-for-client", "--session", &sess, "--protocol", "tcp"];
    let clients: Vec<String> = (0..4).map(|i| format!("10.1.0.2:{}", 5101 + i)).collect();
    for c in &clients {
        args.extend(["--client", c]);
    }
    let b = r.fw.ok(&args);
    let base = port_of(&s(&b["proxy_address"]));
    assert_eq!(base % 4, 0, "lowest port a multiple of 4: {b}");
    for i in 0..4u16 {
        let conn = &b["connections"][i as usize];
        assert_eq!(port_of(&s(&conn["external"])), base + i, "consecutive");
        let mut c = client_server(&r.lab, IPPROTO_TCP, 5101 + i);
        let got = send(
            &r.lab.server,
            IPPROTO_TCP,
            (addr::SERVER, 21000 + i),
            (addr::FW_EXTERNAL, base + i),
            "hi",
        );
        let _ = c.wait();
        assert!(
            got.starts_with(&format!("client-{} ", 5101 + i)),
            "port {} reached client address {i}: {got}",
            base + i
        );
    }
    let b3 = r.fw.ok(&[
        "bind-for-client",
        "--session",
        &sess,
        "--protocol",
        "udp",
        "--client",
        "10.1.0.2:1",
        "--client",
        "10.1.0.2:2",
        "--client",
        "10.1.0.2:3",
    ]);
    assert_eq!(port_of(&s(&b3["proxy_address"])) % 3, 0);
}

#[test]
fn allow_multiple_accepts_each_connection_as_its_own_object() {
    let r = run("multi");
    let sess = r.fw.session(addr::CLIENT);
    let events = r.fw.follow_events(30);
    let b = r.fw.bind_ok(
        &sess,
        "10.1.0.2:5201",
        "tcp",
        &["--flags", "allow-multiple", "--notify"],
    );
    let (proxy, id) = (
        s(&b["proxy_address"]),
        b["connections"][0]["id"].as_u64().unwrap(),
    );
    for i in 0..3u16 {
        let mut c = client_server(&r.lab, IPPROTO_TCP, 5201);
        let got = send(
            &r.lab.server,
            IPPROTO_TCP,
            (addr::SERVER, 22000 + i),
            (addr::FW_EXTERNAL, port_of(&proxy)),
            "again",
        );
        let _ = c.wait();
        assert!(got.ends_with("again\n"), "connection {i}: {got}");
    }
    let children: Vec<Value> =
        r.fw.list("connections")
            .into_iter()
            .filter(|c| c["parent"] == id)
            .collect();
    assert_eq!(children.len(), 3);
    assert!(children.iter().all(|c| c["kind"] == "accepted"));
    thread::sleep(Duration::from_millis(300));
    let est: Vec<Value> = events
        .events()
        .into_iter()
        .filter(|e| e["event"] == "established")
        .collect();
    assert_eq!(est.len(), 3, "{est:?}");
    assert!(est.iter().all(|e| e["parent"] == id));
    let parent =
        r.fw.list("connections")
            .into_iter()
            .find(|c| c["id"] == id)
            .unwrap();
    assert_eq!(parent["state"], "listening", "still accepting");
}

#[test]
fn timeout_closes_an_unused_tcp_pinhole() {
    // With a 2 s TIMEOUT instead of 60 s.
    let r = run("tmo");
    let sess = r.fw.session(addr::CLIENT);
    let events = r.fw.follow_events(30);
    let used =
        r.fw.bind_ok(&sess, "10.1.0.2:5301", "tcp", &["--flags", "timeout"]);
    let unused =
        r.fw.bind_ok(&sess, "10.1.0.2:5302", "tcp", &["--flags", "timeout"]);
    // In time: works.
    let mut c = client_server(&r.lab, IPPROTO_TCP, 5301);
    let got = send(
        &r.lab.server,
        IPPROTO_TCP,
        (addr::SERVER, 23001),
        (addr::FW_EXTERNAL, port_of(&s(&used["proxy_address"]))),
        "quick",
    );
    let _ = c.wait();
    assert!(got.ends_with("quick\n"));
    // Too late: closed, terminating raised, connect refused.
    let id = unused["connections"][0]["id"].clone();
    let t = events.wait_for("terminating", |e| {
        e["event"] == "terminating" && e["connection"] == id
    });
    assert_eq!(t["reason"], "timeout");
    let _c = client_server(&r.lab, IPPROTO_TCP, 5302);
    assert!(!tcp_connects(&r.lab.server, &s(&unused["proxy_address"])));
}

#[test]
fn udp_bind_single_peer_bidirectional_and_idle_timeout() {
    let r = run("udp");
    let sess = r.fw.session(addr::CLIENT);
    // 6: the first datagram is delivered; the client's reply reaches the peer.
    let b = r.fw.bind_ok(&sess, "10.1.0.2:6000", "udp", &[]);
    let port = port_of(&s(&b["proxy_address"]));
    let mut c = client_server(&r.lab, IPPROTO_UDP, 6000);
    let got = send(
        &r.lab.server,
        IPPROTO_UDP,
        (addr::SERVER, 7000),
        (addr::FW_EXTERNAL, port),
        "dgram",
    );
    let _ = c.wait();
    assert_eq!(got, format!("client-6000 {}\ndgram\n", addr::SERVER));
    // 23: another peer is not admitted (no allow-multiple).
    let before = counter(&r, "drop_pinhole_used");
    r.lab
        .external2
        .sh(&format!(
            "printf x | socat -u - UDP-SENDTO:{}:{port},bind={}:7001",
            addr::FW_EXTERNAL,
            addr::EXTERNAL2
        ))
        .unwrap();
    thread::sleep(Duration::from_millis(200));
    assert_eq!(counter(&r, "drop_pinhole_used"), before + 1);

    // 21: with bidirectional, a peer that sent gets the client's datagrams
    // (from the external address); one that never sent does not.
    let bb =
        r.fw.bind_ok(&sess, "10.1.0.2:6001", "udp", &["--flags", "bidirectional"]);
    let bport = port_of(&s(&bb["proxy_address"]));
    r.lab
        .server
        .sh(&format!(
            "printf a | socat -u - UDP-SENDTO:{}:{bport},bind={}:7100",
            addr::FW_EXTERNAL,
            addr::SERVER
        ))
        .unwrap();
    r.lab
        .external2
        .sh(&format!(
            "printf b | socat -u - UDP-SENDTO:{}:{bport},bind={}:7101",
            addr::FW_EXTERNAL,
            addr::EXTERNAL2
        ))
        .unwrap();
    thread::sleep(Duration::from_millis(200));
    let out = std::env::temp_dir().join(format!("{}-p2", r.lab.prefix));
    let mut p2 = r.lab.external2.spawn(&format!("exec socat -u -T2 UDP-RECVFROM:7101,bind={} SYSTEM:'echo $SOCAT_PEERADDR $SOCAT_PEERPORT; cat' > {}", addr::EXTERNAL2, out.display())).unwrap();
    firewall_tests::traffic::wait_listening(&r.lab.external2, 7101);
    r.lab
        .client
        .sh(&format!(
            "printf to-p2 | socat -u - UDP-SENDTO:{}:7101,bind={}:6001",
            addr::EXTERNAL2,
            addr::CLIENT
        ))
        .unwrap();
    let _ = p2.wait();
    let seen = std::fs::read_to_string(&out).unwrap_or_default();
    std::fs::remove_file(&out).ok();
    assert_eq!(
        seen,
        format!("{} {bport}\nto-p2", addr::FW_EXTERNAL),
        "P2 got the client's datagram from the external address; flows: {:?}; reply paths full: {}, pinhole used: {}",
        r.fw.list("flows"),
        counter(&r, "drop_reply_paths_full"),
        counter(&r, "drop_pinhole_used"),
    );

    // 19: timeout on UDP: quiet for udp_pinhole_idle → closed.
    let t =
        r.fw.bind_ok(&sess, "10.1.0.2:6002", "udp", &["--flags", "timeout"]);
    let tid = t["connections"][0]["id"].clone();
    thread::sleep(Duration::from_secs(4));
    let conn =
        r.fw.list("connections")
            .into_iter()
            .find(|c| c["id"] == tid)
            .unwrap();
    assert_eq!(
        (s(&conn["state"]), s(&conn["reason"])),
        ("terminated".into(), "timeout".into())
    );
}

#[test]
fn ip_filters_restrict_peers() {
    let r = run("ipf");
    let sess = r.fw.session(addr::CLIENT);
    let b = r.fw.bind_ok(
        &sess,
        "10.1.0.2:5401",
        "tcp",
        &["--allow-peer", addr::SERVER],
    );
    let proxy = s(&b["proxy_address"]);
    let _c = client_server(&r.lab, IPPROTO_TCP, 5401);
    // Another external host races the server: refused, and the opening stays.
    assert!(!tcp_connects(&r.lab.external2, &proxy));
    assert!(counter(&r, "drop_peer_filtered") >= 1);
    assert!(
        tcp_connects(&r.lab.server, &proxy),
        "the server still gets in"
    );
    // An empty filter lets nobody in.
    let e = r.fw.bind_ok(&sess, "10.1.0.2:5402", "tcp", &["--no-peers"]);
    let _c2 = client_server(&r.lab, IPPROTO_TCP, 5402);
    assert!(!tcp_connects(&r.lab.server, &s(&e["proxy_address"])));
}

#[test]
fn placeholder_client_addresses() {
    let r = run("plh");
    let sess = r.fw.session(addr::CLIENT);
    let b = r.fw.bind_ok(&sess, "0.0.0.0:0", "tcp", &[]);
    let (proxy, id) = (
        s(&b["proxy_address"]),
        b["connections"][0]["id"].to_string(),
    );
    assert!(
        !tcp_connects(&r.lab.server, &proxy),
        "no target yet: refused"
    );
    assert!(counter(&r, "drop_pinhole_no_target") >= 1);
    assert_eq!(
        r.fw.fails(&["set-client-address", &id, "10.1.0.3:25"]),
        "access-denied"
    );
    r.fw.ok(&["set-client-address", &id, "10.1.0.2:5501"]);
    assert_eq!(
        r.fw.fails(&["set-client-address", &id, "10.1.0.2:5502"]),
        "invalid-argument"
    );
    let mut c = client_server(&r.lab, IPPROTO_TCP, 5501);
    let got = send(
        &r.lab.server,
        IPPROTO_TCP,
        (addr::SERVER, 24000),
        (addr::FW_EXTERNAL, port_of(&proxy)),
        "now",
    );
    let _ = c.wait();
    assert!(got.ends_with("now\n"), "{got}");
}

#[test]
fn proxy_mode_shows_the_firewall_as_the_source() {
    let r = run("pxy");
    let sess = r.fw.session(addr::CLIENT);
    let b =
        r.fw.bind_ok(&sess, "10.1.0.2:5601", "tcp", &["--flags", "proxy-mode"]);
    let mut c = client_server(&r.lab, IPPROTO_TCP, 5601);
    let got = send(
        &r.lab.server,
        IPPROTO_TCP,
        (addr::SERVER, 25000),
        (addr::FW_EXTERNAL, port_of(&s(&b["proxy_address"]))),
        "px",
    );
    let _ = c.wait();
    assert_eq!(
        got,
        format!("client-5601 {}\npx\n", addr::FW_INTERNAL),
        "the client saw the firewall's internal address"
    );
}

#[test]
fn ports_explicit_conflicts_pool_and_kernel_reservation() {
    let r = LabRun::with_config("ports", "[ports]\nrange = \"30000-30003\"\n");
    let sess = r.fw.session(addr::CLIENT);
    let bind = |extra: &[&str]| {
        let mut a = vec![
            "bind-for-client",
            "--session",
            sess.as_str(),
            "--client",
            "10.1.0.2:5001",
            "--protocol",
            "tcp",
        ];
        a.extend_from_slice(extra);
        r.fw.call(&a)
    };
    assert_eq!(
        bind(&["--proxy", "10.2.0.1:45000"]).unwrap()["proxy_address"],
        "10.2.0.1:45000"
    );
    assert_eq!(
        bind(&["--proxy", "10.2.0.1:45000"]).unwrap_err().0,
        "address-in-use"
    );
    let udp = r.fw.bind_ok(
        &sess,
        "10.1.0.2:5001",
        "udp",
        &["--proxy", "10.2.0.1:45000"],
    );
    assert_eq!(
        udp["proxy_address"], "10.2.0.1:45000",
        "UDP is a separate space"
    );
    assert_eq!(
        r.fw.fails(&[
            "bind-for-client",
            "--session",
            &sess,
            "--client",
            "10.1.0.2:1",
            "--client",
            "10.1.0.2:2",
            "--protocol",
            "tcp",
            "--proxy",
            "10.2.0.1:45002"
        ]),
        "invalid-argument"
    );
    // The kernel knows the port is taken: a local service cannot have it.
    assert!(
        !r.lab
            .fw
            .try_sh("timeout 1 socat TCP-LISTEN:45000,bind=10.2.0.1 /dev/null"),
        "the pinhole's port is reserved in the kernel"
    );
    // A port a local service listens on is never handed out.
    let mut svc = r
        .lab
        .fw
        .spawn(&format!(
            "exec socat TCP-LISTEN:30001,bind={},reuseaddr /dev/null",
            addr::FW_EXTERNAL
        ))
        .unwrap();
    firewall_tests::traffic::wait_listening(&r.lab.fw, 30001);
    let mut got: Vec<u16> = (0..3)
        .map(|_| port_of(&s(&bind(&[]).unwrap()["proxy_address"])))
        .collect();
    got.sort();
    assert_eq!(got, vec![30000, 30002, 30003]);
    let ex = bind(&[]).unwrap_err();
    assert_eq!(ex.0, "exhausted", "{ex:?}");
    // Killing one frees its port (in the pool and in the kernel).
    let victim =
        r.fw.list("connections")
            .into_iter()
            .find(|c| c["endpoint"] == "10.2.0.1:30002")
            .unwrap()["id"]
            .to_string();
    r.fw.ok(&["kill", &victim]);
    assert_eq!(bind(&[]).unwrap()["proxy_address"], "10.2.0.1:30002");
    let _ = svc.kill();
    let _ = svc.wait();
}

#[test]
fn every_error_kind_is_reachable_and_leaves_nothing() {
    // Every error kind the API has.
    let r = LabRun::with_config("errs", "[ports]\nrange = \"30000-30000\"\n[[protocols]]\nname = \"ftp\"\ntransport = \"tcp\"\nports = [21]\nclients = [\"10.1.0.2/32\"]\n");
    let sess = r.fw.session(addr::CLIENT);
    let other = r.fw.session(addr::CLIENT2);
    let b = |sess: &str, extra: &[&str]| {
        let mut a = vec!["bind-for-client", "--session", sess, "--protocol", "tcp"];
        a.extend_from_slice(extra);
        r.fw.call(&a)
    };
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "client port 0",
            vec!["--client", "10.1.0.2:0"],
            "invalid-argument",
        ),
        (
            "IP 0 with a port",
            vec!["--client", "0.0.0.0:21"],
            "invalid-argument",
        ),
        (
            "broadcast client",
            vec!["--client", "255.255.255.255:1"],
            "invalid-argument",
        ),
        (
            "loopback client",
            vec!["--client", "127.0.0.1:1"],
            "invalid-argument",
        ),
        (
            "multicast client",
            vec!["--client", "224.0.0.1:1"],
            "invalid-argument",
        ),
        (
            "the firewall itself",
            vec!["--client", "10.1.0.1:1"],
            "invalid-argument",
        ),
        (
            "unknown flag",
            vec!["--client", "10.1.0.2:1", "--flags", "warp-speed"],
            "invalid-argument",
        ),
        (
            "timeout + allow-multiple",
            vec![
                "--client",
                "10.1.0.2:1",
                "--flags",
                "timeout,allow-multiple",
            ],
            "invalid-argument",
        ),
        (
            "bidirectional with TCP",
            vec!["--client", "10.1.0.2:1", "--flags", "bidirectional"],
            "invalid-argument",
        ),
        (
            "no-kernel-mode with a routed proxy",
            vec![
                "--client",
                "10.1.0.2:1",
                "--flags",
                "no-kernel-mode",
                "--proxy",
                "10.1.0.2",
            ],
            "invalid-argument",
        ),
        (
            "bounce to another internal host",
            vec!["--client", "10.1.0.3:25"],
            "access-denied",
        ),
        (
            "mixed array with a bounce",
            vec!["--client", "10.1.0.2:1", "--client", "10.1.0.3:2"],
            "access-denied",
        ),
        (
            "proxy not on the firewall",
            vec!["--client", "10.1.0.2:1", "--proxy", "192.0.2.1"],
            "address-not-available",
        ),
        (
            "pool of one, N = 2",
            vec!["--client", "10.1.0.2:1", "--client", "10.1.0.2:2"],
            "exhausted",
        ),
    ];
    for (what, args, kind) in cases {
        assert_eq!(
            b(&sess, &args).map_err(|e| e.0).unwrap_err(),
            kind,
            "{what}"
        );
        assert!(r.fw.list("pinholes").is_empty(), "{what}: no pinhole left");
        assert!(
            r.fw.list("connections").is_empty(),
            "{what}: no object left"
        );
    }
    assert_eq!(
        b(&other, &["--client", "10.1.0.3:1"]).unwrap_err().0,
        "protocol-denied"
    );
    b(
        &sess,
        &["--client", "10.1.0.2:1", "--proxy", "10.2.0.1:45000"],
    )
    .unwrap();
    assert_eq!(
        b(
            &sess,
            &["--client", "10.1.0.2:1", "--proxy", "10.2.0.1:45000"]
        )
        .unwrap_err()
        .0,
        "address-in-use"
    );
    r.fw.ok(&["session", "close", &sess]);
    assert_eq!(
        b(&sess, &["--client", "10.1.0.2:1"]).unwrap_err().0,
        "terminating"
    );
    assert!(
        r.fw.list("pinholes").is_empty(),
        "closing the session removed its pinhole"
    );
    // Bad CLI input is refused before it reaches the daemon, as JSON with -j.
    assert_eq!(
        r.fw.bind_fails("1", "10.1.0.2", "tcp", &[]),
        "invalid-argument"
    );
    assert_eq!(
        r.fw.bind_fails("1", "10.1.0.2:1", "sctp", &[]),
        "invalid-argument"
    );
    assert_eq!(r.fw.fails(&["kill", "999999"]), "invalid-argument");
}

#[test]
fn kill_and_session_lifetimes() {
    let r = run("kill");
    let sess = r.fw.session(addr::CLIENT);
    let events = r.fw.follow_events(30);
    let b = r.fw.bind_ok(
        &sess,
        "10.1.0.2:5701",
        "udp",
        &["--proxy", "10.2.0.1:45700"],
    );
    let id = b["connections"][0]["id"].to_string();
    let mut c = client_server(&r.lab, IPPROTO_UDP, 5701);
    send(
        &r.lab.server,
        IPPROTO_UDP,
        (addr::SERVER, 7700),
        (addr::FW_EXTERNAL, 45700),
        "u",
    );
    let _ = c.wait();
    assert_eq!(r.fw.list("flows").len(), 2);
    r.fw.ok(&["kill", &id]);
    r.fw.ok(&["kill", &id]);
    assert!(r.fw.list("flows").is_empty(), "killing removed its flows");
    thread::sleep(Duration::from_millis(300));
    let term: Vec<Value> = events
        .events()
        .into_iter()
        .filter(|e| e["event"] == "terminating")
        .collect();
    assert_eq!(term.len(), 1, "one terminating event: {term:?}");
    assert_eq!(
        r.fw.fails(&["set-client-address", &id, "10.1.0.2:1"]),
        "terminating"
    );
    // The port is free again: an explicit bind gets it.
    r.fw.bind_ok(
        &sess,
        "10.1.0.2:5701",
        "udp",
        &["--proxy", "10.2.0.1:45700"],
    );
    // Closing the session ends everything it owns.
    r.fw.redirect_ok(&sess, "10.2.0.2:2000", "tcp", &[]);
    r.fw.ok(&["session", "close", &sess]);
    assert!(r
        .fw
        .list("connections")
        .iter()
        .all(|c| c["state"] == "terminated"));
    assert!(r.fw.list("pinholes").is_empty());
    assert_eq!(
        r.fw.redirect_fails(&sess, "10.2.0.2:2000", "tcp", &[]),
        "terminating"
    );
    let sessions = r.fw.list("sessions");
    assert_eq!(sessions[0]["terminated"], true);
}

#[test]
fn redirect_connections_relay_through_the_internal_address() {
    // The server sees the firewall's external address.
    let r = run("rc");
    let sess = r.fw.session(addr::CLIENT);
    let rc = r.fw.ok(&[
        "redirect-connections",
        "--session",
        &sess,
        "--connect",
        "10.2.0.2:2000",
        "--connect",
        "10.2.0.2:2001",
        "--protocol",
        "tcp",
        "--proxy-external",
        addr::FW_EXTERNAL,
    ]);
    let internal = s(&rc["internal_address"]);
    let q = port_of(&internal);
    assert!(
        internal.starts_with("10.1.0.1:") && q.is_multiple_of(2),
        "{rc}"
    );
    for i in 0..2u16 {
        let mut srv = echo_server(&r.lab.server, IPPROTO_TCP, addr::SERVER, 2000 + i);
        let got = send(
            &r.lab.client,
            IPPROTO_TCP,
            (addr::CLIENT, 40100 + i),
            (addr::FW_INTERNAL, q + i),
            "via-redirect",
        );
        let _ = srv.wait();
        let (peer, rest) = got.split_once('\n').unwrap();
        assert!(
            peer.starts_with(&format!("{} ", addr::FW_EXTERNAL)),
            "the server saw the external address: {got}"
        );
        assert_eq!(rest, "via-redirect\n");
    }
    // Single use: a second connect to q is refused; Cancel on a used action → terminating.
    let _srv = echo_server(&r.lab.server, IPPROTO_TCP, addr::SERVER, 2000);
    assert!(!tcp_connects(&r.lab.client, &internal));
    assert_eq!(
        r.fw.fails(&["cancel", &rc["actions"][0]["id"].to_string()]),
        "terminating"
    );

    // Only the session's client may use a redirect; Cancel before use withdraws it.
    let rc2 = r.fw.redirect_ok(&sess, "10.2.0.2:2002", "tcp", &[]);
    let i2 = s(&rc2["internal_address"]);
    let _srv2 = echo_server(&r.lab.server, IPPROTO_TCP, addr::SERVER, 2002);
    assert!(
        !tcp_connects(&r.lab.client2, &i2),
        "another internal host is refused"
    );
    assert!(counter(&r, "drop_pinhole_source") >= 1);
    let aid = rc2["actions"][0]["id"].to_string();
    r.fw.ok(&["cancel", &aid]);
    assert!(!tcp_connects(&r.lab.client, &i2), "cancelled");
    assert_eq!(r.fw.fails(&["cancel", &aid]), "terminating");
}

#[test]
fn unresolved_neighbours_are_resolved_on_demand() {
    // Nothing primed: the firewall has never talked to the client or to the
    // second external host.
    let r = LabRun::with_config("neigh", firewall_tests::daemon::FAST_TIMERS);
    let neigh = |ip: &str| r.lab.fw.sh(&format!("ip neigh show {ip}")).unwrap();
    let sess = r.fw.session(addr::CLIENT);
    // BindForClient knows its target: it is resolved at once.
    r.fw.bind_ok(&sess, "10.1.0.2:5801", "tcp", &[]);
    let start = std::time::Instant::now();
    while !neigh(addr::CLIENT).contains("lladdr") {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "client not resolved: {}",
            neigh(addr::CLIENT)
        );
        thread::sleep(Duration::from_millis(50));
    }
    // A redirect to a host with no neighbour entry: the first SYN is dropped
    // and reported, the daemon resolves it, the retransmission gets through.
    assert!(!neigh(addr::EXTERNAL2).contains("lladdr"));
    let rc = r.fw.redirect_ok(&sess, "10.2.0.3:2100", "tcp", &[]);
    let mut srv = echo_server(&r.lab.external2, IPPROTO_TCP, addr::EXTERNAL2, 2100);
    let got = r
        .lab
        .client
        .sh(&format!(
            "printf 'late\\n' | socat -T5 - TCP:{},connect-timeout=5",
            s(&rc["internal_address"])
        ))
        .unwrap();
    let _ = srv.wait();
    assert!(got.ends_with("late\n"), "{got}");
    assert!(
        counter(&r, "drop_no_neighbour") >= 1,
        "the first SYN met no neighbour"
    );
    assert!(
        neigh(addr::EXTERNAL2).contains("lladdr"),
        "{}",
        neigh(addr::EXTERNAL2)
    );
}

#[test]
fn the_per_client_quota_refuses_tcp_beyond_it() {
    quota_case("allow-multiple");
}

#[test]
fn the_per_client_quota_in_user_mode() {
    quota_case("allow-multiple,no-kernel-mode");
}

/// The per-client quota with `policy.client_quota = 2`: two held connections fill the
/// quota, the third is refused (kernel mode: dropped in XDP and counted; user
/// mode: reset by the relay and logged), and ending one lets the next in.
fn quota_case(flags: &str) {
    let user = flags.contains("no-kernel-mode");
    let r = LabRun::with_config(
        if user { "uquota" } else { "quota" },
        &format!(
            "{}[policy]\nclient_quota = 2\n",
            firewall_tests::daemon::FAST_TIMERS
        ),
    );
    firewall_tests::traffic::prime_neighbours(&r.lab);
    let sess = r.fw.session(addr::CLIENT);
    let b =
        r.fw.bind_ok(&sess, "10.1.0.2:5301", "tcp", &["--flags", flags]);
    let (port, id) = (
        port_of(&s(&b["proxy_address"])),
        b["connections"][0]["id"].as_u64().unwrap(),
    );
    let _listener = Peer::new(
        r.lab
            .client
            .spawn(&format!(
                "exec socat TCP-LISTEN:5301,bind={},reuseaddr,fork SYSTEM:cat",
                addr::CLIENT
            ))
            .unwrap(),
    );
    firewall_tests::traffic::wait_listening(&r.lab.client, 5301);
    // Two connections held open from the server.
    let _held: Vec<Peer> = (0..2u16)
        .map(|i| {
            Peer::new(
                r.lab
                    .server
                    .spawn(&format!(
                        "sleep 30 | exec socat - TCP:{}:{port},bind={}:{}",
                        addr::FW_EXTERNAL,
                        addr::SERVER,
                        23000 + i
                    ))
                    .unwrap(),
            )
        })
        .collect();
    let children = || -> Vec<Value> {
        r.fw.list("connections")
            .into_iter()
            .filter(|c| c["parent"] == id && c["state"] == "established")
            .collect()
    };
    for _ in 0..50 {
        if children().len() == 2 {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(children().len(), 2, "both held connections are established");
    let to = format!("{}:{port}", addr::FW_EXTERNAL);
    if user {
        // The relay accepts, then resets: the client is never connected.
        let got = r
            .lab
            .server
            .sh(&format!(
                "printf x | socat -T1 - TCP:{to},connect-timeout=1 || true"
            ))
            .unwrap();
        assert!(
            got.is_empty(),
            "the third connection carried nothing: {got:?}"
        );
        thread::sleep(Duration::from_millis(200));
        assert!(
            r.fw.log_text().contains("at its connection quota"),
            "{}",
            r.fw.log_text()
        );
        assert_eq!(children().len(), 2, "no third connection object");
    } else {
        assert!(
            !tcp_connects(&r.lab.server, &to),
            "the third connection is refused"
        );
        assert!(counter(&r, "drop_client_quota") >= 1);
    }

    // Ending one brings the client below its quota again.
    let first = s(&children()[0]["id"]);
    r.fw.ok(&["kill", &first]);
    assert!(
        tcp_connects(&r.lab.server, &to),
        "below the quota, connections get in again"
    );
}

#[test]
fn a_full_pinhole_table_is_exhausted_by_name_and_nothing_stays_half_made() {
    // The smallest table the configuration allows.
    let r = LabRun::with_config("pinfull", "[maps]\npinholes = 64\n");
    let fw = &r.fw;
    let session = fw.session(addr::CLIENT);
    let mut made = Vec::new();
    let (kind, message) = loop {
        let client = format!("{}:{}", addr::CLIENT, 5000 + made.len());
        let args = firewall_tests::daemon::Firewall::bind_args(&session, &client, "tcp", &[]);
        match fw.call(&args) {
            Ok(v) => made.push(v["connections"][0]["id"].as_u64().unwrap()),
            Err(e) => break e,
        }
        assert!(made.len() <= 64, "the table took more than its capacity");
    };
    assert_eq!(made.len(), 64, "every entry was used first");
    assert_eq!(kind, "exhausted", "{message}");
    assert!(
        message.contains("PINHOLES") && message.contains("64"),
        "the map and its capacity are named: {message}"
    );
    // The failed call left nothing: no object, no pinhole, no port.
    assert_eq!(fw.list("connections").len(), 64);
    assert_eq!(fw.list("pinholes").len(), 64);
    // One ended, one more fits.
    fw.ok(&["kill", &made[0].to_string()]);
    let client = format!("{}:{}", addr::CLIENT, 6000);
    fw.bind_ok(&session, &client, "tcp", &[]);
}
