//! YAML text to validated policies.
//!
//! Each file is read in three passes:
//! 1. yaml-rust2 builds a [`YamlIndex`] (syntax check and line numbers);
//! 2. serde_yaml reads a lenient header (apiVersion, kind, name) of every
//!    document, so that unrelated kinds are skipped whatever they contain;
//! 3. serde_yaml reads the documents of known kinds into strict structs,
//!    which gives errors with a field path and a line.
//!
//! serde_yaml's multi-document iterator must not be advanced past a document
//! that failed (it can loop forever or panic on the events that follow a
//! syntax error), so every pass stops at the first error.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::{
    Created, LegacyPolicy, Meta, Mode, PeerAuth, PolicyError, PolicyRef, PolicySet, PortSel,
    Target, Warning,
};
use crate::authz;
use crate::yamlde::{checked_str, present, split_serde_message, strip_location, Name};
use crate::yamlpos::{self, YamlIndex};

const PA_KIND: &str = "PeerAuthentication";
const POLICY_KIND: &str = "Policy";
const MESH_POLICY_KIND: &str = "MeshPolicy";
const PA_VERSIONS: [&str; 2] = ["security.istio.io/v1beta1", "security.istio.io/v1"];
const LEGACY_VERSION: &str = "authentication.istio.io/v1alpha1";

/// Accumulates the policies of several files.
#[derive(Default)]
pub(super) struct Builder {
    peer: Vec<PeerAuth>,
    legacy: Vec<LegacyPolicy>,
    authz: Vec<crate::authz::AuthzPolicy>,
    notes: Vec<Warning>,
    /// (kind, namespace, name) to the first definition, to reject duplicates.
    seen: HashMap<(String, Option<String>, String), PolicyRef>,
}

impl Builder {
    /// Parses one file and adds its policies.
    pub(super) fn add_file(&mut self, src: &str, file: &Path) -> Result<(), PolicyError> {
        let index = YamlIndex::parse(src).map_err(|e| PolicyError::Syntax {
            file: file.to_path_buf(),
            line: Some(e.line),
            message: e.message,
        })?;

        let mut headers = Vec::new();
        for (doc, de) in serde_yaml::Deserializer::from_str(src).enumerate() {
            let ctx = DocCtx { file, index: &index, doc };
            let header = Option::<Header>::deserialize(de).map_err(|e| ctx.serde_error(&e))?;
            headers.push(header);
        }

        let mut docs = serde_yaml::Deserializer::from_str(src);
        for (doc, header) in headers.into_iter().enumerate() {
            let Some(de) = docs.next() else { break };
            let ctx = DocCtx { file, index: &index, doc };
            let Some(Header { api_version, kind, name, namespace }) = header else {
                continue; // an empty document
            };
            let api_version = ctx.header_field(api_version, "apiVersion")?;
            let kind = ctx.header_field(kind, "kind")?;
            let known = match kind.as_str() {
                PA_KIND | authz::KIND => PA_VERSIONS.contains(&api_version.as_str()),
                POLICY_KIND | MESH_POLICY_KIND => api_version == LEGACY_VERSION,
                _ => false,
            };
            if !known {
                let object = match (namespace, name) {
                    (Some(ns), Some(name)) => format!(" {ns}/{name}"),
                    (None, Some(name)) => format!(" {name}"),
                    _ => String::new(),
                };
                self.notes.push(ctx.warning("", skipped_message(&api_version, &kind, &object)));
                continue;
            }
            // serde_yaml keeps the last of repeated keys; reject them instead.
            if let Some(dup) = index.duplicate_key(doc) {
                return Err(PolicyError::Invalid {
                    file: file.to_path_buf(),
                    line: Some(dup.line),
                    field: dup.path,
                    message: format!("duplicate key (first at line {})", dup.first_line),
                });
            }
            if kind == authz::KIND {
                let raw = RawObject::<authz::parse::RawSpec>::deserialize(de)
                    .map_err(|e| ctx.serde_error(&e))?;
                let (meta, _) = convert_meta(raw.metadata, authz::KIND, true, &ctx)?;
                self.remember(&meta.r, &ctx)?;
                let converted = authz::parse::convert(raw.spec, meta.r)
                    .map_err(|e| ctx.error(&e.path, e.message))?;
                for (path, message) in converted.warnings {
                    self.notes.push(ctx.warning(&path, message));
                }
                self.authz.extend(converted.policy);
            } else if kind == PA_KIND {
                let raw =
                    RawObject::<RawPaSpec>::deserialize(de).map_err(|e| ctx.serde_error(&e))?;
                let pa = convert_pa(raw, &ctx)?;
                self.remember(&pa.meta.r, &ctx)?;
                self.peer.push(pa);
            } else {
                let mesh = kind == MESH_POLICY_KIND;
                let raw =
                    RawObject::<RawLegacySpec>::deserialize(de).map_err(|e| ctx.serde_error(&e))?;
                let policy = convert_legacy(raw, mesh, &ctx, &mut self.notes)?;
                self.remember(&policy.meta.r, &ctx)?;
                self.legacy.push(policy);
            }
        }
        Ok(())
    }

    /// In place of an AuthorizationPolicy that was rejected: one that fails closed over its
    /// scope (namespace and selector, as far as they can be read). A DENY (or an unreadable
    /// action) denies everything there; an ALLOW allows nothing (only the other ALLOW
    /// policies admit); AUDIT and CUSTOM leave nothing. Anything else: nothing.
    pub(super) fn add_authz_stand_in(&mut self, src: &str, file: &Path) {
        let Ok(doc) = serde_yaml::from_str::<serde_yaml::Value>(src) else { return };
        let text = |v: &serde_yaml::Value| v.as_str().map(str::to_owned);
        if doc.get("kind").and_then(text).as_deref() != Some(authz::KIND) {
            return;
        }
        let meta = doc.get("metadata");
        let name = meta.and_then(|m| m.get("name")).and_then(text).unwrap_or_else(|| "?".into());
        let namespace = meta
            .and_then(|m| m.get("namespace"))
            .and_then(text)
            .unwrap_or_else(|| "default".into());
        let spec = doc.get("spec");
        let action = match spec.and_then(|s| s.get("action")) {
            None => Some(authz::Action::Allow),
            Some(a) => match a.as_str() {
                Some("ALLOW") => Some(authz::Action::Allow),
                Some("AUDIT") | Some("CUSTOM") => None,
                _ => Some(authz::Action::Deny),
            },
        };
        let Some(action) = action else { return };
        // An unreadable selector widens the scope to the namespace: closed, not open.
        let selector = spec
            .and_then(|s| s.get("selector"))
            .and_then(|s| s.get("matchLabels"))
            .and_then(|m| serde_yaml::from_value::<BTreeMap<String, String>>(m.clone()).ok())
            .filter(|m| !m.is_empty());
        let r = PolicyRef {
            kind: authz::KIND.to_owned(),
            namespace: Some(namespace),
            name,
            file: file.to_path_buf(),
            line: 1,
        };
        let (rules, what) = match action {
            authz::Action::Deny => (vec![authz::Rule::default()], "denies every connection"),
            _ => (Vec::new(), "allows nothing"),
        };
        self.notes.push(Warning {
            file: file.to_path_buf(),
            line: 1,
            message: format!(
                "{} {r} is invalid (see the error): in its place a policy that {what} in its scope \
                 is in force (fail closed) until it is fixed",
                authz::KIND
            ),
        });
        self.authz.push(authz::AuthzPolicy { r, selector, action, rules });
    }

    /// Rejects a second definition of the same object.
    fn remember(&mut self, r: &PolicyRef, ctx: &DocCtx<'_>) -> Result<(), PolicyError> {
        let key = (r.kind.clone(), r.namespace.clone(), r.name.clone());
        if let Some(first) = self.seen.get(&key) {
            return Err(ctx.error(
                "metadata.name",
                format!("duplicate {} {r} (first defined at {})", r.kind, first.location()),
            ));
        }
        self.seen.insert(key, r.clone());
        Ok(())
    }

    pub(super) fn finish(self) -> PolicySet {
        PolicySet {
            peer: self.peer,
            legacy: self.legacy,
            authz: self.authz,
            notes: self.notes,
            ..PolicySet::empty()
        }
    }
}

fn skipped_message(api_version: &str, kind: &str, object: &str) -> String {
    match kind {
        PA_KIND => format!(
            "skipped {kind}{object}: apiVersion {api_version} is not supported \
             (expected security.istio.io/v1beta1 or security.istio.io/v1)"
        ),
        POLICY_KIND | MESH_POLICY_KIND if api_version.starts_with("authentication.istio.io/") => {
            format!(
                "skipped {kind}{object}: apiVersion {api_version} is not supported \
                 (expected {LEGACY_VERSION})"
            )
        }
        "List" => format!(
            "skipped List{object} ({api_version}): objects inside a List are not read; \
             put each one in its own document (separated by ---)"
        ),
        authz::KIND => format!(
            "skipped {kind}{object}: apiVersion {api_version} is not supported \
             (expected security.istio.io/v1beta1 or security.istio.io/v1)"
        ),
        _ => format!(
            "skipped {kind}{object} ({api_version}): only PeerAuthentication, \
             AuthorizationPolicy (security.istio.io) and Policy/MeshPolicy ({LEGACY_VERSION}) are read"
        ),
    }
}

/// One document of one file, for locating errors.
struct DocCtx<'a> {
    file: &'a Path,
    index: &'a YamlIndex,
    doc: usize,
}

impl DocCtx<'_> {
    /// Line of `path`, or of the nearest enclosing value that exists.
    fn line(&self, path: &str) -> Option<usize> {
        self.index.nearest_line(self.doc, path)
    }

    /// Line where the document's content starts.
    fn start(&self) -> usize {
        self.index.line(self.doc, "").unwrap_or(1)
    }

    fn error(&self, field: &str, message: impl Into<String>) -> PolicyError {
        PolicyError::Invalid {
            file: self.file.to_path_buf(),
            line: self.line(field),
            field: field.to_string(),
            message: message.into(),
        }
    }

    fn warning(&self, path: &str, message: impl Into<String>) -> Warning {
        Warning {
            file: self.file.to_path_buf(),
            line: self.line(path).unwrap_or_else(|| self.start()),
            message: message.into(),
        }
    }

    fn header_field(&self, value: Option<Field>, name: &str) -> Result<String, PolicyError> {
        match value {
            Some(Field::Str(s)) if !s.trim().is_empty() => Ok(s),
            Some(Field::Str(_)) => Err(self.error(name, "must not be empty")),
            Some(Field::Other) => Err(self.error(name, "must be a string")),
            None => Err(self.error(name, "missing required field")),
        }
    }

    /// Turns a serde_yaml error into `file:line: field: message`.
    fn serde_error(&self, err: &serde_yaml::Error) -> PolicyError {
        let (serde_line, text) = strip_location(err);
        let (path, message) = split_serde_message(&text);
        let path = if path == "." { "" } else { path };
        if message.starts_with("duplicate field `") {
            if let Some(dup) = self.index.duplicate_key(self.doc) {
                return PolicyError::Invalid {
                    file: self.file.to_path_buf(),
                    line: Some(dup.line),
                    field: dup.path,
                    message: format!("duplicate key (first at line {})", dup.first_line),
                };
            }
        }
        let (field, message, line) = if let Some(rest) = message.strip_prefix("unknown field `") {
            let (name, expected) = rest.split_once('`').unwrap_or((rest, ""));
            let expected = expected.trim_start_matches(", ").replace('`', "");
            let message = if expected.is_empty() {
                "unknown field".to_string()
            } else {
                format!("unknown field ({expected})")
            };
            let field = yamlpos::join_key(path, name);
            let line = self.index.line(self.doc, &field).or(serde_line);
            (field, message, line)
        } else if let Some(rest) = message.strip_prefix("missing field `") {
            let field = yamlpos::join_key(path, rest.trim_end_matches('`'));
            let line = self.line(path).or(serde_line);
            (field, "missing required field".to_string(), line)
        } else {
            (path.to_string(), message.to_string(), serde_line.or_else(|| self.line(path)))
        };
        PolicyError::Invalid { file: self.file.to_path_buf(), line, field, message }
    }
}

// ---------------------------------------------------------------------------
// Pass 2: the lenient header.

/// A header field: a string, or something else.
enum Field {
    Str(String),
    Other,
}

/// What every document is first read as. `None` (via `Option<Header>`) is
/// an empty document.
struct Header {
    api_version: Option<Field>,
    kind: Option<Field>,
    name: Option<String>,
    namespace: Option<String>,
}

impl<'de> Deserialize<'de> for Header {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Header;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a Kubernetes object (a mapping with apiVersion, kind and metadata)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Header, A::Error> {
                let mut h = Header { api_version: None, kind: None, name: None, namespace: None };
                while let Some(Lenient(key)) = map.next_key::<Lenient>()? {
                    match key.as_deref() {
                        Some("apiVersion") => {
                            h.api_version = Some(map.next_value::<Lenient>()?.field())
                        }
                        Some("kind") => h.kind = Some(map.next_value::<Lenient>()?.field()),
                        Some("metadata") => {
                            if let MaybeMeta(Some(m)) = map.next_value()? {
                                h.name = m.name;
                                h.namespace = m.namespace;
                            }
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(h)
            }
        }
        d.deserialize_map(V)
    }
}

/// Any value; `Some` only for strings.
struct Lenient(Option<String>);

impl Lenient {
    fn field(self) -> Field {
        self.0.map_or(Field::Other, Field::Str)
    }
}

impl<'de> Deserialize<'de> for Lenient {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Lenient;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Lenient, E> {
                Ok(Lenient(Some(v.to_string())))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Lenient, E> {
                Ok(Lenient(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Lenient, E> {
                Ok(Lenient(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Lenient, E> {
                Ok(Lenient(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Lenient, E> {
                Ok(Lenient(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Lenient, E> {
                Ok(Lenient(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<Lenient, E> {
                Ok(Lenient(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Lenient, D::Error> {
                Lenient::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Lenient, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Lenient(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Lenient, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Lenient(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// `metadata.name` and `metadata.namespace` if they are strings.
struct LenientMeta {
    name: Option<String>,
    namespace: Option<String>,
}

/// A mapping read as [`LenientMeta`], anything else as `None`: the strict
/// pass reports a bad `metadata` if the kind is one of ours.
struct MaybeMeta(Option<LenientMeta>);

impl<'de> Deserialize<'de> for MaybeMeta {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybeMeta;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MaybeMeta, A::Error> {
                let mut m = LenientMeta { name: None, namespace: None };
                while let Some(Lenient(key)) = map.next_key::<Lenient>()? {
                    match key.as_deref() {
                        Some("name") => m.name = map.next_value::<Lenient>()?.0,
                        Some("namespace") => m.namespace = map.next_value::<Lenient>()?.0,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(MaybeMeta(Some(m)))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<MaybeMeta, E> {
                Ok(MaybeMeta(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<MaybeMeta, E> {
                Ok(MaybeMeta(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<MaybeMeta, E> {
                Ok(MaybeMeta(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<MaybeMeta, E> {
                Ok(MaybeMeta(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<MaybeMeta, E> {
                Ok(MaybeMeta(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<MaybeMeta, E> {
                Ok(MaybeMeta(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<MaybeMeta, E> {
                Ok(MaybeMeta(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<MaybeMeta, D::Error> {
                MaybeMeta::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MaybeMeta, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MaybeMeta(None))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------
// Pass 3: strict structs for the kinds we read.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a Kubernetes object")]
struct RawObject<S> {
    #[serde(rename = "apiVersion")]
    _api_version: IgnoredAny,
    #[serde(rename = "kind")]
    _kind: IgnoredAny,
    #[serde(deserialize_with = "present")]
    metadata: Option<RawMeta>,
    #[serde(default = "none")]
    spec: Option<S>,
    #[serde(rename = "status", default)]
    _status: Option<IgnoredAny>,
}

/// A default that does not require `S: Default`.
fn none<S>() -> Option<S> {
    None
}

/// Unknown metadata fields (labels, annotations, uid, ...) are ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", expecting = "object metadata (a mapping with name)")]
struct RawMeta {
    #[serde(deserialize_with = "present")]
    name: Option<Name>,
    namespace: Option<Name>,
    creation_timestamp: Option<Timestamp>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a PeerAuthentication spec")]
struct RawPaSpec {
    selector: Option<RawSelector>,
    mtls: Option<RawPaMtls>,
    port_level_mtls: Option<PortLevel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a workload selector")]
struct RawSelector {
    match_labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "mutual TLS settings like {mode: STRICT}")]
struct RawPaMtls {
    mode: Option<PaMode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a Policy spec")]
struct RawLegacySpec {
    targets: Option<Vec<RawTarget>>,
    peers: Option<Vec<RawPeer>>,
    peer_is_optional: Option<bool>,
    origins: Option<Vec<IgnoredAny>>,
    origin_is_optional: Option<bool>,
    principal_binding: Option<PrincipalBinding>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a target like {name: productpage}")]
struct RawTarget {
    #[serde(deserialize_with = "present")]
    name: Option<Name>,
    ports: Option<Vec<RawPortSel>>,
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a port selector like {number: 9080} or {name: http}")]
struct RawPortSel {
    number: Option<Port>,
    name: Option<Name>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a peer authentication method like {mtls: {}}")]
struct RawPeer {
    /// Outer `None`: no `mtls` key; `Some(None)`: `mtls:` with no value.
    #[serde(default, deserialize_with = "nullable")]
    mtls: Option<Option<RawLegacyMtls>>,
    jwt: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "mutual TLS settings like {mode: STRICT}"
)]
struct RawLegacyMtls {
    mode: Option<LegacyMode>,
    allow_tls: Option<bool>,
}

/// With `#[serde(default)]`: absent is `None`, null is `Some(None)`.
fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A PeerAuthentication mode; `None` is UNSET.
struct PaMode(Option<Mode>);

impl<'de> Deserialize<'de> for PaMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "a mode (UNSET, DISABLE, PERMISSIVE or STRICT)", |s| match s {
            "UNSET" => Ok(PaMode(None)),
            "DISABLE" => Ok(PaMode(Some(Mode::Disable))),
            "PERMISSIVE" => Ok(PaMode(Some(Mode::Permissive))),
            "STRICT" => Ok(PaMode(Some(Mode::Strict))),
            _ => Err(format!("unknown mode {s:?} (expected UNSET, DISABLE, PERMISSIVE or STRICT)")),
        })
    }
}

/// A v1alpha1 mutual TLS mode.
struct LegacyMode(Mode);

impl<'de> Deserialize<'de> for LegacyMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "a mode (STRICT or PERMISSIVE)", |s| match s {
            "STRICT" => Ok(LegacyMode(Mode::Strict)),
            "PERMISSIVE" => Ok(LegacyMode(Mode::Permissive)),
            _ => Err(format!("unknown mode {s:?} (expected STRICT or PERMISSIVE)")),
        })
    }
}

/// `spec.principalBinding`: validated, then ignored.
struct PrincipalBinding;

impl<'de> Deserialize<'de> for PrincipalBinding {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "USE_PEER or USE_ORIGIN", |s| match s {
            "USE_PEER" | "USE_ORIGIN" => Ok(PrincipalBinding),
            _ => Err(format!("unknown principal binding {s:?} (expected USE_PEER or USE_ORIGIN)")),
        })
    }
}

/// An RFC 3339 timestamp.
struct Timestamp(Created);

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "an RFC 3339 timestamp", |s| {
            parse_rfc3339(s).map(Timestamp).ok_or_else(|| {
                format!("invalid timestamp {s:?} (expected RFC 3339, e.g. 2020-01-01T00:00:00Z)")
            })
        })
    }
}

/// A port number 1-65535, given as an integer or a numeric string.
pub(crate) struct Port(pub(crate) u16);

fn port_from_u64(n: u64) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("invalid port {n} (expected 1-65535)")),
    }
}

fn port_from_str(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u64>() {
        Ok(n) => port_from_u64(n),
        Err(_) => Err(format!("invalid port {s:?} (expected a number 1-65535)")),
    }
}

struct PortVisitor;

impl Visitor<'_> for PortVisitor {
    type Value = u16;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a port number 1-65535")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u16, E> {
        port_from_u64(v).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u16, E> {
        match u64::try_from(v) {
            Ok(n) => port_from_u64(n).map_err(E::custom),
            Err(_) => Err(E::custom(format!("invalid port {v} (expected 1-65535)"))),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u16, E> {
        port_from_str(v).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PortVisitor).map(Port)
    }
}

/// `spec.portLevelMtls`: workload port to mode, in document order.
struct PortLevel(Vec<(u16, Option<Mode>)>);

impl<'de> Deserialize<'de> for PortLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PortLevel;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping from port number to {mode: ...}")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PortLevel, A::Error> {
                let mut out: Vec<(u16, Option<Mode>)> = Vec::new();
                while let Some(port) = map.next_key_seed(NewPort(&out))? {
                    let mtls = map.next_value::<Option<RawPaMtls>>()?;
                    out.push((port, mtls.and_then(|m| m.mode).and_then(|m| m.0)));
                }
                Ok(PortLevel(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A port key not yet in the list; checked while reading the key so that
/// the error points at it.
struct NewPort<'a>(&'a [(u16, Option<Mode>)]);

impl<'de> de::DeserializeSeed<'de> for NewPort<'_> {
    type Value = u16;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u16, D::Error> {
        struct V<'a>(&'a [(u16, Option<Mode>)]);
        impl V<'_> {
            fn check<E: de::Error>(&self, port: Result<u16, String>) -> Result<u16, E> {
                let port = port.map_err(E::custom)?;
                if self.0.iter().any(|(p, _)| *p == port) {
                    return Err(E::custom(format!("duplicate port {port}")));
                }
                Ok(port)
            }
        }
        impl Visitor<'_> for V<'_> {
            type Value = u16;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number 1-65535")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<u16, E> {
                self.check(port_from_u64(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<u16, E> {
                self.check(PortVisitor.visit_i64::<E>(v).map_err(|e| e.to_string()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<u16, E> {
                self.check(port_from_str(v))
            }
        }
        d.deserialize_any(V(self.0))
    }
}

// ---------------------------------------------------------------------------
// Conversion and semantic checks.

/// The object's identity, namespace defaulted.
fn convert_meta(
    metadata: Option<RawMeta>,
    kind: &str,
    namespaced: bool,
    ctx: &DocCtx<'_>,
) -> Result<(Meta, bool), PolicyError> {
    let Some(meta) = metadata else {
        return Err(ctx.error("metadata", "must be a mapping with at least name"));
    };
    let Some(Name(name)) = meta.name else {
        return Err(ctx.error("metadata.name", "must not be empty"));
    };
    let had_namespace = meta.namespace.is_some();
    let namespace = if namespaced {
        Some(meta.namespace.map_or_else(|| "default".to_string(), |n| n.0))
    } else {
        None
    };
    let r = PolicyRef {
        kind: kind.to_string(),
        namespace,
        name,
        file: ctx.file.to_path_buf(),
        line: ctx.start(),
    };
    Ok((Meta { r, created: meta.creation_timestamp.map(|t| t.0) }, had_namespace))
}

fn convert_pa(raw: RawObject<RawPaSpec>, ctx: &DocCtx<'_>) -> Result<PeerAuth, PolicyError> {
    let (meta, _) = convert_meta(raw.metadata, PA_KIND, true, ctx)?;
    let spec = raw.spec.unwrap_or(RawPaSpec { selector: None, mtls: None, port_level_mtls: None });
    let selector = spec.selector.and_then(|s| s.match_labels).unwrap_or_default();
    let mode = spec.mtls.and_then(|m| m.mode).and_then(|m| m.0);
    let mut ports = BTreeMap::new();
    if let Some(PortLevel(entries)) = spec.port_level_mtls {
        if selector.is_empty() {
            return Err(ctx.error(
                "spec.portLevelMtls",
                "portLevelMtls requires selector (a non-empty spec.selector.matchLabels)",
            ));
        }
        if entries.is_empty() {
            return Err(ctx.error("spec.portLevelMtls", "must list at least one port"));
        }
        ports.extend(entries);
    }
    Ok(PeerAuth { meta, selector, mode, ports })
}

fn convert_legacy(
    raw: RawObject<RawLegacySpec>,
    mesh: bool,
    ctx: &DocCtx<'_>,
    notes: &mut Vec<Warning>,
) -> Result<LegacyPolicy, PolicyError> {
    let kind = if mesh { MESH_POLICY_KIND } else { POLICY_KIND };
    let (meta, had_namespace) = convert_meta(raw.metadata, kind, !mesh, ctx)?;
    if mesh && had_namespace {
        notes.push(ctx.warning(
            "metadata.namespace",
            "metadata.namespace is ignored: MeshPolicy is cluster-scoped",
        ));
    }
    let spec = raw.spec.unwrap_or(RawLegacySpec {
        targets: None,
        peers: None,
        peer_is_optional: None,
        origins: None,
        origin_is_optional: None,
        principal_binding: None,
    });
    let raw_targets = spec.targets.unwrap_or_default();
    let name = meta.r.name.as_str();
    if mesh {
        if name != "default" {
            return Err(ctx.error(
                "metadata.name",
                format!("the MeshPolicy must be named \"default\" (found {name:?})"),
            ));
        }
        if !raw_targets.is_empty() {
            return Err(ctx.error("spec.targets", "the MeshPolicy must not have targets"));
        }
    } else if raw_targets.is_empty() && name != "default" {
        return Err(ctx.error(
            "metadata.name",
            format!(
                "a Policy without targets is namespace-wide and must be named \"default\" \
                 (found {name:?}); add spec.targets or rename it"
            ),
        ));
    } else if !raw_targets.is_empty() && name == "default" {
        return Err(ctx.error(
            "spec.targets",
            "the Policy named \"default\" is namespace-wide and must not have targets; \
             give a Policy with targets another name",
        ));
    }

    let ns = meta.r.namespace.clone().unwrap_or_default();
    let mut targets = Vec::new();
    for (i, t) in raw_targets.into_iter().enumerate() {
        let path = format!("spec.targets[{i}]");
        let Some(Name(target_name)) = t.name else {
            return Err(ctx.error(&format!("{path}.name"), "must not be empty"));
        };
        let service = match short_service_name(&target_name, &ns) {
            Some(short) => short.to_string(),
            None => {
                notes.push(ctx.warning(
                    &format!("{path}.name"),
                    format!(
                        "{kind} {}: target {target_name} is not a service of namespace {ns} \
                         and matches nothing",
                        meta.r
                    ),
                ));
                target_name.clone()
            }
        };
        if t.labels.is_some_and(|l| !l.is_empty()) {
            notes.push(ctx.warning(
                &format!("{path}.labels"),
                format!(
                    "{kind} {}: target labels are not supported and ignored; \
                     the policy applies to every pod of service {service}",
                    meta.r
                ),
            ));
        }
        let mut ports = Vec::new();
        for (j, p) in t.ports.unwrap_or_default().into_iter().enumerate() {
            let port_path = format!("{path}.ports[{j}]");
            ports.push(match (p.number, p.name) {
                (Some(Port(n)), None) => PortSel::Number(n),
                (None, Some(Name(n))) => PortSel::Name(n),
                (Some(_), Some(_)) => {
                    return Err(ctx.error(&port_path, "set either number or name, not both"))
                }
                (None, None) => {
                    return Err(ctx.error(&port_path, "set number or name of a service port"))
                }
            });
        }
        let line = ctx.line(&path).unwrap_or_else(|| ctx.start());
        targets.push(Target { service, line, ports });
    }

    let (mode, mode_note) = legacy_mode(spec.peers.unwrap_or_default(), kind, &meta.r, ctx, notes)?;
    if spec.peer_is_optional == Some(true) {
        notes.push(ctx.warning(
            "spec.peerIsOptional",
            format!(
                "{kind} {}: peerIsOptional is ignored; the mtls mode alone decides \
                 whether plaintext is accepted",
                meta.r
            ),
        ));
    }
    if spec.origins.is_some_and(|o| !o.is_empty()) {
        notes.push(ctx.warning(
            "spec.origins",
            format!(
                "{kind} {}: origins (end-user JWT authentication) are not enforced; \
                 only the peer mtls mode applies",
                meta.r
            ),
        ));
    }
    let _ = (spec.origin_is_optional, spec.principal_binding);
    Ok(LegacyPolicy { meta, targets, mode, mode_note })
}

/// The mode given by `peers`: the first `mtls` method decides.
fn legacy_mode(
    peers: Vec<RawPeer>,
    kind: &str,
    r: &PolicyRef,
    ctx: &DocCtx<'_>,
    notes: &mut Vec<Warning>,
) -> Result<(Mode, Option<&'static str>), PolicyError> {
    if peers.is_empty() {
        return Ok((Mode::Disable, Some("no peers, plaintext only")));
    }
    let mut decided = None;
    for (i, peer) in peers.into_iter().enumerate() {
        let path = format!("spec.peers[{i}]");
        match (peer.mtls, peer.jwt) {
            (Some(_), Some(_)) => {
                return Err(ctx.error(&path, "a peer sets either mtls or jwt, not both"));
            }
            (None, Some(_)) => notes.push(ctx.warning(
                &format!("{path}.jwt"),
                format!("{kind} {r}: peer jwt authentication is not supported and ignored"),
            )),
            (None, None) => notes.push(ctx.warning(
                &path,
                format!("{kind} {r}: peer entry sets no method (mtls) and is ignored"),
            )),
            (Some(mtls), None) => {
                let mtls = mtls.unwrap_or(RawLegacyMtls { mode: None, allow_tls: None });
                if mtls.allow_tls == Some(true) {
                    notes.push(ctx.warning(
                        &format!("{path}.mtls.allowTls"),
                        format!(
                            "{kind} {r}: allowTls is deprecated and ignored; use mode: PERMISSIVE"
                        ),
                    ));
                }
                // STRICT is the zero value: `mtls: {}` and `mtls:` are STRICT.
                let mode = mtls.mode.map_or(Mode::Strict, |m| m.0);
                decided.get_or_insert(mode);
            }
        }
    }
    Ok(match decided {
        Some(mode) => (mode, None),
        None => (Mode::Disable, Some("no mtls peer, plaintext only")),
    })
}

/// `svc`, `svc.<ns>`, `svc.<ns>.svc` or `svc.<ns>.svc.<domain>` to `svc`;
/// `None` for a name in another namespace.
fn short_service_name<'a>(name: &'a str, ns: &str) -> Option<&'a str> {
    let Some((svc, rest)) = name.split_once('.') else {
        return Some(name);
    };
    let in_ns =
        rest == ns || rest.strip_prefix(ns).is_some_and(|r| r == ".svc" || r.starts_with(".svc."));
    in_ns.then_some(svc)
}

/// Parses an RFC 3339 date-time such as `2020-01-01T00:00:00Z` or
/// `2020-01-01T01:00:00.5+01:00`.
fn parse_rfc3339(s: &str) -> Option<Created> {
    let num = |from: usize, to: usize| -> Option<i64> {
        let t = s.get(from..to)?;
        if !t.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let byte = |i: usize| s.as_bytes().get(i).copied();
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if byte(4) != Some(b'-') || byte(7) != Some(b'-') || byte(13) != Some(b':') {
        return None;
    }
    if !matches!(byte(10), Some(b'T' | b't' | b' ')) || byte(16) != Some(b':') {
        return None;
    }
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = s.get(19..)?;
    let mut nanos: u32 = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        for (i, b) in frac.bytes().take(digits).enumerate() {
            if i < 9 {
                nanos = nanos * 10 + u32::from(b - b'0');
            }
        }
        for _ in digits..9 {
            nanos *= 10;
        }
        rest = frac.get(digits..)?;
    }
    let offset = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digit = |b: &u8| b.is_ascii_digit().then(|| i64::from(b - b'0'));
            let (h, m) = (digit(h1)? * 10 + digit(h2)?, digit(m1)? * 10 + digit(m2)?);
            if h > 23 || m > 59 {
                return None;
            }
            let off = h * 3600 + m * 60;
            if *sign == b'-' {
                -off
            } else {
                off
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some(Created { secs, nanos, text: s.to_string() })
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::{err, legacy, pa, set};
    use crate::policy::DEFAULT_ROOT_NAMESPACE;
    use std::path::PathBuf;

    /// The workshop's policy, verbatim.
    pub(crate) const WORKSHOP_STRICT: &str = r#"apiVersion: "authentication.istio.io/v1alpha1"
kind: "Policy"
metadata:
  name: "default"
  namespace: "hipster-app"
spec:
  peers:
  - mtls:
      mode: STRICT
"#;

    /// Its PERMISSIVE variant (the workshop's second step).
    pub(crate) const WORKSHOP_PERMISSIVE: &str = r#"apiVersion: "authentication.istio.io/v1alpha1"
kind: "Policy"
metadata:
  name: "default"
  namespace: "hipster-app"
spec:
  peers:
  - mtls:
      mode: PERMISSIVE
"#;

    fn parse_warnings(src: &str) -> Vec<String> {
        match PolicySet::parse(src, Path::new("policies/test.yaml")) {
            Ok(s) => s.warnings().iter().map(ToString::to_string).collect(),
            Err(e) => panic!("rejected: {e}"),
        }
    }

    #[test]
    fn workshop_documents() {
        for (src, mode) in
            [(WORKSHOP_STRICT, Mode::Strict), (WORKSHOP_PERMISSIVE, Mode::Permissive)]
        {
            let s = set(src);
            assert_eq!(s.len(), 1);
            let p = &s.legacy[0];
            assert_eq!(p.mode, mode);
            assert!(p.targets.is_empty());
            assert_eq!(p.meta.r.kind, "Policy");
            assert_eq!(p.meta.r.to_string(), "hipster-app/default");
            assert_eq!(p.meta.r.line, 1);
            assert_eq!(p.meta.r.file, PathBuf::from("policies/test.yaml"));
        }
    }

    #[test]
    fn peer_authentication_fields() {
        let src = "\
# leading comment
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: fe
  namespace: hipster-app
  creationTimestamp: \"2020-01-01T00:00:00Z\"
  labels: {team: a}
  annotations: {x: y}
  uid: 1234
  resourceVersion: \"7\"
spec:
  selector:
    matchLabels:
      app: frontend
  mtls:
    mode: STRICT
  portLevelMtls:
    8080:
      mode: DISABLE
    \"9090\":
      mode: UNSET
    9091: {}
    9092:
status:
  anything: [1, 2]
";
        let s = set(src);
        let p = &s.peer[0];
        assert_eq!(p.meta.r.line, 2);
        assert_eq!(p.meta.r.namespace.as_deref(), Some("hipster-app"));
        assert_eq!(p.meta.created.as_ref().map(|c| c.secs), Some(1_577_836_800));
        assert_eq!(p.selector.get("app").map(String::as_str), Some("frontend"));
        assert_eq!(p.mode, Some(Mode::Strict));
        let ports: Vec<_> = p.ports.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(ports, [(8080, Some(Mode::Disable)), (9090, None), (9091, None), (9092, None)]);
    }

    #[test]
    fn peer_authentication_modes() {
        for (spec, mode) in [
            ("  mtls:\n    mode: STRICT\n", Some(Mode::Strict)),
            ("  mtls:\n    mode: PERMISSIVE\n", Some(Mode::Permissive)),
            ("  mtls:\n    mode: DISABLE\n", Some(Mode::Disable)),
            ("  mtls:\n    mode: UNSET\n", None),
            ("  mtls:\n    mode:\n", None),
            ("  mtls: {}\n", None),
            ("  mtls:\n", None),
            ("  {}\n", None),
            ("", None),
        ] {
            let s = set(&pa("ns", "p", None, spec));
            assert_eq!(s.peer[0].mode, mode, "{spec:?}");
        }
        // Both API versions, and no spec at all.
        let s = set("apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: a}\n");
        assert_eq!(s.peer[0].meta.r.namespace.as_deref(), Some("default"));
        assert_eq!(s.peer[0].mode, None);
    }

    #[test]
    fn legacy_peer_modes() {
        let cases = [
            ("  peers:\n  - mtls: {}\n", Mode::Strict, None),
            ("  peers:\n  - mtls:\n", Mode::Strict, None),
            ("  peers:\n  - mtls: {mode: STRICT}\n", Mode::Strict, None),
            ("  peers:\n  - mtls:\n      mode: PERMISSIVE\n", Mode::Permissive, None),
            ("  peers:\n  - mtls:\n      mode:\n", Mode::Strict, None),
            ("  peers: []\n", Mode::Disable, Some("no peers, plaintext only")),
            ("  peers:\n", Mode::Disable, Some("no peers, plaintext only")),
            ("  origins: [{jwt: {issuer: x}}]\n", Mode::Disable, Some("no peers, plaintext only")),
            ("  {}\n", Mode::Disable, Some("no peers, plaintext only")),
            ("", Mode::Disable, Some("no peers, plaintext only")),
            ("  peers:\n  - jwt: {issuer: x}\n", Mode::Disable, Some("no mtls peer, plaintext only")),
            // The first mtls peer decides.
            (
                "  peers:\n  - jwt: {}\n  - mtls: {mode: PERMISSIVE}\n  - mtls: {}\n",
                Mode::Permissive,
                None,
            ),
            ("  peers:\n  - mtls: {}\n  - mtls: {mode: PERMISSIVE}\n", Mode::Strict, None),
            // Accepted and ignored for the mode.
            (
                "  peers: [{mtls: {}}]\n  peerIsOptional: true\n  originIsOptional: true\n  principalBinding: USE_ORIGIN\n  origins:\n  - jwt:\n      issuer: https://x\n      jwksUri: https://x/jwks\n",
                Mode::Strict,
                None,
            ),
        ];
        for (spec, mode, note) in cases {
            let s = set(&legacy(Some("ns"), "default", None, spec));
            assert_eq!((s.legacy[0].mode, s.legacy[0].mode_note), (mode, note), "{spec:?}");
        }
        let s = set(&legacy(None, "default", None, "  peers: [{mtls: {mode: PERMISSIVE}}]\n"));
        assert!(s.legacy[0].is_mesh());
        assert_eq!(s.legacy[0].meta.r.to_string(), "default");
        assert_eq!(s.legacy[0].mode, Mode::Permissive);
    }

    #[test]
    fn legacy_warnings_for_ignored_fields() {
        let spec = "  peers:\n  - jwt: {issuer: x}\n  - {}\n  - mtls: {allowTls: true}\n  peerIsOptional: true\n  origins:\n  - jwt: {issuer: x}\n";
        let w = parse_warnings(&legacy(Some("ns"), "default", None, spec));
        let expected = [
            "policies/test.yaml:9: Policy ns/default: peer jwt authentication is not supported and ignored",
            "policies/test.yaml:10: Policy ns/default: peer entry sets no method (mtls) and is ignored",
            "policies/test.yaml:11: Policy ns/default: allowTls is deprecated and ignored; use mode: PERMISSIVE",
            "policies/test.yaml:12: Policy ns/default: peerIsOptional is ignored; the mtls mode alone decides whether plaintext is accepted",
            "policies/test.yaml:13: Policy ns/default: origins (end-user JWT authentication) are not enforced; only the peer mtls mode applies",
        ];
        assert_eq!(w, expected);
        let w = parse_warnings(
            "apiVersion: authentication.istio.io/v1alpha1\nkind: MeshPolicy\nmetadata:\n  name: default\n  namespace: x\n",
        );
        assert_eq!(
            w,
            ["policies/test.yaml:5: metadata.namespace is ignored: MeshPolicy is cluster-scoped"]
        );
        let spec = "  targets:\n  - name: a.other\n  - name: b\n    labels: {v: 1}\n";
        let w = parse_warnings(&legacy(Some("ns"), "p", None, spec));
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].starts_with("policies/test.yaml:9: Policy ns/p: target a.other is not a service of namespace ns"), "{w:?}");
        assert!(
            w[1].starts_with("policies/test.yaml:11: Policy ns/p: target labels are not supported"),
            "{w:?}"
        );
    }

    #[test]
    fn legacy_targets() {
        let spec = "  targets:\n  - name: frontend\n    ports:\n    - number: 80\n    - name: grpc\n    - number: \"9000\"\n  - name: cart.ns.svc.cluster.local\n  - name: cart.ns\n  peers: [{mtls: {}}]\n";
        let s = set(&legacy(Some("ns"), "fe", None, spec));
        let t = &s.legacy[0].targets;
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].service, "frontend");
        assert_eq!(t[0].line, 9);
        assert_eq!(
            t[0].ports,
            [PortSel::Number(80), PortSel::Name("grpc".into()), PortSel::Number(9000)]
        );
        assert_eq!(t[1].service, "cart");
        assert_eq!(t[2].service, "cart");
        assert!(t[1].ports.is_empty());
        assert_eq!(short_service_name("a.nsx", "ns"), None);
        assert_eq!(short_service_name("a.ns.svc", "ns"), Some("a"));
        assert_eq!(short_service_name("a.ns.svcx", "ns"), None);
    }

    /// Each invalid document and the exact error it gives.
    #[test]
    fn invalid_documents_name_file_line_and_reason() {
        let pa_doc = |spec: &str| pa("hipster-app", "p", None, spec);
        let cases: Vec<(String, &str)> = vec![
            (
                pa_doc("  mtls:\n    mode: STRCT\n"),
                "policies/test.yaml:9: spec.mtls.mode: unknown mode \"STRCT\" (expected UNSET, DISABLE, PERMISSIVE or STRICT)",
            ),
            (
                pa_doc("  mtls:\n    mode: strict\n"),
                "policies/test.yaml:9: spec.mtls.mode: unknown mode \"strict\" (expected UNSET, DISABLE, PERMISSIVE or STRICT)",
            ),
            (
                pa_doc("  portLevelMtls:\n    8080:\n      mode: DISABLE\n"),
                "policies/test.yaml:8: spec.portLevelMtls: portLevelMtls requires selector (a non-empty spec.selector.matchLabels)",
            ),
            (
                pa_doc("  selector:\n    matchLabels: {}\n  portLevelMtls:\n    8080: {mode: DISABLE}\n"),
                "policies/test.yaml:10: spec.portLevelMtls: portLevelMtls requires selector (a non-empty spec.selector.matchLabels)",
            ),
            (
                pa_doc("  selector: {matchLabels: {app: a}}\n  portLevelMtls:\n    0: {mode: DISABLE}\n"),
                "policies/test.yaml:10: spec.portLevelMtls: invalid port 0 (expected 1-65535)",
            ),
            (
                pa_doc("  selector: {matchLabels: {app: a}}\n  portLevelMtls:\n    8080: {mode: DISABLE}\n    65536: {mode: DISABLE}\n"),
                "policies/test.yaml:11: spec.portLevelMtls: invalid port 65536 (expected 1-65535)",
            ),
            (
                pa_doc("  selector: {matchLabels: {app: a}}\n  portLevelMtls:\n    http: {mode: DISABLE}\n"),
                "policies/test.yaml:10: spec.portLevelMtls: invalid port \"http\" (expected a number 1-65535)",
            ),
            (
                pa_doc("  selector: {matchLabels: {app: a}}\n  portLevelMtls:\n    -1: {mode: DISABLE}\n"),
                "policies/test.yaml:10: spec.portLevelMtls: invalid port -1 (expected 1-65535)",
            ),
            (
                pa_doc("  selector: {matchLabels: {app: a}}\n  portLevelMtls: {}\n"),
                "policies/test.yaml:9: spec.portLevelMtls: must list at least one port",
            ),
            (
                pa_doc("  selector: {matchLabels: {app: a}}\n  portLevelMtls:\n    8080: {mode: DISABLE}\n    \"8080\": {mode: STRICT}\n"),
                "policies/test.yaml:11: spec.portLevelMtls.8080: duplicate key (first at line 10)",
            ),
            (
                pa_doc("  selector: {matchLabels: {app: a}}\n  portLevelMtls:\n    8080: {mode: DISABLE}\n    08080: {mode: STRICT}\n"),
                "policies/test.yaml:11: spec.portLevelMtls: duplicate port 8080",
            ),
            (
                pa_doc("  selector: {matchLabels: {app: a}}\n  portLevelMtls:\n    8080: {mode: OFF}\n"),
                "policies/test.yaml:10: spec.portLevelMtls.8080.mode: unknown mode \"OFF\" (expected UNSET, DISABLE, PERMISSIVE or STRICT)",
            ),
            (
                pa_doc("  mtls:\n    mode: STRICT\n  action: ALLOW\n"),
                "policies/test.yaml:10: spec.action: unknown field (expected one of selector, mtls, portLevelMtls)",
            ),
            (
                pa_doc("  mtls:\n    mode: STRICT\n    strict: true\n"),
                "policies/test.yaml:10: spec.mtls.strict: unknown field (expected mode)",
            ),
            (
                pa_doc("  selector:\n    app: a\n"),
                "policies/test.yaml:9: spec.selector.app: unknown field (expected matchLabels)",
            ),
            (
                pa_doc("  mtls: STRICT\n"),
                "policies/test.yaml:8: spec.mtls: invalid type: string \"STRICT\", expected mutual TLS settings like {mode: STRICT}",
            ),
            (
                pa_doc("  selector:\n    matchLabels: [app]\n"),
                "policies/test.yaml:9: spec.selector.matchLabels: invalid type: sequence, expected a map",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  namespace: a\n".to_string(),
                "policies/test.yaml:3: metadata.name: missing required field",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name:\n".to_string(),
                "policies/test.yaml:4: metadata.name: must not be empty",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: \"\"\n".to_string(),
                "policies/test.yaml:4: metadata.name: must not be empty",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nspec: {}\n".to_string(),
                "policies/test.yaml:1: metadata: missing required field",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\nspec: {}\n".to_string(),
                "policies/test.yaml:3: metadata: must be a mapping with at least name",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\nextra: 1\n".to_string(),
                "policies/test.yaml:4: extra: unknown field (expected one of apiVersion, kind, metadata, spec, status)",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: a\n  creationTimestamp: yesterday\n".to_string(),
                "policies/test.yaml:5: metadata.creationTimestamp: invalid timestamp \"yesterday\" (expected RFC 3339, e.g. 2020-01-01T00:00:00Z)",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: a\n  name: b\n".to_string(),
                "policies/test.yaml:5: metadata.name: duplicate key (first at line 4)",
            ),
            (
                "kind: PeerAuthentication\nmetadata: {name: a}\n".to_string(),
                "policies/test.yaml:1: apiVersion: missing required field",
            ),
            (
                "apiVersion: security.istio.io/v1\nmetadata: {name: a}\n".to_string(),
                "policies/test.yaml:1: kind: missing required field",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: [PeerAuthentication]\n".to_string(),
                "policies/test.yaml:2: kind: must be a string",
            ),
            (
                "- apiVersion: security.istio.io/v1\n".to_string(),
                "policies/test.yaml:1: invalid type: sequence, expected a Kubernetes object (a mapping with apiVersion, kind and metadata)",
            ),
            (
                "just a string\n".to_string(),
                "policies/test.yaml:1: invalid type: string \"just a string\", expected a Kubernetes object (a mapping with apiVersion, kind and metadata)",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a\n".to_string(),
                "policies/test.yaml:4: invalid YAML: while parsing a flow mapping, did not find expected ',' or '}'",
            ),
            (
                format!("{}{}", pa("a", "x", None, "  {}\n"), pa("a", "x", None, "  {}\n")),
                "policies/test.yaml:13: metadata.name: duplicate PeerAuthentication a/x (first defined at policies/test.yaml:2)",
            ),
            // v1alpha1
            (
                legacy(Some("hipster-app"), "default", None, "  peers:\n  - mtls:\n      mode: STRCT\n"),
                "policies/test.yaml:10: spec.peers[0].mtls.mode: unknown mode \"STRCT\" (expected STRICT or PERMISSIVE)",
            ),
            (
                legacy(Some("hipster-app"), "default", None, "  peers:\n  - mtls:\n      mode: DISABLE\n"),
                "policies/test.yaml:10: spec.peers[0].mtls.mode: unknown mode \"DISABLE\" (expected STRICT or PERMISSIVE)",
            ),
            (
                legacy(Some("hipster-app"), "strict", None, "  peers:\n  - mtls: {}\n"),
                "policies/test.yaml:5: metadata.name: a Policy without targets is namespace-wide and must be named \"default\" (found \"strict\"); add spec.targets or rename it",
            ),
            (
                legacy(Some("hipster-app"), "default", None, "  targets:\n  - name: frontend\n"),
                "policies/test.yaml:8: spec.targets: the Policy named \"default\" is namespace-wide and must not have targets; give a Policy with targets another name",
            ),
            (
                legacy(None, "mesh", None, "  peers:\n  - mtls: {}\n"),
                "policies/test.yaml:5: metadata.name: the MeshPolicy must be named \"default\" (found \"mesh\")",
            ),
            (
                legacy(None, "default", None, "  targets:\n  - name: frontend\n"),
                "policies/test.yaml:7: spec.targets: the MeshPolicy must not have targets",
            ),
            (
                legacy(Some("ns"), "p", None, "  targets:\n  - ports: [{number: 80}]\n"),
                "policies/test.yaml:9: spec.targets[0].name: missing required field",
            ),
            (
                legacy(Some("ns"), "p", None, "  targets:\n  - name: a\n    ports: [{number: 80, name: http}]\n"),
                "policies/test.yaml:10: spec.targets[0].ports[0]: set either number or name, not both",
            ),
            (
                legacy(Some("ns"), "p", None, "  targets:\n  - name: a\n    ports:\n    - {}\n"),
                "policies/test.yaml:11: spec.targets[0].ports[0]: set number or name of a service port",
            ),
            (
                legacy(Some("ns"), "p", None, "  targets:\n  - name: a\n    ports:\n    - number: 70000\n"),
                "policies/test.yaml:11: spec.targets[0].ports[0].number: invalid port 70000 (expected 1-65535)",
            ),
            (
                legacy(Some("ns"), "default", None, "  peers:\n  - mtls: {}\n    jwt: {}\n"),
                "policies/test.yaml:9: spec.peers[0]: a peer sets either mtls or jwt, not both",
            ),
            (
                legacy(Some("ns"), "default", None, "  peers:\n  - tls: {}\n"),
                "policies/test.yaml:9: spec.peers[0].tls: unknown field (expected mtls or jwt)",
            ),
            (
                legacy(Some("ns"), "default", None, "  principalBinding: USE_BOTH\n"),
                "policies/test.yaml:8: spec.principalBinding: unknown principal binding \"USE_BOTH\" (expected USE_PEER or USE_ORIGIN)",
            ),
            (
                legacy(Some("ns"), "default", None, "  peers: {mtls: {}}\n"),
                "policies/test.yaml:8: spec.peers: invalid type: map, expected a sequence",
            ),
        ];
        let failures: Vec<String> = cases
            .iter()
            .filter(|(src, expected)| err(src) != *expected)
            .map(|(src, expected)| format!("{src}\n  got:  {}\n  want: {expected}\n", err(src)))
            .collect();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn errors_point_into_later_documents() {
        let src = format!(
            "{}{}{}",
            WORKSHOP_STRICT,
            "---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: d}\nspec: {host: x}\n",
            pa("b", "p", None, "  mtls:\n    mode: STRCT\n"),
        );
        let e = PolicySet::parse(&src, Path::new("x.yaml")).unwrap_err();
        assert_eq!(e.line(), Some(23), "{e}");
        assert_eq!(e.file(), Path::new("x.yaml"));
        assert!(e.to_string().starts_with("x.yaml:23: spec.mtls.mode: unknown mode"), "{e}");
    }

    #[test]
    fn other_kinds_are_skipped_with_warnings() {
        let src = "\
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: reviews
  namespace: bookinfo
spec:
  host: reviews
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
---
apiVersion: security.istio.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: bookinfo}
spec: {}
---
apiVersion: security.istio.io/v1alpha1
kind: PeerAuthentication
metadata: {name: old}
---
apiVersion: authentication.istio.io/v1beta1
kind: Policy
metadata: {name: default}
---
apiVersion: kyverno.io/v1
kind: Policy
metadata: [not, a, mapping]
spec: {anything: [goes, {here: 1}]}
---
---
# only a comment
";
        let s = PolicySet::parse(src, Path::new("p.yaml")).unwrap();
        let w = s.warnings();
        assert!(s.is_empty());
        let w: Vec<String> = w.iter().map(ToString::to_string).collect();
        assert_eq!(
            w,
            [
                "p.yaml:1: skipped DestinationRule bookinfo/reviews (networking.istio.io/v1beta1): only PeerAuthentication, AuthorizationPolicy (security.istio.io) and Policy/MeshPolicy (authentication.istio.io/v1alpha1) are read",
                "p.yaml:10: skipped AuthorizationPolicy bookinfo/deny-all: apiVersion security.istio.io/v1alpha1 is not supported (expected security.istio.io/v1beta1 or security.istio.io/v1)",
                "p.yaml:15: skipped PeerAuthentication old: apiVersion security.istio.io/v1alpha1 is not supported (expected security.istio.io/v1beta1 or security.istio.io/v1)",
                "p.yaml:19: skipped Policy default: apiVersion authentication.istio.io/v1beta1 is not supported (expected authentication.istio.io/v1alpha1)",
                "p.yaml:23: skipped Policy (kyverno.io/v1): only PeerAuthentication, AuthorizationPolicy (security.istio.io) and Policy/MeshPolicy (authentication.istio.io/v1alpha1) are read",
            ]
        );
    }

    #[test]
    fn lists_are_not_expanded() {
        let w = parse_warnings("apiVersion: v1\nkind: List\nitems:\n- apiVersion: security.istio.io/v1\n  kind: PeerAuthentication\n");
        assert_eq!(w, ["policies/test.yaml:1: skipped List (v1): objects inside a List are not read; put each one in its own document (separated by ---)"]);
    }

    #[test]
    fn multi_document_files() {
        let src = format!(
            "{}---\n{}{}{}",
            WORKSHOP_STRICT,
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: PERMISSIVE}}\n",
            legacy(Some("hipster-app"), "fe", None, "  targets: [{name: frontend}]\n  peers: [{mtls: {}}]\n"),
            legacy(None, "default", None, "  peers: [{mtls: {mode: PERMISSIVE}}]\n"),
        );
        let s = set(&src);
        assert_eq!(s.len(), 4);
        let lines: Vec<usize> = s.policies().map(|r| r.line).collect();
        assert_eq!(lines, [11, 1, 16, 25]);
        let names: Vec<String> = s.policies().map(PolicyRef::describe).collect();
        assert_eq!(
            names,
            [
                "PeerAuthentication istio-system/default",
                "Policy hipster-app/default",
                "Policy hipster-app/fe",
                "MeshPolicy default"
            ]
        );
        // Empty input and empty documents are no policies.
        for src in ["", "\n", "# nothing\n", "---\n", "---\n...\n---\n", "~\n"] {
            assert!(set(src).is_empty(), "{src:?}");
        }
    }

    #[test]
    fn same_name_in_other_kind_or_namespace_is_not_a_duplicate() {
        let src = format!(
            "{}{}{}{}",
            pa("a", "default", None, "  {}\n"),
            pa("b", "default", None, "  {}\n"),
            legacy(Some("a"), "default", None, "  {}\n"),
            legacy(None, "default", None, "  {}\n"),
        );
        assert_eq!(set(&src).len(), 4);
    }

    #[test]
    fn timestamps() {
        let ok = [
            ("2020-01-01T00:00:00Z", 1_577_836_800, 0),
            ("1970-01-01T00:00:00Z", 0, 0),
            ("1969-12-31T23:59:59Z", -1, 0),
            ("2020-02-29T12:00:00.5Z", 1_582_977_600, 500_000_000),
            ("2020-01-01T01:00:00+01:00", 1_577_836_800, 0),
            ("2019-12-31t19:00:00-05:00", 1_577_836_800, 0),
            ("2020-01-01T00:00:00.123456789123z", 1_577_836_800, 123_456_789),
        ];
        for (text, secs, nanos) in ok {
            let c = parse_rfc3339(text).unwrap_or_else(|| panic!("{text}"));
            assert_eq!((c.secs, c.nanos, c.text.as_str()), (secs, nanos, text));
        }
        for bad in [
            "",
            "2020-01-01",
            "2020-01-01T00:00:00",
            "2020-13-01T00:00:00Z",
            "2019-02-29T00:00:00Z",
            "2020-01-32T00:00:00Z",
            "2020-01-01T24:00:00Z",
            "2020-01-01T00:00:00.Z",
            "2020-01-01T00:00:00+0100",
            "2020-01-01T00:00:00Zjunk",
            "2020-01-01T00:00:00+1é:00",
            "２020-01-01T00:00:00Z",
            "+020-01-01T00:00:00Z",
        ] {
            assert!(parse_rfc3339(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn load_dir_reads_yaml_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = PolicySet::load_dir(dir.path(), DEFAULT_ROOT_NAMESPACE).unwrap();
        let w = s.warnings();
        assert!(s.is_empty() && w.is_empty());

        std::fs::write(dir.path().join("b-workshop.yaml"), WORKSHOP_STRICT).unwrap();
        std::fs::write(
            dir.path().join("a-mesh.yml"),
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: PERMISSIVE}}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("c-dr.YAML"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("README.md"), "not: [yaml").unwrap();
        std::fs::write(dir.path().join(".hidden.yaml"), "not: [yaml").unwrap();
        std::fs::create_dir(dir.path().join("sub.yaml")).unwrap();
        std::fs::write(dir.path().join("sub.yaml/x.yaml"), "not: [yaml").unwrap();
        let s = PolicySet::load_dir(dir.path(), DEFAULT_ROOT_NAMESPACE).unwrap();
        let w = s.warnings();
        assert_eq!(s.len(), 2);
        let files: Vec<_> = s.policies().map(|r| r.file.file_name().unwrap().to_owned()).collect();
        assert_eq!(files, ["a-mesh.yml", "b-workshop.yaml"]);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].file, dir.path().join("c-dr.YAML"));

        // One bad document anywhere fails the whole directory.
        std::fs::write(
            dir.path().join("d-bad.yaml"),
            "# a comment\n\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x}\nspec:\n  mtls:\n    mode: STRCT\n",
        )
        .unwrap();
        let e = PolicySet::load_dir(dir.path(), DEFAULT_ROOT_NAMESPACE).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}:8: spec.mtls.mode: unknown mode \"STRCT\" (expected UNSET, DISABLE, PERMISSIVE or STRICT)",
                dir.path().join("d-bad.yaml").display()
            )
        );
        std::fs::remove_file(dir.path().join("d-bad.yaml")).unwrap();

        // The same object in two files.
        std::fs::write(dir.path().join("e-again.yaml"), WORKSHOP_PERMISSIVE).unwrap();
        let e = PolicySet::load_dir(dir.path(), DEFAULT_ROOT_NAMESPACE).unwrap_err().to_string();
        assert!(e.ends_with(&format!(
            "e-again.yaml:4: metadata.name: duplicate Policy hipster-app/default (first defined at {}:1)",
            dir.path().join("b-workshop.yaml").display()
        )), "{e}");

        let missing = dir.path().join("nope");
        let e = PolicySet::load_dir(&missing, DEFAULT_ROOT_NAMESPACE).unwrap_err();
        assert!(matches!(e, PolicyError::Read { .. }), "{e:?}");
        assert_eq!(e.to_string(), format!("{}: cannot read", missing.display()));
        // As printed at the edges: the OS error once, from the source chain.
        let chain = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(chain.matches("No such file or directory").count(), 1, "{chain}");
        assert!(chain.starts_with(&format!("{}: cannot read: ", missing.display())), "{chain}");
    }

    /// Hostile or truncated input is an error or a set, never a panic or a hang.
    #[test]
    fn no_panics_on_hostile_input() {
        let full = format!(
            "{WORKSHOP_STRICT}---\n{}{}",
            pa("ns", "p", Some("2020-01-01T00:00:00Z"), "  selector: {matchLabels: {a: b}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    \"8080\": {mode: DISABLE}\n"),
            legacy(Some("ns"), "t", None, "  targets:\n  - name: a\n    ports: [{number: 80}, {name: x}]\n  peers: [{mtls: }]\n"),
        );
        for end in (0..=full.len()).filter(|&i| full.is_char_boundary(i)) {
            let _ = PolicySet::parse(&full[..end], Path::new("x"));
        }
        let deep_seq = "[".repeat(10_000);
        let deep_map = format!("spec: {}1{}", "{a: ".repeat(300), "}".repeat(300));
        let nested_spec = format!("{}    x: ", pa("ns", "p", None, "  mtls:\n"));
        let bomb = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\nx0: &a [1,1,1,1,1,1,1,1,1]\nx1: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nx2: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nx3: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\nx4: [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n";
        for src in [
            deep_seq.as_str(),
            &deep_map,
            &nested_spec,
            bomb,
            "a: 1\n---\na: [\n",
            "a: 1\n---\nb: 2\n c: 3\n",
            "? [a, b]\n: c\n",
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\nspec: *x\n",
            "apiVersion: !!binary aGVsbG8=\nkind: X\n",
            "apiVersion: !custom x\nkind: X\n",
            "!custom {apiVersion: v1, kind: X}\n",
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: !t {name: a}\n",
            "\u{feff}apiVersion: v1\nkind: X\n",
            "\t\0\u{1}",
        ] {
            let _ = PolicySet::parse(src, Path::new("x"));
        }
        // Nesting within a skipped document is fine up to a limit, then an error.
        let deep =
            format!("apiVersion: v1\nkind: X\nspec: {}1{}\n", "[".repeat(100), "]".repeat(100));
        let r = PolicySet::parse(&deep, Path::new("x")).map(|s| (s.len(), s.warnings().len()));
        assert_eq!(r.as_ref().ok(), Some(&(0, 1)), "{r:?}");
        let deep =
            format!("apiVersion: v1\nkind: X\nspec: {}1{}\n", "[".repeat(5_000), "]".repeat(5_000));
        let e = PolicySet::parse(&deep, Path::new("x")).unwrap_err();
        assert!(e.to_string().starts_with("x:3: invalid YAML: "), "{e}");
    }
}
