//! systemd's side of its notification protocol, for tests where systemd is
//! not PID 1: the socket a daemon's NOTIFY_SOCKET names, and the
//! file-descriptor store (`FDSTORE=1` with SCM_RIGHTS, `FDSTOREREMOVE=1`).

use std::{
    io::IoSliceMut,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::net::UnixDatagram,
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

/// systemd's side: the notification socket and the descriptors stored in it.
pub struct ServiceManager {
    socket: UnixDatagram,
    pub path: PathBuf,
    /// Descriptors stored (FDSTORE=1) by name, in order.
    pub store: Vec<(String, OwnedFd)>,
}

impl ServiceManager {
    /// A notification socket named after `tag`, in the temporary directory.
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{tag}-notify.sock"));
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Self {
            socket,
            path,
            store: Vec::new(),
        }
    }

    /// One notification, with the descriptors it carries; None on timeout.
    pub fn recv(&self) -> Option<(String, Vec<OwnedFd>)> {
        let mut buf = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; 8]);
        let (n, fds) = {
            let msg = recvmsg::<()>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .ok()?;
            let mut fds = Vec::new();
            for c in msg.cmsgs().ok()? {
                if let ControlMessageOwned::ScmRights(rights) = c {
                    // SAFETY: SCM_RIGHTS gave this process these descriptors.
                    fds.extend(
                        rights
                            .into_iter()
                            .map(|f| unsafe { OwnedFd::from_raw_fd(f) }),
                    );
                }
            }
            (msg.bytes, fds)
        };
        Some((String::from_utf8_lossy(&buf[..n]).into_owned(), fds))
    }

    /// Reads notifications until one says `want` (or `secs` pass); stores
    /// descriptors sent with FDSTORE=1 and forgets those FDSTOREREMOVE=1 names.
    pub fn until(&mut self, want: &str, secs: u64, log: &Path) -> String {
        let start = Instant::now();
        let mut seen = String::new();
        while start.elapsed() < Duration::from_secs(secs) {
            let Some((text, fds)) = self.recv() else {
                continue;
            };
            let name = text
                .lines()
                .find_map(|l| l.strip_prefix("FDNAME="))
                .unwrap_or("stored")
                .to_string();
            if text.lines().any(|l| l == "FDSTORE=1") {
                self.store
                    .extend(fds.into_iter().map(|f| (name.clone(), f)));
            } else if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
                self.store.retain(|(n, _)| *n != name);
            }
            seen.push_str(&text);
            if seen.contains(want) {
                return seen;
            }
        }
        panic!(
            "no {want} within {secs} s (got {seen:?}); log: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

impl Drop for ServiceManager {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
