//! An `AuthorizationPolicy` spec, as read from YAML, to an [`AuthzPolicy`].
//!
//! The policy parser (`policy/parse.rs`) reads the object and its metadata and hands the spec
//! here; errors and warnings come back with the field path (`spec.rules[0].from[0]...`), which
//! it turns into `file:line: field: message`. The checks are those of Istio's validation
//! (`from` must not be empty, `serviceAccounts` excludes `principals` and `namespaces`, a
//! condition needs values, keys must be known attributes); what only a waypoint can judge is
//! handled as Istio ambient handles it (see the module above).

use std::collections::BTreeMap;

use serde::de::IgnoredAny;
use serde::Deserialize;

use super::{Action, Attr, AuthzPolicy, Match, Pattern, Rule};
use crate::policy::PolicyRef;

/// Bounds on one policy: its rules are compiled per pod (see `kernel`) and judged per
/// connection, and anyone who may create a policy in a namespace writes them.
pub const MAX_RULES: usize = 256;
/// Values (principals, blocks, ports, ...) in all the rules of one policy.
pub const MAX_VALUES: usize = 2048;

/// A spec field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

/// A warning about a field (it is ignored, or makes a rule match nothing).
pub type FieldWarning = (String, String);

/// The result of reading one spec: the policy (`None` when it is skipped as a whole: `CUSTOM`,
/// or `targetRefs`) and the warnings.
#[derive(Debug)]
pub struct Converted {
    pub policy: Option<AuthzPolicy>,
    pub warnings: Vec<FieldWarning>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "an AuthorizationPolicy spec")]
pub struct RawSpec {
    selector: Option<RawSelector>,
    target_ref: Option<IgnoredAny>,
    target_refs: Option<Vec<IgnoredAny>>,
    action: Option<RawAction>,
    provider: Option<IgnoredAny>,
    rules: Option<Vec<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a workload selector")]
struct RawSelector {
    match_labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE", expecting = "an action (ALLOW, DENY, AUDIT or CUSTOM)")]
enum RawAction {
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a rule like {from: [...], to: [...], when: [...]}")]
struct RawRule {
    from: Option<Vec<RawFrom>>,
    to: Option<Vec<RawTo>>,
    when: Option<Vec<RawCondition>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a source like {source: {principals: [...]}}")]
struct RawFrom {
    source: Option<RawSource>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a source")]
struct RawSource {
    principals: Option<Vec<String>>,
    not_principals: Option<Vec<String>>,
    request_principals: Option<Vec<String>>,
    not_request_principals: Option<Vec<String>>,
    namespaces: Option<Vec<String>>,
    not_namespaces: Option<Vec<String>>,
    service_accounts: Option<Vec<String>>,
    not_service_accounts: Option<Vec<String>>,
    ip_blocks: Option<Vec<String>>,
    not_ip_blocks: Option<Vec<String>>,
    remote_ip_blocks: Option<Vec<String>>,
    not_remote_ip_blocks: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an operation like {operation: {ports: [\"8080\"]}}")]
struct RawTo {
    operation: Option<RawOperation>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "an operation")]
struct RawOperation {
    hosts: Option<Vec<String>>,
    not_hosts: Option<Vec<String>>,
    ports: Option<Vec<crate::policy::Port>>,
    not_ports: Option<Vec<crate::policy::Port>>,
    methods: Option<Vec<String>>,
    not_methods: Option<Vec<String>>,
    paths: Option<Vec<String>>,
    not_paths: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a condition like {key: source.ip, values: [...]}"
)]
struct RawCondition {
    key: Option<String>,
    values: Option<Vec<String>>,
    not_values: Option<Vec<String>>,
}

/// Reads `spec` of the policy `r` (`None`: no spec, which is `spec: {}`).
pub fn convert(spec: Option<RawSpec>, r: PolicyRef) -> Result<Converted, FieldError> {
    let mut warnings = Vec::new();
    let spec = spec.unwrap_or(RawSpec {
        selector: None,
        target_ref: None,
        target_refs: None,
        action: None,
        provider: None,
        rules: None,
    });
    let action = match spec.action.unwrap_or(RawAction::Allow) {
        RawAction::Allow => Action::Allow,
        RawAction::Deny => Action::Deny,
        RawAction::Audit => Action::Audit,
        RawAction::Custom => {
            if spec.provider.is_none() {
                return Err(err("spec.provider", "action CUSTOM requires a provider"));
            }
            warnings.push((
                "spec.action".to_owned(),
                format!(
                    "AuthorizationPolicy {r}: action CUSTOM (an external authorizer) is not \
                     supported; the policy is ignored"
                ),
            ));
            return Ok(Converted { policy: None, warnings });
        }
    };
    if spec.provider.is_some() {
        return Err(err("spec.provider", "provider is only allowed with action CUSTOM"));
    }
    let targeted =
        spec.target_ref.is_some() || spec.target_refs.as_ref().is_some_and(|t| !t.is_empty());
    if targeted {
        if spec.selector.is_some() {
            return Err(err("spec.selector", "selector and targetRefs cannot both be set"));
        }
        let field = if spec.target_ref.is_some() { "spec.targetRef" } else { "spec.targetRefs" };
        warnings.push((
            field.to_owned(),
            format!(
                "AuthorizationPolicy {r}: {} attaches it to a waypoint or gateway, which this \
                 agent is not; the policy is ignored",
                field.trim_start_matches("spec.")
            ),
        ));
        return Ok(Converted { policy: None, warnings });
    }
    let selector = spec.selector.and_then(|s| s.match_labels).filter(|m| !m.is_empty());
    let raw_rules = spec.rules.unwrap_or_default();
    if raw_rules.len() > MAX_RULES {
        return Err(err("spec.rules", format!("{} rules (at most {MAX_RULES})", raw_rules.len())));
    }
    let mut rules = Vec::new();
    let ns = r.namespace.clone().unwrap_or_default();
    for (i, raw) in raw_rules.into_iter().enumerate() {
        let mut rb = RuleBuilder {
            path: format!("spec.rules[{i}]"),
            action,
            r: &r,
            ns: &ns,
            warnings: &mut warnings,
            l7: None,
        };
        let rule = rb.rule(raw)?;
        rules.push(rule);
    }
    let values: usize = rules
        .iter()
        .flat_map(|r: &Rule| r.from.iter().flatten().chain(r.to.iter().flatten()).chain(&r.when))
        .map(|m| m.values.len())
        .sum();
    if values > MAX_VALUES {
        return Err(err("spec.rules", format!("{values} values in all (at most {MAX_VALUES})")));
    }
    Ok(Converted { policy: Some(AuthzPolicy { r, selector, action, rules }), warnings })
}

fn err(path: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError { path: path.into(), message: message.into() }
}

struct RuleBuilder<'a> {
    path: String,
    action: Action,
    r: &'a PolicyRef,
    /// The policy's namespace: a bare service account name is of it.
    ns: &'a str,
    warnings: &'a mut Vec<FieldWarning>,
    /// The first L7 field of the rule.
    l7: Option<String>,
}

impl RuleBuilder<'_> {
    fn rule(&mut self, raw: RawRule) -> Result<Rule, FieldError> {
        let mut rule = Rule::default();
        if let Some(from) = raw.from {
            if from.is_empty() {
                return Err(err(
                    format!("{}.from", self.path),
                    "`from` must not be empty (omit it for any source)",
                ));
            }
            for (j, f) in from.into_iter().enumerate() {
                let path = format!("{}.from[{j}].source", self.path);
                let Some(src) = f.source else {
                    return Err(err(path, "missing required field"));
                };
                rule.from.push(self.source(src, &path)?);
            }
        }
        if let Some(to) = raw.to {
            if to.is_empty() {
                return Err(err(
                    format!("{}.to", self.path),
                    "`to` must not be empty (omit it for any operation)",
                ));
            }
            for (j, t) in to.into_iter().enumerate() {
                let path = format!("{}.to[{j}].operation", self.path);
                let Some(op) = t.operation else {
                    return Err(err(path, "missing required field"));
                };
                rule.to.push(self.operation(op, &path)?);
            }
        }
        if let Some(when) = raw.when {
            for (j, c) in when.into_iter().enumerate() {
                let path = format!("{}.when[{j}]", self.path);
                rule.when.extend(self.condition(c, &path)?);
            }
        }
        // DENY and AUDIT rules go on without the field (they deny or audit more).
        rule.needs_l7 = self.l7.take().filter(|_| self.action == Action::Allow);
        Ok(rule)
    }

    /// An attribute only a request has: an ALLOW rule with it matches nothing, a DENY or AUDIT
    /// rule goes on without it.
    fn l7_field(&mut self, path: String) {
        let consequence = match self.action {
            Action::Allow => "this ALLOW rule matches nothing",
            Action::Deny => "it is ignored, so this DENY rule denies more",
            Action::Audit => "it is ignored, so this AUDIT rule audits more",
        };
        self.warnings.push((
            path.clone(),
            format!(
                "AuthorizationPolicy {}: {path} is an HTTP attribute, which L4 authorization \
                 cannot see (no waypoint): {consequence}",
                self.r
            ),
        ));
        if self.l7.is_none() {
            self.l7 = Some(path);
        }
    }

    fn source(&mut self, s: RawSource, path: &str) -> Result<Vec<Match>, FieldError> {
        // An empty list is no list, as in Istio (proto3 cannot tell them apart): `principals: []`
        // must not turn a DENY into one that matches nothing.
        let s = RawSource {
            principals: unset_if_empty(s.principals),
            not_principals: unset_if_empty(s.not_principals),
            request_principals: unset_if_empty(s.request_principals),
            not_request_principals: unset_if_empty(s.not_request_principals),
            namespaces: unset_if_empty(s.namespaces),
            not_namespaces: unset_if_empty(s.not_namespaces),
            service_accounts: unset_if_empty(s.service_accounts),
            not_service_accounts: unset_if_empty(s.not_service_accounts),
            ip_blocks: unset_if_empty(s.ip_blocks),
            not_ip_blocks: unset_if_empty(s.not_ip_blocks),
            remote_ip_blocks: unset_if_empty(s.remote_ip_blocks),
            not_remote_ip_blocks: unset_if_empty(s.not_remote_ip_blocks),
        };
        let set = |v: &Option<Vec<String>>| v.is_some();
        let any = set(&s.principals)
            || set(&s.not_principals)
            || set(&s.request_principals)
            || set(&s.not_request_principals)
            || set(&s.namespaces)
            || set(&s.not_namespaces)
            || set(&s.service_accounts)
            || set(&s.not_service_accounts)
            || set(&s.ip_blocks)
            || set(&s.not_ip_blocks)
            || set(&s.remote_ip_blocks)
            || set(&s.not_remote_ip_blocks);
        if !any {
            return Err(err(path, "`source` must set at least one field"));
        }
        let sa_set = set(&s.service_accounts) || set(&s.not_service_accounts);
        let other = set(&s.principals)
            || set(&s.not_principals)
            || set(&s.namespaces)
            || set(&s.not_namespaces);
        if sa_set && other {
            return Err(err(
                format!("{path}.serviceAccounts"),
                "serviceAccounts cannot be set with principals or namespaces",
            ));
        }
        let mut m = Vec::new();
        let strings = |v: Vec<String>| -> Vec<Pattern> {
            v.iter().map(|s| Pattern::string(s.strip_prefix("spiffe://").unwrap_or(s))).collect()
        };
        push(&mut m, Attr::Principal, false, s.principals.map(strings));
        push(&mut m, Attr::Principal, true, s.not_principals.map(strings));
        push(&mut m, Attr::Namespace, false, s.namespaces.map(strings));
        push(&mut m, Attr::Namespace, true, s.not_namespaces.map(strings));
        for (field, v, negated) in [
            ("serviceAccounts", s.service_accounts, false),
            ("notServiceAccounts", s.not_service_accounts, true),
        ] {
            let Some(v) = v else { continue };
            let mut values = Vec::new();
            for (k, sa) in v.iter().enumerate() {
                let full = match sa.split_once('/') {
                    Some((ns, name))
                        if !ns.is_empty() && !name.is_empty() && !name.contains('/') =>
                    {
                        sa.clone()
                    }
                    None if !sa.is_empty() => format!("{}/{sa}", self.ns),
                    _ => {
                        return Err(err(
                            format!("{path}.{field}[{k}]"),
                            format!(
                                "invalid service account {sa:?} (expected NAMESPACE/NAME or NAME)"
                            ),
                        ))
                    }
                };
                values.push(Pattern::Exact(full));
            }
            push(&mut m, Attr::ServiceAccount, negated, Some(values));
        }
        for (field, v, negated) in [
            ("ipBlocks", s.ip_blocks, false),
            ("notIpBlocks", s.not_ip_blocks, true),
            ("remoteIpBlocks", s.remote_ip_blocks, false),
            ("notRemoteIpBlocks", s.not_remote_ip_blocks, true),
        ] {
            let Some(v) = v else { continue };
            let values = nets(&v, &format!("{path}.{field}"))?;
            push(&mut m, Attr::SourceIp, negated, Some(values));
        }
        for field in ["requestPrincipals", "notRequestPrincipals"] {
            let present = if field == "requestPrincipals" {
                s.request_principals.is_some()
            } else {
                s.not_request_principals.is_some()
            };
            if present {
                self.l7_field(format!("{path}.{field}"));
            }
        }
        Ok(m)
    }

    fn operation(&mut self, o: RawOperation, path: &str) -> Result<Vec<Match>, FieldError> {
        let o = RawOperation {
            hosts: unset_if_empty(o.hosts),
            not_hosts: unset_if_empty(o.not_hosts),
            ports: unset_if_empty(o.ports),
            not_ports: unset_if_empty(o.not_ports),
            methods: unset_if_empty(o.methods),
            not_methods: unset_if_empty(o.not_methods),
            paths: unset_if_empty(o.paths),
            not_paths: unset_if_empty(o.not_paths),
        };
        let l7 = [
            ("hosts", o.hosts.is_some()),
            ("notHosts", o.not_hosts.is_some()),
            ("methods", o.methods.is_some()),
            ("notMethods", o.not_methods.is_some()),
            ("paths", o.paths.is_some()),
            ("notPaths", o.not_paths.is_some()),
        ];
        if !l7.iter().any(|(_, set)| *set) && o.ports.is_none() && o.not_ports.is_none() {
            return Err(err(path, "`operation` must set at least one field"));
        }
        for (field, set) in l7 {
            if set {
                self.l7_field(format!("{path}.{field}"));
            }
        }
        let mut m = Vec::new();
        let ports =
            |v: Vec<crate::policy::Port>| v.into_iter().map(|p| Pattern::Port(p.0)).collect();
        push(&mut m, Attr::DestinationPort, false, o.ports.map(ports));
        push(&mut m, Attr::DestinationPort, true, o.not_ports.map(ports));
        Ok(m)
    }

    /// A `when` condition: nothing for an L7 key (dropped, see [`Self::l7_field`]); with both
    /// `values` and `notValues`, the value must be in the one and not in the other.
    fn condition(&mut self, c: RawCondition, path: &str) -> Result<Vec<Match>, FieldError> {
        let Some(key) = c.key.filter(|k| !k.trim().is_empty()) else {
            return Err(err(format!("{path}.key"), "missing required field"));
        };
        if c.values.as_ref().is_none_or(Vec::is_empty)
            && c.not_values.as_ref().is_none_or(Vec::is_empty)
        {
            return Err(err(path, format!("condition {key:?} needs values or notValues")));
        }
        let attr = match key.as_str() {
            "source.ip" | "remote.ip" => Attr::SourceIp,
            "destination.ip" => Attr::DestinationIp,
            "destination.port" => Attr::DestinationPort,
            "source.namespace" => Attr::Namespace,
            "source.principal" => Attr::Principal,
            "connection.sni" => {
                // The tunnel's TLS names our HBONE port, not the app's service: nothing to match.
                self.l7_field(format!("{path}.key"));
                return Ok(Vec::new());
            }
            k if k.starts_with("request.headers[") && k.ends_with(']')
                || k.starts_with("request.auth.claims[") && k.ends_with(']')
                || matches!(
                    k,
                    "request.auth.principal" | "request.auth.audiences" | "request.auth.presenter"
                )
                || k.starts_with("experimental.envoy.filters.") =>
            {
                self.l7_field(format!("{path}.key"));
                return Ok(Vec::new());
            }
            k => return Err(err(format!("{path}.key"), format!("unknown attribute {k:?}"))),
        };
        let (pos, neg) = (c.values.unwrap_or_default(), c.not_values.unwrap_or_default());
        let convert = |v: &[String], field: &str| -> Result<Vec<Pattern>, FieldError> {
            let at = format!("{path}.{field}");
            match attr {
                Attr::SourceIp | Attr::DestinationIp => nets(v, &at),
                Attr::DestinationPort => v
                    .iter()
                    .enumerate()
                    .map(|(k, s)| match s.trim().parse::<u16>() {
                        Ok(p) if p != 0 => Ok(Pattern::Port(p)),
                        _ => Err(err(
                            format!("{at}[{k}]"),
                            format!("invalid port {s:?} (expected 1-65535)"),
                        )),
                    })
                    .collect(),
                _ => Ok(v
                    .iter()
                    .map(|s| Pattern::string(s.strip_prefix("spiffe://").unwrap_or(s)))
                    .collect()),
            }
        };
        let pos = convert(&pos, "values")?;
        let neg = convert(&neg, "notValues")?;
        let mut m = Vec::new();
        push(&mut m, attr, false, Some(pos).filter(|v| !v.is_empty()));
        push(&mut m, attr, true, Some(neg).filter(|v| !v.is_empty()));
        Ok(m)
    }
}

fn unset_if_empty<T>(v: Option<Vec<T>>) -> Option<Vec<T>> {
    v.filter(|v| !v.is_empty())
}

fn push(m: &mut Vec<Match>, attr: Attr, negated: bool, values: Option<Vec<Pattern>>) {
    if let Some(values) = values {
        m.push(Match { attr, values, negated });
    }
}

/// Addresses or CIDR blocks (`10.0.0.1`, `10.0.0.0/16`, `fd00::/64`).
fn nets(v: &[String], path: &str) -> Result<Vec<Pattern>, FieldError> {
    v.iter()
        .enumerate()
        .map(|(k, s)| {
            let s = s.trim();
            let net = match s.parse::<ipnet::IpNet>() {
                // `::ffff:10.0.0.0/104` is the IPv4 block it maps (sources are matched as IPv4).
                Ok(ipnet::IpNet::V6(n))
                    if n.prefix_len() >= 96 && n.network().to_ipv4_mapped().is_some() =>
                {
                    let v4 =
                        n.network().to_ipv4_mapped().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
                    ipnet::Ipv4Net::new(v4, n.prefix_len() - 96)
                        .map(ipnet::IpNet::V4)
                        .unwrap_or(ipnet::IpNet::V6(n))
                        .trunc()
                }
                Ok(n) => n.trunc(),
                Err(_) => match s.parse::<std::net::IpAddr>() {
                    Ok(ip) => ipnet::IpNet::from(super::canonical(ip)),
                    Err(_) => {
                        return Err(err(
                            format!("{path}[{k}]"),
                            format!("invalid address or CIDR block {s:?}"),
                        ))
                    }
                },
            };
            Ok(Pattern::Net(net))
        })
        .collect()
}
