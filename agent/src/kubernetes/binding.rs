//! Pods known from their binding to a node, before they run: the kubelet starts a pod's init
//! containers (and its sandbox) before the pod's IP reaches the API, so waiting for `Running`
//! with an IP leaves their first connections uncaptured. A pod bound to this node that is not
//! finished is enrolled as soon as its cgroup and sandbox exist, and held closed until then.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;

use super::convert::ConvertError;

/// A pod bound to a node, Pending or Running, not on the host network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundPod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub node: String,
    pub service_account: String,
    /// `spec.runtimeClassName`.
    pub runtime_class: Option<String>,
    /// `status.podIPs` (or `podIP`), empty until the API knows them.
    pub ips: Vec<IpAddr>,
    pub labels: std::collections::BTreeMap<String, String>,
}

impl BoundPod {
    /// The key a workload of this pod has (`name.namespace`).
    pub fn key(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }
}

/// The pod as a bound pod; `None` for pods not bound yet, finished (Succeeded, Failed), or on
/// the host network.
pub fn bound_pod(pod: &Pod) -> Result<Option<BoundPod>, ConvertError> {
    let meta = &pod.metadata;
    let object = match (&meta.namespace, &meta.name) {
        (Some(ns), Some(n)) => format!("Pod {ns}/{n}"),
        _ => "Pod (unnamed)".to_owned(),
    };
    let err = |message: &str| ConvertError { object: object.clone(), message: message.into() };
    let Some(spec) = &pod.spec else { return Ok(None) };
    if spec.host_network == Some(true) {
        return Ok(None);
    }
    let Some(node) = spec.node_name.clone().filter(|n| !n.is_empty()) else { return Ok(None) };
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    // No status yet: just bound, Pending in all but name.
    if !matches!(phase, None | Some("Pending") | Some("Running")) {
        return Ok(None);
    }
    let name =
        meta.name.clone().filter(|n| !n.is_empty()).ok_or_else(|| err("metadata.name: missing"))?;
    let namespace = meta
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| err("metadata.namespace: missing"))?;
    let uid =
        meta.uid.clone().filter(|u| !u.is_empty()).ok_or_else(|| err("metadata.uid: missing"))?;
    let mut ips = Vec::new();
    if let Some(status) = &pod.status {
        let listed = status.pod_ips.iter().flatten().map(|a| a.ip.as_str());
        for text in status.pod_ip.as_deref().into_iter().chain(listed) {
            // A malformed address is the workload conversion's to report; here it only
            // means the IP is not known.
            if let Ok(ip) = text.parse::<IpAddr>() {
                let ip = ip.to_canonical();
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
    }
    Ok(Some(BoundPod {
        name,
        namespace,
        uid,
        node,
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        runtime_class: spec.runtime_class_name.clone().filter(|r| !r.is_empty()),
        ips,
        labels: meta.labels.clone().unwrap_or_default(),
    }))
}

/// The pods of `node` the agent is to enroll (and hold closed until then): the one place that
/// decides it, so the mesh membership rule (opt-in labels) applies here too.
pub fn local_pods_to_enroll<'a>(
    bound: &'a [BoundPod],
    node: &'a str,
) -> impl Iterator<Item = &'a BoundPod> + 'a {
    bound.iter().filter(move |p| p.node == node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "metadata": {"name": "a", "namespace": "ns", "uid": "u-1"},
            "spec": {"nodeName": "n1", "containers": [{"name": "app"}]},
        })
    }

    #[test]
    fn a_pod_is_known_from_its_binding_before_its_ip() {
        let b = bound_pod(&pod(base())).unwrap().unwrap();
        assert_eq!((b.key(), b.node.as_str(), b.ips.len()), ("a.ns".into(), "n1", 0));
        let mut p = base();
        p["status"] = serde_json::json!({"phase": "Pending", "podIP": "10.0.0.7",
                                         "podIPs": [{"ip": "10.0.0.7"}, {"ip": "fd00::7"}]});
        p["spec"]["runtimeClassName"] = "kata".into();
        let b = bound_pod(&pod(p)).unwrap().unwrap();
        assert_eq!(b.ips, ["10.0.0.7", "fd00::7"].map(|a| a.parse::<IpAddr>().unwrap()));
        assert_eq!(b.runtime_class.as_deref(), Some("kata"));
    }

    #[test]
    fn unbound_finished_and_host_network_pods_are_not_bound_pods() {
        let mut unbound = base();
        unbound["spec"]["nodeName"] = serde_json::Value::Null;
        assert_eq!(bound_pod(&pod(unbound)).unwrap(), None);
        let mut done = base();
        done["status"] = serde_json::json!({"phase": "Succeeded"});
        assert_eq!(bound_pod(&pod(done)).unwrap(), None);
        let mut host = base();
        host["spec"]["hostNetwork"] = true.into();
        assert_eq!(bound_pod(&pod(host)).unwrap(), None);
        let mut no_uid = base();
        no_uid["metadata"]["uid"] = serde_json::Value::Null;
        let e = bound_pod(&pod(no_uid)).unwrap_err().to_string();
        assert_eq!(e, "Pod ns/a: metadata.uid: missing");
    }

    #[test]
    fn only_this_nodes_pods_are_enrolled_here() {
        let a = bound_pod(&pod(base())).unwrap().unwrap();
        let mut other = a.clone();
        other.node = "n2".into();
        let all = [a, other];
        let keys: Vec<&str> = local_pods_to_enroll(&all, "n1").map(|p| p.node.as_str()).collect();
        assert_eq!(keys, ["n1"]);
    }
}
