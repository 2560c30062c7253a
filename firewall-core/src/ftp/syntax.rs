//! The addresses FTP commands and replies carry, in their syntaxes.

use std::net::{Ipv4Addr, SocketAddrV4};

/// "h1,h2,h3,h4,p1,p2" (PORT's argument, and the numbers in a 227 reply).
pub(super) fn parse_host_port(s: &[u8]) -> Option<SocketAddrV4> {
    let text = std::str::from_utf8(s).ok()?;
    let mut n = [0u8; 6];
    let mut parts = text.split(',');
    for v in n.iter_mut() {
        *v = parts.next()?.trim().parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(SocketAddrV4::new(
        Ipv4Addr::new(n[0], n[1], n[2], n[3]),
        u16::from_be_bytes([n[4], n[5]]),
    ))
}

pub(super) fn host_port(a: SocketAddrV4) -> String {
    let o = a.ip().octets();
    let p = a.port().to_be_bytes();
    format!("{},{},{},{},{},{}", o[0], o[1], o[2], o[3], p[0], p[1])
}

/// EPRT's argument: `<d>af<d>address<d>port<d>`.
pub(super) enum Eprt {
    V4(SocketAddrV4),
    /// Another address family (IPv6: 2).
    Family(String),
}

pub(super) fn parse_eprt(s: &[u8]) -> Option<Eprt> {
    let text = std::str::from_utf8(s).ok()?;
    let d = text.chars().next().filter(|c| ('!'..='~').contains(c))?;
    let fields: Vec<&str> = text.split(d).collect();
    // "", af, address, port, ""
    if fields.len() != 5 || !fields[0].is_empty() || !fields[4].is_empty() {
        return None;
    }
    if fields[1] != "1" {
        return Some(Eprt::Family(fields[1].to_string()));
    }
    let ip: Ipv4Addr = fields[2].parse().ok()?;
    let port: u16 = fields[3].parse().ok()?;
    Some(Eprt::V4(SocketAddrV4::new(ip, port)))
}

/// The port of a 229 reply: `(<d><d><d>port<d>)`.
pub(super) fn parse_epsv(line: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(line).ok()?;
    let open = text.find('(')?;
    let inner = &text[open + 1..text[open..].find(')')? + open];
    let d = inner.chars().next()?;
    let fields: Vec<&str> = inner.split(d).collect();
    if fields.len() != 5 || fields[..3].iter().any(|f| !f.is_empty()) || !fields[4].is_empty() {
        return None;
    }
    fields[3].parse().ok()
}

/// The address and port of a 227 reply: the six numbers after the code
/// (in parentheses or not, RFC 1123 4.1.2.6).
pub(super) fn parse_pasv(line: &[u8]) -> Option<SocketAddrV4> {
    let body = line.get(4..)?;
    let start = body.iter().position(u8::is_ascii_digit)?;
    let end = body[start..]
        .iter()
        .position(|b| !(b.is_ascii_digit() || *b == b',' || *b == b' '))
        .map_or(body.len(), |i| start + i);
    parse_host_port(&body[start..end])
}
