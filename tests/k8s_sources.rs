//! Kubernetes mode: the policy sources fail closed. Runs as root.
//!
//! The Istio policy kinds are found through API discovery. A kind the cluster does not serve
//! holds no policies; a kind it serves but that cannot be read (403: the agent's RBAC is
//! broken) is an error, never "no policies": at first start the agent enrolls nothing and is
//! not ready, naming the kind; after a good start its last known policies stay enforced. The
//! hostile party is a pod outside the mesh sending plaintext to a STRICT pod. There is no API
//! server on this machine: `testbed::apiserver` is a scripted stand-in (list, watch,
//! discovery, and collections made to answer 403).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use testbed::{
    agent::{AgentOptions, AgentProcess, CaDir},
    apiserver::{self as api, ApiServer},
    mesh::{echo_server, PORT},
    Pod, PodProcess, Testbed,
};

const NS: &str = "shop";
use api::NAMESPACES;
const PA_KIND: &str = "peerauthentications.security.istio.io/v1";

/// A uid in the API server's format, distinct per pod of a test.
fn uid(n: u32) -> String {
    format!("{:08x}-5c0e-4d1a-8b7e-{:012x}", std::process::id(), n)
}

fn pod_cgroup(uid: &str) -> PathBuf {
    let u = uid.replace('-', "_");
    Path::new(&format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"))
        .join("cri-containerd-5c0e.scope")
}

fn pod_object(pod: &Pod, uid: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": NS, "uid": uid, "labels": {"app": pod.name}},
        "spec": {"nodeName": "node1", "serviceAccountName": pod.name,
                 "containers": [{"name": "app", "ports": [{"containerPort": PORT}]}]},
        "status": {"phase": "Running", "podIP": pod.ip.to_string()},
    })
}

fn strict() -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
           "metadata": {"name": "default", "namespace": NS},
           "spec": {"mtls": {"mode": "STRICT"}}})
}

/// One node with two pods of the mesh (`a`, `b`) and an outsider pod the API server does not
/// know, echo servers in each; the stand-in API server serves the core kinds and, when
/// `with_crd`, PeerAuthentication v1 holding a namespace-wide STRICT.
struct Cluster {
    _servers: Vec<PodProcess>,
    server: ApiServer,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
    ca: CaDir,
    node_cgroup: PathBuf,
    bed: Testbed,
}

impl Cluster {
    fn new(test: &str, with_crd: bool) -> Result<Cluster> {
        let mut bed = Testbed::new(test)?;
        let node = bed.add_node("node1")?;
        let a = bed.add_pod_in_cgroup("node1", "a", &pod_cgroup(&uid(1)))?;
        let b = bed.add_pod_in_cgroup("node1", "b", &pod_cgroup(&uid(2)))?;
        bed.add_pod("node1", "outsider")?;
        let servers =
            vec![echo_server(&bed, "a")?, echo_server(&bed, "b")?, echo_server(&bed, "outsider")?];
        let server = ApiServer::start()?;
        for path in [api::PODS, api::SERVICES, api::ENDPOINTSLICES, NAMESPACES] {
            server.serve(path);
        }
        // Opted in (issue 15, item 1): harmless where namespaces are not read.
        server.apply(
            NAMESPACES,
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": NS, "labels": {"istio.io/dataplane-mode": "ambient"}}}),
        );
        server.apply(api::PODS, pod_object(&a, &uid(1)));
        server.apply(api::PODS, pod_object(&b, &uid(2)));
        if with_crd {
            server.apply(api::PEERAUTHENTICATIONS_V1, strict());
        }
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig)?;
        let ca = CaDir::init(&format!("{}-src", bed.id()), "cluster.local")?;
        Ok(Cluster {
            _servers: servers,
            server,
            kubeconfig,
            _dir: dir,
            ca,
            node_cgroup: node.cgroup,
            bed,
        })
    }

    fn options(&self) -> AgentOptions {
        let mut opts = AgentOptions::kubernetes("node1", &self.kubeconfig, &self.node_cgroup);
        opts.ca_dir = Some(self.ca.path.clone());
        // A CRD installed later is found within a second or two.
        opts.extra_args.extend(["--policy-discovery-interval".into(), "1s".into()]);
        opts
    }

    /// The e2e client in `pod` to `dst`'s echo server: (stdout, success).
    fn client(&self, pod: &str, dst: &str, message: &str) -> Result<(String, bool)> {
        let mut cmd = Command::new(testbed::e2e_tool!());
        let to = format!("{}:{PORT}", self.bed.pod(dst).ip);
        cmd.args(["client", "--connect", &to, "--message", message]);
        let out = self.bed.spawn_in_pod(pod, cmd)?.wait_with_output(Duration::from_secs(30))?;
        Ok((String::from_utf8_lossy(&out.stdout).trim().to_owned(), out.status.success()))
    }

    /// The outsider's plaintext to the STRICT pod `b` is refused.
    fn assert_strict_enforced(&self, when: &str) -> Result<()> {
        let (out, ok) = self.client("outsider", "b", "plaintext-from-outsider")?;
        ensure!(!ok && !out.contains("b:plaintext"), "{when}: plaintext reached STRICT b: {out}");
        Ok(())
    }
}

/// Polls `f` every 100 ms until it gives `Some`, for at most `timeout`.
fn until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn config_dump(agent: &AgentProcess) -> Result<Value> {
    serde_json::from_str(&agent.get("/config_dump")?).context("parsing /config_dump")
}

fn source_state(agent: &AgentProcess, kind: &str) -> Result<String> {
    let dump = config_dump(agent)?;
    let sources = dump["policySources"].as_array().cloned().unwrap_or_default();
    let s = sources.iter().find(|s| s["kind"] == kind);
    Ok(s.map(|s| s["state"].as_str().unwrap_or_default().to_owned()).unwrap_or_default())
}

#[test]
fn a_forbidden_peer_authentication_at_first_start_enrolls_nothing_until_it_answers() -> Result<()> {
    let k = Cluster::new("src-first", true)?;
    // The agent's RBAC lacks peerauthentications: the kind is served, the list is refused.
    k.server.fail(api::PEERAUTHENTICATIONS_V1, Some(403));
    let agent = AgentProcess::start_unready(&k.bed, k.options())?;
    let detail = until(Duration::from_secs(15), "readiness naming the kind", || {
        let (ready, detail) = agent.readiness()?;
        ensure!(!ready, "ready while a served policy kind cannot be read: {detail}");
        Ok((detail.contains(PA_KIND) && detail.contains("forbidden")).then_some(detail))
    })?;
    // Retries go on (bounded pause), and still nothing is enrolled nor ready.
    let lists = k.server.lists(api::PEERAUTHENTICATIONS_V1);
    until(Duration::from_secs(15), "the refused list retried", || {
        Ok((k.server.lists(api::PEERAUTHENTICATIONS_V1) > lists + 1).then_some(()))
    })?;
    let (ready, _) = agent.readiness()?;
    ensure!(!ready, "ready after retries: {detail}");
    let dump = config_dump(&agent)?;
    ensure!(dump["effective"].as_array().is_some_and(Vec::is_empty), "enrolled: {dump:#}");
    ensure!(dump["certificates"].as_array().is_some_and(Vec::is_empty), "certificates: {dump:#}");
    ensure!(source_state(&agent, PA_KIND)? == "failing", "{:#}", dump["policySources"]);
    let metrics = agent.metrics_text()?;
    let failing = format!(
        "mtls_agent_policy_source_state{{node=\"node1\",kind=\"{PA_KIND}\",state=\"failing\"}} 1"
    );
    ensure!(metrics.contains(&failing), "{metrics}");
    ensure!(
        metrics.contains(&format!("mtls_agent_policy_source_errors_total{{node=\"node1\",kind=\"{PA_KIND}\",reason=\"forbidden\"}}")),
        "{metrics}"
    );

    // The RBAC is fixed: the policies are read, the pods enrolled under STRICT, the node ready.
    k.server.fail(api::PEERAUTHENTICATIONS_V1, None);
    let detail = until(Duration::from_secs(20), "ready once the kind answers", || {
        let (ready, detail) = agent.readiness()?;
        Ok((ready && detail.contains("2 of 2 pods enrolled")).then_some(detail))
    })?;
    ensure!(!detail.contains("fails"), "{detail}");
    k.assert_strict_enforced("after the kind answered")?;
    let (out, ok) = k.client("a", "b", "in-mesh")?;
    ensure!(ok && out == "b:in-mesh", "{out}");
    let rec = agent.wait_connection(Duration::from_secs(5), |c| {
        c["direction"] == "inbound" && c["destinationPod"] == "b.shop"
    })?;
    ensure!(rec["mode"] == "mTLS", "{rec}");
    ensure!(source_state(&agent, PA_KIND)? == "ok");
    Ok(())
}

#[test]
fn a_forbidden_peer_authentication_after_a_good_start_keeps_strict_enforced() -> Result<()> {
    let k = Cluster::new("src-later", true)?;
    let agent = AgentProcess::start(&k.bed, k.options())?;
    until(Duration::from_secs(15), "both pods enrolled", || {
        let (ready, detail) = agent.readiness()?;
        Ok((ready && detail.contains("2 of 2 pods enrolled")).then_some(()))
    })?;
    k.assert_strict_enforced("after the first sync")?;

    // The RBAC rule goes, then the watch expires: the agent must list again and is refused.
    let lists = k.server.lists(api::PEERAUTHENTICATIONS_V1);
    k.server.fail(api::PEERAUTHENTICATIONS_V1, Some(403));
    k.server.expire(api::PEERAUTHENTICATIONS_V1);
    until(Duration::from_secs(15), "a refused relist", || {
        Ok((k.server.lists(api::PEERAUTHENTICATIONS_V1) > lists).then_some(()))
    })?;
    // Time for a rebuilt snapshot to reach the pods' rules, had it dropped the policy.
    std::thread::sleep(Duration::from_secs(1));
    k.assert_strict_enforced("while PeerAuthentication answers 403")?;
    let check: Value = serde_json::from_str(&agent.get("/check?pod=b.shop")?)?;
    let failing = check["policySourcesFailing"].as_array().cloned().unwrap_or_default();
    ensure!(
        failing
            .iter()
            .any(|f| f.as_str().is_some_and(|f| f.contains(PA_KIND) && f.contains("forbidden"))),
        "check does not name the failing source: {check:#}"
    );
    let strict_row = check["listeners"].as_array().into_iter().flatten().any(|l| {
        l["mtls"] == "yes (STRICT)" && l["listener"].as_str().is_some_and(|s| s.ends_with("_*"))
    });
    ensure!(strict_row, "b is no longer STRICT by its check: {check:#}");
    ensure!(source_state(&agent, PA_KIND)? == "failing");
    let (ready, detail) = agent.readiness()?;
    ensure!(ready && detail.contains(PA_KIND), "readiness: {ready} {detail}");
    // The mesh still carries a to b.
    let (out, ok) = k.client("a", "b", "still-in-mesh")?;
    ensure!(ok && out == "b:still-in-mesh", "{out}");

    // It answers again: the source recovers by itself, STRICT still holds.
    k.server.fail(api::PEERAUTHENTICATIONS_V1, None);
    until(Duration::from_secs(20), "the source answering again", || {
        Ok((source_state(&agent, PA_KIND)? == "ok").then_some(()))
    })?;
    let check: Value = serde_json::from_str(&agent.get("/check?pod=b.shop")?)?;
    ensure!(check["policySourcesFailing"].as_array().is_some_and(Vec::is_empty), "{check:#}");
    k.assert_strict_enforced("after recovery")?;
    Ok(())
}

#[test]
fn a_kind_not_served_is_empty_and_its_crd_installed_later_is_enforced() -> Result<()> {
    let k = Cluster::new("src-crd", false)?;
    // No Istio CRD at all: nothing to read, nothing to wait for.
    let agent = AgentProcess::start(&k.bed, k.options())?;
    until(Duration::from_secs(15), "both pods enrolled", || {
        let (ready, detail) = agent.readiness()?;
        Ok((ready && detail.contains("2 of 2 pods enrolled")).then_some(()))
    })?;
    ensure!(source_state(&agent, PA_KIND)? == "not_served");
    // Kinds not served are not polled: discovery has run a few times (every second), and no
    // list or watch of them was asked for.
    let discoveries = k.server.requests("/apis");
    until(Duration::from_secs(10), "discovery running again", || {
        Ok((k.server.requests("/apis") >= discoveries + 2).then_some(()))
    })?;
    for path in [
        api::PEERAUTHENTICATIONS_V1,
        api::PEERAUTHENTICATIONS_V1BETA1,
        api::POLICIES,
        api::MESHPOLICIES,
    ] {
        ensure!(k.server.requests(path) == 0, "{path} polled while not served");
    }
    // No policy: PERMISSIVE, the outsider's plaintext is accepted.
    let (out, ok) = k.client("outsider", "b", "before-crd")?;
    ensure!(ok && out == "b:before-crd", "{out}");

    // The CRD is installed and a STRICT policy created: discovery finds the kind.
    k.server.serve(api::PEERAUTHENTICATIONS_V1);
    k.server.apply(api::PEERAUTHENTICATIONS_V1, strict());
    until(Duration::from_secs(20), "the new kind read", || {
        Ok((source_state(&agent, PA_KIND)? == "ok").then_some(()))
    })?;
    // The policy reaches the pods' rules right after the snapshot (bounded wait).
    until(Duration::from_secs(10), "STRICT enforced", || {
        let (_, ok) = k.client("outsider", "b", "after-crd")?;
        Ok((!ok).then_some(()))
    })?;
    k.assert_strict_enforced("after the CRD was installed")?;
    Ok(())
}

/// The watchers alone (no agent): a served kind that answers 500 holds the first snapshot
/// back, and is named; once it answers, its policies are in the first snapshot.
#[tokio::test]
async fn a_served_kind_answering_500_holds_the_first_snapshot_back() -> Result<()> {
    let server = ApiServer::start()?;
    for path in [api::PODS, api::SERVICES, api::ENDPOINTSLICES, NAMESPACES] {
        server.serve(path);
    }
    server.apply(api::PEERAUTHENTICATIONS_V1, strict());
    server.fail(api::PEERAUTHENTICATIONS_V1, Some(500));
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;
    let client = mtls_agent::kubernetes::client(Some(&kubeconfig)).await?;
    let feed = mtls_agent::kubernetes::start_with(
        client,
        "istio-system",
        mtls_agent::kubernetes::membership::Settings::default(),
        Duration::from_secs(1),
    );
    let mut rx = feed.subscribe();
    let sources = feed.sources();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !sources.failing().iter().any(|f| f.contains(PA_KIND) && f.contains("server_error")) {
        ensure!(tokio::time::Instant::now() < deadline, "not failing: {:?}", sources.list());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(rx.borrow().is_none(), "a snapshot without the served kind's policies");
    server.fail(api::PEERAUTHENTICATIONS_V1, None);
    let snapshot = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Some(s) = rx.borrow_and_update().clone() {
                return Ok::<_, anyhow::Error>(s);
            }
            rx.changed().await?;
        }
    })
    .await
    .context("no snapshot after the kind answered")??;
    ensure!(snapshot.policies.len() == 1, "{:?}", snapshot.policies);
    ensure!(sources.failing().is_empty(), "{:?}", sources.failing());
    Ok(())
}

/// Issue 15 follow-up (items 3 and 5 together): while a served policy kind cannot be read at
/// first start there is no snapshot and nothing is enrolled, yet a pod of the mesh that starts
/// on the node meanwhile is held from the pods and namespaces watches alone: its connect()s
/// are refused (counted as `heldRefused`) and plaintext from outside the mesh does not reach
/// it. Once the kind answers, the pod is enrolled and carried in mTLS under STRICT.
#[test]
fn a_pod_started_while_peer_authentication_is_forbidden_at_first_start_is_held_closed() -> Result<()>
{
    let mut k = Cluster::new("src-held", true)?;
    k.server.fail(api::PEERAUTHENTICATIONS_V1, Some(403));
    let agent = AgentProcess::start_unready(&k.bed, k.options())?;
    until(Duration::from_secs(15), "readiness naming the kind", || {
        let (ready, detail) = agent.readiness()?;
        ensure!(!ready, "ready while a served policy kind cannot be read: {detail}");
        Ok((detail.contains(PA_KIND) && detail.contains("forbidden")).then_some(()))
    })?;
    // The scheduler binds pod c to node1 and its containers start.
    let c = k.bed.add_pod_in_cgroup("node1", "c", &pod_cgroup(&uid(3)))?;
    let _app = echo_server(&k.bed, "c")?;
    k.server.apply(api::PODS, pod_object(&c, &uid(3)));
    // A sync, not an assertion: an agent that holds nothing before its first sync fails below.
    let _ =
        agent.wait_log("held closed until the pod is enrolled pod=c.shop", Duration::from_secs(10));
    let _ = agent.wait_log(
        "closed to inbound traffic until the pod is enrolled pod=c.shop",
        Duration::from_secs(5),
    );

    let capture = k.bed.start_capture()?;
    let mut cmd = Command::new(testbed::e2e_tool!());
    cmd.args(["attempts", "--connect", &format!("{}:{PORT}", k.bed.pod("b").ip)]);
    cmd.args(["--message", "CANARY-before-sync-3d9a", "--count", "5", "--until-ok", "1"]);
    cmd.args(["--interval-ms", "10", "--timeout-ms", "1000"]);
    let out = k.bed.spawn_in_pod("c", cmd)?.wait_with_output(Duration::from_secs(20))?;
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.lines().filter(|l| l.starts_with("failed permission_denied")).count() == 5,
        "a pod of the mesh got out before the first sync:\n{out}\n{}",
        agent.log()
    );
    let held = agent.stats()?["ebpf"]["heldRefused"].as_u64().unwrap_or_default();
    ensure!(held >= 5, "refusals not counted: {held}");
    let (out, ok) = k.client("outsider", "c", "plaintext-before-sync")?;
    ensure!(!ok && !out.contains("c:plaintext"), "plaintext reached c before the sync: {out}");
    ensure!(!capture.contains(b"CANARY-before-sync-3d9a"), "plaintext from a held pod");
    let (ready, detail) = agent.readiness()?;
    ensure!(!ready, "ready before the first sync: {detail}");
    let dump = config_dump(&agent)?;
    ensure!(dump["effective"].as_array().is_some_and(Vec::is_empty), "enrolled: {dump:#}");

    // The RBAC is fixed: c is enrolled under STRICT and carried in mTLS.
    k.server.fail(api::PEERAUTHENTICATIONS_V1, None);
    until(Duration::from_secs(20), "ready once the kind answers", || {
        let (ready, detail) = agent.readiness()?;
        Ok((ready && detail.contains("3 of 3 pods enrolled")).then_some(()))
    })?;
    let (out, ok) = k.client("c", "b", "from-c")?;
    ensure!(ok && out == "b:from-c", "{out}\n{}", agent.log());
    let rec = agent.wait_connection(Duration::from_secs(5), |r| {
        r["direction"] == "outbound" && r["sourcePod"] == "c.shop"
    })?;
    ensure!(rec["mode"] == "mTLS", "{rec}");
    let (out, ok) = k.client("outsider", "c", "plaintext-after-sync")?;
    ensure!(!ok && !out.contains("c:plaintext"), "plaintext reached STRICT c: {out}");
    Ok(())
}
