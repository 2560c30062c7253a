//! Real traffic in the lab: echo servers and clients (socat), translated flow
//! pairs installed through the firewall-ctl library, and waiting helpers.

use std::{net::Ipv4Addr, process::Child, thread, time::Duration};

use firewall_common::{
    flow::{FlowKey, FlowValue},
    IPPROTO_TCP, IPPROTO_UDP,
};
use firewall_ctl::datapath::{FlowTable, PinPaths};

use crate::lab::{addr, Lab, Ns};

pub fn ip4(s: &str) -> [u8; 4] {
    s.parse::<Ipv4Addr>().expect("IPv4 address").octets()
}

fn socat_proto(protocol: u8) -> (&'static str, &'static str) {
    match protocol {
        IPPROTO_TCP => ("TCP-LISTEN", "TCP"),
        IPPROTO_UDP => ("UDP-RECVFROM", "UDP"),
        p => panic!("protocol {p}"),
    }
}

/// Waits until something listens on `port` (TCP or UDP) in `ns`.
pub fn wait_listening(ns: &Ns, port: u16) {
    for _ in 0..100 {
        if ns.try_sh(&format!("ss -Hltun | grep -q ':{port} '")) {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on port {port} in {}", ns.name);
}

/// A peer process in the lab; killed and reaped when dropped.
pub struct Peer(Child);

impl Peer {
    pub fn new(child: Child) -> Self {
        Self(child)
    }

    /// Waits for the peer to finish by itself.
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.0.wait()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A one-shot server on `bind:port` that answers with the peer's address and
/// port on one line, then echoes what it receives.
pub fn echo_server(ns: &Ns, protocol: u8, bind: &str, port: u16) -> Peer {
    let (listen, _) = socat_proto(protocol);
    let child = ns
        .spawn(&format!("exec socat -T3 {listen}:{port},bind={bind},reuseaddr SYSTEM:'echo $SOCAT_PEERADDR $SOCAT_PEERPORT; cat'"))
        .expect("echo server");
    wait_listening(ns, port);
    Peer(child)
}

/// Sends `msg` from `from` to `to` and returns what came back.
pub fn send(ns: &Ns, protocol: u8, from: (&str, u16), to: (&str, u16), msg: &str) -> String {
    let (_, connect) = socat_proto(protocol);
    ns.sh(&format!(
        "printf '{msg}\\n' | socat -T2 - {connect}:{}:{},bind={}:{}",
        to.0, to.1, from.0, from.1
    ))
    .unwrap_or_else(|e| panic!("sending {msg:?}: {e:#}"))
}

/// Runs an echo server on the lab's server and sends `msg` to it from the client.
pub fn exchange(lab: &Lab, protocol: u8, client_port: u16, server_port: u16, msg: &str) -> String {
    let mut srv = echo_server(&lab.server, protocol, addr::SERVER, server_port);
    let got = send(
        &lab.client,
        protocol,
        (addr::CLIENT, client_port),
        (addr::SERVER, server_port),
        msg,
    );
    let _ = srv.wait();
    got
}

/// Installs the two flow entries of a connection from `client:cport` to
/// `server:sport` leaving from the firewall's external address and `nat_port`,
/// through the library call the engine uses. Returns (outbound, reply) keys.
pub fn install_snat(
    protocol: u8,
    client: &str,
    cport: u16,
    server: &str,
    sport: u16,
    nat_port: u16,
) -> (FlowKey, FlowKey) {
    let mut flows = FlowTable::open(&PinPaths::default()).expect("flow table");
    let out = FlowKey::new(protocol, ip4(client), cport, ip4(server), sport);
    flows
        .insert(
            &out,
            &FlowValue::forward(ip4(addr::FW_EXTERNAL), nat_port, ip4(server), sport),
        )
        .expect("insert");
    let back = FlowKey::new(
        protocol,
        ip4(server),
        sport,
        ip4(addr::FW_EXTERNAL),
        nat_port,
    );
    flows
        .insert(
            &back,
            &FlowValue::forward(ip4(server), sport, ip4(client), cport),
        )
        .expect("insert");
    (out, back)
}

/// The flow entry for `key`, which must exist.
pub fn flow(key: &FlowKey) -> FlowValue {
    FlowTable::open(&PinPaths::default())
        .expect("flow table")
        .get(key)
        .expect("lookup")
        .expect("flow present")
}

/// Resolves the firewall's neighbours up front: the datapath drops (and
/// counts) packets whose next hop has no ARP entry yet.
pub fn prime_neighbours(lab: &Lab) {
    lab.fw
        .sh(&format!(
            "ping -c1 -W2 {} >/dev/null; ping -c1 -W2 {} >/dev/null",
            addr::SERVER,
            addr::CLIENT
        ))
        .expect("ping from the firewall");
}

/// Whether a TCP connection from `ns` to `to` gets through (1 s to connect).
pub fn tcp_connects(ns: &Ns, to: &str) -> bool {
    ns.try_sh(&format!("socat -T1 /dev/null TCP:{to},connect-timeout=1"))
}

/// Port of an "IP:PORT" string.
pub fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

/// A one-shot server on the client (the target of a BindForClient) that
/// answers with a greeting naming its port and the peer, then echoes.
pub fn client_server(lab: &Lab, protocol: u8, port: u16) -> Peer {
    let (listen, _) = if protocol == IPPROTO_TCP {
        ("TCP-LISTEN", "")
    } else {
        ("UDP-RECVFROM", "")
    };
    let c = lab
        .client
        .spawn(&format!("exec socat -T3 {listen}:{port},bind={},reuseaddr SYSTEM:'echo client-{port} $SOCAT_PEERADDR; cat'", addr::CLIENT))
        .unwrap();
    wait_listening(&lab.client, port);
    Peer::new(c)
}

/// `python3 -m http.server` on `bind`:8000 in `ns`, serving `index.txt`;
/// stopped and its directory removed when dropped.
pub struct HttpServer {
    _peer: Peer,
    dir: std::path::PathBuf,
}

impl HttpServer {
    pub fn start(ns: &Ns, bind: &str, body: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-www", ns.name));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("index.txt"), body).unwrap();
        let peer = Peer::new(
            ns.spawn(&format!(
                "cd {} && exec python3 -m http.server 8000 --bind {bind} >/dev/null 2>&1",
                dir.display()
            ))
            .unwrap(),
        );
        wait_listening(ns, 8000);
        Self { _peer: peer, dir }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `index.txt` of the HTTP server at `host:port`, fetched with curl from `ns`.
pub fn http_get(ns: &Ns, host: &str, port: u16) -> String {
    ns.sh(&format!(
        "curl -sS --max-time 10 http://{host}:{port}/index.txt"
    ))
    .unwrap_or_else(|e| panic!("curl http://{host}:{port}/index.txt: {e:#}"))
}
