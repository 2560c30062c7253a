//! A real TFTP server for the lab: in.tftpd (tftpd-hpa) in a namespace.

use std::{fs, os::unix::fs::PermissionsExt as _, path::PathBuf, process::Stdio};

use anyhow::Context as _;

use crate::{
    ftp::random_file,
    lab::{addr, Ns},
    traffic::{wait_listening, Peer},
};

/// in.tftpd on SERVER:69, serving and taking files in `dir` (removed when
/// dropped, after the server is stopped).
pub struct TftpServer {
    _daemon: Peer,
    pub dir: PathBuf,
}

impl TftpServer {
    pub fn start(ns: &Ns, tag: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("{tag}-tftpd"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        // Uploads are written as the server's unprivileged user.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))?;
        let daemon = ns
            .cmd("in.tftpd")
            .args(["--listen", "--foreground", "--create", "--secure"])
            .args(["--address", &format!("{}:69", addr::SERVER)])
            .arg(&dir)
            .stdin(Stdio::null())
            .spawn()
            .context("starting in.tftpd (tftpd-hpa; `cargo xtask setup` installs it)")?;
        let daemon = Peer::new(daemon);
        wait_listening(ns, 69);
        Ok(Self {
            _daemon: daemon,
            dir,
        })
    }

    /// A file of `bytes` random bytes the server serves; its path.
    pub fn random_file(&self, name: &str, bytes: u64) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(name);
        random_file(&path, bytes)?;
        Ok(path)
    }
}

impl Drop for TftpServer {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}
