//! The setups compared (the firewall in either mode, netfilter, plain
//! forwarding) prepared in the lab, and the process helpers of the measurements.

use crate::*;

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Setup {
    Kernel,
    /// Kernel mode with the datapath at tcx ingress instead of XDP.
    KernelTc,
    User,
    Netfilter,
    Plain,
    /// Plain routing, with the least a forwarder at tcx ingress can do on
    /// both firewall interfaces (`tc_bench_forward`: new MACs, redirect):
    /// the bound of any datapath at that hook, not a firewall.
    TcBound,
    /// Kernel mode with FTP control connections forwarded in place
    /// (`[ftp] control = "in-place"`) instead of proxied.
    InPlace,
}

impl Setup {
    pub(crate) const ALL: [Setup; 5] = [
        Setup::Plain,
        Setup::Netfilter,
        Setup::User,
        Setup::KernelTc,
        Setup::Kernel,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Setup::Kernel => "kernel",
            Setup::KernelTc => "kernel-tc",
            Setup::User => "user",
            Setup::Netfilter => "netfilter",
            Setup::Plain => "plain",
            Setup::TcBound => "tc-bound",
            Setup::InPlace => "in-place",
        }
    }
}

/// The netfilter baseline of lab.md: the ftp helper and masquerade.
pub(crate) const NFT_RULESET: &str = r#"table ip fw {
  ct helper ftp-std {
    type "ftp" protocol tcp
  }
  chain prec {
    type filter hook prerouting priority 0;
    tcp dport 21 ct helper set "ftp-std"
  }
  chain fwdc {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "vfi" oifname "vfe" accept
  }
  chain postc {
    type nat hook postrouting priority 100;
    oifname "vfe" masquerade
  }
}
"#;

/// What a setup changed in the lab, undone by `down`.
pub(crate) struct Prepared {
    pub(crate) setup: Setup,
    pub(crate) fw: Option<Firewall>,
}

pub(crate) fn prepare(lab: &Lab, setup: Setup) -> anyhow::Result<Prepared> {
    let fw = match setup {
        Setup::Kernel => Some(Firewall::up(lab, &[])?),
        Setup::KernelTc => Some(Firewall::up(lab, &["--xdp-mode", "tc"])?),
        Setup::User => Some(up_with_config(
            lab,
            "user",
            "[ftp]\ndata_connections = \"user\"\n",
        )?),
        Setup::InPlace => Some(up_with_config(
            lab,
            "in-place",
            "[ftp]\ncontrol = \"in-place\"\n",
        )?),
        Setup::Netfilter => {
            lab.fw.sh("modprobe nf_conntrack_ftp 2>/dev/null; modprobe nf_nat_ftp 2>/dev/null; sysctl -qw net.ipv4.conf.all.forwarding=1")?;
            let path = std::env::temp_dir().join(format!("{}-fw.nft", lab.prefix));
            std::fs::write(&path, NFT_RULESET)?;
            lab.fw.sh(&format!("nft -f {}", path.display()))?;
            let _ = std::fs::remove_file(&path);
            None
        }
        Setup::Plain | Setup::TcBound => {
            lab.fw.sh("sysctl -qw net.ipv4.conf.all.forwarding=1")?;
            lab.server.sh(&format!(
                "ip route add 10.1.0.0/24 via {}",
                addr::FW_EXTERNAL
            ))?;
            None
        }
    };
    prime_neighbours(lab);
    Ok(Prepared { setup, fw })
}

/// The firewall up with `config` (written to a file named for `name`).
fn up_with_config(lab: &Lab, name: &str, config: &str) -> anyhow::Result<Firewall> {
    let cfg = std::env::temp_dir().join(format!("{}-{name}.toml", lab.prefix));
    std::fs::write(&cfg, config)?;
    let fw = Firewall::up(lab, &["--config", cfg.to_str().expect("utf-8")]);
    let _ = std::fs::remove_file(&cfg);
    fw
}

impl Prepared {
    pub(crate) fn down(self, lab: &Lab) -> anyhow::Result<()> {
        drop(self.fw);
        match self.setup {
            Setup::Netfilter => {
                lab.fw.sh("nft delete table ip fw; sysctl -qw net.ipv4.conf.all.forwarding=0; conntrack -F 2>/dev/null || true")?;
            }
            Setup::Plain | Setup::TcBound => {
                lab.fw.sh("sysctl -qw net.ipv4.conf.all.forwarding=0")?;
                lab.server.sh("ip route del 10.1.0.0/24")?;
            }
            _ => {}
        }
        Ok(())
    }
}

pub(crate) fn ifindex(ns: &Ns, name: &str) -> anyhow::Result<u32> {
    Ok(in_netns(&ns.path(), || {
        nix::net::if_::if_nametoindex(name)
    })??)
}

pub(crate) fn mac(ns: &Ns, name: &str) -> anyhow::Result<[u8; 6]> {
    // nsenter keeps the host's /sys: ask ip instead.
    let text = ns.sh(&format!(
        "ip -o link show dev {name} | grep -o 'link/ether [0-9a-f:]*' | cut -d' ' -f2"
    ))?;
    let mut m = [0u8; 6];
    for (i, part) in text.trim().split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(m)
}

/// Busy CPU time of the whole machine so far, in nanoseconds (/proc/stat).
pub(crate) fn cpu_busy_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|i| f.get(*i)).sum();
    let hz = 100; // USER_HZ
    busy * 1_000_000_000 / hz
}

pub(crate) fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}
