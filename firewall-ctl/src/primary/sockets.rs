//! The control connections' sockets: registered for reading only, the
//! client's side with urgent data read in line, reads that stop when
//! drained, writes of what the socket takes now, and a descriptor in
//! reserve for when there are none.

use std::time::Duration;

use socket2::SockRef;
use tokio::{
    io::{
        unix::{AsyncFd, AsyncFdReadyGuard},
        Interest, Ready,
    },
    net::TcpListener,
};

pub(super) fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Told to a client whose control connection the firewall cannot carry.
pub(super) const TOO_MANY: &[u8] =
    b"421 Too many connections through the firewall, try again later.\r\n";

/// A descriptor kept in reserve: out of descriptors, the listener's pending
/// connections could not even be accepted, and their clients would wait for
/// a banner forever. Given up for a moment, it lets each be told 421.
pub(super) struct Spare {
    file: Option<std::fs::File>,
    logged: Option<std::time::Instant>,
}

impl Spare {
    pub(super) fn new() -> Self {
        Self {
            file: std::fs::File::open("/dev/null").ok(),
            logged: None,
        }
    }

    pub(super) async fn refuse(&mut self, listener: &TcpListener) {
        if self
            .logged
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            self.logged = Some(std::time::Instant::now());
            log::error!(
                "out of file descriptors: intercepted FTP connections are refused with 421 (raise the open-files limit, LimitNOFILE)"
            );
        }
        self.file = None;
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.try_write(TOO_MANY);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
        self.file = std::fs::File::open("/dev/null").ok();
    }
}

/// One side of a control connection, registered for reading only: a
/// socket whose lines the kernel forwards gets a write-space wake-up for
/// each of them, which would wake the daemon for nothing. What a full
/// buffer (a peer that stopped reading) does not take is written again
/// after a pause (`Due`). The client's side is registered for urgent data too
/// (EPOLLPRI): ABOR comes as TCP urgent data, read in line, and a read stops
/// at the urgent mark; the kernel's signal says when to read on past it, so
/// no read is spent otherwise to learn that the socket is drained.
pub(super) struct Leg(pub(super) AsyncFd<std::net::TcpStream>);

impl Leg {
    /// The client's side (`urgent`: ABOR read in line) or the server's.
    pub(super) fn new(stream: std::net::TcpStream, urgent: bool) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        let interest = if urgent {
            // ABOR comes as urgent data (ftplib sends the whole command so).
            SockRef::from(&stream).set_out_of_band_inline(true)?;
            Interest::READABLE | Interest::PRIORITY
        } else {
            Interest::READABLE
        };
        // SAFETY: the AsyncFd owns the stream, so its fd stays open and the
        // same for as long as the AsyncFd lives.
        let fd = unsafe { AsyncFd::register_with_interest(stream, interest) };
        Ok(Self(fd.map_err(|e| e.into_parts().1)?))
    }

    /// Waits until there is something to read (or urgent data).
    pub(super) async fn ready(
        &self,
    ) -> std::io::Result<AsyncFdReadyGuard<'_, std::net::TcpStream>> {
        self.0.ready(Interest::READABLE | Interest::PRIORITY).await
    }

    /// Reads what arrived into `buf` once the socket is `ready`: the length
    /// read, 0 at the end of the stream, None when there was nothing after all.
    pub(super) fn read_ready(
        &self,
        ready: &mut AsyncFdReadyGuard<'_, std::net::TcpStream>,
        buf: &mut [u8],
    ) -> std::io::Result<Option<usize>> {
        use std::io::Read as _;
        let urgent = ready.ready().is_priority();
        let mut filled = 0;
        // One read, and more only past an urgent mark (a handful at most).
        for _ in 0..if urgent { 8 } else { 1 } {
            match self.0.get_ref().read(&mut buf[filled..]) {
                Ok(0) if filled == 0 => return Ok(Some(0)),
                Ok(0) => break,
                Ok(n) => {
                    filled += n;
                    if filled == buf.len() {
                        // More may be there: stay ready.
                        return Ok(Some(filled));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        // Short: drained (reads stop at an urgent mark, hence the loop above).
        ready.clear_ready_matching(Ready::READABLE | Ready::PRIORITY);
        Ok((filled > 0).then_some(filled))
    }

    /// Writes what the socket takes of `data` now: 0 when its buffer is
    /// full.
    pub(super) fn write_some(&self, data: &[u8]) -> std::io::Result<usize> {
        use std::io::Write as _;
        match self.0.get_ref().write(data) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            r => r,
        }
    }

    /// Sends `byte` as TCP urgent data (MSG_OOB marks the last byte sent
    /// as urgent): false when the socket's buffer is full.
    pub(super) fn write_urgent(&self, byte: u8) -> std::io::Result<bool> {
        match self.sock().send_out_of_band(&[byte]) {
            Ok(n) => Ok(n == 1),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub(super) fn try_write(&self, data: &[u8]) {
        use std::io::Write as _;
        let _ = self.0.get_ref().write(data);
    }

    pub(super) fn sock(&self) -> SockRef<'_> {
        SockRef::from(self.0.get_ref())
    }
}

/// Ends a connection with a reset, as an unreachable server would.
pub(super) fn reset(sock: SockRef<'_>) {
    let _ = sock.set_linger(Some(Duration::ZERO));
}

pub(super) fn shutdown_write(sock: SockRef<'_>) {
    let _ = sock.shutdown(std::net::Shutdown::Write);
}
