//! One control connection: opening it (the filter, the server leg, the
//! kernel's line forwarding) and relaying it through the FTP filter until it
//! ends or is handed over.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use anyhow::bail;
use tokio::{
    io::unix::AsyncFdReadyGuard,
    net::{TcpSocket, TcpStream},
};

use super::{
    kernel_lines::{KernelLines, Side},
    sockets::{out_of_descriptors, reset, shutdown_write, Leg, TOO_MANY},
    Handed, Interception, Live,
};
use crate::ftp::{Control, FtpStats, Output, Secondaries};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Control lines are short: reads go through one buffer of the proxy's
/// thread (a line longer than the filter's limit is refused anyway), so an
/// idle control connection holds no buffer of its own.
const CONTROL_BUFFER: usize = 4096;

thread_local! {
    static SCRATCH: std::cell::RefCell<Box<[u8; CONTROL_BUFFER]>> =
        std::cell::RefCell::new(Box::new([0; CONTROL_BUFFER]));
}

/// `Control::new` or `Control::published`.
type OpenControl = fn(
    Arc<dyn Secondaries>,
    Arc<FtpStats>,
    SocketAddrV4,
    SocketAddrV4,
    Ipv4Addr,
    crate::flags::ConnFlags,
) -> Result<Control, firewall_core::error::ApiError>;

pub(super) async fn ftp_control(
    client_stream: TcpStream,
    client: SocketAddrV4,
    server: SocketAddrV4,
    ctx: &Interception,
    live: Live,
    published: bool,
) -> anyhow::Result<()> {
    let client_side = Leg::new(client_stream.into_std()?, true)?;
    let (open, from) = if published {
        (Control::published as OpenControl, ctx.internal)
    } else {
        (Control::new as OpenControl, ctx.external)
    };
    let control = match open(
        ctx.api.clone(),
        ctx.stats.clone(),
        client,
        server,
        ctx.external,
        if ctx.ftp_user_mode {
            crate::flags::ConnFlags::NO_KERNEL_MODE
        } else {
            crate::flags::ConnFlags::empty()
        },
    ) {
        Ok(c) => c,
        Err(e) => {
            reset(client_side.sock());
            bail!("not filtered: {e}");
        }
    };
    let server_stream = match connect_server(from, server).await {
        Ok(s) => s,
        Err(e) if out_of_descriptors(&e) => {
            log::error!("ftp {client} → {server}: out of file descriptors: refused with 421");
            client_side.try_write(TOO_MANY);
            bail!("connecting to the server: {e}");
        }
        Err(e) => {
            reset(client_side.sock());
            bail!("connecting to the server: {e}");
        }
    };
    log::debug!("ftp {client} → {server}: intercepted");
    let server_side = Leg::new(server_stream.into_std()?, false)?;
    for leg in [&client_side, &server_side] {
        let _ = leg.sock().set_nodelay(true);
        let _ = leg.sock().set_keepalive(true);
    }
    let lines = match &ctx.lines {
        Some(maps) if ctx.kernel_lines => KernelLines::join(
            maps,
            &ctx.stats,
            client_side.0.get_ref(),
            server_side.0.get_ref(),
        ),
        _ => None,
    };
    relay(client_side, server_side, control, live, lines).await;
    Ok(())
}

/// Goes on with a control connection a previous daemon handed over.
pub(super) async fn resume(h: Handed, ctx: &Interception, live: Live) -> anyhow::Result<()> {
    let (client, server) = (h.state.client, h.state.server);
    let client_side = Leg::new(h.client, true)?;
    let server_side = Leg::new(h.server, false)?;
    let control = match Control::resume(ctx.api.clone(), ctx.stats.clone(), h.state) {
        Ok(c) => c,
        Err(e) => {
            reset(client_side.sock());
            bail!("not filtered: {e}");
        }
    };
    let lines = match (h.lines, &ctx.lines) {
        (Some(l), Some(maps)) => Some(KernelLines::resume(maps, &ctx.stats, l, ctx.kernel_lines)),
        (Some(_), None) => bail!("its lines were forwarded in the kernel, whose maps are gone"),
        (None, _) => None,
    };
    log::info!("ftp {client} → {server}: resumed from the previous daemon");
    relay(client_side, server_side, control, live, lines).await;
    Ok(())
}

/// Relays and filters a control connection until it ends or is handed over.
/// With `lines`, the kernel forwards the plain lines of a direction the
/// daemon offered it (`kernel_lines`). The two directions move on their
/// own: what one side does not take yet waits in its `Due` (and the side it
/// comes from is not read meanwhile), while the other direction goes on, so
/// that a client that sends without reading cannot stall the replies it
/// waits for.
async fn relay(
    client_side: Leg,
    server_side: Leg,
    mut control: Control,
    live: Live,
    mut lines: Option<KernelLines>,
) {
    let started = std::time::Instant::now();
    let (client, server) = (control.client(), control.server());
    // One future for the whole connection, not one per read.
    let mut asked = live.0.asked.subscribe();
    let handover = asked.wait_for(|a| *a);
    tokio::pin!(handover);
    let mut handing_over = false;
    let (c, s) = (&client_side, &server_side);
    let (mut client_open, mut server_open) = (true, true);
    let (mut to_client, mut to_server) = (Due::default(), Due::default());
    let mut pause = DUE_PAUSE_MIN;
    let mut outcome = "closed";
    loop {
        if let Some(l) = &lines {
            // A direction goes back to the kernel only once all the daemon
            // made of it is written.
            if client_open && to_server.is_empty() {
                l.offer(Side::Client, c.0.get_ref(), control.at_line_boundary(true));
            }
            if server_open && to_client.is_empty() {
                l.offer(Side::Server, s.0.get_ref(), control.at_line_boundary(false));
            }
        }
        let pending = !to_client.idle() || !to_server.idle();
        if !client_open && !server_open && !pending {
            break;
        }
        let mut out = Output::default();
        tokio::select! {
            ready = c.ready(), if client_open && to_server.is_empty() && to_client.has_room() => {
                let got = read_into(c, ready, |d| control.client_data(d, &mut out));
                after_read(got, &mut lines, Side::Client, &mut client_open, &mut to_server);
            },
            ready = s.ready(), if server_open && to_client.has_room() => {
                let got = read_into(s, ready, |d| control.server_data(d, &mut out));
                after_read(got, &mut lines, Side::Server, &mut server_open, &mut to_client);
            },
            _ = tokio::time::sleep(pause), if pending => {},
            // Only between two reads with nothing left to write: the
            // state is whole. A half-closed connection just ends.
            _ = &mut handover, if client_open && server_open && !pending => {
                handing_over = true;
                break;
            },
            else => break,
        }
        to_server.push(&out.to_server, out.urgent_at);
        to_client.push(&out.to_client, None);
        // A side that cannot take what is due ends the connection. What the
        // kernel forwarded into a socket goes before the daemon's bytes.
        let mut moved = false;
        match write_due(&mut to_server, s, Side::Server, &mut lines) {
            Ok(m) => moved |= m,
            Err(_) => {
                outcome = "the server stopped taking data";
                break;
            }
        }
        match write_due(&mut to_client, c, Side::Client, &mut lines) {
            Ok(m) => moved |= m,
            Err(_) => {
                outcome = "the client stopped taking data";
                break;
            }
        }
        pause = if moved {
            DUE_PAUSE_MIN
        } else {
            (pause * 2).min(DUE_PAUSE_MAX)
        };
    }
    if handing_over {
        log::debug!("ftp {client} → {server}: handed over");
        live.0
            .handed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Handed {
                client: client_side.0.into_inner(),
                server: server_side.0.into_inner(),
                state: control.hand_over(),
                lines: lines.map(KernelLines::hand_over),
            });
        return;
    }
    control.finish();
    let in_kernel = lines.as_ref().map_or(0, KernelLines::lines);
    log::info!(
        "ftp {client} → {server}: {outcome} after {:.1} s; {}; {in_kernel} lines forwarded in the kernel",
        started.elapsed().as_secs_f64(),
        control.summary()
    );
}

/// How long the relay waits before trying again to write what a side did
/// not take (doubling while nothing moves).
const DUE_PAUSE_MIN: Duration = Duration::from_millis(1);
const DUE_PAUSE_MAX: Duration = Duration::from_millis(64);

/// Most bytes held for a side before the relay stops reading what would
/// add to them.
const DUE_MAX: usize = 64 * 1024;

/// Bytes due to one side of a control connection, written as its socket
/// takes them; then its write side is shut, if asked.
#[derive(Default)]
struct Due {
    buf: Vec<u8>,
    /// The byte of `buf` at this index goes as TCP urgent data.
    urgent_at: Option<usize>,
    /// Shut the socket's write side once `buf` is written.
    shut: bool,
}

impl Due {
    fn push(&mut self, data: &[u8], urgent_at: Option<usize>) {
        if let Some(u) = urgent_at.filter(|u| *u < data.len()) {
            // TCP has one urgent mark: the latest.
            self.urgent_at = Some(self.buf.len() + u);
        }
        self.buf.extend_from_slice(data);
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn has_room(&self) -> bool {
        self.buf.len() < DUE_MAX
    }

    /// Nothing to write or shut.
    fn idle(&self) -> bool {
        self.buf.is_empty() && !self.shut
    }
}

/// Writes what `leg` takes of `due` now, after what the kernel forwarded
/// into it; then shuts its write side if asked. Whether anything moved.
fn write_due(
    due: &mut Due,
    leg: &Leg,
    side: Side,
    lines: &mut Option<KernelLines>,
) -> std::io::Result<bool> {
    if due.idle() {
        return Ok(false);
    }
    if let Some(l) = lines.as_mut() {
        if !l.flushed(side, leg.0.get_ref())? {
            return Ok(false);
        }
    }
    let mut moved = 0;
    while moved < due.buf.len() {
        let rest = &due.buf[moved..];
        let n = match due.urgent_at.map(|u| u - moved) {
            Some(0) => {
                if !leg.write_urgent(rest[0])? {
                    break;
                }
                due.urgent_at = None;
                1
            }
            Some(u) => leg.write_some(&rest[..u])?,
            None => leg.write_some(rest)?,
        };
        if n == 0 {
            break;
        }
        moved += n;
    }
    due.buf.drain(..moved);
    if let Some(u) = due.urgent_at.as_mut() {
        *u -= moved;
    }
    if let Some(l) = lines {
        l.wrote(side, moved);
    }
    if due.buf.is_empty() && due.shut {
        shutdown_write(leg.sock());
        due.shut = false;
        return Ok(true);
    }
    Ok(moved > 0)
}

/// Reads what `leg` has once `ready`, into the thread's buffer, and feeds
/// it to the filter: what `Leg::read_ready` says.
fn read_into(
    leg: &Leg,
    ready: std::io::Result<AsyncFdReadyGuard<'_, std::net::TcpStream>>,
    feed: impl FnOnce(&[u8]),
) -> std::io::Result<Option<usize>> {
    ready.and_then(|mut r| {
        SCRATCH.with_borrow_mut(|buf| {
            let got = leg.read_ready(&mut r, &mut buf[..]);
            if let Ok(Some(n)) = got {
                feed(&buf[..n]);
            }
            got
        })
    })
}

/// Counts a read of `side`; at its end (or an error) the side is closed
/// and the other's write side is to be shut once what is due is written.
fn after_read(
    got: std::io::Result<Option<usize>>,
    lines: &mut Option<KernelLines>,
    side: Side,
    open: &mut bool,
    other: &mut Due,
) {
    match got {
        Ok(None) => {}
        Ok(Some(n @ 1..)) => {
            if let Some(l) = lines {
                l.read(side, n);
            }
        }
        _ => {
            *open = false;
            other.shut = true;
        }
    }
}

/// Connects to the server from `from` (the firewall's external address, or
/// its internal one for a published server).
async fn connect_server(from: Ipv4Addr, server: SocketAddrV4) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from.into(), 0))?;
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(server.into())).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer in {CONNECT_TIMEOUT:?}"),
        )),
    }
}
