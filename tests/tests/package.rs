//! The Debian package as an operator installs it: `dpkg -i` on this machine,
//! the unit checked by `systemd-analyze verify`, the daemon run by the
//! unit's own ExecStart line — under its capability bounding set, with its
//! environment file, speaking systemd's notification protocol — in a lab
//! namespace, FTP through it, then the unit's ExecStopPost takes the
//! datapath down; `dpkg --purge` at the end, also on failure.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use firewall_tests::{
    ftp::{check, sha256, Client, FtpServer},
    lab::{addr, Lab},
    notify::ServiceManager,
};

const UNIT: &str = "/usr/lib/systemd/system/firewall.service";

fn sh(script: &str) -> std::process::Output {
    Command::new("sh")
        .args(["-c", script])
        .output()
        .expect("running sh")
}

fn ok(script: &str) -> String {
    let out = sh(script);
    assert!(
        out.status.success(),
        "{script}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The package built by `cargo xtask package` (which `cargo xtask test` runs).
fn deb() -> PathBuf {
    let p = std::env::var_os("FIREWALL_DEB").map(PathBuf::from).expect(
        "FIREWALL_DEB is not set: build the package with `cargo xtask package` and point \
         FIREWALL_DEB at it (`cargo xtask test` does both)",
    );
    assert!(p.exists(), "{} does not exist", p.display());
    p
}

/// Installed for the test's duration; purged when dropped.
struct Installed;

impl Installed {
    fn new(deb: &Path) -> Self {
        let out = sh("dpkg-query -W -f='${Status}' firewall 2>/dev/null");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("installed"),
            "a firewall package is already installed on this machine; the test would replace it"
        );
        let me = Installed;
        ok(&format!("dpkg -i {}", deb.display()));
        me
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = sh("dpkg --purge firewall");
    }
}

/// `Key=value` lines of the unit's [Service] section.
fn unit_settings() -> BTreeMap<String, String> {
    std::fs::read_to_string(UNIT)
        .expect("the unit is installed")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// `setpriv` arguments that give a process what the unit gives the daemon:
/// the capability bounding set, and no new privileges.
fn as_the_unit_runs_it(settings: &BTreeMap<String, String>) -> Vec<String> {
    let caps: Vec<String> = settings["CapabilityBoundingSet"]
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert!(!caps.is_empty());
    vec![
        "setpriv".into(),
        format!("--bounding-set=-all,{}", caps.join(",")),
        "--inh-caps=-all".into(),
        "--no-new-privs".into(),
    ]
}

/// The environment file's `KEY=value` lines (comments skipped).
fn environment_file(path: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// A command line of the unit with `$VAR` expanded from `env` the way
/// systemd does for a whole word (an empty variable is no argument).
fn expand(line: &str, env: &[(String, String)]) -> Vec<String> {
    line.split_whitespace()
        .flat_map(|w| match w.strip_prefix('$') {
            Some(var) => env
                .iter()
                .find(|(k, _)| k == var)
                .map(|(_, v)| v.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default(),
            None => vec![w.to_string()],
        })
        .collect()
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = Command::new("/usr/bin/firewall-ctl").arg("down").output();
    }
}

#[test]
fn the_package_installs_and_its_unit_runs_the_firewall() {
    firewall_tests::require_root();
    let _turn = firewall_tests::exclusive();
    let deb = deb();
    let _installed = Installed::new(&deb);

    // What the package put where.
    for f in [
        "/usr/bin/firewall-ctl",
        UNIT,
        "/etc/firewall/firewall.toml",
        "/etc/default/firewall",
        "/usr/share/bash-completion/completions/firewall-ctl",
        "/usr/share/zsh/vendor-completions/_firewall-ctl",
        "/usr/share/doc/firewall/firewall.example.toml",
        "/usr/share/doc/firewall/copyright",
    ] {
        assert!(Path::new(f).exists(), "{f} not installed");
    }
    let page = ok("man -w firewall-ctl-up");
    assert!(page.contains("firewall-ctl-up.1"), "{page}");
    let conffiles = ok("dpkg-query --control-show firewall conffiles");
    assert!(
        conffiles.contains("/etc/firewall/firewall.toml"),
        "{conffiles}"
    );
    ok(&format!("systemd-analyze verify {UNIT}"));
    let completion = ok("bash -c '. /usr/share/bash-completion/completions/firewall-ctl && complete -p firewall-ctl'");
    assert!(completion.contains("firewall-ctl"), "{completion}");

    // The operator names the interfaces; the daemon runs as the unit runs it.
    let lab = Lab::create(&firewall_tests::lab::unique_prefix("pkg")).unwrap();
    let default = std::fs::read_to_string("/etc/default/firewall").unwrap();
    std::fs::write(
        "/etc/default/firewall",
        default
            .replace(
                "#FIREWALL_INTERNAL=eth1",
                &format!("FIREWALL_INTERNAL={}", addr::IF_INTERNAL),
            )
            .replace(
                "#FIREWALL_EXTERNAL=eth0",
                &format!("FIREWALL_EXTERNAL={}", addr::IF_EXTERNAL),
            ),
    )
    .unwrap();
    let settings = unit_settings();
    assert_eq!(settings["Type"], "notify");
    let env = environment_file(settings["EnvironmentFile"].trim_start_matches('-'));
    let mut argv = as_the_unit_runs_it(&settings);
    argv.extend(expand(&settings["ExecStart"], &env));
    let mut sm = ServiceManager::new(&lab.prefix);
    let log = std::env::temp_dir().join(format!("{}-daemon.log", lab.prefix));
    let mut cmd = lab.fw.cmd(&argv[0]);
    cmd.args(&argv[1..])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("NOTIFY_SOCKET", &sm.path)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut daemon = Daemon(cmd.spawn().expect("starting the daemon as the unit does"));
    sm.until("READY=1", 30, &log);

    // FTP through it, active and passive, with the unit's capabilities.
    let server = FtpServer::start(&lab.server, &lab.prefix).unwrap();
    let file = server.random_file("pkg.bin", 1024 * 1024 + 3).unwrap();
    for c in [Client::CurlPassive, Client::CurlActive] {
        let got = std::env::temp_dir().join(format!("{}-got.bin", lab.prefix));
        check(c.name(), &c.download(&lab.client, "pkg.bin", &got));
        assert_eq!(sha256(&got), sha256(&file), "{}", c.name());
        let _ = std::fs::remove_file(&got);
    }

    // systemctl stop: SIGTERM; the daemon leaves the datapath (it may be a
    // restart) and ExecStopPost, seeing no restart job, takes it down.
    ok(&format!("kill -TERM {}", daemon.0.id()));
    let status = daemon.0.wait().unwrap();
    assert!(
        status.success(),
        "{status}; log: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        Path::new("/sys/fs/bpf/firewall/FLOWS").exists(),
        "--keep-datapath kept it"
    );
    let mut stop_post = as_the_unit_runs_it(&settings);
    stop_post.extend(["sh".into(), "-c".into()]);
    let script = settings["ExecStopPost"]
        .strip_prefix("/bin/sh -c '")
        .and_then(|s| s.strip_suffix('\''))
        .expect("ExecStopPost is a sh -c script");
    // `$$` is systemd's escape for a `$` the shell is to see.
    stop_post.push(script.replace("$$", "$"));
    let out = Command::new(&stop_post[0])
        .args(&stop_post[1..])
        .env("SERVICE_RESULT", "success")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        !Path::new("/sys/fs/bpf/firewall/FLOWS").exists(),
        "ExecStopPost left the datapath: {out:?}"
    );
    std::fs::remove_file(&log).ok();
}
