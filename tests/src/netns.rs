//! Running code of the current thread inside another network namespace.

use std::{fs::File, os::fd::AsFd as _};

use anyhow::Context as _;
use nix::sched::{setns, CloneFlags};

/// Runs `f` with the calling thread switched into the network namespace at
/// `path` (e.g. `/run/netns/NAME`), and switches back afterwards.
pub fn in_netns<T>(path: &str, f: impl FnOnce() -> T) -> anyhow::Result<T> {
    let original = File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
    let target = File::open(path).with_context(|| format!("opening netns {path}"))?;
    setns(target.as_fd(), CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering netns {path}"))?;
    let result = f();
    setns(original.as_fd(), CloneFlags::CLONE_NEWNET).context("returning to the original netns")?;
    Ok(result)
}
