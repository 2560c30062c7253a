//! A restart that clients do not notice: FTP downloads in progress (kernel
//! mode, passive and active) while the daemon restarts as systemd restarts
//! it. The test plays systemd's part of the protocol — the notification
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
    ftp::{eventually, sha256, FtpServer},
    lab::{addr, Lab, Ns},
    notify::ServiceManager,
    traffic::{prime_neighbours, Peer},
};

/// `firewall-ctl up` as systemd runs it: `--keep-datapath`, NOTIFY_SOCKET,
/// and the stored descriptors from fd 3 on with their names.
fn start_daemon(ns: &Ns, sm: &ServiceManager, log: &PathBuf) -> Child {
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
            "export LISTEN_PID=$$; exec {} up --internal {} --external {} --keep-datapath",
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
    firewall_tests::require_root();
    let _turn = firewall_tests::exclusive();
    let lab = Lab::create(&firewall_tests::lab::unique_prefix("rst")).unwrap();
    let log = std::env::temp_dir().join(format!("{}-daemon.log", lab.prefix));
    let _ = std::fs::remove_file(&log);
    let mut sm = ServiceManager::new(&lab.prefix);
    let mut daemon = Daemon(Some(start_daemon(&lab.fw, &sm, &log)));
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
        3,
        "three control connections stored: {stored:?}"
    );
    daemon.0 = Some(start_daemon(&lab.fw, &sm, &log));
    sm.until("READY=1", 30, &log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("3 FTP control connections taken over from the previous daemon"),
        "{text}"
    );

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
    // The new daemon took them out of the store.
    assert!(
        sm.store.iter().all(|(n, _)| !n.starts_with("ftp-")),
        "left in the store: {:?}",
        sm.store.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    let _ = std::fs::remove_file(&log);
}
