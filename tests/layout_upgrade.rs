//! End-to-end, issue 16 item 2: an upgrade across pinned-map layouts leaves no gap.
//!
//! A node's pins are made from the eBPF object of layout 1 (`fixtures/layout-v1/programs.o`,
//! the programs as they were before layouts were versioned), the way that version's agent made
//! them: maps straight under `maps/`, node-wide cgroup links and one `sk_lookup` link per
//! enrolled pod under `links/`. A pod is enrolled and STRICT there. The agent of this version
//! starts over them while a hostile pod keeps trying plaintext to the STRICT pod and the
//! enrolled pod keeps connecting out: every plaintext attempt is refused and every connect() of
//! the enrolled pod is captured (by the old programs or by the new: their counters add up to
//! the attempts), and afterwards the old links and pins are gone and the layout version is
//! recorded. A second start takes the same-version path. Runs as root.

use std::{
    collections::BTreeSet,
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{links::FdLink, CgroupAttachMode, CgroupSock, CgroupSockAddr, SkLookup, SockOps},
    EbpfLoader,
};
use mtls_agent_ebpf::{
    map_names, prog_names, stats, Config, PodInfo, PortKey, PortPolicy, LAYOUT_VERSION,
    MODE_PERMISSIVE, MODE_STRICT, OUTBOUND_PORT,
};
use serde_json::json;
use testbed::{
    agent::{AgentOptions, AgentProcess, CaDir},
    apiserver::{self as api, ApiServer},
    mesh::{echo_server, namespace_pa, Mesh, PolicyDir, PORT},
    PodProcess, Testbed,
};

/// Layout 1's programs, built by `cargo xtask build-ebpf` before layouts were versioned.
static V1_OBJECT: &[u8] = aya::include_bytes_aligned!("fixtures/layout-v1/programs.o");

const NS: &str = "layout";

/// The netns cookie of a pod (`SO_NETNS_COOKIE` of a socket made there).
fn netns_cookie(bed: &Testbed, pod: &str) -> Result<u64> {
    bed.in_pod_netns(pod, || -> std::io::Result<u64> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: a valid socket and an 8-byte out buffer with its length.
        let rc = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_SOCKET,
                libc::SO_NETNS_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(cookie)
    })?
    .context("SO_NETNS_COOKIE")
}

/// What layout 1's agent left pinned.
struct V1Pins {
    links: Vec<PathBuf>,
    maps: PathBuf,
}

/// Pins layout 1 for `node1` as that version's agent did (`Capture::load`, `attach_inbound`,
/// `enroll`, `set_inbound_rules`): its maps under `maps/`, its programs attached to the node's
/// pods cgroup, and `pods` enrolled and STRICT on every port with their inbound program
/// attached. Its `Ebpf` handles are dropped at once: the pins keep everything, as after that
/// agent exited.
fn pin_layout_v1(bed: &Testbed, pods: &[&str]) -> Result<V1Pins> {
    let bpffs = bed.bpffs_dir("node1");
    let (maps, links_dir) = (bpffs.join("maps"), bpffs.join("links"));
    for d in [&maps, &links_dir] {
        fs::create_dir_all(d).with_context(|| format!("mkdir {}", d.display()))?;
    }
    let generation = 1u64;
    let mut links = Vec::new();
    let mut ebpf = EbpfLoader::new().default_map_pin_directory(&maps).load(V1_OBJECT)?;
    let mut config: Array<_, Config> =
        ebpf.take_map(map_names::CONFIG).context("CONFIG")?.try_into()?;
    let value = Config { outbound_port: OUTBOUND_PORT, ..Config::default() };
    config.set(0, value, 0)?;
    let mut enrolled: HashMap<_, u64, PodInfo> =
        ebpf.take_map(map_names::ENROLLED).context("ENROLLED")?.try_into()?;
    let mut inbound: HashMap<_, PortKey, PortPolicy> =
        ebpf.take_map(map_names::INBOUND).context("INBOUND")?.try_into()?;
    let cgroup = fs::File::open(&bed.node("node1").cgroup)?;
    macro_rules! attach {
        ($ty:ty, $name:expr) => {{
            let prog: &mut $ty = ebpf.program_mut($name).context($name)?.try_into()?;
            prog.load()?;
            let id = prog.attach(cgroup.as_fd(), CgroupAttachMode::Single)?;
            let link: FdLink = prog.take_link(id)?.try_into()?;
            let path = links_dir.join(format!("{}_{generation}", $name));
            link.pin(&path)?;
            links.push(path);
        }};
    }
    attach!(CgroupSockAddr, prog_names::CONNECT4);
    attach!(CgroupSockAddr, prog_names::CONNECT6);
    attach!(SockOps, prog_names::SOCK_OPS);
    attach!(CgroupSock, prog_names::SOCK_RELEASE);
    for pod in pods {
        let cookie = netns_cookie(bed, pod)?;
        enrolled.insert(cookie, PodInfo::default(), 0)?;
        let strict = PortPolicy { mode: MODE_STRICT, ..PortPolicy::default() };
        inbound.insert(PortKey { netns_cookie: cookie, port: 0, _pad: [0; 3] }, strict, 0)?;
        let mut per_pod = EbpfLoader::new()
            .override_global("POD_COOKIE", &cookie, true)
            .default_map_pin_directory(&maps)
            .load(V1_OBJECT)?;
        let prog: &mut SkLookup =
            per_pod.program_mut(prog_names::INBOUND).context("inbound")?.try_into()?;
        prog.load()?;
        let netns = fs::File::open(&bed.pod(pod).netns)?;
        let id = prog.attach(netns)?;
        let link: FdLink = prog.take_link(id)?.into();
        let path = links_dir.join(format!("inbound_{cookie}_{generation}"));
        link.pin(&path)?;
        links.push(path);
    }
    Ok(V1Pins { links, maps })
}

/// The `captured` counter of a `COUNTERS` map (summed over CPUs).
fn captured(map: &PerCpuArray<MapData, u64>) -> Result<u64> {
    Ok(map.get(&stats::CAPTURED, 0)?.iter().sum())
}

fn counters(path: &Path) -> Result<PerCpuArray<MapData, u64>> {
    let data = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(PerCpuArray::try_from(Map::PerCpuArray(data))?)
}

/// `attempts` of the e2e tool in `pod`: `count` connections to `dst`, one every 20 ms.
fn attempts(
    bed: &Testbed,
    pod: &str,
    dst: &str,
    count: u32,
    timeout_ms: u32,
) -> Result<PodProcess> {
    let mut cmd = Command::new(testbed::e2e_tool_path()?);
    cmd.args(["attempts", "--connect", dst, "--message", "hi", "--count", &count.to_string()]);
    cmd.args(["--until-ok", &count.to_string(), "--timeout-ms", &timeout_ms.to_string()]);
    bed.spawn_in_pod(pod, cmd)
}

/// (attempts, successes) from the tool's last line, waiting (bounded) for it.
fn tally(p: &PodProcess) -> Result<(u64, u64)> {
    let line = p.wait_for_stdout("attempts ", Duration::from_secs(120))?;
    let nums: Vec<u64> = line.split(' ').filter_map(|n| n.trim().parse().ok()).collect();
    match nums[..] {
        [tried, ok] => Ok((tried, ok)),
        _ => bail!("unexpected line {line:?}"),
    }
}

/// Every connect() the `attempts` tool made was captured, by layout 1's programs or by this
/// layout's (and none of the agent's own dials was): their `captured` counters add up to it.
fn every_connect_captured(
    bed: &Testbed,
    client: &PodProcess,
    v1_counters: &PerCpuArray<MapData, u64>,
    v1_before: u64,
) -> Result<()> {
    let (tried, _) = tally(client)?;
    let own = bed.bpffs_dir("node1").join(format!("maps/v{LAYOUT_VERSION}/{}", map_names::STATS));
    let by_v1 = captured(v1_counters)? - v1_before;
    let by_v2 = captured(&counters(&own)?)?;
    ensure!(
        by_v1 + by_v2 == tried,
        "{tried} connect()s of the enrolled pod, captured {by_v1} by layout 1 and {by_v2} by \
         layout {LAYOUT_VERSION}: some went uncaptured (or the agent's own were captured)\n{}",
        client.stdout()
    );
    Ok(())
}

/// Regular pins straight under `maps/` (layout 1's) and its subdirectories.
fn maps_entries(maps: &Path) -> Result<(Vec<String>, BTreeSet<String>)> {
    let (mut pins, mut dirs) = (Vec::new(), BTreeSet::new());
    for e in fs::read_dir(maps)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type()?.is_dir() {
            dirs.insert(name);
        } else {
            pins.push(name);
        }
    }
    Ok((pins, dirs))
}

fn agent_options(m: &Mesh, workloads: &Path, ca: &Path, policies: &Path) -> AgentOptions {
    let mut o = AgentOptions::new("node1", workloads);
    o.ca_dir = Some(ca.to_owned());
    o.extra_args = vec!["--policies".into(), policies.display().to_string()];
    // Under the pods' cgroup as its DaemonSet pod is: its own dials inside pods pass through
    // both layouts' programs, which must tell them apart.
    o.cgroup = Some(m.bed.node("node1").cgroup.join("agent"));
    o
}

#[test]
fn an_upgrade_over_layout_v1_pins_keeps_capture_and_strict_and_retires_the_old_layout() -> Result<()>
{
    let mut m = Mesh::build(
        "layout-up",
        NS,
        &[("node1", "client"), ("node1", "server"), ("node1", "outsider")],
    )?;
    let (workloads, _) = m.workloads("workloads", &["client", "server"])?;
    let policies = PolicyDir::new(m.bed.id())?;
    policies.write("ns.yaml", &namespace_pa(NS, "STRICT"))?;
    let ca = m.ca("ca")?;
    let v1 = pin_layout_v1(&m.bed, &["client", "server"])?;
    let v1_counters = counters(&v1.maps.join(map_names::STATS))?;
    let server = m.dst("server");
    let outsider = m.dst("outsider");

    // Under layout 1 alone (its agent gone): STRICT holds, and the client's connect() is
    // captured (to a port nobody serves: refused, never plaintext to its destination).
    let before = captured(&v1_counters)?;
    let (out, ok) =
        m.client("outsider", &["--connect", &server, "--message", "x", "--timeout-ms", "500"])?;
    ensure!(!ok, "plaintext reached the STRICT pod under layout 1: {out}");
    let (out, ok) =
        m.client("client", &["--connect", &outsider, "--message", "x", "--timeout-ms", "500"])?;
    ensure!(!ok, "the enrolled pod reached {outsider} uncaptured: {out}");
    ensure!(captured(&v1_counters)? == before + 1, "layout 1's programs did not capture");
    ensure!(
        m.accepted("server") == 0 && m.accepted("outsider") == 0,
        "accepted before the upgrade"
    );

    // The handover, under fire: both loops run before the new agent starts and end after.
    let v1_before = captured(&v1_counters)?;
    let attacker = attempts(&m.bed, "outsider", &server, 700, 300)?;
    let client = attempts(&m.bed, "client", &outsider, 700, 300)?;
    std::thread::sleep(Duration::from_millis(300));
    let mut agent = AgentProcess::start(&m.bed, agent_options(&m, &workloads, &ca, &policies.0))?;
    agent.wait_log("map layout handover done", Duration::from_secs(10))?;
    ensure!(
        !attacker.stdout().contains("attempts ") && !client.stdout().contains("attempts "),
        "the attempts ended before the handover did: make them longer\nattacker: {}\nclient: {}",
        attacker.stdout(),
        client.stdout()
    );
    let log = agent.log();
    ensure!(log.contains("map layout handover: own maps beside the older layout's"), "{log}");
    let (tried, ok) = tally(&attacker)?;
    ensure!(
        ok == 0,
        "{ok} of {tried} plaintext attempts reached the STRICT pod:\n{}",
        attacker.stdout()
    );
    ensure!(m.accepted("server") == 0, "the STRICT pod's app accepted plaintext");
    every_connect_captured(&m.bed, &client, &v1_counters, v1_before)?;

    // After it: layout 1's links and pins are gone, this layout's are in its directory.
    for link in &v1.links {
        ensure!(!link.exists(), "{} still pinned", link.display());
    }
    let (pins, dirs) = maps_entries(&v1.maps)?;
    ensure!(pins.is_empty(), "layout 1's pins left: {pins:?}");
    ensure!(dirs == BTreeSet::from([format!("v{LAYOUT_VERSION}")]), "map directories: {dirs:?}");
    for name in [map_names::ENROLLED, map_names::INBOUND, map_names::AGENT_CGROUPS] {
        let p = v1.maps.join(format!("v{LAYOUT_VERSION}")).join(name);
        ensure!(p.exists(), "{} not pinned", p.display());
    }
    // The new layout enforces and serves alone: the mesh works, plaintext is still refused.
    let (out, ok) = m.client("client", &["--connect", &server, "--message", "hello"])?;
    ensure!(ok && out.contains("server:hello"), "client -> server through the mesh: {out}");
    let (out, ok) =
        m.client("outsider", &["--connect", &server, "--message", "x", "--timeout-ms", "500"])?;
    ensure!(!ok, "plaintext reached the STRICT pod after the upgrade: {out}");

    // A second start of the same version re-opens its own maps.
    agent.restart()?;
    agent.wait_log("map layout: same version, pinned maps re-opened", Duration::from_secs(10))?;
    let (out, ok) = m.client("client", &["--connect", &server, "--message", "again"])?;
    ensure!(ok && out.contains("server:again"), "client -> server after a restart: {out}");
    let (out, ok) =
        m.client("outsider", &["--connect", &server, "--message", "x", "--timeout-ms", "500"])?;
    ensure!(!ok, "plaintext reached the STRICT pod after a restart: {out}");
    let (_, dirs) = maps_entries(&v1.maps)?;
    ensure!(dirs == BTreeSet::from([format!("v{LAYOUT_VERSION}")]), "map directories: {dirs:?}");
    Ok(())
}

/// A downgrade: pins of a layout newer than this agent's are refused, and left as they are.
#[test]
fn pins_of_a_newer_layout_are_refused_and_left_untouched() -> Result<()> {
    let mut m = Mesh::build("layout-new", NS, &[("node1", "client")])?;
    let (workloads, _) = m.workloads("workloads", &["client"])?;
    let policies = PolicyDir::new(m.bed.id())?;
    let ca = CaDir::init(&format!("{}-ca", m.bed.id()), "cluster.local")?;
    let bpffs = m.bed.bpffs_dir("node1");
    let newer = bpffs.join(format!("maps/v{}", LAYOUT_VERSION + 1));
    fs::create_dir_all(&newer)?;
    let started = AgentProcess::start(&m.bed, agent_options(&m, &workloads, &ca.path, &policies.0));
    let Err(e) = started else { bail!("the agent ran over a newer layout's pins") };
    let e = format!("{e:#}");
    ensure!(e.contains(&format!("newer than this agent's v{LAYOUT_VERSION}")), "{e}");
    ensure!(e.contains(&newer.display().to_string()), "{e}");
    ensure!(newer.exists(), "the newer layout's directory was removed");
    ensure!(!bpffs.join("links").exists(), "links were made over a newer layout");
    ensure!(!bpffs.join(format!("maps/v{LAYOUT_VERSION}")).exists(), "own maps were pinned");
    Ok(())
}

/// The kubelet's systemd-driver cgroup of a burstable pod, with one container.
fn pod_cgroup(uid: &str) -> PathBuf {
    let u = uid.replace('-', "_");
    Path::new(&format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"))
        .join("cri-containerd-5f6e7d.scope")
}

fn pod_object(name: &str, ip: std::net::Ipv4Addr, uid: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "uid": uid, "labels": {}},
        "spec": {"nodeName": "node1", "serviceAccountName": name,
                 "containers": [{"name": "app", "ports": [{"containerPort": PORT}]}]},
        "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]},
    })
}

/// Kubernetes mode, the new instance's first sync held back by the API server: for that whole
/// time the older layout's programs stay attached and its pins stay (nothing of it is retired
/// before the new instance enforces), plaintext to the STRICT pod is refused and the enrolled
/// pod's connect()s stay captured; once the sync is let through the handover completes.
#[test]
fn in_kubernetes_mode_the_old_layout_stays_until_the_new_instance_has_synced() -> Result<()> {
    let mut bed = Testbed::new("layout-k8s")?;
    let node = bed.add_node("node1")?;
    let api = ApiServer::start()?;
    for path in [
        api::NAMESPACES,
        api::PODS,
        api::SERVICES,
        api::ENDPOINTSLICES,
        api::PEERAUTHENTICATIONS_V1,
    ] {
        api.serve(path);
    }
    api.apply(api::NAMESPACES, api::namespace(NS, true));
    api.apply(
        api::PEERAUTHENTICATIONS_V1,
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
               "metadata": {"name": "default", "namespace": NS}, "spec": {"mtls": {"mode": "STRICT"}}}),
    );
    let mut servers = Vec::new();
    for (n, name) in ["client", "server"].iter().enumerate() {
        let uid = format!("{:08x}-7a1c-4f0e-8d2b-{:012x}", std::process::id(), n + 1);
        let pod = bed.add_pod_in_cgroup("node1", name, &pod_cgroup(&uid))?;
        servers.push(echo_server(&bed, name)?);
        api.apply(api::PODS, pod_object(name, pod.ip, &uid));
    }
    bed.add_pod("node1", "outsider")?;
    servers.push(echo_server(&bed, "outsider")?);
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let ca = CaDir::init(&format!("{}-k8s", bed.id()), "cluster.local")?;
    let mut opts = AgentOptions::kubernetes("node1", &kubeconfig, &node.cgroup);
    opts.ca_dir = Some(ca.path.clone());
    opts.cgroup = Some(node.cgroup.join("agent"));

    let v1 = pin_layout_v1(&bed, &["client", "server"])?;
    let v1_counters = counters(&v1.maps.join(map_names::STATS))?;
    let v1_before = captured(&v1_counters)?;
    let server = format!("{}:{PORT}", bed.pod("server").ip);
    let outsider = format!("{}:{PORT}", bed.pod("outsider").ip);
    let attacker = attempts(&bed, "outsider", &server, 800, 300)?;
    let client = attempts(&bed, "client", &outsider, 800, 300)?;
    api.hold_lists(true);
    let started = AgentProcess::start_unready(&bed, opts);
    let held = (|| -> Result<AgentProcess> {
        let agent = started?;
        agent.wait_log("map layout handover: own maps beside", Duration::from_secs(10))?;
        // Well into the wait for the first sync: the old layout is all still there.
        std::thread::sleep(Duration::from_millis(1500));
        ensure!(!agent.log().contains("map layout handover done"), "{}", agent.log());
        for link in &v1.links {
            ensure!(link.exists(), "{} retired before the first sync", link.display());
        }
        let (pins, _) = maps_entries(&v1.maps)?;
        ensure!(pins.contains(&map_names::ENROLLED.to_owned()), "layout 1's pins went: {pins:?}");
        Ok(agent)
    })();
    api.hold_lists(false);
    let agent = held?;
    agent.wait_log("map layout handover done", Duration::from_secs(15))?;
    ensure!(
        !attacker.stdout().contains("attempts ") && !client.stdout().contains("attempts "),
        "the attempts ended before the handover did: make them longer\nattacker: {}\nclient: {}",
        attacker.stdout(),
        client.stdout()
    );
    let (tried, ok) = tally(&attacker)?;
    ensure!(
        ok == 0,
        "{ok} of {tried} plaintext attempts reached the STRICT pod:\n{}",
        attacker.stdout()
    );
    every_connect_captured(&bed, &client, &v1_counters, v1_before)?;
    for link in &v1.links {
        ensure!(!link.exists(), "{} still pinned", link.display());
    }
    let (pins, _) = maps_entries(&v1.maps)?;
    ensure!(pins.is_empty(), "layout 1's pins left: {pins:?}");
    // Drop order: the agent and the servers before the bed.
    drop(agent);
    drop(servers);
    Ok(())
}

/// A pod the new instance cannot enroll again (what it is told is not a network namespace)
/// stays guarded and captured across the handover: its old inbound link stays, and once the
/// old node-wide programs are gone the new ones capture its connect()s from the state taken
/// over, so its plaintext is neither let in nor let out.
#[test]
fn a_pod_the_new_layout_cannot_enroll_again_stays_captured_and_strict_after_the_handover(
) -> Result<()> {
    let mut m = Mesh::build(
        "layout-keep",
        NS,
        &[("node1", "client"), ("node1", "server"), ("node1", "outsider")],
    )?;
    let (file, mut w) = m.workloads("workloads", &["client", "server"])?;
    let not_netns = std::env::temp_dir().join(format!("{}-not-a-netns", m.bed.id()));
    fs::write(&not_netns, b"")?;
    m.files.push(not_netns.clone());
    for e in &mut w.workloads {
        if e.name == "server" {
            e.netns = not_netns.clone();
        }
    }
    w.write(&file)?;
    let policies = PolicyDir::new(m.bed.id())?;
    policies.write("ns.yaml", &namespace_pa(NS, "STRICT"))?;
    let ca = m.ca("ca")?;
    let v1 = pin_layout_v1(&m.bed, &["client", "server"])?;
    let server_cookie = netns_cookie(&m.bed, "server")?;
    let agent = AgentProcess::start(&m.bed, agent_options(&m, &file, &ca, &policies.0))?;
    agent.wait_log("map layout handover done", Duration::from_secs(10))?;

    // The old node-wide links are gone; the server's old inbound link is what guards it.
    let (pod_links, node_links): (Vec<&PathBuf>, Vec<&PathBuf>) = v1
        .links
        .iter()
        .partition(|l| l.file_name().is_some_and(|n| n.to_string_lossy().starts_with("inbound_")));
    for link in node_links {
        ensure!(!link.exists(), "{} still pinned", link.display());
    }
    let kept: Vec<&&PathBuf> = pod_links.iter().filter(|l| l.exists()).collect();
    ensure!(
        kept.len() == 1 && kept[0].to_string_lossy().contains(&format!("inbound_{server_cookie}_")),
        "old inbound links left: {kept:?}"
    );
    ensure!(
        agent.log().contains("older inbound links stay on pods not enrolled again"),
        "{}",
        agent.log()
    );
    let own_counters = counters(
        &m.bed.bpffs_dir("node1").join(format!("maps/v{LAYOUT_VERSION}/{}", map_names::STATS)),
    )?;
    let before = captured(&own_counters)?;
    let server = m.dst("server");
    let outsider = m.dst("outsider");
    let (out, ok) =
        m.client("outsider", &["--connect", &server, "--message", "x", "--timeout-ms", "500"])?;
    ensure!(!ok, "plaintext reached the pod not enrolled again: {out}");
    let (out, ok) =
        m.client("server", &["--connect", &outsider, "--message", "x", "--timeout-ms", "500"])?;
    ensure!(!ok, "the pod not enrolled again reached {outsider}: {out}");
    ensure!(captured(&own_counters)? == before + 1, "its connect() was not captured");
    ensure!(
        m.accepted("server") == 0 && m.accepted("outsider") == 0,
        "a connection got through; agent log:\n{}",
        agent.log()
    );
    Ok(())
}

/// Kills and reaps a child on every way out of the test.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Attaches layout 1's inbound program to `pod` again, as the old agent's `attach_inbound`
/// does (it replaces any link of another generation), and removes the others of that pod.
fn put_back_v1_inbound(bed: &Testbed, maps: &Path, pod: &str) -> Result<PathBuf> {
    let cookie = netns_cookie(bed, pod)?;
    let links_dir = bed.bpffs_dir("node1").join("links");
    let prefix = format!("inbound_{cookie}_");
    let mut per_pod = EbpfLoader::new()
        .override_global("POD_COOKIE", &cookie, true)
        .default_map_pin_directory(maps)
        .load(V1_OBJECT)?;
    let prog: &mut SkLookup =
        per_pod.program_mut(prog_names::INBOUND).context("inbound")?.try_into()?;
    prog.load()?;
    let id = prog.attach(fs::File::open(&bed.pod(pod).netns)?)?;
    let link: FdLink = prog.take_link(id)?.into();
    let path = links_dir.join(format!("{prefix}7"));
    link.pin(&path)?;
    for e in fs::read_dir(&links_dir)? {
        let p = e?.path();
        if p != path && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)) {
            fs::remove_file(&p)?;
        }
    }
    Ok(path)
}

/// A surge rollout: the old (layout 1) agent still runs beside the new one. While it does, the
/// new one keeps layout 1 attached and pinned (the old agent may put its inbound program back
/// on a pod, reading layout 1's maps), and STRICT holds; the old agent does put one back. Once
/// it is gone the handover ends, and the pod it touched gets this layout's inbound link again.
#[test]
fn the_handover_waits_while_the_old_agent_still_runs_and_reattaches_what_it_put_back() -> Result<()>
{
    let mut m = Mesh::build(
        "layout-surge",
        NS,
        &[("node1", "client"), ("node1", "server"), ("node1", "outsider")],
    )?;
    let (workloads, _) = m.workloads("workloads", &["client", "server"])?;
    let policies = PolicyDir::new(m.bed.id())?;
    policies.write("ns.yaml", &namespace_pa(NS, "STRICT"))?;
    let ca = m.ca("ca")?;
    let v1 = pin_layout_v1(&m.bed, &["client", "server"])?;
    // The old agent: a process of ours, its pid and a cgroup id in layout 1's map.
    let old_agent = Child(Command::new("sleep").arg("120").spawn()?);
    let mut agent_ids: HashMap<MapData, u64, u32> = HashMap::try_from(Map::HashMap(
        MapData::from_pin(v1.maps.join(map_names::AGENT_CGROUPS))?,
    ))?;
    agent_ids.insert(u64::MAX - 7, old_agent.0.id(), 0)?;
    let server = m.dst("server");
    let agent = AgentProcess::start(&m.bed, agent_options(&m, &workloads, &ca, &policies.0))?;
    // (Started: ready, its first reconcile done.)
    // The old agent re-attaches its inbound program to the server (a retry of its own).
    let put_back = put_back_v1_inbound(&m.bed, &v1.maps, "server")?;
    // Past more than one retry tick of the new agent: layout 1 is all still there.
    std::thread::sleep(Duration::from_millis(4500));
    let log = agent.log();
    ensure!(!log.contains("map layout handover done"), "done while the old agent runs:\n{log}");
    ensure!(log.contains("map layout handover waits"), "{log}");
    for link in v1.links.iter().filter(|l| !l.to_string_lossy().contains("inbound_")) {
        ensure!(link.exists(), "{} detached while the old agent runs", link.display());
    }
    ensure!(put_back.exists(), "the old agent's inbound link went while it runs");
    let (pins, _) = maps_entries(&v1.maps)?;
    for name in [map_names::ENROLLED, map_names::INBOUND] {
        ensure!(pins.contains(&name.to_owned()), "layout 1's {name} unpinned: {pins:?}");
    }
    let (out, ok) =
        m.client("outsider", &["--connect", &server, "--message", "x", "--timeout-ms", "500"])?;
    ensure!(!ok, "plaintext reached the STRICT pod while both agents run: {out}");
    ensure!(m.accepted("server") == 0, "the STRICT pod's app accepted plaintext");

    // The old agent exits: the handover ends, its inbound link is replaced by ours.
    drop(old_agent);
    agent.wait_log("map layout handover done", Duration::from_secs(10))?;
    for link in &v1.links {
        ensure!(!link.exists(), "{} still pinned", link.display());
    }
    ensure!(!put_back.exists(), "the old agent's inbound link stays after the handover");
    let cookie = netns_cookie(&m.bed, "server")?;
    let ours = fs::read_dir(m.bed.bpffs_dir("node1").join("links"))?
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with(&format!("inbound_{cookie}_")));
    ensure!(ours, "the server has no inbound link of the new agent");
    let (pins, _) = maps_entries(&v1.maps)?;
    ensure!(pins.is_empty(), "layout 1's pins left: {pins:?}");
    let (out, ok) = m.client("client", &["--connect", &server, "--message", "hello"])?;
    ensure!(ok && out.contains("server:hello"), "client -> server through the mesh: {out}");
    let (out, ok) =
        m.client("outsider", &["--connect", &server, "--message", "x", "--timeout-ms", "500"])?;
    ensure!(!ok, "plaintext reached the STRICT pod after the handover: {out}");
    drop(agent);
    Ok(())
}

/// A restart mid-handover (the new instance crashed while the old agent still runs, layout 1
/// still pinned) must not copy layout 1's state over its live maps again: layout 1 says
/// PERMISSIVE for the server (stale), the live policy says STRICT. While the restarted
/// instance waits for its first sync, an attacker's plaintext to the server stays refused.
#[test]
fn a_restart_mid_handover_keeps_the_live_rules_not_the_older_layouts() -> Result<()> {
    let mut bed = Testbed::new("layout-rst")?;
    let node = bed.add_node("node1")?;
    let api = ApiServer::start()?;
    for path in [
        api::NAMESPACES,
        api::PODS,
        api::SERVICES,
        api::ENDPOINTSLICES,
        api::PEERAUTHENTICATIONS_V1,
    ] {
        api.serve(path);
    }
    api.apply(api::NAMESPACES, api::namespace(NS, true));
    api.apply(
        api::PEERAUTHENTICATIONS_V1,
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
               "metadata": {"name": "default", "namespace": NS}, "spec": {"mtls": {"mode": "STRICT"}}}),
    );
    let mut servers = Vec::new();
    let uid = format!("{:08x}-7a1c-4f0e-8d2b-{:012x}", std::process::id(), 9);
    let pod = bed.add_pod_in_cgroup("node1", "server", &pod_cgroup(&uid))?;
    servers.push(echo_server(&bed, "server")?);
    api.apply(api::PODS, pod_object("server", pod.ip, &uid));
    bed.add_pod("node1", "outsider")?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let ca = CaDir::init(&format!("{}-k8s", bed.id()), "cluster.local")?;
    let opts = |cgroup: &str| {
        let mut o = AgentOptions::kubernetes("node1", &kubeconfig, &node.cgroup);
        o.ca_dir = Some(ca.path.clone());
        o.cgroup = Some(node.cgroup.join(cgroup));
        o
    };

    let v1 = pin_layout_v1(&bed, &["server"])?;
    // Layout 1's rules for the server are stale: PERMISSIVE.
    let cookie = netns_cookie(&bed, "server")?;
    let mut v1_inbound: HashMap<MapData, PortKey, PortPolicy> =
        HashMap::try_from(Map::HashMap(MapData::from_pin(v1.maps.join(map_names::INBOUND))?))?;
    let key = PortKey { netns_cookie: cookie, port: 0, _pad: [0; 3] };
    v1_inbound.insert(key, PortPolicy { mode: MODE_PERMISSIVE, ..PortPolicy::default() }, 0)?;
    // The old agent keeps running, so the handover stays open.
    let old_agent = Child(Command::new("sleep").arg("120").spawn()?);
    let mut agent_ids: HashMap<MapData, u64, u32> = HashMap::try_from(Map::HashMap(
        MapData::from_pin(v1.maps.join(map_names::AGENT_CGROUPS))?,
    ))?;
    agent_ids.insert(u64::MAX - 7, old_agent.0.id(), 0)?;

    let server = format!("{}:{PORT}", bed.pod("server").ip);
    let mut agent = AgentProcess::start(&bed, opts("agent"))?;
    agent.wait_log("map layout handover waits", Duration::from_secs(15))?;
    let probe = |what: &str| -> Result<()> {
        let mut cmd = Command::new(testbed::e2e_tool_path()?);
        cmd.args(["client", "--connect", &server, "--message", "x", "--timeout-ms", "500"]);
        let out = bed.spawn_in_pod("outsider", cmd)?.wait_with_output(Duration::from_secs(10))?;
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(!out.contains("server:x"), "plaintext reached the STRICT pod {what}: {out}");
        Ok(())
    };
    probe("under the new instance")?;
    // It crashes; the next start finds `maps/v2` and layout 1 both, and the API server slow.
    agent.kill()?;
    api.hold_lists(true);
    let checked = (|| -> Result<AgentProcess> {
        let agent = AgentProcess::start_unready(&bed, opts("agent-restarted"))?;
        agent.wait_log("eBPF capture attached", Duration::from_secs(10))?;
        for _ in 0..5 {
            probe("while the restarted instance waits for its first sync")?;
            std::thread::sleep(Duration::from_millis(200));
        }
        let log = agent.log();
        ensure!(!log.contains("handover done"), "the handover ended early:\n{log}");
        ensure!(log.contains("map layout handover resumed"), "{log}");
        ensure!(!log.contains("took over the enforcement state"), "{log}");
        Ok(agent)
    })();
    api.hold_lists(false);
    drop(agent);
    drop(checked?);
    drop(old_agent);
    drop(servers);
    Ok(())
}
