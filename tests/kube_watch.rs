//! The agent's Kubernetes watchers against a scripted API server.
//!
//! There is no API server on this machine, so `testbed::apiserver::ApiServer` — a mock that
//! answers list and watch requests from state each test sets — stands in for one. The tests
//! check what the watchers make of it: the node view after the first list, changes from watch
//! events, relists after a lost watch or `410 Gone` that never drop pods in between, and
//! invalid objects rejected by name while the rest stay in force.

use std::{sync::Arc, time::Duration};

use mtls_agent::kubernetes::{self, Snapshot};
use serde_json::{json, Value};
use testbed::apiserver::{self as api, ApiServer};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(20);

fn pod(name: &str, node: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                     "labels": {"app": name}},
        "spec": {"nodeName": node, "serviceAccountName": name,
                 "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}],
                                 "readinessProbe": {"httpGet": {"port": "http"}}}]},
        "status": {"phase": "Running", "podIP": ip},
    })
}

fn peer_auth(version: &str, ns: &str, name: &str, mode: &str) -> Value {
    json!({
        "apiVersion": format!("security.istio.io/{version}"), "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": "2024-01-01T00:00:00Z"},
        "spec": {"mtls": {"mode": mode}},
    })
}

/// A server with every collection served and a cluster of two nodes in it.
fn cluster() -> ApiServer {
    let s = ApiServer::start().expect("mock API server");
    for path in [
        api::PODS,
        api::NAMESPACES,
        api::SERVICES,
        api::ENDPOINTSLICES,
        api::PEERAUTHENTICATIONS_V1,
    ] {
        s.serve(path);
    }
    // Its pods are in the mesh only because the namespace opts in.
    s.apply(api::NAMESPACES, api::namespace("shop", true));
    // The v1beta1 PeerAuthentication and the legacy kinds are not served: an Istio without
    // them must not keep the agent from syncing.
    s.apply(api::PODS, pod("a", "n1", "10.1.0.1"));
    s.apply(api::PODS, pod("b", "n2", "10.1.0.2"));
    let mut host = pod("h", "n1", "192.168.0.1");
    host["spec"]["hostNetwork"] = json!(true);
    s.apply(api::PODS, host);
    let mut pending = pod("p", "n1", "10.1.0.9");
    pending["status"] = json!({"phase": "Pending"});
    s.apply(api::PODS, pending);
    s.apply(
        api::SERVICES,
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "a"},
                        "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}),
    );
    s.apply(
        api::ENDPOINTSLICES,
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "web-1", "namespace": "shop",
                            "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
               "endpoints": [{"addresses": ["10.1.0.1"], "nodeName": "n1",
                              "conditions": {"ready": true}}]}),
    );
    s.apply(api::PEERAUTHENTICATIONS_V1, peer_auth("v1", "shop", "default", "STRICT"));
    s
}

async fn feed(server: &ApiServer) -> (kubernetes::Feed, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let client = kubernetes::client(Some(&kubeconfig)).await.expect("client");
    (kubernetes::start(client, "istio-system"), dir)
}

/// Waits for a snapshot that satisfies `ok`; panics with the last one at the timeout.
async fn until(
    rx: &mut watch::Receiver<Option<Arc<Snapshot>>>,
    what: &str,
    ok: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(s) = rx.borrow_and_update().clone() {
            if ok(&s) {
                return s;
            }
        }
        if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
            panic!("{what}: not seen within {WAIT:?}; last: {:#?}", rx.borrow());
        }
    }
}

fn keys(s: &Snapshot) -> Vec<String> {
    s.workloads.workloads.iter().map(|w| w.key()).collect()
}

fn node_keys(s: &Snapshot, node: &str) -> Vec<String> {
    s.workloads.on_node(node).map(|w| w.key()).collect()
}

#[tokio::test]
async fn first_list_gives_the_cluster_and_the_nodes_pods() {
    let server = cluster();
    let (feed, _dir) = feed(&server).await;
    let mut rx = feed.subscribe();
    let s = until(&mut rx, "first sync", |_| true).await;
    // Remote pods are known (destinations' identities); host-network and pending pods are not.
    assert_eq!(keys(&s), ["a.shop", "b.shop"]);
    assert_eq!(node_keys(&s, "n1"), ["a.shop"]);
    let a = s.workloads.find("a", "shop").expect("pod a");
    assert_eq!(a.service_account, "a");
    assert_eq!(a.uid.as_deref(), Some("uid-a"));
    assert_eq!(a.probe_ports, [8080]);
    // The endpoints and the named target port come from the EndpointSlice.
    let table = mtls_agent::services::ServiceTable::build(&s.workloads, "n1");
    let web = table.get("10.96.0.10:80".parse().unwrap()).expect("service web");
    let pod = |b: &std::net::SocketAddr| s.workloads.by_ip(b.ip()).map(|w| w.key());
    let backends: Vec<(String, Option<String>)> =
        web.backends.iter().map(|b| (b.to_string(), pod(b))).collect();
    assert_eq!(backends, [("10.1.0.1:8080".to_owned(), Some("a.shop".to_owned()))]);
    assert_eq!(s.workloads.services[0].ports[0].target_port, 8080);
    assert_eq!(s.policies.len(), 1);
    let d = s.policies.decide(&s.workloads, a, 8080);
    assert_eq!(d.mode, mtls_agent::policy::Mode::Strict, "{d:?}");
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
}

#[tokio::test]
async fn no_snapshot_before_every_kind_is_listed() {
    let server = cluster();
    server.hold_lists(true);
    let (feed, _dir) = feed(&server).await;
    let mut rx = feed.subscribe();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(rx.borrow().is_none(), "a snapshot before the lists completed");
    server.hold_lists(false);
    until(&mut rx, "sync after the lists", |s| keys(s) == ["a.shop", "b.shop"]).await;
}

#[tokio::test]
async fn watch_events_add_change_and_remove() {
    let server = cluster();
    let (feed, _dir) = feed(&server).await;
    let mut rx = feed.subscribe();
    until(&mut rx, "first sync", |_| true).await;

    server.apply(api::PODS, pod("c", "n1", "10.1.0.3"));
    until(&mut rx, "pod c added", |s| node_keys(s, "n1") == ["a.shop", "c.shop"]).await;

    let mut c = pod("c", "n1", "10.1.0.3");
    c["metadata"]["labels"]["version"] = json!("v2");
    server.apply(api::PODS, c);
    until(&mut rx, "pod c relabelled", |s| {
        s.workloads.find("c", "shop").is_some_and(|w| w.labels.contains_key("version"))
    })
    .await;

    assert!(server.delete(api::PODS, Some("shop"), "a"));
    until(&mut rx, "pod a deleted", |s| node_keys(s, "n1") == ["c.shop"]).await;

    server.apply(api::PEERAUTHENTICATIONS_V1, peer_auth("v1", "shop", "default", "DISABLE"));
    until(&mut rx, "policy changed", |s| {
        let c = s.workloads.find("c", "shop").cloned();
        c.is_some_and(|c| {
            s.policies.decide(&s.workloads, &c, 80).mode == mtls_agent::policy::Mode::Disable
        })
    })
    .await;
}

#[tokio::test]
async fn an_ended_watch_resumes_without_losing_events() {
    let server = cluster();
    let (feed, _dir) = feed(&server).await;
    let mut rx = feed.subscribe();
    until(&mut rx, "first sync", |_| true).await;
    let lists = server.lists(api::PODS);
    server.end_watches(api::PODS);
    // Made while no watch is open: the re-watch from the last version replays it.
    server.apply(api::PODS, pod("d", "n1", "10.1.0.4"));
    until(&mut rx, "pod d after the re-watch", |s| node_keys(s, "n1") == ["a.shop", "d.shop"])
        .await;
    assert_eq!(server.lists(api::PODS), lists, "a resumed watch must not relist");
}

#[tokio::test]
async fn gone_relists_and_keeps_the_pods_meanwhile() {
    let server = cluster();
    let (feed, _dir) = feed(&server).await;
    let mut rx = feed.subscribe();
    until(&mut rx, "first sync", |_| true).await;
    let lists = server.lists(api::PODS);

    // The relist is held: meanwhile the watchers know the pod list is stale, but the view
    // must stay the last complete one.
    server.hold_lists(true);
    server.expire(api::PODS);
    server.delete(api::PODS, Some("shop"), "b");
    server.apply(api::PODS, pod("e", "n1", "10.1.0.5"));
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.lists(api::PODS) == lists {
        assert!(tokio::time::Instant::now() < deadline, "no relist after 410 Gone");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..20 {
        let s = rx.borrow().clone().expect("synced");
        assert_eq!(keys(&s), ["a.shop", "b.shop"], "the view changed during the relist");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    server.hold_lists(false);
    until(&mut rx, "relisted", |s| keys(s) == ["a.shop", "e.shop"]).await;
}

#[tokio::test]
async fn an_invalid_policy_is_rejected_by_name_and_the_others_stay() {
    let server = cluster();
    server.serve(api::PEERAUTHENTICATIONS_V1BETA1);
    server.serve(api::MESHPOLICIES);
    server.apply(api::PEERAUTHENTICATIONS_V1, peer_auth("v1", "shop", "broken", "STRCT"));
    // One object served at two versions counts once.
    server
        .apply(api::PEERAUTHENTICATIONS_V1BETA1, peer_auth("v1beta1", "shop", "default", "STRICT"));
    server.apply(
        api::MESHPOLICIES,
        json!({"apiVersion": "authentication.istio.io/v1alpha1", "kind": "MeshPolicy",
               "metadata": {"name": "default"}, "spec": {"peers": [{"mtls": {}}]}}),
    );
    let (feed, _dir) = feed(&server).await;
    let mut rx = feed.subscribe();
    let s = until(&mut rx, "first sync", |_| true).await;
    assert_eq!(s.rejected.len(), 1, "{:?}", s.rejected);
    let r = &s.rejected[0];
    assert!(
        r.starts_with(
            "kubernetes:peerauthentications/shop/broken:9: spec.mtls.mode: unknown mode \"STRCT\""
        ),
        "{r}"
    );
    let names: Vec<String> = s.policies.policies().map(|p| p.describe()).collect();
    assert_eq!(names, ["PeerAuthentication shop/default", "MeshPolicy default"], "{names:?}");

    // Fixing it brings it in.
    server.apply(api::PEERAUTHENTICATIONS_V1, peer_auth("v1", "shop", "broken", "STRICT"));
    let s = until(&mut rx, "fixed policy", |s| s.rejected.is_empty()).await;
    assert_eq!(s.policies.len(), 3);
}

/// AuthorizationPolicies come from the API server at both versions (one object counted once);
/// an invalid one is rejected by name and field, the others stay in force and are evaluated.
#[tokio::test]
async fn authorization_policies_are_watched_and_an_invalid_one_is_rejected_by_name() {
    let server = cluster();
    server.serve(api::AUTHORIZATIONPOLICIES_V1);
    server.serve(api::AUTHORIZATIONPOLICIES_V1BETA1);
    let ap = |version: &str, name: &str, spec: Value| {
        json!({"apiVersion": format!("security.istio.io/{version}"), "kind": "AuthorizationPolicy",
               "metadata": {"name": name, "namespace": "shop"}, "spec": spec})
    };
    let deny =
        json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["legacy"]}}]}]});
    server.apply(api::AUTHORIZATIONPOLICIES_V1, ap("v1", "deny-legacy", deny.clone()));
    server.apply(api::AUTHORIZATIONPOLICIES_V1BETA1, ap("v1beta1", "deny-legacy", deny));
    server.apply(
        api::AUTHORIZATIONPOLICIES_V1,
        ap(
            "v1",
            "broken",
            json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.300"]}}]}]}),
        ),
    );
    let (feed, _dir) = feed(&server).await;
    let mut rx = feed.subscribe();
    let s = until(&mut rx, "first sync", |_| true).await;
    assert_eq!(s.rejected.len(), 1, "{:?}", s.rejected);
    assert!(
        s.rejected[0].contains("authorizationpolicies/shop/broken")
            && s.rejected[0].contains("spec.rules[0].from[0].source.ipBlocks[0]: invalid address"),
        "{:?}",
        s.rejected
    );
    // deny-legacy once (two versions), and the broken one's fail-closed stand-in.
    let names: Vec<String> = s.policies.authz_policies().iter().map(|p| p.r.to_string()).collect();
    assert_eq!(
        names,
        ["shop/broken", "shop/deny-legacy"],
        "one object at two versions counts once"
    );
    let warned = s.policies.warnings().iter().any(|w| {
        w.message.starts_with("AuthorizationPolicy shop/broken is invalid (see the error): in its place a policy that allows nothing")
    });
    assert!(warned, "{:?}", s.policies.warnings());
    let a = s.workloads.workloads.iter().find(|w| w.name.as_str() == "a").expect("pod a");
    let legacy = mtls_agent::authz::Peer::from_spiffe("spiffe://cluster.local/ns/legacy/sa/x");
    let shop = mtls_agent::authz::Peer::from_spiffe("spiffe://cluster.local/ns/shop/sa/b");
    let conn = |peer| mtls_agent::authz::Conn {
        peer,
        src: "10.1.0.2".parse().unwrap(),
        dst: a.ip,
        port: 8080,
    };
    let v = s.policies.authorize(a, &conn(legacy.as_ref()));
    assert!(!v.allowed);
    assert_eq!(v.reason, "denied by AuthorizationPolicy shop/deny-legacy rule 0");
    // The broken ALLOW fails closed: what it would have allowed is denied until it is fixed.
    assert!(!s.policies.authorize(a, &conn(shop.as_ref())).allowed);

    // Deleted from the API server: no longer in force; fixed: in force as written.
    server.delete(api::AUTHORIZATIONPOLICIES_V1, Some("shop"), "deny-legacy");
    server.delete(api::AUTHORIZATIONPOLICIES_V1BETA1, Some("shop"), "deny-legacy");
    server.apply(
        api::AUTHORIZATIONPOLICIES_V1,
        ap(
            "v1",
            "broken",
            json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.1.0.0/16"]}}]}]}),
        ),
    );
    let s = until(&mut rx, "deleted and fixed", |s| {
        s.rejected.is_empty() && s.policies.authz_policies().len() == 1
    })
    .await;
    let a = s.workloads.workloads.iter().find(|w| w.name.as_str() == "a").expect("pod a");
    assert!(s.policies.authorize(a, &conn(legacy.as_ref())).allowed);
}

#[tokio::test]
async fn a_broken_pod_is_rejected_by_name_and_the_others_stay() {
    let server = cluster();
    let (feed, _dir) = feed(&server).await;
    let mut rx = feed.subscribe();
    until(&mut rx, "first sync", |_| true).await;
    let mut bad = pod("bad", "n1", "10.1.0.300");
    bad["metadata"]["uid"] = json!("uid-bad");
    server.apply(api::PODS, bad);
    let s = until(&mut rx, "bad pod rejected", |s| !s.rejected.is_empty()).await;
    assert!(s.rejected[0].contains("Pod shop/bad"), "{:?}", s.rejected);
    assert_eq!(keys(&s), ["a.shop", "b.shop"]);
}

#[tokio::test]
async fn a_namespace_label_moves_its_pods_in_and_out_of_the_mesh() {
    let server = cluster();
    let (feed, _dir) = feed(&server).await;
    let mut rx = feed.subscribe();
    until(&mut rx, "first sync", |s| keys(s) == ["a.shop", "b.shop"]).await;
    // The label goes: no pod of shop is a workload any more, and each says why.
    server.apply(api::NAMESPACES, api::namespace("shop", false));
    let s = until(&mut rx, "shop out of the mesh", |s| keys(s).is_empty()).await;
    let a = s.membership.iter().find(|m| m.pod == "a.shop").expect("a's decision");
    assert!(!a.membership.is_in(), "{a:?}");
    // A pod's own label brings it back alone.
    let mut b = pod("b", "n2", "10.1.0.2");
    b["metadata"]["labels"]["istio.io/dataplane-mode"] = json!("ambient");
    server.apply(api::PODS, b);
    until(&mut rx, "b in by its own label", |s| keys(s) == ["b.shop"]).await;
    server.apply(api::NAMESPACES, api::namespace("shop", true));
    until(&mut rx, "shop back in", |s| keys(s) == ["a.shop", "b.shop"]).await;
}

#[tokio::test]
async fn no_snapshot_without_namespaces() {
    // Without namespaces' labels nobody can be known to be in the mesh: no sync (not ready).
    let s = ApiServer::start().expect("mock API server");
    for path in [api::PODS, api::SERVICES, api::ENDPOINTSLICES, api::PEERAUTHENTICATIONS_V1] {
        s.serve(path);
    }
    let (feed, _dir) = feed(&s).await;
    let rx = feed.subscribe();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(rx.borrow().is_none(), "a snapshot without namespaces");
}
