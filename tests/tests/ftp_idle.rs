//! 10,000 idle FTP control connections through a daemon started under the
//! usual soft limit of 1024 open files, proxied (the default) and read in
//! place. A test binary of its own: it lowers its own soft limit, which
//! the daemon it starts inherits.
//!
//! Proxied, each control connection holds two sockets in the daemon (the
//! client's leg and the server's), so 10,000 need a hard limit above
//! 20,000. Where the hard limit is lower and cannot be raised (no
//! CAP_SYS_RESOURCE, as on the CI machines, whose hard limit is 20,000), the
//! test opens as many as the hard limit allows and says so.

use firewall_tests::{
    daemon::LabRun,
    ftp::{check, IN_PLACE},
    lab::addr,
    traffic::{wait_listening, Peer},
};

const WANTED: u64 = 10_000;
/// Descriptors the daemon needs besides the control connections.
const RESERVE: u64 = 400;

#[test]
fn ten_thousand_idle_control_connections_read_in_place_under_a_1024_soft_limit() {
    let (connections, run, _server) = idle_connections("ftpidleip", Some(IN_PLACE));
    // Forwarded in place: nothing intercepted, two flows each, and no
    // descriptor taken.
    let status = run.fw.status();
    assert_eq!(run.fw.counter("pass_intercepted"), 0);
    let flows = status["maps"][0]["entries"].as_u64().unwrap();
    assert!(flows >= 2 * connections, "{flows} flows");
    assert!(!run.fw.log_text().contains("out of file descriptors"));
}

#[test]
fn ten_thousand_idle_control_connections_proxied_under_a_1024_soft_limit() {
    let (connections, run, _server) = idle_connections("ftpidle", None);
    proxied(connections, &run);
}

/// Starts a daemon (with `config`) under a soft limit of 1024 and has as
/// many idle control connections as the hard limit allows go through it;
/// how many, the run and the server (which never closes its side).
fn idle_connections(tag: &str, config: Option<&str>) -> (u64, LabRun, Peer) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    // What systemd gives a service by default: a soft limit of 1024 and a
    // high hard limit.
    let (_, mut hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if hard < 4 * WANTED && setrlimit(Resource::RLIMIT_NOFILE, 1024, 4 * WANTED).is_ok() {
        hard = 4 * WANTED;
    }
    setrlimit(Resource::RLIMIT_NOFILE, 1024, hard).unwrap();
    let connections = WANTED.min((hard - RESERVE) / 2);
    if connections < WANTED {
        eprintln!(
            "the hard limit of open files is {hard} and cannot be raised here: \
             {connections} control connections instead of {WANTED}"
        );
    }
    let run = match config {
        Some(toml) => LabRun::with_config(tag, toml),
        None => LabRun::start(tag, &[]),
    };
    assert!(
        run.fw.log_text().contains("soft limit raised from 1024"),
        "{}",
        run.fw.log_text()
    );
    // A server that greets and then waits: no vsftpd process per connection.
    let dir = std::env::temp_dir().join(format!("{}-idle", run.lab.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let server_py = dir.join("server.py");
    std::fs::write(
        &server_py,
        format!(
            r#"import asyncio
async def greet(r, w):
    w.write(b'220 idle\r\n')
    await w.drain()
    await r.read()
async def main():
    s = await asyncio.start_server(greet, '{server}', 21, backlog=4096)
    await s.serve_forever()
asyncio.run(main())
"#,
            server = addr::SERVER
        ),
    )
    .unwrap();
    let server = Peer::new(
        run.lab
            .server
            .spawn(&format!(
                "ulimit -n {hard}; exec python3 {}",
                server_py.display()
            ))
            .unwrap(),
    );
    wait_listening(&run.lab.server, 21);
    // The client opens them all, reads each greeting, and holds them all
    // open for a moment.
    let client_py = dir.join("client.py");
    std::fs::write(
        &client_py,
        format!(
            r#"import asyncio, sys
async def one(sem):
    async with sem:
        r, w = await asyncio.wait_for(asyncio.open_connection('{server}', 21), 30)
        line = await asyncio.wait_for(r.readline(), 30)
        assert line.startswith(b'220'), line
        return w
async def main():
    sem = asyncio.Semaphore(256)
    conns = await asyncio.gather(*[one(sem) for _ in range({connections})])
    print('open', len(conns))
    sys.stdout.flush()
    await asyncio.sleep(1)
    for w in conns:
        w.close()
asyncio.run(main())
"#,
            server = addr::SERVER
        ),
    )
    .unwrap();
    let out = run
        .lab
        .client
        .cmd("sh")
        .args([
            "-c",
            &format!("ulimit -n {hard}; exec python3 {}", client_py.display()),
        ])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    check("many idle control connections", &out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("open {connections}")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    (connections, run, server)
}

fn proxied(connections: u64, run: &LabRun) {
    // Through the firewall, each one intercepted, and it still answers.
    let status = run.fw.status();
    assert!(status["ftp"]["control_connections"].as_u64().unwrap() >= connections);
    assert!(!run.fw.log_text().contains("out of file descriptors"));
    // Past the kernel's slots the rest stayed with the daemon, counted, with
    // one warning.
    let slots = u64::from(firewall_common::ftp_lines::LINE_SLOT_COUNT / 2);
    assert_eq!(
        status["ftp"]["kernel_slots_exhausted"].as_u64().unwrap(),
        connections.saturating_sub(slots),
        "{status}"
    );
    if connections > slots {
        let log = run.fw.log_text();
        let warned = log.matches("kernel slots are taken").count();
        assert_eq!(warned, 1, "{log}");
    }
    // The server never closes its side: every connection is still there.
    assert_eq!(
        status["ftp"]["kernel_line_connections"].as_u64().unwrap(),
        connections.min(slots),
        "{status}"
    );
}
