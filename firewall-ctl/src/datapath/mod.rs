//! The eBPF datapath: loading, attaching, pinning, and typed access to its maps.
//!
//! Maps and XDP links are pinned under `PIN_DIR`, so forwarding of established
//! flows survives a crash or restart of the daemon: a new daemon re-adopts the
//! pinned maps and atomically swaps its programs into the pinned links.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _};
use aya::{
    maps::{MapData, MapInfo, RingBuf, SockMap},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{TcAttachOptions, TcAttachType},
        LinkOrder, SchedClassifier, SkLookup, SkSkb, Xdp,
    },
    Ebpf, EbpfLoader,
};
use firewall_common::{map_names, program_names, PIN_DIR};
use serde::{Deserialize, Serialize};

use crate::netif::Interface;

mod inplace_maps;
mod kernel_maps;
mod line_maps;
mod map_specs;
mod mode;
mod tables;
mod test_run;
mod wall;

pub use inplace_maps::{decode_segment, InPlaceMaps};
pub use kernel_maps::KernelMaps;
pub use line_maps::{JoinError, LineMaps};
use map_specs::MAPS;
pub use mode::{choose, redirect_targets_missing, AttachMode, Choice, LinkFacts};
pub use tables::{
    decode_event, BusyClients, FlowTable, InterceptTables, PeerFilters, PinholeTable, Stats, Table,
    TableName, TableValue,
};
pub use test_run::{BenchPrograms, TestRunOutput};
pub use wall::{UdpMappings, WallTables};

/// The eBPF object built from firewall-ebpf by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/firewall"));
/// The benchmark's packet generator and sink (never loaded by the daemon).
static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench"));

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

impl Datapath {
    /// Loads the programs the pipeline tail-calls for connections read in
    /// place and puts them in their program arrays. Not part of `load`:
    /// verifying them takes the kernel seconds, which only a configuration
    /// that reads control connections in place pays (`[ftp] control`).
    pub fn load_in_place(&mut self) -> anyhow::Result<()> {
        load_in_place(&mut self.ebpf)
    }
}

/// The programs the pipeline tail-calls for connections read in place,
/// loaded and put in their slots of INPLACE_PROGS_*.
fn load_in_place(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let xdp: &mut Xdp = typed(ebpf, program_names::XDP_INPLACE)?;
    load_retrying(program_names::XDP_INPLACE, || xdp.load())?;
    let xdp_fd = xdp
        .fd()
        .context("xdp_inplace has no descriptor")?
        .try_clone()?;
    let tc: &mut SchedClassifier = typed(ebpf, program_names::TC_INPLACE)?;
    load_retrying(program_names::TC_INPLACE, || tc.load())?;
    let tc_fd = tc
        .fd()
        .context("tc_inplace has no descriptor")?
        .try_clone()?;
    for (name, fd) in [
        (map_names::INPLACE_PROGS_XDP, &xdp_fd),
        (map_names::INPLACE_PROGS_TC, &tc_fd),
    ] {
        let map = ebpf
            .map_mut(name)
            .with_context(|| format!("the eBPF object has no {name} map"))?;
        let mut progs = aya::maps::ProgramArray::try_from(map).context(name)?;
        progs
            .set(0, fd, 0)
            .with_context(|| format!("filling {name}"))?;
    }
    Ok(())
}

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
            map_names::STATS => Some(firewall_common::stats::COUNTER_SLOTS),
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
    /// Segments of FTP control connections read in place, for the daemon.
    pub segments: Option<RingBuf<MapData>>,
}

/// Native XDP refused by a driver that cannot run it (no XDP in the driver,
/// an MTU beyond what its XDP takes, no redirect into it): when `up` chose
/// native XDP by itself, it runs the datapath at TC instead.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DriverRefused(pub String);

/// Whether an XDP attach failed for what the driver cannot do, rather than
/// for something an operator must look at (another program attached: EBUSY
/// or EEXIST; permissions).
fn driver_refused(e: &aya::programs::ProgramError) -> bool {
    use aya::programs::{ProgramError, XdpError};
    let errno = match e {
        ProgramError::SyscallError(s) => s.io_error.raw_os_error(),
        ProgramError::XdpError(XdpError::NetlinkError(n)) => n.raw_os_error(),
        _ => None,
    };
    matches!(errno, Some(libc::EOPNOTSUPP | libc::ERANGE | libc::EINVAL))
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
        let lines: &mut SkSkb = typed(&mut ebpf, program_names::FTP_LINES)?;
        load_retrying(program_names::FTP_LINES, || lines.load())?;
        for side in Side::BOTH {
            let tc = tc_program(&mut ebpf, side)?;
            load_retrying(side.tc_program(), || tc.load())?;
        }
        let events = match ebpf.take_map(map_names::EVENTS) {
            Some(m) => Some(RingBuf::try_from(m).context("the EVENTS map is not a ring buffer")?),
            None => bail!("the eBPF object has no EVENTS map"),
        };
        let segments = match ebpf.take_map(map_names::INPLACE_SEGMENTS) {
            Some(m) => Some(
                RingBuf::try_from(m).context("the INPLACE_SEGMENTS map is not a ring buffer")?,
            ),
            None => bail!("the eBPF object has no INPLACE_SEGMENTS map"),
        };
        Ok(Self {
            ebpf,
            pins: pins.clone(),
            links: BTreeMap::new(),
            logger,
            events,
            segments,
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
                    let refused = mode == AttachMode::Native && driver_refused(&e);
                    let hint = if refused {
                        " (the driver runs no XDP here; --xdp-mode tc runs on any driver)"
                    } else {
                        ""
                    };
                    // `{:#}`: the errno too, not only the failed call.
                    let message = format!(
                        "attaching {} to {} in {:?} mode{hint}: {:#}",
                        side.program(),
                        iface.name,
                        mode,
                        anyhow::Error::new(e)
                    );
                    if refused {
                        anyhow::Error::new(DriverRefused(message))
                    } else {
                        anyhow!(message)
                    }
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
