//! Watches on the API server and the state built from them.
//!
//! One task per kind keeps a cache of that kind's objects. A list (the first, or a relist
//! after a lost watch or `410 Gone`) is buffered and replaces the cache only once complete,
//! so a relist never shows a partial or empty cluster and never releases enrolled pods. A
//! builder task turns the caches into a [`Snapshot`] once every kind has been listed, and
//! again after each change (debounced), converting only what changed
//! ([`super::incremental`]). The caches are persistent maps: an event costs O(log n) and the
//! builder gets the state without a copy. With a node, its pods are watched whole
//! (`spec.nodeName=<node>`) and every pod as a [`PodView`] (what a remote pod is needed for),
//! kept as a [`RemotePod`] whose repeated strings are shared through the feed's interner.

use std::{collections::HashSet, fmt::Debug, sync::Arc, time::Duration};

use futures_util::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service as KubeService},
    discovery::v1::EndpointSlice,
};
use kube::{
    core::{ApiResource, DynamicObject},
    runtime::{watcher, WatchStreamExt},
    Api, Client, Resource, ResourceExt,
};
use serde::de::DeserializeOwned;
use tokio::{
    sync::{watch, Notify},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use super::{
    incremental::Builder,
    membership,
    podview::{PodInterner, PodView, RemotePod},
    slice::Slice,
};
// The reference build, for the tests.
#[cfg(test)]
use super::convert;
#[cfg(test)]
use crate::workloads::Workload;
use crate::{
    policy::PolicySet,
    workloads::{Str, WorkloadSet},
};
#[cfg(test)]
use std::collections::{BTreeSet, HashMap};

/// Changes arriving together (a rollout, a relist) are built into one snapshot.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// The label that ties an EndpointSlice to its Service.
pub(super) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the agent learns from the API server.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Every running, non-host-network pod of the cluster (remote ones give destinations their
    /// identities) and the services; shared, so the agent takes it without a copy.
    pub workloads: Arc<WorkloadSet>,
    pub policies: PolicySet,
    /// Every pod of the mesh bound to a node (to the feed's node, if it was given one: no
    /// agent reads another node's) and not finished, IP or not (a node's agent enrolls its
    /// own from the binding: [`super::binding::local_pods_to_enroll`]).
    pub bound: Vec<super::binding::BoundPod>,
    /// Objects left out, each named with the reason.
    pub rejected: Vec<String>,
    /// Whether each pod (of the node, if the feed was given one) is in the mesh, and why; pods
    /// that are out are not in `workloads`.
    pub membership: Vec<membership::PodMembership>,
    /// The service table of `workloads` from the feed's node (`None` without one), built on the
    /// feed's thread so that the data plane only swaps it in.
    pub routes: Option<Arc<crate::services::ServiceTable>>,
}

/// The Istio policy kinds, watched as dynamic objects.
fn policy_kinds() -> [ApiResource; 6] {
    let ar = |group: &str, version: &str, kind: &str, plural: &str| ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    };
    [
        // v1 first: the same object served at both versions counts once, as v1.
        ar("security.istio.io", "v1", "PeerAuthentication", "peerauthentications"),
        ar("security.istio.io", "v1beta1", "PeerAuthentication", "peerauthentications"),
        ar("security.istio.io", "v1", "AuthorizationPolicy", "authorizationpolicies"),
        ar("security.istio.io", "v1beta1", "AuthorizationPolicy", "authorizationpolicies"),
        ar("authentication.istio.io", "v1alpha1", "Policy", "policies"),
        ar("authentication.istio.io", "v1alpha1", "MeshPolicy", "meshpolicies"),
    ]
}

/// The API groups and resources the watchers read: what the agent's ClusterRole must grant.
pub fn watched_resources() -> Vec<(String, String)> {
    let mut v = vec![
        (String::new(), "pods".to_owned()),
        (String::new(), "services".to_owned()),
        // Their labels put pods in the mesh.
        (String::new(), "namespaces".to_owned()),
        ("discovery.k8s.io".to_owned(), "endpointslices".to_owned()),
    ];
    v.extend(policy_kinds().into_iter().map(|ar| (ar.group, ar.plural)));
    v.dedup();
    v
}

/// A kind's objects by `namespace/name`: a persistent map, so handing the builder the state
/// after an event costs O(1) (shared structure), not a copy of every key.
pub(crate) type Objects<K> = Arc<Map<K>>;
/// Keyed by a shared string: the builder keeps its parts under the same key, not a copy.
pub(crate) type Map<K> = imbl::OrdMap<Str, Arc<K>>;
/// `None` until the kind's first list is complete.
pub(super) type Slot<K> = watch::Receiver<Option<Objects<K>>>;

/// The running watchers; dropping it stops them.
pub struct Feed {
    rx: watch::Receiver<Option<Arc<Snapshot>>>,
    bound: watch::Receiver<Option<Arc<Vec<super::binding::BoundPod>>>>,
    tasks: Vec<JoinHandle<()>>,
    sources: super::sources::Sources,
    /// On its own thread ([`super::thread`]): how to stop it, and the thread to wait for.
    thread: Option<(tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl Feed {
    /// Snapshots: `None` until every kind has been listed once.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.rx.clone()
    }

    /// Before the first snapshot: the pods bound to nodes and in the mesh, from the pods and
    /// namespaces watches alone (`None` until both are listed), so the node's pods are held
    /// closed while another kind (a policy source that cannot be read) holds the snapshot back.
    pub fn subscribe_bound(&self) -> watch::Receiver<Option<Arc<Vec<super::binding::BoundPod>>>> {
        self.bound.clone()
    }

    /// Whether each policy kind is served and answers.
    pub fn sources(&self) -> super::sources::Sources {
        self.sources.clone()
    }

    /// A feed with this one's channels and sources and none of its tasks.
    pub(super) fn handle(&self) -> Feed {
        Feed {
            rx: self.rx.clone(),
            bound: self.bound.clone(),
            tasks: Vec::new(),
            sources: self.sources.clone(),
            thread: None,
        }
    }

    /// This handle stops `thread` (through `stop`) when dropped.
    pub(super) fn on_thread(
        mut self,
        stop: tokio::sync::oneshot::Sender<()>,
        thread: std::thread::JoinHandle<()>,
    ) -> Feed {
        self.thread = Some((stop, thread));
        self
    }

    /// Whether the feed's own thread runs (`None`: it runs on the caller's runtime).
    pub fn thread_alive(&self) -> Option<bool> {
        self.thread.as_ref().map(|(_, t)| !t.is_finished())
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some((stop, thread)) = self.thread.take() {
            let _ = stop.send(());
            // Its tasks end with its runtime; nothing there blocks.
            let _ = thread.join();
        }
    }
}

/// Starts watching pods, namespaces, services, EndpointSlices and the policy kinds, with the
/// default [`membership::Settings`] (policy kinds discovered again every
/// [`super::sources::DISCOVERY_INTERVAL`]).
pub fn start(client: Client, root_namespace: &str) -> Feed {
    let members = membership::Settings::default();
    start_with(client, root_namespace, members, super::sources::DISCOVERY_INTERVAL)
}

/// [`start`], with the namespaces that are never enrolled and the node whose decisions to
/// keep, running API discovery of the policy kinds every `discovery_interval`.
pub fn start_with(
    client: Client,
    root_namespace: &str,
    members: membership::Settings,
    discovery_interval: Duration,
) -> Feed {
    let notify = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    // With a node: its own pods whole, every pod as the compact projection of what the agent
    // needs of a remote one. Without: every pod whole.
    let (pods, views) = match &members.node {
        Some(node) => {
            let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
            let (pods, t) = spawn_watch(Api::<Pod>::all(client.clone()), "pods", config, &notify);
            tasks.push(t);
            let api = Api::<PodView>::all(client.clone());
            // The feed's interner: the projections' shared strings and layouts.
            let mut interner = PodInterner::default();
            let keep = move |v: PodView| {
                let pod = RemotePod::keep(v, &mut interner);
                interner.sweep_if_due();
                pod
            };
            let config = watcher::Config::default();
            let (views, t) = spawn_watch_kept(api, "pods (projection)", config, &notify, keep);
            tasks.push(t);
            (pods, Some(views))
        }
        None => {
            let api = Api::<Pod>::all(client.clone());
            let (pods, t) = spawn_watch(api, "pods", watcher::Config::default(), &notify);
            tasks.push(t);
            (pods, None)
        }
    };
    // Not optional: without namespaces' labels nobody can be known to be in the mesh.
    let all = watcher::Config::default;
    let (namespaces, t) =
        spawn_watch(Api::<Namespace>::all(client.clone()), "namespaces", all(), &notify);
    tasks.push(t);
    let (services, t) =
        spawn_watch(Api::<KubeService>::all(client.clone()), "services", all(), &notify);
    tasks.push(t);
    // One endpoint per serving pod of the cluster: kept compact, node names shared.
    let mut interner = super::intern::Interner::default();
    let keep = move |s: EndpointSlice| {
        let kept = Slice::keep(s, &mut interner);
        interner.sweep_if_due();
        kept
    };
    let api = Api::<EndpointSlice>::all(client.clone());
    let (slices, t) = spawn_watch_kept(api, "endpointslices", all(), &notify, keep);
    tasks.push(t);
    // Istio's kinds may not be installed: only those the cluster serves are watched, and a
    // served one that cannot be read is an error, not "no policies".
    let started =
        super::sources::start(client, policy_kinds().to_vec(), discovery_interval, &notify);
    tasks.push(started.task);
    let policies = started.slots;
    let (tx, rx) = watch::channel(None);
    let (bound_tx, bound) = watch::channel(None);
    let inputs = Inputs { pods, views, namespaces, services, slices, policies };
    let root = root_namespace.to_owned();
    let out = Outputs { snapshots: tx, bound: bound_tx };
    tasks.push(tokio::spawn(build_loop(inputs, notify, out, root, members)));
    Feed { rx, bound, tasks, sources: started.sources, thread: None }
}

/// A kind's objects by `namespace/name` (as `V`, what is kept of each), with a list in
/// progress kept apart.
pub(super) struct Cache<V> {
    pub(super) live: Map<V>,
    relisting: Option<Map<V>>,
}

fn key_of<K: Resource>(o: &K) -> Str {
    format!("{}/{}", o.meta().namespace.as_deref().unwrap_or_default(), o.name_any()).into()
}

impl<V: PartialEq> Cache<V> {
    pub(super) fn new() -> Self {
        Cache { live: Map::new(), relisting: None }
    }

    /// Applies an event, keeping `keep(object)`; true when the complete state changed.
    pub(super) fn apply_kept<K: Resource>(
        &mut self,
        event: watcher::Event<K>,
        mut keep: impl FnMut(K) -> V,
    ) -> bool {
        match event {
            watcher::Event::Init => {
                self.relisting = Some(Map::new());
                false
            }
            watcher::Event::InitApply(o) => {
                let key = key_of(&o);
                // What did not change keeps its value: the builder, which visits only what
                // differs, holds that one and would otherwise keep a second copy.
                let new = Arc::new(keep(o));
                let value = match self.live.get(&key) {
                    Some(old) if **old == *new => old.clone(),
                    _ => new,
                };
                self.relisting.get_or_insert_with(Map::new).insert(key, value);
                false
            }
            watcher::Event::InitDone => {
                self.live = self.relisting.take().unwrap_or_default();
                true
            }
            watcher::Event::Apply(o) => {
                let key = key_of(&o);
                let new = keep(o);
                // A change only to what is not kept (a remote pod's status conditions): none.
                if self.live.get(&key).is_some_and(|old| **old == new) {
                    return false;
                }
                self.live.insert(key, Arc::new(new));
                true
            }
            watcher::Event::Delete(o) => {
                self.live.remove(&key_of(&o));
                true
            }
        }
    }
}

impl<K: Resource + PartialEq> Cache<K> {
    #[cfg(test)]
    fn key(o: &K) -> Str {
        key_of(o)
    }

    /// Applies an event, keeping the object whole; true when the complete state changed.
    pub(super) fn apply(&mut self, event: watcher::Event<K>) -> bool {
        self.apply_kept(event, |o| o)
    }
}

/// What a cache keeps of an object: not the managed fields (never read, and often the bulk
/// of an object); of a pod's projection, not even the annotations it does not read.
pub(super) trait Trim {
    fn trim(&mut self);
}

macro_rules! trim_managed_fields {
    ($($k:ty),*) => {$(
        impl Trim for $k {
            fn trim(&mut self) {
                self.metadata.managed_fields = None;
            }
        }
    )*};
}
trim_managed_fields!(Pod, Namespace, KubeService);

/// Watches a kind the agent cannot do without, keeping each object trimmed.
fn spawn_watch<K>(
    api: Api<K>,
    what: impl Into<String>,
    config: watcher::Config,
    notify: &Arc<Notify>,
) -> (Slot<K>, JoinHandle<()>)
where
    K: Resource + Trim + Clone + PartialEq + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let keep = |mut o: K| {
        o.trim();
        o
    };
    spawn_watch_kept(api, what, config, notify, keep)
}

/// Watches a kind the agent cannot do without, keeping `keep(object)` of each. An error is
/// never taken as "none": the last complete state stays and the watcher retries. (A kind
/// that may be missing is found through API discovery, as the policy kinds are in `sources`.)
fn spawn_watch_kept<K, V>(
    api: Api<K>,
    what: impl Into<String>,
    config: watcher::Config,
    notify: &Arc<Notify>,
    mut keep: impl FnMut(K) -> V + Send + 'static,
) -> (Slot<V>, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    V: PartialEq + Send + Sync + 'static,
{
    let what = what.into();
    let (tx, rx) = watch::channel(None);
    let notify = notify.clone();
    let task = tokio::spawn(async move {
        let mut cache = Cache::new();
        // The watcher relists by itself after a lost watch; the backoff paces the retries.
        let events = watcher(api, config).default_backoff();
        let mut events = std::pin::pin!(events);
        while let Some(item) = events.next().await {
            match item {
                Ok(event) => {
                    if cache.apply_kept(event, &mut keep) {
                        // O(1): the map's structure is shared, not copied.
                        tx.send_replace(Some(Arc::new(cache.live.clone())));
                        notify.notify_one();
                    }
                }
                // Keep the last complete state; the watcher retries.
                Err(e) => warn!(resource = %what, "watch: {e}; retrying"),
            }
        }
    });
    (rx, task)
}

struct Inputs {
    pods: Slot<Pod>,
    /// With a node: every pod, projected.
    views: Option<Slot<RemotePod>>,
    namespaces: Slot<Namespace>,
    services: Slot<KubeService>,
    slices: Slot<Slice>,
    policies: Vec<(ApiResource, Slot<DynamicObject>)>,
}

/// Every kind's objects, once each has been listed.
pub(super) struct State {
    /// The node's pods (every pod, without a node), whole.
    pub(super) pods: Objects<Pod>,
    /// With a node: every pod, projected (a pod also in `pods` is taken from there).
    pub(super) views: Option<Objects<RemotePod>>,
    pub(super) namespaces: Objects<Namespace>,
    pub(super) services: Objects<KubeService>,
    pub(super) slices: Objects<Slice>,
    pub(super) policies: Vec<(ApiResource, Objects<DynamicObject>)>,
}

impl Inputs {
    fn state(&self) -> Option<State> {
        let mut policies = Vec::new();
        for (ar, rx) in &self.policies {
            policies.push((ar.clone(), rx.borrow().clone()?));
        }
        let views = match &self.views {
            Some(rx) => Some(rx.borrow().clone()?),
            None => None,
        };
        Some(State {
            pods: self.pods.borrow().clone()?,
            views,
            namespaces: self.namespaces.borrow().clone()?,
            services: self.services.borrow().clone()?,
            slices: self.slices.borrow().clone()?,
            policies,
        })
    }
}

struct Outputs {
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    bound: watch::Sender<Option<Arc<Vec<super::binding::BoundPod>>>>,
}

async fn build_loop(
    inputs: Inputs,
    notify: Arc<Notify>,
    out: Outputs,
    root_namespace: String,
    members: membership::Settings,
) {
    let tx = out.snapshots;
    let mut reported = HashSet::new();
    let node = members.node.clone();
    let mut builder = Builder::new(&root_namespace, members);
    // The last table: the next reuses its routes of every service that did not change.
    let mut table: Option<Arc<crate::services::ServiceTable>> = None;
    loop {
        notify.notified().await;
        tokio::time::sleep(DEBOUNCE).await;
        let Some(state) = inputs.state() else {
            // Not every kind listed yet: the pods to hold are known from pods and namespaces.
            let pods = inputs.pods.borrow().clone();
            let views = inputs.views.as_ref().map(|rx| rx.borrow().clone());
            let namespaces = inputs.namespaces.borrow().clone();
            let views = match views {
                Some(None) => continue,
                Some(Some(v)) => Some(v),
                None => None,
            };
            if let (Some(pods), Some(namespaces), true) = (pods, namespaces, tx.borrow().is_none())
            {
                if let Some(bound) = builder.bound(&pods, views.as_ref(), &namespaces) {
                    if out.bound.borrow().as_deref() != Some(&bound) {
                        out.bound.send_replace(Some(Arc::new(bound)));
                    }
                }
            }
            continue;
        };
        // Only parts that changed are converted again; nothing changed, nothing to send.
        let Some(mut snapshot) = builder.build(&state) else { continue };
        if let Some(node) = &node {
            let t = crate::services::ServiceTable::build_from(
                &snapshot.workloads,
                node,
                table.as_deref(),
            );
            let t = Arc::new(t);
            table = Some(t.clone());
            snapshot.routes = Some(t);
        }
        // Each rejection is logged once while it lasts, not on every rebuild.
        let now: HashSet<String> = snapshot.rejected.iter().cloned().collect();
        for r in snapshot.rejected.iter().filter(|r| !reported.contains(*r)) {
            error!("rejected, left out: {r}");
        }
        reported = now;
        let first = tx.borrow().is_none();
        if first {
            info!(
                pods = snapshot.workloads.workloads.len(),
                services = snapshot.workloads.services.len(),
                policies = snapshot.policies.len(),
                "synced with the API server"
            );
        }
        tx.send_replace(Some(Arc::new(snapshot)));
        if first {
            // The list's pages and conversions are freed: give them back.
            super::heap::release_free_memory();
        }
    }
}

/// Pods in the order they claim their IPs: those not terminating first, each group by name. An
/// IP freed by a terminating pod and already given to a new one is the new pod's: the old
/// pod's identity and policy must not answer for it.
#[cfg(test)]
fn serving_first(pods: &Objects<Pod>) -> impl Iterator<Item = &Pod> {
    let terminating = |p: &Pod| p.metadata.deletion_timestamp.is_some();
    let (mut first, rest): (Vec<&Pod>, Vec<&Pod>) =
        pods.values().map(Arc::as_ref).partition(|p| !terminating(p));
    first.extend(rest);
    first.into_iter()
}

/// The snapshot of `state` from scratch: the reference the incremental [`Builder`] is tested
/// against.
#[cfg(test)]
pub(super) fn build(
    state: &State,
    root_namespace: &str,
    members: &membership::Settings,
) -> Snapshot {
    let mut rejected = Vec::new();
    let mut workloads: Vec<Workload> = Vec::new();
    let mut decisions = Vec::new();
    let mut ips = HashMap::new();
    let mut bound = Vec::new();
    for pod in serving_first(&state.pods) {
        let m = pod_membership(pod, &state.namespaces, members);
        let is_in = m.as_ref().is_some_and(|m| m.membership.is_in());
        let known_out = m.as_ref().is_some_and(|m| !m.membership.is_in());
        let ours = m.as_ref().is_some_and(|m| members.node.as_ref().is_none_or(|n| *n == m.node));
        decisions.extend(m.filter(|_| ours));
        // Pods of the mesh bound to a node, with or without an IP yet (their errors are the
        // workload conversion's to report: a pod without a uid is both).
        if is_in && ours {
            if let Ok(Some(b)) = super::binding::bound_pod(pod) {
                bound.push(b);
            }
        }
        match convert::workload(pod) {
            // Pods out of the mesh are not its workloads: never enrolled, plaintext peers.
            Ok(Some(_)) if !is_in => {}
            Ok(Some(w)) => {
                // Two running pods with one IP: the one not terminating keeps it, else the
                // first by name.
                if let Some((ip, first)) =
                    w.ips.iter().find_map(|a| Some((a, ips.get(&a.to_canonical())?)))
                {
                    rejected.push(format!(
                        "Pod {}/{}: IP {ip} is already pod {first}'s",
                        w.namespace, w.name
                    ));
                    continue;
                }
                for a in &w.ips {
                    ips.insert(a.to_canonical(), format!("{}/{}", w.namespace, w.name));
                }
                workloads.push(w);
            }
            Ok(None) => {}
            // What is wrong with a pod out of the mesh is not the mesh's to report.
            Err(_) if known_out => {}
            Err(e) => rejected.push(e.to_string()),
        }
    }
    let mut slices: HashMap<(String, String), Vec<&Slice>> = HashMap::new();
    for s in state.slices.values() {
        if let Some(svc) = &s.service {
            slices
                .entry((s.namespace.clone().unwrap_or_default(), svc.clone()))
                .or_default()
                .push(s);
        }
    }
    let mut pods_by_ns: HashMap<String, Vec<&Pod>> = HashMap::new();
    for p in state.pods.values() {
        pods_by_ns.entry(p.namespace().unwrap_or_default()).or_default().push(p);
    }
    let mut services = Vec::new();
    for svc in state.services.values() {
        let ns = svc.namespace().unwrap_or_default();
        let key = (ns.clone(), svc.name_any());
        let svc_slices = slices.get(&key).map(Vec::as_slice).unwrap_or_default();
        let pods = pods_by_ns.get(&ns).map(Vec::as_slice).unwrap_or_default();
        match convert::service(svc, svc_slices, pods) {
            Ok(mut s) => {
                let (endpoints, errors) = super::endpoints::of_service(&s, svc_slices);
                s.endpoints = Some(endpoints);
                rejected.extend(errors.iter().map(ToString::to_string));
                services.push(Arc::new(s));
            }
            Err(e) => rejected.push(e.to_string()),
        }
    }

    let mut docs = Vec::new();
    let mut seen = BTreeSet::new();
    for (ar, objects) in &state.policies {
        for (key, obj) in objects.iter() {
            // PeerAuthentication and AuthorizationPolicy are listed at v1 and v1beta1: one object,
            // counted once.
            if !seen.insert((ar.kind.clone(), key.clone())) {
                continue;
            }
            match convert::policy_document(obj, ar) {
                Ok(doc) => docs.push(doc),
                Err(e) => rejected.push(e.to_string()),
            }
        }
    }
    // Warnings are the agent's to log, once per change (`PolicySet::warnings` and `lint`).
    let (policies, errors) = PolicySet::from_documents(
        docs.iter().map(|(src, origin)| (src.as_str(), origin.as_path())),
        root_namespace,
    );
    rejected.extend(errors.iter().map(ToString::to_string));
    Snapshot {
        workloads: Arc::new(WorkloadSet::from_shared(
            workloads.into_iter().map(Arc::new).collect(),
            services,
        )),
        policies,
        rejected,
        membership: decisions,
        bound,
        routes: None,
    }
}

/// The pods of the mesh bound to a node (as in [`Snapshot::bound`]), from pods and namespaces
/// alone.
#[cfg(test)]
fn bound_only(
    pods: &Objects<Pod>,
    namespaces: &Objects<Namespace>,
    members: &membership::Settings,
) -> Vec<super::binding::BoundPod> {
    serving_first(pods)
        .filter(|p| {
            let m = pod_membership(p, namespaces, members);
            let ours =
                |m: &membership::PodMembership| members.node.as_ref().is_none_or(|n| *n == m.node);
            m.is_some_and(|m| m.membership.is_in() && ours(&m))
        })
        .filter_map(|p| super::binding::bound_pod(p).ok().flatten())
        .collect()
}

/// The mesh membership of a pod that is or may become running (not of finished ones, nor of
/// pods without a name, namespace or node).
pub(super) fn pod_membership(
    pod: &Pod,
    namespaces: &Objects<Namespace>,
    members: &membership::Settings,
) -> Option<membership::PodMembership> {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let name = pod.metadata.name.clone().filter(|n| !n.is_empty())?;
    let namespace = pod.metadata.namespace.clone().filter(|n| !n.is_empty())?;
    let node = pod.spec.as_ref()?.node_name.clone().filter(|n| !n.is_empty())?;
    // Namespaces are cluster-scoped: cached as `/name`.
    let ns = namespaces.get(format!("/{namespace}").as_str());
    Some(membership::PodMembership {
        pod: format!("{name}.{namespace}"),
        membership: membership::decide(pod, ns.map(|n| &**n), members),
        uid: pod.metadata.uid.clone(),
        ip: pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
        name,
        namespace,
        node,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "uid": format!("u-{name}"),
                         "labels": {membership::DATAPLANE_MODE: membership::AMBIENT}},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"phase": "Running", "podIP": ip},
        }))
        .unwrap()
    }

    fn terminating(mut p: Pod) -> Pod {
        p.metadata.deletion_timestamp =
            serde_json::from_value(serde_json::json!("2026-01-01T00:00:00Z")).unwrap();
        p
    }

    fn keys(c: &Cache<Pod>) -> Vec<&str> {
        c.live.keys().map(Str::as_str).collect()
    }

    #[test]
    fn a_relist_replaces_the_state_only_once_complete() {
        let mut c = Cache::new();
        assert!(!c.apply(watcher::Event::Init));
        assert!(!c.apply(watcher::Event::InitApply(pod("a", "10.0.0.1"))));
        assert!(!c.apply(watcher::Event::InitApply(pod("b", "10.0.0.2"))));
        assert!(keys(&c).is_empty());
        assert!(c.apply(watcher::Event::InitDone));
        assert_eq!(keys(&c), ["ns/a", "ns/b"]);
        // A relist in progress leaves the last complete state in place.
        c.apply(watcher::Event::Init);
        c.apply(watcher::Event::InitApply(pod("a", "10.0.0.1")));
        assert_eq!(keys(&c), ["ns/a", "ns/b"]);
        assert!(c.apply(watcher::Event::InitDone));
        assert_eq!(keys(&c), ["ns/a"]);
        assert!(c.apply(watcher::Event::Delete(pod("a", "10.0.0.1"))));
        assert!(keys(&c).is_empty());
    }

    #[test]
    fn a_state_handed_out_stays_as_it_was_and_shares_its_objects() {
        let mut c = Cache::new();
        c.apply(watcher::Event::Init);
        c.apply(watcher::Event::InitApply(pod("a", "10.0.0.1")));
        c.apply(watcher::Event::InitDone);
        // What the builder got (an O(1) clone) ...
        let before = c.live.clone();
        assert!(before.ptr_eq(&c.live));
        c.apply(watcher::Event::Apply(pod("b", "10.0.0.2")));
        c.apply(watcher::Event::Delete(pod("a", "10.0.0.1")));
        // ... is not changed by later events, and unchanged objects are the same objects.
        assert_eq!(before.keys().collect::<Vec<_>>(), ["ns/a"]);
        assert_eq!(keys(&c), ["ns/b"]);
        let again = c.live.clone();
        c.apply(watcher::Event::Apply(pod("c", "10.0.0.3")));
        assert!(Arc::ptr_eq(&again["ns/b"], &c.live["ns/b"]));
    }

    #[test]
    fn an_object_that_did_not_change_keeps_its_value_through_events_and_relists() {
        let mut c = Cache::new();
        c.apply(watcher::Event::Init);
        c.apply(watcher::Event::InitApply(pod("a", "10.0.0.1")));
        c.apply(watcher::Event::InitDone);
        let first = c.live["ns/a"].clone();
        // The same content again (for a projection: a change only to what it drops).
        assert!(!c.apply(watcher::Event::Apply(pod("a", "10.0.0.1"))));
        assert!(Arc::ptr_eq(&first, &c.live["ns/a"]));
        // A relist hands back the value the builder already holds, not a copy of it.
        c.apply(watcher::Event::Init);
        c.apply(watcher::Event::InitApply(pod("a", "10.0.0.1")));
        c.apply(watcher::Event::InitApply(pod("b", "10.0.0.2")));
        assert!(c.apply(watcher::Event::InitDone));
        assert!(Arc::ptr_eq(&first, &c.live["ns/a"]));
        // A real change is one.
        assert!(c.apply(watcher::Event::Apply(pod("a", "10.0.0.9"))));
        assert!(!Arc::ptr_eq(&first, &c.live["ns/a"]));
    }

    #[test]
    fn a_second_running_pod_with_the_same_ip_is_rejected_by_name() {
        let objects = |pods: Vec<Pod>| {
            Arc::new(pods.into_iter().map(|p| (Cache::key(&p), Arc::new(p))).collect())
        };
        let state = State {
            pods: objects(vec![pod("a", "10.0.0.1"), pod("b", "10.0.0.1")]),
            namespaces: Arc::default(),
            services: Arc::default(),
            slices: Arc::default(),
            views: None,
            policies: vec![],
        };
        let s = build(&state, "istio-system", &membership::Settings::default());
        let keys: Vec<String> = s.workloads.workloads.iter().map(|w| w.key()).collect();
        assert_eq!(keys, ["a.ns"]);
        assert_eq!(s.rejected, ["Pod ns/b: IP 10.0.0.1 is already pod ns/a's"]);
    }

    #[test]
    fn only_opted_in_pods_are_workloads_and_every_decision_is_kept_for_the_node() {
        let objects = |pods: Vec<Pod>| {
            Arc::new(pods.into_iter().map(|p| (Cache::key(&p), Arc::new(p))).collect())
        };
        let mut plain = pod("plain", "10.0.0.2");
        plain.metadata.labels = None;
        let mut remote = pod("remote", "10.0.0.3");
        remote.metadata.labels = None;
        if let Some(s) = remote.spec.as_mut() {
            s.node_name = Some("n2".into());
        }
        let mut done = pod("done", "10.0.0.4");
        if let Some(s) = done.status.as_mut() {
            s.phase = Some("Succeeded".into());
        }
        let mut broken = pod("broken", "10.0.0.300");
        broken.metadata.labels = None;
        let mut state = State {
            pods: objects(vec![pod("a", "10.0.0.1"), plain, remote, done, broken]),
            namespaces: Arc::default(),
            services: Arc::default(),
            slices: Arc::default(),
            views: None,
            policies: vec![],
        };
        let node = membership::Settings { node: Some("n1".into()), ..Default::default() };
        let s = build(&state, "istio-system", &node);
        let keys: Vec<String> = s.workloads.workloads.iter().map(|w| w.key()).collect();
        assert_eq!(keys, ["a.ns"]);
        let decided: Vec<(&str, bool)> =
            s.membership.iter().map(|m| (m.pod.as_str(), m.membership.is_in())).collect();
        assert_eq!(decided, [("a.ns", true), ("broken.ns", false), ("plain.ns", false)]);
        // A broken pod out of the mesh is not the mesh's to report.
        assert!(s.rejected.is_empty(), "{:?}", s.rejected);

        // Labelling the namespace brings its pods in, remote ones too.
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "ns", "labels": {membership::DATAPLANE_MODE: membership::AMBIENT}},
        }))
        .unwrap();
        state.namespaces = Arc::new(Map::unit("/ns".into(), Arc::new(ns)));
        let s = build(&state, "istio-system", &node);
        let keys: Vec<String> = s.workloads.workloads.iter().map(|w| w.key()).collect();
        assert_eq!(keys, ["a.ns", "plain.ns", "remote.ns"]);
        assert_eq!(s.rejected.len(), 1, "{:?}", s.rejected);
        // Only this node's bound pods: no agent reads another node's.
        let bound: Vec<String> = s.bound.iter().map(|b| b.key()).collect();
        assert_eq!(bound, ["a.ns", "broken.ns", "plain.ns"]);
        assert!(s.rejected[0].contains("Pod ns/broken"), "{:?}", s.rejected);
    }

    #[test]
    fn the_bound_pods_are_known_from_pods_and_namespaces_alone() {
        let objects = |pods: Vec<Pod>| -> Objects<Pod> {
            Arc::new(pods.into_iter().map(|p| (Cache::key(&p), Arc::new(p))).collect())
        };
        let mut pending = pod("pending", "10.0.0.9");
        pending.status = None;
        let mut plain = pod("plain", "10.0.0.2");
        plain.metadata.labels = None;
        let pods = objects(vec![pod("a", "10.0.0.1"), pending, plain]);
        let bound = bound_only(&pods, &Arc::default(), &membership::Settings::default());
        let keys: Vec<String> = bound.iter().map(|b| b.key()).collect();
        assert_eq!(keys, ["a.ns", "pending.ns"]);
        // The same as a full snapshot's.
        let state = State {
            pods,
            namespaces: Arc::default(),
            services: Arc::default(),
            slices: Arc::default(),
            views: None,
            policies: vec![],
        };
        assert_eq!(build(&state, "istio-system", &membership::Settings::default()).bound, bound);
    }

    #[test]
    fn a_terminating_pod_yields_its_ip_to_the_new_pod_whatever_their_names() {
        let objects = |pods: Vec<Pod>| -> Objects<Pod> {
            Arc::new(pods.into_iter().map(|p| (Cache::key(&p), Arc::new(p))).collect())
        };
        for (old, new) in [("a", "b"), ("b", "a")] {
            let state = State {
                pods: objects(vec![terminating(pod(old, "10.0.0.1")), pod(new, "10.0.0.1")]),
                namespaces: Arc::default(),
                services: Arc::default(),
                slices: Arc::default(),
                views: None,
                policies: vec![],
            };
            let s = build(&state, "istio-system", &membership::Settings::default());
            let keys: Vec<String> = s.workloads.workloads.iter().map(|w| w.key()).collect();
            assert_eq!(keys, [format!("{new}.ns")]);
            assert_eq!(
                s.workloads
                    .by_ip("10.0.0.1".parse().unwrap())
                    .and_then(|w| w.uid.as_ref().map(|u| u.to_string())),
                Some(format!("u-{new}"))
            );
            assert_eq!(
                s.rejected,
                [format!("Pod ns/{old}: IP 10.0.0.1 is already pod ns/{new}'s")]
            );
        }
        // A terminating pod alone keeps its IP (and its enrollment) while it drains.
        let state = State {
            pods: objects(vec![terminating(pod("a", "10.0.0.1")), pod("b", "10.0.0.2")]),
            namespaces: Arc::default(),
            services: Arc::default(),
            slices: Arc::default(),
            views: None,
            policies: vec![],
        };
        let s = build(&state, "istio-system", &membership::Settings::default());
        assert_eq!(s.workloads.workloads.len(), 2);
        assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    }
}
