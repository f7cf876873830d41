//! End-to-end: mTLS policy (PeerAuthentication and the v1alpha1 Policy) enforced by the eBPF
//! inbound program and the agent, on one node with a mesh client, a server and a pod outside
//! the mesh. Runs as root.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use testbed::{
    agent::{agent_bin, AgentProcess},
    mesh::{namespace_pa, Mesh, PolicyDir, PORT},
};

const NS: &str = "shop";
/// A second port on the server, declared as a probe port.
const PROBE_PORT: u16 = 8081;

/// node1 with `client` (in the mesh), `server` (in the mesh; echo on 8080 and on the probe
/// port 8081) and `outsider` (not in the mesh), one agent with `--policies` and
/// `--kubelet-cgroup` (a test-made cgroup outside the node's pods cgroup).
struct PolicyBed {
    // Before the bed: removed (its processes killed) while the node still exists.
    kubelet: testbed::CgroupDir,
    policies: PolicyDir,
    m: Mesh,
    // Keeps the second echo server alive.
    _probe_server: testbed::PodProcess,
}

impl PolicyBed {
    fn new(test: &str, ns: &str, initial: &[(&str, &str)]) -> Result<PolicyBed> {
        let mut m = Mesh::build(
            test,
            ns,
            &[("node1", "client"), ("node1", "server"), ("node1", "outsider")],
        )?;
        let mut cmd = Command::new(testbed::e2e_tool!());
        cmd.args([
            "echo-server",
            "--listen",
            &format!("0.0.0.0:{PROBE_PORT}"),
            "--prefix",
            "probe:",
        ]);
        let probe_server = m.bed.spawn_in_pod("server", cmd)?;
        probe_server.wait_for_stdout("listening", Duration::from_secs(5))?;

        let (path, mut file) = m.workloads("workloads", &["client", "server"])?;
        for w in &mut file.workloads {
            if w.name == "server" {
                w.probe_ports = vec![PROBE_PORT];
            }
        }
        file.write(&path)?;
        let policies = PolicyDir::new(m.bed.id())?;
        for (name, yaml) in initial {
            policies.write(name, yaml)?;
        }
        let ca = m.ca("ca")?;
        let kubelet = testbed::CgroupDir::create(m.bed.base_cgroup().join("kubelet"))?;
        let kubelet_arg = kubelet.path().display().to_string();
        let dir = policies.0.display().to_string();
        m.start_agent(
            "node1",
            &path,
            &ca,
            &["--policies", &dir, "--kubelet-cgroup", &kubelet_arg],
        )?;
        Ok(PolicyBed { kubelet, policies, m, _probe_server: probe_server })
    }

    fn agent(&self) -> &AgentProcess {
        self.m.agent("node1")
    }

    fn to_server(&self, from: &str, port: u16, msg: &str) -> Result<(String, bool)> {
        let dst = format!("{}:{port}", self.m.bed.pod("server").ip);
        self.m.client(from, &["--connect", &dst, "--message", msg, "--timeout-ms", "2000"])
    }

    /// Retries `from -> server` until it succeeds or fails as `expect_ok` says, for at most
    /// `within` (policy changes take effect within 1 s).
    fn expect(&self, from: &str, port: u16, expect_ok: bool, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let (out, ok) = self.to_server(from, port, "ping")?;
            if ok == expect_ok {
                return Ok(out);
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{from} -> server:{port}: expected {} within {within:?}, got {out:?}\nagent log:\n{}",
                    if expect_ok { "success" } else { "refusal" },
                    self.agent().log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn strict_rejected(&self) -> Result<u64> {
        Ok(self.agent().stats()?["ebpf"]["strictRejected"].as_u64().unwrap_or_default())
    }
}

const NOW: Duration = Duration::ZERO;
const WITHIN_1S: Duration = Duration::from_secs(1);

#[test]
fn strict_permissive_strict_disable_switch_live_for_mesh_and_plaintext_clients() -> Result<()> {
    let b = PolicyBed::new("pol-modes", NS, &[("ns.yaml", &namespace_pa(NS, "STRICT"))])?;

    // STRICT: the mesh client gets through in mTLS; plaintext is refused in the kernel and the
    // server process never sees it.
    let out = b.expect("client", PORT, true, NOW)?;
    assert_eq!(out, "server:ping");
    let rec = b.agent().wait_connection(Duration::from_secs(5), |c| {
        c["direction"] == "outbound" && c["destinationPod"] == "server.shop"
    })?;
    assert_eq!(rec["mode"], "mTLS", "{rec}");
    assert!(rec["policy"].as_str().unwrap_or_default().contains("STRICT"), "{rec}");
    let seen = b.m.accepted("server");
    let rejected = b.strict_rejected()?;
    let out = b.expect("outsider", PORT, false, NOW)?;
    assert!(out.contains("refused"), "refused at once, not timed out: {out}");
    assert_eq!(b.m.accepted("server"), seen, "the server never saw the plaintext connection");
    assert!(b.strict_rejected()? > rejected, "the eBPF program counted the rejection");

    // PERMISSIVE: both get through; the mesh client still in mTLS.
    b.policies.write("ns.yaml", &namespace_pa(NS, "PERMISSIVE"))?;
    assert_eq!(b.expect("outsider", PORT, true, WITHIN_1S)?, "server:ping");
    let before = b.agent().connections()?.len();
    assert_eq!(b.expect("client", PORT, true, NOW)?, "server:ping");
    let rec = b.agent().wait_connection(Duration::from_secs(5), |c| {
        c["direction"] == "outbound" && c["id"].as_u64().unwrap_or_default() as usize > before
    })?;
    assert_eq!(rec["mode"], "mTLS", "{rec}");

    // Straight back to STRICT: plaintext, accepted a moment ago, is refused again in the kernel.
    b.policies.write("ns.yaml", &namespace_pa(NS, "STRICT"))?;
    b.expect("outsider", PORT, false, WITHIN_1S)?;
    let seen = b.m.accepted("server");
    let out = b.expect("outsider", PORT, false, NOW)?;
    assert!(out.contains("refused"), "{out}");
    assert_eq!(b.m.accepted("server"), seen, "the server never saw the refused connection");
    assert_eq!(b.expect("client", PORT, true, NOW)?, "server:ping");

    // DISABLE: the mesh client sends plaintext; plaintext is accepted.
    b.policies.write("ns.yaml", &namespace_pa(NS, "DISABLE"))?;
    let deadline = Instant::now() + WITHIN_1S;
    loop {
        // A length no other message in this test has, to find this connection's record.
        let marker = "plaintext-after-disable";
        let (out, ok) = b.to_server("client", PORT, marker)?;
        assert!(ok, "{out}");
        let conns = b.agent().connections()?;
        let rec = conns
            .iter()
            .rev()
            .find(|c| c["direction"] == "outbound" && c["bytesSent"] == marker.len());
        if rec.is_some_and(|r| r["mode"] == "passthrough") {
            let rec = rec.cloned().unwrap_or_default();
            assert!(rec["policy"].as_str().unwrap_or_default().contains("DISABLE"), "{rec}");
            break;
        }
        assert!(Instant::now() < deadline, "the client did not switch to plaintext: {conns:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(b.expect("outsider", PORT, true, NOW)?, "server:ping");

    // And from DISABLE back to STRICT.
    b.policies.write("ns.yaml", &namespace_pa(NS, "STRICT"))?;
    b.expect("outsider", PORT, false, WITHIN_1S)?;
    assert_eq!(b.expect("client", PORT, true, NOW)?, "server:ping");
    Ok(())
}

#[test]
fn strict_still_refuses_plaintext_while_the_agent_is_killed() -> Result<()> {
    let mut b = PolicyBed::new("pol-down", NS, &[("ns.yaml", &namespace_pa(NS, "STRICT"))])?;
    b.expect("outsider", PORT, false, NOW)?;
    b.m.agents.get_mut("node1").context("agent")?.kill()?;
    let seen = b.m.accepted("server");
    let out = b.expect("outsider", PORT, false, NOW)?;
    assert!(out.contains("refused"), "{out}");
    // A captured mesh client fails closed too: never plaintext.
    let out = b.expect("client", PORT, false, NOW)?;
    assert!(out.contains("refused"), "{out}");
    assert_eq!(b.m.accepted("server"), seen, "nothing reached the server while the agent was down");
    Ok(())
}

#[test]
fn kubelet_style_probe_from_the_node_reaches_a_probe_port_under_strict() -> Result<()> {
    let b = PolicyBed::new("pol-probe", NS, &[("ns.yaml", &namespace_pa(NS, "STRICT"))])?;
    // The kubelet: a process of the node's netns in the `--kubelet-cgroup` cgroup.
    let probe = |port: u16| -> Result<(String, bool)> {
        let dst = format!("{}:{port}", b.m.bed.pod("server").ip);
        let mut cmd = Command::new(testbed::e2e_tool!());
        cmd.args(["client", "--connect", &dst, "--message", "healthz", "--timeout-ms", "2000"]);
        let p = b.m.bed.spawn_in_node_cgroup("node1", b.kubelet.path(), cmd)?;
        let out = p.wait_with_output(Duration::from_secs(10))?;
        Ok((String::from_utf8_lossy(&out.stdout).trim().to_owned(), out.status.success()))
    };
    let (out, ok) = probe(PROBE_PORT)?;
    assert!(ok && out == "probe:healthz", "the declared probe port answers the node: {out}");
    let (out, ok) = probe(PORT)?;
    assert!(!ok && out.contains("refused"), "other ports stay STRICT for the node too: {out}");
    // The exemption is for the kubelet's connections only.
    b.expect("outsider", PROBE_PORT, false, NOW)?;
    Ok(())
}

#[test]
fn port_level_exception_on_a_strict_workload() -> Result<()> {
    let pa = format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: server\n  namespace: {NS}\nspec:\n  selector:\n    matchLabels: {{app: server}}\n  mtls: {{mode: STRICT}}\n  portLevelMtls:\n    {PROBE_PORT}: {{mode: PERMISSIVE}}\n"
    );
    let b = PolicyBed::new("pol-port", NS, &[("server.yaml", &pa)])?;
    assert_eq!(b.expect("outsider", PROBE_PORT, true, NOW)?, "probe:ping");
    b.expect("outsider", PORT, false, NOW)?;
    assert_eq!(b.expect("client", PORT, true, NOW)?, "server:ping");
    Ok(())
}

#[test]
fn the_workshop_v1alpha1_policy_files_apply_as_written() -> Result<()> {
    let shipped = |name: &str| -> Result<String> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies").join(name);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let b = PolicyBed::new(
        "pol-workshop",
        "hipster-app",
        &[("hipster-app-mtls.yaml", &shipped("hipster-app-mtls.yaml")?)],
    )?;
    b.expect("outsider", PORT, false, NOW)?;
    assert_eq!(b.expect("client", PORT, true, NOW)?, "server:ping");
    b.policies.write("hipster-app-mtls.yaml", &shipped("hipster-app-mtls-permissive.yaml")?)?;
    assert_eq!(b.expect("outsider", PORT, true, WITHIN_1S)?, "server:ping");

    // Mixing APIs: beside the STRICT v1alpha1 Policy, the mesh-wide PERMISSIVE
    // PeerAuthentication decides (as in Istio), and the agent says so, naming both, once.
    b.policies.write("hipster-app-mtls.yaml", &shipped("hipster-app-mtls.yaml")?)?;
    b.expect("outsider", PORT, false, WITHIN_1S)?;
    b.policies.write("mesh-default.yaml", &shipped("mesh-default.yaml")?)?;
    assert_eq!(b.expect("outsider", PORT, true, WITHIN_1S)?, "server:ping");
    let warning = "Policy hipster-app/default (STRICT) is overridden by PeerAuthentication istio-system/default (PERMISSIVE";
    b.agent().wait_log(warning, Duration::from_secs(2))?;
    // Several watch polls later, still logged once: only a change logs it again.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(b.agent().log().matches(warning).count(), 1, "{}", b.agent().log());
    Ok(())
}

#[test]
fn an_invalid_policy_is_rejected_with_file_and_line_and_the_last_good_set_stays() -> Result<()> {
    let b = PolicyBed::new("pol-invalid", NS, &[("ns.yaml", &namespace_pa(NS, "STRICT"))])?;
    b.expect("outsider", PORT, false, NOW)?;
    b.policies.write("ns.yaml", &namespace_pa(NS, "STRCT"))?;
    b.agent().wait_log("ns.yaml:8", Duration::from_secs(2))?;
    b.agent().wait_log("keeping the previous policies", Duration::from_secs(1))?;
    // Still STRICT.
    let out = b.expect("outsider", PORT, false, NOW)?;
    assert!(out.contains("refused"), "{out}");
    Ok(())
}

#[test]
fn policy_check_reports_modes_and_deciders_and_fails_on_invalid_input() -> Result<()> {
    let dir = PolicyDir::new(&format!("check-{}", std::process::id()))?;
    dir.write("ns.yaml", &namespace_pa("hipster-app", "STRICT"))?;
    let workloads = dir.0.join("..").join(format!("mtls-test-check-{}.yaml", std::process::id()));
    std::fs::write(
        &workloads,
        "workloads:\n- {name: frontend, namespace: hipster-app, ip: 10.1.0.2, node: n1}\n- {name: other, namespace: default, ip: 10.1.0.3, node: n1}\n",
    )?;
    let run = |dir: &Path| -> Result<std::process::Output> {
        Ok(Command::new(agent_bin())
            .args(["policy", "check"])
            .arg(dir)
            .arg("--workloads")
            .arg(&workloads)
            .output()?)
    };
    let out = run(&dir.0)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let _ = std::fs::remove_file(&workloads);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let frontend = text.lines().find(|l| l.contains("frontend.hipster-app")).unwrap_or_default();
    assert!(frontend.contains("STRICT") && frontend.contains("hipster-app/default"), "{text}");
    let other = text.lines().find(|l| l.contains("other.default")).unwrap_or_default();
    assert!(other.contains("PERMISSIVE"), "{text}");

    dir.write("bad.yaml", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x, namespace: a}\nspec:\n  portLevelMtls:\n    80: {mode: STRICT}\n")?;
    std::fs::write(&workloads, "workloads: []\n")?;
    let out = run(&dir.0)?;
    let _ = std::fs::remove_file(&workloads);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.yaml:") && err.contains("portLevelMtls requires selector"), "{err}");

    // A missing directory: the OS error is printed once.
    std::fs::write(&workloads, "workloads: []\n")?;
    let out = run(&dir.0.join("missing"))?;
    let _ = std::fs::remove_file(&workloads);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("missing: cannot read: "), "{err}");
    assert_eq!(err.matches("(os error 2)").count(), 1, "{err}");
    Ok(())
}
