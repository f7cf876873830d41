//! Who is in the mesh is the operator's choice (issue 15, item 1). Runs as root.
//!
//! A Kubernetes-mode agent on the test bed, fed by the scripted stand-in API server
//! (`testbed::apiserver`: there is no API server on this machine), enrolls only pods whose
//! namespace or own labels say `istio.io/dataplane-mode=ambient`, never those of `kube-system`,
//! its own namespace or the CA's, and skips pods that carry a sidecar proxy. Each test looks
//! at what the pods' connections really are on the fabric (captured), not only at what the
//! agent says, and at what `check`, `/config_dump` and the Events on the pods say.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use testbed::{
    agent::{agent_bin, AgentOptions, AgentProcess, CaDir},
    apiserver::{self as api, ApiServer},
    mesh::{echo_server, PORT},
    Pod, PodProcess, Testbed,
};

/// How long a label change may take to reach enrollment.
const LIVE: Duration = Duration::from_secs(10);

fn uid(n: u32) -> String {
    format!("{:08x}-3c1e-4b7a-8d2f-{:012x}", std::process::id(), n)
}

fn cgroup_of(uid: &str) -> PathBuf {
    let u = uid.replace('-', "_");
    Path::new(&format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"))
        .join("cri-containerd-0a1b2c.scope")
}

/// A running pod object of node1 for the bed's pod `p`, in `namespace`.
fn pod_object(p: &Pod, namespace: &str, uid: &str, labels: Value, spec: Value) -> Value {
    let mut s = json!({"nodeName": "node1", "serviceAccountName": p.name,
                       "containers": [{"name": "app", "ports": [{"containerPort": PORT}]}]});
    if let (Some(s), Some(extra)) = (s.as_object_mut(), spec.as_object()) {
        s.extend(extra.clone());
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": p.name, "namespace": namespace, "uid": uid, "labels": labels},
        "spec": s,
        "status": {"phase": "Running", "podIP": p.ip.to_string()},
    })
}

/// One node, the stand-in API server and the agent. Fields drop in order: processes first,
/// the bed last.
struct Cluster {
    agent: Option<AgentProcess>,
    servers: Vec<PodProcess>,
    server: ApiServer,
    _ca: Option<CaDir>,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    bed: Testbed,
    node_cgroup: PathBuf,
}

impl Cluster {
    fn new(test: &str, namespaces: &[&str]) -> Result<Cluster> {
        let mut bed = Testbed::new(test)?;
        let node = bed.add_node("node1")?;
        let server = ApiServer::start()?;
        for path in [
            api::PODS,
            api::NAMESPACES,
            api::SERVICES,
            api::ENDPOINTSLICES,
            api::PEERAUTHENTICATIONS_V1,
        ] {
            server.serve(path);
        }
        for ns in namespaces {
            server.serve(&api::events_path(ns));
        }
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig)?;
        Ok(Cluster {
            agent: None,
            servers: Vec::new(),
            server,
            _ca: None,
            _dir: dir,
            kubeconfig,
            bed,
            node_cgroup: node.cgroup,
        })
    }

    /// A pod on the bed with an echo server, known to the API server as `object`'s namespace.
    fn add_pod(&mut self, name: &str, n: u32) -> Result<Pod> {
        let p = self.bed.add_pod_in_cgroup("node1", name, &cgroup_of(&uid(n)))?;
        self.servers.push(echo_server(&self.bed, name)?);
        Ok(p)
    }

    fn start_agent(&mut self, extra: &[&str]) -> Result<&AgentProcess> {
        let ca = CaDir::init(&format!("{}-mem", self.bed.id()), "cluster.local")?;
        let mut opts = AgentOptions::kubernetes("node1", &self.kubeconfig, &self.node_cgroup);
        opts.ca_dir = Some(ca.path.clone());
        opts.extra_args.extend(extra.iter().map(|s| s.to_string()));
        self._ca = Some(ca);
        self.agent = Some(AgentProcess::start(&self.bed, opts)?);
        self.agent()
    }

    fn agent(&self) -> Result<&AgentProcess> {
        self.agent.as_ref().context("agent not started")
    }

    /// `/check?pod=` as JSON.
    fn check(&self, pod: &str) -> Result<Value> {
        let body = self.agent()?.get(&format!("/check?pod={pod}"))?;
        serde_json::from_str(&body).with_context(|| format!("check {pod}: {body}"))
    }

    /// `mtls-agent check POD` as the operator runs it; its table output.
    fn cli_check(&self, pod: &str) -> Result<String> {
        let admin = self.agent()?.admin.to_string();
        let out = Command::new(agent_bin()).args(["check", pod, "--admin", &admin]).output()?;
        ensure!(out.status.success(), "check {pod}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// This node's pods' membership entries from `/config_dump`, by pod.
    fn membership(&self, pod: &str) -> Result<Value> {
        let dump: Value = serde_json::from_str(&self.agent()?.get("/config_dump")?)?;
        let list = dump["membership"].as_array().cloned().unwrap_or_default();
        let found = list.into_iter().find(|m| m["pod"] == pod);
        found.with_context(|| format!("{pod} not in config_dump membership: {dump:#}"))
    }

    /// The Events posted on pod `name` of `namespace` with `reason`.
    fn events(&self, namespace: &str, name: &str, reason: &str) -> Vec<Value> {
        let all = self.server.objects(&api::events_path(namespace));
        all.into_iter()
            .filter(|e| e["involvedObject"]["name"] == name && e["reason"] == reason)
            .collect()
    }

    /// Every Event posted in `namespace`.
    fn all_events(&self, namespace: &str) -> Vec<Value> {
        self.server.objects(&api::events_path(namespace))
    }

    /// Connects from pod `from` to `to`'s echo server with `message`; returns the reply.
    fn client(&self, from: &str, to: &Pod, message: &str) -> Result<String> {
        let mut cmd = Command::new(testbed::e2e_tool!());
        cmd.args(["client", "--connect", &format!("{}:{PORT}", to.ip), "--message", message]);
        let out = self.bed.spawn_in_pod(from, cmd)?.wait_with_output(Duration::from_secs(30))?;
        ensure!(out.status.success(), "client in {from}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Waits (bounded) until the readiness body contains `want`.
    fn wait_ready(&self, want: &str) -> Result<()> {
        let deadline = Instant::now() + LIVE;
        loop {
            let (ready, body) = self.agent()?.readiness()?;
            if ready && body.contains(want) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("readiness never said {want:?}: {body}\n{}", self.agent()?.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (bounded) until `ok` holds.
    fn wait(&self, what: &str, mut ok: impl FnMut() -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + LIVE;
        while !ok()? {
            if Instant::now() > deadline {
                bail!("{what}: not within {LIVE:?}\n{}", self.agent()?.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

/// A connection from `from` to `to` in plaintext, outside the agent: the canary crosses the
/// fabric as sent, and the agent carried nothing from `from`.
fn assert_plaintext_uncaptured(c: &Cluster, from: &str, to: &Pod, canary: &str) -> Result<()> {
    let key = format!("{from}.");
    let carried = || -> Result<usize> {
        let conns = c.agent()?.connections()?;
        Ok(conns
            .iter()
            .filter(|r| r["sourcePod"].as_str().is_some_and(|s| s.starts_with(&key)))
            .count())
    };
    let before = carried()?;
    let capture = c.bed.start_capture()?;
    let out = c.client(from, to, canary)?;
    ensure!(out == format!("{}:{canary}", to.name), "{out}");
    let from_ip = c.bed.pod(from).ip;
    let dst = std::net::SocketAddrV4::new(to.ip, PORT);
    ensure!(
        capture.tcp_payload_contains(from_ip, dst, canary.as_bytes()),
        "{from} -> {}: the canary did not cross the fabric in plaintext: captured or tunnelled",
        to.name
    );
    // Give a carried connection's record time to appear.
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        carried()? == before,
        "the agent carried a connection of {from}: {:#?}",
        c.agent()?.connections()?
    );
    Ok(())
}

/// A connection from `from` to `to` in mutual TLS through the agent: the reply comes back,
/// the canary never crosses the fabric, and the agent recorded it as mTLS.
fn assert_mtls(c: &Cluster, from: &str, to: &Pod, canary: &str) -> Result<()> {
    let capture = c.bed.start_capture()?;
    let out = c.client(from, to, canary)?;
    ensure!(out == format!("{}:{canary}", to.name), "{out}");
    ensure!(!capture.contains(canary.as_bytes()), "{from} -> {}: plaintext on the fabric", to.name);
    let dst_pod = format!("{}.shop", to.name);
    let record = c.agent()?.wait_connection(Duration::from_secs(5), |r| {
        r["direction"] == "inbound" && r["destinationPod"] == dst_pod.as_str()
    })?;
    ensure!(record["mode"] == "mTLS", "{record}");
    Ok(())
}

fn out_reason(v: &Value) -> String {
    v["membership"]["reason"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn only_opted_in_namespaces_and_pods_are_enrolled_and_labels_move_them_live() -> Result<()> {
    let mut c = Cluster::new("mem-live", &["shop"])?;
    let a = c.add_pod("a", 1)?;
    let b = c.add_pod("b", 2)?;
    // The namespace exists, unlabelled: nothing in it is in the mesh.
    c.server.apply(api::NAMESPACES, api::namespace("shop", false));
    c.server.apply(api::PODS, pod_object(&a, "shop", &uid(1), json!({"app": "a"}), json!({})));
    c.server.apply(api::PODS, pod_object(&b, "shop", &uid(2), json!({"app": "b"}), json!({})));
    // STRICT would refuse plaintext to b, if b were in the mesh.
    c.server.apply(
        api::PEERAUTHENTICATIONS_V1,
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
               "metadata": {"name": "default", "namespace": "shop"},
               "spec": {"mtls": {"mode": "STRICT"}}}),
    );
    c.start_agent(&[])?;
    c.wait_ready("0 of 0 pods enrolled")?;

    // Not opted in: a's connect() is not captured, it goes out in plaintext.
    assert_plaintext_uncaptured(&c, "a", &b, "CANARY-unlabelled-7b1d")?;
    // check and config_dump say why.
    let report = c.check("a.shop")?;
    ensure!(report["enrolled"] == false && report["membership"]["inMesh"] == false, "{report:#}");
    let why = out_reason(&report);
    ensure!(
        why.contains("not opted in") && why.contains("istio.io/dataplane-mode=ambient"),
        "{why}"
    );
    ensure!(report["note"].as_str().is_some_and(|n| n.contains("plaintext")), "{report:#}");
    let text = c.cli_check("a.shop")?;
    ensure!(text.contains("NOT IN THE MESH") && text.contains("not opted in"), "{text}");
    let m = c.membership("b.shop")?;
    ensure!(m["inMesh"] == false && m["optedIn"] == false, "{m:#}");
    // Not opted in: no Event at all.
    ensure!(c.all_events("shop").is_empty(), "{:#?}", c.all_events("shop"));

    // Labelling the namespace enrolls both pods, live: a's next connection is mTLS.
    c.server.apply(api::NAMESPACES, api::namespace("shop", true));
    c.wait_ready("2 of 2 pods enrolled")?;
    assert_mtls(&c, "a", &b, "CANARY-labelled-5e2a")?;
    let report = c.check("a.shop")?;
    ensure!(report["enrolled"] == true, "{report:#}");
    ensure!(
        report["membership"]["by"] == "namespace shop label istio.io/dataplane-mode=ambient",
        "{report:#}"
    );
    // One Normal Event per enrolled pod.
    c.wait("MeshEnrolled Events", || {
        Ok(!c.events("shop", "a", "MeshEnrolled").is_empty()
            && !c.events("shop", "b", "MeshEnrolled").is_empty())
    })?;
    let e = &c.events("shop", "a", "MeshEnrolled")[0];
    ensure!(e["type"] == "Normal" && e["involvedObject"]["uid"] == uid(1), "{e:#}");
    ensure!(e["message"].as_str().is_some_and(|m| m.contains("dataplane-mode=ambient")), "{e:#}");

    // `none` on pod b opts it out: released, and a reaches it in plaintext, as a non-mesh
    // destination (STRICT no longer applies to it: it is not in the mesh).
    let none = json!({"app": "b", "istio.io/dataplane-mode": "none"});
    c.server.apply(api::PODS, pod_object(&b, "shop", &uid(2), none, json!({})));
    c.wait_ready("1 of 1 pods enrolled")?;
    let why = out_reason(&c.check("b.shop")?);
    ensure!(why.contains("istio.io/dataplane-mode=none opts it out"), "{why}");
    let capture = c.bed.start_capture()?;
    ensure!(c.client("a", &b, "CANARY-none-41c9")? == "b:CANARY-none-41c9");
    ensure!(capture.contains(b"CANARY-none-41c9"), "a -> b (out of the mesh) was not plaintext");
    c.wait("MeshReleased Event on b", || Ok(!c.events("shop", "b", "MeshReleased").is_empty()))?;

    // Removing the namespace's label releases a too: its connections are plaintext again.
    c.server.apply(api::NAMESPACES, api::namespace("shop", false));
    c.wait_ready("0 of 0 pods enrolled")?;
    assert_plaintext_uncaptured(&c, "a", &b, "CANARY-unlabelled-again-9f03")?;
    ensure!(out_reason(&c.check("a.shop")?).contains("not opted in"));
    // One Event per change, not per rebuild or retry.
    std::thread::sleep(Duration::from_secs(3));
    ensure!(c.events("shop", "a", "MeshEnrolled").len() == 1, "{:#?}", c.all_events("shop"));
    ensure!(c.events("shop", "b", "MeshEnrolled").len() == 1, "{:#?}", c.all_events("shop"));
    ensure!(c.events("shop", "b", "MeshReleased").len() == 1, "{:#?}", c.all_events("shop"));
    Ok(())
}

#[test]
fn kube_system_and_the_agents_and_cas_namespaces_are_never_enrolled_whatever_their_labels(
) -> Result<()> {
    let namespaces = ["kube-system", "mesh-agent", "mesh-pki", "shop"];
    let mut c = Cluster::new("mem-protected", &namespaces)?;
    let dns = c.add_pod("dns", 1)?;
    let agentpod = c.add_pod("agentpod", 2)?;
    let capod = c.add_pod("capod", 3)?;
    let web = c.add_pod("web", 4)?;
    let ambient = json!({"istio.io/dataplane-mode": "ambient"});
    for ns in namespaces {
        c.server.apply(api::NAMESPACES, api::namespace(ns, true));
    }
    // Every label that could opt them in, on the namespace and on the pod.
    for (p, ns, n) in
        [(&dns, "kube-system", 1), (&agentpod, "mesh-agent", 2), (&capod, "mesh-pki", 3)]
    {
        c.server.apply(api::PODS, pod_object(p, ns, &uid(n), ambient.clone(), json!({})));
    }
    c.server.apply(api::PODS, pod_object(&web, "shop", &uid(4), json!({}), json!({})));
    c.start_agent(&["--agent-namespace", "mesh-agent", "--ca-namespace", "mesh-pki"])?;
    // Only web is in the mesh.
    c.wait_ready("1 of 1 pods enrolled")?;

    // kube-system's pod connects as it would without the agent: not captured, plaintext.
    assert_plaintext_uncaptured(&c, "dns", &web, "CANARY-kube-system-2d8e")?;
    assert_plaintext_uncaptured(&c, "agentpod", &web, "CANARY-agent-ns-6a4f")?;
    for (pod, ns, what) in [
        ("dns", "kube-system", "kube-system"),
        ("agentpod", "mesh-agent", "the agent's namespace"),
        ("capod", "mesh-pki", "the CA's namespace"),
    ] {
        let report = c.check(&format!("{pod}.{ns}"))?;
        ensure!(report["enrolled"] == false, "{report:#}");
        let why = out_reason(&report);
        ensure!(why.contains(&format!("namespace {ns} ({what}) is never enrolled")), "{why}");
        // Opted in by its labels yet refused: one Warning Event says why.
        c.wait(&format!("MeshSkipped on {pod}"), || {
            Ok(!c.events(ns, pod, "MeshSkipped").is_empty())
        })?;
        let e = &c.events(ns, pod, "MeshSkipped")[0];
        ensure!(e["type"] == "Warning", "{e:#}");
        ensure!(e["message"].as_str().is_some_and(|m| m.contains("never enrolled")), "{e:#}");
    }
    Ok(())
}

#[test]
fn pods_with_a_sidecar_proxy_native_ones_included_are_skipped_with_the_reason_and_one_event(
) -> Result<()> {
    let mut c = Cluster::new("mem-sidecar", &["shop"])?;
    let istio = c.add_pod("istio", 1)?;
    let native = c.add_pod("native", 2)?;
    let web = c.add_pod("web", 3)?;
    c.server.apply(api::NAMESPACES, api::namespace("shop", true));
    let with_proxy = json!({"containers": [{"name": "app"}, {"name": "istio-proxy"}]});
    c.server.apply(api::PODS, pod_object(&istio, "shop", &uid(1), json!({}), with_proxy));
    let native_sidecar =
        json!({"initContainers": [{"name": "linkerd-proxy", "restartPolicy": "Always"}]});
    c.server.apply(api::PODS, pod_object(&native, "shop", &uid(2), json!({}), native_sidecar));
    c.server.apply(api::PODS, pod_object(&web, "shop", &uid(3), json!({"app": "web"}), json!({})));
    c.start_agent(&[])?;
    c.wait_ready("1 of 1 pods enrolled")?;

    // Left to their sidecars: the agent does not capture them.
    assert_plaintext_uncaptured(&c, "istio", &web, "CANARY-istio-sidecar-0c7b")?;
    assert_plaintext_uncaptured(&c, "native", &web, "CANARY-native-sidecar-8e15")?;
    for (pod, want) in [
        ("istio", "container istio-proxy"),
        ("native", "native sidecar (init container with restartPolicy: Always) linkerd-proxy"),
    ] {
        let why = out_reason(&c.check(&format!("{pod}.shop"))?);
        ensure!(why.contains("sidecar proxy") && why.contains(want), "{why}");
        c.wait(&format!("MeshSkipped on {pod}"), || {
            Ok(!c.events("shop", pod, "MeshSkipped").is_empty())
        })?;
        let e = &c.events("shop", pod, "MeshSkipped")[0];
        ensure!(e["type"] == "Warning", "{e:#}");
        ensure!(e["message"].as_str().is_some_and(|m| m.contains(want)), "{e:#}");
    }
    // Changes elsewhere rebuild the state; the skipped pods get no second Event.
    c.server.apply(
        api::PODS,
        pod_object(&web, "shop", &uid(3), json!({"app": "web", "v": "2"}), json!({})),
    );
    std::thread::sleep(Duration::from_secs(3));
    for pod in ["istio", "native"] {
        let n = c.events("shop", pod, "MeshSkipped").len();
        ensure!(n == 1, "{pod}: {n} MeshSkipped Events: {:#?}", c.all_events("shop"));
    }
    ensure!(c.events("shop", "web", "MeshEnrolled").len() == 1, "{:#?}", c.all_events("shop"));

    // A restart (the pins stay) is no change of membership: the pod its predecessor enrolled
    // gets no second MeshEnrolled.
    c.agent.as_mut().context("agent")?.restart()?;
    c.wait_ready("1 of 1 pods enrolled")?;
    let report = c.check("web.shop")?;
    ensure!(report["enrolled"] == true, "{report:#}");
    std::thread::sleep(Duration::from_secs(2));
    ensure!(c.events("shop", "web", "MeshEnrolled").len() == 1, "{:#?}", c.all_events("shop"));
    Ok(())
}
