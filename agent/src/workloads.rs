//! `workloads.yaml`: the local source of truth for which pods and services
//! exist. The agent enrolls the pods of its own node from it.
//!
//! ```yaml
//! workloads:
//! - name: frontend                  # pod name (required)
//!   namespace: hipster-app          # required
//!   serviceAccount: frontend        # default: default
//!   labels: {app: frontend}         # default: {}
//!   ip: 10.244.1.2                  # required; IPv4 or IPv6: the primary address
//!   ips: [10.244.1.2, fd00::1:2]    # optional: every address of the pod (dual-stack, extra
//!                                   # addresses); `ip` is added if missing
//!   node: node1                     # required
//!   netns: /var/run/netns/frontend  # the pod's network namespace file (absolute);
//!                                   # required for pods of the agent's own node
//!   probePorts: [8080]              # optional: ports the kubelet probes from the node
//! services:
//! - name: frontend                  # required
//!   namespace: hipster-app          # required
//!   vip: 10.96.0.10                 # optional ClusterIP
//!   selector: {app: frontend}       # default: {} (selects nothing)
//!   ports: [{name: http, port: 80, targetPort: 8080}]   # name optional, targetPort defaults to port
//! ```
//!
//! Both top-level keys are optional; an empty file or `{}` is an empty set.
//! Unknown keys are rejected at every level, as are repeated keys, empty
//! names, invalid or non-unicast IPs, ports outside 1-65535, duplicate pods
//! (name + namespace), pod IPs (any of `ip` and `ips`, within a pod or across pods), services,
//! VIPs and service ports. IPv4-mapped
//! IPv6 addresses are stored as IPv4 so lookups match either form.
//!
//! Every error names the file, the line and the field, e.g.
//! `workloads.yaml:7: workloads[1].ip: invalid IP address "10.0.0.300"`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::{self, Deserializer, IgnoredAny, Visitor};
use serde::{Deserialize, Serialize};

use crate::yamlde::{
    checked_str, present, split_serde_message, strip_location, At, FieldPrefix, Name,
};
use crate::yamlpos::{self, YamlIndex};

mod index;
pub use index::IpClaims;
pub mod shared;

pub use shared::{Labels, Str};

/// A pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    // Shared strings: a remote pod's are the feed's, one copy for every pod that has them.
    pub name: Str,
    pub namespace: Str,
    pub service_account: Str,
    pub labels: Labels,
    /// The primary address: the one the agent's tunnel listener binds.
    pub ip: IpAddr,
    /// Every address of the pod, `ip` first: each is a mesh destination, and a tunnelled
    /// connection may target any of them.
    pub ips: Vec<IpAddr>,
    pub node: Str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    pub probe_ports: Vec<u16>,
    /// The Pod's `metadata.uid` (Kubernetes mode): finds its netns through its cgroup when
    /// there is no `netns`, and tells a recreated pod of the same name from the old one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<Str>,
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    pub target_port: u16,
}

/// A service: a label selector over pods of its namespace, optionally with a VIP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vip: Option<IpAddr>,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
    /// Kubernetes mode: the endpoints of the service's EndpointSlices, the only source of its
    /// endpoints (selector or not, mesh pods or not), as for kube-proxy. `None` (workloads.yaml):
    /// the pods the selector picks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<SliceEndpoint>>,
    /// `spec.internalTrafficPolicy: Local`: only endpoints on the client's node serve it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub internal_traffic_local: bool,
    /// Dual-stack (Kubernetes mode): the VIP of the other family, from `spec.clusterIPs`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub other_vips: Vec<IpAddr>,
}

/// One endpoint of one service port, as an EndpointSlice gives it (Kubernetes mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    /// The service port (`spec.ports[].port`) it serves.
    pub service_port: u16,
    /// The endpoint's first address (kube-proxy uses no other).
    pub address: IpAddr,
    /// The slice's port number for that service port (matched by port name).
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Shared with the slice's and every endpoint's on that node.
    pub node_name: Option<Str>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// The validated contents of `workloads.yaml` (or the API server's state): made with
/// [`WorkloadSet::new`], which indexes its lookups. The vectors are read freely; a set is not
/// edited once made (it is shared as a snapshot): make a new one.
#[derive(Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSet {
    /// Shared, so that a snapshot of a large cluster copies pointers, not every pod.
    #[serde(serialize_with = "shared_seq")]
    pub workloads: Vec<Arc<Workload>>,
    /// Shared too: a service (with its endpoints) unchanged between two snapshots is one
    /// value, which the routing table recognises and reuses.
    #[serde(serialize_with = "shared_seq")]
    pub services: Vec<Arc<Service>>,
    #[serde(skip)]
    index: index::Index,
}

fn shared_seq<S: serde::Serializer, T: Serialize>(v: &[Arc<T>], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|w| &**w))
}

// The index is derived from the vectors: the set's value is the vectors alone.
impl PartialEq for WorkloadSet {
    fn eq(&self, other: &Self) -> bool {
        self.workloads == other.workloads && self.services == other.services
    }
}

impl Eq for WorkloadSet {}

impl fmt::Debug for WorkloadSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadSet")
            .field("workloads", &self.workloads)
            .field("services", &self.services)
            .finish()
    }
}

/// Why `workloads.yaml` was rejected.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadsError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The text is not (a single document of) well-formed YAML.
    #[error("{}: invalid YAML: {message}", At(file, *line))]
    Syntax { file: PathBuf, line: Option<usize>, message: String },
    /// Well-formed YAML that breaks the schema or a consistency rule.
    /// `field` is a path such as `workloads[1].ip` (empty for the whole file).
    #[error("{}: {}{message}", At(file, *line), FieldPrefix(field))]
    Invalid { file: PathBuf, line: Option<usize>, field: String, message: String },
}

impl WorkloadsError {
    /// The 1-based line the error points at, if known.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Read { .. } => None,
            Self::Syntax { line, .. } | Self::Invalid { line, .. } => *line,
        }
    }
}

impl Workload {
    /// `name.namespace`, unique within a [`WorkloadSet`].
    /// Whether `ip` is one of the pod's addresses (IPv4-mapped IPv6 matches the IPv4 form).
    pub fn has_ip(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.ips.contains(&ip)
    }

    /// `ips` from the primary address and the listed ones: primary first, no repeats.
    pub fn all_addresses(ip: IpAddr, listed: impl IntoIterator<Item = IpAddr>) -> Vec<IpAddr> {
        let mut ips = vec![ip];
        for a in listed {
            if !ips.contains(&a) {
                ips.push(a);
            }
        }
        ips
    }

    pub fn key(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }

    /// The service account used in the pod's SPIFFE ID.
    pub fn spiffe_sa(&self) -> &str {
        &self.service_account
    }

    /// Whether `other` is this pod with the same identity (namespace, name, service account,
    /// addresses, node, netns, uid): it differs at most in what policy reads (labels, probe
    /// ports), so its enrollment is updated in place rather than redone.
    pub fn same_identity(&self, other: &Workload) -> bool {
        let strip =
            |w: &Workload| Workload { labels: Labels::default(), probe_ports: vec![], ..w.clone() };
        strip(self) == strip(other)
    }
}

impl Service {
    /// Whether this service selects `w`: same namespace and all selector
    /// labels present. An empty selector selects nothing, as in Kubernetes.
    pub fn selects(&self, w: &Workload) -> bool {
        self.namespace == w.namespace
            && !self.selector.is_empty()
            && w.labels.matches(&self.selector)
    }
}

impl WorkloadSet {
    /// The set of these pods and services, with its lookups indexed (once, here).
    pub fn new(workloads: Vec<Workload>, services: Vec<Service>) -> WorkloadSet {
        Self::from_shared(
            workloads.into_iter().map(Arc::new).collect(),
            services.into_iter().map(Arc::new).collect(),
        )
    }

    /// As [`WorkloadSet::new`], from workloads another set (or the feed's builder) holds too.
    pub fn from_shared(workloads: Vec<Arc<Workload>>, services: Vec<Arc<Service>>) -> WorkloadSet {
        let index = index::Index::build(&workloads, &services);
        WorkloadSet { workloads, services, index }
    }

    /// As [`WorkloadSet::from_shared`], with the map of addresses to the first pod that has
    /// each already made (by the one who decided which pod keeps an address).
    pub fn from_claims(
        workloads: Vec<Arc<Workload>>,
        services: Vec<Arc<Service>>,
        claims: IpClaims,
    ) -> WorkloadSet {
        let index = index::Index::with_claims(&workloads, &services, claims);
        WorkloadSet { workloads, services, index }
    }

    /// Reads and parses `path`, then checks that every pod of `node` has a
    /// netns that exists on disk.
    pub fn load(path: &Path, node: &str) -> Result<Self, WorkloadsError> {
        let src = std::fs::read_to_string(path)
            .map_err(|source| WorkloadsError::Read { file: path.to_path_buf(), source })?;
        let (set, loc) = parse_located(&src, path)?;
        for (i, w) in set.workloads.iter().enumerate() {
            if w.node != node {
                continue;
            }
            let field = format!("workloads[{i}].netns");
            let Some(netns) = &w.netns else {
                return Err(loc.error(field, format!("missing (required for pods of node {node})")));
            };
            match netns.try_exists() {
                Ok(true) => {}
                Ok(false) => {
                    return Err(loc.error(field, format!("{} does not exist", netns.display())))
                }
                Err(e) => {
                    return Err(loc.error(field, format!("cannot check {}: {e}", netns.display())))
                }
            }
        }
        Ok(set)
    }

    /// Parses and validates text only (no filesystem access); `origin` is
    /// used in error messages.
    pub fn parse(src: &str, origin: &Path) -> Result<Self, WorkloadsError> {
        parse_located(src, origin).map(|(set, _)| set)
    }

    /// The pods scheduled on `node`.
    pub fn on_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.index.on_node(&self.workloads, node)
    }

    /// The pod with address `ip` (IPv4-mapped IPv6 matches the IPv4 form); the first one if
    /// several claim it.
    pub fn by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.index.by_ip(&self.workloads, ip.to_canonical())
    }

    /// The pod `name` in `namespace`.
    pub fn find(&self, name: &str, namespace: &str) -> Option<&Workload> {
        self.index.find(&self.workloads, name, namespace)
    }

    /// Services in `w`'s namespace selecting workload `w` (used later by policy code).
    pub fn services_for<'a>(&'a self, w: &'a Workload) -> impl Iterator<Item = &'a Service> + 'a {
        self.index.services_in(&self.services, &w.namespace).filter(move |s| s.selects(w))
    }
}

// ---------------------------------------------------------------------------
// Deserialisation. The raw structs mirror the file; field-level checks live in
// the newtypes below so that serde_yaml attaches the exact location to them.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with optional keys workloads and services")]
struct RawFile {
    workloads: Option<Vec<RawWorkload>>,
    services: Option<Vec<RawService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a workload (mapping)")]
struct RawWorkload {
    #[serde(deserialize_with = "present")]
    name: Option<Name>,
    #[serde(deserialize_with = "present")]
    namespace: Option<Name>,
    service_account: Option<Name>,
    labels: Option<BTreeMap<String, String>>,
    #[serde(deserialize_with = "present")]
    ip: Option<Ip>,
    ips: Option<Vec<Ip>>,
    #[serde(deserialize_with = "present")]
    node: Option<Name>,
    netns: Option<Netns>,
    probe_ports: Option<Vec<Port>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a service (mapping)")]
struct RawService {
    #[serde(deserialize_with = "present")]
    name: Option<Name>,
    #[serde(deserialize_with = "present")]
    namespace: Option<Name>,
    vip: Option<Ip>,
    selector: Option<BTreeMap<String, String>>,
    ports: Option<Vec<RawServicePort>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a service port like {name: http, port: 80, targetPort: 8080}"
)]
struct RawServicePort {
    name: Option<Name>,
    port: Port,
    target_port: Option<Port>,
}

// Custom error messages must not start with a whitespace-free word followed by
// ": ", or `split_serde_message` would take that word for a path.

/// A unicast IP address, IPv4-mapped IPv6 folded to IPv4.
struct Ip(IpAddr);

impl<'de> Deserialize<'de> for Ip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "an IP address", |s| {
            let ip = s
                .trim()
                .parse::<IpAddr>()
                .map_err(|_| format!("invalid IP address {s:?}"))?
                .to_canonical();
            let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
            if ip.is_unspecified() || ip.is_multicast() || broadcast {
                return Err(format!("invalid IP address {s:?} (not a unicast address)"));
            }
            Ok(Ip(ip))
        })
    }
}

/// An absolute path to a network namespace file.
struct Netns(PathBuf);

impl<'de> Deserialize<'de> for Netns {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "a file path", |s| {
            if s.is_empty() {
                return Err("must not be empty".to_string());
            }
            // Relative paths would depend on the agent's working directory.
            if !Path::new(s).is_absolute() {
                return Err(format!("must be an absolute path, got {s:?}"));
            }
            Ok(Netns(PathBuf::from(s)))
        })
    }
}

/// A TCP/UDP port, 1-65535.
struct Port(u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PortVisitor;

        impl Visitor<'_> for PortVisitor {
            type Value = Port;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number (1-65535)")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Port, E> {
                self.visit_i128(i128::from(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Port, E> {
                self.visit_i128(i128::from(v))
            }

            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Port, E> {
                // Anything beyond i128 is out of range just the same.
                self.visit_i128(i128::try_from(v).unwrap_or(i128::MAX))
            }

            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Port, E> {
                match u16::try_from(v) {
                    Ok(p) if p != 0 => Ok(Port(p)),
                    _ => Err(E::custom(format!("port {v} out of range (1-65535)"))),
                }
            }
        }

        d.deserialize_any(PortVisitor)
    }
}

// ---------------------------------------------------------------------------
// Errors and validation.

/// Maps field paths to lines for errors found after deserialisation.
struct Locator<'a> {
    file: &'a Path,
    /// `None` only if yaml-rust2 rejects what serde_yaml accepted; errors
    /// then lack a line but are still reported.
    index: Option<YamlIndex>,
}

impl Locator<'_> {
    fn line(&self, path: &str) -> Option<usize> {
        self.index.as_ref()?.nearest_line(0, path)
    }

    /// "line N" for `path`, or the path itself if the line is unknown.
    fn at(&self, path: &str) -> String {
        match self.line(path) {
            Some(line) => format!("line {line}"),
            None => path.to_string(),
        }
    }

    fn error(&self, field: String, message: String) -> WorkloadsError {
        WorkloadsError::Invalid {
            file: self.file.to_path_buf(),
            line: self.line(&field),
            field,
            message,
        }
    }
}

fn parse_located<'a>(
    src: &str,
    origin: &'a Path,
) -> Result<(WorkloadSet, Locator<'a>), WorkloadsError> {
    // `Option` so that a document that is just `~` also counts as empty.
    let raw = match serde_yaml::from_str::<Option<RawFile>>(src) {
        Ok(raw) => raw.unwrap_or(RawFile { workloads: None, services: None }),
        Err(err) => return Err(serde_error(&err, src, origin)),
    };
    let loc = Locator { file: origin, index: YamlIndex::parse(src).ok() };
    // serde_yaml keeps the last of repeated map keys; a repeated label is
    // almost certainly a mistake.
    if let Some(dup) = loc.index.as_ref().and_then(|idx| idx.duplicate_key(0)) {
        return Err(duplicate_key_error(origin, dup));
    }
    let (set, address_fields) = convert(raw, &loc)?;
    validate(&set, &address_fields, &loc)?;
    Ok((set, loc))
}

fn duplicate_key_error(file: &Path, dup: yamlpos::DuplicateKey) -> WorkloadsError {
    WorkloadsError::Invalid {
        file: file.to_path_buf(),
        line: Some(dup.line),
        field: dup.path,
        message: format!("duplicate key (first at line {})", dup.first_line),
    }
}

/// Rejects a required field given as null (see [`present`]).
fn required<T>(
    value: Option<T>,
    loc: &Locator<'_>,
    path: &str,
    field: &str,
) -> Result<T, WorkloadsError> {
    value.ok_or_else(|| loc.error(format!("{path}.{field}"), "must not be empty".to_string()))
}

/// Each pod's addresses with the field that names each (`workloads[i].ip`,
/// `workloads[i].ips[k]`), for errors found across pods.
type AddressFields = Vec<Vec<(IpAddr, String)>>;

fn convert(
    raw: RawFile,
    loc: &Locator<'_>,
) -> Result<(WorkloadSet, AddressFields), WorkloadsError> {
    let mut workloads = Vec::new();
    let mut address_fields = Vec::new();
    for (i, w) in raw.workloads.unwrap_or_default().into_iter().enumerate() {
        let path = format!("workloads[{i}]");
        let ip = required(w.ip, loc, &path, "ip")?.0;
        let mut listed: HashMap<IpAddr, usize> = HashMap::new();
        let mut fields = vec![(ip, format!("{path}.ip"))];
        for (k, a) in w.ips.iter().flatten().enumerate() {
            if let Some(first) = listed.insert(a.0, k) {
                let first = loc.at(&format!("{path}.ips[{first}]"));
                return Err(loc.error(
                    format!("{path}.ips[{k}]"),
                    format!("duplicate IP {} (first at {first})", a.0),
                ));
            }
            // `ip` repeated in `ips` is the same address, not a second one.
            if a.0 != ip {
                fields.push((a.0, format!("{path}.ips[{k}]")));
            }
        }
        address_fields.push(fields);
        workloads.push(Workload {
            name: required(w.name, loc, &path, "name")?.0.into(),
            namespace: required(w.namespace, loc, &path, "namespace")?.0.into(),
            service_account: w.service_account.map_or_else(|| "default".into(), |n| n.0.into()),
            labels: w.labels.unwrap_or_default().into(),
            ips: Workload::all_addresses(ip, w.ips.into_iter().flatten().map(|a| a.0)),
            ip,
            node: required(w.node, loc, &path, "node")?.0.into(),
            netns: w.netns.map(|n| n.0),
            probe_ports: w.probe_ports.unwrap_or_default().into_iter().map(|p| p.0).collect(),
            uid: None,
        });
    }
    let mut services = Vec::new();
    for (i, s) in raw.services.unwrap_or_default().into_iter().enumerate() {
        let path = format!("services[{i}]");
        services.push(Service {
            name: required(s.name, loc, &path, "name")?.0,
            namespace: required(s.namespace, loc, &path, "namespace")?.0,
            vip: s.vip.map(|ip| ip.0),
            selector: s.selector.unwrap_or_default(),
            ports: s
                .ports
                .unwrap_or_default()
                .into_iter()
                .map(|p| ServicePort {
                    name: p.name.map(|n| n.0),
                    port: p.port.0,
                    target_port: p.target_port.map_or(p.port.0, |t| t.0),
                })
                .collect(),
            endpoints: None,
            internal_traffic_local: false,
            other_vips: Vec::new(),
        });
    }
    Ok((WorkloadSet::new(workloads, services), address_fields))
}

/// Cross-entry checks; reports the later of two conflicting entries.
fn validate(
    set: &WorkloadSet,
    address_fields: &AddressFields,
    loc: &Locator<'_>,
) -> Result<(), WorkloadsError> {
    let mut pods: HashMap<(&str, &str), usize> = HashMap::new();
    // Address -> (pod index, field of the address).
    let mut ips: HashMap<IpAddr, (usize, String)> = HashMap::new();
    for (i, w) in set.workloads.iter().enumerate() {
        let path = format!("workloads[{i}]");
        if let Some(&j) = pods.get(&(w.name.as_str(), w.namespace.as_str())) {
            let first = loc.at(&format!("workloads[{j}]"));
            return Err(loc.error(path, format!("duplicate pod {} (first at {first})", w.key())));
        }
        pods.insert((&w.name, &w.namespace), i);
        for (ip, field) in address_fields.get(i).into_iter().flatten().cloned() {
            if let Some((j, first_field)) = ips.get(&ip) {
                let first = loc.at(first_field);
                let other = set.workloads.get(*j).map(|w| w.key()).unwrap_or_default();
                return Err(loc.error(
                    field,
                    format!("duplicate IP {ip} (first used by pod {other} at {first})"),
                ));
            }
            ips.insert(ip, (i, field));
        }
        let mut seen = HashMap::new();
        for (k, port) in w.probe_ports.iter().enumerate() {
            if let Some(first) = seen.insert(port, k) {
                let first = loc.at(&format!("{path}.probePorts[{first}]"));
                return Err(loc.error(
                    format!("{path}.probePorts[{k}]"),
                    format!("duplicate port {port} (first at {first})"),
                ));
            }
        }
    }

    let mut services: HashMap<(&str, &str), usize> = HashMap::new();
    let mut vips: HashMap<IpAddr, usize> = HashMap::new();
    for (i, s) in set.services.iter().enumerate() {
        let path = format!("services[{i}]");
        if let Some(&j) = services.get(&(s.name.as_str(), s.namespace.as_str())) {
            let first = loc.at(&format!("services[{j}]"));
            return Err(loc.error(
                path,
                format!("duplicate service {}.{} (first at {first})", s.name, s.namespace),
            ));
        }
        services.insert((&s.name, &s.namespace), i);
        if let Some(vip) = s.vip {
            let field = format!("{path}.vip");
            if let Some(&j) = vips.get(&vip) {
                let first = loc.at(&format!("services[{j}].vip"));
                let other = set
                    .services
                    .get(j)
                    .map(|o| format!("{}.{}", o.name, o.namespace))
                    .unwrap_or_default();
                return Err(loc.error(
                    field,
                    format!("duplicate VIP {vip} (first used by service {other} at {first})"),
                ));
            }
            // by_ip and the service table must never both claim an address.
            if let Some((j, first_field)) = ips.get(&vip) {
                let first = loc.at(first_field);
                let other = set.workloads.get(*j).map(|w| w.key()).unwrap_or_default();
                return Err(loc.error(
                    field,
                    format!("VIP {vip} is also the IP of pod {other} (at {first})"),
                ));
            }
            vips.insert(vip, i);
        }
        let mut ports = HashMap::new();
        let mut names = HashMap::new();
        for (k, p) in s.ports.iter().enumerate() {
            let port_path = format!("{path}.ports[{k}]");
            if let Some(first) = ports.insert(p.port, k) {
                let first = loc.at(&format!("{path}.ports[{first}].port"));
                return Err(loc.error(
                    format!("{port_path}.port"),
                    format!("duplicate port {} (first at {first})", p.port),
                ));
            }
            if let Some(name) = &p.name {
                if let Some(first) = names.insert(name.as_str(), k) {
                    let first = loc.at(&format!("{path}.ports[{first}].name"));
                    return Err(loc.error(
                        format!("{port_path}.name"),
                        format!("duplicate port name {name} (first at {first})"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Turns a serde_yaml error into `file:line: field: message`.
fn serde_error(err: &serde_yaml::Error, src: &str, file: &Path) -> WorkloadsError {
    // Syntax-only parse: if this fails too, the YAML itself is broken and
    // that is the more useful error to show.
    if let Err(syntax) = serde_yaml::from_str::<IgnoredAny>(src) {
        let (line, message) = strip_location(&syntax);
        return WorkloadsError::Syntax { file: file.to_path_buf(), line, message };
    }
    let (line, text) = strip_location(err);
    let (path, message) = split_serde_message(&text);
    // serde_yaml points a repeated field at its mapping; find the repeat.
    if message.starts_with("duplicate field `") {
        let dup = YamlIndex::parse(src).ok().and_then(|idx| idx.duplicate_key(0));
        if let Some(dup) = dup {
            return duplicate_key_error(file, dup);
        }
    }
    let (field, message) = if let Some(rest) = message.strip_prefix("unknown field `") {
        let (name, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let expected = expected.trim_start_matches(", ").replace('`', "");
        let message = if expected.is_empty() {
            "unknown field".to_string()
        } else {
            format!("unknown field ({expected})")
        };
        (yamlpos::join_key(path, name), message)
    } else if let Some(rest) = message.strip_prefix("missing field `") {
        let name = rest.trim_end_matches('`');
        (yamlpos::join_key(path, name), "missing required field".to_string())
    } else {
        (path.to_string(), message.to_string())
    };
    WorkloadsError::Invalid { file: file.to_path_buf(), line, field, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const FULL: &str = "\
workloads:
- name: frontend
  namespace: hipster-app
  serviceAccount: frontend
  labels: {app: frontend, tier: web}
  ip: 10.244.1.2
  node: node1
  netns: /var/run/netns/frontend
  probePorts: [8080]
- name: cart
  namespace: hipster-app
  labels:
    app: cart
  ip: 10.244.2.7
  node: node2
- name: cart-2
  namespace: hipster-app
  labels: {app: cart, version: v2}
  ip: fd00::2:8
  node: node2
- name: cart
  namespace: other
  labels: {app: cart}
  ip: 10.244.3.3
  node: node1
  netns: /var/run/netns/cart-other
services:
- name: frontend
  namespace: hipster-app
  vip: 10.96.0.10
  selector: {app: frontend}
  ports: [{name: http, port: 80, targetPort: 8080}]
- name: cart
  namespace: hipster-app
  vip: fd00:96::7
  selector:
    app: cart
  ports:
  - port: 7070
  - name: metrics
    port: 9090
    targetPort: 9091
- name: headless
  namespace: hipster-app
  ports: [{port: 1}]
";

    fn parse(src: &str) -> Result<WorkloadSet, WorkloadsError> {
        WorkloadSet::parse(src, Path::new("workloads.yaml"))
    }

    /// The Display of the error `src` is rejected with.
    fn err(src: &str) -> String {
        match parse(src) {
            Ok(set) => panic!("accepted: {set:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// A minimal valid pod entry at the given IP.
    fn pod(name: &str, ip: &str) -> String {
        format!("- name: {name}\n  namespace: ns\n  ip: {ip}\n  node: n1\n")
    }

    #[test]
    fn full_example_round_trips() {
        let set = parse(FULL).unwrap();
        assert_eq!(set.workloads.len(), 4);
        assert_eq!(
            *set.workloads[0],
            Workload {
                name: "frontend".into(),
                namespace: "hipster-app".into(),
                service_account: "frontend".into(),
                labels: labels(&[("app", "frontend"), ("tier", "web")]).into(),
                ip: IpAddr::V4(Ipv4Addr::new(10, 244, 1, 2)),
                ips: vec![IpAddr::V4(Ipv4Addr::new(10, 244, 1, 2))],
                node: "node1".into(),
                netns: Some(PathBuf::from("/var/run/netns/frontend")),
                probe_ports: vec![8080],
                uid: None,
            }
        );
        assert_eq!(
            *set.services[0],
            Service {
                name: "frontend".into(),
                namespace: "hipster-app".into(),
                vip: Some(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))),
                selector: labels(&[("app", "frontend")]),
                ports: vec![ServicePort { name: Some("http".into()), port: 80, target_port: 8080 }],
                endpoints: None,
                internal_traffic_local: false,
                other_vips: Vec::new(),
            }
        );
        assert_eq!(set.workloads[0].key(), "frontend.hipster-app");
        assert_eq!(set.workloads[0].spiffe_sa(), "frontend");
        let json = serde_json::to_value(&*set.workloads[0]).unwrap();
        assert_eq!(json["serviceAccount"], "frontend");
        assert_eq!(json["probePorts"][0], 8080);
        assert_eq!(json["ip"], "10.244.1.2");
        let json = serde_json::to_value(&*set.services[0]).unwrap();
        assert_eq!(json["ports"][0]["targetPort"], 8080);
        assert!(serde_json::to_value(&*set.workloads[1]).unwrap()["netns"].is_null());
    }

    #[test]
    fn defaults_apply() {
        let set = parse(FULL).unwrap();
        let cart = set.find("cart", "hipster-app").unwrap();
        assert_eq!(cart.service_account, "default");
        assert_eq!(cart.spiffe_sa(), "default");
        assert_eq!(cart.netns, None);
        assert!(cart.probe_ports.is_empty());
        let minimal = parse(&format!("workloads:\n{}", pod("a", "10.0.0.1"))).unwrap();
        assert!(minimal.workloads[0].labels.is_empty());
        assert_eq!(
            set.services[1].ports,
            vec![
                ServicePort { name: None, port: 7070, target_port: 7070 },
                ServicePort { name: Some("metrics".into()), port: 9090, target_port: 9091 },
            ]
        );
        assert_eq!(set.services[2].vip, None);
        assert!(set.services[2].selector.is_empty());
    }

    #[test]
    fn empty_files_are_empty_sets() {
        for src in ["", "\n", "# nothing yet\n", "{}", "~", "workloads:\nservices: []\n"] {
            assert_eq!(parse(src).unwrap(), WorkloadSet::default(), "{src:?}");
        }
    }

    #[test]
    fn lookups() {
        let set = parse(FULL).unwrap();
        let on1: Vec<_> = set.on_node("node1").map(Workload::key).collect();
        assert_eq!(on1, ["frontend.hipster-app", "cart.other"]);
        assert_eq!(set.on_node("node9").count(), 0);
        let ip: IpAddr = "10.244.2.7".parse().unwrap();
        assert_eq!(set.by_ip(ip).unwrap().key(), "cart.hipster-app");
        // The IPv4-mapped form of a pod address finds the same pod.
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 244, 2, 7).to_ipv6_mapped());
        assert_eq!(set.by_ip(mapped).unwrap().key(), "cart.hipster-app");
        assert!(set.by_ip("10.244.9.9".parse().unwrap()).is_none());
        assert!(set.find("cart", "other").is_some());
        assert!(set.find("cart", "nope").is_none());
    }

    #[test]
    fn ipv6_addresses() {
        let set = parse(FULL).unwrap();
        let ip: IpAddr = "fd00::2:8".parse().unwrap();
        assert_eq!(set.by_ip(ip).unwrap().name, "cart-2");
        assert_eq!(
            set.services[1].vip,
            Some(IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 7)))
        );
        // Mapped IPv4 in the file is stored as plain IPv4.
        let set = parse(&format!("workloads:\n{}", pod("a", "\"::ffff:10.1.2.3\""))).unwrap();
        assert_eq!(set.workloads[0].ip, IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)));
    }

    /// The (address, pod) a service VIP and port resolves to (`services::ServiceTable`).
    fn resolve(set: &WorkloadSet, vip: &str, port: u16) -> Option<Vec<(String, String)>> {
        let table = crate::services::ServiceTable::build(set, "node1");
        let route = table.get(std::net::SocketAddr::new(vip.parse().ok()?, port))?;
        let b = route.backends.iter();
        let pod = |b: &std::net::SocketAddr| set.by_ip(b.ip()).map(|w| w.key()).unwrap_or_default();
        Some(b.map(|b| (b.to_string(), pod(b))).collect())
    }

    #[test]
    fn a_vip_resolves_to_the_selected_pods_of_the_namespace() {
        let set = parse(FULL).unwrap();
        let eps = resolve(&set, "fd00:96::7", 7070).unwrap();
        // cart.other has the label but lives in another namespace.
        let names: Vec<&str> = eps.iter().map(|(_, pod)| pod.as_str()).collect();
        assert_eq!(names, ["cart.hipster-app", "cart-2.hipster-app"]);
        assert!(eps.iter().all(|(a, _)| a.ends_with(":7070")), "{eps:?}");
        let eps = resolve(&set, "fd00:96::7", 9090).unwrap();
        assert_eq!(eps.len(), 2);
        assert!(eps.iter().all(|(a, _)| a.ends_with(":9091")), "{eps:?}");
        assert!(resolve(&set, "fd00:96::7", 9091).is_none(), "targetPort is not a service port");

        let eps = resolve(&set, "10.96.0.10", 80).unwrap();
        assert_eq!(eps, [("10.244.1.2:8080".to_owned(), "frontend.hipster-app".to_owned())]);
        assert!(resolve(&set, "10.96.0.11", 80).is_none());
    }

    #[test]
    fn empty_selector_selects_nothing() {
        let src = format!(
            "workloads:\n{}services:\n- {{name: s, namespace: ns, vip: 10.96.0.1, ports: [{{port: 80}}]}}\n",
            pod("a", "10.0.0.1")
        );
        let set = parse(&src).unwrap();
        assert_eq!(resolve(&set, "10.96.0.1", 80), Some(vec![]));
        assert_eq!(set.services_for(&set.workloads[0]).count(), 0);
    }

    #[test]
    fn services_for_workload() {
        let set = parse(FULL).unwrap();
        let cart2 = set.find("cart-2", "hipster-app").unwrap();
        let names: Vec<_> = set.services_for(cart2).map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["cart"]);
        let other = set.find("cart", "other").unwrap();
        assert_eq!(set.services_for(other).count(), 0);
    }

    #[test]
    fn syntax_error() {
        let src = "workloads:\n- name: a\n  labels: {app: a\n  ip: 10.0.0.1\n";
        let e = parse(src).unwrap_err();
        assert!(matches!(e, WorkloadsError::Syntax { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.starts_with("workloads.yaml:4: invalid YAML: "), "{text}");
        assert!(!text.contains(" at line 4"), "{text}");

        let text = err("workloads:\n- name: a\n   namespace: b\n");
        assert!(text.starts_with("workloads.yaml:3: invalid YAML: "), "{text}");
        let text = err("workloads: []\n---\nservices: []\n");
        assert!(text.starts_with("workloads.yaml: invalid YAML: "), "{text}");
    }

    #[test]
    fn unknown_fields_at_every_level() {
        let src = "\
workloads:
- name: a
  colour: red
";
        assert_eq!(
            err(src),
            "workloads.yaml:3: workloads[0].colour: unknown field (expected one of name, namespace, \
             serviceAccount, labels, ip, ips, node, netns, probePorts)"
        );
        let e = WorkloadSet::parse(src, Path::new("/tmp/x/workloads.yaml")).unwrap_err();
        assert!(e.to_string().starts_with("/tmp/x/workloads.yaml:3: workloads[0].colour: "), "{e}");
        assert_eq!(
            err("workload: []\n"),
            "workloads.yaml:1: workload: unknown field (expected workloads or services)"
        );
        assert_eq!(
            err("services:\n- name: s\n  namespace: ns\n  ports:\n  - port: 80\n    tagetPort: 8080\n"),
            "workloads.yaml:6: services[0].ports[0].tagetPort: unknown field (expected one of name, \
             port, targetPort)"
        );
        assert_eq!(
            err("services:\n- name: s\n  namespace: ns\n  vips: 10.96.0.1\n"),
            "workloads.yaml:4: services[0].vips: unknown field (expected one of name, namespace, \
             vip, selector, ports)"
        );
    }

    #[test]
    fn wrong_types() {
        assert_eq!(
            err("workloads:\n- name: a\n  probePorts: [80, http]\n"),
            "workloads.yaml:3: workloads[0].probePorts[1]: invalid type: string \"http\", \
             expected a port number (1-65535)"
        );
        assert_eq!(
            err("workloads:\n- name: a\n  labels: [a, b]\n"),
            "workloads.yaml:3: workloads[0].labels: invalid type: sequence, expected a map"
        );
        assert_eq!(
            err("workloads:\n  name: a\n"),
            "workloads.yaml:2: workloads: invalid type: map, expected a sequence"
        );
        assert_eq!(
            err("workloads:\n- frontend\n"),
            "workloads.yaml:2: workloads[0]: invalid type: string \"frontend\", expected a \
             workload (mapping)"
        );
        assert_eq!(
            err("- 1\n"),
            "workloads.yaml:1: invalid type: sequence, expected a mapping with optional keys \
             workloads and services"
        );
    }

    #[test]
    fn missing_required_fields() {
        assert_eq!(
            err("workloads:\n- name: a\n  namespace: ns\n  node: n1\n"),
            "workloads.yaml:2: workloads[0].ip: missing required field"
        );
        assert_eq!(
            err(&format!(
                "workloads:\n{}- name: b\n  ip: 10.0.0.2\n  node: n1\n",
                pod("a", "10.0.0.1")
            )),
            "workloads.yaml:6: workloads[1].namespace: missing required field"
        );
        assert_eq!(
            err("services:\n- name: s\n  namespace: ns\n  ports: [{name: http}]\n"),
            "workloads.yaml:4: services[0].ports[0].port: missing required field"
        );
    }

    #[test]
    fn invalid_ips() {
        let src = format!("workloads:\n{}- name: b\n  ip: 10.0.0.300\n", pod("a", "10.0.0.1"));
        assert_eq!(
            err(&src),
            "workloads.yaml:7: workloads[1].ip: invalid IP address \"10.0.0.300\""
        );
        assert_eq!(
            err("workloads:\n- name: a\n  ip: \"fd00::zz\"\n"),
            "workloads.yaml:3: workloads[0].ip: invalid IP address \"fd00::zz\""
        );
        assert_eq!(
            err("workloads:\n- name: a\n  ip: 0.0.0.0\n"),
            "workloads.yaml:3: workloads[0].ip: invalid IP address \"0.0.0.0\" (not a unicast \
             address)"
        );
        assert_eq!(
            err("services:\n- name: s\n  namespace: ns\n  vip: 10.96.0\n"),
            "workloads.yaml:4: services[0].vip: invalid IP address \"10.96.0\""
        );
    }

    #[test]
    fn ports_out_of_range() {
        assert_eq!(
            err("workloads:\n- name: a\n  probePorts: [0]\n"),
            "workloads.yaml:3: workloads[0].probePorts[0]: port 0 out of range (1-65535)"
        );
        assert_eq!(
            err("services:\n- name: s\n  namespace: ns\n  ports:\n  - port: 80\n    targetPort: 65536\n"),
            "workloads.yaml:6: services[0].ports[0].targetPort: port 65536 out of range (1-65535)"
        );
        assert_eq!(
            err("services:\n- name: s\n  ports: [{port: -1}]\n"),
            "workloads.yaml:3: services[0].ports[0].port: port -1 out of range (1-65535)"
        );
        assert_eq!(
            err("workloads:\n- probePorts: [99999999999999999999]\n"),
            "workloads.yaml:2: workloads[0].probePorts[0]: port 99999999999999999999 out of range \
             (1-65535)"
        );
        assert_eq!(
            err("workloads:\n- probePorts: [80.5]\n"),
            "workloads.yaml:2: workloads[0].probePorts[0]: invalid type: floating point `80.5`, \
             expected a port number (1-65535)"
        );
    }

    #[test]
    fn empty_names() {
        assert_eq!(
            err("workloads:\n- name: \"\"\n"),
            "workloads.yaml:2: workloads[0].name: must not be empty"
        );
        assert_eq!(
            err("services:\n- name: s\n  namespace: \" \"\n"),
            "workloads.yaml:3: services[0].namespace: must not be empty"
        );
        assert_eq!(
            err("workloads:\n- name: ~\n  namespace: ns\n  ip: 10.0.0.1\n  node: n\n"),
            "workloads.yaml:2: workloads[0].name: must not be empty"
        );
        assert_eq!(
            err("workloads:\n- name: a\n  ip:\n  namespace: ns\n  node: n\n"),
            "workloads.yaml:3: workloads[0].ip: must not be empty"
        );
        assert_eq!(
            err("workloads:\n- name: a\n  serviceAccount: ''\n"),
            "workloads.yaml:3: workloads[0].serviceAccount: must not be empty"
        );
        assert_eq!(
            err("services:\n- name: s\n  namespace: ns\n  ports: [{name: '', port: 80}]\n"),
            "workloads.yaml:4: services[0].ports[0].name: must not be empty"
        );
        assert_eq!(
            err("workloads:\n- name: a\n  netns: netns/a\n"),
            "workloads.yaml:3: workloads[0].netns: must be an absolute path, got \"netns/a\""
        );
    }

    #[test]
    fn duplicate_pods() {
        let src = format!(
            "workloads:\n{}- name: frontend\n  namespace: hipster-app\n  ip: 10.0.0.2\n  node: n1\n",
            "- name: frontend\n  namespace: hipster-app\n  ip: 10.0.0.1\n  node: n1\n"
        );
        assert_eq!(
            err(&src),
            "workloads.yaml:6: workloads[1]: duplicate pod frontend.hipster-app (first at line 2)"
        );
        // Same name in another namespace is a different pod.
        let src = format!("workloads:\n{}{}", pod("a", "10.0.0.1"), pod("b", "10.0.0.2"));
        assert!(parse(&src).is_ok());
    }

    #[test]
    fn duplicate_pod_ips() {
        let src = format!("workloads:\n{}{}", pod("a", "fd00::1"), pod("b", "\"fd00:0::1\""));
        assert_eq!(
            err(&src),
            "workloads.yaml:8: workloads[1].ip: duplicate IP fd00::1 (first used by pod a.ns at \
             line 4)"
        );
        // IPv4 and its mapped IPv6 form are the same address.
        let src =
            format!("workloads:\n{}{}", pod("a", "10.0.0.1"), pod("b", "\"::ffff:10.0.0.1\""));
        assert!(err(&src).starts_with("workloads.yaml:8: workloads[1].ip: duplicate IP 10.0.0.1"));
    }

    #[test]
    fn every_address_of_a_pod_from_ips() {
        let src = "workloads:\n- name: a\n  namespace: ns\n  ip: 10.0.0.1\n  ips: [10.0.0.9, \"fd00::1\", 10.0.0.1]\n  node: n1\n";
        let set = parse(src).unwrap();
        let w = &set.workloads[0];
        let ips: Vec<IpAddr> =
            ["10.0.0.1", "10.0.0.9", "fd00::1"].map(|a| a.parse().unwrap()).into();
        assert_eq!(w.ips, ips, "primary first, then the listed ones");
        for a in &ips {
            assert_eq!(set.by_ip(*a).map(Workload::key).as_deref(), Some("a.ns"), "{a}");
        }
        assert!(w.has_ip("::ffff:10.0.0.9".parse().unwrap()), "IPv4-mapped form");
        assert!(!w.has_ip("10.0.0.2".parse().unwrap()));
        // Without `ips`, the pod has its one address.
        let set = parse(&format!("workloads:\n{}", pod("b", "10.0.0.2"))).unwrap();
        assert_eq!(set.workloads[0].ips, vec!["10.0.0.2".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn invalid_and_duplicate_ips_name_their_line_and_field() {
        let head = "workloads:\n- name: a\n  namespace: ns\n  ip: 10.0.0.1\n  node: n1\n";
        assert_eq!(
            err(&format!("{head}  ips: [10.0.0.2, 10.0.0.300]\n")),
            "workloads.yaml:6: workloads[0].ips[1]: invalid IP address \"10.0.0.300\""
        );
        assert_eq!(
            err(&format!("{head}  ips:\n  - 10.0.0.2\n  - 10.0.0.2\n")),
            "workloads.yaml:8: workloads[0].ips[1]: duplicate IP 10.0.0.2 (first at line 7)"
        );
        assert!(err(&format!("{head}  ips: 10.0.0.2\n"))
            .starts_with("workloads.yaml:6: workloads[0].ips: "));
        // Across pods, any address of one is no other's.
        let src = format!("{head}  ips: [\"fd00::1\"]\n- name: b\n  namespace: ns\n  ip: 10.0.0.2\n  ips: [\"fd00::1\"]\n  node: n1\n");
        assert_eq!(
            err(&src),
            "workloads.yaml:10: workloads[1].ips[0]: duplicate IP fd00::1 (first used by pod a.ns \
             at line 6)"
        );
        let src = format!(
            "{head}  ips: [10.0.0.5]\n- name: b\n  namespace: ns\n  ip: 10.0.0.5\n  node: n1\n"
        );
        assert!(err(&src).starts_with("workloads.yaml:9: workloads[1].ip: duplicate IP 10.0.0.5"));
        let src = format!(
            "{head}  ips: [10.0.0.5]\nservices:\n- name: s\n  namespace: ns\n  vip: 10.0.0.5\n"
        );
        assert_eq!(
            err(&src),
            "workloads.yaml:10: services[0].vip: VIP 10.0.0.5 is also the IP of pod a.ns (at line 6)"
        );
    }

    #[test]
    fn duplicate_services_vips_and_ports() {
        let svc = |name: &str, vip: &str| {
            format!("- name: {name}\n  namespace: ns\n  vip: {vip}\n  ports: [{{port: 80}}]\n")
        };
        let src = format!("services:\n{}{}", svc("s", "10.96.0.1"), svc("s", "10.96.0.2"));
        assert_eq!(
            err(&src),
            "workloads.yaml:6: services[1]: duplicate service s.ns (first at line 2)"
        );
        let src = format!("services:\n{}{}", svc("s", "10.96.0.1"), svc("t", "10.96.0.1"));
        assert_eq!(
            err(&src),
            "workloads.yaml:8: services[1].vip: duplicate VIP 10.96.0.1 (first used by service \
             s.ns at line 4)"
        );
        let src =
            format!("workloads:\n{}services:\n{}", pod("a", "10.0.0.1"), svc("s", "10.0.0.1"));
        assert_eq!(
            err(&src),
            "workloads.yaml:9: services[0].vip: VIP 10.0.0.1 is also the IP of pod a.ns (at line 4)"
        );
        let src = "services:\n- name: s\n  namespace: ns\n  ports:\n  - port: 80\n  - port: 81\n  - port: 80\n    targetPort: 8080\n";
        assert_eq!(
            err(src),
            "workloads.yaml:7: services[0].ports[2].port: duplicate port 80 (first at line 5)"
        );
        let src = "services:\n- name: s\n  namespace: ns\n  ports:\n  - {name: web, port: 80}\n  - {name: web, port: 81}\n";
        assert_eq!(
            err(src),
            "workloads.yaml:6: services[0].ports[1].name: duplicate port name web (first at line 5)"
        );
        let src = "workloads:\n- name: a\n  namespace: ns\n  ip: 10.0.0.1\n  node: n\n  probePorts:\n  - 8080\n  - 8080\n";
        assert_eq!(
            err(src),
            "workloads.yaml:8: workloads[0].probePorts[1]: duplicate port 8080 (first at line 7)"
        );
    }

    #[test]
    fn duplicate_keys() {
        let src = "workloads:\n- name: a\n  namespace: ns\n  labels:\n    app: a\n    app: b\n  ip: 10.0.0.1\n  node: n1\n";
        assert_eq!(
            err(src),
            "workloads.yaml:6: workloads[0].labels.app: duplicate key (first at line 5)"
        );
        // serde_yaml rejects a repeated struct field itself, but at the
        // mapping's line.
        assert_eq!(
            err("workloads:\n- name: a\n  ip: 10.0.0.1\n  \"ip\": 10.0.0.2\n"),
            "workloads.yaml:4: workloads[0].ip: duplicate key (first at line 3)"
        );
        assert_eq!(
            err("workloads: []\nservices: []\nworkloads: []\n"),
            "workloads.yaml:3: workloads: duplicate key (first at line 1)"
        );
    }

    #[test]
    fn never_panics_on_truncated_or_mangled_input() {
        let mut inputs = Vec::new();
        for end in (0..=FULL.len()).filter(|&i| FULL.is_char_boundary(i)) {
            inputs.push(FULL[..end].to_string());
        }
        for (i, c) in FULL.char_indices().step_by(7) {
            for r in [":", "-", "[", "{", "\"", "&a ", "*a", "\t", "é", ""] {
                let mut s = FULL.to_string();
                s.replace_range(i..i + c.len_utf8(), r);
                inputs.push(s);
            }
        }
        // Nesting far beyond serde_yaml's recursion limit.
        inputs.push("[".repeat(5_000));
        inputs.push(format!("workloads: {}1{}", "[".repeat(5_000), "]".repeat(5_000)));
        for src in &inputs {
            if let Err(e) = parse(src) {
                let _ = e.to_string();
            }
        }
    }

    mod load {
        use super::*;
        use std::fs;

        fn write(dir: &Path, text: &str) -> PathBuf {
            let path = dir.join("workloads.yaml");
            fs::write(&path, text).unwrap();
            path
        }

        #[test]
        fn checks_netns_of_own_node_only() {
            let dir = tempfile::tempdir().unwrap();
            let netns = dir.path().join("frontend");
            fs::write(&netns, "").unwrap();
            let text = format!(
                "workloads:\n\
                 - {{name: frontend, namespace: ns, ip: 10.0.0.1, node: node1, netns: {}}}\n\
                 - {{name: cart, namespace: ns, ip: 10.0.0.2, node: node2}}\n\
                 - {{name: ads, namespace: ns, ip: 10.0.0.3, node: node2, netns: /nonexistent}}\n",
                netns.display()
            );
            let path = write(dir.path(), &text);
            let set = WorkloadSet::load(&path, "node1").unwrap();
            assert_eq!(set.workloads.len(), 3);
            assert_eq!(set.on_node("node1").count(), 1);
        }

        #[test]
        fn netns_missing_for_own_node() {
            let dir = tempfile::tempdir().unwrap();
            let path = write(
                dir.path(),
                &format!("workloads:\n{}{}", pod("a", "10.0.0.1"), pod("b", "10.0.0.2")),
            );
            let e = WorkloadSet::load(&path, "n1").unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "{}:2: workloads[0].netns: missing (required for pods of node n1)",
                    path.display()
                )
            );
            assert_eq!(e.line(), Some(2));
            // Pods of other nodes need no netns.
            assert!(WorkloadSet::load(&path, "n2").is_ok());
        }

        #[test]
        fn netns_does_not_exist() {
            let dir = tempfile::tempdir().unwrap();
            let present = dir.path().join("present");
            fs::write(&present, "").unwrap();
            let gone = dir.path().join("cart");
            let text = format!(
                "workloads:\n{}  netns: {}\n{}  netns: {}\n",
                pod("a", "10.0.0.1"),
                present.display(),
                pod("cart", "10.0.0.2"),
                gone.display()
            );
            let path = write(dir.path(), &text);
            let e = WorkloadSet::load(&path, "n1").unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "{}:11: workloads[1].netns: {} does not exist",
                    path.display(),
                    gone.display()
                )
            );
        }

        #[test]
        fn unreadable_file_and_parse_errors() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("missing.yaml");
            let e = WorkloadSet::load(&path, "n1").unwrap_err();
            assert!(matches!(e, WorkloadsError::Read { .. }), "{e:?}");
            assert!(e.to_string().starts_with(&format!("{}: cannot read: ", path.display())));

            let path = write(dir.path(), "workloads:\n- name: a\n  ip: 10.0.0.300\n");
            let e = WorkloadSet::load(&path, "n1").unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("{}:3: workloads[0].ip: invalid IP address \"10.0.0.300\"", path.display())
            );
        }
    }

    #[test]
    fn a_label_or_probe_port_change_keeps_the_identity_anything_else_does_not() {
        let w = Workload {
            name: "a".into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
            labels: BTreeMap::from([("app".to_owned(), "a".to_owned())]).into(),
            ip: "10.0.0.1".parse().unwrap(),
            ips: vec!["10.0.0.1".parse().unwrap()],
            node: "n1".into(),
            netns: None,
            probe_ports: vec![],
            uid: Some("u1".into()),
        };
        let mut relabelled = w.clone();
        relabelled.labels = relabelled.labels.with("tier", "secure");
        relabelled.probe_ports.push(8080);
        assert!(w.same_identity(&relabelled));
        let changes: [fn(&mut Workload); 5] = [
            |w| w.service_account = "other".into(),
            |w| w.uid = Some("u2".into()),
            |w| w.ips.push("10.0.0.9".parse().unwrap()),
            |w| w.netns = Some("/run/netns/x".into()),
            |w| w.namespace = "other".into(),
        ];
        for change in changes {
            let mut other = w.clone();
            change(&mut other);
            assert!(!w.same_identity(&other), "{other:?}");
        }
    }
}
