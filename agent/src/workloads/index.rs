//! The lookups a [`WorkloadSet`](super::WorkloadSet) answers per connection and per snapshot
//! (pod by address, by namespace and name, pods of a node, services of a namespace), indexed
//! once when the set is made instead of scanning every pod of the cluster each time.
//!
//! Positions are `u32` (a cluster has far fewer than 4 billion pods) to keep the index small
//! next to the set itself. Every lookup reads positions with `get`, so an index that is stale
//! (a test that edits a set's vectors after making it) finds less, never panics.

use std::cmp::Ordering;
// Seeded per process (an address is the API server's input) and several times faster than
// SipHash on addresses; the index is rebuilt for every snapshot.
use foldhash::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use super::{Service, Workload};

/// Each address (canonical form) to the position of the first pod that has it.
pub type IpClaims = HashMap<IpAddr, u32>;

/// Derived from the set's vectors; not part of its value (equality, serialisation).
#[derive(Clone, Default)]
pub(super) struct Index {
    /// Every address of every pod (canonical form), to the first pod that has it.
    by_ip: HashMap<IpAddr, u32>,
    /// Pod positions ordered by (namespace, name, position); sorted on the first `find` only
    /// (no per-connection or per-snapshot path asks by name), not for every snapshot.
    by_name: OnceLock<Vec<u32>>,
    /// Each node's pod positions, in the set's order: hashed, not sorted, so that a snapshot
    /// of 150,000 pods costs one hash lookup per pod here.
    by_node: HashMap<String, Vec<u32>>,
    /// Service positions ordered by (namespace, position).
    services_by_namespace: Vec<u32>,
}

fn positions(len: usize) -> Vec<u32> {
    (0..len).filter_map(|i| u32::try_from(i).ok()).collect()
}

fn at<T>(items: &[T], i: u32) -> Option<&T> {
    items.get(usize::try_from(i).ok()?)
}

impl Index {
    pub(super) fn build(workloads: &[Arc<Workload>], services: &[Arc<Service>]) -> Index {
        let mut by_ip = HashMap::with_capacity_and_hasher(workloads.len(), Default::default());
        for (i, w) in workloads.iter().enumerate() {
            let Ok(i) = u32::try_from(i) else { break };
            for ip in &w.ips {
                by_ip.entry(ip.to_canonical()).or_insert(i);
            }
        }
        Self::with_claims(workloads, services, by_ip)
    }

    /// As [`Index::build`], with the addresses already mapped to the first pod that has each
    /// (canonical form): the feed's builder makes that map anyway, deciding which pod keeps
    /// an address.
    pub(super) fn with_claims(
        workloads: &[Arc<Workload>],
        services: &[Arc<Service>],
        by_ip: IpClaims,
    ) -> Index {
        let mut by_node: HashMap<String, Vec<u32>> = HashMap::default();
        for (i, w) in workloads.iter().enumerate() {
            let Ok(i) = u32::try_from(i) else { break };
            match by_node.get_mut(w.node.as_str()) {
                Some(v) => v.push(i),
                None => {
                    by_node.insert(w.node.to_string(), vec![i]);
                }
            }
        }
        let mut services_by_namespace = positions(services.len());
        services_by_namespace.sort_unstable_by(|a, b| {
            let ns = |i: &u32| at(services, *i).map(|s| s.namespace.as_str());
            ns(a).cmp(&ns(b)).then(a.cmp(b))
        });
        Index { by_ip, by_name: OnceLock::new(), by_node, services_by_namespace }
    }

    /// The first pod with address `ip` (already canonical).
    pub(super) fn by_ip<'a>(
        &self,
        workloads: &'a [Arc<Workload>],
        ip: IpAddr,
    ) -> Option<&'a Workload> {
        let w: &Workload = at(workloads, *self.by_ip.get(&ip)?)?;
        // A stale index must not answer with another pod.
        w.ips.contains(&ip).then_some(w)
    }

    /// The first pod `namespace/name`.
    pub(super) fn find<'a>(
        &self,
        workloads: &'a [Arc<Workload>],
        name: &str,
        namespace: &str,
    ) -> Option<&'a Workload> {
        let cmp = |i: &u32| match at(workloads, *i) {
            Some(w) => (w.namespace.as_str(), w.name.as_str()).cmp(&(namespace, name)),
            None => Ordering::Less,
        };
        let by_name = self.by_name.get_or_init(|| {
            let key = |i: &u32| at(workloads, *i).map(|w| (w.namespace.as_str(), w.name.as_str()));
            let mut v = positions(workloads.len());
            v.sort_unstable_by(|a, b| key(a).cmp(&key(b)).then(a.cmp(b)));
            v
        });
        let start = by_name.partition_point(|i| cmp(i) == Ordering::Less);
        let w: &Workload = at(workloads, *by_name.get(start)?)?;
        (w.name == name && w.namespace == namespace).then_some(w)
    }

    /// The pods of `node`, in the set's order.
    pub(super) fn on_node<'a>(
        &'a self,
        workloads: &'a [Arc<Workload>],
        node: &'a str,
    ) -> impl Iterator<Item = &'a Workload> + 'a {
        let of_node = self.by_node.get(node).map_or(&[][..], Vec::as_slice);
        of_node
            .iter()
            .filter_map(move |i| at(workloads, *i).map(|w| &**w).filter(|w| w.node == node))
    }

    /// The services of `namespace`, in the set's order.
    pub(super) fn services_in<'a>(
        &'a self,
        services: &'a [Arc<Service>],
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a Service> + 'a {
        let ns_of = move |i: &u32| at(services, *i).map(|s| s.namespace.as_str());
        let start = self.services_by_namespace.partition_point(|i| ns_of(i) < Some(namespace));
        self.services_by_namespace[start..]
            .iter()
            .map_while(move |i| at(services, *i).map(|s| &**s).filter(|s| s.namespace == namespace))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::WorkloadSet;
    use super::*;

    fn pod(name: &str, ns: &str, node: &str, ips: &[&str]) -> Workload {
        let ips: Vec<IpAddr> = ips.iter().map(|s| s.parse().unwrap()).collect();
        Workload {
            name: name.into(),
            namespace: ns.into(),
            service_account: "default".into(),
            labels: BTreeMap::from([("app".to_owned(), name.to_owned())]).into(),
            ip: ips[0],
            ips,
            node: node.into(),
            netns: None,
            probe_ports: vec![],
            uid: None,
        }
    }

    fn service(name: &str, ns: &str, app: &str) -> Service {
        Service {
            name: name.into(),
            namespace: ns.into(),
            vip: None,
            selector: BTreeMap::from([("app".to_owned(), app.to_owned())]),
            ports: vec![],
            endpoints: None,
            internal_traffic_local: false,
            other_vips: vec![],
        }
    }

    /// Many pods over many nodes and namespaces, in no particular order.
    fn big() -> WorkloadSet {
        let mut pods = Vec::new();
        for i in 0..3000u32 {
            let ns = format!("ns{}", (i * 7) % 13);
            let node = format!("node{}", (i * 11) % 50);
            let v4 = format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256);
            let v6 = format!("fd00::{:x}", i + 1);
            pods.push(pod(&format!("p{i}"), &ns, &node, &[&v4, &v6]));
        }
        let services = (0..200u32)
            .map(|i| service(&format!("s{i}"), &format!("ns{}", (i * 5) % 13), &format!("p{i}")))
            .collect();
        WorkloadSet::new(pods, services)
    }

    #[test]
    fn indexed_lookups_answer_as_a_scan_of_every_pod_does() {
        let set = big();
        for w in &set.workloads {
            for ip in &w.ips {
                let scan = set.workloads.iter().map(|x| &**x).find(|x| x.ips.contains(ip));
                assert_eq!(set.by_ip(*ip), scan);
            }
            let scan = set
                .workloads
                .iter()
                .map(|x| &**x)
                .find(|x| x.name == w.name && x.namespace == w.namespace);
            assert_eq!(set.find(&w.name, &w.namespace), scan);
            assert_eq!(set.find(&w.name, "elsewhere"), None);
        }
        for n in 0..52 {
            let node = format!("node{n}");
            let scan: Vec<&Workload> =
                set.workloads.iter().map(|w| &**w).filter(|w| w.node == node).collect();
            assert_eq!(set.on_node(&node).collect::<Vec<_>>(), scan, "{node}");
        }
        for w in set.workloads.iter().take(400) {
            let scan: Vec<&Service> =
                set.services.iter().map(|s| &**s).filter(|s| s.selects(w)).collect();
            assert_eq!(set.services_for(w).collect::<Vec<_>>(), scan, "{}", w.key());
        }
        assert_eq!(set.by_ip("192.0.2.1".parse().unwrap()), None);
        // The IPv4-mapped form finds the pod of the IPv4 address.
        let mapped: IpAddr = "::ffff:10.0.1.2".parse().unwrap();
        assert_eq!(set.by_ip(mapped).map(|w| w.name.as_str()), Some("p258"));
    }

    #[test]
    fn the_first_pod_of_a_repeated_address_or_name_wins_as_before() {
        let set = WorkloadSet::new(
            vec![
                pod("b", "ns", "n1", &["10.0.0.2"]),
                pod("a", "ns", "n2", &["10.0.0.1"]),
                pod("a", "ns", "n1", &["10.0.0.1", "10.0.0.3"]),
            ],
            vec![],
        );
        assert_eq!(set.by_ip("10.0.0.1".parse().unwrap()).map(|w| w.node.as_str()), Some("n2"));
        assert_eq!(set.by_ip("10.0.0.3".parse().unwrap()).map(|w| w.node.as_str()), Some("n1"));
        assert_eq!(set.find("a", "ns").map(|w| w.node.as_str()), Some("n2"));
        let on1: Vec<&str> = set.on_node("n1").map(|w| w.name.as_str()).collect();
        assert_eq!(on1, ["b", "a"]);
    }

    #[test]
    fn the_index_is_not_part_of_the_sets_value() {
        let set = big();
        let same = WorkloadSet::from_shared(set.workloads.clone(), set.services.clone());
        assert_eq!(set, same);
        assert_eq!(format!("{set:?}"), format!("{same:?}"));
        assert!(!format!("{:?}", WorkloadSet::default()).contains("index"));
        let json = serde_json::to_value(WorkloadSet::default()).unwrap();
        assert_eq!(json, serde_json::json!({"workloads": [], "services": []}));
    }

    #[test]
    fn a_stale_index_finds_less_and_never_panics() {
        let mut set = big();
        let ip = set.workloads[5].ip;
        set.workloads.truncate(3);
        set.services.clear();
        assert_eq!(set.by_ip(ip), None);
        assert_eq!(set.find("p5", &set.workloads[0].namespace.clone()), None);
        let _ = set.on_node("node5").count();
        let w = set.workloads[0].clone();
        assert_eq!(set.services_for(&w).count(), 0);
    }
}
