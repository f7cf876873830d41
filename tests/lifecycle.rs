//! End-to-end: the agent's life cycle — rolling updates without a failed connection, crash
//! recovery, reconciliation of pods that changed while it was down, and uninstall. Runs as root.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use testbed::{
    agent::{agent_bin, WorkloadEntry},
    mesh::{namespace_pa, Mesh, PolicyDir},
};

const NS: &str = "shop";
/// How long the client loops while the agent is updated three times.
const LOOP_SECONDS: u64 = 12;

/// One node with a client and a server in the mesh and an outsider, STRICT.
fn node(test: &str) -> Result<(Mesh, PolicyDir, std::path::PathBuf)> {
    let mut m =
        Mesh::build(test, NS, &[("node1", "client"), ("node1", "server"), ("node1", "outsider")])?;
    let (file, _) = m.workloads("workloads", &["client", "server"])?;
    let policies = PolicyDir::new(m.bed.id())?;
    policies.write("ns.yaml", &namespace_pa(NS, "STRICT"))?;
    let ca = m.ca("ca")?;
    let dir = policies.0.display().to_string();
    m.start_agent("node1", &file, &ca, &["--policies", &dir])?;
    Ok((m, policies, file))
}

#[test]
fn three_rolling_updates_under_a_connection_loop_without_a_single_failure() -> Result<()> {
    let (mut m, _policies, _) = node("life-rolling")?;
    let dst = m.dst("server");
    // Two loops of back-to-back connections for a fixed time, longer than the three updates.
    let mut cmd = std::process::Command::new(testbed::e2e_tool!());
    cmd.args([
        "churn",
        "--connect",
        &dst,
        "--concurrency",
        "2",
        "--seconds",
        &LOOP_SECONDS.to_string(),
    ]);
    cmd.args(["--hold-ms", "0"]);
    let mut client = m.bed.spawn_in_pod("client", cmd)?;
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    for i in 0..3 {
        let status = m.agents.get_mut("node1").context("agent")?.handover()?;
        assert!(status.success(), "update {i}: the old instance exited with {status}");
    }
    let updates = started.elapsed();
    assert!(
        client.try_wait()?.is_none(),
        "the updates ({updates:?}) outlasted the client loop; output: {}",
        client.stdout()
    );
    let out = client.wait_with_output(Duration::from_secs(LOOP_SECONDS + 60))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "failures during the updates: {stdout}");
    let ok: u64 = stdout.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or_default();
    assert!(ok > 100, "the loop made {ok} connections: {stdout}");
    // The last instance still enforces and carries traffic.
    let (out, ok) = m.client("outsider", &["--connect", &dst, "--message", "x"])?;
    assert!(!ok && out.contains("refused"), "{out}");
    Ok(())
}

#[test]
fn after_a_crash_pods_are_re_enrolled_from_state_and_traffic_flows_within_two_seconds() -> Result<()>
{
    let (mut m, _policies, _) = node("life-crash")?;
    let dst = m.dst("server");
    let agent = m.agents.get_mut("node1").context("agent")?;
    agent.kill()?;
    let started = Instant::now();
    agent.restart()?;
    let (out, ok) = m.client("client", &["--connect", &dst, "--message", "back"])?;
    assert!(ok && out == "server:back", "{out}");
    assert!(started.elapsed() < Duration::from_secs(2), "recovered in {:?}", started.elapsed());
    Ok(())
}

#[test]
fn pods_removed_or_added_while_the_agent_was_down_are_released_or_enrolled() -> Result<()> {
    let (mut m, _policies, file) = node("life-reconcile")?;
    let dst = m.dst("server");
    m.agents.get_mut("node1").context("agent")?.kill()?;
    // While it is down: the client leaves the mesh, the outsider joins it.
    let mut w = testbed::agent::WorkloadsFile::default();
    w.workloads.push(WorkloadEntry::of(m.bed.pod("server"), NS));
    w.workloads.push(WorkloadEntry::of(m.bed.pod("outsider"), NS));
    w.write(&file)?;
    m.agents.get_mut("node1").context("agent")?.restart()?;
    // The client is released: no longer captured, so its plaintext meets STRICT and is refused.
    let (out, ok) = m.client("client", &["--connect", &dst, "--message", "x"])?;
    assert!(!ok && out.contains("refused"), "released pod still captured? {out}");
    let conns = m.agent("node1").connections()?;
    assert!(conns.iter().all(|c| c["sourcePod"] != "client.shop"), "{conns:#?}");
    // The outsider is enrolled: its connection is carried in mTLS.
    let (out, ok) = m.client("outsider", &["--connect", &dst, "--message", "y"])?;
    assert!(ok && out == "server:y", "{out}");
    let rec = m.agent("node1").wait_connection(Duration::from_secs(5), |c| {
        c["direction"] == "outbound" && c["sourcePod"] == "outsider.shop"
    })?;
    assert_eq!(rec["mode"], "mTLS");
    Ok(())
}

#[test]
fn uninstall_unpins_everything_and_nothing_stays_fail_closed() -> Result<()> {
    let (mut m, _policies, _) = node("life-uninstall")?;
    let dst = m.dst("server");
    let bpffs = m.agent("node1").bpffs.clone();
    m.agents.get_mut("node1").context("agent")?.kill()?;
    // Fail closed while the agent is down...
    let (out, ok) = m.client("client", &["--connect", &dst, "--message", "x"])?;
    assert!(!ok && out.contains("refused"), "{out}");
    let out = std::process::Command::new(agent_bin())
        .args(["uninstall", "--node", "node1", "--bpffs"])
        .arg(&bpffs)
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!bpffs.exists(), "pins left under {}", bpffs.display());
    // ...and after uninstall, pods talk directly again: no capture, no STRICT.
    let (out, ok) = m.client("client", &["--connect", &dst, "--message", "direct"])?;
    assert!(ok && out == "server:direct", "{out}");
    let (out, ok) = m.client("outsider", &["--connect", &dst, "--message", "plain"])?;
    assert!(ok && out == "server:plain", "{out}");
    Ok(())
}
