//! Lab tests of the API's errors, Kill and session lifetimes,
//! RedirectConnections, neighbour resolution, the per-client quota and a full
//! pinhole table, through the CLI and the real daemon.

use std::{thread, time::Duration};

use firewall_common::IPPROTO_TCP;
use firewall_common::IPPROTO_UDP;
use firewall_tests::{
    daemon::{text as s, LabRun},
    lab::addr,
    traffic::{client_server, echo_server, port_of, send, tcp_connects, Peer},
};
use serde_json::Value;

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
    let r = LabRun::fast("kill");
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
    let r = LabRun::fast("rc");
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
    assert!(r.fw.counter("drop_pinhole_source") >= 1);
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
        r.fw.counter("drop_no_neighbour") >= 1,
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
        assert!(r.fw.counter("drop_client_quota") >= 1);
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
