//! End-to-end: what STRICT covers, and what not, said where the operator looks (issue 14, item
//! 8). The agent captures and enforces TCP only, as ztunnel and Linkerd do: a non-mesh pod's UDP
//! datagrams reach a STRICT pod's UDP server, and `mtls-agent check` lists that server as not
//! covered instead of letting "STRICT" read as "everything encrypted". Runs as root.

use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::{Context, Result};
use serde_json::Value;
use testbed::{
    agent::agent_bin,
    e2e_tool_path,
    mesh::{namespace_pa, Mesh, PolicyDir},
    PodProcess,
};

const NS: &str = "scope";
const NOT_COVERED: &str = "not covered (UDP is not captured; plaintext)";

/// `mtls-agent ARGS --admin <node1's admin address>`: its stdout.
fn cli(m: &Mesh, args: &[&str]) -> Result<String> {
    let out = Command::new(agent_bin())
        .args(args)
        .args(["--admin", &m.agent("node1").admin.to_string()])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "mtls-agent {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A UDP echo server in `pod` on `listen`; returns once it is bound.
fn udp_echo(m: &Mesh, pod: &str, listen: &str) -> Result<PodProcess> {
    let mut cmd = Command::new(e2e_tool_path()?);
    cmd.args(["udp-echo", "--listen", listen, "--prefix", &format!("{pod}:")]);
    let p = m.bed.spawn_in_pod(pod, cmd)?;
    p.wait_for_stdout("listening", Duration::from_secs(5))?;
    Ok(p)
}

/// One datagram from `pod` to `dst`: (the reply or the error line, success).
fn udp_client(m: &Mesh, pod: &str, dst: SocketAddr, message: &str) -> Result<(String, bool)> {
    let mut cmd = Command::new(e2e_tool_path()?);
    cmd.args(["udp-client", "--connect", &dst.to_string(), "--message", message]);
    let out = m.bed.spawn_in_pod(pod, cmd)?.wait_with_output(Duration::from_secs(10))?;
    Ok((String::from_utf8_lossy(&out.stdout).trim().to_owned(), out.status.success()))
}

/// A hostile client outside the mesh reaches a STRICT pod over UDP in plaintext (the documented
/// scope: asserted so that a change of scope is noticed), while the same client's TCP is
/// refused; `check` for the pod lists each of its UDP listeners, IPv4 and IPv6, as not covered,
/// in table, JSON and YAML output.
#[test]
fn udp_to_a_strict_pod_is_not_covered_and_check_lists_its_udp_listeners() -> Result<()> {
    let mut m = Mesh::build("scope-udp", NS, &[("node1", "server"), ("node1", "outsider")])?;
    let (workloads, _) = m.workloads("workloads", &["server"])?;
    let policies = PolicyDir::new(m.bed.id())?;
    policies.write("ns.yaml", &namespace_pa(NS, "STRICT"))?;
    let ca = m.ca("ca")?;
    let dir = policies.0.display().to_string();
    m.start_agent("node1", &workloads, &ca, &["--policies", &dir])?;

    // STRICT is in force for TCP: the outsider's plaintext to the echo server is refused.
    let (out, ok) = m.client("outsider", &["--connect", &m.dst("server"), "--message", "tcp"])?;
    assert!(!ok, "plaintext TCP to a STRICT port was answered: {out}");

    let server = m.bed.pod("server").clone();
    let v4 = udp_echo(&m, "server", "0.0.0.0:5353")?;
    let _v6 = udp_echo(&m, "server", "[::]:5354")?;
    // UDP is not: the datagram reaches the app from the outsider's own address, unencrypted.
    let (reply, ok) = udp_client(&m, "outsider", SocketAddr::from((server.ip, 5353)), "hello")?;
    assert!(ok, "UDP to a STRICT pod's UDP server got no answer: {reply}");
    assert_eq!(reply, "server:hello");
    let outsider_ip = m.bed.pod("outsider").ip.to_string();
    assert!(
        v4.stdout().lines().any(|l| l.starts_with(&format!("datagram from {outsider_ip}:"))),
        "the server did not see the outsider as the sender: {}",
        v4.stdout()
    );

    // `check` says so, next to the TCP listeners STRICT covers.
    let table = cli(&m, &["check", &format!("server.{NS}")])?;
    for listener in ["UDP 0.0.0.0:5353", "UDP [::]:5354"] {
        let row = table.lines().find(|l| l.starts_with(listener));
        assert!(
            row.is_some_and(|r| r.contains(NOT_COVERED)),
            "no '{listener} ... {NOT_COVERED}' row:\n{table}"
        );
    }
    assert!(table.contains("yes (STRICT)"), "{table}");

    let json: Value =
        serde_json::from_str(&cli(&m, &["check", &format!("server.{NS}"), "-o", "json"])?)?;
    let udp = json["udpListeners"].as_array().context("no udpListeners")?;
    let listed: Vec<(&str, &Value, &str)> = udp
        .iter()
        .map(|u| {
            (
                u["address"].as_str().unwrap_or_default(),
                &u["covered"],
                u["mtls"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    // Exactly the app's two UDP sockets: the agent opens none in the pod, and TCP
    // sockets (the echo server on 8080, the agent's listeners) are not UDP listeners.
    assert_eq!(
        listed,
        [
            ("0.0.0.0:5353", &Value::Bool(false), NOT_COVERED),
            ("[::]:5354", &Value::Bool(false), NOT_COVERED)
        ],
        "{json:#}"
    );
    assert_eq!(json["udpNote"], Value::Null, "{json:#}");

    let yaml = cli(&m, &["check", &format!("server.{NS}"), "-o", "yaml"])?;
    assert!(yaml.contains("listener: UDP 0.0.0.0:5353") && yaml.contains(NOT_COVERED), "{yaml}");
    Ok(())
}
