//! FTP control connections forwarded in place (`[ftp] control =
//! "in-place"`), the daemon's half: a thread reads the segments the
//! datapath hands over (`INPLACE_SEGMENTS`), puts each connection's
//! through its filter (`firewall_core::in_place`), publishes the
//! translation and offers (`INPLACE_ADJUST`), then sends what the filter
//! made of them through a raw socket. A connection is forgotten when its
//! flows are gone (the sweeper removes its map entries with them).
//!
//! Its own thread: the filter's calls into the engine wait for the
//! engine's answer, and nothing else waits on this.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, RawFd},
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use firewall_common::{
    flow::FlowKey,
    inplace::{InPlaceSegment, SegmentHead, DIR_COMMANDS},
};
use firewall_core::{
    in_place::{Connection, Packet, Segment},
    segment::{self, Piece},
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    datapath::{decode_segment, FlowTable, InPlaceMaps, PinPaths},
    flags::ConnFlags,
    ftp::{Control, FtpStats, Secondaries},
};

/// How often the thread looks up from the ring when nothing comes.
const POLL: Duration = Duration::from_millis(100);
/// A connection idle this long is checked for its flows, at most this often.
const IDLE_CHECK: Duration = Duration::from_secs(2);
/// Smallest payload per packet the daemon cuts output into (RFC 1122's
/// default MSS); a segment's own length when larger.
const MSS_MIN: usize = 536;
/// The window announced in an acknowledgment the daemon makes up for the
/// sender (its receiver's own is not known here; an FTP control
/// connection never fills it).
const ACK_WINDOW: u16 = 0xffff;

/// What the thread needs from the daemon.
pub struct Context {
    pub api: Arc<dyn Secondaries>,
    pub stats: Arc<FtpStats>,
    /// Added to every call's flags (no-kernel-mode when so configured).
    pub extra_flags: ConnFlags,
}

/// The running thread; stopped when dropped.
pub struct InPlace {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl InPlace {
    pub fn start(ring: RingBuf<MapData>, pins: &PinPaths, ctx: Context) -> anyhow::Result<Self> {
        let raw = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )
        .context(
            "a raw IPv4 socket for control connections forwarded in place (needs CAP_NET_RAW)",
        )?;
        let reader = Reader {
            ring,
            maps: InPlaceMaps::open(pins)?,
            flows: FlowTable::open(pins)?,
            raw,
            ctx,
            conns: HashMap::new(),
            checked: Instant::now(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ftp-in-place".into())
            .spawn(move || reader.run(&flag))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for InPlace {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Conn {
    c: Connection,
    /// The client's translated endpoint (the server sees this).
    nat: SocketAddrV4,
    /// The commands' first byte: which connection on these flows.
    first: u32,
    last: Instant,
    segments: u64,
}

struct Reader {
    ring: RingBuf<MapData>,
    maps: InPlaceMaps,
    flows: FlowTable,
    raw: Socket,
    ctx: Context,
    conns: HashMap<FlowKey, Conn>,
    checked: Instant,
}

impl Reader {
    fn run(mut self, stop: &AtomicBool) {
        let fd = self.ring.as_raw_fd();
        while !stop.load(Relaxed) {
            wait_readable(fd, POLL);
            loop {
                let seg = match self.ring.next() {
                    Some(item) => decode_segment(&item),
                    None => break,
                };
                match seg {
                    Some(seg) => self.segment(&seg),
                    None => log::warn!("ftp in place: a record of INPLACE_SEGMENTS too short"),
                }
            }
            if self.checked.elapsed() >= IDLE_CHECK {
                self.end_closed();
                self.checked = Instant::now();
            }
        }
        for (_, mut conn) in self.conns.drain() {
            conn.c.finish();
        }
    }

    fn segment(&mut self, seg: &InPlaceSegment) {
        let h = &seg.head;
        let key = h.client;
        let dir = h.dir as usize;
        let hlen = h.tcp_len as usize;
        if dir > 1 || !(20..=seg.tcp.len()).contains(&hlen) {
            log::warn!("ftp in place: a malformed record (direction {dir}, TCP header {hlen})");
            return;
        }
        let state = match self.maps.state(&key) {
            Ok(Some(st)) => st,
            // Gone with its flows.
            Ok(None) => return,
            Err(e) => {
                log::warn!("ftp in place: reading INPLACE: {e:#}");
                return;
            }
        };
        // Which connection on these flows: a client that reused its port
        // opened a new one (the datapath started its state afresh), and
        // segments of the old one still in the ring are for nothing.
        let current = state.dir[DIR_COMMANDS].first;
        if h.conn != current {
            return;
        }
        if self.conns.get(&key).is_some_and(|c| c.first != current) {
            self.forget(&key);
        }
        if !self.conns.contains_key(&key) {
            match self.open(&key, current) {
                Ok(Some(conn)) => {
                    self.conns.insert(key, conn);
                }
                Ok(None) => return,
                Err(e) => {
                    log::warn!("ftp in place {}: not filtered: {e:#}", endpoints(&key));
                    return;
                }
            }
        }
        let kernel_next = state.dir[dir].next;
        let forwarded = state.dir[dir].lines;
        let tcp = &seg.tcp[..hlen];
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
        // Past SEGMENT_DATA_MAX the datapath handed over the start only:
        // the sender sends the rest again, not being acknowledged for it.
        let data = &seg.data[..(h.data_len as usize).min(seg.data.len())];
        let s = Segment {
            dir,
            seq,
            ack,
            fin: tcp[13] & 0x01 != 0 && h.data_len == h.payload_len,
            data,
            diverted: h.diverted,
            acked: (h.acked_set != 0).then_some(h.acked),
            kernel_next,
            mss: (h.payload_len as usize).max(MSS_MIN),
            forwarded: &forwarded,
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.last = Instant::now();
        conn.segments += 1;
        let reaction = match conn.c.segment(&s) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("ftp in place {}: ends: {e}", endpoints(&key));
                self.close(&key);
                return;
            }
        };
        // Published before sending: the receiver's acknowledgments of what
        // is sent must find the translation that numbers it.
        let nat = conn.nat;
        match self.maps.set_adjust(&key, &reaction.adjust) {
            Ok(true) => {}
            // Its flows went meanwhile (the sweeper): nothing to send for it.
            Ok(false) => return self.forget(&key),
            Err(e) => {
                log::warn!(
                    "ftp in place {}: publishing its translation: {e:#}",
                    endpoints(&key)
                );
                return;
            }
        }
        for p in &reaction.packets {
            if let Err(e) = self.send(h, tcp, &key, nat, p) {
                log::debug!("ftp in place {}: a packet not sent: {e:#}", endpoints(&key));
            }
        }
    }

    /// A connection seen for the first time: its filter, from its flows.
    fn open(&mut self, key: &FlowKey, first: u32) -> anyhow::Result<Option<Conn>> {
        let Some(flow) = self.flows.get(key)? else {
            // Its flows went before its last segments were read.
            return Ok(None);
        };
        let client = SocketAddrV4::new(key.src_addr.into(), key.src_port);
        let server = SocketAddrV4::new(key.dst_addr.into(), key.dst_port);
        let external = Ipv4Addr::from(flow.nat_src_addr);
        let control = Control::in_place(
            self.ctx.api.clone(),
            self.ctx.stats.clone(),
            client,
            server,
            external,
            self.ctx.extra_flags,
        )?;
        // A previous daemon's translation, if it rewrote some.
        let published = self.maps.adjust(key)?.unwrap_or_default();
        Ok(Some(Conn {
            c: Connection::new(control, published),
            nat: SocketAddrV4::new(external, flow.nat_src_port),
            first,
            last: Instant::now(),
            segments: 0,
        }))
    }

    fn send(
        &self,
        h: &SegmentHead,
        tcp: &[u8],
        key: &FlowKey,
        nat: SocketAddrV4,
        p: &Packet,
    ) -> anyhow::Result<()> {
        let (pkt, dst) = match p {
            Packet::Data {
                seq,
                ack,
                payload,
                fin,
            } => {
                let piece = Piece {
                    seq: *seq,
                    ack: *ack,
                    payload,
                    fin: *fin,
                };
                (segment::build(h, tcp, &piece)?, h.dst_addr)
            }
            Packet::AckToSender { seq, ack } => {
                // From the receiver as the sender knows it: the server for
                // the client's commands, the client's translation for the
                // server's replies.
                let mut back = *h;
                let (from, to) = if h.dir as usize == DIR_COMMANDS {
                    (
                        SocketAddrV4::new(key.dst_addr.into(), key.dst_port),
                        SocketAddrV4::new(key.src_addr.into(), key.src_port),
                    )
                } else {
                    (nat, SocketAddrV4::new(key.dst_addr.into(), key.dst_port))
                };
                back.src_addr = from.ip().octets();
                back.src_port = from.port();
                back.dst_addr = to.ip().octets();
                back.dst_port = to.port();
                // No options: the sender's timestamps are not the
                // receiver's, and PAWS would drop the segment for them.
                let mut hdr = [0u8; 20];
                hdr[12] = 5 << 4;
                hdr[13] = 0x10;
                hdr[14..16].copy_from_slice(&ACK_WINDOW.to_be_bytes());
                let piece = Piece {
                    seq: *seq,
                    ack: *ack,
                    payload: &[],
                    fin: false,
                };
                (segment::build(&back, &hdr, &piece)?, back.dst_addr)
            }
        };
        let to = SocketAddrV4::new(Ipv4Addr::from(dst), 0);
        self.raw
            .send_to(&pkt, &to.into())
            .with_context(|| format!("sending {} bytes to {}", pkt.len(), to.ip()))?;
        Ok(())
    }

    /// Connections idle for a while whose flows are gone end.
    fn end_closed(&mut self) {
        let idle: Vec<FlowKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.last.elapsed() >= IDLE_CHECK)
            .map(|(k, _)| *k)
            .collect();
        for key in idle {
            match self.flows.get(&key) {
                Ok(Some(_)) => {
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.last = Instant::now();
                    }
                }
                // Its map entries went with the flows (the sweeper).
                Ok(None) => self.forget(&key),
                Err(e) => log::warn!("ftp in place: reading FLOWS: {e:#}"),
            }
        }
    }

    fn close(&mut self, key: &FlowKey) {
        self.forget(key);
        if let Err(e) = self.maps.remove(key) {
            log::warn!("ftp in place: removing its state: {e:#}");
        }
    }

    /// The connection ends here (its map entries stay, for a new one on
    /// the same flows or for the sweeper).
    fn forget(&mut self, key: &FlowKey) {
        if let Some(mut conn) = self.conns.remove(key) {
            conn.c.finish();
            log::info!(
                "ftp in place {}: ended after {} segments through the daemon: {}",
                endpoints(key),
                conn.segments,
                conn.c.control().summary()
            );
        }
    }
}

fn endpoints(key: &FlowKey) -> String {
    format!(
        "{} → {}",
        SocketAddrV4::new(key.src_addr.into(), key.src_port),
        SocketAddrV4::new(key.dst_addr.into(), key.dst_port)
    )
}

/// Waits until `fd` is readable or `timeout` passes.
fn wait_readable(fd: RawFd, timeout: Duration) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
}
