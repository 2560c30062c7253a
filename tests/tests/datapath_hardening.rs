//! The datapath against frames it must not spend anything on.

use firewall_tests::{
    daemon::LabRun,
    ftp::{check, eventually, python},
    lab::{addr, Ns},
    traffic::{client_server, tcp_connects},
};

fn mac(ns: &Ns, dev: &str) -> String {
    ns.sh(&format!(
        "ip -o link show dev {dev} | grep -o 'link/ether [0-9a-f:]*' | cut -d' ' -f2"
    ))
    .unwrap()
    .trim()
    .to_string()
}

/// At tcx ingress a VLAN tag has been taken off into the skb before the
/// program runs (`vlan_present`): such a frame must go to the stack before a
/// single-use pinhole is spent on it.
#[test]
fn a_tagged_first_packet_spends_no_pinhole_at_tc() {
    let r = LabRun::start("vlantc", &["--xdp-mode", "tc"]);
    let s = r.fw.session(addr::CLIENT);
    let b = r.fw.bind_ok(&s, "10.1.0.2:5001", "tcp", &[]);
    let proxy = b["proxy_address"].as_str().unwrap().to_string();
    let port = proxy.rsplit(':').next().unwrap().to_string();
    let (fw_mac, server_mac) = (
        mac(&r.lab.fw, addr::IF_EXTERNAL),
        mac(&r.lab.server, "eth0"),
    );
    // A tagged SYN to the pinhole, written raw (this kernel has no VLAN
    // devices; the stack takes the tag off into the skb all the same).
    let script = format!(
        r#"
import socket, struct
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff
src, dst = socket.inet_aton("{server}"), socket.inet_aton("{fw}")
tcp = struct.pack("!HHIIBBHHH", 20000, {port}, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
c = csum(src + dst + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)
tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0, src, dst)
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
eth = bytes.fromhex("{fw_mac}".replace(":", "")) + bytes.fromhex("{server_mac}".replace(":", ""))
frame = eth + struct.pack("!HH", 0x8100, 5) + struct.pack("!H", 0x0800) + ip + tcp
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
s.send(frame)
print("sent")
"#,
        server = addr::SERVER,
        fw = addr::FW_EXTERNAL,
    );
    let sent = python(&r.lab.server, &script);
    check("a tagged SYN", &sent);
    // A freshly built lab loses its first frames for a moment: send until
    // the firewall has seen tagged ones.
    assert!(eventually(5, || {
        check("a tagged SYN", &python(&r.lab.server, &script));
        r.fw.counter("drop_vlan") >= 3
    }));
    let ph = r.fw.list("pinholes");
    assert_eq!(
        (ph[0]["remaining"].as_u64(), ph[0]["uses"].as_u64()),
        (Some(1), Some(0)),
        "the pinhole is unused"
    );
    // Untagged, the same pinhole works.
    let _client = client_server(&r.lab, firewall_common::IPPROTO_TCP, 5001);
    assert!(tcp_connects(&r.lab.server, &proxy));
}
