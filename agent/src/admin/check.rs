//! `/check?pod=NAME.NAMESPACE`: is this pod's traffic encrypted, and which policy decided? The
//! answer behind `mtls-agent check`, in the shape of `istioctl experimental auth check`: the
//! pod's listeners (inbound) and the destinations it can reach (outbound).

use std::collections::BTreeMap;

use serde::Serialize;

use super::AdminState;
use crate::{
    kubernetes::membership::{Membership, PodMembership},
    policy::{Decision, Mode},
    procnet::{self, UdpListeners},
    tunnel::{
        connections::{ConnectionRecord, Direction},
        hbone::HBONE_PORT,
    },
    workloads::{Workload, WorkloadSet},
};

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckReport {
    pub pod: String,
    pub node: String,
    /// The node of the agent that answered.
    pub agent_node: String,
    pub ip: String,
    /// Whether this agent enrolled the pod (it is on this node and in the mesh).
    pub enrolled: bool,
    /// Why this node's pod is not enrolled (it is held closed and retried).
    pub enrollment_failure: Option<crate::enrollment::Failure>,
    /// Kubernetes mode, this node's pods: whether the pod is in the mesh, and why (the label
    /// that put it in, or why it is out).
    pub membership: Option<Membership>,
    /// Why the certificate columns cannot be answered here, in words (a pod of another node).
    pub note: Option<String>,
    pub identity: Option<String>,
    pub certificate_serial: Option<String>,
    pub certificate_expires: Option<String>,
    /// Which CA signed the certificate it presents.
    pub certificate_issuer: Option<String>,
    pub listeners: Vec<ListenerRow>,
    /// The pod's UDP listeners (pods this agent enrolled): the agent captures and enforces TCP
    /// only, so none of them is covered, whatever the policy says.
    pub udp_listeners: Vec<UdpListenerRow>,
    /// Why `udp_listeners` may be incomplete (the namespace could not be read, the list was
    /// cut), if it may.
    pub udp_note: Option<String>,
    pub outbound: Vec<OutboundRow>,
    /// What this agent saw of the pod's traffic, as opposed to what the policies say.
    pub observed: Vec<ObservedRow>,
    /// Policy sources that cannot be read now (Kubernetes mode): the modes above come from
    /// their last known policies.
    pub policy_sources_failing: Vec<String>,
}

/// Connections of a pod that this agent carried or saw accepted (live ones and its bounded
/// history of closed ones), for one direction and port: how many were mutual TLS and how many
/// crossed the network in plaintext.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ObservedRow {
    /// `inbound` or `outbound`.
    pub direction: String,
    /// Inbound: the pod's port. Outbound: the destination as the app dialled it.
    pub target: String,
    pub mtls: u64,
    pub plaintext: u64,
    /// Of those, still open.
    pub open: u64,
    /// The latest plaintext peer (inbound: its source; outbound: the endpoint), if any.
    pub last_plaintext_peer: Option<String>,
    #[serde(skip)]
    last_plaintext_id: u64,
}

/// Most outbound destinations listed per pod, busiest first.
const OBSERVED_OUTBOUND_ROWS: usize = 20;

/// Groups the connection records of `pod` by direction and port or destination.
fn observed(conns: &[ConnectionRecord], pod: &str) -> Vec<ObservedRow> {
    let mut rows: BTreeMap<(Direction, String), ObservedRow> = BTreeMap::new();
    for c in conns {
        let (target, peer) = match c.direction {
            Direction::Inbound if c.destination_pod.as_deref() == Some(pod) => {
                (c.destination.port().to_string(), c.source)
            }
            Direction::Outbound if c.source_pod.as_deref() == Some(pod) => {
                (c.original_destination.to_string(), c.destination)
            }
            _ => continue,
        };
        // A connection refused before any byte moved was not traffic.
        if c.error.is_some() && c.bytes_sent == 0 && c.bytes_received == 0 {
            continue;
        }
        let row =
            rows.entry((c.direction.clone(), target.clone())).or_insert_with(|| ObservedRow {
                direction: format!("{:?}", c.direction).to_lowercase(),
                target,
                mtls: 0,
                plaintext: 0,
                open: 0,
                last_plaintext_peer: None,
                last_plaintext_id: 0,
            });
        if c.mode == "mTLS" {
            row.mtls += 1;
        } else {
            row.plaintext += 1;
            // Ids grow as connections open: the highest is the latest.
            if c.id >= row.last_plaintext_id {
                row.last_plaintext_id = c.id;
                row.last_plaintext_peer = Some(peer.to_string());
            }
        }
        row.open += u64::from(c.open);
    }
    let (mut inbound, mut outbound): (Vec<_>, Vec<_>) =
        rows.into_values().partition(|r| r.direction == "inbound");
    inbound.sort_by_key(|r| r.target.parse::<u16>().unwrap_or_default());
    outbound.sort_by_key(|r| std::cmp::Reverse(r.mtls + r.plaintext));
    outbound.truncate(OBSERVED_OUTBOUND_ROWS);
    inbound.extend(outbound);
    inbound
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerRow {
    /// `IP_PORT`, `IP_*` for every port without its own rule; `[0]`/`[1]` for the mTLS and
    /// plaintext halves of a PERMISSIVE port, as istioctl shows them.
    pub listener: String,
    /// The certificate presented (the pod's SPIFFE id) or `none`.
    pub certificate: String,
    /// `yes (STRICT)`, `no (PERMISSIVE)`, ...
    pub mtls: String,
    pub rbac: String,
    pub mode: String,
    /// `namespace/name (level)` of the deciding policy, or `-`.
    pub decided_by: String,
    pub reason: String,
}

/// A UDP socket of the pod that takes datagrams from anyone.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UdpListenerRow {
    /// `UDP 0.0.0.0:5353`, `UDP [::]:5353`.
    pub listener: String,
    /// The bound address and port.
    pub address: String,
    /// Always false: no policy mode reaches UDP.
    pub covered: bool,
    /// `not covered (UDP is not captured; plaintext)`.
    pub mtls: String,
    pub reason: String,
}

/// Most UDP listeners listed per pod.
const UDP_ROWS: usize = 256;

fn udp_rows(listeners: &UdpListeners) -> (Vec<UdpListenerRow>, Option<String>) {
    let rows = listeners
        .addrs
        .iter()
        .take(UDP_ROWS)
        .map(|a| {
            let loopback = a.ip().is_loopback();
            UdpListenerRow {
                listener: format!("UDP {a}"),
                address: a.to_string(),
                covered: false,
                mtls: format!(
                    "not covered (UDP is not captured; plaintext{})",
                    if loopback { "; loopback only" } else { "" }
                ),
                reason: "the agent captures and enforces TCP only: UDP datagrams reach the app \
                         as sent, in plaintext, from any source, whatever the mode"
                    .into(),
            }
        })
        .collect();
    let more = listeners.addrs.len().saturating_sub(UDP_ROWS);
    let note = match (more, listeners.truncated) {
        (0, false) => None,
        (0, true) => Some("the pod has more UDP sockets than were read; more may exist".into()),
        (n, false) => Some(format!("{n} more UDP listeners not shown")),
        (n, true) => Some(format!("{n} more UDP listeners not shown, and more may exist")),
    };
    (rows, note)
}

/// The UDP listeners of an enrolled pod, read inside its namespace.
fn udp_of(state: &AdminState, pod: &str) -> (Vec<UdpListenerRow>, Option<String>) {
    let Some(netns) = state.mesh.netns.get(pod) else {
        return (Vec::new(), Some("the pod's network namespace is not open here".into()));
    };
    match procnet::udp_listeners(&netns) {
        Ok(l) => udp_rows(&l),
        Err(e) => (Vec::new(), Some(format!("UDP listeners unknown: {e}"))),
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboundRow {
    /// `service.namespace:port`.
    pub host_port: String,
    /// The certificate this pod presents there, or `none` (plaintext).
    pub certificate: String,
    /// The SPIFFE ids the server must present, or `none`.
    pub validate_peer_certificate: String,
    pub mode: String,
    pub decided_by: String,
    /// The endpoints a connection from this node may be sent to (mesh workloads or not).
    pub endpoints: Vec<OutboundEndpoint>,
}

/// One endpoint of a service port.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboundEndpoint {
    pub address: String,
    /// The mesh workload there; `None`: outside the mesh (plaintext).
    pub pod: Option<String>,
}

fn decided_by(d: &Decision) -> String {
    match (&d.decided_by, &d.level) {
        (Some(p), Some(l)) => format!("{p} ({l})"),
        (Some(p), None) => p.to_string(),
        _ => "-".into(),
    }
}

/// The report for `pod` (`name.namespace`), or `None` when no such workload exists and the
/// pod is not one of this node's pods out of the mesh.
pub fn check(state: &AdminState, pod: &str) -> Option<CheckReport> {
    let ws = state.mesh.workloads.borrow().clone();
    let ps = state.mesh.policies.borrow().clone();
    let member = state.membership.get(pod);
    let Some(w) = ws.workloads.iter().find(|w| w.key() == pod) else {
        return member.map(|m| outside(state, m));
    };
    let cert = state.mesh.certs.get(&w.key());
    let elsewhere = w.node != state.node;
    let enrollment_failure = if elsewhere { None } else { state.enrollment.get(&w.key()) };
    let enrolled = !elsewhere && cert.is_some() && enrollment_failure.is_none();
    let identity = state.mesh.identity_of(w).map(|id| id.to_string());
    // This agent holds no certificate of another node's pod; "none" would read as plaintext.
    let unknown = format!("unknown (pod on node {})", w.node);
    let presented = match (&cert, enrolled) {
        (Some(c), true) => c.spiffe_id().to_string(),
        _ if elsewhere => unknown.clone(),
        _ => "none".to_owned(),
    };

    let mut listeners = Vec::new();
    if enrolled {
        listeners.push(ListenerRow {
            listener: format!("{}_{HBONE_PORT}", w.ip),
            certificate: presented.clone(),
            mtls: "yes (HBONE tunnel)".into(),
            rbac: "no (none)".into(),
            mode: "STRICT".into(),
            decided_by: "-".into(),
            reason: "the agent's tunnel port accepts only mutual TLS".into(),
        });
    }
    let (default, ports) = ps.workload_modes(&ws, w);
    let mut rows: Vec<(String, Decision)> = vec![(format!("{}_*", w.ip), default)];
    let mut listed: Vec<u16> = ports.iter().map(|(p, _)| *p).collect();
    rows.extend(ports.into_iter().map(|(p, d)| (format!("{}_{p}", w.ip), d)));
    // Ports the workload serves through services, and its probe ports, get their own rows.
    for port in service_target_ports(&ws, w).into_iter().chain(w.probe_ports.iter().copied()) {
        if !listed.contains(&port) {
            listed.push(port);
            rows.push((format!("{}_{port}", w.ip), ps.decide(&ws, w, port)));
        }
    }
    for (listener, d) in rows {
        let by = decided_by(&d);
        let port = listener.rsplit_once('_').and_then(|(_, p)| p.parse::<u16>().ok());
        let rbac = crate::authz::summary(ps.authz_for(w), port);
        let (cert, plain) = match (enrolled, elsewhere) {
            (true, _) => (presented.as_str(), "none"),
            (false, true) => (unknown.as_str(), unknown.as_str()),
            (false, false) => ("none", "none"),
        };
        let row = |listener: String, certificate: &str, mtls: String| ListenerRow {
            listener,
            certificate: certificate.to_owned(),
            mtls,
            rbac: rbac.clone(),
            mode: d.mode.to_string(),
            decided_by: by.clone(),
            reason: d.reason.clone(),
        };
        match (d.mode, enrolled) {
            (Mode::Strict, true) => listeners.push(row(listener, cert, "yes (STRICT)".into())),
            (Mode::Permissive, true) => {
                listeners.push(row(format!("{listener}[0]"), cert, "yes (PERMISSIVE)".into()));
                listeners.push(row(format!("{listener}[1]"), plain, "no (PERMISSIVE)".into()));
            }
            (mode, _) if elsewhere => listeners.push(row(
                listener,
                plain,
                format!("{mode}, enforced by node {}'s agent", w.node),
            )),
            (mode, _) => listeners.push(row(listener, plain, format!("no ({mode})"))),
        }
    }

    let mut outbound = Vec::new();
    let table = state.mesh.services.table(&ws);
    for route in table.routes() {
        let mut peers: Vec<String> = Vec::new();
        let mut modes: Vec<String> = Vec::new();
        let mut deciders: Vec<String> = Vec::new();
        let mut endpoints = Vec::new();
        for b in &route.backends {
            let mesh = ws.by_ip(b.ip());
            let Some(e) = mesh else {
                // Outside the mesh: relayed in plaintext.
                let m = "PLAINTEXT (outside the mesh)".to_owned();
                if !modes.contains(&m) {
                    modes.push(m);
                }
                endpoints.push(OutboundEndpoint { address: b.to_string(), pod: None });
                continue;
            };
            endpoints.push(OutboundEndpoint { address: b.to_string(), pod: Some(e.key()) });
            let d = ps.decide(&ws, e, b.port());
            let m = d.mode.to_string();
            if !modes.contains(&m) {
                modes.push(m);
            }
            let by = decided_by(&d);
            if !deciders.contains(&by) {
                deciders.push(by);
            }
            if d.mode != Mode::Disable {
                if let Some(id) = state.mesh.identity_of(e).map(|i| i.to_string()) {
                    if !peers.contains(&id) {
                        peers.push(id);
                    }
                }
            }
        }
        let tunnelled = (enrolled || elsewhere) && !peers.is_empty();
        let none = if route.node_local { "no endpoints on this node" } else { "no endpoints" };
        let mut host_port = format!("{}:{}", route.service, route.port);
        // A dual-stack service's second VIP: the same port again, told apart by the address.
        if let Some(vip) =
            route.vip.filter(|_| outbound.iter().any(|o: &OutboundRow| o.host_port == host_port))
        {
            host_port = format!("{host_port} ({vip})");
        }
        outbound.push(OutboundRow {
            host_port,
            certificate: if tunnelled { presented.clone() } else { "none".into() },
            validate_peer_certificate: if tunnelled { peers.join(",") } else { "none".into() },
            mode: if endpoints.is_empty() { none.into() } else { modes.join(",") },
            decided_by: if deciders.is_empty() { "-".into() } else { deciders.join(",") },
            endpoints,
        });
    }

    let (udp_listeners, udp_note) =
        if enrolled { udp_of(state, &w.key()) } else { (Vec::new(), None) };
    let t = |s: std::time::SystemTime| humantime::format_rfc3339_seconds(s).to_string();
    Some(CheckReport {
        pod: w.key(),
        node: w.node.to_string(),
        agent_node: state.node.clone(),
        ip: w.ip.to_string(),
        enrolled,
        enrollment_failure,
        membership: member.map(|m| m.membership),
        note: if elsewhere {
            Some(format!(
                "{} runs on node {}, not on this agent's node {}: its certificate and listeners \
                 are with node {}'s agent (run mtls-agent check on that node)",
                w.key(),
                w.node,
                state.node,
                w.node
            ))
        } else {
            waiting_note(state, &w.key())
        },
        identity,
        certificate_issuer: cert.as_ref().map(|c| c.issued_by().to_owned()),
        certificate_serial: cert.as_ref().map(|c| c.serial().to_owned()),
        certificate_expires: cert.as_ref().map(|c| t(c.not_after())),
        listeners,
        udp_listeners,
        udp_note,
        outbound,
        observed: observed(&state.mesh.conns.snapshot(), &w.key()),
        policy_sources_failing: state.policy_sources.failing(),
    })
}

/// The report for a pod of this node that is no workload of the mesh: out of it (with the
/// reason), or in it but not running with an address yet.
fn outside(state: &AdminState, m: PodMembership) -> CheckReport {
    let note = match &m.membership {
        Membership::Out { reason, .. } => format!(
            "{} is not in the mesh: {reason}. The agent neither captures nor enforces its \
             traffic: its connections, and those to it, are plaintext",
            m.pod
        ),
        Membership::In { by } => format!(
            "{} is in the mesh ({by}) but not running with an address yet: not enrolled yet",
            m.pod
        ),
    };
    CheckReport {
        pod: m.pod,
        node: m.node,
        agent_node: state.node.clone(),
        ip: m.ip.unwrap_or_else(|| "-".into()),
        enrolled: false,
        enrollment_failure: None,
        policy_sources_failing: state.policy_sources.failing(),
        membership: Some(m.membership),
        note: Some(note),
        identity: None,
        certificate_serial: None,
        certificate_expires: None,
        certificate_issuer: None,
        listeners: Vec::new(),
        udp_listeners: Vec::new(),
        udp_note: None,
        outbound: Vec::new(),
        observed: Vec::new(),
    }
}

/// The target ports through which services reach `w`: by selector, and (Kubernetes mode) as
/// an endpoint of a service's slices, selector or not.
pub(super) fn service_target_ports(ws: &WorkloadSet, w: &Workload) -> Vec<u16> {
    let mut ports = Vec::new();
    for svc in ws.services_for(w) {
        for p in &svc.ports {
            if !ports.contains(&p.target_port) {
                ports.push(p.target_port);
            }
        }
    }
    let sliced = ws.services.iter().flat_map(|s| s.endpoints.iter().flatten());
    for e in sliced.filter(|e| w.has_ip(e.address)) {
        if !ports.contains(&e.port) {
            ports.push(e.port);
        }
    }
    ports
}

/// Why a pod of this node has no certificate yet, when it is waiting for its first one.
fn waiting_note(state: &AdminState, pod: &str) -> Option<String> {
    let p = state.mesh.certs.pending().into_iter().find(|p| p.workload == pod)?;
    let why = p
        .last_error
        .map_or_else(|| "asking the CA".to_owned(), |e| format!("the last request failed: {e}"));
    Some(format!(
        "waiting for its first certificate ({} since {}, {why}): its mesh traffic fails closed \
         until it comes",
        p.identity,
        humantime::format_rfc3339_seconds(p.since)
    ))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn rec(direction: Direction, src: &str, dst: &str, mode: &str, open: bool) -> ConnectionRecord {
        let addr = |a: &str| a.parse().unwrap_or_else(|e| panic!("{a}: {e}"));
        ConnectionRecord {
            id: 0,
            direction,
            source_pod: Some("a.ns".into()),
            source: addr(src),
            original_destination: addr(dst),
            destination: addr(dst),
            destination_pod: Some("b.ns".into()),
            mode: mode.into(),
            local_identity: None,
            peer_identity: None,
            tls: String::new(),
            policy: None,
            started_at: std::time::SystemTime::UNIX_EPOCH,
            bytes_sent: 0,
            bytes_received: 0,
            age_ms: None,
            duration_ms: None,
            open,
            error: None,
        }
    }

    #[test]
    fn udp_listeners_are_never_covered_loopback_is_named_and_a_long_list_is_cut() {
        let addrs = ["0.0.0.0:5353", "127.0.0.1:53", "[::]:5353"];
        let l = UdpListeners {
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            truncated: false,
        };
        let (rows, note) = udp_rows(&l);
        assert_eq!(note, None);
        let shown: Vec<(&str, &str)> =
            rows.iter().map(|r| (r.listener.as_str(), r.mtls.as_str())).collect();
        assert_eq!(
            shown,
            [
                ("UDP 0.0.0.0:5353", "not covered (UDP is not captured; plaintext)"),
                ("UDP 127.0.0.1:53", "not covered (UDP is not captured; plaintext; loopback only)"),
                ("UDP [::]:5353", "not covered (UDP is not captured; plaintext)"),
            ]
        );
        assert!(rows.iter().all(|r| !r.covered));
        let many = UdpListeners {
            addrs: (1..=300u16).map(|p| SocketAddr::from(([0, 0, 0, 0], p))).collect(),
            truncated: true,
        };
        let (rows, note) = udp_rows(&many);
        assert_eq!(rows.len(), UDP_ROWS);
        assert_eq!(note.as_deref(), Some("44 more UDP listeners not shown, and more may exist"));
        let many = UdpListeners { truncated: false, ..many };
        assert_eq!(udp_rows(&many).1.as_deref(), Some("44 more UDP listeners not shown"));
        let cut = UdpListeners { addrs: vec![], truncated: true };
        assert!(udp_rows(&cut).1.is_some_and(|n| n.contains("more may exist")));
    }

    #[test]
    fn observed_traffic_counts_mtls_and_plaintext_per_port_and_names_the_last_plaintext_peer() {
        let with_id = |id, r: ConnectionRecord| ConnectionRecord { id, ..r };
        let refused = ConnectionRecord {
            error: Some("refused".into()),
            ..rec(Direction::Inbound, "10.0.0.5:4009", "10.0.0.2:8080", "plaintext", false)
        };
        // As a snapshot lists them: live ones (the newest) first.
        let conns = [
            with_id(
                3,
                rec(Direction::Inbound, "10.0.0.7:4002", "10.0.0.2:8080", "plaintext", true),
            ),
            with_id(4, rec(Direction::Inbound, "10.0.0.1:4003", "10.0.0.2:9090", "mTLS", true)),
            with_id(1, rec(Direction::Inbound, "10.0.0.1:4000", "10.0.0.2:8080", "mTLS", false)),
            with_id(
                2,
                rec(Direction::Inbound, "10.0.0.9:4001", "10.0.0.2:8080", "plaintext", false),
            ),
            with_id(
                5,
                rec(Direction::Outbound, "127.0.0.1:5000", "10.0.0.3:80", "passthrough", false),
            ),
            with_id(6, refused),
        ];
        let b = observed(&conns, "b.ns");
        assert_eq!(b.len(), 2, "{b:?}");
        assert_eq!((b[0].target.as_str(), b[0].mtls, b[0].plaintext, b[0].open), ("8080", 1, 2, 1));
        assert_eq!(b[0].last_plaintext_peer.as_deref(), Some("10.0.0.7:4002"));
        assert_eq!((b[1].target.as_str(), b[1].mtls, b[1].plaintext), ("9090", 1, 0));
        assert_eq!(b[1].last_plaintext_peer, None);
        let a = observed(&conns, "a.ns");
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!((a[0].direction.as_str(), a[0].target.as_str()), ("outbound", "10.0.0.3:80"));
        assert_eq!((a[0].mtls, a[0].plaintext), (0, 1));
        assert!(observed(&conns, "c.ns").is_empty());
    }
}
