//! Real FTP peers in the lab: vsftpd on the server, and curl, lftp and
//! Python's ftplib on the client.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::Duration,
};

use anyhow::{bail, Context as _};

use crate::{
    daemon::LabRun,
    lab::{addr, Ns},
    traffic::{wait_listening, Peer},
};

/// The configuration that proxies outbound FTP control connections (the
/// default), named where a test is about the proxy itself.
pub const PROXY: &str = "[ftp]\ncontrol = \"proxy\"\n";
/// The configuration that reads them in place.
pub const IN_PLACE: &str = "[ftp]\ncontrol = \"in-place\"\n";

/// vsftpd on the lab's server (anonymous, downloads from `root`, uploads to
/// `root/incoming`, active and passive mode); stopped when dropped.
pub struct FtpServer {
    pub dir: PathBuf,
    /// The anonymous root: files to download go here.
    pub root: PathBuf,
    _daemon: Peer,
}

impl FtpServer {
    pub fn start(ns: &Ns, tag: &str) -> anyhow::Result<Self> {
        Self::start_on(ns, tag, 21)
    }

    /// The same on another control port.
    pub fn start_on(ns: &Ns, tag: &str, port: u16) -> anyhow::Result<Self> {
        Self::vsftpd(ns, tag, port, "")
    }

    /// vsftpd that also connects to addresses other than the client's
    /// (`port_promiscuous`): what a server fooled by a disguised PORT would do.
    pub fn start_promiscuous(ns: &Ns, tag: &str) -> anyhow::Result<Self> {
        Self::vsftpd(ns, tag, 21, "port_promiscuous=YES\n")
    }

    /// ProFTPD (Debian's, a private copy: see xtask's setup) on port 21, anonymous like vsftpd,
    /// allowing data connections to other hosts (`AllowForeignAddress`).
    /// ProFTPD removes Telnet commands anywhere in a command line.
    pub fn start_proftpd(ns: &Ns, tag: &str) -> anyhow::Result<Self> {
        let (dir, root) = Self::dirs(tag)?;
        let conf = dir.join("proftpd.conf");
        fs::write(
            &conf,
            format!(
                "ServerName lab\nServerType standalone\nDefaultServer on\nPort 21\n\
                 DefaultAddress {server}\nSocketBindTight on\nUseIPv6 off\nUser nobody\n\
                 Group nogroup\nUmask 022\nMaxInstances 500\nScoreboardFile {dir}/scoreboard\n\
                 PidFile {dir}/proftpd.pid\nDelayTable none\nWtmpLog off\nUseReverseDNS off\n\
                 RequireValidShell off\nAllowForeignAddress on\nPassivePorts 41000 41999\n\
                 <Anonymous {root}>\n  User ftp\n  Group nogroup\n  UserAlias anonymous ftp\n\
                 RequireValidShell off\n  <Directory incoming>\n    <Limit STOR>\n      AllowAll\n\
                 </Limit>\n  </Directory>\n</Anonymous>\n",
                server = addr::SERVER,
                dir = dir.display(),
                root = root.display(),
            ),
        )?;
        let bin = std::path::Path::new(firewall_lab::PROFTPD_ROOT).join("usr/sbin/proftpd");
        let daemon = ns
            .cmd(bin.to_str().expect("utf-8 path"))
            .args(["-n", "-q", "-c"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting proftpd (`cargo xtask setup` unpacks it)")?;
        let daemon = Peer::new(daemon);
        wait_listening(ns, 21);
        Ok(Self {
            dir,
            root,
            _daemon: daemon,
        })
    }

    /// The server's directory and its anonymous root (with `incoming/`).
    fn dirs(tag: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let dir = std::env::temp_dir().join(format!("{tag}-ftpd"));
        let _ = fs::remove_dir_all(&dir);
        let root = dir.join("root");
        fs::create_dir_all(root.join("incoming"))?;
        fs::create_dir_all(dir.join("empty"))?;
        // vsftpd refuses a writable anonymous root; uploads go to a subdirectory.
        chmod(&dir, 0o755)?;
        chmod(&root, 0o755)?;
        chmod(&root.join("incoming"), 0o777)?;
        Ok((dir, root))
    }

    /// vsftpd on port 21 of the lab's internal client (a server to publish).
    pub fn start_inside(ns: &Ns, tag: &str) -> anyhow::Result<Self> {
        Self::vsftpd_at(ns, tag, addr::CLIENT, 21, "")
    }

    fn vsftpd(ns: &Ns, tag: &str, port: u16, extra: &str) -> anyhow::Result<Self> {
        Self::vsftpd_at(ns, tag, addr::SERVER, port, extra)
    }

    fn vsftpd_at(ns: &Ns, tag: &str, listen: &str, port: u16, extra: &str) -> anyhow::Result<Self> {
        let (dir, root) = Self::dirs(tag)?;
        let conf = dir.join("vsftpd.conf");
        // isolate/isolate_network off: vsftpd would make namespaces for every
        // session (milliseconds each), which buries what the firewall costs.
        fs::write(
            &conf,
            format!(
                "listen=YES\nlisten_ipv6=NO\nlisten_address={server}\nlisten_port={port}\n\
                 background=NO\nanonymous_enable=YES\nlocal_enable=NO\nno_anon_password=YES\n\
                 anon_root={root}\nwrite_enable=YES\nanon_upload_enable=YES\nanon_umask=022\n\
                 anon_other_write_enable=YES\nseccomp_sandbox=NO\npasv_enable=YES\nport_enable=YES\n\
                 pasv_min_port=40000\npasv_max_port=40999\nsecure_chroot_dir={empty}\n\
                 xferlog_enable=NO\nuse_sendfile=YES\nftp_username=ftp\nidle_session_timeout=120\n\
                 data_connection_timeout=120\nasync_abor_enable=YES\n\
                 max_clients=0\nmax_per_ip=0\nisolate=NO\nisolate_network=NO\n{extra}",
                server = listen,
                root = root.display(),
                empty = dir.join("empty").display(),
            ),
        )?;
        let daemon = ns
            .cmd("vsftpd")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting vsftpd (apt package vsftpd)")?;
        let daemon = Peer::new(daemon);
        wait_listening(ns, port);
        Ok(Self {
            dir,
            root,
            _daemon: daemon,
        })
    }

    /// A file of `bytes` random bytes in the server's root; its path.
    pub fn random_file(&self, name: &str, bytes: u64) -> anyhow::Result<PathBuf> {
        let path = self.root.join(name);
        random_file(&path, bytes)?;
        Ok(path)
    }

    pub fn uploaded(&self, name: &str) -> PathBuf {
        self.root.join("incoming").join(name)
    }
}

impl Drop for FtpServer {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn chmod(p: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
}

/// SHA-256 of a file, for byte-for-byte comparisons of big transfers.
pub fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// An FTP client run in the client namespace.
pub enum Client {
    /// curl, passive (EPSV, then PASV).
    CurlPassive,
    /// curl with `--disable-epsv`: PASV only.
    CurlPasv,
    /// curl `-P -`: active (EPRT, then PORT).
    CurlActive,
    /// curl `-P - --disable-eprt`: PORT only.
    CurlPort,
    LftpPassive,
    LftpActive,
    /// Python's ftplib (PASV).
    FtplibPassive,
    /// Python's ftplib with `set_pasv(False)` (PORT).
    FtplibActive,
}

impl Client {
    pub const ALL: [Client; 8] = [
        Client::CurlPassive,
        Client::CurlPasv,
        Client::CurlActive,
        Client::CurlPort,
        Client::LftpPassive,
        Client::LftpActive,
        Client::FtplibPassive,
        Client::FtplibActive,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Client::CurlPassive => "curl (passive, EPSV)",
            Client::CurlPasv => "curl (passive, PASV)",
            Client::CurlActive => "curl -P - (active, EPRT)",
            Client::CurlPort => "curl -P - (active, PORT)",
            Client::LftpPassive => "lftp (passive)",
            Client::LftpActive => "lftp (active)",
            Client::FtplibPassive => "ftplib (passive)",
            Client::FtplibActive => "ftplib set_pasv(False) (active)",
        }
    }

    pub fn active(&self) -> bool {
        matches!(
            self,
            Client::CurlActive | Client::CurlPort | Client::LftpActive | Client::FtplibActive
        )
    }

    fn curl_flags(&self) -> &'static str {
        match self {
            Client::CurlPasv => "--disable-epsv",
            Client::CurlActive => "-P -",
            Client::CurlPort => "-P - --disable-eprt",
            _ => "",
        }
    }

    fn lftp_mode(&self) -> &'static str {
        if self.active() {
            "set ftp:passive-mode off;"
        } else {
            "set ftp:passive-mode on;"
        }
    }

    /// Downloads `name` from the server into `to`.
    pub fn download(&self, ns: &Ns, name: &str, to: &Path) -> Output {
        let to = to.display();
        self.run(
            ns,
            &format!("-o '{to}' 'ftp://{}/{name}'", addr::SERVER),
            &format!("get {name} -o {to}"),
            &format!("out=open('{to}','wb'); f.retrbinary('RETR {name}', out.write); out.close()"),
        )
    }

    /// Uploads `from` to the server's `incoming/name`.
    pub fn upload(&self, ns: &Ns, from: &Path, name: &str) -> Output {
        let from = from.display();
        self.run(
            ns,
            &format!("-T '{from}' 'ftp://{}/incoming/{name}'", addr::SERVER),
            &format!("put {from} -o incoming/{name}"),
            &format!(
                "src=open('{from}','rb'); f.storbinary('STOR incoming/{name}', src); src.close()"
            ),
        )
    }

    /// The directory listing of the server's root.
    pub fn list(&self, ns: &Ns) -> Output {
        self.run(
            ns,
            &format!("'ftp://{}/'", addr::SERVER),
            "ls",
            "f.retrlines('LIST')",
        )
    }

    /// One operation, said the way each tool says it: curl arguments, an lftp
    /// command, or Python run on a logged-in ftplib.FTP `f`.
    fn run(&self, ns: &Ns, curl: &str, lftp: &str, ftplib: &str) -> Output {
        match self {
            Client::CurlPassive | Client::CurlPasv | Client::CurlActive | Client::CurlPort => sh(
                ns,
                &format!(
                    "curl -sS --connect-timeout 15 --max-time 300 {} {curl}",
                    self.curl_flags()
                ),
            ),
            Client::LftpPassive | Client::LftpActive => sh(
                ns,
                &format!(
                    "lftp -c '{} set net:max-retries 1; set net:timeout 20; open -u anonymous,x@ {}; {lftp}'",
                    self.lftp_mode(),
                    addr::SERVER
                ),
            ),
            Client::FtplibPassive | Client::FtplibActive => python(
                ns,
                &format!(
                    "f=ftplib.FTP('{}', timeout=60); f.login(); f.set_pasv({})\n{ftplib}\nf.quit()",
                    addr::SERVER,
                    if self.active() { "False" } else { "True" }
                ),
            ),
        }
    }
}

fn sh(ns: &Ns, script: &str) -> Output {
    ns.cmd("sh")
        .args(["-c", script])
        .stdin(Stdio::null())
        .output()
        .expect("running a client")
}

/// Runs Python code with ftplib imported.
pub fn python(ns: &Ns, code: &str) -> Output {
    ns.cmd("python3")
        .args(["-c", &format!("import ftplib, sys\n{code}")])
        .stdin(Stdio::null())
        .output()
        .expect("running python3")
}

/// Writes `bytes` random bytes to `path`, readable by everyone (servers
/// serve files as unprivileged users).
pub fn random_file(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let status = Command::new("sh")
        .args([
            "-c",
            &format!(
                "head -c {bytes} /dev/urandom > '{}' && chmod 644 '{}'",
                path.display(),
                path.display()
            ),
        ])
        .status()?;
    if !status.success() {
        bail!("writing {}", path.display());
    }
    Ok(())
}

/// Succeeded, or panics with what the client said.
pub fn check(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits for `cond`, polling.
pub fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..secs * 10 {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(100));
    }
    false
}

/// A file in the temporary directory, named for the lab run.
pub fn scratch(run: &LabRun, name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{}-{name}", run.lab.prefix))
}

/// A counter of the FTP filter (`status`'s `ftp`).
pub fn ftp_stat(run: &LabRun, key: &str) -> u64 {
    run.fw.status()["ftp"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no ftp.{key}"))
}

/// Every client, active and passive: download, listing and upload, checked
/// byte for byte; the data connections are pinholes (kernel or user mode).
/// Each client's control connection is counted by the filter.
pub fn every_client(run: &LabRun, server: &FtpServer) {
    let file = server
        .random_file("small.bin", 3 * 1024 * 1024 + 17)
        .unwrap();
    let want = sha256(&file);
    for (i, c) in Client::ALL.iter().enumerate() {
        let got = scratch(run, &format!("dl{i}"));
        check(c.name(), &c.download(&run.lab.client, "small.bin", &got));
        assert_eq!(sha256(&got), want, "{}", c.name());
        let _ = std::fs::remove_file(&got);
        let listing = c.list(&run.lab.client);
        check(c.name(), &listing);
        assert!(
            String::from_utf8_lossy(&listing.stdout).contains("small.bin"),
            "{}",
            c.name()
        );
        let up = format!("up{i}.bin");
        check(c.name(), &c.upload(&run.lab.client, &file, &up));
        assert_eq!(sha256(&server.uploaded(&up)), want, "{}", c.name());
    }
    // Four active and four passive clients, three transfers each.
    assert!(ftp_stat(run, "active_opened") >= 12);
    assert!(ftp_stat(run, "passive_opened") >= 12);
    assert_eq!(ftp_stat(run, "bounces_refused"), 0);
    assert_eq!(ftp_stat(run, "control_connections"), 24);
}

/// An ftplib client sends PORT/EPRT naming another internal host, an
/// external third party, a privileged port and port 0, each of which must
/// be answered with a 500, then a NOOP (the session goes on) and QUIT.
pub fn bounce_attempts(ns: &Ns) -> Output {
    python(
        ns,
        &format!(
            "f=ftplib.FTP('{server}', timeout=30); f.login()\n\
             for cmd in ['PORT 10,1,0,3,0,25', 'PORT 10,2,0,3,0,25', 'PORT 10,1,0,2,0,22', 'EPRT |1|10.1.0.3|2525|', 'PORT 10,1,0,2,0,0']:\n\
             \x20   try:\n\
             \x20       r = f.sendcmd(cmd)\n\
             \x20       sys.exit('not refused: ' + cmd + ' -> ' + r)\n\
             \x20   except ftplib.error_perm as e:\n\
             \x20       print(cmd, '->', e)\n\
             \x20       assert str(e).startswith('500'), e\n\
             print('NOOP ->', f.sendcmd('NOOP'))\n\
             f.quit()",
            server = addr::SERVER
        ),
    )
}

/// curl (passive and active), ftplib (active) and lftp (passive) each
/// download `name` from the lab's server through `run`'s firewall, checked
/// byte for byte against `file`.
pub fn four_clients_download(run: &LabRun, file: &Path, name: &str) {
    let want = sha256(file);
    for c in [
        Client::CurlPassive,
        Client::CurlActive,
        Client::FtplibActive,
        Client::LftpPassive,
    ] {
        let got = scratch(run, name);
        check(c.name(), &c.download(&run.lab.client, name, &got));
        assert_eq!(sha256(&got), want, "{}", c.name());
        let _ = std::fs::remove_file(&got);
    }
}

/// `bounce_attempts` through `run`'s firewall, whose output must contain
/// `answer`: three bounces and two other refusals counted, nothing opened,
/// the first bounce logged.
pub fn bounces_refused(run: &LabRun, answer: &str) {
    let out = bounce_attempts(&run.lab.client);
    check("bounce attempts", &out);
    assert!(String::from_utf8_lossy(&out.stdout).contains(answer));
    assert_eq!(ftp_stat(run, "bounces_refused"), 3);
    assert_eq!(ftp_stat(run, "commands_refused"), 2);
    assert_eq!(ftp_stat(run, "active_opened"), 0);
    assert!(run.fw.list("pinholes").is_empty());
    assert!(run
        .fw
        .log_text()
        .contains("refused PORT naming 10.1.0.3:25"));
}
