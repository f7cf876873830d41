//! `cargo xtask fuzz [--seconds N] [TARGET...]`: runs the cargo-fuzz targets of `fuzz/` one after
//! the other (the machine has two cores), each for N seconds, and fails if any found a crash, a
//! hang or a memory blow-up. Installs cargo-fuzz if it is missing.
//!
//! Each target reads its seeds from `fuzz/corpus/<target>/` (kept in the repository, small) and
//! grows a working corpus in `fuzz/target/corpus/<target>/` (ignored), so runs build on each
//! other without the repository's corpus growing. Findings land in `fuzz/artifacts/<target>/`;
//! reproduce one with `cargo +nightly fuzz run <target> <file>`.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

/// Every target of `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &["policy_parser", "workloads_parser", "hbone_inbound"];

/// The cargo-fuzz release line that builds with the installed toolchains.
const CARGO_FUZZ_VERSION: &str = "^0.13";

/// Per input: far above what any input needs (the HBONE target runs on paused time), so a
/// real-time stall is reported as a hang within seconds instead of libFuzzer's 20 minutes.
const INPUT_TIMEOUT_SECS: u32 = 30;

pub fn run(seconds: u64, targets: &[String]) -> Result<()> {
    if seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    let selected: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        let mut selected = Vec::new();
        for t in targets {
            match TARGETS.iter().find(|known| **known == t.as_str()) {
                Some(known) => selected.push(*known),
                None => bail!("unknown fuzz target {t:?}; the targets are {}", TARGETS.join(", ")),
            }
        }
        selected
    };
    ensure_cargo_fuzz()?;
    // The agent embeds the eBPF object at build time, also in the fuzz build.
    crate::build_ebpf()?;

    let fuzz_dir = crate::root().join("fuzz");
    let mut findings = Vec::new();
    for target in &selected {
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        let seeds = fuzz_dir.join("corpus").join(target);
        let work = fuzz_dir.join("target/corpus").join(target);
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let mut c = nightly_cargo();
        // The working corpus first: libFuzzer writes new inputs into the first directory only.
        c.args(["fuzz", "run", target]).arg(&work).arg(&seeds).arg("--").args([
            format!("-max_total_time={seconds}"),
            format!("-timeout={INPUT_TIMEOUT_SECS}"),
            "-print_final_stats=1".to_owned(),
        ]);
        if let Some(dict) = dictionary(&fuzz_dir, target) {
            c.arg(format!("-dict={}", dict.display()));
        }
        let shown = format!("{c:?}");
        let status = c.status().with_context(|| format!("running {shown}"))?;
        if !status.success() {
            findings.push(format!(
                "{target}: {status}; the input is in {}",
                fuzz_dir.join("artifacts").join(target).display()
            ));
        }
    }
    if !findings.is_empty() {
        bail!("fuzzing found problems:\n  {}", findings.join("\n  "));
    }
    eprintln!("xtask: no findings ({} s per target: {})", seconds, selected.join(", "));
    Ok(())
}

/// `cargo +nightly check` of every fuzz target (no sanitizers, no cargo-fuzz needed): what
/// `cargo xtask test` runs so that the targets keep compiling against the agent's API. The eBPF
/// object must exist (the agent embeds it).
pub fn check_targets() -> Result<()> {
    let mut c = nightly_cargo();
    c.args(["check", "--quiet", "--manifest-path", "fuzz/Cargo.toml", "--bins"]);
    // A check links nothing: pointing libfuzzer-sys at a prebuilt libFuzzer that is never used
    // spares compiling its C++ (time, and a C++ compiler the suite needs nowhere else).
    c.env("CUSTOM_LIBFUZZER_PATH", crate::root().join("fuzz/target/check-only/libfuzzer.a"));
    c.env("CUSTOM_LIBFUZZER_STD_CXX", "none");
    crate::run(c)
}

/// The libFuzzer dictionary of a target, if it has one.
fn dictionary(fuzz_dir: &Path, target: &str) -> Option<std::path::PathBuf> {
    let name = match target {
        "policy_parser" | "workloads_parser" => "yaml.dict",
        _ => return None,
    };
    Some(fuzz_dir.join("dict").join(name)).filter(|p| p.is_file())
}

/// `cargo +nightly`, without the variables `cargo run` set for xtask itself
/// (`CARGO_PKG_NAME=xtask`, ...): build scripts such as ring's rerun when they change, so
/// keeping them would rebuild half the fuzz build each time it alternates with a plain
/// `cargo +nightly fuzz`.
fn nightly_cargo() -> Command {
    let mut c = crate::cargo(Some("nightly"));
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_by_cargo_run = key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || matches!(key, "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE");
        if set_by_cargo_run {
            c.env_remove(key);
        }
    }
    c
}

fn ensure_cargo_fuzz() -> Result<()> {
    let works = nightly_cargo()
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)");
    let mut c = crate::cargo(None);
    c.args(["install", "--locked", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION]);
    crate::run(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target added to `fuzz/Cargo.toml` but not to [`TARGETS`] would be checked yet never
    /// fuzzed (and the other way round, `cargo fuzz run` would fail).
    #[test]
    fn targets_are_the_bins_of_the_fuzz_manifest() {
        let manifest = std::fs::read_to_string(crate::root().join("fuzz/Cargo.toml")).unwrap();
        let bins: Vec<&str> = manifest
            .split("[[bin]]")
            .skip(1)
            .filter_map(|section| {
                let line = section.lines().find(|l| l.trim_start().starts_with("name"))?;
                line.split('"').nth(1)
            })
            .collect();
        assert_eq!(bins, TARGETS);
    }
}
