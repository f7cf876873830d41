//! `cargo xtask demo`: the workshop's hipster-app on this machine. Pods are network namespaces
//! and cgroups on one node; the agent captures their connections with eBPF and carries them.
//! Everything it builds is removed when it ends, however it ends.

use std::{
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use testbed::{
    agent::{AgentOptions, AgentProcess, ServiceEntry, WorkloadEntry, WorkloadsFile},
    e2e_tool_path, PodProcess, Testbed,
};

const NS: &str = "hipster-app";
/// (service, port) of the backends the frontend calls, as in the hipster-app.
const BACKENDS: &[(&str, u16)] = &[
    ("cartservice", 7070),
    ("productcatalogservice", 3550),
    ("currencyservice", 7000),
    ("redis-cart", 6379),
];

fn main() {
    if let Err(e) = run() {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn run() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the demo builds network namespaces, cgroups and eBPF programs: run it as root");
    }
    let tool = e2e_tool_path()?;
    step("building the node: pods are network namespaces + cgroups, joined by a bridge");
    let mut bed = Testbed::new("demo")?;
    bed.add_node("node1")?;
    let mut file = WorkloadsFile::default();
    for (i, name) in ["frontend"]
        .iter()
        .chain(BACKENDS.iter().map(|(n, _)| n))
        .enumerate()
    {
        let pod = bed.add_pod("node1", name)?;
        file.workloads.push(WorkloadEntry::of(&pod, NS));
        println!(
            "  pod {:<24} {:<14} netns {}",
            format!("{name}.{NS}"),
            pod.ip,
            pod.netns.display()
        );
        if i > 0 {
            let (_, port) = BACKENDS[i - 1];
            file.services.push(ServiceEntry {
                name: (*name).into(),
                namespace: NS.into(),
                vip: Some(Ipv4Addr::new(10, 96, 0, 10 + i as u8)),
                selector: vec![("app".into(), (*name).into())],
                ports: vec![(port, port)],
            });
        }
    }
    let outsider = bed.add_pod("node1", "outsider")?;
    println!(
        "  pod {:<24} {:<14} (not in the mesh: not in workloads.yaml)",
        "outsider", outsider.ip
    );

    let mut servers: Vec<PodProcess> = Vec::new();
    for (name, port) in BACKENDS {
        let mut cmd = Command::new(&tool);
        cmd.args([
            "echo-server",
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--prefix",
            &format!("{name} says: "),
        ]);
        let p = bed.spawn_in_pod(name, cmd)?;
        p.wait_for_stdout("listening", Duration::from_secs(5))?;
        servers.push(p);
    }
    let workloads = std::env::temp_dir().join(format!("{}-hipster-workloads.yaml", bed.id()));
    file.write(&workloads)?;
    let _cleanup = RemoveOnDrop(workloads.clone());
    println!("\nworkloads.yaml:\n{}", indent(&file.render()));

    step("starting mtls-agent for node1 (eBPF connect4/connect6 + sock_ops on the node's cgroup)");
    let mut agent = AgentProcess::start(&bed, AgentOptions::new("node1", &workloads))?;
    println!(
        "  admin API on {}; programs and maps pinned under {}",
        agent.admin,
        agent.bpffs.display()
    );

    step("frontend calls every backend by its service VIP");
    for svc in &file.services {
        let vip = svc.vip.context("demo services have VIPs")?;
        let dst = format!("{vip}:{}", svc.ports[0].0);
        let reply = client(&bed, &tool, "frontend", &dst, "GET /")?;
        println!("  frontend -> {:<24} {:<16} {}", svc.name, dst, reply);
    }
    wait_records(&agent, file.services.len())?;
    print_connections(&agent)?;

    step(
        "outsider (not enrolled) calls cartservice directly: not captured, the agent has no record",
    );
    let cart = format!("{}:7070", bed.pod("cartservice").ip);
    let before = agent.connections()?.len();
    println!(
        "  outsider -> {cart}: {}",
        client(&bed, &tool, "outsider", &cart, "hi")?
    );
    println!(
        "  agent records before/after: {before}/{}",
        agent.connections()?.len()
    );

    step("agent killed (SIGKILL): captured pods fail closed, nothing leaves them unprotected");
    agent.kill()?;
    let t = Instant::now();
    let reply = client(&bed, &tool, "frontend", &cart, "while the agent is down")?;
    println!(
        "  frontend -> {cart}: {reply} (after {} ms)",
        t.elapsed().as_millis()
    );

    step("agent restarted: it reuses the pinned programs and maps, re-enrolls the pods");
    agent.restart()?;
    println!(
        "  frontend -> {cart}: {}",
        client(&bed, &tool, "frontend", &cart, "back again")?
    );

    step("done: removing the pods, cgroups, bridge and pins");
    drop(servers);
    drop(agent);
    drop(bed);
    Ok(())
}

fn client(
    bed: &Testbed,
    tool: &std::path::Path,
    pod: &str,
    dst: &str,
    msg: &str,
) -> Result<String> {
    let mut cmd = Command::new(tool);
    cmd.args([
        "client",
        "--connect",
        dst,
        "--message",
        msg,
        "--timeout-ms",
        "3000",
    ]);
    let out = bed
        .spawn_in_pod(pod, cmd)?
        .wait_with_output(Duration::from_secs(10))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn wait_records(agent: &AgentProcess, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent
        .connections()?
        .iter()
        .filter(|c| c["open"] == false)
        .count()
        < n
    {
        if Instant::now() > deadline {
            bail!("the agent recorded fewer than {n} connections");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn print_connections(agent: &AgentProcess) -> Result<()> {
    println!("\n  the agent's record (GET /connections):");
    println!(
        "  {:<20} {:<16} {:<17} {:<46} {:<11} {:>4} {:>4}",
        "SOURCE POD", "APP SOCKET", "ORIGINAL DST", "DESTINATION POD", "MODE", "OUT", "IN"
    );
    for c in agent.connections()? {
        println!(
            "  {:<20} {:<16} {:<17} {:<46} {:<11} {:>4} {:>4}",
            c["sourcePod"].as_str().unwrap_or("-"),
            c["source"].as_str().unwrap_or("-"),
            c["originalDestination"].as_str().unwrap_or("-"),
            format!(
                "{} ({})",
                c["destinationPod"].as_str().unwrap_or("-"),
                c["destination"].as_str().unwrap_or("-")
            ),
            c["mode"].as_str().unwrap_or("-"),
            c["bytesSent"],
            c["bytesReceived"],
        );
    }
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
