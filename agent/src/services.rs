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
//! The table is built once per workload set, so a connection costs one hash lookup for the
//! VIP and one for the pod at the chosen endpoint. In Kubernetes mode the feed builds it on
//! its own thread beside each snapshot ([`ServiceCache::install`]), reusing the routes of
//! every service the last set shares with it: a rollout changes a few services of thousands.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

// Faster than SipHash for the table rebuilt per snapshot (and probed per connection); seeded.
use foldhash::HashMap;

use crate::workloads::{Service, SliceEndpoint, WorkloadSet};

/// A service port as the routing sees it: where its VIP goes from this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRoute {
    /// `name.namespace`.
    pub service: String,
    /// `None`: a headless service (its endpoints are dialled directly).
    pub vip: Option<IpAddr>,
    pub port: u16,
    /// The usable endpoints from this node, in the order the round robin takes them. Empty:
    /// connections are refused. Which of them are mesh pods is the workload set's answer at
    /// connection time (one lookup by address), not stored here: a pod's change then costs
    /// no service's routes.
    pub backends: Vec<SocketAddr>,
    /// `internalTrafficPolicy: Local`: `backends` are this node's only.
    pub node_local: bool,
}

/// Every port of every service, and the VIPs among them.
#[derive(Debug, Default)]
pub struct ServiceTable {
    /// The node it is seen from (`internalTrafficPolicy: Local` depends on it).
    node: String,
    /// Per service of the set, in its order: the service and its routes (one per VIP and
    /// port). A service the next set shares (the same `Arc`) keeps its routes.
    services: Vec<(Arc<Service>, Arc<[ServiceRoute]>)>,
    /// VIP and port to (service, route) positions.
    vips: HashMap<SocketAddr, (u32, u32)>,
}

impl PartialEq for ServiceTable {
    fn eq(&self, other: &Self) -> bool {
        self.node == other.node && self.routes().eq(other.routes())
    }
}

impl Eq for ServiceTable {}

impl ServiceTable {
    /// The table of `ws` as seen from `node`.
    pub fn build(ws: &WorkloadSet, node: &str) -> ServiceTable {
        Self::build_from(ws, node, None)
    }

    /// As [`ServiceTable::build`], reusing the routes of `previous` for every service the two
    /// sets share: in a large cluster a snapshot changes a few services of thousands.
    pub fn build_from(
        ws: &WorkloadSet,
        node: &str,
        previous: Option<&ServiceTable>,
    ) -> ServiceTable {
        // By address: `previous` holds its services, so no new one can have an old address.
        let reusable: HashMap<*const Service, &Arc<[ServiceRoute]>> = previous
            .filter(|p| p.node == node)
            .map(|p| p.services.iter().map(|(s, r)| (Arc::as_ptr(s), r)).collect())
            .unwrap_or_default();
        let mut table = ServiceTable { node: node.to_owned(), ..ServiceTable::default() };
        table.services.reserve(ws.services.len());
        for svc in &ws.services {
            let routes = match reusable.get(&Arc::as_ptr(svc)) {
                // Routes from slices depend on the service alone; a selector's (workloads.yaml)
                // on the pods too, so those are made again.
                Some(r) if svc.endpoints.is_some() => Arc::clone(r),
                _ => routes_of(ws, svc, node).into(),
            };
            let Ok(i) = u32::try_from(table.services.len()) else { break };
            for (j, route) in (0u32..).zip(routes.iter()) {
                if let Some(ip) = route.vip {
                    // Two services claiming one VIP (only the API server could allow it):
                    // the first, in namespace/name order, keeps it.
                    table.vips.entry(SocketAddr::new(ip, route.port)).or_insert((i, j));
                }
            }
            table.services.push((svc.clone(), routes));
        }
        table
    }

    /// The route of a VIP and port, if a service has them.
    pub fn get(&self, dst: SocketAddr) -> Option<&ServiceRoute> {
        let (i, j) = self.vips.get(&SocketAddr::new(dst.ip().to_canonical(), dst.port()))?;
        let (_, routes) = self.services.get(usize::try_from(*i).ok()?)?;
        routes.get(usize::try_from(*j).ok()?)
    }

    /// Every service port, in the order of the services.
    pub fn routes(&self) -> impl Iterator<Item = &ServiceRoute> + '_ {
        self.services.iter().flat_map(|(_, routes)| routes.iter())
    }
}

/// The routes of one service from `node`: one per VIP (a dual-stack service has one per
/// family), or one without, for each of its ports.
fn routes_of(ws: &WorkloadSet, svc: &Service, node: &str) -> Vec<ServiceRoute> {
    let vips: Vec<Option<IpAddr>> = match svc.vip {
        None => vec![None],
        Some(vip) => std::iter::once(vip)
            .chain(svc.other_vips.iter().copied())
            .map(|ip| Some(ip.to_canonical()))
            .collect(),
    };
    let service = format!("{}.{}", svc.name, svc.namespace);
    let mut routes = Vec::with_capacity(vips.len() * svc.ports.len());
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
                        .map(|e| SocketAddr::new(e.address.to_canonical(), e.port))
                        .collect()
                }
                None => selected(ws, svc, sp.target_port),
            };
            routes.push(ServiceRoute {
                service: service.clone(),
                vip,
                port: sp.port,
                backends,
                node_local: svc.internal_traffic_local,
            });
        }
    }
    routes
}

/// workloads.yaml: the selected pods at the target port.
fn selected(ws: &WorkloadSet, svc: &Service, target_port: u16) -> Vec<SocketAddr> {
    let picked = ws.workloads.iter().filter(|w| svc.selects(w));
    picked.map(|w| SocketAddr::new(w.ip, target_port)).collect()
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
        let ws = set();
        let b: Vec<(String, Option<String>)> =
            r.backends.iter().map(|b| (b.to_string(), ws.by_ip(b.ip()).map(|w| w.key()))).collect();
        assert_eq!(
            b,
            [
                ("10.0.0.2:8080".into(), Some("a.ns".into())),
                ("10.0.0.3:8080".into(), Some("b.ns".into()))
            ]
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
        let api = Arc::make_mut(&mut ws.services[1]);
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
        let b: Vec<(String, Option<String>)> =
            r.backends.iter().map(|b| (b.to_string(), ws.by_ip(b.ip()).map(|w| w.key()))).collect();
        assert_eq!(
            b,
            [("192.0.2.10:6443".into(), None), ("10.0.0.3:6443".into(), Some("b.ns".into()))]
        );
        // Slices replace the selector: the web service with an empty slice list has none.
        Arc::make_mut(&mut ws.services[0]).endpoints = Some(vec![]);
        let t = ServiceTable::build(&ws, "n1");
        assert!(t.get("10.96.0.10:80".parse().unwrap()).unwrap().backends.is_empty());
    }

    #[test]
    fn a_dual_stack_service_routes_each_family_to_its_own_endpoints() {
        let mut ws = set();
        let api = Arc::make_mut(&mut ws.services[1]);
        api.other_vips = vec!["fd00:96::1".parse().unwrap()];
        api.endpoints = Some(vec![
            SliceEndpoint { service_port: 443, ..ep("192.0.2.10", "", true, true, false) },
            SliceEndpoint { service_port: 443, ..ep("fd00::10", "", true, true, false) },
        ]);
        let t = ServiceTable::build(&ws, "n1");
        let of = |vip: &str| -> Vec<String> {
            let r = t.get(vip.parse().unwrap()).unwrap();
            r.backends.iter().map(|b| b.to_string()).collect()
        };
        assert_eq!(of("10.96.0.1:443"), ["192.0.2.10:6443"]);
        assert_eq!(of("[fd00:96::1]:443"), ["[fd00::10]:6443"]);
    }

    #[test]
    fn a_shared_service_keeps_its_routes_and_a_changed_one_is_routed_anew() {
        let slice = |addr: &str| {
            Some(vec![SliceEndpoint { service_port: 443, ..ep(addr, "", true, true, false) }])
        };
        let mut ws = set();
        Arc::make_mut(&mut ws.services[1]).endpoints = slice("192.0.2.10");
        let t1 = ServiceTable::build(&ws, "n1");
        let routes = |t: &ServiceTable, i: usize| t.services[i].1.clone();
        let of = |t: &ServiceTable| -> Vec<String> {
            let r = t.get("10.96.0.1:443".parse().unwrap()).unwrap();
            r.backends.iter().map(|b| b.to_string()).collect()
        };

        // The next set shares both services: the slice service's routes are the same value.
        let same = ws.clone();
        let t2 = ServiceTable::build_from(&same, "n1", Some(&t1));
        assert!(Arc::ptr_eq(&routes(&t1, 1), &routes(&t2, 1)));
        assert_eq!(t2, ServiceTable::build(&same, "n1"));

        // A changed service (a new value, as the feed makes one) is routed from its new slices.
        let mut changed = ws.clone();
        Arc::make_mut(&mut changed.services[1]).endpoints = slice("192.0.2.11");
        let t3 = ServiceTable::build_from(&changed, "n1", Some(&t2));
        assert!(!Arc::ptr_eq(&routes(&t2, 1), &routes(&t3, 1)));
        assert_eq!(of(&t3), ["192.0.2.11:6443"]);
        assert_eq!(t3, ServiceTable::build(&changed, "n1"));

        // A selector's routes follow the pods even when the service itself is shared.
        let mut moved = changed.clone();
        let mut a = (*moved.workloads[0]).clone();
        a.ip = "10.0.0.9".parse().unwrap();
        moved = WorkloadSet::from_shared(
            vec![Arc::new(a), moved.workloads[1].clone()],
            moved.services.clone(),
        );
        let t4 = ServiceTable::build_from(&moved, "n1", Some(&t3));
        let web = t4.get("10.96.0.10:80".parse().unwrap()).unwrap();
        assert_eq!(web.backends[0].to_string(), "10.0.0.9:8080");

        // Another node's table is not reused: internalTrafficPolicy: Local differs by node.
        let t5 = ServiceTable::build_from(&moved, "n2", Some(&t4));
        assert!(!Arc::ptr_eq(&routes(&t4, 1), &routes(&t5, 1)));
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
