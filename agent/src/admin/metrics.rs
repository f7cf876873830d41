//! Prometheus text exposition of the agent's counters (`/metrics`).

use std::fmt::Write as _;

use super::AdminState;

/// Renders every metric in the Prometheus text format (version 0.0.4).
pub fn render(state: &AdminState) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let node = escape(&state.node);
    let totals = state.mesh.conns.totals();
    let by = |f: fn(&crate::tunnel::connections::Totals) -> u64| -> Vec<(String, f64)> {
        totals
            .iter()
            .map(|(d, m, t)| {
                let d = format!("{d:?}").to_lowercase();
                (
                    format!("{{node=\"{node}\",direction=\"{d}\",mode=\"{}\"}}", escape(m)),
                    f(t) as f64,
                )
            })
            .collect()
    };
    family(
        "mtls_agent_connections_opened_total",
        "counter",
        "Connections opened.",
        &by(|t| t.opened),
    );
    family(
        "mtls_agent_connections_closed_total",
        "counter",
        "Connections closed.",
        &by(|t| t.closed),
    );
    family(
        "mtls_agent_bytes_sent_total",
        "counter",
        "Bytes from the connection's source to its destination.",
        &by(|t| t.bytes_sent),
    );
    family(
        "mtls_agent_bytes_received_total",
        "counter",
        "Bytes from the connection's destination back to its source.",
        &by(|t| t.bytes_received),
    );
    let failures: Vec<(String, f64)> = state
        .enrollment
        .counts()
        .into_iter()
        .map(|(step, n)| (format!("{{node=\"{node}\",reason=\"{}\"}}", step.as_str()), n as f64))
        .collect();
    family(
        "mtls_agent_enrollment_failures_total",
        "counter",
        "Failed enrollment attempts of this node's pods, by the step that failed.",
        &failures,
    );
    family(
        "mtls_agent_pods_not_enrolled",
        "gauge",
        "Pods of this node whose enrollment failed (held closed, retried).",
        &[(format!("{{node=\"{node}\"}}"), state.enrollment.list().len() as f64)],
    );
    // Always there, so an alert on `== 1` (or on its absence) sees every node.
    let (reason, refused) = state.refusal.as_ref().map_or(("none", 0.0), |r| (r.reason(), 1.0));
    family(
        "mtls_agent_capture_refused",
        "gauge",
        "1: the agent refuses this node (reason: kernel, cgroup_v1, min_kernel) and captures nothing; 0 (reason none): it serves.",
        &[(format!("{{node=\"{node}\",reason=\"{reason}\"}}"), refused)],
    );
    family(
        "mtls_agent_connections_open",
        "gauge",
        "Connections open now.",
        &[(format!("{{node=\"{node}\"}}"), state.mesh.conns.live_count() as f64)],
    );

    let s = state.mesh.stats();
    let one = |v: u64| vec![(format!("{{node=\"{node}\"}}"), v as f64)];
    family(
        "mtls_agent_tls_handshakes_total",
        "counter",
        "Successful TLS handshakes (outbound: new pooled HBONE connections).",
        &[
            (format!("{{node=\"{node}\",direction=\"outbound\"}}"), s.outbound_handshakes as f64),
            (format!("{{node=\"{node}\",direction=\"inbound\"}}"), s.inbound_handshakes as f64),
        ],
    );
    let by_reason = |counts: &crate::tunnel::ReasonCounts| -> Vec<(String, f64)> {
        counts
            .get()
            .into_iter()
            .map(|(direction, reason, n)| {
                let labels = format!(
                    "{{node=\"{node}\",direction=\"{direction}\",reason=\"{}\"}}",
                    escape(reason)
                );
                (labels, n as f64)
            })
            .collect()
    };
    family(
        "mtls_agent_tls_handshake_failures_total",
        "counter",
        "Failed TLS handshakes, by direction and reason (not_tls, unknown_ca, no_client_cert, timeout, ...).",
        &by_reason(&state.mesh.stats.tls_failures),
    );
    family(
        "mtls_agent_rejections_total",
        "counter",
        "Other connections and tunnels refused by the agent, by direction and reason (hbone:..., connect_failed, no_endpoints, ...).",
        &by_reason(&state.mesh.stats.rejections),
    );
    let servers: Vec<(String, f64)> = state
        .mesh
        .stats
        .servers
        .get()
        .into_iter()
        .map(|(server, reason, n)| {
            (format!("{{node=\"{node}\",server=\"{server}\",reason=\"{reason}\"}}"), n as f64)
        })
        .collect();
    family(
        "mtls_agent_server_rejections_total",
        "counter",
        "Connections and requests refused by the agent's own HTTP servers, by server (admin, metrics, health) and reason (connection_limit, header_timeout, body_too_large).",
        &servers,
    );
    let authz: Vec<(String, f64)> = state
        .mesh
        .stats
        .authz
        .get()
        .into_iter()
        .map(|((policy, mode, verdict), n)| {
            let policy = escape(&policy);
            (
                format!(
                    "{{node=\"{node}\",policy=\"{policy}\",mode=\"{mode}\",verdict=\"{verdict}\"}}"
                ),
                n as f64,
            )
        })
        .collect();
    family(
        "mtls_agent_authz_decisions_total",
        "counter",
        "Connections denied by AuthorizationPolicy (verdict=denied; policy is the deciding DENY policy, or default-deny when ALLOW policies apply and none matched) and AUDIT matches (verdict=audited), by policy and mode (mtls: judged by the agent; plaintext: judged in eBPF).",
        &authz,
    );
    family(
        "mtls_agent_hbone_streams_total",
        "counter",
        "HBONE streams opened by this node's clients.",
        &one(s.outbound_streams),
    );

    if let Some(ebpf) = &state.ebpf {
        let e = ebpf.read();
        family(
            "mtls_agent_plaintext_rejected_total",
            "counter",
            "Plaintext connections refused by a STRICT port, counted in eBPF.",
            &one(e.strict_rejected),
        );
        family(
            "mtls_agent_policy_rejections_total",
            "counter",
            "Connections refused because of a policy, by reason (plaintext_to_strict: plaintext to a STRICT port, counted in eBPF).",
            &[(
                format!("{{node=\"{node}\",reason=\"plaintext_to_strict\"}}"),
                e.strict_rejected as f64,
            )],
        );
        family(
            "mtls_agent_probes_allowed_total",
            "counter",
            "Plaintext probes from the node let into STRICT pods, counted in eBPF.",
            &one(e.probe_allowed),
        );
        family(
            "mtls_agent_captured_total",
            "counter",
            "Connections captured by connect4/connect6.",
            &one(e.captured),
        );
        family(
            "mtls_agent_held_refused_total",
            "counter",
            "TCP connect()s refused from pods held closed until enrolled (bound to this node, namespace not enrolled yet), counted in eBPF.",
            &one(e.held_refused),
        );
        let progs = ebpf.programs();
        let runs: Vec<(String, f64)> = progs
            .iter()
            .map(|p| {
                (format!("{{node=\"{node}\",program=\"{}\"}}", escape(&p.program)), p.runs as f64)
            })
            .collect();
        let time: Vec<(String, f64)> = progs
            .iter()
            .map(|p| {
                (
                    format!("{{node=\"{node}\",program=\"{}\"}}", escape(&p.program)),
                    p.run_time_ns as f64 / 1e9,
                )
            })
            .collect();
        family(
            "mtls_agent_ebpf_program_runs_total",
            "counter",
            "Runs of each eBPF program (kernel BPF stats).",
            &runs,
        );
        family(
            "mtls_agent_ebpf_program_run_seconds_total",
            "counter",
            "Time spent in each eBPF program (kernel BPF stats).",
            &time,
        );
    }

    let now = std::time::SystemTime::now();
    let expiry: Vec<(String, f64)> = state
        .mesh
        .certs
        .list()
        .into_iter()
        .map(|c| {
            let left = c.not_after.duration_since(now).map(|d| d.as_secs_f64()).unwrap_or(0.0);
            (
                format!(
                    "{{node=\"{node}\",workload=\"{}\",identity=\"{}\"}}",
                    escape(&c.workload),
                    escape(&c.identity.to_string())
                ),
                left,
            )
        })
        .collect();
    family(
        "mtls_agent_certificate_expiry_seconds",
        "gauge",
        "Seconds until each workload certificate expires.",
        &expiry,
    );
    let health = state.mesh.certs.health();
    family(
        "mtls_agent_ca_requests_total",
        "counter",
        "Certificate requests to the CA, by result (ok, failed).",
        &[
            (format!("{{node=\"{node}\",result=\"ok\"}}"), health.requests_ok as f64),
            (format!("{{node=\"{node}\",result=\"failed\"}}"), health.requests_failed as f64),
        ],
    );
    family(
        "mtls_agent_ca_failing",
        "gauge",
        "1 while the CA's last answer was a failure (certificates in hand keep working until they expire).",
        &[(format!("{{node=\"{node}\"}}"), if health.failing.is_some() { 1.0 } else { 0.0 })],
    );
    family(
        "mtls_agent_certificates_waiting",
        "gauge",
        "Workloads of this node without a first certificate (their mesh traffic fails closed).",
        &[(format!("{{node=\"{node}\"}}"), state.mesh.certs.pending().len() as f64)],
    );
    let states: Vec<(String, f64)> = state
        .policy_sources
        .states()
        .into_iter()
        .map(|(kind, st)| {
            (
                format!("{{node=\"{node}\",kind=\"{}\",state=\"{}\"}}", escape(&kind), st.as_str()),
                1.0,
            )
        })
        .collect();
    family(
        "mtls_agent_policy_source_state",
        "gauge",
        "The state of each Istio policy kind (1 for its current state): ok, failing (served but not readable: its last known policies stay in force), not_served, listing, discovering.",
        &states,
    );
    let errors: Vec<(String, f64)> = state
        .policy_sources
        .error_counts()
        .into_iter()
        .map(|(kind, reason, n)| {
            (
                format!("{{node=\"{node}\",kind=\"{}\",reason=\"{reason}\"}}", escape(&kind)),
                n as f64,
            )
        })
        .collect();
    family(
        "mtls_agent_policy_source_errors_total",
        "counter",
        "Failed lists and watches of a served policy kind, by reason (forbidden, not_found, server_error, unreachable, ...).",
        &errors,
    );
    out
}

/// Escapes a label value (backslash, quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
