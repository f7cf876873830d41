//! L4 authorization: Istio's `AuthorizationPolicy` (`security.istio.io/v1` and `v1beta1`),
//! the parts a node proxy can judge without reading requests.
//!
//! Policies are read with the mTLS policies ([`crate::policy::PolicySet`] holds them, parsed
//! by [`parse`]); this module says which of them apply to a workload ([`AuthzPolicy::applies_to`])
//! and what they decide for one connection ([`evaluate`]).
//!
//! # Semantics (Istio's)
//!
//! * Scope: a policy in the root namespace applies to every namespace, one in another
//!   namespace to its own; `selector.matchLabels` narrows it to the pods carrying those labels
//!   (an empty selector is no selector). Scopes add up: every policy that applies is judged.
//! * Order: `CUSTOM` is skipped (with a warning when read); any matching `DENY` denies; if any
//!   `ALLOW` policy applies to the workload the connection must match one of them, else it is
//!   allowed. `AUDIT` never changes the verdict; a match is reported to be logged.
//! * A policy matches if any of its rules does; `spec: {}` (no rules) matches nothing, so an
//!   ALLOW without rules denies everything and a DENY without rules denies nothing;
//!   `rules: [{}]` matches every connection.
//! * A rule matches if its `from`, `to` and `when` all do; `from` (and `to`) if any of its
//!   entries does (none means any); an entry if every field it sets does; a field if the value
//!   matches any of its patterns, a `not` field if it matches none.
//! * Strings (`principals`, `namespaces`): `*` alone means "present", a leading `*` a suffix,
//!   a trailing `*` a prefix, else exact. Principals are `TRUST_DOMAIN/ns/NS/sa/SA`, without
//!   `spiffe://` (a written `spiffe://` is dropped).
//! * A plaintext connection has no principal, namespace or service account: a positive field on
//!   them never matches it, a `not` field always does (`notPrincipals: ["*"]` is "no identity").
//! * L7 attributes (`methods`, `paths`, `hosts`, request principals, headers, ...) cannot be
//!   judged here: an ALLOW rule that needs one matches nothing, a DENY rule ignores the field
//!   (it denies more), as Istio ambient does without a waypoint.

pub mod kernel;
pub mod parse;
pub mod query;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

use crate::policy::PolicyRef;
use crate::workloads::Workload;

pub const KIND: &str = "AuthorizationPolicy";

/// What a policy does when one of its rules matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `AuthorizationPolicy`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzPolicy {
    pub r: PolicyRef,
    /// `None`: every workload of the scope (an empty `matchLabels` is read as `None`).
    pub selector: Option<BTreeMap<String, String>>,
    pub action: Action,
    pub rules: Vec<Rule>,
}

/// One rule: `from` AND `to` AND `when`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    /// Any entry (each an AND of fields); empty is any source.
    pub from: Vec<Vec<Match>>,
    /// Any entry; empty is any operation.
    pub to: Vec<Vec<Match>>,
    /// Every condition.
    pub when: Vec<Match>,
    /// An ALLOW rule that needs an attribute only a request carries: it matches nothing.
    pub needs_l7: Option<String>,
}

/// What a field compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Attr {
    Principal,
    Namespace,
    /// `namespace/name`.
    ServiceAccount,
    /// The address the connection came from (the client pod's).
    SourceIp,
    DestinationIp,
    DestinationPort,
}

impl Attr {
    /// Whether the attribute comes from the peer's certificate.
    fn is_identity(self) -> bool {
        matches!(self, Attr::Principal | Attr::Namespace | Attr::ServiceAccount)
    }
}

/// One value a field accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// `*`: the attribute is present (not empty).
    Present,
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// An address or CIDR block.
    Net(ipnet::IpNet),
    Port(u16),
}

impl Pattern {
    /// Istio's string match: `*`, `prefix*`, `*suffix` or exact.
    pub fn string(s: &str) -> Pattern {
        if s == "*" {
            Pattern::Present
        } else if let Some(rest) = s.strip_prefix('*') {
            Pattern::Suffix(rest.to_owned())
        } else if let Some(rest) = s.strip_suffix('*') {
            Pattern::Prefix(rest.to_owned())
        } else {
            Pattern::Exact(s.to_owned())
        }
    }

    fn matches_str(&self, v: &str) -> bool {
        match self {
            Pattern::Present => !v.is_empty(),
            Pattern::Exact(s) => v == s,
            Pattern::Prefix(s) => v.starts_with(s.as_str()),
            Pattern::Suffix(s) => v.ends_with(s.as_str()),
            Pattern::Net(_) | Pattern::Port(_) => false,
        }
    }
}

/// One field of a rule: the attribute matches one of `values` (or, negated, none of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub attr: Attr,
    pub values: Vec<Pattern>,
    pub negated: bool,
}

impl Match {
    fn matches(&self, c: &Conn<'_>) -> bool {
        let hit = match self.attr {
            _ if self.attr.is_identity() && c.peer.is_none() => {
                // No identity: a positive field never matches, a `not` field always does.
                return self.negated;
            }
            Attr::Principal => self.any_str(c.peer.map(|p| p.principal.as_str())),
            Attr::Namespace => self.any_str(c.peer.map(|p| p.namespace.as_str())),
            Attr::ServiceAccount => self.any_str(c.peer.map(|p| p.service_account.as_str())),
            Attr::SourceIp => self.any_ip(c.src),
            Attr::DestinationIp => self.any_ip(c.dst),
            Attr::DestinationPort => self.values.contains(&Pattern::Port(c.port)),
        };
        hit != self.negated
    }

    fn any_str(&self, v: Option<&str>) -> bool {
        v.is_some_and(|v| self.values.iter().any(|p| p.matches_str(v)))
    }

    fn any_ip(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.values.iter().any(|p| matches!(p, Pattern::Net(n) if n.contains(&ip)))
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The peer of an mTLS connection, from its certificate's SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// `TRUST_DOMAIN/ns/NS/sa/SA`.
    pub principal: String,
    pub namespace: String,
    /// `NS/SA`.
    pub service_account: String,
}

impl Peer {
    /// From `spiffe://TD/ns/NS/sa/SA`; `None` for any other shape.
    pub fn from_spiffe(id: &str) -> Option<Peer> {
        let principal = id.strip_prefix("spiffe://")?;
        let mut parts = principal.split('/');
        let (_td, ns_key, ns, sa_key, sa) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if ns_key != "ns" || sa_key != "sa" || parts.next().is_some() || ns.is_empty() {
            return None;
        }
        Some(Peer {
            principal: principal.to_owned(),
            namespace: ns.to_owned(),
            service_account: format!("{ns}/{sa}"),
        })
    }
}

/// One connection as authorization sees it.
#[derive(Debug, Clone, Copy)]
pub struct Conn<'a> {
    /// `None` for plaintext.
    pub peer: Option<&'a Peer>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub port: u16,
}

impl Rule {
    /// Whether the rule matches `c` (never, for an ALLOW rule with L7 fields).
    fn matches(&self, c: &Conn<'_>) -> bool {
        if self.needs_l7.is_some() {
            return false;
        }
        let any = |entries: &[Vec<Match>]| {
            entries.is_empty() || entries.iter().any(|e| e.iter().all(|m| m.matches(c)))
        };
        any(&self.from) && any(&self.to) && self.when.iter().all(|m| m.matches(c))
    }
}

impl Rule {
    /// Whether the rule can match only a connection with a peer identity: every `from` entry
    /// has a positive principal, namespace or service account field (a `when` on one counts
    /// too).
    pub fn needs_identity(&self) -> bool {
        let positive = |m: &Match| m.attr.is_identity() && !m.negated;
        (!self.from.is_empty() && self.from.iter().all(|e| e.iter().any(positive)))
            || self.when.iter().any(positive)
    }
}

impl AuthzPolicy {
    /// Whether the policy applies to workload `w` when `root` is the root namespace.
    pub fn applies_to(&self, root: &str, w: &Workload) -> bool {
        let ns = self.r.namespace.as_deref().unwrap_or_default();
        if ns != root && ns != w.namespace.as_str() {
            return false;
        }
        self.selector.as_ref().is_none_or(|sel| w.labels.matches(sel))
    }

    /// The index of the first rule that matches `c`.
    pub fn first_match(&self, c: &Conn<'_>) -> Option<usize> {
        self.rules.iter().position(|r| r.matches(c))
    }

    /// How many of its rules can match anything at this layer.
    pub fn live_rules(&self) -> usize {
        self.rules.iter().filter(|r| r.needs_l7.is_none()).count()
    }
}

/// The `RBAC (RULES)` column of `check` for `port` of a workload (`None`: the row for every
/// other port): `yes (ALLOW ns/a: 1 rule; DENY ns/b: 2 rules)` naming each applicable policy
/// with the rules that can match that port, or `no (none)`. An ALLOW policy with no rule for
/// the port is listed with 0 rules: it still denies the port (nothing of it matches there).
pub fn summary<'a>(
    policies: impl IntoIterator<Item = &'a AuthzPolicy>,
    port: Option<u16>,
) -> String {
    let parts: Vec<String> = policies
        .into_iter()
        .filter_map(|p| {
            let n =
                p.rules.iter().filter(|r| r.needs_l7.is_none() && r.may_match_port(port)).count();
            if n == 0 && p.action != Action::Allow {
                return None; // a DENY or AUDIT with nothing for this port does nothing here
            }
            let rules = if n == 1 { "rule" } else { "rules" };
            Some(format!("{} {}: {n} {rules}", p.action, p.r))
        })
        .collect();
    if parts.is_empty() {
        "no (none)".to_owned()
    } else {
        format!("yes ({})", parts.join("; "))
    }
}

impl Rule {
    /// Whether the rule's `to` and `when` could match a connection to `port` (`None`: some
    /// port without its own row, so any rule might).
    fn may_match_port(&self, port: Option<u16>) -> bool {
        let Some(port) = port else { return true };
        let ok = |m: &Match| {
            m.attr != Attr::DestinationPort
                || (m.values.contains(&Pattern::Port(port)) != m.negated)
        };
        (self.to.is_empty() || self.to.iter().any(|e| e.iter().all(ok))) && self.when.iter().all(ok)
    }
}

/// A policy and one of its rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleRef {
    pub policy: PolicyRef,
    pub action: Action,
    pub rule: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{KIND} {} rule {}", self.policy, self.rule)
    }
}

/// Why one applicable policy did or did not match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Considered {
    pub policy: PolicyRef,
    pub action: Action,
    /// The rule that matched, if any.
    pub matched_rule: Option<usize>,
    /// In words, e.g. `no rule matches` or `rule 0 matches`.
    pub note: String,
}

/// What authorization decides for one connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    pub allowed: bool,
    /// The DENY or ALLOW rule that decided; `None` when no rule did (no ALLOW applies, so
    /// allowed; or ALLOW policies apply and none matched, so denied).
    pub decided_by: Option<RuleRef>,
    /// In words: `denied by AuthorizationPolicy shop/deny-legacy rule 0`.
    pub reason: String,
    /// AUDIT rules that matched (to be logged; they change nothing).
    pub audited: Vec<RuleRef>,
    /// Every policy that applies to the workload, and what it said.
    pub considered: Vec<Considered>,
}

impl Verdict {
    /// The policy that decided, as `policy=` of a log line: `none` when none did.
    pub fn policy_label(&self) -> String {
        match &self.decided_by {
            Some(r) => r.policy.to_string(),
            None if self.allowed => "none".to_owned(),
            None => "default-deny".to_owned(),
        }
    }
}

/// Judges connection `c` to workload `w` by every policy of `policies` that applies to it.
/// The verdict's `considered` is left empty (see [`explain`]): the data path needs the verdict
/// only, on every connection.
pub fn evaluate<'a>(
    policies: impl IntoIterator<Item = &'a AuthzPolicy>,
    root: &str,
    w: &Workload,
    c: &Conn<'_>,
) -> Verdict {
    judge(policies, root, w, c, false)
}

/// [`evaluate`], with `considered` filled in: what every applicable policy said, and why.
pub fn explain<'a>(
    policies: impl IntoIterator<Item = &'a AuthzPolicy>,
    root: &str,
    w: &Workload,
    c: &Conn<'_>,
) -> Verdict {
    judge(policies, root, w, c, true)
}

fn judge<'a>(
    policies: impl IntoIterator<Item = &'a AuthzPolicy>,
    root: &str,
    w: &Workload,
    c: &Conn<'_>,
    explain: bool,
) -> Verdict {
    let mut considered = Vec::new();
    let mut deny = None;
    let mut allow = None;
    let mut allow_policies = Vec::new();
    let mut audited = Vec::new();
    for p in policies.into_iter().filter(|p| p.applies_to(root, w)) {
        let hit = p.first_match(c);
        let rule_ref = |rule| RuleRef { policy: p.r.clone(), action: p.action, rule };
        match (p.action, hit) {
            (Action::Deny, Some(i)) if deny.is_none() => deny = Some(rule_ref(i)),
            (Action::Allow, Some(i)) if allow.is_none() => allow = Some(rule_ref(i)),
            (Action::Audit, Some(i)) => audited.push(rule_ref(i)),
            _ => {}
        }
        if p.action == Action::Allow {
            allow_policies.push(p.r.to_string());
        }
        if !explain {
            continue;
        }
        let note = match hit {
            Some(i) => format!("rule {i} matches"),
            None if p.rules.is_empty() => "no rules: matches nothing".to_owned(),
            None => no_match_note(p, c),
        };
        considered.push(Considered {
            policy: p.r.clone(),
            action: p.action,
            matched_rule: hit,
            note,
        });
    }
    let (allowed, decided_by, reason) = if let Some(d) = deny {
        (false, Some(d.clone()), format!("denied by {d}"))
    } else if let Some(a) = allow {
        (true, Some(a.clone()), format!("allowed by {a}"))
    } else if !allow_policies.is_empty() {
        let names = allow_policies.join(", ");
        (false, None, format!("denied: no rule of the ALLOW policies matches ({names})"))
    } else {
        (true, None, "allowed: no ALLOW policy applies to the workload".to_owned())
    };
    Verdict { allowed, decided_by, reason, audited, considered }
}

/// Why no rule of `p` matches `c`, for `policy check`.
fn no_match_note(p: &AuthzPolicy, c: &Conn<'_>) -> String {
    let why: Vec<String> = p
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if let Some(f) = &r.needs_l7 {
                return format!("rule {i} needs {f} (L7, matches nothing without a waypoint)");
            }
            let fails = |entries: &[Vec<Match>]| {
                !entries.is_empty() && !entries.iter().any(|e| e.iter().all(|m| m.matches(c)))
            };
            if fails(&r.from) {
                let plaintext = c.peer.is_none()
                    && r.from.iter().flatten().any(|m| m.attr.is_identity() && !m.negated);
                if plaintext {
                    format!("rule {i}: from needs a peer identity (the connection is plaintext)")
                } else {
                    format!("rule {i}: from does not match")
                }
            } else if fails(&r.to) {
                format!("rule {i}: to does not match port {}", c.port)
            } else {
                format!("rule {i}: when does not match")
            }
        })
        .collect();
    why.join("; ")
}

#[cfg(test)]
mod tests;
