//! Kernel feature probe: the agent checks, before loading anything, every kernel feature it relies
//! on, and refuses to start with one line naming a missing feature and the minimum kernel,
//! instead of failing later or silently capturing nothing.
//!
//! Features are tested, not inferred from the version (distribution kernels backport): program and
//! map types by creating them, helpers by loading a two-instruction program of the type that
//! calls them (the verifier refuses a helper the type may not call), bpf_link by asking the kernel
//! to create one for a bad target. When several are missing, the one with the newest minimum
//! kernel is named: that is the version the node needs.
//!
//! A bpf() the kernel denies (EPERM/EACCES: no privileges, a seccomp profile, an LSM) says
//! nothing about the kernel: when the plainest map and program (which every kernel has) are
//! denied, it is reported as such ([`ProbeError::NotPermitted`]), never as a missing feature, so
//! a container without privileges is not taken for a refused node. Past them, EPERM/EACCES on a
//! feature is the kernel's refusal of that feature (older verifiers answer so).

use std::os::fd::{FromRawFd, OwnedFd};

use aya::util::KernelVersion;

/// A missing feature, worded for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this kernel ({kernel}) lacks {feature} (needs Linux {min} or newer)")]
pub struct MissingFeature {
    pub kernel: String,
    pub feature: &'static str,
    pub min: String,
}

/// Why the probe cannot pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The kernel lacks a feature: a property of the node.
    #[error(transparent)]
    Missing(#[from] MissingFeature),
    /// `--min-kernel` (a test knob) refused the kernel: played as a node property, never one.
    #[error(transparent)]
    MinKernel(MissingFeature),
    /// bpf() was denied: the agent's privileges, not the node's kernel.
    #[error("bpf() denied while probing {what}: {errno}: the agent needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (or CAP_SYS_ADMIN; the DaemonSet's container is privileged) and no seccomp profile or LSM that denies bpf(); this says nothing about the kernel")]
    NotPermitted { what: &'static str, errno: String },
}

/// A bpf() the kernel denied (its errno); any other failure means "not supported".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Denied(i32);

/// One requirement: what, the kernel that brought it, and how to tell.
struct Requirement {
    feature: &'static str,
    min: &'static str,
    present: fn() -> Result<bool, Denied>,
}

// Kernel ABI numbers (include/uapi/linux/bpf.h); stable by definition.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const MAP_HASH: u32 = 1;
const MAP_ARRAY: u32 = 2;
const MAP_PERCPU_ARRAY: u32 = 6;
const MAP_LRU_HASH: u32 = 9;
const MAP_RINGBUF: u32 = 27;
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;
const PROG_SOCKET_FILTER: u32 = 1;
const PROG_CGROUP_SOCK: u32 = 9;
const PROG_SOCK_OPS: u32 = 13;
const PROG_CGROUP_SOCK_ADDR: u32 = 18;
const PROG_SK_LOOKUP: u32 = 30;
const ATTACH_CGROUP_SOCK_OPS: u32 = 3;
const ATTACH_INET4_CONNECT: u32 = 10;
const ATTACH_INET6_CONNECT: u32 = 11;
const ATTACH_INET_SOCK_RELEASE: u32 = 34;
const ATTACH_SK_LOOKUP: u32 = 36;
const HELPER_GET_SOCKET_COOKIE: i32 = 46;
const HELPER_SOCK_OPS_CB_FLAGS_SET: i32 = 59;
const HELPER_GET_CURRENT_CGROUP_ID: i32 = 80;
const HELPER_GET_NETNS_COOKIE: i32 = 122;

/// The requirements, oldest first (the order only matters for ties).
const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        feature: "hash, array and per-CPU array maps",
        min: "4.6",
        present: || {
            Ok(create_map(MAP_HASH, 8, 8, 1, 0)?
                && create_map(MAP_ARRAY, 4, 8, 1, 0)?
                && create_map(MAP_PERCPU_ARRAY, 4, 8, 1, 0)?)
        },
    },
    Requirement {
        feature: "LRU hash maps with per-CPU lists (BPF_F_NO_COMMON_LRU)",
        min: "4.10",
        present: || create_map(MAP_LRU_HASH, 8, 8, 1, BPF_F_NO_COMMON_LRU),
    },
    Requirement {
        feature: "sock_ops programs",
        min: "4.13",
        present: || loads(PROG_SOCK_OPS, 0, None),
    },
    Requirement {
        feature: "cgroup sock_addr programs (connect4/connect6)",
        min: "4.17",
        present: || {
            Ok(loads(PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_CONNECT, None)?
                && loads(PROG_CGROUP_SOCK_ADDR, ATTACH_INET6_CONNECT, None)?)
        },
    },
    Requirement {
        feature: "bpf_sock_ops_cb_flags_set in sock_ops programs (close callbacks)",
        min: "4.16",
        present: || loads(PROG_SOCK_OPS, 0, Some(HELPER_SOCK_OPS_CB_FLAGS_SET)),
    },
    Requirement {
        feature: "bpf_get_socket_cookie in cgroup sock_addr and sock_ops programs",
        min: "4.19",
        present: || {
            Ok(loads(PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_CONNECT, Some(HELPER_GET_SOCKET_COOKIE))?
                && loads(PROG_SOCK_OPS, 0, Some(HELPER_GET_SOCKET_COOKIE))?)
        },
    },
    Requirement {
        feature: "bpf_get_netns_cookie in cgroup sock_addr programs",
        min: "5.7",
        present: || {
            loads(PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_CONNECT, Some(HELPER_GET_NETNS_COOKIE))
        },
    },
    Requirement {
        feature: "bpf_get_current_cgroup_id in cgroup sock_addr programs (the agent's own sockets)",
        min: "5.7",
        present: || {
            loads(PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_CONNECT, Some(HELPER_GET_CURRENT_CGROUP_ID))
        },
    },
    Requirement {
        feature: "pinnable bpf_link for cgroup programs (BPF_LINK_CREATE)",
        min: "5.7",
        present: link_create_supported,
    },
    Requirement { feature: "BPF ring buffers", min: "5.8", present: ringbuf_supported },
    Requirement {
        feature: "cgroup sock_release programs with bpf_get_socket_cookie (pending records freed)",
        min: "5.9",
        present: || {
            loads(PROG_CGROUP_SOCK, ATTACH_INET_SOCK_RELEASE, Some(HELPER_GET_SOCKET_COOKIE))
        },
    },
    Requirement {
        feature: "sk_lookup programs",
        min: "5.9",
        present: || loads(PROG_SK_LOOKUP, ATTACH_SK_LOOKUP, None),
    },
    Requirement {
        feature: "the SO_NETNS_COOKIE socket option",
        min: "5.14",
        present: || Ok(so_netns_cookie()),
    },
    Requirement {
        feature: "net.ipv4.tcp_migrate_req (connections kept across agent updates)",
        min: "5.14",
        present: || Ok(std::path::Path::new("/proc/sys/net/ipv4/tcp_migrate_req").exists()),
    },
    Requirement {
        feature: "bpf_get_netns_cookie in sock_ops programs",
        min: "5.15",
        present: || loads(PROG_SOCK_OPS, 0, Some(HELPER_GET_NETNS_COOKIE)),
    },
];

/// `union bpf_attr` for BPF_MAP_CREATE, up to `map_flags` (older kernels accept the prefix).
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type` (4.17).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for BPF_LINK_CREATE, up to `flags` (5.7).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// One BPF instruction.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, imm: i32) -> Insn {
    Insn { code, regs: 0, off: 0, imm }
}
/// `insn` with destination register `dst`.
const fn insn_dst(code: u8, dst: u8, imm: i32) -> Insn {
    Insn { code, regs: dst, off: 0, imm }
}
const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
const MOV64_IMM: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

/// `bpf(cmd, attr, size)`: the new file descriptor, or the errno.
fn bpf<T>(cmd: libc::c_long, attr: &T) -> Result<OwnedFd, i32> {
    // SAFETY: `attr` is a live, initialised bpf_attr prefix of the size we pass.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, attr as *const T, std::mem::size_of::<T>() as u32)
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    // SAFETY: a successful call returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
}

/// Whether a bpf() result means "supported": a denial is not an answer.
fn supported<T>(r: Result<T, i32>) -> Result<bool, Denied> {
    match r {
        Ok(_) => Ok(true),
        Err(e @ (libc::EPERM | libc::EACCES)) => Err(Denied(e)),
        Err(_) => Ok(false),
    }
}

fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
) -> Result<bool, Denied> {
    let attr = MapCreateAttr { map_type, key_size, value_size, max_entries, map_flags: flags };
    supported(bpf(BPF_MAP_CREATE, &attr))
}

fn loads(prog_type: u32, expected_attach_type: u32, helper: Option<i32>) -> Result<bool, Denied> {
    supported(load_prog(prog_type, expected_attach_type, helper))
}

fn ringbuf_supported() -> Result<bool, Denied> {
    // A ring buffer's size is a power-of-two multiple of the page size; keys and values are 0.
    create_map(MAP_RINGBUF, 0, 0, 4096, 0)
}

/// Loads `r2 = 0; r0 = helper(ctx, 0); r0 = 1; exit` (or only the return), which every
/// program type used here accepts, and keeps it open.
fn load_prog(
    prog_type: u32,
    expected_attach_type: u32,
    helper: Option<i32>,
) -> Result<OwnedFd, i32> {
    let mut insns = Vec::with_capacity(4);
    if let Some(h) = helper {
        // r1 holds the context on entry: the helpers probed here take it as their first
        // argument, and at most a number (zero will do) as their second.
        insns.push(insn_dst(MOV64_IMM, 2, 0));
        insns.push(insn(CALL, h));
    }
    insns.push(insn(MOV64_IMM, 1));
    insns.push(insn(EXIT, 0));
    let license = c"GPL";
    let attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type,
        ..Default::default()
    };
    bpf(BPF_PROG_LOAD, &attr)
}

/// BPF_LINK_CREATE with a real program and a bad target: a kernel that has the command
/// fails on the target (EBADF), an older one does not know the command (EINVAL).
fn link_create_supported() -> Result<bool, Denied> {
    let prog = match load_prog(PROG_SOCK_OPS, 0, None) {
        Ok(p) => p,
        Err(e) => return supported(Err::<(), _>(e)),
    };
    use std::os::fd::AsRawFd;
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: u32::MAX,
        attach_type: ATTACH_CGROUP_SOCK_OPS,
        flags: 0,
    };
    match bpf(BPF_LINK_CREATE, &attr) {
        Err(libc::EBADF) => Ok(true),
        Err(e @ (libc::EPERM | libc::EACCES)) => Err(Denied(e)),
        _ => Ok(false),
    }
}

fn so_netns_cookie() -> bool {
    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .and_then(|s| crate::inpod::netns_cookie(&s))
        .is_ok()
}

/// Checks every requirement. Of the missing ones, the one needing the newest kernel is named
/// (the others are logged at debug level).
pub fn probe() -> Result<(), ProbeError> {
    probe_with(None)
}

/// `--min-kernel`, for tests: `MAJOR.MINOR`.
pub fn parse_min_kernel(s: &str) -> Result<(u32, u32), String> {
    let (major, minor) = s.split_once('.').ok_or_else(|| format!("{s:?}: expected MAJOR.MINOR"))?;
    let n = |p: &str| p.parse::<u32>().map_err(|e| format!("{s:?}: {e}"));
    Ok((n(major)?, n(minor)?))
}

/// As [`probe`], and (tests only, `--min-kernel`) refuses a kernel older than `min_kernel` as
/// if a feature it lacks were missing, so a refused node can be played on a kernel that has
/// everything.
pub fn probe_with(min_kernel: Option<(u32, u32)>) -> Result<(), ProbeError> {
    let current = || {
        KernelVersion::current().map(|k| k.to_string()).unwrap_or_else(|_| "unknown version".into())
    };
    if let Some((major, minor)) = min_kernel {
        let wanted = KernelVersion::new(
            u8::try_from(major).unwrap_or(u8::MAX),
            u8::try_from(minor).unwrap_or(u8::MAX),
            0,
        );
        // An unreadable version is refused too: the override asks for a known kernel.
        if KernelVersion::current().map_or(true, |k| k < wanted) {
            return Err(ProbeError::MinKernel(MissingFeature {
                kernel: current(),
                feature: "the kernel version --min-kernel asks for (a test override)",
                min: format!("{major}.{minor}"),
            }));
        }
    }
    // First the plainest calls there are, a map and a program every kernel has: denied, it is
    // the agent's privileges, not the kernel.
    if let Err(Denied(e)) = create_map(MAP_ARRAY, 4, 8, 1, 0) {
        return Err(not_permitted("an array map (BPF_MAP_CREATE)", e));
    }
    if let Err(e @ (libc::EPERM | libc::EACCES)) = load_prog(PROG_SOCKET_FILTER, 0, None) {
        return Err(not_permitted("a socket filter program (BPF_PROG_LOAD)", e));
    }
    let mut missing = Vec::new();
    for r in REQUIREMENTS {
        match (r.present)() {
            Ok(true) => {}
            // With both allowed, a denial is the kernel's answer to this feature: older kernels
            // refuse a program type or helper they lack with EPERM or EACCES (5.10 does so for
            // bpf_get_socket_cookie in sock_release programs).
            Ok(false) | Err(Denied(_)) => missing.push(r),
        }
    }
    for r in &missing {
        tracing::debug!(feature = r.feature, min = r.min, "kernel feature missing");
    }
    let worst = missing.into_iter().fold(None::<&Requirement>, |worst, r| match worst {
        Some(w) if version(w.min) >= version(r.min) => Some(w),
        _ => Some(r),
    });
    match worst {
        None => Ok(()),
        Some(r) => {
            Err(MissingFeature { kernel: current(), feature: r.feature, min: r.min.into() }.into())
        }
    }
}

fn not_permitted(what: &'static str, errno: i32) -> ProbeError {
    ProbeError::NotPermitted { what, errno: std::io::Error::from_raw_os_error(errno).to_string() }
}

fn version(v: &str) -> (u32, u32) {
    let mut it = v.split('.').map(|p| p.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_has_everything() {
        assert_eq!(probe(), Ok(()));
    }

    #[test]
    fn each_probe_passes_here_and_a_bogus_helper_fails() {
        for r in REQUIREMENTS {
            assert_eq!((r.present)(), Ok(true), "{} reported missing", r.feature);
        }
        // Helper 0 (unspec) exists nowhere: the verifier must refuse it.
        assert_eq!(loads(PROG_SOCK_OPS, 0, Some(0)), Ok(false));
        // A real helper in a program type that may not call it is refused too (sk_lookup has
        // no netns cookie): the probe tells helpers apart per program type.
        assert_eq!(
            loads(PROG_SK_LOOKUP, ATTACH_SK_LOOKUP, Some(HELPER_GET_NETNS_COOKIE)),
            Ok(false)
        );
    }

    #[test]
    fn the_refusal_names_the_feature_and_the_minimum_kernel() {
        let e = MissingFeature {
            kernel: "5.10.0".into(),
            feature: "bpf_get_netns_cookie in sock_ops programs",
            min: "5.15".into(),
        };
        assert_eq!(
            e.to_string(),
            "this kernel (5.10.0) lacks bpf_get_netns_cookie in sock_ops programs (needs Linux 5.15 or newer)"
        );
    }

    #[test]
    fn min_kernel_refuses_an_older_kernel_only() {
        assert_eq!(parse_min_kernel("99.0"), Ok((99, 0)));
        assert!(parse_min_kernel("6").is_err() && parse_min_kernel("6.x").is_err());
        let Err(ProbeError::MinKernel(e)) = probe_with(Some((99, 0))) else {
            panic!("not refused")
        };
        assert_eq!(e.min, "99.0");
        assert!(e.to_string().contains("needs Linux 99.0 or newer"), "{e}");
        assert_eq!(probe_with(Some((4, 0))), Ok(()));
    }

    #[test]
    fn only_unsupported_errnos_mean_a_missing_feature() {
        assert_eq!(supported(Ok::<(), i32>(())), Ok(true));
        for e in [libc::EINVAL, libc::E2BIG, libc::EOPNOTSUPP, 524 /* ENOTSUPP */] {
            assert_eq!(supported(Err::<(), _>(e)), Ok(false), "errno {e}");
        }
        assert_eq!(supported(Err::<(), _>(libc::EPERM)), Err(Denied(libc::EPERM)));
        assert_eq!(supported(Err::<(), _>(libc::EACCES)), Err(Denied(libc::EACCES)));
    }

    /// `struct __user_cap_header_struct` / `__user_cap_data_struct` (capset(2)).
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }

    #[test]
    fn bpf_denied_to_an_unprivileged_agent_is_not_a_missing_feature() {
        // Capabilities are per thread: this thread gives up all of them, the test's others
        // keep theirs. A root process without capabilities is what a non-privileged
        // container (or one whose seccomp profile denies bpf()) looks like to bpf().
        let got = std::thread::spawn(|| {
            let header = CapHeader { version: 0x2008_0522, pid: 0 }; // _LINUX_CAPABILITY_VERSION_3
            let data = [CapData::default(); 2];
            // SAFETY: a valid header and the two data words version 3 takes.
            let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
            assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
            probe()
        })
        .join()
        .unwrap();
        let Err(e @ ProbeError::NotPermitted { .. }) = got else {
            panic!("an unprivileged probe said {got:?}")
        };
        let text = e.to_string();
        assert!(text.contains("bpf() denied") && text.contains("CAP_BPF"), "{text}");
        assert!(text.contains("says nothing about the kernel"), "{text}");
        // With privileges, the same kernel passes.
        assert_eq!(probe(), Ok(()));
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version("5.15") > version("5.9"));
        assert!(version("4.10") < version("4.17"));
    }
}
