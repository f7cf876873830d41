//! End-to-end: transparent capture with real eBPF programs, namespaces, cgroups and processes.
//! Runs as root.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Result;
use mtls_agent::capture::OrigDstMap;
use testbed::{
    agent::{AgentOptions, AgentProcess, ServiceEntry, WorkloadEntry, WorkloadsFile},
    PodProcess, Testbed,
};

fn e2e_tool() -> std::path::PathBuf {
    testbed::e2e_tool!()
}

/// Waits for a closed outbound (captured) connection record matching `pred`.
trait WaitOutbound {
    fn wait_outbound(&self, pred: impl Fn(&serde_json::Value) -> bool)
        -> Result<serde_json::Value>;
}

impl WaitOutbound for AgentProcess {
    fn wait_outbound(
        &self,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        self.wait_connection(Duration::from_secs(5), |c| c["direction"] == "outbound" && pred(c))
    }
}

/// How many lines of a process's output so far contain `needle`.
fn lines_matching(p: &PodProcess, needle: &str) -> usize {
    p.stdout().lines().filter(|l| l.contains(needle)).count()
}

const NS: &str = "shop";
const ECHO_PORT: u16 = 8080;

/// A test bed with one node, the named pods, an echo server in each pod listed in `servers`,
/// and an agent enrolling the pods listed in `enrolled`.
struct Scenario {
    // Field order matters for drop: processes and agent go before the bed.
    servers: Vec<PodProcess>,
    agent: AgentProcess,
    file: WorkloadsFile,
    workloads_path: PathBuf,
    bed: Testbed,
}

impl Scenario {
    fn new(test: &str, pods: &[&str], enrolled: &[&str], servers: &[&str]) -> Result<Scenario> {
        Scenario::with_log(test, pods, enrolled, servers, None)
    }

    /// As `new`, with the agent's `RUST_LOG` set to `log_filter`.
    fn with_log(
        test: &str,
        pods: &[&str],
        enrolled: &[&str],
        servers: &[&str],
        log_filter: Option<&str>,
    ) -> Result<Scenario> {
        let mut bed = Testbed::new(test)?;
        bed.add_node("node1")?;
        for p in pods {
            bed.add_pod("node1", p)?;
        }
        let mut file = WorkloadsFile::default();
        for p in enrolled {
            file.workloads.push(WorkloadEntry::of(bed.pod(p), NS));
        }
        let workloads_path = std::env::temp_dir().join(format!("{}-workloads.yaml", bed.id()));
        file.write(&workloads_path)?;
        let mut procs = Vec::new();
        for s in servers {
            procs.push(echo_server(&bed, s, ECHO_PORT)?);
        }
        let mut opts = AgentOptions::new("node1", &workloads_path);
        opts.log_filter = log_filter.map(str::to_owned);
        let agent = AgentProcess::start(&bed, opts)?;
        Ok(Scenario { servers: procs, agent, file, workloads_path, bed })
    }

    fn addr(&self, pod: &str, port: u16) -> SocketAddr {
        (self.bed.pod(pod).ip, port).into()
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.workloads_path);
    }
}

fn echo_server(bed: &Testbed, pod: &str, port: u16) -> Result<PodProcess> {
    let mut cmd = Command::new(e2e_tool());
    cmd.args([
        "echo-server",
        "--listen",
        &format!("0.0.0.0:{port}"),
        "--prefix",
        &format!("{pod}:"),
    ]);
    let p = bed.spawn_in_pod(pod, cmd)?;
    p.wait_for_stdout("listening", Duration::from_secs(5))?;
    Ok(p)
}

/// Runs the e2e client in `pod`; returns its stdout (one line per connection) and success.
fn client(bed: &Testbed, pod: &str, args: &[&str]) -> Result<(String, bool)> {
    let mut cmd = Command::new(e2e_tool());
    cmd.arg("client").args(args);
    let p = bed.spawn_in_pod(pod, cmd)?;
    let out = p.wait_with_output(Duration::from_secs(30))?;
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), out.status.success()))
}

#[test]
fn captured_by_pod_ip_and_by_service_vip() -> Result<()> {
    let mut s = Scenario::new("cap-ip-vip", &["a", "b"], &["a", "b"], &["b"])?;
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    s.file.services.push(ServiceEntry {
        name: "b".into(),
        namespace: NS.into(),
        vip: Some(vip),
        selector: vec![("app".into(), "b".into())],
        ports: vec![(80, ECHO_PORT)],
    });
    s.file.write(&s.workloads_path)?;
    s.agent.wait_log("workloads changed", Duration::from_secs(3))?;

    let dst = s.addr("b", ECHO_PORT).to_string();
    let (out, ok) = client(&s.bed, "a", &["--connect", &dst, "--message", "hello-by-ip"])?;
    assert!(ok, "client failed: {out}");
    assert_eq!(out.trim(), "b:hello-by-ip");
    let rec = s.agent.wait_outbound(|c| c["originalDestination"] == dst.as_str())?;
    assert_eq!(rec["sourcePod"], format!("a.{NS}"));
    assert_eq!(rec["destinationPod"], format!("b.{NS}"));
    assert_eq!(rec["bytesSent"], "hello-by-ip".len());
    assert_eq!(rec["bytesReceived"], "b:hello-by-ip".len());
    // The agent saw the app's loopback side: the capture, not a direct connection.
    assert!(rec["source"].as_str().unwrap_or_default().starts_with("127.0.0.1:"), "{rec}");

    let vip_dst = format!("{vip}:80");
    let (out, ok) = client(&s.bed, "a", &["--connect", &vip_dst, "--message", "hello-by-vip"])?;
    assert!(ok, "client failed: {out}");
    assert_eq!(out.trim(), "b:hello-by-vip");
    let rec = s.agent.wait_outbound(|c| c["originalDestination"] == vip_dst.as_str())?;
    assert_eq!(rec["destination"], dst.as_str(), "VIP port 80 resolved to the pod's targetPort");

    // An IPv6 socket dialling an IPv4-mapped address goes through connect6.
    let mapped = format!("[::ffff:{}]:{ECHO_PORT}", s.bed.pod("b").ip);
    let (out, ok) = client(&s.bed, "a", &["--connect", &mapped, "--message", "hello-v6"])?;
    assert!(ok, "client failed: {out}");
    assert_eq!(out.trim(), "b:hello-v6");
    s.agent.wait_outbound(|c| c["bytesSent"] == "hello-v6".len())?;
    s.agent.wait_log("captured connect6 to port 8080", Duration::from_secs(2))?;
    // aya-log carries the programs' own log lines into the agent's log.
    s.agent.wait_log("captured connect4 to port 8080", Duration::from_secs(2))?;
    Ok(())
}

#[test]
fn same_loopback_client_port_in_two_pods_reaches_each_own_destination() -> Result<()> {
    let s = Scenario::new(
        "cap-collide",
        &["a1", "a2", "b1", "b2"],
        &["a1", "a2", "b1", "b2"],
        &["b1", "b2"],
    )?;
    let port = "41234";
    let spawn = |from: &str, to: &str| -> Result<PodProcess> {
        let mut cmd = Command::new(e2e_tool());
        cmd.args([
            "client",
            "--connect",
            &s.addr(to, ECHO_PORT).to_string(),
            "--message",
            from,
            "--bind",
            &format!("127.0.0.1:{port}"),
            "--hold-ms",
            "1500",
        ]);
        s.bed.spawn_in_pod(from, cmd)
    };
    // Both connections are open at the same time, from the same 127.0.0.1:41234 in two pods.
    let c1 = spawn("a1", "b1")?;
    let c2 = spawn("a2", "b2")?;
    // While both are open, sock_ops keeps one ORIG_DST entry for each (keyed by netns cookie).
    let map = OrigDstMap::open_pinned(&s.agent.bpffs)?;
    let deadline = Instant::now() + Duration::from_secs(1);
    while map.len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(map.len(), 2, "one entry per open captured connection");
    let o1 = c1.wait_with_output(Duration::from_secs(15))?;
    let o2 = c2.wait_with_output(Duration::from_secs(15))?;
    assert_eq!(String::from_utf8_lossy(&o1.stdout).trim(), "b1:a1");
    assert_eq!(String::from_utf8_lossy(&o2.stdout).trim(), "b2:a2");
    let conns = s.agent.connections()?;
    let from_port: Vec<_> =
        conns.iter().filter(|c| c["source"] == format!("127.0.0.1:{port}").as_str()).collect();
    assert_eq!(from_port.len(), 2, "{conns:#?}");
    Ok(())
}

#[test]
fn a_pod_that_is_not_enrolled_is_not_captured() -> Result<()> {
    let s = Scenario::new("cap-notenr", &["a", "b", "outsider"], &["a", "b"], &["b"])?;
    let dst = s.addr("b", ECHO_PORT).to_string();
    let (out, ok) = client(&s.bed, "outsider", &["--connect", &dst, "--message", "direct"])?;
    assert!(ok, "client failed: {out}");
    assert_eq!(out.trim(), "b:direct");
    // An enrolled pod's connection right after is recorded; the outsider's never was.
    let (_, ok) = client(&s.bed, "a", &["--connect", &dst, "--message", "via-agent"])?;
    assert!(ok);
    s.agent.wait_outbound(|c| c["sourcePod"] == format!("a.{NS}").as_str())?;
    let conns = s.agent.connections()?;
    let outbound: Vec<_> = conns.iter().filter(|c| c["direction"] == "outbound").collect();
    assert_eq!(outbound.len(), 1, "only the enrolled pod's connection is captured: {conns:#?}");
    Ok(())
}

#[test]
fn fails_closed_while_the_agent_is_down_and_recovers_after_restart() -> Result<()> {
    let mut s = Scenario::new("cap-crash", &["a", "b"], &["a", "b"], &["b"])?;
    let dst = s.addr("b", ECHO_PORT).to_string();
    let (out, ok) = client(&s.bed, "a", &["--connect", &dst, "--message", "before"])?;
    assert!(ok && out.trim() == "b:before", "{out}");
    let accepted_before = lines_matching(&s.servers[0], "accepted");

    s.agent.kill()?;
    let started = Instant::now();
    let (out, ok) = client(
        &s.bed,
        "a",
        &["--connect", &dst, "--message", "while-down", "--timeout-ms", "3000"],
    )?;
    let took = started.elapsed();
    assert!(!ok, "a captured pod must not get through while the agent is down: {out}");
    assert!(out.contains("refused"), "fails fast with a refusal, not a timeout: {out}");
    assert!(took < Duration::from_secs(2), "refusal took {took:?}");
    assert_eq!(
        lines_matching(&s.servers[0], "accepted"),
        accepted_before,
        "the server never saw the connection"
    );

    s.agent.restart()?;
    let (out, ok) = client(&s.bed, "a", &["--connect", &dst, "--message", "after"])?;
    assert!(ok && out.trim() == "b:after", "{out}");
    s.agent.wait_outbound(|c| c["originalDestination"] == dst.as_str())?;
    Ok(())
}

#[test]
fn the_ebpf_programs_log_lines_follow_the_log_level_set_at_run_time() -> Result<()> {
    let s = Scenario::with_log("cap-ebpflog", &["a", "b"], &["a"], &["b"], Some("info"))?;
    let dst = s.addr("b", ECHO_PORT).to_string();
    let send = |msg: &str| -> Result<()> {
        let (out, ok) = client(&s.bed, "a", &["--connect", &dst, "--message", msg])?;
        assert!(ok && out.trim() == format!("b:{msg}"), "{out}");
        s.agent.wait_outbound(|c| c["bytesSent"] == msg.len())?;
        Ok(())
    };
    send("quiet")?;
    assert!(!s.agent.log().contains("captured connect4"), "eBPF lines are off at info");

    // Percent-encoded, as HTTP clients send a filter with `,` and `=`.
    s.agent.post("/logging?level=info%2Cmtls_agent_ebpf%3Ddebug")?;
    send("loud-one")?;
    s.agent.wait_log("captured connect4 to port 8080", Duration::from_secs(2))?;

    s.agent.post("/logging?level=info")?;
    let lines = |log: String| log.matches("captured connect4").count();
    let before = lines(s.agent.log());
    send("quiet-again")?;
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(lines(s.agent.log()), before, "eBPF lines are off again at info");
    Ok(())
}

#[test]
fn plaintext_accepted_by_an_enrolled_pod_is_recorded_with_its_policy_and_bytes() -> Result<()> {
    // No policy: PERMISSIVE. `o` is outside the mesh; `a` and `b` are enrolled.
    let s = Scenario::new("cap-plain", &["a", "b", "o"], &["a", "b"], &["b"])?;
    let dst = s.addr("b", ECHO_PORT).to_string();
    let (out, ok) = client(&s.bed, "o", &["--connect", &dst, "--message", "in-the-clear"])?;
    assert!(ok && out.trim() == "b:in-the-clear", "{out}");
    let o_ip = s.bed.pod("o").ip.to_string();
    let plain = |c: &serde_json::Value| c["mode"] == "plaintext";
    let rec = s.agent.wait_connection(Duration::from_secs(3), |c| plain(c))?;
    assert_eq!(rec["direction"], "inbound", "{rec}");
    assert_eq!(rec["destination"], dst.as_str(), "{rec}");
    assert_eq!(rec["destinationPod"], format!("b.{NS}"), "{rec}");
    assert!(rec["source"].as_str().unwrap_or_default().starts_with(&format!("{o_ip}:")), "{rec}");
    assert_eq!(rec["sourcePod"], serde_json::Value::Null, "o is not a workload: {rec}");
    assert_eq!(rec["tls"], "PLAINTEXT", "{rec}");
    assert!(rec["policy"].as_str().unwrap_or_default().contains("PERMISSIVE"), "{rec}");
    // Sent is source -> destination, as in every record: the message in, the echo back.
    assert_eq!(rec["bytesSent"], "in-the-clear".len(), "{rec}");
    assert_eq!(rec["bytesReceived"], "b:in-the-clear".len(), "{rec}");

    // Traffic the agent carried (a -> b in mTLS, handed to b's app from b's own address) and
    // loopback inside b are not plaintext on the wire: no record.
    let (out, ok) = client(&s.bed, "a", &["--connect", &dst, "--message", "tunnelled"])?;
    assert!(ok && out.trim() == "b:tunnelled", "{out}");
    s.agent.wait_outbound(|c| c["bytesSent"] == "tunnelled".len() && c["mode"] == "mTLS")?;
    let lo = format!("127.0.0.1:{ECHO_PORT}");
    let (out, ok) = client(&s.bed, "b", &["--connect", &lo, "--message", "local"])?;
    assert!(ok && out.trim() == "b:local", "{out}");
    std::thread::sleep(Duration::from_millis(300));
    let plaintext: Vec<_> = s.agent.connections()?.into_iter().filter(plain).collect();
    assert_eq!(plaintext.len(), 1, "only o's connection was plaintext: {plaintext:#?}");
    Ok(())
}

#[test]
fn captured_over_ipv6_by_connect6() -> Result<()> {
    let s = Scenario::new("cap-v6", &["a", "b"], &["a"], &[])?;
    let mut cmd = Command::new(e2e_tool());
    cmd.args(["echo-server", "--listen", &format!("[::]:{ECHO_PORT}"), "--prefix", "b6:"]);
    let server = s.bed.spawn_in_pod("b", cmd)?;
    server.wait_for_stdout("listening", Duration::from_secs(5))?;

    let dst = SocketAddr::from((s.bed.pod("b").ip6, ECHO_PORT)).to_string();
    let (out, ok) = client(&s.bed, "a", &["--connect", &dst, "--message", "hello-v6-only"])?;
    assert!(ok, "client failed: {out}");
    assert_eq!(out.trim(), "b6:hello-v6-only");
    let rec = s.agent.wait_outbound(|c| c["originalDestination"] == dst.as_str())?;
    // The app's socket was sent to the agent's IPv6 listener, which dialled the original
    // destination from the pod (b is outside the mesh: plaintext passthrough).
    assert!(rec["source"].as_str().unwrap_or_default().starts_with("[::1]:"), "{rec}");
    assert_eq!(rec["sourcePod"], format!("a.{NS}"));
    assert_eq!(rec["bytesSent"], "hello-v6-only".len());
    assert_eq!(rec["bytesReceived"], "b6:hello-v6-only".len());
    s.agent.wait_log("captured connect6 to port 8080", Duration::from_secs(2))?;
    Ok(())
}

#[test]
fn loopback_traffic_inside_a_pod_is_untouched() -> Result<()> {
    let s = Scenario::new("cap-loop", &["a"], &["a"], &[])?;
    let mut servers = Vec::new();
    for (listen, prefix) in [("127.0.0.1:7000", "local:"), ("[::1]:7001", "local6:")] {
        let mut cmd = Command::new(e2e_tool());
        cmd.args(["echo-server", "--listen", listen, "--prefix", prefix]);
        let server = s.bed.spawn_in_pod("a", cmd)?;
        server.wait_for_stdout("listening", Duration::from_secs(5))?;
        servers.push(server);
    }
    let (out, ok) = client(&s.bed, "a", &["--connect", "127.0.0.1:7000", "--message", "lo"])?;
    assert!(ok && out.trim() == "local:lo", "{out}");
    let (out, ok) = client(&s.bed, "a", &["--connect", "[::1]:7001", "--message", "lo6"])?;
    assert!(ok && out.trim() == "local6:lo6", "{out}");
    assert!(s.agent.connections()?.is_empty(), "loopback was not captured");
    Ok(())
}

#[test]
fn pods_added_and_removed_in_the_file_are_enrolled_and_released() -> Result<()> {
    let mut s = Scenario::new("cap-watch", &["a", "b"], &["b"], &["b"])?;
    let dst = s.addr("b", ECHO_PORT).to_string();
    client(&s.bed, "a", &["--connect", &dst, "--message", "x"])?;
    let outbound = |conns: Vec<serde_json::Value>| {
        conns.iter().filter(|c| c["direction"] == "outbound").count()
    };
    assert_eq!(outbound(s.agent.connections()?), 0, "a is not enrolled yet");
    // b is: the agent sees a's plaintext arrive there.
    s.agent.wait_connection(Duration::from_secs(3), |c| {
        c["mode"] == "plaintext" && c["bytesSent"] == 1
    })?;

    s.file.workloads.push(WorkloadEntry::of(s.bed.pod("a"), NS));
    s.file.write(&s.workloads_path)?;
    // Enrolled within 1 s of the change, without a restart.
    s.agent.wait_log("enrolled pod=a.shop", Duration::from_secs(1))?;
    let (out, ok) = client(&s.bed, "a", &["--connect", &dst, "--message", "y"])?;
    assert!(ok && out.trim() == "b:y", "{out}");
    s.agent.wait_outbound(|c| c["sourcePod"] == "a.shop")?;

    s.file.workloads.retain(|w| w.name != "a");
    s.file.write(&s.workloads_path)?;
    s.agent.wait_log("released pod=a.shop", Duration::from_secs(1))?;
    let before = outbound(s.agent.connections()?);
    let (out, ok) = client(&s.bed, "a", &["--connect", &dst, "--message", "z"])?;
    assert!(ok && out.trim() == "b:z", "released pod talks directly: {out}");
    assert_eq!(outbound(s.agent.connections()?), before, "no longer captured");
    Ok(())
}

#[test]
fn original_destination_map_is_empty_after_a_thousand_connections() -> Result<()> {
    let s = Scenario::new("cap-nogrowth", &["a", "b"], &["a", "b"], &["b"])?;
    let dst = s.addr("b", ECHO_PORT).to_string();
    let (out, ok) = client(&s.bed, "a", &["--connect", &dst, "--message", "m", "--count", "1000"])?;
    assert!(ok, "{}", out.lines().rev().take(3).collect::<Vec<_>>().join("\n"));
    assert_eq!(out.lines().filter(|l| *l == "b:m").count(), 1000);
    let map = OrigDstMap::open_pinned(&s.agent.bpffs)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !map.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(map.len(), 0, "every closed connection's entry was deleted");
    // sock_ops took every connect()'s record of the original destination.
    let pending = mtls_agent::capture::Capture::pending_len_pinned(&s.agent.bpffs)?;
    assert_eq!(pending, 0, "connect() records left behind");
    Ok(())
}
