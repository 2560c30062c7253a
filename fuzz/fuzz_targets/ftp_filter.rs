//! The FTP filter, both directions, however the bytes are split. Oracles:
//! no panic; what it holds stays bounded; every PORT/EPRT a server can read
//! in what it forwards (read as different servers read: lines ended by LF or
//! by CR too, Telnet commands removed or not, leading blanks skipped or not)
//! is one the filter wrote, for the client's own address and a port of 1024
//! or more; no LPRT/LPSV reaches the server; every passive reply a client can
//! read in what it forwards is one the filter wrote.
#![no_main]

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
};

use firewall_ctl::{
    api::ApiError,
    engine::{
        BindRequest, BindResult, BoundConnection, RedirectAction, RedirectRequest, RedirectResult,
    },
    flags::ConnFlags,
    ftp::{Control, FtpStats, Output, Secondaries, MAX_LINE},
};
use libfuzzer_sys::fuzz_target;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 2);
const EXT: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);

/// Answers like the engine; remembers what it opened.
#[derive(Default)]
struct Fake {
    binds: Mutex<Vec<SocketAddrV4>>,
    redirects: Mutex<Vec<SocketAddrV4>>,
}

impl Secondaries for Fake {
    fn session(&self, _: Ipv4Addr) -> Result<u64, ApiError> {
        Ok(1)
    }
    fn bind_for_client(&self, req: &BindRequest) -> Result<BindResult, ApiError> {
        let c = req.clients[0];
        assert_eq!(*c.ip(), CLIENT, "a bind for another host than the client");
        assert!(c.port() >= 1024, "a bind for a port below 1024");
        let mut b = self.binds.lock().unwrap();
        let external = SocketAddrV4::new(EXT, 40000 + b.len() as u16);
        b.push(external);
        Ok(BindResult {
            proxy_address: external,
            connections: vec![BoundConnection {
                id: b.len() as u64,
                external,
                client: c,
            }],
        })
    }
    fn redirect_connections_at(
        &self,
        req: &RedirectRequest,
        _: u16,
    ) -> Result<RedirectResult, ApiError> {
        self.redirect_connections(req)
    }
    fn redirect_connections(&self, req: &RedirectRequest) -> Result<RedirectResult, ApiError> {
        assert_eq!(*req.connects[0].ip(), SERVER, "a redirect to another host");
        let mut r = self.redirects.lock().unwrap();
        let internal = SocketAddrV4::new(SERVER, 50000 + r.len() as u16);
        r.push(internal);
        Ok(RedirectResult {
            internal_address: internal,
            actions: vec![RedirectAction {
                id: 1000 + r.len() as u64,
                internal,
                connect: req.connects[0],
            }],
        })
    }
    fn withdraw_unused(&self, _: &[u64]) {}
}

/// Removes Telnet commands as a server that processes them would.
fn strip_telnet(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == 0xff {
            i += match b.get(i + 1) {
                Some(0xff) => {
                    out.push(0xff);
                    2
                }
                Some(0xfb..=0xfe) => 3,
                _ => 2,
            };
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The lines of `b` as different parsers see them.
fn readings(b: &[u8], telnet: bool) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let variants = if telnet {
        vec![b.to_vec(), strip_telnet(b)]
    } else {
        vec![b.to_vec()]
    };
    for v in variants {
        for cr_ends in [false, true] {
            for l in v.split(|c| *c == b'\n' || (cr_ends && *c == b'\r')) {
                out.push(l.to_vec());
            }
        }
    }
    out
}

fn numbers(s: &str) -> Option<SocketAddrV4> {
    let n: Vec<u8> = s
        .split(',')
        .map(|p| p.trim().parse().ok())
        .collect::<Option<_>>()?;
    (n.len() == 6).then(|| {
        SocketAddrV4::new(
            Ipv4Addr::new(n[0], n[1], n[2], n[3]),
            u16::from_be_bytes([n[4], n[5]]),
        )
    })
}

fn check_commands(to_server: &[u8], binds: &[SocketAddrV4]) {
    for line in readings(to_server, true) {
        for trim in [false, true] {
            let text = String::from_utf8_lossy(&line).to_string();
            // Servers skip ASCII blanks only: a Unicode space (U+3000) before
            // a verb makes an unknown command for them.
            let t = if trim {
                text.trim_start_matches([' ', '\t'])
            } else {
                &text
            };
            // The verb: the letters it starts with (servers read at most
            // these, usually up to a blank).
            let verb: String = t
                .chars()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect::<String>()
                .to_ascii_uppercase();
            let arg = t.get(verb.len()..).unwrap_or("").trim();
            if verb == "LPRT" || verb == "LPSV" {
                panic!("{t:?} reached the server");
            }
            if verb == "PORT" {
                let a = numbers(arg.trim_end_matches('\r'))
                    .unwrap_or_else(|| panic!("an unreadable PORT reached the server: {t:?}"));
                assert!(binds.contains(&a), "PORT {a} was not written by the filter");
            }
            if verb == "EPRT" {
                let arg = arg.trim_end_matches('\r');
                let d = arg.chars().next().unwrap_or('|');
                let f: Vec<&str> = arg.split(d).collect();
                let a: Option<SocketAddrV4> = (f.len() == 5)
                    .then(|| format!("{}:{}", f[2], f[3]).parse().ok())
                    .flatten();
                let a = a.unwrap_or_else(|| panic!("an unreadable EPRT reached the server: {t:?}"));
                assert!(binds.contains(&a), "EPRT {a} was not written by the filter");
            }
        }
    }
}

fn check_replies(to_client: &[u8], redirects: &[SocketAddrV4]) {
    for line in readings(to_client, false) {
        let t = String::from_utf8_lossy(&line).to_string();
        let Some(code) = t.get(..3) else { continue };
        if !matches!(code, "227" | "228" | "229")
            || !matches!(t.as_bytes().get(3), Some(b' ' | b'-'))
        {
            continue;
        }
        assert_ne!(code, "228", "a 228 reply reached the client: {t:?}");
        let inner = t.split('(').nth(1).and_then(|r| r.split(')').next());
        let a = match (code, inner) {
            ("227", Some(i)) => numbers(i),
            ("229", Some(i)) => i
                .trim_matches('|')
                .parse()
                .ok()
                .map(|p| SocketAddrV4::new(SERVER, p)),
            _ => None,
        };
        let a = a.unwrap_or_else(|| panic!("a passive reply the filter did not write: {t:?}"));
        assert!(redirects.contains(&a), "passive reply {t:?} names {a}");
    }
}

fuzz_target!(|data: &[u8]| {
    let fake = Arc::new(Fake::default());
    let mut c = Control::new(
        fake.clone(),
        Arc::new(FtpStats::default()),
        SocketAddrV4::new(CLIENT, 40000),
        SocketAddrV4::new(SERVER, 21),
        EXT,
        ConnFlags::empty(),
    )
    .unwrap();
    let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
    let mut rest = data;
    while let Some((&op, tail)) = rest.split_first() {
        let n = ((op >> 1) as usize % 64 + 1).min(tail.len());
        let (chunk, next) = tail.split_at(n);
        rest = next;
        let mut out = Output::default();
        if op & 1 == 0 {
            c.client_data(chunk, &mut out);
        } else {
            c.server_data(chunk, &mut out);
        }
        to_server.extend(out.to_server);
        to_client.extend(out.to_client);
        assert!(
            c.buffered() <= 2 * MAX_LINE,
            "the filter holds {} bytes",
            c.buffered()
        );
    }
    check_commands(&to_server, &fake.binds.lock().unwrap());
    check_replies(&to_client, &fake.redirects.lock().unwrap());
});
