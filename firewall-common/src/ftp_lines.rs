//! FTP control lines forwarded in the kernel.
//!
//! The daemon proxies an FTP control connection with two sockets; most of
//! what crosses it (USER, PASS, TYPE, RETR, their replies) the FTP filter
//! forwards byte for byte and forgets. A stream verdict program on both
//! sockets forwards such a line from one socket to the other without waking
//! the daemon, when the segment is exactly that one line; anything else (an
//! address-bearing command or reply, a partial or multi-line segment) goes
//! to the daemon, and that direction stays with the daemon until it says the
//! filter is back at a line boundary with everything read.
//!
//! The hand-offs keep the byte order of each direction:
//! - the verdict is the only writer of `kernel`, `passed`, `redirected` and
//!   `budget`, and runs for one socket at a time;
//! - the daemon offers the direction back by writing `resume = passed + 1`
//!   for the `passed` it has read all of; the verdict takes the offer only
//!   while `passed` is still that (a segment given to the daemon since then
//!   makes `passed` larger, and every hand-over to the daemon does);
//! - before the daemon writes to a socket, the bytes the verdict redirected
//!   into it must have reached its send queue (the daemon compares the
//!   socket's queued total with its own writes plus the peer's
//!   `redirected`).

/// Longest line the kernel forwards, with its CR LF (longer ones go to the
/// daemon).
pub const KERNEL_LINE_MAX: usize = 128;

/// Lines the kernel forwards in a row before the daemon looks at the
/// direction again (and at the peer's send queue): what a peer that stops
/// reading can leave queued in the kernel is bounded by this.
pub const KERNEL_LINE_BUDGET: u32 = 64;

/// Sockets in kernel forwarding at most (two per control connection).
pub const LINE_SLOT_COUNT: u32 = 16_384;

/// `LineState::role`: the socket's bytes are the client's commands.
pub const ROLE_COMMANDS: u32 = 0;
/// `LineState::role`: the socket's bytes are the server's replies.
pub const ROLE_REPLIES: u32 = 1;

/// Value of `LINE_STATE` (an mmap-able array, one slot per socket): one
/// direction of a proxied control connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LineState {
    /// 1 while the kernel forwards this socket's plain lines to `peer`.
    pub kernel: u32,
    /// Lines the kernel may still forward before the daemon's turn.
    pub budget: u32,
    /// Bytes given to the daemon, in all.
    pub passed: u64,
    /// Bytes forwarded to the peer socket in the kernel, in all.
    pub redirected: u64,
    /// The daemon's offer to hand the direction back: `passed + 1`.
    pub resume: u64,
    /// Lines forwarded in the kernel, in all.
    pub lines: u64,
    /// Slot of the other socket of the connection (`LINE_SOCKS`).
    pub peer: u32,
    /// `ROLE_COMMANDS` or `ROLE_REPLIES`.
    pub role: u32,
}

/// Whether `seg` ends in CR LF after a body of printable ASCII, at most
/// KERNEL_LINE_MAX bytes in all. (Written with `get`: no bounds check that
/// could panic, for the verifier. Not inlined: in BPF its loop ends after
/// any number of bytes, and only the answer returns, so the verifier goes on
/// from one state instead of one per length.)
#[inline(never)]
fn printable_line(seg: &[u8]) -> bool {
    let n = seg.len();
    if !(3..=KERNEL_LINE_MAX).contains(&n) {
        return false;
    }
    if seg.get(n - 2) != Some(&b'\r') || seg.get(n - 1) != Some(&b'\n') {
        return false;
    }
    let mut i = 0;
    while i < KERNEL_LINE_MAX && i + 2 < n {
        match seg.get(i) {
            Some(b) if (0x20..=0x7e).contains(b) => {}
            _ => return false,
        }
        i += 1;
    }
    true
}

/// Whether the segment `seg` is exactly one command line that the FTP
/// filter forwards byte for byte without acting on it: printable ASCII
/// starting with the verb's first letter, ending in CR LF, whose verb is
/// none the filter checks or rewrites.
#[inline(always)]
pub fn plain_command(seg: &[u8]) -> bool {
    printable_line(seg) && plain_verb(seg)
}

/// Whether the command in `seg` starts with a verb the filter does not
/// act on: one letter at least, and not exactly the four letters of PORT,
/// EPRT, LPRT, LPSV or ABOR in any case. (Early returns and no values
/// chosen by comparison: in BPF each such choice would double the states
/// the verifier follows. Not inlined, as `printable_line`.)
#[inline(never)]
fn plain_verb(seg: &[u8]) -> bool {
    let letter = |b: Option<&u8>| matches!(b, Some(c) if (c | 0x20).wrapping_sub(b'a') < 26);
    if !letter(seg.first()) {
        return false;
    }
    if !letter(seg.get(1)) || !letter(seg.get(2)) || !letter(seg.get(3)) || letter(seg.get(4)) {
        // Shorter or longer than four letters: none of them.
        return true;
    }
    let (Some(a), Some(b), Some(c), Some(d)) = (seg.first(), seg.get(1), seg.get(2), seg.get(3))
    else {
        return true;
    };
    // Upper case (all four are letters).
    let verb = u32::from_be_bytes([a & !0x20, b & !0x20, c & !0x20, d & !0x20]);
    !(verb == u32::from_be_bytes(*b"PORT")
        || verb == u32::from_be_bytes(*b"EPRT")
        || verb == u32::from_be_bytes(*b"LPRT")
        || verb == u32::from_be_bytes(*b"LPSV")
        || verb == u32::from_be_bytes(*b"ABOR"))
}

/// Whether the segment `seg` is exactly one reply line that the FTP filter
/// forwards byte for byte without acting on it, when no multi-line reply is
/// open: `ddd text` in printable ASCII ending in CR LF, other than the
/// passive-mode replies (227, 228, 229) the filter reads.
#[inline(always)]
pub fn plain_reply(seg: &[u8]) -> bool {
    if seg.len() < 6 || !printable_line(seg) {
        return false;
    }
    let (Some(a), Some(b), Some(c), Some(sep)) = (seg.first(), seg.get(1), seg.get(2), seg.get(3))
    else {
        return false;
    };
    let digits = a.is_ascii_digit() && b.is_ascii_digit() && c.is_ascii_digit();
    let passive = *a == b'2' && *b == b'2' && matches!(c, b'7'..=b'9');
    digits && *sep == b' ' && !passive
}

/// Whether a segment of a socket of `role` is a line the kernel forwards.
#[inline(always)]
pub fn plain(role: u32, seg: &[u8]) -> bool {
    if role == ROLE_COMMANDS {
        plain_command(seg)
    } else {
        plain_reply(seg)
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), only integers, no padding (checked in layout_tests).
    unsafe impl aya::Pod for super::LineState {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts that `plain` says `want` of `seg`.
    fn judged(plain: fn(&[u8]) -> bool, seg: &[u8], want: bool) {
        assert_eq!(
            plain(seg),
            want,
            "{}",
            core::str::from_utf8(seg).unwrap_or("?")
        );
    }

    #[test]
    fn plain_commands() {
        for ok in [
            &b"USER anonymous\r\n"[..],
            b"PASS x@y\r\n",
            b"TYPE I\r\n",
            b"EPSV\r\n",
            b"PASV\r\n",
            b"RETR /a b/c.txt\r\n",
            b"QUIT\r\n",
            b"quit\r\n",
            b"PORTS 1\r\n",
            b"POR 1,2,3,4,5,6\r\n",
            b"X\r\n",
        ] {
            judged(plain_command, ok, true);
        }
        for no in [
            &b"PORT 1,2,3,4,5,6\r\n"[..],
            b"port 1,2,3,4,5,6\r\n",
            b"Eprt |1|1.2.3.4|5|\r\n",
            b"LPRT x\r\n",
            b"LPSV\r\n",
            b"ABOR\r\n",
            b"PORT1,2,3,4,5,6\r\n",
            b" USER x\r\n",
            b"\tUSER x\r\n",
            b"1USER\r\n",
            b"USER x\n",
            b"USER x\r\nPASS y\r\n",
            b"USER x\rPORT 1\r\n",
            b"USER \xff\xf4x\r\n",
            b"USER \0x\r\n",
            b"USER\tx\r\n",
            b"USER x",
            b"\r\n",
            b"",
        ] {
            judged(plain_command, no, false);
        }
        let mut long = [b'A'; KERNEL_LINE_MAX + 1];
        long[KERNEL_LINE_MAX - 1] = b'\r';
        long[KERNEL_LINE_MAX] = b'\n';
        assert!(!plain_command(&long));
        assert!(plain_command(&long[1..]));
    }

    #[test]
    fn plain_replies() {
        for ok in [
            &b"220 (vsFTPd 3.0.3)\r\n"[..],
            b"331 Please specify the password.\r\n",
            b"230 Login successful.\r\n",
            b"200 Switching to Binary mode.\r\n",
            b"150 Opening BINARY mode data connection for f (4096 bytes).\r\n",
            b"226 Transfer complete.\r\n",
            b"221 Goodbye.\r\n",
            b"226 \r\n",
            b"230 \r\n",
        ] {
            judged(plain_reply, ok, true);
        }
        for no in [
            &b"227 Entering Passive Mode (10,2,0,2,4,1).\r\n"[..],
            b"228 x\r\n",
            b"229 Entering Extended Passive Mode (|||1025|)\r\n",
            b"211-Features:\r\n",
            b"211 End\r\n211 End\r\n",
            b" 211 x\r\n",
            b"21 x\r\n",
            b"2a1 x\r\n",
            b"200 ok\n",
            b"200 ok\r227 (1,2,3,4,5,6)\r\n",
            b"200 \xff\r\n",
            b"200 \0\r\n",
            b"200\r\n",
        ] {
            judged(plain_reply, no, false);
        }
    }
}
