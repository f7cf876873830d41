//! Nodes as real clusters have them, for the DaemonSet of deploy/. Runs as root.
//!
//! - A node whose kernel the agent refuses: in Kubernetes mode the agent stays up (no crash
//!   loop), captures nothing, enrolls nothing and says why: a Warning Event on its own pod and
//!   on the Node (on the scripted API server, `testbed::apiserver`), the metric
//!   `mtls_agent_capture_refused`, the body of its readiness probe (Ready: the rollout goes
//!   on) and `mtls-agent check`. This kernel has every feature, so the refusal is forced with
//!   `--min-kernel 99.0`, a hidden flag that exists for this test only.
//! - The same refused version rolled out beside a serving agent (surge): it is NOT Ready, so the
//!   rollout stops there, and the old agent keeps enforcing STRICT and carrying mTLS.
//! - A cgroup v1/hybrid node: the DaemonSet's own arguments (`--cgroup=/host/sys/fs/cgroup`,
//!   read from deploy/daemonset.yaml) work there, the agent finds cgroup v2 below `unified`.
//!   The node is played in the agent's own mount and cgroup namespaces: a tmpfs stands for
//!   the host's /sys/fs/cgroup, with a v1 hierarchy bound in and cgroup v2 mounted at
//!   `unified`, whose root (the cgroup namespace's) is the test's node cgroup, so the agent
//!   attaches there and never to this machine's root.
//! - A cgroup v1-only node (the same without `unified`, and this machine's cgroup2 mounts
//!   unmounted in the agent's mount namespace): refused as a kernel is, reason `cgroup_v1`,
//!   the agent up and Ready, nothing captured.

use std::{
    ffi::CString,
    io::BufRead,
    net::{Ipv4Addr, SocketAddr},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use testbed::{
    agent::{agent_bin, http, AdminFlags, AgentOptions, AgentProcess, CaDir},
    apiserver::{self as api, ApiServer},
    certservice::CaService,
    mesh::{echo_server, PORT},
    Pod, Testbed,
};

const NS: &str = "shop";
const AGENT_NS: &str = "mtls-system";
const AGENT_POD: &str = "mtls-agent-q8v4n";

fn uid(n: u32) -> String {
    format!("{:08x}-7c1e-4d2a-8b3f-{:012x}", std::process::id(), n)
}

fn systemd_cgroup(uid: &str) -> PathBuf {
    let u = uid.replace('-', "_");
    Path::new(&format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"))
        .join("cri-containerd-5d6e7f.scope")
}

fn pod_object(pod: &Pod, uid: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": NS, "uid": uid, "labels": {"app": pod.name}},
        "spec": {"nodeName": node, "serviceAccountName": pod.name,
                 "containers": [{"name": "app", "ports": [{"containerPort": PORT}]}]},
        "status": {"phase": "Running", "podIP": pod.ip.to_string()},
    })
}

/// An API server with the kinds the agent watches, the namespace in the mesh, the pods, and
/// the Events collections of the agent's namespace and of `default` (Node Events).
fn api_server(pods: &[(&Pod, String)], node: &str) -> Result<ApiServer> {
    let server = ApiServer::start()?;
    for path in [api::PODS, api::NAMESPACES, api::SERVICES, api::ENDPOINTSLICES] {
        server.serve(path);
    }
    server.serve(api::PEERAUTHENTICATIONS_V1);
    server.serve(&api::events_path(AGENT_NS));
    server.serve(&api::events_path("default"));
    server.serve(&api::events_path(NS));
    server.apply(api::NAMESPACES, api::namespace(NS, true));
    server.apply(api::NAMESPACES, api::namespace(AGENT_NS, false));
    for (pod, uid) in pods {
        server.apply(api::PODS, pod_object(pod, uid, node));
    }
    Ok(server)
}

fn client(bed: &Testbed, pod: &str, dst: &Pod, message: &str) -> Result<String> {
    let mut cmd = Command::new(testbed::e2e_tool!());
    cmd.args(["client", "--connect", &format!("{}:{PORT}", dst.ip), "--message", message]);
    let out = bed.spawn_in_pod(pod, cmd)?.wait_with_output(Duration::from_secs(30))?;
    ensure!(out.status.success(), "client in {pod}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The Events stored at `path` with `reason`.
fn events(server: &ApiServer, path: &str, reason: &str) -> Vec<Value> {
    server.objects(path).into_iter().filter(|e| e["reason"] == reason).collect()
}

fn wait_events(server: &ApiServer, path: &str, reason: &str) -> Result<Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = events(server, path, reason);
        if !found.is_empty() {
            return Ok(found);
        }
        ensure!(
            Instant::now() < deadline,
            "no {reason} Event at {path}: {:?}",
            server.objects(path)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn on_a_refused_kernel_the_agent_stays_up_captures_nothing_and_says_why() -> Result<()> {
    let mut bed = Testbed::new("k8s-refused")?;
    let node = bed.add_node("n1")?;
    let a = bed.add_pod_in_cgroup("n1", "a", &systemd_cgroup(&uid(1)))?;
    let b = bed.add_pod_in_cgroup("n1", "b", &systemd_cgroup(&uid(2)))?;
    let _servers = [echo_server(&bed, "a")?, echo_server(&bed, "b")?];
    let server = api_server(&[(&a, uid(1)), (&b, uid(2))], "n1")?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;

    let mut opts = AgentOptions::kubernetes("n1", &kubeconfig, &node.cgroup);
    let agent_uid = uid(99);
    opts.extra_args.extend([
        "--agent-namespace".into(),
        AGENT_NS.into(),
        "--pod-name".into(),
        AGENT_POD.into(),
        "--pod-uid".into(),
        agent_uid.clone(),
        // Test only: this kernel has every feature; refuse it as one lacking them.
        "--min-kernel".into(),
        "99.0".into(),
    ]);
    // The Node's Events are refused at first (an API server hiccup): retried until accepted.
    let node_events = api::events_path("default");
    server.fail(&node_events, Some(500));
    // Ready (start waits for it): a refused node must not stall the rollout.
    let mut agent = AgentProcess::start(&bed, opts)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.requests(&node_events) < 2 {
        ensure!(Instant::now() < deadline, "the Node's Event was not retried");
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(events(&server, &node_events, "MeshCaptureRefused").is_empty());
    server.fail(&node_events, None);
    let (ready, detail) = agent.readiness()?;
    ensure!(ready, "{detail}");
    ensure!(detail.contains("capture refused") && detail.contains("needs Linux 99.0"), "{detail}");

    // A Warning Event on its own pod, found by `kubectl describe pod` (by uid)...
    let on_pod = wait_events(&server, &api::events_path(AGENT_NS), "MeshCaptureRefused")?;
    let e = &on_pod[0];
    ensure!(e["type"] == "Warning", "{e}");
    ensure!(
        e["involvedObject"]["kind"] == "Pod" && e["involvedObject"]["name"] == AGENT_POD,
        "{e}"
    );
    ensure!(e["involvedObject"]["uid"] == agent_uid.as_str(), "{e}");
    let message = e["message"].as_str().unwrap_or_default();
    ensure!(message.contains("captures nothing on node n1") && message.contains("99.0"), "{e}");
    // ...and on the Node, in `default`, with the node's name as uid (as the kubelet's).
    let on_node = wait_events(&server, &api::events_path("default"), "MeshCaptureRefused")?;
    let e = &on_node[0];
    ensure!(e["type"] == "Warning" && e["involvedObject"]["kind"] == "Node", "{e}");
    ensure!(e["involvedObject"]["name"] == "n1" && e["involvedObject"]["uid"] == "n1", "{e}");
    // The pod's Event, accepted at once, was not posted again with the Node's retries.
    ensure!(events(&server, &api::events_path(AGENT_NS), "MeshCaptureRefused").len() == 1);

    // The metric, with the test override's own reason: never taken for a kernel's.
    let metrics = agent.metrics_text()?;
    ensure!(
        metrics
            .lines()
            .any(|l| l == r#"mtls_agent_capture_refused{node="n1",reason="min_kernel"} 1"#),
        "{metrics}"
    );

    // The kubelet's exec probe of this container says ready, and why nothing is captured.
    let probe = Command::new(agent_bin())
        .args(["probe", "ready", "--admin-dir"])
        .arg(&agent.admin_dir)
        .output()?;
    let body = String::from_utf8_lossy(&probe.stdout);
    ensure!(probe.status.success(), "probe: {body} {}", String::from_utf8_lossy(&probe.stderr));
    ensure!(body.contains("capture refused"), "{body}");
    // `mtls-agent check` of a pod of the node says why it is not in the mesh.
    let check = Command::new(agent_bin())
        .args(["check", "a.shop", "--admin-dir"])
        .arg(&agent.admin_dir)
        .output()?;
    let said = String::from_utf8_lossy(&check.stderr);
    ensure!(!check.status.success() && said.contains("captures nothing on node n1"), "{said}");

    // Enrolls nothing: no pod was even listed, nothing is pinned, no Event on the tenants'
    // pods, no certificate; the pods talk without the mesh, in plaintext on the wire.
    ensure!(server.requests(api::PODS) == 0, "the refused agent watched pods");
    ensure!(!agent.bpffs.exists(), "{} was made", agent.bpffs.display());
    ensure!(server.objects(&api::events_path(NS)).is_empty(), "Events on tenants' pods");
    ensure!(agent.certs()?.is_empty(), "certificates issued");
    let dump: Value = serde_json::from_str(&agent.get("/config_dump")?)?;
    let refused = dump["captureRefused"].as_str().unwrap_or_default();
    ensure!(refused.contains("captures nothing on node n1"), "{dump}");
    ensure!(dump["workloads"]["workloads"].as_array().is_some_and(Vec::is_empty), "{dump}");
    let capture = bed.start_capture()?;
    let canary = "CANARY-refused-node-61f0";
    ensure!(client(&bed, "a", &b, canary)? == format!("b:{canary}"));
    ensure!(capture.contains(canary.as_bytes()), "the connection did not go in plaintext");
    ensure!(agent.connections()?.is_empty(), "the agent carried a connection");

    // It stays up: no crash loop.
    std::thread::sleep(Duration::from_secs(3));
    ensure!(agent.readiness()?.0, "not ready any more");
    let status = agent.terminate()?;
    ensure!(status.success(), "exit on SIGTERM: {status}; log:\n{}", agent.log());
    Ok(())
}

/// The `agent` container's arguments in deploy/daemonset.yaml, with the host paths of its
/// mounts given as `hosts` (mount path prefix -> where the test has it) and `$(VAR)` expanded
/// from `env`.
fn manifest_args(hosts: &[(&str, &Path)], env: &[(&str, &str)]) -> Result<Vec<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let ds: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;
    let containers =
        ds["spec"]["template"]["spec"]["containers"].as_sequence().context("containers")?;
    let agent = containers.iter().find(|c| c["name"] == "agent").context("container agent")?;
    let args = agent["args"].as_sequence().context("args")?;
    let mut out = Vec::new();
    for a in args {
        let mut a = a.as_str().context("an argument")?.to_owned();
        for (prefix, host) in hosts {
            if let Some((flag, value)) = a.split_once('=') {
                if let Some(rest) = value.strip_prefix(prefix) {
                    a = format!("{flag}={}{rest}", host.display());
                }
            }
        }
        for (k, v) in env {
            a = a.replace(&format!("$({k})"), v);
        }
        out.push(a);
    }
    Ok(out)
}

/// A cgroup directory this test made; removed (bounded retries) when dropped, after the
/// agent in it is gone.
struct CgroupGuard(PathBuf);

impl CgroupGuard {
    fn create(path: PathBuf) -> Result<CgroupGuard> {
        std::fs::create_dir(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(CgroupGuard(path))
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        for _ in 0..250 {
            match std::fs::remove_dir(&self.0) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return,
            }
        }
        eprintln!("cleanup: {} stays busy", self.0.display());
    }
}

/// An agent process in its own mount and cgroup namespaces that show it a hybrid or v1-only
/// node; killed by its PID on drop.
struct NodeAgent {
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    admin: SocketAddr,
    health: SocketAddr,
    metrics: SocketAddr,
}

impl NodeAgent {
    fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().context("not running")?.try_wait()? {
                bail!("mtls-agent exited ({status}); log:\n{}", self.log());
            }
            if let Ok(body) = http(self.health, "GET", "/healthz/ready") {
                return Ok(body);
            }
            ensure!(Instant::now() < deadline, "not ready after {timeout:?}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Which cgroup layout the node has.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// v1 hierarchies and cgroup v2 at `unified`.
    Hybrid,
    /// v1 hierarchies only.
    V1Only,
}

/// Starts `args` as the agent in a hybrid (or v1-only) node's view: moved into `node_cgroup`,
/// a new cgroup namespace there (its root) and a private mount namespace, a tmpfs at
/// `host_cgroup` (the host's /sys/fs/cgroup) holding this machine's `cpu` v1 hierarchy and
/// (hybrid) cgroup v2 at `unified`; then moved into `agent_cgroup` (below the node's, as the
/// agent's pod is).
fn start_on_node(
    layout: Layout,
    args: &[String],
    node_cgroup: &Path,
    agent_cgroup: &Path,
    host_cgroup: &Path,
    [admin, health, metrics]: [SocketAddr; 3],
) -> Result<NodeAgent> {
    let open = |dir: &Path| {
        let p = dir.join("cgroup.procs");
        std::fs::OpenOptions::new().write(true).open(&p).with_context(|| p.display().to_string())
    };
    let (node_procs, agent_procs) = (open(node_cgroup)?, open(agent_cgroup)?);
    let c = |p: &Path| CString::new(p.as_os_str().as_encoded_bytes()).context("a path");
    let (tmpfs_at, unified_at, v1_at) =
        (c(host_cgroup)?, c(&host_cgroup.join("unified"))?, c(&host_cgroup.join("cpu"))?);
    // This machine's `cpu` v1 hierarchy, when it has one (a hybrid machine does).
    let v1_source = Path::new("/sys/fs/cgroup/cpu");
    let v1_from = if v1_source.join("cgroup.procs").exists() { Some(c(v1_source)?) } else { None };
    let (node_fd, agent_fd) = (node_procs.as_raw_fd(), agent_procs.as_raw_fd());
    let hybrid = layout == Layout::Hybrid;
    // A v1-only node has no cgroup2 mount anywhere: this machine's are unmounted in the agent's
    // own mount namespace (deepest first), so the agent sees none.
    let mut cgroup2_mounts = Vec::new();
    if !hybrid {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        for line in mountinfo.lines() {
            let Some((pre, post)) = line.split_once(" - ") else { continue };
            if post.starts_with("cgroup2 ") {
                if let Some(at) = pre.split(' ').nth(4) {
                    cgroup2_mounts.push(c(Path::new(at))?);
                }
            }
        }
        cgroup2_mounts.reverse();
    }
    let mut cmd = Command::new(agent_bin());
    cmd.args(args)
        .env("RUST_LOG", "info,mtls_agent=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec only raw syscalls on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if libc::write(node_fd, b"0".as_ptr().cast(), 1) != 1 {
                return fail();
            }
            if libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWCGROUP) != 0 {
                return fail();
            }
            let none = std::ptr::null();
            let root = c"/".as_ptr();
            if libc::mount(none, root, none, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()) != 0
            {
                return fail();
            }
            for m in &cgroup2_mounts {
                // One below another already detached is gone with it.
                libc::umount2(m.as_ptr(), libc::MNT_DETACH);
            }
            let tmpfs = c"tmpfs".as_ptr();
            if libc::mount(tmpfs, tmpfs_at.as_ptr(), tmpfs, 0, c"mode=755".as_ptr().cast()) != 0 {
                return fail();
            }
            // A v1-only node has no `unified` at all.
            if (hybrid && libc::mkdir(unified_at.as_ptr(), 0o755) != 0)
                || libc::mkdir(v1_at.as_ptr(), 0o755) != 0
            {
                return fail();
            }
            if let Some(from) = &v1_from {
                let bind = libc::MS_BIND;
                if libc::mount(from.as_ptr(), v1_at.as_ptr(), none, bind, std::ptr::null()) != 0 {
                    return fail();
                }
            }
            let cg2 = c"cgroup2".as_ptr();
            if hybrid && libc::mount(cg2, unified_at.as_ptr(), cg2, 0, std::ptr::null()) != 0 {
                return fail();
            }
            if libc::write(agent_fd, b"0".as_ptr().cast(), 1) != 1 {
                return fail();
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting mtls-agent")?;
    drop((node_procs, agent_procs));
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().context("stderr")?;
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(mut l) = sink.lock() {
                if l.len() < 16 << 20 {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        }
    });
    Ok(NodeAgent { child: Some(child), log, admin, health, metrics })
}

/// A node of `layout` on the test bed with pods `a` and `b` in the mesh (STRICT), and the agent
/// started there with the DaemonSet's arguments.
struct NodeRun {
    // Dropped in this order: the agent, its cgroups, the API server, the bed.
    agent: NodeAgent,
    _agent_cgroup: CgroupGuard,
    _pod_cgroup: CgroupGuard,
    server: ApiServer,
    b: Pod,
    bed: Testbed,
    _servers: Vec<testbed::PodProcess>,
    _dir: tempfile::TempDir,
    _service: CaService,
    _ca: CaDir,
}

fn run_on_node(layout: Layout, name: &str) -> Result<NodeRun> {
    let mut bed = Testbed::new(name)?;
    let node = bed.add_node("n1")?;
    let a = bed.add_pod_in_cgroup("n1", "a", &systemd_cgroup(&uid(1)))?;
    let b = bed.add_pod_in_cgroup("n1", "b", &systemd_cgroup(&uid(2)))?;
    let servers = vec![echo_server(&bed, "a")?, echo_server(&bed, "b")?];
    let server = api_server(&[(&a, uid(1)), (&b, uid(2))], "n1")?;
    server.apply(
        api::PEERAUTHENTICATIONS_V1,
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
               "metadata": {"name": "default", "namespace": NS},
               "spec": {"mtls": {"mode": "STRICT"}}}),
    );
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;
    // Where the container has the host's /sys/fs/cgroup (a mount point only: the tmpfs is
    // mounted in the agent's own mount namespace).
    let host_cgroup = dir.path().join("host-sys-fs-cgroup");
    std::fs::create_dir(&host_cgroup)?;
    // The agent's pod and container cgroups, below the node's (removed after the agent).
    let pod_cgroup = CgroupGuard::create(node.cgroup.join("kubepods.slice/mtls-agent-pod.slice"))?;
    let agent_cgroup = CgroupGuard::create(pod_cgroup.0.join("agent"))?;
    let ca = CaDir::init(&format!("{}-{name}", bed.id()), "cluster.local")?;

    let mut args = manifest_args(
        &[("/host/sys/fs/cgroup", host_cgroup.as_path()), ("/host/proc", Path::new("/proc"))],
        &[("TRUST_DOMAIN", "cluster.local")],
    )?;
    // The manifest's cgroup arguments, as they are: the host's cgroup mount.
    for flag in ["--cgroup", "--cgroup-root"] {
        let want = format!("{flag}={}", host_cgroup.display());
        ensure!(
            args.contains(&want),
            "the DaemonSet does not pass {flag}=/host/sys/fs/cgroup: {args:?}"
        );
    }
    // As in the manifest, certificates from a certificate service (the test's own, in file
    // mode: no API server here can review tokens for it); what differs on the test bed is
    // where it is, the ports, pin and socket directories.
    let placement = dir.path().join("placement.yaml");
    std::fs::write(
        &placement,
        format!(
            "workloads:\n- {{name: a, namespace: {NS}, serviceAccount: a, ip: {}, node: n1}}\n\
             - {{name: b, namespace: {NS}, serviceAccount: b, ip: {}, node: n1}}\n",
            bed.pod("a").ip,
            bed.pod("b").ip
        ),
    )?;
    let service = CaService::start(&format!("{}-{name}", bed.id()), &ca.path, &placement, &["n1"])?;
    let port = || -> SocketAddr { (Ipv4Addr::LOCALHOST, testbed::free_loopback_port()).into() };
    let (admin, health, metrics) = (port(), port(), port());
    for flag in ["--ca-address=", "--ca-token-file=", "--ca-root="] {
        ensure!(
            args.iter().any(|a| a.starts_with(flag)),
            "the DaemonSet passes no {flag}: {args:?}"
        );
    }
    ensure!(
        !args.iter().any(|a| a.starts_with("--ca-dir")),
        "the DaemonSet signs on the node: {args:?}"
    );
    args.retain(|a| {
        !["--ca-address=", "--ca-token-file=", "--ca-root=", "--health=", "--metrics="]
            .iter()
            .any(|f| a.starts_with(f))
    });
    let ca_flags = service.agent_args("n1");
    args.extend(ca_flags.chunks(2).map(|kv| format!("{}={}", kv[0], kv[1])));
    args.extend([
        format!("--health={health}"),
        format!("--metrics={metrics}"),
        format!("--admin={admin}"),
        format!("--admin-dir={}", dir.path().join("admin").display()),
        format!("--bpffs={}", bed.bpffs_dir("n1").display()),
        format!("--kubeconfig={}", kubeconfig.display()),
        "--node=n1".into(),
        format!("--agent-namespace={AGENT_NS}"),
        format!("--pod-name={AGENT_POD}"),
    ]);
    let addrs = [admin, health, metrics];
    let agent = start_on_node(layout, &args, &node.cgroup, &agent_cgroup.0, &host_cgroup, addrs)?;
    Ok(NodeRun {
        agent,
        _agent_cgroup: agent_cgroup,
        _pod_cgroup: pod_cgroup,
        server,
        b,
        bed,
        _servers: servers,
        _dir: dir,
        _service: service,
        _ca: ca,
    })
}

#[test]
fn the_daemonsets_arguments_work_on_a_hybrid_cgroup_node() -> Result<()> {
    let mut run = run_on_node(Layout::Hybrid, "k8s-hybrid")?;
    let agent = &mut run.agent;
    let ready = agent.wait_ready(Duration::from_secs(30))?;
    ensure!(ready.contains("2 of 2 pods enrolled"), "{ready}; log:\n{}", agent.log());
    ensure!(agent.log().contains("using the cgroup v2 hierarchy below it"), "{}", agent.log());

    // Captured and carried in mutual TLS, nothing in plaintext on the wire.
    let capture = run.bed.start_capture()?;
    let canary = "CANARY-hybrid-node-2b7d";
    ensure!(client(&run.bed, "a", &run.b, canary)? == format!("b:{canary}"));
    ensure!(!capture.contains(canary.as_bytes()), "plaintext on the fabric");
    let conns: Vec<Value> = serde_json::from_str(&http(run.agent.admin, "GET", "/connections")?)?;
    let inbound = conns
        .iter()
        .find(|c| c["direction"] == "inbound" && c["destinationPod"] == "b.shop")
        .with_context(|| format!("no inbound connection to b: {conns:?}"))?;
    ensure!(inbound["mode"] == "mTLS", "{inbound}");
    ensure!(inbound["peerIdentity"] == "spiffe://cluster.local/ns/shop/sa/a", "{inbound}");
    Ok(())
}

/// A v1-only node has no cgroup v2 for the programs: the agent refuses it as it refuses a
/// kernel, staying up with the reason `cgroup_v1`.
#[test]
fn on_a_cgroup_v1_only_node_the_agent_stays_up_and_says_why() -> Result<()> {
    let mut run = run_on_node(Layout::V1Only, "k8s-v1only")?;
    let ready = run.agent.wait_ready(Duration::from_secs(30))?;
    ensure!(ready.contains("capture refused") && ready.contains("cgroup v1-only node"), "{ready}");
    let on_node = wait_events(&run.server, &api::events_path("default"), "MeshCaptureRefused")?;
    ensure!(on_node[0]["involvedObject"]["name"] == "n1", "{}", on_node[0]);
    let on_pod = wait_events(&run.server, &api::events_path(AGENT_NS), "MeshCaptureRefused")?;
    ensure!(on_pod[0]["involvedObject"]["name"] == AGENT_POD, "{}", on_pod[0]);
    let metrics = http(run.agent.metrics, "GET", "/metrics")?;
    ensure!(
        metrics
            .lines()
            .any(|l| l == r#"mtls_agent_capture_refused{node="n1",reason="cgroup_v1"} 1"#),
        "{metrics}"
    );
    // Nothing captured: the STRICT pods of this node talk in plaintext, as if no agent ran.
    ensure!(run.server.requests(api::PODS) == 0, "the refused agent watched pods");
    let capture = run.bed.start_capture()?;
    let canary = "CANARY-v1-node-93ac";
    ensure!(client(&run.bed, "a", &run.b, canary)? == format!("b:{canary}"));
    ensure!(capture.contains(canary.as_bytes()), "the connection did not go in plaintext");
    std::thread::sleep(Duration::from_secs(2));
    ensure!(run.agent.wait_ready(Duration::from_secs(1)).is_ok(), "{}", run.agent.log());
    Ok(())
}

/// Unique to this test: both instances use the node's default socket directory,
/// /run/mtls-agent/<node>, shared as the DaemonSet's hostPath is.
const SURGE_NODE: &str = "nodes-surge";

/// `mtls-agent probe ready --node SURGE_NODE` run in `cgroup`, as the kubelet execs it in the
/// container: (exit 0, stdout and stderr).
fn probe_ready_in(bed: &Testbed, cgroup: &Path) -> Result<(bool, String)> {
    let mut cmd = Command::new(agent_bin());
    cmd.args(["probe", "ready", "--node", SURGE_NODE]);
    let out = bed
        .spawn_in_node_cgroup(SURGE_NODE, cgroup, cmd)?
        .wait_with_output(Duration::from_secs(10))?;
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text.trim().to_owned()))
}

/// A surge rollout onto a kernel the new version refuses: the new instance must not be Ready
/// (the kubelet would then delete the serving one and the node lose its mesh); the old one
/// keeps enforcing STRICT against a plaintext attacker and carrying mTLS.
#[test]
fn a_refused_instance_beside_a_serving_one_is_not_ready_and_the_old_keeps_serving() -> Result<()> {
    let mut bed = Testbed::new("k8s-refused-surge")?;
    let node = bed.add_node(SURGE_NODE)?;
    let a = bed.add_pod_in_cgroup(SURGE_NODE, "a", &systemd_cgroup(&uid(1)))?;
    let b = bed.add_pod_in_cgroup(SURGE_NODE, "b", &systemd_cgroup(&uid(2)))?;
    // Not in the API server: a plaintext client of the node that the mesh does not know.
    bed.add_pod(SURGE_NODE, "outsider")?;
    let _servers = [echo_server(&bed, "a")?, echo_server(&bed, "b")?];
    let server = api_server(&[(&a, uid(1)), (&b, uid(2))], SURGE_NODE)?;
    server.apply(
        api::PEERAUTHENTICATIONS_V1,
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
               "metadata": {"name": "default", "namespace": NS},
               "spec": {"mtls": {"mode": "STRICT"}}}),
    );
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;
    let ca = CaDir::init(&format!("{}-surge", bed.id()), "cluster.local")?;
    let options = |container: &str| {
        let mut o = AgentOptions::kubernetes(SURGE_NODE, &kubeconfig, &node.cgroup);
        o.ca_dir = Some(ca.path.clone());
        o.admin = AdminFlags::Defaults;
        o.cgroup = Some(node.cgroup.join(container));
        o
    };
    let (old_cg, new_cg) = (node.cgroup.join("agent-old"), node.cgroup.join("agent-new"));

    let old = AgentProcess::start(&bed, options("agent-old"))?;
    let (ok, text) = probe_ready_in(&bed, &old_cg)?;
    ensure!(ok && text.contains("2 of 2 pods enrolled"), "old instance: {text}");
    // A serving agent exports the gauge too, 0: an alert sees every node.
    let metrics = old.metrics_text()?;
    let want = format!(r#"mtls_agent_capture_refused{{node="{SURGE_NODE}",reason="none"}} 0"#);
    ensure!(metrics.lines().any(|l| l == want), "{metrics}");

    // The new version, refusing this kernel (test override), started beside it.
    let mut opts = options("agent-new");
    opts.extra_args.extend(["--min-kernel".into(), "99.0".into()]);
    let new = AgentProcess::start_unready(&bed, opts)?;
    let (ok, text) = probe_ready_in(&bed, &new_cg)?;
    ensure!(!ok, "the refused instance is Ready beside a serving one: {text}");
    ensure!(
        text.contains("capture refused") && text.contains("another agent instance serves"),
        "{text}"
    );
    let (ok, text) = probe_ready_in(&bed, &old_cg)?;
    ensure!(ok && text.contains("2 of 2 pods enrolled"), "old instance: {text}");

    // The old instance still serves: STRICT refuses the outsider's plaintext...
    let mut cmd = Command::new(testbed::e2e_tool!());
    cmd.args(["client", "--connect", &format!("{}:{PORT}", b.ip), "--message", "x"]);
    cmd.args(["--timeout-ms", "2000"]);
    let out = bed.spawn_in_pod("outsider", cmd)?.wait_with_output(Duration::from_secs(30))?;
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(!out.status.success() && !said.contains("b:x"), "plaintext reached b: {said}");
    // ...and carries a's connection to b in mTLS.
    let capture = bed.start_capture()?;
    let canary = "CANARY-refused-surge-7c41";
    ensure!(client(&bed, "a", &b, canary)? == format!("b:{canary}"));
    ensure!(!capture.contains(canary.as_bytes()), "plaintext on the fabric");
    let conns = old.connections()?;
    ensure!(
        conns.iter().any(|c| c["direction"] == "inbound"
            && c["destinationPod"] == "b.shop"
            && c["mode"] == "mTLS"),
        "{conns:?}"
    );

    // Still not ready a while later: nothing changed on the node.
    std::thread::sleep(Duration::from_secs(1));
    let (ok, text) = probe_ready_in(&bed, &new_cg)?;
    ensure!(!ok, "{text}");
    // Drop order: the new agent, then the old one (last, it removes the shared directory).
    drop(new);
    drop(old);
    Ok(())
}
