//! How connections end: TCP teardown seen by the datapath, the quota of live
//! connections, flows that outlive their connection's ports, a pinhole in
//! use as its control connection ends, and timers that cost what is due.

use firewall_common::flow::{tcp_seen, FlowValue};

use super::tests::{
    bind, bound, cfg, engine, engine_with, established, established_through, kind, pinhole, reason,
    redirect, state, CLIENT, T0,
};
use super::*;

const S: u64 = 1_000_000_000;

fn closing(e: &mut Engine<MemMaps>, key: FlowKey, bits: u8) {
    e.maps_mut().flows.get_mut(&key).unwrap().tcp_flags_seen |= bits;
    e.on_datapath_event(&DatapathEvent {
        kind: event_kind::CLOSING,
        detail: bits as u32,
        owner: e.maps().flows[&key].owner,
        forward: key,
        ..Default::default()
    });
}

fn ports_in_use(e: &Engine<MemMaps>) -> usize {
    e.ports().in_use(super::tests::EXT, Transport::Tcp)
        + e.ports().in_use(super::tests::INT, Transport::Tcp)
}

#[test]
fn fin_both_ways_ends_the_connection_and_frees_its_ports_at_once() {
    let (mut e, s) = engine();
    let id = bound(&mut e, s, "10.1.0.2:5001");
    let (f, r) = established(&mut e, id, "198.51.100.7", 20);
    e.take_events();
    assert_eq!(ports_in_use(&e), 1);
    closing(&mut e, f, tcp_seen::FIN);
    assert_eq!(state(&e, id), State::Established, "half closed");
    closing(&mut e, r, tcp_seen::FIN);
    assert_eq!(state(&e, id), State::Terminated);
    assert_eq!(reason(&e, id).as_deref(), Some("closed"));
    assert_eq!(ports_in_use(&e), 0, "its port went with it");
    assert!(
        matches!(e.take_events()[..], [Event::Terminating { connection, .. }] if connection == id)
    );
    // The flows stay for the last ACK, then go once quiet for tcp_closing.
    assert_eq!(e.maps().flows.len(), 2);
    let now = T0;
    e.tick(now + 5 * S).unwrap();
    assert_eq!(e.maps().flows.len(), 2);
    e.tick(now + 11 * S).unwrap();
    assert!(e.maps().flows.is_empty());
    assert!(e.take_events().is_empty(), "terminating is raised once");
}

#[test]
fn a_reset_ends_the_connection_at_once() {
    let (mut e, s) = engine();
    let id = e
        .redirect_connections(&redirect(s, &["198.51.100.7:2000"]))
        .unwrap()
        .actions[0]
        .id;
    let (f, _) = established(&mut e, id, CLIENT, 40000);
    closing(&mut e, f, tcp_seen::RST);
    assert_eq!(state(&e, id), State::Terminated);
    assert_eq!(ports_in_use(&e), 0);
}

#[test]
fn the_quota_counts_live_connections_only() {
    let (mut e, s) = engine_with(
        EngineConfig {
            client_quota: 2,
            ..cfg()
        },
        20000..=20999,
    );
    let client: Ipv4Addr = CLIENT.parse().unwrap();
    let mut flows = Vec::new();
    for port in [5001, 5002] {
        let id = e
            .bind_for_client(&bind(s, &[&format!("10.1.0.2:{port}")]))
            .unwrap()
            .connections[0]
            .id;
        flows.push(established(&mut e, id, "198.51.100.7", port - 5000));
    }
    assert!(e.maps().busy.contains_key(&client));
    // At its quota, a new TCP secondary is refused at the call (FWX_E_IS_BUSY),
    // so the FTP filter answers 425 instead of a SYN being dropped later.
    assert_eq!(
        kind(e.bind_for_client(&bind(s, &["10.1.0.2:5003"]))),
        ErrorKind::Busy
    );
    assert_eq!(
        kind(e.redirect_connections(&redirect(s, &["198.51.100.7:2000"]))),
        ErrorKind::Busy
    );
    // UDP is not refused (a UDP mapping beyond the quota ends the oldest).
    e.bind_for_client(&BindRequest {
        protocol: Transport::Udp,
        ..bind(s, &["10.1.0.2:6000"])
    })
    .unwrap();
    // The first FIN of either direction ends the count: the flows still
    // wait out the teardown, but the client may open a new one.
    closing(&mut e, flows[0].1, tcp_seen::FIN);
    assert!(!e.maps().busy.contains_key(&client));
    e.bind_for_client(&bind(s, &["10.1.0.2:5003"])).unwrap();
    // Counted once: the rest of the teardown changes nothing.
    closing(&mut e, flows[0].0, tcp_seen::FIN);
    closing(&mut e, flows[0].0, tcp_seen::RST);
    assert_eq!(e.quota_count(client, Transport::Tcp), 1);
}

#[test]
fn a_pinhole_used_as_its_control_connection_ends_is_kept() {
    let (mut e, s) = engine();
    let id = e
        .redirect_connections(&redirect(s, &["198.51.100.7:2000"]))
        .unwrap()
        .actions[0]
        .id;
    // A first packet won the pinhole in the kernel; its event is not read yet.
    let key = pinhole(&e, id);
    e.maps_mut().pinholes.get_mut(&key).unwrap().remaining = 0;
    let value = e.maps().pinholes[&key];
    e.withdraw_unused(&[id], "control connection ended");
    assert_eq!(state(&e, id), State::Listening, "not withdrawn");
    assert!(e.maps().pinholes.is_empty(), "the pinhole is spent");
    // The event arrives: the connection goes on.
    established_through(&mut e, id, key, value, CLIENT, 40000);
    assert_eq!(state(&e, id), State::Established);
    e.tick(T0 + 2 * S).unwrap();
    assert_eq!(state(&e, id), State::Established, "the wait timer is void");
    assert_eq!(e.maps().flows.len(), 2, "its flows are intact");

    // A pinhole won but never reported (the datapath failed to make the
    // flows): given up on after a second.
    let lost = e
        .redirect_connections(&redirect(s, &["198.51.100.7:2001"]))
        .unwrap()
        .actions[0]
        .id;
    let key = pinhole(&e, lost);
    e.maps_mut().pinholes.get_mut(&key).unwrap().remaining = 0;
    e.withdraw_unused(&[lost], "control connection ended");
    assert_eq!(state(&e, lost), State::Listening);
    e.tick(T0 + 2 * S).unwrap();
    assert_eq!(state(&e, lost), State::Terminated);
    assert_eq!(
        reason(&e, lost).as_deref(),
        Some("control connection ended")
    );
}

#[test]
fn a_timed_out_pinhole_in_use_waits_for_its_event() {
    let (mut e, s) = engine();
    let id = e
        .bind_for_client(&BindRequest {
            flags: ConnFlags::TIMEOUT,
            ..bind(s, &["10.1.0.2:5001"])
        })
        .unwrap()
        .connections[0]
        .id;
    let key = pinhole(&e, id);
    e.maps_mut().pinholes.get_mut(&key).unwrap().remaining = 0;
    e.tick(T0 + 61 * S).unwrap();
    assert_eq!(state(&e, id), State::Listening);
    assert_eq!(e.expired().pinholes_timed_out, 0);
}

#[test]
fn a_user_mode_endpoint_is_withdrawn_by_the_relay() {
    let (mut e, s) = engine();
    let id = e
        .bind_for_client(&BindRequest {
            flags: ConnFlags::NO_KERNEL_MODE,
            ..bind(s, &["10.1.0.2:5001"])
        })
        .unwrap()
        .connections[0]
        .id;
    e.take_relay_cmds();
    e.withdraw_unused(&[id], "control connection ended");
    assert!(matches!(
        e.take_relay_cmds()[..],
        [RelayCmd::Withdraw { owner, .. }] if owner == id
    ));
    assert_eq!(state(&e, id), State::Listening, "the relay decides");
    e.on_relay_event(RelayEvent::Withdrawn {
        owner: id,
        reason: "control connection ended",
    });
    assert_eq!(state(&e, id), State::Terminated);
}

#[test]
fn a_flow_taken_over_by_a_new_connection_is_not_the_old_ones() {
    // The datapath re-admits a SYN that reuses a closed connection's 5-tuple
    // through a new pinhole: the key now belongs to the new connection.
    let (mut e, s) = engine();
    let old = bound(&mut e, s, "10.1.0.2:5001");
    let (f, _) = established(&mut e, old, "198.51.100.7", 20);
    let new = bound(&mut e, s, "10.1.0.2:5002");
    e.maps_mut().flows.get_mut(&f).unwrap().owner = new;
    e.on_datapath_event(&DatapathEvent {
        kind: event_kind::ESTABLISHED,
        owner: new,
        forward: f,
        reply: FlowKey::default(),
        pinhole: pinhole(&e, new),
        ..Default::default()
    });
    e.kill(old).unwrap();
    assert!(
        e.maps().flows.contains_key(&f),
        "the new connection's flow stays"
    );
}

#[test]
fn a_tick_reads_only_what_is_due() {
    let (mut e, s) = engine_with(
        EngineConfig {
            client_quota: 1000,
            ..cfg()
        },
        20000..=20999,
    );
    let now = T0;
    for port in 0..200u16 {
        let id = e
            .bind_for_client(&bind(s, &[&format!("10.1.0.2:{}", 5000 + port)]))
            .unwrap()
            .connections[0]
            .id;
        established(&mut e, id, "198.51.100.7", 1000 + port);
    }
    assert_eq!(e.maps().flows.len(), 400);
    assert!(e.timers_due(now + S).is_empty(), "nothing due for an hour");
    e.timers_apply(now + S, &Readings::new(), &[]).unwrap();
    // Two hours on, every connection's idle check asks for its two flows.
    let due = e.timers_due(now + 7201 * S);
    assert_eq!(due.len(), 400);
    let readings: Readings = due
        .iter()
        .map(|k| (*k, e.maps().flows.get(k).copied()))
        .collect();
    e.timers_apply(now + 7201 * S, &readings, &[]).unwrap();
    assert!(e.maps().flows.is_empty());
    assert!(e.objects().iter().all(|o| o.state == State::Terminated));
}

#[test]
fn a_session_may_have_only_so_many_pinholes_waiting() {
    let (mut e, s) = engine_with(
        EngineConfig {
            max_pending: 3,
            ..cfg()
        },
        20000..=20999,
    );
    let ids: Vec<u64> = (0..3)
        .map(|i| {
            e.bind_for_client(&bind(s, &[&format!("10.1.0.2:{}", 5001 + i)]))
                .unwrap()
                .connections[0]
                .id
        })
        .collect();
    assert_eq!(
        kind(e.bind_for_client(&bind(s, &["10.1.0.2:6000"]))),
        ErrorKind::Exhausted
    );
    assert_eq!(
        kind(e.redirect_connections(&redirect(s, &["198.51.100.7:2000"]))),
        ErrorKind::Exhausted
    );
    assert_eq!(e.expired().pending_refused, 2);
    // One established, one killed: two may wait again.
    established(&mut e, ids[0], "198.51.100.7", 20);
    e.kill(ids[1]).unwrap();
    e.bind_for_client(&bind(s, &["10.1.0.2:6000", "10.1.0.2:6001"]))
        .unwrap();
    assert_eq!(
        kind(e.bind_for_client(&bind(s, &["10.1.0.2:6002"]))),
        ErrorKind::Exhausted
    );
}

#[test]
fn an_expired_flow_taken_up_again_after_it_was_read_stays() {
    // A wall flow (no owner) both ways, closed by FIN long ago.
    let (mut e, _) = engine();
    let f = FlowKey::new(IPPROTO_TCP, [10, 1, 0, 2], 40000, [10, 2, 0, 2], 21);
    let r = FlowKey::new(IPPROTO_TCP, [10, 2, 0, 2], 21, [10, 2, 0, 1], 5000);
    let value = |nat_src: ([u8; 4], u16), nat_dst: ([u8; 4], u16)| FlowValue {
        nat_src_addr: nat_src.0,
        nat_src_port: nat_src.1,
        nat_dst_addr: nat_dst.0,
        nat_dst_port: nat_dst.1,
        tcp_flags_seen: tcp_seen::FIN,
        last_seen_ns: T0,
        packets: 3,
        ..Default::default()
    };
    let fv = value(([10, 2, 0, 1], 5000), ([10, 2, 0, 2], 21));
    let rv = value(([10, 2, 0, 2], 21), ([10, 1, 0, 2], 40000));
    e.maps_mut().flows.insert(f, fv);
    e.maps_mut().flows.insert(r, rv);
    let now = T0 + 20 * S;
    let batch = [(f, fv), (r, rv)];
    // Read as expired; then a new connection's SYN takes the client's entry
    // up before the tick removes it: neither entry goes.
    e.maps_mut().flows.get_mut(&f).unwrap().last_seen_ns = now + 1;
    e.timers_apply(now, &Readings::new(), &batch).unwrap();
    assert_eq!(e.maps().flows.len(), 2);
    // Not taken up: both go.
    e.timers_apply(now + 20 * S, &Readings::new(), &batch)
        .unwrap();
    assert!(e.maps().flows.is_empty());
}
