//! Many short FTP sessions from one client host: log in, open a data
//! connection (EPSV or PORT), RETR a small file, QUIT. An async client run on
//! a thread inside the client's network namespace, so that the load costs
//! the client little and the systems under test can be compared.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{tcp::OwnedReadHalf, TcpListener, TcpSocket, TcpStream},
};

use crate::{lab::Ns, netns::in_netns};

/// How the data connection is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataMode {
    /// EPSV: the client connects to the port the server names.
    Passive,
    /// PORT: the server connects to the client.
    Active,
}

impl DataMode {
    pub fn name(self) -> &'static str {
        match self {
            DataMode::Passive => "EPSV",
            DataMode::Active => "PORT",
        }
    }
}

/// A load to run.
#[derive(Clone, Debug)]
pub struct Load {
    pub server: SocketAddrV4,
    /// The file to RETR and its size (checked).
    pub file: String,
    pub size: u64,
    pub mode: DataMode,
    /// Sessions at a time.
    pub concurrency: usize,
    /// Stop after this many sessions (started), or
    pub sessions: Option<u64>,
    /// after this long.
    pub duration: Option<Duration>,
    /// Each step's time limit: a session that takes longer has failed.
    pub step_timeout: Duration,
}

/// What a load did.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub completed: u64,
    pub failed: u64,
    pub elapsed: Duration,
    /// The first few failures, with what went wrong.
    pub errors: Vec<String>,
}

impl Outcome {
    pub fn per_second(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `load` from inside `ns` and returns when it is done.
pub fn run(ns: &Ns, load: &Load) -> anyhow::Result<Outcome> {
    let path = ns.path();
    let load = load.clone();
    std::thread::spawn(move || {
        in_netns(&path, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?;
            Ok::<_, anyhow::Error>(rt.block_on(drive(load)))
        })?
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the load thread panicked"))?
}

async fn drive(load: Load) -> Outcome {
    let load = Arc::new(load);
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..load.concurrency.max(1) {
        let (load, next, stop) = (load.clone(), next.clone(), stop.clone());
        let (completed, failed, errors) = (completed.clone(), failed.clone(), errors.clone());
        workers.push(tokio::spawn(async move {
            loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                if load.sessions.is_some_and(|max| n >= max)
                    || load.duration.is_some_and(|d| started.elapsed() >= d)
                {
                    return;
                }
                match session(&load).await {
                    Ok(()) => {
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        let mut errs = errors.lock().unwrap_or_else(|p| p.into_inner());
                        if errs.len() < 10 {
                            errs.push(format!("session {n}: {e:#}"));
                        }
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    stop.store(true, Ordering::Relaxed);
    let errors = errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Outcome {
        completed: completed.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        errors,
    }
}

/// A control connection: replies read line by line.
struct Control {
    read: BufReader<OwnedReadHalf>,
    write: tokio::net::tcp::OwnedWriteHalf,
    local: Ipv4Addr,
    timeout: Duration,
}

impl Control {
    /// The final line of the next reply (multi-line replies: RFC 959 4.2).
    async fn reply(&mut self) -> anyhow::Result<(u16, String)> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = tokio::time::timeout(self.timeout, self.read.read_line(&mut line))
                .await
                .context("no reply in time")??;
            if n == 0 {
                bail!("the control connection closed");
            }
            let b = line.as_bytes();
            if b.len() >= 4 && b[..3].iter().all(u8::is_ascii_digit) && b[3] == b' ' {
                let code = line[..3].parse().expect("three digits");
                return Ok((code, line.trim_end().to_string()));
            }
        }
    }

    /// Sends a command and expects a reply with this code.
    async fn expect(&mut self, cmd: &str, code: u16) -> anyhow::Result<String> {
        self.send(cmd).await?;
        self.want(cmd, code).await
    }

    async fn send(&mut self, cmd: &str) -> anyhow::Result<()> {
        self.write
            .write_all(format!("{cmd}\r\n").as_bytes())
            .await
            .with_context(|| format!("sending {cmd}"))
    }

    async fn want(&mut self, what: &str, code: u16) -> anyhow::Result<String> {
        let (got, line) = self.reply().await.with_context(|| what.to_string())?;
        if got != code {
            bail!("{what}: expected {code}, got {line:?}");
        }
        Ok(line)
    }
}

async fn connect(to: SocketAddrV4, timeout: Duration) -> anyhow::Result<TcpStream> {
    tokio::time::timeout(timeout, TcpSocket::new_v4()?.connect(to.into()))
        .await
        .with_context(|| format!("connecting to {to}: no answer in time"))?
        .with_context(|| format!("connecting to {to}"))
}

async fn session(load: &Load) -> anyhow::Result<()> {
    let t = load.step_timeout;
    let stream = connect(load.server, t).await.context("control")?;
    let local = match stream.local_addr()? {
        SocketAddr::V4(a) => *a.ip(),
        SocketAddr::V6(_) => bail!("an IPv6 control connection"),
    };
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    let mut c = Control {
        read: BufReader::new(read),
        write,
        local,
        timeout: t,
    };
    c.want("banner", 220).await?;
    c.send("USER anonymous").await?;
    match c.reply().await.context("USER")? {
        (230, _) => {}
        (331, _) => {
            c.expect("PASS x@", 230).await?;
        }
        (_, line) => bail!("USER: expected 230 or 331, got {line:?}"),
    }
    c.expect("TYPE I", 200).await?;
    let mut data = match load.mode {
        DataMode::Passive => {
            let line = c.expect("EPSV", 229).await?;
            let port = epsv_port(&line).with_context(|| format!("reading {line:?}"))?;
            let data = connect(SocketAddrV4::new(*load.server.ip(), port), t)
                .await
                .context("data (passive)")?;
            c.expect(&format!("RETR {}", load.file), 150).await?;
            data
        }
        DataMode::Active => {
            let listener = TcpListener::bind(SocketAddrV4::new(c.local, 0)).await?;
            let port = listener.local_addr()?.port();
            let o = c.local.octets();
            let cmd = format!(
                "PORT {},{},{},{},{},{}",
                o[0],
                o[1],
                o[2],
                o[3],
                port >> 8,
                port & 0xff
            );
            c.expect(&cmd, 200).await?;
            c.expect(&format!("RETR {}", load.file), 150).await?;
            let (data, _) = tokio::time::timeout(t, listener.accept())
                .await
                .context("data (active): the server did not connect in time")??;
            data
        }
    };
    let mut got = 0u64;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = tokio::time::timeout(t, data.read(&mut buf))
            .await
            .context("data: stalled")??;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    drop(data);
    if got != load.size {
        bail!("received {got} of {} bytes", load.size);
    }
    c.want("transfer complete", 226).await?;
    c.expect("QUIT", 221).await?;
    Ok(())
}

/// The port of a 229 reply: `229 ... (|||port|)`.
fn epsv_port(line: &str) -> Option<u16> {
    let inner = line.split('(').nth(1)?.split(')').next()?;
    inner.trim_matches('|').parse().ok()
}

/// `sessions` short sessions (4 KiB `small.bin` from the lab's server), at
/// most `concurrency` at a time.
pub fn short_sessions(mode: DataMode, concurrency: usize, sessions: u64) -> Load {
    Load {
        server: SocketAddrV4::new(crate::lab::addr::SERVER.parse().expect("address"), 21),
        file: "small.bin".into(),
        size: 4096,
        mode,
        concurrency,
        sessions: Some(sessions),
        duration: None,
        step_timeout: Duration::from_secs(10),
    }
}

/// A thousand sequential sessions and 640 at concurrency 64, with EPSV and
/// with PORT, through `run`'s firewall: every one succeeds, each control
/// connection is counted, no call fails, no data connection is refused
/// for the quota, and none is left established.
pub fn many_sessions_all_succeed(lab_run: &crate::daemon::LabRun, server: &crate::ftp::FtpServer) {
    use crate::ftp::{eventually, ftp_stat};
    server.random_file("small.bin", 4096).expect("small.bin");
    let mut total = 0;
    for mode in [DataMode::Passive, DataMode::Active] {
        for (concurrency, sessions) in [(1, 1000), (64, 640)] {
            let out = run(
                &lab_run.lab.client,
                &short_sessions(mode, concurrency, sessions),
            )
            .expect("the load");
            assert_eq!(
                (out.completed, out.failed),
                (sessions, 0),
                "{} at concurrency {concurrency}: {:?}",
                mode.name(),
                out.errors
            );
            total += sessions;
        }
    }
    assert_eq!(ftp_stat(lab_run, "control_connections"), total);
    assert_eq!(ftp_stat(lab_run, "failed_calls"), 0);
    assert_eq!(lab_run.fw.counter("drop_client_quota"), 0);
    // Every data connection was counted against the quota only while live:
    // once their teardown is seen, nothing is left established.
    assert!(eventually(5, || lab_run
        .fw
        .list("connections")
        .iter()
        .all(|c| c["state"] == "terminated")));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epsv_ports() {
        assert_eq!(
            epsv_port("229 Entering Extended Passive Mode (|||40001|)"),
            Some(40001)
        );
        assert_eq!(epsv_port("229 nothing"), None);
    }
}
