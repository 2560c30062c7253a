//! The namespace lab shared by the tests, the demo, the benchmark and
//! `cargo xtask`: network namespaces joined by veth pairs, and the small
//! process helpers they need. It depends on nothing of the firewall, so that
//! `cargo xtask setup` builds before the eBPF toolchain exists.

use std::process::{Command, Output};

use anyhow::{bail, Context as _};

mod lab;

pub use lab::*;

/// Where the lab's ProFTPD is unpacked: Debian's proftpd packages conflict
/// with vsftpd (both are an "ftp-server"), so the tests use a private copy
/// of proftpd-core's files, with its libraries installed from Debian.
pub const PROFTPD_ROOT: &str = "/opt/firewall-lab/proftpd";

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}{}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// Runs a command and returns its stdout as a string.
pub fn run_stdout(cmd: &mut Command) -> anyhow::Result<String> {
    Ok(String::from_utf8_lossy(&run(cmd)?.stdout).into_owned())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { geteuid() == 0 }
}

unsafe extern "C" {
    fn geteuid() -> u32;
}
