//! Services in Kubernetes mode resolve as kube-proxy resolves them (issue 15, item 2). Runs as
//! root.
//!
//! The agent runs in Kubernetes mode against `testbed::apiserver`, a scripted stand-in for the
//! API server (there is none on this machine), on a test bed node with two mesh pods (`a`, the
//! client, and `b`) and pods outside the mesh: namespaces of the bed the API server does not
//! list as pods, playing a database on a VM, the API server behind `kubernetes.default`, or the
//! node's kube-proxy. What is checked:
//! - a selector-less Service (`kubernetes.default:443`) with a slice managed by hand reaches its
//!   endpoint outside the mesh, in plaintext, and the record says why; one whose slice holds a
//!   mesh pod reaches it in mTLS, and `check` lists that pod's port;
//! - a Service with a mesh and a non-mesh endpoint reaches both: mTLS to the pod (nothing of it
//!   on the wire), plaintext to the other;
//! - a not-ready endpoint is never picked while a ready one exists, and serving terminating
//!   endpoints take over when none is ready;
//! - a VIP and port the agent does not know goes on unchanged to the address the app dialled;
//! - `internalTrafficPolicy: Local` uses this node's endpoints only, and refuses without one;
//! - a hostile slice endpoint on loopback never reaches the client pod's own ports;
//! - a dual-stack Service's IPv6 VIP goes to its IPv6 slice.

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
    mesh::PORT,
    Pod, PodProcess, Testbed,
};

const NS: &str = "shop";
/// The Namespace collection (the opt-in label of issue 15 item 1 lives on its objects).
use api::NAMESPACES;
/// The port the "API server" outside the mesh listens on.
const API_PORT: u16 = 6443;
/// A port no service has, where the "kube-proxy" pod listens on its extra addresses.
const UNKNOWN_PORT: u16 = 9090;
const WAIT: Duration = Duration::from_secs(10);

fn uid(n: u32) -> String {
    format!("{:08x}-7c1e-4b2d-8a9f-{:012x}", std::process::id(), n)
}

fn kubepods_cgroup(uid: &str) -> PathBuf {
    let u = uid.replace('-', "_");
    Path::new(&format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"))
        .join("cri-containerd-5e7a.scope")
}

fn echo(bed: &Testbed, pod: &str, listen: &str, prefix: &str) -> Result<PodProcess> {
    let mut cmd = Command::new(testbed::e2e_tool!());
    cmd.args(["echo-server", "--listen", listen, "--prefix", prefix]);
    let p = bed.spawn_in_pod(pod, cmd)?;
    p.wait_for_stdout("listening", Duration::from_secs(5))?;
    Ok(p)
}

fn pod_object(pod: &Pod, uid: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": NS, "uid": uid, "labels": {"app": pod.name}},
        "spec": {"nodeName": "node1", "serviceAccountName": pod.name,
                 "containers": [{"name": "app", "ports": [{"name": "web", "containerPort": PORT}]}]},
        "status": {"phase": "Running", "podIP": pod.ip.to_string()},
    })
}

fn service(ns: &str, name: &str, vip: &str, spec: Value) -> Value {
    let mut spec = spec;
    spec["clusterIP"] = json!(vip);
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

/// A slice of `service` with `endpoints` (address, nodeName, conditions) on `ports`.
fn slice(ns: &str, service: &str, endpoints: &[(Ipv4Addr, &str, Value)], ports: Value) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, node, conditions)| {
            let mut e = json!({"addresses": [ip.to_string()], "conditions": conditions});
            if !node.is_empty() {
                e["nodeName"] = json!(node);
            }
            e
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-x1"), "namespace": ns,
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "endpoints": endpoints, "ports": ports})
}

fn ready() -> Value {
    json!({"ready": true, "serving": true, "terminating": false})
}

/// The agent on node1 with mesh pods `a` and `b` (STRICT), and pods outside the mesh.
struct Cluster {
    // Drop order: the agent, the API server and the servers before the bed.
    agent: AgentProcess,
    server: ApiServer,
    servers: Vec<PodProcess>,
    _ca: CaDir,
    _dir: tempfile::TempDir,
    b: Pod,
    /// Outside the mesh, on this node: echo servers on PORT (`legacy:`) and API_PORT
    /// (`apiserver:`).
    legacy: Pod,
    bed: Testbed,
}

impl Cluster {
    /// `objects`: Services and EndpointSlices to apply before the agent starts.
    fn start(
        test: &str,
        objects: impl FnOnce(&Pod, &Pod, &Pod) -> Vec<(&'static str, Value)>,
    ) -> Result<Cluster> {
        let mut bed = Testbed::new(test)?;
        let node = bed.add_node("node1")?;
        let a = bed.add_pod_in_cgroup("node1", "a", &kubepods_cgroup(&uid(1)))?;
        let b = bed.add_pod_in_cgroup("node1", "b", &kubepods_cgroup(&uid(2)))?;
        let legacy = bed.add_pod("node1", "legacy")?;
        // Outside the mesh, said by the slices to be on node2: echo server on PORT (`far:`).
        let far = bed.add_pod("node1", "far")?;
        let servers = vec![
            // A process in a's cgroup: the agent finds a pod's namespace through it.
            echo(&bed, "a", &format!("0.0.0.0:{PORT}"), "a:")?,
            echo(&bed, "b", &format!("0.0.0.0:{PORT}"), "b:")?,
            echo(&bed, "legacy", &format!("{}:{PORT}", legacy.ip), "legacy:")?,
            echo(&bed, "legacy", &format!("{}:{API_PORT}", legacy.ip), "apiserver:")?,
            echo(&bed, "far", &format!("{}:{PORT}", far.ip), "far:")?,
        ];

        let server = ApiServer::start()?;
        for path in
            [api::PODS, api::SERVICES, api::ENDPOINTSLICES, api::PEERAUTHENTICATIONS_V1, NAMESPACES]
        {
            server.serve(path);
        }
        server.apply(
            NAMESPACES,
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": NS, "labels": {"istio.io/dataplane-mode": "ambient"}}}),
        );
        server.apply(api::PODS, pod_object(&a, &uid(1)));
        server.apply(api::PODS, pod_object(&b, &uid(2)));
        server.apply(
            api::PEERAUTHENTICATIONS_V1,
            json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                   "metadata": {"name": "default", "namespace": NS},
                   "spec": {"mtls": {"mode": "STRICT"}}}),
        );
        for (path, object) in objects(&b, &legacy, &far) {
            server.apply(path, object);
        }
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig)?;
        let ca = CaDir::init(&format!("{}-ks", bed.id()), "cluster.local")?;
        let mut opts = AgentOptions::kubernetes("node1", &kubeconfig, &node.cgroup);
        opts.ca_dir = Some(ca.path.clone());
        let agent = AgentProcess::start(&bed, opts)?;
        let (ready, detail) = agent.readiness()?;
        ensure!(ready && detail.contains("2 of 2 pods enrolled"), "{detail}");
        Ok(Cluster { agent, server, servers, _ca: ca, _dir: dir, b, legacy, bed })
    }

    /// The client in pod `a`: the reply, or the client's error.
    fn call(&self, dst: &str, message: &str) -> Result<std::result::Result<String, String>> {
        let mut cmd = Command::new(testbed::e2e_tool!());
        cmd.args(["client", "--connect", dst, "--message", message, "--timeout-ms", "5000"]);
        let out = self.bed.spawn_in_pod("a", cmd)?.wait_with_output(Duration::from_secs(15))?;
        Ok(if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        })
    }

    fn reply(&self, dst: &str, message: &str) -> Result<String> {
        match self.call(dst, message)? {
            Ok(r) => Ok(r),
            Err(e) => bail!("{dst}: no reply: {e}\nagent log:\n{}", self.agent.log()),
        }
    }

    /// The closed outbound record of `a`'s connection that carried `message`'s reply from
    /// `original`: found by the bytes, which are the message's.
    fn outbound(&self, original: &str) -> Result<Vec<Value>> {
        let conns = self.agent.connections()?;
        Ok(conns
            .into_iter()
            .filter(|c| {
                c["direction"] == "outbound"
                    && c["sourcePod"] == "a.shop"
                    && c["originalDestination"] == original
            })
            .collect())
    }

    /// Waits until `/config_dump` routes `service:port` to exactly `want` (addresses).
    fn wait_route(&self, service: &str, port: u16, want: &[String]) -> Result<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let dump: Value = serde_json::from_str(&self.agent.get("/config_dump")?)?;
            let route = dump["serviceEndpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["service"] == service && r["port"] == port)
                .cloned();
            if let Some(r) = &route {
                let got: Vec<String> = r["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| b["address"].as_str().unwrap_or_default().to_owned())
                    .collect();
                if got == want {
                    return Ok(r.clone());
                }
            }
            ensure!(
                Instant::now() < deadline,
                "{service}:{port} never routed to {want:?}: {route:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn addr(ip: Ipv4Addr, port: u16) -> String {
    format!("{ip}:{port}")
}

/// Waits for the closed records of `original` to number `n`.
fn records(c: &Cluster, original: &str, n: usize) -> Result<Vec<Value>> {
    let deadline = Instant::now() + WAIT;
    loop {
        let recs: Vec<Value> =
            c.outbound(original)?.into_iter().filter(|r| r["open"] == false).collect();
        if recs.len() >= n {
            return Ok(recs);
        }
        ensure!(Instant::now() < deadline, "{n} records of {original} expected, got {recs:#?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_plaintext_outside_the_mesh(rec: &Value, dst: &str) -> Result<()> {
    ensure!(rec["destination"] == dst, "{rec}");
    ensure!(rec["mode"] == "passthrough" && rec["tls"] == "PLAINTEXT", "{rec}");
    ensure!(rec["destinationPod"].is_null(), "{rec}");
    ensure!(rec["policy"] == "none: destination outside the mesh", "{rec}");
    Ok(())
}

#[test]
fn a_selectorless_kubernetes_service_reaches_its_manual_slice_outside_the_mesh_in_plaintext(
) -> Result<()> {
    let c = Cluster::start("ks-kubernetes", |b, legacy, _| {
        vec![
            // Also selector-less, with a mesh pod in its slice: tunnelled as any pod.
            (
                api::SERVICES,
                service(NS, "db", "10.96.0.2", json!({"ports": [{"name": "sql", "port": 5432}]})),
            ),
            (
                api::ENDPOINTSLICES,
                slice(
                    NS,
                    "db",
                    &[(b.ip, "node1", json!({}))],
                    json!([{"name": "sql", "port": PORT}]),
                ),
            ),
            (
                api::SERVICES,
                service(
                    "default",
                    "kubernetes",
                    "10.96.0.1",
                    json!({
                    "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": API_PORT}]}),
                ),
            ),
            (
                api::ENDPOINTSLICES,
                slice(
                    "default",
                    "kubernetes",
                    &[(legacy.ip, "", json!({}))],
                    json!([{"name": "https", "port": API_PORT, "protocol": "TCP"}]),
                ),
            ),
        ]
    })?;
    let reply = c.reply("10.96.0.1:443", "hello-api")?;
    ensure!(reply == "apiserver:hello-api", "{reply}");
    let recs = records(&c, "10.96.0.1:443", 1)?;
    assert_plaintext_outside_the_mesh(&recs[0], &addr(c.legacy.ip, API_PORT))?;

    // `check` names the endpoint, outside the mesh; `/config_dump` has the slice's endpoint.
    let check: Value = serde_json::from_str(&c.agent.get("/check?pod=a.shop")?)?;
    let row = check["outbound"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["hostPort"] == "kubernetes.default:443")
        .with_context(|| format!("no kubernetes row: {check:#}"))?;
    ensure!(
        row["endpoints"] == json!([{"address": addr(c.legacy.ip, API_PORT), "pod": null}]),
        "{row}"
    );
    ensure!(row["mode"].as_str().unwrap_or_default().contains("outside the mesh"), "{row}");
    ensure!(row["validatePeerCertificate"] == "none", "{row}");
    let dump: Value = serde_json::from_str(&c.agent.get("/config_dump")?)?;
    let svc = dump["workloads"]["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == "kubernetes")
        .with_context(|| format!("no kubernetes service: {dump:#}"))?;
    ensure!(svc["endpoints"][0]["address"] == c.legacy.ip.to_string(), "{svc}");
    ensure!(svc["endpoints"][0]["ready"] == true, "{svc}");

    let reply = c.reply("10.96.0.2:5432", "to-db")?;
    ensure!(reply == "b:to-db", "{reply}");
    let recs = records(&c, "10.96.0.2:5432", 1)?;
    ensure!(recs[0]["mode"] == "mTLS" && recs[0]["destinationPod"] == "b.shop", "{}", recs[0]);
    // The pod's port served through the slice alone gets its own row in b's check.
    let check: Value = serde_json::from_str(&c.agent.get("/check?pod=b.shop")?)?;
    let listener = format!("{}_{PORT}", c.b.ip);
    let row =
        check["listeners"].as_array().into_iter().flatten().find(|r| r["listener"] == listener);
    ensure!(
        row.is_some_and(|r| r["mtls"] == "yes (STRICT)"),
        "no STRICT row {listener}: {check:#}"
    );
    Ok(())
}

#[test]
fn a_service_with_a_mesh_and_a_non_mesh_endpoint_reaches_both_in_mtls_and_plaintext() -> Result<()>
{
    let c = Cluster::start("ks-mixed", |b, legacy, _| {
        vec![
            // The selector picks b only: the slice (managed by hand) adds the address outside.
            (
                api::SERVICES,
                service(
                    NS,
                    "web",
                    "10.96.0.20",
                    json!({"selector": {"app": "b"},
                    "ports": [{"name": "http", "port": 80, "targetPort": "web"}]}),
                ),
            ),
            (
                api::ENDPOINTSLICES,
                slice(
                    NS,
                    "web",
                    &[(b.ip, "node1", ready()), (legacy.ip, "", ready())],
                    json!([{"name": "http", "port": PORT, "protocol": "TCP"}]),
                ),
            ),
        ]
    })?;
    let capture = c.bed.start_capture()?;
    let mut to_b = Vec::new();
    let mut to_legacy = Vec::new();
    for i in 0..4 {
        let msg = format!("CANARY-ks-mixed-{i}-7f3a");
        let reply = c.reply("10.96.0.20:80", &msg)?;
        match reply.split_once(':') {
            Some(("b", m)) if m == msg => to_b.push(msg),
            Some(("legacy", m)) if m == msg => to_legacy.push(msg),
            _ => bail!("unexpected reply {reply:?}"),
        }
    }
    ensure!(
        to_b.len() == 2 && to_legacy.len() == 2,
        "round robin: b {to_b:?}, legacy {to_legacy:?}"
    );
    let recs = records(&c, "10.96.0.20:80", 4)?;
    let (mtls, plain): (Vec<&Value>, Vec<&Value>) = recs.iter().partition(|r| r["mode"] == "mTLS");
    ensure!(mtls.len() == 2 && plain.len() == 2, "{recs:#?}");
    for r in &mtls {
        ensure!(r["destination"] == addr(c.b.ip, PORT) && r["destinationPod"] == "b.shop", "{r}");
        ensure!(r["peerIdentity"] == "spiffe://cluster.local/ns/shop/sa/b", "{r}");
    }
    for r in &plain {
        assert_plaintext_outside_the_mesh(r, &addr(c.legacy.ip, PORT))?;
    }
    // What went to the mesh pod never crossed the wire in the clear; the rest did.
    let wire = capture.stop();
    let seen = |m: &str| wire.windows(m.len()).any(|w| w == m.as_bytes());
    for m in &to_b {
        ensure!(!seen(m), "{m}: plaintext on the fabric on the way to the mesh pod");
    }
    ensure!(
        to_legacy.iter().all(|m| seen(m)),
        "the non-mesh endpoint was not reached in plaintext"
    );
    Ok(())
}

#[test]
fn a_not_ready_endpoint_is_never_picked_while_a_ready_one_exists() -> Result<()> {
    let ports = json!([{"name": "http", "port": PORT, "protocol": "TCP"}]);
    let p = ports.clone();
    let c = Cluster::start("ks-ready", move |b, legacy, _| {
        vec![
            (
                api::SERVICES,
                service(
                    NS,
                    "web",
                    "10.96.0.20",
                    json!({"selector": {"app": "b"},
                    "ports": [{"name": "http", "port": 80, "targetPort": PORT}]}),
                ),
            ),
            (
                api::ENDPOINTSLICES,
                slice(
                    NS,
                    "web",
                    &[
                        (
                            b.ip,
                            "node1",
                            json!({"ready": false, "serving": false, "terminating": false}),
                        ),
                        (legacy.ip, "", ready()),
                    ],
                    p,
                ),
            ),
        ]
    })?;
    for i in 0..6 {
        let reply = c.reply("10.96.0.20:80", &format!("r{i}"))?;
        ensure!(
            reply == format!("legacy:r{i}"),
            "connection {i} went to the not-ready endpoint: {reply}"
        );
    }
    // None ready: the serving, terminating endpoint takes over (a draining pod), never the one
    // that is terminating and no longer serving.
    c.server.apply(
        api::ENDPOINTSLICES,
        slice(
            NS,
            "web",
            &[
                (c.b.ip, "node1", json!({"ready": false, "serving": true, "terminating": true})),
                (c.legacy.ip, "", json!({"ready": false, "serving": false, "terminating": true})),
            ],
            ports,
        ),
    );
    c.wait_route("web.shop", 80, &[addr(c.b.ip, PORT)])?;
    for i in 0..3 {
        let reply = c.reply("10.96.0.20:80", &format!("t{i}"))?;
        ensure!(reply == format!("b:t{i}"), "{reply}");
    }
    Ok(())
}

#[test]
fn a_vip_the_agent_does_not_know_is_relayed_unchanged() -> Result<()> {
    // The "kube-proxy" of the node: the legacy pod answers on two more addresses, each with a
    // server bound to that address alone, so a reply proves the connection arrived there.
    let mut c = Cluster::start("ks-unknown", |b, _, _| {
        vec![(
            api::ENDPOINTSLICES,
            slice(NS, "web", &[(b.ip, "node1", ready())], json!([{"name": "http", "port": PORT}])),
        )]
    })?;
    let vip = c.bed.alloc_address()?;
    let plain = c.bed.alloc_address()?;
    c.bed.add_address("legacy", vip.into())?;
    c.bed.add_address("legacy", plain.into())?;
    c.servers.push(echo(&c.bed, "legacy", &addr(vip, UNKNOWN_PORT), "kube-proxy:")?);
    c.servers.push(echo(&c.bed, "legacy", &addr(plain, UNKNOWN_PORT), "no-service:")?);
    // A service owns vip:80 (its Service object arrives once the address exists);
    // vip:UNKNOWN_PORT is no service's, nor is anything at `plain`.
    c.server.apply(
        api::SERVICES,
        service(
            NS,
            "web",
            &vip.to_string(),
            json!({"selector": {"app": "b"},
            "ports": [{"name": "http", "port": 80, "targetPort": PORT}]}),
        ),
    );
    c.wait_route("web.shop", 80, &[addr(c.b.ip, PORT)])?;
    let reply = c.reply(&addr(vip, 80), "known")?;
    ensure!(reply == "b:known", "{reply}");

    for (ip, prefix) in [(vip, "kube-proxy"), (plain, "no-service")] {
        let dst = addr(ip, UNKNOWN_PORT);
        let reply = c.reply(&dst, "as-dialled")?;
        ensure!(reply == format!("{prefix}:as-dialled"), "{dst}: {reply}");
        let recs = records(&c, &dst, 1)?;
        ensure!(recs[0]["destination"] == dst, "{dst} was rewritten: {}", recs[0]);
        assert_plaintext_outside_the_mesh(&recs[0], &dst)?;
    }
    Ok(())
}

#[test]
fn internal_traffic_policy_local_uses_this_nodes_endpoints_and_refuses_without_one() -> Result<()> {
    let ports = json!([{"name": "http", "port": PORT, "protocol": "TCP"}]);
    let c = Cluster::start("ks-local", move |_, legacy, far| {
        let spec = json!({"internalTrafficPolicy": "Local",
                          "ports": [{"name": "http", "port": 80, "targetPort": PORT}]});
        vec![
            (api::SERVICES, service(NS, "local", "10.96.0.30", spec.clone())),
            (
                api::ENDPOINTSLICES,
                slice(
                    NS,
                    "local",
                    &[(far.ip, "node2", ready()), (legacy.ip, "node1", ready())],
                    ports.clone(),
                ),
            ),
            (api::SERVICES, service(NS, "elsewhere", "10.96.0.31", spec)),
            (api::ENDPOINTSLICES, slice(NS, "elsewhere", &[(far.ip, "node2", ready())], ports)),
        ]
    })?;
    for i in 0..4 {
        let reply = c.reply("10.96.0.30:80", &format!("l{i}"))?;
        ensure!(reply == format!("legacy:l{i}"), "connection {i} left the node: {reply}");
    }
    // Only on node2: refused here, never sent there.
    if let Ok(reply) = c.call("10.96.0.31:80", "nowhere")? {
        bail!("a Local service without a local endpoint answered: {reply}");
    }
    c.agent
        .wait_log("has no usable endpoints on this node (internalTrafficPolicy: Local)", WAIT)?;
    // The servers: a, b, legacy twice, then far.
    let far_accepted = c.servers[4].stdout();
    ensure!(!far_accepted.contains("accepted"), "the node2 endpoint was dialled: {far_accepted}");
    Ok(())
}

#[test]
fn a_slice_endpoint_on_loopback_never_reaches_the_client_pods_own_ports() -> Result<()> {
    // A tenant who may write EndpointSlices in its namespace points its Service at 127.0.0.1:
    // the agent dials endpoints from inside the client's pod, so that would hand a client's
    // connection to a port of the client's own that only it can reach (kube-proxy could not
    // DNAT there; the API server forbids such addresses, the agent does not rely on it).
    let ports = json!([{"name": "http", "port": 7777, "protocol": "TCP"}]);
    let mut c = Cluster::start("ks-loopback", move |_, legacy, _| {
        let spec = json!({"ports": [{"name": "http", "port": 80, "targetPort": 7777}]});
        let local = Ipv4Addr::LOCALHOST;
        vec![
            (api::SERVICES, service(NS, "trap", "10.96.0.40", spec)),
            (api::ENDPOINTSLICES, slice(NS, "trap", &[(local, "node1", ready())], ports.clone())),
            // Loopback beside a good endpoint: a's own server on 0.0.0.0:PORT would answer
            // the first, only the second may.
            (
                api::SERVICES,
                service(
                    NS,
                    "mixed",
                    "10.96.0.41",
                    json!({"ports": [{"name": "http", "port": 80}]}),
                ),
            ),
            (
                api::ENDPOINTSLICES,
                slice(
                    NS,
                    "mixed",
                    &[(local, "node1", ready()), (legacy.ip, "", ready())],
                    json!([{"name": "http", "port": PORT, "protocol": "TCP"}]),
                ),
            ),
        ]
    })?;
    let private = echo(&c.bed, "a", "127.0.0.1:7777", "a-private:")?;
    c.servers.push(private);
    if let Ok(reply) = c.call("10.96.0.40:80", "secret")? {
        bail!("the VIP reached the client pod's own loopback port: {reply}");
    }
    c.agent.wait_log(
        "EndpointSlice shop/trap-x1: endpoints[0].addresses[0]: 127.0.0.1 is not allowed",
        WAIT,
    )?;
    let seen = c.servers.last().map(PodProcess::stdout).unwrap_or_default();
    ensure!(!seen.contains("accepted"), "the loopback server was dialled: {seen}");
    for i in 0..3 {
        let reply = c.reply("10.96.0.41:80", &format!("m{i}"))?;
        ensure!(reply == format!("legacy:m{i}"), "{reply}");
    }
    Ok(())
}

#[test]
fn a_dual_stack_service_resolves_each_vip_to_the_slice_of_its_family() -> Result<()> {
    let mut c = Cluster::start("ks-dual", |_, legacy, _| {
        let slice_of = |family: &str, ip: String| {
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": format!("dual-{}", family.to_lowercase()), "namespace": NS,
                                "labels": {"kubernetes.io/service-name": "dual"}},
                   "addressType": family, "endpoints": [{"addresses": [ip]}],
                   "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}]})
        };
        vec![
            (
                api::SERVICES,
                service(
                    NS,
                    "dual",
                    "10.96.0.50",
                    json!({
                    "clusterIPs": ["10.96.0.50", "fd00:96::50"], "ipFamilyPolicy": "RequireDualStack",
                    "ports": [{"name": "http", "port": 80, "targetPort": PORT}]}),
                ),
            ),
            (api::ENDPOINTSLICES, slice_of("IPv4", legacy.ip.to_string())),
            (api::ENDPOINTSLICES, slice_of("IPv6", legacy.ip6.to_string())),
        ]
    })?;
    let v6 = format!("[{}]:{PORT}", c.legacy.ip6);
    c.servers.push(echo(&c.bed, "legacy", &v6, "legacy6:")?);
    let reply = c.reply("10.96.0.50:80", "four")?;
    ensure!(reply == "legacy:four", "{reply}");
    let reply = c.reply("[fd00:96::50]:80", "six")?;
    ensure!(reply == "legacy6:six", "{reply}");
    let recs = records(&c, "[fd00:96::50]:80", 1)?;
    assert_plaintext_outside_the_mesh(&recs[0], &v6)?;
    Ok(())
}
