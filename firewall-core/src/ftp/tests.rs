use std::sync::Mutex;

use super::*;
use crate::{
    engine::{BoundConnection, RedirectAction},
    error::ErrorKind,
    policy::Transport,
};

pub(crate) const CLIENT: &str = "10.1.0.2:40000";
pub(crate) const SERVER: &str = "10.2.0.2:21";
pub(crate) const EXT: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);
pub(super) const INT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);

/// Records the calls; answers like the engine would.
#[derive(Default)]
pub(crate) struct Fake {
    pub(super) sessions: Mutex<Vec<Ipv4Addr>>,
    pub(crate) binds: Mutex<Vec<BindRequest>>,
    pub(crate) redirects: Mutex<Vec<RedirectRequest>>,
    /// The internal ports asked of `redirect_connections_at`.
    redirects_at: Mutex<Vec<u16>>,
    pub(crate) withdrawn: Mutex<Vec<u64>>,
    pub(crate) fail: Mutex<bool>,
}

impl Secondaries for Fake {
    fn session(&self, client: Ipv4Addr) -> Result<u64, ApiError> {
        self.sessions.lock().unwrap().push(client);
        Ok(7)
    }
    fn bind_for_client(&self, req: &BindRequest) -> Result<BindResult, ApiError> {
        if *self.fail.lock().unwrap() {
            return Err(ApiError::new(ErrorKind::Exhausted, "no free port"));
        }
        let mut binds = self.binds.lock().unwrap();
        binds.push(req.clone());
        let external = match req.proxy {
            Some(p) if p.port() != 0 => p,
            _ => SocketAddrV4::new(EXT, 40000 + binds.len() as u16),
        };
        Ok(BindResult {
            proxy_address: external,
            connections: vec![BoundConnection {
                id: 100 + binds.len() as u64,
                external,
                client: req.clients[0],
            }],
        })
    }
    fn redirect_connections(&self, req: &RedirectRequest) -> Result<RedirectResult, ApiError> {
        let port = 50001 + self.redirects.lock().unwrap().len() as u16;
        self.redirect_at(req, port)
    }
    fn redirect_connections_at(
        &self,
        req: &RedirectRequest,
        internal_port: u16,
    ) -> Result<RedirectResult, ApiError> {
        self.redirects_at.lock().unwrap().push(internal_port);
        self.redirect_at(req, internal_port)
    }
    fn withdraw_unused(&self, ids: &[u64]) {
        self.withdrawn.lock().unwrap().extend_from_slice(ids);
    }
}

impl Fake {
    fn redirect_at(&self, req: &RedirectRequest, port: u16) -> Result<RedirectResult, ApiError> {
        if *self.fail.lock().unwrap() {
            return Err(ApiError::new(ErrorKind::Exhausted, "no free port"));
        }
        let mut redirects = self.redirects.lock().unwrap();
        redirects.push(req.clone());
        let internal = SocketAddrV4::new(req.internal.unwrap_or(INT), port);
        Ok(RedirectResult {
            internal_address: internal,
            actions: vec![RedirectAction {
                id: 200 + redirects.len() as u64,
                internal,
                connect: req.connects[0],
            }],
        })
    }
}

pub(super) fn control() -> (Control, Arc<Fake>, Arc<FtpStats>) {
    let fake = Arc::new(Fake::default());
    let stats = Arc::new(FtpStats::default());
    let c = Control::new(
        fake.clone(),
        stats.clone(),
        CLIENT.parse().unwrap(),
        SERVER.parse().unwrap(),
        EXT,
        ConnFlags::empty(),
    )
    .unwrap();
    (c, fake, stats)
}

pub(super) fn from_client(c: &mut Control, data: &[u8]) -> Output {
    let mut out = Output::default();
    c.client_data(data, &mut out);
    out
}

pub(super) fn from_server(c: &mut Control, data: &[u8]) -> Output {
    let mut out = Output::default();
    c.server_data(data, &mut out);
    out
}

pub(super) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn port_opens_a_bind_for_the_client_and_is_rewritten() {
    let (mut c, fake, stats) = control();
    let out = from_client(&mut c, b"PORT 10,1,0,2,19,137\r\n");
    assert_eq!(text(&out.to_server), "PORT 10,2,0,1,156,65\r\n");
    assert!(out.to_client.is_empty());
    let req = &fake.binds.lock().unwrap()[0];
    assert_eq!(req.clients, vec!["10.1.0.2:5001".parse().unwrap()]);
    assert_eq!(req.proxy, Some(SocketAddrV4::new(EXT, 0)));
    assert_eq!(req.flags, ConnFlags::TIMEOUT);
    assert_eq!(req.protocol, Transport::Tcp);
    assert_eq!(req.protocol_name, "ftp");
    let filter = req.ip_filter.as_ref().unwrap();
    assert!(filter.allows("10.2.0.2".parse().unwrap()));
    assert!(!filter.allows("10.2.0.3".parse().unwrap()));
    assert_eq!(stats.view().active_opened, 1);
}

#[test]
fn eprt_is_rewritten_in_its_own_syntax() {
    let (mut c, fake, _) = control();
    let out = from_client(&mut c, b"eprt !1!10.1.0.2!6000!\r\n");
    assert_eq!(text(&out.to_server), "EPRT |1|10.2.0.1|40001|\r\n");
    assert_eq!(fake.binds.lock().unwrap()[0].clients[0].port(), 6000);
}

#[test]
fn bounces_are_answered_locally_and_never_forwarded() {
    let cases: &[(&[u8], &str)] = &[
        (b"PORT 10,1,0,9,0,25\r\n", "500 Illegal PORT command"),
        (b"PORT 198,51,100,99,0,25\r\n", "500 Illegal PORT command"),
        (b"EPRT |1|10.1.0.9|2500|\r\n", "500 Illegal EPRT command"),
        (b"PORT 10,1,0,2,0,25\r\n", "below 1024"),
        (b"PORT 10,1,0,2,0,0\r\n", "port 0 is below 1024"),
        (b"EPRT |1|10.1.0.2|80|\r\n", "port 80 is below 1024"),
        (b"PORT 10,1,0,2,19\r\n", "501 Syntax error in PORT"),
        (b"PORT 10,1,0,256,19,137\r\n", "501"),
        (b"PORT\r\n", "501"),
        (b"EPRT |1|10.1.0.2|\r\n", "501 Syntax error in EPRT"),
        (b"EPRT |2|::1|5000|\r\n", "522"),
    ];
    for (cmd, want) in cases {
        let (mut c, fake, stats) = control();
        let out = from_client(&mut c, cmd);
        assert!(out.to_server.is_empty(), "{}", text(cmd));
        let reply = text(&out.to_client);
        assert!(
            reply.contains(want) && reply.ends_with("\r\n"),
            "{}: {reply}",
            text(cmd)
        );
        assert!(reply.starts_with('5'), "{reply}");
        assert!(fake.binds.lock().unwrap().is_empty());
        let v = stats.view();
        assert_eq!(v.bounces_refused + v.commands_refused, 1, "{}", text(cmd));
    }
    let (mut c, _, stats) = control();
    from_client(&mut c, b"PORT 10,1,0,9,0,25\r\n");
    assert_eq!(stats.view().bounces_refused, 1);
}

#[test]
fn passive_replies_are_redirected_through_the_firewall() {
    let (mut c, fake, stats) = control();
    let out = from_server(&mut c, b"227 Entering Passive Mode (10,2,0,2,156,64).\r\n");
    assert_eq!(
        text(&out.to_client),
        "227 Entering Passive Mode (10,2,0,2,195,81).\r\n"
    );
    let req = fake.redirects.lock().unwrap()[0].clone();
    assert_eq!(req.connects, vec!["10.2.0.2:40000".parse().unwrap()]);
    assert_eq!(req.proxy_external, Some(SocketAddrV4::new(EXT, 0)));
    assert_eq!(req.internal, Some("10.2.0.2".parse().unwrap()));
    assert_eq!(req.flags, ConnFlags::TIMEOUT);
    // Without parentheses (RFC 1123 asks clients to scan for the numbers).
    let out = from_server(&mut c, b"227 =10,2,0,2,4,1\r\n");
    assert!(text(&out.to_client).contains("(10,2,0,2,195,82)"));
    assert_eq!(stats.view().passive_opened, 2);
}

#[test]
fn epsv_is_answered_at_the_servers_address() {
    let (mut c, fake, _) = control();
    let out = from_server(
        &mut c,
        b"229 Entering Extended Passive Mode (|||40000|)\r\n",
    );
    assert_eq!(
        text(&out.to_client),
        "229 Entering Extended Passive Mode (|||50001|)\r\n"
    );
    let req = fake.redirects.lock().unwrap()[0].clone();
    assert_eq!(req.internal, Some("10.2.0.2".parse().unwrap()));
    assert_eq!(req.connects, vec!["10.2.0.2:40000".parse().unwrap()]);
}

#[test]
fn a_passive_reply_naming_a_third_host_is_refused() {
    for reply in [
        &b"227 Entering Passive Mode (10,1,0,9,0,25).\r\n"[..],
        b"227 Entering Passive Mode (198,51,100,99,156,64).\r\n",
        b"227 nonsense\r\n",
        b"229 Entering Extended Passive Mode (|1|10.2.0.2|40000|)\r\n",
        b"229 Entering Extended Passive Mode (|||0|)\r\n",
    ] {
        let (mut c, fake, stats) = control();
        let out = from_server(&mut c, reply);
        let got = text(&out.to_client);
        assert!(
            got.starts_with("500 Firewall refused"),
            "{}: {got}",
            text(reply)
        );
        assert!(fake.redirects.lock().unwrap().is_empty());
        let v = stats.view();
        assert_eq!(v.bounces_refused + v.commands_refused, 1);
    }
}

#[test]
fn lines_are_found_however_tcp_splits_them() {
    let stream = b"USER anonymous\r\nPASS x@\r\nTYPE I\r\nPORT 10,1,0,2,19,137\r\nRETR f\r\n";
    let want = "USER anonymous\r\nPASS x@\r\nTYPE I\r\nPORT 10,2,0,1,156,65\r\nRETR f\r\n";
    // One byte at a time, all at once, and in odd pieces.
    for size in [1, 3, 7, stream.len()] {
        let (mut c, _, _) = control();
        let mut to_server = Vec::new();
        for piece in stream.chunks(size) {
            to_server.extend(from_client(&mut c, piece).to_server);
        }
        assert_eq!(text(&to_server), want, "pieces of {size}");
    }
    let replies = b"150 Here comes\r\n226 Done\r\n227 Entering Passive Mode (10,2,0,2,156,64)\r\n";
    let (mut c, _, _) = control();
    let mut to_client = Vec::new();
    for piece in replies.chunks(5) {
        to_client.extend(from_server(&mut c, piece).to_client);
    }
    assert_eq!(
        text(&to_client),
        "150 Here comes\r\n226 Done\r\n227 Entering Passive Mode (10,2,0,2,195,81).\r\n"
    );
}

#[test]
fn commands_go_on_in_canonical_form() {
    let (mut c, fake, _) = control();
    let stream: &[u8] =
        b"XYZZY plugh\r\nREST 1000\r\n\xff\xf4\xff\xf2ABOR\r\nNOOP\n\r\n\xff\xfb\x01SITE x\r\n  CWD a\r\n";
    let out = from_client(&mut c, stream);
    assert_eq!(
        text(&out.to_server),
        "XYZZY plugh\r\nREST 1000\r\nABOR\r\nNOOP\r\n\r\nSITE x\r\nCWD a\r\n"
    );
    assert!(out.to_client.is_empty());
    assert!(fake.binds.lock().unwrap().is_empty());
    // A PORT behind Telnet commands is still a PORT.
    let out = from_client(&mut c, b"\xff\xf4PORT 10,1,0,2,19,137\r\n");
    assert_eq!(text(&out.to_server), "PORT 10,2,0,1,156,65\r\n");
    // Multi-line replies pass; a line in one that looks like a reply of its
    // own is padded, so that no client takes it for one.
    let replies: &[u8] = b"211-Features:\r\n EPSV\r\n227-not final\r\n211 End\r\n";
    assert_eq!(
        text(&from_server(&mut c, replies).to_client),
        "211-Features:\r\n EPSV\r\n 227-not final\r\n211 End\r\n"
    );
}

#[test]
fn disguised_commands_are_read_as_servers_read_them() {
    // Each is a PORT to a server that removes Telnet commands or blanks, or
    // ends lines at CR: checked as one, or refused when ambiguous.
    let cases: &[(&[u8], &str)] = &[
        (
            b"PO\xff\xf4RT 10,1,0,9,0,25\r\n",
            "500 Illegal PORT command",
        ),
        (
            b"PORT\xff\xf2 10,1,0,9,0,25\r\n",
            "500 Illegal PORT command",
        ),
        (b"  PORT 10,1,0,9,0,25\r\n", "500 Illegal PORT command"),
        (b"\tEPRT |1|10.1.0.9|2500|\r\n", "500 Illegal EPRT command"),
        (b"NOOP\rPORT 10,1,0,9,0,25\r\n", "501 Control characters"),
        (b"NOOP\0PORT 10,1,0,9,0,25\r\n", "501 Control characters"),
        (b"PORT 10,1,0,9,0,25\xff\xff\r\n", "501 Byte 0xFF"),
        (b"PORT 10,1,0,9,0,25 \xff\r\n", "501 Incomplete Telnet"),
        (b"LPRT 4,4,10,1,0,9,2,0,25\r\n", "502 LPRT is not supported"),
        (b"LPSV\r\n", "502 LPSV is not supported"),
    ];
    for (cmd, want) in cases {
        let (mut c, fake, _) = control();
        let out = from_client(&mut c, cmd);
        assert!(out.to_server.is_empty(), "{:?} was forwarded", text(cmd));
        let reply = text(&out.to_client);
        assert!(reply.starts_with(want), "{:?}: {reply}", text(cmd));
        assert!(fake.binds.lock().unwrap().is_empty());
    }
    // The same PORT, for the client itself, is rewritten.
    let (mut c, _, _) = control();
    let out = from_client(&mut c, b"  po\xff\xf1rt 10,1,0,2,19,137\r\n");
    assert_eq!(text(&out.to_server), "PORT 10,2,0,1,156,65\r\n");
}

#[test]
fn passive_replies_the_filter_did_not_make_never_reach_the_client() {
    for reply in [
        // Multi-line: clients differ on which line they read.
        &b"227-Entering Passive Mode (10,2,0,3,0,25)\r\n227 ok\r\n"[..],
        b"229-Entering Extended Passive Mode (|||25|)\r\n229 ok\r\n",
        // LPSV's answer (LPSV is refused to clients).
        b"228 Entering Long Passive Mode (4,4,10,2,0,3,2,0,25)\r\n",
    ] {
        let (mut c, fake, _) = control();
        let out = from_server(&mut c, reply);
        let got = text(&out.to_client);
        assert_eq!(got.lines().count(), 1, "{:?}: {got}", text(reply));
        assert!(got.starts_with("500 Firewall refused"), "{got}");
        assert!(fake.redirects.lock().unwrap().is_empty());
    }
    // A line that is no reply is dropped; bytes a client could split a line
    // at are blanked.
    let (mut c, _, _) = control();
    let out = from_server(
        &mut c,
        b" 227 Entering Passive Mode (10,2,0,3,0,25)\r\n200 ok\r227 x\r\n",
    );
    assert_eq!(text(&out.to_client), "200 ok 227 x\r\n");
}

#[test]
fn abor_goes_to_the_server_as_urgent_data() {
    // However the client sent it (ftplib: the whole line as urgent data;
    // others: Telnet IP and Synch first), it goes on as a plain ABOR, urgent.
    for (sent, want) in [
        (&b"ABOR\r\n"[..], "ABOR\r\n"),
        (b"\xff\xf4\xff\xf2ABOR\r\n", "ABOR\r\n"),
        (b"abor\n", "abor\r\n"),
    ] {
        let (mut c, _, _) = control();
        let out = from_client(&mut c, &[b"NOOP\r\n", sent].concat());
        assert_eq!(text(&out.to_server), format!("NOOP\r\n{want}"));
        assert_eq!(out.urgent_at, Some(out.to_server.len() - 1));
    }
}

#[test]
fn long_lines_are_refused_whole() {
    let (mut c, fake, stats) = control();
    let mut long = b"SITE ".to_vec();
    long.extend(std::iter::repeat_n(b'x', 3 * MAX_LINE));
    long.extend_from_slice(b"\r\nNOOP\r\n");
    let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
    for piece in long.chunks(1000) {
        let out = from_client(&mut c, piece);
        to_server.extend(out.to_server);
        to_client.extend(out.to_client);
    }
    assert_eq!(text(&to_server), "NOOP\r\n", "nothing of the long line");
    assert_eq!(text(&to_client), "500 Command line too long.\r\n");

    let mut port = b"PORT 10,1,0,2,19,137".to_vec();
    port.extend(std::iter::repeat_n(b' ', 2 * MAX_LINE));
    port.extend_from_slice(b"\r\nNOOP\r\n");
    let out = from_client(&mut c, &port);
    assert_eq!(text(&out.to_server), "NOOP\r\n");
    assert!(text(&out.to_client).starts_with("500 Command line too long"));
    assert!(fake.binds.lock().unwrap().is_empty());

    let mut reply = b"227 Entering Passive Mode (10,2,0,2,156,64)".to_vec();
    reply.extend(std::iter::repeat_n(b' ', 2 * MAX_LINE));
    reply.extend_from_slice(b"\r\n");
    let out = from_server(&mut c, &reply);
    assert!(text(&out.to_client).starts_with("500 Firewall refused an overlong"));
    assert!(fake.redirects.lock().unwrap().is_empty());
    assert_eq!(stats.view().commands_refused, 3);
}

#[test]
fn unused_pinholes_go_with_the_next_transfer_and_the_control_connection() {
    let (mut c, fake, _) = control();
    from_client(&mut c, b"PORT 10,1,0,2,19,137\r\n");
    assert!(fake.withdrawn.lock().unwrap().is_empty());
    // The next transfer's PORT voids the first one's pinhole if still unused.
    from_client(&mut c, b"PORT 10,1,0,2,19,138\r\n");
    assert_eq!(*fake.withdrawn.lock().unwrap(), vec![101]);
    from_server(&mut c, b"227 Entering Passive Mode (10,2,0,2,156,64).\r\n");
    assert_eq!(*fake.withdrawn.lock().unwrap(), vec![101, 102]);
    drop(c);
    assert_eq!(*fake.withdrawn.lock().unwrap(), vec![101, 102, 201]);
}

#[test]
fn a_failed_call_answers_425() {
    let (mut c, fake, stats) = control();
    *fake.fail.lock().unwrap() = true;
    let out = from_client(&mut c, b"PORT 10,1,0,2,19,137\r\n");
    assert!(out.to_server.is_empty());
    assert_eq!(
        text(&out.to_client),
        "425 Can't open data connection: no free port.\r\n"
    );
    assert_eq!(stats.view().failed_calls, 1);
}

#[test]
fn a_handed_over_connection_reads_on_where_it_stopped() {
    let (mut whole, _, _) = control();
    let (mut first, fake, stats) = control();
    // Half a PORT command and half a multi-line reply, then the hand-over.
    let cmd = b"PORT 10,1,0,2,19,137\r\n";
    let reply = b"150-Opening\r\n150 data connection\r\n";
    let (c1, c2) = cmd.split_at(9);
    let (r1, r2) = reply.split_at(15);
    assert!(from_client(&mut first, c1).to_server.is_empty());
    let mut out = Output::default();
    first.server_data(r1, &mut out);
    let state = first.hand_over();
    assert!(
        fake.withdrawn.lock().unwrap().is_empty(),
        "nothing withdrawn at a hand-over"
    );
    let json = serde_json::to_string(&state).unwrap();
    let state: ControlState = serde_json::from_str(&json).unwrap();
    let mut next = Control::resume(fake.clone(), stats.clone(), state).unwrap();
    assert_eq!(stats.view().control_connections, 1, "not counted twice");
    let got = from_client(&mut next, c2);
    let want = from_client(&mut whole, cmd);
    assert_eq!(got, want);
    assert!(!got.to_server.is_empty());
    let mut got = Output::default();
    next.server_data(r2, &mut got);
    let mut want = Output::default();
    whole.server_data(reply, &mut want);
    assert_eq!(
        [out.to_client, got.to_client].concat(),
        want.to_client,
        "the reply reads the same across the hand-over"
    );
}

/// A hand-over through JSON, as the daemon stores it, keeping the openings
/// the engine says are `waiting`.
fn handed(c: Control, waiting: impl Fn(u64) -> bool) -> ControlState {
    let mut state = c.hand_over();
    state.keep_pending(waiting);
    let json = serde_json::to_string(&state).unwrap();
    serde_json::from_str(&json).unwrap()
}

#[test]
fn an_unused_opening_is_made_again_where_it_was_announced() {
    // Active: the server was told 10.2.0.1:40001.
    let (mut c, fake, stats) = control();
    let out = from_client(&mut c, b"PORT 10,1,0,2,19,137\r\n");
    assert_eq!(text(&out.to_server), "PORT 10,2,0,1,156,65\r\n");
    let state = handed(c, |_| true);
    assert_eq!(state.pending().len(), 1);
    let next = Control::resume(fake.clone(), stats.clone(), state).unwrap();
    let binds = fake.binds.lock().unwrap();
    assert_eq!(binds.len(), 2);
    assert_eq!(binds[1].proxy, Some("10.2.0.1:40001".parse().unwrap()));
    assert_eq!(binds[1].clients, binds[0].clients);
    assert_eq!(binds[1].ip_filter, binds[0].ip_filter);
    assert_eq!(binds[1].flags, binds[0].flags);
    assert_eq!(stats.view().active_opened, 1, "not counted twice");
    drop(binds);
    // It ends with the control connection, as the first one would have.
    drop(next);
    assert_eq!(*fake.withdrawn.lock().unwrap(), vec![102]);

    // Passive: the client was told the server's address, port 50001.
    let (mut c, fake, _) = control();
    let out = from_server(&mut c, b"229 Entering Extended Passive Mode (|||6000|)\r\n");
    assert!(text(&out.to_client).contains("(|||50001|)"));
    let state = handed(c, |_| true);
    let _next = Control::resume(fake.clone(), Arc::new(FtpStats::default()), state).unwrap();
    assert_eq!(*fake.redirects_at.lock().unwrap(), vec![50001]);
    let r = fake.redirects.lock().unwrap();
    assert_eq!(r[1].internal, Some("10.2.0.2".parse().unwrap()));
    assert_eq!(r[1].connects, r[0].connects);
}

#[test]
fn only_openings_still_waiting_are_made_again() {
    let (mut c, fake, stats) = control();
    from_client(&mut c, b"PORT 10,1,0,2,19,137\r\n");
    // The engine says a connection used it before the hand-over.
    let state = handed(c, |id| id != 101);
    assert!(state.pending().is_empty());
    Control::resume(fake.clone(), stats.clone(), state).unwrap();
    assert_eq!(fake.binds.lock().unwrap().len(), 1, "nothing made again");

    // One that cannot be made again is counted as a failed call; the
    // connection goes on.
    let (mut c, fake, stats) = control();
    from_server(&mut c, b"227 Entering Passive Mode (10,2,0,2,23,112).\r\n");
    let state = handed(c, |_| true);
    *fake.fail.lock().unwrap() = true;
    let mut next = Control::resume(fake.clone(), stats.clone(), state).unwrap();
    assert_eq!(stats.view().failed_calls, 1);
    *fake.fail.lock().unwrap() = false;
    let out = from_client(&mut next, b"NOOP\r\n");
    assert_eq!(text(&out.to_server), "NOOP\r\n");
}
