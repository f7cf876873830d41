//! The snapshot built incrementally: each object's converted parts are kept and only objects
//! that changed (another object in the cache, or, for a pod, another namespace object) are
//! converted again; a service is derived again when its object, its EndpointSlices or (for a
//! named target port resolved through pods) its namespace's pods changed. The snapshot is
//! assembled from the parts, with the rules of the reference [`super::watch::build`] (which
//! the tests compare it to), and only when a part changed.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap},
    ops::Bound,
    sync::Arc,
};

use k8s_openapi::{
    api::core::v1::{Namespace, Pod, Service as KubeService},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::core::DynamicObject;

use super::{
    binding::BoundPod,
    convert::{self, ConvertError},
    membership,
    podview::RemotePod,
    slice::Slice,
    watch::{pod_membership, Snapshot, State},
};
use crate::{
    policy::PolicySet,
    workloads::{IpClaims, Service, Str, Workload, WorkloadSet},
};

/// Where a pod's facts come from: the whole object (this node's pods, or every pod without a
/// node) or its projection.
#[derive(Clone)]
enum Source {
    Full(Arc<Pod>),
    View(Arc<RemotePod>),
}

impl Source {
    fn same(&self, other: &Source) -> bool {
        match (self, other) {
            (Source::Full(a), Source::Full(b)) => Arc::ptr_eq(a, b),
            (Source::View(a), Source::View(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    fn pod(&self) -> Cow<'_, Pod> {
        match self {
            Source::Full(p) => Cow::Borrowed(p),
            Source::View(v) => Cow::Owned(v.to_pod()),
        }
    }
}

fn same_ns(a: &Option<Arc<Namespace>>, b: &Option<Arc<Namespace>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// What one pod contributes, from its object and its namespace's.
#[derive(PartialEq)]
struct Derived {
    terminating: bool,
    is_in: bool,
    known_out: bool,
    /// Kept only for the feed's node (or every pod without one): boxed, as a remote pod (most
    /// of them) has neither.
    decision: Option<Box<membership::PodMembership>>,
    bound: Option<Box<BoundPod>>,
    /// Shared with every snapshot it is in: assembling copies a pointer, not the pod.
    workload: Result<Option<Arc<Workload>>, Box<ConvertError>>,
}

struct PodParts {
    source: Source,
    namespace: Option<Arc<Namespace>>,
    seen: u64,
    derived: Derived,
}

/// What one service contributes: the service with its endpoints and their errors, or why it
/// was left out.
type ServiceResult = Result<(Arc<Service>, Vec<String>), String>;

struct ServiceParts {
    svc: Arc<KubeService>,
    slices: Vec<Arc<Slice>>,
    /// The namespace's pod generation it was derived at, if pods resolve its target ports.
    pods_gen: Option<u64>,
    seen: u64,
    result: ServiceResult,
}

struct PolicyParts {
    obj: Arc<DynamicObject>,
    seen: u64,
    doc: Result<(String, std::path::PathBuf), ConvertError>,
}

/// The builder's memory of the last build.
pub(super) struct Builder {
    root_namespace: String,
    members: membership::Settings,
    round: u64,
    pods: BTreeMap<Str, PodParts>,
    /// The round in which a pod of the namespace last changed.
    pods_changed: HashMap<String, u64>,
    services: BTreeMap<Str, ServiceParts>,
    policy_docs: BTreeMap<(usize, Str), PolicyParts>,
    policies: Option<(PolicySet, Vec<String>)>,
    /// A part changed since the last snapshot was assembled.
    dirty: bool,
    /// [`Builder::bound`] answered once (an empty cluster is an answer too).
    bound_once: bool,
    /// The caches the pods' parts were last brought up to date from: the next update visits
    /// only what differs from them (imbl's diff skips the subtrees two versions share), not
    /// every pod of the cluster.
    last: Option<PodInputs>,
}

/// The caches a pod's parts are derived from.
struct PodInputs {
    pods: super::watch::Objects<Pod>,
    views: Option<super::watch::Objects<RemotePod>>,
    namespaces: super::watch::Objects<Namespace>,
}

/// A pod's source in the caches: the whole object wins over its projection.
fn source_of(
    key: &str,
    pods: &super::watch::Objects<Pod>,
    views: Option<&super::watch::Objects<RemotePod>>,
) -> Option<Source> {
    if let Some(p) = pods.get(key) {
        return Some(Source::Full(p.clone()));
    }
    views.and_then(|v| v.get(key)).map(|v| Source::View(v.clone()))
}

/// The key of one difference between two versions of a cache.
fn changed_key<'a, V>(d: imbl::ordmap::DiffItem<'a, 'a, Str, V>) -> &'a Str {
    match d {
        imbl::ordmap::DiffItem::Add(k, _) | imbl::ordmap::DiffItem::Remove(k, _) => k,
        imbl::ordmap::DiffItem::Update { new: (k, _), .. } => k,
    }
}

fn ns_of_key(key: &str) -> &str {
    key.split_once('/').map_or("", |(ns, _)| ns)
}

impl Builder {
    pub(super) fn new(root_namespace: &str, members: membership::Settings) -> Self {
        Builder {
            root_namespace: root_namespace.to_owned(),
            members,
            round: 0,
            pods: BTreeMap::new(),
            pods_changed: HashMap::new(),
            services: BTreeMap::new(),
            policy_docs: BTreeMap::new(),
            policies: None,
            dirty: true,
            bound_once: false,
            last: None,
        }
    }

    /// The snapshot of `state`, or `None` when nothing it is made of changed since the last.
    pub(super) fn build(&mut self, state: &State) -> Option<Snapshot> {
        self.round += 1;
        self.update_pods(state);
        self.update_services(state);
        self.update_policies(state);
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        Some(self.assemble())
    }

    /// Before the first snapshot: the bound pods of the mesh (as [`Snapshot::bound`]) from pods
    /// and namespaces alone; `None` when they did not change.
    pub(super) fn bound(
        &mut self,
        pods: &super::watch::Objects<Pod>,
        views: Option<&super::watch::Objects<RemotePod>>,
        namespaces: &super::watch::Objects<Namespace>,
    ) -> Option<Vec<BoundPod>> {
        self.round += 1;
        let changed = self.update_pod_parts(pods, views, namespaces);
        // The full build must still assemble: these changes are not in a snapshot yet.
        self.dirty |= changed;
        let first = !std::mem::replace(&mut self.bound_once, true);
        (changed || first).then(|| {
            self.serving_first().filter_map(|p| p.derived.bound.as_deref().cloned()).collect()
        })
    }

    fn update_pods(&mut self, state: &State) {
        let changed = self.update_pod_parts(&state.pods, state.views.as_ref(), &state.namespaces);
        self.dirty |= changed;
    }

    /// Brings the pods' parts up to date; true if any changed. Visits only the pods whose
    /// object (or namespace) differs from the caches of the last update.
    fn update_pod_parts(
        &mut self,
        pods: &super::watch::Objects<Pod>,
        views: Option<&super::watch::Objects<RemotePod>>,
        namespaces: &super::watch::Objects<Namespace>,
    ) -> bool {
        let last = self.last.replace(PodInputs {
            pods: pods.clone(),
            views: views.cloned(),
            namespaces: namespaces.clone(),
        });
        let last = match last {
            Some(l) if l.views.is_some() == views.is_some() => l,
            _ => return self.scan_pod_parts(pods, views, namespaces),
        };
        let mut keys: BTreeSet<Str> = BTreeSet::new();
        keys.extend(last.pods.diff(pods).map(|d| changed_key(d).clone()));
        if let (Some(a), Some(b)) = (&last.views, views) {
            keys.extend(a.diff(b).map(|d| changed_key(d).clone()));
        }
        // A namespace that changed: each of its pods is derived again (its membership reads
        // the namespace's labels).
        let changed_ns: BTreeSet<String> = last
            .namespaces
            .diff(namespaces)
            .map(|d| changed_key(d).trim_start_matches('/').to_owned())
            .collect();
        for ns in &changed_ns {
            let (from, to) = (format!("{ns}/"), format!("{ns}0"));
            let range = self.pods.range::<str, _>((
                std::ops::Bound::Included(from.as_str()),
                std::ops::Bound::Excluded(to.as_str()),
            ));
            keys.extend(range.map(|(k, _)| k.clone()));
        }
        let round = self.round;
        let mut changed = false;
        for key in keys {
            let ns_name = ns_of_key(&key).to_owned();
            let Some(source) = source_of(&key, pods, views) else {
                if self.pods.remove(key.as_str()).is_some() {
                    self.pods_changed.insert(ns_name, round);
                    changed = true;
                }
                continue;
            };
            let namespace = namespaces.get(format!("/{ns_name}").as_str()).cloned();
            changed |= self.visit_pod(&key, source, namespace, namespaces);
        }
        changed
    }

    /// Derives pod `key` again from `source` unless neither it nor its namespace changed;
    /// true if what it contributes changed.
    fn visit_pod(
        &mut self,
        key: &Str,
        source: Source,
        namespace: Option<Arc<Namespace>>,
        namespaces: &super::watch::Objects<Namespace>,
    ) -> bool {
        let round = self.round;
        let ns_name = ns_of_key(key);
        if let Some(parts) = self.pods.get_mut(key.as_str()) {
            parts.seen = round;
            if parts.source.same(&source) && same_ns(&parts.namespace, &namespace) {
                return false;
            }
            let derived = derive(&source, namespaces, &self.members);
            let changed = derived != parts.derived;
            // Another object (if only its resource version): services reading the
            // namespace's pods look again.
            self.pods_changed.insert(ns_name.to_owned(), round);
            *parts = PodParts { source, namespace, seen: round, derived };
            return changed;
        }
        let derived = derive(&source, namespaces, &self.members);
        self.pods_changed.insert(ns_name.to_owned(), round);
        self.pods.insert(key.clone(), PodParts { source, namespace, seen: round, derived });
        true
    }

    /// [`Builder::update_pod_parts`] the first time: every pod of the caches visited.
    fn scan_pod_parts(
        &mut self,
        pods: &super::watch::Objects<Pod>,
        views: Option<&super::watch::Objects<RemotePod>>,
        namespaces: &super::watch::Objects<Namespace>,
    ) -> bool {
        let round = self.round;
        let mut changed = false;
        let mut ns_of: HashMap<&str, Option<Arc<Namespace>>> = HashMap::new();
        // Whole objects first: they win over a projection of the same pod.
        let full = pods.iter().map(|(k, p)| (k, Source::Full(p.clone())));
        let projected = views
            .into_iter()
            .flat_map(|v| v.iter())
            .filter(|(k, _)| !pods.contains_key(*k))
            .map(|(k, v)| (k, Source::View(v.clone())));
        for (key, source) in full.chain(projected) {
            let ns_name = ns_of_key(key);
            let namespace = ns_of
                .entry(ns_name)
                .or_insert_with(|| namespaces.get(format!("/{ns_name}").as_str()).cloned())
                .clone();
            changed |= self.visit_pod(key, source, namespace, namespaces);
        }
        let before = self.pods.len();
        let pods_changed = &mut self.pods_changed;
        self.pods.retain(|key, p| {
            let keep = p.seen == round;
            if !keep {
                pods_changed.insert(ns_of_key(key).to_owned(), round);
            }
            keep
        });
        changed | (self.pods.len() != before)
    }

    fn update_services(&mut self, state: &State) {
        let round = self.round;
        // Borrowed, not copied: this runs for every service of the cluster per snapshot.
        let mut slices: HashMap<(&str, &str), Vec<&Arc<Slice>>> = HashMap::new();
        for s in state.slices.values() {
            if let Some(svc) = &s.service {
                let key = (s.namespace.as_deref().unwrap_or_default(), svc.as_str());
                slices.entry(key).or_default().push(s);
            }
        }
        for (key, svc) in state.services.iter() {
            let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
            let name = svc.metadata.name.as_deref().unwrap_or_default();
            let svc_slices = slices.remove(&(ns, name)).unwrap_or_default();
            let pods_gen = reads_pods(svc).then(|| self.pods_changed.get(ns).copied().unwrap_or(0));
            if let Some(parts) = self.services.get_mut(key) {
                parts.seen = round;
                let same_slices = parts.slices.len() == svc_slices.len()
                    && parts.slices.iter().zip(&svc_slices).all(|(a, b)| Arc::ptr_eq(a, b));
                if Arc::ptr_eq(&parts.svc, svc) && same_slices && parts.pods_gen == pods_gen {
                    continue;
                }
            }
            let svc_slices: Vec<Arc<Slice>> = svc_slices.into_iter().cloned().collect();
            let result = derive_service(svc, &svc_slices, ns, &self.pods);
            let parts = ServiceParts {
                svc: svc.clone(),
                slices: svc_slices,
                pods_gen,
                seen: round,
                result,
            };
            match self.services.get_mut(key) {
                // The same result: the old value is kept (the routing table reuses what it
                // made of it, by pointer).
                Some(old) if old.result == parts.result => {
                    let ServiceParts { svc, slices, pods_gen, .. } = parts;
                    (old.svc, old.slices, old.pods_gen) = (svc, slices, pods_gen);
                }
                Some(old) => {
                    self.dirty = true;
                    *old = parts;
                }
                None => {
                    self.services.insert(key.clone(), parts);
                    self.dirty = true;
                }
            }
        }
        let before = self.services.len();
        self.services.retain(|_, s| s.seen == round);
        self.dirty |= self.services.len() != before;
    }

    fn update_policies(&mut self, state: &State) {
        let round = self.round;
        let mut changed = self.policies.is_none();
        for (i, (ar, objects)) in state.policies.iter().enumerate() {
            for (key, obj) in objects.iter() {
                let k = (i, key.clone());
                match self.policy_docs.get_mut(&k) {
                    Some(p) if Arc::ptr_eq(&p.obj, obj) => p.seen = round,
                    Some(p) => {
                        let doc = convert::policy_document(obj, ar);
                        changed |= doc != p.doc;
                        *p = PolicyParts { obj: obj.clone(), seen: round, doc };
                    }
                    None => {
                        let doc = convert::policy_document(obj, ar);
                        self.policy_docs
                            .insert(k, PolicyParts { obj: obj.clone(), seen: round, doc });
                        changed = true;
                    }
                }
            }
        }
        let before = self.policy_docs.len();
        self.policy_docs.retain(|_, p| p.seen == round);
        changed |= self.policy_docs.len() != before;
        if !changed {
            return;
        }
        self.dirty = true;
        let mut rejected = Vec::new();
        let mut docs = Vec::new();
        let mut seen = BTreeSet::new();
        for ((i, key), p) in &self.policy_docs {
            // PeerAuthentication and AuthorizationPolicy are listed at v1 and v1beta1: one object,
            // counted once.
            let kind = &state.policies[*i].0.kind;
            if !seen.insert((kind.clone(), key.clone())) {
                continue;
            }
            match &p.doc {
                Ok(doc) => docs.push(doc),
                Err(e) => rejected.push(e.to_string()),
            }
        }
        let (policies, errors) = PolicySet::from_documents(
            docs.iter().map(|(src, origin)| (src.as_str(), origin.as_path())),
            &self.root_namespace,
        );
        rejected.extend(errors.iter().map(ToString::to_string));
        self.policies = Some((policies, rejected));
    }

    /// Pods in the order they claim their IPs (as `watch::serving_first`).
    fn serving_first(&self) -> impl Iterator<Item = &PodParts> {
        let (mut first, rest): (Vec<&PodParts>, Vec<&PodParts>) =
            self.pods.values().partition(|p| !p.derived.terminating);
        first.extend(rest);
        first.into_iter()
    }

    fn assemble(&self) -> Snapshot {
        let mut rejected = Vec::new();
        let mut workloads: Vec<Arc<Workload>> = Vec::with_capacity(self.pods.len());
        let mut decisions = Vec::new();
        // Which pod keeps each address; it is also the set's index by address, not made twice.
        let mut claims = IpClaims::with_capacity_and_hasher(self.pods.len(), Default::default());
        let mut bound = Vec::new();
        for p in self.serving_first() {
            let d = &p.derived;
            decisions.extend(d.decision.as_deref().cloned());
            bound.extend(d.bound.as_deref().cloned());
            match &d.workload {
                Ok(Some(_)) if !d.is_in => {}
                Ok(Some(w)) => {
                    // Two running pods with one IP: the one not terminating keeps it, else the
                    // first by name.
                    let first = w.ips.iter().find_map(|a| {
                        let at = claims.get(&a.to_canonical())?;
                        Some((a, workloads.get(usize::try_from(*at).ok()?)?))
                    });
                    if let Some((ip, first)) = first {
                        rejected.push(format!(
                            "Pod {}/{}: IP {ip} is already pod {}/{}'s",
                            w.namespace, w.name, first.namespace, first.name
                        ));
                        continue;
                    }
                    let Ok(at) = u32::try_from(workloads.len()) else { continue };
                    for a in &w.ips {
                        claims.insert(a.to_canonical(), at);
                    }
                    workloads.push(w.clone());
                }
                Ok(None) => {}
                Err(_) if d.known_out => {}
                Err(e) => rejected.push(e.to_string()),
            }
        }
        let mut services = Vec::new();
        for s in self.services.values() {
            match &s.result {
                Ok((svc, errors)) => {
                    rejected.extend(errors.iter().cloned());
                    services.push(svc.clone());
                }
                Err(e) => rejected.push(e.clone()),
            }
        }
        let (policies, errors) =
            self.policies.clone().unwrap_or_else(|| (PolicySet::empty(), vec![]));
        rejected.extend(errors);
        Snapshot {
            workloads: Arc::new(WorkloadSet::from_claims(workloads, services, claims)),
            policies,
            rejected,
            membership: decisions,
            bound,
            routes: None,
        }
    }
}

/// What a pod contributes (the per-pod half of `watch::build`).
fn derive(
    source: &Source,
    namespaces: &super::watch::Objects<Namespace>,
    members: &membership::Settings,
) -> Derived {
    let pod = &*source.pod();
    let m = pod_membership(pod, namespaces, members);
    let is_in = m.as_ref().is_some_and(|m| m.membership.is_in());
    let known_out = m.as_ref().is_some_and(|m| !m.membership.is_in());
    let ours = m.as_ref().is_some_and(|m| members.node.as_ref().is_none_or(|n| *n == m.node));
    let bound = if is_in && ours { super::binding::bound_pod(pod).ok().flatten() } else { None };
    Derived {
        terminating: pod.metadata.deletion_timestamp.is_some(),
        is_in,
        known_out,
        decision: m.filter(|_| ours).map(Box::new),
        bound: bound.map(Box::new),
        workload: convert::workload(pod)
            .map(|w| {
                w.map(|mut w| {
                    // A remote pod's workload shares the pod's strings.
                    if let Source::View(r) = source {
                        r.share_with(&mut w);
                    }
                    Arc::new(w)
                })
            })
            .map_err(Box::new),
    }
}

/// Whether resolving the service's target ports may read its namespace's pods.
fn reads_pods(svc: &KubeService) -> bool {
    let ports = svc.spec.iter().flat_map(|s| s.ports.iter().flatten());
    ports.into_iter().any(|p| matches!(p.target_port, Some(IntOrString::String(_))))
}

fn derive_service(
    svc: &KubeService,
    slices: &[Arc<Slice>],
    ns: &str,
    pods: &BTreeMap<Str, PodParts>,
) -> ServiceResult {
    let slices: Vec<&Slice> = slices.iter().map(Arc::as_ref).collect();
    // The namespace's pods, in key order (`ns/name`; '0' follows '/').
    let owned: Vec<Cow<'_, Pod>> = if reads_pods(svc) {
        let (from, to) = (format!("{ns}/"), format!("{ns}0"));
        let range = (Bound::Included(from.as_str()), Bound::Excluded(to.as_str()));
        pods.range::<str, _>(range).map(|(_, p)| p.source.pod()).collect()
    } else {
        Vec::new()
    };
    let pods: Vec<&Pod> = owned.iter().map(|p| p.as_ref()).collect();
    match convert::service(svc, &slices, &pods) {
        Ok(mut s) => {
            let (endpoints, errors) = super::endpoints::of_service(&s, &slices);
            s.endpoints = Some(endpoints);
            Ok((Arc::new(s), errors.iter().map(ToString::to_string).collect()))
        }
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::{
        podview::PodInterner,
        watch::{build, Map, Objects, SERVICE_NAME_LABEL},
    };
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::{core::ApiResource, ResourceExt};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn keep<K>(m: &mut Map<K>, mut f: impl FnMut(&K) -> bool) {
        *m = m.iter().filter(|(_, v)| f(v)).map(|(k, v)| (k.clone(), v.clone())).collect();
    }

    fn pick(rng: &mut StdRng, of: &[&'static str]) -> &'static str {
        of[rng.gen_range(0..of.len())]
    }

    fn pod(rng: &mut StdRng, name: &str) -> Pod {
        let ns = pick(rng, &["a", "b"]);
        let mut labels = serde_json::json!({"app": pick(rng, &["web", "db"])});
        match rng.gen_range(0..3) {
            0 => labels[membership::DATAPLANE_MODE] = membership::AMBIENT.into(),
            1 => labels[membership::DATAPLANE_MODE] = membership::NONE.into(),
            _ => {}
        }
        let phase = ["Running", "Running", "Running", "Pending", "Succeeded"][rng.gen_range(0..5)];
        // A small pool of addresses, so IPs clash; now and then a broken one.
        let ip = match rng.gen_range(0..12) {
            0 => "10.0.0.300".to_owned(),
            n => format!("10.0.0.{n}"),
        };
        let mut json = serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "uid": format!("u-{name}-{}", rng.gen::<u8>()),
                         "labels": labels},
            "spec": {"nodeName": pick(rng, &["n1", "n2"]),
                     "hostNetwork": rng.gen_range(0..8) == 0,
                     "containers": [{"name": "app",
                                     "ports": [{"name": "http", "containerPort": 8000 + rng.gen_range(0..3)}],
                                     "readinessProbe": {"httpGet": {"port": "http"}}}]},
            "status": {"phase": phase, "podIP": ip},
        });
        if rng.gen_range(0..4) == 0 {
            json["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
        }
        serde_json::from_value(json).unwrap()
    }

    fn namespace(name: &str, ambient: bool) -> Namespace {
        let labels = if ambient {
            serde_json::json!({membership::DATAPLANE_MODE: membership::AMBIENT})
        } else {
            serde_json::json!({})
        };
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "labels": labels}}))
            .unwrap()
    }

    fn service(rng: &mut StdRng, name: &str) -> KubeService {
        let target: serde_json::Value =
            if rng.gen_range(0..2) == 0 { "http".into() } else { 8080.into() };
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": pick(rng, &["a", "b"])},
            "spec": {"clusterIP": format!("10.96.0.{}", rng.gen_range(1..4)),
                     "selector": {"app": pick(rng, &["web", "db"])},
                     "ports": [{"name": "http", "port": 80, "targetPort": target}]},
        }))
        .unwrap()
    }

    fn slice(rng: &mut StdRng, name: &str) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": pick(rng, &["a", "b"]),
                         "labels": {SERVICE_NAME_LABEL: format!("s{}", rng.gen_range(0..3))}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [format!("10.0.0.{}", rng.gen_range(1..12))],
                           "conditions": {"ready": rng.gen_range(0..3) != 0}}],
            "ports": if rng.gen_range(0..2) == 0 {
                serde_json::json!([{"name": "http", "port": 9000}])
            } else {
                serde_json::json!([])
            },
        }))
        .unwrap()
    }

    fn policy(rng: &mut StdRng, name: &str) -> DynamicObject {
        let mode = ["STRICT", "PERMISSIVE", "BOGUS"][rng.gen_range(0..3)];
        serde_json::from_value(serde_json::json!({
            "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": pick(rng, &["a", "b"])},
            "spec": {"mtls": {"mode": mode}},
        }))
        .unwrap()
    }

    fn key<K: kube::Resource>(o: &K) -> Str {
        format!("{}/{}", o.meta().namespace.as_deref().unwrap_or_default(), o.name_any()).into()
    }

    fn pa() -> ApiResource {
        ApiResource {
            group: "security.istio.io".into(),
            version: "v1".into(),
            api_version: "security.istio.io/v1".into(),
            kind: "PeerAuthentication".into(),
            plural: "peerauthentications".into(),
        }
    }

    /// The state a node's feed sees: its pods whole, every pod projected.
    fn as_node(
        all: &Map<Pod>,
        node: Option<&str>,
        interner: &mut PodInterner,
    ) -> (Objects<Pod>, Option<Objects<RemotePod>>) {
        let Some(node) = node else { return (Arc::new(all.clone()), None) };
        let ours = |p: &Pod| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
        let full: Map<Pod> =
            all.iter().filter(|(_, p)| ours(p)).map(|(k, p)| (k.clone(), p.clone())).collect();
        let views: Map<RemotePod> = all
            .iter()
            .map(|(k, p)| (k.clone(), Arc::new(RemotePod::of_pod(p, interner))))
            .collect();
        (Arc::new(full), Some(Arc::new(views)))
    }

    #[test]
    fn the_incremental_build_equals_the_build_from_scratch_on_random_changes() {
        for (seed, node) in [(1, None), (2, Some("n1")), (3, Some("n2")), (4, None)] {
            let mut rng = StdRng::seed_from_u64(seed);
            let members = membership::Settings { node: node.map(Into::into), ..Default::default() };
            let mut b = Builder::new("istio-system", members.clone());
            let mut interner = PodInterner::default();
            let mut pods: Map<Pod> = Map::new();
            let mut namespaces: Map<Namespace> = Map::new();
            let mut services: Map<KubeService> = Map::new();
            let mut slices: Map<Slice> = Map::new();
            let mut policies: Map<DynamicObject> = Map::new();
            let mut last = None;
            // That the run went through what it is meant to compare.
            let (mut workloads, mut clashes, mut endpoints, mut policed) = (0, 0, 0, 0);
            for step in 0..400 {
                let name = format!("p{}", rng.gen_range(0..16));
                match rng.gen_range(0..20) {
                    0..=7 => {
                        let p = pod(&mut rng, &name);
                        keep(&mut pods, |q| q.metadata.name.as_deref() != Some(name.as_str()));
                        pods.insert(key(&p), Arc::new(p));
                    }
                    8..=9 => {
                        keep(&mut pods, |q| q.metadata.name.as_deref() != Some(name.as_str()));
                    }
                    // Another object, the same content (a resource version bump).
                    10 => {
                        if let Some((k, p)) =
                            pods.iter().next().map(|(k, p)| (k.clone(), p.clone()))
                        {
                            pods.insert(k, Arc::new((*p).clone()));
                        }
                    }
                    11..=12 => {
                        let ns = pick(&mut rng, &["a", "b"]);
                        namespaces
                            .insert(format!("/{ns}").into(), Arc::new(namespace(ns, rng.gen())));
                    }
                    13..=14 => {
                        let n = format!("s{}", rng.gen_range(0..3));
                        let s = service(&mut rng, &n);
                        services.insert(key(&s), Arc::new(s));
                    }
                    15..=17 => {
                        let n = format!("e{}", rng.gen_range(0..4));
                        let s = slice(&mut rng, &n);
                        slices.insert(key(&s), Arc::new(s.into()));
                    }
                    18 => {
                        keep(&mut slices, |_| rng.gen_range(0..3) != 0);
                        keep(&mut services, |_| rng.gen_range(0..4) != 0);
                    }
                    _ => {
                        let n = format!("pa{}", rng.gen_range(0..3));
                        let p = policy(&mut rng, &n);
                        policies.insert(key(&p), Arc::new(p));
                    }
                }
                let (full, views) = as_node(&pods, node, &mut interner);
                let state = State {
                    pods: full,
                    views,
                    namespaces: Arc::new(namespaces.clone()),
                    services: Arc::new(services.clone()),
                    slices: Arc::new(slices.clone()),
                    policies: vec![(pa(), Arc::new(policies.clone()))],
                };
                let reference = State {
                    pods: Arc::new(pods.clone()),
                    views: None,
                    namespaces: state.namespaces.clone(),
                    services: state.services.clone(),
                    slices: state.slices.clone(),
                    policies: state.policies.clone(),
                };
                if let Some(s) = b.build(&state) {
                    last = Some(s);
                }
                let want = build(&reference, "istio-system", &members);
                assert_eq!(last.as_ref(), Some(&want), "seed {seed} step {step}");
                workloads += want.workloads.workloads.len();
                clashes += want.rejected.iter().filter(|r| r.contains("is already pod")).count();
                let eps = want.workloads.services.iter().flat_map(|s| s.endpoints.iter().flatten());
                endpoints += eps.count();
                policed += want.policies.len();
                // Built again from the same state: nothing changed, nothing to send.
                assert!(b.build(&state).is_none(), "seed {seed} step {step}");
            }
            assert!(workloads > 0 && clashes > 0 && endpoints > 0 && policed > 0, "seed {seed}");
        }
    }

    #[test]
    fn the_bound_pods_before_the_first_snapshot_are_told_once_per_change() {
        let mut rng = StdRng::seed_from_u64(9);
        let mut b = Builder::new("istio-system", membership::Settings::default());
        let empty: Objects<Pod> = Arc::default();
        // An empty cluster is known to be empty.
        assert_eq!(b.bound(&empty, None, &Arc::default()), Some(vec![]));
        assert_eq!(b.bound(&empty, None, &Arc::default()), None);
        let mut p = pod(&mut rng, "a");
        p.metadata.labels =
            Some([(membership::DATAPLANE_MODE.to_owned(), membership::AMBIENT.to_owned())].into());
        p.metadata.deletion_timestamp = None;
        if let Some(spec) = p.spec.as_mut() {
            spec.host_network = None;
        }
        if let Some(status) = p.status.as_mut() {
            status.phase = Some("Running".into());
        }
        let pods: Objects<Pod> = Arc::new(Map::unit(key(&p), Arc::new(p)));
        let bound = b.bound(&pods, None, &Arc::default()).unwrap_or_default();
        assert_eq!(bound.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(), ["a"]);
        assert_eq!(b.bound(&pods, None, &Arc::default()), None);
        // What was told before the first snapshot is in the first snapshot.
        let state = State {
            pods,
            views: None,
            namespaces: Arc::default(),
            services: Arc::default(),
            slices: Arc::default(),
            policies: vec![],
        };
        assert_eq!(b.build(&state).map(|s| s.bound), Some(bound));
    }

    #[test]
    fn only_the_changed_objects_are_converted_again() {
        let mut rng = StdRng::seed_from_u64(7);
        let members = membership::Settings::default();
        let mut b = Builder::new("istio-system", members);
        let mut pods: Map<Pod> = Map::new();
        for i in 0..50 {
            let p = pod(&mut rng, &format!("p{i}"));
            pods.insert(key(&p), Arc::new(p));
        }
        let state = |pods: &Map<Pod>| State {
            pods: Arc::new(pods.clone()),
            views: None,
            namespaces: Arc::default(),
            services: Arc::default(),
            slices: Arc::default(),
            policies: vec![],
        };
        assert!(b.build(&state(&pods)).is_some());
        let before: Vec<Source> = b.pods.values().map(|p| p.source.clone()).collect();
        // A new object of one pod, labelled in: that pod's parts alone are new.
        let (k, p) = pods.iter().nth(3).map(|(k, p)| (k.clone(), p.clone())).unwrap();
        let mut changed = (*p).clone();
        changed.metadata.labels =
            Some([(membership::DATAPLANE_MODE.to_owned(), membership::AMBIENT.to_owned())].into());
        pods.insert(k.clone(), Arc::new(changed));
        b.build(&state(&pods));
        let same: Vec<bool> =
            b.pods.values().zip(&before).map(|(p, old)| p.source.same(old)).collect();
        assert_eq!(same.iter().filter(|s| !**s).count(), 1);
        assert!(!same[3]);
    }
}
