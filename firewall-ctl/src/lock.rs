//! One daemon per host: the daemon holds an exclusive lock on `LOCK_FILE`
//! for as long as it runs. The kernel releases it when the process ends,
//! also when it crashes, so a held lock means a live daemon, whatever socket
//! path it was given: a second `up` is refused, and `down` stops the running
//! daemon instead of removing its datapath from under it.

use std::{fs::File, io, path::Path};

use nix::fcntl::{Flock, FlockArg};

pub const LOCK_FILE: &str = "/run/firewall/daemon.lock";

pub struct DaemonLock(#[allow(dead_code)] Flock<File>);

fn open() -> io::Result<File> {
    let path = Path::new(LOCK_FILE);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

impl DaemonLock {
    /// The lock, or None when a running daemon holds it.
    pub fn acquire() -> io::Result<Option<Self>> {
        match Flock::lock(open()?, FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(Some(Self(l))),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(e.into()),
        }
    }

    /// Whether a running daemon holds the lock.
    pub fn held() -> io::Result<bool> {
        Ok(Self::acquire()?.is_none())
    }
}
