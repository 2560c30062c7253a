//! A million random and mutated frames through the datapath (BPF_PROG_RUN),
//! against loaded flows and pinholes: valid TCP/UDP with random addresses,
//! flags, VLAN stacks, IPv4 options, fragments and lengths, then bytes
//! flipped, truncations and plain noise. Checked:
//! - no frame is redirected unless its 5-tuple has a flow or opens a pinhole,
//!   or is a TFTP server's answer to a tracked request (the helper is on for
//!   the server's port 21 here), let in at most once per request frame;
//! - a later fragment only after its datagram's first fragment was
//!   redirected, and only if that fragment's 5-tuple has a flow;
//! - every redirected frame that came in with valid checksums (or a partial
//!   one, unfragmented) leaves with valid IPv4 and L4 checksums (a later
//!   fragment: a valid IPv4 header checksum), and no VLAN tag is ever
//!   redirected;
//! - every frame is counted under exactly one reason.

use std::collections::{HashMap, HashSet};

use firewall_common::{
    flow::{flow_kind, FlowKey, FlowValue},
    pinhole::{pinhole_flags, side, PinholeKey, PinholeValue},
    stats::Counter,
    IPPROTO_TCP, IPPROTO_UDP,
};
use firewall_ctl::datapath::{FlowTable, Side, WallTables};
use firewall_tests::{
    fixture::*,
    packet::{check_checksums, Spec},
};

/// xorshift64*: deterministic, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
}

const ADDRS: [[u8; 4]; 5] = [CLIENT, SERVER, FW_EXTERNAL, FW_INTERNAL, [10, 2, 0, 77]];
const PORTS: [u16; 6] = [20, 21, 5001, 40001, 40002, 61000];

/// The 5-tuple of a frame the way the datapath parses it, if it is a plain
/// untagged, unfragmented IPv4 TCP/UDP frame.
fn key_of(f: &[u8]) -> Option<FlowKey> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] {
        return None;
    }
    let ihl = (f[14] & 0x0f) as usize * 4;
    let proto = f[23];
    let l4 = 14 + ihl;
    if f.len() < l4 + 8 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return None;
    }
    let src = f[26..30].try_into().ok()?;
    let dst = f[30..34].try_into().ok()?;
    let sport = u16::from_be_bytes([f[l4], f[l4 + 1]]);
    let dport = u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]);
    Some(FlowKey::new(proto, src, sport, dst, dport))
}

fn tagged(f: &[u8]) -> bool {
    f.len() >= 14 && matches!(u16::from_be_bytes([f[12], f[13]]), 0x8100 | 0x88a8)
}

/// The flags/fragment-offset field of an untagged IPv4 frame.
fn frag_field(f: &[u8]) -> Option<u16> {
    (f.len() >= 34 && f[12..14] == [0x08, 0x00]).then(|| u16::from_be_bytes([f[20], f[21]]))
}

fn is_later_fragment(f: &[u8]) -> bool {
    frag_field(f).is_some_and(|v| v & 0x1fff != 0)
}

fn is_first_fragment(f: &[u8]) -> bool {
    frag_field(f).is_some_and(|v| v & 0x3fff == 0x2000)
}

/// A fragment's datagram: source, destination, protocol, identification.
fn datagram(f: &[u8]) -> ([u8; 4], [u8; 4], u8, u16) {
    (
        f[26..30].try_into().unwrap(),
        f[30..34].try_into().unwrap(),
        f[23],
        u16::from_be_bytes([f[18], f[19]]),
    )
}

/// Whether the IPv4 header checksum is right.
fn ip_header_ok(f: &[u8]) -> bool {
    let ihl = (f[14] & 0x0f) as usize * 4;
    f.len() >= 14 + ihl && firewall_common::csum::ipv4_header_checksum(&f[14..14 + ihl]) == 0
}

/// Whether the L4 checksum is the pseudo-header sum a CHECKSUM_PARTIAL
/// packet carries (the datapath completes it).
fn partial(f: &[u8]) -> bool {
    let Some(k) = key_of(f) else { return false };
    let ihl = (f[14] & 0x0f) as usize * 4;
    let total = u16::from_be_bytes([f[16], f[17]]) as usize;
    let l4 = 14 + ihl;
    let off = if k.protocol == IPPROTO_TCP { 16 } else { 6 };
    if total < ihl || f.len() < 14 + total || f.len() < l4 + off + 2 {
        return false;
    }
    let want = firewall_common::csum::fold(firewall_common::csum::pseudo_header_sum(
        k.src_addr,
        k.dst_addr,
        k.protocol,
        (total - ihl) as u16,
    ) as u64);
    u16::from_be_bytes([f[l4 + off], f[l4 + off + 1]]) == want
}

fn random_frame(r: &mut Rng) -> Vec<u8> {
    let udp = r.below(2) == 0;
    let (src, dst) = (r.pick(&ADDRS), r.pick(&ADDRS));
    let (mut sport, dport) = (r.pick(&PORTS), r.pick(&PORTS));
    if udp && r.below(8) == 0 {
        // Any port (a TFTP server's transfer port, say).
        sport = 1 + r.below(65535) as u16;
    }
    let mut s = if udp {
        Spec::udp(src, sport, dst, dport)
    } else {
        Spec::tcp(src, sport, dst, dport)
    };
    s.tcp_flags = r.below(64) as u8;
    s.ttl = r.below(4) as u8 * 40;
    s.payload = vec![0x5a; r.below(300) as usize];
    if r.below(8) == 0 {
        s.vlan = Some(r.below(4096) as u16);
    }
    if r.below(8) == 0 {
        s.ip_options = vec![1; 4 * (1 + r.below(10) as usize)];
    }
    if r.below(8) == 0 {
        s.frag = r.pick(&[0x2000u16, 0x0001, 0x2010, 0x1fff, 0x0040, 0x2003]);
    }
    s.partial_checksum = r.below(4) == 0;
    s.no_udp_checksum = udp && r.below(8) == 0;
    let mut f = s.build();
    match r.below(6) {
        // Flip bytes.
        0 => {
            for _ in 0..1 + r.below(4) {
                let i = r.below(f.len() as u64) as usize;
                f[i] = r.next() as u8;
            }
        }
        // Cut it short.
        1 => f.truncate(r.below(f.len() as u64) as usize),
        // A second tag in front.
        2 if r.below(4) == 0 => {
            let tag = [0x81, 0x00, 0x00, 0x05];
            f.splice(12..12, tag);
        }
        // Noise.
        3 if r.below(8) == 0 => {
            f = (0..r.below(200)).map(|_| r.next() as u8).collect();
        }
        _ => {}
    }
    // BPF_PROG_RUN takes nothing shorter than an Ethernet header (nor does a
    // NIC deliver it).
    f.resize(f.len().max(14), 0);
    f
}

#[test]
fn a_million_random_frames_keep_every_rule() {
    let mut fx = Fixture::new("rand").unwrap();
    // Flows: a translated connection each way, a few of each protocol.
    let mut flows: HashSet<FlowKey> = HashSet::new();
    for (i, proto) in [IPPROTO_TCP, IPPROTO_UDP].into_iter().enumerate() {
        let out = FlowKey::new(proto, CLIENT, 5001, SERVER, 21);
        let back = FlowKey::new(proto, SERVER, 21, FW_EXTERNAL, 61000 + i as u16);
        fx.flows
            .insert(
                &out,
                &FlowValue::forward(FW_EXTERNAL, 61000 + i as u16, SERVER, 21),
            )
            .unwrap();
        fx.flows
            .insert(&back, &FlowValue::forward(SERVER, 21, CLIENT, 5001))
            .unwrap();
        flows.extend([out, back]);
    }
    // A TFTP request the wall tracks (kind primary), CLIENT:20 to SERVER:21
    // through FW_EXTERNAL:61000, with the helper on for port 21: the
    // server's answers from its other ports may come in, once per request
    // frame. (Not from CLIENT:5001: a pinhole's first packet writes that
    // endpoint's flows.)
    let request = FlowKey::new(IPPROTO_UDP, CLIENT, 20, SERVER, 21);
    let reply = FlowKey::new(IPPROTO_UDP, SERVER, 21, FW_EXTERNAL, 61000);
    for (k, mut v) in [
        (request, FlowValue::forward(FW_EXTERNAL, 61000, SERVER, 21)),
        (reply, FlowValue::forward(SERVER, 21, CLIENT, 20)),
    ] {
        v.kind = flow_kind::PRIMARY;
        fx.flows.insert(&k, &v).unwrap();
        flows.insert(k);
    }
    WallTables::open(&fx.pins).unwrap().set_tftp(&[21]).unwrap();
    // Read from inside the runs (the fixture is borrowed by them).
    let table = FlowTable::open(&fx.pins).unwrap();
    // Whether a request frame has come since the helper last let an answer in.
    let mut asked = true;
    let mut tftp_answers = 0u64;
    // Pinholes (multiple use, so they stay) on both sides.
    let mut pinholes: HashSet<PinholeKey> = HashSet::new();
    for (proto, port, side) in [
        (IPPROTO_TCP, 40001, side::EXTERNAL),
        (IPPROTO_UDP, 40002, side::EXTERNAL),
        (IPPROTO_TCP, 40001, side::INTERNAL),
    ] {
        let addr = if side == side::EXTERNAL {
            FW_EXTERNAL
        } else {
            FW_INTERNAL
        };
        let key = PinholeKey::new(proto, addr, port, side);
        fx.pinholes
            .insert(
                &key,
                &PinholeValue {
                    target_addr: if side == side::EXTERNAL {
                        CLIENT
                    } else {
                        SERVER
                    },
                    target_port: 5001,
                    flags: pinhole_flags::MULTIPLE,
                    remaining: 1,
                    owner: 9,
                    ..Default::default()
                },
            )
            .unwrap();
        pinholes.insert(key);
    }
    fx.attach_for_test_runs();

    let total: u64 = std::env::var("RANDOM_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let mut redirected = 0u64;
    let mut later_redirected = 0u64;
    // Datagrams whose first fragment was redirected, and its 5-tuple.
    let mut firsts: HashMap<([u8; 4], [u8; 4], u8, u16), FlowKey> = HashMap::new();
    let counted_before: u64 = Counter::ALL.iter().map(|c| fx.counter(*c)).sum();
    fx.run_each(|run| {
        for n in 0..total {
            let frame = random_frame(&mut r);
            let side = if r.below(2) == 0 {
                Side::Internal
            } else {
                Side::External
            };
            let out = run(side, &frame);
            let later = is_later_fragment(&frame);
            // A later fragment has no ports of its own.
            let key = if later { None } else { key_of(&frame) };
            let opens = key.is_some_and(|k| {
                pinholes.contains(&PinholeKey::new(
                    k.protocol,
                    k.dst_addr,
                    k.dst_port,
                    if side == Side::External {
                        side::EXTERNAL
                    } else {
                        side::INTERNAL
                    },
                ))
            });
            let known = key.is_some_and(|k| flows.contains(&k));
            // A frame of the request (or a later fragment of one) may count
            // as the client asking again, whatever became of it.
            if key == Some(request) || (later && firsts.get(&datagram(&frame)) == Some(&request)) {
                asked = true;
            }
            // The server's answer from another port to the request's NAT
            // endpoint: the helper may have copied the request's flows for it.
            let answer = key.filter(|k| {
                side == Side::External
                    && !known
                    && !opens
                    && k.protocol == IPPROTO_UDP
                    && (k.src_addr, k.dst_addr, k.dst_port) == (SERVER, FW_EXTERNAL, 61000)
                    && k.src_port != 21
            });
            if let Some(k) = answer {
                if table.get(&k).unwrap().is_some() {
                    assert!(
                        asked,
                        "frame {n}: a second TFTP answer without a new request"
                    );
                    asked = false;
                    tftp_answers += 1;
                    flows.insert(k);
                    flows.insert(FlowKey::new(IPPROTO_UDP, CLIENT, 20, SERVER, k.src_port));
                }
            }
            let known = known || answer.is_some_and(|k| flows.contains(&k));
            if let (true, Some(k)) = (opens, key) {
                // Its flows may exist now (also when the frame itself was not
                // forwarded, its TTL spent say): this 5-tuple, and the
                // reply's, from the pinhole's target back to the opener.
                let target = if side == Side::External {
                    CLIENT
                } else {
                    SERVER
                };
                flows.insert(k);
                flows.insert(FlowKey::new(
                    k.protocol, target, 5001, k.src_addr, k.src_port,
                ));
            }
            if out.action != XDP_REDIRECT {
                continue;
            }
            redirected += 1;
            assert!(!tagged(&frame), "frame {n}: a tagged frame was redirected");
            if later {
                let first = firsts.get(&datagram(&frame)).unwrap_or_else(|| {
                    panic!("frame {n}: a later fragment redirected before its first: {frame:02x?}")
                });
                assert!(
                    flows.contains(first),
                    "frame {n}: a later fragment redirected without its flow {first:?}"
                );
                assert!(
                    !ip_header_ok(&frame) || ip_header_ok(&out.frame),
                    "frame {n}: a fragment's header checksum: in {frame:02x?} out {:02x?}",
                    out.frame
                );
                later_redirected += 1;
                continue;
            }
            let key = key
                .unwrap_or_else(|| panic!("frame {n}: redirected but unparseable: {frame:02x?}"));
            if is_first_fragment(&frame) {
                firsts.insert(datagram(&frame), key);
            }
            assert!(
                known || opens,
                "frame {n}: {key:?} redirected without a flow or pinhole"
            );
            // The datapath does not verify checksums (routers do not; the
            // receiver drops a corrupted segment): a frame that came in
            // with valid ones leaves with valid ones.
            // (CHECKSUM_PARTIAL is never a fragment's: the sender
            // completes the checksum before it fragments.)
            let unfragmented = frag_field(&frame).is_some_and(|v| v & 0x3fff == 0);
            if check_checksums(&frame).is_ok()
                || (ip_header_ok(&frame) && unfragmented && partial(&frame))
            {
                check_checksums(&out.frame).unwrap_or_else(|e| {
                    panic!("frame {n}: {e}: in {frame:02x?} out {:02x?}", out.frame)
                });
            }
        }
    });
    let counted_after: u64 = Counter::ALL.iter().map(|c| fx.counter(*c)).sum();
    assert_eq!(
        counted_after - counted_before,
        total,
        "every frame is counted under exactly one reason"
    );
    assert!(
        redirected > 1000,
        "only {redirected} frames were forwarded: the test tests little"
    );
    assert!(
        total < 100_000 || later_redirected > 100,
        "only {later_redirected} later fragments were forwarded: the test tests little"
    );
    assert!(
        total < 100_000 || tftp_answers > 20,
        "only {tftp_answers} TFTP answers were let in: the test tests little"
    );
    eprintln!(
        "{total} frames, {redirected} redirected ({later_redirected} later fragments, {tftp_answers} TFTP answers)"
    );
}
