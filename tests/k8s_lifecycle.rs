//! End-to-end, as an attacker would try it: a restart or upgrade never turns protection off
//! (a pod the new instance cannot enroll stays closed until it is enrolled again or removed),
//! and pods change as in a cluster (a label change updates policy in place, a terminating pod
//! stays enrolled while it drains, a new pod taking a terminating pod's IP is the one served).
//! Kubernetes mode runs against `testbed::apiserver`, a scripted stand-in for the API server.
//! Runs as root.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use testbed::{
    agent::AgentProcess,
    mesh::{namespace_pa, Mesh, PolicyDir},
};

const NS: &str = "shop";

/// A plaintext or captured attempt that must be refused: fails (not answered by the app).
fn refused(m: &Mesh, from: &str, to: &str) -> Result<String> {
    let (out, ok) =
        m.client(from, &["--connect", &m.dst(to), "--message", "x", "--timeout-ms", "2000"])?;
    ensure!(!ok && out.contains("refused"), "{from} -> {to} must be refused: {out}");
    ensure!(!out.contains(&format!("{to}:")), "{from} -> {to} was answered: {out}");
    Ok(out)
}

fn answered(m: &Mesh, from: &str, to: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let (out, ok) =
            m.client(from, &["--connect", &m.dst(to), "--message", "hi", "--timeout-ms", "2000"])?;
        if ok && out == format!("{to}:hi") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{from} -> {to}: got {out:?}; agent log:\n{}", m.agent("node1").log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_readiness(agent: &AgentProcess, needle: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = agent.readiness()?;
        if body.contains(needle) {
            return Ok(body);
        }
        if Instant::now() > deadline {
            bail!("readiness {body:?} never said {needle:?}; log:\n{}", agent.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_restart_that_cannot_re_enroll_a_strict_pod_keeps_it_closed_until_it_is_removed() -> Result<()>
{
    let mut m = Mesh::build(
        "kl-restart",
        NS,
        &[("node1", "client"), ("node1", "server"), ("node1", "outsider")],
    )?;
    let (file, mut w) = m.workloads("workloads", &["client", "server"])?;
    let policies = PolicyDir::new(m.bed.id())?;
    policies.write("ns.yaml", &namespace_pa(NS, "STRICT"))?;
    let ca = m.ca("ca")?;
    let dir = policies.0.display().to_string();
    m.start_agent("node1", &file, &ca, &["--policies", &dir])?;
    wait_readiness(m.agent("node1"), "2 of 2 pods enrolled")?;
    refused(&m, "outsider", "server")?;
    answered(&m, "client", "server", Duration::from_secs(5))?;

    // Instance 1 stops. For instance 2 the server's namespace cannot be opened (what it is
    // told is not a network namespace), so it cannot enroll it again.
    m.agents.get_mut("node1").context("agent")?.terminate()?;
    let not_netns = std::env::temp_dir().join(format!("{}-not-a-netns", m.bed.id()));
    std::fs::write(&not_netns, b"")?;
    m.files.push(not_netns.clone());
    for e in &mut w.workloads {
        if e.name == "server" {
            e.netns = not_netns.clone();
        }
    }
    w.write(&file)?;
    let before = (m.accepted("server"), m.accepted("outsider"));
    m.agents.get_mut("node1").context("agent")?.restart()?;
    let agent = m.agent("node1");
    let body = wait_readiness(agent, &format!("server.{NS} (netns"))?;
    ensure!(body.contains("held closed"), "{body}");

    // Still closed: plaintext to its STRICT port is refused, and its own outbound is still
    // captured (refused: nothing of the agent listens in it), never leaked in plaintext.
    refused(&m, "outsider", "server")?;
    refused(&m, "server", "outsider")?;
    ensure!(
        (m.accepted("server"), m.accepted("outsider")) == before,
        "a connection got through; agent log:\n{}",
        m.agent("node1").log()
    );
    ensure!(!m.agent("node1").log().contains("releasing a pod"), "{}", m.agent("node1").log());
    let check: Value = serde_json::from_str(&agent.get(&format!("/check?pod=server.{NS}"))?)?;
    ensure!(check["enrolled"] == false, "{check}");
    ensure!(check["enrollmentFailure"]["step"] == "netns", "{check}");
    ensure!(check["enrollmentFailure"]["failsClosed"] == true, "{check}");
    let text = mtls_agent::cli::render::check(&check);
    ensure!(text.contains("NOT ENROLLED") && text.contains("fails closed"), "{text}");

    // A second restart still knows whose enrollment it is.
    m.agents.get_mut("node1").context("agent")?.restart()?;
    wait_readiness(m.agent("node1"), &format!("server.{NS} (netns"))?;
    refused(&m, "outsider", "server")?;

    // The pod leaves the mesh: its enforcement goes (plaintext reaches it, and it reaches out).
    w.workloads.retain(|e| e.name != "server");
    w.write(&file)?;
    m.agent("node1").wait_log("released", Duration::from_secs(10))?;
    answered(&m, "outsider", "server", Duration::from_secs(5))?;
    answered(&m, "server", "outsider", Duration::from_secs(5))?;
    Ok(())
}
