//! Kernel feature probe: the agent checks, before loading anything, every kernel feature it relies
//! on, and refuses to start with one line naming a missing feature and the minimum kernel,
//! instead of failing later or silently capturing nothing.
//!
//! Features are tested, not inferred from the version (distribution kernels backport): program and
//! map types by creating them, helpers by loading a two-instruction program of the type that
//! calls them (the verifier refuses a helper the type may not call), bpf_link by asking the kernel
//! to create one for a bad target. When several are missing, the one with the newest minimum
//! kernel is named: that is the version the node needs.

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

/// One requirement: what, the kernel that brought it, and how to tell.
struct Requirement {
    feature: &'static str,
    min: &'static str,
    present: fn() -> bool,
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
            create_map(MAP_HASH, 8, 8, 1, 0)
                && create_map(MAP_ARRAY, 4, 8, 1, 0)
                && create_map(MAP_PERCPU_ARRAY, 4, 8, 1, 0)
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
        present: || load_prog(PROG_SOCK_OPS, 0, None).is_some(),
    },
    Requirement {
        feature: "cgroup sock_addr programs (connect4/connect6)",
        min: "4.17",
        present: || {
            load_prog(PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_CONNECT, None).is_some()
                && load_prog(PROG_CGROUP_SOCK_ADDR, ATTACH_INET6_CONNECT, None).is_some()
        },
    },
    Requirement {
        feature: "bpf_sock_ops_cb_flags_set in sock_ops programs (close callbacks)",
        min: "4.16",
        present: || load_prog(PROG_SOCK_OPS, 0, Some(HELPER_SOCK_OPS_CB_FLAGS_SET)).is_some(),
    },
    Requirement {
        feature: "bpf_get_socket_cookie in cgroup sock_addr and sock_ops programs",
        min: "4.19",
        present: || {
            load_prog(PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_CONNECT, Some(HELPER_GET_SOCKET_COOKIE))
                .is_some()
                && load_prog(PROG_SOCK_OPS, 0, Some(HELPER_GET_SOCKET_COOKIE)).is_some()
        },
    },
    Requirement {
        feature: "bpf_get_netns_cookie in cgroup sock_addr programs",
        min: "5.7",
        present: || {
            load_prog(PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_CONNECT, Some(HELPER_GET_NETNS_COOKIE))
                .is_some()
        },
    },
    Requirement {
        feature: "bpf_get_current_cgroup_id in cgroup sock_addr programs (the agent's own sockets)",
        min: "5.7",
        present: || {
            load_prog(
                PROG_CGROUP_SOCK_ADDR,
                ATTACH_INET4_CONNECT,
                Some(HELPER_GET_CURRENT_CGROUP_ID),
            )
            .is_some()
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
            load_prog(PROG_CGROUP_SOCK, ATTACH_INET_SOCK_RELEASE, Some(HELPER_GET_SOCKET_COOKIE))
                .is_some()
        },
    },
    Requirement {
        feature: "sk_lookup programs",
        min: "5.9",
        present: || load_prog(PROG_SK_LOOKUP, ATTACH_SK_LOOKUP, None).is_some(),
    },
    Requirement {
        feature: "the SO_NETNS_COOKIE socket option",
        min: "5.14",
        present: so_netns_cookie,
    },
    Requirement {
        feature: "net.ipv4.tcp_migrate_req (connections kept across agent updates)",
        min: "5.14",
        present: || std::path::Path::new("/proc/sys/net/ipv4/tcp_migrate_req").exists(),
    },
    Requirement {
        feature: "bpf_get_netns_cookie in sock_ops programs",
        min: "5.15",
        present: || load_prog(PROG_SOCK_OPS, 0, Some(HELPER_GET_NETNS_COOKIE)).is_some(),
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

fn create_map(map_type: u32, key_size: u32, value_size: u32, max_entries: u32, flags: u32) -> bool {
    let attr = MapCreateAttr { map_type, key_size, value_size, max_entries, map_flags: flags };
    bpf(BPF_MAP_CREATE, &attr).is_ok()
}

fn ringbuf_supported() -> bool {
    // A ring buffer's size is a power-of-two multiple of the page size; keys and values are 0.
    create_map(MAP_RINGBUF, 0, 0, 4096, 0)
}

/// Loads `r2 = 0; r0 = helper(ctx, 0); r0 = 1; exit` (or only the return), which every
/// program type used here accepts, and keeps it open.
fn load_prog(prog_type: u32, expected_attach_type: u32, helper: Option<i32>) -> Option<OwnedFd> {
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
    bpf(BPF_PROG_LOAD, &attr).ok()
}

/// BPF_LINK_CREATE with a real program and a bad target: a kernel that has the command
/// fails on the target (EBADF), an older one does not know the command (EINVAL).
fn link_create_supported() -> bool {
    let Some(prog) = load_prog(PROG_SOCK_OPS, 0, None) else { return false };
    use std::os::fd::AsRawFd;
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: u32::MAX,
        attach_type: ATTACH_CGROUP_SOCK_OPS,
        flags: 0,
    };
    matches!(bpf(BPF_LINK_CREATE, &attr), Err(libc::EBADF))
}

fn so_netns_cookie() -> bool {
    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .and_then(|s| crate::inpod::netns_cookie(&s))
        .is_ok()
}

/// Checks every requirement. Of the missing ones, the one needing the newest kernel is named
/// (the others are logged at debug level).
pub fn probe() -> Result<(), MissingFeature> {
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
pub fn probe_with(min_kernel: Option<(u32, u32)>) -> Result<(), MissingFeature> {
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
            return Err(MissingFeature {
                kernel: current(),
                feature: "the kernel version --min-kernel asks for (a test override)",
                min: format!("{major}.{minor}"),
            });
        }
    }
    let missing: Vec<&Requirement> = REQUIREMENTS.iter().filter(|r| !(r.present)()).collect();
    for r in &missing {
        tracing::debug!(feature = r.feature, min = r.min, "kernel feature missing");
    }
    let worst = missing.into_iter().fold(None::<&Requirement>, |worst, r| match worst {
        Some(w) if version(w.min) >= version(r.min) => Some(w),
        _ => Some(r),
    });
    match worst {
        None => Ok(()),
        Some(r) => Err(MissingFeature { kernel: current(), feature: r.feature, min: r.min.into() }),
    }
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
            assert!((r.present)(), "{} reported missing", r.feature);
        }
        // Helper 0 (unspec) exists nowhere: the verifier must refuse it.
        assert!(load_prog(PROG_SOCK_OPS, 0, Some(0)).is_none());
        // A real helper in a program type that may not call it is refused too (sk_lookup has
        // no netns cookie): the probe tells helpers apart per program type.
        assert!(
            load_prog(PROG_SK_LOOKUP, ATTACH_SK_LOOKUP, Some(HELPER_GET_NETNS_COOKIE)).is_none()
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
        let e = probe_with(Some((99, 0))).unwrap_err();
        assert_eq!(e.min, "99.0");
        assert!(e.to_string().contains("needs Linux 99.0 or newer"), "{e}");
        assert_eq!(probe_with(Some((4, 0))), Ok(()));
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version("5.15") > version("5.9"));
        assert!(version("4.10") < version("4.17"));
    }
}
