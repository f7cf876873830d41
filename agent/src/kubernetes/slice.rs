//! An EndpointSlice as the feed keeps it: what [`super::endpoints::of_service`],
//! [`super::convert::service`] and the builder read, and nothing else. A cluster has one
//! endpoint per serving pod; the API's `Endpoint` is a few hundred bytes before its strings
//! (target reference, hints, zone, topology), this one a few dozen, its node name shared.

use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use kube::ResourceExt;

use super::{intern::Interner, watch::SERVICE_NAME_LABEL};
use crate::workloads::shared::Str;

#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    pub name: String,
    pub namespace: Option<String>,
    /// Its `kubernetes.io/service-name` label.
    pub service: Option<String>,
    pub address_type: String,
    pub ports: Option<Vec<EndpointPort>>,
    pub endpoints: Vec<Entry>,
}

/// One endpoint: its first address (the only one kube-proxy uses) and its conditions.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub address: Option<Str>,
    pub node_name: Option<Str>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

impl Slice {
    /// What the feed keeps of `slice`, node names shared through `interner`.
    pub fn keep(slice: EndpointSlice, interner: &mut Interner) -> Slice {
        let service = slice.labels().get(SERVICE_NAME_LABEL).cloned();
        // Into a new vector, not `collect`: collecting an owning iterator reuses the source's
        // allocation, and that is sized for the API's endpoints (about 370 bytes each, ten
        // times what is kept): 56 MB of 10,000 slices at 150,000 pods, by heaptrack.
        let mut endpoints = Vec::with_capacity(slice.endpoints.len());
        endpoints.extend(slice.endpoints.into_iter().map(|e| {
            let c = e.conditions.unwrap_or_default();
            Entry {
                address: e.addresses.into_iter().next().map(Str::from),
                node_name: e.node_name.map(|n| interner.str(&n)),
                ready: c.ready,
                serving: c.serving,
                terminating: c.terminating,
            }
        }));
        let ports = slice.ports.map(|ports| {
            ports.into_iter().map(|p| EndpointPort { app_protocol: None, ..p }).collect()
        });
        Slice {
            name: slice.metadata.name.clone().unwrap_or_default(),
            service,
            namespace: slice.metadata.namespace,
            address_type: slice.address_type,
            ports,
            endpoints,
        }
    }
}

impl From<EndpointSlice> for Slice {
    fn from(slice: EndpointSlice) -> Slice {
        Slice::keep(slice, &mut Interner::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_keeps_the_first_address_conditions_node_and_ports() {
        let s: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-x", "namespace": "ns",
                         "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}],
            "endpoints": [
                {"addresses": ["10.0.0.1", "10.0.0.2"], "nodeName": "n1",
                 "conditions": {"ready": false},
                 "targetRef": {"kind": "Pod", "name": "web-1", "uid": "u"}, "zone": "z"},
                {"addresses": [], "nodeName": "n1"},
            ],
        }))
        .unwrap();
        let mut interner = Interner::default();
        let kept = Slice::keep(s, &mut interner);
        assert_eq!((kept.name.as_str(), kept.namespace.as_deref()), ("web-x", Some("ns")));
        assert_eq!(kept.service.as_deref(), Some("web"));
        let e = &kept.endpoints;
        // Only what is kept is allocated, not room for the API's much larger endpoints.
        assert_eq!(e.capacity(), e.len());
        assert_eq!(e[0].address.as_deref(), Some("10.0.0.1"));
        assert_eq!((e[0].ready, e[0].serving), (Some(false), None));
        assert_eq!(e[1].address, None);
        let (a, b) = (e[0].node_name.as_ref().unwrap(), e[1].node_name.as_ref().unwrap());
        assert!(Str::ptr_eq(a, b), "one node name");
        let ports = kept.ports.unwrap_or_default();
        assert_eq!((ports[0].name.as_deref(), ports[0].port), (Some("http"), Some(8080)));
    }
}
