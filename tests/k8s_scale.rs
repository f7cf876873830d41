//! The Kubernetes feed as a large cluster needs it (issue 16, item 3). Runs as root.
//!
//! A Kubernetes-mode agent on the test bed against the scripted stand-in API server
//! (`testbed::apiserver`: there is no API server on this machine), which behaves as a real
//! one where it matters here: paginated lists, field selectors and watch bookmarks. The agent
//! must list in pages and still see every pod, ask for whole pod objects only of its own node
//! (`spec.nodeName=<node>`), keep its watch position through bookmarks (a re-watch after a
//! compaction needs no relist), and end a rollout-sized burst with exactly the final pods.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use testbed::{
    agent::{AgentOptions, AgentProcess, CaDir},
    apiserver::{self as api, ApiServer},
    mesh::echo_server,
    Pod, PodProcess, Testbed,
};

/// How long the agent may take to see a change (the burst test waits longer).
const LIVE: Duration = Duration::from_secs(20);

fn uid(n: u32) -> String {
    format!("{:08x}-5ca1-4b7a-8d2f-{:012x}", std::process::id(), n)
}

fn cgroup_of(uid: &str) -> PathBuf {
    let u = uid.replace('-', "_");
    Path::new(&format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"))
        .join("cri-containerd-0a1b2c.scope")
}

/// A running pod object of `node` in namespace `shop` (in the mesh through its namespace).
fn pod_object(name: &str, node: &str, uid: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": uid,
                     "labels": {"app": "web", "pod-template-hash": "5d8f"},
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                          "name": "web-5d8f", "uid": "rs-1", "controller": true}]},
        "spec": {"nodeName": node, "serviceAccountName": "web",
                 "containers": [{"name": "app", "image": "registry.example/web:1",
                                 "ports": [{"containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

/// A remote pod: node2, an address of its own (never dialled: it is only a destination).
fn remote(name: &str, n: u32) -> Value {
    let ip = format!("10.77.{}.{}", n / 250, n % 250 + 1);
    pod_object(name, "node2", &format!("remote-{name}-{n}"), &ip)
}

/// One node with one pod of the mesh, the stand-in API server and the agent. Fields drop in
/// order: the agent first, the bed last.
struct Cluster {
    agent: Option<AgentProcess>,
    _echo: PodProcess,
    server: ApiServer,
    _ca: Option<CaDir>,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    local: Pod,
    bed: Testbed,
    node_cgroup: PathBuf,
}

impl Cluster {
    fn new(test: &str) -> Result<Cluster> {
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
        server.serve(&api::events_path("shop"));
        server.apply(api::NAMESPACES, api::namespace("shop", true));
        let local_uid = uid(1);
        let local = bed.add_pod_in_cgroup("node1", "local", &cgroup_of(&local_uid))?;
        server.apply(api::PODS, pod_object("local", "node1", &local_uid, &local.ip.to_string()));
        // A process in the pod's cgroup: what enrollment finds its network namespace through.
        let echo = echo_server(&bed, "local")?;
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig)?;
        Ok(Cluster {
            agent: None,
            _echo: echo,
            server,
            _ca: None,
            _dir: dir,
            kubeconfig,
            local,
            bed,
            node_cgroup: node.cgroup,
        })
    }

    fn start_agent(&mut self) -> Result<&AgentProcess> {
        let ca = CaDir::init(&format!("{}-scale", self.bed.id()), "cluster.local")?;
        let mut opts = AgentOptions::kubernetes("node1", &self.kubeconfig, &self.node_cgroup);
        opts.ca_dir = Some(ca.path.clone());
        self._ca = Some(ca);
        self.agent = Some(AgentProcess::start(&self.bed, opts)?);
        self.agent()
    }

    fn agent(&self) -> Result<&AgentProcess> {
        self.agent.as_ref().context("agent not started")
    }

    /// The workloads the agent knows (`/workloads`), by key, with their IPs.
    fn workloads(&self) -> Result<BTreeMap<String, Value>> {
        let body = self.agent()?.get("/workloads")?;
        let set: Value = serde_json::from_str(&body).with_context(|| body.clone())?;
        let list = set["workloads"].as_array().cloned().unwrap_or_default();
        Ok(list
            .into_iter()
            .map(|w| {
                let key = format!(
                    "{}.{}",
                    w["name"].as_str().unwrap_or(""),
                    w["namespace"].as_str().unwrap_or("")
                );
                (key, w)
            })
            .collect())
    }

    /// Waits (bounded by `limit`) until `ok` holds.
    fn wait(
        &self,
        what: &str,
        limit: Duration,
        mut ok: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let done = ok().with_context(|| {
                format!("{what}\n{}", self.agent.as_ref().map(|a| a.log()).unwrap_or_default())
            })?;
            if done {
                break;
            }
            if Instant::now() > deadline {
                bail!("{what}: not within {limit:?}\n{}", self.agent()?.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Waits until the local pod is enrolled (the readiness body says so).
    fn wait_enrolled(&self) -> Result<()> {
        self.wait("the local pod enrolled", LIVE, || {
            let (ready, body) = self.agent()?.readiness()?;
            Ok(ready && body.contains("1 of 1 pods enrolled"))
        })
    }

    /// `/check?pod=` as JSON.
    fn check(&self, pod: &str) -> Result<Value> {
        let body = self.agent()?.get(&format!("/check?pod={pod}"))?;
        serde_json::from_str(&body).with_context(|| format!("check {pod}: {body}"))
    }
}

fn is_watch(q: &BTreeMap<String, String>) -> bool {
    q.get("watch").is_some_and(|w| w == "true" || w == "1")
}

#[test]
fn pods_are_listed_in_pages_and_a_pod_on_the_last_page_is_a_destination() -> Result<()> {
    let mut c = Cluster::new("k8s-scale-pages")?;
    // Seven remote pods and the local one: four pages of two.
    for n in 0..7 {
        c.server.apply(api::PODS, remote(&format!("r{n}"), n));
    }
    c.server.max_page(Some(2));
    c.start_agent()?;
    c.wait_enrolled()?;
    // The last pod by key is on the last page.
    c.wait("every remote pod known", LIVE, || {
        let w = c.workloads()?;
        Ok((0..7).all(|n| w.contains_key(&format!("r{n}.shop"))))
    })?;
    let w = c.workloads()?;
    let last = &w["r6.shop"];
    ensure!(last["ip"] == "10.77.0.7" && last["node"] == "node2", "{last:#}");
    ensure!(last["service_account"] == "web" || last["serviceAccount"] == "web", "{last:#}");
    // The agent asked in pages and followed the continue tokens.
    let queries = c.server.requests_with_query(api::PODS);
    let continued = queries.iter().filter(|q| !is_watch(q) && q.contains_key("continue")).count();
    ensure!(continued >= 3, "the remote pods were not listed page by page: {queries:#?}");
    Ok(())
}

#[test]
fn whole_pods_are_asked_for_only_of_this_node_and_remote_ones_are_only_destinations() -> Result<()>
{
    let mut c = Cluster::new("k8s-scale-node")?;
    c.server.apply(api::PODS, remote("far", 1));
    c.start_agent()?;
    c.wait_enrolled()?;
    c.wait("the remote pod known", LIVE, || Ok(c.workloads()?.contains_key("far.shop")))?;
    // Every pod request carries either this node's field selector (whole objects) or none (the
    // projection of every pod); no other node's pods are asked for whole.
    let queries = c.server.requests_with_query(api::PODS);
    let node = "spec.nodeName=node1";
    fn selected(q: &BTreeMap<String, String>) -> Option<&str> {
        q.get("fieldSelector").map(String::as_str)
    }
    ensure!(
        queries.iter().any(|q| !is_watch(q) && selected(q) == Some(node))
            && queries.iter().any(|q| is_watch(q) && selected(q) == Some(node)),
        "this node's pods were not listed and watched by field selector: {queries:#?}"
    );
    ensure!(
        queries.iter().all(|q| matches!(selected(q), None | Some("")) || selected(q) == Some(node)),
        "{queries:#?}"
    );
    // The local pod is enrolled; the remote one, in the same opted-in namespace, is a
    // destination the agent knows, with no decision of this node about it.
    ensure!(c.check("local.shop")?["enrolled"] == true);
    let dump: Value = serde_json::from_str(&c.agent()?.get("/config_dump")?)?;
    let decided: Vec<&str> = dump["membership"]
        .as_array()
        .map(|m| m.iter().filter_map(|m| m["pod"].as_str()).collect())
        .unwrap_or_default();
    ensure!(decided == ["local.shop"], "{decided:?}");
    let w = c.workloads()?;
    ensure!(w["local.shop"]["ip"] == c.local.ip.to_string(), "{:#}", w["local.shop"]);
    ensure!(w["far.shop"]["node"] == "node2", "{:#}", w["far.shop"]);
    Ok(())
}

#[test]
fn a_bookmarked_watch_survives_a_compaction_without_a_relist() -> Result<()> {
    let mut c = Cluster::new("k8s-scale-bookmark")?;
    c.server.bookmark_every(Some(Duration::from_millis(200)));
    c.start_agent()?;
    c.wait_enrolled()?;
    // The enrollment's Event is a write too: made before the bookmarks that must cover it.
    c.wait("the enrollment Event", LIVE, || {
        Ok(!c.server.objects(&api::events_path("shop")).is_empty())
    })?;
    // Changes elsewhere move the server's version past the pods' last event ...
    for n in 0..3 {
        c.server.apply(api::NAMESPACES, api::namespace(&format!("other{n}"), false));
    }
    // ... and bookmarks bring the pod watches' version along.
    let marks = c.server.bookmarks(api::PODS);
    c.wait("bookmarks after the changes", LIVE, || Ok(c.server.bookmarks(api::PODS) >= marks + 4))?;
    let lists = c.server.lists(api::PODS);
    // Old versions are gone; the watches end: a client at an old version must relist.
    c.server.compact(api::PODS);
    c.server.end_watches(api::PODS);
    c.server.apply(api::PODS, remote("after", 9));
    c.wait("a pod made after the re-watch", LIVE, || {
        Ok(c.workloads()?.contains_key("after.shop"))
    })?;
    ensure!(
        c.server.lists(api::PODS) == lists,
        "the pod watches relisted ({} lists, {lists} before): the bookmarks did not keep their version",
        c.server.lists(api::PODS)
    );
    ensure!(c.workloads()?.contains_key("local.shop"));
    Ok(())
}

#[test]
fn a_rollout_sized_burst_ends_with_exactly_the_final_pods() -> Result<()> {
    const N: u32 = 2000;
    let mut c = Cluster::new("k8s-scale-burst")?;
    for n in 0..N {
        c.server.apply(api::PODS, remote(&format!("old{n}"), n));
    }
    c.start_agent()?;
    c.wait_enrolled()?;
    c.wait("the old pods known", LIVE * 3, || Ok(c.workloads()?.len() == N as usize + 1))?;
    // The rollout: every old pod replaced by a new one, which takes over its address.
    for n in 0..N {
        ensure!(c.server.delete(api::PODS, Some("shop"), &format!("old{n}")));
        c.server.apply(api::PODS, remote(&format!("new{n}"), n));
    }
    c.wait("only the new pods", LIVE * 3, || {
        let w = c.workloads()?;
        Ok(w.len() == N as usize + 1
            && w.contains_key("new0.shop")
            && w.contains_key(&format!("new{}.shop", N - 1)))
    })?;
    let w = c.workloads()?;
    ensure!(!w.keys().any(|k| k.starts_with("old")), "old pods left");
    for n in [0, 1, 977, N - 1] {
        let p = &w[&format!("new{n}.shop")];
        let ip = format!("10.77.{}.{}", n / 250, n % 250 + 1);
        ensure!(
            p["ip"] == ip.as_str() && p["uid"] == format!("remote-new{n}-{n}").as_str(),
            "{p:#}"
        );
    }
    ensure!(c.check("local.shop")?["enrolled"] == true);
    Ok(())
}

/// The stand-in's own answers, as a client sees them on the wire: what the tests above rely on.
#[test]
fn the_stand_in_pages_selects_and_expires_continue_tokens_as_a_real_server() -> Result<()> {
    let server = ApiServer::start()?;
    server.serve(api::PODS);
    for n in 0..5 {
        let node = if n % 2 == 0 { "node1" } else { "node2" };
        server
            .apply(api::PODS, pod_object(&format!("p{n}"), node, &uid(n), &format!("10.9.0.{n}")));
    }
    let addr: std::net::SocketAddr = server.url().trim_start_matches("http://").parse()?;
    let get = |q: &str| -> Result<Value> {
        let body = testbed::agent::http(addr, "GET", &format!("{}?{q}", api::PODS))?;
        Ok(serde_json::from_str(&body)?)
    };
    let names = |v: &Value| -> Vec<String> {
        let items = v["items"].as_array().cloned().unwrap_or_default();
        items.iter().filter_map(|i| i["metadata"]["name"].as_str().map(str::to_owned)).collect()
    };
    // Pages of two, then the rest; the version is the first page's throughout.
    let first = get("limit=2")?;
    ensure!(
        names(&first) == ["p0", "p1"] && first["metadata"]["remainingItemCount"] == 3,
        "{first:#}"
    );
    let token = first["metadata"]["continue"].as_str().context("no continue token")?.to_owned();
    server.apply(api::PODS, pod_object("p9", "node1", &uid(9), "10.9.0.9"));
    let second = get(&format!("limit=10&continue={token}"))?;
    ensure!(names(&second) == ["p2", "p3", "p4", "p9"], "{second:#}");
    ensure!(second["metadata"].get("continue").is_none(), "{second:#}");
    ensure!(second["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]);
    // The field selector, URL-encoded as clients send it, both ways.
    let ours = get("fieldSelector=spec.nodeName%3Dnode1")?;
    ensure!(names(&ours) == ["p0", "p2", "p4", "p9"], "{ours:#}");
    let theirs = get("fieldSelector=spec.nodeName%21%3Dnode1")?;
    ensure!(names(&theirs) == ["p1", "p3"], "{theirs:#}");
    // A server-side cap on pages, whatever the limit asked.
    server.max_page(Some(1));
    ensure!(names(&get("limit=500")?) == ["p0"]);
    // After a compaction the old token is gone: 410, the client lists again.
    server.compact(api::PODS);
    let e = get(&format!("limit=2&continue={token}")).err().map(|e| e.to_string());
    ensure!(e.as_deref().is_some_and(|e| e.contains("410")), "{e:?}");
    let queries = server.requests_with_query(api::PODS);
    ensure!(
        queries.len() == 6 && queries[2]["fieldSelector"] == "spec.nodeName=node1",
        "{queries:#?}"
    );
    Ok(())
}
