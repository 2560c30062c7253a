//! The network the BPF_PROG_RUN fixtures run in.
//!
//! The datapath's FIB lookup needs real interfaces, routes and neighbours, so
//! each fixture gets a private network namespace with an internal and an
//! external veth (addresses as in the lab) and permanent neighbour entries with
//! known MACs, and a datapath loaded with its own pin directory (no attach).

use std::process::Command;

use anyhow::Context as _;
pub use firewall_common::rules::{rule_action, Rule};
use firewall_common::{
    flow::{FlowKey, FlowValue},
    wall::{PublishKey, PublishValue, WallConf},
};
use firewall_ctl::datapath::{
    BusyClients, Datapath, FlowTable, PeerFilters, PinPaths, PinholeTable, Side, TestRunOutput,
    WallTables,
};

use crate::netns::in_netns;

pub const FW_INTERNAL: [u8; 4] = [10, 1, 0, 1];
pub const FW_EXTERNAL: [u8; 4] = [10, 2, 0, 1];
pub const CLIENT: [u8; 4] = [10, 1, 0, 2];
/// The NAT port of `Fixture::install_pair`.
pub const NAT_PORT: u16 = 61000;
pub const SERVER: [u8; 4] = [10, 2, 0, 2];
/// An external host with no neighbour entry.
pub const UNRESOLVED: [u8; 4] = [10, 2, 0, 99];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x11, 0, 0, 0, 0x02];
pub const SERVER_MAC: [u8; 6] = [0x02, 0x22, 0, 0, 0, 0x02];
pub const IN_MAC: [u8; 6] = [0x02, 0x11, 0, 0, 0, 0x01];
pub const EX_MAC: [u8; 6] = [0x02, 0x22, 0, 0, 0, 0x01];

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_REDIRECT: u32 = 4;

pub struct Fixture {
    netns: String,
    pub datapath: Datapath,
    pub flows: FlowTable,
    pub pinholes: PinholeTable,
    pub peers: PeerFilters,
    pub busy: BusyClients,
    pub pins: PinPaths,
    pub in_ifindex: u32,
    pub ex_ifindex: u32,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    firewall_lab::run(Command::new("ip").args(args)).map(|_| ())
}

impl Fixture {
    /// `name` must be unique among concurrently running fixtures.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        Self::with_sizes(
            name,
            firewall_ctl::datapath::MapSizes {
                flows: 4096,
                pinholes: 1024,
            },
        )
    }

    /// A fixture whose flow and pinhole tables have these capacities.
    pub fn with_sizes(name: &str, sizes: firewall_ctl::datapath::MapSizes) -> anyhow::Result<Self> {
        crate::require_root();
        let netns = format!("fwfx{}-{name}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &netns]).status();
        ip(&["netns", "add", &netns])?;
        let mut fx = Self::build(&netns, sizes).inspect_err(|_| {
            // Nothing left behind: the namespace and whatever was pinned
            // before the load failed (a program the verifier refused).
            let _ = Command::new("ip").args(["netns", "del", &netns]).status();
            let _ = firewall_ctl::datapath::unpin_all(&PinPaths {
                dir: format!("/sys/fs/bpf/{netns}").into(),
            });
        })?;
        fx.netns = netns;
        Ok(fx)
    }

    fn build(netns: &str, sizes: firewall_ctl::datapath::MapSizes) -> anyhow::Result<Self> {
        let sh = |s: &str| {
            firewall_lab::run(Command::new("ip").args(["netns", "exec", netns, "sh", "-c", s]))
        };
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        sh(&format!(
            "set -e
             # No IPv6 chatter (router solicitations, DAD) on the interfaces:
             # fixtures count every frame the programs see.
             sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
             ip link set lo up
             ip link add in0 address {} type veth peer name in0p
             ip link add ex0 address {} type veth peer name ex0p
             ip addr add 10.1.0.1/24 dev in0
             ip addr add 10.2.0.1/24 dev ex0
             for i in in0 in0p ex0 ex0p; do ip link set $i up; done
             # BPF_PROG_RUN with an ingress interface needs its XDP rx queue
             # registered, which veth does when GRO is on.
             ethtool -K in0 gro on >/dev/null; ethtool -K ex0 gro on >/dev/null
             sysctl -qw net.ipv4.conf.all.forwarding=1
             ip neigh add 10.1.0.2 lladdr {} dev in0 nud permanent
             ip neigh add 10.2.0.2 lladdr {} dev ex0 nud permanent",
            mac(IN_MAC),
            mac(EX_MAC),
            mac(CLIENT_MAC),
            mac(SERVER_MAC)
        ))?;
        let path = format!("/run/netns/{netns}");
        let (in_ifindex, ex_ifindex) = in_netns(&path, || -> anyhow::Result<(u32, u32)> {
            Ok((
                nix::net::if_::if_nametoindex("in0")?,
                nix::net::if_::if_nametoindex("ex0")?,
            ))
        })??;
        let pins = PinPaths {
            dir: format!("/sys/fs/bpf/{netns}").into(),
        };
        let datapath = Datapath::load(&pins, sizes).context("loading the datapath for fixtures")?;
        let flows = FlowTable::open(&pins)?;
        let pinholes = PinholeTable::open(&pins)?;
        let peers = PeerFilters::open(&pins)?;
        let busy = BusyClients::open(&pins)?;
        Ok(Self {
            netns: netns.to_string(),
            datapath,
            flows,
            pinholes,
            peers,
            busy,
            pins,
            in_ifindex,
            ex_ifindex,
        })
    }

    /// Outbound SNAT and its reply, like a secondary connection's two flow
    /// entries: CLIENT:cport → SERVER:sport leaves as FW_EXTERNAL:NAT_PORT.
    pub fn install_pair(&mut self, protocol: u8, cport: u16, sport: u16) {
        let out = FlowKey::new(protocol, CLIENT, cport, SERVER, sport);
        let translated = FlowValue::forward(FW_EXTERNAL, NAT_PORT, SERVER, sport);
        self.flows.insert(&out, &translated).unwrap();
        let back = FlowKey::new(protocol, SERVER, sport, FW_EXTERNAL, NAT_PORT);
        let reply = FlowValue::forward(SERVER, sport, CLIENT, cport);
        self.flows.insert(&back, &reply).unwrap();
    }

    /// Raises the wall as `up` does: new outbound connections from
    /// 10.1.0.0/24 leave through ex0 translated to FW_EXTERNAL, NAT ports
    /// `ports`.
    pub fn raise_wall(&self, ports: std::ops::RangeInclusive<u16>) -> anyhow::Result<()> {
        self.raise_wall_publishing(ports, &[])
    }

    /// `raise_wall`, with servers published: (protocol, port on
    /// FW_EXTERNAL, server, server port), the server behind in0.
    pub fn raise_wall_publishing(
        &self,
        ports: std::ops::RangeInclusive<u16>,
        published: &[(u8, u16, [u8; 4], u16)],
    ) -> anyhow::Result<()> {
        let published: Vec<_> = published
            .iter()
            .map(|(protocol, port, server, sport)| {
                (
                    PublishKey::new(*protocol, FW_EXTERNAL, *port),
                    PublishValue {
                        server_addr: *server,
                        server_port: *sport,
                        _pad: 0,
                        egress_ifindex: self.in_ifindex,
                    },
                )
            })
            .collect();
        let conf = WallConf {
            nat_addr: FW_EXTERNAL,
            nat_port_lo: *ports.start(),
            nat_port_hi: *ports.end(),
            external_ifindex: self.ex_ifindex,
            port_secret: 0x5eed,
        };
        WallTables::open(&self.pins)?.set(
            conf,
            &["10.1.0.0/24".parse()?],
            &[Rule::everything(rule_action::ALLOW)],
            &published,
        )
    }

    /// Replaces the access rules (the wall raised).
    pub fn set_rules(&self, rules: &[Rule]) -> anyhow::Result<()> {
        WallTables::open(&self.pins)?.set_rules(rules)
    }

    /// The fixture's network namespace (for `netns::in_netns`).
    pub fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.netns)
    }

    /// Runs the program of `side` on `frame` as received on that side's interface.
    pub fn run(&mut self, side: Side, frame: &[u8]) -> TestRunOutput {
        self.time(side, frame, 1)
    }

    /// Runs `each` inside the fixture's namespace, entered once, with a
    /// function that runs one frame (for many runs).
    pub fn run_each<T>(
        &mut self,
        each: impl FnOnce(&mut dyn FnMut(Side, &[u8]) -> TestRunOutput) -> T,
    ) -> T {
        let (internal, external) = (self.in_ifindex, self.ex_ifindex);
        let path = self.netns_path();
        let dp = &mut self.datapath;
        in_netns(&path, || {
            let mut run = |side: Side, frame: &[u8]| {
                let ifindex = match side {
                    Side::Internal => internal,
                    Side::External => external,
                };
                dp.test_run(side, frame, ifindex, 1).expect("BPF_PROG_RUN")
            };
            each(&mut run)
        })
        .expect("netns")
    }

    /// Attaches the XDP programs to the peers of the fixture's interfaces, so
    /// that test runs find them in the kernel's XDP dispatcher instead of
    /// swapping it for each run (an RCU grace period, milliseconds, each).
    pub fn attach_for_test_runs(&mut self) {
        let path = self.netns_path();
        let dp = &mut self.datapath;
        in_netns(&path, || -> anyhow::Result<()> {
            for (side, name) in [(Side::Internal, "in0p"), (Side::External, "ex0p")] {
                let iface = firewall_ctl::netif::Interface::by_name(name)?;
                dp.attach(
                    side,
                    &iface,
                    firewall_ctl::datapath::AttachMode::Native,
                    false,
                )?;
            }
            Ok(())
        })
        .expect("netns")
        .expect("attaching the XDP programs");
    }

    /// Runs the TC variant of the datapath (`--xdp-mode tc`) on `frame`.
    pub fn run_tc(&mut self, side: Side, frame: &[u8]) -> TestRunOutput {
        let ifindex = match side {
            Side::Internal => self.in_ifindex,
            Side::External => self.ex_ifindex,
        };
        let path = format!("/run/netns/{}", self.netns);
        let dp = &mut self.datapath;
        in_netns(&path, || dp.test_run_tc(side, frame, ifindex))
            .expect("netns")
            .expect("BPF_PROG_RUN")
    }

    /// Runs `repeat` times; the output carries the kernel's average time per run.
    pub fn time(&mut self, side: Side, frame: &[u8], repeat: u32) -> TestRunOutput {
        let ifindex = match side {
            Side::Internal => self.in_ifindex,
            Side::External => self.ex_ifindex,
        };
        let path = format!("/run/netns/{}", self.netns);
        let dp = &mut self.datapath;
        in_netns(&path, || dp.test_run(side, frame, ifindex, repeat))
            .expect("netns")
            .expect("BPF_PROG_RUN")
    }

    /// Datapath events produced so far (drains the ring buffer).
    pub fn events(&mut self) -> Vec<firewall_common::pinhole::DatapathEvent> {
        let mut out = Vec::new();
        if let Some(rb) = self.datapath.events.as_mut() {
            while let Some(item) = rb.next() {
                out.extend(firewall_ctl::datapath::decode_event(&item));
            }
        }
        out
    }

    /// Sum of a counter over CPUs.
    pub fn counter(&self, c: firewall_common::stats::Counter) -> u64 {
        let stats = firewall_ctl::datapath::Stats::open(&self.pins).expect("stats");
        stats
            .read()
            .expect("read")
            .into_iter()
            .find(|(k, _)| *k == c)
            .map(|(_, v)| v.packets)
            .unwrap_or(0)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = firewall_ctl::datapath::unpin_all(&self.pins);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}
