//! End-to-end: agents that hold no CA key. Each node's agent makes its pods' keys and asks a
//! real `mtls-agent ca serve` process (gRPC over TLS on loopback) for their certificates; the
//! mesh works as with a key on the node, the agent can reach no CA key, a CA outage costs
//! nothing that is already issued, and a pod that gets no certificate is closed, not open.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use testbed::{
    agent::{AgentOptions, AgentProcess},
    certservice::CaService,
    mesh::{namespace_pa, Mesh, PolicyDir},
};

const NS: &str = "shop";

fn wait_until<T>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `certs` entry of `workload` (`name.shop`), when the agent has one.
fn cert_of(agent: &AgentProcess, workload: &str) -> Result<Option<serde_json::Value>> {
    Ok(agent.certs()?.into_iter().find(|c| c["workload"] == format!("{workload}.{NS}")))
}

fn issued(agent: &AgentProcess, workload: &str) -> Result<Option<serde_json::Value>> {
    Ok(cert_of(agent, workload)?.filter(|c| c["state"] == "issued"))
}

fn call(m: &Mesh, from: &str, to: &str, msg: &str) -> Result<(String, bool)> {
    m.client(from, &["--connect", &m.dst(to), "--message", msg, "--timeout-ms", "6000"])
}

#[test]
fn two_agents_get_every_certificate_from_one_ca_service_and_strict_holds() -> Result<()> {
    let mut m = Mesh::build(
        "cac-two",
        NS,
        &[("node1", "frontend"), ("node1", "outsider"), ("node2", "cart"), ("node2", "db")],
    )?;
    let (workloads, _) = m.workloads("workloads", &["frontend", "cart", "db"])?;
    let ca = m.ca("ca")?;
    let svc = CaService::start(m.bed.id(), &ca, &workloads, &["node1", "node2"])?;
    let policies = PolicyDir::new(m.bed.id())?;
    policies.write("ns.yaml", &namespace_pa(NS, "STRICT"))?;
    let dir = policies.0.display().to_string();
    for node in ["node1", "node2"] {
        m.start_agent_with_ca_service(node, &workloads, &svc, &["--policies", &dir])?;
    }
    for (node, pod) in [("node1", "frontend"), ("node2", "cart"), ("node2", "db")] {
        let c = wait_until(&format!("{pod}'s certificate"), Duration::from_secs(15), || {
            issued(m.agent(node), pod)
        })?;
        let by = c["issuedBy"].as_str().unwrap_or_default();
        ensure!(by == format!("certificate service https://{}", svc.addr), "{c}");
    }
    // The agent says at start that its keys stay on the node, and never that it holds the CA's.
    let log = m.agent("node1").log();
    ensure!(log.contains("keys are made here and never leave this node"), "{log}");
    ensure!(!log.contains("holds the mesh's CA key"), "{log}");

    let capture = m.bed.start_capture()?;
    let canary = "card-number-4111-1111";
    let (reply, ok) = call(&m, "frontend", "cart", canary)?;
    ensure!(ok && reply == format!("cart:{canary}"), "frontend -> cart: {reply}");
    let (reply, ok) = call(&m, "frontend", "db", "q")?;
    ensure!(ok && reply == "db:q", "frontend -> db: {reply}");
    ensure!(!capture.contains(canary.as_bytes()), "plaintext on the fabric");
    ensure!(capture.contains(&[0x17, 0x03, 0x03]), "no TLS records on the fabric");
    drop(capture);

    // STRICT: the pod outside the mesh is refused, then let in under PERMISSIVE.
    let (reply, ok) = call(&m, "outsider", "cart", "x")?;
    ensure!(!ok, "outsider reached cart under STRICT: {reply}");
    policies.write("ns.yaml", &namespace_pa(NS, "PERMISSIVE"))?;
    wait_until("PERMISSIVE to apply", Duration::from_secs(3), || {
        Ok(call(&m, "outsider", "cart", "x")?.1.then_some(()))
    })?;

    // `check` names the issuer of what the pod presents.
    let check = m.agent("node1").get("/check?pod=frontend.shop")?;
    ensure!(check.contains(&format!("certificate service https://{}", svc.addr)), "{check}");
    // The service signed each identity for its own node's agent.
    let slog = svc.log();
    ensure!(slog.contains("node1") && slog.contains("node2"), "ca serve log:\n{slog}");
    Ok(())
}

/// Where in the agent's view of the files (its mount namespace) `path` is.
fn in_view_of(pid: u32, path: &Path) -> std::path::PathBuf {
    Path::new(&format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap_or(path))
}

#[test]
fn an_agent_of_the_ca_service_can_reach_no_ca_key() -> Result<()> {
    let mut m = Mesh::build("cac-nokey", NS, &[("node1", "web"), ("node1", "api")])?;
    let (workloads, _) = m.workloads("workloads", &["web", "api"])?;
    let ca = m.ca("ca")?;
    let key = ca.join("ca-key.pem");
    ensure!(key.exists(), "the CA key is on this machine (for ca serve)");
    let svc = CaService::start(m.bed.id(), &ca, &workloads, &["node1"])?;
    // The agent runs in a mount namespace of its own in which the CA directory is an empty
    // tmpfs: all it has of the PKI is the trust bundle and its token (the service's
    // directory), as in a DaemonSet with no secret mounted.
    let mut opts = AgentOptions::new("node1", &workloads);
    opts.ca_service = Some(svc.agent_args("node1"));
    opts.wrapper = vec![
        "unshare".into(),
        "--mount".into(),
        "--propagation".into(),
        "private".into(),
        "sh".into(),
        "-c".into(),
        format!("mount -t tmpfs -o size=1m tmpfs {} && exec \"$@\"", ca.display()),
        "sh".into(),
    ];
    let agent = AgentProcess::start(&m.bed, opts)?;
    let pid = agent.pid().context("agent pid")?;
    wait_until("web's certificate", Duration::from_secs(15), || issued(&agent, "web"))?;
    m.agents.insert("node1".into(), agent);
    let (reply, ok) = call(&m, "web", "api", "hello")?;
    ensure!(ok && reply == "api:hello", "web -> api in mTLS: {reply}");

    let agent = m.agent("node1");
    // Its arguments name no CA directory or key.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    ensure!(cmdline.contains("mtls-agent") && cmdline.contains("--ca-address"), "{cmdline}");
    ensure!(!cmdline.contains("--ca-dir") && !cmdline.contains("ca-key"), "{cmdline}");
    // No open file of it is the key, or in the CA directory.
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let target = std::fs::read_link(fd?.path()).unwrap_or_default();
        ensure!(!target.starts_with(&ca), "the agent has {} open", target.display());
    }
    // Through its own view of the files the key does not exist, though it does on the host.
    let seen = in_view_of(pid, &key);
    ensure!(!seen.exists() && key.exists(), "the agent can reach {}", seen.display());
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    ensure!(
        mounts.lines().any(|l| l.contains(&format!(" {} ", ca.display())) && l.contains("tmpfs")),
        "the CA directory is not hidden in the agent's mounts:\n{mounts}"
    );
    ensure!(!agent.log().contains("holds the mesh's CA key"));
    Ok(())
}

#[test]
fn a_ca_outage_costs_no_issued_certificate_and_a_new_pod_stays_closed_until_it_ends() -> Result<()>
{
    let mut m = Mesh::build(
        "cac-outage",
        NS,
        &[("node1", "client"), ("node1", "server"), ("node1", "late")],
    )?;
    let (workloads, mut file) = m.workloads("workloads", &["client", "server"])?;
    let ca = m.ca("ca")?;
    let mut svc = CaService::start(m.bed.id(), &ca, &workloads, &["node1"])?;
    // Renewed at about 13-15 s: the outage below outlasts a renewal, not a certificate.
    m.start_agent_with_ca_service("node1", &workloads, &svc, &["--cert-ttl", "30s"])?;
    let first = wait_until("client's certificate", Duration::from_secs(15), || {
        issued(m.agent("node1"), "client")
    })?;
    let (reply, ok) = call(&m, "client", "server", "before")?;
    ensure!(ok && reply == "server:before", "{reply}");

    svc.stop()?;
    wait_until("a failed renewal", Duration::from_secs(25), || {
        Ok(issued(m.agent("node1"), "client")?
            .filter(|c| c["renewalFailures"].as_u64().unwrap_or_default() >= 1))
    })?;
    // Traffic keeps flowing on the certificates in hand.
    let (reply, ok) = call(&m, "client", "server", "during")?;
    ensure!(ok && reply == "server:during", "client -> server while the CA is down: {reply}");
    // Readiness names the outage and still passes (a CA outage must not stall a rollout).
    let (ready, body) = m.agent("node1").readiness()?;
    ensure!(ready, "readiness failed during a CA outage: {body}");
    ensure!(body.contains("the certificate service fails since"), "{body}");
    let metrics = m.agent("node1").metrics_text()?;
    ensure!(metrics.contains("mtls_agent_ca_failing{node=\"node1\"} 1"), "{metrics}");

    // A pod enrolled now gets no certificate: its mesh connections fail closed.
    let late = testbed::agent::WorkloadEntry::of(m.bed.pod("late"), NS);
    file.workloads.push(late);
    file.write(&workloads)?;
    let waiting = wait_until("late to wait for its certificate", Duration::from_secs(5), || {
        cert_of(m.agent("node1"), "late")
    })?;
    ensure!(waiting["state"] == "waiting", "{waiting}");
    let (reply, ok) = call(&m, "late", "server", "leak")?;
    ensure!(
        !ok && !reply.contains("server:leak"),
        "late reached server with no certificate: {reply}"
    );
    let (_, body) = m.agent("node1").readiness()?;
    ensure!(
        body.contains("waiting for a first certificate") && body.contains("late.shop"),
        "{body}"
    );
    let check = m.agent("node1").get("/check?pod=late.shop")?;
    ensure!(check.contains("waiting for its first certificate"), "{check}");

    // The CA returns: the new pod gets its certificate, the renewal succeeds.
    svc.restart()?;
    wait_until("late's certificate", Duration::from_secs(40), || issued(m.agent("node1"), "late"))?;
    let (reply, ok) = call(&m, "late", "server", "after")?;
    ensure!(ok && reply == "server:after", "late -> server once the CA is back: {reply}");
    let renewed = wait_until("the renewal", Duration::from_secs(20), || {
        Ok(issued(m.agent("node1"), "client")?
            .filter(|c| c["serial"] != first["serial"] && c["renewalFailures"].as_u64() == Some(0)))
    })?;
    ensure!(renewed["lastError"].is_null(), "{renewed}");
    let (ready, body) = m.agent("node1").readiness()?;
    ensure!(ready && !body.contains("fails since") && !body.contains("waiting for"), "{body}");
    Ok(())
}

/// Writes `text` to `path` atomically, as the kubelet swaps a ConfigMap volume's files.
fn replace_file(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[test]
fn a_new_root_in_the_trust_bundle_is_trusted_without_a_restart() -> Result<()> {
    let mut m = Mesh::build("cac-rotate", NS, &[("node1", "web"), ("node2", "db")])?;
    let (workloads, _) = m.workloads("workloads", &["web", "db"])?;
    // node2's certificates already come from the new root; node1 still trusts the old only.
    let old = m.ca("old")?;
    let new = m.ca("new")?;
    let svc1 = CaService::start(&format!("{}-1", m.bed.id()), &old, &workloads, &["node1"])?;
    let svc2 = CaService::start(&format!("{}-2", m.bed.id()), &new, &workloads, &["node2"])?;
    let old_root = std::fs::read_to_string(old.join("root-cert.pem"))?;
    let new_root = std::fs::read_to_string(new.join("root-cert.pem"))?;
    replace_file(&svc2.root, &format!("{old_root}{new_root}"))?;
    m.start_agent_with_ca_service("node1", &workloads, &svc1, &[])?;
    m.start_agent_with_ca_service("node2", &workloads, &svc2, &[])?;
    wait_until("web's certificate", Duration::from_secs(15), || issued(m.agent("node1"), "web"))?;
    wait_until("db's certificate", Duration::from_secs(15), || issued(m.agent("node2"), "db"))?;

    let (reply, ok) = call(&m, "web", "db", "before")?;
    ensure!(!ok, "node1 trusted a root it was never given: {reply}");
    // The rotation reaches node1's bundle (both roots): no restart.
    let pid = m.agent("node1").pid();
    replace_file(&svc1.root, &format!("{old_root}{new_root}"))?;
    m.agent("node1").wait_log("trust bundle changed", Duration::from_secs(10))?;
    let (reply, ok) = call(&m, "web", "db", "after")?;
    ensure!(ok && reply == "db:after", "web -> db with both roots trusted: {reply}");
    ensure!(m.agent("node1").pid() == pid, "the agent restarted");
    // A bundle that does not parse changes nothing.
    replace_file(&svc1.root, "not a certificate\n")?;
    m.agent("node1").wait_log("the trust bundle in force stays", Duration::from_secs(10))?;
    let (reply, ok) = call(&m, "web", "db", "still")?;
    ensure!(ok && reply == "db:still", "{reply}");
    Ok(())
}
