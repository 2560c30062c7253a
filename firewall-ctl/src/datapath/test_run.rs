//! Running the datapath's programs on frames (BPF_PROG_RUN): the packet
//! fixtures and the benchmark; and the benchmark's own generator and sink.

use anyhow::{anyhow, Context as _};
use aya::{
    maps::{MapData, PerCpuArray},
    programs::{SchedClassifier, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use firewall_common::stats::StatValue;

use super::{load_retrying, program, tc_program, typed, Datapath, Side, BENCH_OBJECT};

impl Datapath {
    /// Runs the program of `side` once on `frame` with BPF_PROG_RUN, as if it
    /// arrived on `ingress_ifindex` (of the calling thread's network
    /// namespace; 0 for none). Returns the XDP action and the frame after the
    /// program, for packet fixture tests and per-packet cost measurements.
    pub fn test_run(
        &mut self,
        side: Side,
        frame: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> anyhow::Result<TestRunOutput> {
        use aya::programs::{TestRun as _, TestRunOptions};
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let md: [u32; 6] = [0, frame.len() as u32, 0, ingress_ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(&ctx);
        opts.repeat = repeat.max(1);
        let prog = program(&mut self.ebpf, side)?;
        let r = prog
            .test_run(opts)
            .with_context(|| format!("BPF_PROG_RUN of {}", side.program()))?;
        out.truncate(r.data_size_out as usize);
        Ok(TestRunOutput {
            action: r.return_value,
            frame: out,
            duration: r.duration,
        })
    }

    /// Runs the TC program of `side` once on `frame` with BPF_PROG_RUN, as
    /// if it arrived on `ingress_ifindex`; returns the TC verdict and the
    /// frame after the program (packet fixtures of the TC mode).
    pub fn test_run_tc(
        &mut self,
        side: Side,
        frame: &[u8],
        ingress_ifindex: u32,
    ) -> anyhow::Result<TestRunOutput> {
        use aya::programs::{TestRun as _, TestRunOptions};
        // struct __sk_buff up to and including ingress_ifindex (offset 36) and
        // ifindex (40): the kernel takes the device from `ifindex`.
        let mut skb = [0u32; 48];
        skb[9] = ingress_ifindex;
        skb[10] = ingress_ifindex;
        let ctx: Vec<u8> = skb.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(&ctx);
        let prog = tc_program(&mut self.ebpf, side)?;
        let r = prog
            .test_run(opts)
            .with_context(|| format!("BPF_PROG_RUN of {}", side.tc_program()))?;
        out.truncate(r.data_size_out as usize);
        Ok(TestRunOutput {
            action: r.return_value,
            frame: out,
            duration: r.duration,
        })
    }
}

/// Result of `Datapath::test_run`.
#[derive(Debug)]
pub struct TestRunOutput {
    /// XDP action: 1 drop, 2 pass, 4 redirect (`xdp_action`).
    pub action: u32,
    pub frame: Vec<u8>,
    /// Average run time per repetition, as the kernel measured it.
    pub duration: std::time::Duration,
}

/// The benchmark's packet generator and count-and-drop sink (firewall-ebpf's
/// `bench` module), loaded on their own: never part of the firewall.
pub struct BenchPrograms {
    ebpf: Ebpf,
    sink_link: Option<aya::programs::xdp::XdpLinkId>,
    forward_links: Vec<aya::programs::tc::SchedClassifierLinkId>,
}

impl BenchPrograms {
    pub fn load() -> anyhow::Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .load(BENCH_OBJECT)
            .context("loading the benchmark's eBPF object")?;
        for name in [
            "xdp_bench_tx",
            "xdp_bench_sink",
            "xdp_bench_lookup16",
            "xdp_bench_lookup40",
        ] {
            let prog: &mut Xdp = typed(&mut ebpf, name)?;
            load_retrying(name, || prog.load())?;
        }
        let tc: &mut SchedClassifier = typed(&mut ebpf, "tc_bench_forward")?;
        load_retrying("tc_bench_forward", || tc.load())?;
        Ok(Self {
            ebpf,
            sink_link: None,
            forward_links: Vec::new(),
        })
    }

    /// Attaches the bound forwarder (`tc_bench_forward`) at tcx ingress of
    /// `ifname` (of the calling thread's namespace): IPv4 frames arriving
    /// there leave from `egress` with MACs `dst` and `src`.
    pub fn attach_forward(
        &mut self,
        ifname: &str,
        egress: u32,
        dst: [u8; 6],
        src: [u8; 6],
    ) -> anyhow::Result<()> {
        use aya::programs::tc::{TcAttachOptions, TcAttachType};
        let ingress = nix::net::if_::if_nametoindex(ifname)
            .with_context(|| format!("no interface {ifname}"))?;
        let mut cfg = [0u8; 16];
        cfg[..6].copy_from_slice(&dst);
        cfg[6..12].copy_from_slice(&src);
        cfg[12..].copy_from_slice(&egress.to_ne_bytes());
        let mut map: aya::maps::HashMap<&mut MapData, u32, [u8; 16]> =
            aya::maps::HashMap::try_from(
                self.ebpf
                    .map_mut("BENCH_FORWARD")
                    .ok_or_else(|| anyhow!("map BENCH_FORWARD missing"))?,
            )?;
        map.insert(ingress, cfg, 0)?;
        let tc: &mut SchedClassifier = typed(&mut self.ebpf, "tc_bench_forward")?;
        let id = tc
            .attach_with_options(
                ifname,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(aya::programs::LinkOrder::first()),
            )
            .with_context(|| format!("attaching the bound forwarder to {ifname}"))?;
        self.forward_links.push(id);
        Ok(())
    }

    /// Detaches every bound forwarder.
    pub fn detach_forward(&mut self) -> anyhow::Result<()> {
        let tc: &mut SchedClassifier = typed(&mut self.ebpf, "tc_bench_forward")?;
        for id in self.forward_links.drain(..) {
            tc.detach(id)?;
        }
        Ok(())
    }

    fn prog(&mut self, name: &str) -> anyhow::Result<&mut Xdp> {
        typed(&mut self.ebpf, name)
    }

    /// Sends `frame` (60 bytes) `packets` times out of interface `ifindex` (of the
    /// calling thread's network namespace), with BPF_PROG_RUN's live-frames
    /// mode; returns the wall time it took.
    pub fn generate(
        &mut self,
        frame: &[u8],
        ifindex: u32,
        packets: u32,
    ) -> anyhow::Result<std::time::Duration> {
        use aya::programs::{TestRun as _, TestRunAttrs, TestRunOptions};
        let tmpl: [u8; 60] = frame
            .try_into()
            .map_err(|_| anyhow!("generated frames are 60 bytes, not {}", frame.len()))?;
        let mut map: aya::maps::Array<&mut MapData, [u8; 60]> = aya::maps::Array::try_from(
            self.ebpf
                .map_mut("BENCH_FRAME")
                .ok_or_else(|| anyhow!("map BENCH_FRAME missing"))?,
        )?;
        map.set(0, tmpl, 0)?;
        let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.ctx_in = Some(&ctx);
        opts.repeat = packets;
        opts.attrs = TestRunAttrs::new().xdp_live_frames(64);
        let started = std::time::Instant::now();
        self.prog("xdp_bench_tx")?
            .test_run(opts)
            .context("BPF_PROG_RUN in live-frames mode")?;
        Ok(started.elapsed())
    }

    /// The per-packet cost of BPF_PROG_RUN itself: the generator program
    /// (which only returns) run `repeat` times on `frame`, not transmitting.
    pub fn empty_run(&mut self, frame: &[u8], repeat: u32) -> anyhow::Result<std::time::Duration> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat;
        let r = self.prog("xdp_bench_tx")?.test_run(opts)?;
        Ok(r.duration)
    }

    /// Fills the lookup measurement's table of `key_len`-byte keys (16 or
    /// 40) with `entries` distinct keys; the frame to look one of them up.
    pub fn fill_lookup(&mut self, key_len: usize, entries: u32) -> anyhow::Result<Vec<u8>> {
        fn fill<const N: usize>(ebpf: &mut Ebpf, name: &str, entries: u32) -> anyhow::Result<()> {
            let mut map: aya::maps::HashMap<&mut MapData, [u8; N], u64> =
                aya::maps::HashMap::try_from(
                    ebpf.map_mut(name)
                        .ok_or_else(|| anyhow!("map {name} missing"))?,
                )?;
            for i in 0..entries {
                map.insert(lookup_key::<N>(i), i as u64, 0)?;
            }
            Ok(())
        }
        match key_len {
            16 => fill::<16>(&mut self.ebpf, "BENCH_KEYS16", entries)?,
            40 => fill::<40>(&mut self.ebpf, "BENCH_KEYS40", entries)?,
            n => return Err(anyhow!("no lookup table with {n}-byte keys")),
        }
        let mut frame = lookup_key::<40>(entries / 2)[..key_len].to_vec();
        frame.resize(64, 0);
        Ok(frame)
    }

    /// Runs the `key_len`-byte lookup on `frame` `repeat` times; the kernel's
    /// time per run, and whether the key was found.
    pub fn lookup_run(
        &mut self,
        key_len: usize,
        frame: &[u8],
        repeat: u32,
    ) -> anyhow::Result<(std::time::Duration, bool)> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat;
        let r = self
            .prog(&format!("xdp_bench_lookup{key_len}"))?
            .test_run(opts)?;
        // 1: XDP_DROP, which the program returns for a key it found.
        Ok((r.duration, r.return_value == 1))
    }

    /// Attaches the sink (native XDP) to `ifindex` of the calling thread's namespace.
    pub fn attach_sink(&mut self, ifindex: u32) -> anyhow::Result<()> {
        let id = self
            .prog("xdp_bench_sink")?
            .attach_to_if_index(ifindex, XdpMode::Driver)
            .context("attaching the sink")?;
        self.sink_link = Some(id);
        Ok(())
    }

    pub fn detach_sink(&mut self) -> anyhow::Result<()> {
        if let Some(id) = self.sink_link.take() {
            self.prog("xdp_bench_sink")?.detach(id)?;
        }
        Ok(())
    }

    /// Packets the sink dropped so far (all CPUs).
    pub fn sink_count(&self) -> anyhow::Result<u64> {
        let map: PerCpuArray<&MapData, StatValue> = PerCpuArray::try_from(
            self.ebpf
                .map("BENCH_SINK")
                .ok_or_else(|| anyhow!("map BENCH_SINK missing"))?,
        )?;
        Ok(map.get(&0, 0)?.iter().map(|v| v.packets).sum())
    }
}

/// Key `i` of the lookup measurement: spread over all bytes as addresses
/// and ports are (a hash of `i`), distinct for distinct `i`.
fn lookup_key<const N: usize>(i: u32) -> [u8; N] {
    let mut k = [0u8; N];
    let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for (n, b) in k.iter_mut().enumerate() {
        if n % 8 == 0 {
            x ^= x >> 29;
            x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        }
        *b = (x >> ((n % 8) * 8)) as u8;
    }
    // The index itself, so that no two keys collide.
    k[..4].copy_from_slice(&i.to_be_bytes());
    k
}
