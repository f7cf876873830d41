//! mTLS policy: which mode (STRICT, PERMISSIVE or DISABLE) applies to traffic
//! arriving at a port of a workload, and which policy decided it.
//!
//! # Inputs
//!
//! Every `*.yaml` / `*.yml` file directly inside the policy directory (not
//! recursive; hidden files are skipped; symlinks are followed, so a mounted
//! ConfigMap works). A file may hold several documents separated by `---`.
//! Two kinds of policy are read:
//!
//! * `security.istio.io/v1beta1` or `security.istio.io/v1` `PeerAuthentication`:
//!   - no selector in the root namespace (default `istio-system`, see
//!     [`PolicySet::with_root_namespace`]): **mesh-wide**;
//!   - no selector in another namespace: **namespace-wide**;
//!   - `spec.selector.matchLabels` (non-empty) in another namespace:
//!     **workload** policy for the pods of its namespace carrying those labels;
//!   - a selector in the root namespace is ignored (with a warning), as in Istio;
//!   - `spec.portLevelMtls` (keys are *workload* ports, 1-65535) overrides the
//!     mode per port and requires a selector.
//!
//!   Precedence: workload port > workload > namespace > mesh. Within one level
//!   only the oldest policy counts (`metadata.creationTimestamp`, ties by
//!   name). A policy without a timestamp (a file that never went through the
//!   API server) counts as newer than every timestamped one: applied now, the
//!   API server would stamp it with the current time. A mode of `UNSET`
//!   (or no `mtls` at all) inherits from the level above; a port-level `UNSET`
//!   takes the workload's effective mode.
//!
//! * `authentication.istio.io/v1alpha1` `Policy` (namespaced) and `MeshPolicy`
//!   (cluster-scoped), the API of Istio 1.0-1.4 used by older workshops:
//!   - `spec.peers`: the first `mtls` peer decides. `mtls: {}`, `mtls:` (null)
//!     and `mode: STRICT` are STRICT; `mode: PERMISSIVE` is PERMISSIVE. No
//!     peers, or no `mtls` peer, is plaintext only, i.e. DISABLE.
//!     `peerIsOptional`, `origins`, `originIsOptional` and `principalBinding`
//!     are accepted but do not change the mode (origins with a warning: JWT is
//!     not enforced).
//!   - `spec.targets[]` names *services* of the policy's namespace, optionally
//!     with *service* ports (`number` or `name`). A service port stands for its
//!     `targetPort` on the pods the service selects. A target without ports
//!     covers the ports the service exposes (its target ports); other ports of
//!     those pods fall through to the namespace and mesh policies.
//!   - Naming rule (as Istio validated it): a Policy without targets is
//!     namespace-wide and must be named `default`; a Policy named `default`
//!     must not have targets; a MeshPolicy must be named `default` and have no
//!     targets. Violations reject the document.
//!
//!   Precedence for a pod port: service+port > service > the namespace's
//!   `default` Policy > the `default` MeshPolicy; the oldest wins within each.
//!
//! # How the two APIs combine
//!
//! For a workload and a port: if any PeerAuthentication applies at any level
//! (mesh, namespace, workload or that port) with a mode other than `UNSET`,
//! PeerAuthentication decides, exactly as above. Otherwise the v1alpha1 chain
//! decides if any of its policies matches. Otherwise the mode is PERMISSIVE
//! ("no policy"). PeerAuthentication is the newer API; letting it win means a
//! cluster can migrate one namespace at a time by adding PeerAuthentications
//! next to the old Policies. It also means a mesh-wide PERMISSIVE
//! PeerAuthentication overrides a namespace's STRICT v1alpha1 Policy, so
//! [`PolicySet::lint`] warns, naming both, wherever a PeerAuthentication
//! overrides a v1alpha1 policy that would otherwise decide.
//!
//! # Errors and warnings
//!
//! * `security.istio.io/v1beta1` or `v1` `AuthorizationPolicy`: read here, judged by
//!   [`crate::authz`] ([`PolicySet::authorize`]); they never change a mode.
//!
//! Documents of other kinds (DestinationRule, ...) are skipped with a [`Warning`]. An invalid document (bad YAML, unknown mode,
//! wrong type, missing name, unknown field in `spec`, naming-rule violation,
//! `portLevelMtls` without selector, bad port, duplicate object) is a
//! [`PolicyError`] naming the file, line, field and reason, e.g.
//! `policies/x.yaml:12: spec.mtls.mode: unknown mode "STRCT" (expected UNSET,
//! DISABLE, PERMISSIVE or STRICT)`. Loading a directory fails as a whole if any
//! document is invalid, so the caller can keep its last good set. Unknown
//! `metadata` fields and `status` are ignored.
//!
//! [`PolicySet::warnings`] (skipped documents, ignored fields, root-namespace
//! selectors, same-level conflicts) is computed from the set, so it always
//! follows the root namespace in use; [`PolicySet::lint`] adds what needs the
//! workloads.

mod parse;
mod report;
mod resolve;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::workloads::{Workload, WorkloadSet};
use crate::yamlde::{At, FieldPrefix};

pub(crate) use parse::Port;
pub use report::{render_check, render_report};

/// The root namespace used unless [`PolicySet::with_root_namespace`] says otherwise.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// The effective mTLS mode of a workload port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Mode {
    /// Only mutual TLS (with a client certificate) is accepted.
    Strict,
    /// Mutual TLS and plaintext are both accepted.
    Permissive,
    /// Plaintext only: the port is not tunneled.
    Disable,
}

impl Mode {
    /// `STRICT`, `PERMISSIVE` or `DISABLE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Strict => "STRICT",
            Mode::Permissive => "PERMISSIVE",
            Mode::Disable => "DISABLE",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The scope of the policy that decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Level {
    Mesh,
    Namespace,
    Workload,
    WorkloadPort,
    Service,
    ServicePort,
}

impl Level {
    /// Lowercase words: `mesh`, `namespace`, `workload`, `workload port`,
    /// `service`, `service port`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Mesh => "mesh",
            Level::Namespace => "namespace",
            Level::Workload => "workload",
            Level::WorkloadPort => "workload port",
            Level::Service => "service",
            Level::ServicePort => "service port",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which policy object, and where it was defined.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRef {
    /// `PeerAuthentication`, `Policy` or `MeshPolicy`.
    pub kind: String,
    /// `None` for the cluster-scoped MeshPolicy.
    pub namespace: Option<String>,
    pub name: String,
    pub file: PathBuf,
    /// 1-based line where the document starts.
    pub line: usize,
}

impl PolicyRef {
    /// `kind namespace/name`, e.g. `PeerAuthentication hipster-app/default`.
    pub fn describe(&self) -> String {
        format!("{} {self}", self.kind)
    }

    /// `file:line`.
    pub fn location(&self) -> String {
        format!("{}:{}", self.file.display(), self.line)
    }
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// The effective mode for a workload port and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub mode: Mode,
    /// `None` when no policy applies (PERMISSIVE by default).
    pub decided_by: Option<PolicyRef>,
    pub level: Option<Level>,
    /// Plain words, e.g. `namespace-wide PeerAuthentication hipster-app/default (STRICT)`.
    pub reason: String,
}

/// A policy that was considered for a workload but decided nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ignored {
    pub policy: PolicyRef,
    pub why: String,
}

/// Something the operator should know that does not make the input invalid.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Warning {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

/// For `policy check`: the decisions for one workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadReport {
    /// `name.namespace`.
    pub workload: String,
    /// The mode of every port not listed in `ports`.
    pub default: Decision,
    /// Every port some policy names for this workload, ascending.
    #[serde(serialize_with = "serialize_ports")]
    pub ports: Vec<(u16, Decision)>,
    /// Policies considered for this workload that decided nothing, and why.
    pub ignored: Vec<Ignored>,
}

/// `ports` as `[{"port": 8080, "mode": ..., ...}]` rather than pairs.
fn serialize_ports<S: serde::Serializer>(
    ports: &[(u16, Decision)],
    s: S,
) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct PortDecision<'a> {
        port: u16,
        #[serde(flatten)]
        decision: &'a Decision,
    }
    s.collect_seq(ports.iter().map(|(port, decision)| PortDecision { port: *port, decision }))
}

/// Why a policy file or directory was rejected.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A file or the directory could not be read. The OS error is the source, not part of
    /// the message, so an error chain (`{:#}`) names it once.
    #[error("{}: cannot read", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The text is not well-formed YAML.
    #[error("{}: invalid YAML: {message}", At(file, *line))]
    Syntax { file: PathBuf, line: Option<usize>, message: String },
    /// Well-formed YAML that is not a valid policy. `field` is a path such as
    /// `spec.mtls.mode` (empty for the whole document).
    #[error("{}: {}{message}", At(file, *line), FieldPrefix(field))]
    Invalid { file: PathBuf, line: Option<usize>, field: String, message: String },
}

impl PolicyError {
    /// The file (or directory) the error is about.
    pub fn file(&self) -> &Path {
        match self {
            Self::Read { path, .. } => path,
            Self::Syntax { file, .. } | Self::Invalid { file, .. } => file,
        }
    }

    /// The 1-based line the error points at, if known.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Read { .. } => None,
            Self::Syntax { line, .. } | Self::Invalid { line, .. } => *line,
        }
    }
}

/// A parsed `metadata.creationTimestamp`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Created {
    /// Seconds and nanoseconds since the Unix epoch (UTC), for ordering.
    secs: i64,
    nanos: u32,
    /// As written, for messages.
    text: String,
}

/// Identity, origin and age of a policy object.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    r: PolicyRef,
    created: Option<Created>,
}

impl Meta {
    /// Sorts oldest first: timestamped before untimestamped, then by time,
    /// then by name (and namespace).
    fn age_key(&self) -> (bool, i64, u32, &str, Option<&str>) {
        let (secs, nanos) = self.created.as_ref().map_or((0, 0), |c| (c.secs, c.nanos));
        (self.created.is_none(), secs, nanos, &self.r.name, self.r.namespace.as_deref())
    }
}

/// A PeerAuthentication.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PeerAuth {
    meta: Meta,
    /// Empty means no selector (mesh- or namespace-wide).
    selector: BTreeMap<String, String>,
    /// `None` is UNSET.
    mode: Option<Mode>,
    /// Workload port to mode (`None` is UNSET).
    ports: BTreeMap<u16, Option<Mode>>,
}

impl PeerAuth {
    fn namespace(&self) -> &str {
        self.meta.r.namespace.as_deref().unwrap_or_default()
    }

    fn selects(&self, w: &Workload) -> bool {
        self.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
    }
}

/// A port of a v1alpha1 target: a service port number or name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PortSel {
    Number(u16),
    Name(String),
}

impl fmt::Display for PortSel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSel::Number(n) => write!(f, "{n}"),
            PortSel::Name(name) => f.write_str(name),
        }
    }
}

/// One entry of a v1alpha1 `spec.targets`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// Short service name in the policy's namespace.
    service: String,
    /// Line of the target entry.
    line: usize,
    /// Empty: every port of the service.
    ports: Vec<PortSel>,
}

/// A v1alpha1 Policy or MeshPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LegacyPolicy {
    meta: Meta,
    /// Empty for namespace-wide Policies and the MeshPolicy.
    targets: Vec<Target>,
    mode: Mode,
    /// Why the peers give that mode, e.g. "no peers: plaintext only".
    mode_note: Option<&'static str>,
}

impl LegacyPolicy {
    fn is_mesh(&self) -> bool {
        self.meta.r.namespace.is_none()
    }

    /// `STRICT`, or `DISABLE: no peers, plaintext only`.
    fn mode_text(&self) -> String {
        match self.mode_note {
            Some(note) => format!("{}: {note}", self.mode),
            None => self.mode.to_string(),
        }
    }
}

/// A validated set of policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySet {
    root: String,
    peer: Vec<PeerAuth>,
    legacy: Vec<LegacyPolicy>,
    /// AuthorizationPolicies (`CUSTOM` and `targetRefs` ones are left out when read).
    authz: Vec<crate::authz::AuthzPolicy>,
    /// Warnings found while parsing (independent of the root namespace).
    notes: Vec<Warning>,
}

impl Default for PolicySet {
    fn default() -> Self {
        Self::empty()
    }
}

impl PolicySet {
    /// No policies: every port is PERMISSIVE.
    pub fn empty() -> Self {
        PolicySet {
            root: DEFAULT_ROOT_NAMESPACE.to_string(),
            peer: Vec::new(),
            legacy: Vec::new(),
            authz: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Loads every `*.yaml` / `*.yml` file directly in `dir`, in file-name
    /// order, with `root_namespace` as the root namespace. Fails as a whole if
    /// any document is invalid or if two documents define the same object.
    /// The warnings are [`warnings`](Self::warnings) (and, against workloads,
    /// [`lint`](Self::lint)): computed from the set, so always for its root.
    pub fn load_dir(dir: &Path, root_namespace: &str) -> Result<PolicySet, PolicyError> {
        let read_err = |source| PolicyError::Read { path: dir.to_path_buf(), source };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let yaml = Path::new(name)
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
            if !yaml || name.starts_with('.') {
                continue;
            }
            let path = dir.join(name);
            // Follows symlinks; directories named *.yaml are not files.
            if path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        let mut builder = parse::Builder::default();
        for path in &files {
            let src = std::fs::read_to_string(path)
                .map_err(|source| PolicyError::Read { path: path.clone(), source })?;
            builder.add_file(&src, path)?;
        }
        tracing::debug!(dir = %dir.display(), files = files.len(), "policies parsed");
        Ok(builder.finish().with_root_namespace(root_namespace))
    }

    /// Parses the text of one file; `origin` is used in messages. The root
    /// namespace is [`DEFAULT_ROOT_NAMESPACE`] until
    /// [`with_root_namespace`](Self::with_root_namespace) says otherwise.
    pub fn parse(src: &str, origin: &Path) -> Result<PolicySet, PolicyError> {
        let mut builder = parse::Builder::default();
        builder.add_file(src, origin)?;
        Ok(builder.finish())
    }

    /// Builds a set from separate objects, each one document with its own origin (the API
    /// server's objects), with `root_namespace` as the root namespace: an invalid object is
    /// left out and its error returned, and the others stay in force.
    pub fn from_documents<'a>(
        docs: impl IntoIterator<Item = (&'a str, &'a Path)>,
        root_namespace: &str,
    ) -> (PolicySet, Vec<PolicyError>) {
        let mut builder = parse::Builder::default();
        let mut errors = Vec::new();
        for (src, origin) in docs {
            // Checked alone first, so a rejected object leaves nothing behind in the set.
            if let Err(e) = parse::Builder::default().add_file(src, origin) {
                // The API server took it, so it was meant to be in force: a rejected
                // AuthorizationPolicy must not leave its workloads open (fail closed).
                builder.add_authz_stand_in(src, origin);
                errors.push(e);
                continue;
            }
            if let Err(e) = builder.add_file(src, origin) {
                errors.push(e);
            }
        }
        (builder.finish().with_root_namespace(root_namespace), errors)
    }

    /// Sets the root namespace (MeshConfig `rootNamespace`): its
    /// PeerAuthentications without selector are mesh-wide.
    pub fn with_root_namespace(mut self, ns: &str) -> Self {
        self.root = ns.to_string();
        self
    }

    /// The root namespace in use.
    pub fn root_namespace(&self) -> &str {
        &self.root
    }

    /// Number of policy objects (PeerAuthentications, Policies, MeshPolicies and
    /// AuthorizationPolicies).
    pub fn len(&self) -> usize {
        self.peer.len() + self.legacy.len() + self.authz.len()
    }

    /// Whether there are no policies at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every policy object, in load order: PeerAuthentications first, AuthorizationPolicies
    /// last.
    pub fn policies(&self) -> impl Iterator<Item = &PolicyRef> {
        self.peer
            .iter()
            .map(|p| &p.meta.r)
            .chain(self.legacy.iter().map(|p| &p.meta.r))
            .chain(self.authz.iter().map(|p| &p.r))
    }

    /// The AuthorizationPolicies that apply to workload `w` (root namespace, its namespace,
    /// its labels), in load order.
    pub fn authz_for<'a>(
        &'a self,
        w: &'a Workload,
    ) -> impl Iterator<Item = &'a crate::authz::AuthzPolicy> + 'a {
        self.authz.iter().filter(move |p| p.applies_to(&self.root, w))
    }

    /// Every AuthorizationPolicy of the set.
    pub fn authz_policies(&self) -> &[crate::authz::AuthzPolicy] {
        &self.authz
    }

    /// What the AuthorizationPolicies decide for connection `c` to workload `w`.
    pub fn authorize(&self, w: &Workload, c: &crate::authz::Conn<'_>) -> crate::authz::Verdict {
        crate::authz::evaluate(&self.authz, &self.root, w, c)
    }

    /// [`authorize`](Self::authorize) with what every applicable policy said (`policy check`).
    pub fn explain_authz(&self, w: &Workload, c: &crate::authz::Conn<'_>) -> crate::authz::Verdict {
        crate::authz::explain(&self.authz, &self.root, w, c)
    }

    /// The warnings of this set for its current root namespace: skipped
    /// documents and ignored fields found while parsing, PeerAuthentications
    /// with a selector in the root namespace, and same-level conflicts.
    pub fn warnings(&self) -> Vec<Warning> {
        let mut out = self.notes.clone();
        let mut groups: HashMap<&str, Vec<&PeerAuth>> = HashMap::new();
        for p in &self.peer {
            if p.namespace() == self.root && !p.selector.is_empty() {
                out.push(Warning {
                    file: p.meta.r.file.clone(),
                    line: p.meta.r.line,
                    message: format!(
                        "PeerAuthentication {}: selector in the root namespace {} is ignored \
                         (a root-namespace PeerAuthentication applies mesh-wide and must have no selector)",
                        p.meta.r, self.root
                    ),
                });
            }
            if p.selector.is_empty() {
                groups.entry(p.namespace()).or_default().push(p);
            }
        }
        let mut conflicts = Vec::new();
        for (ns, mut group) in groups {
            if group.len() < 2 {
                continue;
            }
            group.sort_by(|a, b| a.meta.age_key().cmp(&b.meta.age_key()));
            let (winner, rest) = group.split_at(1);
            let Some(winner) = winner.first() else { continue };
            let level = if ns == self.root { "mesh" } else { "namespace" };
            for p in rest {
                conflicts.push(Warning {
                    file: p.meta.r.file.clone(),
                    line: p.meta.r.line,
                    message: format!(
                        "{level}-wide PeerAuthentication {} is ignored: {}",
                        p.meta.r,
                        resolve::lost_to(&winner.meta, &p.meta, level)
                    ),
                });
            }
        }
        conflicts.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        out.extend(conflicts);
        out
    }

    /// Checks the policies against the workloads: v1alpha1 targets naming
    /// services or service ports that do not exist (such a target has no
    /// effect), and v1alpha1 policies that a PeerAuthentication overrides for
    /// some workload (naming both). Not part of [`warnings`](Self::warnings)
    /// because the workloads change far more often than the policies.
    pub fn lint(&self, ws: &WorkloadSet) -> Vec<Warning> {
        resolve::lint(self, ws)
    }

    /// Effective mode for traffic to `port` of workload `w`.
    pub fn decide(&self, ws: &WorkloadSet, w: &Workload, port: u16) -> Decision {
        resolve::Resolver::new(self, ws, w).slot(Some(port)).decision
    }

    /// The mode for every port without a port-specific rule, plus every port
    /// that some policy names for this workload (PeerAuthentication
    /// `portLevelMtls` keys, v1alpha1 service ports mapped to target ports),
    /// ascending, even where equal to the default: what the eBPF enforcement
    /// map needs.
    pub fn workload_modes(
        &self,
        ws: &WorkloadSet,
        w: &Workload,
    ) -> (Decision, Vec<(u16, Decision)>) {
        let r = resolve::Resolver::new(self, ws, w);
        let default = r.slot(None).decision;
        let ports = r.ports().into_iter().map(|p| (p, r.slot(Some(p)).decision)).collect();
        (default, ports)
    }

    /// For `policy check`: per workload (in the order of `ws`), the default
    /// and port decisions, and every policy that was considered but decided
    /// nothing, and why.
    pub fn report(&self, ws: &WorkloadSet) -> Vec<WorkloadReport> {
        ws.workloads.iter().map(|w| resolve::Resolver::new(self, ws, w).report()).collect()
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    pub const WORKLOADS: &str = "\
workloads:
- {name: frontend, namespace: hipster-app, labels: {app: frontend}, ip: 10.0.0.1, node: n1}
- {name: cart, namespace: hipster-app, labels: {app: cart, version: v1}, ip: 10.0.0.2, node: n1}
- {name: cart-2, namespace: hipster-app, labels: {app: cart, version: v2}, ip: 10.0.0.3, node: n1}
- {name: redis, namespace: hipster-app, labels: {app: redis}, ip: 10.0.0.4, node: n1}
- {name: web, namespace: other, labels: {app: frontend}, ip: 10.0.0.5, node: n1}
- {name: istiod, namespace: istio-system, labels: {app: istiod}, ip: 10.0.0.6, node: n1}
services:
- name: frontend
  namespace: hipster-app
  selector: {app: frontend}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: grpc, port: 9000, targetPort: 9090}]
- name: cart
  namespace: hipster-app
  selector: {app: cart}
  ports: [{port: 7070}, {name: metrics, port: 9100, targetPort: 9101}]
- name: cart-v2
  namespace: hipster-app
  selector: {app: cart, version: v2}
  ports: [{name: admin, port: 7777, targetPort: 7070}]
- name: web
  namespace: other
  selector: {app: frontend}
  ports: [{port: 80, targetPort: 8080}]
";

    pub fn workloads() -> WorkloadSet {
        WorkloadSet::parse(WORKLOADS, Path::new("workloads.yaml")).expect("test workloads")
    }

    /// Parses `src` as `policies/test.yaml`, panicking with the error.
    pub fn set(src: &str) -> PolicySet {
        match PolicySet::parse(src, Path::new("policies/test.yaml")) {
            Ok(set) => set,
            Err(e) => panic!("rejected: {e}\n{src}"),
        }
    }

    /// The error `src` is rejected with.
    pub fn err(src: &str) -> String {
        match PolicySet::parse(src, Path::new("policies/test.yaml")) {
            Ok(set) => panic!("accepted: {set:?}\n{src}"),
            Err(e) => e.to_string(),
        }
    }

    /// A PeerAuthentication document.
    pub fn pa(ns: &str, name: &str, created: Option<&str>, spec: &str) -> String {
        let ts = created.map(|t| format!("  creationTimestamp: \"{t}\"\n")).unwrap_or_default();
        format!(
            "---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {ns}\n{ts}spec:\n{spec}"
        )
    }

    /// A v1alpha1 Policy (`ns` = None: MeshPolicy) document.
    pub fn legacy(ns: Option<&str>, name: &str, created: Option<&str>, spec: &str) -> String {
        let ts = created.map(|t| format!("  creationTimestamp: \"{t}\"\n")).unwrap_or_default();
        let (kind, ns) = match ns {
            Some(ns) => ("Policy", format!("  namespace: {ns}\n")),
            None => ("MeshPolicy", String::new()),
        };
        format!(
            "---\napiVersion: authentication.istio.io/v1alpha1\nkind: {kind}\nmetadata:\n  name: {name}\n{ns}{ts}spec:\n{spec}"
        )
    }
}
