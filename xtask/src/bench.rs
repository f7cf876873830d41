//! `cargo xtask bench`: installs the load tools if missing (Debian packages), builds everything
//! in release (eBPF included) and runs the bench program (`tests/bin/bench.rs`) as root.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Debian packages the bench runs: `iperf3` for bulk throughput, `stunnel4` for the
/// hand-made TLS tunnel it compares against, `openssl` to make that tunnel's certificates.
const PACKAGES: &[&str] = &["iperf3", "stunnel4", "openssl"];

pub fn run(args: &[String]) -> Result<()> {
    if !is_root()? {
        bail!("the bench builds network namespaces, cgroups and eBPF programs: run it as root");
    }
    ensure_packages(PACKAGES)?;
    crate::build_ebpf()?;
    crate::run({
        let mut c = crate::cargo(None);
        c.args(["build", "--release", "--workspace", "--bins"]);
        c
    })?;
    // From target/release, so that the test bed starts the release agent next to it.
    let bin = crate::root().join("target/release/bench");
    let mut c = Command::new(&bin);
    c.args(args).current_dir(crate::root());
    crate::run(c)
}

/// Effective uid 0, from /proc (xtask has no libc dependency).
fn is_root() -> Result<bool> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .context("no Uid line in /proc/self/status")?;
    Ok(euid == "0")
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.ends_with(b"install ok installed"))
}

/// `apt-get update` and `apt-get install -y` only for what is missing, so repeated runs do not
/// touch the network.
fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        // iperf3's package asks whether to start a daemon; the answer must be the default (no).
        c.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        c
    };
    crate::run(apt(&["update"]))?;
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(&missing);
    crate::run(apt(&install))
}
