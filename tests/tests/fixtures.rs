//! BPF_PROG_RUN packet fixtures: a crafted frame goes into the XDP program,
//! and the verdict, the counter it lands in and the frame that comes out are
//! checked, with checksums recomputed from scratch.

use firewall_common::{
    flow::{tcp_seen, FlowAction, FlowKey, FlowValue},
    stats::Counter,
    IPPROTO_TCP, IPPROTO_UDP,
};
use firewall_ctl::datapath::Side;
use firewall_tests::{
    fixture::*,
    packet::{check_checksums, view, Spec, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

fn assert_translated_out(frame: &[u8], spec: &Spec) {
    let v = view(frame);
    assert_eq!(
        v.dst_mac, SERVER_MAC,
        "next hop MAC from the neighbour table"
    );
    assert_eq!(v.src_mac, EX_MAC, "source MAC of the egress interface");
    assert_eq!(
        (v.src, v.sport),
        (FW_EXTERNAL, NAT_PORT),
        "source translated"
    );
    assert_eq!((v.dst, v.dport), (spec.dst, spec.dport), "destination kept");
    assert_eq!(v.ttl, spec.ttl - 1, "TTL decremented");
    assert_eq!(v.payload, spec.payload, "payload untouched");
    check_checksums(frame).unwrap_or_else(|e| panic!("{e} for {spec:?}"));
}

#[test]
fn tcp_outbound_snat_and_reply_dnat() {
    let mut fx = Fixture::new("tcp").unwrap();
    fx.install_pair(IPPROTO_TCP, 40000, 21);

    let spec = Spec {
        tcp_flags: TCP_SYN,
        ..Spec::tcp(CLIENT, 40000, SERVER, 21)
    };
    let r = fx.run(Side::Internal, &spec.build());
    assert_eq!(r.action, XDP_REDIRECT);
    assert_translated_out(&r.frame, &spec);

    let reply = Spec::tcp(SERVER, 21, FW_EXTERNAL, NAT_PORT);
    let r = fx.run(Side::External, &reply.build());
    assert_eq!(r.action, XDP_REDIRECT);
    let v = view(&r.frame);
    assert_eq!((v.dst_mac, v.src_mac), (CLIENT_MAC, IN_MAC));
    assert_eq!(
        (v.src, v.sport, v.dst, v.dport),
        (SERVER, 21, CLIENT, 40000)
    );
    assert_eq!(v.ttl, 63);
    check_checksums(&r.frame).unwrap();

    // Per-flow accounting: packets, bytes, last seen, TCP flags.
    let out = fx
        .flows
        .get(&FlowKey::new(IPPROTO_TCP, CLIENT, 40000, SERVER, 21))
        .unwrap()
        .unwrap();
    assert_eq!(out.packets, 1);
    assert_eq!(out.bytes, spec.build().len() as u64);
    assert!(out.last_seen_ns > 0);
    assert_eq!(out.tcp_flags_seen, tcp_seen::SYN);
    assert_eq!(fx.counter(Counter::Redirected), 2);
}

#[test]
fn udp_translation_including_no_checksum() {
    let mut fx = Fixture::new("udp").unwrap();
    fx.install_pair(IPPROTO_UDP, 5000, 53);
    let spec = Spec::udp(CLIENT, 5000, SERVER, 53);
    let r = fx.run(Side::Internal, &spec.build());
    assert_eq!(r.action, XDP_REDIRECT);
    assert_translated_out(&r.frame, &spec);

    // UDP without checksum stays without one.
    let spec = Spec {
        no_udp_checksum: true,
        ..Spec::udp(CLIENT, 5000, SERVER, 53)
    };
    let r = fx.run(Side::Internal, &spec.build());
    assert_eq!(r.action, XDP_REDIRECT);
    assert_eq!(view(&r.frame).l4_check, 0);
    assert_eq!(
        (view(&r.frame).src, view(&r.frame).sport),
        (FW_EXTERNAL, NAT_PORT)
    );
}

#[test]
fn checksum_partial_frames_leave_with_full_checksums() {
    // Local sockets on veth hand XDP frames whose L4 checksum field holds only
    // the pseudo-header sum; they must leave complete. Lengths cross the
    // 512-byte chunks of the recomputation and include odd sizes.
    let mut fx = Fixture::new("partial").unwrap();
    fx.install_pair(IPPROTO_TCP, 40000, 21);
    fx.install_pair(IPPROTO_UDP, 5000, 53);
    for len in [
        0usize, 1, 3, 4, 491, 492, 493, 511, 512, 513, 1023, 1024, 1025, 1432,
    ] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
        for base in [
            Spec::tcp(CLIENT, 40000, SERVER, 21),
            Spec::udp(CLIENT, 5000, SERVER, 53),
        ] {
            for partial in [true, false] {
                let spec = Spec {
                    payload: payload.clone(),
                    partial_checksum: partial,
                    ..base.clone()
                };
                let r = fx.run(Side::Internal, &spec.build());
                assert_eq!(r.action, XDP_REDIRECT, "len {len} partial {partial}");
                assert_translated_out(&r.frame, &spec);
            }
        }
    }
}

#[test]
fn ip_options_are_skipped_and_preserved() {
    let mut fx = Fixture::new("opts").unwrap();
    fx.install_pair(IPPROTO_TCP, 40000, 21);
    let spec = Spec {
        ip_options: vec![1, 1, 1, 0],
        ..Spec::tcp(CLIENT, 40000, SERVER, 21)
    }; // NOP NOP NOP EOL
    let frame = spec.build();
    let r = fx.run(Side::Internal, &frame);
    assert_eq!(r.action, XDP_REDIRECT);
    assert_translated_out(&r.frame, &spec);
    assert_eq!(&r.frame[34..38], &[1, 1, 1, 0], "options kept in place");
}

#[test]
fn tcp_flags_accumulate_on_the_flow() {
    let mut fx = Fixture::new("flags").unwrap();
    fx.install_pair(IPPROTO_TCP, 40000, 21);
    for flags in [TCP_SYN, TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST] {
        let r = fx.run(
            Side::Internal,
            &Spec {
                tcp_flags: flags,
                ..Spec::tcp(CLIENT, 40000, SERVER, 21)
            }
            .build(),
        );
        assert_eq!(r.action, XDP_REDIRECT);
    }
    let v = fx
        .flows
        .get(&FlowKey::new(IPPROTO_TCP, CLIENT, 40000, SERVER, 21))
        .unwrap()
        .unwrap();
    assert_eq!(
        v.tcp_flags_seen,
        tcp_seen::SYN | tcp_seen::FIN | tcp_seen::RST
    );
    assert_eq!(v.packets, 4);
}

/// Frames the datapath leaves alone: verdict PASS, bytes unchanged, and the counter.
#[test]
fn passthrough_is_unchanged_and_counted() {
    let mut fx = Fixture::new("pass").unwrap();
    fx.install_pair(IPPROTO_TCP, 40000, 21);
    let tcp = Spec::tcp(CLIENT, 40000, SERVER, 21);

    let arp = {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
        f.extend_from_slice(&[0u8; 28]);
        f
    };
    let ipv6 = {
        let mut f = vec![0x33, 0x33, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 1, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 0, 59, 64]);
        f.extend_from_slice(&[0u8; 32]);
        f
    };
    // Addressed to the firewall itself: the stack's.
    let local_tcp = Spec::tcp(CLIENT, 40000, FW_INTERNAL, 22);
    let mut icmp = Spec::udp(CLIENT, 0, FW_INTERNAL, 0).build();
    icmp[23] = 1; // protocol ICMP (header checksum is not checked here)
    let frag_mf = Spec {
        frag: 0x2000,
        ..local_tcp.clone()
    }
    .build();
    let frag_off = Spec {
        frag: 0x0010,
        ..local_tcp.clone()
    }
    .build();
    let no_flow = Spec::tcp(CLIENT, 40001, FW_INTERNAL, 22).build();
    let ttl1 = Spec {
        ttl: 1,
        ..tcp.clone()
    }
    .build();
    // (Frames shorter than an Ethernet header cannot be fed: BPF_PROG_RUN
    // refuses them, as NICs never deliver them.)

    let cases: Vec<(&str, Vec<u8>, Counter)> = vec![
        ("arp", arp, Counter::PassNotIpv4),
        ("ipv6 (forwarding off for IPv6)", ipv6, Counter::PassNotIpv4),
        ("icmp to the firewall", icmp, Counter::PassNotTcpUdp),
        // A first fragment is read like a whole packet (it has the ports).
        (
            "first fragment to the firewall",
            frag_mf,
            Counter::PassNoFlow,
        ),
        (
            "fragment with offset to the firewall",
            frag_off,
            Counter::PassFragment,
        ),
        ("tcp to the firewall", no_flow, Counter::PassNoFlow),
        ("ttl 1", ttl1, Counter::PassTtlExceeded),
    ];
    for (name, frame, counter) in cases {
        let before = fx.counter(counter);
        let r = fx.run(Side::Internal, &frame);
        assert_eq!(r.action, XDP_PASS, "{name}");
        assert_eq!(r.frame, frame, "{name}: frame must be unchanged");
        assert_eq!(
            fx.counter(counter),
            before + 1,
            "{name}: counted under {}",
            counter.name()
        );
    }
}

#[test]
fn malformed_frames_are_dropped_and_counted() {
    let mut fx = Fixture::new("malformed").unwrap();
    fx.install_pair(IPPROTO_TCP, 40000, 21);
    let good = Spec::tcp(CLIENT, 40000, SERVER, 21).build();
    let udp = Spec::udp(CLIENT, 5000, SERVER, 53).build();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated IPv4 header", good[..14 + 19].to_vec()),
        ("truncated TCP header", good[..14 + 20 + 19].to_vec()),
        ("truncated UDP header", udp[..14 + 20 + 7].to_vec()),
    ];
    let mut f = good.clone();
    f[16..18].copy_from_slice(&2000u16.to_be_bytes());
    cases.push(("total length beyond the frame", f));
    let mut f = good.clone();
    f[14] = 0x44;
    cases.push(("IHL below 5", f));
    let mut f = good.clone();
    f[14] = 0x65;
    cases.push(("version 6 in an IPv4 ethertype", f));
    let mut f = good.clone();
    f[16..18].copy_from_slice(&10u16.to_be_bytes());
    cases.push(("total length below the header", f));
    let mut f = good.clone();
    f[14 + 20 + 12] = 4 << 4;
    cases.push(("TCP data offset below 5", f));
    let mut f = udp.clone();
    f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&500u16.to_be_bytes());
    cases.push(("UDP length beyond the datagram", f));
    let mut f = Spec {
        vlan: Some(7),
        ..Spec::tcp(CLIENT, 40000, SERVER, 21)
    }
    .build();
    f.truncate(16);
    cases.push(("truncated VLAN tag", f));

    for (name, frame) in cases {
        let before = fx.counter(Counter::DropMalformed);
        let r = fx.run(Side::Internal, &frame);
        assert_eq!(r.action, XDP_DROP, "{name}");
        assert_eq!(fx.counter(Counter::DropMalformed), before + 1, "{name}");
    }
    // Ethernet padding after the IP packet is fine.
    let mut padded = good.clone();
    padded.extend_from_slice(&[0; 6]);
    assert_eq!(fx.run(Side::Internal, &padded).action, XDP_REDIRECT);
}

#[test]
fn flow_and_route_drops_have_reasons() {
    let mut fx = Fixture::new("drops").unwrap();
    let sh = |s: &str| {
        firewall_lab::run(std::process::Command::new("nsenter").args([
            &format!("--net=/run/netns/fwfx{}-drops", std::process::id()),
            "sh",
            "-c",
            s,
        ]))
        .unwrap();
    };
    sh("ip route add blackhole 192.0.2.0/24; ip route add unreachable 198.51.100.0/24; ip neigh add 10.2.0.200 lladdr 02:22:00:00:00:c8 dev ex0 nud permanent; ip route add 10.2.0.200/32 dev ex0 mtu lock 600");

    let key = |port| FlowKey::new(IPPROTO_TCP, CLIENT, port, SERVER, 21);
    let mut drop_flow = FlowValue::forward(FW_EXTERNAL, NAT_PORT, SERVER, 21);
    drop_flow.action = FlowAction::Drop as u32;
    fx.flows.insert(&key(1), &drop_flow).unwrap();
    let mut unknown = drop_flow;
    unknown.action = 77;
    fx.flows.insert(&key(2), &unknown).unwrap();
    fx.flows
        .insert(
            &key(3),
            &FlowValue::forward(FW_EXTERNAL, NAT_PORT, UNRESOLVED, 21),
        )
        .unwrap();
    fx.flows
        .insert(
            &key(4),
            &FlowValue::forward(FW_EXTERNAL, NAT_PORT, [192, 0, 2, 1], 21),
        )
        .unwrap();
    fx.flows
        .insert(
            &key(5),
            &FlowValue::forward(FW_EXTERNAL, NAT_PORT, [198, 51, 100, 1], 21),
        )
        .unwrap();
    fx.flows
        .insert(
            &key(6),
            &FlowValue::forward(FW_EXTERNAL, NAT_PORT, [203, 0, 113, 1], 21),
        )
        .unwrap();
    let mut pinned = FlowValue::forward(FW_EXTERNAL, NAT_PORT, SERVER, 21);
    pinned.egress_ifindex = fx.in_ifindex;
    fx.flows.insert(&key(7), &pinned).unwrap();
    fx.flows
        .insert(
            &key(8),
            &FlowValue::forward(FW_EXTERNAL, NAT_PORT, [10, 2, 0, 200], 21),
        )
        .unwrap();
    fx.flows
        .insert(
            &key(9),
            &FlowValue::forward(FW_EXTERNAL, NAT_PORT, [10, 2, 0, 200], 21),
        )
        .unwrap();

    let big = vec![0x55u8; 700];
    let cases: Vec<(u16, Vec<u8>, u32, Counter)> = vec![
        (1, vec![], XDP_DROP, Counter::DropFlowAction),
        (2, vec![], XDP_DROP, Counter::DropFlowAction),
        (3, vec![], XDP_DROP, Counter::DropNoNeighbour),
        (4, vec![], XDP_DROP, Counter::DropNoRoute),
        (5, vec![], XDP_DROP, Counter::DropNoRoute),
        (6, vec![], XDP_DROP, Counter::DropNotForwarded),
        (7, vec![], XDP_DROP, Counter::DropEgressMismatch),
        (8, big.clone(), XDP_PASS, Counter::PassFragNeeded),
    ];
    for (port, payload, action, counter) in cases {
        let spec = Spec {
            payload: if payload.is_empty() {
                Spec::tcp(CLIENT, port, SERVER, 21).payload
            } else {
                payload
            },
            ..Spec::tcp(CLIENT, port, SERVER, 21)
        };
        let frame = spec.build();
        let before = fx.counter(counter);
        let r = fx.run(Side::Internal, &frame);
        assert_eq!(r.action, action, "flow {port} ({})", counter.name());
        assert_eq!(
            fx.counter(counter),
            before + 1,
            "flow {port}: {}",
            counter.name()
        );
        assert_eq!(
            r.frame, frame,
            "flow {port}: a dropped or passed frame is not modified"
        );
    }
    // Without DF a too-large packet would need fragmenting: dropped.
    let spec = Spec {
        payload: big,
        frag: 0,
        ..Spec::tcp(CLIENT, 9, SERVER, 21)
    };
    assert_eq!(fx.run(Side::Internal, &spec.build()).action, XDP_DROP);
    assert_eq!(fx.counter(Counter::DropFragNeeded), 1);
}

#[test]
fn every_counter_has_a_distinct_stats_slot() {
    // What the datapath counts is what status and bpftool show: the slots are
    // dense and the names unique (checked on the host side too).
    let names: std::collections::BTreeSet<_> = Counter::ALL.iter().map(|c| c.name()).collect();
    assert_eq!(names.len(), Counter::ALL.len());
}

#[test]
fn the_next_hop_is_cached_but_the_mtu_and_changes_still_apply() {
    let mut fx = Fixture::new("hop").unwrap();
    let ns = format!("--net=/run/netns/fwfx{}-hop", std::process::id());
    let sh = |s: &str| {
        firewall_lab::run(std::process::Command::new("nsenter").args([&ns, "sh", "-c", s]))
            .unwrap();
    };
    // A server behind a 600-byte MTU route.
    sh("ip neigh add 10.2.0.200 lladdr 02:22:00:00:00:c8 dev ex0 nud permanent; ip route add 10.2.0.200/32 dev ex0 mtu lock 600");
    let far = [10, 2, 0, 200];
    let key = FlowKey::new(IPPROTO_TCP, CLIENT, 7000, far, 21);
    fx.flows
        .insert(&key, &FlowValue::forward(FW_EXTERNAL, NAT_PORT, far, 21))
        .unwrap();
    let frame = |len: usize| {
        Spec {
            payload: vec![0x55; len],
            ..Spec::tcp(CLIENT, 7000, far, 21)
        }
        .build()
    };
    // The first packet asks the FIB and leaves the answer in the flow.
    assert_eq!(fx.run(Side::Internal, &frame(100)).action, XDP_REDIRECT);
    let f = fx.flows.get(&key).unwrap().unwrap();
    assert_eq!(f.hop_ifindex, fx.ex_ifindex);
    assert_eq!(f.hop_dmac, [0x02, 0x22, 0, 0, 0, 0xc8]);
    assert_eq!(f.hop_smac, EX_MAC);
    assert_eq!(f.hop_len_ok, 20 + 20 + 100);
    assert_ne!(f.hop_checked, 0);
    // A packet longer than any the FIB accepted asks again: the MTU check holds.
    let out = fx.run(Side::Internal, &frame(700));
    assert_eq!(out.action, XDP_PASS);
    assert_eq!(fx.counter(Counter::PassFragNeeded), 1);
    // Up to the MTU it is cached for longer packets too.
    assert_eq!(fx.run(Side::Internal, &frame(500)).action, XDP_REDIRECT);
    assert_eq!(fx.flows.get(&key).unwrap().unwrap().hop_len_ok, 540);
    // The neighbour's MAC changes: a stale cache (older than HOP_RECHECK) is refreshed.
    sh("ip neigh replace 10.2.0.200 lladdr 02:22:00:00:00:c9 dev ex0 nud permanent");
    let mut f = fx.flows.get(&key).unwrap().unwrap();
    f.hop_checked = f
        .hop_checked
        .wrapping_sub(firewall_common::flow::HOP_RECHECK + 1);
    fx.flows.insert(&key, &f).unwrap();
    let out = fx.run(Side::Internal, &frame(100));
    assert_eq!(out.action, XDP_REDIRECT);
    assert_eq!(&out.frame[0..6], &[0x02, 0x22, 0, 0, 0, 0xc9]);
    assert_eq!(
        fx.flows.get(&key).unwrap().unwrap().hop_dmac,
        [0x02, 0x22, 0, 0, 0, 0xc9]
    );
}

/// Translations whose address change moves the checksum: the lab's client
/// (10.1.0.2) and external address (10.2.0.1) have the same ones'-complement
/// sum, so every other fixture's address change is checksum-neutral and
/// only its port change is checked. Both hooks, both directions, TCP (with
/// and without payload) and UDP, and ports that change.
#[test]
fn address_changes_that_move_the_checksum() {
    let mut fx = Fixture::new("csumaddr").unwrap();
    // Words 0x0a02 + 0x0009: not the client's 0x0a02 + 0x0002.
    let nat: [u8; 4] = [10, 2, 0, 9];
    for (protocol, cport, sport, nport) in [
        (IPPROTO_TCP, 40100, 80, 3000),
        (IPPROTO_UDP, 40101, 53, 3001),
    ] {
        fx.flows
            .insert(
                &FlowKey::new(protocol, CLIENT, cport, SERVER, sport),
                &FlowValue::forward(nat, nport, SERVER, sport),
            )
            .unwrap();
        fx.flows
            .insert(
                &FlowKey::new(protocol, SERVER, sport, nat, nport),
                &FlowValue::forward(SERVER, sport, CLIENT, cport),
            )
            .unwrap();
    }
    let specs = [
        Spec {
            tcp_flags: TCP_SYN,
            ..Spec::tcp(CLIENT, 40100, SERVER, 80)
        },
        Spec {
            payload: vec![0x5c; 777],
            ..Spec::tcp(CLIENT, 40100, SERVER, 80)
        },
        Spec::udp(CLIENT, 40101, SERVER, 53),
        Spec::tcp(SERVER, 80, nat, 3000),
        Spec {
            payload: vec![0xc5; 333],
            ..Spec::udp(SERVER, 53, nat, 3001)
        },
    ];
    for tc in [false, true] {
        for spec in &specs {
            let side = if spec.src == CLIENT {
                Side::Internal
            } else {
                Side::External
            };
            let r = if tc {
                fx.run_tc(side, &spec.build())
            } else {
                fx.run(side, &spec.build())
            };
            assert_eq!(
                r.action,
                if tc { TC_REDIRECT } else { XDP_REDIRECT },
                "tc {tc}: {spec:?}"
            );
            let v = view(&r.frame);
            if side == Side::Internal {
                assert_eq!(v.src, nat, "tc {tc}: {spec:?}");
            } else {
                assert_eq!(v.dst, CLIENT, "tc {tc}: {spec:?}");
            }
            check_checksums(&r.frame).unwrap_or_else(|e| panic!("tc {tc}: {e} for {spec:?}"));
        }
    }
}

/// TC verdicts (`--xdp-mode tc`): TCX_NEXT passes on to the next program.
const TC_REDIRECT: u32 = 7;
const TC_NEXT: u32 = u32::MAX;

#[test]
fn the_tc_datapath_translates_like_xdp() {
    let mut fx = Fixture::new("tcfwd").unwrap();
    fx.install_pair(IPPROTO_TCP, 40000, 21);
    fx.install_pair(IPPROTO_UDP, 40001, 53);
    for spec in [
        Spec {
            tcp_flags: TCP_SYN,
            ..Spec::tcp(CLIENT, 40000, SERVER, 21)
        },
        Spec::udp(CLIENT, 40001, SERVER, 53),
        Spec {
            payload: vec![0xab; 1001],
            ..Spec::tcp(CLIENT, 40000, SERVER, 21)
        },
    ] {
        let r = fx.run_tc(Side::Internal, &spec.build());
        assert_eq!(r.action, TC_REDIRECT, "{spec:?}");
        assert_translated_out(&r.frame, &spec);
    }
    // UDP without checksum stays without.
    let spec = Spec {
        no_udp_checksum: true,
        ..Spec::udp(CLIENT, 40001, SERVER, 53)
    };
    let r = fx.run_tc(Side::Internal, &spec.build());
    assert_eq!(r.action, TC_REDIRECT);
    assert_eq!(view(&r.frame).l4_check, 0);
    // The reply direction.
    let reply = Spec::tcp(SERVER, 21, FW_EXTERNAL, NAT_PORT);
    let r = fx.run_tc(Side::External, &reply.build());
    assert_eq!(r.action, TC_REDIRECT);
    let v = view(&r.frame);
    assert_eq!((v.dst_mac, v.src_mac), (CLIENT_MAC, IN_MAC));
    assert_eq!(
        (v.src, v.sport, v.dst, v.dport),
        (SERVER, 21, CLIENT, 40000)
    );
    check_checksums(&r.frame).unwrap();
    // What is addressed to the firewall goes on to the next program (the
    // interception), unchanged.
    let other = Spec::tcp(CLIENT, 1234, FW_INTERNAL, 80).build();
    let r = fx.run_tc(Side::Internal, &other);
    assert_eq!(r.action, TC_NEXT);
    assert_eq!(r.frame, other);
    assert_eq!(fx.counter(Counter::PassNoFlow), 1);
}
