//! Lab tests: the real daemon in the namespace topology, real peers (ping,
//! socat), and what `ip`, `bpftool` and the maps say. They run one firewall at
//! a time (`exclusive`), each in its own lab that is removed even on failure.

use std::{thread, time::Duration};

use firewall_common::{flow::FlowKey, IPPROTO_TCP, IPPROTO_UDP};
use firewall_ctl::datapath::{FlowTable, PinPaths};
use firewall_tests::{
    daemon::{ctl_in, Firewall, LabRun},
    exclusive,
    lab::{addr, unique_prefix, Lab},
    require_root,
    traffic::{exchange, flow, install_snat, prime_neighbours, wait_listening},
};
use serde_json::Value;

#[test]
fn up_attaches_native_xdp_and_down_removes_everything() {
    let mut run = LabRun::start("att", &[]);
    let LabRun { lab, fw, .. } = &mut run;

    // ip and bpftool agree: native ("driver") XDP with our programs on both interfaces.
    for (ifname, prog) in [
        (addr::IF_INTERNAL, "xdp_internal"),
        (addr::IF_EXTERNAL, "xdp_external"),
    ] {
        let link: Value =
            serde_json::from_str(&lab.fw.sh(&format!("ip -j -d link show {ifname}")).unwrap())
                .unwrap();
        let xdp = &link[0]["xdp"];
        assert_eq!(
            xdp["mode"], 1,
            "{ifname}: XDP_ATTACHED_DRV in ip -d link: {xdp}"
        );
        assert_eq!(xdp["prog"]["name"], prog, "{ifname}: {xdp}");
    }
    let net: Value = serde_json::from_str(&lab.fw.sh("bpftool -j net").unwrap()).unwrap();
    let xdp = net[0]["xdp"].as_array().unwrap();
    assert_eq!(xdp.len(), 2, "{xdp:?}");
    for e in xdp {
        assert_eq!(e["mode"], "driver", "{e}");
    }

    // The lab's peers take redirected frames (the drivers say so once the
    // programs are attached), so `up` has nothing to warn about.
    let log = fw.log_text();
    for ifname in [addr::IF_INTERNAL, addr::IF_EXTERNAL] {
        let offers = log
            .lines()
            .find(|l| l.contains(&format!("{ifname}: its driver offers at XDP")))
            .unwrap_or_else(|| panic!("no XDP features of {ifname} logged: {log}"));
        assert!(offers.contains("redirect, ndo-xmit"), "{offers}");
    }
    assert!(!log.contains("takes no redirected frames"), "{log}");

    // status reports the same.
    let s = fw.status();
    let ifs = s["interfaces"].as_array().unwrap();
    assert_eq!(ifs[0]["name"], addr::IF_INTERNAL);
    assert_eq!(ifs[0]["xdp_mode"], "native");
    assert_eq!(ifs[1]["name"], addr::IF_EXTERNAL);
    assert_eq!(s["internal_networks"][0], "10.1.0.0/24");
    assert_eq!(s["external_addresses"][0], addr::FW_EXTERNAL);
    assert_eq!(s["maps"][0]["name"], "FLOWS");
    assert!(s["counters"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == "redirected"));
    // Human output exists too.
    let human = fw.ctl(&["status"]);
    assert!(
        String::from_utf8_lossy(&human.stdout).contains("xdp_internal"),
        "{human:?}"
    );

    // down: daemon gone, no program attached, no pin left, forwarding restored.
    let out = fw.down();
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["stopped_daemon"], true);
    for ifname in [addr::IF_INTERNAL, addr::IF_EXTERNAL] {
        let link: Value =
            serde_json::from_str(&lab.fw.sh(&format!("ip -j -d link show {ifname}")).unwrap())
                .unwrap();
        assert!(
            link[0].get("xdp").is_none(),
            "{ifname} still has XDP: {}",
            link[0]
        );
    }
    let net: Value = serde_json::from_str(&lab.fw.sh("bpftool -j net").unwrap()).unwrap();
    assert!(net[0]["xdp"].as_array().unwrap().is_empty(), "{net}");
    assert!(
        !std::path::Path::new(firewall_common::PIN_DIR).exists(),
        "pins left behind"
    );
    assert_eq!(
        lab.fw
            .sh(&format!(
                "cat /proc/sys/net/ipv4/conf/{}/forwarding",
                addr::IF_INTERNAL
            ))
            .unwrap()
            .trim(),
        "1",
        "the lab itself had forwarding on (ip_forward=1), so down keeps it"
    );
}

#[test]
fn traffic_the_firewall_does_not_handle_still_works() {
    let mut run = LabRun::start("pass", &[]);
    let LabRun { lab, fw, .. } = &mut run;

    // ICMP to the firewall, from both sides.
    lab.client
        .sh(&format!("ping -c2 -W2 {}", addr::FW_INTERNAL))
        .unwrap();
    lab.server
        .sh(&format!("ping -c2 -W2 {}", addr::FW_EXTERNAL))
        .unwrap();
    // TCP to a service on the firewall itself.
    let mut srv = lab
        .fw
        .spawn(&format!(
            "exec socat -T5 TCP-LISTEN:7000,bind={},reuseaddr SYSTEM:'echo firewall-says-hi'",
            addr::FW_INTERNAL
        ))
        .unwrap();
    wait_listening(&lab.fw, 7000);
    let got = lab
        .client
        .sh(&format!(
            "socat -T5 - TCP:{}:7000 </dev/null",
            addr::FW_INTERNAL
        ))
        .unwrap();
    assert_eq!(got.trim(), "firewall-says-hi");
    let _ = srv.wait();

    assert!(
        fw.counter("pass_not_tcp_udp") >= 2,
        "ICMP counted as passed"
    );
    assert!(
        fw.counter("pass_no_flow") >= 1,
        "TCP without a flow counted as passed"
    );
    assert!(fw.counter("pass_not_ipv4") >= 1, "ARP counted as passed");
    assert_eq!(fw.counter("redirected"), 0);
}

#[test]
fn a_flow_written_through_the_library_translates_real_traffic() {
    let mut run = LabRun::start("nat", &[]);
    let LabRun { lab, fw, .. } = &mut run;
    prime_neighbours(lab);

    // TCP: the server sees the firewall's external address; data flows both ways.
    let (out, back) = install_snat(IPPROTO_TCP, addr::CLIENT, 40001, addr::SERVER, 9000, 61001);
    let got = exchange(lab, IPPROTO_TCP, 40001, 9000, "ping-over-tcp");
    assert_eq!(
        got,
        format!("{} 61001\nping-over-tcp\n", addr::FW_EXTERNAL),
        "server saw the translated source and echoed"
    );
    let (o, b) = (flow(&out), flow(&back));
    assert!(
        o.packets >= 3 && b.packets >= 3,
        "both directions forwarded by XDP: {o:?} {b:?}"
    );
    assert!(o.bytes > 0 && o.last_seen_ns > 0);
    assert_ne!(
        o.tcp_flags_seen & firewall_common::flow::tcp_seen::FIN,
        0,
        "FIN seen"
    );

    // UDP, the same.
    let (uout, uback) = install_snat(IPPROTO_UDP, addr::CLIENT, 40002, addr::SERVER, 9001, 61002);
    let got = exchange(lab, IPPROTO_UDP, 40002, 9001, "ping-over-udp");
    assert_eq!(got, format!("{} 61002\nping-over-udp\n", addr::FW_EXTERNAL));
    assert!(flow(&uout).packets >= 1 && flow(&uback).packets >= 1);

    // A bulk transfer (many full-size, CHECKSUM_PARTIAL segments) arrives intact.
    let dir = std::env::temp_dir().join(format!("{}-bulk", lab.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let (send, recv) = (dir.join("send"), dir.join("recv"));
    let data: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&send, &data).unwrap();
    let (bout, bback) = install_snat(IPPROTO_TCP, addr::CLIENT, 40003, addr::SERVER, 9002, 61003);
    let mut bsrv = lab
        .server
        .spawn(&format!(
            "exec socat -u -T10 TCP-LISTEN:9002,bind={},reuseaddr CREATE:{}",
            addr::SERVER,
            recv.display()
        ))
        .unwrap();
    wait_listening(&lab.server, 9002);
    lab.client
        .sh(&format!(
            "socat -u -T10 OPEN:{} TCP:{}:9002,bind={}:40003",
            send.display(),
            addr::SERVER,
            addr::CLIENT
        ))
        .unwrap();
    let _ = bsrv.wait();
    let got = std::fs::read(&recv).unwrap();
    assert!(
        got == data,
        "8 MiB arrived byte for byte ({} of {} bytes)",
        got.len(),
        data.len()
    );
    let bo = flow(&bout);
    assert!(
        bo.bytes as usize > data.len(),
        "the bytes went through the flow entry: {bo:?}"
    );
    assert!(flow(&bback).packets > 0);
    std::fs::remove_dir_all(&dir).ok();

    assert_eq!(fw.counter("drop_malformed"), 0);
    assert_eq!(fw.counter("drop_checksum"), 0);
    assert!(fw.counter("redirected") > 100);
    let s = fw.status();
    assert!(
        s["maps"][0]["entries"].as_u64().unwrap() >= 6,
        "{}",
        s["maps"][0]
    );
}

#[test]
fn bpftool_dumps_are_readable() {
    let mut run = LabRun::start("btf", &[]);
    let LabRun { lab, .. } = &mut run;
    install_snat(IPPROTO_TCP, addr::CLIENT, 40010, addr::SERVER, 21, 61010);

    let dump: Value = serde_json::from_str(
        &lab.fw
            .sh("bpftool -j map dump pinned /sys/fs/bpf/firewall/FLOWS")
            .unwrap(),
    )
    .unwrap();
    let entries: Vec<&Value> = dump
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["formatted"])
        .collect();
    assert_eq!(entries.len(), 2, "{dump}");
    let out = *entries
        .iter()
        .find(|e| e["key"]["src_port"] == 40010)
        .expect("outbound entry by named field");
    assert_eq!(out["key"]["src_addr"], serde_json::json!([10, 1, 0, 2]));
    assert_eq!(out["key"]["dst_addr"], serde_json::json!([10, 2, 0, 2]));
    assert_eq!(out["key"]["dst_port"], 21);
    assert_eq!(out["key"]["protocol"], 6);
    assert_eq!(
        out["value"]["nat_src_addr"],
        serde_json::json!([10, 2, 0, 1])
    );
    assert_eq!(out["value"]["nat_src_port"], 61010);
    for field in [
        "packets",
        "bytes",
        "last_seen_ns",
        "tcp_flags_seen",
        "egress_ifindex",
        "action",
        "owner",
    ] {
        assert!(
            out["value"].get(field).is_some(),
            "field {field} in {}",
            out["value"]
        );
    }
    let stats: Value = serde_json::from_str(
        &lab.fw
            .sh("bpftool -j map dump pinned /sys/fs/bpf/firewall/STATS")
            .unwrap(),
    )
    .unwrap();
    assert!(
        stats[0]["formatted"]["values"][0]["value"]
            .get("packets")
            .is_some(),
        "{}",
        stats[0]
    );
    // The human form too.
    let text = lab
        .fw
        .sh("bpftool map dump pinned /sys/fs/bpf/firewall/FLOWS")
        .unwrap();
    assert!(text.contains("\"nat_dst_port\": 21"), "{text}");
}

#[test]
fn a_crashed_daemon_leaves_forwarding_up_and_down_or_up_take_over() {
    let mut run = LabRun::start("crash", &[]);
    let LabRun { lab, fw, .. } = &mut run;
    prime_neighbours(lab);
    let (out, _) = install_snat(IPPROTO_UDP, addr::CLIENT, 40020, addr::SERVER, 9020, 61020);
    let send = |tag: &str| exchange(lab, IPPROTO_UDP, 40020, 9020, tag);
    assert_eq!(
        send("before"),
        format!("{} 61020\nbefore\n", addr::FW_EXTERNAL)
    );

    // A crash (SIGKILL): the pinned links keep the programs attached and flows forwarding.
    fw.crash();
    assert!(std::path::Path::new(firewall_common::PIN_DIR)
        .join("link_internal")
        .exists());
    assert!(
        send("while-down").ends_with("while-down\n"),
        "kernel forwarding survives the daemon"
    );

    // A new daemon re-adopts the datapath: the flow and its counters are still there.
    let before = flow(&out).packets;
    let mut fw2 = Firewall::up(lab, &[]).unwrap();
    assert!(fw2.log_text().contains("re-adopt"), "{}", fw2.log_text());
    assert_eq!(flow(&out).packets, before);
    assert!(send("after").ends_with("after\n"));
    assert!(flow(&out).packets > before);

    // Crash again, then `down` alone cleans up.
    fw2.crash();
    let down = ctl_in(&lab.fw, &["--socket", &fw2.socket, "down", "-j"]);
    assert!(down.status.success(), "{down:?}");
    let report: Value = serde_json::from_slice(&down.stdout).unwrap();
    assert_eq!(report["stopped_daemon"], false);
    assert_eq!(
        report["removed_pins"].as_array().unwrap().len(),
        26,
        "two links and twenty-four maps: {report}"
    );
    let link: Value = serde_json::from_str(
        &lab.fw
            .sh(&format!("ip -j -d link show {}", addr::IF_INTERNAL))
            .unwrap(),
    )
    .unwrap();
    assert!(link[0].get("xdp").is_none(), "{}", link[0]);
}

#[test]
fn generic_mode_by_option() {
    let mut run = LabRun::start("gen", &["--xdp-mode", "generic"]);
    let LabRun { lab, fw, .. } = &mut run;
    let net: Value = serde_json::from_str(&lab.fw.sh("bpftool -j net").unwrap()).unwrap();
    for e in net[0]["xdp"].as_array().unwrap() {
        assert_eq!(e["mode"], "generic", "{e}");
    }
    assert_eq!(fw.status()["interfaces"][0]["xdp_mode"], "generic");
}

/// Native XDP forwards into a device only if its driver takes redirected
/// frames (a veth: when its peer has GRO or an XDP program). Named
/// explicitly on a segment where that is missing, `up` says which device
/// will drop what is forwarded to it (chosen by itself, it would take TC).
#[test]
fn native_xdp_names_a_device_that_takes_no_redirected_frames() {
    require_root();
    let _g = exclusive();
    let lab = Lab::create(&unique_prefix("ndox")).unwrap();
    lab.switch_external()
        .sh("ethtool -K fw gro off >/dev/null")
        .unwrap();
    let fw = Firewall::up(&lab, &["--xdp-mode", "native"]).unwrap();
    let log = fw.log_text();
    let warning = log
        .lines()
        .find(|l| l.contains("takes no redirected frames"))
        .unwrap_or_else(|| panic!("no warning: {log}"));
    assert!(warning.contains(addr::IF_EXTERNAL), "{warning}");
    assert!(!warning.contains(addr::IF_INTERNAL), "{warning}");
    assert_eq!(fw.status()["interfaces"][1]["xdp_mode"], "native");
}

/// A driver that refuses native XDP (a veth whose peer's MTU is beyond what
/// XDP takes: ERANGE) when `native` is named: `up` fails as an invalid
/// argument naming the device and why, and leaves nothing attached or pinned
/// (chosen by itself, it would fall back to TC).
#[test]
fn a_named_native_xdp_the_driver_refuses_fails_cleanly() {
    require_root();
    let _g = exclusive();
    let lab = Lab::create(&unique_prefix("ndrf")).unwrap();
    lab.switch_external().sh("ip link set fw mtu 9000").unwrap();
    let e = Firewall::up(&lab, &["--xdp-mode", "native"])
        .err()
        .expect("up fails");
    let e = format!("{e:#}");
    assert!(e.contains("invalid-argument"), "{e}");
    assert!(
        e.contains(addr::IF_EXTERNAL) && e.contains("out of range"),
        "{e}"
    );
    let link: Value = serde_json::from_str(
        &lab.fw
            .sh(&format!("ip -j -d link show {}", addr::IF_INTERNAL))
            .unwrap(),
    )
    .unwrap();
    assert!(
        link[0].get("xdp").is_none(),
        "nothing left attached: {}",
        link[0]
    );
    assert!(
        !lab.fw.try_sh("ls /sys/fs/bpf/firewall/FLOWS"),
        "nothing left pinned"
    );
}

/// Without `--xdp-mode`, `up` picks the hook by the interfaces' kind: TC on
/// veth (XDP there would turn off the peers' GSO and GRO), and says why.
#[test]
fn the_default_mode_is_tc_on_veth() {
    let mut run = LabRun::start("auto", &["--xdp-mode", "auto"]);
    let LabRun { lab, fw, .. } = &mut run;
    let net: Value = serde_json::from_str(&lab.fw.sh("bpftool -j net").unwrap()).unwrap();
    assert!(
        net[0]["xdp"].as_array().is_none_or(|a| a.is_empty()),
        "no XDP program: {net}"
    );
    for i in fw.status()["interfaces"].as_array().unwrap() {
        assert_eq!(i["xdp_mode"], "tc", "{i}");
    }
    assert!(
        fw.log_text()
            .contains("a veth interface keeps its offloads at TC"),
        "{}",
        fw.log_text()
    );
    // It forwards at TC like the named mode.
    prime_neighbours(lab);
    let got = exchange(lab, IPPROTO_TCP, 5000, 9000, "auto");
    assert_eq!(got, format!("{} 5000\nauto\n", addr::FW_EXTERNAL));
}

#[test]
fn bad_arguments_and_configs_get_clear_errors() {
    require_root();
    let _g = exclusive();
    let lab = Lab::create(&unique_prefix("err")).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-cfg", lab.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let unknown_key = cfg("a.toml", "[maps]\nflowz = 10\n");
    let bad_cidr = cfg(
        "b.toml",
        "[addresses]\ninternal_networks = [\"10.1.0.0/33\"]\n",
    );
    let not_ours = cfg(
        "c.toml",
        "[addresses]\nexternal_addresses = [\"10.2.0.77\"]\n",
    );
    let too_small = cfg("d.toml", "[maps]\nflows = 5\n");
    let missing = dir.join("missing.toml").display().to_string();

    let up = |extra: &[&str]| {
        let mut args = vec!["--socket", "/run/firewall/err-test.sock", "up"];
        args.extend_from_slice(extra);
        ctl_in(&lab.fw, &args)
    };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--internal", "nosuch0", "--external", "vfe"],
            "interface \"nosuch0\" does not exist",
        ),
        (
            vec!["--internal", "vfi", "--external", "vfi"],
            "must be different interfaces",
        ),
        (
            vec!["--internal", "../x", "--external", "vfe"],
            "not a valid interface name",
        ),
        (
            vec![
                "--internal",
                "vfi",
                "--external",
                "vfe",
                "--config",
                &unknown_key,
            ],
            "unknown field `flowz`",
        ),
        (
            vec![
                "--internal",
                "vfi",
                "--external",
                "vfe",
                "--config",
                &bad_cidr,
            ],
            "addresses.internal_networks[0]",
        ),
        (
            vec![
                "--internal",
                "vfi",
                "--external",
                "vfe",
                "--config",
                &not_ours,
            ],
            "10.2.0.77 is not an address of interface vfe",
        ),
        (
            vec![
                "--internal",
                "vfi",
                "--external",
                "vfe",
                "--config",
                &too_small,
            ],
            "maps.flows: 5 is out of range",
        ),
        (
            vec![
                "--internal",
                "vfi",
                "--external",
                "vfe",
                "--config",
                &missing,
            ],
            "cannot read config file",
        ),
        (
            vec![
                "--internal",
                "vfi",
                "--external",
                "vfe",
                "--xdp-mode",
                "turbo",
            ],
            "invalid value 'turbo'",
        ),
        (vec!["--internal", "vfi"], "--external"),
    ];
    for (args, want) in cases {
        let out = up(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains(want), "{args:?}: wanted {want:?} in: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // Nothing was attached or pinned by the failed attempts.
    assert!(!std::path::Path::new(firewall_common::PIN_DIR).exists());
    let net: Value = serde_json::from_str(&lab.fw.sh("bpftool -j net").unwrap()).unwrap();
    assert!(net[0]["xdp"].as_array().unwrap().is_empty());

    // JSON errors with -j.
    let out = up(&["-j", "--internal", "nosuch0", "--external", "vfe"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON error on stdout");
    assert_eq!(v["error"]["kind"], "invalid-argument");
    assert!(v["error"]["message"].as_str().unwrap().contains("nosuch0"));
    let out = ctl_in(
        &lab.fw,
        &["-j", "--socket", "/run/firewall/nobody.sock", "status"],
    );
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON error on stdout");
    assert_eq!(v["error"]["kind"], "not-running");
    let out = ctl_in(&lab.fw, &["-j", "frobnicate"]);
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON error for a bad subcommand");
    assert_eq!(v["error"]["kind"], "invalid-argument");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn idle_and_closed_flows_expire() {
    require_root();
    let _g = exclusive();
    let lab = Lab::create(&unique_prefix("exp")).unwrap();
    let cfg = std::env::temp_dir().join(format!("{}.toml", lab.prefix));
    std::fs::write(
        &cfg,
        "[timeouts]\nudp_idle = 2\ntcp_closing = 1\ntcp_established = 3600\n",
    )
    .unwrap();
    let fw = Firewall::up(&lab, &["--config", cfg.to_str().unwrap()]).unwrap();
    prime_neighbours(&lab);

    // A TCP connection that closes normally: FIN both ways, then tcp_closing.
    let (tout, tback) = install_snat(IPPROTO_TCP, addr::CLIENT, 40030, addr::SERVER, 9030, 61030);
    // An established-but-open TCP flow pair stays (tcp_established is long).
    let (open_out, _) = install_snat(IPPROTO_TCP, addr::CLIENT, 40031, addr::SERVER, 9031, 61031);
    // A UDP pair that is never used: expires after udp_idle.
    let (uout, uback) = install_snat(IPPROTO_UDP, addr::CLIENT, 40032, addr::SERVER, 9032, 61032);

    let got = exchange(&lab, IPPROTO_TCP, 40030, 9030, "bye");
    assert!(got.ends_with("bye\n"), "{got}");

    let table = || FlowTable::open(&PinPaths::default()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let t = table();
        let gone = |k: &FlowKey| t.get(k).unwrap().is_none();
        if gone(&tout) && gone(&tback) && gone(&uout) && gone(&uback) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "flows did not expire: {:?}",
            t.entries().unwrap()
        );
        thread::sleep(Duration::from_millis(200));
    }
    assert!(
        table().get(&open_out).unwrap().is_some(),
        "an open, recently installed TCP flow stays"
    );
    let s = fw.status();
    assert_eq!(
        s["flows_expired"]["tcp_closed"], 2,
        "{}",
        s["flows_expired"]
    );
    assert_eq!(s["flows_expired"]["udp_idle"], 2, "{}", s["flows_expired"]);
    std::fs::remove_file(&cfg).ok();
}
