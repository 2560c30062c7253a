//! One control connection's plain lines forwarded in the kernel: the
//! daemon's half of the hand-offs described in `firewall_common::ftp_lines`.
//!
//! - After reading a direction and writing what the filter made of it, the
//!   daemon offers the direction back when the filter is at a line boundary
//!   and every byte the socket received was either read by the daemon or
//!   forwarded by the kernel (`TCP_INFO`'s bytes received).
//! - Before writing to a socket (or shutting it), the daemon waits until the
//!   bytes the kernel forwarded into it are in its send queue: queued =
//!   bytes sent − bytes retransmitted + not yet sent (one `TCP_INFO`), which
//!   must reach what the daemon wrote plus what the peer's verdict
//!   redirected.

use std::{
    os::fd::{AsFd, AsRawFd as _},
    sync::{atomic::Ordering::Relaxed, Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    datapath::{JoinError, LineMaps},
    ftp::FtpStats,
};

/// How long the daemon's bytes wait for the kernel's forwarded ones to
/// reach an idle socket (all sent and acknowledged). They take microseconds;
/// a socket whose peer is slow to read waits as long as it takes, but one
/// that is idle this long while the count says bytes are missing means the
/// counts went wrong: the connection ends rather than risk the order.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// The two sockets of a connection: 0 the client's (commands come in on
/// it), 1 the server's (replies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Side {
    Client = 0,
    Server = 1,
}

impl Side {
    fn peer(self) -> Self {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }
}

/// What the next daemon needs to go on with a connection in kernel
/// forwarding (its slots stay in the pinned maps meanwhile).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedLines {
    pub slots: [u32; 2],
    pub cookies: [u64; 2],
    /// Bytes the daemon read from, and wrote to, each socket in all.
    pub read: [u64; 2],
    pub written: [u64; 2],
}

/// At most one warning this often that every slot is taken.
const EXHAUSTED_WARN_EVERY: Duration = Duration::from_secs(60);

/// A connection whose plain lines the kernel forwards.
pub(super) struct KernelLines {
    maps: Arc<LineMaps>,
    stats: Arc<FtpStats>,
    h: HandedLines,
    /// Whether to offer directions back (false: the daemon keeps them, as
    /// with a connection resumed by a daemon configured without).
    offering: bool,
    handed_over: bool,
    /// Per socket, the peer's `redirected` last seen in its send queue: as
    /// long as it stays so, the daemon's writes need no look at the queue.
    flushed_to: [u64; 2],
    /// Per socket, since when the daemon's bytes wait for the kernel's.
    waiting_since: [Option<Instant>; 2],
}

fn tcp_info(fd: &impl AsFd) -> std::io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain integers; the kernel fills at most `len`.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket, a buffer of `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info)
}

/// Queued into a socket in all: sent (retransmissions once) and not sent;
/// and whether it is idle (nothing unsent or unacknowledged).
fn queued(fd: &impl AsFd) -> std::io::Result<(u64, bool)> {
    let info = tcp_info(fd)?;
    let queued = info
        .tcpi_bytes_sent
        .saturating_sub(info.tcpi_bytes_retrans)
        .saturating_add(info.tcpi_notsent_bytes as u64);
    Ok((
        queued,
        info.tcpi_notsent_bytes == 0 && info.tcpi_unacked == 0,
    ))
}

impl KernelLines {
    /// Puts a new connection's sockets into kernel forwarding; None (logged,
    /// counted) when that cannot be done: the daemon then forwards every line.
    pub(super) fn join(
        maps: &Arc<LineMaps>,
        stats: &Arc<FtpStats>,
        client: &impl AsFd,
        server: &impl AsFd,
    ) -> Option<Self> {
        match maps.join(client.as_fd(), server.as_fd()) {
            Ok((slots, cookies)) => Some(Self::counted(Self {
                maps: maps.clone(),
                stats: stats.clone(),
                h: HandedLines {
                    slots,
                    cookies,
                    read: [0; 2],
                    written: [0; 2],
                },
                offering: true,
                handed_over: false,
                flushed_to: [0; 2],
                waiting_since: [None; 2],
            })),
            Err(JoinError::Exhausted) => {
                let n = stats.kernel_slots_exhausted.fetch_add(1, Relaxed) + 1;
                warn_exhausted(n);
                None
            }
            Err(e) => {
                log::warn!("FTP control lines stay with the daemon: {e}");
                None
            }
        }
    }

    /// Goes on with a connection a previous daemon handed over.
    pub(super) fn resume(
        maps: &Arc<LineMaps>,
        stats: &Arc<FtpStats>,
        h: HandedLines,
        offering: bool,
    ) -> Self {
        Self::counted(Self {
            maps: maps.clone(),
            stats: stats.clone(),
            h,
            offering,
            handed_over: false,
            flushed_to: [0; 2],
            waiting_since: [None; 2],
        })
    }

    fn counted(self) -> Self {
        self.stats.kernel_line_connections.fetch_add(1, Relaxed);
        self
    }

    pub(super) fn read(&mut self, side: Side, n: usize) {
        self.h.read[side as usize] += n as u64;
    }

    pub(super) fn wrote(&mut self, side: Side, n: usize) {
        self.h.written[side as usize] += n as u64;
    }

    /// Lines the kernel forwarded, both ways.
    pub(super) fn lines(&self) -> u64 {
        self.h.slots.iter().map(|s| self.maps.view(*s).lines).sum()
    }

    /// Whether what the kernel forwarded into the socket of `side` is in
    /// its send queue, so that the daemon's next bytes can follow it. An
    /// error when the socket has been idle for FLUSH_WAIT without it.
    pub(super) fn flushed(&mut self, side: Side, fd: &impl AsFd) -> std::io::Result<bool> {
        let redirected = self
            .maps
            .view(self.h.slots[side.peer() as usize])
            .redirected;
        let i = side as usize;
        if redirected == self.flushed_to[i] {
            return Ok(true);
        }
        let due = self.h.written[i] + redirected;
        let (queued, idle) = queued(fd)?;
        if queued >= due {
            self.flushed_to[i] = redirected;
            self.waiting_since[i] = None;
            return Ok(true);
        }
        if !idle {
            // A slow reader: the kernel's bytes wait for room.
            self.waiting_since[i] = None;
            return Ok(false);
        }
        let since = *self.waiting_since[i].get_or_insert_with(Instant::now);
        if since.elapsed() > FLUSH_WAIT {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the kernel's forwarded lines did not reach the socket in {FLUSH_WAIT:?}"),
            ));
        }
        Ok(false)
    }

    /// Offers the direction coming in on `side` back to the kernel when
    /// the filter is `at_boundary` and the daemon has read everything the
    /// kernel did not forward.
    pub(super) fn offer(&self, side: Side, fd: &impl AsFd, at_boundary: bool) {
        if !self.offering || !at_boundary {
            return;
        }
        let slot = self.h.slots[side as usize];
        let v = self.maps.view(slot);
        if v.kernel || v.resume == v.passed + 1 {
            return;
        }
        // `passed` is read before the socket's total: a segment counted in
        // the total but not yet given to the daemon makes them disagree.
        match tcp_info(fd) {
            Ok(i) if i.tcpi_bytes_received == self.h.read[side as usize] + v.redirected => {
                self.maps.offer(slot, v.passed)
            }
            _ => {}
        }
    }

    /// Leaves the slots in the maps for the next daemon.
    pub(super) fn hand_over(mut self) -> HandedLines {
        self.handed_over = true;
        self.h.clone()
    }
}

impl Drop for KernelLines {
    fn drop(&mut self) {
        self.stats.kernel_line_connections.fetch_sub(1, Relaxed);
        if !self.handed_over {
            self.maps.leave(self.h.slots, self.h.cookies);
        }
    }
}

/// Warns that every slot is taken, at most once per `EXHAUSTED_WARN_EVERY`
/// (a full table stays full for many connections); `total` is the count of
/// connections it happened to so far.
fn warn_exhausted(total: u64) {
    static WARNED: Mutex<Option<Instant>> = Mutex::new(None);
    let due = {
        let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
        let due = warned.is_none_or(|t| t.elapsed() >= EXHAUSTED_WARN_EVERY);
        if due {
            *warned = Some(Instant::now());
        }
        due
    };
    if due {
        log::warn!(
            "FTP control lines: all {} kernel slots are taken ({} control connections): new \
             control connections' lines go through the daemon ({total} so far; \
             ftp_kernel_slots_exhausted_total)",
            firewall_common::ftp_lines::LINE_SLOT_COUNT,
            firewall_common::ftp_lines::LINE_SLOT_COUNT / 2,
        );
    }
}
