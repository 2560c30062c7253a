//! FTP control connections kept across a restart in systemd's
//! file-descriptor store (`FDSTORE=1`, `FileDescriptorStoreMax=` in the
//! unit): the stopping daemon stores each connection's two sockets and one
//! memfd with the filter's states; systemd passes them to the next daemon
//! (`LISTEN_FDS`, `LISTEN_FDNAMES`), which filters on from where the old one
//! stopped and removes them from the store. Clients notice nothing: their
//! segments wait in the kernel's socket buffers meanwhile. Connections read
//! in place have no socket: one memfd carries their filters (the openings
//! they announced), and the datapath forwards their plain lines meanwhile.
//! Without a service manager (no NOTIFY_SOCKET) the connections end with
//! the daemon.

use std::{
    collections::BTreeMap,
    io::{Read as _, Seek as _, Write as _},
    net::SocketAddrV4,
    os::fd::{AsFd as _, FromRawFd as _, OwnedFd},
};

use sd_notify::NotifyState;
use serde::{Deserialize, Serialize};

use crate::{
    datapath::KernelMaps,
    engine_owner::EngineHandle,
    ftp::ControlState,
    in_place,
    primary::{Handed, HandedLines},
};

/// The memfd with the filter states.
const STATES: &str = "ftp-states";
/// The memfd with the filters of connections read in place.
const IN_PLACE_STATES: &str = "ftp-in-place-states";

/// What a previous daemon left in the store.
#[derive(Default)]
pub(super) struct Taken {
    pub proxied: Vec<Handed>,
    pub in_place: Vec<in_place::Handed>,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    n: usize,
    state: ControlState,
    /// The sockets' slots in the kernel's line forwarding (pinned maps).
    #[serde(default)]
    lines: Option<HandedLines>,
}

fn client_name(n: usize) -> String {
    format!("ftp-client-{n}")
}

fn server_name(n: usize) -> String {
    format!("ftp-server-{n}")
}

/// The (local, remote) addresses of the client sides stored: sockets that
/// must outlive this daemon.
pub(super) fn client_sockets(handed: &[Handed]) -> Vec<(SocketAddrV4, SocketAddrV4)> {
    handed
        .iter()
        .map(|h| (h.state.server, h.state.client))
        .collect()
}

/// Keeps, of the openings each connection announced, those no connection
/// has used yet: the next daemon makes them again where they were announced.
/// Asked once all connections stopped, so that as few as possible are used
/// between this answer and the next daemon's start (one that is made again
/// for nothing expires with its timeout).
pub(super) async fn keep_pending(
    mut states: Vec<&mut ControlState>,
    engine: &EngineHandle<KernelMaps>,
) {
    let ids: Vec<u64> = states
        .iter()
        .flat_map(|s| s.pending().iter().map(|o| o.id()))
        .collect();
    if ids.is_empty() {
        return;
    }
    let waiting = match engine.call(move |e| e.still_waiting(&ids)).await {
        Ok(w) => w,
        Err(e) => {
            log::warn!("the announced data connections are not handed over ({e}): they fail");
            Vec::new()
        }
    };
    for s in states.iter_mut() {
        s.keep_pending(|id| waiting.contains(&id));
    }
    if !waiting.is_empty() {
        log::info!(
            "{} announced data connections not yet opened handed over",
            waiting.len()
        );
    }
}

fn store_fd(name: &str, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(name)], &[fd])
}

/// Stores the connections with the service manager; returns how many. The
/// descriptors here close as they are dropped: the store holds its own.
pub(super) fn store(handed: Vec<Handed>) -> anyhow::Result<usize> {
    if handed.is_empty() {
        return Ok(0);
    }
    let mut entries = Vec::new();
    for (n, h) in handed.into_iter().enumerate() {
        store_fd(&client_name(n), h.client.as_fd())?;
        store_fd(&server_name(n), h.server.as_fd())?;
        entries.push(Entry {
            n,
            state: h.state,
            lines: h.lines,
        });
    }
    store_json(STATES, &entries)?;
    Ok(entries.len())
}

/// Stores the filters of the connections read in place; returns how many.
pub(super) fn store_in_place(handed: &[in_place::Handed]) -> anyhow::Result<usize> {
    if !handed.is_empty() {
        store_json(IN_PLACE_STATES, handed)?;
    }
    Ok(handed.len())
}

/// Stores `value` as JSON in a memfd named `name`.
fn store_json(name: &str, value: &(impl Serialize + ?Sized)) -> anyhow::Result<()> {
    let fd = nix::sys::memfd::memfd_create(
        c"firewall-ftp-states",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(&serde_json::to_vec(value)?)?;
    store_fd(name, file.as_fd())?;
    Ok(())
}

/// Takes the connections a previous daemon stored, and has the store
/// forget them (the next restart stores what is alive then).
pub(super) fn take() -> Taken {
    let fds: BTreeMap<String, OwnedFd> = match sd_notify::listen_fds_with_names() {
        // SAFETY: the service manager passed these descriptors to this
        // process (LISTEN_PID checked); each is owned once, here.
        Ok(fds) => fds
            .map(|(fd, name)| (name, unsafe { OwnedFd::from_raw_fd(fd) }))
            .collect(),
        Err(e) => {
            log::warn!("descriptors from the service manager: {e}");
            return Taken::default();
        }
    };
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    if fds.is_empty() {
        return Taken::default();
    }
    for name in fds.keys() {
        let _ = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]);
    }
    let mut fds = fds;
    let in_place = match fds.remove(IN_PLACE_STATES).map(read_states) {
        Some(Ok(h)) => h,
        Some(Err(e)) => {
            log::warn!("the previous daemon's in-place FTP states are unreadable ({e:#}): their unused openings are lost");
            Vec::new()
        }
        None => Vec::new(),
    };
    let entries: Vec<Entry> = match fds.remove(STATES).map(read_states) {
        Some(Ok(e)) => e,
        Some(Err(e)) => {
            log::warn!("the previous daemon's FTP states are unreadable ({e:#}): its control connections end");
            return Taken {
                proxied: Vec::new(),
                in_place,
            };
        }
        None => {
            if !fds.is_empty() {
                log::warn!("descriptors without the previous daemon's FTP states: ignored");
            }
            return Taken {
                proxied: Vec::new(),
                in_place,
            };
        }
    };
    let handed: Vec<Handed> = entries
        .into_iter()
        .filter_map(|e| {
            let client = fds.remove(&client_name(e.n))?;
            let server = fds.remove(&server_name(e.n))?;
            Some(Handed {
                client: client.into(),
                server: server.into(),
                state: e.state,
                lines: e.lines,
            })
        })
        .collect();
    log::info!(
        "{} FTP control connections taken over from the previous daemon",
        handed.len()
    );
    Taken {
        proxied: handed,
        in_place,
    }
}

fn read_states<T: serde::de::DeserializeOwned>(fd: OwnedFd) -> anyhow::Result<Vec<T>> {
    let mut file = std::fs::File::from(fd);
    file.rewind()?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    Ok(serde_json::from_str(&text)?)
}
