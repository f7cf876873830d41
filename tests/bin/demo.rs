//! `cargo xtask demo`: the hipster-app mTLS workshop on this machine, no cluster. Two nodes, the
//! hipster-app pods as network namespaces + cgroups, one certificate service (`mtls-agent ca
//! serve`, the only holder of the CA key) and one agent per node, the workshop's STRICT
//! Policy from `policies/`, traffic shown encrypted, a pod outside the mesh refused, the policy
//! switched to PERMISSIVE and back, and `mtls-agent check` answering which policy decided.
//! Everything it builds is removed when it ends, however it ends.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{SigSet, Signal};
use testbed::{
    agent::{agent_bin, AgentProcess, ServiceEntry},
    certservice::CaService,
    mesh::{Mesh, PolicyDir},
};

const NS: &str = "hipster-app";
/// (pod, node, port) as in the hipster-app.
const PODS: &[(&str, &str, u16)] = &[
    ("frontend", "node1", 8080),
    ("cartservice", "node1", 7070),
    ("productcatalogservice", "node2", 3550),
    ("currencyservice", "node2", 7000),
    ("redis-cart", "node2", 6379),
];

/// Set when the demo is interrupted (Ctrl-C, SIGTERM): the next step stops, and the guards
/// remove everything it built.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn main() {
    // Only a waiter thread receives SIGINT/SIGTERM (children start with a clean signal mask), so
    // an interruption unwinds through the Drop guards instead of killing the process mid-way.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    if let Err(e) = signals.thread_block() {
        eprintln!("demo: cannot handle Ctrl-C ({e}); interrupting it may leave pods behind");
    }
    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            eprintln!("\n{sig}: stopping the demo and cleaning up");
            INTERRUPTED.store(true, Ordering::SeqCst);
        }
    });
    if let Err(e) = run() {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

fn step(title: &str) -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    println!("\n== {title}");
    Ok(())
}

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

fn run() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the demo builds network namespaces, cgroups and eBPF programs: run it as root");
    }
    step("two nodes; the hipster-app pods are network namespaces + cgroups on a bridge")?;
    let mut pods: Vec<(&str, &str)> = PODS.iter().map(|(p, n, _)| (*n, *p)).collect();
    pods.push(("node1", "outsider"));
    // Mesh::build starts an echo server on 8080 in every pod; the services map their ports to it.
    let mut m = Mesh::build("demo", NS, &pods)?;
    let (workloads, mut file) =
        m.workloads("workloads", &PODS.iter().map(|p| p.0).collect::<Vec<_>>())?;
    for (i, (pod, _, port)) in PODS.iter().enumerate().skip(1) {
        file.services.push(ServiceEntry {
            name: (*pod).into(),
            namespace: NS.into(),
            vip: Some(Ipv4Addr::new(10, 96, 0, 10 + i as u8)),
            selector: vec![("app".into(), (*pod).into())],
            ports: vec![(*port, 8080)],
        });
    }
    file.write(&workloads)?;
    for p in m.bed.pods() {
        let note = if p.name == "outsider" { "  (not in the mesh)" } else { "" };
        println!("  {:<34} {:<14} {}{note}", format!("{}.{NS}", p.name), p.ip, p.node);
    }

    step("the workshop's policy: policies/hipster-app-mtls.yaml")?;
    let policies = PolicyDir::new(m.bed.id())?;
    let strict = std::fs::read_to_string(policies_dir().join("hipster-app-mtls.yaml"))?;
    let permissive =
        std::fs::read_to_string(policies_dir().join("hipster-app-mtls-permissive.yaml"))?;
    policies.write("hipster-app-mtls.yaml", &strict)?;
    print!("{}", indent(&strict));

    step("mtls-agent ca serve: the only process with the CA key (Istio's CA protocol, gRPC over TLS)")?;
    let ca = m.ca("ca")?;
    let svc = CaService::start(m.bed.id(), &ca, &workloads, &["node1", "node2"])?;
    println!(
        "  listening on {}; each node's agent has a token and the trust bundle, no key",
        svc.addr
    );

    step("mtls-agent on each node: eBPF capture and enforcement, HBONE over mTLS")?;
    let dir = policies.0.display().to_string();
    for node in ["node1", "node2"] {
        m.start_agent_with_ca_service(node, &workloads, &svc, &["--policies", &dir])?;
        let a = m.agent(node);
        println!(
            "  {node}: admin {}, metrics {}, pins under {}",
            a.admin,
            a.metrics,
            a.bpffs.display()
        );
    }

    step("mtls-agent certs  (node1: keys made on the node, signed by the certificate service)")?;
    let t = Instant::now();
    let certs = loop {
        let out = cli(&m, "node1", &["certs"])?;
        if !out.contains("WAITING") || t.elapsed() > Duration::from_secs(10) {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    print!("{}", indent(&certs));

    step("frontend calls every backend by its service VIP; the fabric is captured meanwhile")?;
    let capture = m.bed.start_capture()?;
    let canary = "card-number-4111-1111";
    for svc in &file.services {
        let vip = svc.vip.context("demo services have VIPs")?;
        let dst = format!("{vip}:{}", svc.ports[0].0);
        let (reply, _) = m.client("frontend", &["--connect", &dst, "--message", canary])?;
        println!("  frontend -> {:<24} {:<17} {}", svc.name, dst, reply);
    }
    println!(
        "  fabric capture: {} frames; the plaintext {canary:?} seen: {}; TLS records seen: {}",
        capture.frames(),
        capture.contains(canary.as_bytes()),
        capture.contains(&[0x17, 0x03, 0x03])
    );
    drop(capture);

    step("mtls-agent check frontend.hipster-app  (is it encrypted, and which policy decided?)")?;
    print!("{}", indent(&cli(&m, "node1", &["check", "frontend.hipster-app"])?));
    step("mtls-agent connections --pod frontend.hipster-app")?;
    print!("{}", indent(&cli(&m, "node1", &["connections", "--pod", "frontend.hipster-app"])?));

    step("a pod outside the mesh calls cartservice in plaintext: refused by the kernel (STRICT)")?;
    let cart = m.dst("cartservice");
    let (reply, _) = m.client("outsider", &["--connect", &cart, "--message", "GET /cart"])?;
    println!("  outsider -> {cart}: {reply}");
    m.agent("node1").wait_log("rejected: plaintext", Duration::from_secs(2))?;
    for line in m.agent("node1").log().lines().filter(|l| l.contains("rejected: plaintext")).take(1)
    {
        println!("  agent log: {line}");
    }

    step("policy switched to PERMISSIVE (policies/hipster-app-mtls-permissive.yaml), no restart")?;
    policies.write("hipster-app-mtls.yaml", &permissive)?;
    let t = Instant::now();
    let reply = loop {
        let (reply, ok) = m.client("outsider", &["--connect", &cart, "--message", "GET /cart"])?;
        if ok || t.elapsed() > Duration::from_secs(3) {
            break reply;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("  outsider -> {cart}: {reply}  (after {} ms)", t.elapsed().as_millis());
    print!("{}", indent(&cli(&m, "node1", &["check", "cartservice.hipster-app"])?));

    step("back to STRICT, then node1's agent is killed: still refused, never plaintext")?;
    policies.write("hipster-app-mtls.yaml", &strict)?;
    std::thread::sleep(Duration::from_millis(600));
    m.agents.get_mut("node1").context("agent")?.kill()?;
    let (reply, _) = m.client("outsider", &["--connect", &cart, "--message", "GET /cart"])?;
    println!("  outsider -> {cart}: {reply}");
    let (reply, _) =
        m.client("frontend", &["--connect", "10.96.0.11:7070", "--message", "GET /cart"])?;
    println!("  frontend -> cartservice (agent down): {reply}");
    m.agents.get_mut("node1").context("agent")?.restart()?;
    let (reply, _) =
        m.client("frontend", &["--connect", "10.96.0.11:7070", "--message", "GET /cart"])?;
    println!("  frontend -> cartservice (agent restarted): {reply}");

    step("done: removing the pods, cgroups, bridge, pins and files")?;
    drop(m);
    drop(svc);
    Ok(())
}

fn cli(m: &Mesh, node: &str, args: &[&str]) -> Result<String> {
    let a: &AgentProcess = m.agent(node);
    let out =
        Command::new(agent_bin()).args(args).args(["--admin", &a.admin.to_string()]).output()?;
    if !out.status.success() {
        bail!("mtls-agent {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}
