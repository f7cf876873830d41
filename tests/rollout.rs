//! End-to-end: a surge rollout (`maxSurge: 1, maxUnavailable: 0`) on one node. The old and the
//! new agent instance run side by side in two cgroups, as the containers of the old and the new
//! DaemonSet pod do, and the kubelet's exec probe (`mtls-agent probe ready|live`, run in a
//! container's cgroup) reaches that container's instance only: the new pod is not ready until
//! its own first sync, whatever the old one says, and once the old one is gone its probe fails
//! instead of being answered by the new one. Kubernetes mode against `testbed::apiserver`, whose
//! lists are held back to keep the new instance's first sync waiting. Runs as root.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use testbed::{
    agent::{agent_bin, AdminFlags, AgentOptions, AgentProcess, CaDir},
    apiserver::{self as api, ApiServer},
    mesh::{echo_server, PORT},
    Testbed,
};

const NS: &str = "shop";
/// Unique to this suite: the instances use the default socket directory of the node,
/// /run/mtls-agent/<node>, shared by both as the DaemonSet's hostPath is.
const NODE: &str = "rollout-node";

fn uid() -> String {
    format!("{:08x}-7a1c-4f0e-8d2b-000000000001", std::process::id())
}

fn pod_object(name: &str, ip: Ipv4Addr, uid: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "uid": uid, "labels": {}},
        "spec": {"nodeName": NODE, "serviceAccountName": name,
                 "containers": [{"name": "app", "ports": [{"containerPort": PORT}]}]},
        "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]},
    })
}

/// `mtls-agent probe <kind> --node NODE` run in `cgroup`, as the kubelet execs it in a
/// container: (exit 0, stdout and stderr).
fn probe(bed: &Testbed, cgroup: &Path, kind: &str) -> Result<(bool, String)> {
    let mut cmd = Command::new(agent_bin());
    cmd.args(["probe", kind, "--node", NODE]);
    let out =
        bed.spawn_in_node_cgroup(NODE, cgroup, cmd)?.wait_with_output(Duration::from_secs(10))?;
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text.trim().to_owned()))
}

/// Waits (bounded) until the readiness probe in `cgroup` answers `ready` and says `needle`.
fn wait_probe(bed: &Testbed, cgroup: &Path, ready: bool, needle: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (ok, text) = probe(bed, cgroup, "ready")?;
        if ok == ready && text.contains(needle) {
            return Ok(text);
        }
        if Instant::now() > deadline {
            bail!(
                "probe in {} never answered ready={ready} with {needle:?}: {text}",
                cgroup.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn in_a_surge_handover_each_instance_is_probed_alone_and_the_new_one_is_ready_on_its_own_sync(
) -> Result<()> {
    let mut bed = Testbed::new("rollout-surge")?;
    let node = bed.add_node(NODE)?;
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
    api.apply(
        api::NAMESPACES,
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": NS, "labels": {"istio.io/dataplane-mode": "ambient"}}}),
    );
    let uid = uid();
    let rel = PathBuf::from(format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-5f6e7d.scope",
        uid.replace('-', "_")
    ));
    let pod = bed.add_pod_in_cgroup(NODE, "web", &rel)?;
    let _server = echo_server(&bed, "web")?;
    api.apply(api::PODS, pod_object("web", pod.ip, &uid));
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let ca = CaDir::init(&format!("{}-k8s", bed.id()), "cluster.local")?;
    let options = |container: &str| {
        let mut o = AgentOptions::kubernetes(NODE, &kubeconfig, &node.cgroup);
        o.ca_dir = Some(ca.path.clone());
        o.admin = AdminFlags::Defaults;
        // The agent pods' containers, under the pods' cgroup as in a cluster.
        o.cgroup = Some(node.cgroup.join(container));
        o
    };
    let (old_cg, new_cg) = (node.cgroup.join("agent-old"), node.cgroup.join("agent-new"));

    // The old pod: running and ready, by its own probe.
    let mut old = AgentProcess::start(&bed, options("agent-old"))?;
    let body = wait_probe(&bed, &old_cg, true, "1 of 1 pods enrolled")?;
    ensure!(body.starts_with("ready:"), "{body}");
    let (live, text) = probe(&bed, &old_cg, "live")?;
    ensure!(live, "old instance not live: {text}");

    // The new pod beside it, its first sync held back: its probe says so while the old pod's
    // stays ready. The shared TCP health port could answer for either.
    api.hold_lists(true);
    let new = AgentProcess::start_unready(&bed, options("agent-new"));
    let new = match new {
        Ok(a) => a,
        Err(e) => {
            api.hold_lists(false);
            return Err(e);
        }
    };
    let held = (|| -> Result<()> {
        let text = wait_probe(&bed, &new_cg, false, "waiting for the first sync")?;
        ensure!(text.contains("not ready"), "{text}");
        let (live, text) = probe(&bed, &new_cg, "live")?;
        ensure!(live, "the new instance answers while it waits: {text}");
        let (ok, text) = probe(&bed, &old_cg, "ready")?;
        ensure!(ok && text.contains("1 of 1 pods enrolled"), "old pod's probe: {text}");
        // Still not ready a while later: nothing but its own sync makes it ready.
        std::thread::sleep(Duration::from_millis(500));
        let (ok, text) = probe(&bed, &new_cg, "ready")?;
        ensure!(!ok && text.contains("waiting for the first sync"), "new pod's probe: {text}");
        Ok(())
    })();
    api.hold_lists(false);
    held.with_context(|| format!("new instance log:\n{}", new.log()))?;

    // Its own sync done: ready, and the pod is enrolled by it.
    wait_probe(&bed, &new_cg, true, "1 of 1 pods enrolled")
        .with_context(|| format!("new instance log:\n{}", new.log()))?;

    // The kubelet stops the old pod: its probe fails (no instance of its own), never answered
    // by the new one, whose probe stays ready.
    let status = old.terminate()?;
    ensure!(status.success(), "the old instance exited with {status}");
    let (ok, text) = probe(&bed, &old_cg, "ready")?;
    ensure!(!ok && text.contains("no agent instance of this container's cgroup"), "{text}");
    let (ok, text) = probe(&bed, &old_cg, "live")?;
    ensure!(!ok, "the old pod's liveness answered by another instance: {text}");
    let (ok, text) = probe(&bed, &new_cg, "ready")?;
    ensure!(ok && text.contains("1 of 1 pods enrolled"), "new pod's probe: {text}");
    // Drop order: the new agent (last, it removes the shared socket directory), the old one.
    drop(old);
    drop(new);
    Ok(())
}
