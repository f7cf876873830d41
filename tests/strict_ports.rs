//! Host suite, issue 14: every port the agent opens holds up against hostile clients.
//!
//! - Bounded resources (item 6): thousands of idle or slow clients on the metrics, health and
//!   admin ports and on a pod's tunnel port 15008 neither stall the mesh nor the agent's own
//!   readiness, and a request whose headers dawdle is closed, not answered.
//! - The admin API (item 7): with default flags no admin TCP port is open, and a process in the
//!   host netns running as another user (a host-network pod's, uid 65534) cannot connect to the
//!   admin socket, so it cannot change the log level; root's CLI finds the agent by itself.
//!
//! Runs as root.

use std::{
    collections::HashSet,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use testbed::{
    agent::{agent_bin, AdminFlags, AgentOptions, AgentProcess},
    e2e_tool_path,
    mesh::{namespace_pa, Mesh, PolicyDir},
    spawn_on_host, PodProcess,
};

const NS: &str = "strict-ports";
/// Clients per port.
const CLIENTS: usize = 2000;
/// How long they stay.
const FLOOD_SECONDS: u64 = 30;

/// Sends a request head one header line every 500 ms for 8 s, then ends it: the agent must
/// have closed the connection by then (header timeout), not answer it.
fn dawdling_request_is_closed(addr: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\n")?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(8) {
        std::thread::sleep(Duration::from_millis(500));
        if s.write_all(b"X-Slow: 1\r\n").is_err() {
            break;
        }
    }
    let _ = s.write_all(b"\r\n");
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut answer = Vec::new();
    // A reset is as good as an EOF here: either way the request was not served.
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    ensure!(
        !answer.starts_with("HTTP/1.1 200"),
        "{addr}: a request whose headers took 8 s was answered:\n{answer}"
    );
    Ok(())
}

/// `held ADDR OPEN CLOSED` of the slow-clients tool: (open, closed).
fn held(p: &PodProcess, addr: &str) -> Result<(usize, usize)> {
    let line =
        p.wait_for_stdout(&format!("held {addr} "), Duration::from_secs(FLOOD_SECONDS + 30))?;
    let nums: Vec<usize> = line.split(' ').skip(2).filter_map(|n| n.parse().ok()).collect();
    match nums[..] {
        [open, closed] => Ok((open, closed)),
        _ => bail!("unexpected line {line:?}"),
    }
}

/// The value of the sample of `family` whose labels contain every one of `labels`.
fn metric(text: &str, family: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn thousands_of_idle_and_slow_clients_on_every_port_leave_the_mesh_and_readiness_served(
) -> Result<()> {
    let mut m = Mesh::build(
        "strict-ports-flood",
        NS,
        &[("node1", "client"), ("node1", "server"), ("node1", "attacker")],
    )?;
    let (workloads, _) = m.workloads("workloads", &["client", "server"])?;
    let policies = PolicyDir::new(m.bed.id())?;
    policies.write("ns.yaml", &namespace_pa(NS, "STRICT"))?;
    let ca = m.ca("ca")?;
    let mut opts = AgentOptions::new("node1", &workloads);
    opts.ca_dir = Some(ca);
    opts.extra_args = vec!["--policies".into(), policies.0.display().to_string()];
    // A common default soft limit: the agent must raise it itself.
    opts.open_files = Some(1024);
    // Refusal lines are warnings; debug lines of thousands of connections only cost time here.
    opts.log_filter = Some("info".into());
    let agent = AgentProcess::start(&m.bed, opts)?;
    agent.wait_log("open files limit raised from 1024 to", Duration::from_secs(5))?;

    // The header timeout, alone on the port first.
    dawdling_request_is_closed(agent.metrics)?;
    // A body announced as a megabyte is refused before it is read.
    let mut s = TcpStream::connect_timeout(&agent.health, Duration::from_secs(2))?;
    s.write_all(b"POST /healthz/ready HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    ensure!(answer.starts_with("HTTP/1.1 413"), "a request with a large body: {answer}");

    let server = m.bed.pod("server").ip;
    let tunnel = format!("{server}:15008");
    let local = [agent.metrics, agent.health, agent.admin].map(|a| a.to_string());
    let tool = e2e_tool_path()?;
    let mut cmd = Command::new(&tool);
    cmd.arg("slow-clients");
    for a in &local {
        cmd.args(["--connect", a]);
    }
    cmd.args(["--count", &CLIENTS.to_string(), "--seconds", &FLOOD_SECONDS.to_string()]);
    cmd.arg("--dawdle");
    let host_flood = spawn_on_host(cmd)?;
    let mut cmd = Command::new(&tool);
    cmd.args(["slow-clients", "--connect", &tunnel]);
    cmd.args(["--count", &CLIENTS.to_string(), "--seconds", &FLOOD_SECONDS.to_string()]);
    let pod_flood = m.bed.spawn_in_pod("attacker", cmd)?;
    let opened = Duration::from_secs(FLOOD_SECONDS);
    let mut connected = Vec::new();
    for a in &local {
        connected.push(host_flood.wait_for_stdout(&format!("connected {a} "), opened)?);
    }
    pod_flood.wait_for_stdout(&format!("connected {tunnel} "), opened)?;

    // While they sit there: mesh connections to the attacked pod (STRICT: only mTLS gets
    // through) all succeed, and the agent answers its own readiness probe.
    let (out, ok) = m.client(
        "client",
        &[
            "--connect",
            &m.dst("server"),
            "--message",
            "hi",
            "--count",
            "20",
            "--timeout-ms",
            "10000",
        ],
    )?;
    ensure!(ok, "mesh connections failed during the flood: {out}\nagent log:\n{}", agent.log());
    ensure!(out.matches("server:hi").count() == 20, "replies: {out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match agent.readiness() {
            Ok((true, _)) => break,
            r if Instant::now() > deadline => {
                bail!("no readiness answer during the flood: {r:?}\nlog:\n{}", agent.log())
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }

    // Every slow client was closed by the agent, none is left holding a connection.
    for a in &local {
        let (open, closed) = held(&host_flood, a)?;
        ensure!(open == 0, "{a}: {open} slow clients still connected ({closed} closed)");
    }
    let (open, closed) = held(&pod_flood, &tunnel)?;
    ensure!(open == 0, "{tunnel}: {open} idle clients still connected ({closed} closed)");
    drop((host_flood, pod_flood));

    // Counted by reason, and logged a few times, not thousands.
    let text = agent.metrics_text()?;
    let family = "mtls_agent_server_rejections_total";
    for server in ["metrics", "health", "admin"] {
        let label = format!("server=\"{server}\"");
        let limit = metric(&text, family, &[&label, "reason=\"connection_limit\""]);
        ensure!(
            limit > 0.0,
            "{server}: no connection_limit refusals counted ({connected:?}):\n{text}"
        );
        let timeout = metric(&text, family, &[&label, "reason=\"header_timeout\""]);
        ensure!(timeout > 0.0, "{server}: no header_timeout refusals counted:\n{text}");
    }
    let body = metric(&text, family, &["server=\"health\"", "reason=\"body_too_large\""]);
    ensure!(body == 1.0, "body_too_large refusals: {body}\n{text}");
    let by_source = metric(
        &text,
        "mtls_agent_rejections_total",
        &["direction=\"inbound\"", "reason=\"handshake_limit_source\""],
    );
    ensure!(by_source > 1000.0, "handshakes past the per-source cap: {by_source}\n{text}");
    let log = agent.log();
    let lines = log.lines().filter(|l| l.contains("rejected: metrics connection")).count();
    ensure!((1..=10).contains(&lines), "{lines} refusal lines for the metrics port:\n{log}");
    let lines = log.lines().filter(|l| l.contains("TLS handshakes from this source")).count();
    ensure!((1..=6).contains(&lines), "{lines} refusal lines for the per-source cap:\n{log}");
    // The next line for a key says how many were left out: one more dawdler, over 10 s after
    // the flood's header timeouts.
    dawdling_request_is_closed(agent.metrics)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let summary = |log: &str| {
        log.lines()
            .find(|l| {
                l.contains("rejected: metrics connection")
                    && l.contains("more suppressed in 10s")
                    && l.contains("header_timeout")
            })
            .map(str::to_owned)
    };
    while summary(&agent.log()).is_none() {
        ensure!(Instant::now() < deadline, "no suppressed count in the log:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }

    // And the mesh still works afterwards.
    let (out, ok) = m.client("client", &["--connect", &m.dst("server"), "--message", "after"])?;
    ensure!(ok && out.contains("server:after"), "after the flood: {out}");
    Ok(())
}

/// One attacker that reconnects as fast as it is closed cannot take the health port: it holds
/// at most its per-source share of the slots, and the probe (here from 127.0.0.1, for the
/// kubelet from the node's address) is answered at once all the while. Before the per-source
/// bound it held all 256 slots, and probes were closed unanswered until the agent was killed.
#[test]
fn a_client_reconnecting_in_a_loop_cannot_take_the_health_port_from_the_probes() -> Result<()> {
    let mut m = Mesh::build("strict-ports-reconnect", NS, &[("node1", "server")])?;
    let (workloads, _) = m.workloads("workloads", &["server"])?;
    let ca = m.ca("ca")?;
    let mut opts = AgentOptions::new("node1", &workloads);
    opts.ca_dir = Some(ca);
    opts.log_filter = Some("info".into());
    let agent = AgentProcess::start(&m.bed, opts)?;

    let mut cmd = Command::new(e2e_tool_path()?);
    cmd.args(["reconnect-flood", "--connect", &agent.health.to_string()]);
    cmd.args(["--bind", "127.0.0.2", "--seconds", "12"]);
    let flood = spawn_on_host(cmd)?;
    std::thread::sleep(Duration::from_secs(2));
    // Ten probes over five seconds while the flood goes on: each answered, none refused.
    for i in 0..10 {
        let t = Instant::now();
        let answer = agent.readiness();
        ensure!(
            matches!(answer, Ok((true, _))),
            "probe {i} during the flood: {answer:?} after {:?}\nlog:\n{}",
            t.elapsed(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = flood.wait_with_output(Duration::from_secs(30))?;
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let text = agent.metrics_text()?;
    let refused = metric(
        &text,
        "mtls_agent_server_rejections_total",
        &["server=\"health\"", "reason=\"source_limit\""],
    );
    ensure!(refused > 0.0, "no source_limit refusals counted ({out}):\n{text}");
    Ok(())
}

/// The loopback TCP ports `pid` listens on in the host netns.
fn listening_ports(pid: u32) -> Result<HashSet<u16>> {
    let mut inodes = HashSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        let target = std::fs::read_link(e.path()).unwrap_or_default();
        let t = target.to_string_lossy();
        if let Some(i) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
            inodes.insert(i.to_owned());
        }
    }
    let mut ports = HashSet::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))?;
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, state (0A: LISTEN), inode.
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                let port = f[1].rsplit(':').next().unwrap_or_default();
                ports.insert(u16::from_str_radix(port, 16)?);
            }
        }
    }
    Ok(ports)
}

/// `curl` as uid/gid 65534 without groups, as a host-network pod's non-root process runs.
fn curl_as_nobody(args: &[&str]) -> Result<std::process::Output> {
    Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "curl", "-sS", "-m", "5"])
        .args(args)
        .output()
        .context("running setpriv curl")
}

#[test]
fn a_host_network_process_of_another_user_cannot_use_the_admin_api() -> Result<()> {
    // A node name of this test alone: the agent's default socket directory is per node.
    let node = format!("ports-{}", std::process::id());
    let mut m = Mesh::build("strict-ports-admin", NS, &[(node.as_str(), "web")])?;
    let (workloads, _) = m.workloads("workloads", &["web"])?;
    let ca = m.ca("ca")?;
    let mut opts = AgentOptions::new(&node, &workloads);
    opts.ca_dir = Some(ca);
    opts.admin = AdminFlags::Defaults;
    let mut agent = AgentProcess::start(&m.bed, opts)?;
    let pid = agent.pid().context("agent pid")?;
    let dir = Path::new("/run/mtls-agent").join(&node);
    assert_eq!(agent.admin_dir, dir);

    // No admin port: the agent listens on the node only for metrics and health.
    let ports = listening_ports(pid)?;
    let expected: HashSet<u16> = [agent.metrics.port(), agent.health.port()].into();
    ensure!(ports == expected, "the agent listens on {ports:?}, expected only {expected:?}");

    // The socket: 0600 in a 0700 directory.
    let socket = agent.admin_socket().context("socket")?;
    let mode = |p: &Path| -> Result<u32> { Ok(std::fs::metadata(p)?.permissions().mode() & 0o777) };
    ensure!(mode(&dir)? == 0o700, "{}: mode {:o}", dir.display(), mode(&dir)?);
    ensure!(mode(&socket)? == 0o600, "{}: mode {:o}", socket.display(), mode(&socket)?);

    // The attacker: uid 65534 on the host netns, trying the socket and the old TCP default.
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(e2e_tool_path()?)
        .args(["unix-http", "--method", "POST", "--path", "/logging?level=trace", "--socket"])
        .arg(&socket)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !out.status.success() && stdout.contains("error: permission_denied"),
        "uid 65534 and the admin socket: {:?} {stdout}",
        out.status
    );
    let out = curl_as_nobody(&["-X", "POST", "http://127.0.0.1:15000/logging?level=trace"])?;
    ensure!(
        !out.status.success(),
        "uid 65534 reached an admin API on 127.0.0.1:15000: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::thread::sleep(Duration::from_millis(200));
    ensure!(!agent.log().contains("log level changed"), "the log level changed:\n{}", agent.log());

    // Root's CLI needs no address: it finds the ready instance's socket in the node's directory.
    let check = |agent: &AgentProcess| -> Result<()> {
        let out = Command::new(agent_bin())
            .args(["check", &format!("web.{NS}"), "--node", &node, "-o", "json"])
            .output()?;
        ensure!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("web"),
            "mtls-agent check failed: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.log()
        );
        Ok(())
    };
    check(&agent)?;
    // A root POST over the socket works (the socket is the admin API, not a dead end).
    agent.post("/logging?level=info")?;

    // A rolling update: two instances, then the old one's socket is gone with it.
    agent.handover()?;
    // The directory also holds the node's state file of pinned enrollments (enrollments.json).
    let sockets: Vec<_> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_none_or(|n| n != "enrollments.json"))
        .collect();
    ensure!(
        sockets == vec![agent.admin_socket().context("socket")?],
        "sockets after the handover: {sockets:?}"
    );
    check(&agent)?;
    // Without an agent: a clear error that names the directory.
    drop(agent);
    std::fs::create_dir_all(&dir)?;
    let out = Command::new(agent_bin()).args(["certs", "--node", &node]).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(
        !out.status.success()
            && stderr.contains(&format!("no running agent found in {}", dir.display())),
        "{stderr}"
    );
    Ok(())
}

/// A mesh client that keeps its HBONE connection to a pod's tunnel port past its
/// certificate's expiry (a hostile peer's pool would not retire it): its streams opened before
/// are served, new ones after the expiry are refused (403), counted.
#[test]
fn no_new_streams_on_a_tunnel_connection_whose_peer_certificate_has_expired() -> Result<()> {
    use mtls_agent::{
        identity::{client_config, CaSigner, SpiffeId},
        tunnel::hbone,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{rustls::pki_types::ServerName, TlsConnector};

    let mut m =
        Mesh::build("strict-ports-expired", NS, &[("node1", "server"), ("node1", "outsider")])?;
    let (workloads, _) = m.workloads("workloads", &["server"])?;
    let ca = m.ca("ca")?;
    m.start_agent("node1", &workloads, &ca, &[])?;
    let signer = CaSigner::load(&ca).context("loading the mesh CA")?;
    let cert =
        signer.issue(&SpiffeId::new("cluster.local", NS, "tester")?, Duration::from_secs(4))?;
    let cfg = client_config(
        &cert,
        signer.trust_bundle(),
        &SpiffeId::new("cluster.local", NS, "server")?,
    )?;
    let server_ip = std::net::IpAddr::V4(m.bed.pod("server").ip);
    let tunnel = SocketAddr::new(server_ip, 15008);
    let target = SocketAddr::new(server_ip, testbed::mesh::PORT);
    let tcp = m.bed.in_pod_netns("outsider", move || {
        TcpStream::connect_timeout(&tunnel, Duration::from_secs(2))
    })??;
    tcp.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let before = metric(
        &m.agent("node1").metrics_text()?,
        "mtls_agent_rejections_total",
        &["reason=\"peer_cert_expired\""],
    );
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::from_std(tcp)?;
        let tls = TlsConnector::from(cfg).connect(ServerName::from(server_ip), tcp).await?;
        let (mut send, _driver) =
            hbone::client_handshake(tls, &hbone::ClientConfig::default()).await?;
        let echo = |mut s: hbone::HboneStream, msg: &'static str| async move {
            s.write_all(msg.as_bytes()).await?;
            s.shutdown().await?;
            let mut reply = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply)).await??;
            ensure!(reply == format!("server:{msg}").as_bytes(), "reply {reply:?}");
            Ok::<_, anyhow::Error>(())
        };
        echo(hbone::connect_stream(&mut send, target).await?, "fresh").await?;
        // A stream opened before the expiry and used after it is not cut.
        let long = hbone::connect_stream(&mut send, target).await?;
        let wait =
            cert.not_after().duration_since(std::time::SystemTime::now()).unwrap_or_default();
        tokio::time::sleep(wait + Duration::from_millis(1500)).await;
        echo(long, "long-lived").await?;
        match hbone::connect_stream(&mut send, target).await {
            Err(e) if e.status() == Some(http::StatusCode::FORBIDDEN) => Ok(()),
            Err(e) => bail!("a new stream after the expiry failed otherwise: {e}"),
            Ok(_) => bail!("a new stream was opened with an expired peer certificate"),
        }
    })?;
    let agent = m.agent("node1");
    let after = metric(
        &agent.metrics_text()?,
        "mtls_agent_rejections_total",
        &["reason=\"peer_cert_expired\""],
    );
    ensure!(after == before + 1.0, "peer_cert_expired refusals: {before} -> {after}");
    agent.wait_log("the peer's certificate expired at", Duration::from_secs(5))?;
    Ok(())
}

/// Attackers in five pods (five source addresses) open idle connections to one pod's tunnel
/// port: past the per-source and per-pod handshake caps they are closed at once, so the agent
/// keeps its fds and another pod of the node is served throughout; the attacked pod is served
/// again once they are gone.
#[test]
fn attackers_from_many_sources_on_one_pods_tunnel_port_do_not_starve_another_pod() -> Result<()> {
    let attackers = ["att1", "att2", "att3", "att4", "att5"];
    let mut pods = vec![("node1", "client"), ("node1", "victim"), ("node1", "other")];
    pods.extend(attackers.iter().map(|a| ("node1", *a)));
    let mut m = Mesh::build("strict-ports-sources", NS, &pods)?;
    let (workloads, _) = m.workloads("workloads", &["client", "victim", "other"])?;
    let ca = m.ca("ca")?;
    let mut opts = AgentOptions::new("node1", &workloads);
    opts.ca_dir = Some(ca);
    opts.open_files = Some(1024);
    opts.log_filter = Some("info".into());
    let agent = AgentProcess::start(&m.bed, opts)?;
    let tunnel = format!("{}:15008", m.bed.pod("victim").ip);
    let tool = e2e_tool_path()?;
    let mut floods = Vec::new();
    for a in attackers {
        let mut cmd = Command::new(&tool);
        cmd.args(["slow-clients", "--connect", &tunnel, "--count", "300", "--seconds", "20"]);
        floods.push(m.bed.spawn_in_pod(a, cmd)?);
    }
    for f in &floods {
        f.wait_for_stdout(&format!("connected {tunnel} "), Duration::from_secs(20))?;
    }
    let (out, ok) = m.client(
        "client",
        &[
            "--connect",
            &m.dst("other"),
            "--message",
            "hi",
            "--count",
            "10",
            "--timeout-ms",
            "10000",
        ],
    )?;
    ensure!(ok && out.matches("other:hi").count() == 10, "{out}\nagent log:\n{}", agent.log());
    ensure!(agent.readiness()?.0, "not ready during the attack");
    for f in &floods {
        let (open, closed) = held(f, &tunnel)?;
        ensure!(open == 0, "{open} attackers' connections still open ({closed} closed)");
    }
    let text = agent.metrics_text()?;
    for reason in ["handshake_limit_pod", "handshake_limit_source"] {
        let n = metric(&text, "mtls_agent_rejections_total", &[&format!("reason=\"{reason}\"")]);
        ensure!(n > 0.0, "no {reason} refusals counted:\n{text}");
    }
    let (out, ok) = m.client("client", &["--connect", &m.dst("victim"), "--message", "back"])?;
    ensure!(ok && out.contains("victim:back"), "the attacked pod afterwards: {out}");
    Ok(())
}
