//! `cargo xtask vm-test [KERNEL...]`: the privileged end-to-end suites under other kernels.
//!
//! Debian's cloud kernels are fetched with `apt-get download` under a private apt configuration
//! (own sources list, lists, state and archive cache; the machine's apt setup is never read or
//! changed) and cached, so a second run downloads nothing. Each kernel boots under QEMU with
//! software emulation and a newc initramfs made here: busybox-static (also from Debian), the
//! kernel's network modules, the agent, `e2e-tool` and the end-to-end test binaries exactly as
//! the main suite built them (debug info stripped), with the C library and loader they link
//! against, so the matrix compiles nothing of its own. The guest's /init mounts what the test bed needs, runs the suites and powers off;
//! the serial console is logged and parsed. A kernel the agent cannot serve must be refused with
//! the agent's one-line explanation.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};

use crate::{cargo, cpio, root, run};

/// The default matrix: the oldest supported LTS, the current LTS, the newest of each major the
/// archive has, and a kernel that must be refused.
pub const DEFAULT_KERNELS: &[&str] = &["5.10", "6.1", "6.12", "6.x", "7.x"];

/// The suites run in every guest, in this order.
const SUITES: &[&str] = &["capture", "tunnel", "policy"];

/// Load tests left to the host suite: under emulation they alone would take about a minute per
/// kernel (the thousand-connection map-leak test).
const SKIPPED_IN_GUESTS: &[&str] =
    &["original_destination_map_is_empty_after_a_thousand_connections"];

/// Modules the test bed needs that Debian builds as modules (the rest is built in).
const MODULES: &[&str] = &["veth", "bridge", "sch_ingress", "cls_bpf"];

/// Kernels below this must be refused, naming this feature.
const FLOOR: (u32, u32) = (5, 15);
const FLOOR_FEATURE: &str = "bpf_get_netns_cookie in sock_ops programs";

const SOURCES: &[(&str, &str)] = &[
    ("http://deb.debian.org/debian-security", "bullseye-security"),
    ("http://deb.debian.org/debian", "bookworm"),
    ("http://deb.debian.org/debian", "bookworm-backports"),
    ("http://deb.debian.org/debian", "trixie"),
    ("http://deb.debian.org/debian", "trixie-backports"),
];
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Package lists older than this are refreshed (a newer kernel may have appeared).
const LISTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, Clone)]
pub struct Options {
    pub kernels: Vec<String>,
    /// Per-guest bound, seconds.
    pub timeout: u64,
    /// `--test-threads` of the test binaries in the guest.
    pub test_threads: u32,
    /// Arguments for every test binary (a name filter, `--skip`, ...).
    pub test_args: Vec<String>,
    /// Refresh the package lists even if they are recent.
    pub refresh: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            kernels: DEFAULT_KERNELS.iter().map(|s| s.to_string()).collect(),
            timeout: 480,
            test_threads: 2,
            test_args: Vec::new(),
            refresh: false,
        }
    }
}

/// What one guest did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub spec: String,
    pub version: String,
    pub boot: Option<Duration>,
    pub tests: Option<Duration>,
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
    pub ok: bool,
    pub note: String,
    /// Names of the tests that failed, when nothing else went wrong (no crash, no timeout):
    /// those may be retried once.
    pub failed_tests: Vec<String>,
    /// The guest kernel panicked.
    pub panicked: bool,
}

impl Outcome {
    /// A kernel that produced no results (set-up failed): `note` says why.
    fn failed(spec: &str, version: &str, note: String) -> Outcome {
        Outcome {
            spec: spec.to_owned(),
            version: version.to_owned(),
            boot: None,
            tests: None,
            passed: 0,
            failed: 0,
            skipped: 0,
            ok: false,
            note,
            failed_tests: Vec::new(),
            panicked: false,
        }
    }
}

impl Outcome {
    pub fn line(&self) -> String {
        let secs = |d: Option<Duration>| match d {
            Some(d) => format!("{:.1} s", d.as_secs_f64()),
            None => "-".into(),
        };
        format!(
            "vm-test: Linux {:<10} ({:>4}): boot {:>7}, tests {:>7}: {} passed, {} failed, {} skipped: {}{}",
            self.version,
            self.spec,
            secs(self.boot),
            secs(self.tests),
            self.passed,
            self.failed,
            self.skipped,
            if self.ok { "ok" } else { "FAILED" },
            if self.note.is_empty() { String::new() } else { format!(" ({})", self.note) }
        )
    }
}

/// Runs the matrix, printing one line per kernel; returns the outcomes (the caller decides how
/// to fail).
pub fn run_matrix(opts: &Options) -> Result<Vec<Outcome>> {
    check_host_tools()?;
    let cache = cache_dir();
    let work = root().join("target/vm");
    fs::create_dir_all(&work)?;
    let apt = Apt::new(&cache.join("apt"))?;
    apt.update_if_stale(opts.refresh)?;

    let mut kernels = Vec::new();
    for spec in &opts.kernels {
        let k = apt.resolve_kernel(spec)?;
        eprintln!("vm-test: {spec} is {} ({})", k.version, k.image);
        kernels.push(k);
    }
    let busybox = apt.fetch_busybox(&cache)?;
    let started = Instant::now();
    let bins = guest_binaries(&work)?;
    eprintln!("vm-test: guest binaries ready in {:.0} s", started.elapsed().as_secs_f64());
    let base = work.join("base.cpio");
    write_base_initramfs(&base, &busybox, &bins)?;

    let mut outcomes = Vec::new();
    for k in &kernels {
        // A kernel that cannot be set up fails alone; the others still run.
        let outcome = test_kernel(k, &apt, &cache, &work, &base, opts)
            .unwrap_or_else(|e| Outcome::failed(&k.spec, &k.version, format!("{e:#}")));
        println!("{}", outcome.line());
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

fn test_kernel(
    k: &Kernel,
    apt: &Apt,
    cache: &Path,
    work: &Path,
    base: &Path,
    opts: &Options,
) -> Result<Outcome> {
    let tree = apt.fetch_kernel(k, cache)?;
    let initrd = work.join(format!("initrd-{}.cpio", k.abi));
    let modules = kernel_modules(&tree)?;
    write_kernel_initramfs(&initrd, base, &modules, &opts.test_args)?;
    let log = work.join(format!("console-{}.log", k.abi));
    let mut outcome = boot(k, &tree.vmlinuz, &initrd, &log, opts)?;
    // Software emulation of two CPUs occasionally mishandles the kernel patching its own code
    // (an `int3` Oops in a function being live-patched, as static keys flip when programs are
    // attached): a guest whose kernel panicked is booted once more; a real fault panics again.
    if outcome.panicked {
        eprintln!("vm-test: Linux {}: the guest kernel panicked; booting it once more", k.version);
        let first = log.display().to_string();
        let log = work.join(format!("console-{}-reboot.log", k.abi));
        outcome = boot(k, &tree.vmlinuz, &initrd, &log, opts)?;
        let note = format!("first boot panicked, see {first}");
        outcome.note =
            if outcome.note.is_empty() { note } else { format!("{note}; {}", outcome.note) };
    }
    // Emulation on a shared machine is slow and uneven: a test that failed alone gets one more
    // chance in a fresh guest; a kernel problem fails the same way again.
    if !outcome.ok && !outcome.failed_tests.is_empty() {
        let names = outcome.failed_tests.join(" ");
        eprintln!("vm-test: Linux {}: retrying once: {names}", k.version);
        let mut retry_args = vec!["--exact".to_owned()];
        retry_args.extend(outcome.failed_tests.iter().cloned());
        write_kernel_initramfs(&initrd, base, &modules, &retry_args)?;
        let log = work.join(format!("console-{}-retry.log", k.abi));
        let retry = boot(k, &tree.vmlinuz, &initrd, &log, opts)?;
        if retry.ok && retry.passed == outcome.failed_tests.len() as u64 {
            outcome.passed += retry.passed;
            outcome.failed = 0;
            outcome.ok = true;
            outcome.note = format!("passed on retry: {names}");
        } else {
            outcome.note = format!("{}; failed again on retry", outcome.note);
        }
    }
    Ok(outcome)
}

/// `cargo xtask vm-test`: the matrix, failing if any kernel failed.
pub fn run_cli(opts: &Options) -> Result<()> {
    let outcomes = run_matrix(opts)?;
    let bad: Vec<&str> = outcomes.iter().filter(|o| !o.ok).map(|o| o.spec.as_str()).collect();
    if !bad.is_empty() {
        bail!("vm-test failed on {}", bad.join(", "));
    }
    Ok(())
}

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MTLS_VM_CACHE") {
        return PathBuf::from(d);
    }
    let home =
        std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/mtls-agent/vm")
}

fn check_host_tools() -> Result<()> {
    for (tool, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("apt-get", "apt"),
        ("dpkg-deb", "dpkg"),
        ("xz", "xz-utils"),
    ] {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .any(|d| d.join(tool).is_file());
        if !found {
            bail!("vm-test needs {tool}: apt-get install {package}");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Debian packages through a private apt configuration.

struct Apt {
    dir: PathBuf,
    conf: PathBuf,
}

/// A kernel chosen from the package lists.
#[derive(Debug, Clone)]
struct Kernel {
    spec: String,
    /// The ABI name, as in `linux-image-<abi>-cloud-amd64`.
    abi: String,
    image: String,
    /// Upstream version (from the package version).
    version: String,
    /// Every package to fetch: (name, version).
    packages: Vec<(String, String)>,
}

/// An extracted kernel: its image and its module tree.
struct KernelTree {
    vmlinuz: PathBuf,
    modules: PathBuf,
}

impl Apt {
    fn new(dir: &Path) -> Result<Apt> {
        for sub in ["etc/parts", "etc/preferences.d", "lists/partial", "archives/partial", "state"]
        {
            fs::create_dir_all(dir.join(sub))?;
        }
        let status = dir.join("state/status");
        if !status.exists() {
            fs::write(&status, "")?;
        }
        let mut sources = String::new();
        for (uri, suite) in SOURCES {
            sources.push_str(&format!("deb [signed-by={KEYRING}] {uri} {suite} main\n"));
        }
        fs::write(dir.join("etc/sources.list"), sources)?;
        let d = dir.display();
        // Every path apt would otherwise take from /etc/apt or /var points into `dir`.
        let conf = format!(
            "Dir \"{d}/\";\n\
             Dir::Etc \"{d}/etc/\";\n\
             Dir::Etc::main \"/dev/null\";\n\
             Dir::Etc::parts \"{d}/etc/parts/\";\n\
             Dir::Etc::sourcelist \"{d}/etc/sources.list\";\n\
             Dir::Etc::sourceparts \"{d}/etc/parts/\";\n\
             Dir::Etc::preferences \"/dev/null\";\n\
             Dir::Etc::preferencesparts \"{d}/etc/preferences.d/\";\n\
             Dir::State \"{d}/state/\";\n\
             Dir::State::lists \"{d}/lists/\";\n\
             Dir::State::status \"{d}/state/status\";\n\
             Dir::Cache \"{d}/\";\n\
             Dir::Cache::archives \"{d}/archives/\";\n\
             APT::Architecture \"amd64\";\n\
             APT::Architectures {{ \"amd64\"; }};\n\
             APT::Sandbox::User \"root\";\n\
             Acquire::Languages \"none\";\n\
             Acquire::Retries \"3\";\n"
        );
        let conf_path = dir.join("apt.conf");
        fs::write(&conf_path, conf)?;
        Ok(Apt { dir: dir.to_owned(), conf: conf_path })
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("APT_CONFIG", &self.conf).env("DEBIAN_FRONTEND", "noninteractive");
        c
    }

    fn output(&self, program: &str, args: &[&str]) -> Result<Option<String>> {
        let out = self
            .cmd(program)
            .args(args)
            .stderr(Stdio::null())
            .output()
            .with_context(|| format!("running {program}"))?;
        Ok(out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
    }

    fn update_if_stale(&self, force: bool) -> Result<()> {
        let newest = fs::read_dir(self.dir.join("lists"))?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with("_Packages"))
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .max();
        let fresh = newest.is_some_and(|t| {
            SystemTime::now().duration_since(t).unwrap_or_default() < LISTS_MAX_AGE
        });
        if fresh && !force {
            return Ok(());
        }
        eprintln!("vm-test: updating the private package lists ({})", self.dir.display());
        let mut c = self.cmd("apt-get");
        c.args(["-q", "update"]).stdout(Stdio::null());
        run(c)
    }

    /// Candidate version and `Depends` of each package of `pkgs` that has a candidate, in one
    /// apt-cache call (each call loads the whole cache).
    fn show(&self, pkgs: &[String]) -> Result<BTreeMap<String, (String, String)>> {
        let mut found = BTreeMap::new();
        if pkgs.is_empty() {
            return Ok(found);
        }
        let out = self
            .cmd("apt-cache")
            .args(["show", "--no-all-versions"])
            .args(pkgs)
            .stderr(Stdio::null())
            .output()
            .context("running apt-cache show")?;
        // Packages without a candidate only make apt-cache complain: read what it printed.
        let text = String::from_utf8_lossy(&out.stdout);
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned())
            };
            if let (Some(p), Some(v)) = (field("Package:"), field("Version:")) {
                found.insert(p, (v, field("Depends:").unwrap_or_default()));
            }
        }
        Ok(found)
    }

    /// `6.1` → the newest 6.1 kernel; `6.x` → the newest 6; anything else is taken as an ABI
    /// name prefix (`6.12.117+deb13`). Only kernels whose every part is in the archive count.
    fn resolve_kernel(&self, spec: &str) -> Result<Kernel> {
        let names = self.output("apt-cache", &["pkgnames", "linux-"])?.unwrap_or_default();
        let known: BTreeSet<&str> = names.lines().collect();
        let mut abis: Vec<&str> = names
            .lines()
            .filter_map(|n| n.strip_prefix("linux-image-")?.strip_suffix("-cloud-amd64"))
            .filter(|abi| numbers(abi).len() >= 3) // Not the meta-packages (`6.1`).
            .filter(|abi| matches_spec(abi, spec))
            .collect();
        abis.sort_by_key(|abi| std::cmp::Reverse(numbers(abi)));
        let image = |abi: &str| format!("linux-image-{abi}-cloud-amd64");
        let images = self.show(&abis.iter().map(|a| image(a)).collect::<Vec<_>>())?;
        for abi in abis {
            let Some((version, depends)) = images.get(&image(abi)) else { continue };
            // From 6.19 the image and the modules are separate packages, and the archive
            // lacks some of them: such a kernel is skipped.
            let parts: Vec<String> = depends
                .split(',')
                .filter_map(|d| d.split_whitespace().next())
                .filter(|d| d.starts_with("linux-binary-") || d.starts_with("linux-modules-"))
                .map(str::to_owned)
                .collect();
            if !parts.iter().all(|p| known.contains(p.as_str())) {
                continue;
            }
            let shown = self.show(&parts)?;
            let mut packages = vec![(image(abi), version.clone())];
            for p in &parts {
                let (v, _) = shown.get(p).with_context(|| format!("apt-cache show {p}"))?;
                packages.push((p.clone(), v.clone()));
            }
            let upstream = version.split(['-', '~']).next().unwrap_or(version).to_owned();
            return Ok(Kernel {
                spec: spec.to_owned(),
                abi: abi.to_owned(),
                image: image(abi),
                version: upstream,
                packages,
            });
        }
        bail!("no complete Debian cloud kernel matches {spec:?} in {}", self.dir.display())
    }

    /// Downloads `pkg` at `version` into the cache unless it is there; returns the .deb.
    fn fetch(&self, cache: &Path, pkg: &str, version: &str) -> Result<PathBuf> {
        let dir = cache.join("debs").join(format!("{pkg}_{}", version.replace(':', "%3a")));
        let existing = |dir: &Path| -> Option<PathBuf> {
            fs::read_dir(dir)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|e| e == "deb"))
        };
        if let Some(deb) = existing(&dir) {
            return Ok(deb);
        }
        fs::create_dir_all(&dir)?;
        eprintln!("vm-test: downloading {pkg} {version}");
        let mut c = self.cmd("apt-get");
        c.current_dir(&dir).args(["-q", "download", &format!("{pkg}={version}")]);
        c.stdout(Stdio::null());
        run(c)?;
        existing(&dir).with_context(|| format!("apt-get download {pkg} left no .deb"))
    }

    fn fetch_kernel(&self, k: &Kernel, cache: &Path) -> Result<KernelTree> {
        let tree = cache.join("kernels").join(&k.abi);
        let done = tree.join(".extracted");
        if !done.exists() {
            let _ = fs::remove_dir_all(&tree);
            fs::create_dir_all(&tree)?;
            for (pkg, version) in &k.packages {
                let deb = self.fetch(cache, pkg, version)?;
                extract(&deb, &tree)?;
            }
            fs::write(&done, "")?;
        }
        let modules = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| tree.join(d).join(format!("{}-cloud-amd64", k.abi)))
            .find(|p| p.is_dir())
            .with_context(|| format!("no module tree for {} in {}", k.abi, tree.display()))?;
        let vmlinuz =
            [tree.join(format!("boot/vmlinuz-{}-cloud-amd64", k.abi)), modules.join("vmlinuz")]
                .into_iter()
                .find(|p| p.is_file())
                .with_context(|| format!("no vmlinuz for {} in {}", k.abi, tree.display()))?;
        Ok(KernelTree { vmlinuz, modules })
    }

    fn fetch_busybox(&self, cache: &Path) -> Result<PathBuf> {
        let shown = self.show(&["busybox-static".to_owned()])?;
        let (version, _) =
            shown.get("busybox-static").context("busybox-static not in the lists")?;
        let deb = self.fetch(cache, "busybox-static", version)?;
        let tree = deb.with_extension("d");
        if !tree.is_dir() {
            extract(&deb, &tree)?;
        }
        ["bin/busybox", "usr/bin/busybox"]
            .iter()
            .map(|p| tree.join(p))
            .find(|p| p.is_file())
            .context("busybox-static has no busybox binary")
    }
}

fn extract(deb: &Path, into: &Path) -> Result<()> {
    let mut c = Command::new("dpkg-deb");
    c.arg("-x").arg(deb).arg(into);
    run(c)
}

/// The numbers of a version string, for ordering (`6.1.0-0.deb11.52` < `6.1.0-50`).
fn numbers(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn matches_spec(abi: &str, spec: &str) -> bool {
    let n = numbers(abi);
    if let Some(major) = spec.strip_suffix(".x") {
        return major.parse::<u64>().is_ok_and(|m| n.first() == Some(&m));
    }
    let want = numbers(spec);
    if spec.chars().all(|c| c.is_ascii_digit() || c == '.') && want.len() == 2 {
        return n.len() >= 2 && n[..2] == want[..];
    }
    abi.starts_with(spec)
}

/// Whether the agent must refuse this kernel (below the floor).
fn must_refuse(version: &str) -> bool {
    let n = numbers(version);
    (n.first().copied().unwrap_or(0), n.get(1).copied().unwrap_or(0))
        < (u64::from(FLOOR.0), u64::from(FLOOR.1))
}

// ---------------------------------------------------------------------------------------------
// Static binaries.

struct Binaries {
    /// (name in the guest, path on the host).
    files: Vec<(String, PathBuf)>,
    /// Shared libraries and the dynamic loader the binaries need: (path in the guest, path on
    /// the host). The guest gets them at the paths the binaries ask for.
    libs: Vec<(String, PathBuf)>,
}

/// The agent, `e2e-tool` and the suites' test binaries as the main suite built them (same
/// profile and flags, so after `cargo test --workspace` nothing is compiled again), without
/// their debug info (the initramfs is loaded into guest memory), plus the C library and loader
/// they link against.
fn guest_binaries(work: &Path) -> Result<Binaries> {
    crate::build_ebpf()?;
    let json = |c: &mut Command| {
        c.args(["--message-format", "json-render-diagnostics"]);
    };
    let mut found = Vec::new();
    let mut c = cargo(None);
    c.args(["build", "--quiet", "-p", "mtls-agent", "--bin", "mtls-agent"]);
    c.args(["-p", "mtls-agent-e2e", "--bin", "e2e-tool"]);
    json(&mut c);
    for exe in executables(c)? {
        let name = exe.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        found.push((name, exe));
    }
    let mut c = cargo(None);
    c.args(["test", "--quiet", "--no-run", "-p", "mtls-agent-e2e"]);
    for s in SUITES {
        c.args(["--test", s]);
    }
    json(&mut c);
    for exe in executables(c)? {
        let stem = exe.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // Test binaries are `<name>-<hash>`.
        if let Some(s) = SUITES.iter().find(|s| stem.starts_with(&format!("{s}-"))) {
            found.push((s.to_string(), exe));
        }
    }
    let stripped = work.join("bin");
    fs::create_dir_all(&stripped)?;
    let mut files = Vec::new();
    let mut libs = BTreeMap::new();
    for want in ["mtls-agent", "e2e-tool"].iter().chain(SUITES) {
        let Some((_, path)) = found.iter().find(|(n, _)| n == want) else {
            bail!("the build produced no {want}");
        };
        let out = stripped.join(want);
        let status = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(path)
            .arg(&out)
            .status()
            .context("running objcopy (binutils)")?;
        if !status.success() {
            bail!("objcopy --strip-debug {} failed: {status}", path.display());
        }
        for lib in shared_libraries(path)? {
            libs.insert(lib.to_string_lossy().into_owned(), lib);
        }
        files.push((want.to_string(), out));
    }
    Ok(Binaries { files, libs: libs.into_iter().collect() })
}

/// The shared objects (loader included) an executable loads, by absolute path, as `ldd` lists
/// them.
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(exe).output().context("running ldd")?;
    if !out.status.success() {
        bail!("ldd {} failed: {}", exe.display(), String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`; `linux-vdso.so.1 (0x...)` has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    if libs.is_empty() {
        bail!("ldd found no loader for {}", exe.display());
    }
    Ok(libs)
}

/// Runs a cargo command with JSON messages; returns the executables it produced.
fn executables(mut c: Command) -> Result<Vec<PathBuf>> {
    let shown = format!("{c:?}");
    let out = c.stderr(Stdio::inherit()).output().with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed: {}", out.status);
    }
    let mut exes = Vec::new();
    for line in out.stdout.split(|b| *b == b'\n') {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else { continue };
        if v["reason"] == "compiler-artifact" {
            if let Some(exe) = v["executable"].as_str() {
                exes.push(PathBuf::from(exe));
            }
        }
    }
    Ok(exes)
}

// ---------------------------------------------------------------------------------------------
// Modules and initramfs.

/// The modules to load, dependencies first: (name, uncompressed bytes).
fn kernel_modules(tree: &KernelTree) -> Result<Vec<(String, Vec<u8>)>> {
    let mut index = BTreeMap::new();
    index_modules(&tree.modules.join("kernel"), &mut index)?;
    let builtin = fs::read_to_string(tree.modules.join("modules.builtin")).unwrap_or_default();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for m in MODULES {
        add_module(m, &index, &builtin, &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

fn module_name(file: &str) -> Option<String> {
    let stem = file.strip_suffix(".xz").or_else(|| file.strip_suffix(".zst")).unwrap_or(file);
    Some(stem.strip_suffix(".ko")?.replace('-', "_"))
}

fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
        let p = e.path();
        if p.is_dir() {
            index_modules(&p, index)?;
        } else if let Some(name) = module_name(&e.file_name().to_string_lossy()) {
            index.insert(name, p);
        }
    }
    Ok(())
}

fn add_module(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    builtin: &str,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<(String, Vec<u8>)>,
    depth: usize,
) -> Result<()> {
    let name = name.replace('-', "_");
    if depth > 32 {
        bail!("module dependencies of {name} nest too deep");
    }
    if !seen.insert(name.clone()) {
        return Ok(());
    }
    let Some(path) = index.get(&name) else {
        let is_builtin =
            builtin.lines().filter_map(|l| module_name(l.rsplit('/').next()?)).any(|n| n == name);
        if is_builtin {
            return Ok(());
        }
        bail!("module {name} is neither built in nor shipped");
    };
    let bytes = read_module(path)?;
    for dep in modinfo(&bytes, "depends").split(',').filter(|d| !d.is_empty()) {
        add_module(dep, index, builtin, seen, order, depth + 1)?;
    }
    order.push((name, bytes));
    Ok(())
}

fn read_module(path: &Path) -> Result<Vec<u8>> {
    let s = path.to_string_lossy();
    let tool = if s.ends_with(".xz") {
        Some("xz")
    } else if s.ends_with(".zst") {
        Some("zstd")
    } else {
        None
    };
    match tool {
        // Decompressed here: busybox's insmod may not know the format.
        Some(tool) => {
            let out = Command::new(tool).arg("-dc").arg(path).output().context(tool)?;
            if !out.status.success() {
                bail!("{tool} -dc {s} failed");
            }
            Ok(out.stdout)
        }
        None => Ok(fs::read(path)?),
    }
}

/// A `key=value` string of a module's .modinfo section (NUL-separated).
fn modinfo(bytes: &[u8], key: &str) -> String {
    let needle = format!("{key}=");
    bytes
        .split(|b| *b == 0)
        .find_map(|s| s.strip_prefix(needle.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

const INIT: &str = r#"#!/bin/busybox sh
# mtls-agent vm-test guest: mounts what the test bed needs, runs the suites, powers off.
/bin/busybox mkdir -p /usr/bin /sbin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs tmpfs /run
# /tmp stays on the initramfs (already in memory): a checkout under /tmp keeps its files there.
chmod 1777 /tmp
ip link set lo up
MODE=tests THREADS=2 ARGS=
for w in $(cat /proc/cmdline); do
  case "$w" in
    mtls.mode=*) MODE="${w#mtls.mode=}" ;;
    mtls.threads=*) THREADS="${w#mtls.threads=}" ;;
    mtls.suite_timeout=*) SUITE_TIMEOUT="${w#mtls.suite_timeout=}" ;;
  esac
done
[ -f /opt/mtls/test-args ] && ARGS="$(cat /opt/mtls/test-args)"
while read -r m; do
  insmod "/lib/modules/$m.ko" || echo "VMTEST module-failed $m"
done < /lib/modules/load-order
echo "VMTEST boot $(uname -r)"
export MTLS_AGENT_BIN=/opt/mtls/mtls-agent E2E_TOOL=/opt/mtls/e2e-tool RUST_BACKTRACE=1
if [ "$MODE" = refuse ]; then
  /opt/mtls/mtls-agent run --node vm --cgroup /sys/fs/cgroup --workloads /nonexistent \
    --ca-dir /nonexistent >/tmp/out 2>/tmp/err
  echo "VMTEST refuse rc=$?"
  while IFS= read -r l; do echo "VMTEST stderr $l"; done < /tmp/err
  while IFS= read -r l; do echo "VMTEST stdout $l"; done < /tmp/out
else
  for s in $(cat /opt/mtls/suites); do
    echo "VMTEST suite-start $s"
    # shellcheck disable=SC2086
    timeout -s KILL "${SUITE_TIMEOUT:-300}" "/opt/mtls/$s" --test-threads="$THREADS" $ARGS 2>&1
    echo "VMTEST suite-end $s rc=$?"
  done
fi
echo "VMTEST done"
sync
poweroff -f
"#;

/// The part of the initramfs common to every kernel.
fn write_base_initramfs(path: &Path, busybox: &Path, bins: &Binaries) -> Result<()> {
    let f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = cpio::Writer::new(std::io::BufWriter::new(f));
    for d in [
        "/bin",
        "/dev",
        "/etc",
        "/lib",
        "/opt",
        "/opt/mtls",
        "/proc",
        "/root",
        "/run",
        "/sys",
        "/tmp",
        "/var",
    ] {
        w.dir(d)?;
    }
    // The kernel opens /dev/console for /init before devtmpfs is mounted.
    w.char_device("/dev/console", 0o600, 5, 1)?;
    w.symlink("/var/run", "../run")?;
    w.file("/etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    w.file("/etc/group", 0o644, b"root:x:0:\n")?;
    w.file("/etc/hosts", 0o644, b"127.0.0.1 localhost\n::1 localhost\n")?;
    w.file("/bin/busybox", 0o755, &fs::read(busybox)?)?;
    w.file("/init", 0o755, INIT.as_bytes())?;
    w.file("/opt/mtls/suites", 0o644, SUITES.join("\n").as_bytes())?;
    // Tests read the repository's data files (the shipped policies) through the source path
    // they were compiled in: the guest gets them at that same path.
    let repo = root();
    let mut dir = PathBuf::from("/");
    for part in repo.iter().skip(1) {
        dir.push(part);
        w.dir(&dir.to_string_lossy())?;
    }
    for sub in ["tests", "policies"] {
        w.dir(&repo.join(sub).to_string_lossy())?;
    }
    for e in fs::read_dir(repo.join("policies"))?.flatten() {
        if e.path().is_file() {
            w.file(&e.path().to_string_lossy(), 0o644, &fs::read(e.path())?)?;
        }
    }
    for (name, path) in &bins.files {
        let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        w.file(&format!("/opt/mtls/{name}"), 0o755, &data)?;
    }
    // The C library at the paths the binaries name (symbolic links on the host followed).
    let mut made: BTreeSet<PathBuf> =
        ["/", "/bin", "/dev", "/etc", "/lib", "/opt", "/proc", "/run", "/sys", "/tmp", "/var"]
            .iter()
            .map(PathBuf::from)
            .collect();
    for (guest, host) in &bins.libs {
        let guest = Path::new(guest);
        let mut dir = PathBuf::from("/");
        for part in guest.parent().into_iter().flat_map(|p| p.iter().skip(1)) {
            dir.push(part);
            if made.insert(dir.clone()) {
                w.dir(&dir.to_string_lossy())?;
            }
        }
        let data = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        w.file(&guest.to_string_lossy(), 0o755, &data)?;
    }
    w.finish()?;
    Ok(())
}

/// The base archive followed by a second one with this kernel's modules (the kernel unpacks
/// concatenated archives in order).
fn write_kernel_initramfs(
    path: &Path,
    base: &Path,
    modules: &[(String, Vec<u8>)],
    test_args: &[String],
) -> Result<()> {
    fs::copy(base, path).with_context(|| format!("copying {}", base.display()))?;
    let f = fs::OpenOptions::new().append(true).open(path)?;
    let mut w = cpio::Writer::new(std::io::BufWriter::new(f));
    w.dir("/lib/modules")?;
    let mut order = String::new();
    for (name, bytes) in modules {
        w.file(&format!("/lib/modules/{name}.ko"), 0o644, bytes)?;
        order.push_str(name);
        order.push('\n');
    }
    w.file("/lib/modules/load-order", 0o644, order.as_bytes())?;
    let mut args: Vec<String> =
        SKIPPED_IN_GUESTS.iter().flat_map(|t| ["--skip".to_owned(), t.to_string()]).collect();
    args.extend(test_args.iter().cloned());
    w.file("/opt/mtls/test-args", 0o644, args.join(" ").as_bytes())?;
    w.finish()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Booting and reading the console.

fn boot(
    k: &Kernel,
    vmlinuz: &Path,
    initrd: &Path,
    log_path: &Path,
    opts: &Options,
) -> Result<Outcome> {
    let refuse = must_refuse(&k.version);
    let mut log = fs::File::create(log_path)?;
    let suite_timeout = opts.timeout.saturating_sub(60).max(60) / SUITES.len() as u64;
    let append = format!(
        "console=ttyS0 panic=-1 quiet mtls.mode={} mtls.threads={} mtls.suite_timeout={}",
        if refuse { "refuse" } else { "tests" },
        opts.test_threads,
        suite_timeout.max(60),
    );
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-accel", "tcg", "-cpu", "max", "-m", "1G", "-smp", "2"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"])
        .args(["-no-reboot", "-net", "none"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = c.spawn().context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let stdout = child.stdout.take().context("qemu stdout")?;
    let stderr = child.stderr.take().context("qemu stderr")?;
    let tx2 = tx.clone();
    let readers = [
        std::thread::spawn(move || forward_lines(stdout, &tx)),
        std::thread::spawn(move || forward_lines(stderr, &tx2)),
    ];
    let deadline = started + Duration::from_secs(opts.timeout);
    let mut lines = Vec::new();
    let (mut booted, mut done, mut timed_out) = (None, None, false);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, line)) => {
                writeln!(log, "{line}")?;
                if line.starts_with("VMTEST boot") {
                    booted = Some(at);
                } else if line.starts_with("VMTEST done") {
                    done = Some(at);
                }
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
            // Both pipes closed: qemu exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if timed_out {
        // Only the qemu we started, by its own handle.
        let _ = child.kill();
    }
    let _ = child.wait();
    for r in readers {
        let _ = r.join();
    }
    let mut outcome = Outcome {
        spec: k.spec.clone(),
        version: k.version.clone(),
        boot: booted.map(|b| b - started),
        tests: booted.zip(done).map(|(b, d)| d - b),
        passed: 0,
        failed: 0,
        skipped: 0,
        ok: false,
        note: String::new(),
        failed_tests: Vec::new(),
        panicked: lines.iter().any(|l| l.contains("Kernel panic - not syncing")),
    };
    if refuse {
        judge_refusal(&lines, &mut outcome);
    } else {
        judge_suites(&lines, &mut outcome);
    }
    if timed_out || booted.is_none() || outcome.panicked {
        outcome.failed_tests.clear();
    }
    if timed_out {
        outcome.ok = false;
        outcome.note = format!("timed out after {} s; {}", opts.timeout, outcome.note);
    } else if booted.is_none() {
        outcome.ok = false;
        outcome.note = "the guest never reached /init's tests".into();
    }
    if !outcome.ok {
        outcome.note = format!("{}; console log {}", outcome.note, log_path.display());
    }
    Ok(outcome)
}

fn forward_lines(r: impl Read, tx: &mpsc::Sender<(Instant, String)>) {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']).replace('\r', "");
                if tx.send((Instant::now(), line)).is_err() {
                    return;
                }
            }
        }
    }
}

/// Sums the libtest results of every suite; a suite that ended without its result line (a
/// crash, the guest's per-suite timeout) counts as one failure.
fn judge_suites(lines: &[String], o: &mut Outcome) {
    let mut suite_ok = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut current_had_result = false;
    let mut failures = Vec::new();
    let mut failed_tests = Vec::new();
    let mut other_trouble = false;
    for line in lines {
        if let Some(s) = line.strip_prefix("VMTEST suite-start ") {
            current = Some(s.trim().to_owned());
            current_had_result = false;
        } else if let Some(rest) = line.strip_prefix("VMTEST suite-end ") {
            let (name, rc) = rest.split_once(" rc=").unwrap_or((rest, "?"));
            if rc.trim() != "0" && !current_had_result {
                o.failed += 1;
                other_trouble = true;
                failures.push(format!("{name} exited rc={rc}"));
            }
            suite_ok.insert(name.to_owned(), rc.trim() == "0");
            current = None;
        } else if let Some(rest) = line.trim_start().strip_prefix("test result: ") {
            let count = |label: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim().strip_suffix(label)?.trim().rsplit(' ').next()?.parse().ok()
                    })
                    .unwrap_or(0)
            };
            o.passed += count("passed");
            o.failed += count("failed");
            // Tests left out here (`--skip`) show as filtered out: they are skipped too.
            o.skipped += count("ignored") + count("filtered out");
            current_had_result = true;
        } else if let Some(name) =
            line.strip_prefix("test ").and_then(|l| l.strip_suffix(" ... FAILED"))
        {
            failures.push(name.to_owned());
            failed_tests.push(name.to_owned());
        } else if let Some(m) = line.strip_prefix("VMTEST module-failed ") {
            other_trouble = true;
            failures.push(format!("insmod {m}"));
        }
    }
    let all_ran = SUITES.iter().all(|s| suite_ok.contains_key(*s));
    if current.is_some() || !all_ran {
        other_trouble = true;
        failures.push("not every suite finished".into());
    }
    if !other_trouble && failed_tests.len() as u64 == o.failed {
        o.failed_tests = failed_tests;
    }
    o.ok = all_ran && suite_ok.values().all(|ok| *ok) && o.failed == 0 && o.passed > 0;
    o.note = failures.join(", ");
}

/// The agent must exit non-zero with exactly one line on stderr: the probe's refusal naming
/// the floor feature and version.
fn judge_refusal(lines: &[String], o: &mut Outcome) {
    let rc = lines.iter().find_map(|l| l.strip_prefix("VMTEST refuse rc=")).map(str::trim);
    let stderr: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("VMTEST stderr ")).collect();
    let want_tail = format!("lacks {FLOOR_FEATURE} (needs Linux {}.{} or newer)", FLOOR.0, FLOOR.1);
    let good_line = stderr.len() == 1
        && stderr[0].starts_with("mtls-agent: this kernel (")
        && stderr[0].ends_with(&want_tail);
    o.ok = matches!(rc, Some(rc) if rc != "0") && good_line;
    if o.ok {
        o.passed = 1;
        o.note = format!("refused: {}", stderr[0]);
    } else {
        o.failed = 1;
        o.note = format!(
            "expected one refusal line ending {want_tail:?}, got rc={} and {} stderr line(s): {}",
            rc.unwrap_or("none"),
            stderr.len(),
            stderr.join(" | ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_pick_series_and_majors() {
        assert!(matches_spec("6.1.0-50", "6.1"));
        assert!(!matches_spec("6.12.117+deb13", "6.1"));
        assert!(matches_spec("6.12.117+deb13", "6.12"));
        assert!(matches_spec("6.18.15+deb13", "6.x"));
        assert!(!matches_spec("7.3.4+deb13", "6.x"));
        assert!(matches_spec("6.12.117+deb13", "6.12.117+deb13"));
        assert!(numbers("6.1.0-50") > numbers("6.1.0-0.deb11.52"));
        assert!(numbers("6.19.14+deb13") > numbers("6.19.6+deb13"));
    }

    #[test]
    fn the_floor_decides_refusal() {
        assert!(must_refuse("5.10.262"));
        assert!(!must_refuse("5.15.0"));
        assert!(!must_refuse("6.1.176"));
    }

    #[test]
    fn modinfo_reads_depends() {
        let blob = b"junk\0license=GPL\0depends=stp,llc\0name=bridge\0";
        assert_eq!(modinfo(blob, "depends"), "stp,llc");
        assert_eq!(modinfo(b"depends=\0", "depends"), "");
        assert_eq!(module_name("bridge.ko.xz").as_deref(), Some("bridge"));
        assert_eq!(module_name("sch-ingress.ko").as_deref(), Some("sch_ingress"));
    }

    fn outcome() -> Outcome {
        Outcome::failed("6.1", "6.1.1", String::new())
    }

    #[test]
    fn suites_are_summed_and_crashes_count() {
        let mut lines = Vec::new();
        for s in SUITES {
            lines.push(format!("VMTEST suite-start {s}"));
            lines.push(
                "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 1 filtered out".into(),
            );
            lines.push(format!("VMTEST suite-end {s} rc=0"));
        }
        let mut o = outcome();
        judge_suites(&lines, &mut o);
        assert!(o.ok, "{}", o.note);
        assert_eq!((o.passed, o.failed, o.skipped), (9, 0, 6));

        // One test failed: it may be retried.
        let mut failing = lines.clone();
        failing.insert(failing.len() - 1, "test renews_certs ... FAILED".into());
        failing.insert(failing.len() - 1, "test result: FAILED. 0 passed; 1 failed".into());
        let mut o = outcome();
        judge_suites(&failing, &mut o);
        assert!(!o.ok);
        assert_eq!(o.failed_tests, ["renews_certs"]);

        // A suite killed before its result line: a failure, and nothing to retry.
        lines.truncate(lines.len() - 2);
        lines.push("VMTEST suite-end policy rc=137".into());
        let mut o = outcome();
        judge_suites(&lines, &mut o);
        assert!(!o.ok);
        assert_eq!(o.failed, 1);
        assert!(o.failed_tests.is_empty());
    }

    #[test]
    fn refusal_must_be_one_exact_line() {
        let good = vec![
            "VMTEST refuse rc=1".to_string(),
            "VMTEST stderr mtls-agent: this kernel (5.10.262) lacks bpf_get_netns_cookie in sock_ops programs (needs Linux 5.15 or newer)".into(),
        ];
        let mut o = outcome();
        judge_refusal(&good, &mut o);
        assert!(o.ok, "{}", o.note);
        let mut two = good.clone();
        two.push("VMTEST stderr something else".into());
        let mut o = outcome();
        judge_refusal(&two, &mut o);
        assert!(!o.ok);
    }
}
