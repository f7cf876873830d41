//! End-to-end: what the operator sees — `mtls-agent check`, `connections`, `certs`, the admin
//! API, Prometheus metrics, readiness, log lines for rejections and run-time log levels.
//! Runs as root.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Result;
use testbed::{
    agent::{agent_bin, AgentProcess, ServiceEntry},
    mesh::{namespace_pa, Mesh, PolicyDir, PORT},
};

const NS: &str = "hipster-app";

/// node1: frontend and cartservice in the mesh (cartservice behind a service on port 7070),
/// outsider not; `hipster-app` STRICT.
struct Shop {
    policies: PolicyDir,
    m: Mesh,
}

impl Shop {
    fn new(test: &str, extra: &[&str]) -> Result<Shop> {
        let mut m = Mesh::build(
            test,
            NS,
            &[("node1", "frontend"), ("node1", "cartservice"), ("node1", "outsider")],
        )?;
        let (path, mut file) = m.workloads("workloads", &["frontend", "cartservice"])?;
        file.services.push(ServiceEntry {
            name: "cartservice".into(),
            namespace: NS.into(),
            vip: Some("10.96.0.20".parse()?),
            selector: vec![("app".into(), "cartservice".into())],
            ports: vec![(7070, PORT)],
        });
        file.write(&path)?;
        let policies = PolicyDir::new(m.bed.id())?;
        policies.write("ns.yaml", &namespace_pa(NS, "STRICT"))?;
        let ca = m.ca("ca")?;
        let dir = policies.0.display().to_string();
        let mut args = vec!["--policies", dir.as_str()];
        args.extend_from_slice(extra);
        m.start_agent("node1", &path, &ca, &args)?;
        Ok(Shop { policies, m })
    }

    fn agent(&self) -> &AgentProcess {
        self.m.agent("node1")
    }

    /// Runs an operator command against this agent's admin API.
    fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(agent_bin())
            .args(args)
            .args(["--admin", &self.agent().admin.to_string()])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "mtls-agent {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

#[test]
fn check_answers_is_it_encrypted_and_which_policy_decided() -> Result<()> {
    let s = Shop::new("op-check", &[])?;
    let ip = s.m.bed.pod("cartservice").ip;
    let text = s.cli(&["check", "cartservice.hipster-app"])?;
    for header in [
        "LISTENER",
        "CERTIFICATE",
        "mTLS (MODE)",
        "RBAC (RULES)",
        "HOST:PORT",
        "VALIDATE PEER CERTIFICATE",
    ] {
        assert!(text.contains(header), "missing {header}:\n{text}");
    }
    let row = text.lines().find(|l| l.starts_with(&format!("{ip}_*"))).unwrap_or_default();
    assert!(row.contains("yes (STRICT)"), "{text}");
    assert!(row.contains("spiffe://cluster.local/ns/hipster-app/sa/cartservice"), "{text}");
    assert!(row.contains("hipster-app/default"), "the deciding policy is named:\n{text}");
    assert!(text.contains(&format!("{ip}_15008")), "{text}");

    // From the frontend, the service is reached in mTLS and the peer must be cartservice.
    let text = s.cli(&["check", "frontend.hipster-app"])?;
    let row =
        text.lines().find(|l| l.starts_with("cartservice.hipster-app:7070")).unwrap_or_default();
    assert!(row.contains("spiffe://cluster.local/ns/hipster-app/sa/frontend"), "{text}");
    assert!(row.contains("spiffe://cluster.local/ns/hipster-app/sa/cartservice"), "{text}");

    // PERMISSIVE shows the two halves of each port, as istioctl does.
    s.policies.write("ns.yaml", &namespace_pa(NS, "PERMISSIVE"))?;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let text = s.cli(&["check", "cartservice.hipster-app"])?;
        if text.contains(&format!("{ip}_*[1]")) {
            let row =
                text.lines().find(|l| l.starts_with(&format!("{ip}_*[1]"))).unwrap_or_default();
            assert!(row.contains("no (PERMISSIVE)") && row.contains("none"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Machine-readable forms carry the same answer.
    let json: serde_json::Value =
        serde_json::from_str(&s.cli(&["check", "cartservice.hipster-app", "-o", "json"])?)?;
    assert_eq!(json["identity"], "spiffe://cluster.local/ns/hipster-app/sa/cartservice");
    let yaml = s.cli(&["check", "cartservice.hipster-app", "-o", "yaml"])?;
    assert!(yaml.contains("listeners:") && yaml.contains("outbound:"), "{yaml}");

    // An unknown pod is a clear error.
    let out = Command::new(agent_bin())
        .args(["check", "nope.hipster-app", "--admin", &s.agent().admin.to_string()])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no workload nope.hipster-app"));
    Ok(())
}

#[test]
fn connections_certs_metrics_and_rejection_logs() -> Result<()> {
    let s = Shop::new("op-metrics", &[])?;
    let (out, ok) =
        s.m.client("frontend", &["--connect", "10.96.0.20:7070", "--message", "cart?"])?;
    assert!(ok && out == "cartservice:cart?", "{out}");
    let (out, ok) =
        s.m.client("outsider", &["--connect", &s.m.dst("cartservice"), "--message", "x"])?;
    assert!(!ok && out.contains("refused"), "{out}");

    // The refusal happened in the kernel; the agent still logs it with the deciding policy.
    s.agent().wait_log("rejected: plaintext to STRICT port 8080", Duration::from_secs(2))?;
    s.agent().wait_log("hipster-app/default", Duration::from_secs(1))?;

    let text = s.cli(&["connections", "--pod", "frontend.hipster-app"])?;
    let row = text.lines().find(|l| l.contains("10.96.0.20:7070")).unwrap_or_default();
    assert!(
        row.contains("mTLS")
            && row.contains("spiffe://cluster.local/ns/hipster-app/sa/cartservice"),
        "{text}"
    );
    let text = s.cli(&["certs"])?;
    assert!(
        text.contains("frontend.hipster-app") && text.contains("cartservice.hipster-app"),
        "{text}"
    );

    let metrics = s.agent().metrics_text()?;
    let value = |prefix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(value("mtls_agent_connections_opened_total{node=\"node1\",direction=\"outbound\",mode=\"mTLS\"}") >= 1.0, "{metrics}");
    assert!(value("mtls_agent_plaintext_rejected_total") >= 1.0, "{metrics}");
    assert!(value("mtls_agent_tls_handshakes_total") >= 2.0, "{metrics}");
    assert!(
        value("mtls_agent_ebpf_program_runs_total{node=\"node1\",program=\"mtls_connect4\"}")
            >= 1.0,
        "{metrics}"
    );
    assert!(
        value("mtls_agent_ebpf_program_runs_total{node=\"node1\",program=\"mtls_inbound\"}") >= 1.0,
        "{metrics}"
    );
    let expiry = value(
        "mtls_agent_certificate_expiry_seconds{node=\"node1\",workload=\"frontend.hipster-app\"",
    );
    assert!(expiry > 23.0 * 3600.0 && expiry <= 24.0 * 3600.0, "{metrics}");

    let (ready, body) = s.agent().readiness()?;
    assert!(ready && body.contains("2 of 2 pods enrolled"), "{body}");

    // The structured forms of the same answers.
    let certs: serde_json::Value = serde_json::from_str(&s.cli(&["certs", "-o", "json"])?)?;
    let ids: Vec<&str> =
        certs.as_array().into_iter().flatten().filter_map(|c| c["identity"].as_str()).collect();
    assert!(ids.contains(&"spiffe://cluster.local/ns/hipster-app/sa/frontend"), "{certs}");
    let yaml = s.cli(&["connections", "-o", "yaml"])?;
    let conns: serde_json::Value = serde_yaml::from_str(&yaml)?;
    assert!(conns.as_array().is_some_and(|a| a.iter().any(|c| c["mode"] == "mTLS")), "{yaml}");

    // /config_dump: workloads, services, policies, effective modes with deciders, certificates.
    let dump: serde_json::Value = serde_json::from_str(&s.agent().get("/config_dump")?)?;
    assert_eq!(dump["node"], "node1");
    assert_eq!(dump["workloads"]["services"][0]["name"], "cartservice");
    assert_eq!(dump["policies"].as_array().map(Vec::len), Some(1), "{dump}");
    let cart = dump["effective"]
        .as_array()
        .and_then(|e| e.iter().find(|p| p["pod"] == "cartservice.hipster-app"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(cart["default"]["mode"], "STRICT", "{dump}");
    assert_eq!(cart["default"]["decidedBy"]["name"], "default", "{dump}");
    assert_eq!(cart["default"]["level"], "namespace", "{dump}");
    assert_eq!(dump["certificates"].as_array().map(Vec::len), Some(2));
    assert!(dump["certificates"][0]["nextRenewal"].is_string());
    let workloads: serde_json::Value = serde_json::from_str(&s.agent().get("/workloads")?)?;
    assert_eq!(workloads["workloads"].as_array().map(Vec::len), Some(2));
    assert_eq!(s.agent().get("/healthz")?.trim(), "ok");
    Ok(())
}

#[test]
fn log_level_changes_at_run_time_and_json_logs_parse() -> Result<()> {
    let s = Shop::new("op-logs", &["--log-format", "json"])?;
    // Every line the agent wrote so far is one JSON object.
    let log = s.agent().log();
    assert!(!log.is_empty());
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{e}: {line}"))?;
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    s.agent().post("/logging?level=warn")?;
    let before = s.agent().log().lines().count();
    s.m.client("frontend", &["--connect", &s.m.dst("cartservice"), "--message", "quiet"])?;
    std::thread::sleep(Duration::from_millis(200));
    let after: Vec<String> = s.agent().log().lines().skip(before).map(str::to_owned).collect();
    assert!(
        after.iter().all(|l| !l.contains("connection closed")),
        "info lines hidden at warn: {after:?}"
    );
    s.agent().post("/logging?level=info")?;
    s.m.client("frontend", &["--connect", &s.m.dst("cartservice"), "--message", "loud"])?;
    s.agent().wait_log("connection closed", Duration::from_secs(2))?;
    let err = s.agent().post("/logging?level=not=a=level").unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
    Ok(())
}
