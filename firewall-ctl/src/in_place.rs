//! FTP control connections forwarded in place (`[ftp] control =
//! "in-place"`), the daemon's half: a thread reads the segments the
//! datapath hands over (`INPLACE_SEGMENTS`), puts each connection's
//! through its filter (`firewall_core::in_place`), publishes the
//! translation and offers (`INPLACE_ADJUST`), then sends what the filter
//! made of them through a raw socket. A connection is forgotten when its
//! flows say it ended (RST, or FIN both ways) or are gone.
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
    flow::{FlowKey, FlowValue},
    inplace::{InPlaceAdjust, InPlaceSegment, SegmentHead, DIR_COMMANDS},
    IPPROTO_TCP,
};
use firewall_core::{
    in_place::{Connection, Packet, Segment},
    segment::{self, Piece},
    sweeper,
};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    api::ApiError,
    datapath::{decode_segment, FlowTable, InPlaceMaps, PinPaths},
    flags::ConnFlags,
    ftp::{Control, ControlState, FtpStats, Secondaries},
};

/// How often the thread looks up from the ring when nothing comes.
const POLL: Duration = Duration::from_millis(100);
/// A connection idle this long is checked for its flows' end, each at most
/// this often.
const IDLE_CHECK: Duration = Duration::from_secs(2);
/// How often the idle connections are looked for.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Smallest payload per packet the daemon cuts output into (RFC 1122's
/// default MSS); a segment's own length when larger.
const MSS_MIN: usize = 536;
/// The window field of an acknowledgment the daemon makes up for a sender
/// before it has seen one of the receiver's own: small, as its scale is
/// not known here (1 KiB unscaled, 128 KiB at Linux's usual scale of 7),
/// and soon replaced by the receiver's next acknowledgment. A large one
/// (0xffff is 64 MiB at a scale of 10) lets the sender send far past what
/// the receiver takes, and its retransmissions of lines the kernel
/// forwarded can stall the direction.
const ACK_WINDOW_UNKNOWN: u16 = 1024;

/// What the thread needs from the daemon.
pub struct Context {
    pub api: Arc<dyn Secondaries>,
    pub stats: Arc<FtpStats>,
    /// Added to every call's flags (no-kernel-mode when so configured).
    pub extra_flags: ConnFlags,
}

/// A connection's filter as a restarting daemon hands it to the next one:
/// its openings not yet used (made again where they were announced) and
/// its role; the next daemon reads on from the translation the datapath
/// has (`firewall_core::in_place`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Handed {
    /// The commands' first byte: which connection on its flows.
    pub first: u32,
    pub state: ControlState,
}

/// The running thread; stopped when dropped (its connections' unused
/// openings withdrawn), or handed over.
pub struct InPlace {
    stop: Arc<AtomicBool>,
    hand_over: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Handed>>>,
}

impl InPlace {
    /// The thread, taking up first the connections a previous daemon
    /// handed over.
    pub fn start(
        ring: RingBuf<MapData>,
        pins: &PinPaths,
        ctx: Context,
        resumed: Vec<Handed>,
    ) -> anyhow::Result<Self> {
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
        let hand_over = Arc::new(AtomicBool::new(false));
        let (flag, handing) = (stop.clone(), hand_over.clone());
        let thread = std::thread::Builder::new()
            .name("ftp-in-place".into())
            .spawn(move || {
                let mut reader = reader;
                reader.resume(resumed);
                reader.run(&flag, &handing)
            })?;
        Ok(Self {
            stop,
            hand_over,
            thread: Some(thread),
        })
    }

    /// Stops the thread and returns its connections' filters for the next
    /// daemon, nothing withdrawn.
    pub fn hand_over(mut self) -> Vec<Handed> {
        self.hand_over.store(true, Relaxed);
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> Vec<Handed> {
        self.stop.store(true, Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for InPlace {
    fn drop(&mut self) {
        self.stop_thread();
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
    /// `ftp`, with its endpoints, as the proxy's (every record about it in).
    span: tracing::Span,
    /// The window field of the last segment seen from each direction's
    /// sender: what it announces for the other direction, in its scale.
    windows: [Option<u16>; 2],
}

impl Conn {
    fn new(
        control: Control,
        published: InPlaceAdjust,
        flow: &FlowValue,
        key: &FlowKey,
        first: u32,
    ) -> Self {
        let client = SocketAddrV4::new(key.src_addr.into(), key.src_port);
        let server = SocketAddrV4::new(key.dst_addr.into(), key.dst_port);
        Self {
            c: Connection::new(control, published),
            nat: SocketAddrV4::new(flow.nat_src_addr.into(), flow.nat_src_port),
            first,
            last: Instant::now(),
            segments: 0,
            span: tracing::info_span!("ftp", %client, %server),
            windows: [None; 2],
        }
    }
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
    /// Takes up the connections a previous daemon handed over (their flows
    /// still there).
    fn resume(&mut self, resumed: Vec<Handed>) {
        let n = resumed.len();
        for h in resumed {
            let (client, server) = (h.state.client, h.state.server);
            let key = FlowKey::new(
                IPPROTO_TCP,
                client.ip().octets(),
                client.port(),
                server.ip().octets(),
                server.port(),
            );
            match self.take_up(&key, h) {
                Ok(Some(conn)) => {
                    self.conns.insert(key, conn);
                }
                Ok(None) => {}
                Err(e) => log::warn!("ftp in place {client} → {server}: not taken over: {e:#}"),
            }
        }
        if n > 0 {
            log::info!(
                "{} of {n} FTP control connections read in place taken over from the previous daemon",
                self.conns.len()
            );
        }
    }

    /// A handed-over connection whose flows are still there: its filter
    /// again, from the translation the datapath has.
    fn take_up(&mut self, key: &FlowKey, h: Handed) -> anyhow::Result<Option<Conn>> {
        let first = h.first;
        self.conn(key, first, |ctx, _| {
            Control::resume(ctx.api.clone(), ctx.stats.clone(), h.state)
        })
    }

    /// The connection on `key`'s flows with the filter `make` gives, from
    /// the translation the datapath has (a previous daemon's, if it
    /// rewrote some); none when its flows are gone.
    fn conn(
        &self,
        key: &FlowKey,
        first: u32,
        make: impl FnOnce(&Context, &FlowValue) -> Result<Control, ApiError>,
    ) -> anyhow::Result<Option<Conn>> {
        let Some(flow) = self.flows.get(key)? else {
            return Ok(None);
        };
        let control = make(&self.ctx, &flow)?;
        let published = self.maps.adjust(key)?.unwrap_or_default();
        Ok(Some(Conn::new(control, published, &flow, key, first)))
    }

    fn run(mut self, stop: &AtomicBool, hand_over: &AtomicBool) -> Vec<Handed> {
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
            if self.checked.elapsed() >= CHECK_EVERY {
                self.end_closed();
                self.checked = Instant::now();
            }
        }
        if hand_over.load(Relaxed) {
            return self
                .conns
                .drain()
                .map(|(_, conn)| Handed {
                    first: conn.first,
                    state: conn.c.into_control().hand_over().between_lines(),
                })
                .collect();
        }
        for (_, mut conn) in self.conns.drain() {
            conn.c.finish();
        }
        Vec::new()
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
        let span = self.conns.get(&key).map(|c| c.span.clone());
        let _in_span = span.as_ref().map(|s| s.enter());
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
        conn.windows[dir] = Some(u16::from_be_bytes([tcp[14], tcp[15]]));
        // The receiver's own window, for an acknowledgment made up in its
        // name.
        let window = conn.windows[1 - dir].unwrap_or(ACK_WINDOW_UNKNOWN);
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
            if let Err(e) = self.send(h, tcp, (&key, nat), window, p) {
                log::debug!("ftp in place {}: a packet not sent: {e:#}", endpoints(&key));
            }
        }
    }

    /// A connection seen for the first time: its filter, from its flows.
    fn open(&mut self, key: &FlowKey, first: u32) -> anyhow::Result<Option<Conn>> {
        // None: its flows went before its last segments were read.
        self.conn(key, first, |ctx, flow| {
            Control::in_place(
                ctx.api.clone(),
                ctx.stats.clone(),
                SocketAddrV4::new(key.src_addr.into(), key.src_port),
                SocketAddrV4::new(key.dst_addr.into(), key.dst_port),
                Ipv4Addr::from(flow.nat_src_addr),
                ctx.extra_flags,
            )
        })
    }

    /// Sends `p` for the segment `h`/`tcp` of the connection `key`
    /// (translated to `nat`); `window`: the receiver's, for an
    /// acknowledgment made up in its name.
    fn send(
        &self,
        h: &SegmentHead,
        tcp: &[u8],
        (key, nat): (&FlowKey, SocketAddrV4),
        window: u16,
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
                hdr[14..16].copy_from_slice(&window.to_be_bytes());
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
            match self.ended(&key) {
                Ok(false) => {
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.last = Instant::now();
                    }
                }
                Ok(true) => self.forget(&key),
                Err(e) => log::warn!("ftp in place: reading FLOWS: {e:#}"),
            }
        }
    }

    /// Whether the connection on `key`'s flows has ended: the flows are
    /// gone (the sweeper took its map entries with them), or RST or FIN
    /// both ways went through — so its unused openings go seconds after
    /// the close, not when the flows are swept. A segment of it handed
    /// over later takes it up again.
    fn ended(&self, key: &FlowKey) -> anyhow::Result<bool> {
        let Some(value) = self.flows.get(key)? else {
            return Ok(true);
        };
        let peer = self.flows.get(&sweeper::reply_key(key, &value))?;
        Ok(sweeper::tcp_ended(&value, peer.as_ref()))
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
            let _in_span = conn.span.clone().entered();
            conn.c.finish();
            log::info!(
                "ftp in place {}: closed after {} segments through the daemon: {}",
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
