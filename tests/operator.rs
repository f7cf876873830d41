//! End-to-end: what the operator sees — `mtls-agent check`, `connections`, `certs`, the admin
//! API, Prometheus metrics, readiness, log lines for rejections and run-time log levels.
//! Runs as root.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use testbed::{
    agent::{agent_bin, AgentProcess, ServiceEntry, WorkloadsFile},
    e2e_tool_path,
    mesh::{namespace_pa, Mesh, PolicyDir, PORT},
    PodProcess,
};

const NS: &str = "hipster-app";

/// node1: frontend and cartservice in the mesh (cartservice behind a service on port 7070),
/// outsider not; `hipster-app` STRICT.
struct Shop {
    policies: PolicyDir,
    workloads: (PathBuf, WorkloadsFile),
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
        Ok(Shop { policies, workloads: (path, file), m })
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

    /// A client in `pod` that sends `message` to `dst`, keeps the connection open for
    /// `hold`, then reads the echo; runs in the background.
    fn held_client(
        &self,
        pod: &str,
        dst: &str,
        message: &str,
        hold: Duration,
    ) -> Result<PodProcess> {
        let mut cmd = Command::new(e2e_tool_path()?);
        cmd.args(["client", "--connect", dst, "--message", message])
            .args(["--hold-ms", &hold.as_millis().to_string()]);
        self.m.bed.spawn_in_pod(pod, cmd)
    }

    /// Polls `/connections` until a record matches `pred` (bounded).
    fn wait_record(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let conns = self.agent().connections()?;
            if let Some(c) = conns.iter().find(|c| pred(c)) {
                return Ok(c.clone());
            }
            if Instant::now() > deadline {
                bail!("no {what} after 5 s; records: {conns:#?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first agent log line containing every needle (bounded wait).
    fn log_line(&self, needles: &[&str]) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let log = self.agent().log();
            if let Some(l) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return Ok(l.to_owned());
            }
            if Instant::now() > deadline {
                bail!("no log line with all of {needles:?}; log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until readiness answers `ready` with `detail` in its body (bounded).
    fn wait_readiness(&self, ready: bool, detail: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (now, body) = self.agent().readiness()?;
            if now == ready && body.contains(detail) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("readiness is ({now}, {body:?}), expected ({ready}, ..{detail}..)");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The sum of the samples of every metric line starting with `prefix`.
fn metric(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
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

    // What was seen, beside what the policy says: the frontend's call arrived in mTLS.
    assert!(text.contains("Observed traffic") && text.contains("none yet"), "{text}");
    let (out, ok) =
        s.m.client("frontend", &["--connect", "10.96.0.20:7070", "--message", "seen?"])?;
    assert!(ok && out == "cartservice:seen?", "{out}");
    let inbound_seen = |min_plaintext: u64| -> Result<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let v: serde_json::Value = serde_json::from_str(&s.cli(&[
                "check",
                "cartservice.hipster-app",
                "-o",
                "json",
            ])?)?;
            let row = v["observed"]
                .as_array()
                .and_then(|rows| rows.iter().find(|r| r["direction"] == "inbound").cloned());
            if let Some(row) = row.filter(|r| r["plaintext"].as_u64() >= Some(min_plaintext)) {
                return Ok(row);
            }
            assert!(Instant::now() < deadline, "{v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let row = inbound_seen(0)?;
    assert_eq!((row["target"].as_str(), row["mtls"].as_u64()), (Some("8080"), Some(1)), "{row}");
    assert_eq!(row["plaintext"], 0, "{row}");

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
    // ...and plaintext that then arrives from outside the mesh is seen, and by whom.
    let dst = format!("{ip}:8080");
    let (out, ok) = s.m.client("outsider", &["--connect", &dst, "--message", "clear"])?;
    assert!(ok && out == "cartservice:clear", "{out}");
    let row = inbound_seen(1)?;
    let outsider = format!("{}:", s.m.bed.pod("outsider").ip);
    let peer = row["lastPlaintextPeer"].as_str().unwrap_or_default();
    assert!(peer.starts_with(&outsider), "{row}");
    let text = s.cli(&["check", "cartservice.hipster-app"])?;
    assert!(text.contains("LAST PLAINTEXT PEER") && text.contains(peer), "{text}");

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

    // A pod of another node: said plainly, not "no (<mode>)" with no certificate (the
    // namespace is PERMISSIVE by now).
    let (path, mut file) = s.workloads.clone();
    let mut remote = testbed::agent::WorkloadEntry::of(s.m.bed.pod("outsider"), NS);
    remote.node = "node2".into();
    file.workloads.push(remote);
    file.write(&path)?;
    let deadline = Instant::now() + Duration::from_secs(3);
    let text = loop {
        match s.cli(&["check", "outsider.hipster-app"]) {
            Ok(text) => break text,
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(text.contains("NOT ON THIS AGENT'S NODE (node1)"), "{text}");
    assert!(text.contains("runs on node node2"), "{text}");
    let oip = s.m.bed.pod("outsider").ip;
    let row = text.lines().find(|l| l.starts_with(&format!("{oip}_*"))).unwrap_or_default();
    assert!(
        row.contains("unknown (pod on node node2)")
            && row.contains("PERMISSIVE, enforced by node node2's agent"),
        "{text}"
    );
    assert!(!text.contains("no (PERMISSIVE)"), "{text}");
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

    // The refusal happened in the kernel; the agent still logs it, on one line, with source,
    // destination and the deciding policy.
    let outsider = s.m.bed.pod("outsider").ip.to_string();
    let line = s.log_line(&["rejected: plaintext to STRICT port 8080", "hipster-app/default"])?;
    assert!(line.contains(&format!("src={outsider}:")), "{line}");
    assert!(line.contains(&format!("dst={}", s.m.dst("cartservice"))), "{line}");
    assert!(line.contains("policy="), "{line}");

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
    let value = |prefix: &str| metric(&metrics, prefix);
    assert!(value("mtls_agent_connections_opened_total{node=\"node1\",direction=\"outbound\",mode=\"mTLS\"}") >= 1.0, "{metrics}");
    assert!(value("mtls_agent_plaintext_rejected_total") >= 1.0, "{metrics}");
    assert!(
        value("mtls_agent_policy_rejections_total{node=\"node1\",reason=\"plaintext_to_strict\"}")
            >= 1.0,
        "{metrics}"
    );
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
    // The port the service reaches, with its answer, though no policy names it.
    let port = cart["ports"].as_array().and_then(|p| p.iter().find(|p| p["port"] == 8080));
    assert_eq!(port.map(|p| p["mode"].clone()), Some("STRICT".into()), "{cart}");
    assert_eq!(dump["certificates"].as_array().map(Vec::len), Some(2));
    let cert = &dump["certificates"][0];
    for field in ["identity", "serial", "notBefore", "notAfter", "nextRenewal"] {
        assert!(cert[field].as_str().is_some_and(|v| !v.is_empty()), "{field}: {cert}");
    }
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

#[test]
fn live_connections_show_bytes_age_and_tls_on_both_sides() -> Result<()> {
    let s = Shop::new("op-live", &[])?;
    let cart = s.m.dst("cartservice");
    let _client = s.held_client("frontend", &cart, "hello", Duration::from_secs(6))?;
    let frontend = "frontend.hipster-app";
    let cartservice = "cartservice.hipster-app";
    // The echo comes back while the client still holds the connection open.
    let live = |dir: &'static str| {
        move |c: &Value| {
            c["open"] == true
                && c["direction"] == dir
                && c["sourcePod"] == frontend
                && c["destinationPod"] == cartservice
                && c["bytesSent"].as_u64() == Some("hello".len() as u64)
                && c["bytesReceived"].as_u64() == Some("cartservice:hello".len() as u64)
        }
    };
    let out = s.wait_record("live outbound record with bytes both ways", live("outbound"))?;
    let inb = s.wait_record("live inbound record with bytes both ways", live("inbound"))?;
    for rec in [&out, &inb] {
        assert_eq!(rec["mode"], "mTLS", "{rec}");
        assert_eq!(rec["peerIdentity"].as_str().map(|p| p.starts_with("spiffe://")), Some(true));
        let tls = rec["tls"].as_str().unwrap_or_default();
        assert!(tls.starts_with("TLSv1.3 TLS13_"), "version and cipher suite: {rec}");
        assert!(rec["policy"].as_str().unwrap_or_default().contains("hipster-app/default"));
        let started = rec["startedAt"].as_str().unwrap_or_default();
        assert!(started.ends_with('Z') && started.contains('T'), "RFC 3339: {rec}");
        assert!(rec["ageMs"].is_u64(), "{rec}");
    }
    assert_eq!(out["tls"], inb["tls"], "one format, one negotiated session");

    // Age grows while the connection stays open.
    let age = |r: &Value| r["ageMs"].as_u64().unwrap_or_default();
    let id = out["id"].clone();
    std::thread::sleep(Duration::from_millis(300));
    let again = s.wait_record("the same live record", |c| c["id"] == id && c["open"] == true)?;
    assert!(age(&again) >= age(&out) + 300, "{out}\n{again}");

    // The table shows the live bytes and the age.
    let text = s.cli(&["connections", "--pod", frontend])?;
    let row = text.lines().find(|l| l.contains("outbound") && l.contains("(open)"));
    assert!(row.is_some_and(|r| r.contains("5/17") && r.contains("TLSv1.3 TLS13_")), "{text}");

    // --pod keeps only that pod's connections: a passthrough of cartservice to the outsider
    // is listed under cartservice, not under frontend.
    let (echo, ok) =
        s.m.client("cartservice", &["--connect", &s.m.dst("outsider"), "--message", "p"])?;
    assert!(ok && echo == "outsider:p", "{echo}");
    s.wait_record("the passthrough", |c| c["sourcePod"] == cartservice && c["tls"] == "PLAINTEXT")?;
    let json = |pod: &str| -> Result<Vec<Value>> {
        let v: Value =
            serde_json::from_str(&s.cli(&["connections", "--pod", pod, "-o", "json"])?)?;
        v.as_array().cloned().context("an array")
    };
    let only_frontend = json(frontend)?;
    assert!(!only_frontend.is_empty());
    assert!(
        only_frontend.iter().all(|c| c["sourcePod"] == frontend || c["destinationPod"] == frontend),
        "{only_frontend:#?}"
    );
    assert!(json(cartservice)?.iter().any(|c| c["tls"] == "PLAINTEXT"));
    Ok(())
}

#[test]
fn check_and_stats_endpoints_answer_directly() -> Result<()> {
    let s = Shop::new("op-api", &[])?;
    let (out, ok) =
        s.m.client("frontend", &["--connect", &s.m.dst("cartservice"), "--message", "x"])?;
    assert!(ok && out == "cartservice:x", "{out}");
    s.agent().wait_connection(Duration::from_secs(5), |c| c["direction"] == "inbound")?;

    let check: Value = serde_json::from_str(&s.agent().get("/check?pod=cartservice.hipster-app")?)?;
    assert_eq!(check["enrolled"], true, "{check}");
    assert_eq!(check["node"], "node1");
    let ip = s.m.bed.pod("cartservice").ip;
    let listeners = check["listeners"].as_array().cloned().unwrap_or_default();
    let star = listeners.iter().find(|l| l["listener"] == format!("{ip}_*").as_str());
    assert!(star.is_some_and(|l| l["mtls"] == "yes (STRICT)" && l["mode"] == "STRICT"), "{check}");
    let err = s.agent().get("/check").unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
    let err = s.agent().get("/check?pod=nope.hipster-app").unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");

    let stats = s.agent().stats()?;
    for (field, at_least) in
        [("outboundHandshakes", 1), ("outboundStreams", 1), ("inboundHandshakes", 1)]
    {
        assert!(stats[field].as_u64().is_some_and(|n| n >= at_least), "{field}: {stats}");
    }
    assert!(stats["ebpf"]["captured"].as_u64().is_some_and(|n| n >= 1), "{stats}");
    Ok(())
}

#[test]
fn readiness_names_a_pod_that_cannot_be_enrolled_without_failing_the_node() -> Result<()> {
    let mut s = Shop::new("op-ready", &[])?;
    s.wait_readiness(true, "2 of 2 pods enrolled")?;
    // A pod whose network namespace file is not a namespace (as when it went away and the
    // path was reused) cannot be enrolled: the node stays ready (one tenant must not stall a
    // rollout) and its readiness answer names the pod.
    let not_a_netns = std::env::temp_dir().join(format!("{}-not-a-netns", s.m.bed.id()));
    std::fs::write(&not_a_netns, b"")?;
    s.m.files.push(not_a_netns.clone());
    let (path, mut file) = s.workloads.clone();
    let mut outsider = testbed::agent::WorkloadEntry::of(s.m.bed.pod("outsider"), NS);
    outsider.netns = not_a_netns;
    file.workloads.push(outsider.clone());
    file.write(&path)?;
    s.wait_readiness(true, "2 of 3 pods enrolled")?;
    let (_, body) = s.agent().readiness()?;
    assert!(body.contains("not enrolled") && body.contains(&format!("outsider.{NS}")), "{body}");
    // Its namespace back: enrolled, certificate issued, ready.
    outsider.netns = s.m.bed.pod("outsider").netns.clone();
    file.workloads.pop();
    file.workloads.push(outsider);
    file.write(&path)?;
    s.wait_readiness(true, "3 of 3 pods enrolled, 3 with certificates")?;
    Ok(())
}

#[test]
fn refusals_are_counted_by_reason_and_logged_once_with_policy() -> Result<()> {
    let s = Shop::new("op-tls", &[])?;
    let tunnel = format!("{}:15008", s.m.bed.pod("cartservice").ip);
    // Plaintext to the tunnel port: the handshake fails, whatever the client then sees.
    let _ =
        s.m.client("outsider", &["--connect", &tunnel, "--message", "GET / HTTP/1.1\r\n\r\n"])?;
    let outsider = s.m.bed.pod("outsider").ip.to_string();
    let line = s.log_line(&["rejected: TLS handshake failed", &format!("src={outsider}:")])?;
    assert!(line.contains(&format!("dst={tunnel}")), "{line}");
    assert!(line.contains("policy=") && line.contains("none: identity check"), "{line}");
    let deadline = Instant::now() + Duration::from_secs(3);
    let key = "mtls_agent_tls_handshake_failures_total{node=\"node1\",direction=\"inbound\",reason=\"not_tls\"}";
    loop {
        let metrics = s.agent().metrics_text()?;
        if metric(&metrics, key) >= 1.0 {
            // Not counted twice under the other refusals.
            assert!(!metrics.contains("reason=\"tls_inbound"), "{metrics}");
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // A tunnel to a port where the app does not listen: refused on both sides, each side one
    // line naming source, destination and the deciding policy, and no "closed" line besides.
    let closed = format!("{}:9", s.m.bed.pod("cartservice").ip);
    let (out, ok) = s.m.client("frontend", &["--connect", &closed, "--message", "x"])?;
    assert!(!ok, "{out}");
    let frontend = s.m.bed.pod("frontend").ip.to_string();
    let dst = format!("dst={closed}");
    let src = format!("src={frontend}:");
    // The app's own side of a captured connection is loopback (it was sent to the in-pod
    // listener): the source pod names it.
    let outbound = s.log_line(&["rejected: HBONE tunnel", &dst, "src_pod=frontend.hipster-app"])?;
    assert!(outbound.contains("src=127.0.0.1:"), "{outbound}");
    assert!(outbound.contains("policy=") && outbound.contains("hipster-app/default"), "{outbound}");
    let inbound = s.log_line(&["rejected: the app does not answer", &dst, &src])?;
    assert!(inbound.contains("hipster-app/default"), "{inbound}");
    let log = s.agent().log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(&dst)).collect();
    assert_eq!(lines.len(), 2, "one line per side: {lines:#?}");
    Ok(())
}
