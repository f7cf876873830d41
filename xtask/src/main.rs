//! Project tasks: `cargo xtask build-ebpf | test | vm-test | demo | bench | soak | fuzz`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

mod bench;
mod cpio;
mod fuzz;
mod vm;
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
    /// Build everything and run the whole test suite (unit and privileged end-to-end; root),
    /// then the kernel matrix (`vm-test`; skipped with --no-vm or MTLS_SKIP_VM=1).
    Test {
        /// Skip the kernel matrix.
        #[arg(long)]
        no_vm: bool,
        /// Extra arguments for `cargo test`, after `--` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The end-to-end suites (capture, tunnel, policy) under other kernels, in QEMU (root).
    VmTest {
        /// Kernels: `6.1`, `6.12` (newest of a series), `6.x` (newest of a major), or a Debian
        /// ABI name (`6.12.117+deb13`). Default: 5.10 (must be refused), 6.1, 6.12, 6.x, 7.x.
        kernels: Vec<String>,
        /// Bound on each guest, seconds.
        #[arg(long, default_value_t = vm::Options::default().timeout)]
        timeout: u64,
        /// Test threads inside each guest.
        #[arg(long, default_value_t = vm::Options::default().test_threads)]
        test_threads: u32,
        /// Refresh the private Debian package lists even if recent.
        #[arg(long)]
        refresh: bool,
        /// Arguments for each test binary in the guest, after `--` (a name filter, --skip).
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
        Task::Test { no_vm, args } => {
            let skip_env = std::env::var("MTLS_SKIP_VM").is_ok_and(|v| !v.is_empty() && v != "0");
            test(&args, no_vm || skip_env)
        }
        Task::VmTest { kernels, timeout, test_threads, refresh, args } => {
            let defaults = vm::Options::default();
            vm::run_cli(&vm::Options {
                kernels: if kernels.is_empty() { defaults.kernels } else { kernels },
                timeout,
                test_threads,
                test_args: args,
                refresh,
            })
        }
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

fn test(extra: &[String], no_vm: bool) -> Result<()> {
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
    // The fuzz targets are a workspace of their own that nothing else builds: check them here so
    // an API change that breaks one fails the suite instead of silently ending its fuzzing.
    fuzz::check_targets()?;
    // The end-to-end tests start the agent binary: build it first.
    run({
        let mut c = cargo(None);
        c.args(["build", "--quiet", "--workspace", "--bins"]);
        c
    })?;
    let mut c = cargo(None);
    // Every test binary runs even after a failure, so one run shows all that is broken.
    c.args(["test", "--workspace", "--no-fail-fast"]).args(extra);
    let (mut totals, suite) = run_tests_with_summary(c)?;
    // The kernel matrix runs after the main suite, even if that failed, and adds its counts.
    let mut vm_failed = Vec::new();
    if no_vm {
        println!("vm-test: skipped (--no-vm or MTLS_SKIP_VM)");
    } else {
        match vm::run_matrix(&vm::Options::default()) {
            Ok(outcomes) => {
                for o in outcomes {
                    totals.passed += o.passed;
                    totals.failed += o.failed;
                    totals.skipped += o.skipped;
                    if !o.ok {
                        vm_failed.push(o.spec.clone());
                        // A kernel that failed without a failed test still counts as one.
                        totals.failed += u64::from(o.failed == 0);
                    }
                }
            }
            Err(e) => {
                eprintln!("vm-test: {e:#}");
                totals.failed += 1;
                vm_failed.push("setup".into());
            }
        }
    }
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.skipped
    );
    suite?;
    if !vm_failed.is_empty() {
        bail!("vm-test failed on {}", vm_failed.join(", "));
    }
    Ok(())
}

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    skipped: u64,
}

/// Runs `cargo test`, passing its output through, and counts the results over all test
/// binaries, for the summary line (`tests: N passed, N failed, N skipped`) printed at the very
/// end. The second value is the run's own verdict.
fn run_tests_with_summary(mut c: Command) -> Result<(Totals, Result<()>)> {
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
    let totals = Totals { passed, failed, skipped: ignored };
    if !status.success() {
        return Ok((totals, Err(anyhow::anyhow!("{shown} failed: {status}"))));
    }
    Ok((totals, Ok(())))
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
