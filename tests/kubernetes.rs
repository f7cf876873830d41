//! Kubernetes mode on the test bed. Runs as root.
//!
//! - A pod's network namespace is found through the kubelet's cgroup layouts (systemd and
//!   cgroupfs drivers, every QoS class), from a process in a container cgroup below the pod's.
//! - The agent, started without `--workloads`, learns its node's pods from an API server and
//!   carries a captured connection between two of them in mutual TLS. There is no API server
//!   on this machine: `testbed::apiserver` is a scripted stand-in that answers list and watch.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use mtls_agent::kubernetes::{NetnsError, PodCgroups};
use serde_json::json;
use testbed::{
    agent::{AgentOptions, AgentProcess, CaDir},
    apiserver::{self as api, ApiServer},
    Pod, PodProcess, Testbed,
};

const NS: &str = "shop";
use testbed::mesh::{echo_server, PORT};

/// A uid in the API server's format (uuid), distinct per pod of a test.
fn uid(n: u32) -> String {
    format!("{:08x}-5e3a-4c1d-9b7e-{:012x}", std::process::id(), n)
}

fn systemd_cgroup(qos: Option<&str>, uid: &str) -> PathBuf {
    let u = uid.replace('-', "_");
    let pod = match qos {
        Some(q) => format!("kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{u}.slice"),
        None => format!("kubepods.slice/kubepods-pod{u}.slice"),
    };
    Path::new(&pod).join("cri-containerd-0a1b2c.scope")
}

fn cgroupfs_cgroup(qos: Option<&str>, uid: &str) -> PathBuf {
    let pod = match qos {
        Some(q) => format!("kubepods/{q}/pod{uid}"),
        None => format!("kubepods/pod{uid}"),
    };
    Path::new(&pod).join("0a1b2c3d4e5f")
}

fn sleeper(bed: &Testbed, pod: &str) -> Result<PodProcess> {
    let mut cmd = Command::new("sleep");
    cmd.arg("120");
    bed.spawn_in_pod(pod, cmd)
}

#[test]
fn netns_is_found_through_the_kubepods_cgroups_of_both_drivers() -> Result<()> {
    let mut bed = Testbed::new("k8s-netns")?;
    let node = bed.add_node("n1")?;
    let layouts = [
        ("sd-burstable", systemd_cgroup(Some("burstable"), &uid(1)), uid(1)),
        ("sd-besteffort", systemd_cgroup(Some("besteffort"), &uid(2)), uid(2)),
        ("sd-guaranteed", systemd_cgroup(None, &uid(3)), uid(3)),
        ("fs-burstable", cgroupfs_cgroup(Some("burstable"), &uid(4)), uid(4)),
        ("fs-guaranteed", cgroupfs_cgroup(None, &uid(5)), uid(5)),
    ];
    let mut procs = Vec::new();
    for (name, rel, _) in &layouts {
        bed.add_pod_in_cgroup("n1", name, rel)?;
        procs.push(sleeper(&bed, name)?);
    }
    let cgroups = PodCgroups::new(&node.cgroup, "/proc");
    for (name, _, uid) in &layouts {
        // Its processes are no sandbox (pause): the namespace holding the pod's IP is taken.
        let ip = std::net::IpAddr::V4(bed.pod(name).ip);
        let netns = cgroups.open_sandbox(uid, &[ip]).with_context(|| format!("pod {name}"))?;
        let want = std::fs::metadata(&bed.pod(name).netns)?;
        let got = netns.file().metadata()?;
        ensure!(
            (got.dev(), got.ino()) == (want.dev(), want.ino()),
            "pod {name}: found the wrong namespace ({})",
            netns.path().display()
        );
    }

    // A pod whose cgroup has no process yet: a clear error, not a wrong namespace.
    bed.add_pod_in_cgroup("n1", "empty", &systemd_cgroup(Some("burstable"), &uid(6)))?;
    let err = cgroups.open_netns(&uid(6)).expect_err("no process to find");
    ensure!(matches!(err, NetnsError::NoProcess { .. }), "{err}");
    ensure!(err.to_string().contains(&uid(6)) && err.to_string().contains("no process"), "{err}");
    // A pod the kubelet has no cgroup for.
    let err = cgroups.open_netns(&uid(7)).expect_err("no cgroup");
    ensure!(matches!(err, NetnsError::NoCgroup { .. }), "{err}");
    drop(procs);
    Ok(())
}

fn pod_object(pod: &Pod, uid: &str, node: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": NS, "uid": uid, "labels": {"app": pod.name}},
        "spec": {"nodeName": node, "serviceAccountName": pod.name,
                 "containers": [{"name": "app", "ports": [{"containerPort": PORT}]}]},
        "status": {"phase": "Running", "podIP": pod.ip.to_string()},
    })
}

fn client(bed: &Testbed, pod: &str, dst: &Pod, message: &str) -> Result<String> {
    let mut cmd = Command::new(testbed::e2e_tool!());
    cmd.args(["client", "--connect", &format!("{}:{PORT}", dst.ip), "--message", message]);
    let out = bed.spawn_in_pod(pod, cmd)?.wait_with_output(Duration::from_secs(30))?;
    ensure!(out.status.success(), "client in {pod}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[test]
fn the_agent_in_kubernetes_mode_enrolls_its_pods_and_carries_them_in_mtls() -> Result<()> {
    let mut bed = Testbed::new("k8s-agent")?;
    let node = bed.add_node("node1")?;
    let a = bed.add_pod_in_cgroup("node1", "a", &systemd_cgroup(Some("burstable"), &uid(1)))?;
    let b = bed.add_pod_in_cgroup("node1", "b", &cgroupfs_cgroup(Some("besteffort"), &uid(2)))?;
    let _servers = [echo_server(&bed, "a")?, echo_server(&bed, "b")?];

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
    // Nothing is in the mesh unless opted in: the namespace is.
    server.apply(api::NAMESPACES, api::namespace(NS, true));
    server.apply(api::PODS, pod_object(&a, &uid(1), "node1"));
    server.apply(api::PODS, pod_object(&b, &uid(2), "node1"));
    // A pod of another node: known, never enrolled here.
    let remote = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "remote", "namespace": NS, "uid": uid(9)},
        "spec": {"nodeName": "node2", "containers": [{"name": "app"}]},
        "status": {"phase": "Running", "podIP": "10.250.0.9"},
    });
    server.apply(api::PODS, remote);
    server.apply(
        api::PEERAUTHENTICATIONS_V1,
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
               "metadata": {"name": "default", "namespace": NS},
               "spec": {"mtls": {"mode": "STRICT"}}}),
    );
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;
    let ca = CaDir::init(&format!("{}-k8s", bed.id()), "cluster.local")?;
    let mut opts = AgentOptions::kubernetes("node1", &kubeconfig, &node.cgroup);
    opts.ca_dir = Some(ca.path.clone());
    // Ready only once synced and both pods are enrolled.
    let agent = AgentProcess::start(&bed, opts)?;
    let (ready, detail) = agent.readiness()?;
    ensure!(ready && detail.contains("2 of 2 pods enrolled"), "{detail}");

    let capture = bed.start_capture()?;
    let canary = "CANARY-k8s-mode-3d9c1";
    let out = client(&bed, "a", &b, canary)?;
    ensure!(out == format!("b:{canary}"), "{out}");
    let record = agent.wait_connection(Duration::from_secs(5), |c| {
        c["direction"] == "inbound" && c["destinationPod"] == "b.shop"
    })?;
    ensure!(record["mode"] == "mTLS", "{record}");
    ensure!(record["peerIdentity"] == "spiffe://cluster.local/ns/shop/sa/a", "{record}");
    ensure!(!capture.contains(canary.as_bytes()), "plaintext on the fabric");

    // A lost watch (410 Gone) relists; enrolled pods stay enrolled throughout.
    let lists = server.lists(api::PODS);
    server.expire(api::PODS);
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.lists(api::PODS) == lists {
        ensure!(Instant::now() < deadline, "no relist after 410 Gone");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    ensure!(!agent.log().contains("released"), "a relist released pods:\n{}", agent.log());
    let out = client(&bed, "a", &b, "after-relist")?;
    ensure!(out == "b:after-relist", "{out}");

    // Deleting the pod from the API server releases it.
    ensure!(server.delete(api::PODS, Some(NS), "b"));
    agent.wait_log("released", Duration::from_secs(10))?;
    let (_, detail) = agent.readiness()?;
    ensure!(detail.contains("1 of 1 pods enrolled"), "{detail}");
    Ok(())
}
