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
        Self::up_with_env(lab, extra, &[])
    }

    /// `up` with more environment variables (NOTIFY_SOCKET, ...).
    pub fn up_with_env(lab: &Lab, extra: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
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
            // Native XDP unless the test names a mode: the hook NICs get, and
            // the one the fixtures' BPF_PROG_RUN exercise (`up` alone picks
            // TC on veth; `--xdp-mode auto` tests that).
            .args(if extra.contains(&"--xdp-mode") {
                &[][..]
            } else {
                &["--xdp-mode", "native"][..]
            })
            .env(
                "RUST_LOG",
                std::env::var("FIREWALL_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
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

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
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

impl LabRun {
    /// Like `start`, with a configuration file of the given text.
    pub fn with_config(tag: &str, toml: &str) -> Self {
        Self::with_config_and_args(tag, toml, &[])
    }

    /// `with_config`, and more `up` arguments.
    pub fn with_config_and_args(tag: &str, toml: &str, extra: &[&str]) -> Self {
        let (run, path) = Self::with_config_file_and_args(tag, toml, extra);
        std::fs::remove_file(&path).ok();
        run
    }

    /// `with_config`, the file kept for the test to change and reload (and
    /// remove).
    pub fn with_config_file(tag: &str, toml: &str) -> (Self, std::path::PathBuf) {
        Self::with_config_file_and_args(tag, toml, &[])
    }

    fn with_config_file_and_args(
        tag: &str,
        toml: &str,
        extra: &[&str],
    ) -> (Self, std::path::PathBuf) {
        let path =
            std::env::temp_dir().join(format!("{}-{tag}.toml", crate::lab::unique_prefix("cfg")));
        std::fs::write(&path, toml).expect("writing the config");
        let mut args = vec!["--config", path.to_str().expect("utf-8")];
        args.extend_from_slice(extra);
        let run = Self::start(tag, &args);
        (run, path)
    }
}

impl Firewall {
    /// Runs a subcommand with `-j`; Ok(answer) or Err((kind, message)).
    pub fn call(&self, args: &[&str]) -> Result<serde_json::Value, (String, String)> {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        let out = self.ctl(&all);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "firewall-ctl {args:?}: no JSON ({e}): {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        if out.status.success() {
            Ok(v)
        } else {
            let e = &v["error"];
            Err((
                e["kind"].as_str().unwrap_or_default().to_string(),
                e["message"].as_str().unwrap_or_default().to_string(),
            ))
        }
    }

    /// `call` that must succeed.
    pub fn ok(&self, args: &[&str]) -> serde_json::Value {
        self.call(args)
            .unwrap_or_else(|(k, m)| panic!("firewall-ctl {args:?} failed: {k}: {m}"))
    }

    /// `call` that must fail; returns the error kind.
    pub fn fails(&self, args: &[&str]) -> String {
        match self.call(args) {
            Ok(v) => panic!("firewall-ctl {args:?} should fail, got {v}"),
            Err((kind, _)) => kind,
        }
    }

    /// `bind-for-client --session S --client C --protocol P EXTRA…`.
    pub fn bind_args<'a>(
        session: &'a str,
        client: &'a str,
        protocol: &'a str,
        extra: &[&'a str],
    ) -> Vec<&'a str> {
        let mut a = vec![
            "bind-for-client",
            "--session",
            session,
            "--client",
            client,
            "--protocol",
            protocol,
        ];
        a.extend_from_slice(extra);
        a
    }

    /// `redirect-connections --session S --connect C --protocol P EXTRA…`.
    fn redirect_args<'a>(
        session: &'a str,
        connect: &'a str,
        protocol: &'a str,
        extra: &[&'a str],
    ) -> Vec<&'a str> {
        let mut a = vec![
            "redirect-connections",
            "--session",
            session,
            "--connect",
            connect,
            "--protocol",
            protocol,
        ];
        a.extend_from_slice(extra);
        a
    }

    /// A BindForClient for one client address that must succeed.
    pub fn bind_ok(
        &self,
        session: &str,
        client: &str,
        protocol: &str,
        extra: &[&str],
    ) -> serde_json::Value {
        self.ok(&Self::bind_args(session, client, protocol, extra))
    }

    /// A BindForClient that must fail; returns the error kind.
    pub fn bind_fails(
        &self,
        session: &str,
        client: &str,
        protocol: &str,
        extra: &[&str],
    ) -> String {
        self.fails(&Self::bind_args(session, client, protocol, extra))
    }

    /// A RedirectConnections to one address that must succeed.
    pub fn redirect_ok(
        &self,
        session: &str,
        connect: &str,
        protocol: &str,
        extra: &[&str],
    ) -> serde_json::Value {
        self.ok(&Self::redirect_args(session, connect, protocol, extra))
    }

    /// A RedirectConnections that must fail; returns the error kind.
    pub fn redirect_fails(
        &self,
        session: &str,
        connect: &str,
        protocol: &str,
        extra: &[&str],
    ) -> String {
        self.fails(&Self::redirect_args(session, connect, protocol, extra))
    }

    /// Opens the session of a client.
    pub fn session(&self, client: &str) -> String {
        self.ok(&["session", "open", "--client", client])["session"].to_string()
    }

    pub fn list(&self, what: &str) -> Vec<serde_json::Value> {
        self.ok(&["list", what])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// A `firewall-ctl events` follower running in the background.
pub struct EventLog {
    child: Child,
    path: PathBuf,
}

impl Firewall {
    /// Follows events for at most `secs` seconds, into a file.
    pub fn follow_events(&self, secs: u64) -> EventLog {
        let path = std::env::temp_dir().join(format!(
            "fwev-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ rand_u64()
        ));
        let file = std::fs::File::create(&path).expect("event log");
        let bin = ctl_binary();
        let child = self
            .fw
            .cmd(bin.to_str().expect("utf-8"))
            .args([
                "-j",
                "--socket",
                &self.socket,
                "events",
                "--timeout",
                &secs.to_string(),
            ])
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("events follower");
        // Let it subscribe before the test causes events.
        thread::sleep(Duration::from_millis(300));
        EventLog { child, path }
    }
}

fn rand_u64() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

impl EventLog {
    pub fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until an event matching `pred` was seen (at most 10 s).
    pub fn wait_for(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if let Some(e) = self.events().into_iter().find(|e| pred(e)) {
                return e;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no {what} event; saw {:?}",
                self.events()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Firewall {
    /// `call` as an anyhow result (for the demo).
    pub fn try_ok(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        self.call(args)
            .map_err(|(k, m)| anyhow::anyhow!("firewall-ctl {}: {k}: {m}", args.join(" ")))
    }
}

/// Short timers, so TIMEOUT and teardown cases run in seconds.
pub const FAST_TIMERS: &str = "[timeouts]\npinhole = 2\nudp_pinhole_idle = 2\ntcp_closing = 1\n";

impl LabRun {
    /// A lab run with `FAST_TIMERS` and the firewall's neighbours resolved.
    pub fn fast(tag: &str) -> Self {
        let r = Self::with_config(tag, FAST_TIMERS);
        crate::traffic::prime_neighbours(&r.lab);
        r
    }
}

/// A JSON value as text: a string without its quotes, anything else as JSON.
pub fn text(v: &serde_json::Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}
