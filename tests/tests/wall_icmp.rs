//! Lab tests of ICMP errors through the wall with real programs: traceroute
//! and tracepath see every hop beyond the firewall, and path MTU discovery
//! works for translated connections (a link past the firewall with a
//! smaller MTU, whose router answers "fragmentation needed").

use firewall_tests::{
    daemon::{Firewall, LabRun},
    lab::{addr, Lab},
    traffic::*,
};

/// A network past the second external host, which routes to it: the server
/// has an address there (`FAR`), reached from the firewall through `ROUTER`.
/// The router's link into it has an MTU of 1280, in the direction toward the
/// server only (the server answers on the external segment directly), so
/// that only the router can tell a sender its packets are too big.
const FAR: &str = "203.0.113.10";
const ROUTER: &str = addr::EXTERNAL2;

fn build_far_network(lab: &Lab) {
    lab.server
        .sh(&format!(
            "ip link add far0 type veth peer name far1 netns {s2} && \
             ip addr add {FAR}/24 dev far0 && ip link set far0 up && \
             sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.far0.rp_filter=0",
            s2 = lab.external2.name
        ))
        .unwrap();
    lab.external2
        .sh(
            "ip addr add 203.0.113.1/24 dev far1 && ip link set far1 mtu 1280 up && \
             sysctl -qw net.ipv4.ip_forward=1",
        )
        .unwrap();
    lab.fw
        .sh(&format!("ip route add 203.0.113.0/24 via {ROUTER}"))
        .unwrap();
    lab.fw
        .sh(&format!("ping -c1 -W2 {ROUTER} >/dev/null"))
        .unwrap();
}

/// The hops traceroute printed: (hop number, address) of each answered line.
fn hops(out: &str) -> Vec<(u32, String)> {
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let n = w.next()?.parse().ok()?;
            let a = w.next()?;
            (a != "*").then(|| (n, a.to_string()))
        })
        .collect()
}

fn traceroute(lab: &Lab, fw: &Firewall, how: &str) {
    let before = fw.counter("redirect_icmp_error");
    let out = lab
        .client
        .sh(&format!("traceroute -n -q 1 -w 2 -m 6 {how} {FAR}"))
        .unwrap();
    assert_eq!(
        hops(&out),
        vec![
            (1, addr::FW_INTERNAL.to_string()),
            (2, ROUTER.to_string()),
            (3, FAR.to_string()),
        ],
        "traceroute {how}: every hop answers, the last is the destination:\n{out}"
    );
    // The router's time exceeded; for UDP probes also the destination's
    // port unreachable (echo probes end with an echo reply).
    let errors = if how == "-I" { 1 } else { 2 };
    assert!(
        fw.counter("redirect_icmp_error") >= before + errors,
        "the errors were translated in the kernel"
    );
}

#[test]
fn traceroute_and_path_mtu_discovery_work_through_the_nat() {
    let mut run = LabRun::start("wallicmp", &[]);
    let LabRun { lab, fw, .. } = &mut run;
    prime_neighbours(lab);
    build_far_network(lab);

    // UDP probes (time exceeded from the router, port unreachable from the
    // destination) and ICMP echo probes (the quote is an echo request).
    traceroute(lab, fw, "");
    traceroute(lab, fw, "-I");

    // tracepath learns the path MTU from the router's "fragmentation needed".
    let out = lab.client.sh(&format!("tracepath -n {FAR}")).unwrap();
    assert!(out.contains("pmtu 1280"), "tracepath:\n{out}");

    // A ping too big for the far link, with DF: the router's answer reaches
    // the client, which then knows the path MTU.
    let out = lab
        .client
        .sh(&format!("ping -c2 -W2 -M do -s 1400 {FAR} 2>&1; true"))
        .unwrap();
    assert!(
        out.contains("mtu = 1280") || out.contains("mtu=1280"),
        "ping learns the MTU:\n{out}"
    );

    // TCP: an upload with full-size segments would stall at the far link
    // (a black hole) unless the error reaches the client's TCP.
    let _sink = Peer::new(
        lab.server
            .spawn(&format!(
                "exec socat -u TCP-LISTEN:9100,bind={FAR},reuseaddr OPEN:/tmp/{}-up,creat,trunc",
                lab.server.name
            ))
            .unwrap(),
    );
    wait_listening(&lab.server, 9100);
    lab.client
        .sh(&format!(
            "head -c 2000000 /dev/zero | timeout 20 socat -u - TCP:{FAR}:9100"
        ))
        .expect("upload across the smaller MTU");
    let path = format!("/tmp/{}-up", lab.server.name);
    let arrived = eventually_size(&path, 2_000_000);
    let _ = std::fs::remove_file(&path);
    assert_eq!(arrived, 2_000_000, "every byte arrived");

    // Nothing unrelated was forwarded.
    assert_eq!(fw.counter("drop_icmp_unrelated"), 0);
}

#[test]
fn traceroute_works_at_tc_too() {
    let mut run = LabRun::start("wallicmptc", &["--xdp-mode", "tc"]);
    let LabRun { lab, fw, .. } = &mut run;
    prime_neighbours(lab);
    build_far_network(lab);
    traceroute(lab, fw, "");
}

/// The size of `path` once it reaches `want` bytes (or after 10 s).
fn eventually_size(path: &str, want: u64) -> u64 {
    let mut size = 0;
    for _ in 0..100 {
        size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if size >= want {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    size
}
