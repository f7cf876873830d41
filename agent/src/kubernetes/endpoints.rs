//! A Service's EndpointSlices into its endpoints per service port, read as kube-proxy reads
//! them (`pkg/proxy/endpointslicecache.go` in kubernetes): a slice port serves the service port
//! of the same *name* and protocol, at the slice's port number (so named target ports need no
//! pod); a port without a name or number is ignored; each endpoint counts by its first
//! address; `ready` and `serving` default to true, `terminating` to false; `FQDN` slices are
//! not proxied. Which of them take traffic is [`crate::services::usable`]'s decision.

use std::net::IpAddr;

use super::{convert::ConvertError, slice::Slice};
use crate::workloads::{Service, SliceEndpoint};

/// Most (service port, endpoint) entries one Service gets: slices are written by tenants
/// (a selector-less Service's by hand), and every node's agent keeps them, so one Service must
/// not cost unbounded memory or time. Kubernetes' own bounds (1,000 endpoints and 100 ports per
/// slice) still allow far more than any Service of a real cluster uses through one VIP.
pub const MAX_SERVICE_ENTRIES: usize = 20_000;
/// Most invalid entries reported per Service (the rest are left out silently).
const MAX_ERRORS: usize = 16;

/// The endpoints `slices` give `svc`'s ports, and the slice entries left out as invalid.
pub fn of_service(svc: &Service, slices: &[&Slice]) -> (Vec<SliceEndpoint>, Vec<ConvertError>) {
    let mut endpoints = Vec::new();
    let mut errors = Vec::new();
    for slice in slices {
        let object = format!("EndpointSlice {}/{}", svc.namespace, slice.name);
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        for p in slice.ports.iter().flatten() {
            let (Some(name), Some(number)) = (&p.name, p.port) else { continue };
            if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
                continue;
            }
            let Some(number) = u16::try_from(number).ok().filter(|n| *n != 0) else { continue };
            // Service ports are TCP here already; an unnamed one is the name "".
            let served = svc.ports.iter().filter(|sp| sp.name.as_deref().unwrap_or("") == name);
            for sp in served {
                for (i, e) in slice.endpoints.iter().enumerate() {
                    if endpoints.len() >= MAX_SERVICE_ENTRIES {
                        errors.push(ConvertError {
                            object: format!("Service {}/{}", svc.namespace, svc.name),
                            message: format!(
                                "more than {MAX_SERVICE_ENTRIES} (port, endpoint) entries in its \
                                 EndpointSlices: the rest are left out"
                            ),
                        });
                        return (endpoints, errors);
                    }
                    let Some(text) = e.address.as_deref() else { continue };
                    let address = match endpoint_address(text) {
                        Ok(a) => a,
                        Err(why) => {
                            let message = format!("endpoints[{i}].addresses[0]: {why}");
                            let new = !errors.iter().any(|e: &ConvertError| e.message == message);
                            if new && errors.len() < MAX_ERRORS {
                                errors.push(ConvertError { object: object.clone(), message });
                            }
                            continue;
                        }
                    };
                    endpoints.push(SliceEndpoint {
                        service_port: sp.port,
                        address,
                        port: number,
                        node_name: e.node_name.as_ref().filter(|n| !n.is_empty()).cloned(),
                        ready: e.ready.unwrap_or(true),
                        serving: e.serving.unwrap_or(true),
                        terminating: e.terminating.unwrap_or(false),
                    });
                }
            }
        }
    }
    // Kept for as long as the service is: without the doubling's spare room.
    endpoints.shrink_to_fit();
    (endpoints, errors)
}

/// An endpoint address the API server would have accepted: a unicast address that is not
/// loopback or link-local. Checked again here because the agent dials it from inside the
/// client pod, where a loopback endpoint would reach the pod's own ports.
fn endpoint_address(text: &str) -> Result<IpAddr, String> {
    let ip = text.parse::<IpAddr>().map_err(|_| format!("invalid IP address {text:?}"))?;
    let ip = ip.to_canonical();
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || link_local {
        return Err(format!("{text} is not allowed (loopback, link-local or not unicast)"));
    }
    Ok(ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::ServicePort;

    fn svc(ports: &[(Option<&str>, u16)]) -> Service {
        Service {
            name: "kubernetes".into(),
            namespace: "default".into(),
            vip: Some("10.96.0.1".parse().unwrap()),
            selector: Default::default(),
            ports: ports
                .iter()
                .map(|(name, port)| ServicePort {
                    name: name.map(str::to_owned),
                    port: *port,
                    target_port: *port,
                })
                .collect(),
            endpoints: Some(vec![]),
            internal_traffic_local: false,
            other_vips: vec![],
        }
    }

    fn slice(json: serde_json::Value) -> Slice {
        let s: k8s_openapi::api::discovery::v1::EndpointSlice =
            serde_json::from_value(json).unwrap();
        s.into()
    }

    #[test]
    fn a_services_entries_are_bounded_and_the_excess_is_reported() {
        // A tenant's slices, many ports times many endpoints: bounded, with one error.
        let ports: Vec<(Option<&str>, u16)> = vec![(Some("a"), 1), (Some("b"), 2), (Some("c"), 3)];
        let addresses: Vec<serde_json::Value> = (0..MAX_SERVICE_ENTRIES as u32 / 2)
            .map(|i| serde_json::json!({"addresses": [std::net::Ipv4Addr::from(0x0a00_0001 + i).to_string()]}))
            .collect();
        let s = slice(serde_json::json!({
            "metadata": {"name": "big", "namespace": "default"},
            "addressType": "IPv4",
            "ports": [{"name": "a", "port": 1}, {"name": "b", "port": 2}, {"name": "c", "port": 3}],
            "endpoints": addresses,
        }));
        let (endpoints, errors) = of_service(&svc(&ports), &[&s]);
        assert_eq!(endpoints.len(), MAX_SERVICE_ENTRIES);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].to_string().contains("the rest are left out"), "{}", errors[0]);
    }

    #[test]
    fn slice_ports_map_to_service_ports_by_name_with_their_conditions() {
        let s = slice(serde_json::json!({
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "addressType": "IPv4",
            "ports": [{"name": "https", "port": 6443, "protocol": "TCP"},
                      {"name": "dns", "port": 53, "protocol": "UDP"},
                      {"port": 9999}],
            "endpoints": [
                {"addresses": ["192.0.2.1", "192.0.2.2"], "nodeName": "n1"},
                {"addresses": ["192.0.2.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": []},
            ],
        }));
        let (eps, errors) = of_service(&svc(&[(Some("https"), 443), (Some("dns"), 53)]), &[&s]);
        assert!(errors.is_empty(), "{errors:?}");
        let got: Vec<String> = eps
            .iter()
            .map(|e| {
                let n = e.node_name.as_deref().unwrap_or("-");
                let c = (e.ready, e.serving, e.terminating);
                format!("{} {}:{} {n} {c:?}", e.service_port, e.address, e.port)
            })
            .collect();
        assert_eq!(
            got,
            [
                "443 192.0.2.1:6443 n1 (true, true, false)",
                "443 192.0.2.3:6443 - (false, true, true)",
            ]
        );
    }

    #[test]
    fn an_unnamed_service_port_takes_the_slice_port_named_empty() {
        let s = slice(serde_json::json!({
            "metadata": {"name": "web-x", "namespace": "default"},
            "addressType": "IPv6",
            "ports": [{"name": "", "port": 8080}],
            "endpoints": [{"addresses": ["fd00::7"]}],
        }));
        let (eps, _) = of_service(&svc(&[(None, 80)]), &[&s]);
        assert_eq!(eps.len(), 1);
        assert_eq!((eps[0].service_port, eps[0].port), (80, 8080));
    }

    #[test]
    fn fqdn_slices_are_ignored_and_bad_addresses_named() {
        let fqdn = slice(serde_json::json!({
            "metadata": {"name": "f", "namespace": "default"},
            "addressType": "FQDN",
            "ports": [{"name": "https", "port": 443}],
            "endpoints": [{"addresses": ["example.com"]}],
        }));
        let bad = slice(serde_json::json!({
            "metadata": {"name": "b", "namespace": "default"},
            "addressType": "IPv4",
            "ports": [{"name": "https", "port": 443}],
            "endpoints": [{"addresses": ["192.0.2.1"]}, {"addresses": ["192.0.2.300"]},
                          {"addresses": ["127.0.0.1"]}, {"addresses": ["169.254.169.254"]},
                          {"addresses": ["::ffff:127.0.0.2"]}],
        }));
        let (eps, errors) = of_service(&svc(&[(Some("https"), 443)]), &[&fqdn, &bad]);
        assert_eq!(eps.len(), 1, "the good endpoint stays");
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let not_allowed = "is not allowed (loopback, link-local or not unicast)";
        assert_eq!(
            errors,
            [
                "EndpointSlice default/b: endpoints[1].addresses[0]: invalid IP address \"192.0.2.300\"".to_owned(),
                format!("EndpointSlice default/b: endpoints[2].addresses[0]: 127.0.0.1 {not_allowed}"),
                format!("EndpointSlice default/b: endpoints[3].addresses[0]: 169.254.169.254 {not_allowed}"),
                format!("EndpointSlice default/b: endpoints[4].addresses[0]: ::ffff:127.0.0.2 {not_allowed}"),
            ]
        );
    }
}
