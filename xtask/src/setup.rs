//! Idempotent installation of everything the build and the tests need.
//!
//! Each step checks first and changes nothing when its part is in place, so
//! on a prepared machine the whole setup takes a few seconds.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::{run, run_stdout};

/// Debian packages: the lab (iproute2, ethtool, ping, traceroute, tracepath), inspection
/// (bpftool), the peers (python3 for ftplib), and the metrics test's parser
/// (python3-prometheus-client), TFTP's server and client (tftpd-hpa, tftp-hpa; the
/// server runs only inside the lab, its system service is turned off), the package's checks (lintian, man-db and
/// systemd for `systemd-analyze verify`).
pub const APT_PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "ethtool",
    "iputils-ping",
    "iputils-tracepath",
    "traceroute",
    "socat",
    "curl",
    "lftp",
    "vsftpd",
    "tftpd-hpa",
    "tftp-hpa",
    "python3",
    "python3-prometheus-client",
    "iperf3",
    "nftables",
    "conntrack",
    "netsniff-ng",
    "tcpdump",
    "util-linux",
    "lintian",
    "man-db",
    "systemd",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.1";
const CARGO_DEB_VERSION: &str = "3.8.0";

pub fn setup() -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!(
            "setup needs root (apt-get, bpffs, and later BPF and network namespaces): run as root"
        );
    }
    apt_packages()?;
    rust_src()?;
    bpf_linker()?;
    bpffs()?;
    proftpd()?;
    Ok(())
}

pub use firewall_lab::PROFTPD_ROOT;

fn proftpd() -> anyhow::Result<()> {
    let bin = Path::new(PROFTPD_ROOT).join("usr/sbin/proftpd");
    let works = Command::new(&bin)
        .arg("-v")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if works {
        step("proftpd (private copy)", false);
        return Ok(());
    }
    let tmp = std::env::temp_dir().join("firewall-setup-proftpd");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    run(Command::new("apt-get")
        .args(["download", "proftpd-core"])
        .current_dir(&tmp))
    .context("apt-get download proftpd-core")?;
    let deb = fs::read_dir(&tmp)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    // Its libraries (and the few tools its Depends name), by package name.
    let depends = run_stdout(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .arg("Depends"),
    )?;
    let names: Vec<String> = depends
        .split(',')
        .filter_map(|d| d.split('|').next())
        .filter_map(|d| d.split_whitespace().next())
        .map(str::to_string)
        .collect();
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&names)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("installing proftpd-core's libraries")?;
    fs::create_dir_all(PROFTPD_ROOT)?;
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(PROFTPD_ROOT))
    .context("unpacking proftpd-core")?;
    let _ = fs::remove_dir_all(&tmp);
    step("proftpd (private copy)", true);
    Ok(())
}

fn step(name: &str, changed: bool) {
    println!(
        "setup: {name}: {}",
        if changed { "installed" } else { "ok" }
    );
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| !String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        step("apt packages", false);
        return Ok(());
    }
    println!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))
        .context("apt-get update (needs the Debian mirror)")?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("apt-get install {}", missing.join(" ")))?;
    if missing.contains(&"tftpd-hpa") {
        // The tests run in.tftpd inside their namespaces; the host needs no TFTP server.
        let _ = Command::new("systemctl")
            .args(["disable", "--now", "tftpd-hpa"])
            .output();
    }
    step("apt packages", true);
    Ok(())
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let out = run_stdout(Command::new("rustc").args(["+nightly", "--print", "sysroot"])).context(
        "the nightly toolchain is missing (`rustup toolchain list`); it cannot be downloaded here, see docs/building.md",
    )?;
    Ok(PathBuf::from(out.trim()))
}

fn rust_src() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
    {
        step("rust-src (nightly)", false);
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("rustup component add rust-src --toolchain nightly")?;
    step("rust-src (nightly)", true);
    Ok(())
}

/// rustfmt and clippy for `cargo xtask lint`, on the stable toolchain (host
/// crates) and the nightly one (the eBPF crate).
pub fn lint_tools() -> anyhow::Result<()> {
    for toolchain in ["stable", "nightly"] {
        for (component, probe) in [("rustfmt", "fmt"), ("clippy", "clippy")] {
            let works = Command::new("cargo")
                .args([&format!("+{toolchain}"), probe, "--version"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            let name = format!("{component} ({toolchain})");
            if works {
                step(&name, false);
                continue;
            }
            run(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                toolchain,
            ]))
            .with_context(|| format!("rustup component add {component} --toolchain {toolchain}"))?;
            step(&name, true);
        }
    }
    Ok(())
}

fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        });
    home.join("bin").join(name)
}

/// cargo-fuzz, for `cargo xtask fuzz` (the fuzz targets build with the
/// nightly toolchain and libFuzzer).
pub fn cargo_fuzz() -> anyhow::Result<()> {
    cargo_tool("cargo-fuzz", CARGO_FUZZ_VERSION)
}

/// cargo-deb and lintian, for `cargo xtask package`.
pub fn package_tools() -> anyhow::Result<()> {
    cargo_tool("cargo-deb", CARGO_DEB_VERSION)
}

/// A cargo subcommand at a pinned version, built once.
fn cargo_tool(name: &str, version: &str) -> anyhow::Result<()> {
    let works = Command::new(cargo_bin(name))
        .arg("--version")
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(version))
        .unwrap_or(false);
    if works {
        step(name, false);
        return Ok(());
    }
    println!("setup: building {name} {version} (about a minute)");
    run(Command::new("cargo").args(["install", name, "--version", version, "--locked"]))
        .with_context(|| format!("cargo install {name}"))?;
    step(name, true);
    Ok(())
}

/// The LLVM major of the nightly, which bpf-linker must be built against.
fn nightly_llvm_major() -> anyhow::Result<String> {
    let vv = run_stdout(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let line = vv
        .lines()
        .find(|l| l.starts_with("LLVM version:"))
        .context("rustc +nightly -vV prints no LLVM version")?;
    let version = line.trim_start_matches("LLVM version:").trim();
    Ok(version.split('.').next().unwrap_or_default().to_string())
}

fn bpf_linker() -> anyhow::Result<()> {
    let bin = cargo_bin("bpf-linker");
    let works = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if works {
        step("bpf-linker", false);
        return Ok(());
    }
    let sysroot = nightly_sysroot()?;
    let lib = sysroot.join("lib");
    let so = fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {} (is the nightly complete?)",
                lib.display()
            )
        })?;
    let link = lib.join("libLLVM.so");
    if fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink(&so, &link)
            .with_context(|| format!("symlinking {}", link.display()))?;
    }
    let llvm = nightly_llvm_major()?;
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {llvm} (about 90 s)");
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{llvm}")])
        .env("LLVM_PREFIX", &sysroot))
    .context("cargo install bpf-linker")?;
    step("bpf-linker", true);
    Ok(())
}

fn bpffs_mounted(dir: &Path) -> bool {
    fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 2 && f[2] == "bpf" && Path::new(f[1]) == dir
            })
        })
        .unwrap_or(false)
}

fn bpffs() -> anyhow::Result<()> {
    let dir = Path::new("/sys/fs/bpf");
    if bpffs_mounted(dir) {
        step("bpffs on /sys/fs/bpf", false);
        return Ok(());
    }
    fs::create_dir_all(dir).ok();
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
        .context("mounting bpffs on /sys/fs/bpf")?;
    step("bpffs on /sys/fs/bpf", true);
    Ok(())
}
