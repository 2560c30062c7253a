//! The maps of FTP control lines forwarded in the kernel (`ftp_lines`): the
//! proxy's sockets by slot, their slots by socket cookie, and each slot's
//! state, mapped into the daemon's memory (the verdict and the daemon hand
//! a direction to each other through it without a syscall).

use std::{
    os::fd::{AsFd as _, AsRawFd, BorrowedFd},
    ptr::NonNull,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Mutex,
    },
};

use anyhow::{bail, Context as _};
use aya::{
    maps::{HashMap, Map, MapData, SockMap},
    programs::SkSkb,
};
use firewall_common::{
    ftp_lines::{LineState, LINE_SLOT_COUNT},
    map_names, program_names,
};

use super::PinPaths;

/// Why a connection could not join kernel forwarding.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// Every slot is taken (`LINE_SLOT_COUNT / 2` connections).
    #[error("all {LINE_SLOT_COUNT} slots are in use (exhausted)")]
    Exhausted,
    #[error("{0:#}")]
    Map(anyhow::Error),
}

/// The three maps, and which slots are free.
pub struct LineMaps {
    socks: Mutex<SockMap<MapData>>,
    slots: Mutex<HashMap<MapData, u64, u32>>,
    states: NonNull<LineState>,
    mapped_len: usize,
    free: Mutex<Vec<u32>>,
}

// SAFETY: `states` points at a shared mapping that lives as long as the
// LineMaps; the daemon reads and writes the verdict's slots through atomics
// (`view`, `offer`), and writes a whole slot only while no socket uses it
// (`reset`).
unsafe impl Send for LineMaps {}
// SAFETY: as above.
unsafe impl Sync for LineMaps {}

/// A direction's state as the daemon sees it (atomic reads of the
/// verdict's fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotView {
    pub kernel: bool,
    pub passed: u64,
    pub redirected: u64,
    pub resume: u64,
    pub lines: u64,
}

impl LineMaps {
    /// Opens the pinned maps; `in_use` are the slots of connections a
    /// previous daemon handed over.
    pub fn open(pins: &PinPaths, in_use: &[u32]) -> anyhow::Result<Self> {
        let in_use: std::collections::HashSet<u32> = in_use.iter().copied().collect();
        let socks = SockMap::try_from(Map::from_map_data(pins.open_map(map_names::LINE_SOCKS)?)?)?;
        let mut slots: HashMap<MapData, u64, u32> =
            HashMap::try_from(Map::from_map_data(pins.open_map(map_names::LINE_SLOTS)?)?)?;
        // Entries of sockets no connection handed over are a previous
        // daemon's leftovers.
        let stale: Vec<u64> = slots
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, slot)| !in_use.contains(slot))
            .map(|(cookie, _)| cookie)
            .collect();
        for cookie in stale {
            let _ = slots.remove(&cookie);
        }
        let states = pins.open_map(map_names::LINE_STATE)?;
        let len = std::mem::size_of::<LineState>() * LINE_SLOT_COUNT as usize;
        // SAFETY: a fresh shared mapping of the array map's values (the
        // kernel checks the length against the map); unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                states.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mapping {} into memory", map_names::LINE_STATE));
        }
        let Some(states) = NonNull::new(ptr.cast::<LineState>()) else {
            bail!(
                "mapping {} into memory gave no address",
                map_names::LINE_STATE
            );
        };
        let free = (0..LINE_SLOT_COUNT)
            .rev()
            .filter(|s| !in_use.contains(s))
            .collect();
        Ok(Self {
            socks: Mutex::new(socks),
            slots: Mutex::new(slots),
            states,
            mapped_len: len,
            free: Mutex::new(free),
        })
    }

    /// Puts two sockets of a connection into kernel forwarding, each the
    /// other's peer (both start with the daemon): their slots and cookies.
    /// An error when no slot is free or a map refused them (nothing is left
    /// in the maps; the connection then stays with the daemon).
    pub fn join(
        &self,
        commands: BorrowedFd<'_>,
        replies: BorrowedFd<'_>,
    ) -> Result<([u32; 2], [u64; 2]), JoinError> {
        let pair = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            if free.len() < 2 {
                return Err(JoinError::Exhausted);
            }
            [
                free.pop().unwrap_or_default(),
                free.pop().unwrap_or_default(),
            ]
        };
        let fds = [commands, replies];
        let mut cookies = [0u64; 2];
        let r = (|| {
            for (i, fd) in fds.iter().enumerate() {
                cookies[i] = socket2::SockRef::from(fd)
                    .cookie()
                    .context("reading the socket's cookie")?;
                self.reset(pair[i], pair[1 - i], i as u32);
            }
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            for i in 0..2 {
                slots.insert(cookies[i], pair[i], 0).context("LINE_SLOTS")?;
            }
            drop(slots);
            let mut socks = self.socks.lock().unwrap_or_else(|p| p.into_inner());
            for i in 0..2 {
                socks
                    .set(pair[i], &fds[i].as_raw_fd(), 0)
                    .context("LINE_SOCKS")?;
            }
            Ok(())
        })();
        if let Err(e) = r {
            self.leave(pair, cookies);
            return Err(JoinError::Map(e));
        }
        Ok((pair, cookies))
    }

    /// Takes two slots out of kernel forwarding and frees them. Removing a
    /// socket from the SOCKMAP drops what it holds for the daemon: only at
    /// the end of a connection.
    pub fn leave(&self, pair: [u32; 2], cookies: [u64; 2]) {
        let mut socks = self.socks.lock().unwrap_or_else(|p| p.into_inner());
        for s in pair {
            let _ = socks.clear_index(&s);
        }
        drop(socks);
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for c in cookies.into_iter().filter(|c| *c != 0) {
            let _ = slots.remove(&c);
        }
        drop(slots);
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.extend(pair);
    }

    fn slot(&self, slot: u32) -> *mut LineState {
        debug_assert!(slot < LINE_SLOT_COUNT);
        let slot = slot.min(LINE_SLOT_COUNT - 1) as usize;
        // SAFETY: within the mapping (slot < LINE_SLOT_COUNT).
        unsafe { self.states.as_ptr().add(slot) }
    }

    /// A slot as the verdict starts it: with the daemon, nothing offered.
    fn reset(&self, slot: u32, peer: u32, role: u32) {
        let p = self.slot(slot);
        // SAFETY: a slot of the mapping no socket uses (free until joined):
        // no verdict runs on it.
        unsafe {
            p.write_volatile(LineState {
                peer,
                role,
                ..LineState::default()
            })
        };
    }

    /// The verdict's view of `slot`.
    pub fn view(&self, slot: u32) -> SlotView {
        let p = self.slot(slot);
        // SAFETY: aligned fields of the shared mapping, read atomically.
        unsafe {
            SlotView {
                kernel: AtomicU32::from_ptr(&raw mut (*p).kernel).load(Ordering::Acquire) != 0,
                passed: AtomicU64::from_ptr(&raw mut (*p).passed).load(Ordering::Acquire),
                redirected: AtomicU64::from_ptr(&raw mut (*p).redirected).load(Ordering::Acquire),
                resume: AtomicU64::from_ptr(&raw mut (*p).resume).load(Ordering::Acquire),
                lines: AtomicU64::from_ptr(&raw mut (*p).lines).load(Ordering::Relaxed),
            }
        }
    }

    /// Offers the direction of `slot` back to the kernel as of `passed`.
    pub fn offer(&self, slot: u32, passed: u64) {
        let p = self.slot(slot);
        // SAFETY: an aligned field of the shared mapping, written atomically
        // (the daemon is its only writer).
        unsafe { AtomicU64::from_ptr(&raw mut (*p).resume).store(passed + 1, Ordering::Release) };
    }
}

impl Drop for LineMaps {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, no longer used.
        unsafe { libc::munmap(self.states.as_ptr().cast(), self.mapped_len) };
    }
}

impl super::Datapath {
    /// Attaches the stream verdict to the proxy's SOCKMAP: sockets put into
    /// it from now on have their plain lines forwarded in the kernel. Not
    /// pinned: a socket keeps the verdict it was given, and the next daemon
    /// attaches its own.
    pub fn attach_ftp_lines(&mut self) -> anyhow::Result<()> {
        let socks: SockMap<&MapData> = SockMap::try_from(
            self.ebpf
                .map(map_names::LINE_SOCKS)
                .with_context(|| format!("map {} missing", map_names::LINE_SOCKS))?,
        )?;
        let fd = socks
            .fd()
            .try_clone()
            .context("duplicating the SOCKMAP's fd")?;
        let prog: &mut SkSkb = super::typed(&mut self.ebpf, program_names::FTP_LINES)?;
        prog.attach(&fd).with_context(|| {
            format!(
                "attaching {} to {}",
                program_names::FTP_LINES,
                map_names::LINE_SOCKS
            )
        })?;
        Ok(())
    }
}
