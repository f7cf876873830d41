//! Output of the operator commands (`check`, `connections`, `certs`): tables for people, JSON or
//! YAML for scripts.

use std::fmt::Write as _;

use serde_json::Value;

use super::Output;

/// Renders rows as aligned columns under a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}   ", w = widths[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut out, header.to_vec());
    for r in rows {
        line(&mut out, r.iter().map(String::as_str).collect());
    }
    out
}

/// Most endpoints named per service port in the table.
const ENDPOINTS_SHOWN: usize = 4;

/// `10.0.0.3:8080 (b.ns), 192.0.2.1:6443 (outside the mesh), +3 more`.
fn endpoints(v: &Value) -> String {
    let all = v.as_array().map(Vec::as_slice).unwrap_or_default();
    if all.is_empty() {
        return "-".into();
    }
    let mut parts: Vec<String> = all
        .iter()
        .take(ENDPOINTS_SHOWN)
        .map(|e| match e["pod"].as_str() {
            Some(pod) => format!("{} ({pod})", s(&e["address"])),
            None => format!("{} (outside the mesh)", s(&e["address"])),
        })
        .collect();
    if all.len() > ENDPOINTS_SHOWN {
        parts.push(format!("+{} more", all.len() - ENDPOINTS_SHOWN));
    }
    parts.join(", ")
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// JSON or YAML of any answer; `None` for table output.
pub fn structured(v: &Value, o: Output) -> anyhow::Result<Option<String>> {
    Ok(match o {
        Output::Table => None,
        Output::Json => Some(serde_json::to_string_pretty(v)? + "\n"),
        Output::Yaml => Some(serde_yaml::to_string(v)?),
    })
}

/// `mtls-agent check`: the listener and outbound tables, then why each listener is as it is.
pub fn check(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Pod {} ({}) on node {}: {}",
        s(&v["pod"]),
        s(&v["ip"]),
        s(&v["node"]),
        if v["membership"]["inMesh"] == false {
            format!("NOT IN THE MESH: {}", s(&v["note"]))
        } else if v["enrolled"] != true
            && v["note"]
                .as_str()
                .is_some_and(|n| n.starts_with("waiting for its first certificate"))
        {
            format!("NO CERTIFICATE YET, CLOSED: {}", s(&v["note"]))
        } else if v["enrolled"] != true
            && v["listeners"].as_array().is_some_and(Vec::is_empty)
            && v["node"] == v["agentNode"]
            && v["note"].is_string()
        {
            format!("NOT ENROLLED YET: {}", s(&v["note"]))
        } else if v["enrolled"] == true {
            let by = v["membership"]["by"].as_str().map(|b| format!(" ({b})")).unwrap_or_default();
            let issuer = v["certificateIssuer"]
                .as_str()
                .map(|i| format!(", issued by {i}"))
                .unwrap_or_default();
            format!(
                "in the mesh{by} as {}, certificate {} valid until {}{issuer}",
                s(&v["identity"]),
                s(&v["certificateSerial"]),
                s(&v["certificateExpires"])
            )
        } else if let Some(note) = v["note"].as_str() {
            format!("NOT ON THIS AGENT'S NODE ({}). {note}", s(&v["agentNode"]))
        } else if let Some(f) = v["enrollmentFailure"].as_object() {
            let f = Value::Object(f.clone());
            format!(
                "NOT ENROLLED: enrollment fails at step {} ({}), {} attempts since {}; the pod \
                 fails closed ({}) and is retried",
                s(&f["step"]),
                s(&f["reason"]),
                f["attempts"],
                s(&f["since"]),
                if f["failsClosed"] == true {
                    "STRICT ports refuse plaintext, outbound stays captured"
                } else {
                    "its network namespace cannot be opened: nothing to hold"
                }
            )
        } else {
            "not enrolled by this agent (not in the mesh, or its enrollment failed)".to_owned()
        }
    );
    // A policy source that cannot be read: the modes below are its last known policies.
    for f in v["policySourcesFailing"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "WARNING: {}", s(f));
    }
    let listeners = v["listeners"].as_array().cloned().unwrap_or_default();
    let udp = v["udpListeners"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "\nChecked {} listeners.", listeners.len() + udp.len());
    let mut rows: Vec<Vec<String>> = listeners
        .iter()
        .map(|l| {
            vec![
                s(&l["listener"]),
                s(&l["certificate"]),
                s(&l["mtls"]),
                s(&l["rbac"]),
                s(&l["decidedBy"]),
            ]
        })
        .collect();
    // UDP in the same table: what STRICT leaves open belongs next to what it closes.
    rows.extend(udp.iter().map(|u| {
        vec![s(&u["listener"]), "none".into(), s(&u["mtls"]), "no (none)".into(), "-".into()]
    }));
    out.push_str(&table(
        &["LISTENER", "CERTIFICATE", "mTLS (MODE)", "RBAC (RULES)", "DECIDED BY"],
        &rows,
    ));
    if let Some(note) = v["udpNote"].as_str() {
        let _ = writeln!(out, "(UDP: {note})");
    }
    let outbound = v["outbound"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "\nChecked {} outbound destinations.", outbound.len());
    let rows: Vec<Vec<String>> = outbound
        .iter()
        .map(|o| {
            vec![
                s(&o["hostPort"]),
                s(&o["certificate"]),
                s(&o["validatePeerCertificate"]),
                format!("{} {}", s(&o["mode"]), s(&o["decidedBy"])),
                endpoints(&o["endpoints"]),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "HOST:PORT",
            "CERTIFICATE",
            "VALIDATE PEER CERTIFICATE",
            "SERVER MODE (DECIDED BY)",
            "ENDPOINTS",
        ],
        &rows,
    ));
    let observed = v["observed"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "\nObserved traffic (live and recent connections this agent saw):");
    if observed.is_empty() {
        out.push_str("  none yet\n");
    } else {
        let rows: Vec<Vec<String>> = observed
            .iter()
            .map(|o| {
                vec![
                    s(&o["direction"]),
                    s(&o["target"]),
                    s(&o["mtls"]),
                    s(&o["plaintext"]),
                    s(&o["open"]),
                    s(&o["lastPlaintextPeer"]),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "DIRECTION",
                "PORT / DESTINATION",
                "mTLS",
                "PLAINTEXT",
                "OPEN",
                "LAST PLAINTEXT PEER",
            ],
            &rows,
        ));
    }
    out.push_str("\nWhy:\n");
    let mut seen = Vec::new();
    for l in listeners.iter().chain(&udp) {
        let line = format!("  {}: {}", s(&l["listener"]), s(&l["reason"]));
        if !seen.contains(&line) {
            let _ = writeln!(out, "{line}");
            seen.push(line);
        }
    }
    out
}

/// `mtls-agent connections`.
pub fn connections(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|c| {
            vec![
                s(&c["direction"]),
                s(&c["sourcePod"]),
                s(&c["source"]),
                s(&c["originalDestination"]),
                format!("{} {}", s(&c["destinationPod"]), s(&c["destination"])),
                s(&c["mode"]),
                s(&c["tls"]),
                s(&c["peerIdentity"]),
                format!("{}/{}", s(&c["bytesSent"]), s(&c["bytesReceived"])),
                if c["open"] == true {
                    format!("{} (open)", duration(&c["ageMs"]))
                } else {
                    format!("{} (closed)", duration(&c["durationMs"]))
                },
                s(&c["policy"]),
            ]
        })
        .collect();
    table(
        &[
            "DIR",
            "SOURCE POD",
            "SOURCE",
            "ORIGINAL DST",
            "DESTINATION",
            "MODE",
            "TLS",
            "PEER IDENTITY",
            "BYTES OUT/IN",
            "AGE",
            "POLICY",
        ],
        &rows,
    )
}

/// Milliseconds as people read them: `850ms`, `12.3s`, `4m05s`, `2h03m`.
fn duration(ms: &Value) -> String {
    let Some(ms) = ms.as_u64() else {
        return "-".into();
    };
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// `mtls-agent certs`.
pub fn certs(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let waiting = c["state"] == "waiting";
            let failures = c["renewalFailures"].as_u64().unwrap_or_default();
            let status = match (waiting, failures) {
                (true, _) => format!(
                    "WAITING since {} (mesh traffic closed): {}",
                    s(&c["waitingSince"]),
                    c["lastError"].as_str().unwrap_or("asking the CA")
                ),
                (false, 0) => "ok".into(),
                (false, n) => format!("{n} renewals failed: {}", s(&c["lastError"])),
            };
            vec![
                s(&c["workload"]),
                s(&c["identity"]),
                if waiting { "-".into() } else { s(&c["serial"]) },
                s(&c["notAfter"]),
                s(&c["nextRenewal"]),
                s(&c["issuedBy"]),
                status,
            ]
        })
        .collect();
    table(
        &["WORKLOAD", "IDENTITY", "SERIAL", "NOT AFTER", "NEXT REQUEST", "ISSUED BY", "STATUS"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_to_the_widest_cell() {
        let t = table(
            &["A", "BB"],
            &[vec!["long cell".into(), "x".into()], vec!["s".into(), "y".into()]],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "A           BB");
        assert_eq!(lines[1], "long cell   x");
        assert_eq!(lines[2], "s           y");
    }

    #[test]
    fn check_says_a_pod_that_failed_enrollment_fails_closed_and_why() {
        let v = serde_json::json!({
            "pod": "a.ns", "ip": "10.0.0.2", "node": "node1", "agentNode": "node1",
            "enrolled": false, "listeners": [], "outbound": [],
            "enrollmentFailure": {"pod": "a.ns", "step": "listeners", "failsClosed": true,
                "reason": "Address already in use", "since": "2026-01-01T00:00:00Z", "attempts": 3}});
        let text = check(&v);
        let first = text.lines().next().unwrap_or_default();
        assert!(first.contains("NOT ENROLLED") && first.contains("listeners"), "{text}");
        assert!(first.contains("Address already in use") && first.contains("3 attempts"), "{text}");
        assert!(first.contains("fails closed") && first.contains("retried"), "{text}");
    }

    #[test]
    fn connections_show_age_and_bytes_of_live_ones() {
        let v = serde_json::json!([
            {"direction": "outbound", "open": true, "ageMs": 61_500, "bytesSent": 5, "bytesReceived": 7},
            {"direction": "inbound", "open": false, "durationMs": 850, "bytesSent": 1, "bytesReceived": 2}
        ]);
        let text = connections(&v);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].contains("5/7") && lines[1].contains("1m01s (open)"), "{text}");
        assert!(lines[2].contains("1/2") && lines[2].contains("850ms (closed)"), "{text}");
    }

    #[test]
    fn check_warns_when_a_policy_source_fails() {
        let v = serde_json::json!({"pod": "b.ns", "ip": "10.0.0.3", "node": "node1",
            "agentNode": "node1", "enrolled": true, "listeners": [], "outbound": [],
            "policySourcesFailing": ["policy source peerauthentications.security.istio.io/v1 fails (forbidden: no); its last known policies stay in force"]});
        let out = check(&v);
        assert!(out.contains("WARNING: policy source peerauthentications"), "{out}");
        assert!(out.contains("stay in force"), "{out}");
    }

    #[test]
    fn check_says_when_the_pod_is_on_another_node() {
        let v = serde_json::json!({"pod": "b.ns", "ip": "10.0.0.3", "node": "node2",
            "agentNode": "node1", "enrolled": false, "note": "b.ns runs on node node2",
            "listeners": [], "outbound": []});
        let text = check(&v);
        assert!(text.contains("NOT ON THIS AGENT'S NODE (node1)"), "{text}");
        assert!(text.contains("runs on node node2"), "{text}");
    }

    #[test]
    fn check_says_why_a_pod_is_not_in_the_mesh() {
        let v = serde_json::json!({"pod": "p.shop", "ip": "10.0.0.5", "node": "node1",
            "agentNode": "node1", "enrolled": false,
            "membership": {"inMesh": false, "reason": "not opted in", "optedIn": false},
            "note": "p.shop is not in the mesh: not opted in", "listeners": [], "outbound": []});
        let text = check(&v);
        assert!(
            text.contains("NOT IN THE MESH: p.shop is not in the mesh: not opted in"),
            "{text}"
        );
        let v = serde_json::json!({"pod": "p.shop", "ip": "-", "node": "node1",
            "agentNode": "node1", "enrolled": false, "membership": {"inMesh": true, "by": "x"},
            "note": "p.shop is in the mesh (x) but not running", "listeners": [], "outbound": []});
        assert!(check(&v).contains("NOT ENROLLED YET: p.shop is in the mesh"), "{}", check(&v));
        let v = serde_json::json!({"pod": "p.shop", "ip": "10.0.0.5", "node": "node1",
            "agentNode": "node1", "enrolled": true, "identity": "spiffe://x",
            "membership": {"inMesh": true, "by": "namespace shop label l=v"},
            "listeners": [], "outbound": []});
        let text = check(&v);
        assert!(text.contains("in the mesh (namespace shop label l=v) as spiffe://x"), "{text}");
    }

    #[test]
    fn check_renders_listeners_outbound_and_reasons() {
        let v: Value = serde_json::json!({
            "pod": "frontend.hipster-app", "ip": "10.0.0.2", "node": "node1", "enrolled": true,
            "identity": "spiffe://cluster.local/ns/hipster-app/sa/frontend",
            "certificateSerial": "ab", "certificateExpires": "2026-01-01T00:00:00Z",
            "listeners": [{"listener": "10.0.0.2_*", "certificate": "spiffe://x", "mtls": "yes (STRICT)",
                "rbac": "no (none)", "decidedBy": "hipster-app/default (namespace)", "reason": "because"}],
            "outbound": [{"hostPort": "cart.hipster-app:7070", "certificate": "spiffe://x",
                "validatePeerCertificate": "spiffe://y", "mode": "STRICT", "decidedBy": "hipster-app/default (namespace)",
                "endpoints": [{"address": "10.0.0.3:7070", "pod": "cart.hipster-app"},
                              {"address": "192.0.2.1:7070", "pod": null}]}]
        });
        let text = check(&v);
        assert!(text.contains("10.0.0.2_*"), "{text}");
        assert!(
            text.contains("10.0.0.3:7070 (cart.hipster-app), 192.0.2.1:7070 (outside the mesh)"),
            "{text}"
        );
        assert!(text.contains("yes (STRICT)"));
        assert!(text.contains("cart.hipster-app:7070"));
        assert!(text.contains("10.0.0.2_*: because"));
    }

    #[test]
    fn check_lists_udp_listeners_as_not_covered_in_the_listener_table() {
        let v: Value = serde_json::json!({
            "pod": "dns.ns", "ip": "10.0.0.4", "node": "node1", "enrolled": true,
            "listeners": [{"listener": "10.0.0.4_*", "certificate": "spiffe://x",
                "mtls": "yes (STRICT)", "rbac": "no (none)", "decidedBy": "-", "reason": "r"}],
            "udpListeners": [{"listener": "UDP 0.0.0.0:5353", "address": "0.0.0.0:5353",
                "covered": false, "mtls": "not covered (UDP is not captured; plaintext)",
                "reason": "TCP only"}],
            "udpNote": "3 more UDP listeners not shown",
            "outbound": []
        });
        let text = check(&v);
        assert!(text.contains("Checked 2 listeners."), "{text}");
        let row = text.lines().find(|l| l.starts_with("UDP 0.0.0.0:5353")).unwrap_or_default();
        assert!(
            row.contains("none") && row.contains("not covered (UDP is not captured; plaintext)"),
            "{text}"
        );
        assert!(text.contains("(UDP: 3 more UDP listeners not shown)"), "{text}");
        assert!(text.contains("UDP 0.0.0.0:5353: TCP only"), "{text}");
    }
}
