//! Lab tests of BindForClient and RedirectConnections through the CLI and
//! the real daemon, with real sockets on the hosts. Connections here are
//! kernel mode: the XDP program
//! creates their flows from the pinholes.

use std::{thread, time::Duration};

use firewall_common::IPPROTO_TCP;
use firewall_common::IPPROTO_UDP;
use firewall_tests::{
    daemon::{text as s, LabRun},
    lab::addr,
    traffic::{client_server, port_of, send, tcp_connects},
};
use serde_json::Value;

fn run(tag: &str) -> LabRun {
    LabRun::fast(tag)
}

/// A server on the client that names itself, then echoes.
fn counter(r: &LabRun, name: &str) -> u64 {
    r.fw.counter(name)
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
    // The datapath reports establishments every 10 ms: the last one may be
    // on its way still.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let children: Vec<Value> = loop {
        let children: Vec<Value> =
            r.fw.list("connections")
                .into_iter()
                .filter(|c| c["parent"] == id)
                .collect();
        if children.len() >= 3 || std::time::Instant::now() > deadline {
            break children;
        }
        thread::sleep(Duration::from_millis(50));
    };
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
