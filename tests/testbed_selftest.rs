//! Self-test of the test bed: topology, isolation from the host, process
//! placement, capture, and cleanup on every exit path. Needs root.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use testbed::{PodProcess, Testbed};

const READY: Duration = Duration::from_secs(10);
const RUN: Duration = Duration::from_secs(15);

fn tool() -> Command {
    Command::new(testbed::e2e_tool!())
}

fn echo_server(bed: &Testbed, pod: &str, listen: &str, prefix: &str) -> Result<PodProcess> {
    let mut cmd = tool();
    cmd.args(["echo-server", "--listen", listen, "--prefix", prefix]);
    let server = bed.spawn_in_pod(pod, cmd)?;
    server.wait_for_stdout("listening", READY)?;
    Ok(server)
}

/// Runs the e2e client in a pod; returns (exit code, stdout).
fn client(
    bed: &Testbed,
    pod: &str,
    connect: &str,
    message: &str,
    extra: &[&str],
) -> Result<(i32, String)> {
    let mut cmd = tool();
    cmd.args(["client", "--connect", connect, "--message", message]);
    cmd.args(extra);
    let out = bed.spawn_in_pod(pod, cmd)?.wait_with_output(RUN)?;
    let code = out.status.code().context("client killed by a signal")?;
    Ok((code, String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn echo_ok(bed: &Testbed, pod: &str, connect: &str, message: &str, expect: &str) -> Result<()> {
    let (code, out) = client(bed, pod, connect, message, &[])?;
    ensure!(
        code == 0 && out == format!("{expect}\n"),
        "client in {pod} -> {connect}: exit {code}, stdout {out:?}"
    );
    Ok(())
}

/// Everything a bed leaves on the machine, to check it is gone afterwards.
struct Footprint {
    netns: Vec<PathBuf>,
    base_cgroup: PathBuf,
    bpffs: PathBuf,
    pids: Vec<u32>,
}

impl Footprint {
    fn of(bed: &Testbed, pids: Vec<u32>) -> Footprint {
        let mut netns: Vec<PathBuf> = bed.pods().map(|p| p.netns.clone()).collect();
        netns.extend(bed.nodes().map(|n| n.netns.clone()));
        netns.push(bed.fabric_netns().to_owned());
        Footprint {
            netns,
            base_cgroup: bed.base_cgroup().to_owned(),
            bpffs: bed.bpffs_dir("x").parent().map(Path::to_owned).unwrap_or_default(),
            pids,
        }
    }

    fn assert_gone(&self) {
        for ns in &self.netns {
            assert!(!ns.exists(), "netns file {} left behind", ns.display());
        }
        assert!(!self.base_cgroup.exists(), "cgroup {} left behind", self.base_cgroup.display());
        assert!(!self.bpffs.exists(), "bpffs dir {} left behind", self.bpffs.display());
        for pid in &self.pids {
            assert!(!process_exists(*pid), "process {pid} still alive");
        }
    }
}

/// Alive and not a zombie. Orphans are reaped by whatever PID 1 is, which we
/// do not control, so a zombie counts as gone.
fn process_exists(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

fn bpffs_mounted() -> bool {
    nix::sys::statfs::statfs("/sys/fs/bpf")
        .map(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// 2 nodes, 3 pods: a and b on n1, c on n2.
fn three_pod_bed(test: &str) -> Result<Testbed> {
    let mut bed = Testbed::new(test)?;
    bed.add_node("n1")?;
    bed.add_node("n2")?;
    bed.add_pod("n1", "a")?;
    bed.add_pod("n1", "b")?;
    bed.add_pod("n2", "c")?;
    Ok(bed)
}

#[test]
fn pods_echo_by_pod_ip_and_host_is_untouched() -> Result<()> {
    let host_before = testbed::host_snapshot()?;
    assert!(!host_before.routes.is_empty(), "the host has routes (local ones at least)");
    let bed = three_pod_bed("pods_echo")?;
    let a = bed.pod("a").clone();
    let listen = format!("{}:7000", a.ip);
    let _server = echo_server(&bed, "a", "0.0.0.0:7000", "A:")?;

    echo_ok(&bed, "c", &listen, "hello-from-c", "A:hello-from-c")?;
    echo_ok(&bed, "b", &listen, "hello-from-b", "A:hello-from-b")?;
    // Sequential connections each get the prefix once.
    let (code, out) = client(&bed, "c", &listen, "x", &["--count", "3"])?;
    assert_eq!((code, out.as_str()), (0, "A:x\nA:x\nA:x\n"));

    // Node-originated traffic from the node netns reaches pods too.
    let mut cmd = tool();
    cmd.args(["client", "--connect", &listen, "--message", "probe"]);
    let out = bed.spawn_in_node("n2", cmd)?.wait_with_output(RUN)?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "A:probe\n");

    // Each pod: lo with both loopbacks, eth0 with its /24.
    let snap = testbed::netns_snapshot(&a.netns)?;
    assert_eq!(snap.links, vec!["eth0".to_owned(), "lo".to_owned()]);
    let has = |ip: &str, len: u8| {
        snap.addresses.iter().any(|(_, addr, l)| addr.to_string() == ip && *l == len)
    };
    assert!(has(&a.ip.to_string(), 24) && has("127.0.0.1", 8) && has("::1", 128), "{snap:?}");
    assert!(has(&a.ip6.to_string(), 64), "IPv6 on eth0 too: {snap:?}");
    // The pod's routes are its on-link subnets; the snapshot sees them.
    let subnet = a.ip.octets();
    let v4_net = format!("{}.{}.{}.0", subnet[0], subnet[1], subnet[2]);
    assert!(snap.routes.iter().any(|r| r.contains(&v4_net)), "{:?}", snap.routes);
    let node_snap = testbed::netns_snapshot(&bed.node("n1").netns)?;
    assert!(node_snap.addresses.iter().any(|(n, ip, _)| n == "eth0" && *ip == bed.node("n1").ip));

    assert_eq!(testbed::host_snapshot()?, host_before, "host netns changed while the bed is up");
    drop(bed);
    assert_eq!(testbed::host_snapshot()?, host_before, "host netns changed after drop");
    Ok(())
}

#[test]
fn loopback_v4_and_v6_work_inside_a_pod() -> Result<()> {
    let mut bed = Testbed::new("loopback")?;
    bed.add_node("n1")?;
    bed.add_pod("n1", "a")?;
    let _v4 = echo_server(&bed, "a", "127.0.0.1:7001", "v4:")?;
    let _v6 = echo_server(&bed, "a", "[::1]:7002", "v6:")?;
    echo_ok(&bed, "a", "127.0.0.1:7001", "m", "v4:m")?;
    echo_ok(&bed, "a", "[::1]:7002", "m", "v6:m")?;
    Ok(())
}

#[test]
fn spawned_processes_land_in_pod_cgroup_and_netns() -> Result<()> {
    let bed = three_pod_bed("placement")?;
    let server = echo_server(&bed, "b", "0.0.0.0:7000", "")?;
    let pid = server.pid();
    let pod = bed.pod("b");

    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let expected = format!("0::{}", testbed::cgroup_relative(&pod.cgroup)?);
    assert!(cgroup.lines().any(|l| l == expected), "{cgroup:?} lacks {expected:?}");
    let procs = std::fs::read_to_string(pod.cgroup.join("cgroup.procs"))?;
    assert!(procs.lines().any(|l| l == pid.to_string()));
    let inode = |p: &Path| std::fs::metadata(p).map(|m| m.ino());
    assert_eq!(inode(Path::new(&format!("/proc/{pid}/ns/net")))?, inode(&pod.netns)?);

    // Node processes: node netns, caller's cgroup.
    let mut cmd = tool();
    cmd.args(["echo-server", "--listen", "127.0.0.1:7000"]);
    let node_proc = bed.spawn_in_node("n1", cmd)?;
    node_proc.wait_for_stdout("listening", READY)?;
    let npid = node_proc.pid();
    assert_eq!(inode(Path::new(&format!("/proc/{npid}/ns/net")))?, inode(&bed.node("n1").netns)?);
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{npid}/cgroup"))?,
        std::fs::read_to_string("/proc/self/cgroup")?
    );
    Ok(())
}

#[test]
fn drop_removes_everything_even_with_live_processes() -> Result<()> {
    let bed = three_pod_bed("drop")?;
    let kept = echo_server(&bed, "a", "0.0.0.0:7000", "")?;
    let forgotten = echo_server(&bed, "c", "0.0.0.0:7000", "")?;
    // A grandchild the bed never saw: must die with the pod cgroup.
    let mut sh = Command::new("/bin/sh");
    sh.args(["-c", "sleep 60 & echo child $!; wait"]);
    let shell = bed.spawn_in_pod("b", sh)?;
    let line = shell.wait_for_stdout("child", READY)?;
    let grandchild: u32 =
        line.trim_start_matches("child ").trim().parse().context("grandchild pid")?;
    if bpffs_mounted() {
        std::fs::create_dir_all(bed.bpffs_dir("n1"))?;
    }
    let footprint = Footprint::of(&bed, vec![kept.pid(), forgotten.pid(), shell.pid(), grandchild]);
    std::mem::forget(forgotten);
    drop(bed);
    // Reap status is shared: the handle's own drop after the bed is a no-op.
    drop(kept);
    drop(shell);
    footprint.assert_gone();
    Ok(())
}

#[test]
fn panic_during_a_test_still_cleans_up() {
    let (tx, rx) = mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let bed = three_pod_bed("panic").expect("bed");
        let server = echo_server(&bed, "a", "0.0.0.0:7000", "").expect("server");
        let _ = tx.send(Footprint::of(&bed, vec![server.pid()]));
        panic!("simulated test failure");
    });
    assert!(result.is_err());
    rx.recv().expect("footprint").assert_gone();
}

#[test]
fn construction_failure_cleans_up_partial_pod() -> Result<()> {
    let mut bed = Testbed::new("partial")?;
    bed.add_node("n1")?;
    assert!(bed.add_pod("nope", "a").is_err(), "unknown node must fail");
    assert!(bed.add_pod("n1", "Bad_Name").is_err(), "invalid name must fail");
    bed.add_pod("n1", "a")?;
    assert!(bed.add_pod("n1", "a").is_err(), "duplicate pod must fail");
    // The failed attempts left nothing: only n1 and a exist.
    let prefix = format!("{}{}-", testbed::NAME_PREFIX, bed.id());
    let mut files: Vec<String> = std::fs::read_dir(testbed::NETNS_DIR)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    files.sort();
    let expected: Vec<String> =
        ["fabric", "node-n1", "pod-a"].iter().map(|s| format!("{prefix}{s}")).collect();
    assert_eq!(files, expected);
    Ok(())
}

#[test]
fn parallel_beds_do_not_collide() -> Result<()> {
    let run = |name: &'static str| {
        std::thread::spawn(move || -> Result<(String, Vec<PathBuf>)> {
            let bed = three_pod_bed(name)?;
            let _server = echo_server(&bed, "a", "0.0.0.0:7000", name)?;
            let target = format!("{}:7000", bed.pod("a").ip);
            echo_ok(&bed, "c", &target, "x", &format!("{name}x"))?;
            let paths = Footprint::of(&bed, vec![]).netns;
            Ok((bed.id().to_owned(), paths))
        })
    };
    let (one, two) = (run("par1"), run("par2"));
    let one = one.join().map_err(|_| anyhow::anyhow!("thread 1 panicked"))??;
    let two = two.join().map_err(|_| anyhow::anyhow!("thread 2 panicked"))??;
    assert_ne!(one.0, two.0);
    for p in one.1.iter().chain(&two.1) {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    Ok(())
}

#[test]
fn remove_pod_kills_and_deletes_then_new_pods_work() -> Result<()> {
    let mut bed = three_pod_bed("remove")?;
    let server = echo_server(&bed, "a", "0.0.0.0:7000", "")?;
    let pid = server.pid();
    let a = bed.pod("a").clone();
    bed.remove_pod("a")?;
    assert!(!process_exists(pid), "server survived remove_pod");
    assert!(!a.netns.exists() && !a.cgroup.exists());
    assert!(bed.remove_pod("a").is_err());
    drop(server);

    // Nobody answers at a's address any more.
    let (code, out) = client(&bed, "b", &format!("{}:7000", a.ip), "x", &["--timeout-ms", "500"])?;
    assert_eq!(code, 2, "{out}");
    assert!(out.starts_with("error: "), "{out}");

    let d = bed.add_pod("n2", "d")?;
    assert_ne!(d.ip, a.ip, "addresses are not reused");
    let _server = echo_server(&bed, "d", "0.0.0.0:7000", "D:")?;
    echo_ok(&bed, "b", &format!("{}:7000", d.ip), "y", "D:y")?;
    Ok(())
}

#[test]
fn client_reports_error_kinds() -> Result<()> {
    let bed = three_pod_bed("errors")?;
    let a_ip = bed.pod("a").ip;
    let (code, out) = client(&bed, "b", &format!("{a_ip}:7999"), "x", &[])?;
    assert_eq!((code, out.split(' ').nth(1)), (2, Some("refused")), "{out}");

    // An unused address on the subnet: connect cannot finish in time.
    let o = bed.subnet().octets();
    let silent = Ipv4Addr::new(o[0], o[1], o[2], 250);
    let (code, out) = client(&bed, "b", &format!("{silent}:7000"), "x", &["--timeout-ms", "300"])?;
    assert_eq!((code, out.split(' ').nth(1)), (2, Some("timeout")), "{out}");
    Ok(())
}

#[test]
fn capture_sees_plaintext_crossing_the_fabric() -> Result<()> {
    let bed = three_pod_bed("capture")?;
    let _server = echo_server(&bed, "a", "0.0.0.0:7000", "")?;
    let capture = bed.start_capture()?;
    let needle = format!("plaintext-needle-{}", bed.id());
    echo_ok(&bed, "c", &format!("{}:7000", bed.pod("a").ip), &needle, &needle)?;
    assert!(capture.contains(needle.as_bytes()));
    assert!(!capture.contains(b"never-sent-on-the-wire"));
    assert_eq!(capture.kernel_drops(), 0);
    let frames = capture.stop();
    assert!(!frames.is_empty());
    Ok(())
}

#[test]
fn in_pod_netns_gives_sockets_of_the_pod() -> Result<()> {
    let bed = three_pod_bed("in_netns")?;
    let a_ip = bed.pod("a").ip;
    let listener =
        bed.in_pod_netns("a", move || TcpListener::bind(SocketAddr::from((a_ip, 7003))))??;
    let mut cmd = tool();
    cmd.args([
        "client",
        "--connect",
        &format!("{a_ip}:7003"),
        "--message",
        "hi",
        "--timeout-ms",
        "2000",
    ]);
    let client = bed.spawn_in_pod("c", cmd)?;
    let (mut conn, peer) = listener.accept()?;
    assert_eq!(peer.ip(), std::net::IpAddr::V4(bed.pod("c").ip));
    conn.set_read_timeout(Some(RUN))?;
    let mut got = String::new();
    conn.read_to_string(&mut got)?;
    assert_eq!(got, "hi");
    conn.write_all(b"handled in the test")?;
    drop(conn);
    let out = client.wait_with_output(RUN)?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "handled in the test\n");
    Ok(())
}

#[test]
fn e2e_tool_sink_and_hold() -> Result<()> {
    let bed = three_pod_bed("sink_hold")?;
    let _server = echo_server(&bed, "a", "0.0.0.0:7000", "")?;
    let target = format!("{}:7000", bed.pod("a").ip);

    let mut cmd = tool();
    cmd.args(["sink", "--connect", &target, "--bytes", "1048576"]);
    let out = bed.spawn_in_pod("c", cmd)?.wait_with_output(RUN)?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "sent 1048576 received 1048576\n");

    let mut cmd = tool();
    cmd.args(["hold", "--connect", &target, "--seconds", "1"]);
    let out = bed.spawn_in_pod("b", cmd)?.wait_with_output(RUN)?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "connected\nheld\n");
    assert!(out.status.success());
    Ok(())
}

#[test]
fn free_loopback_ports_are_distinct_and_bindable() -> Result<()> {
    let (p1, p2) = (testbed::free_loopback_port(), testbed::free_loopback_port());
    assert_ne!(p1, p2);
    TcpListener::bind((Ipv4Addr::LOCALHOST, p1))?;
    TcpListener::bind((Ipv4Addr::LOCALHOST, p2))?;
    Ok(())
}

const STALE_ENV: &str = "TESTBED_STALE_HELPER";

/// Run by `stale_leftovers_of_killed_runs_are_cleaned` in a child process,
/// which is then SIGKILLed so the bed's Drop never runs.
#[test]
#[ignore = "helper, started by stale_leftovers_of_killed_runs_are_cleaned"]
fn stale_helper() -> Result<()> {
    if std::env::var_os(STALE_ENV).is_none() {
        return Ok(());
    }
    let bed = three_pod_bed("stale_helper")?;
    let server = echo_server(&bed, "a", "0.0.0.0:7000", "")?;
    let mut cmd = tool();
    cmd.args(["echo-server", "--listen", "127.0.0.1:7000"]);
    let node_proc = bed.spawn_in_node("n1", cmd)?;
    node_proc.wait_for_stdout("listening", READY)?;
    println!("STALE {} {} {}", bed.id(), server.pid(), node_proc.pid());
    // Bounded: the parent kills us long before this.
    std::thread::sleep(Duration::from_secs(60));
    bail!("stale helper was not killed")
}

#[test]
fn stale_leftovers_of_killed_runs_are_cleaned() -> Result<()> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["stale_helper", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(STALE_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            // libtest prints "test stale_helper ... " before our output.
            if let Some(at) = line.find("STALE ") {
                let _ = tx.send(line[at..].to_owned());
            }
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(30));
    // Simulate `kill -9` of a test run: no destructors run.
    child.kill()?;
    child.wait()?;
    let line = line.context("helper did not report its bed")?;
    let fields: Vec<&str> = line.split(' ').collect();
    let (id, pod_pid, node_pid) = match fields.as_slice() {
        [_, id, pod, node] => (id.to_string(), pod.parse::<u32>()?, node.parse::<u32>()?),
        _ => bail!("bad helper line {line:?}"),
    };
    let base = Testbed::cgroup2_root()?.join(format!("{}{id}", testbed::NAME_PREFIX));
    let fabric = Path::new(testbed::NETNS_DIR).join(format!("{}{id}-fabric", testbed::NAME_PREFIX));
    assert!(base.exists() && fabric.exists(), "helper left nothing to clean");
    assert!(process_exists(pod_pid) && process_exists(node_pid));

    let cleaned = testbed::cleanup_stale()?;
    // Another test process running cleanup_stale may have beaten us to it.
    assert!(cleaned.contains(&id) || !fabric.exists(), "{cleaned:?} lacks {id}");
    assert!(!base.exists() && !fabric.exists());
    // The orphans were reparented to init, which reaps them; allow it a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while (process_exists(pod_pid) || process_exists(node_pid))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!process_exists(pod_pid) && !process_exists(node_pid), "orphans survived");
    Ok(())
}
