//! The namespace lab (see docs/testing.md), extended with a second internal client
//! and a second external host:
//!
//! ```text
//!  c1 10.1.0.2 ─┐                                          ┌─ s1 10.2.0.2 (server)
//!               ├─ swi (bridge) ── vfi 10.1.0.1 │ fw │ vfe 10.2.0.1 ── swe (bridge) ─┤
//!  c2 10.1.0.3 ─┘                                          └─ s2 10.2.0.3 (other external host)
//! ```
//! Clients route via 10.1.0.1; the external hosts have **no route back** to
//! 10.1.0.0/24, so anything reaching them from a client was translated.
//! Every run uses its own name prefix; `Drop` deletes everything, and creating a
//! lab first deletes leftovers of the same prefix.

use std::{
    fs,
    process::{Child, Command, Stdio},
};

use anyhow::{bail, Context as _};

use crate::run;

/// A network namespace of the lab.
#[derive(Clone, Debug)]
pub struct Ns {
    pub name: String,
}

impl Ns {
    /// A command run inside the namespace. `nsenter --net` keeps the host's
    /// mounts (unlike `ip netns exec`), so bpffs pins stay visible.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs a shell command inside the namespace and returns its stdout.
    pub fn sh(&self, script: &str) -> anyhow::Result<String> {
        let out = run(self.cmd("sh").args(["-c", script]))
            .with_context(|| format!("in netns {}: {script}", self.name))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Like `sh`, but returns whether it succeeded instead of failing.
    pub fn try_sh(&self, script: &str) -> bool {
        self.cmd("sh")
            .args(["-c", script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    pub fn spawn(&self, script: &str) -> anyhow::Result<Child> {
        self.cmd("sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning in {}: {script}", self.name))
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

/// Addresses of the lab.
pub mod addr {
    pub const FW_INTERNAL: &str = "10.1.0.1";
    pub const FW_EXTERNAL: &str = "10.2.0.1";
    pub const CLIENT: &str = "10.1.0.2";
    pub const CLIENT2: &str = "10.1.0.3";
    pub const SERVER: &str = "10.2.0.2";
    pub const EXTERNAL2: &str = "10.2.0.3";
    /// Interface names inside the firewall namespace.
    pub const IF_INTERNAL: &str = "vfi";
    pub const IF_EXTERNAL: &str = "vfe";
}

pub struct Lab {
    pub prefix: String,
    pub client: Ns,
    pub client2: Ns,
    pub fw: Ns,
    pub server: Ns,
    pub external2: Ns,
    switch_int: Ns,
    switch_ext: Ns,
    keep: bool,
}

impl Lab {
    /// Names that a run with this prefix creates.
    fn names(prefix: &str) -> [String; 7] {
        ["c1", "c2", "fw", "s1", "s2", "swi", "swe"].map(|n| format!("{prefix}-{n}"))
    }

    /// The external segment's switch (its port "fw" faces the firewall).
    pub fn switch_external(&self) -> &Ns {
        &self.switch_ext
    }

    /// The internal segment's switch (its port "fw" faces the firewall).
    pub fn switch_internal(&self) -> &Ns {
        &self.switch_int
    }

    /// Creates the topology. `prefix` must be short and unique per run.
    pub fn create(prefix: &str) -> anyhow::Result<Self> {
        Self::create_with(prefix, false)
    }

    /// The benchmark's variant: the client and the server are wired straight
    /// to the firewall (one veth pair each, GRO on every end), so that frames
    /// go from XDP to XDP without the bridges' skb path, whose cost would be
    /// common to every setup measured and dilute the comparison. The second
    /// client and external host exist but are not connected.
    pub fn create_direct(prefix: &str) -> anyhow::Result<Self> {
        Self::create_with(prefix, true)
    }

    fn create_with(prefix: &str, direct: bool) -> anyhow::Result<Self> {
        if !crate::is_root() {
            bail!("the lab needs root (network namespaces)");
        }
        if prefix.is_empty()
            || prefix.len() > 20
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            bail!("lab prefix {prefix:?} must be 1-20 characters of [A-Za-z0-9-]");
        }
        destroy_prefix(prefix);
        let [c1, c2, fw, s1, s2, swi, swe] = Self::names(prefix).map(|name| Ns { name });
        let lab = Lab {
            prefix: prefix.into(),
            client: c1,
            client2: c2,
            fw,
            server: s1,
            external2: s2,
            switch_int: swi,
            switch_ext: swe,
            keep: false,
        };
        // From here on, Drop cleans up whatever part was built.
        if direct {
            lab.build_direct()
        } else {
            lab.build()
        }
        .with_context(|| format!("building lab {prefix}"))?;
        Ok(lab)
    }

    fn build(&self) -> anyhow::Result<()> {
        for ns in self.all() {
            run(Command::new("ip").args(["netns", "add", &ns.name]))?;
            ns.sh("ip link set lo up")?;
        }
        for sw in [&self.switch_int, &self.switch_ext] {
            sw.sh("ip link add br0 type bridge && ip link set br0 up")?;
        }
        use addr::*;
        // (host ns, host ifname, switch ns, switch port, address/prefix)
        let hosts = [
            (
                &self.client,
                "eth0",
                &self.switch_int,
                "c1",
                format!("{CLIENT}/24"),
            ),
            (
                &self.client2,
                "eth0",
                &self.switch_int,
                "c2",
                format!("{CLIENT2}/24"),
            ),
            (
                &self.fw,
                IF_INTERNAL,
                &self.switch_int,
                "fw",
                format!("{FW_INTERNAL}/24"),
            ),
            (
                &self.fw,
                IF_EXTERNAL,
                &self.switch_ext,
                "fw",
                format!("{FW_EXTERNAL}/24"),
            ),
            (
                &self.server,
                "eth0",
                &self.switch_ext,
                "s1",
                format!("{SERVER}/24"),
            ),
            (
                &self.external2,
                "eth0",
                &self.switch_ext,
                "s2",
                format!("{EXTERNAL2}/24"),
            ),
        ];
        for (host, ifname, sw, port, cidr) in hosts {
            run(Command::new("ip").args([
                "link", "add", ifname, "netns", &host.name, "type", "veth", "peer", "name", port,
                "netns", &sw.name,
            ]))?;
            host.sh(&format!(
                "ip addr add {cidr} dev {ifname} && ip link set {ifname} up"
            ))?;
            // XDP_REDIRECT into a veth is only delivered when the receiving peer
            // has GRO (or an XDP program); the switch ports receive the
            // firewall's redirected frames.
            sw.sh(&format!("ip link set {port} master br0 && ip link set {port} up && ethtool -K {port} gro on >/dev/null"))?;
        }
        for c in [&self.client, &self.client2] {
            c.sh(&format!("ip route add default via {FW_INTERNAL}"))?;
        }
        // The firewall routes; the external hosts get no route back on purpose.
        self.fw.sh("sysctl -qw net.ipv4.ip_forward=1")?;
        Ok(())
    }

    fn build_direct(&self) -> anyhow::Result<()> {
        for ns in self.all() {
            run(Command::new("ip").args(["netns", "add", &ns.name]))?;
            ns.sh("ip link set lo up")?;
        }
        use addr::*;
        let pairs = [
            (&self.client, CLIENT, IF_INTERNAL, FW_INTERNAL),
            (&self.server, SERVER, IF_EXTERNAL, FW_EXTERNAL),
        ];
        for (host, host_addr, fw_if, fw_addr) in pairs {
            run(Command::new("ip").args([
                "link",
                "add",
                "eth0",
                "netns",
                &host.name,
                "type",
                "veth",
                "peer",
                "name",
                fw_if,
                "netns",
                &self.fw.name,
            ]))?;
            host.sh(&format!(
                "ip addr add {host_addr}/24 dev eth0 && ip link set eth0 up && ethtool -K eth0 gro on >/dev/null"
            ))?;
            self.fw.sh(&format!(
                "ip addr add {fw_addr}/24 dev {fw_if} && ip link set {fw_if} up && ethtool -K {fw_if} gro on >/dev/null"
            ))?;
        }
        self.client
            .sh(&format!("ip route add default via {FW_INTERNAL}"))?;
        self.fw.sh("sysctl -qw net.ipv4.ip_forward=1")?;
        Ok(())
    }

    fn all(&self) -> [&Ns; 7] {
        [
            &self.client,
            &self.client2,
            &self.fw,
            &self.server,
            &self.external2,
            &self.switch_int,
            &self.switch_ext,
        ]
    }

    /// Keeps the namespaces after this value is dropped (for inspection).
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.keep {
            destroy_prefix(&self.prefix);
        }
    }
}

/// Deletes the namespaces of a prefix (their veths go with them). Quiet when
/// nothing is there.
pub fn destroy_prefix(prefix: &str) {
    for name in Lab::names(prefix) {
        if fs::metadata(format!("/run/netns/{name}")).is_ok() {
            // Processes still inside (daemons, peers) would keep the netns
            // alive after `ip netns del`; end them first.
            let _ = Command::new("ip")
                .args(["netns", "pids", &name])
                .output()
                .map(|o| {
                    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                });
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// Lab prefixes currently present (names end in one of the lab's suffixes).
pub fn existing_prefixes() -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter_map(|n| n.strip_suffix("-fw").map(str::to_string))
                .filter(|p| p.starts_with(PREFIX_ROOT))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// All lab prefixes start with this, so leftovers can be found and removed.
pub const PREFIX_ROOT: &str = "fwlab";

/// A fresh prefix for this process.
pub fn unique_prefix(tag: &str) -> String {
    format!("{PREFIX_ROOT}{}{tag}", std::process::id())
}
