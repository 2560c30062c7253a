//! The eBPF datapath: loading, attaching, pinning, and typed access to its maps.
//!
//! Maps and XDP links are pinned under `PIN_DIR`, so forwarding of established
//! flows survives a crash or restart of the daemon: a new daemon re-adopts the
//! pinned maps and atomically swaps its programs into the pinned links.

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _};
use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap, Map, MapData, MapInfo, PerCpuArray, RingBuf, SockMap,
    },
    programs::{
        links::{FdLink, PinnedLink},
        tc::{TcAttachOptions, TcAttachType},
        LinkOrder, SchedClassifier, SkLookup, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use firewall_common::{
    flow::{FlowKey, FlowValue},
    intercept::{InterceptConf, InterceptKey, InterceptValue},
    map_names,
    pinhole::{
        BusyClientKey, BusyClientValue, DatapathEvent, PeerFilterKey, PeerFilterValue, PinholeKey,
        PinholeValue,
    },
    program_names,
    stats::{Counter, StatValue, COUNTER_SLOTS},
    PIN_DIR,
};
use serde::{Deserialize, Serialize};

use crate::{mapops, netif::Interface};

/// The eBPF object built from firewall-ebpf by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/firewall"));

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Which side of the firewall an interface is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Internal,
    External,
}

impl Side {
    pub const BOTH: [Side; 2] = [Side::Internal, Side::External];

    pub const fn program(self) -> &'static str {
        match self {
            Side::Internal => program_names::XDP_INTERNAL,
            Side::External => program_names::XDP_EXTERNAL,
        }
    }

    /// The same pipeline at tcx ingress.
    pub const fn tc_program(self) -> &'static str {
        match self {
            Side::Internal => program_names::TC_FORWARD_INTERNAL,
            Side::External => program_names::TC_FORWARD_EXTERNAL,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Side::Internal => "internal",
            Side::External => "external",
        }
    }
}

/// Where the datapath runs: XDP native (in the driver), XDP generic (in the
/// stack, slower), or TC (tcx ingress: sees GRO/GSO super-packets, and keeps
/// veth's offloads, which XDP turns off on the peer; faster for bulk TCP on
/// veth, slower per packet).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Native,
    Generic,
    Tc,
}

impl AttachMode {
    fn xdp(self) -> XdpMode {
        match self {
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Generic | AttachMode::Tc => XdpMode::Skb,
        }
    }

    /// The program of `side` in this mode.
    pub const fn program(self, side: Side) -> &'static str {
        match self {
            AttachMode::Tc => side.tc_program(),
            _ => side.program(),
        }
    }
}

/// Where things are pinned.
#[derive(Clone, Debug)]
pub struct PinPaths {
    pub dir: PathBuf,
}

impl Default for PinPaths {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(PIN_DIR),
        }
    }
}

impl PinPaths {
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A pinned map of the running firewall.
    pub fn open_map(&self, name: &str) -> anyhow::Result<MapData> {
        let path = self.map(name);
        MapData::from_pin(&path)
            .with_context(|| format!("opening {} (is the firewall up?)", path.display()))
    }
    pub fn link(&self, side: Side) -> PathBuf {
        self.dir.join(format!("link_{}", side.name()))
    }
    /// Everything we may have pinned, maps and links.
    pub fn all(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = MAPS.iter().map(|m| self.map(m.name)).collect();
        v.extend(Side::BOTH.iter().map(|s| self.link(*s)));
        v
    }
    pub fn any_exists(&self) -> bool {
        self.all().iter().any(|p| p.exists())
    }
}

/// Why the kernel refused a program: the errno, and the end of the
/// verifier's log (which says what went wrong when the verifier did).
/// Loads a program; the verifier gives up with EAGAIN when a signal is
/// pending (children exiting, a terminal resize…): like libbpf, try again.
fn load_retrying(
    name: &str,
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> anyhow::Result<()> {
    let mut attempts = 0;
    loop {
        match load() {
            Ok(()) => return Ok(()),
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if attempts < 5
                    && matches!(
                        io_error.raw_os_error().map(nix::errno::Errno::from_raw),
                        Some(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR)
                    ) =>
            {
                attempts += 1;
                log::debug!("loading {name}: {io_error}; trying again");
            }
            Err(e) => return Err(load_error(name, e)),
        }
    }
}

fn load_error(name: &str, e: aya::programs::ProgramError) -> anyhow::Error {
    let full = format!("{e}");
    log::debug!("loading {name}: {full}");
    let errno = match &e {
        aya::programs::ProgramError::LoadError { io_error, .. } => format!(" ({io_error})"),
        _ => String::new(),
    };
    let tail: Vec<&str> = full.lines().rev().take(12).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    anyhow!(
        "the kernel refused program {name}{errno} (RUST_LOG=debug shows the whole verifier log):\n{}",
        tail.join("\n")
    )
}

/// The maps the datapath pins, and the layout a pinned map must have to be re-adopted.
struct MapSpec {
    name: &'static str,
    key_size: u32,
    value_size: u32,
}

const MAPS: &[MapSpec] = &[
    MapSpec {
        name: map_names::FLOWS,
        key_size: size_of::<FlowKey>() as u32,
        value_size: size_of::<FlowValue>() as u32,
    },
    MapSpec {
        name: map_names::STATS,
        key_size: 4,
        value_size: size_of::<StatValue>() as u32,
    },
    MapSpec {
        name: map_names::PINHOLES,
        key_size: size_of::<PinholeKey>() as u32,
        value_size: size_of::<PinholeValue>() as u32,
    },
    MapSpec {
        name: map_names::BUSY_CLIENTS,
        key_size: size_of::<BusyClientKey>() as u32,
        value_size: size_of::<BusyClientValue>() as u32,
    },
    MapSpec {
        name: map_names::PEER_FILTERS,
        // struct bpf_lpm_trie_key: prefix length, then the data.
        key_size: 4 + size_of::<PeerFilterKey>() as u32,
        value_size: size_of::<PeerFilterValue>() as u32,
    },
    MapSpec {
        name: map_names::INTERCEPT,
        key_size: size_of::<InterceptKey>() as u32,
        value_size: size_of::<InterceptValue>() as u32,
    },
    MapSpec {
        name: map_names::INTERCEPT_CONF,
        key_size: 4,
        value_size: size_of::<InterceptConf>() as u32,
    },
];

/// Capacities of the maps the configuration sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub flows: u32,
    pub pinholes: u32,
}

/// Fails unless `dir` is on a mounted bpffs.
pub fn check_bpffs(dir: &Path) -> anyhow::Result<()> {
    let parent = dir.parent().unwrap_or(dir);
    let st =
        nix::sys::statfs::statfs(parent).with_context(|| format!("statfs {}", parent.display()))?;
    if st.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        bail!(
            "{} is not a bpffs mount, so maps cannot be pinned: run `mount -t bpf bpf {}` (the README's setup does it)",
            parent.display(),
            parent.display()
        );
    }
    Ok(())
}

/// A pinned map that exists but does not have the layout this build expects
/// (left by an older version) must not be re-adopted: the datapath would
/// misread it.
fn check_pinned_layout(pins: &PinPaths, sizes: MapSizes) -> anyhow::Result<()> {
    for spec in MAPS {
        let path = pins.map(spec.name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("reading pinned map {}", path.display()))?;
        if info.key_size() != spec.key_size || info.value_size() != spec.value_size {
            bail!(
                "pinned map {} has key/value sizes {}/{} but this build uses {}/{}: run `firewall-ctl down` to remove the old datapath first",
                path.display(), info.key_size(), info.value_size(), spec.key_size, spec.value_size
            );
        }
        let wanted = match spec.name {
            map_names::FLOWS => Some(sizes.flows),
            map_names::PINHOLES => Some(sizes.pinholes),
            _ => None,
        };
        if let Some(wanted) = wanted.filter(|w| *w != info.max_entries()) {
            bail!(
                "pinned map {} holds {} entries but the config asks for {wanted}: run `firewall-ctl down` to resize (established flows are lost)",
                path.display(), info.max_entries()
            );
        }
    }
    Ok(())
}

/// The loaded datapath, owned by the daemon.
pub struct Datapath {
    ebpf: Ebpf,
    pins: PinPaths,
    links: BTreeMap<&'static str, PinnedLink>,
    /// Keeps the eBPF log ring buffer alive; the daemon polls it.
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Establishment events from the datapath; the daemon takes and polls it.
    pub events: Option<RingBuf<MapData>>,
}

impl Datapath {
    /// Loads the programs, creating or re-adopting the pinned maps.
    pub fn load(pins: &PinPaths, sizes: MapSizes) -> anyhow::Result<Self> {
        check_bpffs(&pins.dir)?;
        fs::create_dir_all(&pins.dir)
            .with_context(|| format!("creating {}", pins.dir.display()))?;
        check_pinned_layout(pins, sizes)?;

        let map_paths: Vec<(&str, PathBuf)> =
            MAPS.iter().map(|m| (m.name, pins.map(m.name))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        loader.map_max_entries(map_names::FLOWS, sizes.flows);
        loader.map_max_entries(map_names::PINHOLES, sizes.pinholes);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::warn!("eBPF log messages are unavailable: {e}");
                None
            }
        };
        for side in Side::BOTH {
            let prog: &mut Xdp = program(&mut ebpf, side)?;
            load_retrying(side.program(), || prog.load())?;
        }
        let tc: &mut SchedClassifier = typed(&mut ebpf, program_names::TC_INTERNAL)?;
        load_retrying(program_names::TC_INTERNAL, || tc.load())?;
        let lookup: &mut SkLookup = typed(&mut ebpf, program_names::SK_LOOKUP_INTERCEPT)?;
        load_retrying(program_names::SK_LOOKUP_INTERCEPT, || lookup.load())?;
        for side in Side::BOTH {
            let tc = tc_program(&mut ebpf, side)?;
            load_retrying(side.tc_program(), || tc.load())?;
        }
        let events = match ebpf.take_map(map_names::EVENTS) {
            Some(m) => Some(RingBuf::try_from(m).context("the EVENTS map is not a ring buffer")?),
            None => bail!("the eBPF object has no EVENTS map"),
        };
        Ok(Self {
            ebpf,
            pins: pins.clone(),
            links: BTreeMap::new(),
            logger,
            events,
        })
    }

    /// Attaches the program of `side` to `iface` and pins the link. When a
    /// pinned link from an earlier daemon exists, the new program replaces the
    /// old one in it atomically (no packet sees no program).
    pub fn attach(
        &mut self,
        side: Side,
        iface: &Interface,
        mode: AttachMode,
        adopt: bool,
    ) -> anyhow::Result<()> {
        let path = self.pins.link(side);
        if mode == AttachMode::Tc {
            return self.attach_tc(side, iface, adopt);
        }
        let prog = program(&mut self.ebpf, side)?;
        let pinned = if adopt && path.exists() {
            let pinned = PinnedLink::from_pin(&path)
                .with_context(|| format!("opening pinned link {}", path.display()))?;
            let link = aya::programs::xdp::XdpLink::try_from(FdLink::from(pinned))
                .with_context(|| format!("{} is not an XDP link", path.display()))?;
            prog.attach_to_link(link)
                .with_context(|| format!("replacing the program in {}", path.display()))?;
            log::info!("re-adopted the {} XDP link on {}", side.name(), iface.name);
            // attach_to_link took the fd into the program; reopen the pin to own it here.
            PinnedLink::from_pin(&path)
                .with_context(|| format!("reopening pinned link {}", path.display()))?
        } else {
            let id = prog
                .attach_to_if_index(iface.index, mode.xdp())
                .map_err(|e| {
                    let hint = match mode {
                        AttachMode::Native => {
                            " (if the driver has no native XDP, try --xdp-mode generic)"
                        }
                        AttachMode::Generic | AttachMode::Tc => "",
                    };
                    anyhow!(
                        "attaching {} to {} in {:?} mode{hint}: {e}",
                        side.program(),
                        iface.name,
                        mode
                    )
                })?;
            let link = prog.take_link(id)?;
            let fd: FdLink = link
                .try_into()
                .map_err(|e| anyhow!("XDP link of {} has no fd: {e:?}", iface.name))?;
            fd.pin(&path)
                .with_context(|| format!("pinning link {}", path.display()))?
        };
        self.links.insert(side.name(), pinned);
        Ok(())
    }

    pub fn pins(&self) -> &PinPaths {
        &self.pins
    }

    /// `attach` for `AttachMode::Tc`: tcx ingress, first in line (before the
    /// interception program), the link pinned and re-adopted like XDP's.
    fn attach_tc(&mut self, side: Side, iface: &Interface, adopt: bool) -> anyhow::Result<()> {
        let path = self.pins.link(side);
        let prog = tc_program(&mut self.ebpf, side)?;
        let pinned = if adopt && path.exists() {
            let pinned = PinnedLink::from_pin(&path)
                .with_context(|| format!("opening pinned link {}", path.display()))?;
            let link = aya::programs::tc::SchedClassifierLink::try_from(FdLink::from(pinned))
                .with_context(|| format!("{} is not a tcx link", path.display()))?;
            prog.attach_to_link(link)
                .with_context(|| format!("replacing the program in {}", path.display()))?;
            log::info!("re-adopted the {} tcx link on {}", side.name(), iface.name);
            PinnedLink::from_pin(&path)
                .with_context(|| format!("reopening pinned link {}", path.display()))?
        } else {
            let id = prog
                .attach_with_options(
                    &iface.name,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .map_err(|e| {
                    anyhow!(
                        "attaching {} (tcx ingress) to {}: {e}",
                        side.tc_program(),
                        iface.name
                    )
                })?;
            let link = prog.take_link(id)?;
            let fd: FdLink = link
                .try_into()
                .map_err(|e| anyhow!("tcx link of {} has no fd: {e:?}", iface.name))?;
            fd.pin(&path)
                .with_context(|| format!("pinning link {}", path.display()))?
        };
        self.links.insert(side.name(), pinned);
        Ok(())
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

    /// Attaches the interception: the TC program (tcx ingress) on the
    /// internal interface, and the listener lookup of this network namespace
    /// with `listener` as the listener of intercepted SYNs. Neither link is
    /// pinned: intercepted connections end with the daemon that terminated
    /// them, and so does the interception.
    pub fn attach_interception(
        &mut self,
        iface: &Interface,
        listener: &impl std::os::fd::AsRawFd,
    ) -> anyhow::Result<()> {
        let mut socks: SockMap<&mut MapData> = SockMap::try_from(
            self.ebpf
                .map_mut(map_names::INTERCEPT_LISTENER)
                .ok_or_else(|| anyhow!("map {} missing", map_names::INTERCEPT_LISTENER))?,
        )?;
        socks
            .set(0, listener, 0)
            .context("putting the interception listener into its SOCKMAP")?;
        let netns =
            fs::File::open("/proc/self/ns/net").context("opening this network namespace")?;
        let lookup: &mut SkLookup = typed(&mut self.ebpf, program_names::SK_LOOKUP_INTERCEPT)?;
        lookup.attach(netns).map_err(|e| {
            anyhow!(
                "attaching {} to this network namespace: {e}",
                program_names::SK_LOOKUP_INTERCEPT
            )
        })?;
        let tc: &mut SchedClassifier = typed(&mut self.ebpf, program_names::TC_INTERNAL)?;
        tc.attach_with_options(
            &iface.name,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|e| {
            anyhow!(
                "attaching {} (tcx ingress) to {}: {e}",
                program_names::TC_INTERNAL,
                iface.name
            )
        })?;
        Ok(())
    }

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
}

/// The benchmark's packet generator and count-and-drop sink (firewall-ebpf's
/// `bench` module), loaded on their own: never part of the firewall.
pub struct BenchPrograms {
    ebpf: Ebpf,
    sink_link: Option<aya::programs::xdp::XdpLinkId>,
}

impl BenchPrograms {
    pub fn load() -> anyhow::Result<Self> {
        let mut loader = EbpfLoader::new();
        // The datapath's maps come along; keep them small.
        loader.map_max_entries(map_names::FLOWS, 1024);
        loader.map_max_entries(map_names::PINHOLES, 64);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        for name in ["xdp_bench_tx", "xdp_bench_sink"] {
            let prog: &mut Xdp = typed(&mut ebpf, name)?;
            load_retrying(name, || prog.load())?;
        }
        Ok(Self {
            ebpf,
            sink_link: None,
        })
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

/// Result of `Datapath::test_run`.
#[derive(Debug)]
pub struct TestRunOutput {
    /// XDP action: 1 drop, 2 pass, 4 redirect (`xdp_action`).
    pub action: u32,
    pub frame: Vec<u8>,
    /// Average run time per repetition, as the kernel measured it.
    pub duration: std::time::Duration,
}

/// A program of the object by name, as its type (Xdp, SchedClassifier).
fn typed<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
        .try_into()
        .map_err(|e| anyhow!("program {name} is not of the expected type: {e}"))
}

fn tc_program(ebpf: &mut Ebpf, side: Side) -> anyhow::Result<&mut SchedClassifier> {
    typed(ebpf, side.tc_program())
}

fn program(ebpf: &mut Ebpf, side: Side) -> anyhow::Result<&mut Xdp> {
    typed(ebpf, side.program())
}

/// Removes every pin under `pins` (links first, so the programs detach before
/// their maps go). Missing pins are fine: this also cleans up after a crash.
pub fn unpin_all(pins: &PinPaths) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let mut order: Vec<PathBuf> = Side::BOTH.iter().map(|s| pins.link(*s)).collect();
    order.extend(MAPS.iter().map(|m| pins.map(m.name)));
    for p in order {
        match fs::remove_file(&p) {
            Ok(()) => removed.push(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing pin {}", p.display())),
        }
    }
    // The directory goes too when nothing else (another tool's pins) is in it.
    let _ = fs::remove_dir(&pins.dir);
    Ok(removed)
}

/// The per-CPU verdict counters, summed over CPUs.
pub struct Stats {
    map: PerCpuArray<MapData, StatValue>,
}

impl Stats {
    pub fn open(pins: &PinPaths) -> anyhow::Result<Self> {
        let data = pins.open_map(map_names::STATS)?;
        Ok(Self {
            map: PerCpuArray::try_from(Map::from_map_data(data)?)?,
        })
    }

    pub fn read(&self) -> anyhow::Result<Vec<(Counter, StatValue)>> {
        let mut out = Vec::new();
        for c in Counter::ALL {
            debug_assert!((*c as u32) < COUNTER_SLOTS);
            let per_cpu = self.map.get(&(*c as u32), 0)?;
            let sum = per_cpu.iter().fold(StatValue::default(), |a, v| StatValue {
                packets: a.packets + v.packets,
                bytes: a.bytes + v.bytes,
            });
            out.push((*c, sum));
        }
        Ok(out)
    }
}

/// The interception tables: which ports, where to, and the mark.
pub struct InterceptTables {
    ports: HashMap<MapData, InterceptKey, InterceptValue>,
    conf: Array<MapData, InterceptConf>,
}

impl InterceptTables {
    pub fn open(pins: &PinPaths) -> anyhow::Result<Self> {
        let open =
            |name: &str| -> anyhow::Result<Map> { Ok(Map::from_map_data(pins.open_map(name)?)?) };
        Ok(Self {
            ports: HashMap::try_from(open(map_names::INTERCEPT)?)?,
            conf: Array::try_from(open(map_names::INTERCEPT_CONF)?)?,
        })
    }

    /// Replaces the intercepted ports and turns interception on (mark ≠ 0) or off.
    pub fn set(
        &mut self,
        conf: InterceptConf,
        ports: &[(InterceptKey, InterceptValue)],
    ) -> anyhow::Result<()> {
        // Off while the ports change, so no SYN sees half a configuration.
        self.conf.set(0, InterceptConf::default(), 0)?;
        let old: Vec<InterceptKey> = self.ports.keys().collect::<Result<_, _>>()?;
        for k in old {
            self.ports.remove(&k)?;
        }
        for (k, v) in ports {
            self.ports.insert(k, v, 0)?;
        }
        self.conf.set(0, conf, 0)?;
        Ok(())
    }

    pub fn ports(&self) -> anyhow::Result<Vec<(InterceptKey, InterceptValue)>> {
        Ok(self.ports.iter().collect::<Result<_, _>>()?)
    }
}

/// Typed access to a pinned hash map.
pub struct Table<K, V> {
    map: HashMap<MapData, K, V>,
    /// The map's fd again, for the operations aya lacks (`mapops`).
    fd: std::os::fd::OwnedFd,
    capacity: u32,
}

/// A value of a `Table`, with what inserting it implies.
pub trait TableValue: aya::Pod {
    /// Adjusts the value as it is inserted.
    fn on_insert(&mut self) {}
}

impl TableValue for FlowValue {
    /// An entry that has not seen a packet counts as seen when installed, so
    /// that the idle timeout also removes flows that are never used.
    fn on_insert(&mut self) {
        if self.last_seen_ns == 0 {
            self.last_seen_ns = crate::sweeper::monotonic_ns();
        }
    }
}

impl TableValue for PinholeValue {}
impl TableValue for BusyClientValue {}

/// The flow table: the call the engine uses to install, read and remove flows.
pub type FlowTable = Table<FlowKey, FlowValue>;
/// The pinhole table.
pub type PinholeTable = Table<PinholeKey, PinholeValue>;

/// Map name of each table type.
pub trait TableName {
    const NAME: &'static str;
}

impl TableName for Table<FlowKey, FlowValue> {
    const NAME: &'static str = map_names::FLOWS;
}

impl TableName for Table<PinholeKey, PinholeValue> {
    const NAME: &'static str = map_names::PINHOLES;
}

/// Clients at their quota of concurrent TCP secondaries.
pub type BusyClients = Table<BusyClientKey, BusyClientValue>;

impl TableName for Table<BusyClientKey, BusyClientValue> {
    const NAME: &'static str = map_names::BUSY_CLIENTS;
}

impl<K: aya::Pod + std::fmt::Debug, V: TableValue> Table<K, V>
where
    Self: TableName,
{
    pub fn open(pins: &PinPaths) -> anyhow::Result<Self> {
        use std::os::fd::AsFd as _;
        let data = pins.open_map(Self::NAME)?;
        let capacity = data.info()?.max_entries();
        let fd = data.fd().as_fd().try_clone_to_owned()?;
        Ok(Self {
            map: HashMap::try_from(Map::from_map_data(data)?)?,
            fd,
            capacity,
        })
    }

    /// Up to `max` entries from `scan` on (a batched read; see `mapops`).
    pub fn scan(&self, scan: &mut mapops::Scan, max: usize) -> anyhow::Result<Vec<(K, V)>> {
        use std::os::fd::AsFd as _;
        mapops::lookup_batch(self.fd.as_fd(), scan, max)
            .with_context(|| format!("reading {} in batches", Self::NAME))
    }

    /// Every entry, read in batches.
    pub fn all(&self) -> anyhow::Result<Vec<(K, V)>> {
        let mut scan = mapops::Scan::default();
        let mut out = Vec::new();
        loop {
            out.extend(self.scan(&mut scan, 4096)?);
            if scan.wrapped {
                return Ok(out);
            }
        }
    }

    /// Deletes these keys (missing ones are skipped); how many were there.
    pub fn remove_many(&mut self, keys: &[K]) -> anyhow::Result<usize> {
        use std::os::fd::AsFd as _;
        mapops::delete_batch(self.fd.as_fd(), keys)
            .with_context(|| format!("deleting from {} in a batch", Self::NAME))
    }

    /// Takes the entry out atomically (lookup and delete in one step).
    pub fn take(&mut self, key: &K) -> anyhow::Result<Option<V>> {
        use std::os::fd::AsFd as _;
        mapops::lookup_and_delete(self.fd.as_fd(), key)
            .with_context(|| format!("taking {key:?} out of {}", Self::NAME))
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Inserts or replaces an entry.
    pub fn insert(&mut self, key: &K, value: &V) -> anyhow::Result<()> {
        let mut value = *value;
        value.on_insert();
        self.map
            .insert(key, value, 0)
            .with_context(|| format!("inserting {key:?} into {}", Self::NAME))
    }

    pub fn get(&self, key: &K) -> anyhow::Result<Option<V>> {
        match self.map.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether it was there.
    pub fn remove(&mut self, key: &K) -> anyhow::Result<bool> {
        match self.map.remove(key) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// All entries. Entries removed while iterating are skipped.
    pub fn entries(&self) -> anyhow::Result<Vec<(K, V)>> {
        let mut out = Vec::new();
        for r in self.map.iter() {
            match r {
                Ok(kv) => out.push(kv),
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// Entries in the table (a full scan).
    pub fn count(&self) -> anyhow::Result<usize> {
        Ok(self.map.keys().filter(|k| k.is_ok()).count())
    }
}

/// Typed access to the pinned peer filters (an LPM trie of (filter id, network) -> allow).
pub struct PeerFilters {
    map: LpmTrie<MapData, PeerFilterKey, PeerFilterValue>,
}

impl PeerFilters {
    pub fn open(pins: &PinPaths) -> anyhow::Result<Self> {
        let data = pins.open_map(map_names::PEER_FILTERS)?;
        Ok(Self {
            map: LpmTrie::try_from(Map::from_map_data(data)?)?,
        })
    }

    fn key(filter: u32, net: ipnet::Ipv4Net) -> LpmKey<PeerFilterKey> {
        LpmKey::new(
            32 + net.prefix_len() as u32,
            PeerFilterKey {
                filter: filter.to_be_bytes(),
                addr: net.network().octets(),
            },
        )
    }

    pub fn insert(&mut self, filter: u32, net: ipnet::Ipv4Net, allow: bool) -> anyhow::Result<()> {
        self.map
            .insert(
                &Self::key(filter, net),
                PeerFilterValue {
                    allow: allow as u32,
                },
                0,
            )
            .with_context(|| format!("inserting peer filter {filter} {net}"))
    }

    pub fn remove(&mut self, filter: u32, net: ipnet::Ipv4Net) -> anyhow::Result<()> {
        match self.map.remove(&Self::key(filter, net)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Decodes one record of the EVENTS ring buffer.
pub fn decode_event(bytes: &[u8]) -> Option<DatapathEvent> {
    if bytes.len() < size_of::<DatapathEvent>() {
        return None;
    }
    // SAFETY: DatapathEvent is plain old data and the length was checked.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DatapathEvent>()) })
}

/// The engine's view of the pinned maps.
pub struct KernelMaps {
    pub flows: FlowTable,
    pub pinholes: PinholeTable,
    pub peers: PeerFilters,
    pub busy: BusyClients,
}

impl KernelMaps {
    pub fn open(pins: &PinPaths) -> anyhow::Result<Self> {
        Ok(Self {
            flows: FlowTable::open(pins)?,
            pinholes: PinholeTable::open(pins)?,
            peers: PeerFilters::open(pins)?,
            busy: BusyClients::open(pins)?,
        })
    }
}

impl crate::engine::Maps for KernelMaps {
    fn put_pinhole(&mut self, key: &PinholeKey, value: &PinholeValue) -> anyhow::Result<()> {
        self.pinholes.insert(key, value)
    }
    fn get_pinhole(&self, key: &PinholeKey) -> anyhow::Result<Option<PinholeValue>> {
        self.pinholes.get(key)
    }
    fn del_pinhole(&mut self, key: &PinholeKey) -> anyhow::Result<()> {
        self.pinholes.remove(key).map(|_| ())
    }
    fn take_pinhole(&mut self, key: &PinholeKey) -> anyhow::Result<Option<PinholeValue>> {
        self.pinholes.take(key)
    }
    fn pinholes(&self) -> anyhow::Result<Vec<(PinholeKey, PinholeValue)>> {
        self.pinholes.entries()
    }
    fn put_peer_rule(
        &mut self,
        filter: u32,
        net: ipnet::Ipv4Net,
        allow: bool,
    ) -> anyhow::Result<()> {
        self.peers.insert(filter, net, allow)
    }
    fn del_peer_rule(&mut self, filter: u32, net: ipnet::Ipv4Net) -> anyhow::Result<()> {
        self.peers.remove(filter, net)
    }
    fn get_flow(&self, key: &FlowKey) -> anyhow::Result<Option<FlowValue>> {
        self.flows.get(key)
    }
    fn del_flow(&mut self, key: &FlowKey) -> anyhow::Result<bool> {
        self.flows.remove(key)
    }
    fn del_flows(&mut self, keys: &[FlowKey]) -> anyhow::Result<usize> {
        self.flows.remove_many(keys)
    }
    fn flows(&self) -> anyhow::Result<Vec<(FlowKey, FlowValue)>> {
        self.flows.all()
    }
    fn busy_clients(&self) -> anyhow::Result<Vec<Ipv4Addr>> {
        Ok(self
            .busy
            .entries()?
            .into_iter()
            .map(|(k, _)| Ipv4Addr::from(k.addr))
            .collect())
    }
    fn set_client_busy(
        &mut self,
        client: Ipv4Addr,
        busy: Option<BusyClientValue>,
    ) -> anyhow::Result<()> {
        let key = BusyClientKey {
            addr: client.octets(),
        };
        match busy {
            Some(v) => self.busy.insert(&key, &v),
            None => self.busy.remove(&key).map(|_| ()),
        }
    }
}
