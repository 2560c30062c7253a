//! `cargo xtask package`: the Debian package (cargo-deb), with man pages and
//! shell completions generated from the CLI's clap definitions, checked by
//! lintian.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::run_stdout;

/// Where the generated man pages and completions go (cargo-deb's assets;
/// git ignores it).
const GENERATED: &str = "packaging/generated";

/// Builds the release binary and the package; returns the .deb's path.
pub fn package(root: &Path) -> anyhow::Result<PathBuf> {
    crate::setup::package_tools()?;
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "firewall-ctl"])
        .current_dir(root)
        .status()
        .context("cargo build --release -p firewall-ctl")?;
    if !status.success() {
        bail!("cargo build --release -p firewall-ctl failed ({status})");
    }
    let bin = root.join("target/release/firewall-ctl");
    let generated = root.join(GENERATED);
    let _ = fs::remove_dir_all(&generated);
    fs::create_dir_all(generated.join("completions"))?;
    run_stdout(Command::new(&bin).arg("man").arg(generated.join("man")))
        .context("generating the man pages")?;
    for (shell, file) in [
        ("bash", "firewall-ctl.bash"),
        ("zsh", "_firewall-ctl"),
        ("fish", "firewall-ctl.fish"),
    ] {
        let script = run_stdout(Command::new(&bin).args(["completions", shell]))
            .with_context(|| format!("generating the {shell} completions"))?;
        fs::write(generated.join("completions").join(file), script)?;
    }
    let out = run_stdout(
        Command::new("cargo")
            .args([
                "deb",
                "-p",
                "firewall-ctl",
                "--no-build",
                "-o",
                "target/debian/",
            ])
            .current_dir(root),
    )
    .context("cargo deb")?;
    let deb = out
        .lines()
        .rev()
        .find(|l| l.trim().ends_with(".deb"))
        .map(|l| root.join(l.trim()))
        .context("cargo deb printed no package path")?;
    // Errors fail the package; warnings are shown. The first upload of a
    // package outside Debian closes no ITP bug.
    let lint = Command::new("lintian")
        .args([
            "--fail-on",
            "error",
            "--suppress-tags",
            "initial-upload-closes-no-bugs",
        ])
        .arg(&deb)
        .status()
        .context("running lintian (a setup package)")?;
    if !lint.success() {
        bail!("lintian found errors in {}", deb.display());
    }
    println!("xtask: package {} (lintian: no errors)", deb.display());
    Ok(deb)
}
