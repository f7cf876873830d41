//! Which of a pod's processes holds the pod's network namespace: the sandbox.
//!
//! Every process of a pod's cgroup tree is a candidate, but not every one is in the pod's
//! namespace: CRI-O with `conmon_cgroup="pod"` puts conmon (a host process) there, and a
//! container may run Docker-in-Docker or a sandboxing browser, whose processes sit in
//! namespaces of their own. The choice, in order:
//! - a process in the host's namespace (`/proc/1/ns/net` under the agent's proc root) is never
//!   the pod's;
//! - a VMM or a user-space kernel (Kata's QEMU/Cloud Hypervisor/Firecracker, gVisor's runsc)
//!   means the pod's traffic never meets this kernel's sockets: not capturable;
//! - the sandbox (`pause`: containerd and CRI-O run it first, named so) comes first;
//! - once the pod's IPs are known, a namespace must hold every one of them (read from
//!   `/proc/<pid>/net/fib_trie` and `if_inet6`, which show the namespace of `<pid>`);
//! - before the IPs are known, only the sandbox's namespace is taken (and only if every
//!   process named so shares it), else the choice waits for the IPs.

use std::{
    collections::BTreeSet,
    io::{self, Read},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Commands of the sandbox process (`/proc/<pid>/comm`, at most 15 bytes).
const SANDBOX_COMMS: [&str; 1] = ["pause"];
/// Commands (prefixes) of processes that give a pod its own kernel.
const OWN_KERNEL_COMMS: [&str; 6] =
    ["qemu", "cloud-hyperviso", "firecracker", "runsc", "containerd-shim-kata", "kata-"];
/// Runtime handlers (`spec.runtimeClassName`, prefixes) that give a pod its own kernel.
const OWN_KERNEL_RUNTIMES: [&str; 5] = ["kata", "gvisor", "runsc", "firecracker", "fc"];
/// Read from each address file at most this much (the kernel's own output, but a namespace
/// may hold many routes).
const MAX_READ: u64 = 1 << 20;

/// A process of the pod's cgroup tree, and the cgroup it was found in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub pid: u32,
    pub cgroup: PathBuf,
}

/// The process whose namespace is the pod's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub pid: u32,
    pub cgroup: PathBuf,
    /// `(dev, inode)` of its `ns/net`: the namespace's identity.
    pub netns: (u64, u64),
}

/// Why no process of the pod was chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SandboxError {
    #[error("not capturable: {0} (its traffic never passes this node's kernel sockets)")]
    OwnKernel(String),
    #[error("no process in the pod's network namespace: {0}")]
    NoneFits(String),
    #[error(
        "no single sandbox (pause) process in the pod's cgroup; waiting for the pod's IP to \
         tell its namespace apart: {0}"
    )]
    Ambiguous(String),
}

/// Whether the runtime handler gives the pod its own kernel (Kata, gVisor, Firecracker).
pub fn own_kernel_runtime(runtime_class: &str) -> bool {
    let rc = runtime_class.to_ascii_lowercase();
    OWN_KERNEL_RUNTIMES.iter().any(|p| rc == *p || rc.starts_with(&format!("{p}-")))
        || rc.starts_with("kata")
}

/// Picks the pod's namespace among `members` (in the order found: cgroup tree, breadth first).
/// `ips` are the pod's addresses as the API reports them (empty before they are known).
pub fn choose(
    proc_root: &Path,
    members: &[Member],
    ips: &[IpAddr],
) -> Result<Chosen, SandboxError> {
    let host = netns_id(&proc_root.join("1/ns/net")).ok();
    let mut skipped = Vec::new();
    let mut sandbox = Vec::new();
    let mut others = Vec::new();
    for m in members {
        let dir = proc_root.join(m.pid.to_string());
        // Gone since cgroup.procs was read: not a candidate.
        let Ok(netns) = netns_id(&dir.join("ns/net")) else { continue };
        let comm = read_small(&dir.join("comm")).map(|c| c.trim().to_owned()).unwrap_or_default();
        if OWN_KERNEL_COMMS.iter().any(|p| comm.starts_with(p)) {
            return Err(SandboxError::OwnKernel(format!(
                "pid {} ({comm}) in {} runs the pod in its own kernel",
                m.pid,
                m.cgroup.display()
            )));
        }
        if Some(netns) == host {
            skipped.push(format!("pid {} ({comm}): the host's namespace", m.pid));
            continue;
        }
        let c = Chosen { pid: m.pid, cgroup: m.cgroup.clone(), netns };
        if SANDBOX_COMMS.contains(&comm.as_str()) {
            sandbox.push((c, comm));
        } else {
            others.push((c, comm));
        }
    }
    if !ips.is_empty() {
        // Each namespace's addresses are read once, however many processes share it: a pod
        // with thousands of processes must not cost thousands of reads per look.
        let mut looked_at = BTreeSet::new();
        for (c, comm) in sandbox.iter().chain(&others) {
            if !looked_at.insert(c.netns) {
                continue;
            }
            let held = addresses(&proc_root.join(c.pid.to_string()).join("net"));
            let missing: Vec<String> =
                ips.iter().filter(|ip| !held.contains(ip)).map(ToString::to_string).collect();
            if missing.is_empty() {
                return Ok(c.clone());
            }
            skipped.push(format!(
                "pid {} ({comm}): its namespace does not hold {}",
                c.pid,
                missing.join(", ")
            ));
        }
        return Err(SandboxError::NoneFits(describe(skipped)));
    }
    // Before the IPs are known only the sandbox itself is taken, and only if every sandbox
    // process agrees: a container can start a process of any name in a namespace of its own.
    let namespaces: BTreeSet<(u64, u64)> = sandbox.iter().map(|(c, _)| c.netns).collect();
    match (namespaces.len(), sandbox.first()) {
        (1, Some((c, _))) => Ok(c.clone()),
        (0, _) | (_, None) if others.is_empty() => Err(SandboxError::NoneFits(describe(skipped))),
        _ => {
            let seen: Vec<String> = sandbox
                .iter()
                .chain(&others)
                .map(|(c, comm)| format!("pid {} ({comm})", c.pid))
                .collect();
            Err(SandboxError::Ambiguous(seen.join(", ")))
        }
    }
}

/// The distinct network namespaces of `members` that are not the host's nor in `skip`, at
/// most `max`, each with the first process found in it: where a held pod's processes are,
/// whatever its sandbox (the namespaces to close to inbound traffic until it is enrolled).
pub fn namespaces(
    proc_root: &Path,
    members: &[Member],
    skip: &BTreeSet<(u64, u64)>,
    max: usize,
) -> Vec<Chosen> {
    let host = netns_id(&proc_root.join("1/ns/net")).ok();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for m in members {
        if out.len() >= max {
            break;
        }
        // Gone since cgroup.procs was read: nothing to close.
        let Ok(netns) = netns_id(&proc_root.join(m.pid.to_string()).join("ns/net")) else {
            continue;
        };
        if Some(netns) == host || skip.contains(&netns) || !seen.insert(netns) {
            continue;
        }
        out.push(Chosen { pid: m.pid, cgroup: m.cgroup.clone(), netns });
    }
    out
}

fn describe(skipped: Vec<String>) -> String {
    if skipped.is_empty() {
        "no process left to try".into()
    } else {
        format!("tried {}", skipped.join("; "))
    }
}

/// `(dev, inode)` of a namespace file.
pub fn netns_id(path: &Path) -> io::Result<(u64, u64)> {
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

fn read_small(path: &Path) -> io::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)?.take(MAX_READ).read_to_string(&mut text)?;
    Ok(text)
}

/// The local addresses of the namespace whose `/proc/<pid>/net` is `net`: IPv4 from
/// `fib_trie` (an address line followed by `/32 host LOCAL`), IPv6 from `if_inet6`.
pub fn addresses(net: &Path) -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    if let Ok(text) = read_small(&net.join("fib_trie")) {
        out.extend(local_v4(&text).into_iter().map(IpAddr::V4));
    }
    if let Ok(text) = read_small(&net.join("if_inet6")) {
        out.extend(inet6(&text).into_iter().map(IpAddr::V6));
    }
    out
}

/// Addresses marked `host LOCAL` in `/proc/net/fib_trie`.
fn local_v4(text: &str) -> Vec<Ipv4Addr> {
    let mut v = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(addr) = t.strip_prefix("|-- ").or_else(|| t.strip_prefix("+-- ")) {
            last = addr.split(['/', ' ']).next().and_then(|a| a.parse().ok());
        } else if t.starts_with("/32 host LOCAL") {
            v.extend(last);
        }
    }
    v.sort();
    v.dedup();
    v
}

/// The addresses of `/proc/net/if_inet6` (32 hex digits, then index, prefix, scope, flags, name).
fn inet6(text: &str) -> Vec<Ipv6Addr> {
    text.lines()
        .filter_map(|l| {
            let hex = l.split_whitespace().next()?;
            if hex.len() != 32 {
                return None;
            }
            u128::from_str_radix(hex, 16).ok().map(Ipv6Addr::from)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `/proc`: each process a directory with `comm`, `ns/net` (a plain file: its inode
    /// stands in for the namespace) and optionally `net/fib_trie`.
    struct FakeProc(tempfile::TempDir);

    impl FakeProc {
        fn new() -> FakeProc {
            let p = FakeProc(tempfile::tempdir().unwrap());
            p.netns("host");
            p.process(1, "systemd", "host", None);
            p
        }
        fn netns(&self, name: &str) -> PathBuf {
            let dir = self.0.path().join("namespaces");
            std::fs::create_dir_all(&dir).unwrap();
            let f = dir.join(name);
            if !f.exists() {
                std::fs::write(&f, name).unwrap();
            }
            f
        }
        fn process(&self, pid: u32, comm: &str, netns: &str, ip: Option<&str>) -> Member {
            let dir = self.0.path().join(pid.to_string());
            std::fs::create_dir_all(dir.join("ns")).unwrap();
            std::fs::create_dir_all(dir.join("net")).unwrap();
            std::fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
            std::fs::hard_link(self.netns(netns), dir.join("ns/net")).unwrap();
            if let Some(ip) = ip {
                let trie = format!(
                    "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n\
                     Local:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 127.0.0.1\n        /32 host LOCAL\n\
                     \x20    |-- {ip}\n        /32 host LOCAL\n"
                );
                std::fs::write(dir.join("net/fib_trie"), trie).unwrap();
            }
            Member { pid, cgroup: PathBuf::from(format!("/cg/{pid}")) }
        }
        fn root(&self) -> &Path {
            self.0.path()
        }
    }

    const IP: &str = "10.1.2.3";

    fn ip() -> Vec<IpAddr> {
        vec![IP.parse().unwrap()]
    }

    #[test]
    fn the_namespaces_to_close_are_each_non_host_one_once_bounded_and_skipping_known_ones() {
        let p = FakeProc::new();
        let members = vec![
            p.process(10, "conmon", "host", None),
            p.process(11, "app", "a", None),
            p.process(12, "worker", "a", None),
            p.process(13, "dind", "b", None),
            p.process(14, "nested", "c", None),
        ];
        let pids = |v: Vec<Chosen>| v.into_iter().map(|c| c.pid).collect::<Vec<_>>();
        let none = BTreeSet::new();
        assert_eq!(pids(namespaces(p.root(), &members, &none, 8)), [11, 13, 14]);
        assert_eq!(pids(namespaces(p.root(), &members, &none, 2)), [11, 13]);
        let a = netns_id(&p.netns("a")).unwrap();
        assert_eq!(pids(namespaces(p.root(), &members, &[a].into(), 8)), [13, 14]);
    }

    #[test]
    fn the_sandbox_wins_over_a_decoy_found_first() {
        let p = FakeProc::new();
        let decoy = p.process(10, "dockerd", "inner", Some("172.17.0.1"));
        let conmon = p.process(11, "conmon", "host", None);
        let pause = p.process(12, "pause", "pod", Some(IP));
        let app = p.process(13, "app", "pod", Some(IP));
        let members = [decoy, conmon, pause, app];
        // Before the IP is known: the pause process.
        assert_eq!(choose(p.root(), &members, &[]).unwrap().pid, 12);
        // After: the namespace holding the IP, the sandbox first.
        assert_eq!(choose(p.root(), &members, &ip()).unwrap().pid, 12);
    }

    #[test]
    fn with_the_ip_known_a_namespace_without_it_is_refused_with_the_reason() {
        let p = FakeProc::new();
        let decoy = p.process(10, "pause", "inner", Some("172.17.0.1"));
        let app = p.process(11, "app", "pod", Some(IP));
        assert_eq!(choose(p.root(), &[decoy.clone(), app], &ip()).unwrap().pid, 11);
        let e = choose(p.root(), &[decoy], &ip()).unwrap_err().to_string();
        assert!(e.contains("pid 10 (pause): its namespace does not hold 10.1.2.3"), "{e}");
    }

    #[test]
    fn host_processes_are_skipped_and_named() {
        let p = FakeProc::new();
        let conmon = p.process(11, "conmon", "host", None);
        let e = choose(p.root(), std::slice::from_ref(&conmon), &[]).unwrap_err();
        assert!(matches!(e, SandboxError::NoneFits(_)), "{e}");
        assert!(e.to_string().contains("pid 11 (conmon): the host's namespace"), "{e}");
        let app = p.process(12, "app", "pod", Some(IP));
        assert_eq!(choose(p.root(), &[conmon, app], &ip()).unwrap().pid, 12);
    }

    #[test]
    fn without_a_single_sandbox_the_choice_waits_for_the_ip() {
        let p = FakeProc::new();
        let a = p.process(10, "sh", "inner", Some("172.17.0.1"));
        let b = p.process(11, "app", "pod", Some(IP));
        // One namespace and no sandbox process: it may be a container's own.
        let e = choose(p.root(), std::slice::from_ref(&a), &[]).unwrap_err();
        assert!(matches!(e, SandboxError::Ambiguous(_)), "{e}");
        let e = choose(p.root(), &[a.clone(), b.clone()], &[]).unwrap_err();
        assert!(matches!(e, SandboxError::Ambiguous(_)), "{e}");
        assert_eq!(choose(p.root(), &[a.clone(), b.clone()], &ip()).unwrap().pid, 11);
        // Two "pause" processes in two namespaces: a container named one so.
        let fake = p.process(12, "pause", "inner", None);
        let real = p.process(13, "pause", "pod", Some(IP));
        let e = choose(p.root(), &[fake.clone(), real.clone()], &[]).unwrap_err();
        assert!(matches!(e, SandboxError::Ambiguous(_)), "{e}");
        assert_eq!(choose(p.root(), &[fake, real, a, b], &ip()).unwrap().pid, 13);
    }

    #[test]
    fn a_vmm_or_runsc_in_the_pod_is_not_capturable() {
        let p = FakeProc::new();
        let pause = p.process(10, "pause", "pod", Some(IP));
        let qemu = p.process(11, "qemu-system-x86", "pod", Some(IP));
        let e = choose(p.root(), &[pause.clone(), qemu], &ip()).unwrap_err();
        assert!(matches!(e, SandboxError::OwnKernel(_)), "{e}");
        let runsc = p.process(12, "runsc-sandbox", "pod", None);
        assert!(matches!(choose(p.root(), &[pause, runsc], &[]), Err(SandboxError::OwnKernel(_))));
        assert!(own_kernel_runtime("kata") && own_kernel_runtime("kata-qemu"));
        assert!(own_kernel_runtime("gvisor") && own_kernel_runtime("runsc"));
        assert!(!own_kernel_runtime("runc") && !own_kernel_runtime("crun"));
    }

    #[test]
    fn addresses_of_both_families() {
        let trie = "Local:\n  +-- 10.0.0.0/8 2 0 2\n     |-- 10.0.0.7\n        /32 host LOCAL\n\
                    \x20    |-- 10.0.0.255\n        /32 link BROADCAST\n";
        assert_eq!(local_v4(trie), vec![Ipv4Addr::new(10, 0, 0, 7)]);
        let v6 = "fd000000000000000000000000000007 02 40 00 80 eth0\n\
                  00000000000000000000000000000001 01 80 10 80 lo\n";
        assert_eq!(inet6(v6), vec!["fd00::7".parse::<Ipv6Addr>().unwrap(), Ipv6Addr::LOCALHOST]);
    }
}
