//! Section 1: the secondary-connection data path in the namespace lab.

use crate::*;

pub(crate) fn data_path(opts: &Opts, r: &mut Results) -> anyhow::Result<()> {
    let lab = Lab::create_direct(&unique_prefix("bench")).context("creating the lab")?;
    prime_neighbours(&lab);
    let server = FtpServer::start(&lab.server, &lab.prefix)?;
    let size: u64 = if opts.quick { 256 << 20 } else { 2 << 30 };
    // Sparse: vsftpd sends it with sendfile, the disk plays no part.
    sh(&format!(
        "truncate -s {size} '{}' && chmod 644 '{}'",
        server.root.join("big.bin").display(),
        server.root.join("big.bin").display()
    ));
    let mut progs = BenchPrograms::load()?;
    let packets: u32 = if opts.quick { 200_000 } else { 5_000_000 };
    pin_to_cpu(1);

    for setup in Setup::ALL {
        println!(" setup {}", setup.name());
        let prepared = prepare(&lab, setup)?;
        // TCP bulk: an FTP (EPSV) data transfer of the sparse file, after
        // one untimed transfer (the first after a setup change runs slow).
        let mut gbits = Vec::new();
        for rep in 0..=opts.reps() {
            let out = lab.client.sh(&format!(
                "curl -sS --max-time 120 -o /dev/null -w '%{{speed_download}} %{{size_download}}' ftp://{}/big.bin",
                addr::SERVER
            ))?;
            let mut it = out.split_whitespace();
            let speed: f64 = it.next().unwrap_or("0").parse().unwrap_or(0.0);
            let got: u64 = it.next().unwrap_or("0").parse().unwrap_or(0);
            if got != size {
                bail!("{}: FTP transfer got {got} of {size} bytes", setup.name());
            }
            if rep > 0 {
                gbits.push(speed * 8.0 / 1e9);
            }
        }
        r.add(
            "data path",
            "TCP bulk (FTP data)",
            setup.name(),
            "Gbit/s",
            gbits,
        );

        // 64-byte UDP frames across a UDP pinhole (or the equivalent flow).
        let (dst, dport) = match &prepared.fw {
            Some(fw) => {
                let s = fw.session(addr::CLIENT);
                let mut args = vec![
                    "redirect-connections",
                    "--session",
                    &s,
                    "--connect",
                    "10.2.0.2:9",
                    "--protocol",
                    "udp",
                ];
                if setup == Setup::User {
                    args.extend(["--flags", "no-kernel-mode"]);
                }
                let rc = fw.ok(&args);
                let internal: std::net::SocketAddrV4 = rc["internal_address"]
                    .as_str()
                    .context("internal address")?
                    .parse()?;
                (internal.ip().octets(), internal.port())
            }
            None => (SERVER, 9),
        };
        let (pps, cpu) = udp_frames(&lab, &mut progs, (dst, dport), packets, opts.reps())?;
        r.add(
            "data path",
            "UDP 64-byte frames delivered, per generating core",
            setup.name(),
            "Mpps",
            pps,
        );
        r.add(
            "data path",
            "CPU time per delivered UDP frame (all CPUs)",
            setup.name(),
            "ns",
            cpu,
        );
        prepared.down(&lab)?;
    }
    drop(server);
    drop(lab);
    Ok(())
}

/// 64-byte UDP frames from the client to `dst`, generated with BPF_PROG_RUN
/// live frames and counted by the XDP sink on the server: delivered Mpps per
/// generating core, and CPU ns per delivered frame, one value per repetition.
pub(crate) fn udp_frames(
    lab: &Lab,
    progs: &mut BenchPrograms,
    (dst, dport): ([u8; 4], u16),
    packets: u32,
    reps: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let client_if = ifindex(&lab.client, "eth0")?;
    let server_if = ifindex(&lab.server, "eth0")?;
    let client_mac = mac(&lab.client, "eth0")?;
    let fw_mac = mac(&lab.fw, addr::IF_INTERNAL)?;
    let mut spec = Spec::udp(CLIENT, 5555, dst, dport);
    spec.payload = vec![0x5a; 18]; // 14 + 20 + 8 + 18 = 60 bytes, 64 on the wire
    let mut frame = spec.build();
    frame[0..6].copy_from_slice(&fw_mac);
    frame[6..12].copy_from_slice(&client_mac);
    in_netns(&lab.server.path(), || progs.attach_sink(server_if))??;
    // The first packet opens the pinhole (or the flow, or the conntrack entry).
    in_netns(&lab.client.path(), || progs.generate(&frame, client_if, 10))??;
    std::thread::sleep(Duration::from_millis(300));
    let (mut pps, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let before = progs.sink_count()?;
        let cpu0 = cpu_busy_ns();
        let took = in_netns(&lab.client.path(), || {
            progs.generate(&frame, client_if, packets)
        })??;
        std::thread::sleep(Duration::from_millis(200));
        let delivered = progs.sink_count()? - before;
        let cpu_used = cpu_busy_ns().saturating_sub(cpu0);
        pps.push(delivered as f64 / took.as_secs_f64() / 1e6);
        if delivered > 0 {
            cpu.push(cpu_used as f64 / delivered as f64);
        }
    }
    in_netns(&lab.server.path(), || progs.detach_sink())??;
    Ok((pps, cpu))
}

// ---------------------------------------------------------------------------
// 2. Per-packet cost of the XDP program
// ---------------------------------------------------------------------------
