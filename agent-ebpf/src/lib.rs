//! Types shared between the eBPF programs and the agent.
//!
//! Every type here is `#[repr(C)]` with explicit padding fields: map keys are compared
//! byte-for-byte by the kernel, so no byte may be left uninitialised.
#![no_std]

/// Port of the agent's outbound capture listener inside every enrolled pod.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the agent's inbound HBONE listener on every enrolled pod's IP.
pub const INBOUND_PORT: u16 = 15008;
/// Entries of `AGENT_CGROUPS`: the cgroups of running agent instances (two during a rolling
/// update), plus room for ids left by instances that crashed (removed by the next instance).
pub const MAX_AGENT_INSTANCES: u32 = 64;

/// Maximum enrolled pods per node (`ENROLLED` map size).
pub const MAX_PODS: u32 = 4096;
/// How many cgroup levels below the root `connect4/6` look for a held pod cgroup: the pod's
/// directory sits at level 3 to 4 under a bare kubelet, deeper under kind or a custom
/// `cgroupRoot`, and the container's scope one or two below it.
pub const MAX_HELD_DEPTH: u32 = 12;
/// Maximum in-flight captured connections per node (`ORIG_DST`, `PENDING` sizes).
pub const MAX_CONNS: u32 = 65536;

/// Most `PENDING` records one pod may hold at once. A record lives from connect() to
/// `TCP_CONNECT_CB`, inside that one syscall, so a pod holds about one per thread that is in
/// connect() right now; only connect()s that fail before the SYN, on sockets still open, leave
/// records for longer (until `sock_release`). 512 is far above any real pod's concurrent
/// connect()s, and 128 pods would all have to flood at once to fill the node's 65,536. Over the
/// quota a connect() is still redirected, without a record, so the agent refuses it: that pod's
/// own connection fails closed, nobody else's. The check and the increment are not one atomic
/// step, so a pod may exceed the quota by at most one record per CPU.
pub const PENDING_QUOTA: u32 = 512;

/// Entries of `PROBE_CONNS`: the kubelet's open TCP connections (probes and the rest).
pub const MAX_PROBE_CONNS: u32 = 16384;

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Version of the layout of the pinned maps: their names, kinds, key and value types, sizes
/// and flags. **Bump it with any change to one of them** (and teach the agent's
/// `capture/upgrade.rs` to read the layout it replaces). A new agent over pins of an older
/// layout never reopens them: it loads its own maps in `maps/v<N>/` of the node's bpffs
/// directory, copies the enforcement state over, attaches beside the old programs and retires
/// those and their pins once its own enforce. Pins straight under `maps/` are version 1, the
/// layout before versions were recorded; version 2 has the same maps as version 1, in `maps/v2/`.
pub const LAYOUT_VERSION: u32 = 2;

/// Names of the maps (also their pin names in bpffs).
pub mod map_names {
    /// Netns cookie -> [`super::PodInfo`] (`ENROLLED` held a `PodInfo` without the pending
    /// count in earlier versions, hence the new name).
    pub const ENROLLED: &str = "ENROLLED_PODS";
    pub const CONFIG: &str = "CONFIG";
    /// cgroup v2 id -> pid of the instance that wrote it, for each running agent instance
    /// (`AGENT_CGROUPS`, an LRU map in development builds, had the same key and value).
    pub const AGENT_CGROUPS: &str = "AGENT_CGROUP_IDS";
    /// [`super::ProbeConn`] -> 1: connections opened by the kubelet (`--kubelet-cgroup`).
    pub const PROBE_CONNS: &str = "PROBE_CONNS";
    /// Socket cookie -> original destination between connect() and TCP_CONNECT_CB (a
    /// preallocated hash; earlier versions had an LRU `PENDING`, then `PENDING_DST` whose
    /// values carried a timestamp instead of the pod, hence the new name).
    pub const PENDING: &str = "PENDING_CONNS";
    pub const ORIG_DST: &str = "ORIG_DST";
    /// Inbound rules keyed by (pod netns cookie, port): `INBOUND` held the older layout keyed
    /// by (address, port), hence the new name (its pins are never reopened).
    pub const INBOUND: &str = "INBOUND_RULES";
    /// Per-CPU counters ([`super::stats`]); `STATS` had four slots in earlier versions.
    pub const STATS: &str = "COUNTERS";
    pub const EVENTS: &str = "EVENTS";
    pub const PLAINTEXT_EVENTS: &str = "PLAIN_EVENTS";
    /// The agent's own listeners per pod ([`ListenerKey`]): where `inbound` steers the agent's
    /// ports, so an app of the pod cannot squat them.
    pub const LISTENERS: &str = "LISTENERS";
    /// Pod cgroup id (inode of its cgroup v2 directory) -> flags: pods held closed until
    /// enrolled (`connect()` from them, or from cgroups below them, is refused).
    pub const HELD_CGROUPS: &str = "HELD_CGROUPS";
}

/// Key of `LISTENERS`: a pod's netns cookie and one of the `SLOT_*` listeners.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ListenerKey {
    pub netns_cookie: u64,
    pub slot: u32,
    pub _pad: u32,
}

/// The agent's outbound (capture) listener, 127.0.0.1:15001.
pub const SLOT_OUTBOUND_V4: u32 = 0;
/// The agent's outbound (capture) listener, [::1]:15001.
pub const SLOT_OUTBOUND_V6: u32 = 1;
/// The agent's tunnel listener for connections to the pod's IPv4 addresses on 15008.
pub const SLOT_TUNNEL_V4: u32 = 2;
/// The agent's tunnel listener for connections to the pod's IPv6 addresses on 15008.
pub const SLOT_TUNNEL_V6: u32 = 3;
/// Entries of `LISTENERS`: four slots per pod.
pub const MAX_LISTENERS: u32 = MAX_PODS * 4;

/// A plaintext connection attempt refused by a STRICT port (sent on `EVENTS` so the agent can
/// log it with the policy that decided). Addresses in network byte order, ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RejectEvent {
    pub local: [u32; 4],
    pub remote: [u32; 4],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u16,
    /// `REJECT_*`: why.
    pub reason: u16,
}

/// Plaintext to a STRICT port.
pub const REJECT_STRICT: u16 = 0;
/// A guarded pod without rules (being enrolled, or its enrollment failed): closed.
pub const REJECT_NO_RULES: u16 = 1;

/// A plaintext connection accepted by an app of an enrolled pod (PERMISSIVE, DISABLE, or a
/// probe), opened or closed: the agent is not in its path, so the kernel tells it, and the
/// operator sees unencrypted traffic too. Sent on `PLAINTEXT_EVENTS`. Addresses in network
/// byte order, ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PlaintextEvent {
    /// Socket cookie: pairs the close with its open.
    pub cookie: u64,
    /// At close: bytes the app received, and bytes it sent that the peer acknowledged.
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub local: [u32; 4],
    pub remote: [u32; 4],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u16,
    /// `PLAINTEXT_OPENED` or `PLAINTEXT_CLOSED`.
    pub kind: u16,
    /// At close: the TCP state the socket left (`BPF_TCP_*`), which tells whether the byte
    /// counts include a FIN (the kernel counts sequence space).
    pub old_state: u16,
    pub _pad: [u16; 3],
}

pub const PLAINTEXT_OPENED: u16 = 1;
pub const PLAINTEXT_CLOSED: u16 = 2;

/// Names of the programs in the object.
pub mod prog_names {
    pub const CONNECT4: &str = "mtls_connect4";
    pub const CONNECT6: &str = "mtls_connect6";
    pub const SOCK_OPS: &str = "mtls_sock_ops";
    pub const SOCK_RELEASE: &str = "mtls_sock_release";
    /// sock_ops attached at the kubelet's cgroup: records its connections in `PROBE_CONNS`.
    pub const KUBELET_SOCK_OPS: &str = "mtls_kubelet_ops";
    pub const INBOUND: &str = "mtls_inbound";
}

/// Maximum entries of `INBOUND_RULES` (pod default + per-port rules, per node).
pub const MAX_INBOUND_RULES: u32 = 65536;

/// Inbound mTLS modes as the enforcement program sees them.
pub const MODE_PERMISSIVE: u8 = 0;
pub const MODE_STRICT: u8 = 1;
pub const MODE_DISABLE: u8 = 2;

/// Indexes of `STATS` (per-CPU counters).
pub mod stats {
    /// Plaintext connection attempts refused by a STRICT port.
    pub const STRICT_REJECTED: u32 = 0;
    /// Plaintext allowed into a STRICT pod because the kubelet opened it to a probe port.
    pub const PROBE_ALLOWED: u32 = 1;
    /// Connections captured by connect4/connect6.
    pub const CAPTURED: u32 = 2;
    /// connect()s redirected without a record: their pod held `PENDING_QUOTA` already (or the
    /// node's map was full). The agent refuses them.
    pub const PENDING_OVER_QUOTA: u32 = 3;
    /// Connections to the agent's ports in a pod refused because the agent has no listener
    /// there (not enrolled yet, or down): never handed to whatever else listens on the port.
    pub const AGENT_PORT_UNSERVED: u32 = 4;
    /// TCP connect()s refused because the task's pod cgroup is held closed (the pod is bound to
    /// this node and in the mesh, its namespace not enrolled yet).
    pub const HELD_REFUSED: u32 = 5;
    /// Slots of the map; room for more counters without a new layout.
    pub const LEN: u32 = 8;
}

/// Key of `INBOUND_RULES`: a pod's netns cookie and a port; port 0 holds the pod's mode for
/// all other ports. Keyed by the namespace, not an address, so every address of the pod
/// (a second one, IPv6, one added later) is judged by the same rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PortKey {
    pub netns_cookie: u64,
    pub port: u16,
    pub _pad: [u16; 3],
}

/// Value of `INBOUND_RULES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PortPolicy {
    /// `MODE_*`.
    pub mode: u8,
    /// 1 when the node may probe this port in plaintext even under STRICT.
    pub probe: u8,
    pub _pad: [u8; 6],
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

/// Key of `PROBE_CONNS`: a TCP connection the kubelet opened, both ends as the kubelet's socket
/// has them (IPv4-mapped addresses reduced to IPv4). The pod's `sk_lookup` sees the same
/// tuple from the other side, whatever source address the node gave the kubelet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ProbeConn {
    pub kubelet: SockAddr,
    pub pod: SockAddr,
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

/// Value of `PENDING`: the original destination, and the pod (netns cookie) whose quota the
/// record counts against, so whoever deletes it (`TCP_CONNECT_CB`, `sock_release`) gives it
/// back.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PendingDst {
    pub orig: OrigDst,
    pub netns_cookie: u64,
}

/// Value of `ORIG_DST`: where the application meant to connect.
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
    /// `PENDING` records of this pod, changed atomically by the programs only (the agent
    /// inserts with `BPF_NOEXIST`, so re-enrolling never resets it). Read as signed: a record
    /// given back after the pod was released and enrolled again leaves it one low, not huge.
    pub pending: u32,
}

/// The single entry of `CONFIG`, written by the agent before attaching the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Config {
    /// Unused (was the agent's socket mark); kept so the layout of the pinned map stays.
    pub _unused: u32,
    pub outbound_port: u16,
    /// Family of `node_ip` (0 when unknown: no probe exemption).
    pub node_ip_family: u16,
    /// The node's own address, the source of kubelet probes (network byte order).
    pub node_ip: [u32; 4],
    /// `CONFIG_FLAG_*`.
    pub flags: u32,
    pub _pad: u32,
}

/// The programs write their debug lines (aya-log) only when the agent asks: a log line costs
/// far more than the rest of a program run.
pub const CONFIG_FLAG_LOG: u32 = 1;

// Map keys and values are compared and copied byte for byte: no hidden padding, and the sizes
// the pinned maps were created with.
const _: () = {
    assert!(core::mem::size_of::<PodInfo>() == 8);
    assert!(core::mem::size_of::<PendingDst>() == 32);
    assert!(core::mem::size_of::<ProbeConn>() == 40);
};

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data structs with explicit padding and no pointers.
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::PendingDst {}
    unsafe impl aya::Pod for super::PodInfo {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::ListenerKey {}
    unsafe impl aya::Pod for super::PortPolicy {}
    unsafe impl aya::Pod for super::RejectEvent {}
    unsafe impl aya::Pod for super::PlaintextEvent {}
    unsafe impl aya::Pod for super::ProbeConn {}
}
