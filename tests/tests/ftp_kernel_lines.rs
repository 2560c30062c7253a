//! FTP control lines forwarded in the kernel: a scripted client and server
//! exchange lines in every shape — one line per segment, several in one, a
//! line split over two, refused and rewritten commands, multi-line replies,
//! bursts past the kernel's budget — and both ends must see exactly what
//! the filter alone would have let through, in order: proxied (`[ftp]
//! control_lines`), where the same script with the daemon forwarding every
//! line must give the same bytes, and read in place (a refused command
//! reaches the server as `XFWREFUSED`).

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use firewall_tests::{
    daemon::LabRun,
    ftp::{check, python, IN_PLACE, PROXY},
    lab::addr,
    traffic::{wait_listening, Peer},
};

/// The server: answers each line by a rule and records every byte it got.
const SERVER: &str = r#"
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 21)); s.listen(1)
c, _ = s.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
got = open(sys.argv[2], "wb")
c.sendall(b"220 scripted\r\n")
buf = b""
while True:
    d = c.recv(4096)
    if not d:
        break
    got.write(d); got.flush()
    buf += d
    while b"\r\n" in buf:
        line, buf = buf.split(b"\r\n", 1)
        verb = line.split(b" ")[0].upper()
        if verb == b"NOOP":
            c.sendall(b"200 " + line[5:] + b"\r\n")
        elif verb == b"PORT":
            c.sendall(b"200 port\r\n")
        elif verb == b"FEAT":
            c.sendall(b"211-Features:\r\n EPSV\r\n211 End\r\n")
        elif verb == b"TWO":
            c.sendall(b"200 one\r\n200 two\r\n")
        elif verb == b"SPLIT":
            c.sendall(b"200 sp"); time.sleep(0.05); c.sendall(b"lit\r\n")
        elif verb == b"QUIT":
            c.sendall(b"221 bye\r\n"); c.close(); sys.exit(0)
        else:
            c.sendall(b"502 " + verb + b"\r\n")
"#;

/// The client: sends the script, prints every reply line it got (`SERVER`
/// is defined before it).
const CLIENT: &str = r#"
import socket, sys, time
s = socket.create_connection((SERVER, 21), timeout=15)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
f = s.makefile("rb")
def replies(n):
    for _ in range(n):
        while True:
            l = f.readline()
            if not l:
                sys.exit("connection closed")
            print(l.decode().rstrip("\r\n"))
            if l[3:4] == b" ":
                break
replies(1)
s.sendall(b"NOOP 1\r\n"); replies(1)
s.sendall(b"NOOP 2\r\nNOOP 3\r\n"); replies(2)
s.sendall(b"NO"); time.sleep(0.05); s.sendall(b"OP 4\r\n"); replies(1)
s.sendall(b"NOOP 5\r\n"); replies(1)
s.sendall(b"PORT 10,2,0,3,19,137\r\n"); replies(1)
s.sendall(b"NOOP 6\r\n"); replies(1)
s.sendall(b"PORT 10,1,0,2,19,137\r\n"); replies(1)
for i in range(7, 47):
    s.sendall(b"NOOP %d\r\n" % i)
replies(40)
s.sendall(b"FEAT\r\n"); replies(1)
s.sendall(b"NOOP 47\r\n"); replies(1)
s.sendall(b"TWO\r\n"); replies(2)
s.sendall(b"SPLIT\r\n"); replies(1)
for i in range(48, 148):
    s.sendall(b"NOOP %d\r\n" % i); replies(1)
for i in range(148, 268):
    s.sendall(b"NOOP %d\r\n" % i); s.sendall(b"PORT 10,1,0,2,19,137\r\n")
replies(240)
s.sendall(b"QUIT\r\n"); replies(1)
"#;

/// The client's PORT as the server must get it: the firewall's address.
const PORT: &str = "PORT 10,2,0,1,*";

/// What the server must have received: the script without the refused
/// PORT (in place, `XFWREFUSED` in its stead), the client's own PORT with
/// the firewall's address.
fn server_must_get(got: &str, in_place: bool) -> Result<(), String> {
    let mut want = vec!["NOOP 1", "NOOP 2", "NOOP 3", "NOOP 4", "NOOP 5"];
    if in_place {
        want.push("XFWREFUSED");
    }
    want.extend(["NOOP 6", PORT]);
    let mut want: Vec<String> = want.into_iter().map(String::from).collect();
    want.extend((7..47).map(|i| format!("NOOP {i}")));
    want.extend(["FEAT", "NOOP 47", "TWO", "SPLIT"].map(String::from));
    want.extend((48..148).map(|i| format!("NOOP {i}")));
    for i in 148..268 {
        want.extend([format!("NOOP {i}"), PORT.into()]);
    }
    want.push("QUIT".into());
    let Some(body) = got.strip_suffix("\r\n") else {
        return Err(format!("the server's bytes do not end in a line: {got:?}"));
    };
    matches(&body.split("\r\n").collect::<Vec<_>>(), &want).map_err(|e| format!("{e}: {got:?}"))
}

/// Whether `lines` are `want`, where a wanted line ending in `*` stands
/// for any line starting with what precedes it.
fn matches(lines: &[&str], want: &[String]) -> Result<(), String> {
    if lines.len() != want.len() {
        return Err(format!("{} lines, {} wanted", lines.len(), want.len()));
    }
    for (l, w) in lines.iter().zip(want) {
        let ok = match w.strip_suffix('*') {
            Some(prefix) => l.starts_with(prefix),
            None => l == w,
        };
        if !ok {
            return Err(format!("got {l:?} where {w:?} was due"));
        }
    }
    Ok(())
}

/// What the client must have read: the refused PORT answered by the
/// firewall's 500, or in place by the server's answer to `XFWREFUSED`.
fn client_must_get(out: &str, in_place: bool) -> Result<(), String> {
    let mut want: Vec<String> = ["220 scripted", "200 1", "200 2", "200 3", "200 4", "200 5"]
        .map(String::from)
        .to_vec();
    want.push(if in_place { "502 XFWREFUSED" } else { "500 *" }.into());
    want.extend(["200 6", "200 port"].map(String::from));
    want.extend((7..47).map(|i| format!("200 {i}")));
    want.extend(
        [
            "211-Features:",
            " EPSV",
            "211 End",
            "200 47",
            "200 one",
            "200 two",
            "200 split",
        ]
        .map(String::from),
    );
    want.extend((48..148).map(|i| format!("200 {i}")));
    for i in 148..268 {
        want.extend([format!("200 {i}"), "200 port".into()]);
    }
    want.push("221 bye".into());
    matches(&out.lines().collect::<Vec<_>>(), &want).map_err(|e| format!("{e}: {out}"))
}

/// A client that sends 50,000 commands and reads no reply for a second:
/// the replies (5.5 MB, more than a socket's largest send buffer) fill its
/// socket's buffers and the firewall's, with lines queued in the kernel and
/// writes of the daemon waiting; then it reads them all, which must come in
/// order.
const SLOW_READER: &str = r#"
import socket, sys, threading, time
N = 50000
PAD = b"x" * 100
s = socket.create_connection((SERVER, 21), timeout=30)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
f = s.makefile("rb")
if f.readline() != b"220 scripted\r\n":
    sys.exit("no banner")
def send():
    for i in range(0, N, 100):
        s.sendall(b"".join(b"NOOP %d %s\r\n" % (j, PAD) for j in range(i, i + 100)))
t = threading.Thread(target=send); t.start()
time.sleep(1)
for i in range(N):
    l = f.readline()
    if l != b"200 %d %s\r\n" % (i, PAD):
        sys.exit("reply %d: %r" % (i, l))
t.join()
s.sendall(b"QUIT\r\n")
if f.readline() != b"221 bye\r\n":
    sys.exit("no goodbye")
"#;

/// The scripted server in the lab's server, recording into a file: the
/// server (ended when dropped) and the file.
fn scripted_server(run: &LabRun) -> (Peer, std::path::PathBuf) {
    let got = std::env::temp_dir().join(format!("{}-server-got", run.lab.prefix));
    let server = Peer::new(
        run.lab
            .server
            .cmd("python3")
            .args(["-c", SERVER, addr::SERVER, &got.display().to_string()])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(&run.lab.server, 21);
    (server, got)
}

/// Runs a client script in the lab's client, `SERVER` the server's address.
fn client(run: &LabRun, code: &str) -> std::process::Output {
    python(
        &run.lab.client,
        &format!("SERVER = '{}'\n{code}", addr::SERVER),
    )
}

/// Runs the script through a firewall with `config`; the run.
fn script(tag: &str, config: &str) -> LabRun {
    let in_place = config.contains(IN_PLACE);
    let run = LabRun::with_config(tag, config);
    let (_server, got) = scripted_server(&run);
    let out = client(&run, CLIENT);
    check("the scripted client", &out);
    let replies = String::from_utf8_lossy(&out.stdout).into_owned();
    if let Err(e) = client_must_get(&replies, in_place) {
        panic!("{tag}: the client: {e}");
    }
    let received = std::fs::read(&got).unwrap();
    let _ = std::fs::remove_file(&got);
    if let Err(e) = server_must_get(&String::from_utf8_lossy(&received), in_place) {
        panic!("{tag}: the server: {e}");
    }
    run
}

/// `script` proxied; the number of lines the kernel forwarded.
fn script_proxied(tag: &str, config: &str) -> u64 {
    let run = script(tag, &format!("{PROXY}{config}"));
    // The connection ended: its slots are free again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while run.fw.status()["ftp"]["kernel_line_connections"] != 0 {
        assert!(Instant::now() < deadline, "{tag}: slots still taken");
        std::thread::sleep(Duration::from_millis(100));
    }
    run.fw.status()["ftp"]["kernel_lines"].as_u64().unwrap()
}

#[test]
fn lines_in_every_shape_arrive_as_the_filter_reads_them_in_order_read_in_place() {
    let run = script("ftpipl", IN_PLACE);
    // Lines in several to a segment or split, and every PORT, went through
    // the daemon; the others through the kernel.
    assert!(run.fw.counter("drop_ftp_diverted") >= 120);
    assert_eq!(run.fw.counter("pass_intercepted"), 0);
}

#[test]
fn lines_in_every_shape_arrive_as_the_filter_reads_them_in_order() {
    let in_kernel = script_proxied("ftpkl", "");
    // 300-odd lines each way; most are plain and one to a segment.
    assert!(
        in_kernel >= 200,
        "only {in_kernel} lines forwarded in the kernel"
    );
    let in_daemon = script_proxied("ftpul", "control_lines = \"user\"\n");
    assert_eq!(
        in_daemon, 0,
        "control_lines = \"user\": the daemon forwards every line"
    );
}

/// Runs the client that stops reading through a firewall with `config`;
/// the number of lines the kernel forwarded.
fn slow_reader(tag: &str, config: &str) -> u64 {
    let run = LabRun::with_config(tag, config);
    let (_server, got) = scripted_server(&run);
    let out = client(&run, SLOW_READER);
    let _ = std::fs::remove_file(&got);
    check(&format!("{tag}: the client that stops reading"), &out);
    run.fw.status()["ftp"]["kernel_lines"].as_u64().unwrap()
}

#[test]
fn a_client_that_stops_reading_gets_every_reply_in_order() {
    assert!(slow_reader("ftpslowk", PROXY) > 0);
    // The daemon alone must not stall either: replies go on while the
    // commands wait for the server.
    assert_eq!(
        slow_reader("ftpslowu", &format!("{PROXY}control_lines = \"user\"\n")),
        0
    );
}
