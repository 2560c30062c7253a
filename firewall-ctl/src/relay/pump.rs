//! Moving bytes between the two sockets of a relayed TCP connection: spliced
//! in the kernel when no filter looks, through the data filters otherwise.

use super::*;

/// `pump` with a data-filter chain between the sides: every byte passes the
/// filters, which may change, hold or end the stream. `accepted_from` says
/// which side `a` is. Ends with the reason when a filter closed it.
pub async fn pump_filtered(
    a: TcpStream,
    b: TcpStream,
    bytes: Arc<AtomicU64>,
    chain: Chain,
    accepted_from: Direction,
) -> Result<(), String> {
    let other_side = match accepted_from {
        Direction::FromExternal => Direction::FromInternal,
        Direction::FromInternal => Direction::FromExternal,
    };
    let chain = Mutex::new(chain);
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let ab = one_way_filtered(ar, bw, accepted_from, &chain, bytes.clone());
    let ba = one_way_filtered(br, aw, other_side, &chain, bytes);
    tokio::pin!(ab, ba);
    let (first, other) = tokio::select! {
        r = &mut ab => (r, ba),
        r = &mut ba => (r, ab),
    };
    let end = match first {
        Ok(()) => other.await,
        e => e,
    };
    match end {
        Ok(()) => Ok(()),
        Err(Stop::Filter(reason)) => Err(reason),
        Err(Stop::Io(e)) => {
            log::debug!("relay pump ended: {e}");
            Ok(())
        }
    }
}

enum Stop {
    Io(io::Error),
    Filter(String),
}

async fn one_way_filtered(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    dir: Direction,
    chain: &Mutex<Chain>,
    bytes: Arc<AtomicU64>,
) -> Result<(), Stop> {
    let mut buf = vec![0u8; PUMP_BUFFER];
    let lock = || chain.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let (action, eof) = match from.read(&mut buf).await {
            Ok(0) => (lock().end(dir), true),
            Ok(n) => (lock().data(dir, buf[..n].to_vec()), false),
            Err(e) => {
                reset(SockRef::from(to.as_ref()));
                to.forget();
                return Err(Stop::Io(e));
            }
        };
        match action {
            Action::Forward(out) => {
                if let Err(e) = to.write_all(&out).await {
                    reset(SockRef::from(from.as_ref()));
                    reset(SockRef::from(to.as_ref()));
                    to.forget();
                    return Err(Stop::Io(e));
                }
                bytes.fetch_add(out.len() as u64, Ordering::Relaxed);
            }
            Action::Close(reason) => {
                // A filter ends the connection: both sides are reset.
                reset(SockRef::from(from.as_ref()));
                reset(SockRef::from(to.as_ref()));
                to.forget();
                return Err(Stop::Filter(reason));
            }
        }
        if eof {
            let _ = to.shutdown().await;
            return Ok(());
        }
    }
}

/// Moves bytes both ways until both sides are done. A half-close (FIN) is
/// passed on as one; a reset on either side resets the other.
pub async fn pump(a: TcpStream, b: TcpStream, bytes: Arc<AtomicU64>) {
    // Both directions run in this task: cancelling it (Kill) closes both
    // sockets at once.
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let ab = one_way_spliced(ar, bw, bytes.clone());
    let ba = one_way_spliced(br, aw, bytes);
    tokio::pin!(ab, ba);
    let (first, other) = tokio::select! {
        r = &mut ab => (r, ba),
        r = &mut ba => (r, ab),
    };
    log::debug!("relay pump: first direction ended: {first:?}");
    if first.is_ok() {
        let _ = other.await;
    }
    // On an error the other direction is dropped here, unfinished: its
    // socket closes too (with a reset where one was set).
}

/// One direction without copying through user space: splice(2) moves the
/// bytes socket → pipe → socket inside the kernel. Same half-close and reset
/// handling as `one_way`, which it falls back to if no pipe can be made.
async fn one_way_spliced(
    from: OwnedReadHalf,
    to: OwnedWriteHalf,
    bytes: Arc<AtomicU64>,
) -> io::Result<()> {
    let Ok((pipe_out, pipe_in)) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) else {
        return one_way(from, to, bytes).await;
    };
    // A pipe holds 64 KiB by default; asking for more is only an optimisation.
    let _ = fcntl(
        pipe_in.as_raw_fd(),
        FcntlArg::F_SETPIPE_SZ(PUMP_BUFFER as i32),
    );
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let src = from.as_ref();
        let filled = loop {
            if let Err(e) = src.readable().await {
                break Err(e);
            }
            match src.try_io(Interest::READABLE, || {
                splice(src, None, &pipe_in, None, PUMP_BUFFER, flags).map_err(io::Error::from)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => break r,
            }
        };
        let n = match filled {
            Ok(0) => return reading_ended(to, Ok(())).await,
            Ok(n) => n,
            Err(e) => return reading_ended(to, Err(e)).await,
        };
        // The pipe is drained completely before the next fill.
        let mut left = n;
        while left > 0 {
            let dst = to.as_ref();
            let r = match dst.writable().await {
                Ok(()) => dst.try_io(Interest::WRITABLE, || {
                    splice(&pipe_out, None, dst, None, left, flags).map_err(io::Error::from)
                }),
                Err(e) => Err(e),
            };
            match r {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return writing_failed(&from, to, e),
            }
        }
        bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The read side of a direction ended: a FIN is passed on as a half-close
/// (the other side may still send); an error resets the other side.
async fn reading_ended(mut to: OwnedWriteHalf, read: io::Result<()>) -> io::Result<()> {
    match read {
        Ok(()) => {
            let _ = to.shutdown().await;
            Ok(())
        }
        Err(e) => {
            reset(SockRef::from(to.as_ref()));
            // Dropping a write half sends a FIN first; the close must be the reset.
            to.forget();
            Err(e)
        }
    }
}

/// Writing failed: both sockets are reset.
fn writing_failed(from: &OwnedReadHalf, to: OwnedWriteHalf, e: io::Error) -> io::Result<()> {
    reset(SockRef::from(from.as_ref()));
    reset(SockRef::from(to.as_ref()));
    to.forget();
    Err(e)
}

/// One direction, copying through a buffer.
async fn one_way(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    bytes: Arc<AtomicU64>,
) -> io::Result<()> {
    let mut buf = vec![0u8; PUMP_BUFFER];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => return reading_ended(to, Ok(())).await,
            Ok(n) => n,
            Err(e) => return reading_ended(to, Err(e)).await,
        };
        if let Err(e) = to.write_all(&buf[..n]).await {
            return writing_failed(&from, to, e);
        }

        bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap());
        let (a, b) = tokio::join!(l.accept(), c);
        (a.unwrap().0, b.unwrap())
    }

    /// peer <-> [x | pump | y] <-> client
    async fn relayed() -> (TcpStream, TcpStream, Arc<AtomicU64>) {
        let (peer, x) = pair().await;
        let (y, client) = pair().await;
        let bytes = Arc::new(AtomicU64::new(0));
        tokio::spawn(pump(x, y, bytes.clone()));
        (peer, client, bytes)
    }

    #[tokio::test]
    async fn bytes_both_ways_and_half_close() {
        let (mut peer, mut client, bytes) = relayed().await;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let d2 = data.clone();
        let writer = tokio::spawn(async move {
            peer.write_all(&d2).await.unwrap();
            peer.shutdown().await.unwrap(); // half-close
            let mut back = Vec::new();
            peer.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "byte for byte");
        // After the peer's FIN the client can still answer.
        client.write_all(b"after half-close").await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"after half-close");
        assert_eq!(bytes.load(Ordering::Relaxed), data.len() as u64 + 16);
    }

    #[tokio::test]
    async fn a_reset_on_either_side_reaches_the_other() {
        for peer_resets in [true, false] {
            let (peer, client, _) = relayed().await;
            let (resetting, mut other) = if peer_resets {
                (peer, client)
            } else {
                (client, peer)
            };
            reset(SockRef::from(&resetting));
            drop(resetting);
            let mut buf = [0u8; 16];
            let r = other.read(&mut buf).await;
            assert!(
                matches!(r, Err(ref e) if e.kind() == io::ErrorKind::ConnectionReset),
                "peer resets: {peer_resets}: {r:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_slow_reader_holds_the_sender_back() {
        let (mut peer, mut client, bytes) = relayed().await;
        // The client reads nothing: the peer can only get so far ahead
        // (socket buffers plus the pump's bounded buffer), then blocks.
        let sent = Arc::new(AtomicU64::new(0));
        let s2 = sent.clone();
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            loop {
                if peer.write_all(&chunk).await.is_err() {
                    break;
                }
                s2.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stalled = sent.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            sent.load(Ordering::Relaxed),
            stalled,
            "the sender is blocked"
        );
        assert!(
            stalled < 64 * 1024 * 1024,
            "bounded: {stalled} bytes in flight"
        );
        // Reading drains it and nothing is lost.
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        while total < stalled {
            let n = client.read(&mut buf).await.unwrap();
            assert!(buf[..n].iter().all(|b| *b == 7));
            total += n as u64;
        }
        writer.abort();
        assert!(bytes.load(Ordering::Relaxed) >= stalled);
    }
}
