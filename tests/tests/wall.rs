//! Lab tests of the wall with the real daemon and real programs: nothing
//! gets in unasked; internal clients reach external servers (which have no
//! route back) translated, tracked in the kernel.

use firewall_common::{IPPROTO_TCP, IPPROTO_UDP};

use firewall_tests::{daemon::LabRun, lab::addr, traffic::*};

#[test]
fn an_attacker_outside_gets_nothing_in() {
    let mut run = LabRun::start("wallin", &[]);
    let LabRun { lab, fw, .. } = &mut run;
    prime_neighbours(lab);
    // The attacker routes the internal network through the firewall.
    lab.server
        .sh(&format!(
            "ip route add 10.1.0.0/24 via {}",
            addr::FW_EXTERNAL
        ))
        .unwrap();
    // Services on the internal client, and proof they are there.
    let _tcp = Peer::new(
        lab.client
            .spawn("exec socat TCP-LISTEN:8080,reuseaddr,fork SYSTEM:'echo inside'")
            .unwrap(),
    );
    let _udp = Peer::new(
        lab.client
            .spawn("exec socat -u UDP-RECV:5353 OPEN:/dev/null")
            .unwrap(),
    );
    wait_listening(&lab.client, 8080);
    wait_listening(&lab.client, 5353);
    assert!(tcp_connects(
        &lab.client2,
        &format!("{}:8080", addr::CLIENT)
    ));

    assert!(
        !tcp_connects(&lab.server, &format!("{}:8080", addr::CLIENT)),
        "TCP connect from outside got in"
    );
    let _ = lab
        .server
        .try_sh(&format!("printf x | socat -u - UDP:{}:5353", addr::CLIENT));
    assert!(
        !lab.server.try_sh(&format!("ping -c2 -W1 {}", addr::CLIENT)),
        "ICMP echo from outside got an answer"
    );
    assert!(
        fw.counter("drop_no_flow") >= 4,
        "TCP SYNs, UDP and echo requests dropped"
    );
    assert_eq!(fw.counter("redirect_primary_established"), 0);
}

#[test]
fn internal_clients_reach_the_outside_translated() {
    let mut run = LabRun::start("wallout", &[]);
    let LabRun { lab, fw, .. } = &mut run;
    prime_neighbours(lab);

    // TCP and UDP request/response: the server sees the external address;
    // a source port inside the NAT range is kept.
    let got = exchange(lab, IPPROTO_TCP, 5000, 9000, "over-tcp");
    assert_eq!(got, format!("{} 5000\nover-tcp\n", addr::FW_EXTERNAL));
    let got = exchange(lab, IPPROTO_UDP, 5001, 9001, "over-udp");
    assert_eq!(got, format!("{} 5001\nover-udp\n", addr::FW_EXTERNAL));
    // An ordinary client port (outside the range) is translated into it.
    let got = exchange(lab, IPPROTO_TCP, 45000, 9002, "ephemeral");
    let port: u16 = got
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{got:?}"));
    assert!(
        got.starts_with(addr::FW_EXTERNAL) && (1024..=19999).contains(&port),
        "{got:?}"
    );

    // ping: echo requests tracked like connections, replies translated back.
    lab.client
        .sh(&format!("ping -c2 -W2 {}", addr::SERVER))
        .expect("ping through the firewall");

    // HTTP with curl against python's http.server.
    let _http = HttpServer::start(&lab.server, addr::SERVER, "hello through the wall\n");
    let body = http_get(&lab.client, addr::SERVER, 8000);
    assert_eq!(body, "hello through the wall\n");

    assert!(fw.counter("redirect_primary_established") >= 5);
    let flows = fw.list("flows");
    assert!(
        flows.iter().any(|f| f["kind"] == "primary"),
        "flows listed with their kind: {flows:?}"
    );
    // The daemon never saw these connections: no connection objects; status
    // tells the wall's settings and counts the primary flows.
    assert!(fw.list("connections").is_empty());
    let wall = &fw.status()["wall"];
    assert_eq!(wall["nat_address"], addr::FW_EXTERNAL);
    assert_eq!(wall["nat_ports"], "1024-19999");
    assert!(wall["primary_flows"].as_u64().unwrap_or(0) >= 2, "{wall}");
    let text = String::from_utf8_lossy(&fw.ctl(&["status"]).stdout).into_owned();
    assert!(
        text.contains("wall: connections out from 10.1.0.0/24"),
        "{text}"
    );
}

#[test]
fn a_published_server_is_reached_from_outside() {
    let mut run = LabRun::with_config(
        "wallpub",
        &format!(
            "[[publish]]\ntransport = \"tcp\"\nport = 8080\nserver = \"{}:8000\"\n",
            addr::CLIENT
        ),
    );
    let LabRun { lab, fw, .. } = &mut run;
    prime_neighbours(lab);
    let _http = HttpServer::start(&lab.client, addr::CLIENT, "published from inside\n");
    // The external host has no route to the internal network: it talks to
    // the firewall's external address only.
    let body = http_get(&lab.server, addr::FW_EXTERNAL, 8080);
    assert_eq!(body, "published from inside\n");
    assert!(fw.counter("redirect_published_established") >= 1);
    assert_eq!(
        fw.status()["wall"]["published"][0],
        format!("tcp 8080 -> {}:8000", addr::CLIENT)
    );
    // The unpublished port next to it is the firewall's own (nothing listens).
    assert!(!tcp_connects(
        &lab.server,
        &format!("{}:8081", addr::FW_EXTERNAL)
    ));
}

/// Datagrams larger than the path's MTU cross in fragments, both ways, at
/// XDP and at TC: a 3000-byte ping and a 4 KiB UDP request echoed back
/// whole; the server sees the external address.
#[test]
fn fragmented_datagrams_cross_translated() {
    for mode in ["native", "tc"] {
        let mut run = LabRun::start(&format!("frag{}", &mode[..2]), &["--xdp-mode", mode]);
        let LabRun { lab, fw, .. } = &mut run;
        prime_neighbours(lab);
        lab.client
            .sh(&format!("ping -c2 -W2 -s 3000 {}", addr::SERVER))
            .unwrap_or_else(|e| panic!("{mode}: a large ping through the firewall: {e}"));
        let _echo = Peer::new(
            lab.server
                .spawn(&format!(
                    "exec python3 -c \"import socket; s = socket.socket(2, 2); s.bind(('{}', 9100))\n\
                     while True:\n    d, a = s.recvfrom(65535); s.sendto(a[0].encode() + b' ' + d, a)\"",
                    addr::SERVER
                ))
                .unwrap(),
        );
        wait_listening(&lab.server, 9100);
        let got = lab
            .client
            .sh(&format!(
                "python3 -c \"import socket; s = socket.socket(2, 2); s.settimeout(3)\n\
                 m = bytes(range(256)) * 16; s.sendto(m, ('{}', 9100)); d, _ = s.recvfrom(65535)\n\
                 print(d.split(b' ', 1)[0].decode(), d.split(b' ', 1)[1] == m)\"",
                addr::SERVER
            ))
            .unwrap_or_else(|e| panic!("{mode}: a 4 KiB datagram through the firewall: {e}"));
        assert_eq!(got.trim(), format!("{} True", addr::FW_EXTERNAL), "{mode}");
        // Two fragments after the first of each echo and each datagram.
        assert!(fw.counter("redirect_fragment") >= 10, "{mode}");
        assert_eq!(fw.counter("drop_fragment"), 0, "{mode}");
    }
}

/// Where the stack finishes checksums in software — no checksum offload on
/// the firewall's egress, and receivers that verify every segment — a
/// translated TCP stream arrives intact both ways, in either hook: the
/// datapath left each L4 checksum right, also in the senders'
/// CHECKSUM_PARTIAL super-packets (whose field holds only the pseudo-header
/// sum, updated for the new addresses and not for the ports). On veth with
/// offloads on, nobody would notice a wrong one. The second client: the
/// first one's address and the external one sum alike, so translating
/// between them never moves a checksum.
#[test]
fn checksums_hold_where_the_stack_finishes_them() {
    for mode in ["tc", "native"] {
        let mut run = LabRun::start(&format!("csum{}", &mode[..2]), &["--xdp-mode", mode]);
        let LabRun { lab, fw, .. } = &mut run;
        prime_neighbours(lab);
        for i in [addr::IF_INTERNAL, addr::IF_EXTERNAL] {
            lab.fw
                .sh(&format!("ethtool -K {i} tx off >/dev/null"))
                .unwrap();
        }
        for sw in [lab.switch_internal(), lab.switch_external()] {
            sw.sh("ethtool -K fw rx off >/dev/null").unwrap();
        }
        for host in [&lab.client2, &lab.server] {
            host.sh("ethtool -K eth0 rx off >/dev/null").unwrap();
        }
        let dir = std::env::temp_dir().join(format!("{}-csum", lab.prefix));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |n: &str| dir.join(n).display().to_string();
        lab.client2
            .sh(&format!("head -c 4000000 /dev/urandom > {}", file("up")))
            .unwrap();
        lab.server
            .sh(&format!("head -c 4000000 /dev/urandom > {}", file("down")))
            .unwrap();

        let dump = lab
            .server
            .spawn(&format!(
                "exec timeout 10 tcpdump -c 20 -nvv -i eth0 tcp port 9100 > {} 2>&1",
                file("dump")
            ))
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        // Upload, client to server.
        let sink = lab
            .server
            .spawn(&format!(
                "exec socat -u TCP-LISTEN:9100,reuseaddr OPEN:{},creat,trunc",
                file("up.got")
            ))
            .unwrap();
        wait_listening(&lab.server, 9100);
        lab.client2
            .sh(&format!(
                "timeout 20 socat -u FILE:{} TCP:{}:9100",
                file("up"),
                addr::SERVER
            ))
            .unwrap();
        let _ = Peer::new(sink).wait();
        let _ = Peer::new(dump).wait();
        eprintln!(
            "DUMP {mode} {}",
            std::fs::read_to_string(file("dump")).unwrap_or_default()
        );
        // Download, server to client.
        let _source = Peer::new(
            lab.server
                .spawn(&format!(
                    "exec socat -u FILE:{} TCP-LISTEN:9101,reuseaddr",
                    file("down")
                ))
                .unwrap(),
        );
        wait_listening(&lab.server, 9101);
        lab.client2
            .sh(&format!(
                "timeout 20 socat -u TCP:{}:9101 OPEN:{},creat,trunc",
                addr::SERVER,
                file("down.got")
            ))
            .unwrap();

        let same =
            |a: &str, b: &str| std::fs::read(file(a)).unwrap() == std::fs::read(file(b)).unwrap();
        assert!(
            same("up", "up.got"),
            "{mode}: the upload arrived changed or cut"
        );
        assert!(
            same("down", "down.got"),
            "{mode}: the download arrived changed or cut"
        );
        for host in [&lab.client2, &lab.server] {
            let errors = host
                .sh("awk '/^Tcp:/ { if (!n++) { for (i = 1; i <= NF; i++) if ($i == \"InCsumErrors\") c = i } else print $c }' /proc/net/snmp")
                .unwrap();
            assert_eq!(
                errors.trim(),
                "0",
                "{mode}: TCP segments with a bad checksum"
            );
        }
        assert!(fw.counter("redirect_primary_established") >= 2, "{mode}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
