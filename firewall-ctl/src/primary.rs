//! Primary connections of filtered protocols, intercepted transparently.
//!
//! An internal client's connection to an external server's FTP port is
//! terminated here without any client configuration, and the daemon connects
//! to the server from the firewall's external address; the FTP filter sits in
//! between. How the packets get here without netfilter:
//!
//! 1. the TC program `tc_internal` assigns the SYN to our transparent
//!    listener (`bpf_sk_assign`) and marks it, and marks the later segments
//!    of sockets bound to exactly their destination;
//! 2. a policy-routing rule (`ip rule fwmark MARK lookup TABLE`, TABLE
//!    holding `local 0.0.0.0/0 dev lo`) delivers marked packets locally;
//! 3. the accepted socket's local address is the server's: the original
//!    destination, with no table to look it up in.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    process::Command,
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
};

use crate::ftp::{Control, FtpStats, Output, Secondaries};

/// Priority of the policy-routing rule: before the main table (32766).
const RULE_PRIORITY: &str = "9000";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The policy routing that delivers marked segments locally.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalDelivery {
    pub fwmark: u32,
    pub table: u32,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl LocalDelivery {
    /// Installs the route and the rule (replacing any left by a crash).
    pub fn install(&self) -> anyhow::Result<()> {
        let (mark, table) = (format!("{:#x}", self.fwmark), self.table.to_string());
        ip(&[
            "-4",
            "route",
            "replace",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            &table,
        ])?;
        self.remove_rules();
        ip(&[
            "-4",
            "rule",
            "add",
            "fwmark",
            &mark,
            "lookup",
            &table,
            "priority",
            RULE_PRIORITY,
        ])
    }

    fn remove_rules(&self) {
        let (mark, table) = (format!("{:#x}", self.fwmark), self.table.to_string());
        // `ip rule del` removes one match at a time; a few leftovers at most.
        for _ in 0..8 {
            if ip(&["-4", "rule", "del", "fwmark", &mark, "lookup", &table]).is_err() {
                break;
            }
        }
    }

    /// Removes what `install` added; missing pieces are fine.
    pub fn remove(&self) {
        self.remove_rules();
        let _ = ip(&["-4", "route", "flush", "table", &self.table.to_string()]);
    }
}

/// The listener the TC program hands intercepted SYNs to: loopback, any
/// port, transparent (its connections answer from the servers' addresses).
pub fn listener() -> anyhow::Result<(TcpListener, SocketAddrV4)> {
    let s = Socket::new(Domain::IPV4, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    s.set_ip_transparent(true)
        .context("IP_TRANSPARENT on the interception listener (needs CAP_NET_ADMIN)")?;
    s.bind(&SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0).into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    let addr = s
        .local_addr()?
        .as_socket_ipv4()
        .context("the interception listener has no IPv4 address")?;
    Ok((TcpListener::from_std(s.into())?, addr))
}

/// What intercepted connections need.
pub struct Interception {
    pub api: Arc<dyn Secondaries>,
    pub stats: Arc<FtpStats>,
    /// The external address the daemon connects to servers from.
    pub external: Ipv4Addr,
    pub ftp_ports: Vec<u16>,
    /// FTP data connections through the relay (no-kernel-mode).
    pub ftp_user_mode: bool,
}

/// Accepts intercepted connections until the task is aborted.
pub async fn serve(listener: TcpListener, ctx: Arc<Interception>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                log::warn!("interception accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (SocketAddr::V4(client), Ok(SocketAddr::V4(server))) = (peer, stream.local_addr())
        else {
            continue;
        };
        if server.ip().is_loopback() || !ctx.ftp_ports.contains(&server.port()) {
            // Someone dialled the listener itself.
            log::debug!("interception: dropping a direct connection from {client}");
            continue;
        }
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = ftp_control(stream, client, server, &ctx).await {
                log::info!("ftp {client} → {server}: {e:#}");
            }
        });
    }
}

/// Reads what is queued beyond an urgent mark. A read stops at the mark
/// (urgent data read in line), and tokio takes a short read for a drained
/// socket and waits for the next edge, which never comes for bytes already
/// queued: ABOR (urgent data) would wait until the client sent more.
fn read_past_urgent_mark(stream: &TcpStream, buf: &mut [u8]) -> Vec<Vec<u8>> {
    use std::io::Read as _;
    let sock = SockRef::from(stream);
    let mut out = Vec::new();
    // A mark per ABOR: a handful at most.
    for _ in 0..8 {
        match (&*sock).read(buf) {
            Ok(n) if n > 0 => out.push(buf[..n].to_vec()),
            _ => break,
        }
    }
    out
}

/// Writes `data`, the byte at `urgent_at` as TCP urgent data.
async fn send(
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    data: &[u8],
    urgent_at: Option<usize>,
) -> std::io::Result<()> {
    let Some(at) = urgent_at.filter(|i| *i < data.len()) else {
        return w.write_all(data).await;
    };
    w.write_all(&data[..at]).await?;
    loop {
        // MSG_OOB marks the last byte sent as urgent.
        match SockRef::from(w.as_ref()).send_out_of_band(&data[at..=at]) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                w.as_ref().writable().await?;
            }
            Err(e) => return Err(e),
        }
    }
    w.write_all(&data[at + 1..]).await
}

/// Ends a connection with a reset, as an unreachable server would.
fn reset(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

async fn ftp_control(
    client_stream: TcpStream,
    client: SocketAddrV4,
    server: SocketAddrV4,
    ctx: &Interception,
) -> anyhow::Result<()> {
    let mut control = match Control::new(
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
            reset(&client_stream);
            bail!("not filtered: {e}");
        }
    };
    // ABOR comes as urgent data (ftplib sends the whole command so): read it in line.
    SockRef::from(&client_stream).set_out_of_band_inline(true)?;
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ctx.external.into(), 0))?;
    let server_stream =
        match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(server.into())).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                reset(&client_stream);
                bail!("connecting to the server: {e}");
            }
            Err(_) => {
                reset(&client_stream);
                bail!("connecting to the server: no answer in {CONNECT_TIMEOUT:?}");
            }
        };
    log::info!(
        "ftp {client} → {server}: intercepted, connected from {}",
        server_stream.local_addr()?
    );
    for s in [&client_stream, &server_stream] {
        let _ = s.set_nodelay(true);
        let _ = SockRef::from(s).set_keepalive(true);
    }
    let (mut cr, mut cw) = client_stream.into_split();
    let (mut sr, mut sw) = server_stream.into_split();
    let (mut cbuf, mut sbuf) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let (mut client_open, mut server_open) = (true, true);
    while client_open || server_open {
        let mut out = Output::default();
        tokio::select! {
            r = cr.read(&mut cbuf), if client_open => match r {
                Ok(n) if n > 0 => {
                    control.client_data(&cbuf[..n], &mut out);
                    for more in read_past_urgent_mark(cr.as_ref(), &mut cbuf) {
                        control.client_data(&more, &mut out);
                    }
                }
                _ => {
                    client_open = false;
                    let _ = sw.shutdown().await;
                }
            },
            r = sr.read(&mut sbuf), if server_open => match r {
                Ok(n) if n > 0 => control.server_data(&sbuf[..n], &mut out),
                _ => {
                    server_open = false;
                    let _ = cw.shutdown().await;
                }
            },
        }
        // A side that cannot take what is due ends the connection.
        if !out.to_server.is_empty() && send(&mut sw, &out.to_server, out.urgent_at).await.is_err()
        {
            break;
        }
        if !out.to_client.is_empty() && cw.write_all(&out.to_client).await.is_err() {
            break;
        }
    }
    control.finish();
    log::info!("ftp {client} → {server}: control connection ended");
    Ok(())
}
