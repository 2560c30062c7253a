//! Reading the control connection as its receivers read it.
//!
//! What the filter forwards must mean the same to every server and client,
//! whatever their parser, or the filter refuses it: a command it judged
//! harmless must not reach a server as a PORT it never checked. So each line
//! is read into one canonical form, which is judged and then forwarded
//! instead of the bytes as they came:
//!
//! - Telnet commands (RFC 854, which RFC 959 lets servers process anywhere
//!   in a line, as ProFTPD does) are removed; an escaped 0xFF (`IAC IAC`) or
//!   an incomplete command is refused, since servers disagree on it.
//! - A CR or NUL inside a line is refused: some servers end lines there.
//! - Leading blanks are removed (some servers skip them), the line ends in
//!   CR LF.
//! - A line longer than `MAX_LINE` is refused whole and nothing of it is
//!   forwarded (servers cut long lines in different places).
//!
//! Replies are read with their multi-line structure (RFC 959 4.2): a line
//! inside a multi-line reply that starts like a reply of its own is
//! forwarded with a leading space, so that no client mistakes it for one.

/// Longest command or reply line, with its end (vsftpd's own limit).
pub const MAX_LINE: usize = 4096;

const IAC: u8 = 0xff;

/// A piece of a line-oriented stream.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Piece {
    /// A whole line with its terminator.
    Line(Vec<u8>),
    /// A line longer than MAX_LINE ended (its bytes are gone).
    TooLong,
}

/// Splits a stream into lines, however the bytes arrive; a line longer than
/// MAX_LINE is dropped as it comes, not buffered.
#[derive(Default, Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct Lines {
    buf: Vec<u8>,
    /// Inside a line longer than MAX_LINE (dropping it).
    in_long: bool,
}

impl Lines {
    pub(super) fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    pub(super) fn next(&mut self) -> Option<Piece> {
        loop {
            let eol = self.buf.iter().position(|b| *b == b'\n');
            if self.in_long {
                match eol {
                    Some(i) => {
                        self.buf.drain(..=i);
                        self.in_long = false;
                        return Some(Piece::TooLong);
                    }
                    None => {
                        self.buf.clear();
                        return None;
                    }
                }
            }
            return match eol {
                Some(i) if i < MAX_LINE => Some(Piece::Line(self.buf.drain(..=i).collect())),
                Some(_) => {
                    self.in_long = true;
                    continue;
                }
                None if self.buf.len() >= MAX_LINE => {
                    self.in_long = true;
                    continue;
                }
                None => None,
            };
        }
    }

    /// Bytes held for an unfinished line.
    pub(super) fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Between two lines: nothing held, not inside an overlong line.
    pub(super) fn idle(&self) -> bool {
        self.buf.is_empty() && !self.in_long
    }
}

/// The line without its end (LF, or CR LF).
fn body(line: &[u8]) -> &[u8] {
    let b = line.strip_suffix(b"\n").unwrap_or(line);
    b.strip_suffix(b"\r").unwrap_or(b)
}

/// What C's isspace() calls space, but for the line ends (a CR inside a
/// line is refused, LF ends it): servers skip these before a verb.
fn blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | 0x0b | 0x0c)
}

/// A client's command as servers read it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Command {
    /// The verb, upper case (letters only; empty for a line without one).
    pub verb: String,
    /// What follows the verb and one blank.
    pub arg: Vec<u8>,
    /// The canonical line to forward, with CR LF.
    pub text: Vec<u8>,
}

/// Reads a command line (with its end) into its canonical form, or says
/// which reply refuses it.
pub(super) fn command(line: &[u8]) -> Result<Command, &'static str> {
    let raw = body(line);
    let mut out = Vec::with_capacity(raw.len() + 2);
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != IAC {
            out.push(raw[i]);
            i += 1;
            continue;
        }
        i += match raw.get(i + 1) {
            None => return Err("501 Incomplete Telnet command."),
            Some(&IAC) => return Err("501 Byte 0xFF is not accepted in commands."),
            // WILL, WONT, DO, DONT and their option.
            Some(0xfb..=0xfe) if raw.len() > i + 2 => 3,
            Some(0xfb..=0xfe) => return Err("501 Incomplete Telnet command."),
            Some(_) => 2,
        };
    }
    if out.iter().any(|b| *b == b'\r' || *b == 0) {
        return Err("501 Control characters in the command line.");
    }
    let start = out.iter().position(|b| !blank(*b)).unwrap_or(out.len());
    out.drain(..start);
    let end = out
        .iter()
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(out.len());
    let verb = String::from_utf8_lossy(&out[..end]).to_ascii_uppercase();
    let rest = &out[end..];
    let arg = match rest.first() {
        Some(b) if blank(*b) => rest[1..].to_vec(),
        _ => rest.to_vec(),
    };
    out.extend_from_slice(b"\r\n");
    Ok(Command {
        verb,
        arg,
        text: out,
    })
}

/// What a server line is.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Reply {
    /// The last line of a reply: its code and text (without the line end).
    Final(u16, Vec<u8>),
    /// The first line of a multi-line reply (`ddd-`).
    Opens(u16, Vec<u8>),
    /// A line inside a multi-line reply, ready to forward.
    Text(Vec<u8>),
    /// Not a reply line at all (dropped).
    Garbage,
}

/// The reply code of `body` if it starts with three digits and `sep`.
fn code(body: &[u8], sep: u8) -> Option<u16> {
    let c = body.get(..3)?;
    if !c.iter().all(u8::is_ascii_digit) || body.get(3) != Some(&sep) {
        return None;
    }
    Some(c.iter().fold(0, |n, d| n * 10 + (d - b'0') as u16))
}

/// Follows the reply structure of the server's side.
#[derive(Default, Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct Replies {
    /// The code of the multi-line reply in progress.
    open: Option<u16>,
}

impl Replies {
    /// No multi-line reply in progress.
    pub(super) fn idle(&self) -> bool {
        self.open.is_none()
    }

    /// Reads a server line (with its end). Bytes a client could take for a
    /// line end or an escape (CR, NUL, 0xFF) become blanks.
    pub(super) fn read(&mut self, line: &[u8]) -> Reply {
        let text: Vec<u8> = body(line)
            .iter()
            .map(|b| match *b {
                b'\r' | 0 | IAC => b' ',
                b => b,
            })
            .collect();
        match self.open {
            Some(c) if code(&text, b' ') == Some(c) => {
                self.open = None;
                Reply::Final(c, text)
            }
            Some(_) => {
                // A text line that looks like a reply of its own is padded,
                // as RFC 959 asks servers to do.
                if code(&text, b' ').is_some() || code(&text, b'-').is_some() {
                    let mut padded = vec![b' '];
                    padded.extend(text);
                    Reply::Text(padded)
                } else {
                    Reply::Text(text)
                }
            }
            None => {
                if let Some(c) = code(&text, b' ') {
                    Reply::Final(c, text)
                } else if let Some(c) = code(&text, b'-') {
                    self.open = Some(c);
                    Reply::Opens(c, text)
                } else {
                    Reply::Garbage
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(line: &[u8]) -> Result<(String, String, String), &'static str> {
        command(line).map(|c| {
            (
                c.verb,
                String::from_utf8_lossy(&c.arg).into_owned(),
                String::from_utf8_lossy(&c.text).into_owned(),
            )
        })
    }

    #[test]
    fn commands_read_as_servers_read_them() {
        let ok = |line: &[u8], verb: &str, arg: &str, text: &str| {
            assert_eq!(
                cmd(line),
                Ok((verb.to_string(), arg.to_string(), text.to_string())),
                "{}",
                String::from_utf8_lossy(line)
            )
        };
        ok(
            b"PORT 1,2,3,4,5,6\r\n",
            "PORT",
            "1,2,3,4,5,6",
            "PORT 1,2,3,4,5,6\r\n",
        );
        ok(b"port 1\n", "PORT", "1", "port 1\r\n");
        ok(b"  \tPORT 1\r\n", "PORT", "1", "PORT 1\r\n");
        ok(b"PORT\t1\r\n", "PORT", "1", "PORT\t1\r\n");
        ok(b"\x0c\x0bPORT 1\r\n", "PORT", "1", "PORT 1\r\n");
        // Telnet commands anywhere are removed, as ProFTPD removes them.
        ok(b"PO\xff\xf4RT 1\r\n", "PORT", "1", "PORT 1\r\n");
        ok(b"\xff\xf4\xff\xf2ABOR\r\n", "ABOR", "", "ABOR\r\n");
        ok(b"\xff\xfb\x01NOOP\r\n", "NOOP", "", "NOOP\r\n");
        ok(b"\r\n", "", "", "\r\n");
        ok(b"SITE x y\r\n", "SITE", "x y", "SITE x y\r\n");
    }

    #[test]
    fn ambiguous_commands_are_refused() {
        for line in [
            &b"NOOP\rPORT 1,2,3,4,5,6\r\n"[..],
            b"NOOP\0PORT 1,2,3,4,5,6\r\n",
            b"PORT 1,2\xff\xff\r\n",
            b"NOOP \xff\r\n",
            b"NOOP \xff\xfb\r\n",
        ] {
            assert!(cmd(line).is_err(), "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn long_lines_are_dropped_whole_without_being_kept() {
        let mut l = Lines::default();
        l.feed(&vec![b'x'; 3 * MAX_LINE]);
        assert_eq!(l.next(), None);
        assert_eq!(l.pending(), 0, "nothing of it is buffered");
        l.feed(b"yyy\r\nNOOP\r\n");
        assert_eq!(l.next(), Some(Piece::TooLong));
        assert_eq!(l.next(), Some(Piece::Line(b"NOOP\r\n".to_vec())));
        assert_eq!(l.next(), None);
        // Exactly at the limit, with its end: a line.
        let mut exact = vec![b'a'; MAX_LINE - 1];
        exact.push(b'\n');
        l.feed(&exact);
        assert_eq!(l.next(), Some(Piece::Line(exact)));
    }

    #[test]
    fn replies_keep_their_structure() {
        let mut r = Replies::default();
        assert_eq!(r.read(b"220 hi\r\n"), Reply::Final(220, b"220 hi".to_vec()));
        assert_eq!(
            r.read(b"211-Features:\r\n"),
            Reply::Opens(211, b"211-Features:".to_vec())
        );
        assert_eq!(r.read(b" EPSV\r\n"), Reply::Text(b" EPSV".to_vec()));
        // Inside it, a line that looks like a reply is padded.
        assert_eq!(
            r.read(b"227 Entering Passive Mode (1,2,3,4,5,6)\r\n"),
            Reply::Text(b" 227 Entering Passive Mode (1,2,3,4,5,6)".to_vec())
        );
        assert_eq!(
            r.read(b"211 End\r\n"),
            Reply::Final(211, b"211 End".to_vec())
        );
        assert_eq!(r.read(b"  227 x\r\n"), Reply::Garbage);
        // CR and NUL become blanks: no client splits the line there.
        assert_eq!(
            r.read(b"200 ok\r227 x\0\r\n"),
            Reply::Final(200, b"200 ok 227 x ".to_vec())
        );
    }
}
