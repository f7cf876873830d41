//! Who is in the mesh: the operator's choice, by label, as in Istio ambient.
//!
//! Followed from Istio's ambient pod selection (istio/istio `cni/pkg/util`, the default
//! enablement selectors, and `PodRedirectionEnabled`'s host-network and sidecar checks):
//! a pod is enrolled if the pod is labelled `istio.io/dataplane-mode=ambient`, or its
//! namespace is and the pod is not labelled `istio.io/dataplane-mode=none`; a pod with a
//! sidecar proxy or on the host network is not. Istio's CNI also never touches its own
//! namespace and `kube-system` by default; here `kube-system`, the agent's namespace and the
//! CA's are never enrolled, whatever their labels: a broken agent must not take the
//! cluster's DNS, or itself, or the CA with it.
//!
//! Nothing is enrolled by default. Pods that are out are not workloads of the mesh (never
//! enrolled, and plaintext destinations), but the decision is kept with its reason for
//! `check`, `/config_dump` and Events.

use std::{
    collections::BTreeMap,
    sync::{Arc, PoisonError, RwLock},
};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde::Serialize;

/// The label that opts a namespace or a pod in (`ambient`) or a pod out (`none`).
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
pub const AMBIENT: &str = "ambient";
pub const NONE: &str = "none";
/// Containers of sidecar meshes: their proxies take ports 15001/15008 in the pod's namespace.
pub const SIDECAR_PROXIES: [&str; 2] = ["istio-proxy", "linkerd-proxy"];
/// Istio's injector marks injected pods with it (Istio's own sidecar test).
const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
/// The agent's namespace when neither the flag nor `POD_NAMESPACE` says otherwise.
pub const DEFAULT_AGENT_NAMESPACE: &str = "mtls-system";

/// The namespaces that are never enrolled besides `kube-system`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The agent's own namespace (`--agent-namespace`, from `POD_NAMESPACE`).
    pub agent_namespace: String,
    /// The CA's namespace (`--ca-namespace`, default the agent's).
    pub ca_namespace: String,
    /// Keep the decisions of this node's pods only (`None`: of every pod).
    pub node: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            agent_namespace: DEFAULT_AGENT_NAMESPACE.into(),
            ca_namespace: DEFAULT_AGENT_NAMESPACE.into(),
            node: None,
        }
    }
}

/// Whether a pod is in the mesh, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "View")]
pub enum Membership {
    /// `by`: the label that put it in, e.g. `namespace shop label istio.io/dataplane-mode=ambient`.
    In { by: String },
    /// `opted_in`: a label asked for it, yet it is out (a protected namespace, a sidecar, the
    /// host network): worth an Event on the pod. Pods that simply did not opt in get none.
    Out { reason: String, opted_in: bool },
}

/// How the admin API shows a [`Membership`]: `{"inMesh": true, "by": ...}` or
/// `{"inMesh": false, "reason": ..., "optedIn": ...}`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct View {
    in_mesh: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    opted_in: Option<bool>,
}

impl From<Membership> for View {
    fn from(m: Membership) -> View {
        match m {
            Membership::In { by } => {
                View { in_mesh: true, by: Some(by), reason: None, opted_in: None }
            }
            Membership::Out { reason, opted_in } => {
                View { in_mesh: false, by: None, reason: Some(reason), opted_in: Some(opted_in) }
            }
        }
    }
}

impl Membership {
    pub fn is_in(&self) -> bool {
        matches!(self, Membership::In { .. })
    }
}

/// A pod's decision as the agent keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodMembership {
    /// `name.namespace`, as workloads are keyed.
    pub pod: String,
    pub name: String,
    pub namespace: String,
    pub node: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(flatten)]
    pub membership: Membership,
}

fn label<'a>(labels: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.as_ref()?.get(key).map(String::as_str)
}

/// The sidecar proxy the pod carries, if any: a container named as one, an init container
/// with `restartPolicy: Always` (a native sidecar) named as one, or Istio's injection mark.
fn sidecar(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref();
    let containers = spec.iter().flat_map(|s| s.containers.iter());
    if let Some(c) = containers.map(|c| c.name.as_str()).find(|n| SIDECAR_PROXIES.contains(n)) {
        return Some(format!("container {c}"));
    }
    let init = spec.iter().flat_map(|s| s.init_containers.iter().flatten());
    let native = init
        .filter(|c| c.restart_policy.as_deref() == Some("Always"))
        .map(|c| c.name.as_str())
        .find(|n| SIDECAR_PROXIES.contains(n));
    if let Some(c) = native {
        return Some(format!("native sidecar (init container with restartPolicy: Always) {c}"));
    }
    let annotations = pod.metadata.annotations.as_ref();
    annotations
        .filter(|a| a.contains_key(SIDECAR_STATUS))
        .map(|_| format!("annotation {SIDECAR_STATUS}"))
}

/// Decides whether `pod`, whose namespace object is `namespace` (if known), is in the mesh.
pub fn decide(pod: &Pod, namespace: Option<&Namespace>, s: &Settings) -> Membership {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let pod_mode = label(&pod.metadata.labels, DATAPLANE_MODE);
    let ns_mode = namespace.and_then(|n| label(&n.metadata.labels, DATAPLANE_MODE));
    // Istio's default enablement selectors: the pod's label, or the namespace's unless the
    // pod says `none`.
    let by = if pod_mode == Some(AMBIENT) {
        Some(format!("pod label {DATAPLANE_MODE}={AMBIENT}"))
    } else if ns_mode == Some(AMBIENT) && pod_mode != Some(NONE) {
        Some(format!("namespace {ns} label {DATAPLANE_MODE}={AMBIENT}"))
    } else {
        None
    };
    let opted_in = by.is_some();
    let out = |reason: String| Membership::Out { reason, opted_in };
    let protected = if ns == "kube-system" {
        Some("kube-system")
    } else if ns == s.agent_namespace {
        Some("the agent's namespace")
    } else if ns == s.ca_namespace {
        Some("the CA's namespace")
    } else {
        None
    };
    if let Some(what) = protected {
        return out(format!(
            "namespace {ns} ({what}) is never enrolled, whatever its labels: the mesh must not \
             depend on what it runs on"
        ));
    }
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return out("a host-network pod shares the node's network namespace: never enrolled".into());
    }
    let Some(by) = by else {
        let reason = if pod_mode == Some(NONE) {
            format!("pod label {DATAPLANE_MODE}={NONE} opts it out")
        } else {
            format!(
                "not opted in: neither namespace {ns} nor the pod has label \
                 {DATAPLANE_MODE}={AMBIENT}"
            )
        };
        return out(reason);
    };
    if let Some(proxy) = sidecar(pod) {
        return out(format!(
            "skipped: the pod has a sidecar proxy ({proxy}); its ports 15001/15008 clash with \
             the agent's, so it stays with its sidecar"
        ));
    }
    Membership::In { by }
}

/// The decisions about this node's pods, shared between the agent's loop and the admin API.
#[derive(Clone, Default)]
pub struct Registry(Arc<RwLock<BTreeMap<String, PodMembership>>>);

impl Registry {
    pub fn replace(&self, pods: impl IntoIterator<Item = PodMembership>) {
        let map = pods.into_iter().map(|p| (p.pod.clone(), p)).collect();
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = map;
    }

    /// The decision about `pod` (`name.namespace`).
    pub fn get(&self, pod: &str) -> Option<PodMembership> {
        self.0.read().unwrap_or_else(PoisonError::into_inner).get(pod).cloned()
    }

    pub fn list(&self) -> Vec<PodMembership> {
        self.0.read().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, labels: serde_json::Value, spec: serde_json::Value) -> Pod {
        let mut s = serde_json::json!({"nodeName": "n1", "containers": [{"name": "app"}]});
        if let (Some(s), Some(extra)) = (s.as_object_mut(), spec.as_object()) {
            s.extend(extra.clone());
        }
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": ns, "labels": labels},
            "spec": s,
        }))
        .unwrap()
    }

    fn ns(name: &str, labels: serde_json::Value) -> Namespace {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "labels": labels}}))
            .unwrap()
    }

    fn ambient() -> serde_json::Value {
        serde_json::json!({DATAPLANE_MODE: AMBIENT})
    }

    fn none() -> serde_json::Value {
        serde_json::json!({DATAPLANE_MODE: NONE})
    }

    fn reason(m: &Membership) -> (&str, bool) {
        match m {
            Membership::Out { reason, opted_in } => (reason.as_str(), *opted_in),
            Membership::In { by } => panic!("in the mesh by {by}"),
        }
    }

    #[test]
    fn nothing_is_in_unless_the_namespace_or_the_pod_opts_in() {
        let s = Settings::default();
        let plain = ns("shop", serde_json::json!({}));
        let m =
            decide(&pod("shop", serde_json::json!({}), serde_json::json!({})), Some(&plain), &s);
        let (r, opted) = reason(&m);
        assert!(r.contains("not opted in") && r.contains("namespace shop"), "{r}");
        assert!(!opted);
        // An unknown namespace object is an unlabelled one.
        let m = decide(&pod("shop", serde_json::json!({}), serde_json::json!({})), None, &s);
        assert!(!m.is_in());

        let labelled = ns("shop", ambient());
        let m =
            decide(&pod("shop", serde_json::json!({}), serde_json::json!({})), Some(&labelled), &s);
        let want = format!("namespace shop label {DATAPLANE_MODE}={AMBIENT}");
        assert_eq!(m, Membership::In { by: want });
        // The pod's own label, in an unlabelled namespace.
        let m = decide(&pod("shop", ambient(), serde_json::json!({})), Some(&plain), &s);
        assert_eq!(m, Membership::In { by: format!("pod label {DATAPLANE_MODE}={AMBIENT}") });
        // `none` on the pod opts it out of its namespace's choice; other values do not.
        let m = decide(&pod("shop", none(), serde_json::json!({})), Some(&labelled), &s);
        let (r, opted) = reason(&m);
        assert!(r.contains("=none opts it out") && !opted, "{r}");
        let other = serde_json::json!({DATAPLANE_MODE: "sidecar"});
        assert!(decide(&pod("shop", other, serde_json::json!({})), Some(&labelled), &s).is_in());
        // `none` on a namespace means nothing more than no label.
        let m =
            decide(&pod("shop", ambient(), serde_json::json!({})), Some(&ns("shop", none())), &s);
        assert!(m.is_in());
    }

    #[test]
    fn protected_namespaces_are_never_in_whatever_their_labels() {
        let s = Settings {
            agent_namespace: "mesh-agent".into(),
            ca_namespace: "pki".into(),
            node: None,
        };
        for (name, what) in [
            ("kube-system", "kube-system"),
            ("mesh-agent", "the agent's namespace"),
            ("pki", "the CA's namespace"),
        ] {
            let m = decide(
                &pod(name, ambient(), serde_json::json!({})),
                Some(&ns(name, ambient())),
                &s,
            );
            let (r, opted) = reason(&m);
            assert!(r.contains(&format!("namespace {name} ({what}) is never enrolled")), "{r}");
            assert!(opted, "{name}: opted in, so an Event says why not");
        }
        // The default: the agent's namespace is mtls-system, and the CA's the same.
        let d = Settings::default();
        let m = decide(&pod("mtls-system", ambient(), serde_json::json!({})), None, &d);
        assert!(!m.is_in());
    }

    #[test]
    fn sidecar_pods_and_native_sidecars_are_skipped_with_the_reason() {
        let s = Settings::default();
        let labelled = ns("shop", ambient());
        let cases = [
            (
                serde_json::json!({"containers": [{"name": "app"}, {"name": "istio-proxy"}]}),
                "container istio-proxy",
            ),
            (
                serde_json::json!({"initContainers": [
                    {"name": "linkerd-proxy", "restartPolicy": "Always"}]}),
                "native sidecar (init container with restartPolicy: Always) linkerd-proxy",
            ),
        ];
        for (spec, want) in cases {
            let m = decide(&pod("shop", serde_json::json!({}), spec), Some(&labelled), &s);
            let (r, opted) = reason(&m);
            assert!(r.contains(want) && r.contains("15001/15008"), "{r}");
            assert!(opted);
        }
        // An init container that runs to completion is no sidecar.
        let spec = serde_json::json!({"initContainers": [{"name": "istio-proxy"}]});
        assert!(decide(&pod("shop", serde_json::json!({}), spec), Some(&labelled), &s).is_in());
        // Istio's injection mark.
        let mut p = pod("shop", serde_json::json!({}), serde_json::json!({}));
        p.metadata.annotations = Some([(SIDECAR_STATUS.to_owned(), "{}".to_owned())].into());
        assert!(reason(&decide(&p, Some(&labelled), &s)).0.contains(SIDECAR_STATUS));
        // A sidecar pod that did not opt in is simply not opted in.
        let spec = serde_json::json!({"containers": [{"name": "istio-proxy"}]});
        let m = decide(&pod("shop", serde_json::json!({}), spec), None, &s);
        assert!(!reason(&m).1);
    }

    #[test]
    fn host_network_pods_are_out() {
        let s = Settings::default();
        let spec = serde_json::json!({"hostNetwork": true});
        let m = decide(&pod("shop", ambient(), spec), None, &s);
        assert!(reason(&m).0.contains("host-network"));
    }

    #[test]
    fn the_decision_serializes_with_its_reason() {
        let m = Membership::Out { reason: "why".into(), opted_in: false };
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            serde_json::json!({"inMesh": false, "reason": "why", "optedIn": false})
        );
        let m = Membership::In { by: "label".into() };
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            serde_json::json!({"inMesh": true, "by": "label"})
        );
    }
}
