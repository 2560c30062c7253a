//! The self-contained demo behind `cargo xtask demo`: builds the namespace lab,
//! runs the firewall on it, and has a real FTP client (curl, lftp, ftplib)
//! talk to a real FTP server (vsftpd) through it: an active and a passive
//! download and an upload, whose data connections the firewall opens as
//! pinholes and forwards in the kernel; then a bounce attempt it refuses, a
//! TFTP download (tftp-hpa from tftpd-hpa) through the kernel's TFTP helper,
//! and the wall.
//! Prints what happened and cleans up.

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use firewall_tests::{
    daemon::Firewall,
    ftp::{python, sha256, FtpServer},
    lab::{addr, unique_prefix, Lab},
    tftp::TftpServer,
    traffic::prime_neighbours,
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

/// Runs a client command in the client namespace while sampling the flow
/// table; returns the seconds it took and the flows that carried packets
/// meanwhile, at their busiest.
fn transfer(lab: &Lab, fw: &Firewall, command: &str) -> anyhow::Result<(f64, Vec<Value>)> {
    let key = |f: &Value| format!("{}{}{}", s(&f["protocol"]), s(&f["from"]), s(&f["to"]));
    let before: std::collections::HashMap<String, u64> = fw
        .list("flows")
        .iter()
        .map(|f| (key(f), f["packets"].as_u64().unwrap_or(0)))
        .collect();
    let grown = |flows: Vec<Value>| -> Vec<Value> {
        flows
            .into_iter()
            .filter(|f| {
                f["packets"].as_u64().unwrap_or(0) > before.get(&key(f)).copied().unwrap_or(0)
            })
            .collect()
    };
    let started = Instant::now();
    let mut child = lab
        .client
        .cmd("sh")
        .args(["-c", command])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let mut busiest: Vec<Value> = Vec::new();
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("`{command}` failed ({status})");
            }
            break;
        }
        let flows = grown(fw.list("flows"));
        let total = |f: &[Value]| {
            f.iter()
                .map(|x| x["packets"].as_u64().unwrap_or(0))
                .sum::<u64>()
        };
        if total(&flows) > total(&busiest) {
            busiest = flows;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((started.elapsed().as_secs_f64(), busiest))
}

fn print_flows(flows: &[Value]) {
    for f in flows {
        println!(
            "      {} {:>16} → {:<16} as {:>16} → {:<16} {:>7} packets (connection {})",
            s(&f["protocol"]),
            s(&f["from"]),
            s(&f["to"]),
            s(&f["nat_from"]),
            s(&f["nat_to"]),
            f["packets"],
            f["owner"]
        );
    }
}

/// The FTP filter's log lines since `from` (what it rewrote and refused).
fn filter_log(fw: &Firewall, from: &mut usize) {
    let text = fw.log_text();
    for line in text.lines().skip(*from) {
        let ours = line.contains("firewall_ctl::ftp]") || line.contains("firewall_ctl::primary]");
        if let (true, Some(i)) = (ours, line.find("ftp ")) {
            println!("      daemon: {}", &line[i..]);
        }
    }
    *from = text.lines().count();
}

fn check_same(what: &str, a: &Path, b: &Path) -> anyhow::Result<()> {
    let same = sha256(a) == sha256(b);
    println!("    {what}: identical byte for byte (sha256): {same}");
    if !same {
        bail!("{what}: the file did not arrive intact");
    }
    Ok(())
}

fn run() -> anyhow::Result<()> {
    if !firewall_lab::is_root() {
        bail!("the demo needs root (BPF, network namespaces)");
    }
    let lab = Lab::create(&unique_prefix("demo")).context("creating the lab")?;
    step(1, "Lab (network namespaces, veth pairs):");
    println!(
        "    client {} ({} another internal host) ── [{} {} | firewall | {} {}] ── FTP server {} ({} another external host)",
        addr::CLIENT, addr::CLIENT2, addr::IF_INTERNAL, addr::FW_INTERNAL, addr::IF_EXTERNAL, addr::FW_EXTERNAL, addr::SERVER, addr::EXTERNAL2
    );
    println!("    The server has no route back to 10.1.0.0/24: only what the firewall translates gets answers.");

    step(
        2,
        &format!(
            "firewall-ctl up --internal {} --external {}   (the FTP filter is on by default)",
            addr::IF_INTERNAL,
            addr::IF_EXTERNAL
        ),
    );
    // The FTP filter logs each rewrite at debug level (one info line per
    // control connection): the demo shows them.
    std::env::set_var(
        "FIREWALL_TEST_LOG",
        "info,firewall_ctl::ftp=debug,firewall_ctl::primary=debug",
    );
    let fw = Firewall::up(&lab, &[])?;
    for l in lab
        .fw
        .sh("bpftool net show | grep -E 'vf[ie]'")?
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        println!("    bpftool net: {}", l.trim());
    }
    println!("    XDP forwards flows and opens pinholes; a TC program hands FTP control connections (TCP 21)");
    println!("    to the daemon, transparently: the client needs no configuration, no netfilter rule is used.");

    // A freshly built lab loses its very first packets for a moment; let it settle.
    prime_neighbours(&lab);
    let server = FtpServer::start(&lab.server, &lab.prefix)?;
    let size: u64 = 64 * 1024 * 1024;
    let file = server.random_file("demo.bin", size)?;
    let dir = std::env::temp_dir().join(format!("{}-files", lab.prefix));
    std::fs::create_dir_all(&dir)?;
    println!(
        "    vsftpd runs on {} with demo.bin ({} MiB of random bytes)",
        addr::SERVER,
        size >> 20
    );
    let mut log_from = fw.log_text().lines().count();

    let url = format!("ftp://{}/demo.bin", addr::SERVER);
    let downloads = [
        (
            3,
            "Active mode: curl -P - (EPRT: the server connects back to the client)",
            "-P -",
        ),
        (
            4,
            "Passive mode: curl (EPSV: the client connects to the server's data port)",
            "",
        ),
    ];
    for (n, title, flags) in downloads {
        step(n, title);
        let got = dir.join(format!("got{n}"));
        // Limited so that the flow table can be watched while it runs.
        let (secs, flows) = transfer(
            &lab,
            &fw,
            &format!(
                "curl -sS --limit-rate 200M {flags} -o '{}' '{url}'",
                got.display()
            ),
        )?;
        filter_log(&fw, &mut log_from);
        println!(
            "    downloaded {} MiB in {secs:.2} s (rate-limited to 200 MB/s to watch it)",
            size >> 20
        );
        check_same("demo.bin", &file, &got)?;
        println!("    flows in the kernel while it ran (firewall-ctl list flows):");
        print_flows(&flows);
        std::fs::remove_file(&got).ok();
    }

    step(5, "Upload: lftp put (passive), full speed");
    let (secs, _) = transfer(
        &lab,
        &fw,
        &format!(
            "lftp -c 'open -u anonymous,x@ {}; put {} -o incoming/up.bin'",
            addr::SERVER,
            file.display()
        ),
    )?;
    filter_log(&fw, &mut log_from);
    println!(
        "    uploaded {} MiB in {secs:.2} s ({:.2} Gbit/s)",
        size >> 20,
        size as f64 * 8.0 / secs / 1e9
    );
    check_same("incoming/up.bin", &file, &server.uploaded("up.bin"))?;

    step(
        6,
        "Where the data went: connections (firewall-ctl list connections)",
    );
    for c in fw.list("connections") {
        println!(
            "    connection {:>2}: {:<8} {:<6} mode {:<6} {} → {}  {} packets, {} bytes",
            s(&c["id"]),
            s(&c["kind"]),
            s(&c["state"]),
            s(&c["mode"]),
            s(&c["endpoint"]),
            s(&c["target"]),
            c["packets"],
            c["bytes"]
        );
    }
    let sockets = lab
        .fw
        .sh("ss -Htn state established | grep -v ':21 ' || true")?;
    println!(
        "    data sockets in the firewall: {}",
        if sockets.trim().is_empty() {
            "none: the data never left the kernel's XDP path"
        } else {
            "some (user mode)"
        }
    );

    step(
        7,
        "A bounce: ftplib sends PORT 10,1,0,3,0,25 (another internal host's SMTP port)",
    );
    let out = python(
        &lab.client,
        &format!(
            "f=ftplib.FTP('{}', timeout=20); f.login()\n\
             try:\n    print(f.sendcmd('PORT 10,1,0,3,0,25'))\n\
             except ftplib.error_perm as e:\n    print(e)\n\
             f.quit()",
            addr::SERVER
        ),
    );
    println!(
        "    the firewall answered: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    filter_log(&fw, &mut log_from);

    step(
        8,
        "TFTP: tftp-hpa gets a file from tftpd-hpa, which answers from a port of its own",
    );
    // TFTP moves 512-byte blocks one at a time: a boot image of 1 MiB.
    let tftpd = TftpServer::start(&lab.server, &lab.prefix)?;
    let tftp_file = tftpd.random_file("boot.img", 1 << 20)?;
    let got = dir.join("tftp-got");
    let fetched = lab.client.try_sh(&format!(
        "timeout 30 tftp -m binary {} -c get boot.img {}",
        addr::SERVER,
        got.display()
    ));
    if !fetched {
        bail!("the TFTP transfer failed");
    }
    check_same("boot.img", &tftp_file, &got)?;
    drop(tftpd);
    println!(
        "    the server's first answer came from its transfer port; the kernel's TFTP helper let it in \
         (redirect_tftp_established: {}) and tracked the transfer",
        fw.counter("redirect_tftp_established")
    );

    step(
        9,
        "The wall: the server routes 10.1.0.0/24 through the firewall and tries the client directly",
    );
    lab.server
        .sh(&format!(
            "ip route add 10.1.0.0/24 via {}",
            addr::FW_EXTERNAL
        ))
        .context("adding the attacker's route")?;
    let got_in = lab.server.try_sh(&format!(
        "ping -c1 -W1 {c} >/dev/null || socat -T1 /dev/null TCP:{c}:22,connect-timeout=1",
        c = addr::CLIENT
    ));
    println!(
        "    from outside to {}: {}",
        addr::CLIENT,
        if got_in {
            "reached (unexpected)"
        } else {
            "nothing gets in (ping and TCP dropped: drop_no_flow)"
        }
    );
    let pinged = lab.client.try_sh(&format!("ping -c1 -W2 {}", addr::SERVER));
    println!(
        "    from the client, ping {} through the NAT: {}",
        addr::SERVER,
        if pinged { "answered" } else { "no answer" }
    );

    step(10, "Counters (firewall-ctl status):");
    let st = fw.status();
    let f = &st["ftp"];
    println!(
        "    ftp filter: {} control connections, {} active and {} passive data connections opened, {} bounce refused",
        f["control_connections"], f["active_opened"], f["passive_opened"], f["bounces_refused"]
    );
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
    let refused = f["bounces_refused"].as_u64().unwrap_or(0);

    step(11, "firewall-ctl down");
    drop(fw);
    println!("    programs detached, pins and routing rule removed; deleting the lab");
    drop(server);
    drop(lab);
    std::fs::remove_dir_all(&dir).ok();
    if refused != 1 {
        bail!("the bounce was not refused");
    }
    if got_in || !pinged {
        bail!("the wall did not hold (in: {got_in}) or let the client out (ping: {pinged})");
    }
    println!("\nDone. On real NICs: firewall-ctl up --internal IF --external IF");
    Ok(())
}
