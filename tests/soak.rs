//! Load: 1,000 concurrent connections across 20 client pods with churn, through the agent; zero
//! errors, and afterwards the agent's open fds, RSS and BPF map entries are back near the
//! baseline. 10 s in the test suite; `cargo xtask soak` runs it for 60 s (`MTLS_SOAK_SECONDS`).
//! Runs as root.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mtls_agent::capture::OrigDstMap;
use testbed::mesh::Mesh;

const NS: &str = "load";
const CLIENTS: usize = 20;
const PER_CLIENT: usize = 50;

fn agent_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn agent_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn a_thousand_concurrent_connections_with_churn_and_no_leaks() -> Result<()> {
    let seconds: u64 = std::env::var("MTLS_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
        .clamp(1, 600);
    let clients: Vec<String> = (0..CLIENTS).map(|i| format!("c{i:02}")).collect();
    let mut pods: Vec<(&str, &str)> = clients.iter().map(|c| ("node1", c.as_str())).collect();
    pods.push(("node1", "s0"));
    pods.push(("node1", "s1"));
    let mut m = Mesh::build("soak", NS, &pods)?;
    let names: Vec<&str> = pods.iter().map(|(_, p)| *p).collect();
    let (file, _) = m.workloads("workloads", &names)?;
    let ca = m.ca("ca")?;
    m.start_agent("node1", &file, &ca, &[])?;
    let pid = m.agent("node1").pid().context("agent pid")?;

    // Warm up: one connection from every client to both servers (pooled tunnels exist).
    for c in &clients {
        for s in ["s0", "s1"] {
            let (out, ok) = m.client(c, &["--connect", &m.dst(s), "--message", "warm"])?;
            assert!(ok, "{out}");
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let (fds0, rss0) = (agent_fds(pid), agent_rss_kib(pid));

    let started = Instant::now();
    let mut runs = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let mut cmd = std::process::Command::new(testbed::e2e_tool!());
        cmd.args([
            "churn",
            "--connect",
            &m.dst(if i % 2 == 0 { "s0" } else { "s1" }),
            "--concurrency",
            &PER_CLIENT.to_string(),
            "--seconds",
            &seconds.to_string(),
            // A failure is a refused, reset or wrong reply. A slow one is not: on a machine
            // busy with other work, 1,000 connections at once may queue for seconds, and
            // speed is the benchmark's business, not this test's.
            "--timeout-ms",
            "30000",
        ]);
        runs.push(m.bed.spawn_in_pod(c, cmd)?);
    }
    // At the peak, about CLIENTS * PER_CLIENT connections are open through the agent.
    std::thread::sleep(Duration::from_secs(seconds.min(3)));
    let peak_fds = agent_fds(pid);
    let mut total = 0u64;
    for (c, run) in clients.iter().zip(runs) {
        let out = run.wait_with_output(Duration::from_secs(seconds + 90))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            let log = m.agent("node1").log();
            let notable: Vec<&str> =
                log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
            let shown = &notable[notable.len().saturating_sub(40)..];
            panic!("{c}: {text}\nthe agent's last warnings:\n{}", shown.join("\n"));
        }
        total +=
            text.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()).unwrap_or_default();
    }
    let elapsed = started.elapsed();

    // Afterwards: back near the baseline.
    let map = OrigDstMap::open_pinned(&m.agent("node1").bpffs)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let settled =
        || agent_fds(pid) <= fds0 + 20 && map.is_empty() && agent_rss_kib(pid) <= rss0 + 32 * 1024;
    while !settled() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (fds1, rss1) = (agent_fds(pid), agent_rss_kib(pid));
    eprintln!(
        "soak: {total} connections in {elapsed:?}; agent fds {fds0} -> peak {peak_fds} -> {fds1}; \
         RSS {} -> {} MiB; ORIG_DST entries {}",
        rss0 / 1024,
        rss1 / 1024,
        map.len()
    );
    assert!(
        peak_fds > fds0 + CLIENTS * PER_CLIENT,
        "the load did reach ~1,000 concurrent connections"
    );
    assert!(fds1 <= fds0 + 20, "fds {fds0} -> {fds1}: connections leaked");
    assert_eq!(map.len(), 0, "ORIG_DST entries left behind");
    assert!(rss1 <= rss0 + 32 * 1024, "RSS {rss0} KiB -> {rss1} KiB");
    let (ready, _) = m.agent("node1").readiness()?;
    assert!(ready, "the agent is still ready");
    Ok(())
}
