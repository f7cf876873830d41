//! `mtls-agent policy check DIR --workloads F --from SRC --to POD.NS:PORT`: one hypothetical
//! connection judged offline, as the destination's agent would judge it: first the mTLS mode of
//! the port (plaintext to a STRICT port never reaches authorization), then the
//! AuthorizationPolicies.

use std::net::IpAddr;

use serde::Serialize;

use super::{Conn, Considered, Peer, RuleRef};
use crate::policy::{Mode, PolicySet};
use crate::workloads::{Workload, WorkloadSet};

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("--from {0:?}: expected POD.NAMESPACE of the workloads file, or an IP address")]
    BadFrom(String),
    #[error("--to {0:?}: expected POD.NAMESPACE:PORT (port 1-65535)")]
    BadTo(String),
    #[error("{flag} {pod:?}: no such workload in the workloads file")]
    UnknownPod { flag: &'static str, pod: String },
}

/// The answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Answer {
    /// `ALLOW` or `DENY`.
    pub verdict: &'static str,
    /// `POD.NS` of the source, or its address.
    pub from: String,
    /// `POD.NS:PORT`.
    pub to: String,
    /// Whether the connection is mutual TLS (a mesh workload to a port that is not DISABLE).
    pub mtls: bool,
    /// The source's principal, for mTLS.
    pub principal: Option<String>,
    /// The destination port's mTLS mode and the policy that decided it.
    pub mode: Mode,
    pub mode_reason: String,
    /// The rule that decided (`None`: the mode, or no rule).
    pub decided_by: Option<RuleRef>,
    pub reason: String,
    pub audited: Vec<RuleRef>,
    /// Every AuthorizationPolicy that applies to the destination, and what it said.
    pub considered: Vec<Considered>,
}

/// Judges one connection from `from` (POD.NS or an address) to `to` (POD.NS:PORT).
pub fn check(
    ps: &PolicySet,
    ws: &WorkloadSet,
    trust_domain: &str,
    from: &str,
    to: &str,
) -> Result<Answer, QueryError> {
    let find = |key: &str, flag| {
        ws.workloads
            .iter()
            .find(|w| w.key() == key)
            .ok_or_else(|| QueryError::UnknownPod { flag, pod: key.to_owned() })
    };
    let (src_w, src_ip): (Option<&Workload>, IpAddr) = match from.parse::<IpAddr>() {
        Ok(ip) => (ws.by_ip(ip), ip),
        Err(_) if from.contains('.') => {
            let w = find(from, "--from")?;
            (Some(w), w.ip)
        }
        Err(_) => return Err(QueryError::BadFrom(from.to_owned())),
    };
    let (pod, port) = to.rsplit_once(':').ok_or_else(|| QueryError::BadTo(to.to_owned()))?;
    let port: u16 =
        port.parse().ok().filter(|p| *p != 0).ok_or_else(|| QueryError::BadTo(to.to_owned()))?;
    let dst = find(pod, "--to")?;
    let decision = ps.decide(ws, dst, port);
    let mtls = src_w.is_some() && decision.mode != Mode::Disable;
    let peer = src_w.filter(|_| mtls).and_then(|w| {
        Peer::from_spiffe(&format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            w.namespace, w.service_account
        ))
    });
    let from_label = src_w.map(|w| w.key()).unwrap_or_else(|| src_ip.to_string());
    let base = |verdict, decided_by, reason, audited, considered| Answer {
        verdict,
        from: from_label.clone(),
        to: format!("{}:{port}", dst.key()),
        mtls,
        principal: peer.as_ref().map(|p| p.principal.clone()),
        mode: decision.mode,
        mode_reason: decision.reason.clone(),
        decided_by,
        reason,
        audited,
        considered,
    };
    if !mtls && decision.mode == Mode::Strict {
        let reason = format!("denied: plaintext to a STRICT port ({})", decision.reason);
        return Ok(base("DENY", None, reason, Vec::new(), Vec::new()));
    }
    let conn = Conn { peer: peer.as_ref(), src: src_ip, dst: dst.ip, port };
    let v = ps.explain_authz(dst, &conn);
    if v.allowed && !mtls {
        // The kernel holds one plaintext verdict per port (see `kernel`): a port that refuses
        // plaintext from some source refuses it from all.
        let rules = super::kernel::plaintext_rules(ps.authz_policies(), ps.root_namespace(), dst);
        if super::kernel::PlaintextRefusals::of(&rules).refuses(port) {
            let reason = format!(
                "denied: fail closed (the policies would allow it: {}; but they refuse plaintext \
                 from other sources to this port, and the kernel holds one verdict per port)",
                v.reason
            );
            return Ok(base("DENY", None, reason, v.audited, v.considered));
        }
    }
    let verdict = if v.allowed { "ALLOW" } else { "DENY" };
    Ok(base(verdict, v.decided_by, v.reason, v.audited, v.considered))
}

/// The answer in words.
pub fn render(a: &Answer) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let how = match &a.principal {
        Some(p) => format!("mTLS, principal {p}"),
        None => "plaintext, no identity".to_owned(),
    };
    let _ = writeln!(s, "{}  {} -> {} ({how})", a.verdict, a.from, a.to);
    let _ = writeln!(s, "  mTLS mode:  {} ({})", a.mode, a.mode_reason);
    let _ = writeln!(s, "  decision:   {}", a.reason);
    for r in &a.audited {
        let _ = writeln!(s, "  audited by: {r}");
    }
    let others: Vec<&Considered> = a
        .considered
        .iter()
        .filter(|c| a.decided_by.as_ref().is_none_or(|d| d.policy != c.policy))
        .collect();
    if !others.is_empty() {
        let _ = writeln!(s, "  other policies:");
        for c in others {
            let _ = writeln!(s, "    AuthorizationPolicy {} ({}): {}", c.policy, c.action, c.note);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::{set, workloads};

    const POLICIES: &str = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: hipster-app}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: cart-from-frontend, namespace: hipster-app}
spec:
  selector: {matchLabels: {app: cart}}
  rules:
  - from:
    - source: {principals: ['cluster.local/ns/hipster-app/*']}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-web, namespace: hipster-app}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: [other]}
";

    #[test]
    fn answers_name_the_deciding_rule_and_why_others_did_not_match() {
        let (ps, ws) = (set(POLICIES), workloads());
        let a = check(&ps, &ws, "cluster.local", "frontend.hipster-app", "cart.hipster-app:7070")
            .unwrap();
        assert_eq!(a.verdict, "ALLOW");
        assert!(a.mtls);
        assert_eq!(
            a.decided_by.as_ref().map(ToString::to_string).as_deref(),
            Some("AuthorizationPolicy hipster-app/cart-from-frontend rule 0")
        );
        let text = render(&a);
        assert!(
            text.contains(
                "AuthorizationPolicy hipster-app/deny-web (DENY): rule 0: from does not match"
            ),
            "{text}"
        );

        let a = check(&ps, &ws, "cluster.local", "web.other", "cart.hipster-app:7070").unwrap();
        assert_eq!(
            (a.verdict, a.decided_by.map(|d| d.to_string())),
            ("DENY", Some("AuthorizationPolicy hipster-app/deny-web rule 0".into()))
        );

        // An address outside the workloads: plaintext, which a principal never matches.
        let a = check(&ps, &ws, "cluster.local", "192.0.2.7", "cart.hipster-app:7070").unwrap();
        assert_eq!(a.verdict, "DENY");
        assert!(!a.mtls);
        assert!(
            render(&a).contains("from needs a peer identity (the connection is plaintext)"),
            "{}",
            render(&a)
        );
        // The address of a workload is that workload.
        let a = check(&ps, &ws, "cluster.local", "10.0.0.1", "cart.hipster-app:7070").unwrap();
        assert_eq!((a.verdict, a.from.as_str()), ("ALLOW", "frontend.hipster-app"));
    }

    #[test]
    fn plaintext_to_strict_is_refused_by_the_mode_first() {
        let ps = set("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: hipster-app}\nspec: {mtls: {mode: STRICT}}\n");
        let a = check(&ps, &workloads(), "cluster.local", "192.0.2.7", "redis.hipster-app:6379")
            .unwrap();
        assert_eq!(a.verdict, "DENY");
        assert!(a.reason.starts_with("denied: plaintext to a STRICT port"), "{}", a.reason);
    }

    #[test]
    fn plaintext_the_kernel_refuses_per_port_is_denied_as_it_is() {
        let ps = set("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: lan, namespace: hipster-app}\nspec:\n  rules:\n  - from:\n    - source: {ipBlocks: [192.0.2.0/24]}\n");
        let a = check(&ps, &workloads(), "cluster.local", "192.0.2.7", "redis.hipster-app:6379")
            .unwrap();
        assert_eq!(a.verdict, "DENY");
        assert!(a.reason.starts_with("denied: fail closed"), "{}", a.reason);
    }

    #[test]
    fn bad_arguments_are_named() {
        let (ps, ws) = (set(POLICIES), workloads());
        let e = |from: &str, to: &str| {
            check(&ps, &ws, "cluster.local", from, to).unwrap_err().to_string()
        };
        assert!(e("frontend", "cart.hipster-app:1").starts_with("--from \"frontend\""));
        assert!(
            e("frontend.hipster-app", "cart.hipster-app").starts_with("--to \"cart.hipster-app\"")
        );
        assert!(e("frontend.hipster-app", "cart.hipster-app:0").starts_with("--to"));
        assert!(e("nope.x", "cart.hipster-app:1").contains("no such workload"));
    }
}
