//! End-to-end, as an attacker would try it: STRICT covers every address of a pod (a second
//! IPv4 address, its IPv6 address, an address added after enrollment), and enrollment fails
//! closed (an app squatting the agent's ports, a pod whose listeners cannot be opened), is
//! reported and retried without leaking. Runs as root.

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use testbed::{
    agent::WorkloadEntry,
    mesh::{namespace_pa, Mesh, PolicyDir},
    PodProcess,
};

const NS: &str = "shop";
/// The port of the dual-stack echo server these tests start (the mesh's own listen on IPv4).
const PORT: u16 = 8090;

/// An echo server on `[::]:PORT` (IPv4 and IPv6) in `pod`, answering `<prefix><what it got>`.
fn dual_stack_echo(m: &Mesh, pod: &str, listen: &str, prefix: &str) -> Result<PodProcess> {
    let mut cmd = Command::new(testbed::e2e_tool!());
    cmd.args(["echo-server", "--listen", listen, "--prefix", prefix]);
    let p = m.bed.spawn_in_pod(pod, cmd)?;
    p.wait_for_stdout("listening", Duration::from_secs(5))?;
    Ok(p)
}

fn to(m: &Mesh, from: &str, dst: SocketAddr, msg: &str) -> Result<(String, bool)> {
    let dst = dst.to_string();
    m.client(from, &["--connect", &dst, "--message", msg, "--timeout-ms", "2000"])
}

/// A plaintext attempt that must be refused: fails at once (a reset, not a timeout) and the
/// app never answers.
fn assert_refused(m: &Mesh, from: &str, dst: SocketAddr, server_prefix: &str) -> Result<()> {
    let (out, ok) = to(m, from, dst, "plaintext")?;
    assert!(!ok && out.contains("refused"), "{from} -> {dst} in plaintext must be refused: {out}");
    assert!(!out.contains(server_prefix), "{out}");
    Ok(())
}

/// Waits until `from -> dst` gets `want` back.
fn expect_reply(m: &Mesh, from: &str, dst: SocketAddr, want: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let (out, ok) = to(m, from, dst, "ping")?;
        if ok && out == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{from} -> {dst}: expected {want:?}, got {out:?}\nagent log:\n{}",
                m.agent("node1").log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The mesh client's connection to `dst` went through the agent in mutual TLS.
fn assert_mtls(m: &Mesh, dst: SocketAddr) -> Result<()> {
    let rec = m.agent("node1").wait_connection(Duration::from_secs(5), |c| {
        c["direction"] == "outbound" && c["originalDestination"] == dst.to_string()
    })?;
    assert_eq!(rec["mode"], "mTLS", "{rec}");
    Ok(())
}

fn wait_ready(m: &Mesh, detail: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ready, body) = m.agent("node1").readiness()?;
        if ready && body.contains(detail) {
            return Ok(body);
        }
        if Instant::now() > deadline {
            bail!("readiness ({ready}, {body:?}), expected ready with {detail:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn strict_covers_a_second_ipv4_address_the_ipv6_address_and_one_added_later() -> Result<()> {
    let mut m = Mesh::build(
        "se-addrs",
        NS,
        &[("node1", "client"), ("node1", "server"), ("node1", "outsider")],
    )?;
    let server = m.bed.pod("server").clone();
    let second: IpAddr = m.bed.alloc_address()?.into();
    m.bed.add_address("server", second)?;
    let _echo = dual_stack_echo(&m, "server", &format!("[::]:{PORT}"), "server:")?;
    let (path, mut file) = m.workloads("workloads", &["client", "server"])?;
    for w in &mut file.workloads {
        if w.name == "server" {
            w.ips = vec![server.ip.into(), second, server.ip6.into()];
        }
    }
    file.write(&path)?;
    let policies = PolicyDir::new(m.bed.id())?;
    policies.write("ns.yaml", &namespace_pa(NS, "STRICT"))?;
    let ca = m.ca("ca")?;
    let dir = policies.0.display().to_string();
    m.start_agent("node1", &path, &ca, &["--policies", &dir])?;
    wait_ready(&m, "2 of 2 pods enrolled")?;

    let primary = SocketAddr::new(server.ip.into(), PORT);
    let second = SocketAddr::new(second, PORT);
    let v6 = SocketAddr::new(server.ip6.into(), PORT);
    for dst in [primary, second, v6] {
        assert_refused(&m, "outsider", dst, "server:")?;
    }
    // The mesh client reaches every address, in mutual TLS.
    for dst in [primary, second, v6] {
        expect_reply(&m, "client", dst, "server:ping", Duration::from_secs(5))?;
        assert_mtls(&m, dst)?;
    }

    // An address the pod gets after enrollment is covered at once.
    let later: IpAddr = m.bed.alloc_address()?.into();
    m.bed.add_address("server", later)?;
    let added = Instant::now();
    let later = SocketAddr::new(later, PORT);
    assert_refused(&m, "outsider", later, "server:")?;
    assert!(added.elapsed() < Duration::from_secs(3), "covered within a second of being added");
    Ok(())
}

#[test]
fn an_app_squatting_the_agents_ports_before_it_starts_is_enrolled_closed_and_steered() -> Result<()>
{
    let mut m = Mesh::build(
        "se-squat",
        NS,
        &[("node1", "client"), ("node1", "squatter"), ("node1", "outsider")],
    )?;
    let pod = m.bed.pod("squatter").clone();
    // The app holds the agent's ports before the agent arrives.
    let _squat = [
        dual_stack_echo(&m, "squatter", "127.0.0.1:15001", "squat15001:")?,
        dual_stack_echo(&m, "squatter", "[::1]:15001", "squat15001v6:")?,
        dual_stack_echo(&m, "squatter", &format!("{}:15008", pod.ip), "squat15008:")?,
    ];
    let _echo = dual_stack_echo(&m, "squatter", &format!("[::]:{PORT}"), "squatter:")?;
    let (path, _) = m.workloads("workloads", &["client", "squatter"])?;
    let policies = PolicyDir::new(m.bed.id())?;
    policies.write("ns.yaml", &namespace_pa(NS, "STRICT"))?;
    let ca = m.ca("ca")?;
    let dir = policies.0.display().to_string();
    m.start_agent("node1", &path, &ca, &["--policies", &dir])?;
    wait_ready(&m, "2 of 2 pods enrolled")?;

    // Plaintext to the STRICT port: refused.
    assert_refused(&m, "outsider", SocketAddr::new(pod.ip.into(), PORT), "squatter:")?;
    // Plaintext to 15008 reaches the agent's tunnel listener (which wants TLS), never the
    // squatter.
    let (out, _) = to(&m, "outsider", SocketAddr::new(pod.ip.into(), 15008), "hello")?;
    assert!(!out.contains("squat15008:"), "the squatter got the tunnel port: {out}");
    // The squatting pod's outbound is captured: it reaches the non-mesh pod through the agent,
    // not through its own listener on 15001 nor directly.
    let outsider = m.dst("outsider");
    let (out, ok) = m.client("squatter", &["--connect", &outsider, "--message", "out"])?;
    assert!(ok && out == "outsider:out", "{out}");
    let rec = m.agent("node1").wait_connection(Duration::from_secs(5), |c| {
        c["direction"] == "outbound" && c["sourcePod"] == format!("squatter.{NS}")
    })?;
    assert_eq!(rec["originalDestination"], outsider, "{rec}");
    for v6 in [false, true] {
        let dst = if v6 {
            SocketAddr::new(m.bed.pod("outsider").ip6.into(), testbed::mesh::PORT)
        } else {
            SocketAddr::new(m.bed.pod("outsider").ip.into(), testbed::mesh::PORT)
        };
        let (out, _) = to(&m, "squatter", dst, "out")?;
        assert!(!out.contains("squat15001"), "a squatter took captured connections: {out}");
    }
    // And a mesh client still reaches it over mTLS, through the steered tunnel port.
    let dst = SocketAddr::new(pod.ip.into(), PORT);
    expect_reply(&m, "client", dst, "squatter:ping", Duration::from_secs(5))?;
    assert_mtls(&m, dst)?;
    let log = m.agent("node1").log();
    assert!(log.contains("the agent's port steered to it"), "{log}");
    Ok(())
}

/// Open fds and threads of a process.
fn fds_and_threads(pid: u32) -> Result<(usize, usize)> {
    let count = |dir: String| -> Result<usize> {
        Ok(std::fs::read_dir(&dir).with_context(|| dir.clone())?.count())
    };
    Ok((count(format!("/proc/{pid}/fd"))?, count(format!("/proc/{pid}/task"))?))
}

fn not_enrolled(m: &Mesh) -> Result<Vec<serde_json::Value>> {
    let dump: serde_json::Value = serde_json::from_str(&m.agent("node1").get("/config_dump")?)?;
    Ok(dump["notEnrolled"].as_array().cloned().unwrap_or_default())
}

fn metric(text: &str, key: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(key))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_pod_whose_listeners_fail_is_held_closed_reported_retried_and_enrolled_later() -> Result<()> {
    let mut m = Mesh::build(
        "se-retry",
        NS,
        &[("node1", "client"), ("node1", "broken"), ("node1", "outsider")],
    )?;
    let pod = m.bed.pod("broken").clone();
    let _echo = dual_stack_echo(&m, "broken", &format!("[::]:{PORT}"), "broken:")?;
    // The workload's primary address is not (yet) the pod's: the agent's tunnel listener
    // cannot bind it, so enrollment fails at its last step.
    let missing = m.bed.alloc_address()?;
    let (path, mut file) = m.workloads("workloads", &["client"])?;
    let mut broken = WorkloadEntry::of(&pod, NS);
    broken.ip = missing;
    broken.ips = vec![missing.into(), pod.ip.into()];
    file.workloads.push(broken);
    file.write(&path)?;
    let policies = PolicyDir::new(m.bed.id())?;
    policies.write("ns.yaml", &namespace_pa(NS, "STRICT"))?;
    let ca = m.ca("ca")?;
    let dir = policies.0.display().to_string();
    m.start_agent("node1", &path, &ca, &["--policies", &dir])?;

    // Ready all the same, naming the pod.
    let body = wait_ready(&m, "1 of 2 pods enrolled")?;
    assert!(body.contains(&format!("broken.{NS}")) && body.contains("listeners"), "{body}");
    // Closed while it fails: plaintext to its STRICT port is refused.
    assert_refused(&m, "outsider", SocketAddr::new(pod.ip.into(), PORT), "broken:")?;

    // Reported: config_dump, check, metrics.
    let failures = not_enrolled(&m)?;
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0]["pod"], format!("broken.{NS}"));
    assert_eq!(failures[0]["step"], "listeners");
    assert_eq!(failures[0]["failsClosed"], true);
    let check: serde_json::Value =
        serde_json::from_str(&m.agent("node1").get(&format!("/check?pod=broken.{NS}"))?)?;
    assert_eq!(check["enrolled"], false, "{check}");
    assert_eq!(check["enrollmentFailure"]["step"], "listeners", "{check}");
    let text = mtls_agent::cli::render::check(&check);
    assert!(text.contains("NOT ENROLLED") && text.contains("fails closed"), "{text}");
    let metrics = m.agent("node1").metrics_text()?;
    let key = "mtls_agent_enrollment_failures_total{node=\"node1\",reason=\"listeners\"}";
    assert!(metric(&metrics, key) >= 1.0, "{metrics}");
    assert_eq!(metric(&metrics, "mtls_agent_pods_not_enrolled{"), 1.0, "{metrics}");

    // Retried every couple of seconds, leaking neither fds nor threads, warned about once.
    let pid = m.agent("node1").pid().context("agent pid")?;
    let attempts = |m: &Mesh| -> Result<u64> {
        Ok(not_enrolled(m)?.first().and_then(|f| f["attempts"].as_u64()).unwrap_or_default())
    };
    let wait_attempts = |m: &Mesh, n: u64| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while attempts(m)? < n {
            if Instant::now() > deadline {
                bail!("no retry: {:?}", not_enrolled(m)?);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    };
    let first = attempts(&m)?;
    wait_attempts(&m, first + 1)?;
    let before = fds_and_threads(pid)?;
    let from = attempts(&m)?;
    wait_attempts(&m, from + 4)?;
    std::thread::sleep(Duration::from_millis(300));
    let after = fds_and_threads(pid)?;
    assert!(
        after.0 <= before.0 + 1 && after.1 <= before.1,
        "fds/threads grew over retries: {before:?} -> {after:?}"
    );
    let log = m.agent("node1").log();
    let warnings =
        log.lines().filter(|l| l.contains(" WARN ") && l.contains("enrollment failed")).count();
    assert_eq!(warnings, 1, "warned once, not at every retry:\n{log}");

    // The cause goes: enrolled at the next retry, and the mesh client gets through.
    m.bed.add_address("broken", missing.into())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !not_enrolled(&m)?.is_empty() {
        if Instant::now() > deadline {
            bail!("not enrolled: {:?}", not_enrolled(&m)?);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_ready(&m, "2 of 2 pods enrolled")?;
    let dst = SocketAddr::new(pod.ip.into(), PORT);
    expect_reply(&m, "client", dst, "broken:ping", Duration::from_secs(5))?;
    assert_mtls(&m, dst)?;
    assert_refused(&m, "outsider", dst, "broken:")?;
    let metrics = m.agent("node1").metrics_text()?;
    assert_eq!(metric(&metrics, "mtls_agent_pods_not_enrolled{"), 0.0, "{metrics}");
    Ok(())
}

#[test]
fn kubernetes_mode_posts_one_warning_event_on_a_pod_it_cannot_enroll_and_stays_ready() -> Result<()>
{
    use testbed::{
        agent::{AgentOptions, AgentProcess, CaDir},
        apiserver::{self as api, ApiServer},
        Testbed,
    };
    let uid = |n: u32| format!("{:08x}-5e3a-4c1d-9b7e-{:012x}", std::process::id(), n);
    let mut bed = Testbed::new("se-event")?;
    let node = bed.add_node("node1")?;
    let cgroup = |u: &str| {
        let u = u.replace('-', "_");
        std::path::PathBuf::from(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-0a1b2c.scope"
        ))
    };
    let a = bed.add_pod_in_cgroup("node1", "a", &cgroup(&uid(1)))?;
    let _server = testbed::mesh::echo_server(&bed, "a")?;
    let ghost_ip = bed.alloc_address()?;
    let server = ApiServer::start()?;
    let events = format!("/api/v1/namespaces/{NS}/events");
    for path in [
        api::PODS,
        api::NAMESPACES,
        api::SERVICES,
        api::ENDPOINTSLICES,
        api::PEERAUTHENTICATIONS_V1,
        &events,
    ] {
        server.serve(path);
    }
    server.apply(api::NAMESPACES, api::namespace(NS, true));
    let pod = |name: &str, uid: &str, ip: String| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "uid": uid},
            "spec": {"nodeName": "node1", "containers": [{"name": "app"}]},
            "status": {"phase": "Running", "podIP": ip},
        })
    };
    server.apply(api::PODS, pod("a", &uid(1), a.ip.to_string()));
    // Running in the API, but no process of it on the node: its namespace cannot be found.
    server.apply(api::PODS, pod("ghost", &uid(2), ghost_ip.to_string()));
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;
    let ca = CaDir::init(&format!("{}-k8s", bed.id()), "cluster.local")?;
    let mut opts = AgentOptions::kubernetes("node1", &kubeconfig, &node.cgroup);
    opts.ca_dir = Some(ca.path.clone());
    // Ready although one pod cannot be enrolled; the body names it.
    let agent = AgentProcess::start(&bed, opts)?;
    let (ready, body) = agent.readiness()?;
    assert!(
        ready && body.contains("1 of 2 pods enrolled") && body.contains("ghost.shop"),
        "{body}"
    );

    // Pod a, enrolled, gets its MeshEnrolled Event; only failures count here.
    let failed = || -> Vec<serde_json::Value> {
        let all = server.objects(&events).into_iter();
        all.filter(|e| e["reason"] == "MeshEnrollmentFailed").collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while failed().is_empty() {
        if Instant::now() > deadline {
            bail!("no Event posted; agent log:\n{}", agent.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let posted = failed();
    let e = &posted[0];
    assert_eq!(e["involvedObject"]["kind"], "Pod", "{e}");
    assert_eq!(e["involvedObject"]["name"], "ghost", "{e}");
    assert_eq!(e["involvedObject"]["uid"], uid(2), "{e}");
    assert_eq!(e["reason"], "MeshEnrollmentFailed", "{e}");
    assert_eq!(e["type"], "Warning", "{e}");
    assert!(e["message"].as_str().is_some_and(|m| m.contains("netns")), "{e}");
    // Retries with the same reason post nothing more.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(failed().len(), 1, "{:?}", server.objects(&events));
    Ok(())
}
