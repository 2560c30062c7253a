//! The self-contained demo behind `cargo xtask demo`: builds the namespace lab,
//! runs the firewall on it, sends real traffic through a translated flow that
//! the XDP datapath forwards, shows what the maps and counters say, and cleans up.

use anyhow::{bail, Context as _};
use firewall_common::IPPROTO_TCP;
use firewall_tests::{
    daemon::Firewall,
    lab::{addr, unique_prefix, Lab},
    traffic::{flow, install_snat, prime_neighbours, wait_listening},
};

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

fn main() {
    if let Err(e) = run() {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    if !xtask::is_root() {
        bail!("the demo needs root (BPF, network namespaces)");
    }
    let lab = Lab::create(&unique_prefix("demo")).context("creating the lab")?;
    step(1, "Lab (network namespaces, veth pairs):");
    println!(
        "    client {}  ── [{} {} | firewall | {} {}] ──  server {}",
        addr::CLIENT,
        addr::IF_INTERNAL,
        addr::FW_INTERNAL,
        addr::IF_EXTERNAL,
        addr::FW_EXTERNAL,
        addr::SERVER
    );
    println!("    The server has no route back to 10.1.0.0/24: only correctly translated packets get answers.");

    step(
        2,
        &format!(
            "firewall-ctl up --internal {} --external {}",
            addr::IF_INTERNAL,
            addr::IF_EXTERNAL
        ),
    );
    let fw = Firewall::up(&lab, &[])?;
    let net = lab.fw.sh("bpftool net show | sed -n '/xdp:/,/^$/p'")?;
    for l in net.lines().filter(|l| !l.trim().is_empty()) {
        println!("    bpftool net: {l}");
    }

    step(
        3,
        "Unhandled traffic still reaches the firewall itself (ping 10.1.0.1):",
    );
    lab.client
        .sh(&format!("ping -c1 -W2 {}", addr::FW_INTERNAL))?;
    println!("    ok");

    let (cport, sport, nat) = (40000u16, 8080u16, 61000u16);
    step(4, &format!(
        "Installing a translated TCP flow through the firewall-ctl library:\n    {}:{cport} -> {}:{sport} leaves as {}:{nat}, and the reply direction back",
        addr::CLIENT, addr::SERVER, addr::FW_EXTERNAL
    ));
    let (out, back) = install_snat(IPPROTO_TCP, addr::CLIENT, cport, addr::SERVER, sport, nat);
    prime_neighbours(&lab);

    let dir = std::env::temp_dir().join(format!("{}-files", lab.prefix));
    std::fs::create_dir_all(&dir)?;
    let (send, recv, peer) = (dir.join("send"), dir.join("recv"), dir.join("peer"));
    let size = 16 * 1024 * 1024;
    let data: Vec<u8> = (0..size as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(&send, &data)?;
    step(
        5,
        &format!(
            "Sending {} MiB from the client to the server with socat...",
            size >> 20
        ),
    );
    let mut server = lab.server.spawn(&format!(
        "exec socat -u -T10 TCP-LISTEN:{sport},bind={},reuseaddr SYSTEM:'echo $SOCAT_PEERADDR $SOCAT_PEERPORT >{}; cat >{}'",
        addr::SERVER,
        peer.display(),
        recv.display()
    ))?;
    wait_listening(&lab.server, sport);
    let started = std::time::Instant::now();
    lab.client.sh(&format!(
        "socat -u -T10 OPEN:{} TCP:{}:{sport},bind={}:{cport}",
        send.display(),
        addr::SERVER,
        addr::CLIENT
    ))?;
    server.wait()?;
    let secs = started.elapsed().as_secs_f64();
    let got = std::fs::read(&recv)?;
    let seen = std::fs::read_to_string(&peer)?;
    println!(
        "    arrived intact: {} ({} of {} bytes, {:.2} Gbit/s)",
        got == data,
        got.len(),
        data.len(),
        size as f64 * 8.0 / secs / 1e9
    );
    println!(
        "    the server saw the connection come from: {}",
        seen.trim()
    );
    std::fs::remove_dir_all(&dir).ok();

    step(6, "The flow entries, forwarded by XDP without the Linux stack (firewall-ctl library; same as bpftool map dump pinned /sys/fs/bpf/firewall/FLOWS):");
    for (name, key) in [("client -> server", &out), ("server -> client", &back)] {
        let v = flow(key);
        println!("    {name}: {} packets, {} bytes", v.packets, v.bytes);
    }

    step(7, "Datapath counters (firewall-ctl status):");
    let s = fw.status();
    for c in s["counters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["packets"].as_u64().unwrap_or(0) > 0)
    {
        println!(
            "    {:<22} {:>9} packets  {}",
            c["name"].as_str().unwrap_or(""),
            c["packets"],
            c["help"].as_str().unwrap_or("")
        );
    }

    step(8, "firewall-ctl down");
    drop(fw);
    println!("    programs detached, pins removed; deleting the lab");
    drop(lab);
    if got != data {
        bail!("the transfer did not arrive intact");
    }
    println!("\nDone. On real NICs: firewall-ctl up --internal IF --external IF");
    Ok(())
}
