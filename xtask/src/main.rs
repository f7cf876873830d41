//! Project tasks: `cargo xtask build-ebpf | test | demo`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

mod bench;
mod fuzz;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object (installs the nightly rust-src component and bpf-linker if missing).
    BuildEbpf,
    /// Build everything and run the whole test suite (unit and privileged end-to-end; root).
    Test {
        /// Extra arguments for `cargo test`, after `--` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the demo: the hipster-app workshop on this machine (root).
    Demo,
    /// Benchmarks: plain TCP vs mtls-agent vs a stunnel pair, same path, one run (root).
    Bench {
        /// Extra arguments for the bench program.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Load: 1,000 concurrent connections across 20 pods with churn, release build (root).
    Soak {
        /// How long to run.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Run the cargo-fuzz targets (policy parser, workloads parser, inbound HBONE handling).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::BuildEbpf => build_ebpf(),
        Task::Test { args } => test(&args),
        Task::Demo => demo(),
        Task::Bench { args } => bench::run(&args),
        Task::Soak { seconds } => soak(seconds),
        Task::Fuzz { seconds, targets } => fuzz::run(seconds, &targets),
    }
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// A cargo command run through rustup's proxy, free of the variables the outer cargo set, so
/// that `+nightly` and the target dir are honoured.
pub(crate) fn cargo(toolchain: Option<&str>) -> Command {
    let mut c = Command::new("cargo");
    if let Some(t) = toolchain {
        c.arg(format!("+{t}"));
    }
    for v in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "CARGO_TARGET_DIR",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        c.env_remove(v);
    }
    c.current_dir(root());
    c
}

pub(crate) fn run(mut c: Command) -> Result<()> {
    let shown = format!("{c:?}");
    let status = c.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

fn output(c: &mut Command) -> Result<String> {
    let out = c.stderr(Stdio::inherit()).output().with_context(|| format!("running {c:?}"))?;
    if !out.status.success() {
        bail!("{c:?} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ensure_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if installed.lines().any(|l| l.trim().starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("xtask: installing the nightly rust-src component (about 80 MB)");
    run({
        let mut c = Command::new("rustup");
        c.args(["component", "add", "rust-src", "--toolchain", "nightly"]);
        c
    })
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// bpf-linker 0.13 built against the nightly toolchain's own LLVM (22): its build wants an
/// LLVM prefix whose lib/ holds libLLVM.so, which we make from symlinks.
fn ensure_bpf_linker() -> Result<()> {
    let bin = cargo_home().join("bin/bpf-linker");
    let works = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Ok(());
    }
    let sysroot = output(
        Command::new("rustc")
            .env_remove("RUSTUP_TOOLCHAIN")
            .args(["+nightly", "--print", "sysroot"]),
    )
    .context("finding the nightly toolchain (rustc +nightly --print sysroot)")?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    // Outside the work tree: the installed linker keeps an rpath into this prefix.
    let home =
        std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    let prefix = home.join(".cache/mtls-agent/llvm-prefix");
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib)?;
    for name in ["libLLVM.so".to_owned(), llvm.clone()] {
        let link = plib.join(&name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&llvm), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!("xtask: building bpf-linker 0.13 against the nightly's LLVM (about a minute)");
    let mut c = cargo(None);
    c.env("LLVM_PREFIX", &prefix).args([
        "install",
        "--force",
        "--locked",
        "bpf-linker",
        "--version",
        "^0.13",
        "--no-default-features",
        "--features",
        "llvm-22",
    ]);
    run(c)
}

pub(crate) fn build_ebpf() -> Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    let mut c = cargo(Some("nightly"));
    c.args([
        "build",
        "--quiet",
        "-Z",
        "build-std=core",
        "--target",
        "bpfel-unknown-none",
        "--release",
        "-p",
        "mtls-agent-ebpf",
        "--features",
        "programs",
        "--bin",
        "mtls-agent-ebpf",
        "--target-dir",
        "target/ebpf",
    ]);
    // bpf-linker must be found on PATH.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths: Vec<PathBuf> = vec![cargo_home().join("bin")];
    paths.extend(std::env::split_paths(&path));
    c.env("PATH", std::env::join_paths(paths)?);
    run(c)
}

fn test(extra: &[String]) -> Result<()> {
    build_ebpf()?;
    run({
        let mut c = cargo(None);
        c.args(["fmt", "--all", "--check"]);
        c
    })?;
    run({
        let mut c = cargo(None);
        c.args(["clippy", "--quiet", "--workspace", "--all-targets", "--", "-D", "warnings"]);
        c
    })?;
    // The end-to-end tests start the agent binary: build it first.
    run({
        let mut c = cargo(None);
        c.args(["build", "--quiet", "--workspace", "--bins"]);
        c
    })?;
    let mut c = cargo(None);
    // Every test binary runs even after a failure, so one run shows all that is broken.
    c.args(["test", "--workspace", "--no-fail-fast"]).args(extra);
    run_tests_with_summary(c)
}

/// Runs `cargo test`, passing its output through, and ends with one summary line over all test
/// binaries (`tests: N passed, N failed, N skipped`), so the total is visible at the end.
fn run_tests_with_summary(mut c: Command) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let shown = format!("{c:?}");
    let mut child = c.stdout(Stdio::piped()).spawn().with_context(|| format!("running {shown}"))?;
    let stdout = child.stdout.take().context("test output")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |label: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim().strip_suffix(label)?.trim().rsplit(' ').next()?.parse().ok()
                    })
                    .unwrap_or(0)
            };
            passed += count("passed");
            failed += count("failed");
            ignored += count("ignored");
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

fn soak(seconds: u64) -> Result<()> {
    build_ebpf()?;
    run({
        let mut c = cargo(None);
        c.args(["build", "--quiet", "--release", "--workspace", "--bins"]);
        c
    })?;
    run({
        let mut c = cargo(None);
        c.env("MTLS_SOAK_SECONDS", seconds.to_string()).args([
            "test",
            "--release",
            "-p",
            "mtls-agent-e2e",
            "--test",
            "soak",
            "--",
            "--nocapture",
        ]);
        c
    })
}

fn demo() -> Result<()> {
    build_ebpf()?;
    run({
        let mut c = cargo(None);
        c.args(["build", "--quiet", "--workspace", "--bins"]);
        c
    })?;
    run({
        let mut c = cargo(None);
        c.args(["run", "--quiet", "-p", "mtls-agent-e2e", "--bin", "demo"]);
        c
    })
}
