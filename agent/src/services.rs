//! Which endpoint a connection to a Service VIP goes to, decided the way kube-proxy decides it,
//! so that a pod reaches through the agent what it would reach without it.
//!
//! - Kubernetes mode: a service port's endpoints are its EndpointSlices' endpoints for that
//!   port (selector or not, mesh pods or not). The usable ones are kube-proxy's
//!   (`pkg/proxy/topology.go`, `CategorizeEndpoints`): the ready endpoints; if none is ready,
//!   the ones both serving and terminating (draining pods still take traffic rather than the
//!   service going dark). With `internalTrafficPolicy: Local` the same rule applies to the
//!   endpoints whose `nodeName` is this node only, and none there means the connection is
//!   refused (kube-proxy drops it). Duplicates (one address in two slices) count once, as in
//!   `pkg/proxy/endpointslicecache.go` (`addEndpoints`). Topology hints are not applied: they
//!   only narrow kube-proxy's choice, and every endpoint chosen here is one it may choose.
//! - `workloads.yaml`: the pods the service's selector picks, at the port's `targetPort`.
//!
//! A VIP and port no service has is not in the table: the connection goes on, unchanged, to the
//! address the app dialled, and the node's own service load balancing (kube-proxy, Cilium)
//! applies to it as it would without the agent.
//!
//! The table is built once per workload set, so a connection costs one hash lookup. In
//! Kubernetes mode the feed builds it on its own thread beside each snapshot
//! ([`ServiceCache::install`]): at 10,000 services that is tens of milliseconds the data
//! plane would otherwise spend per snapshot.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

// Faster than SipHash for the table rebuilt per snapshot (and probed per connection); seeded.
use foldhash::HashMap;

use serde::Serialize;

use crate::workloads::{Service, SliceEndpoint, WorkloadSet};

/// One endpoint a VIP may be sent to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    pub address: SocketAddr,
    /// `name.namespace` of the mesh workload with that address; `None`: outside the mesh
    /// (reached in plaintext).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// A service port as the routing sees it: where its VIP goes from this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRoute {
    /// `name.namespace`.
    pub service: String,
    /// `None`: a headless service (its endpoints are dialled directly).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vip: Option<IpAddr>,
    pub port: u16,
    /// The usable endpoints from this node, in the order the round robin takes them. Empty:
    /// connections are refused.
    pub backends: Vec<Backend>,
    /// `internalTrafficPolicy: Local`: `backends` are this node's only.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub node_local: bool,
}

/// Every port of every service, and the VIPs among them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ServiceTable {
    /// The node it is seen from (`internalTrafficPolicy: Local` depends on it).
    node: String,
    routes: Vec<ServiceRoute>,
    vips: HashMap<SocketAddr, usize>,
}

impl ServiceTable {
    /// The table of `ws` as seen from `node`.
    pub fn build(ws: &WorkloadSet, node: &str) -> ServiceTable {
        let mut table = ServiceTable { node: node.to_owned(), ..ServiceTable::default() };
        for svc in &ws.services {
            // One route per VIP (a dual-stack service has one per family), or one without.
            let vips: Vec<Option<IpAddr>> = match svc.vip {
                None => vec![None],
                Some(vip) => std::iter::once(vip)
                    .chain(svc.other_vips.iter().copied())
                    .map(|ip| Some(ip.to_canonical()))
                    .collect(),
            };
            for vip in vips {
                for sp in &svc.ports {
                    let backends = match &svc.endpoints {
                        Some(endpoints) => {
                            let of_port = endpoints.iter().filter(|e| {
                                e.service_port == sp.port
                                    && vip.is_none_or(|ip| e.address.is_ipv4() == ip.is_ipv4())
                            });
                            usable(of_port, node, svc.internal_traffic_local)
                                .into_iter()
                                .map(|e| {
                                    let address = e.address.to_canonical();
                                    Backend {
                                        address: SocketAddr::new(address, e.port),
                                        pod: ws.by_ip(address).map(|w| w.key()),
                                    }
                                })
                                .collect()
                        }
                        None => selected(ws, svc, sp.target_port),
                    };
                    if let Some(ip) = vip {
                        // Two services claiming one VIP (only the API server could allow it):
                        // the first, in namespace/name order, keeps it.
                        let at = SocketAddr::new(ip, sp.port);
                        table.vips.entry(at).or_insert(table.routes.len());
                    }
                    table.routes.push(ServiceRoute {
                        service: format!("{}.{}", svc.name, svc.namespace),
                        vip,
                        port: sp.port,
                        backends,
                        node_local: svc.internal_traffic_local,
                    });
                }
            }
        }
        table
    }

    /// The route of a VIP and port, if a service has them.
    pub fn get(&self, dst: SocketAddr) -> Option<&ServiceRoute> {
        let i = self.vips.get(&SocketAddr::new(dst.ip().to_canonical(), dst.port()))?;
        self.routes.get(*i)
    }

    /// Every service port, in the order of the services.
    pub fn routes(&self) -> &[ServiceRoute] {
        &self.routes
    }
}

/// workloads.yaml: the selected pods at the target port.
fn selected(ws: &WorkloadSet, svc: &Service, target_port: u16) -> Vec<Backend> {
    let picked = ws.workloads.iter().filter(|w| svc.selects(w));
    picked
        .map(|w| Backend { address: SocketAddr::new(w.ip, target_port), pod: Some(w.key()) })
        .collect()
}

/// kube-proxy's usable endpoints of one service port: ready ones, else serving and terminating
/// ones; with `local`, among those of `node` only. Each address and port once (the first seen,
/// unless a later one is local).
pub fn usable<'a>(
    endpoints: impl IntoIterator<Item = &'a SliceEndpoint>,
    node: &str,
    local: bool,
) -> Vec<&'a SliceEndpoint> {
    let is_local = |e: &SliceEndpoint| !node.is_empty() && e.node_name.as_deref() == Some(node);
    let mut seen: Vec<&SliceEndpoint> = Vec::new();
    let mut index: HashMap<(IpAddr, u16), usize> = HashMap::default();
    for e in endpoints {
        if local && !is_local(e) {
            continue;
        }
        match index.get(&(e.address, e.port)) {
            Some(&i) if !is_local(seen[i]) && is_local(e) => seen[i] = e,
            Some(_) => {}
            None => {
                index.insert((e.address, e.port), seen.len());
                seen.push(e);
            }
        }
    }
    let ready: Vec<&SliceEndpoint> = seen.iter().copied().filter(|e| e.ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    seen.into_iter().filter(|e| e.serving && e.terminating).collect()
}

/// The table of the workload set in force, rebuilt only when the set changes.
pub struct ServiceCache {
    node: String,
    built: Mutex<Option<(Arc<WorkloadSet>, Arc<ServiceTable>)>>,
}

impl ServiceCache {
    pub fn new(node: &str) -> ServiceCache {
        ServiceCache { node: node.to_owned(), built: Mutex::new(None) }
    }

    /// The table of `ws` (the same `Arc` as last time: the table built then).
    pub fn table(&self, ws: &Arc<WorkloadSet>) -> Arc<ServiceTable> {
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((set, table)) = built.as_ref() {
            if Arc::ptr_eq(set, ws) {
                return table.clone();
            }
        }
        let table = Arc::new(ServiceTable::build(ws, &self.node));
        *built = Some((ws.clone(), table.clone()));
        table
    }

    /// Makes `table`, built elsewhere from `ws` (the feed's thread), the table of `ws`, if it
    /// was built for this node; else builds it here. Returns what it replaced, for the caller
    /// to drop off the data plane's thread (freeing a large cluster's table takes time too).
    pub fn install(
        &self,
        ws: &Arc<WorkloadSet>,
        table: Arc<ServiceTable>,
    ) -> Option<(Arc<WorkloadSet>, Arc<ServiceTable>)> {
        let table = if table.node == self.node {
            table
        } else {
            Arc::new(ServiceTable::build(ws, &self.node))
        };
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        built.replace((ws.clone(), table))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn ep(addr: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> SliceEndpoint {
        SliceEndpoint {
            service_port: 443,
            address: addr.parse().unwrap(),
            port: 6443,
            node_name: (!node.is_empty()).then(|| node.into()),
            ready,
            serving,
            terminating,
        }
    }

    fn addrs(v: &[&SliceEndpoint]) -> Vec<String> {
        v.iter().map(|e| e.address.to_string()).collect()
    }

    #[test]
    fn ready_endpoints_are_used_and_not_ready_ones_never_while_one_is_ready() {
        let eps = [
            ep("10.0.0.1", "n1", false, false, false),
            ep("10.0.0.2", "n2", true, true, false),
            ep("10.0.0.3", "n1", false, true, true),
            ep("10.0.0.4", "n2", true, true, false),
        ];
        assert_eq!(addrs(&usable(&eps, "n1", false)), ["10.0.0.2", "10.0.0.4"]);
    }

    #[test]
    fn without_ready_endpoints_serving_terminating_ones_take_over() {
        let eps = [
            ep("10.0.0.1", "n1", false, false, false),
            // Terminating but no longer serving: never.
            ep("10.0.0.2", "n1", false, false, true),
            ep("10.0.0.3", "n2", false, true, true),
            // Serving, not ready, not terminating (a pod failing readiness): never.
            ep("10.0.0.4", "n2", false, true, false),
        ];
        assert_eq!(addrs(&usable(&eps, "n1", false)), ["10.0.0.3"]);
        assert!(usable(&eps[..2], "n1", false).is_empty());
    }

    #[test]
    fn internal_traffic_policy_local_keeps_this_nodes_endpoints_only() {
        let eps = [
            ep("10.0.0.1", "n2", true, true, false),
            ep("10.0.0.2", "n1", false, true, true),
            ep("10.0.0.3", "", true, true, false),
        ];
        // A ready endpoint elsewhere does not hide the local draining one.
        assert_eq!(addrs(&usable(&eps, "n1", true)), ["10.0.0.2"]);
        assert!(usable(&eps, "n3", true).is_empty(), "nothing on n3: refused");
        // An endpoint without nodeName is on no node.
        assert!(usable(&eps[2..], "", true).is_empty());
    }

    #[test]
    fn an_endpoint_in_two_slices_counts_once_preferring_the_local_copy() {
        let eps = [
            ep("10.0.0.1", "", true, true, false),
            ep("10.0.0.1", "n1", true, true, false),
            ep("10.0.0.2", "n2", true, true, false),
        ];
        let u = usable(&eps, "n1", false);
        assert_eq!(addrs(&u), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(u[0].node_name.as_deref(), Some("n1"));
    }

    fn set() -> WorkloadSet {
        WorkloadSet::parse(
            r#"
workloads:
- {name: a, namespace: ns, labels: {app: web}, ip: 10.0.0.2, node: n1}
- {name: b, namespace: ns, labels: {app: web}, ip: 10.0.0.3, node: n2}
services:
- {name: web, namespace: ns, vip: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
- {name: api, namespace: default, vip: 10.96.0.1, ports: [{name: https, port: 443}]}
"#,
            Path::new("w.yaml"),
        )
        .unwrap()
    }

    #[test]
    fn selector_services_of_workloads_yaml_keep_their_pods() {
        let t = ServiceTable::build(&set(), "n1");
        let r = t.get("10.96.0.10:80".parse().unwrap()).unwrap();
        let b: Vec<(String, Option<&str>)> =
            r.backends.iter().map(|b| (b.address.to_string(), b.pod.as_deref())).collect();
        assert_eq!(
            b,
            [("10.0.0.2:8080".into(), Some("a.ns")), ("10.0.0.3:8080".into(), Some("b.ns"))]
        );
        // A selector-less service of workloads.yaml has no endpoints (refused, as before).
        assert!(t.get("10.96.0.1:443".parse().unwrap()).unwrap().backends.is_empty());
        // Not a service's VIP and port: not in the table (relayed unchanged).
        assert!(t.get("10.96.0.10:81".parse().unwrap()).is_none());
        assert!(t.get("10.96.9.9:80".parse().unwrap()).is_none());
        // IPv4-mapped IPv6 is the same VIP.
        assert!(t.get("[::ffff:10.96.0.10]:80".parse().unwrap()).is_some());
    }

    #[test]
    fn slice_endpoints_name_mesh_pods_and_leave_the_rest_outside() {
        let mut ws = set();
        let api = &mut ws.services[1];
        api.endpoints = Some(vec![
            SliceEndpoint { service_port: 443, ..ep("192.0.2.10", "", true, true, false) },
            SliceEndpoint { service_port: 443, ..ep("10.0.0.3", "n2", true, true, false) },
            // Another port's endpoint, and one of the other family: not this port's.
            SliceEndpoint { service_port: 444, ..ep("192.0.2.11", "", true, true, false) },
            SliceEndpoint { service_port: 443, ..ep("fd00::1", "", true, true, false) },
        ]);
        let t = ServiceTable::build(&ws, "n1");
        let r = t.get("10.96.0.1:443".parse().unwrap()).unwrap();
        assert_eq!(r.service, "api.default");
        let b: Vec<(String, Option<&str>)> =
            r.backends.iter().map(|b| (b.address.to_string(), b.pod.as_deref())).collect();
        assert_eq!(b, [("192.0.2.10:6443".into(), None), ("10.0.0.3:6443".into(), Some("b.ns"))]);
        // Slices replace the selector: the web service with an empty slice list has none.
        ws.services[0].endpoints = Some(vec![]);
        let t = ServiceTable::build(&ws, "n1");
        assert!(t.get("10.96.0.10:80".parse().unwrap()).unwrap().backends.is_empty());
    }

    #[test]
    fn a_dual_stack_service_routes_each_family_to_its_own_endpoints() {
        let mut ws = set();
        let api = &mut ws.services[1];
        api.other_vips = vec!["fd00:96::1".parse().unwrap()];
        api.endpoints = Some(vec![
            SliceEndpoint { service_port: 443, ..ep("192.0.2.10", "", true, true, false) },
            SliceEndpoint { service_port: 443, ..ep("fd00::10", "", true, true, false) },
        ]);
        let t = ServiceTable::build(&ws, "n1");
        let of = |vip: &str| -> Vec<String> {
            let r = t.get(vip.parse().unwrap()).unwrap();
            r.backends.iter().map(|b| b.address.to_string()).collect()
        };
        assert_eq!(of("10.96.0.1:443"), ["192.0.2.10:6443"]);
        assert_eq!(of("[fd00:96::1]:443"), ["[fd00::10]:6443"]);
    }

    #[test]
    fn the_cache_rebuilds_only_for_a_new_set() {
        let cache = ServiceCache::new("n1");
        let ws = Arc::new(set());
        let t1 = cache.table(&ws);
        assert!(Arc::ptr_eq(&t1, &cache.table(&ws)));
        let mut changed = set();
        changed.services.clear();
        let t2 = cache.table(&Arc::new(changed));
        assert!(!Arc::ptr_eq(&t1, &t2));
        assert!(t2.get("10.96.0.10:80".parse().unwrap()).is_none());
    }

    #[test]
    fn an_installed_table_is_the_sets_table_only_if_built_for_this_node() {
        let cache = ServiceCache::new("n1");
        let ws = Arc::new(set());
        let made = Arc::new(ServiceTable::build(&ws, "n1"));
        assert!(cache.install(&ws, made.clone()).is_none());
        assert!(Arc::ptr_eq(&made, &cache.table(&ws)));
        // Another node's table (its node-local routes differ) is not taken.
        let other = Arc::new(set());
        let theirs = Arc::new(ServiceTable::build(&other, "n2"));
        let replaced = cache.install(&other, theirs.clone());
        assert!(replaced.is_some_and(|(w, t)| Arc::ptr_eq(&w, &ws) && Arc::ptr_eq(&t, &made)));
        let t = cache.table(&other);
        assert!(!Arc::ptr_eq(&t, &theirs));
        assert_eq!(*t, ServiceTable::build(&other, "n1"));
    }
}
