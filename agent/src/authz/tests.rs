//! The evaluator against Istio's documented semantics. Each case names the rule of Istio's
//! reference it checks (istio.io/latest/docs/reference/config/security/authorization-policy/
//! and .../concepts/security/#authorization-policies).

use std::net::IpAddr;

use super::*;
use crate::policy::testutil::{err, set, workloads};
use crate::policy::PolicySet;

fn ap(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}"
    )
}

const SHOP: &str = "hipster-app";
fn frontend() -> Option<Peer> {
    Peer::from_spiffe("spiffe://cluster.local/ns/hipster-app/sa/frontend")
}
fn legacy() -> Option<Peer> {
    Peer::from_spiffe("spiffe://cluster.local/ns/legacy/sa/old")
}

struct Case {
    why: &'static str,
    policies: String,
    to: &'static str,
    peer: Option<Peer>,
    src: &'static str,
    port: u16,
    /// Expected: allowed, and the deciding `policy rule` (`None`: no rule decided).
    allowed: bool,
    by: Option<(&'static str, usize)>,
}

fn run(c: &Case) -> Result<(), String> {
    let s: PolicySet = set(&c.policies);
    let ws = workloads();
    let w = ws.workloads.iter().find(|w| w.name.as_str() == c.to).expect("workload");
    let src: IpAddr = c.src.parse().expect("src");
    let conn = Conn { peer: c.peer.as_ref(), src, dst: w.ip, port: c.port };
    let v = s.authorize(w, &conn);
    let by = v.decided_by.as_ref().map(|r| (r.policy.to_string(), r.rule));
    let want = c.by.map(|(p, r)| (p.to_owned(), r));
    if v.allowed != c.allowed || by != want {
        return Err(format!(
            "{}: got allowed={} by={by:?} ({}), want allowed={} by={want:?}",
            c.why, v.allowed, v.reason, c.allowed
        ));
    }
    Ok(())
}

#[test]
fn evaluation_follows_istio() {
    let allow_fe = ap(
        SHOP,
        "allow-frontend",
        "  selector: {matchLabels: {app: cart}}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/hipster-app/sa/frontend]\n",
    );
    let deny_port = ap(
        SHOP,
        "deny-admin",
        "  action: DENY\n  rules:\n  - to:\n    - operation: {ports: [\"9100\"]}\n",
    );
    let cases = vec![
        Case {
            why: "no policy applies: allowed (implicit enablement only with an ALLOW policy)",
            policies: ap("other", "x", "  action: DENY\n  rules: [{}]\n"),
            to: "cart", peer: legacy(), src: "10.0.0.9", port: 7070, allowed: true, by: None,
        },
        Case {
            why: "ALLOW applies and matches: allowed by it",
            policies: allow_fe.clone(),
            to: "cart", peer: frontend(), src: "10.0.0.1", port: 7070, allowed: true,
            by: Some(("hipster-app/allow-frontend", 0)),
        },
        Case {
            why: "ALLOW applies and nothing matches: denied (default deny once an ALLOW applies)",
            policies: allow_fe.clone(),
            to: "cart", peer: legacy(), src: "10.0.0.9", port: 7070, allowed: false, by: None,
        },
        Case {
            why: "selector scope: an ALLOW for app=cart does not apply to redis",
            policies: allow_fe.clone(),
            to: "redis", peer: legacy(), src: "10.0.0.9", port: 6379, allowed: true, by: None,
        },
        Case {
            why: "DENY is evaluated before ALLOW: a matching DENY wins over a matching ALLOW",
            policies: allow_fe.clone() + &deny_port,
            to: "cart", peer: frontend(), src: "10.0.0.1", port: 9100, allowed: false,
            by: Some(("hipster-app/deny-admin", 0)),
        },
        Case {
            why: "DENY that does not match leaves the ALLOW to decide",
            policies: allow_fe.clone() + &deny_port,
            to: "cart", peer: frontend(), src: "10.0.0.1", port: 7070, allowed: true,
            by: Some(("hipster-app/allow-frontend", 0)),
        },
        Case {
            why: "spec: {} (ALLOW, no rules) matches nothing: deny all of the namespace",
            policies: ap(SHOP, "allow-nothing", "  {}\n"),
            to: "frontend", peer: frontend(), src: "10.0.0.1", port: 8080, allowed: false, by: None,
        },
        Case {
            why: "rules: [{}] matches everything: allow all",
            policies: ap(SHOP, "allow-nothing", "  {}\n") + &ap(SHOP, "allow-all", "  rules: [{}]\n"),
            to: "frontend", peer: None, src: "10.0.0.9", port: 8080, allowed: true,
            by: Some(("hipster-app/allow-all", 0)),
        },
        Case {
            why: "DENY with rules: [{}] denies everything",
            policies: ap(SHOP, "deny-all", "  action: DENY\n  rules: [{}]\n") + &ap(SHOP, "allow-all", "  rules: [{}]\n"),
            to: "frontend", peer: frontend(), src: "10.0.0.1", port: 8080, allowed: false,
            by: Some(("hipster-app/deny-all", 0)),
        },
        Case {
            why: "DENY without rules denies nothing",
            policies: ap(SHOP, "deny-none", "  action: DENY\n"),
            to: "frontend", peer: frontend(), src: "10.0.0.1", port: 8080, allowed: true, by: None,
        },
        Case {
            why: "root namespace scope: a policy in istio-system applies to every namespace",
            policies: ap("istio-system", "mesh-deny-legacy", "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [legacy]}\n"),
            to: "web", peer: legacy(), src: "10.0.0.9", port: 8080, allowed: false,
            by: Some(("istio-system/mesh-deny-legacy", 0)),
        },
        Case {
            why: "namespace scope: a policy of another namespace does not apply",
            policies: ap("other", "deny-legacy", "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [legacy]}\n"),
            to: "cart", peer: legacy(), src: "10.0.0.9", port: 7070, allowed: true, by: None,
        },
        Case {
            why: "notPrincipals: [\"*\"] matches a connection without identity (plaintext), so this DENY refuses plaintext",
            policies: ap(SHOP, "require-mtls", "  action: DENY\n  rules:\n  - from:\n    - source: {notPrincipals: [\"*\"]}\n"),
            to: "cart", peer: None, src: "10.0.0.9", port: 7070, allowed: false,
            by: Some(("hipster-app/require-mtls", 0)),
        },
        Case {
            why: "notPrincipals: [\"*\"] does not match an mTLS peer",
            policies: ap(SHOP, "require-mtls", "  action: DENY\n  rules:\n  - from:\n    - source: {notPrincipals: [\"*\"]}\n"),
            to: "cart", peer: legacy(), src: "10.0.0.9", port: 7070, allowed: true, by: None,
        },
        Case {
            why: "principals never match plaintext: an ALLOW that needs one denies it",
            policies: allow_fe.clone(),
            to: "cart", peer: None, src: "10.0.0.1", port: 7070, allowed: false, by: None,
        },
        Case {
            why: "prefix match: \"cluster.local/ns/hipster-app/*\"",
            policies: ap(SHOP, "p", "  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/hipster-app/*\"]}\n"),
            to: "cart", peer: frontend(), src: "10.0.0.1", port: 7070, allowed: true, by: Some(("hipster-app/p", 0)),
        },
        Case {
            why: "suffix match: \"*/sa/frontend\" does not match sa/old",
            policies: ap(SHOP, "p", "  rules:\n  - from:\n    - source: {principals: [\"*/sa/frontend\"]}\n"),
            to: "cart", peer: legacy(), src: "10.0.0.9", port: 7070, allowed: false, by: None,
        },
        Case {
            why: "a written spiffe:// prefix matches the same principal",
            policies: ap(SHOP, "p", "  rules:\n  - from:\n    - source: {principals: [\"spiffe://cluster.local/ns/hipster-app/sa/frontend\"]}\n"),
            to: "cart", peer: frontend(), src: "10.0.0.1", port: 7070, allowed: true, by: Some(("hipster-app/p", 0)),
        },
        Case {
            why: "serviceAccounts: a bare name is of the policy's namespace",
            policies: ap(SHOP, "sa", "  rules:\n  - from:\n    - source: {serviceAccounts: [frontend]}\n"),
            to: "cart", peer: frontend(), src: "10.0.0.1", port: 7070, allowed: true, by: Some(("hipster-app/sa", 0)),
        },
        Case {
            why: "fields of one source are ANDed: namespace matches but ipBlocks does not",
            policies: ap(SHOP, "p", "  rules:\n  - from:\n    - source: {namespaces: [hipster-app], ipBlocks: [10.1.0.0/16]}\n"),
            to: "cart", peer: frontend(), src: "10.0.0.1", port: 7070, allowed: false, by: None,
        },
        Case {
            why: "entries of from are ORed: the second source matches",
            policies: ap(SHOP, "p", "  rules:\n  - from:\n    - source: {namespaces: [nope]}\n    - source: {ipBlocks: [10.0.0.0/24]}\n"),
            to: "cart", peer: legacy(), src: "10.0.0.9", port: 7070, allowed: true, by: Some(("hipster-app/p", 0)),
        },
        Case {
            why: "from AND to: the port must match too",
            policies: ap(SHOP, "p", "  rules:\n  - from:\n    - source: {namespaces: [hipster-app]}\n    to:\n    - operation: {ports: [\"7070\"]}\n"),
            to: "cart", peer: frontend(), src: "10.0.0.1", port: 9100, allowed: false, by: None,
        },
        Case {
            why: "notPorts: every port but 9100",
            policies: ap(SHOP, "p", "  rules:\n  - to:\n    - operation: {notPorts: [\"9100\"]}\n"),
            to: "cart", peer: None, src: "10.0.0.9", port: 7070, allowed: true, by: Some(("hipster-app/p", 0)),
        },
        Case {
            why: "when source.ip with notValues",
            policies: ap(SHOP, "p", "  action: DENY\n  rules:\n  - when:\n    - {key: source.ip, notValues: [10.0.0.0/24]}\n"),
            to: "cart", peer: frontend(), src: "192.168.1.1", port: 7070, allowed: false, by: Some(("hipster-app/p", 0)),
        },
        Case {
            why: "IPv4-mapped IPv6 source is matched as the IPv4 address",
            policies: ap(SHOP, "p", "  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.1]}\n"),
            to: "cart", peer: None, src: "::ffff:10.0.0.1", port: 7070, allowed: true, by: Some(("hipster-app/p", 0)),
        },
        Case {
            why: "L7 fail-safe: an ALLOW rule with methods matches nothing",
            policies: ap(SHOP, "get-only", "  rules:\n  - to:\n    - operation: {methods: [GET]}\n"),
            to: "cart", peer: frontend(), src: "10.0.0.1", port: 7070, allowed: false, by: None,
        },
        Case {
            why: "L7 fail-safe: a DENY rule ignores paths, so it denies the port",
            policies: ap(SHOP, "deny-admin-path", "  action: DENY\n  rules:\n  - to:\n    - operation: {ports: [\"7070\"], paths: [/admin]}\n"),
            to: "cart", peer: frontend(), src: "10.0.0.1", port: 7070, allowed: false, by: Some(("hipster-app/deny-admin-path", 0)),
        },
        Case {
            why: "AUDIT never changes the verdict",
            policies: ap(SHOP, "audit-all", "  action: AUDIT\n  rules: [{}]\n"),
            to: "cart", peer: None, src: "10.0.0.9", port: 7070, allowed: true, by: None,
        },
        Case {
            why: "CUSTOM is skipped (no external authorizer): it neither allows nor denies",
            policies: ap(SHOP, "ext", "  action: CUSTOM\n  provider: {name: opa}\n  rules: [{}]\n"),
            to: "cart", peer: None, src: "10.0.0.9", port: 7070, allowed: true, by: None,
        },
        Case {
            why: "targetRefs (waypoint) policies are skipped: this ALLOW-nothing does not apply",
            policies: ap(SHOP, "wp", "  targetRefs: [{kind: Service, group: \"\", name: cart}]\n"),
            to: "cart", peer: None, src: "10.0.0.9", port: 7070, allowed: true, by: None,
        },
        Case {
            why: "an empty list is no list (proto3): principals: [] beside namespaces still denies that namespace",
            policies: ap(SHOP, "deny-legacy", "  action: DENY\n  rules:\n  - from:\n    - source: {principals: [], namespaces: [legacy]}\n"),
            to: "cart", peer: legacy(), src: "10.0.0.9", port: 7070, allowed: false, by: Some(("hipster-app/deny-legacy", 0)),
        },
        Case {
            why: "an empty list is no list: notIpBlocks: [] beside principals does not match everyone",
            policies: ap(SHOP, "p", "  rules:\n  - from:\n    - source: {notIpBlocks: [], principals: [\"*/sa/frontend\"]}\n"),
            to: "cart", peer: legacy(), src: "10.0.0.9", port: 7070, allowed: false, by: None,
        },
        Case {
            why: "an empty selector is no selector: the namespace",
            policies: ap(SHOP, "all", "  selector: {matchLabels: {}}\n"),
            to: "redis", peer: frontend(), src: "10.0.0.1", port: 6379, allowed: false, by: None,
        },
    ];
    let failures: Vec<String> = cases.iter().filter_map(|c| run(c).err()).collect();
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn audit_matches_are_reported() {
    let s = set(&ap(SHOP, "audit-all", "  action: AUDIT\n  rules: [{}]\n"));
    let ws = workloads();
    let w = ws.workloads.iter().find(|w| w.name.as_str() == "cart").expect("cart");
    let v =
        s.authorize(w, &Conn { peer: None, src: "10.0.0.9".parse().unwrap(), dst: w.ip, port: 1 });
    assert!(v.allowed);
    assert_eq!(v.audited.len(), 1);
    assert_eq!(v.audited[0].to_string(), "AuthorizationPolicy hipster-app/audit-all rule 0");
}

#[test]
fn invalid_policies_are_rejected_with_file_line_and_field() {
    let cases = [
        ("  action: MAYBE\n", "policies/test.yaml:8: spec.action: unknown variant `MAYBE`"),
        ("  rules:\n  - from: []\n", "spec.rules[0].from: `from` must not be empty"),
        ("  rules:\n  - from:\n    - source: {}\n", "spec.rules[0].from[0].source: `source` must set at least one field"),
        ("  rules:\n  - to:\n    - {}\n", "spec.rules[0].to[0].operation: missing required field"),
        (
            "  rules:\n  - from:\n    - source: {serviceAccounts: [a], principals: [b]}\n",
            "spec.rules[0].from[0].source.serviceAccounts: serviceAccounts cannot be set with principals or namespaces",
        ),
        ("  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.300]}\n", "spec.rules[0].from[0].source.ipBlocks[0]: invalid address or CIDR block"),
        ("  rules:\n  - to:\n    - operation: {ports: [\"http\"]}\n", "spec.rules[0].to[0].operation.ports[0]: invalid port \"http\""),
        ("  rules:\n  - when:\n    - {key: source.ip}\n", "spec.rules[0].when[0]: condition \"source.ip\" needs values or notValues"),
        ("  rules:\n  - when:\n    - {key: source.color, values: [red]}\n", "spec.rules[0].when[0].key: unknown attribute \"source.color\""),
        ("  action: ALLOW\n  provider: {name: x}\n", "spec.provider: provider is only allowed with action CUSTOM"),
        ("  rules:\n  - from:\n    - source: {principal: [x]}\n", "spec.rules[0].from[0].source.principal: unknown field"),
        ("  rules:\n  - from:\n    - source: {principals: []}\n", "spec.rules[0].from[0].source: `source` must set at least one field"),
    ];
    for (spec, want) in cases {
        let e = err(&ap(SHOP, "bad", spec));
        assert!(e.contains(want), "{spec:?}:\n got {e}\nwant {want}");
        assert!(e.starts_with("policies/test.yaml:"), "{e}");
    }
}

#[test]
fn l7_fields_and_skipped_policies_are_warned_about_by_name_and_field() {
    let s = set(&(ap(SHOP, "get-only", "  rules:\n  - to:\n    - operation: {methods: [GET]}\n")
        + &ap(
            SHOP,
            "deny-jwt",
            "  action: DENY\n  rules:\n  - from:\n    - source: {requestPrincipals: [\"*\"]}\n",
        )
        + &ap(SHOP, "ext", "  action: CUSTOM\n  provider: {name: opa}\n")
        + &ap(SHOP, "wp", "  targetRefs: [{kind: Service, name: cart}]\n")));
    let w: Vec<String> = s.warnings().iter().map(ToString::to_string).collect();
    let has = |needle: &str| w.iter().any(|l| l.contains(needle));
    assert!(has("AuthorizationPolicy hipster-app/get-only: spec.rules[0].to[0].operation.methods is an HTTP attribute"), "{w:#?}");
    assert!(has("this ALLOW rule matches nothing"), "{w:#?}");
    assert!(has("AuthorizationPolicy hipster-app/deny-jwt: spec.rules[0].from[0].source.requestPrincipals"), "{w:#?}");
    assert!(has("this DENY rule denies more"), "{w:#?}");
    assert!(has("hipster-app/ext: action CUSTOM"), "{w:#?}");
    assert!(has("hipster-app/wp: targetRefs attaches it to a waypoint"), "{w:#?}");
    // The warnings carry the line of the field.
    assert!(w.iter().any(|l| l.starts_with("policies/test.yaml:10:")), "{w:#?}");
}

#[test]
fn peer_from_spiffe() {
    let p = Peer::from_spiffe("spiffe://td.example/ns/shop/sa/web").expect("valid");
    assert_eq!(p.principal, "td.example/ns/shop/sa/web");
    assert_eq!(p.namespace, "shop");
    assert_eq!(p.service_account, "shop/web");
    for bad in
        ["td/ns/a/sa/b", "spiffe://td/ns/a", "spiffe://td/ns/a/sa/b/c", "spiffe://td/x/a/sa/b"]
    {
        assert_eq!(Peer::from_spiffe(bad), None, "{bad}");
    }
}

#[test]
fn check_summarises_the_policies_per_port() {
    let s = set(&(ap(SHOP, "allow-fe", "  selector: {matchLabels: {app: cart}}\n  rules:\n  - to:\n    - operation: {ports: [\"7070\"]}\n")
        + &ap(SHOP, "deny-admin", "  action: DENY\n  rules:\n  - to:\n    - operation: {ports: [\"9100\"]}\n")));
    let ws = workloads();
    let cart = ws.workloads.iter().find(|w| w.name.as_str() == "cart").expect("cart");
    let redis = ws.workloads.iter().find(|w| w.name.as_str() == "redis").expect("redis");
    assert_eq!(summary(s.authz_for(cart), Some(7070)), "yes (ALLOW hipster-app/allow-fe: 1 rule)");
    // The ALLOW has no rule for 9100, so it still denies it; the DENY applies there.
    assert_eq!(
        summary(s.authz_for(cart), Some(9100)),
        "yes (ALLOW hipster-app/allow-fe: 0 rules; DENY hipster-app/deny-admin: 1 rule)"
    );
    assert_eq!(summary(s.authz_for(redis), Some(6379)), "no (none)");
    assert_eq!(summary(s.authz_for(redis), None), "yes (DENY hipster-app/deny-admin: 1 rule)");
}

#[test]
fn a_rejected_object_from_the_api_server_fails_closed_in_its_scope() {
    let bad_deny = ap(SHOP, "deny-bad", "  selector: {matchLabels: {app: cart}}\n  action: DENY\n  rules:\n  - from:\n    - source: {ipBlocks: [nonsense]}\n");
    let bad_action = ap(SHOP, "typo", "  action: DENYY\n");
    let audit = ap(
        SHOP,
        "audit-bad",
        "  action: AUDIT\n  rules:\n  - when:\n    - {key: nope, values: [x]}\n",
    );
    let docs = [bad_deny.as_str(), bad_action.as_str(), audit.as_str()];
    let origin = std::path::Path::new("kubernetes:authorizationpolicies/x");
    let (s, errors) = PolicySet::from_documents(docs.iter().map(|d| (*d, origin)), "istio-system");
    assert_eq!(errors.len(), 3, "{errors:?}");
    let names: Vec<String> = s.authz_policies().iter().map(|p| p.r.to_string()).collect();
    assert_eq!(names, ["hipster-app/deny-bad", "hipster-app/typo"], "AUDIT leaves no stand-in");
    let ws = workloads();
    let cart = ws.workloads.iter().find(|w| w.name.as_str() == "cart").expect("cart");
    let v = s.authorize(
        cart,
        &Conn {
            peer: frontend().as_ref(),
            src: "10.0.0.1".parse().unwrap(),
            dst: cart.ip,
            port: 7070,
        },
    );
    assert!(!v.allowed, "the broken DENY denies everything of its selector");
    // The unreadable action is read as DENY over the namespace.
    let redis = ws.workloads.iter().find(|w| w.name.as_str() == "redis").expect("redis");
    let v = s.authorize(
        redis,
        &Conn {
            peer: frontend().as_ref(),
            src: "10.0.0.1".parse().unwrap(),
            dst: redis.ip,
            port: 6379,
        },
    );
    assert_eq!(v.reason, "denied by AuthorizationPolicy hipster-app/typo rule 0");
}

#[test]
fn an_identity_only_deny_on_a_pod_that_takes_plaintext_is_warned_about() {
    let deny = ap(
        SHOP,
        "deny-legacy",
        "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [legacy]}\n",
    );
    let lint = |src: &str| -> Vec<String> {
        set(src).lint(&workloads()).iter().map(|w| w.message.clone()).collect()
    };
    let l = lint(&deny);
    assert!(
        l.iter().any(|m| m.starts_with(
            "AuthorizationPolicy hipster-app/deny-legacy denies only by peer identity, but "
        )),
        "{l:?}"
    );
    // Under STRICT plaintext never gets there: no warning.
    let strict = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: hipster-app}\nspec: {mtls: {mode: STRICT}}\n";
    assert!(lint(&(deny.clone() + strict)).is_empty(), "{:?}", lint(&(deny + strict)));
    // A DENY by address refuses plaintext too: no warning.
    assert!(lint(&ap(
        SHOP,
        "d",
        "  action: DENY\n  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/8]}\n"
    ))
    .is_empty());
}
