//! `bench --scale 1000,10000,150000`: what the agent costs as the cluster grows, in
//! Kubernetes mode against the scripted stand-in API server (`testbed::apiserver`, it says it
//! is a stand-in; there is no cluster here).
//!
//! Per size N: N pods (30 of them on this agent's node: real test-bed pods, enrolled for real;
//! the others spread over 4,999 other nodes), N/15 Services (10,000 at 150,000 pods) with one
//! EndpointSlice each, over N/500 namespaces, all labelled ambient, pod objects shaped and
//! sized like real ones (labels, owner references, two containers, status with conditions:
//! about 6 KB of JSON each, printed per run; `pod-template-hash` is the ReplicaSet's, shared
//! by the pods of one Deployment revision, as in a cluster). Reported: the agent's RSS after the initial sync (VmRSS, peak
//! VmHWM), the initial sync time (start to ready with every local pod enrolled), the p50/p99 of
//! "pod event -> enforced" under a rollout-sized burst (5% of the remote pods replaced, with
//! their EndpointSlices, within 5 s; enforced = the agent's workload set in force answers the
//! new pod at its address, or nothing at the old one, polled through the admin API's
//! `/debug/destinations`), and new-connection p50/p99 (client pod to server pod of this node,
//! through the agent) idle and during the burst, in the same run: the same client and server
//! pods, the same tool, one connection at a time, 400 idle, then as many as the burst lasts.
//! The burst's objects are built before the idle connections, so that during the burst the
//! bench only hands them to the stand-in (which serialises each once per watch) and its own
//! JSON building is not what slows the agent down.
//!
//! Every step is bounded in time; the agent is killed (by its PID) if its RSS passes
//! `--scale-max-rss-mib`, so a runaway agent cannot take the machine down.

use std::{
    collections::{BTreeMap, VecDeque},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use testbed::{
    agent::{AgentOptions, AgentProcess},
    apiserver::{self as api, ApiServer},
    PodProcess, Testbed,
};

use super::{check_interrupted, percentile, wait_listening, TempDir, ECHO_PORT, MIB};

/// Pods on this agent's node, all of them real test-bed pods.
const LOCAL_PODS: usize = 30;
const NODES: usize = 5000;
/// Pods per Deployment, each Deployment with its Service and EndpointSlice.
const PODS_PER_SERVICE: usize = 15;
const PODS_PER_NAMESPACE: usize = 500;
const LOCAL_NS: &str = "scale-local";
/// Share of the remote pods a burst replaces, and the time it takes.
const BURST_SHARE: f64 = 0.05;
const BURST: Duration = Duration::from_secs(5);
/// How long the burst's events may take to be enforced before they count as lost.
const ENFORCE_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(10);
const CONNS_IDLE: u64 = 400;
const PROBE_BATCH: usize = 200;

/// A burst event: when it was made, the address, and the uid the agent must know there
/// (`None`: a deletion, nothing must be known there).
type Event = (Instant, Ipv4Addr, Option<String>);
type Pending = Mutex<VecDeque<Event>>;

/// What one size measured.
#[derive(Debug, Default, Clone)]
struct Row {
    pods: usize,
    services: usize,
    sync_s: Option<f64>,
    rss_mib: Option<f64>,
    hwm_mib: Option<f64>,
    rss_after_burst_mib: Option<f64>,
    events: usize,
    enforced: usize,
    event_p50_ms: Option<f64>,
    event_p99_ms: Option<f64>,
    idle_p50_us: Option<f64>,
    idle_p99_us: Option<f64>,
    burst_p50_us: Option<f64>,
    burst_p99_us: Option<f64>,
    note: String,
}

pub fn run(exe: &Path, sizes: &[usize], max_rss_mib: u64, out: Option<PathBuf>) -> Result<()> {
    ensure!(!sizes.is_empty(), "--scale: no sizes");
    for &n in sizes {
        ensure!(
            (LOCAL_PODS + PODS_PER_SERVICE..=1_000_000).contains(&n),
            "--scale {n}: between {} and 1000000 pods",
            LOCAL_PODS + PODS_PER_SERVICE
        );
    }
    // An agent given by the caller (a profiler's wrapper script) is kept.
    if std::env::var_os("MTLS_AGENT_BIN").is_none() {
        let agent = exe.with_file_name("mtls-agent");
        ensure!(agent.is_file(), "{} is missing: run `cargo xtask bench`", agent.display());
        std::env::set_var("MTLS_AGENT_BIN", &agent);
    }
    // What a killed earlier run left (only beds whose process is gone).
    let _ = testbed::cleanup_stale();
    let mut rows = Vec::new();
    for &n in sizes {
        check_interrupted()?;
        println!("== scale: {n} pods");
        let mut row = Row { pods: n, services: services_of(n), ..Row::default() };
        if let Err(e) = one_size(exe, n, max_rss_mib, &mut row) {
            row.note = format!("{e:#}");
            eprintln!("   {n} pods: {}", row.note);
        }
        print_row(&row);
        rows.push(row);
    }
    print_table(&rows);
    let out = match out {
        Some(p) => p,
        None => exe
            .parent()
            .and_then(Path::parent)
            .context("cannot place target/bench next to the executable")?
            .join("bench/scale.json"),
    };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let json: Vec<Value> = rows.iter().map(row_json).collect();
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("   written to {}", out.display());
    Ok(())
}

fn services_of(n: usize) -> usize {
    (n - LOCAL_PODS) / PODS_PER_SERVICE
}

fn namespaces_of(n: usize) -> usize {
    (n / PODS_PER_NAMESPACE).max(2)
}

/// A uid in the API server's format, distinct per pod and generation.
fn uid(generation: u32, i: usize) -> String {
    format!("{:08x}-5e3a-4c1d-{generation:04x}-{i:012x}", std::process::id())
}

/// Remote pod addresses: 100.64.0.0/10, outside the test bed's 10.64-10.191 subnets; a
/// burst's replacements come from the upper half.
fn remote_ip(generation: u32, i: usize) -> Ipv4Addr {
    let i = u32::try_from(i).unwrap_or(u32::MAX) & 0x1f_ffff;
    Ipv4Addr::from(0x6440_0000 | (generation & 1) << 21 | i)
}

fn vip(s: usize) -> Ipv4Addr {
    Ipv4Addr::from(0xac14_0000 | (u32::try_from(s).unwrap_or(0) & 0xffff))
}

/// Remote pod `i`: its deployment, namespace and node.
struct Placement {
    deploy: usize,
    ns: String,
    node: String,
}

fn placement(n: usize, i: usize) -> Placement {
    let deploy = i / PODS_PER_SERVICE;
    Placement {
        deploy,
        ns: format!("tenant-{:03}", deploy % namespaces_of(n)),
        node: format!("node-{:04}", 1 + i % (NODES - 1)),
    }
}

/// A pod object as a ReplicaSet's pod looks from the API server (without managedFields):
/// about 6 KB of JSON (5.9 KB), within the 3-6 KB of real pods. `hash`: the
/// `pod-template-hash` label, which is the ReplicaSet's: one value for every pod of a
/// Deployment's revision, as the Deployment controller writes it.
#[allow(clippy::too_many_arguments)]
fn pod_json(
    name: &str,
    ns: &str,
    app: &str,
    uid: &str,
    hash: &str,
    node: &str,
    ip: Ipv4Addr,
    sa: &str,
) -> Value {
    let container = |cname: &str, image: &str, port: u16| {
        json!({
            "name": cname, "image": format!("registry.example.com/{ns}/{image}:1.24.{}", port % 7),
            "imagePullPolicy": "IfNotPresent",
            "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
            "env": [
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}},
                {"name": "LOG_LEVEL", "value": "info"},
                {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector.observability:4317"}
            ],
            "resources": {"limits": {"cpu": "500m", "memory": "512Mi"}, "requests": {"cpu": "100m", "memory": "128Mi"}},
            "readinessProbe": {"httpGet": {"path": "/ready", "port": port, "scheme": "HTTP"},
                               "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
            "livenessProbe": {"httpGet": {"path": "/live", "port": port, "scheme": "HTTP"},
                              "initialDelaySeconds": 10, "periodSeconds": 10, "timeoutSeconds": 1, "failureThreshold": 3},
            "volumeMounts": [{"name": "kube-api-access", "readOnly": true,
                              "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"},
                             {"name": "config", "mountPath": "/etc/app"}],
            "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
            "securityContext": {"allowPrivilegeEscalation": false, "runAsNonRoot": true,
                                "capabilities": {"drop": ["ALL"]}}
        })
    };
    let status = |cname: &str, image: &str| {
        json!({"name": cname, "ready": true, "restartCount": 0, "started": true,
               "image": format!("registry.example.com/{ns}/{image}:1.24.0"),
               "imageID": format!("registry.example.com/{ns}/{image}@sha256:{hash}{hash}{hash}{hash}{hash}{hash}0000"),
               "containerID": format!("containerd://{hash}{hash}{hash}{hash}{hash}{hash}0000"),
               "state": {"running": {"startedAt": "2026-12-01T08:00:00Z"}}, "lastState": {}})
    };
    let cond = |t: &str| {
        json!({"type": t, "status": "True", "lastProbeTime": null,
                                "lastTransitionTime": "2026-12-01T08:00:05Z"})
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns, "uid": uid, "creationTimestamp": "2026-12-01T08:00:00Z",
            "generateName": format!("{app}-{hash}-"),
            "labels": {"app": app, "app.kubernetes.io/name": app, "app.kubernetes.io/part-of": ns,
                       "pod-template-hash": hash, "version": "v1",
                       "service.istio.io/canonical-name": app, "service.istio.io/canonical-revision": "v1"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-12-01T07:59:00Z",
                            "prometheus.io/scrape": "true", "prometheus.io/port": "9090"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-{hash}"),
                                 "uid": uid, "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            "nodeName": node, "serviceAccountName": sa, "serviceAccount": sa,
            "containers": [container("app", app, 8080), container("log-shipper", "fluent-bit", 2020)],
            "volumes": [{"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
                            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}},
                        {"name": "config", "configMap": {"name": format!("{app}-config"), "defaultMode": 420}}],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler", "priority": 0, "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority", "securityContext": {"fsGroup": 2000},
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
        },
        "status": {
            "phase": "Running", "hostIP": "192.168.10.20", "hostIPs": [{"ip": "192.168.10.20"}],
            "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
            "startTime": "2026-12-01T08:00:00Z", "qosClass": "Burstable",
            "conditions": [cond("PodReadyToStartContainers"), cond("Initialized"), cond("Ready"),
                           cond("ContainersReady"), cond("PodScheduled")],
            "containerStatuses": [status("app", app), status("log-shipper", "fluent-bit")]
        }
    })
}

fn remote_pod(n: usize, generation: u32, i: usize) -> Value {
    let p = placement(n, i);
    let app = format!("svc-{:05}", p.deploy);
    let name = format!("{app}-{generation}x{i:06}");
    // A replaced pod is of the Deployment's next revision (a new ReplicaSet).
    let hash = format!("{:05x}{generation:05x}", p.deploy);
    let (uid, ip) = (uid(generation, i), remote_ip(generation, i));
    pod_json(&name, &p.ns, &app, &uid, &hash, &p.node, ip, &app)
}

fn service_json(n: usize, s: usize) -> Value {
    let ns = placement(n, s * PODS_PER_SERVICE).ns;
    let app = format!("svc-{s:05}");
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": app, "namespace": ns, "uid": uid(0xffff, s),
                     "labels": {"app": app}},
        "spec": {"type": "ClusterIP", "clusterIP": vip(s).to_string(), "clusterIPs": [vip(s).to_string()],
                 "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "selector": {"app": app},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
                 "sessionAffinity": "None", "internalTrafficPolicy": "Cluster"}
    })
}

/// The EndpointSlice of service `s`, with the generation of each of its pods.
fn slice_json(n: usize, s: usize, generations: &[u32]) -> Value {
    let ns = placement(n, s * PODS_PER_SERVICE).ns;
    let app = format!("svc-{s:05}");
    let endpoints: Vec<Value> = (s * PODS_PER_SERVICE..(s + 1) * PODS_PER_SERVICE)
        .filter(|i| *i < n - LOCAL_PODS)
        .map(|i| {
            let g = generations.get(i).copied().unwrap_or(0);
            json!({"addresses": [remote_ip(g, i).to_string()],
                   "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": placement(n, i).node,
                   "targetRef": {"kind": "Pod", "namespace": ns, "name": format!("{app}-{g}x{i:06}"), "uid": uid(g, i)}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": format!("{app}-abcde"), "namespace": ns,
                     "labels": {"kubernetes.io/service-name": app,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": app,
                                          "uid": uid(0xffff, s), "controller": true, "blockOwnerDeletion": true}]},
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

/// Rough bytes the stand-in and the agent need at `n` pods: the stand-in keeps every object as
/// a JSON value (lists are answered in pages), the agent holds what it read (1.7 GiB RSS at
/// 150,000 pods). Before lists were paged, 150,000 pods took this bench past 20 GB. A size
/// the machine cannot hold is skipped, not tried.
fn memory_needed(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX).saturating_mul(40 << 10)
}

/// Below this much available memory the agent is killed and the size reported failed, so
/// that the machine (shared) never runs out.
const MEMORY_FLOOR: u64 = 3 << 30;

fn mem_available() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no MemAvailable")?;
    Ok(kb * 1024)
}

/// (VmRSS, VmHWM) in MiB.
fn memory_of(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<f64> {
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        Ok(kb * 1024.0 / MIB)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Kills the agent (by its PID) if its RSS passes the cap; stops when dropped.
struct RssGuard {
    stop: Arc<AtomicBool>,
    tripped: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssGuard {
    fn start(pid: u32, cap_mib: u64) -> RssGuard {
        let stop = Arc::new(AtomicBool::new(false));
        let tripped = Arc::new(AtomicU64::new(0));
        let (s, t) = (stop.clone(), tripped.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let low = mem_available().is_ok_and(|m| m < MEMORY_FLOOR);
                if let Ok((rss, _)) = memory_of(pid) {
                    if rss > cap_mib as f64 || low {
                        t.store(rss as u64, Ordering::Relaxed);
                        // Our own child, by its PID.
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                        return;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssGuard { stop, tripped, thread: Some(thread) }
    }

    fn check(&self) -> Result<()> {
        let rss = self.tripped.load(Ordering::Relaxed);
        if rss > 0 {
            bail!(
                "the agent was killed at {rss} MiB RSS: past --scale-max-rss-mib, or the \
                 machine had less than {} MiB available",
                MEMORY_FLOOR >> 20
            );
        }
        Ok(())
    }
}

impl Drop for RssGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn systemd_cgroup(uid: &str) -> PathBuf {
    let u = uid.replace('-', "_");
    Path::new(&format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"))
        .join("cri-containerd-0a1b2c.scope")
}

fn one_size(exe: &Path, n: usize, max_rss_mib: u64, row: &mut Row) -> Result<()> {
    let need = memory_needed(n);
    let avail = mem_available()?;
    if need.saturating_add(MEMORY_FLOOR) > avail {
        bail!("skipped: needs about {} MiB of memory, {} MiB available", need >> 20, avail >> 20);
    }
    let t = Instant::now();
    let mut bed = Testbed::new(&format!("scale{n}"))?;
    let node = bed.add_node("n1")?;
    let mut local = Vec::new();
    let mut procs: Vec<PodProcess> = Vec::new();
    for k in 0..LOCAL_PODS {
        let name = match k {
            0 => "server".to_owned(),
            1 => "client".to_owned(),
            _ => format!("local-{k:02}"),
        };
        let u = uid(0xfffe, k);
        let pod = bed.add_pod_in_cgroup("n1", &name, &systemd_cgroup(&u))?;
        let cmd = if k == 0 {
            let mut c = Command::new(exe);
            c.args([
                "echo-server",
                "--listen",
                &format!("0.0.0.0:{ECHO_PORT}"),
                "--max-seconds",
                "3600",
            ]);
            c
        } else {
            let mut c = Command::new("sleep");
            c.arg("3600");
            c
        };
        let mut p = bed.spawn_in_pod(&name, cmd)?;
        if k == 0 {
            wait_listening(&mut p, ECHO_PORT)?;
        }
        procs.push(p);
        local.push((name, u, pod.ip));
    }
    let server_addr = SocketAddr::new(IpAddr::V4(local[0].2), ECHO_PORT);

    let server = ApiServer::start()?;
    for path in [
        api::PODS,
        api::NAMESPACES,
        api::SERVICES,
        api::ENDPOINTSLICES,
        api::PEERAUTHENTICATIONS_V1,
    ] {
        server.serve(path);
    }
    server.serve(&api::events_path(LOCAL_NS));
    let mut namespaces = vec![api::namespace(LOCAL_NS, true)];
    namespaces
        .extend((0..namespaces_of(n)).map(|j| api::namespace(&format!("tenant-{j:03}"), true)));
    server.apply_many(api::NAMESPACES, namespaces);
    server.apply(
        api::PEERAUTHENTICATIONS_V1,
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
               "metadata": {"name": "default", "namespace": LOCAL_NS},
               "spec": {"mtls": {"mode": "STRICT"}}}),
    );
    let remote = n - LOCAL_PODS;
    let local_objects = local.iter().map(|(name, u, ip)| {
        // Each local pod is a Deployment of its own.
        pod_json(name, LOCAL_NS, name, u, &u[u.len() - 10..], "n1", *ip, name)
    });
    server.apply_many(api::PODS, local_objects.chain((0..remote).map(|i| remote_pod(n, 0, i))));
    let services = services_of(n);
    let generations = vec![0u32; remote];
    server.apply_many(api::SERVICES, (0..services).map(|s| service_json(n, s)));
    server.apply_many(api::ENDPOINTSLICES, (0..services).map(|s| slice_json(n, s, &generations)));
    println!(
        "   cluster: {} pods ({} on this node), {} services and slices, {} namespaces, {} nodes; built in {:.1}s",
        server.count(api::PODS),
        LOCAL_PODS,
        services,
        namespaces_of(n) + 1,
        NODES,
        t.elapsed().as_secs_f64()
    );
    let sample = serde_json::to_string(&remote_pod(n, 0, 0))?.len();
    println!("   a pod object: {sample} bytes of JSON");

    let dir = TempDir::new(&format!("scale{n}"))?;
    let kubeconfig = dir.0.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;
    let mut opts = AgentOptions::kubernetes("n1", &kubeconfig, &node.cgroup);
    opts.log_filter = Some("warn".into());
    let started = Instant::now();
    let agent = AgentProcess::start_unready(&bed, opts)?;
    let pid = agent.pid().context("agent not running")?;
    let guard = RssGuard::start(pid, max_rss_mib);
    let sync_deadline = started + Duration::from_secs(900);
    let want = format!("{LOCAL_PODS} of {LOCAL_PODS} pods enrolled");
    loop {
        check_interrupted()?;
        guard.check()?;
        if let Ok((true, detail)) = agent.readiness() {
            if detail.contains(&want) {
                break;
            }
        }
        ensure!(Instant::now() < sync_deadline, "not ready with {want} after 900s");
        std::thread::sleep(Duration::from_millis(20));
    }
    row.sync_s = Some(started.elapsed().as_secs_f64());
    // What it holds once settled, not a transient of the last snapshot.
    std::thread::sleep(Duration::from_secs(2));
    let (rss, hwm) = memory_of(pid)?;
    (row.rss_mib, row.hwm_mib) = (Some(rss), Some(hwm));
    println!(
        "   synced in {:.1}s; RSS {rss:.0} MiB (peak {hwm:.0} MiB)",
        row.sync_s.unwrap_or_default()
    );

    // Idle: new connections, client pod to server pod, both enrolled here.
    let conns = |count: u64, seconds: f64| -> Result<Value> {
        let mut c = Command::new(exe);
        c.args(["conns", "--connect", &server_addr.to_string(), "--workers", "1"]);
        c.args(["--count", &count.to_string(), "--seconds", &seconds.to_string()]);
        let p = bed.spawn_in_pod("client", c)?;
        let out = p.wait_with_output(Duration::from_secs_f64(seconds + 30.0))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "conns: {} {}",
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let line =
            stdout.lines().find_map(|l| l.strip_prefix("result ")).context("conns: no result")?;
        Ok(serde_json::from_str(line)?)
    };
    // The burst: 5% of the remote pods replaced (delete, then the new pod on the same node with
    // a new name, uid and address) and their slices updated, paced over BURST. Its objects are
    // made now, before the idle measurement, so that during the burst the bench only hands
    // them to the stand-in: building 7,500 pods' JSON then would take CPU from the agent it
    // measures, and the burst would overrun its 5 s.
    let count = ((remote as f64 * BURST_SHARE) as usize).max(1);
    let step = (remote / count).max(1);
    let victims: Vec<usize> = (0..count).map(|k| (k * step) % remote).collect();
    let plan = burst_plan(n, &victims, generations);

    conns(20, 10.0).context("warm-up connections")?;
    let idle = conns(CONNS_IDLE, 20.0).context("idle connections")?;
    row.idle_p50_us = idle["p50_us"].as_f64();
    row.idle_p99_us = idle["p99_us"].as_f64();
    let events: Arc<Pending> = Arc::default();
    let done: Arc<Mutex<Vec<f64>>> = Arc::default();
    let finished = Arc::new(AtomicBool::new(false));
    let prober = {
        let (events, done, finished) = (events.clone(), done.clone(), finished.clone());
        let admin = agent.admin;
        std::thread::spawn(move || probe_events(admin, &events, &done, &finished))
    };
    let burst_conns = std::thread::scope(|scope| -> Result<Value> {
        // Connections started while the burst is applied; one stalled past the tool's I/O
        // timeout (5 s) fails, and none succeeding is said in the table.
        let during = scope.spawn(|| conns(100_000, BURST.as_secs_f64()));
        let t0 = Instant::now();
        for (k, step) in plan.into_iter().enumerate() {
            let at = t0 + BURST.mul_f64(k as f64 / count as f64);
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let i = step.i;
            ensure!(
                server.delete(api::PODS, Some(&step.ns), &step.old),
                "no pod {} to delete",
                step.old
            );
            push(&events, remote_ip(0, i), None);
            server.apply(api::PODS, step.pod);
            push(&events, remote_ip(1, i), Some(step.uid));
            if let Some(slice) = step.slice {
                server.apply(api::ENDPOINTSLICES, slice);
            }
        }
        println!("   burst: {count} pods replaced in {:.1}s", t0.elapsed().as_secs_f64());
        during.join().map_err(|_| anyhow::anyhow!("conns thread panicked"))?
    });
    finished.store(true, Ordering::Relaxed);
    prober.join().map_err(|_| anyhow::anyhow!("prober panicked"))??;
    guard.check()?;
    match burst_conns {
        Ok(burst) => {
            row.burst_p50_us = burst["p50_us"].as_f64();
            row.burst_p99_us = burst["p99_us"].as_f64();
        }
        // No connection made it through: said in the table, the other figures still count.
        Err(e) => row.note = format!("connections during the burst: {e:#}"),
    }
    let mut lat = done.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    lat.sort_by(f64::total_cmp);
    row.events = 2 * count;
    row.enforced = lat.len();
    row.event_p50_ms = (!lat.is_empty()).then(|| percentile(&lat, 0.5));
    row.event_p99_ms = (!lat.is_empty()).then(|| percentile(&lat, 0.99));
    row.rss_after_burst_mib = Some(memory_of(pid)?.0);
    row.hwm_mib = Some(memory_of(pid)?.1);
    drop(guard);
    drop(agent);
    drop(procs);
    Ok(())
}

/// One replacement of the burst, made before it starts.
struct BurstStep {
    i: usize,
    ns: String,
    /// The name of the pod it deletes.
    old: String,
    /// The new pod, and its uid.
    pod: Value,
    uid: String,
    /// The EndpointSlice of its service with the new pod in it (`None`: it has no service).
    slice: Option<Value>,
}

/// The burst's objects, in the order it sends them: each victim's new pod, and its service's
/// slice with every pod replaced so far.
fn burst_plan(n: usize, victims: &[usize], mut generations: Vec<u32>) -> Vec<BurstStep> {
    let services = services_of(n);
    victims
        .iter()
        .map(|&i| {
            let p = placement(n, i);
            generations[i] = 1;
            BurstStep {
                i,
                old: format!("svc-{:05}-0x{i:06}", p.deploy),
                pod: remote_pod(n, 1, i),
                uid: uid(1, i),
                slice: (p.deploy < services).then(|| slice_json(n, p.deploy, &generations)),
                ns: p.ns,
            }
        })
        .collect()
}

fn push(events: &Pending, ip: Ipv4Addr, uid: Option<String>) {
    if let Ok(mut e) = events.lock() {
        e.push_back((Instant::now(), ip, uid));
    }
}

/// Polls `/debug/destinations` for the oldest pending events until each is enforced (the pod
/// known at its address with its uid, or nothing there for a deletion), bounded.
fn probe_events(
    admin: SocketAddr,
    events: &Pending,
    done: &Mutex<Vec<f64>>,
    finished: &AtomicBool,
) -> Result<()> {
    loop {
        let pending: Vec<Event> = {
            let e = events.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            e.iter().take(PROBE_BATCH).cloned().collect()
        };
        if pending.is_empty() {
            if finished.load(Ordering::Relaxed) {
                return Ok(());
            }
            std::thread::sleep(POLL);
            continue;
        }
        if pending[0].0.elapsed() > ENFORCE_TIMEOUT {
            // Counted as not enforced: the table shows enforced < events.
            if let Ok(mut e) = events.lock() {
                e.pop_front();
            }
            continue;
        }
        let ips: Vec<String> = pending.iter().map(|p| p.1.to_string()).collect();
        let body = testbed::agent::http(
            admin,
            "GET",
            &format!("/debug/destinations?ips={}", ips.join(",")),
        )
        .context("polling /debug/destinations");
        // An agent too busy to answer in time is what is measured: poll again (the events
        // age out after ENFORCE_TIMEOUT, so this ends).
        let Ok(body) = body else {
            std::thread::sleep(POLL);
            continue;
        };
        let now = Instant::now();
        let answers: Vec<Value> =
            serde_json::from_str(&body).context("parsing /debug/destinations")?;
        let known: BTreeMap<String, Option<String>> = answers
            .iter()
            .filter_map(|a| {
                Some((a["ip"].as_str()?.to_owned(), a["uid"].as_str().map(str::to_owned)))
            })
            .collect();
        let enforced = |p: &Event| match known.get(&p.1.to_string()) {
            Some(uid) => match &p.2 {
                Some(want) => uid.as_deref() == Some(want.as_str()),
                None => uid.is_none(),
            },
            None => false,
        };
        let mut e = events.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let mut d = done.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        e.retain(|p| {
            let hit = pending.iter().any(|q| q.0 == p.0 && q.1 == p.1) && enforced(p);
            if hit {
                d.push(now.duration_since(p.0).as_secs_f64() * 1e3);
            }
            !hit
        });
        drop((e, d));
        std::thread::sleep(POLL);
    }
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn print_row(r: &Row) {
    println!(
        "   {} pods: sync {}s, RSS {} MiB (peak {}), event->enforced p50 {} ms p99 {} ms ({}/{}), new conn idle p50 {} us p99 {} us, burst p50 {} us p99 {} us",
        r.pods,
        fmt(r.sync_s, 1),
        fmt(r.rss_mib, 0),
        fmt(r.hwm_mib, 0),
        fmt(r.event_p50_ms, 0),
        fmt(r.event_p99_ms, 0),
        r.enforced,
        r.events,
        fmt(r.idle_p50_us, 0),
        fmt(r.idle_p99_us, 0),
        fmt(r.burst_p50_us, 0),
        fmt(r.burst_p99_us, 0),
    );
}

fn print_table(rows: &[Row]) {
    println!("\nscale (targets at 150k pods: RSS <= 300 MiB, event->enforced p99 < 1000 ms, burst conn p50 within 10% of idle)");
    println!(
        "{:>8} {:>8} {:>8} {:>9} {:>9} {:>11} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "pods",
        "services",
        "sync s",
        "RSS MiB",
        "peak MiB",
        "enforced",
        "ev p50 ms",
        "ev p99 ms",
        "idle p50",
        "burst p50",
        "burst p99",
        "p50 +%"
    );
    for r in rows {
        let ratio = match (r.idle_p50_us, r.burst_p50_us) {
            (Some(i), Some(b)) if i > 0.0 => format!("{:+.0}", (b / i - 1.0) * 100.0),
            _ => "-".into(),
        };
        println!(
            "{:>8} {:>8} {:>8} {:>9} {:>9} {:>11} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8}",
            r.pods,
            r.services,
            fmt(r.sync_s, 1),
            fmt(r.rss_mib, 0),
            fmt(r.hwm_mib, 0),
            format!("{}/{}", r.enforced, r.events),
            fmt(r.event_p50_ms, 0),
            fmt(r.event_p99_ms, 0),
            fmt(r.idle_p50_us, 0),
            fmt(r.burst_p50_us, 0),
            fmt(r.burst_p99_us, 0),
            ratio
        );
        if !r.note.is_empty() {
            println!("{:>8} {}", "", r.note);
        }
    }
}

fn row_json(r: &Row) -> Value {
    json!({
        "pods": r.pods, "services": r.services, "nodes": NODES, "local_pods": LOCAL_PODS,
        "sync_s": r.sync_s, "rss_mib": r.rss_mib, "peak_rss_mib": r.hwm_mib,
        "rss_after_burst_mib": r.rss_after_burst_mib,
        "events": r.events, "enforced": r.enforced,
        "event_to_enforced_p50_ms": r.event_p50_ms, "event_to_enforced_p99_ms": r.event_p99_ms,
        "new_conn_idle_p50_us": r.idle_p50_us, "new_conn_idle_p99_us": r.idle_p99_us,
        "new_conn_burst_p50_us": r.burst_p50_us, "new_conn_burst_p99_us": r.burst_p99_us,
        "note": r.note,
    })
}
