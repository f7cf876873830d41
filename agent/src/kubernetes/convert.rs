//! API objects into the agent's own model: Pods into [`Workload`]s, Services (with their
//! EndpointSlices for named target ports) into [`Service`]s, and the Istio policy kinds into
//! the YAML the policy parser reads, so the validation and precedence rules are the file
//! mode's.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use k8s_openapi::{
    api::core::v1::{Container, Pod, PodSpec, Service as KubeService},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    core::{ApiResource, DynamicObject},
    ResourceExt,
};

use super::slice::Slice;
use crate::workloads::{Labels, Service, ServicePort, Workload};

/// An object that could not be used, named, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {message}")]
pub struct ConvertError {
    /// `Pod namespace/name`, `Service namespace/name`, ...
    pub object: String,
    pub message: String,
}

fn named(kind: &str, ns: Option<&str>, name: Option<&str>) -> String {
    match (ns, name) {
        (Some(ns), Some(name)) => format!("{kind} {ns}/{name}"),
        (None, Some(name)) => format!("{kind} {name}"),
        _ => format!("{kind} (unnamed)"),
    }
}

/// The pod as a workload; `None` for pods that are never workloads: host-network pods (they
/// share the node's address and namespace) and pods that are not running or have no IP yet.
pub fn workload(pod: &Pod) -> Result<Option<Workload>, ConvertError> {
    let meta = &pod.metadata;
    let err = |message: String| ConvertError {
        object: named("Pod", meta.namespace.as_deref(), meta.name.as_deref()),
        message,
    };
    let Some(spec) = &pod.spec else { return Err(err("no spec".into())) };
    if spec.host_network == Some(true) {
        return Ok(None);
    }
    let Some(status) = &pod.status else { return Ok(None) };
    if status.phase.as_deref() != Some("Running") {
        return Ok(None);
    }
    let Some(ip) = status.pod_ip.as_deref().filter(|ip| !ip.is_empty()) else { return Ok(None) };
    let ip: IpAddr =
        ip.parse().map_err(|_| err(format!("status.podIP: invalid IP address {ip:?}")))?;
    let ip = ip.to_canonical();
    // Dual-stack pods have one address per family in `podIPs` (`podIP` is its first).
    let mut listed = Vec::new();
    for (i, a) in status.pod_ips.iter().flatten().enumerate() {
        let text = a.ip.as_str();
        let a: IpAddr = text
            .parse()
            .map_err(|_| err(format!("status.podIPs[{i}].ip: invalid IP address {text:?}")))?;
        listed.push(a.to_canonical());
    }
    let name = meta.name.clone().filter(|n| !n.is_empty());
    let name = name.ok_or_else(|| err("metadata.name: missing".into()))?;
    let namespace = meta.namespace.clone().filter(|n| !n.is_empty());
    let namespace = namespace.ok_or_else(|| err("metadata.namespace: missing".into()))?;
    let node = spec.node_name.clone().filter(|n| !n.is_empty());
    let node = node.ok_or_else(|| err("spec.nodeName: missing on a running pod".into()))?;
    let uid = meta.uid.clone().filter(|u| !u.is_empty());
    let uid = uid.ok_or_else(|| err("metadata.uid: missing".into()))?;
    let service_account = spec
        .service_account_name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    Ok(Some(Workload {
        name: name.into(),
        namespace: namespace.into(),
        service_account: service_account.into(),
        labels: meta.labels.as_ref().map(Labels::from).unwrap_or_default(),
        ips: Workload::all_addresses(ip, listed),
        ip,
        node: node.into(),
        netns: None,
        probe_ports: probe_ports(spec),
        uid: Some(uid.into()),
    }))
}

/// The ports the kubelet probes (HTTP, TCP and gRPC probes of every container), with named
/// ports resolved through the container's ports.
fn probe_ports(spec: &PodSpec) -> Vec<u16> {
    let init = spec.init_containers.iter().flatten();
    let mut ports = Vec::new();
    for c in spec.containers.iter().chain(init) {
        let probes = [&c.liveness_probe, &c.readiness_probe, &c.startup_probe];
        for p in probes.into_iter().flatten() {
            let http = p.http_get.as_ref().map(|h| &h.port);
            let tcp = p.tcp_socket.as_ref().map(|t| &t.port);
            for port in http.into_iter().chain(tcp) {
                ports.extend(container_port(c, port));
            }
            if let Some(g) = &p.grpc {
                ports.extend(u16::try_from(g.port).ok().filter(|p| *p != 0));
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// A numeric port, or the number of the container's port with that name.
fn container_port(c: &Container, port: &IntOrString) -> Option<u16> {
    let n = match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => {
            let ports = c.ports.iter().flatten();
            ports.filter(|p| p.name.as_deref() == Some(name)).map(|p| p.container_port).next()?
        }
    };
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// The service's TCP ports with their target ports. A named target port is resolved through
/// the service's EndpointSlices (they carry the number per service port name), else through
/// the selected pods' container ports; a port that resolves nowhere is left out.
pub fn service(
    svc: &KubeService,
    slices: &[&Slice],
    pods: &[&Pod],
) -> Result<Service, ConvertError> {
    let meta = &svc.metadata;
    let err = |message: String| ConvertError {
        object: named("Service", meta.namespace.as_deref(), meta.name.as_deref()),
        message,
    };
    let name = meta.name.clone().filter(|n| !n.is_empty());
    let name = name.ok_or_else(|| err("metadata.name: missing".into()))?;
    let namespace = meta.namespace.clone().filter(|n| !n.is_empty());
    let namespace = namespace.ok_or_else(|| err("metadata.namespace: missing".into()))?;
    let Some(spec) = &svc.spec else { return Err(err("no spec".into())) };
    let vip = match spec.cluster_ip.as_deref() {
        None | Some("") | Some("None") => None,
        Some(ip) => Some(
            ip.parse::<IpAddr>()
                .map_err(|_| err(format!("spec.clusterIP: invalid IP address {ip:?}")))?
                .to_canonical(),
        ),
    };
    // Dual-stack: `clusterIPs` is `clusterIP` first, then the other family's VIP.
    let mut other_vips = Vec::new();
    for (i, ip) in spec.cluster_ips.iter().flatten().enumerate() {
        let Ok(ip) = ip.parse::<IpAddr>() else {
            return Err(err(format!("spec.clusterIPs[{i}]: invalid IP address {ip:?}")));
        };
        let ip = ip.to_canonical();
        if vip.is_some() && Some(ip) != vip && !other_vips.contains(&ip) {
            other_vips.push(ip);
        }
    }
    let selector: BTreeMap<String, String> = spec.selector.clone().unwrap_or_default();
    let mut ports = Vec::new();
    for (i, sp) in spec.ports.iter().flatten().enumerate() {
        if sp.protocol.as_deref().is_some_and(|p| p != "TCP") {
            continue;
        }
        let port = u16::try_from(sp.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| err(format!("spec.ports[{i}].port: {} is not a port", sp.port)))?;
        let target = match &sp.target_port {
            None => Some(port),
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok().filter(|p| *p != 0),
            Some(IntOrString::String(target)) => {
                let from_slices = slices
                    .iter()
                    .flat_map(|s| s.ports.iter().flatten())
                    .find(|p| p.name == sp.name)
                    .and_then(|p| p.port);
                let from_pods = || {
                    let selected = pods.iter().filter(|p| {
                        p.metadata.namespace.as_deref() == Some(namespace.as_str())
                            && !selector.is_empty()
                            && selector.iter().all(|(k, v)| p.labels().get(k) == Some(v))
                    });
                    selected
                        .flat_map(|p| p.spec.iter().flat_map(|s| s.containers.iter()))
                        .find_map(|c| container_port(c, &IntOrString::String(target.clone())))
                };
                from_slices.and_then(|n| u16::try_from(n).ok()).or_else(from_pods)
            }
        };
        let Some(target_port) = target else {
            tracing::debug!(service = %format!("{namespace}/{name}"), port, "target port unresolved; left out");
            continue;
        };
        ports.push(ServicePort { name: sp.name.clone(), port, target_port });
    }
    // Which endpoints serve the ports is the EndpointSlices' say (`endpoints::of_service`).
    let internal_traffic_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    Ok(Service {
        name,
        namespace,
        vip,
        selector,
        ports,
        endpoints: Some(Vec::new()),
        internal_traffic_local,
        other_vips,
    })
}

/// A policy object as one YAML document for the policy parser, with the origin its messages
/// carry: `kubernetes:<plural>/<namespace>/<name>`.
pub fn policy_document(
    obj: &DynamicObject,
    ar: &ApiResource,
) -> Result<(String, PathBuf), ConvertError> {
    let meta = &obj.metadata;
    let object = named(&ar.kind, meta.namespace.as_deref(), meta.name.as_deref());
    let origin = match (&meta.namespace, &meta.name) {
        (Some(ns), Some(name)) => format!("kubernetes:{}/{ns}/{name}", ar.plural),
        (None, Some(name)) => format!("kubernetes:{}/{name}", ar.plural),
        _ => format!("kubernetes:{}/(unnamed)", ar.plural),
    };
    let err = |message: String| ConvertError { object: object.clone(), message };
    // Only what the parser reads: the API server's bookkeeping (managedFields, uid, ...) and
    // status stay out.
    let mut m = serde_json::Map::new();
    for (key, value) in [
        ("name", meta.name.as_ref().map(|n| serde_json::json!(n))),
        ("namespace", meta.namespace.as_ref().map(|n| serde_json::json!(n))),
        (
            "creationTimestamp",
            meta.creation_timestamp
                .as_ref()
                .map(serde_json::to_value)
                .transpose()
                .map_err(|e| err(format!("metadata.creationTimestamp: {e}")))?,
        ),
    ] {
        if let Some(v) = value {
            m.insert(key.into(), v);
        }
    }
    let mut doc = serde_json::Map::new();
    doc.insert("apiVersion".into(), ar.api_version.clone().into());
    doc.insert("kind".into(), ar.kind.clone().into());
    doc.insert("metadata".into(), m.into());
    if let Some(spec) = obj.data.get("spec") {
        doc.insert("spec".into(), spec.clone());
    }
    let yaml = serde_yaml::to_string(&serde_json::Value::Object(doc))
        .map_err(|e| err(format!("cannot render as YAML: {e}")))?;
    Ok((yaml, PathBuf::from(origin)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn running(name: &str, extra_spec: serde_json::Value) -> serde_json::Value {
        let mut spec = serde_json::json!({"nodeName": "n1", "containers": [{"name": "app"}]});
        if let (Some(s), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
            s.extend(extra.clone());
        }
        serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "uid": "u-1", "labels": {"app": name}},
            "spec": spec,
            "status": {"phase": "Running", "podIP": "10.0.0.7"},
        })
    }

    #[test]
    fn a_running_pod_becomes_a_workload() {
        let w = workload(&pod(running("a", serde_json::json!({})))).unwrap().unwrap();
        assert_eq!(w.key(), "a.ns");
        assert_eq!(w.service_account, "default");
        assert_eq!(w.ip, "10.0.0.7".parse::<IpAddr>().unwrap());
        assert_eq!(w.node, "n1");
        assert_eq!(w.uid.as_deref(), Some("u-1"));
        assert_eq!(w.labels.get("app"), Some("a"));
        assert_eq!(w.netns, None);
    }

    #[test]
    fn a_dual_stack_pod_has_every_address_of_pod_ips() {
        let mut json = running("a", serde_json::json!({}));
        json["status"]["podIPs"] = serde_json::json!([{"ip": "10.0.0.7"}, {"ip": "fd00::7"}]);
        let w = workload(&pod(json.clone())).unwrap().unwrap();
        assert_eq!(w.ip, "10.0.0.7".parse::<IpAddr>().unwrap());
        assert_eq!(w.ips, ["10.0.0.7", "fd00::7"].map(|a| a.parse::<IpAddr>().unwrap()).to_vec());
        json["status"]["podIPs"] = serde_json::json!([{"ip": "10.0.0.7"}, {"ip": "fd00::zz"}]);
        let e = workload(&pod(json)).unwrap_err().to_string();
        assert!(e.contains("status.podIPs[1].ip: invalid IP address \"fd00::zz\""), "{e}");
        // Without podIPs: podIP alone.
        let w = workload(&pod(running("b", serde_json::json!({})))).unwrap().unwrap();
        assert_eq!(w.ips, vec![w.ip]);
    }

    #[test]
    fn host_network_pending_and_addressless_pods_are_not_workloads() {
        let host = pod(running("h", serde_json::json!({"hostNetwork": true})));
        assert_eq!(workload(&host).unwrap(), None);
        let mut pending = running("p", serde_json::json!({}));
        pending["status"]["phase"] = "Pending".into();
        assert_eq!(workload(&pod(pending)).unwrap(), None);
        let mut no_ip = running("p", serde_json::json!({}));
        no_ip["status"]["podIP"] = serde_json::Value::Null;
        assert_eq!(workload(&pod(no_ip)).unwrap(), None);
    }

    #[test]
    fn broken_pods_are_errors_naming_the_pod() {
        let mut bad_ip = running("b", serde_json::json!({}));
        bad_ip["status"]["podIP"] = "10.0.0.300".into();
        let e = workload(&pod(bad_ip)).unwrap_err().to_string();
        assert_eq!(e, "Pod ns/b: status.podIP: invalid IP address \"10.0.0.300\"");
        let mut no_uid = running("c", serde_json::json!({}));
        no_uid["metadata"]["uid"] = serde_json::Value::Null;
        let e = workload(&pod(no_uid)).unwrap_err().to_string();
        assert!(e.contains("Pod ns/c") && e.contains("uid"), "{e}");
        let e = workload(&Pod::default()).unwrap_err().to_string();
        assert!(e.contains("Pod (unnamed)"), "{e}");
    }

    #[test]
    fn probe_ports_numeric_and_named() {
        let spec = serde_json::json!({
            "serviceAccountName": "sa",
            "containers": [{
                "name": "app",
                "ports": [{"name": "http", "containerPort": 8080}],
                "livenessProbe": {"httpGet": {"port": "http", "path": "/"}},
                "readinessProbe": {"tcpSocket": {"port": 9000}},
                "startupProbe": {"grpc": {"port": 9090}},
            }, {
                "name": "other",
                "livenessProbe": {"httpGet": {"port": "nosuch"}},
            }],
        });
        let w = workload(&pod(running("a", spec))).unwrap().unwrap();
        assert_eq!(w.probe_ports, vec![8080, 9000, 9090]);
        assert_eq!(w.service_account, "sa");
    }

    #[test]
    fn service_ports_resolve_named_targets() {
        let svc: KubeService = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {
                "clusterIP": "10.96.0.10",
                "selector": {"app": "a"},
                "ports": [
                    {"name": "http", "port": 80, "targetPort": "web"},
                    {"name": "admin", "port": 81, "targetPort": "admin"},
                    {"name": "plain", "port": 82},
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "gone", "port": 83, "targetPort": "nowhere"},
                ],
            },
        }))
        .unwrap();
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-x", "namespace": "ns",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [],
            "ports": [{"name": "http", "port": 8080}],
        }))
        .unwrap();
        let mut p = running("a", serde_json::json!({}));
        p["spec"]["containers"][0]["ports"] =
            serde_json::json!([{"name": "admin", "containerPort": 7070}]);
        let p = pod(p);
        let s = service(&svc, &[&Slice::from(slice)], &[&p]).unwrap();
        assert_eq!(s.vip, Some("10.96.0.10".parse().unwrap()));
        let ports: Vec<(u16, u16)> = s.ports.iter().map(|p| (p.port, p.target_port)).collect();
        assert_eq!(ports, vec![(80, 8080), (81, 7070), (82, 82)]);
    }

    #[test]
    fn internal_traffic_policy_local_is_kept_and_endpoints_await_the_slices() {
        let svc = |policy: serde_json::Value| -> KubeService {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "s", "namespace": "ns"},
                "spec": {"clusterIP": "10.96.0.9", "internalTrafficPolicy": policy,
                         "ports": [{"port": 80}]},
            }))
            .unwrap()
        };
        let local = service(&svc("Local".into()), &[], &[]).unwrap();
        assert!(local.internal_traffic_local);
        // Kubernetes mode: slices are the only source of endpoints, none yet.
        assert_eq!(local.endpoints, Some(vec![]));
        assert!(!service(&svc("Cluster".into()), &[], &[]).unwrap().internal_traffic_local);
        assert!(!service(&svc(serde_json::Value::Null), &[], &[]).unwrap().internal_traffic_local);
    }

    #[test]
    fn headless_services_have_no_vip() {
        let svc: KubeService = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "h", "namespace": "ns"},
            "spec": {"clusterIP": "None", "ports": [{"port": 80}]},
        }))
        .unwrap();
        assert_eq!(service(&svc, &[], &[]).unwrap().vip, None);
    }

    #[test]
    fn a_dual_stack_service_has_a_vip_per_family() {
        let svc: KubeService = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "d", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.5", "fd00:96::5"],
                     "ports": [{"port": 80}]},
        }))
        .unwrap();
        let s = service(&svc, &[], &[]).unwrap();
        assert_eq!(s.vip, Some("10.96.0.5".parse().unwrap()));
        assert_eq!(s.other_vips, ["fd00:96::5".parse::<IpAddr>().unwrap()]);
        let mut bad = svc.clone();
        bad.spec.as_mut().unwrap().cluster_ips = Some(vec!["10.96.0.5".into(), "fd00::zz".into()]);
        let e = service(&bad, &[], &[]).unwrap_err().to_string();
        assert_eq!(e, "Service ns/d: spec.clusterIPs[1]: invalid IP address \"fd00::zz\"");
    }

    #[test]
    fn policies_keep_only_what_the_parser_reads() {
        let ar = ApiResource {
            group: "security.istio.io".into(),
            version: "v1".into(),
            api_version: "security.istio.io/v1".into(),
            kind: "PeerAuthentication".into(),
            plural: "peerauthentications".into(),
        };
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": "ns", "uid": "x",
                         "creationTimestamp": "2024-05-01T10:00:00Z",
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"mtls": {"mode": "STRICT"}},
            "status": {"x": 1},
        }))
        .unwrap();
        let (yaml, origin) = policy_document(&obj, &ar).unwrap();
        assert_eq!(origin, PathBuf::from("kubernetes:peerauthentications/ns/default"));
        let set = crate::policy::PolicySet::parse(&yaml, &origin).unwrap();
        assert_eq!(set.len(), 1);
        assert!(!yaml.contains("managedFields") && !yaml.contains("status"), "{yaml}");
    }
}
