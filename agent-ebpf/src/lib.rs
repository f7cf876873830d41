//! Types shared between the eBPF programs and the agent.
//!
//! Every type here is `#[repr(C)]` with explicit padding fields: map keys are compared
//! byte-for-byte by the kernel, so no byte may be left uninitialised.
#![no_std]

/// Port of the agent's outbound capture listener inside every enrolled pod.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the agent's inbound HBONE listener on every enrolled pod's IP.
pub const INBOUND_PORT: u16 = 15008;
/// `SO_MARK` carried by every socket the agent opens, so the programs never capture it.
pub const AGENT_MARK: u32 = 0x4d54_4c53; // "MTLS"

/// Maximum enrolled pods per node (`ENROLLED` map size).
pub const MAX_PODS: u32 = 4096;
/// Maximum in-flight captured connections per node (`ORIG_DST`, `PENDING` sizes).
pub const MAX_CONNS: u32 = 65536;

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Names of the maps (also their pin names in bpffs).
pub mod map_names {
    pub const ENROLLED: &str = "ENROLLED";
    pub const CONFIG: &str = "CONFIG";
    pub const PENDING: &str = "PENDING";
    pub const ORIG_DST: &str = "ORIG_DST";
}

/// Names of the programs in the object.
pub mod prog_names {
    pub const CONNECT4: &str = "mtls_connect4";
    pub const CONNECT6: &str = "mtls_connect6";
    pub const SOCK_OPS: &str = "mtls_sock_ops";
}

/// An IPv4 or IPv6 address and port as the kernel gives them: address words in network
/// byte order (an IPv4 address lives in `addr[0]`), the port in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockAddr {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
}

/// Key of `ORIG_DST`: the captured client socket, seen from the agent's listener.
/// The netns cookie is needed because loopback 4-tuples collide across pods.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    pub netns_cookie: u64,
    pub client: SockAddr,
    pub _pad: u32,
}

/// Value of `ORIG_DST` and `PENDING`: where the application meant to connect.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct OrigDst {
    pub dst: SockAddr,
    pub _pad: u32,
}

/// Value of `ENROLLED` (key: netns cookie of the pod).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PodInfo {
    /// Reserved for per-pod flags (policy mode, readiness) in later versions.
    pub flags: u32,
    pub _pad: u32,
}

/// The single entry of `CONFIG`, written by the agent before attaching the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Config {
    pub agent_mark: u32,
    pub outbound_port: u16,
    pub _pad: u16,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data structs with explicit padding and no pointers.
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::PodInfo {}
    unsafe impl aya::Pod for super::Config {}
}
