//! What `up` changed on the host, recorded so that `down` can undo it even
//! after a crash, and `down` itself.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::{
    api::{self, ApiError, ErrorKind, Request},
    datapath::{self, AttachMode, PinPaths},
    lock::{DaemonLock, LOCK_FILE},
    netif,
    routing::LocalDelivery,
};

/// Where `up` records what it changed, so `down` can undo it even after a crash.
pub const STATE_FILE: &str = "/run/firewall/state.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub pid: u32,
    pub internal: String,
    pub internal_ifindex: u32,
    pub external: String,
    pub external_ifindex: u32,
    pub xdp_mode: AttachMode,
    pub socket: PathBuf,
    /// Sysctls `up` changed, with the values they had before.
    pub saved_sysctls: BTreeMap<String, String>,
    /// The policy routing `up` added for intercepted connections.
    #[serde(default)]
    pub local_delivery: Option<LocalDelivery>,
}

impl State {
    pub fn read() -> Option<State> {
        let text = fs::read_to_string(STATE_FILE).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub(super) fn write(&self) -> anyhow::Result<()> {
        let path = Path::new(STATE_FILE);
        fs::create_dir_all(path.parent().expect("has parent"))?;
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        fs::rename(&tmp, path).with_context(|| format!("writing {STATE_FILE}"))
    }
}

/// Removes the sockets that answered for servers' addresses: left behind,
/// they would stall forwarded connections of the same 5-tuples.
/// `except`: (local, remote) of sockets handed to the next daemon.
pub(super) fn remove_transparent_sockets(
    except: &[(std::net::SocketAddrV4, std::net::SocketAddrV4)],
) {
    match crate::timewait::destroy_transparent(except) {
        Ok(0) => {}
        Ok(n) => log::info!("closed {n} sockets of intercepted connections"),
        Err(e) => log::warn!("closing the sockets of intercepted connections: {e:#}"),
    }
}

/// Unpins everything, restores sysctls and removes the state file.
pub fn teardown(pins: &PinPaths, state: Option<&State>) -> anyhow::Result<Vec<PathBuf>> {
    if let Some(d) = state.and_then(|s| s.local_delivery) {
        d.remove();
    }
    remove_transparent_sockets(&[]);
    let removed = datapath::unpin_all(pins)?;
    if let Some(s) = state {
        for (k, v) in &s.saved_sysctls {
            if let Err(e) = netif::write_sysctl(k, v) {
                // The interface may be gone (a deleted namespace); nothing to restore then.
                log::debug!("not restoring {k}: {e}");
            }
        }
    }
    let _ = fs::remove_file(STATE_FILE);
    Ok(removed)
}

/// The running daemon, as its state file describes it.
pub(super) fn describe_running() -> String {
    match State::read() {
        Some(s) => format!(
            "a firewall daemon is running (pid {}, internal {}, external {}, API socket {})",
            s.pid,
            s.internal,
            s.external,
            s.socket.display()
        ),
        None => format!("a firewall daemon is running (it holds {LOCK_FILE})"),
    }
}

/// What `down` does: ask the running daemon to stop (at the socket it
/// recorded, whatever `socket` says), then remove whatever is left (also
/// after a crash), and restore the sysctls `up` changed. A daemon that runs
/// but does not stop keeps its datapath: `down` then fails.
pub fn down(socket: &Path) -> anyhow::Result<DownReport> {
    let mut stopped_daemon = false;
    if DaemonLock::held()? {
        let recorded = State::read().map(|s| s.socket);
        let at = recorded.as_deref().unwrap_or(socket);
        let client = api::Client::new(at).with_timeout(Duration::from_secs(5));
        match client.call(Request::Shutdown) {
            Ok(_) => {
                stopped_daemon = true;
                // The daemon releases its lock when it has torn down.
                for _ in 0..200 {
                    if !DaemonLock::held()? {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Err(e) => log::warn!("asking the daemon to stop: {e}"),
        }
        if DaemonLock::held()? {
            return Err(anyhow::Error::new(ApiError::new(
                ErrorKind::AlreadyRunning,
                format!(
                    "{}, but it did not stop when asked on {}: its datapath is left alone (stop the process first)",
                    describe_running(),
                    at.display()
                ),
            )));
        }
    }
    let state = State::read();
    let pins = PinPaths::default();
    let removed = teardown(&pins, state.as_ref())?;
    let _ = fs::remove_file(socket);
    Ok(DownReport {
        stopped_daemon,
        removed_pins: removed.iter().map(|p| p.display().to_string()).collect(),
    })
}

#[derive(Debug, Serialize)]
pub struct DownReport {
    pub stopped_daemon: bool,
    pub removed_pins: Vec<String>,
}
