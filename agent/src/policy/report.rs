//! The human-readable `policy check` output.

use std::fmt::Write as _;

use super::{Decision, PolicySet, Warning, WorkloadReport};
use crate::workloads::WorkloadSet;

/// `policy check`: [`render_report`] for `ws`, with the set's warnings and
/// then those of [`PolicySet::lint`].
pub fn render_check(set: &PolicySet, ws: &WorkloadSet) -> String {
    let mut warnings = set.warnings();
    warnings.extend(set.lint(ws));
    render_report(&set.report(ws), &warnings)
}

/// A table with one row per workload and port (`*` for the default), then
/// the policies that were ignored and why, then the warnings:
///
/// ```text
/// WORKLOAD              PORT  MODE        DECIDED BY
/// frontend.hipster-app  *     STRICT      Policy hipster-app/default (namespace)
/// frontend.hipster-app  8080  PERMISSIVE  PeerAuthentication hipster-app/fe (workload port)
///
/// ignored:
///   frontend.hipster-app: PeerAuthentication hipster-app/b (policies/b.yaml:1): older policy ...
///
/// warnings:
///   policies/x.yaml:3: skipped DestinationRule ...
/// ```
pub fn render_report(reports: &[WorkloadReport], warnings: &[Warning]) -> String {
    let mut rows: Vec<[String; 4]> =
        vec![["WORKLOAD".into(), "PORT".into(), "MODE".into(), "DECIDED BY".into()]];
    for r in reports {
        rows.push(row(&r.workload, "*".to_string(), &r.default));
        for (port, d) in &r.ports {
            rows.push(row(&r.workload, port.to_string(), d));
        }
    }
    let mut widths = [0usize; 3];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    if reports.is_empty() {
        out.push_str("no workloads\n");
    } else {
        for [workload, port, mode, by] in &rows {
            let line = format!(
                "{workload:<w0$}  {port:<w1$}  {mode:<w2$}  {by}",
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2]
            );
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    let ignored: Vec<String> = reports
        .iter()
        .flat_map(|r| {
            r.ignored.iter().map(move |i| {
                format!(
                    "  {}: {} ({}): {}",
                    r.workload,
                    i.policy.describe(),
                    i.policy.location(),
                    i.why
                )
            })
        })
        .collect();
    if !ignored.is_empty() {
        out.push_str("\nignored:\n");
        for line in ignored {
            let _ = writeln!(out, "{line}");
        }
    }
    if !warnings.is_empty() {
        out.push_str("\nwarnings:\n");
        for w in warnings {
            let _ = writeln!(out, "  {w}");
        }
    }
    out
}

fn row(workload: &str, port: String, d: &Decision) -> [String; 4] {
    let by = match (&d.decided_by, d.level) {
        (Some(p), Some(level)) => format!("{} ({level})", p.describe()),
        (Some(p), None) => p.describe(),
        (None, _) => "- (no policy)".to_string(),
    };
    [workload.to_string(), port, d.mode.to_string(), by]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::{pa, set};
    use crate::policy::PolicySet;
    use crate::workloads::WorkloadSet;
    use std::path::Path;

    #[test]
    fn table_then_ignored_then_warnings() {
        let ws = WorkloadSet::parse(
            "workloads:\n\
             - {name: frontend, namespace: hipster-app, labels: {app: frontend}, ip: 10.0.0.1, node: n}\n\
             - {name: db, namespace: data, ip: 10.0.0.2, node: n}\n",
            Path::new("w.yaml"),
        )
        .unwrap();
        let src = pa("hipster-app", "default", None, "  mtls: {mode: STRICT}\n")
            + &pa("hipster-app", "fe", None, "  selector: {matchLabels: {app: frontend}}\n  portLevelMtls:\n    15020: {mode: DISABLE}\n")
            + &pa("istio-system", "x", None, "  selector: {matchLabels: {app: frontend}}\n")
            + "---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: dr, namespace: hipster-app}\n";
        let s = PolicySet::parse(&src, Path::new("p.yaml")).unwrap();
        let out = render_check(&s, &ws);
        let expected = "\
WORKLOAD              PORT   MODE        DECIDED BY
frontend.hipster-app  *      STRICT      PeerAuthentication hipster-app/default (namespace)
frontend.hipster-app  15020  DISABLE     PeerAuthentication hipster-app/fe (workload port)
db.data               *      PERMISSIVE  - (no policy)

ignored:
  frontend.hipster-app: PeerAuthentication hipster-app/default (p.yaml:2): port 15020: overridden by port 15020 of PeerAuthentication hipster-app/fe
  frontend.hipster-app: PeerAuthentication istio-system/x (p.yaml:20): selector in the root namespace istio-system is ignored

warnings:
  p.yaml:28: skipped DestinationRule hipster-app/dr (networking.istio.io/v1beta1): only PeerAuthentication, AuthorizationPolicy (security.istio.io) and Policy/MeshPolicy (authentication.istio.io/v1alpha1) are read
  p.yaml:20: PeerAuthentication istio-system/x: selector in the root namespace istio-system is ignored (a root-namespace PeerAuthentication applies mesh-wide and must have no selector)
";
        assert_eq!(out, expected);
    }

    /// `policy check` also shows what needs the workloads to see: a target that matches nothing.
    #[test]
    fn check_includes_the_lint() {
        let ws = WorkloadSet::parse(
            "workloads: [{name: a, namespace: b, ip: 10.0.0.1, node: n}]\n",
            Path::new("w.yaml"),
        )
        .unwrap();
        let src = "apiVersion: authentication.istio.io/v1alpha1\nkind: Policy\nmetadata: {name: x, namespace: b}\nspec:\n  targets: [{name: gone}]\n";
        let out = render_check(&set(src), &ws);
        assert!(
            out.ends_with("warnings:\n  policies/test.yaml:5: Policy b/x: target service gone does not exist in namespace b\n"),
            "{out}"
        );
    }

    #[test]
    fn empty_inputs() {
        assert_eq!(render_report(&[], &[]), "no workloads\n");
        let ws = WorkloadSet::parse(
            "workloads: [{name: a, namespace: b, ip: 10.0.0.1, node: n}]\n",
            Path::new("w.yaml"),
        )
        .unwrap();
        let out = render_report(&set("").report(&ws), &[]);
        assert_eq!(
            out,
            "WORKLOAD  PORT  MODE        DECIDED BY\na.b       *     PERMISSIVE  - (no policy)\n"
        );
    }
}
