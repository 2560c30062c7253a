//! Random sequences of calls and datapath/relay events against the engine,
//! with its invariants checked after every step: the maps hold exactly what
//! live objects own, ports and counts add up, and once everything has ended
//! nothing is left.

use firewall_common::flow::tcp_seen;
use proptest::prelude::*;

use super::tests::{bind, cfg, established_through, pinhole_of, redirect, CLIENT, T0};
use super::*;
use crate::ports::NoReservation;

const S: u64 = 1_000_000_000;

#[derive(Clone, Debug)]
enum Op {
    Bind {
        n: usize,
        udp: bool,
        flags: u32,
        placeholder: bool,
    },
    Redirect {
        n: usize,
        udp: bool,
        flags: u32,
    },
    /// AllowFutureConnect to one of a few destinations (so they collide).
    Permit {
        port: u16,
        udp: bool,
        flags: u32,
    },
    Kill(usize),
    Cancel(usize),
    SetClient(usize),
    /// A first packet through the pinhole (kernel) or an accept (relay).
    Connect(usize, u16),
    /// FIN (or RST) on one direction of a kernel connection's flows.
    Teardown(usize, bool, bool),
    RelayClosed(usize),
    Withdraw(Vec<usize>),
    Tick(u64),
    CloseSession,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1usize..4, any::<bool>(), 0u32..32, any::<bool>()).prop_map(|(n, udp, flags, p)| {
            Op::Bind {
                n,
                udp,
                flags,
                placeholder: p,
            }
        }),
        (1usize..3, any::<bool>(), 0u32..8).prop_map(|(n, udp, flags)| Op::Redirect {
            n,
            udp,
            flags
        }),
        (0u16..3, any::<bool>(), 0u32..8).prop_map(|(port, udp, flags)| Op::Permit {
            port,
            udp,
            flags
        }),
        any::<usize>().prop_map(Op::Kill),
        any::<usize>().prop_map(Op::Cancel),
        any::<usize>().prop_map(Op::SetClient),
        (any::<usize>(), 1024u16..60000).prop_map(|(i, p)| Op::Connect(i, p)),
        (any::<usize>(), any::<bool>(), any::<bool>()).prop_map(|(i, d, r)| Op::Teardown(i, d, r)),
        any::<usize>().prop_map(Op::RelayClosed),
        proptest::collection::vec(any::<usize>(), 0..4).prop_map(Op::Withdraw),
        (0u64..8000).prop_map(Op::Tick),
        Just(Op::CloseSession),
    ]
}

/// Bind flags from 5 bits: timeout, allow-multiple, no-kernel-mode,
/// bidirectional, proxy-mode (invalid combinations are part of the test).
fn bind_flags(bits: u32) -> ConnFlags {
    let all = [
        ConnFlags::TIMEOUT,
        ConnFlags::ALLOW_MULTIPLE,
        ConnFlags::NO_KERNEL_MODE,
        ConnFlags::BIDIRECTIONAL,
        ConnFlags::PROXY_MODE,
    ];
    all.iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .fold(ConnFlags::empty(), |f, (_, x)| f | *x)
}

struct World {
    e: Engine<MemMaps>,
    session: u64,
    now: u64,
    next_conn: u64,
    /// Relay connections by the object that made them.
    relayed: Vec<(u64, u64)>,
}

impl World {
    fn new() -> Self {
        let mut e = Engine::new(
            EngineConfig {
                client_quota: 4,
                max_pending: 12,
                ..cfg()
            },
            MemMaps::default(),
            PortPool::new(20000..=20063, NoReservation),
            super::tests::clock(),
        )
        .unwrap();
        let session = e.open_session(CLIENT.parse().unwrap()).unwrap();
        Self {
            e,
            session,
            now: T0,
            next_conn: 1,
            relayed: Vec::new(),
        }
    }

    fn ids(&self) -> Vec<u64> {
        self.e.objects().iter().map(|o| o.id).collect()
    }

    /// The flows `id` owns in the maps, in a fixed order.
    fn flows_of(&self, id: u64) -> Vec<FlowKey> {
        let mut keys: Vec<FlowKey> = self
            .e
            .maps()
            .flows
            .iter()
            .filter(|(_, v)| v.owner == id)
            .map(|(k, _)| *k)
            .collect();
        keys.sort_by_key(|k| (k.src_addr, k.src_port, k.dst_addr, k.dst_port));
        keys
    }

    fn pick(&self, i: usize) -> Option<u64> {
        let ids = self.ids();
        (!ids.is_empty()).then(|| ids[i % ids.len()])
    }

    fn apply(&mut self, op: Op) {
        let s = self.session;
        match op {
            Op::Bind {
                n,
                udp,
                flags,
                placeholder,
            } => {
                let clients: Vec<String> = (0..n)
                    .map(|i| {
                        if placeholder && i == 0 {
                            "0.0.0.0:0".to_string()
                        } else {
                            format!("10.1.0.2:{}", 5000 + i)
                        }
                    })
                    .collect();
                let refs: Vec<&str> = clients.iter().map(|c| c.as_str()).collect();
                let _ = self.e.bind_for_client(&BindRequest {
                    protocol: if udp { Transport::Udp } else { Transport::Tcp },
                    flags: bind_flags(flags),
                    ..bind(s, &refs)
                });
            }
            Op::Redirect { n, udp, flags } => {
                let connects: Vec<String> = (0..n)
                    .map(|i| format!("198.51.100.7:{}", 2000 + i))
                    .collect();
                let refs: Vec<&str> = connects.iter().map(|c| c.as_str()).collect();
                let _ = self.e.redirect_connections(&RedirectRequest {
                    protocol: if udp { Transport::Udp } else { Transport::Tcp },
                    flags: bind_flags(flags & 0b111),
                    ..redirect(s, &refs)
                });
            }
            Op::Permit { port, udp, flags } => {
                let _ = self.e.allow_future_connect(&FutureConnectRequest {
                    session: s,
                    address: SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), 3000 + port),
                    peer: Some(Ipv4Addr::new(198, 51, 100, 7)),
                    proxy_external: None,
                    protocol: if udp { Transport::Udp } else { Transport::Tcp },
                    flags: bind_flags(flags & 0b111),
                    protocol_name: "ftp".into(),
                    notify: true,
                    context: None,
                });
            }
            Op::Kill(i) => {
                if let Some(id) = self.pick(i) {
                    let _ = self.e.kill(id);
                }
            }
            Op::Cancel(i) => {
                if let Some(id) = self.pick(i) {
                    let _ = self.e.cancel(id);
                }
            }
            Op::SetClient(i) => {
                if let Some(id) = self.pick(i) {
                    let _ = self
                        .e
                        .set_client_address(id, "10.1.0.2:6000".parse().unwrap());
                }
            }
            Op::Connect(i, port) => self.connect(i, port),
            Op::Teardown(i, second, rst) => {
                let Some(id) = self.pick(i) else { return };
                let Some(o) = self.e.info(id) else { return };
                let flows = self.flows_of(id);
                if o.mode != Mode::Kernel || flows.len() < 2 || o.protocol != Transport::Tcp {
                    return;
                }
                let key = flows[second as usize];
                let bit = if rst { tcp_seen::RST } else { tcp_seen::FIN };
                if let Some(v) = self.e.maps_mut().flows.get_mut(&key) {
                    v.tcp_flags_seen |= bit;
                }
                self.e.on_datapath_event(&DatapathEvent {
                    kind: event_kind::CLOSING,
                    detail: bit as u32,
                    owner: id,
                    forward: key,
                    ..Default::default()
                });
            }
            Op::RelayClosed(i) => {
                if self.relayed.is_empty() {
                    return;
                }
                let (owner, conn) = self.relayed.remove(i % self.relayed.len());
                self.e.on_relay_event(RelayEvent::Closed { owner, conn });
            }
            Op::Withdraw(is) => {
                let ids: Vec<u64> = is.iter().filter_map(|i| self.pick(*i)).collect();
                self.e.withdraw_unused(&ids, "control connection ended");
            }
            Op::Tick(secs) => {
                self.now += secs * S;
                let now = self.now;
                self.e.tick(now).unwrap();
            }
            Op::CloseSession => {
                let _ = self.e.close_session(s);
                self.session = self.e.open_session(CLIENT.parse().unwrap()).unwrap();
            }
        }
        // What the daemon does with the relay's commands: a withdrawn
        // endpoint that accepted nothing is reported back.
        for cmd in self.e.take_relay_cmds() {
            if let RelayCmd::Withdraw { owner, reason } = cmd {
                self.e
                    .on_relay_event(RelayEvent::Withdrawn { owner, reason });
            }
        }
        self.e.take_events();
    }

    fn connect(&mut self, i: usize, port: u16) {
        let Some(id) = self.pick(i) else { return };
        // No filter is registered here, so no bind is emulated.
        let Some(o) = self.e.info(id) else { return };
        if o.state != State::Listening {
            return;
        }
        let peer = if o.kind == Kind::Bind {
            "198.51.100.7"
        } else {
            CLIENT
        };
        match (o.mode, pinhole_of(&self.e, id)) {
            (Mode::Kernel, Some(k)) => {
                let Some(v) = self.e.maps().pinholes.get(&k).copied() else {
                    return;
                };
                if v.flags & firewall_common::pinhole::pinhole_flags::NO_TARGET != 0 {
                    return;
                }
                let single = v.flags & firewall_common::pinhole::pinhole_flags::MULTIPLE == 0;
                if single {
                    self.e.maps_mut().pinholes.get_mut(&k).unwrap().remaining = 0;
                }
                established_through(&mut self.e, id, k, v, peer, port);
            }
            (Mode::User, _) if !o.target.ip().is_unspecified() => {
                let conn = self.next_conn;
                self.next_conn += 1;
                self.relayed.push((id, conn));
                self.e.on_relay_event(RelayEvent::Established {
                    owner: id,
                    conn,
                    from: format!("{peer}:{port}").parse().unwrap(),
                    to: o.target,
                    bytes: Default::default(),
                });
            }
            _ => {}
        }
    }

    fn check(&self) -> Result<(), TestCaseError> {
        self.e.check_books().map_err(TestCaseError::fail)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_engine_keeps_its_books(ops in proptest::collection::vec(op(), 1..60)) {
        let mut w = World::new();
        for op in ops {
            w.apply(op);
            w.check()?;
        }
        // Everything ends: nothing may be left behind.
        let s = w.session;
        w.e.close_session(s).unwrap();
        for (owner, conn) in std::mem::take(&mut w.relayed) {
            w.e.on_relay_event(RelayEvent::Closed { owner, conn });
        }
        w.apply(Op::Tick(86_400));
        w.apply(Op::Tick(86_400));
        w.check()?;
        prop_assert!(w.e.maps().pinholes.is_empty());
        prop_assert!(w.e.maps().rules.is_empty(), "peer rules left: {:?}", w.e.maps().rules);
        prop_assert!(w.e.maps().flows.is_empty(), "flows left: {:?}", w.e.maps().flows.len());
        prop_assert!(w.e.maps().busy.is_empty());
        prop_assert!(w.e.is_idle(), "objects, counts or ports not forgotten");
    }
}
