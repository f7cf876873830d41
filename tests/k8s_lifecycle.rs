//! End-to-end, as an attacker would try it: a restart or upgrade never turns protection off
//! (a pod the new instance cannot enroll stays closed until it is enrolled again or removed),
//! and pods change as in a cluster (a label change updates policy in place, a terminating pod
//! stays enrolled while it drains, a new pod taking a terminating pod's IP is the one served).
//! Kubernetes mode runs against `testbed::apiserver`, a scripted stand-in for the API server.
//! Runs as root.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use testbed::{
    agent::{AgentOptions, AgentProcess, CaDir},
    apiserver::{self as api, ApiServer},
    mesh::{echo_server, namespace_pa, Mesh, PolicyDir, PORT},
    PodProcess, Testbed,
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

// ---- Kubernetes mode: pods change as in a cluster ----

/// The stand-in API server's Namespace collection (the namespace is labelled into the mesh).
use api::NAMESPACES;

/// A uid in the API server's format (uuid), distinct per pod of a test.
fn uid(n: u32) -> String {
    format!("{:08x}-7a1c-4f0e-8d2b-{:012x}", std::process::id(), n)
}

/// The kubelet's systemd-driver cgroup of a burstable pod, with one container.
fn pod_cgroup(uid: &str) -> PathBuf {
    let u = uid.replace('-', "_");
    Path::new(&format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"))
        .join("cri-containerd-5f6e7d.scope")
}

/// A running Pod object of `node`, service account = its name.
fn pod_object(name: &str, ip: Ipv4Addr, uid: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "uid": uid, "labels": labels},
        "spec": {"nodeName": "node1", "serviceAccountName": name,
                 "containers": [{"name": "app", "ports": [{"containerPort": PORT}]}]},
        "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]},
    })
}

/// The same object as the kubelet shows it once deletion began: still Running, draining.
fn terminating(mut pod: Value) -> Value {
    pod["metadata"]["deletionTimestamp"] = json!("2026-12-01T00:00:00Z");
    pod["metadata"]["deletionGracePeriodSeconds"] = json!(30);
    pod
}

/// One node in Kubernetes mode. Drop order: agent, servers, API server, bed.
struct Cluster {
    agent: AgentProcess,
    servers: Vec<PodProcess>,
    api: ApiServer,
    _ca: CaDir,
    _dir: tempfile::TempDir,
    bed: Testbed,
}

impl Cluster {
    /// `pods`: (name, uid number, labels) given to the API server; `outsiders`: pods of the
    /// bed the API server does not know (outside the mesh). Every pod runs an echo server.
    fn start(
        test: &str,
        pods: &[(&str, u32, Value)],
        outsiders: &[&str],
        policies: &[Value],
    ) -> Result<Cluster> {
        let mut bed = Testbed::new(test)?;
        let node = bed.add_node("node1")?;
        let api = ApiServer::start()?;
        for path in
            [NAMESPACES, api::PODS, api::SERVICES, api::ENDPOINTSLICES, api::PEERAUTHENTICATIONS_V1]
        {
            api.serve(path);
        }
        api.apply(
            NAMESPACES,
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": NS, "labels": {"istio.io/dataplane-mode": "ambient"}}}),
        );
        let mut servers = Vec::new();
        for (name, n, labels) in pods {
            let pod = bed.add_pod_in_cgroup("node1", name, &pod_cgroup(&uid(*n)))?;
            servers.push(echo_server(&bed, name)?);
            api.apply(api::PODS, pod_object(name, pod.ip, &uid(*n), labels.clone()));
        }
        for name in outsiders {
            bed.add_pod("node1", name)?;
            servers.push(echo_server(&bed, name)?);
        }
        for p in policies {
            api.apply(api::PEERAUTHENTICATIONS_V1, p.clone());
        }
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        let ca = CaDir::init(&format!("{}-k8s", bed.id()), "cluster.local")?;
        let mut opts = AgentOptions::kubernetes("node1", &kubeconfig, &node.cgroup);
        opts.ca_dir = Some(ca.path.clone());
        let agent = AgentProcess::start(&bed, opts)?;
        let c = Cluster { agent, servers, api, _ca: ca, _dir: dir, bed };
        wait_readiness(&c.agent, &format!("{} of {} pods enrolled", pods.len(), pods.len()))?;
        Ok(c)
    }

    /// The e2e client in `from` to `dst`: (stdout, success).
    fn client(&self, from: &str, dst: Ipv4Addr, extra: &[&str]) -> Result<(String, bool)> {
        let mut cmd = Command::new(testbed::e2e_tool!());
        cmd.args(["client", "--connect", &format!("{dst}:{PORT}"), "--timeout-ms", "2000"]);
        cmd.args(extra);
        let out = self.bed.spawn_in_pod(from, cmd)?.wait_with_output(Duration::from_secs(30))?;
        Ok((String::from_utf8_lossy(&out.stdout).trim().to_owned(), out.status.success()))
    }

    /// Waits until `from -> dst` gets `want` back (`want = None`: until it is refused).
    fn expect(
        &self,
        from: &str,
        dst: Ipv4Addr,
        want: Option<&str>,
        within: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let (out, ok) = self.client(from, dst, &["--message", "hi"])?;
            match want {
                Some(w) if ok && out == format!("{w}:hi") => return Ok(()),
                None if !ok && out.contains("refused") => return Ok(()),
                _ => {}
            }
            if Instant::now() > deadline {
                bail!("{from} -> {dst}: got {out:?}, want {want:?}; log:\n{}", self.agent.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Lines of the agent's log saying `pod` was enrolled.
    fn enrolled_lines(&self, pod: &str) -> usize {
        let log = self.agent.log();
        let pod = format!("pod={pod}");
        log.lines()
            // The agent's own enrollment line, not the Event's or a hold's that mention it.
            .filter(|l| l.contains(": enrolled pod=") || l.contains(": enrolled (after"))
            .filter(|l| l.contains(&pod))
            .count()
    }
}

fn labels(pairs: &[(&str, &str)]) -> Value {
    Value::Object(pairs.iter().map(|(k, v)| (k.to_string(), json!(v))).collect())
}

#[test]
fn a_label_change_to_strict_applies_in_place_and_an_open_connection_survives() -> Result<()> {
    let secure = json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "secure", "namespace": NS},
        "spec": {"selector": {"matchLabels": {"tier": "secure"}}, "mtls": {"mode": "STRICT"}}});
    let c = Cluster::start(
        "kl-label",
        &[("a", 1, labels(&[("app", "a")])), ("b", 2, labels(&[("app", "b")]))],
        &["outsider"],
        &[secure],
    )?;
    let b = c.bed.pod("b").clone();
    // PERMISSIVE while b is not selected: the outsider's plaintext reaches it.
    c.expect("outsider", b.ip, Some("b"), Duration::from_secs(5))?;
    c.expect("a", b.ip, Some("b"), Duration::from_secs(5))?;
    let enrolled = c.enrolled_lines("b.shop");
    ensure!(enrolled == 1, "{}", c.agent.log());

    let listeners = agent_listeners(&c.bed, "b")?;
    ensure!(listeners.len() >= 2, "the agent's listeners in b: {listeners:?}");
    // A connection a -> b (in mTLS) held open across the change.
    let mut cmd = Command::new(testbed::e2e_tool!());
    cmd.args(["hold", "--connect", &format!("{}:{PORT}", b.ip), "--seconds", "4"]);
    let held = c.bed.spawn_in_pod("a", cmd)?;
    held.wait_for_stdout("connected", Duration::from_secs(5))?;
    let deadline = Instant::now() + Duration::from_secs(3);
    while !c
        .agent
        .connections()?
        .iter()
        .any(|r| r["direction"] == "outbound" && r["sourcePod"] == "a.shop" && r["open"] == true)
    {
        ensure!(Instant::now() < deadline, "the held connection is not carried by the agent");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The label that selects b for STRICT arrives: plaintext is refused from then on.
    c.api.apply(
        api::PODS,
        pod_object("b", b.ip, &uid(2), labels(&[("app", "b"), ("tier", "secure")])),
    );
    c.expect("outsider", b.ip, None, Duration::from_secs(5))?;
    let out = held.wait_with_output(Duration::from_secs(20))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && stdout.contains("held"),
        "the open connection did not survive: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // In place: not released, not enrolled again, the same listener sockets (no capture gap).
    let log = c.agent.log();
    ensure!(!log.contains("released"), "{log}");
    ensure!(c.enrolled_lines("b.shop") == enrolled, "re-enrolled:\n{log}");
    let after = agent_listeners(&c.bed, "b")?;
    ensure!(after == listeners, "the agent's listeners in b changed: {listeners:?} -> {after:?}");
    ensure!(log.contains("updated in place"), "{log}");
    c.expect("a", b.ip, Some("b"), Duration::from_secs(5))?;
    let rec = c.agent.wait_connection(Duration::from_secs(5), |r| {
        r["direction"] == "inbound" && r["destinationPod"] == "b.shop" && r["sourcePod"] == "a.shop"
    })?;
    ensure!(rec["mode"] == "mTLS", "{rec}");
    Ok(())
}

#[test]
fn a_terminating_pod_stays_enrolled_and_strict_while_it_drains() -> Result<()> {
    let strict = json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": NS}, "spec": {"mtls": {"mode": "STRICT"}}});
    let c = Cluster::start(
        "kl-term",
        &[("a", 1, labels(&[("app", "a")])), ("b", 2, labels(&[("app", "b")]))],
        &["outsider"],
        &[strict],
    )?;
    let b = c.bed.pod("b").clone();
    c.expect("outsider", b.ip, None, Duration::from_secs(5))?;
    c.api.apply(api::PODS, terminating(pod_object("b", b.ip, &uid(2), labels(&[("app", "b")]))));
    // Past the watch's debounce: still enrolled, still STRICT, still carried in mTLS.
    std::thread::sleep(Duration::from_millis(1000));
    c.expect("a", b.ip, Some("b"), Duration::from_secs(5))?;
    c.expect("outsider", b.ip, None, Duration::from_secs(1))?;
    let (_, detail) = c.agent.readiness()?;
    ensure!(detail.contains("2 of 2 pods enrolled"), "{detail}");
    ensure!(!c.agent.log().contains("released"), "{}", c.agent.log());
    // Gone from the API server: released.
    ensure!(c.api.delete(api::PODS, Some(NS), "b"));
    c.agent.wait_log("released", Duration::from_secs(10))?;
    Ok(())
}

#[test]
fn a_new_pod_taking_a_terminating_pods_ip_is_the_one_served() -> Result<()> {
    let mut c = Cluster::start(
        "kl-reuse",
        &[("a", 1, labels(&[("app", "a")])), ("srv1", 2, labels(&[("app", "srv")]))],
        &[],
        &[],
    )?;
    let ip = c.bed.pod("srv1").ip;
    c.expect("a", ip, Some("srv1"), Duration::from_secs(5))?;

    // srv1 is deleted: terminating in the API; its sandbox (and address) goes. srv2 is
    // created and gets the freed address, while srv1's object still shows it.
    c.api.apply(api::PODS, terminating(pod_object("srv1", ip, &uid(2), labels(&[("app", "srv")]))));
    c.bed.remove_pod("srv1")?;
    c.bed.add_pod_in_cgroup("node1", "srv2", &pod_cgroup(&uid(3)))?;
    c.bed.add_address("srv2", ip.into())?;
    c.servers.push(echo_server(&c.bed, "srv2")?);
    // The client's neighbour entry for the address still names srv1's interface.
    let mut flush = Command::new("ip");
    flush.args(["neigh", "flush", "all"]);
    c.bed.spawn_in_pod("a", flush)?.wait_with_output(Duration::from_secs(5))?;
    c.api.apply(api::PODS, pod_object("srv2", ip, &uid(3), labels(&[("app", "srv")])));

    // The address is srv2's: its identity answers, and the peer check expects it.
    wait_readiness(&c.agent, "2 of 2 pods enrolled")?;
    c.expect("a", ip, Some("srv2"), Duration::from_secs(10))?;
    let rec = c.agent.wait_connection(Duration::from_secs(5), |r| {
        r["direction"] == "outbound"
            && r["sourcePod"] == "a.shop"
            && r["destinationPod"] == "srv2.shop"
    })?;
    ensure!(rec["mode"] == "mTLS", "{rec}");
    ensure!(rec["peerIdentity"] == "spiffe://cluster.local/ns/shop/sa/srv2", "{rec}");
    let w: Value = serde_json::from_str(&c.agent.get("/workloads")?)?;
    let text = w.to_string();
    ensure!(!text.contains("\"srv1\""), "the terminating pod still holds the address: {text}");
    Ok(())
}

/// The socket inodes of the agent's listeners in `pod` (ports 15001 and 15008), from the
/// pod's own `/proc/net/tcp{,6}`.
fn agent_listeners(bed: &Testbed, pod: &str) -> Result<Vec<u64>> {
    let mut cmd = Command::new("cat");
    cmd.args(["/proc/net/tcp", "/proc/net/tcp6"]);
    let out = bed.spawn_in_pod(pod, cmd)?.wait_with_output(Duration::from_secs(5))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut inodes: Vec<u64> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port = f.get(1)?.rsplit(':').next()?;
            // State 0A is LISTEN; 3A99 = 15001, 3AB0 = 15008.
            let ours = matches!(port, "3A99" | "3AB0") && *f.get(3)? == "0A";
            ours.then(|| f.get(9)?.parse().ok()).flatten()
        })
        .collect();
    inodes.sort_unstable();
    Ok(inodes)
}

#[test]
fn kubernetes_mode_a_restart_keeps_a_pod_closed_whose_cgroup_shows_no_process() -> Result<()> {
    let strict = json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": NS}, "spec": {"mtls": {"mode": "STRICT"}}});
    let mut c = Cluster::start(
        "kl-k8s-restart",
        &[("a", 1, labels(&[("app", "a")])), ("b", 2, labels(&[("app", "b")]))],
        &["outsider", "park"],
        &[strict],
    )?;
    let (b, outsider) = (c.bed.pod("b").clone(), c.bed.pod("outsider").clone());
    c.expect("outsider", b.ip, None, Duration::from_secs(5))?;
    c.expect("a", b.ip, Some("b"), Duration::from_secs(5))?;

    // Instance 1 stops; b's only process leaves its cgroup (its namespace and listener stay),
    // so instance 2 cannot find b's namespace through the cgroup.
    c.agent.terminate()?;
    let b_pid = c.servers[1].pid();
    std::fs::write(c.bed.pod("park").cgroup.join("cgroup.procs"), b_pid.to_string())?;
    let accepted = |c: &Cluster| {
        let n = |i: usize| c.servers[i].stdout().lines().filter(|l| l.contains("accepted")).count();
        (n(1), n(2))
    };
    let before = accepted(&c);
    c.agent.restart()?;
    let body = wait_readiness(&c.agent, &format!("b.{NS} (netns"))?;
    ensure!(body.contains("held closed"), "{body}");

    // Still closed both ways: plaintext in is refused, b's own connections stay captured.
    c.expect("outsider", b.ip, None, Duration::from_secs(1))?;
    c.expect("b", outsider.ip, None, Duration::from_secs(1))?;
    ensure!(accepted(&c) == before, "a connection got through; log:\n{}", c.agent.log());
    let check: Value = serde_json::from_str(&c.agent.get(&format!("/check?pod=b.{NS}"))?)?;
    ensure!(check["enrollmentFailure"]["failsClosed"] == true, "{check}");

    // Deleted from the API server: its enforcement goes.
    ensure!(c.api.delete(api::PODS, Some(NS), "b"));
    c.agent.wait_log("released", Duration::from_secs(10))?;
    c.expect("outsider", b.ip, Some("b"), Duration::from_secs(5))?;
    Ok(())
}

#[test]
fn a_corrupt_state_file_keeps_every_enrollment_whose_namespace_still_exists() -> Result<()> {
    let mut m = Mesh::build(
        "kl-corrupt",
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

    // While the agent is down: its state file is garbage, the server's namespace cannot be
    // opened, and the client pod is gone (namespace and all) and out of the workloads.
    let agent = m.agents.get_mut("node1").context("agent")?;
    agent.terminate()?;
    let state = agent.admin_dir.join("enrollments.json");
    std::fs::write(&state, "{\"version\": 1, \"cookies\": {\"1\": ")?;
    let not_netns = std::env::temp_dir().join(format!("{}-not-a-netns", m.bed.id()));
    std::fs::write(&not_netns, b"")?;
    m.files.push(not_netns.clone());
    w.workloads.retain(|e| e.name != "client");
    for e in &mut w.workloads {
        if e.name == "server" {
            e.netns = not_netns.clone();
        }
    }
    w.write(&file)?;
    m.bed.remove_pod("client")?;
    m.agents.get_mut("node1").context("agent")?.restart()?;
    let agent = m.agent("node1");

    // Owner unknown, namespace alive: the server stays closed.
    refused(&m, "outsider", "server")?;
    refused(&m, "server", "outsider")?;
    let error = "enrollments.json: EOF while parsing a value at line 1";
    agent.wait_log(error, Duration::from_secs(5))?;
    wait_readiness(agent, "pinned enrollments of a previous instance kept closed")?;
    // Owner unknown, namespace gone: released.
    agent.wait_log("its network namespace is gone", Duration::from_secs(20))?;
    refused(&m, "outsider", "server")?;
    Ok(())
}

#[test]
fn a_pod_recreated_under_its_name_with_another_service_account_gets_a_new_identity() -> Result<()> {
    let mut c = Cluster::start(
        "kl-recreate",
        &[("a", 1, labels(&[("app", "a")])), ("b", 2, labels(&[("app", "b")]))],
        &[],
        &[],
    )?;
    let ip = c.bed.pod("b").ip;
    c.expect("a", ip, Some("b"), Duration::from_secs(5))?;

    // A StatefulSet-style recreation: same name and address, a new uid, sandbox and service
    // account.
    c.bed.remove_pod("b")?;
    c.bed.add_pod_in_cgroup("node1", "b2", &pod_cgroup(&uid(3)))?;
    c.bed.add_address("b2", ip.into())?;
    c.servers.push(echo_server(&c.bed, "b2")?);
    let mut flush = Command::new("ip");
    flush.args(["neigh", "flush", "all"]);
    c.bed.spawn_in_pod("a", flush)?.wait_with_output(Duration::from_secs(5))?;
    let mut pod = pod_object("b", ip, &uid(3), labels(&[("app", "b")]));
    pod["spec"]["serviceAccountName"] = json!("b-v2");
    c.api.apply(api::PODS, pod);

    // The new pod answers, under its own identity (not the old certificate's).
    c.expect("a", ip, Some("b2"), Duration::from_secs(10))?;
    let rec = c.agent.wait_connection(Duration::from_secs(5), |r| {
        r["direction"] == "outbound"
            && r["sourcePod"] == "a.shop"
            && r["mode"] == "mTLS"
            && r["peerIdentity"] == "spiffe://cluster.local/ns/shop/sa/b-v2"
    });
    ensure!(rec.is_ok(), "{rec:?}");
    let certs = c.agent.certs()?;
    let text = serde_json::to_string(&certs)?;
    ensure!(text.contains("/sa/b-v2\""), "{text}");
    ensure!(!text.contains("/sa/b\""), "the old identity's certificate is still served: {text}");
    Ok(())
}
