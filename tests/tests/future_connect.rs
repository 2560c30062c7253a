//! AllowFutureConnect with the real daemon, the CLI and real peers: a client
//! the wall does not let out (`wall.outbound_from` names another network)
//! reaches exactly the permitted destination, from the external address,
//! as often as the permission says; everything else stays refused.

use firewall_tests::{
    daemon::{Firewall, LabRun},
    lab::{addr, Lab},
    traffic::*,
};

/// A TCP server on the lab's server that answers each connection with the
/// address it came from.
fn whoami_server(lab: &Lab, port: u16) -> Peer {
    let p = Peer::new(
        lab.server
            .spawn(&format!(
                "exec socat TCP-LISTEN:{port},bind={},reuseaddr,fork SYSTEM:'echo $SOCAT_PEERADDR'",
                addr::SERVER
            ))
            .unwrap(),
    );
    wait_listening(&lab.server, port);
    p
}

/// What the server says when the client connects; None when it cannot.
fn connect(lab: &Lab, port: u16) -> Option<String> {
    lab.client
        .sh(&format!(
            "socat -T2 - TCP:{}:{port},connect-timeout=2 </dev/null",
            addr::SERVER
        ))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn permit(fw: &Firewall, session: &str, port: u16, flags: &str) -> serde_json::Value {
    let address = format!("{}:{port}", addr::SERVER);
    fw.ok(&[
        "allow-future-connect",
        "--session",
        session,
        "--address",
        &address,
        "--peer",
        addr::SERVER,
        "--protocol",
        "tcp",
        "--flags",
        flags,
        "--context",
        "pasv-1",
    ])
}

#[test]
fn a_permission_lets_exactly_the_expected_connection_out() {
    let mut run = LabRun::with_config("future", "[wall]\noutbound_from = [\"10.9.0.0/16\"]\n");
    let LabRun { lab, fw, .. } = &mut run;
    prime_neighbours(lab);
    let _single = whoami_server(lab, 9000);
    let _multi = whoami_server(lab, 9001);
    assert_eq!(
        connect(lab, 9000),
        None,
        "the wall lets this client nowhere"
    );
    assert!(fw.counter("drop_not_allowed") >= 1);

    let s = fw.session(addr::CLIENT);
    let events = fw.follow_events(30);
    let r = permit(fw, &s, 9000, "timeout");
    assert_eq!(r["address"], format!("{}:9000", addr::SERVER));
    let external = r["external"].as_str().unwrap().to_string();
    assert!(external.starts_with(addr::FW_EXTERNAL), "{r}");
    let listed = fw.list("connections");
    assert_eq!(listed[0]["kind"], "future-connect");
    assert_eq!(listed[0]["state"], "listening");

    assert_eq!(
        connect(lab, 9000).as_deref(),
        Some(addr::FW_EXTERNAL),
        "permitted, from the external address"
    );
    assert!(fw.counter("redirect_pinhole_established") >= 1);
    // The caller hears of it (fwx_EstablishedConnection): the client opened
    // it, to the permitted destination, with the caller's context.
    let e = events.wait_for("established", |e| {
        e["event"] == "established" && e["connection"] == r["id"]
    });
    assert!(e["from"].as_str().unwrap().starts_with(addr::CLIENT), "{e}");
    assert_eq!(e["to"], format!("{}:9000", addr::SERVER));
    assert_eq!(e["context"], "pasv-1");
    // Single use: the next connection is the wall's again.
    assert_eq!(connect(lab, 9000), None);
    // The permission was used: its connection is listed, the client its peer.
    let used = fw.list("connections");
    assert!(
        used.iter().any(|o| o["kind"] == "future-connect"
            && o["state"] != "listening"
            && o["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with(addr::CLIENT))),
        "{used:?}"
    );

    // allow-multiple: as many as the client opens, until cancelled.
    let m = permit(fw, &s, 9001, "allow-multiple");
    for _ in 0..3 {
        assert_eq!(connect(lab, 9001).as_deref(), Some(addr::FW_EXTERNAL));
    }
    let id = m["id"].as_u64().unwrap().to_string();
    fw.ok(&["cancel", &id]);
    assert_eq!(connect(lab, 9001), None, "withdrawn");

    // A third party (an FTP bounce through the permission) is refused; so
    // is a destination on the inside.
    let refused = |address: String, more: &[&str]| {
        let mut args = vec![
            "allow-future-connect",
            "--session",
            &s,
            "--address",
            &address,
            "--protocol",
            "tcp",
        ];
        args.extend(more);
        fw.fails(&args)
    };
    let third = refused(format!("{}:25", addr::EXTERNAL2), &["--peer", addr::SERVER]);
    assert!(third.contains("access-denied"), "{third}");
    let inside = refused(
        format!("{}:25", addr::CLIENT2),
        &["--flags", "allow-addresses-all"],
    );
    assert!(inside.contains("invalid-argument"), "{inside}");
}

/// User mode (no-kernel-mode): the relay takes the client's connection at
/// the destination's address and makes its own from the external address;
/// single use, or as many as allowed until cancelled.
#[test]
fn a_user_mode_permission_relays_the_connection() {
    let mut run = LabRun::with_config("futusr", "[wall]\noutbound_from = [\"10.9.0.0/16\"]\n");
    let LabRun { lab, fw, .. } = &mut run;
    prime_neighbours(lab);
    let _single = whoami_server(lab, 9000);
    let _multi = whoami_server(lab, 9001);
    let s = fw.session(addr::CLIENT);
    let r = permit(fw, &s, 9000, "no-kernel-mode,timeout");
    assert_eq!(r["external"], format!("{}:0", addr::FW_EXTERNAL), "{r}");
    let listed = fw.list("connections");
    assert_eq!(listed[0]["mode"], "user", "{listed:?}");
    assert_eq!(
        connect(lab, 9000).as_deref(),
        Some(addr::FW_EXTERNAL),
        "relayed, from the external address"
    );
    assert_eq!(connect(lab, 9000), None, "single use");

    let m = permit(fw, &s, 9001, "no-kernel-mode,allow-multiple");
    for _ in 0..2 {
        assert_eq!(connect(lab, 9001).as_deref(), Some(addr::FW_EXTERNAL));
    }
    let id = m["id"].as_u64().unwrap().to_string();
    fw.ok(&["cancel", &id]);
    assert_eq!(connect(lab, 9001), None, "withdrawn");
}

#[test]
fn a_permission_does_not_shadow_the_wall_for_other_clients() {
    // The wall lets everyone out; a permission for one client to a
    // destination must not turn the others away from it.
    let mut run = LabRun::start("futsh", &[]);
    let LabRun { lab, fw, .. } = &mut run;
    prime_neighbours(lab);
    let _srv = whoami_server(lab, 9000);
    let s = fw.session(addr::CLIENT);
    permit(fw, &s, 9000, "allow-multiple");
    let other = lab
        .client2
        .sh(&format!(
            "socat -T2 - TCP:{}:9000,connect-timeout=2 </dev/null",
            addr::SERVER
        ))
        .expect("the other client reaches the server through the wall");
    assert_eq!(other.trim(), addr::FW_EXTERNAL);
    assert_eq!(fw.counter("drop_pinhole_source"), 0);
    assert!(fw.counter("redirect_primary_established") >= 1);
}
