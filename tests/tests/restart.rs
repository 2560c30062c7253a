//! A restart that clients do not notice: FTP downloads in progress (kernel
//! mode, passive and active) while the daemon restarts as systemd restarts
//! it, and data connections announced before the restart (227, 200 for a
//! PORT) but opened only after it. The test plays systemd's part of the protocol — the notification
//! socket, the file-descriptor store (`FDSTORE=1` with SCM_RIGHTS), and the
//! stored descriptors passed to the next daemon (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`, `LISTEN_PID`) — so it runs where systemd is not PID 1.

use std::{
    os::{
        fd::{AsRawFd as _, RawFd},
        unix::process::CommandExt as _,
    },
    path::PathBuf,
    process::{Child, Stdio},
};

use firewall_tests::{
    daemon::ctl_binary,
    ftp::{eventually, sha256, FtpServer, IN_PLACE},
    lab::{addr, Lab, Ns},
    notify::ServiceManager,
    traffic::{prime_neighbours, Peer},
};

/// `firewall-ctl up` as systemd runs it: `--keep-datapath`, NOTIFY_SOCKET,
/// and the stored descriptors from fd 3 on with their names.
fn start_daemon(ns: &Ns, sm: &ServiceManager, log: &PathBuf, config: &str) -> Child {
    // Above the range they go to, so that no dup2 overwrites another.
    let high: Vec<RawFd> = sm
        .store
        .iter()
        .map(|(_, f)| {
            nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100)).unwrap()
        })
        .collect();
    let names: Vec<&str> = sm.store.iter().map(|(n, _)| n.as_str()).collect();
    let mut cmd = ns.cmd("sh");
    cmd.args([
        "-c",
        &format!(
            "export LISTEN_PID=$$; exec {} up --internal {} --external {} --keep-datapath --config {config}",
            ctl_binary().display(),
            addr::IF_INTERNAL,
            addr::IF_EXTERNAL
        ),
    ])
    .env("NOTIFY_SOCKET", &sm.path)
    .env("RUST_LOG", "info")
    .stdin(Stdio::null())
    .stdout(
        std::fs::File::options()
            .append(true)
            .create(true)
            .open(log)
            .unwrap(),
    )
    .stderr(
        std::fs::File::options()
            .append(true)
            .create(true)
            .open(log)
            .unwrap(),
    );
    if !high.is_empty() {
        cmd.env("LISTEN_FDS", high.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        let fds = high.clone();
        // SAFETY: only dup2, async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for (i, fd) in fds.iter().enumerate() {
                    nix::unistd::dup2(*fd, 3 + i as RawFd)?;
                }
                Ok(())
            });
        }
    }
    let child = cmd.spawn().expect("starting firewall-ctl up");
    for fd in high {
        let _ = nix::unistd::close(fd);
    }
    child
}

/// An FTP client (Python's ftplib) that has a data connection announced
/// (`passive`: PASV, else PORT), says so by creating `marker`, and opens it
/// only once `go` exists: RETR `file` into `out`.
const ANNOUNCED_THEN_OPENED: &str = r#"
import ftplib, os, socket, sys, time
mode, server, client, file, marker, go, out = sys.argv[1:]
f = ftplib.FTP(server, timeout=30)
f.login()
f.voidcmd("TYPE I")
if mode == "passive":
    host, port = f.makepasv()
else:
    listener = socket.create_server((client, 0))
    listener.settimeout(30)
    f.sendport(client, listener.getsockname()[1])
open(marker, "w").write("%s:%d" % f.sock.getsockname())
deadline = time.time() + 60
while not os.path.exists(go):
    if time.time() > deadline:
        sys.exit("never told to go on")
    time.sleep(0.05)
if mode == "passive":
    data = socket.create_connection((host, port), timeout=30)
    f.sendcmd("RETR " + file)
else:
    f.sendcmd("RETR " + file)
    data, _ = listener.accept()
got = bytearray()
while True:
    b = data.recv(65536)
    if not b:
        break
    got += b
data.close()
f.voidresp()
f.quit()
open(out, "wb").write(got)
"#;

/// What `connection-flags` says of the control connection from `client` to
/// the FTP server.
fn primary_kind(client: &str) -> String {
    let out = std::process::Command::new(ctl_binary())
        .args([
            "-j",
            "connection-flags",
            "--protocol",
            "tcp",
            "--client",
            client,
        ])
        .args(["--server", &format!("{}:21", addr::SERVER)])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["kind"].as_str().unwrap_or("none").to_string()
}

struct Daemon(Option<Child>);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::process::Command::new(ctl_binary())
            .arg("down")
            .output();
    }
}

#[test]
fn ftp_clients_do_not_notice_a_restart() {
    // Proxied (the default): the stored sockets and each connection's state
    // go to the next daemon.
    ftp_restart("rst", "");
}

#[test]
fn ftp_clients_do_not_notice_a_restart_read_in_place() {
    // The control connections are the datapath's; the next daemon takes
    // each up at its next segment handed over, from the translation
    // published in INPLACE_ADJUST, and makes again the openings handed over.
    ftp_restart("rstip", IN_PLACE);
}

fn ftp_restart(tag: &str, toml: &str) {
    let proxy = toml != IN_PLACE;
    firewall_tests::require_root();
    let _turn = firewall_tests::exclusive();
    let lab = Lab::create(&firewall_tests::lab::unique_prefix(tag)).unwrap();
    let log = std::env::temp_dir().join(format!("{}-daemon.log", lab.prefix));
    let _ = std::fs::remove_file(&log);
    let config = std::env::temp_dir().join(format!("{}-config.toml", lab.prefix));
    std::fs::write(&config, toml).unwrap();
    let config = config.display().to_string();
    let mut sm = ServiceManager::new(&lab.prefix);
    let mut daemon = Daemon(Some(start_daemon(&lab.fw, &sm, &log, &config)));
    sm.until("READY=1", 30, &log);
    prime_neighbours(&lab);

    let server = FtpServer::start(&lab.server, &lab.prefix).unwrap();
    let big = server.random_file("big.bin", 12 << 20).unwrap();
    let small = server.random_file("small.bin", 100_000).unwrap();
    let dest = |n: &str| std::env::temp_dir().join(format!("{}-{n}", lab.prefix));
    // 12 MiB at 3 MB/s: about 4 s each, so the restart lands mid-transfer.
    let curl = |flags: &str, to: &PathBuf| {
        format!(
            "exec curl -sS --max-time 60 --limit-rate 3M {flags} -o {} ftp://{}/big.bin",
            to.display(),
            addr::SERVER
        )
    };
    let clients = [
        ("curl passive", curl("", &dest("passive")), vec![("passive", &big)]),
        ("curl active", curl("-P -", &dest("active")), vec![("active", &big)]),
        (
            // Its second download needs the new daemon's filter (a new EPSV).
            "lftp passive, two downloads",
            format!(
                "exec lftp -c 'set ftp:passive-mode on; set net:max-retries 1; set net:timeout 20; \
                 set net:limit-rate 3000000; open -u anonymous,x@ {}; get big.bin -o {}; get small.bin -o {}'",
                addr::SERVER,
                dest("lftp-big").display(),
                dest("lftp-small").display()
            ),
            vec![("lftp-big", &big), ("lftp-small", &small)],
        ),
    ];
    let mut running: Vec<(&str, Peer)> = clients
        .iter()
        .map(|(name, script, _)| (*name, Peer::new(lab.client.spawn(script).unwrap())))
        .collect();
    // Two more: a data connection announced before the restart and opened
    // after it, passive and active.
    let script = std::env::temp_dir().join(format!("{}-announced.py", lab.prefix));
    std::fs::write(&script, ANNOUNCED_THEN_OPENED).unwrap();
    let go = dest("go");
    let announced = ["announced-passive", "announced-active"];
    for (name, mode) in announced.iter().zip(["passive", "active"]) {
        let cmd = format!(
            "exec python3 {} {mode} {} {} small.bin {} {} {}",
            script.display(),
            addr::SERVER,
            addr::CLIENT,
            dest(&format!("{name}.marker")).display(),
            go.display(),
            dest(name).display()
        );
        running.push((name, Peer::new(lab.client.spawn(&cmd).unwrap())));
    }
    // The control connections' client endpoints.
    let mut controls = Vec::new();
    for n in announced {
        let marker = dest(&format!("{n}.marker"));
        assert!(
            eventually(10, || std::fs::read_to_string(&marker)
                .is_ok_and(|t| t.contains(':'))),
            "{n}: no data connection announced"
        );
        controls.push(std::fs::read_to_string(&marker).unwrap());
        let _ = std::fs::remove_file(marker);
    }
    let kind = if proxy { "intercepted" } else { "outbound" };
    for c in &controls {
        assert_eq!(primary_kind(c), kind, "{c}");
    }
    for n in ["passive", "active", "lftp-big"] {
        assert!(
            eventually(10, || dest(n)
                .metadata()
                .map(|m| m.len() > 1 << 20)
                .unwrap_or(false)),
            "{n}: the transfer did not get going"
        );
    }

    // systemctl restart: SIGTERM, the store keeps the control connections,
    // the next daemon gets them.
    let old = daemon.0.take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut old = old;
    sm.until("STOPPING=1", 10, &log);
    let status = old.wait().unwrap();
    assert!(status.success(), "the old daemon: {status}");
    // Whatever it stored arrived before it exited.
    while let Some((text, fds)) = sm.recv() {
        let name = text
            .lines()
            .find_map(|l| l.strip_prefix("FDNAME="))
            .unwrap_or("")
            .to_string();
        sm.store.extend(fds.into_iter().map(|f| (name.clone(), f)));
    }
    let stored: Vec<&str> = sm.store.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        stored
            .iter()
            .filter(|n| n.starts_with("ftp-client-"))
            .count(),
        if proxy { 5 } else { 0 },
        "control connections stored: {stored:?}"
    );
    daemon.0 = Some(start_daemon(&lab.fw, &sm, &log, &config));
    sm.until("READY=1", 30, &log);
    // Read in place, the daemon's thread takes them up on its own (before
    // it reads any segment), READY=1 perhaps first.
    let taken = if proxy {
        "5 FTP control connections taken over from the previous daemon"
    } else {
        "5 of 5 FTP control connections read in place taken over from the previous daemon"
    };
    eventually(5, || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains(taken))
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(taken), "{text}");
    assert!(
        text.contains("2 announced data connections not yet opened handed over"),
        "{text}"
    );
    // GetConnectionFlags knows them in the new daemon too.
    for c in &controls {
        assert_eq!(primary_kind(c), kind, "{c}");
    }
    std::fs::write(&go, b"").unwrap();

    for (name, mut peer) in running.drain(..) {
        let status = peer.wait().unwrap();
        assert!(
            status.success(),
            "{name} noticed the restart: {status}; log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    for (_, _, files) in &clients {
        for (n, want) in files {
            assert_eq!(sha256(&dest(n)), sha256(want), "{n}");
            let _ = std::fs::remove_file(dest(n));
        }
    }
    for n in announced {
        assert_eq!(sha256(&dest(n)), sha256(&small), "{n}");
        let _ = std::fs::remove_file(dest(n));
    }
    let _ = std::fs::remove_file(go);
    let _ = std::fs::remove_file(script);
    // The new daemon took them out of the store.
    assert!(
        sm.store.iter().all(|(n, _)| !n.starts_with("ftp-")),
        "left in the store: {:?}",
        sm.store.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&config);
}
