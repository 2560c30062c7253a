//! Operator mistakes and hostile API clients: a second `up`, `down` with
//! another socket, a daemon that does not stop, and requests that are not
//! what the API expects. The running daemon keeps working and nothing it
//! owns changes.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    time::Duration,
};

use firewall_tests::{
    daemon::{ctl_in, LabRun},
    ftp::eventually,
    lab::addr,
};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn pins() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/fs/bpf/firewall")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_second_up_is_refused_and_the_running_daemon_keeps_its_datapath() {
    let run = LabRun::start("opup", &[]);
    let pid = run.fw.pid().unwrap();
    let s = run.fw.session(addr::CLIENT);
    run.fw.bind_ok(&s, "10.1.0.2:5001", "tcp", &[]);
    let before = pins();
    let out = ctl_in(
        &run.lab.fw,
        &[
            "--socket",
            "/run/firewall/second.sock",
            "up",
            "--internal",
            addr::IF_INTERNAL,
            "--external",
            addr::IF_EXTERNAL,
        ],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    assert!(err.contains("already-running"), "{err}");
    // Its pinhole is still there and it still answers calls.
    assert_eq!(pins(), before);
    assert_eq!(run.fw.list("pinholes").len(), 1);
    run.fw.bind_ok(&s, "10.1.0.2:5002", "tcp", &[]);
    assert_eq!(run.fw.list("pinholes").len(), 2);
}

#[test]
fn down_with_another_socket_stops_the_running_daemon_properly() {
    let mut run = LabRun::start("opdown", &[]);
    let out = ctl_in(
        &run.lab.fw,
        &["--socket", "/run/firewall/other.sock", "down", "-j"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["stopped_daemon"], true, "{report}");
    // The daemon exited by itself, cleanly, and took its datapath along.
    assert!(eventually(5, || !run.fw.is_running()));
    assert!(run.fw.exit_status().unwrap().success());
    assert!(pins().is_empty(), "{:?}", pins());
}

#[test]
fn down_leaves_a_daemon_that_does_not_stop_alone() {
    let mut run = LabRun::start("ophung", &[]);
    let pid = run.fw.pid().unwrap().to_string();
    let s = run.fw.session(addr::CLIENT);
    run.fw.bind_ok(&s, "10.1.0.2:5001", "tcp", &[]);
    let before = pins();
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
    };
    signal("-STOP");
    let out = ctl_in(&run.lab.fw, &["--socket", &run.fw.socket, "down"]);
    // While it does not answer, nothing of its datapath is removed.
    let during = pins();
    signal("-CONT");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("did not stop"), "{}", stderr(&out));
    assert_eq!(during, before);
    // Resumed, it reads the request it was sent and stops properly itself.
    assert!(eventually(10, || !run.fw.is_running()));
    assert!(run.fw.exit_status().unwrap().success());
    assert!(pins().is_empty(), "{:?}", pins());
}

/// A raw connection to the daemon's API.
fn api(run: &LabRun) -> (UnixStream, BufReader<UnixStream>) {
    let s = UnixStream::connect(&run.fw.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

fn answer(r: &mut BufReader<UnixStream>) -> serde_json::Value {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

fn closed(r: &mut BufReader<UnixStream>) -> bool {
    let mut line = String::new();
    matches!(r.read_line(&mut line), Ok(0) | Err(_))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn hostile_api_requests_get_an_answer_and_cost_nothing() {
    let run = LabRun::start("opapi", &[]);
    // Not UTF-8: an answer that says so, then the connection ends.
    let (mut w, mut r) = api(&run);
    w.write_all(b"{\"v\":1,\"op\":\"st\xffatus\"}\n").unwrap();
    let a = answer(&mut r);
    assert_eq!(a["error"]["kind"], "bad-request", "{a}");
    assert!(a["error"]["message"].as_str().unwrap().contains("UTF-8"));
    assert!(closed(&mut r));

    // A 64 MiB line is refused as it arrives, without being kept.
    let pid = run.fw.pid().unwrap();
    let before = rss_kib(pid);
    let (w, mut r) = api(&run);
    let writer = std::thread::spawn(move || {
        let mut w = w;
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..64 {
            if w.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let a = answer(&mut r);
    assert_eq!(a["error"]["kind"], "bad-request", "{a}");
    assert!(a["error"]["message"]
        .as_str()
        .unwrap()
        .contains("longer than"));
    writer.join().unwrap();
    let grew = rss_kib(pid).saturating_sub(before);
    assert!(grew < 16 * 1024, "the daemon grew by {grew} KiB");

    // Unknown flags and transports are invalid arguments, by name.
    let (mut w, mut r) = api(&run);
    w.write_all(br#"{"v":1,"op":"bind-for-client","session":1,"clients":["10.1.0.2:5001"],"protocol":"tcp","flags":["warp"],"protocol_name":"ftp"}"#).unwrap();
    w.write_all(b"\n").unwrap();
    let a = answer(&mut r);
    assert_eq!(a["error"]["kind"], "invalid-argument", "{a}");
    assert!(a["error"]["message"].as_str().unwrap().contains("warp"));

    // Many requests on one connection, 70 MiB in all: every one answered.
    let mut padded = br#"{"v":1,"op":"kill","id":999999999"#.to_vec();
    padded.extend(std::iter::repeat_n(b' ', 1_000_000));
    padded.extend_from_slice(b"}\n");
    for _ in 0..70 {
        w.write_all(&padded).unwrap();
        let a = answer(&mut r);
        assert_eq!(a["error"]["kind"], "invalid-argument", "{a}");
    }
}

#[test]
fn idle_api_connections_do_not_lock_others_out() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    const IDLE: usize = 5_000;
    let limit = firewall_ctl::daemon::MAX_API_CONNECTIONS;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard >= (IDLE + 256) as u64,
        "this test holds {IDLE} sockets: RLIMIT_NOFILE's hard limit {hard} is too low"
    );
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let run = LabRun::start("opidle", &[]);
    let idle: Vec<UnixStream> = (0..IDLE)
        .map(|_| UnixStream::connect(&run.fw.socket).unwrap())
        .collect();

    // Another client is answered, and the daemon holds no more than its limit.
    let out = run.fw.ctl(&["status", "-j"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let held = status["api_connections"].as_u64().unwrap();
    assert!(held as usize <= limit, "{held} connections held");

    // The ones idle the longest were closed, with a line that says why.
    let mut first = BufReader::new(idle[0].try_clone().unwrap());
    idle[0]
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let a = answer(&mut first);
    assert_eq!(a["error"]["kind"], "exhausted", "{a}");
    assert!(
        a["error"]["message"]
            .as_str()
            .unwrap()
            .contains("idle the longest"),
        "{a}"
    );
    assert!(closed(&mut first));

    // The most recent ones still work.
    let mut last = idle[IDLE - 1].try_clone().unwrap();
    last.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    last.write_all(b"{\"v\":1,\"op\":\"list\",\"what\":\"sessions\"}\n")
        .unwrap();
    let a = answer(&mut BufReader::new(last));
    assert!(a.get("ok").is_some(), "{a}");
    drop(idle);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
}
