//! Uninstall is a supported path. Runs as root.
//!
//! An agent that is gone (its DaemonSet deleted: SIGTERM; or crashed: SIGKILL) leaves its pods
//! failing closed, and that lasts: a mistaken delete must not open the mesh. The way out is
//! `mtls-agent uninstall`, which undoes everything the agent set up, in the pods' namespaces
//! too (their inbound `sk_lookup` programs, `tcp_migrate_req`), reports it, and is idempotent.

use std::{fs::File, os::fd::AsRawFd, path::Path, process::Output, time::Duration};

use anyhow::{ensure, Context, Result};
use testbed::{
    agent::agent_bin,
    mesh::{namespace_pa, Mesh, PolicyDir},
};

const NS: &str = "shop";
/// How long the test watches the pods stay closed with no agent.
const CLOSED_FOR: Duration = Duration::from_secs(3);

/// Programs attached to a network namespace's `sk_lookup` hook (`BPF_PROG_QUERY`).
fn sk_lookup_programs(netns: &Path) -> Result<u32> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_SK_LOOKUP: u32 = 36;
    #[repr(C)]
    #[derive(Default)]
    struct Query {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
    }
    let f = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    let mut q =
        Query { target_fd: f.as_raw_fd() as u32, attach_type: BPF_SK_LOOKUP, ..Query::default() };
    // SAFETY: a valid bpf_attr prefix for BPF_PROG_QUERY (no id buffer: the count only).
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, &mut q as *mut Query, size_of::<Query>())
    };
    ensure!(rc == 0, "BPF_PROG_QUERY: {}", std::io::Error::last_os_error());
    Ok(q.prog_cnt)
}

fn migrate_req(m: &Mesh, pod: &str) -> Result<String> {
    let v = m
        .bed
        .in_pod_netns(pod, || std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req"))??;
    Ok(v.trim().to_owned())
}

fn uninstall(bpffs: &Path) -> Result<Output> {
    Ok(std::process::Command::new(agent_bin())
        .args(["uninstall", "--node", "node1", "--bpffs"])
        .arg(bpffs)
        .output()?)
}

/// The client's connection to the server and the outsider's plaintext are both refused.
fn assert_closed(m: &Mesh, when: &str) -> Result<()> {
    let dst = m.dst("server");
    let (out, ok) = m.client("client", &["--connect", &dst, "--message", "x"])?;
    ensure!(!ok && !out.contains("server:x"), "{when}: the client's outbound went through: {out}");
    let (out, ok) = m.client("outsider", &["--connect", &dst, "--message", "plain"])?;
    ensure!(!ok && !out.contains("server:plain"), "{when}: plaintext reached STRICT server: {out}");
    Ok(())
}

fn the_agent_gone_keeps_pods_closed_until_uninstall(test: &str, sigkill: bool) -> Result<()> {
    let mut m =
        Mesh::build(test, NS, &[("node1", "client"), ("node1", "server"), ("node1", "outsider")])?;
    let (file, _) = m.workloads("workloads", &["client", "server"])?;
    let policies = PolicyDir::new(m.bed.id())?;
    policies.write("ns.yaml", &namespace_pa(NS, "STRICT"))?;
    let ca = m.ca("ca")?;
    let dir = policies.0.display().to_string();
    m.start_agent("node1", &file, &ca, &["--policies", &dir])?;
    let (out, ok) = m.client("client", &["--connect", &m.dst("server"), "--message", "mesh"])?;
    ensure!(ok && out == "server:mesh", "{out}");
    let bpffs = m.agent("node1").bpffs.clone();
    // What the agent set up in the pods' namespaces.
    for pod in ["client", "server"] {
        let netns = m.bed.pod(pod).netns.clone();
        ensure!(sk_lookup_programs(&netns)? >= 1, "{pod}: no inbound program while enrolled");
        ensure!(migrate_req(&m, pod)? == "1", "{pod}: tcp_migrate_req not set by the agent");
    }
    ensure!(sk_lookup_programs(&m.bed.pod("outsider").netns)? == 0, "the outsider is enrolled");

    let agent = m.agents.get_mut("node1").context("agent")?;
    if sigkill {
        agent.kill()?;
    } else {
        let status = agent.terminate()?;
        ensure!(status.success(), "the agent exited with {status}");
    }
    // No agent: the pods stay closed, and keep so.
    assert_closed(&m, "right after the agent went")?;
    std::thread::sleep(CLOSED_FOR);
    assert_closed(&m, &format!("{CLOSED_FOR:?} after the agent went"))?;
    ensure!(bpffs.exists(), "the pins went with the agent");

    let out = uninstall(&bpffs)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "uninstall: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    ensure!(stdout.contains("2 pod inbound (sk_lookup) program(s)"), "{stdout}");
    ensure!(stdout.contains("tcp_migrate_req off again in 2 pod namespace(s)"), "{stdout}");
    ensure!(stdout.contains("uninstall complete"), "{stdout}");
    ensure!(!bpffs.exists(), "pins left under {}", bpffs.display());
    // Nothing of the agent is left in the pods' namespaces.
    for pod in ["client", "server"] {
        let netns = m.bed.pod(pod).netns.clone();
        ensure!(sk_lookup_programs(&netns)? == 0, "{pod}: an inbound program is still attached");
        ensure!(migrate_req(&m, pod)? == "0", "{pod}: tcp_migrate_req still as the agent set it");
    }
    // Pods connect directly again: no capture, no STRICT.
    let dst = m.dst("server");
    let (out, ok) = m.client("client", &["--connect", &dst, "--message", "direct"])?;
    ensure!(ok && out == "server:direct", "{out}");
    let (out, ok) = m.client("outsider", &["--connect", &dst, "--message", "plain"])?;
    ensure!(ok && out == "server:plain", "{out}");

    // Idempotent: a second run finds nothing and says so.
    let out = uninstall(&bpffs)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "second uninstall: {stdout}");
    ensure!(stdout.contains("nothing to uninstall"), "{stdout}");
    let verify = std::process::Command::new(agent_bin())
        .args(["uninstall", "--node", "node1", "--verify", "--bpffs"])
        .arg(&bpffs)
        .output()?;
    ensure!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    Ok(())
}

#[test]
fn after_sigterm_pods_stay_closed_until_uninstall_which_undoes_everything() -> Result<()> {
    the_agent_gone_keeps_pods_closed_until_uninstall("uninst-term", false)
}

#[test]
fn after_sigkill_pods_stay_closed_until_uninstall_which_undoes_everything() -> Result<()> {
    the_agent_gone_keeps_pods_closed_until_uninstall("uninst-kill", true)
}

#[test]
fn verify_fails_and_uninstall_is_refused_while_the_agent_runs() -> Result<()> {
    let mut m = Mesh::build("uninst-verify", NS, &[("node1", "server")])?;
    let (file, _) = m.workloads("workloads", &["server"])?;
    let ca = m.ca("ca")?;
    m.start_agent("node1", &file, &ca, &[])?;
    let bpffs = m.agent("node1").bpffs.clone();
    let verify = std::process::Command::new(agent_bin())
        .args(["uninstall", "--node", "node1", "--verify", "--bpffs"])
        .arg(&bpffs)
        .output()?;
    let stderr = String::from_utf8_lossy(&verify.stderr);
    ensure!(!verify.status.success() && stderr.contains("pins remain"), "{stderr}");
    // Uninstalling under a running agent is refused, and changes nothing.
    let out = uninstall(&bpffs)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && stderr.contains("still running"), "{stderr}");
    ensure!(bpffs.join("maps").exists(), "the pins went under a running agent");
    ensure!(sk_lookup_programs(&m.bed.pod("server").netns)? >= 1, "inbound program detached");
    Ok(())
}

#[test]
fn a_pod_released_while_it_lives_gets_its_namespace_back() -> Result<()> {
    let mut m = Mesh::build("uninst-release", NS, &[("node1", "client"), ("node1", "server")])?;
    let (file, _) = m.workloads("workloads", &["client", "server"])?;
    let ca = m.ca("ca")?;
    m.start_agent("node1", &file, &ca, &[])?;
    ensure!(migrate_req(&m, "client")? == "1", "tcp_migrate_req not set by the agent");
    ensure!(sk_lookup_programs(&m.bed.pod("client").netns)? >= 1, "no inbound program");
    // The client leaves the mesh; its pod goes on.
    let mut w = testbed::agent::WorkloadsFile::default();
    w.workloads.push(testbed::agent::WorkloadEntry::of(m.bed.pod("server"), NS));
    w.write(&file)?;
    m.agent("node1").wait_log("released", Duration::from_secs(10))?;
    ensure!(migrate_req(&m, "client")? == "0", "tcp_migrate_req left on in a released pod");
    ensure!(sk_lookup_programs(&m.bed.pod("client").netns)? == 0, "inbound program left");
    ensure!(migrate_req(&m, "server")? == "1", "the pod still enrolled lost its setting");
    Ok(())
}
