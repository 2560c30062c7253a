//! The self-contained demo behind `cargo xtask demo`: builds the namespace lab,
//! runs the firewall on it, opens secondary connections with BindForClient and
//! RedirectConnections through the CLI, sends real traffic through them (the
//! XDP datapath forwards it in the kernel), shows what the firewall saw and
//! refused, and cleans up.

use anyhow::{bail, Context as _};
use firewall_common::IPPROTO_TCP;
use firewall_tests::{
    daemon::Firewall,
    lab::{addr, unique_prefix, Lab},
    traffic::{echo_server, port_of, prime_neighbours, send, tcp_connects, wait_listening},
};
use serde_json::Value;

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

fn s(v: &Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
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
        "    client {} ({} is another internal host) ── [{} {} | firewall | {} {}] ── server {} ({} another external host)",
        addr::CLIENT, addr::CLIENT2, addr::IF_INTERNAL, addr::FW_INTERNAL, addr::IF_EXTERNAL, addr::FW_EXTERNAL, addr::SERVER, addr::EXTERNAL2
    );
    println!(
        "    The server has no route back to 10.1.0.0/24: only translated packets get answers."
    );

    step(
        2,
        &format!(
            "firewall-ctl up --internal {} --external {}",
            addr::IF_INTERNAL,
            addr::IF_EXTERNAL
        ),
    );
    let fw = Firewall::up(&lab, &[])?;
    for l in lab
        .fw
        .sh("bpftool net show | sed -n '/xdp:/,/^$/p'")?
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        println!("    bpftool net: {l}");
    }
    prime_neighbours(&lab);

    step(
        3,
        "A session for the client, and BindForClient for its listening socket 10.1.0.2:5001",
    );
    println!("    (what an FTP filter does for `PORT 10,1,0,2,19,137`; only the server may connect, single use):");
    let sess = fw.session(addr::CLIENT);
    let b = fw.try_ok(&[
        "bind-for-client",
        "--session",
        &sess,
        "--client",
        "10.1.0.2:5001",
        "--protocol",
        "tcp",
        "--allow-peer",
        addr::SERVER,
        "--context",
        "demo-transfer",
    ])?;
    let proxy = s(&b["proxy_address"]);
    let id = s(&b["connections"][0]["id"]);
    println!(
        "    → proxy address {proxy} (connection {id}); the FTP filter would rewrite PORT to it"
    );

    let size = 16 * 1024 * 1024;
    let dir = std::env::temp_dir().join(format!("{}-files", lab.prefix));
    std::fs::create_dir_all(&dir)?;
    let (file, recv) = (dir.join("data"), dir.join("recv"));
    let data: Vec<u8> = (0..size as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(&file, &data)?;
    step(
        4,
        &format!(
            "The server connects to {proxy} and sends {} MiB to the client:",
            size >> 20
        ),
    );
    let mut client = lab.client.spawn(&format!(
        "exec socat -u -T10 TCP-LISTEN:5001,bind={} CREATE:{}",
        addr::CLIENT,
        recv.display()
    ))?;
    wait_listening(&lab.client, 5001);
    let started = std::time::Instant::now();
    lab.server.sh(&format!(
        "socat -u -T10 OPEN:{} TCP:{proxy}",
        file.display()
    ))?;
    client.wait()?;
    let secs = started.elapsed().as_secs_f64();
    let got = std::fs::read(&recv)?;
    std::fs::remove_dir_all(&dir).ok();
    println!(
        "    arrived intact: {} ({} bytes, {:.2} Gbit/s)",
        got == data,
        got.len(),
        size as f64 * 8.0 / secs / 1e9
    );
    let conn = fw
        .list("connections")
        .into_iter()
        .find(|c| s(&c["id"]) == id)
        .context("connection listed")?;
    println!(
        "    connection {id}: state {}, mode {}, peer {}, {} packets / {} bytes in its flows",
        s(&conn["state"]),
        s(&conn["mode"]),
        s(&conn["peer"]),
        conn["packets"],
        conn["bytes"]
    );
    println!(
        "    sockets in the firewall carrying it: {}",
        if lab.fw.sh("ss -Htn state established")?.trim().is_empty() {
            "none (the bytes never left the kernel's XDP path)"
        } else {
            "some"
        }
    );

    step(5, "What was refused:");
    let _again = echo_server(&lab.client, IPPROTO_TCP, addr::CLIENT, 5001);
    println!(
        "    a second connection to {proxy} (single use): {}",
        if tcp_connects(&lab.server, &proxy) {
            "ACCEPTED?!"
        } else {
            "refused"
        }
    );
    match fw.call(&["bind-for-client", "--session", &sess, "--client", "10.1.0.3:25", "--protocol", "tcp"]) {
        Err((kind, msg)) => println!("    BindForClient for another internal host (an FTP bounce through the firewall): {kind}\n      {msg}"),
        Ok(v) => println!("    bounce ACCEPTED?! {v}"),
    }

    step(6, "RedirectConnections: the client reaches the server's 2000 through the firewall's internal address");
    println!("    (what an FTP filter does for a `227` reply, so the data connection leaves from the same external address):");
    let rc = fw.try_ok(&[
        "redirect-connections",
        "--session",
        &sess,
        "--connect",
        "10.2.0.2:2000",
        "--protocol",
        "tcp",
    ])?;
    let internal = s(&rc["internal_address"]);
    println!("    → internal address {internal}");
    let mut srv = echo_server(&lab.server, IPPROTO_TCP, addr::SERVER, 2000);
    let answer = send(
        &lab.client,
        IPPROTO_TCP,
        (addr::CLIENT, 40999),
        (addr::FW_INTERNAL, port_of(&internal)),
        "hello over the redirect",
    );
    let _ = srv.wait();
    let (seen, echoed) = answer.split_once('\n').unwrap_or((&answer, ""));
    println!(
        "    the server saw the connection come from {} and echoed {:?}",
        seen,
        echoed.trim()
    );

    step(7, "The flow table (firewall-ctl list flows; bpftool map dump pinned /sys/fs/bpf/firewall/FLOWS):");
    for f in fw.list("flows") {
        println!(
            "    {} {:>21} → {:<21} as {:>21} → {:<21} {:>6} packets  (connection {})",
            s(&f["protocol"]),
            s(&f["from"]),
            s(&f["to"]),
            s(&f["nat_from"]),
            s(&f["nat_to"]),
            f["packets"],
            f["owner"]
        );
    }

    step(8, "Datapath counters (firewall-ctl status):");
    let st = fw.status();
    for c in st["counters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["packets"].as_u64().unwrap_or(0) > 0)
    {
        println!(
            "    {:<30} {:>9} packets  {}",
            s(&c["name"]),
            c["packets"],
            s(&c["help"])
        );
    }

    step(9, "firewall-ctl down");
    drop(fw);
    println!("    programs detached, pins removed; deleting the lab");
    drop(lab);
    if got != data {
        bail!("the transfer did not arrive intact");
    }
    println!("\nDone. On real NICs: firewall-ctl up --internal IF --external IF");
    Ok(())
}
