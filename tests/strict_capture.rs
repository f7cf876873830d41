//! End-to-end, as an attacker would try it: a tenant cannot opt out of capture, cannot break
//! capture for the node's other pods. Runs as root.

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use anyhow::Result;
use testbed::{
    agent::{AgentOptions, AgentProcess, WorkloadEntry, WorkloadsFile},
    PodProcess, Testbed,
};

fn e2e_tool() -> PathBuf {
    testbed::e2e_tool!()
}

const NS: &str = "shop";
const ECHO_PORT: u16 = 8080;
/// The mark the agent's own sockets used to carry (and the programs skipped) before issue 14.
const OLD_AGENT_MARK: &str = "0x4d544c53";

/// One node, the named pods, echo servers in `servers`, and an agent enrolling `enrolled`
/// that runs, as in Kubernetes, in a cgroup of its own under the node's pods cgroup.
struct Scenario {
    // Field order matters for drop: processes and agent go before the bed.
    _servers: Vec<PodProcess>,
    agent: AgentProcess,
    workloads_path: PathBuf,
    bed: Testbed,
}

impl Scenario {
    fn new(test: &str, pods: &[&str], enrolled: &[&str], servers: &[&str]) -> Result<Scenario> {
        let mut bed = Testbed::new(test)?;
        let node = bed.add_node("node1")?;
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
            procs.push(echo_server(&bed, s)?);
        }
        let mut opts = AgentOptions::new("node1", &workloads_path);
        opts.cgroup = Some(node.cgroup.join("mtls-agent-pod"));
        let agent = AgentProcess::start(&bed, opts)?;
        Ok(Scenario { _servers: procs, agent, workloads_path, bed })
    }

    fn addr(&self, pod: &str, port: u16) -> SocketAddr {
        (self.bed.pod(pod).ip, port).into()
    }

    /// Waits for a closed outbound (captured) connection record matching `pred`.
    fn wait_outbound(
        &self,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        self.agent
            .wait_connection(Duration::from_secs(5), |c| c["direction"] == "outbound" && pred(c))
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.workloads_path);
    }
}

fn echo_server(bed: &Testbed, pod: &str) -> Result<PodProcess> {
    let mut cmd = Command::new(e2e_tool());
    cmd.args([
        "echo-server",
        "--listen",
        &format!("0.0.0.0:{ECHO_PORT}"),
        "--prefix",
        &format!("{pod}:"),
    ]);
    let p = bed.spawn_in_pod(pod, cmd)?;
    p.wait_for_stdout("listening", Duration::from_secs(5))?;
    Ok(p)
}

/// Runs `cmd` in `pod` to its end (bounded); its stdout and success.
fn run_in_pod(bed: &Testbed, pod: &str, cmd: Command) -> Result<(String, bool)> {
    let p = bed.spawn_in_pod(pod, cmd)?;
    let out = p.wait_with_output(Duration::from_secs(60))?;
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((text, out.status.success()))
}

/// The e2e client as an unprivileged container app: uid/gid 65534, no groups, and of all
/// capabilities only `CAP_NET_RAW` (the container runtimes' default set has it).
fn unprivileged_client(args: &[&str]) -> Command {
    let mut cmd = Command::new("/usr/bin/setpriv");
    cmd.args([
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--inh-caps",
        "+net_raw",
        "--ambient-caps",
        "+net_raw",
    ]);
    cmd.arg(e2e_tool()).arg("client").args(args);
    cmd
}

/// Issue 14, item 3: the mark the agent once skipped is no way out. An app with only
/// `CAP_NET_RAW` sets it on its socket and connects to a pod outside the mesh: the connection
/// still goes through the agent, exactly like the same app's unmarked one. The agent runs in a
/// cgroup under the node's pods cgroup (where its own pod is in Kubernetes), so the agent's own
/// upstream dials inside the pod's namespace are seen by the programs too, and must not be
/// captured again: the echo coming back proves they were not.
#[test]
fn a_marked_socket_of_an_app_with_cap_net_raw_is_still_captured() -> Result<()> {
    let s = Scenario::new("sc-mark", &["a", "b"], &["a"], &["b"])?;
    let dst = s.addr("b", ECHO_PORT).to_string();
    for (message, mark) in
        [("unmarked", None), ("marked-with-the-agents-mark", Some(OLD_AGENT_MARK))]
    {
        let mut args = vec!["--connect", dst.as_str(), "--message", message];
        if let Some(m) = mark {
            args.extend(["--mark", m]);
        }
        let (out, ok) = run_in_pod(&s.bed, "a", unprivileged_client(&args))?;
        assert!(ok, "{message}: client failed: {out}");
        assert_eq!(out.trim(), format!("b:{message}"), "{message}");
        let rec = s.wait_outbound(|c| {
            c["originalDestination"] == dst.as_str() && c["bytesSent"] == message.len()
        })?;
        assert_eq!(rec["sourcePod"], format!("a.{NS}"), "{message}: {rec}");
        // The agent saw the app's loopback side: captured, not a direct connection.
        assert!(rec["source"].as_str().unwrap_or_default().starts_with("127.0.0.1:"), "{rec}");
    }
    Ok(())
}

/// The agent, running in a cgroup under the node's pods cgroup (as its pod does in Kubernetes),
/// dials the destination's tunnel port from inside the source pod's namespace: the capture
/// programs see that connect() and must leave it alone (they know it by the agent's cgroup id,
/// which the agent wrote at start and removes on a clean exit).
#[test]
fn the_agents_own_dials_from_inside_the_pods_cgroup_are_not_captured_again() -> Result<()> {
    let mut s = Scenario::new("sc-own-dials", &["a", "b"], &["a", "b"], &["b"])?;
    let agent_cgroup = s.bed.node("node1").cgroup.join("mtls-agent-pod");
    let id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&agent_cgroup)?);
    let ids = mtls_agent::capture::Capture::agent_cgroups_pinned(&s.agent.bpffs)?;
    assert_eq!(ids, vec![id], "the agent's cgroup id is in AGENT_CGROUPS");

    let dst = s.addr("b", ECHO_PORT).to_string();
    let (out, ok) = client(&s.bed, "a", &["--connect", &dst, "--message", "mesh"])?;
    assert!(ok && out.trim() == "b:mesh", "a to b through the tunnel: {out}");
    let rec = s.wait_outbound(|c| c["originalDestination"] == dst.as_str())?;
    assert_eq!(rec["destinationPod"], format!("b.{NS}"), "{rec}");
    assert!(rec["tls"].as_str().unwrap_or_default().starts_with("TLSv1.3"), "{rec}");

    let status = s.agent.terminate()?;
    assert!(status.success(), "{status}");
    let ids = mtls_agent::capture::Capture::agent_cgroups_pinned(&s.agent.bpffs)?;
    assert!(ids.is_empty(), "a clean exit removes the agent's cgroup id: {ids:?}");
    Ok(())
}

/// Runs the e2e client in `pod`; its stdout (one line per connection) and success.
fn client(bed: &Testbed, pod: &str, args: &[&str]) -> Result<(String, bool)> {
    let mut cmd = Command::new(e2e_tool());
    cmd.arg("client").args(args);
    run_in_pod(bed, pod, cmd)
}

/// The last lines of an output, for assertion messages.
fn tail(out: &str) -> String {
    out.lines().rev().take(3).collect::<Vec<_>>().join("\n")
}

/// Issue 14, item 2: pod `f` floods connect()s that fail before the SYN (each leaves a record
/// of its original destination that no TCP_CONNECT_CB takes), closing each socket or holding
/// the last `hold` open, while pod `o` opens 300 connections to a pod outside the mesh: every
/// one of them must go through. Once `f` stops, its own connections work again.
fn flood_does_not_break_capture_for_another_pod(test: &str, hold: usize) -> Result<()> {
    const CALLS: u64 = 90_000;
    const OTHER_CONNECTIONS: usize = 300;
    let s = Scenario::new(test, &["f", "o", "c"], &["f", "o"], &["c"])?;
    let dst = s.addr("c", ECHO_PORT).to_string();
    let mut cmd = Command::new(e2e_tool());
    cmd.args(["flood", "--target", &dst, "--count", &CALLS.to_string(), "--seconds", "60"]);
    cmd.args(["--hold", &hold.to_string(), "--linger-ms", "60000"]);
    let flooder = s.bed.spawn_in_pod("f", cmd)?;
    let line = flooder.wait_for_stdout("flooded", Duration::from_secs(70))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    // "flooded CALLS failed FAILED holding H": the whole flood ran, and no call connected.
    assert_eq!(words.get(1), Some(&CALLS.to_string().as_str()), "{line}");
    assert_eq!(words.get(3), Some(&CALLS.to_string().as_str()), "{line}");

    let count = OTHER_CONNECTIONS.to_string();
    let (out, ok) = client(&s.bed, "o", &["--connect", &dst, "--message", "o", "--count", &count])?;
    assert!(ok, "the other pod's connections failed during the flood: {}", tail(&out));
    assert_eq!(out.lines().filter(|l| *l == "c:o").count(), OTHER_CONNECTIONS);

    if hold > 0 {
        // Holding thousands of sockets with records, `f` holds no more than its quota (plus at
        // most one per CPU: the check and the count are separate steps) ...
        let cpus = std::thread::available_parallelism().map_or(64, |n| n.get());
        let quota = mtls_agent_ebpf::PENDING_QUOTA as usize;
        let pending = mtls_agent::capture::Capture::pending_len_pinned(&s.agent.bpffs)?;
        assert!((quota..=quota + cpus).contains(&pending), "{pending} records held");
        // ... and its own further connections fail closed, not in plaintext past the agent.
        let (out, ok) = client(&s.bed, "f", &["--connect", &dst, "--message", "over"])?;
        assert!(!ok && out.contains("error:"), "over its quota, f's connection: {out}");
    }

    // The flood stops; its sockets close (the kernel releases them as the process dies).
    drop(flooder);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let pending = || mtls_agent::capture::Capture::pending_len_pinned(&s.agent.bpffs);
    while pending()? > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(pending()?, 0, "records of released sockets were deleted");
    let counts = mtls_agent::capture::Capture::pending_by_pod_pinned(&s.agent.bpffs)?;
    assert!(counts.iter().all(|(_, n)| *n == 0), "each pod's count went back: {counts:?}");
    let (out, ok) = client(&s.bed, "f", &["--connect", &dst, "--message", "again"])?;
    assert!(ok && out.trim() == "c:again", "the flooding pod's own connection: {out}");
    Ok(())
}

#[test]
fn a_connect_flood_closing_each_socket_does_not_break_another_pods_capture() -> Result<()> {
    flood_does_not_break_capture_for_another_pod("sc-flood-close", 0)
}

#[test]
fn a_connect_flood_holding_its_sockets_does_not_break_another_pods_capture() -> Result<()> {
    flood_does_not_break_capture_for_another_pod("sc-flood-hold", 4_000)
}

/// A declared probe port of `server`, STRICT like the rest of its namespace.
const PROBE_PORT: u16 = 8081;
/// The node port the node netns DNATs (and masquerades) to `server:PROBE_PORT`.
const NODE_PORT_TO_PROBE: u16 = 30081;
/// The node port the node netns DNATs (and masquerades) to `plain:ECHO_PORT` (outside the mesh):
/// shows the forwarding and SNAT work at all.
const NODE_PORT_TO_PLAIN: u16 = 30082;

/// One node: `server` (enrolled, namespace STRICT, echo on PROBE_PORT declared as a probe
/// port), `outsider` and `plain` (outside the mesh; echo in `plain`), a "kubelet" cgroup outside
/// the node's pods cgroup (given as `--kubelet-cgroup`), and a host-network pod's cgroup under
/// the node's.
struct ProbeBed {
    // Drop order: processes, the agent, the cgroups (their members killed), then the bed.
    _servers: Vec<PodProcess>,
    _agent: AgentProcess,
    kubelet: testbed::CgroupDir,
    hostnet: testbed::CgroupDir,
    _policies: testbed::mesh::PolicyDir,
    workloads_path: PathBuf,
    bed: Testbed,
}

impl ProbeBed {
    fn new(test: &str) -> Result<ProbeBed> {
        let mut bed = Testbed::new(test)?;
        let node = bed.add_node("node1")?;
        for p in ["server", "outsider", "plain"] {
            bed.add_pod("node1", p)?;
        }
        let mut entry = WorkloadEntry::of(bed.pod("server"), NS);
        entry.probe_ports = vec![PROBE_PORT];
        let file = WorkloadsFile { workloads: vec![entry], services: vec![] };
        let workloads_path = std::env::temp_dir().join(format!("{}-workloads.yaml", bed.id()));
        file.write(&workloads_path)?;
        let policies = testbed::mesh::PolicyDir::new(bed.id())?;
        policies.write("ns.yaml", &testbed::mesh::namespace_pa(NS, "STRICT"))?;
        let mut servers = vec![echo_server(&bed, "plain")?];
        let mut cmd = Command::new(e2e_tool());
        cmd.args([
            "echo-server",
            "--listen",
            &format!("0.0.0.0:{PROBE_PORT}"),
            "--prefix",
            "probe:",
        ]);
        let probe = bed.spawn_in_pod("server", cmd)?;
        probe.wait_for_stdout("listening", Duration::from_secs(5))?;
        servers.push(probe);
        let kubelet = testbed::CgroupDir::create(bed.base_cgroup().join("kubelet"))?;
        let hostnet = testbed::CgroupDir::create(node.cgroup.join("hostnet-pod"))?;
        let mut opts = AgentOptions::new("node1", &workloads_path);
        opts.extra_args = vec![
            "--policies".into(),
            policies.0.display().to_string(),
            "--kubelet-cgroup".into(),
            kubelet.path().display().to_string(),
        ];
        let agent = AgentProcess::start(&bed, opts)?;
        Ok(ProbeBed {
            _servers: servers,
            _agent: agent,
            kubelet,
            hostnet,
            _policies: policies,
            workloads_path,
            bed,
        })
    }

    /// The e2e client from the node's netns, in `cgroup`; its stdout and success.
    fn client_on_node(&self, cgroup: &std::path::Path, args: &[&str]) -> Result<(String, bool)> {
        let mut cmd = Command::new(e2e_tool());
        cmd.args(["client", "--message", "healthz", "--timeout-ms", "2000"]).args(args);
        let p = self.bed.spawn_in_node_cgroup("node1", cgroup, cmd)?;
        let out = p.wait_with_output(Duration::from_secs(10))?;
        Ok((String::from_utf8_lossy(&out.stdout).trim().to_owned(), out.status.success()))
    }

    fn probe_dst(&self) -> String {
        SocketAddr::from((self.bed.pod("server").ip, PROBE_PORT)).to_string()
    }
}

impl Drop for ProbeBed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.workloads_path);
    }
}

/// Issue 14, item 5: the kubelet's probes get in, from the node's address and from a second
/// address of the node (the `cni0`/`cbr0` case); the same probe from a host-network pod (a pod
/// cgroup, the node's netns and address) is refused.
#[test]
fn only_the_kubelets_own_connections_reach_a_strict_probe_port() -> Result<()> {
    let mut b = ProbeBed::new("sc-probe")?;
    let bridge_ip = b.bed.add_node_address("node1")?;
    let dst = b.probe_dst();
    let kubelet = b.kubelet.path().to_owned();

    let (out, ok) = b.client_on_node(&kubelet, &["--connect", &dst])?;
    assert!(ok && out == "probe:healthz", "the kubelet from the node address: {out}");
    let bind = format!("{bridge_ip}:0");
    let (out, ok) = b.client_on_node(&kubelet, &["--connect", &dst, "--bind", &bind])?;
    assert!(ok && out == "probe:healthz", "the kubelet from a bridge address: {out}");
    // Other ports stay STRICT for the kubelet too.
    let app = SocketAddr::from((b.bed.pod("server").ip, ECHO_PORT)).to_string();
    let (out, ok) = b.client_on_node(&kubelet, &["--connect", &app])?;
    assert!(!ok && out.contains("error:"), "a non-probe port from the kubelet: {out}");

    let hostnet = b.hostnet.path().to_owned();
    let (out, ok) = b.client_on_node(&hostnet, &["--connect", &dst])?;
    assert!(!ok && out.contains("error:"), "a host-network pod from the node address: {out}");
    let (out, ok) = b.client_on_node(&hostnet, &["--connect", &dst, "--bind", &bind])?;
    assert!(!ok && out.contains("error:"), "a host-network pod from a bridge address: {out}");
    Ok(())
}

/// Issue 14, item 5: traffic the node forwards and SNATs to its own address (a NodePort with
/// `externalTrafficPolicy: Cluster`) does not pass as a probe. netfilter (nft) in the node's
/// netns DNATs node:NODE_PORT to the pod and masquerades; host suite only.
#[test]
fn nodeport_traffic_snated_to_the_node_address_is_refused_on_a_strict_probe_port() -> Result<()> {
    let b = ProbeBed::new("sc-snat")?;
    let node_ip = b.bed.node("node1").ip;
    let server = b.bed.pod("server").ip;
    let plain = b.bed.pod("plain").ip;
    b.bed.in_node_netns("node1", || std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))??;
    let rules = [
        "table ip mtls_nodeport {".to_owned(),
        "  chain pre {".into(),
        "    type nat hook prerouting priority dstnat;".into(),
        format!(
            "    ip daddr {node_ip} tcp dport {NODE_PORT_TO_PROBE} dnat to {server}:{PROBE_PORT}"
        ),
        format!(
            "    ip daddr {node_ip} tcp dport {NODE_PORT_TO_PLAIN} dnat to {plain}:{ECHO_PORT}"
        ),
        "  }".into(),
        "  chain post {".into(),
        "    type nat hook postrouting priority srcnat;".into(),
        format!("    ip daddr {{ {server}, {plain} }} masquerade"),
        "  }".into(),
        "}".into(),
    ]
    .join("\n");
    let rules_path = std::env::temp_dir().join(format!("{}-nodeport.nft", b.bed.id()));
    std::fs::write(&rules_path, rules)?;
    let mut nft = Command::new("nft");
    nft.arg("-f").arg(&rules_path);
    // The table lives in the node's netns and goes with it.
    let out = b.bed.spawn_in_node("node1", nft)?.wait_with_output(Duration::from_secs(10));
    let _ = std::fs::remove_file(&rules_path);
    let out = out?;
    assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));

    // The path works, and the node rewrote the source to its own address.
    let via_node = format!("{node_ip}:{NODE_PORT_TO_PLAIN}");
    let (out, ok) = client(&b.bed, "outsider", &["--connect", &via_node, "--message", "nat"])?;
    assert!(ok && out.trim() == "plain:nat", "NodePort to a pod outside the mesh: {out}");
    let accepted = b._servers[0].stdout();
    assert!(accepted.contains(&format!("accepted {node_ip}:")), "SNATed: {accepted}");

    let to_probe = format!("{node_ip}:{NODE_PORT_TO_PROBE}");
    let (out, ok) = client(&b.bed, "outsider", &["--connect", &to_probe, "--message", "nat"])?;
    assert!(!ok && out.contains("error:"), "SNATed NodePort traffic to the probe port: {out}");
    Ok(())
}

/// `--kubelet-cgroup` around the pods' cgroup (or inside it) would let every pod pass as the
/// kubelet: the agent refuses to start, naming both.
#[test]
fn a_kubelet_cgroup_around_the_pods_cgroup_is_refused_at_start() -> Result<()> {
    let mut bed = Testbed::new("sc-kubelet-bad")?;
    bed.add_node("node1")?;
    let workloads_path = std::env::temp_dir().join(format!("{}-workloads.yaml", bed.id()));
    WorkloadsFile::default().write(&workloads_path)?;
    let mut opts = AgentOptions::new("node1", &workloads_path);
    let around = bed.base_cgroup().display().to_string();
    opts.extra_args = vec!["--kubelet-cgroup".into(), around.clone()];
    let started = AgentProcess::start(&bed, opts);
    let _ = std::fs::remove_file(&workloads_path);
    let err = match started {
        Ok(_) => anyhow::bail!("the agent started with --kubelet-cgroup {around}"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("exited early") && err.contains("contains"), "{err}");
    assert!(err.contains(&around), "{err}");
    Ok(())
}

/// Creates a small hash map (8-byte keys and values) and pins it at `path` (as an earlier
/// version's map was), holding `entry` if given.
fn pin_a_map(path: &std::path::Path, entry: Option<u64>) -> Result<()> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let create = MapCreate { map_type: 1, key_size: 8, value_size: 8, max_entries: 1 };
    // SAFETY: a valid bpf_attr prefix for BPF_MAP_CREATE (0).
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, 0, &create as *const MapCreate, size_of::<MapCreate>())
    };
    anyhow::ensure!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    if let Some(key) = entry {
        #[repr(C)]
        struct MapUpdate {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        let value = 0u64;
        let update = MapUpdate {
            map_fd: fd as u32,
            _pad: 0,
            key: &key as *const u64 as u64,
            value: &value as *const u64 as u64,
            flags: 0,
        };
        // SAFETY: a valid bpf_attr prefix for BPF_MAP_UPDATE_ELEM (2); key and value outlive it.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, 2, &update as *const MapUpdate, size_of::<MapUpdate>())
        };
        anyhow::ensure!(rc == 0, "BPF_MAP_UPDATE_ELEM: {}", std::io::Error::last_os_error());
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let pin = ObjPin { pathname: c_path.as_ptr() as u64, bpf_fd: fd as u32, file_flags: 0 };
    // SAFETY: a valid bpf_attr prefix for BPF_OBJ_PIN (6); the path outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 6, &pin as *const ObjPin, size_of::<ObjPin>()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: our own descriptor; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
    anyhow::ensure!(rc == 0, "BPF_OBJ_PIN {}: {err}", path.display());
    Ok(())
}

/// A node upgraded from a version whose `ENROLLED` and `PENDING_DST` had other layouts: the new
/// agent creates `ENROLLED_PODS` and `PENDING_CONNS` (in its layout's directory, `maps/v<N>`,
/// since issue 16) instead of reopening them with the wrong sizes, carries the pods `ENROLLED`
/// held over before its programs replace the old ones (so no pod is uncaptured until the first
/// reconcile), and removes the old pins.
#[test]
fn pins_of_the_old_map_layouts_are_not_reused_and_are_removed() -> Result<()> {
    let mut bed = Testbed::new("sc-old-pins")?;
    bed.add_node("node1")?;
    let maps = bed.bpffs_dir("node1").join("maps");
    std::fs::create_dir_all(&maps)?;
    // A pod the previous layout captured (its cookie; the value was padding).
    pin_a_map(&maps.join("ENROLLED"), Some(0x5eed))?;
    pin_a_map(&maps.join("PENDING_DST"), None)?;
    let workloads_path = std::env::temp_dir().join(format!("{}-workloads.yaml", bed.id()));
    WorkloadsFile::default().write(&workloads_path)?;
    let started = AgentProcess::start(&bed, AgentOptions::new("node1", &workloads_path));
    let _ = std::fs::remove_file(&workloads_path);
    let agent = started?;
    agent.wait_log(
        "carried over the previous layout's ENROLLED map: 1 enrolled pod(s)",
        Duration::from_secs(5),
    )?;
    for old in ["ENROLLED", "PENDING_DST"] {
        assert!(!maps.join(old).exists(), "{old} still pinned");
    }
    let own = maps.join(format!("v{}", mtls_agent_ebpf::LAYOUT_VERSION));
    for new in ["ENROLLED_PODS", "PENDING_CONNS", "AGENT_CGROUP_IDS", "PROBE_CONNS"] {
        assert!(own.join(new).exists(), "{new} not pinned");
    }
    Ok(())
}
