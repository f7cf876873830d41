//! Kernel feature probe: the agent checks, before loading anything, every kernel feature it relies
//! on, and refuses to start with one line naming the first one missing and the minimum kernel,
//! instead of failing later or silently capturing nothing.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
    util::KernelVersion,
};

/// The first missing feature, worded for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this kernel ({kernel}) lacks {feature} (needs Linux {min} or newer)")]
pub struct MissingFeature {
    pub kernel: String,
    pub feature: &'static str,
    pub min: &'static str,
}

/// One requirement: what, the kernel that brought it, and how to tell.
struct Requirement {
    feature: &'static str,
    min: &'static str,
    present: fn(&KernelVersion) -> bool,
}

fn program(t: ProgramType) -> bool {
    is_program_supported(t).unwrap_or(false)
}

fn at_least(k: &KernelVersion, major: u8, minor: u8) -> bool {
    *k >= KernelVersion::new(major, minor, 0)
}

const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        feature: "cgroup sock_addr programs (connect4/connect6)",
        min: "4.17",
        present: |_| program(ProgramType::CgroupSockAddr),
    },
    Requirement {
        feature: "sock_ops programs",
        min: "4.13",
        present: |_| program(ProgramType::SockOps),
    },
    Requirement {
        feature: "sk_lookup programs",
        min: "5.9",
        present: |_| program(ProgramType::SkLookup),
    },
    Requirement {
        feature: "BPF ring buffers",
        min: "5.8",
        present: |_| is_map_supported(MapType::RingBuf).unwrap_or(false),
    },
    // No cheap probe exists for link pinning and helper availability per program type; these
    // arrived in known releases.
    Requirement {
        feature: "pinnable bpf_link for cgroup programs",
        min: "5.7",
        present: |k| at_least(k, 5, 7),
    },
    Requirement {
        feature: "bpf_get_netns_cookie in sock_ops programs",
        min: "5.15",
        present: |k| at_least(k, 5, 15),
    },
    Requirement {
        feature: "the SO_NETNS_COOKIE socket option",
        min: "5.14",
        present: |_| so_netns_cookie(),
    },
    Requirement {
        feature: "net.ipv4.tcp_migrate_req (connections kept across agent updates)",
        min: "5.14",
        present: |_| std::path::Path::new("/proc/sys/net/ipv4/tcp_migrate_req").exists(),
    },
];

fn so_netns_cookie() -> bool {
    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .and_then(|s| crate::inpod::netns_cookie(&s))
        .is_ok()
}

/// Checks every requirement; the first missing one is the error.
pub fn probe() -> Result<(), MissingFeature> {
    let kernel = KernelVersion::current().unwrap_or(KernelVersion::new(0, 0, 0));
    for r in REQUIREMENTS {
        if !(r.present)(&kernel) {
            return Err(MissingFeature {
                kernel: kernel.to_string(),
                feature: r.feature,
                min: r.min,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_has_everything() {
        assert_eq!(probe(), Ok(()));
    }

    #[test]
    fn the_refusal_names_the_feature_and_the_minimum_kernel() {
        let e = MissingFeature {
            kernel: "5.10.0".into(),
            feature: "bpf_get_netns_cookie in sock_ops programs",
            min: "5.15",
        };
        assert_eq!(
            e.to_string(),
            "this kernel (5.10.0) lacks bpf_get_netns_cookie in sock_ops programs (needs Linux 5.15 or newer)"
        );
    }

    #[test]
    fn version_gates_compare_major_and_minor() {
        assert!(at_least(&KernelVersion::new(6, 1, 0), 5, 15));
        assert!(!at_least(&KernelVersion::new(5, 10, 200), 5, 15));
    }
}
