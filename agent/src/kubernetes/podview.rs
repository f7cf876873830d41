//! The compact projection of a pod: what the agent needs of a pod of another node.
//!
//! A node's agent watches its own pods as whole objects (`spec.nodeName=<node>`) and every pod
//! as a [`PodView`]: the deserialize target keeps only the fields the conversions read (serde
//! drops the rest while reading, so even a list page of full pods never stays in memory):
//! addresses, names, uid, service account, labels, owner references (the workload name),
//! node, phase, deletion timestamp, host network, runtime class, container names and ports,
//! probe ports and the sidecar markers. [`PodView::to_pod`] gives it back as a [`Pod`] with
//! just those fields, so a remote pod goes through the very conversions a full one does.

use std::borrow::Cow;

use k8s_openapi::{
    api::core::v1::{
        Container, ContainerPort, GRPCAction, HTTPGetAction, Pod, PodIP, PodSpec, PodStatus, Probe,
        TCPSocketAction,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
    NamespaceResourceScope,
};
use serde::Deserialize;

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

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
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

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewPort {
    pub name: Option<String>,
    #[serde(default)]
    pub container_port: i32,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewProbe {
    pub http_get: Option<ProbePort>,
    pub tcp_socket: Option<ProbePort>,
    pub grpc: Option<GrpcPort>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ProbePort {
    pub port: IntOrString,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
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
        assert_eq!(
            super::super::binding::bound_pod(&back).unwrap(),
            super::super::binding::bound_pod(&pod).unwrap()
        );
        let s = super::super::membership::Settings::default();
        assert_eq!(
            super::super::membership::decide(&back, None, &s),
            super::super::membership::decide(&pod, None, &s)
        );
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
