//! Lab test of UDP's endpoint-independent mapping with the real daemon: a
//! client socket reaches two external peers from one external port (what
//! STUN tells a peer-to-peer application is then true for every peer);
//! another client gets another port; the daemon stamps the mapping from its
//! flows' traffic and ends it once it has been quiet for its timeout; a port
//! whose owner no mapping names (what a daemon stopped mid-sweep leaves) is
//! freed after as long.

use std::time::{Duration, Instant};

use firewall_common::wall::NatEndpoint;
use firewall_ctl::datapath::{PinPaths, UdpMappings};
use firewall_tests::{
    daemon::LabRun,
    lab::{addr, Ns},
    traffic::*,
};

/// A UDP server at `host:port` (in `ns`) that answers each datagram with
/// the address and port it came from.
fn reflector(ns: &Ns, host: &str, port: u16) -> Peer {
    let peer = Peer::new(
        ns.spawn(&format!(
            "exec python3 -c \"import socket; s = socket.socket(2, 2); s.bind(('{host}', {port}))\n\
             while True:\n    d, a = s.recvfrom(2048); s.sendto(('%s %d' % a).encode(), a)\""
        ))
        .unwrap(),
    );
    wait_listening(ns, port);
    peer
}

/// From one socket bound to `client:sport`, one datagram to each peer:
/// the "address port" each reflector saw, in order.
fn ask(ns: &Ns, client: &str, sport: u16, peers: &[(&str, u16)]) -> Vec<String> {
    let peers: Vec<String> = peers.iter().map(|(h, p)| format!("('{h}', {p})")).collect();
    let out = ns
        .sh(&format!(
            "python3 -c \"import socket; s = socket.socket(2, 2); s.settimeout(3); s.bind(('{client}', {sport}))\n\
             for p in [{}]:\n    s.sendto(b'x', p); print(s.recvfrom(2048)[0].decode())\"",
            peers.join(", ")
        ))
        .unwrap_or_else(|e| panic!("UDP from {client}:{sport}: {e:#}"));
    out.lines().map(str::to_string).collect()
}

#[test]
fn a_udp_endpoint_reaches_every_peer_from_one_port() {
    // A small flow table: the sweeper reads it whole every tick, so a
    // mapping's quiet time is its timeout (the shortest allowed).
    let mut run = LabRun::with_config(
        "eim",
        "[maps]\nflows = 4096\n[timeouts]\nudp_idle = 5\nudp_mapping = 120\n",
    );
    let LabRun { lab, fw, .. } = &mut run;
    prime_neighbours(lab);
    lab.fw
        .sh(&format!(
            "ping -c1 -W2 {} >/dev/null; ping -c1 -W2 {} >/dev/null",
            addr::EXTERNAL2,
            addr::CLIENT2
        ))
        .expect("ping from the firewall");
    let _a = reflector(&lab.server, addr::SERVER, 9201);
    let _b = reflector(&lab.server, addr::SERVER, 9202);
    let _c = reflector(&lab.external2, addr::EXTERNAL2, 9201);
    let (a, b, c) = (
        (addr::SERVER, 9201),
        (addr::SERVER, 9202),
        (addr::EXTERNAL2, 9201),
    );

    // Two ports of one peer and another peer host.
    let seen = ask(&lab.client, addr::CLIENT, 45000, &[a, b, c]);
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen[0].starts_with(addr::FW_EXTERNAL), "{seen:?}");
    assert!(
        seen.iter().all(|s| *s == seen[0]),
        "one port for all: {seen:?}"
    );
    let port: u16 = seen[0].split(' ').nth(1).unwrap().parse().unwrap();
    assert!((1024..=19999).contains(&port), "{port}");
    // Another host with the same source port: another NAT port, the same
    // toward both peers.
    let other = ask(&lab.client2, addr::CLIENT2, 45000, &[a, c]);
    assert_eq!(other[0], other[1], "{other:?}");
    assert_ne!(other[0], seen[0]);

    let ep = NatEndpoint::new(ip4(addr::CLIENT), 45000);
    let maps = || UdpMappings::open(&PinPaths::default()).unwrap();
    let created = maps().get(&ep).unwrap().expect("the mapping");
    assert_eq!(created.nat_port, port);
    let status = fw.status();
    let listed = status["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "UDP_MAPPINGS")
        .cloned()
        .expect("UDP_MAPPINGS in status");
    assert_eq!(listed["entries"], 2, "{listed}");

    // Traffic on an existing flow stamps the flow; the daemon carries it
    // over to the mapping.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        ask(&lab.client, addr::CLIENT, 45000, &[b]),
        vec![seen[0].clone()]
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = maps().get(&ep).unwrap().expect("the mapping");
        if m.last_seen_ns > created.last_seen_ns {
            break;
        }
        assert!(Instant::now() < deadline, "the mapping was never stamped");
        std::thread::sleep(Duration::from_millis(500));
    }

    // An orphaned port: owned by an endpoint that has no mapping (written
    // by hand, as a daemon killed between ending a mapping and freeing its
    // port leaves it). Key: the port (u32, host order); value: the endpoint.
    let orphan = 19_000u32;
    let hex = |b: &[u8]| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut value = ip4("10.1.0.77").to_vec();
    value.extend(5555u16.to_ne_bytes());
    value.extend([0, 0]);
    let update = std::process::Command::new("bpftool")
        .args([
            "map",
            "update",
            "pinned",
            "/sys/fs/bpf/firewall/UDP_PORT_OWNERS",
        ])
        .arg("key")
        .args(["hex"])
        .args(hex(&orphan.to_ne_bytes()).split(' '))
        .arg("value")
        .args(["hex"])
        .args(hex(&value).split(' '))
        .arg("noexist")
        .output()
        .unwrap();
    assert!(update.status.success(), "{update:?}");
    let owned = |port: u32| {
        std::process::Command::new("bpftool")
            .args([
                "-j",
                "map",
                "lookup",
                "pinned",
                "/sys/fs/bpf/firewall/UDP_PORT_OWNERS",
            ])
            .args(["key", "hex"])
            .args(hex(&port.to_ne_bytes()).split(' '))
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(owned(orphan));

    // Quiet for its timeout (its flows went after 5 s): it ends, its port is
    // free, and the metrics count it.
    let deadline = Instant::now() + Duration::from_secs(150);
    while maps().get(&ep).unwrap().is_some() {
        assert!(Instant::now() < deadline, "the mapping never ended");
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(
        fw.list("flows").iter().all(|f| f["protocol"] != "udp"),
        "the flows went first"
    );
    // The port is free again: a source port equal to it is kept.
    let again = ask(&lab.client2, addr::CLIENT2, port, &[a]);
    assert_eq!(again, vec![format!("{} {port}", addr::FW_EXTERNAL)]);
    // The orphan went after as long (watched from the sweep after it was
    // written).
    let deadline = Instant::now() + Duration::from_secs(20);
    while owned(orphan) {
        assert!(
            Instant::now() < deadline,
            "the orphaned port was never freed"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}
