//! The real daemon in the lab's firewall namespace, and the CLI.

use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::lab::{addr, Lab, Ns};

/// Path of the firewall-ctl binary (set by `cargo xtask test`).
pub fn ctl_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("FIREWALL_CTL") {
        return p.into();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let p = root.join("target/debug/firewall-ctl");
    assert!(
        p.exists(),
        "{} does not exist: build it first (`cargo xtask test` does)",
        p.display()
    );
    p
}

/// Runs firewall-ctl in a namespace.
pub fn ctl_in(ns: &Ns, args: &[&str]) -> Output {
    let bin = ctl_binary();
    let mut c = ns.cmd(bin.to_str().expect("utf-8 path"));
    c.args(args).output().expect("running firewall-ctl")
}

/// A running `firewall-ctl up` in the lab's firewall namespace.
pub struct Firewall {
    pub fw: Ns,
    pub socket: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Firewall {
    pub fn up(lab: &Lab, extra: &[&str]) -> anyhow::Result<Self> {
        let socket = format!("/run/firewall/{}.sock", lab.prefix);
        let log = std::env::temp_dir().join(format!("{}-daemon.log", lab.prefix));
        let logfile = std::fs::File::create(&log)?;
        let bin = ctl_binary();
        let child = lab
            .fw
            .cmd(bin.to_str().expect("utf-8 path"))
            .args([
                "--socket",
                &socket,
                "up",
                "--internal",
                addr::IF_INTERNAL,
                "--external",
                addr::IF_EXTERNAL,
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(logfile.try_clone()?)
            .stderr(logfile)
            .spawn()
            .context("spawning firewall-ctl up")?;
        let mut fwl = Firewall {
            fw: lab.fw.clone(),
            socket,
            child: Some(child),
            log,
        };
        fwl.wait_ready()?;
        Ok(fwl)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Some(status) = self.child.as_mut().expect("child").try_wait()? {
                self.child = None;
                bail!("firewall-ctl up exited with {status}: {}", self.log_text());
            }
            if self.ctl(&["status", "-j"]).status.success() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "firewall-ctl up did not answer within 30 s: {}",
            self.log_text()
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a firewall-ctl subcommand against this daemon.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["--socket", &self.socket];
        all.extend_from_slice(args);
        ctl_in(&self.fw, &all)
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.ctl(&["status", "-j"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// Packets counted under a counter name in `status`.
    pub fn counter(&self, name: &str) -> u64 {
        let s = self.status();
        s["counters"]
            .as_array()
            .expect("counters")
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| c["packets"].as_u64().unwrap())
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// Kills the daemon with SIGKILL (a crash), leaving its pins behind.
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `firewall-ctl down`, and waits for the daemon to exit. Returns down's output.
    pub fn down(&mut self) -> Output {
        let out = self.ctl(&["down", "-j"]);
        if let Some(mut c) = self.child.take() {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if c.try_wait().ok().flatten().is_some() {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        out
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .map(|c| c.try_wait().ok().flatten().is_none())
            .unwrap_or(false)
    }

    /// Takes the child out so `Drop` leaves it alone (for restart tests).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        c.wait().ok()
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        // Always leave the machine clean, also when a test failed.
        let _ = self.down();
        let _ = Command::new("true").status();
    }
}

/// A lab with the daemon running on it, holding the lab-test lock. Fields drop
/// in order: the daemon goes down before its namespaces, and the lock last.
pub struct LabRun {
    pub fw: Firewall,
    pub lab: Lab,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl LabRun {
    /// `tag` names the lab (a few characters); `extra` are more `up` arguments.
    pub fn start(tag: &str, extra: &[&str]) -> Self {
        crate::require_root();
        let turn = crate::exclusive();
        let lab = Lab::create(&crate::lab::unique_prefix(tag)).expect("creating the lab");
        let fw = Firewall::up(&lab, extra).expect("firewall-ctl up");
        Self {
            fw,
            lab,
            _turn: turn,
        }
    }
}
