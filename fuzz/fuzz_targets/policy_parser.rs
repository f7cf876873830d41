//! `PolicySet::parse` on arbitrary text, then everything the agent and `policy check` do with an
//! accepted set: warnings, lint, per-workload decisions, the rendered report (`render_check`,
//! as `policy check` prints it), AuthorizationPolicy verdicts (mTLS and plaintext), `check`'s
//! RBAC summary and `policy check --from/--to`, and the same for another root namespace.
//!
//! Besides "no panic, no hang, no runaway memory", a rejection must point at a line of the file
//! (the operator is told `file:line`).

#![no_main]

use std::{path::Path, sync::OnceLock};

use libfuzzer_sys::fuzz_target;
use mtls_agent::{
    authz,
    policy::{render_check, render_report, PolicySet},
    workloads::WorkloadSet,
};

/// Workloads and services the decisions are made for: two namespaces, a root-namespace pod,
/// labels and service ports that the seed policies select.
const WORKLOADS: &str = "\
workloads:
- {name: frontend, namespace: hipster-app, labels: {app: frontend}, ip: 10.0.0.1, node: n1}
- {name: cart, namespace: hipster-app, labels: {app: cart, version: v1}, ip: 10.0.0.2, node: n1}
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
  ports: [{port: 7070}]
";

fn workloads() -> &'static WorkloadSet {
    static WS: OnceLock<WorkloadSet> = OnceLock::new();
    WS.get_or_init(|| {
        WorkloadSet::parse(WORKLOADS, Path::new("workloads.yaml")).expect("fixed workloads")
    })
}

fuzz_target!(|data: &[u8]| {
    // Policy files are read with read_to_string: anything that is not UTF-8 never gets here.
    let Ok(src) = std::str::from_utf8(data) else { return };
    let origin = Path::new("policies/fuzz.yaml");
    match PolicySet::parse(src, origin) {
        Ok(set) => {
            let ws = workloads();
            let mut warnings = set.warnings();
            warnings.extend(set.lint(ws));
            for w in &ws.workloads {
                let _ = set.workload_modes(ws, w);
                for port in [80, 7070, 8080, 9090, 65535] {
                    let _ = set.decide(ws, w, port);
                }
            }
            let peer = authz::Peer::from_spiffe("spiffe://cluster.local/ns/other/sa/web");
            for w in &ws.workloads {
                for (peer, src) in [(peer.as_ref(), "10.0.0.5"), (None, "192.0.2.1"), (None, "::ffff:10.0.0.1")] {
                    let src = src.parse().expect("fixed address");
                    let conn = authz::Conn { peer, src, dst: w.ip, port: 7070 };
                    let v = set.authorize(w, &conn);
                    // A verdict always names why, and a DENY or ALLOW rule that decided exists.
                    assert!(!v.reason.is_empty());
                    if let Some(d) = &v.decided_by {
                        let p = set.authz_policies().iter().find(|p| p.r == d.policy).expect("deciding policy");
                        assert!(d.rule < p.rules.len(), "rule {} of {} rules", d.rule, p.rules.len());
                    }
                }
                let _ = authz::summary(set.authz_for(w), Some(7070));
                let _ = authz::summary(set.authz_for(w), None);
            }
            for from in ["web.other", "192.0.2.1"] {
                if let Ok(a) = authz::query::check(&set, ws, "cluster.local", from, "cart.hipster-app:7070") {
                    let _ = authz::query::render(&a);
                }
            }
            let _ = render_report(&set.report(ws), &warnings);
            let _ = render_check(&set, ws);
            let set = set.with_root_namespace("hipster-app");
            let _ = set.warnings();
            let _ = set.report(ws);
        }
        Err(e) => {
            let text = e.to_string();
            assert!(text.starts_with("policies/fuzz.yaml"), "error does not name the file: {text}");
            if let Some(line) = e.line() {
                // A line past the end of the text points nowhere. libyaml ends an unterminated
                // last line itself, so an error at the very end may be one line further.
                let lines = yaml_lines(src) + usize::from(!src.ends_with(['\n', '\r']));
                assert!(
                    (1..=lines).contains(&line),
                    "error points at line {line} of a {lines}-line file: {text}"
                );
            }
        }
    }
});

/// Lines as YAML (1.1, libyaml) counts them: `\r\n`, a lone `\r`, `\n`, NEL, LS and PS each end
/// one.
fn yaml_lines(src: &str) -> usize {
    let unified = src.replace("\r\n", "\n");
    let breaks = unified
        .chars()
        .filter(|c| matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}'))
        .count();
    breaks + 1
}
