//! Section 4: map memory and lookup cost from 1 k to 1 M entries.

use crate::*;

pub(crate) fn memlock(pins_dir: &Path, map: &str) -> f64 {
    let out = sh(&format!(
        "bpftool -j map show pinned {}/{map}",
        pins_dir.display()
    ));
    serde_json::from_str::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| v["bytes_memlock"].as_f64())
        .unwrap_or(f64::NAN)
        / (1024.0 * 1024.0)
}

pub(crate) fn scale(opts: &Opts, r: &mut Results) -> anyhow::Result<()> {
    let levels: &[u32] = if opts.quick {
        &[1_000, 10_000]
    } else {
        &[1_000, 10_000, 100_000, 1_000_000]
    };
    let repeat = if opts.quick { 100_000 } else { 1_000_000 };
    for &n in levels {
        let label = if n >= 1_000_000 {
            format!("{}M", n / 1_000_000)
        } else {
            format!("{}k", n / 1000)
        };
        println!(" {label} pinholes and {label} flows");
        let mut fx = Fixture::with_sizes(
            &format!("sc{label}"),
            MapSizes {
                // LRU tables evict before they are full; leave room.
                flows: n + n / 4,
                // Room for the first-packet measurement's own pinholes.
                pinholes: n + 1024,
            },
        )?;
        let t = Instant::now();
        for i in 0..n / 2 {
            // n/2 connections of two flow entries each.
            let src = [10, 1, (i >> 16) as u8, (i >> 8) as u8];
            let sport = 1024 + (i & 0xff) as u16 * 200;
            let k = FlowKey::new(IPPROTO_TCP, src, sport, SERVER, 80);
            fx.flows.insert(
                &k,
                &FlowValue::forward(FW_EXTERNAL, 1024 + (i % 60000) as u16, SERVER, 80),
            )?;
            let b = FlowKey::new(
                IPPROTO_TCP,
                SERVER,
                80,
                FW_EXTERNAL,
                1024 + (i % 60000) as u16,
            );
            let mut bv = FlowValue::forward(SERVER, 80, src, sport);
            bv.owner = i as u64;
            fx.flows.insert(&b, &bv)?;
        }
        for i in 0..n {
            let key = PinholeKey::new(
                IPPROTO_UDP,
                [10, 2, (i >> 16) as u8 | 0x80, (i >> 8) as u8],
                (i & 0xff) as u16 + 1,
                side::EXTERNAL,
            );
            fx.pinholes.insert(
                &key,
                &PinholeValue {
                    target_addr: CLIENT,
                    target_port: 5001,
                    remaining: 1,
                    owner: i as u64,
                    ..Default::default()
                },
            )?;
        }
        r.notes.push(format!(
            "{label}: filling the tables took {:.1} s (one syscall per entry)",
            t.elapsed().as_secs_f64()
        ));
        let flows_mib = memlock(&fx.pins.dir, "FLOWS");
        let pinholes_mib = memlock(&fx.pins.dir, "PINHOLES");
        r.add("scale", "FLOWS map memory", &label, "MiB", vec![flows_mib]);
        r.add(
            "scale",
            "PINHOLES map memory",
            &label,
            "MiB",
            vec![pinholes_mib],
        );
        r.add(
            "scale",
            "FLOWS + PINHOLES map memory",
            &label,
            "MiB",
            vec![flows_mib + pinholes_mib],
        );
        // A flow in the middle of the filled table.
        let i = n / 4;
        let src = [10, 1, (i >> 16) as u8, (i >> 8) as u8];
        let sport = 1024 + (i & 0xff) as u16 * 200;
        let hit = tcp(src, sport, SERVER, 80, TCP_ACK);
        let nat_port = 1024 + (i % 60000) as u16;
        repeatable(&mut fx, FW_EXTERNAL, nat_port, SERVER, 80);
        let v = timed(
            &mut fx,
            Side::Internal,
            &hit,
            repeat,
            opts.reps(),
            XDP_REDIRECT,
        )?;
        r.add("scale", "established flow hit", &label, "ns/packet", v);
        let miss = tcp(CLIENT, 34000, SERVER, 443, TCP_ACK);
        let v = timed(
            &mut fx,
            Side::Internal,
            &miss,
            repeat,
            opts.reps(),
            XDP_DROP,
        )?;
        r.add(
            "scale",
            "miss (flow and pinhole lookups, the wall drops it)",
            &label,
            "ns/packet",
            v,
        );
        let v = (0..opts.reps())
            .map(|_| first_packet_ns(&mut fx, 40))
            .collect::<anyhow::Result<Vec<_>>>()?;
        r.add(
            "scale",
            "first packet matching a pinhole",
            &label,
            "ns/packet",
            v,
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Report and chart
// ---------------------------------------------------------------------------
