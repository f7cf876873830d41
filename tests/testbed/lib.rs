//! Privileged end-to-end test bed: Kubernetes-like nodes and pods on one machine.
//!
//! * A **pod** is a network namespace plus a cgroup v2 directory under its
//!   node's cgroup. Its `eth0` (a /24 address on the test bed's subnet) is one
//!   end of a veth pair whose other end is enslaved to a bridge that lives in a
//!   separate **fabric** network namespace. `lo` is up in every namespace.
//! * A **node** is a cgroup directory (parent of its pods' cgroups) plus a node
//!   netns with its own address on the fabric, for node-originated traffic.
//! * The host network namespace is never configured: every netlink request is
//!   made on a thread that has entered the target namespace.
//!
//! Everything carries a unique id (`<pid base36>-<counter base36>`) and is
//! removed on drop, including during panics. Runs that were SIGKILLed leave
//! leftovers that [`cleanup_stale`] removes.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use std::{process::Command, time::Duration};
//! let mut bed = testbed::Testbed::new("my_test")?;
//! bed.add_node("n1")?;
//! let a = bed.add_pod("n1", "a")?;
//! // In this package's integration tests `testbed::e2e_tool!()` is simpler.
//! let mut cmd = Command::new(testbed::e2e_tool_path()?);
//! cmd.args(["echo-server", "--listen", &format!("{}:8080", a.ip)]);
//! let server = bed.spawn_in_pod("a", cmd)?;
//! server.wait_for_stdout("listening", Duration::from_secs(5))?;
//! # Ok(()) }
//! ```

pub mod agent;
pub mod apiserver;
mod capture;
pub mod certservice;
pub(crate) mod cgroup;
pub mod mesh;
mod netlink;
mod netns;
mod process;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub use capture::{Capture, CAPTURE_CAP};
pub use cgroup::CgroupDir;
pub use netns::NETNS_DIR;
pub use process::PodProcess;

use netlink::Rtnl;
use netns::NetnsFile;
use process::ProcShared;

/// Prefix of every name a test bed creates (netns files, cgroups, bpffs dirs).
pub const NAME_PREFIX: &str = "mtls-test-";
/// Where per-test bpffs directories go; mounting bpffs there is not our job.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// Prefix length of the test bed subnet.
pub const PREFIX_LEN: u8 = 24;
/// Prefix length of the test bed's IPv6 subnet (unique local addresses, see [`ipv6_of`]).
pub const PREFIX_LEN_V6: u8 = 64;

/// A member's IPv6 address: its IPv4 address in the low 32 bits of `fd00:6d74:6c73::/64`, so
/// the two stay in step and every member of a bed shares one on-link subnet.
pub fn ipv6_of(ip: Ipv4Addr) -> Ipv6Addr {
    let [a, b, c, d] = ip.octets();
    let (hi, lo) = (u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]));
    Ipv6Addr::new(0xfd00, 0x6d74, 0x6c73, 0, 0, 0, hi, lo)
}
/// Linux interface names are at most IFNAMSIZ - 1 bytes.
const MAX_IFNAME: usize = 15;
/// Node and pod names end up in file names; keep them short and plain.
const MAX_NAME: usize = 32;

static BED_COUNTER: AtomicU32 = AtomicU32::new(0);

// Tests share beds, processes and captures across threads.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Testbed>();
    send_sync::<PodProcess>();
    send_sync::<Capture>();
};

/// Path of the `e2e-tool` binary, for integration tests of this package: `$E2E_TOOL` if set (the
/// test binaries run elsewhere, as in `cargo xtask vm-test`'s guests), else the path cargo built
/// it at (`env!("CARGO_BIN_EXE_e2e-tool")` in the calling test crate).
#[macro_export]
macro_rules! e2e_tool {
    () => {
        ::std::env::var_os("E2E_TOOL")
            .map(::std::path::PathBuf::from)
            .unwrap_or_else(|| ::std::path::PathBuf::from(env!("CARGO_BIN_EXE_e2e-tool")))
    };
}

/// Locates `e2e-tool` at run time: `$E2E_TOOL` if set, else next to the
/// running test's `deps/` directory (cargo's layout). Prefer [`e2e_tool!`]
/// inside this package.
pub fn e2e_tool_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("E2E_TOOL") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let candidates = exe.ancestors().skip(1).take(2).map(|dir| dir.join("e2e-tool"));
    for candidate in candidates {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "e2e-tool not found near {}; build it (cargo build -p mtls-agent-e2e) or set E2E_TOOL",
        exe.display()
    )
}

/// A node: cgroup directory and node netns with an address on the fabric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub cgroup: PathBuf,
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
}

/// A pod: netns with `eth0` on the fabric plus a cgroup under its node's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address on the fabric ([`ipv6_of`] its IPv4 one).
    pub ip6: Ipv6Addr,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
}

/// Network state of one namespace, for "nothing changed here" assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSnapshot {
    /// Interface names, sorted.
    pub links: Vec<String>,
    /// (interface name, address, prefix length), sorted.
    pub addresses: Vec<(String, IpAddr, u8)>,
    /// Routes of every table, one line each (destination, gateway, interface, table), sorted.
    pub routes: Vec<String>,
}

/// Links, addresses and routes of the namespace at `netns` (a netns file or
/// `/proc/<pid>/ns/net`).
pub fn netns_snapshot(netns: &Path) -> Result<NetSnapshot> {
    netns::run_in(netns, || -> Result<NetSnapshot> {
        let mut rtnl = Rtnl::new()?;
        let links = rtnl.links()?;
        let names: BTreeMap<u32, String> =
            links.iter().map(|l| (l.index, l.name.clone())).collect();
        let mut addresses: Vec<(String, IpAddr, u8)> = rtnl
            .addresses()?
            .into_iter()
            .map(|(index, ip, len)| {
                let name = names.get(&index).cloned().unwrap_or_else(|| format!("#{index}"));
                (name, ip, len)
            })
            .collect();
        addresses.sort();
        let mut routes = rtnl.routes()?;
        routes.sort();
        let mut links: Vec<String> = links.into_iter().map(|l| l.name).collect();
        links.sort();
        Ok(NetSnapshot { links, addresses, routes })
    })?
}

/// `path` (a cgroup directory) as it appears in `/proc/<pid>/cgroup`,
/// e.g. `/mtls-test-abc-0/n1/a`.
pub fn cgroup_relative(path: &Path) -> Result<String> {
    cgroup::relative_path(&cgroup::cgroup2_root()?, path)
}

/// Snapshot of the host network namespace, i.e. the one this process
/// started in (the main thread's; the test bed never moves that thread).
pub fn host_snapshot() -> Result<NetSnapshot> {
    netns_snapshot(Path::new("/proc/self/ns/net"))
}

/// Starts `cmd` on the host, in the test's own netns and cgroup (to reach the agent's
/// loopback ports), with the output capture of [`PodProcess`]; killed and reaped on drop.
pub fn spawn_on_host(cmd: Command) -> Result<PodProcess> {
    let label = format!("host ({})", program_name(&cmd));
    let (process, _) = process::spawn(cmd, None, Path::new("/proc/self/ns/net"), label)?;
    Ok(process)
}

/// A free TCP port on 127.0.0.1 (for admin ports of agents on the host).
/// Ports are never handed out twice by one process; like any such helper it
/// is racy against other processes grabbing the port first.
///
/// # Panics
/// If binding to 127.0.0.1 fails repeatedly (a broken machine).
pub fn free_loopback_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let handed = handed.get_or_insert_with(HashSet::new);
    for _ in 0..100 {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port());
        match port {
            Ok(port) if handed.insert(port) => return port,
            Ok(_) => continue,
            Err(e) => panic!("cannot bind 127.0.0.1:0: {e}"),
        }
    }
    panic!("no fresh loopback port after 100 attempts")
}

fn base36(mut n: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// The creating pid encoded in a name made by a test bed
/// (`mtls-test-<pid36>-<ctr36>[-...]`).
fn creator_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let pid = rest.split('-').next()?;
    i32::from_str_radix(pid, 36).ok()
}

/// The `<pid36>-<ctr36>` id in a name made by a test bed.
fn bed_id(name: &str) -> Option<String> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let mut parts = rest.splitn(3, '-');
    Some(format!("{}-{}", parts.next()?, parts.next()?))
}

fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return true; // not ours to judge: leave it alone
    }
    !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

fn validate_name(kind: &str, name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= MAX_NAME
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "{kind} name {name:?}: use 1-{MAX_NAME} characters of [a-z0-9-]"
    );
    Ok(())
}

/// Collects cleanup errors so that one failure does not stop the rest.
#[derive(Default)]
struct Errors(Vec<String>);

impl Errors {
    fn note<T>(&mut self, r: Result<T>) {
        if let Err(e) = r {
            self.0.push(format!("{e:#}"));
        }
    }

    fn into_result(self) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(self.0.join("; ")))
        }
    }
}

/// What a pod or node owns. Dropped in field order after `teardown`.
struct Member {
    procs: Mutex<Vec<Arc<ProcShared>>>,
    netns: NetnsFile,
    cgroup: Option<CgroupDir>,
    /// Directories made inside `cgroup` for pods placed deeper (the kubelet's layouts), in
    /// the order they were made.
    nested: Vec<CgroupDir>,
    /// Our end of the veth, in the fabric netns.
    fabric_veth: String,
}

impl Member {
    fn new(netns: NetnsFile, cgroup: CgroupDir, fabric_veth: String) -> Member {
        Member {
            procs: Mutex::new(Vec::new()),
            netns,
            cgroup: Some(cgroup),
            nested: Vec::new(),
            fabric_veth,
        }
    }

    fn procs(&self) -> MutexGuard<'_, Vec<Arc<ProcShared>>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, proc: Arc<ProcShared>) {
        let mut procs = self.procs();
        // Forget children that already exited and were reaped.
        procs.retain(|p| !matches!(p.try_wait(), Ok(Some(_))));
        procs.push(proc);
    }

    /// Kill+reap our processes, then remove the netns file and the cgroup
    /// (which also kills descendants that escaped our bookkeeping).
    fn teardown(&mut self) -> Result<()> {
        let mut errors = Errors::default();
        for proc in self.procs().drain(..) {
            errors.note(proc.kill_and_reap());
        }
        // Deepest first: each was made after its parent.
        for mut dir in self.nested.drain(..).rev() {
            errors.note(dir.remove());
        }
        if let Some(cgroup) = self.cgroup.as_mut() {
            errors.note(cgroup.remove());
        }
        errors.note(self.netns.remove());
        errors.into_result()
    }
}

struct PodEntry {
    pod: Pod,
    member: Member,
}

struct NodeEntry {
    node: Node,
    member: Member,
}

/// One test bed: a fabric, nodes and pods. Dropping it removes everything.
pub struct Testbed {
    id: String,
    test_name: String,
    subnet: [u8; 3],
    next_host: u8,
    next_veth: u32,
    cgroup_root: PathBuf,
    bridge_index: u32,
    pods: BTreeMap<String, PodEntry>,
    nodes: BTreeMap<String, NodeEntry>,
    base_cgroup: Option<CgroupDir>,
    fabric: Option<NetnsFile>,
}

impl std::fmt::Debug for Testbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Testbed")
            .field("id", &self.id)
            .field("test_name", &self.test_name)
            .field("subnet", &self.subnet())
            .field("nodes", &self.nodes.keys().collect::<Vec<_>>())
            .field("pods", &self.pods.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Testbed {
    /// Creates the fabric netns with its bridge and the base cgroup directory.
    pub fn new(test_name: &str) -> Result<Testbed> {
        let pid = std::process::id();
        let counter = BED_COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{}", base36(pid), base36(counter));
        // Spread beds over 10.64.0.0-10.191.255.0 so captures and logs of
        // different beds are easy to tell apart (they are isolated anyway).
        let h = pid.wrapping_mul(2_654_435_761) ^ counter.wrapping_mul(40_503);
        let subnet = [10, 64 + ((h >> 8) % 128) as u8, (h & 0xff) as u8];
        let cgroup_root = cgroup::cgroup2_root()?;

        // Our pid is alive, so anything already named with our id was left by
        // a dead process that had the same pid.
        remove_bed_leftovers(&id, &cgroup_root).context("remove leftovers of a recycled id")?;

        let mut bed = Testbed {
            bridge_index: 0,
            id,
            test_name: test_name.to_owned(),
            subnet,
            next_host: 2,
            next_veth: 0,
            cgroup_root,
            pods: BTreeMap::new(),
            nodes: BTreeMap::new(),
            base_cgroup: None,
            fabric: None,
        };
        // From here on, an early return drops `bed`, which removes what exists.
        let base = bed.cgroup_root.join(format!("{NAME_PREFIX}{}", bed.id));
        bed.base_cgroup = Some(CgroupDir::create(base)?);
        let fabric = NetnsFile::create(&format!("{NAME_PREFIX}{}-fabric", bed.id))?;
        let fabric_path = fabric.path().to_owned();
        bed.fabric = Some(fabric);
        let bridge = bed.ifname("br", "")?;
        bed.bridge_index = netns::run_in(&fabric_path, || -> Result<u32> {
            let mut rtnl = Rtnl::new()?;
            let lo = rtnl.link_index("lo")?;
            rtnl.set_up(lo)?;
            rtnl.add_bridge(&bridge)?;
            let index = rtnl.link_index(&bridge)?;
            rtnl.set_up(index)?;
            Ok(index)
        })??;
        Ok(bed)
    }

    /// Unique id of this bed, part of every name it creates.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The bed's /24, e.g. 10.93.17.0.
    pub fn subnet(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], 0)
    }

    /// Path of the fabric netns file (where the bridge lives).
    pub fn fabric_netns(&self) -> &Path {
        self.fabric.as_ref().map_or_else(|| Path::new(""), |f| f.path())
    }

    /// Root of the cgroup v2 hierarchy (from /proc/self/mountinfo).
    pub fn cgroup2_root() -> Result<PathBuf> {
        cgroup::cgroup2_root()
    }

    /// The bed's base cgroup directory (parent of the node cgroups).
    pub fn base_cgroup(&self) -> &Path {
        self.base_cgroup.as_ref().map_or_else(|| Path::new(""), |c| c.path())
    }

    /// `/sys/fs/bpf/mtls-test-<id>/<node>`: where that node's agent should pin
    /// its BPF objects. Not created here; removed (recursively) on drop.
    pub fn bpffs_dir(&self, node: &str) -> PathBuf {
        self.bpffs_base().join(node)
    }

    fn bpffs_base(&self) -> PathBuf {
        Path::new(BPFFS_ROOT).join(format!("{NAME_PREFIX}{}", self.id))
    }

    /// `<kind><id><suffix>`, checked against the kernel's length limit.
    fn ifname(&self, kind: &str, suffix: &str) -> Result<String> {
        let name = format!("{kind}{}{suffix}", self.id);
        ensure!(name.len() <= MAX_IFNAME, "interface name {name:?} longer than {MAX_IFNAME}");
        Ok(name)
    }

    /// A fresh address of the bed's subnet, for [`Testbed::add_address`] (never given to a pod).
    pub fn alloc_address(&mut self) -> Result<Ipv4Addr> {
        self.alloc_ip()
    }

    /// Adds `ip` to the pod's `eth0` (/24 for IPv4, /64 for IPv6, as the bed's own addresses):
    /// a second address of the pod, reachable from the other pods.
    pub fn add_address(&mut self, pod: &str, ip: IpAddr) -> Result<()> {
        let netns = self.pod_entry(pod)?.pod.netns.clone();
        netns::run_in(&netns, move || -> Result<()> {
            let mut rtnl = Rtnl::new()?;
            let eth0 = rtnl.link_index("eth0")?;
            let prefix = if ip.is_ipv4() { PREFIX_LEN } else { PREFIX_LEN_V6 };
            rtnl.add_address(eth0, ip, prefix)
        })?
        .with_context(|| format!("pod {pod}: add address {ip}"))
    }

    fn alloc_ip(&mut self) -> Result<Ipv4Addr> {
        ensure!(self.next_host < 255, "subnet {} exhausted", self.subnet());
        let [a, b, c] = self.subnet;
        let ip = Ipv4Addr::new(a, b, c, self.next_host);
        self.next_host += 1;
        Ok(ip)
    }

    fn fabric_path(&self) -> Result<PathBuf> {
        self.fabric.as_ref().map(|f| f.path().to_owned()).context("test bed has no fabric")
    }

    /// Creates a netns named `<prefix><id>-<role>-<name>` and plugs it into
    /// the fabric as `eth0` with `ip`/24 and [`ipv6_of`]`(ip)`/64. On error the netns is removed.
    fn plug(&mut self, role: &str, name: &str, ip: Ipv4Addr) -> Result<(NetnsFile, String)> {
        let netns = NetnsFile::create(&format!("{NAME_PREFIX}{}-{role}-{name}", self.id))?;
        let veth = self.ifname("v", &format!("-{}", base36(self.next_veth)))?;
        self.next_veth += 1;
        let bridge_index = self.bridge_index;
        let netns_path = netns.path().to_owned();
        netns::run_in(&self.fabric_path()?, || -> Result<()> {
            let target = fs::File::open(&netns_path)
                .with_context(|| format!("open {}", netns_path.display()))?;
            let mut rtnl = Rtnl::new()?;
            rtnl.add_veth(&veth, "eth0", std::os::fd::AsRawFd::as_raw_fd(&target))?;
            let index = rtnl.link_index(&veth)?;
            rtnl.set_master(index, bridge_index)?;
            rtnl.set_up(index)
        })??;
        netns::run_in(&netns_path, || -> Result<()> {
            let mut rtnl = Rtnl::new()?;
            let lo = rtnl.link_index("lo")?;
            rtnl.set_up(lo)?;
            let eth0 = rtnl.link_index("eth0")?;
            rtnl.add_address(eth0, IpAddr::V4(ip), PREFIX_LEN)?;
            rtnl.add_address(eth0, IpAddr::V6(ipv6_of(ip)), PREFIX_LEN_V6)?;
            rtnl.set_up(eth0)
        })??;
        Ok((netns, veth))
    }

    /// Adds a node: cgroup `<base>/<name>` and a node netns with the next IP.
    pub fn add_node(&mut self, name: &str) -> Result<Node> {
        validate_name("node", name)?;
        ensure!(!self.nodes.contains_key(name), "node {name:?} exists");
        let ip = self.alloc_ip()?;
        let cgroup = CgroupDir::create(self.base_cgroup().join(name))?;
        let (netns, fabric_veth) =
            self.plug("node", name, ip).with_context(|| format!("add node {name}"))?;
        let node = Node {
            name: name.to_owned(),
            cgroup: cgroup.path().to_owned(),
            netns: netns.path().to_owned(),
            ip,
        };
        let member = Member::new(netns, cgroup, fabric_veth);
        self.nodes.insert(name.to_owned(), NodeEntry { node: node.clone(), member });
        Ok(node)
    }

    /// Adds a pod on `node`: cgroup `<node cgroup>/<name>` and a pod netns
    /// whose `eth0` gets the next free IP of the subnet.
    pub fn add_pod(&mut self, node: &str, name: &str) -> Result<Pod> {
        self.add_pod_in_cgroup(node, name, Path::new(name))
    }

    /// Like [`Testbed::add_pod`], but the pod's processes go to the cgroup `<node cgroup>/<rel>`,
    /// e.g. the kubelet's `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`.
    /// Directories missing on the way are made and belong to the node (removed after its pods).
    pub fn add_pod_in_cgroup(&mut self, node: &str, name: &str, rel: &Path) -> Result<Pod> {
        validate_name("pod", name)?;
        ensure!(!self.pods.contains_key(name), "pod {name:?} exists");
        ensure!(
            rel.components().all(|c| matches!(c, std::path::Component::Normal(_))),
            "pod cgroup {} must be a plain relative path",
            rel.display()
        );
        let node_entry = self
            .nodes
            .get_mut(node)
            .with_context(|| format!("add pod {name}: no node {node:?}"))?;
        let node_cgroup = node_entry.node.cgroup.clone();
        let mut dir = node_cgroup.clone();
        let parents: Vec<_> = rel.parent().map(|p| p.components().collect()).unwrap_or_default();
        for c in parents {
            dir.push(c);
            if !dir.is_dir() {
                node_entry.member.nested.push(CgroupDir::create(dir.clone())?);
            }
        }
        let ip = self.alloc_ip()?;
        let cgroup = CgroupDir::create(node_cgroup.join(rel))?;
        let (netns, fabric_veth) =
            self.plug("pod", name, ip).with_context(|| format!("add pod {name}"))?;
        let pod = Pod {
            name: name.to_owned(),
            node: node.to_owned(),
            ip,
            ip6: ipv6_of(ip),
            netns: netns.path().to_owned(),
            cgroup: cgroup.path().to_owned(),
        };
        let member = Member::new(netns, cgroup, fabric_veth);
        self.pods.insert(name.to_owned(), PodEntry { pod: pod.clone(), member });
        Ok(pod)
    }

    /// Kills the pod's processes and deletes its veth, netns and cgroup.
    /// Its IP is not reused by later pods of this bed.
    pub fn remove_pod(&mut self, name: &str) -> Result<()> {
        let mut entry =
            self.pods.remove(name).with_context(|| format!("remove pod: no pod {name:?}"))?;
        let mut errors = Errors::default();
        errors.note(entry.member.teardown());
        // Deleting our end removes the pair now rather than when the kernel
        // gets around to destroying the pod netns.
        let veth = entry.member.fabric_veth.clone();
        errors.note(self.fabric_path().and_then(|fabric| {
            netns::run_in(&fabric, || -> Result<()> {
                let mut rtnl = Rtnl::new()?;
                match rtnl.link_index(&veth) {
                    Ok(index) => rtnl.delete_link(index),
                    // Already gone together with the pod netns.
                    Err(_) => Ok(()),
                }
            })?
        }));
        errors.into_result().with_context(|| format!("remove pod {name}"))
    }

    /// The pod called `name`.
    ///
    /// # Panics
    /// If there is no such pod (a bug in the calling test).
    pub fn pod(&self, name: &str) -> &Pod {
        match self.pods.get(name) {
            Some(entry) => &entry.pod,
            None => panic!("test bed {}: no pod {name:?}", self.id),
        }
    }

    /// The node called `name`.
    ///
    /// # Panics
    /// If there is no such node (a bug in the calling test).
    pub fn node(&self, name: &str) -> &Node {
        match self.nodes.get(name) {
            Some(entry) => &entry.node,
            None => panic!("test bed {}: no node {name:?}", self.id),
        }
    }

    /// All pods, by name.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.values().map(|e| &e.pod)
    }

    /// All nodes, by name.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values().map(|e| &e.node)
    }

    fn pod_entry(&self, pod: &str) -> Result<&PodEntry> {
        self.pods.get(pod).with_context(|| format!("test bed {}: no pod {pod:?}", self.id))
    }

    fn node_entry(&self, node: &str) -> Result<&NodeEntry> {
        self.nodes.get(node).with_context(|| format!("test bed {}: no node {node:?}", self.id))
    }

    /// Starts `cmd` in the pod: before exec the child joins the pod's cgroup,
    /// then its netns. stdin is /dev/null, stdout/stderr are captured (any
    /// stdio set on `cmd` is overridden). The process is killed and reaped
    /// when the handle drops, the pod is removed or the bed drops.
    pub fn spawn_in_pod(&self, pod: &str, cmd: Command) -> Result<PodProcess> {
        let entry = self.pod_entry(pod)?;
        let procs = entry.pod.cgroup.join("cgroup.procs");
        let label = format!("pod {pod} ({})", program_name(&cmd));
        let (process, shared) = process::spawn(cmd, Some(&procs), &entry.pod.netns, label)?;
        entry.member.register(shared);
        Ok(process)
    }

    /// Like [`Testbed::spawn_in_pod`] but in the node's netns; the process
    /// stays in the caller's cgroup.
    pub fn spawn_in_node(&self, node: &str, cmd: Command) -> Result<PodProcess> {
        let entry = self.node_entry(node)?;
        let label = format!("node {node} ({})", program_name(&cmd));
        let (process, shared) = process::spawn(cmd, None, &entry.node.netns, label)?;
        entry.member.register(shared);
        Ok(process)
    }

    /// Like [`Testbed::spawn_in_node`], but the process first joins the cgroup v2 directory
    /// `cgroup` (e.g. a test-made "kubelet" cgroup, or a host-network pod's under the node's).
    pub fn spawn_in_node_cgroup(
        &self,
        node: &str,
        cgroup: &Path,
        cmd: Command,
    ) -> Result<PodProcess> {
        let entry = self.node_entry(node)?;
        let procs = cgroup.join("cgroup.procs");
        let label = format!("node {node} cgroup {} ({})", cgroup.display(), program_name(&cmd));
        let (process, shared) = process::spawn(cmd, Some(&procs), &entry.node.netns, label)?;
        entry.member.register(shared);
        Ok(process)
    }

    /// Gives the node's `eth0` a second address of the bed's subnet (as a bridge gateway
    /// address, `cni0`/`cbr0`, is a second address of a real node); returns it.
    pub fn add_node_address(&mut self, node: &str) -> Result<Ipv4Addr> {
        let netns = self.node_entry(node)?.node.netns.clone();
        let ip = self.alloc_ip()?;
        netns::run_in(&netns, move || -> Result<()> {
            let mut rtnl = Rtnl::new()?;
            let eth0 = rtnl.link_index("eth0")?;
            rtnl.add_address(eth0, IpAddr::V4(ip), PREFIX_LEN)
        })??;
        Ok(ip)
    }

    /// Runs `f` on a fresh thread inside the pod's netns (sockets created
    /// there belong to the pod's network stack). Panics in `f` propagate.
    pub fn in_pod_netns<T: Send + 'static>(
        &self,
        pod: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        netns::run_in(&self.pod_entry(pod)?.pod.netns, f)
    }

    /// Runs `f` on a fresh thread inside the node's netns.
    pub fn in_node_netns<T: Send + 'static>(
        &self,
        node: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        netns::run_in(&self.node_entry(node)?.node.netns, f)
    }

    /// Starts recording every frame on the fabric bridge (see [`Capture`]).
    pub fn start_capture(&self) -> Result<Capture> {
        let bridge_index = self.bridge_index;
        let fd = netns::run_in(&self.fabric_path()?, move || Capture::open_here(bridge_index))??;
        Capture::start(fd)
    }

    /// Removes everything; errors are collected, not short-circuited.
    fn teardown(&mut self) -> Result<()> {
        let mut errors = Errors::default();
        // Pods first: their cgroups live inside the node cgroups.
        for (_, mut entry) in std::mem::take(&mut self.pods) {
            errors.note(entry.member.teardown());
        }
        for (_, mut entry) in std::mem::take(&mut self.nodes) {
            errors.note(entry.member.teardown());
        }
        if let Some(mut base) = self.base_cgroup.take() {
            errors.note(base.remove());
        }
        errors.note(remove_bpffs_dir(&self.bpffs_base()));
        // Removing the fabric netns takes the bridge and remaining veths along.
        if let Some(mut fabric) = self.fabric.take() {
            errors.note(fabric.remove());
        }
        errors.into_result()
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("testbed {} ({}): cleanup incomplete: {e:#}", self.id, self.test_name);
        }
    }
}

fn program_name(cmd: &Command) -> String {
    Path::new(cmd.get_program())
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

fn remove_bpffs_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("remove {}", dir.display())),
    }
}

/// Kills (by PID) processes whose netns is the one pinned at `netns`.
fn kill_netns_members(netns: &Path) -> Result<()> {
    let Ok(inode) = netns::ns_inode(netns) else {
        return Ok(());
    };
    let own = std::process::id();
    for entry in fs::read_dir("/proc").context("read /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid as u32 == own {
            continue;
        }
        // Processes may vanish while we look; that is fine.
        if netns::ns_inode(&entry.path().join("ns/net")).ok() == Some(inode) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    Ok(())
}

/// Removes the cgroup, netns files and bpffs dir named with `id`.
fn remove_bed_leftovers(id: &str, cgroup_root: &Path) -> Result<()> {
    let mut errors = Errors::default();
    let base = format!("{NAME_PREFIX}{id}");
    let cgroup_dir = cgroup_root.join(&base);
    if cgroup_dir.exists() {
        errors.note(cgroup::remove_tree(&cgroup_dir));
    }
    if let Ok(entries) = fs::read_dir(NETNS_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if bed_id(&name).as_deref() == Some(id) {
                errors.note(kill_netns_members(&entry.path()));
                errors.note(netns::remove_netns_file(&entry.path()));
            }
        }
    }
    errors.note(remove_bpffs_dir(&Path::new(BPFFS_ROOT).join(&base)));
    errors.into_result()
}

/// Every cgroup, netns file and bpffs directory made by test beds of process `pid` (their
/// names carry it), e.g. to check that a program using the test bed cleaned up.
pub fn footprint_of_process(pid: u32) -> Result<Vec<PathBuf>> {
    let cgroup_root = cgroup::cgroup2_root()?;
    let mut found = Vec::new();
    for dir in [cgroup_root, PathBuf::from(NETNS_DIR), PathBuf::from(BPFFS_ROOT)] {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if creator_pid(&name) == i32::try_from(pid).ok() {
                found.push(entry.path());
            }
        }
    }
    Ok(found)
}

/// Removes leftovers of test beds whose creating process is gone (e.g. a run
/// that was SIGKILLed): their pod processes (in the bed's cgroups or
/// namespaces), cgroup trees, netns files and bpffs dirs. Beds of live
/// processes are never touched. Returns the ids that were cleaned.
pub fn cleanup_stale() -> Result<Vec<String>> {
    let cgroup_root = cgroup::cgroup2_root()?;
    let mut ids = Vec::new();
    let dirs = [cgroup_root.clone(), PathBuf::from(NETNS_DIR), PathBuf::from(BPFFS_ROOT)];
    for dir in &dirs {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let (Some(pid), Some(id)) = (creator_pid(&name), bed_id(&name)) else {
                continue;
            };
            if !pid_alive(pid) && !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    let mut errors = Errors::default();
    let mut report = String::new();
    for id in &ids {
        let _ = write!(report, "{id} ");
        errors.note(remove_bed_leftovers(id, &cgroup_root));
    }
    errors.into_result().with_context(|| format!("cleanup of stale test beds {report}"))?;
    Ok(ids)
}

impl Testbed {
    /// Makes another cgroup beside pod `pod`'s (a second container's scope in the same pod
    /// directory, as the kubelet's runtime makes one per container); removed with the pod.
    pub fn add_pod_cgroup(&mut self, pod: &str, name: &str) -> Result<PathBuf> {
        ensure!(
            !name.is_empty() && !name.starts_with('.') && !name.contains('/'),
            "cgroup name {name:?}: one plain path component"
        );
        let entry =
            self.pods.get_mut(pod).with_context(|| format!("add cgroup: no pod {pod:?}"))?;
        let parent = entry.pod.cgroup.parent().context("pod cgroup has no parent")?.to_owned();
        let dir = CgroupDir::create(parent.join(name))?;
        let path = dir.path().to_owned();
        entry.member.nested.push(dir);
        Ok(path)
    }

    /// Starts `cmd` in the cgroup directory `cgroup` and the network namespace `netns`, which
    /// need not be the pod's (another pod's, or the host's `/proc/self/ns/net`: a runtime's
    /// helper, a process that made a namespace of its own); killed when pod `pod` goes.
    pub fn spawn_in_cgroup_netns(
        &self,
        pod: &str,
        cgroup: &Path,
        netns: &Path,
        cmd: Command,
    ) -> Result<PodProcess> {
        let entry = self.pod_entry(pod)?;
        let procs = cgroup.join("cgroup.procs");
        let label = format!("pod {pod} cgroup {} ({})", cgroup.display(), program_name(&cmd));
        let (process, shared) = process::spawn(cmd, Some(&procs), netns, label)?;
        entry.member.register(shared);
        Ok(process)
    }
}
