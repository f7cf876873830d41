//! End-to-end: `cargo xtask demo` interrupted half-way leaves nothing behind: no network
//! namespace, cgroup, bpffs pin or process of its own. Runs as root.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nix::{
    sys::signal::{kill, killpg, Signal},
    unistd::Pid,
};

/// The step after which both agents run, the fabric is captured and traffic flows.
const MID_DEMO: &str = "== frontend calls every backend";

/// Whom Ctrl-C reaches.
enum Interrupt {
    /// The terminal's Ctrl-C: every process of the foreground group (the demo, its agents and
    /// the pods' processes).
    Group,
    /// `kill -INT` of the demo process alone.
    DemoOnly,
}

/// The demo process and its process group (its agents and pods' processes). If the test fails
/// before the demo ends, the group is interrupted as Ctrl-C would, given time to clean up, then
/// killed, and what a killed demo left is removed.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let group = Pid::from_raw(self.0.id() as i32);
            let _ = killpg(group, Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = killpg(group, Signal::SIGKILL);
            let _ = self.0.wait();
            // The demo's beds name its (now dead) PID: they count as stale.
            let _ = testbed::cleanup_stale();
        }
    }
}

/// Processes alive (not zombies) whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return vec![] };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'));
            !zombie && String::from_utf8_lossy(&cmdline).contains(needle)
        })
        .collect()
}

fn interrupt_mid_demo(how: Interrupt) -> Result<()> {
    let child = Command::new(env!("CARGO_BIN_EXE_demo"))
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the demo")?;
    let mut demo = Demo(child);
    let pid = demo.0.id();
    let stdout = demo.0.stdout.take().context("demo stdout")?;
    let stderr = demo.0.stderr.take().context("demo stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let err_lines = std::thread::spawn(move || {
        BufReader::new(stderr).lines().map_while(Result::ok).collect::<Vec<_>>()
    });

    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.starts_with(MID_DEMO)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => {
                bail!("the demo never reached {MID_DEMO:?}; it printed:\n{}", seen.join("\n"))
            }
        }
    }
    // Its agents are up: their pins and processes exist now, so "none left" below means
    // something was removed.
    let made = testbed::footprint_of_process(pid)?;
    assert!(!made.is_empty(), "the demo's test bed is not visible: {seen:?}");
    let pins = made.iter().find(|p| p.starts_with(testbed::BPFFS_ROOT)).context("no bpffs dir")?;
    let pins = pins.display().to_string();
    assert!(!processes_mentioning(&pins).is_empty(), "no agent runs with pins under {pins}");

    match how {
        Interrupt::Group => killpg(Pid::from_raw(pid as i32), Signal::SIGINT)?,
        Interrupt::DemoOnly => kill(Pid::from_raw(pid as i32), Signal::SIGINT)?,
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = demo.0.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!("the demo did not stop within 60 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = err_lines.join().unwrap_or_default().join("\n");
    assert!(!status.success(), "an interrupted demo does not report success: {stderr}");

    let left = testbed::footprint_of_process(pid)?;
    assert!(left.is_empty(), "left behind after SIGINT: {left:?}\n{stderr}");
    let procs = processes_mentioning(&pins);
    assert!(procs.is_empty(), "agents still running after SIGINT: {procs:?}\n{stderr}");
    Ok(())
}

#[test]
fn ctrl_c_in_the_terminal_mid_demo_leaves_nothing_behind() -> Result<()> {
    interrupt_mid_demo(Interrupt::Group)
}

#[test]
fn sigint_to_the_demo_alone_mid_demo_leaves_nothing_behind() -> Result<()> {
    interrupt_mid_demo(Interrupt::DemoOnly)
}
