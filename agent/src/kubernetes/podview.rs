//! The compact projection of a pod: what the agent needs of a pod of another node.
//!
//! A node's agent watches its own pods as whole objects (`spec.nodeName=<node>`) and every pod
//! as a [`PodView`]: the deserialize target keeps only the fields the conversions read (serde
//! drops the rest while reading, so even a list page of full pods never stays in memory):
//! addresses, names, uid, service account, labels, owner references (the workload name),
//! node, phase, deletion timestamp, host network, runtime class, container names and ports,
//! probe ports and the sidecar markers. [`PodView::to_pod`] gives it back as a [`Pod`] with
//! just those fields, so a remote pod goes through the very conversions a full one does.

use std::{borrow::Cow, sync::Arc};

use k8s_openapi::{
    api::core::v1::{
        Container, ContainerPort, GRPCAction, HTTPGetAction, Pod, PodIP, PodSpec, PodStatus, Probe,
        TCPSocketAction,
    },
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, Time},
        util::intstr::IntOrString,
    },
    NamespaceResourceScope,
};
use serde::Deserialize;

use super::intern::Interner;
use crate::workloads::{
    shared::{Labels, Str},
    Workload,
};

/// Istio's injector marks injected pods with it: the one annotation membership reads.
const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
/// Set by the Deployment controller on its ReplicaSets' pods: the `<hash>` of `<deploy>-<hash>`.
const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// A pod as the agent keeps a pod of another node.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PodView {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<ViewSpec>,
    pub status: Option<ViewStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewSpec {
    pub node_name: Option<String>,
    pub host_network: Option<bool>,
    pub service_account_name: Option<String>,
    pub runtime_class_name: Option<String>,
    #[serde(default)]
    pub containers: Vec<ViewContainer>,
    pub init_containers: Option<Vec<ViewContainer>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewContainer {
    #[serde(default)]
    pub name: String,
    pub restart_policy: Option<String>,
    pub ports: Option<Vec<ViewPort>>,
    pub liveness_probe: Option<ViewProbe>,
    pub readiness_probe: Option<ViewProbe>,
    pub startup_probe: Option<ViewProbe>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewPort {
    pub name: Option<String>,
    #[serde(default)]
    pub container_port: i32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewProbe {
    pub http_get: Option<ProbePort>,
    pub tcp_socket: Option<ProbePort>,
    pub grpc: Option<GrpcPort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ProbePort {
    pub port: IntOrString,
}

// `IntOrString` has no `Hash`: by variant and value.
impl std::hash::Hash for ProbePort {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        match &self.port {
            IntOrString::Int(n) => (0u8, n).hash(h),
            IntOrString::String(s) => (1u8, s).hash(h),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
pub struct GrpcPort {
    #[serde(default)]
    pub port: i32,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewStatus {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<ViewIp>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ViewIp {
    #[serde(default)]
    pub ip: String,
}

impl kube::Resource for PodView {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl PodView {
    /// Drops what serde had to keep of the metadata but nothing reads: annotations other than
    /// the sidecar mark, managed fields, finalizers, generate name.
    pub fn trim(&mut self) {
        let m = &mut self.metadata;
        m.managed_fields = None;
        m.finalizers = None;
        m.generate_name = None;
        if let Some(a) = m.annotations.as_mut() {
            a.retain(|k, _| k == SIDECAR_STATUS);
        }
        if m.annotations.as_ref().is_some_and(|a| a.is_empty()) {
            m.annotations = None;
        }
    }

    /// The pod with the fields of the view and no others.
    pub fn to_pod(&self) -> Pod {
        Pod {
            metadata: self.metadata.clone(),
            spec: self.spec.as_ref().map(|s| PodSpec {
                node_name: s.node_name.clone(),
                host_network: s.host_network,
                service_account_name: s.service_account_name.clone(),
                runtime_class_name: s.runtime_class_name.clone(),
                containers: s.containers.iter().map(ViewContainer::to_container).collect(),
                init_containers: s
                    .init_containers
                    .as_ref()
                    .map(|c| c.iter().map(ViewContainer::to_container).collect()),
                ..Default::default()
            }),
            status: self.status.as_ref().map(|s| PodStatus {
                phase: s.phase.clone(),
                pod_ip: s.pod_ip.clone(),
                pod_ips: s
                    .pod_ips
                    .as_ref()
                    .map(|ips| ips.iter().map(|a| PodIP { ip: a.ip.clone() }).collect()),
                ..Default::default()
            }),
        }
    }

    /// The view of a full pod (what the remote watch would have kept of it).
    pub fn of_pod(pod: &Pod) -> PodView {
        let mut v: PodView = serde_json::to_value(pod)
            .and_then(serde_json::from_value)
            .unwrap_or_else(|_| PodView { metadata: pod.metadata.clone(), ..Default::default() });
        v.trim();
        v
    }
}

impl ViewContainer {
    fn to_container(&self) -> Container {
        let probe = |p: &Option<ViewProbe>| {
            p.as_ref().map(|p| Probe {
                http_get: p
                    .http_get
                    .as_ref()
                    .map(|h| HTTPGetAction { port: h.port.clone(), ..Default::default() }),
                tcp_socket: p
                    .tcp_socket
                    .as_ref()
                    .map(|t| TCPSocketAction { port: t.port.clone(), ..Default::default() }),
                grpc: p.grpc.as_ref().map(|g| GRPCAction { port: g.port, service: None }),
                ..Default::default()
            })
        };
        Container {
            name: self.name.clone(),
            restart_policy: self.restart_policy.clone(),
            ports: self.ports.as_ref().map(|ports| {
                ports
                    .iter()
                    .map(|p| ContainerPort {
                        name: p.name.clone(),
                        container_port: p.container_port,
                        ..Default::default()
                    })
                    .collect()
            }),
            liveness_probe: probe(&self.liveness_probe),
            readiness_probe: probe(&self.readiness_probe),
            startup_probe: probe(&self.startup_probe),
            ..Default::default()
        }
    }
}

/// A pod's containers as the conversions read them (names, restart policies, ports, probes):
/// the pods of one Deployment have the same, so it is interned whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Containers {
    pub containers: Vec<ViewContainer>,
    pub init_containers: Option<Vec<ViewContainer>>,
}

/// The interner of remote pods.
pub type PodInterner = Interner<Containers>;

/// A pod of another node as the feed keeps it: the [`PodView`]'s fields, read once, with
/// every string that repeats across pods (namespace, node, service account, phase, label
/// keys and values, whole label sets, the container layout) shared through the feed's
/// [`Interner`]. About a tenth of the view it is made from; [`RemotePod::to_pod`] gives back
/// the pod the view gives, so a remote pod still goes through the conversions a full one does.
#[derive(Debug, Clone, PartialEq)]
pub struct RemotePod {
    pub name: Option<Str>,
    pub namespace: Option<Str>,
    pub uid: Option<Str>,
    pub labels: Option<Labels>,
    /// The value of the sidecar mark, the one annotation read.
    sidecar_status: Option<Str>,
    pub deletion_timestamp: Option<Time>,
    /// From the owner references ([`workload_name`]).
    pub workload_name: Option<Str>,
    spec: Option<RemoteSpec>,
    status: Option<RemoteStatus>,
}

#[derive(Debug, Clone, PartialEq)]
struct RemoteSpec {
    node_name: Option<Str>,
    host_network: Option<bool>,
    service_account_name: Option<Str>,
    runtime_class_name: Option<Str>,
    containers: Arc<Containers>,
}

#[derive(Debug, Clone, PartialEq)]
struct RemoteStatus {
    phase: Option<Str>,
    pod_ip: Option<Str>,
    pod_ips: PodIps,
}

/// `status.podIPs` as kept. Nearly every pod's is exactly `[podIP]`: that is kept as a mark,
/// not as a list of its own (an allocation per pod of the cluster).
#[derive(Debug, Clone, PartialEq)]
enum PodIps {
    Absent,
    JustPodIp,
    List(Box<[Str]>),
}

impl RemotePod {
    /// What the feed keeps of `view` (trimmed or not: it reads only what [`PodView::trim`]
    /// keeps).
    pub fn keep(view: PodView, interner: &mut PodInterner) -> RemotePod {
        let workload_name = workload_name(&view.metadata);
        let m = view.metadata;
        let namespace = m.namespace.map(|n| interner.str(&n));
        let sidecar_status =
            m.annotations.and_then(|mut a| a.remove(SIDECAR_STATUS)).map(Str::from);
        let workload_name = match (&workload_name, &m.name) {
            // A pod of its own is its own workload: its name, not another copy.
            (Some(w), Some(n)) if w == n => None,
            _ => workload_name.map(|w| interner.str(&w)),
        };
        let spec = view.spec.map(|s| RemoteSpec {
            node_name: s.node_name.map(|n| interner.str(&n)),
            host_network: s.host_network,
            service_account_name: s.service_account_name.map(|n| interner.str(&n)),
            runtime_class_name: s.runtime_class_name.map(|n| interner.str(&n)),
            containers: interner.layout(Containers {
                containers: s.containers,
                init_containers: s.init_containers,
            }),
        });
        let status = view.status.map(|s| {
            let pod_ip = s.pod_ip.map(Str::from);
            // `podIPs[0]` is `podIP`: one string.
            let same = |ip: &str| pod_ip.as_ref().filter(|p| p.as_str() == ip).cloned();
            let pod_ips = match s.pod_ips {
                None => PodIps::Absent,
                Some(ips) if ips.len() == 1 && same(&ips[0].ip).is_some() => PodIps::JustPodIp,
                Some(ips) => PodIps::List(
                    ips.into_iter()
                        .map(|a| same(&a.ip).unwrap_or_else(|| Str::from(a.ip)))
                        .collect(),
                ),
            };
            RemoteStatus { phase: s.phase.map(|p| interner.str(&p)), pod_ip, pod_ips }
        });
        RemotePod {
            name: m.name.map(Str::from),
            namespace,
            uid: m.uid.map(Str::from),
            labels: m.labels.map(|l| interner.labels(&l)),
            sidecar_status,
            deletion_timestamp: m.deletion_timestamp,
            workload_name,
            spec,
            status,
        }
    }

    /// The name of the pod's workload ([`workload_name`]).
    pub fn workload(&self) -> Option<&str> {
        self.workload_name.as_deref().or(self.name.as_deref())
    }

    /// The pod with the fields of the view it was made from and no others.
    pub fn to_pod(&self) -> Pod {
        let owned = |s: &Option<Str>| s.as_ref().map(|s| s.to_string());
        let metadata = ObjectMeta {
            name: owned(&self.name),
            namespace: owned(&self.namespace),
            uid: owned(&self.uid),
            labels: self.labels.as_ref().map(Labels::to_map),
            annotations: self
                .sidecar_status
                .as_ref()
                .map(|v| [(SIDECAR_STATUS.to_owned(), v.to_string())].into()),
            deletion_timestamp: self.deletion_timestamp.clone(),
            ..Default::default()
        };
        Pod {
            metadata,
            spec: self.spec.as_ref().map(|s| PodSpec {
                node_name: owned(&s.node_name),
                host_network: s.host_network,
                service_account_name: owned(&s.service_account_name),
                runtime_class_name: owned(&s.runtime_class_name),
                containers: s
                    .containers
                    .containers
                    .iter()
                    .map(ViewContainer::to_container)
                    .collect(),
                init_containers: s
                    .containers
                    .init_containers
                    .as_ref()
                    .map(|c| c.iter().map(ViewContainer::to_container).collect()),
                ..Default::default()
            }),
            status: self.status.as_ref().map(|s| PodStatus {
                phase: owned(&s.phase),
                pod_ip: owned(&s.pod_ip),
                pod_ips: match &s.pod_ips {
                    PodIps::Absent => None,
                    PodIps::JustPodIp => {
                        Some(s.pod_ip.iter().map(|a| PodIP { ip: a.to_string() }).collect())
                    }
                    PodIps::List(ips) => {
                        Some(ips.iter().map(|a| PodIP { ip: a.to_string() }).collect())
                    }
                },
                ..Default::default()
            }),
        }
    }

    /// Makes `w` (this pod's workload) hold this pod's shared strings and labels rather than
    /// copies of its own: one copy of each for the pod, its workload and every pod that
    /// shares them.
    pub fn share_with(&self, w: &mut Workload) {
        fn take(ours: Option<&Str>, theirs: &mut Str) {
            if let Some(s) = ours.filter(|s| **s == *theirs) {
                *theirs = s.clone();
            }
        }
        take(self.name.as_ref(), &mut w.name);
        take(self.namespace.as_ref(), &mut w.namespace);
        if let Some(spec) = &self.spec {
            take(spec.node_name.as_ref(), &mut w.node);
            take(spec.service_account_name.as_ref(), &mut w.service_account);
        }
        if let Some(uid) = w.uid.as_mut() {
            take(self.uid.as_ref(), uid);
        }
        if let Some(l) = self.labels.as_ref().filter(|l| **l == w.labels) {
            w.labels = l.clone();
        }
    }

    /// What the feed would keep of a full pod (as the remote watch reads it).
    pub fn of_pod(pod: &Pod, interner: &mut PodInterner) -> RemotePod {
        RemotePod::keep(PodView::of_pod(pod), interner)
    }
}

/// The name of the workload that owns the pod, from its controller owner reference: a
/// ReplicaSet made by a Deployment (`<deploy>-<hash>`, `hash` the pod's `pod-template-hash`
/// label) stands for its Deployment; other controllers (StatefulSet, DaemonSet, Job, ...) by
/// their own name; a pod without a controller is its own workload.
pub fn workload_name(meta: &ObjectMeta) -> Option<String> {
    let owners = meta.owner_references.iter().flatten();
    let Some(owner) = owners.clone().find(|o| o.controller == Some(true)).or(owners.clone().next())
    else {
        return meta.name.clone();
    };
    if owner.kind == "ReplicaSet" {
        let hash = meta.labels.as_ref().and_then(|l| l.get(POD_TEMPLATE_HASH));
        if let Some(deploy) = hash.and_then(|h| owner.name.strip_suffix(&format!("-{h}"))) {
            return Some(deploy.to_owned());
        }
    }
    Some(owner.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web-7d9f-x2", "namespace": "shop", "uid": "u-1",
                "resourceVersion": "42",
                "labels": {"app": "web", "version": "v2", "pod-template-hash": "7d9f",
                           "service.istio.io/canonical-name": "web",
                           "service.istio.io/canonical-revision": "v2"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}",
                                "sidecar.istio.io/status": "{}"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                     "name": "web-7d9f", "uid": "rs", "controller": true}],
                "managedFields": [{"manager": "kubelet"}],
                "deletionTimestamp": "2026-01-01T00:00:00Z",
            },
            "spec": {
                "nodeName": "n2", "serviceAccountName": "web", "runtimeClassName": "gvisor",
                "volumes": [{"name": "v", "emptyDir": {}}],
                "containers": [{
                    "name": "app", "image": "registry.example/web:2",
                    "env": [{"name": "A", "value": "b"}],
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "readinessProbe": {"httpGet": {"port": "http", "path": "/ready"}},
                    "livenessProbe": {"tcpSocket": {"port": 9000}},
                    "startupProbe": {"grpc": {"port": 9090}},
                }],
                "initContainers": [{"name": "istio-proxy", "restartPolicy": "Always"}],
            },
            "status": {
                "phase": "Running", "podIP": "10.1.0.7",
                "podIPs": [{"ip": "10.1.0.7"}, {"ip": "fd00::7"}],
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0,
                                       "image": "x", "imageID": "y"}],
            },
        })
    }

    #[test]
    fn a_view_keeps_what_the_conversions_read_and_drops_the_rest() {
        let pod: Pod = serde_json::from_value(full()).unwrap();
        let mut view: PodView = serde_json::from_value(full()).unwrap();
        view.trim();
        let back = view.to_pod();
        // The conversions give the same answers on the view as on the whole pod.
        let full_w = super::super::convert::workload(&pod).unwrap();
        assert_eq!(super::super::convert::workload(&back).unwrap(), full_w);
        assert_eq!(
            full_w.map(|w| w.probe_ports),
            Some(vec![8080, 9000, 9090]),
            "probe ports survive"
        );
        binds_and_decides_alike(&back, &pod);
        assert_eq!(back.metadata.deletion_timestamp, pod.metadata.deletion_timestamp);
        // What nothing reads is gone.
        assert_eq!(back.metadata.managed_fields, None);
        let annotations = back.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(annotations.keys().collect::<Vec<_>>(), ["sidecar.istio.io/status"]);
        let spec = back.spec.clone().unwrap_or_default();
        assert!(spec.volumes.is_none() && spec.containers[0].image.is_none());
        assert!(back.status.as_ref().is_some_and(|s| s.conditions.is_none()));
        assert_eq!(PodView::of_pod(&pod), view);
    }

    /// A pod given back by a projection binds and gets its membership as the whole pod does.
    fn binds_and_decides_alike(back: &Pod, pod: &Pod) {
        assert_eq!(
            super::super::binding::bound_pod(back).unwrap(),
            super::super::binding::bound_pod(pod).unwrap()
        );
        let s = super::super::membership::Settings::default();
        assert_eq!(
            super::super::membership::decide(back, None, &s),
            super::super::membership::decide(pod, None, &s)
        );
    }

    #[test]
    fn a_remote_pod_gives_back_its_addresses_as_they_were() {
        let cases = [
            serde_json::json!({"podIP": "10.1.0.7", "podIPs": [{"ip": "10.1.0.7"}]}),
            serde_json::json!({"podIP": "10.1.0.7"}),
            serde_json::json!({"podIP": "10.1.0.7", "podIPs": [{"ip": "10.1.0.7"}, {"ip": "fd00::7"}]}),
            // Not what the API server writes, and kept as written.
            serde_json::json!({"podIP": "10.1.0.7", "podIPs": [{"ip": "10.1.0.8"}]}),
            serde_json::json!({"podIPs": [{"ip": "10.1.0.7"}]}),
            serde_json::json!({"podIP": "10.1.0.7", "podIPs": []}),
            serde_json::json!({}),
        ];
        for status in cases {
            let mut json = full();
            json["status"] = status.clone();
            let pod: Pod = serde_json::from_value(json.clone()).unwrap();
            let remote =
                RemotePod::keep(serde_json::from_value(json).unwrap(), &mut PodInterner::default());
            let want = PodView::of_pod(&pod).to_pod().status;
            assert_eq!(remote.to_pod().status, want, "{status}");
        }
    }

    #[test]
    fn a_remote_pod_converts_as_its_view_and_shares_what_repeats() {
        let pod: Pod = serde_json::from_value(full()).unwrap();
        let mut interner = PodInterner::default();
        let remote = RemotePod::keep(serde_json::from_value(full()).unwrap(), &mut interner);
        let back = remote.to_pod();
        let mut view = PodView::of_pod(&pod).to_pod();
        // Read once and not kept: the owner references (into the workload name) and the
        // resource version (the watcher's).
        view.metadata.owner_references = None;
        view.metadata.resource_version = None;
        assert_eq!(back, view, "the pod its view gives");
        assert_eq!(
            super::super::convert::workload(&back).unwrap(),
            super::super::convert::workload(&pod).unwrap()
        );
        binds_and_decides_alike(&back, &pod);
        assert_eq!(remote.workload(), Some("web"));
        // Its workload holds the pod's own strings and labels, not copies.
        let mut w = super::super::convert::workload(&back).unwrap().unwrap();
        remote.share_with(&mut w);
        assert_eq!(Some(&w), super::super::convert::workload(&pod).unwrap().as_ref());
        assert!(Str::ptr_eq(&w.name, remote.name.as_ref().unwrap()));
        assert!(Str::ptr_eq(&w.namespace, remote.namespace.as_ref().unwrap()));
        assert!(std::ptr::eq(w.labels.pairs(), remote.labels.as_ref().unwrap().pairs()));
        // Another pod of the Deployment: its own name, uid and address, the rest shared.
        let mut json = full();
        json["metadata"]["name"] = "web-7d9f-x3".into();
        json["metadata"]["uid"] = "u-2".into();
        json["status"]["podIP"] = "10.1.0.8".into();
        let other = RemotePod::keep(serde_json::from_value(json).unwrap(), &mut interner);
        let shared = |f: fn(&RemotePod) -> Option<&Str>| match (f(&remote), f(&other)) {
            (Some(a), Some(b)) => Str::ptr_eq(a, b),
            _ => false,
        };
        assert!(shared(|p| p.namespace.as_ref()));
        assert!(shared(|p| p.spec.as_ref()?.node_name.as_ref()));
        assert!(shared(|p| p.spec.as_ref()?.service_account_name.as_ref()));
        assert!(shared(|p| p.workload_name.as_ref()));
        assert!(!shared(|p| p.name.as_ref()));
        let (a, b) = (remote.labels.as_ref().unwrap(), other.labels.as_ref().unwrap());
        assert!(std::ptr::eq(a.pairs(), b.pairs()), "one label set");
        let layout = |p: &RemotePod| p.spec.as_ref().map(|s| s.containers.clone());
        assert!(Arc::ptr_eq(&layout(&remote).unwrap(), &layout(&other).unwrap()));
        // A pod without a controller is its own workload.
        let mut json = full();
        json["metadata"]["ownerReferences"] = serde_json::Value::Null;
        let alone = RemotePod::keep(serde_json::from_value(json).unwrap(), &mut interner);
        assert_eq!((alone.workload(), alone.workload_name.as_ref()), (Some("web-7d9f-x2"), None));
    }

    #[test]
    fn the_workload_name_follows_the_owner_references() {
        let pod: Pod = serde_json::from_value(full()).unwrap();
        assert_eq!(workload_name(&pod.metadata).as_deref(), Some("web"));
        let mut m = pod.metadata.clone();
        // A ReplicaSet not named after the hash is its own workload.
        if let Some(l) = m.labels.as_mut() {
            l.insert(POD_TEMPLATE_HASH.into(), "other".into());
        }
        assert_eq!(workload_name(&m).as_deref(), Some("web-7d9f"));
        if let Some(o) = m.owner_references.as_mut() {
            o[0].kind = "StatefulSet".into();
            o[0].name = "db".into();
        }
        assert_eq!(workload_name(&m).as_deref(), Some("db"));
        m.owner_references = None;
        assert_eq!(workload_name(&m).as_deref(), Some("web-7d9f-x2"));
    }
}
