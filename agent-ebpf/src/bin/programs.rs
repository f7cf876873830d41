//! mtls-agent eBPF programs: outbound capture and inbound enforcement.
//!
//! `connect4`/`connect6` run when a process in an enrolled pod calls `connect()`: they save the
//! original destination under the socket's cookie and rewrite the destination to the agent's
//! in-pod listener. `sock_ops` moves that record, at `TCP_CONNECT_CB` (the local port is known,
//! the SYN not yet sent), to `ORIG_DST` keyed by (netns cookie, client address, client port) where
//! the agent finds it on accept, and deletes it when the socket closes. A connect() that fails
//! before the SYN leaves its record until `sock_release` deletes it; each pod may hold at most
//! `PENDING_QUOTA` records, so no pod can fill the map for the others.
//!
//! `inbound` (sk_lookup) is loaded once per enrolled pod, with the pod's netns cookie in
//! `POD_COOKIE`, and attached to the pod's network namespace. It runs when a new connection
//! arrives in that namespace: the agent's own ports go to the agent's listeners (`LISTENERS`;
//! refused when the agent has none there, never handed to an app that bound the port); loopback
//! passes; every other address is the pod's and is judged by the pod's rules (`INBOUND_RULES`,
//! keyed by cookie): a STRICT port refuses plaintext (the client gets a reset) unless it comes
//! from the pod itself (the agent delivering tunnelled bytes) or is a declared probe port
//! reached by a connection the kubelet opened (`kubelet_ops`, a sock_ops program on the
//! kubelet's cgroup, records those in `PROBE_CONNS`); a pod without rules refuses everything.
//! It reads only
//! pinned maps, so it keeps enforcing while the agent is down.
#![no_std]
#![no_main]
// Atomic read-modify-write on map values: the BPF target has no `core::sync::atomic` types.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use aya_ebpf::{
    bindings::{
        BPF_SK_LOOKUP_F_NO_REUSEPORT, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
        bpf_get_socket_cookie,
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use core::intrinsics::{atomic_xadd, AtomicOrdering};
use mtls_agent_ebpf::{
    stats, Config, ConnKey, ListenerKey, OrigDst, PendingDst, PlaintextEvent, PodInfo, PortKey,
    PortPolicy, ProbeConn, RejectEvent, SockAddr, AF_INET, AF_INET6, CONFIG_FLAG_LOG, INBOUND_PORT,
    MAX_AGENT_INSTANCES, MAX_CONNS, MAX_HELD_DEPTH, MAX_INBOUND_RULES, MAX_LISTENERS, MAX_PODS,
    MAX_PROBE_CONNS, MODE_STRICT, OUTBOUND_PORT, PENDING_QUOTA, PLAINTEXT_CLOSED, PLAINTEXT_OPENED,
    REJECT_NO_RULES, REJECT_STRICT, SLOT_OUTBOUND_V4, SLOT_OUTBOUND_V6, SLOT_TUNNEL_V4,
    SLOT_TUNNEL_V6,
};

const IPPROTO_TCP: u32 = 6;
const SOCK_STREAM: u32 = 1;
/// `::ffff:0:0/96` prefix word (network byte order) of IPv4-mapped IPv6 addresses.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const LOOPBACK_V6_LAST: u32 = u32::from_ne_bytes([0, 0, 0, 1]);

#[map(name = "ENROLLED_PODS")]
static ENROLLED: HashMap<u64, PodInfo> = HashMap::pinned(MAX_PODS, 0);
#[map]
static CONFIG: Array<Config> = Array::pinned(1, 0);
/// cgroup v2 ids of the running agent instances (two during a rolling update): their own
/// connect()s, made inside pods' namespaces, are never captured. A task cannot forge the cgroup
/// it runs in, unlike a socket mark. A plain hash, not an LRU map: a small LRU map with a
/// common LRU list can evict a live entry when another CPU inserts, and an evicted id would
/// send that instance's own dials back into an agent. The value is the writer's pid: a new
/// instance removes the ids of instances that are gone (cgroup ids are never reused, so a
/// stale one matches nothing meanwhile).
#[map(name = "AGENT_CGROUP_IDS")]
static AGENT_CGROUPS: HashMap<u64, u32> = HashMap::pinned(MAX_AGENT_INSTANCES, 0);
/// Pod cgroups held closed (id = inode of the pod's cgroup v2 directory -> flags): the agent
/// knows the pod is bound to this node and in the mesh but has not enrolled its namespace yet.
/// A TCP connect() from a task in one of them, or in a cgroup below (its containers), whose
/// namespace is not enrolled is refused, so an init container cannot talk before capture.
#[map(name = "HELD_CGROUPS")]
static HELD: HashMap<u64, u32> = HashMap::pinned(MAX_PODS, 0);
/// Per-CPU LRU lists: no global lock on insert (the common LRU list costs about a microsecond).
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

/// Socket cookie -> original destination, between connect() and TCP_CONNECT_CB (microseconds
/// apart). A preallocated hash rather than an LRU map: on the connect() path an LRU insert
/// cost most of the program's run time. A connect() that fails before TCP_CONNECT_CB leaves
/// its record until the socket is released (`mtls_sock_release`); the pod's quota bounds how
/// many it may hold meanwhile.
#[map(name = "PENDING_CONNS")]
static PENDING: HashMap<u64, PendingDst> = HashMap::pinned(MAX_CONNS, 0);
#[map]
static ORIG_DST: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(MAX_CONNS, BPF_F_NO_COMMON_LRU);
/// Connections the kubelet opened (and has not closed), written by `mtls_kubelet_ops`; the only
/// plaintext a STRICT probe port admits. LRU: an entry lost to eviction refuses one probe
/// (fail closed) and never admits anything else.
#[map]
static PROBE_CONNS: LruHashMap<ProbeConn, u32> = LruHashMap::pinned(MAX_PROBE_CONNS, 0);
#[map(name = "INBOUND_RULES")]
static INBOUND: HashMap<PortKey, PortPolicy> = HashMap::pinned(MAX_INBOUND_RULES, 0);
#[map(name = "COUNTERS")]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::LEN, 0);
/// Refusals for the agent's log. Pinned: every pod's `inbound` instance (one load per pod)
/// writes to the one buffer the agent reads; while no agent reads, they are only counted.
#[map]
static EVENTS: RingBuf = RingBuf::pinned(256 * 1024, 0);
/// Plaintext connections accepted by enrolled pods' apps, opened and closed; not pinned, as
/// `EVENTS`.
#[map(name = "PLAIN_EVENTS")]
static PLAINTEXT_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Map update flags (include/uapi/linux/bpf.h).
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// The agent's listeners in each pod: `inbound` hands connections to the agent's ports to
/// them, whatever else is bound there. An entry goes when its socket closes.
#[map]
static LISTENERS: SockHash<ListenerKey> = SockHash::pinned(MAX_LISTENERS, 0);

/// The netns cookie of the pod this `inbound` instance guards, set by the agent at load time
/// (one instance per pod): sk_lookup programs have no netns-cookie helper.
#[unsafe(no_mangle)]
static POD_COOKIE: u64 = 0;

const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;

#[inline(always)]
fn count(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// Returns 1 (allow), or 0 (EPERM) for a TCP connect() from a held pod cgroup whose namespace
/// is not enrolled yet: capture only rewrites, and only the hold blocks.
#[cgroup_sock_addr(connect4)]
pub fn mtls_connect4(ctx: SockAddrContext) -> i32 {
    match should_capture(&ctx) {
        Gate::Capture(c) => {
            let _ = capture4(&ctx, c);
            1
        }
        Gate::NotEnrolled => {
            // SAFETY: valid for the duration of the program.
            let ip = unsafe { (*ctx.sock_addr).user_ip4 };
            // Loopback stays inside the pod's own namespace.
            if ip.to_ne_bytes()[0] != 127 && held(&ctx) {
                return 0;
            }
            1
        }
        Gate::Pass => 1,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn mtls_connect6(ctx: SockAddrContext) -> i32 {
    match should_capture(&ctx) {
        Gate::Capture(c) => {
            let _ = capture6(&ctx, c);
            1
        }
        Gate::NotEnrolled => {
            // SAFETY: valid for the duration of the program.
            let sa = unsafe { &*ctx.sock_addr };
            let w = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
            let v4_loopback =
                w[0] == 0 && w[1] == 0 && w[2] == V4_MAPPED_WORD && w[3].to_ne_bytes()[0] == 127;
            let v6_loopback = w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == LOOPBACK_V6_LAST;
            if !v4_loopback && !v6_loopback && held(&ctx) {
                return 0;
            }
            1
        }
        Gate::Pass => 1,
    }
}

/// Whether the calling task runs in a held pod cgroup or below it. The pod's cgroup sits a
/// few levels below the root (deeper under kind or a custom cgroupRoot): each ancestor level
/// is looked up, bounded.
#[inline(always)]
fn held(ctx: &SockAddrContext) -> bool {
    for level in 1..=MAX_HELD_DEPTH {
        // SAFETY: helper with a plain integer argument; 0 means no ancestor at that level.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            return false;
        }
        // SAFETY: read-only presence check.
        if unsafe { HELD.get(&id) }.is_some() {
            count(stats::HELD_REFUSED);
            if let Some(cfg) = CONFIG.get(0) {
                if cfg.flags & CONFIG_FLAG_LOG != 0 {
                    debug!(ctx, "refused connect() from held cgroup {}", id);
                }
            }
            return true;
        }
    }
    false
}

/// What capture needs of an enrolled pod's connect().
struct Capturing {
    cfg: &'static Config,
    netns: u64,
    pod: *mut PodInfo,
}

/// What connect() does with a socket.
enum Gate {
    /// An enrolled pod's TCP socket, not the agent's own.
    Capture(Capturing),
    /// A TCP socket of a namespace that is not enrolled: refused if its cgroup is held.
    NotEnrolled,
    /// Anything else passes untouched.
    Pass,
}

/// The config and the pod when this socket belongs to an enrolled pod and is not the agent's
/// own.
#[inline(always)]
fn should_capture(ctx: &SockAddrContext) -> Gate {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the duration of the program.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return Gate::Pass;
    }
    let Some(cfg) = CONFIG.get(0) else { return Gate::Pass };
    // SAFETY: helper call with the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // First, so sockets of pods not enrolled pay nothing more.
    let Some(pod) = ENROLLED.get_ptr_mut(&netns) else { return Gate::NotEnrolled };
    // The agent's own sockets in the pod's namespace: told apart by the cgroup of the task
    // calling connect(), which an app cannot choose.
    // SAFETY: helper without arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: read-only presence check.
    if unsafe { AGENT_CGROUPS.get(&cgroup) }.is_some() {
        return Gate::Pass;
    }
    Gate::Capture(Capturing { cfg, netns, pod })
}

/// The pod's count of `PENDING` records, as it is now.
#[inline(always)]
fn pending_held(pod: *mut PodInfo) -> i32 {
    // SAFETY: `pod` points into a map value, valid for the program run; an aligned 4-byte load
    // sees either the old or the new count.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*pod).pending)) as i32 }
}

/// Adds one to (`up`) or takes one from the pod's count of `PENDING` records, atomically: other CPUs
/// change it at the same time.
#[inline(always)]
fn pending_add(pod: *mut PodInfo, up: bool) {
    // SAFETY: `pod` is a valid map value pointer (see above); only the field's address is taken.
    let p = unsafe { core::ptr::addr_of_mut!((*pod).pending) };
    // Taking one is adding u32::MAX (wrapping): the BPF instruction set has an atomic add
    // for every CPU version, and no atomic subtract.
    let delta = if up { 1 } else { u32::MAX };
    // SAFETY: `p` points into a map value, valid for the program run; BPF atomic add.
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(p, delta) };
}

/// Records the original destination under the socket's cookie, within the pod's quota.
#[inline(always)]
fn save(ctx: &SockAddrContext, c: &Capturing, dst: SockAddr) -> Option<()> {
    // SAFETY: helper call with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let record = PendingDst { orig: OrigDst { dst, _pad: 0 }, netns_cookie: c.netns };
    // Signed: a count left one low by a re-enrolled pod is below the quota, not above.
    if pending_held(c.pod) < PENDING_QUOTA as i32
        && PENDING.insert(&cookie, &record, BPF_NOEXIST).is_ok()
    {
        pending_add(c.pod, true);
        return Some(());
    }
    // A second connect() on the same socket replaces its record, which is counted already.
    if PENDING.insert(&cookie, &record, BPF_EXIST).is_ok() {
        return Some(());
    }
    count(stats::PENDING_OVER_QUOTA);
    None
}

/// Deletes the socket's `PENDING` record, if any, and gives it back to its pod's quota.
/// Returns the record.
#[inline(always)]
fn take_pending(cookie: u64) -> Option<OrigDst> {
    // SAFETY: copied out before the entry is removed.
    let record = *unsafe { PENDING.get(&cookie) }?;
    // Only the deleter gives the record back: TCP_CONNECT_CB and sock_release never both do.
    PENDING.remove(&cookie).ok()?;
    if let Some(pod) = ENROLLED.get_ptr_mut(&record.netns_cookie) {
        pending_add(pod, false);
    }
    Some(record.orig)
}

/// Runs when a socket of a pod is released (its last descriptor closed): a connect() that failed
/// before TCP_CONNECT_CB left its record, which goes now. Returns 1 (allow) always.
#[cgroup_sock(sock_release)]
pub fn mtls_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_sock for the duration of the program.
    let protocol = unsafe { core::ptr::read_volatile(&(*ctx.sock).protocol) };
    if protocol == IPPROTO_TCP {
        // SAFETY: helper call with the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = take_pending(cookie);
    }
    1
}

fn capture4(ctx: &SockAddrContext, c: Capturing) -> Option<()> {
    let cfg = c.cfg;
    // SAFETY: valid for the duration of the program; connect4 may write user_ip4/user_port.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip = sa.user_ip4;
    if ip.to_ne_bytes()[0] == 127 {
        return None;
    }
    let port = u16::from_be(sa.user_port as u16);
    // Redirected even if the record fails: the agent then refuses the connection (fail
    // closed) instead of the app reaching its destination in plaintext.
    let saved = save(ctx, &c, SockAddr { addr: [ip, 0, 0, 0], port, family: AF_INET });
    sa.user_ip4 = LOOPBACK_V4;
    sa.user_port = u32::from(cfg.outbound_port.to_be());
    count(stats::CAPTURED);
    if cfg.flags & CONFIG_FLAG_LOG != 0 {
        debug!(ctx, "captured connect4 to port {} (recorded: {})", port, saved.is_some() as u8);
    }
    Some(())
}

fn capture6(ctx: &SockAddrContext, c: Capturing) -> Option<()> {
    let cfg = c.cfg;
    // SAFETY: valid for the duration of the program; connect6 may write user_ip6/user_port.
    let sa = unsafe { &mut *ctx.sock_addr };
    let w = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
    let port = u16::from_be(sa.user_port as u16);
    let v4_mapped = w[0] == 0 && w[1] == 0 && w[2] == V4_MAPPED_WORD;
    if v4_mapped {
        if w[3].to_ne_bytes()[0] == 127 {
            return None;
        }
        let _ = save(ctx, &c, SockAddr { addr: [w[3], 0, 0, 0], port, family: AF_INET });
        sa.user_ip6[3] = LOOPBACK_V4;
    } else {
        if w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == LOOPBACK_V6_LAST {
            return None;
        }
        let _ = save(ctx, &c, SockAddr { addr: w, port, family: AF_INET6 });
        sa.user_ip6[0] = 0;
        sa.user_ip6[1] = 0;
        sa.user_ip6[2] = 0;
        sa.user_ip6[3] = LOOPBACK_V6_LAST;
    }
    sa.user_port = u32::from(cfg.outbound_port.to_be());
    count(stats::CAPTURED);
    if cfg.flags & CONFIG_FLAG_LOG != 0 {
        debug!(ctx, "captured connect6 to port {}", port);
    }
    Some(())
}

#[sock_ops]
pub fn mtls_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            let _ = on_connect(&ctx);
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let _ = on_plaintext_accepted(&ctx);
        }
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == BPF_TCP_CLOSE {
                // Only two kinds of socket ask for state callbacks: captured app sockets
                // (connected to the agent's loopback listener) and plaintext accepted by an app.
                if is_captured(&ctx) {
                    if let Some(key) = conn_key(&ctx) {
                        let _ = ORIG_DST.remove(&key);
                    }
                } else if let Some((local, remote)) = addresses(&ctx) {
                    let _ = plaintext_event(&ctx, PLAINTEXT_CLOSED, local, remote);
                }
            }
        }
        _ => {}
    }
    1
}

fn on_connect(ctx: &SockOpsContext) -> Option<()> {
    // SAFETY: helper call with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = take_pending(cookie)?;
    let key = conn_key(ctx)?;
    ORIG_DST.insert(&key, &orig, 0).ok()?;
    // Ask for state callbacks so the entry is deleted when this socket closes.
    ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32).ok()
}

/// Attached at the kubelet's cgroup (`--kubelet-cgroup`): records each TCP connection it opens
/// in `PROBE_CONNS`, before its SYN leaves, and deletes it when the connection closes.
#[sock_ops]
pub fn mtls_kubelet_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            if let Some(key) = probe_conn(&ctx) {
                if PROBE_CONNS.insert(&key, &1, 0).is_ok() {
                    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
                }
            }
        }
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == BPF_TCP_CLOSE {
                if let Some(key) = probe_conn(&ctx) {
                    let _ = PROBE_CONNS.remove(&key);
                }
            }
        }
        _ => {}
    }
    1
}

/// The kubelet's connection as `PROBE_CONNS` keys it (IPv4-mapped reduced to IPv4).
#[inline(always)]
fn probe_conn(ctx: &SockOpsContext) -> Option<ProbeConn> {
    let (local, remote) = addresses(ctx)?;
    let local_port = ctx.local_port() as u16;
    let remote_port = u32::from_be(ctx.remote_port()) as u16;
    let mapped = local[0] == 0 && local[1] == 0 && local[2] == V4_MAPPED_WORD;
    let (family, local, remote) = match ctx.family() as u16 {
        AF_INET => (AF_INET, local, remote),
        // An IPv6 socket to an IPv4 address: the pod sees an IPv4 connection.
        AF_INET6 if mapped => (AF_INET, [local[3], 0, 0, 0], [remote[3], 0, 0, 0]),
        AF_INET6 => (AF_INET6, local, remote),
        _ => return None,
    };
    Some(ProbeConn {
        kubelet: SockAddr { addr: local, port: local_port, family },
        pod: SockAddr { addr: remote, port: remote_port, family },
    })
}

/// Whether this socket is an app's connection redirected to the agent's listener.
#[inline(always)]
fn is_captured(ctx: &SockOpsContext) -> bool {
    // sock_ops gives the remote port in network byte order in the upper half on little-endian
    // machines: `bpf_ntohl` of the field is the port.
    if u32::from_be(ctx.remote_port()) as u16 != OUTBOUND_PORT {
        return false;
    }
    match ctx.family() as u16 {
        AF_INET => ctx.remote_ip4() == LOOPBACK_V4,
        AF_INET6 => {
            let w = ctx.remote_ip6();
            let mapped = w[0] == 0 && w[1] == 0 && w[2] == V4_MAPPED_WORD && w[3] == LOOPBACK_V4;
            mapped || (w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == LOOPBACK_V6_LAST)
        }
        _ => false,
    }
}

/// An app of an enrolled pod accepted a connection that did not come through the agent:
/// plaintext on the wire (PERMISSIVE, DISABLE, or a probe). Reported, and followed to its close.
fn on_plaintext_accepted(ctx: &SockOpsContext) -> Option<()> {
    // SAFETY: helper call with the program's own context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of plain data.
    unsafe { ENROLLED.get(&netns_cookie) }?;
    let port = ctx.local_port() as u16;
    if port == INBOUND_PORT || port == OUTBOUND_PORT {
        return None;
    }
    let (local, remote) = addresses(ctx)?;
    // Traffic inside the pod (loopback, or the agent handing tunnelled bytes to the app from
    // the pod's own address) never crossed the network.
    if local == remote || is_loopback(&remote) {
        return None;
    }
    plaintext_event(ctx, PLAINTEXT_OPENED, local, remote)?;
    ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32).ok()
}

fn plaintext_event(
    ctx: &SockOpsContext,
    kind: u16,
    local: [u32; 4],
    remote: [u32; 4],
) -> Option<()> {
    // SAFETY: helper call with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain fields of the context; the kernel returns 0 for a socket that is not full.
    let (bytes_received, bytes_sent) =
        unsafe { ((*ctx.ops).bytes_received, (*ctx.ops).bytes_acked) };
    let event = PlaintextEvent {
        cookie,
        bytes_received,
        bytes_sent,
        local,
        remote,
        local_port: ctx.local_port() as u16,
        remote_port: u32::from_be(ctx.remote_port()) as u16,
        family: ctx.family() as u16,
        kind,
        old_state: if kind == PLAINTEXT_CLOSED { ctx.arg(0) as u16 } else { 0 },
        _pad: [0; 3],
    };
    // A full buffer loses the report, never the connection.
    PLAINTEXT_EVENTS.output::<PlaintextEvent>(&event, 0).ok()
}

/// (local, remote) addresses of the socket, IPv4 in the first word. Not inlined: inlined
/// copies on several paths get merged by the compiler into one load through a selected
/// context pointer, which the verifier refuses.
#[inline(never)]
fn addresses(ctx: &SockOpsContext) -> Option<([u32; 4], [u32; 4])> {
    // SAFETY: the kernel hands us a valid bpf_sock_ops for the duration of the program.
    let o = unsafe { &*ctx.ops };
    // Each field read once at its fixed offset, as in `inbound_allowed`: the verifier rejects
    // loads through a context pointer the compiler has offset.
    let family = read(&o.family) as u16;
    let local4 = read(&o.local_ip4);
    let remote4 = read(&o.remote_ip4);
    let local6 = read4(&o.local_ip6);
    let remote6 = read4(&o.remote_ip6);
    match family {
        AF_INET => Some(([local4, 0, 0, 0], [remote4, 0, 0, 0])),
        AF_INET6 => Some((local6, remote6)),
        _ => None,
    }
}

#[inline(always)]
fn is_loopback(a: &[u32; 4]) -> bool {
    let v4_loop = |w: u32| u32::from_be(w) >> 24 == 127;
    (a[1] == 0 && a[2] == 0 && a[3] == 0 && v4_loop(a[0]))
        || (a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED_WORD && v4_loop(a[3]))
        || (a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == LOOPBACK_V6_LAST)
}

/// The client side of this socket, as the agent's listener sees it (IPv4-mapped addresses
/// reduced to IPv4, since they arrive on the IPv4 listener).
#[inline(always)]
fn conn_key(ctx: &SockOpsContext) -> Option<ConnKey> {
    // SAFETY: helper call with the program's own context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let port = ctx.local_port() as u16;
    let client = match ctx.family() as u16 {
        AF_INET => SockAddr { addr: [ctx.local_ip4(), 0, 0, 0], port, family: AF_INET },
        AF_INET6 => {
            let w = ctx.local_ip6();
            if w[0] == 0 && w[1] == 0 && w[2] == V4_MAPPED_WORD {
                SockAddr { addr: [w[3], 0, 0, 0], port, family: AF_INET }
            } else {
                SockAddr { addr: w, port, family: AF_INET6 }
            }
        }
        _ => return None,
    };
    Some(ConnKey { netns_cookie, client, _pad: 0 })
}

#[sk_lookup]
pub fn mtls_inbound(ctx: SkLookupContext) -> u32 {
    match inbound_verdict(&ctx) {
        Verdict::Pass => SK_PASS,
        Verdict::Steer(slot) => {
            // SAFETY: a read-only global the agent set at load time.
            let netns_cookie = unsafe { core::ptr::read_volatile(&POD_COOKIE) };
            let key = ListenerKey { netns_cookie, slot, _pad: 0 };
            // Exactly the agent's socket: not another member of a reuseport group an app
            // may have joined.
            let flags = u64::from(BPF_SK_LOOKUP_F_NO_REUSEPORT);
            match LISTENERS.redirect_sk_lookup(&ctx, key, flags) {
                Ok(()) => SK_PASS,
                // No agent listener: refused, never handed to a squatter.
                Err(_) => {
                    count(stats::AGENT_PORT_UNSERVED);
                    SK_DROP
                }
            }
        }
        Verdict::Refuse(reason) => {
            count(stats::STRICT_REJECTED);
            // A full buffer loses the log line, never the verdict.
            let _ = EVENTS.output::<RejectEvent>(&reject_event(&ctx, reason), 0);
            SK_DROP
        }
    }
}

enum Verdict {
    Pass,
    /// To the agent's listener in this `LISTENERS` slot, or refused if there is none.
    Steer(u32),
    /// Plaintext to a STRICT port, or to a guarded pod without rules (`REJECT_*`).
    Refuse(u16),
}

/// The refusal as the agent logs it.
#[inline(always)]
fn reject_event(ctx: &SkLookupContext, reason: u16) -> RejectEvent {
    // SAFETY: as in `inbound_verdict`.
    let l = unsafe { &*ctx.lookup };
    let v4 = read(&l.family) == u32::from(AF_INET);
    let (local, remote) = if v4 {
        ([read(&l.local_ip4), 0, 0, 0], [read(&l.remote_ip4), 0, 0, 0])
    } else {
        (read4(&l.local_ip6), read4(&l.remote_ip6))
    };
    RejectEvent {
        local,
        remote,
        local_port: read(&l.local_port) as u16,
        // SAFETY: a 2-byte field at a fixed offset of the context.
        remote_port: u16::from_be(unsafe { core::ptr::read_volatile(&l.remote_port) }),
        family: if v4 { AF_INET } else { AF_INET6 },
        reason,
    }
}

#[inline(always)]
fn inbound_verdict(ctx: &SkLookupContext) -> Verdict {
    // SAFETY: the kernel hands us a valid bpf_sk_lookup for the duration of the program.
    let l = unsafe { &*ctx.lookup };
    if read(&l.protocol) != IPPROTO_TCP {
        return Verdict::Pass;
    }
    let port = read(&l.local_port) as u16;
    // Every context field is read once, at its fixed offset: the verifier rejects loads
    // through a context pointer the compiler has offset (as merging the two families would).
    let ctx_family = read(&l.family);
    let local4 = read(&l.local_ip4);
    let remote4 = read(&l.remote_ip4);
    let local6 = read4(&l.local_ip6);
    let remote6 = read4(&l.remote_ip6);
    let v4 = ctx_family == u32::from(AF_INET);
    let (local, remote, loopback) = if v4 {
        ([local4, 0, 0, 0], [remote4, 0, 0, 0], u32::from_be(local4) >> 24 == 127)
    } else if ctx_family == u32::from(AF_INET6) {
        let lo =
            local6[0] == 0 && local6[1] == 0 && local6[2] == 0 && local6[3] == LOOPBACK_V6_LAST;
        (local6, remote6, lo)
    } else {
        return Verdict::Pass;
    };
    // The agent's own ports go to the agent's sockets, whoever else bound them first.
    if loopback && port == OUTBOUND_PORT {
        return Verdict::Steer(if v4 { SLOT_OUTBOUND_V4 } else { SLOT_OUTBOUND_V6 });
    }
    if !loopback && port == INBOUND_PORT {
        return Verdict::Steer(if v4 { SLOT_TUNNEL_V4 } else { SLOT_TUNNEL_V6 });
    }
    // In-pod traffic on loopback never crossed the network.
    if loopback {
        return Verdict::Pass;
    }
    // Every other address of the namespace is the pod's, whichever one the client used.
    // SAFETY: a read-only global the agent set at load time.
    let netns_cookie = unsafe { core::ptr::read_volatile(&POD_COOKIE) };
    let key = PortKey { netns_cookie, port, _pad: [0; 3] };
    // SAFETY: read-only lookups; values are plain data.
    let policy = match unsafe { INBOUND.get(&key) } {
        Some(p) => *p,
        None => match unsafe { INBOUND.get(&PortKey { netns_cookie, port: 0, _pad: [0; 3] }) } {
            Some(p) => *p,
            // No rules (yet, or any more) for a pod this program guards: closed.
            None => return Verdict::Refuse(REJECT_NO_RULES),
        },
    };
    if policy.mode != MODE_STRICT {
        return Verdict::Pass;
    }
    // The pod itself, e.g. the agent handing a tunnelled connection to the app.
    if remote == local {
        return Verdict::Pass;
    }
    if policy.probe == 1 {
        // SAFETY: a 2-byte field at a fixed offset of the context (network byte order).
        let remote_port = u16::from_be(unsafe { core::ptr::read_volatile(&l.remote_port) });
        let family = if v4 { AF_INET } else { AF_INET6 };
        if probe_admitted(family, local, port, remote, remote_port) {
            count(stats::PROBE_ALLOWED);
            return Verdict::Pass;
        }
    }
    Verdict::Refuse(REJECT_STRICT)
}

/// A plaintext connection to a STRICT probe port is let in only when the kubelet opened it: its
/// 4-tuple, seen from the kubelet's side (our remote is its local end), is in `PROBE_CONNS`.
/// Whatever the source address (node IP, `cni0`/`cbr0`/`cilium_host`), and nothing else from
/// the node: not a host-network pod, not traffic the node forwarded and SNATed.
#[inline(always)]
fn probe_admitted(
    family: u16,
    local: [u32; 4],
    local_port: u16,
    remote: [u32; 4],
    remote_port: u16,
) -> bool {
    let key = ProbeConn {
        kubelet: SockAddr { addr: remote, port: remote_port, family },
        pod: SockAddr { addr: local, port: local_port, family },
    };
    // SAFETY: read-only presence check.
    unsafe { PROBE_CONNS.get(&key) }.is_some()
}

/// [`read`] of each word of an IPv6 address field.
#[inline(always)]
fn read4(words: &[u32; 4]) -> [u32; 4] {
    [read(&words[0]), read(&words[1]), read(&words[2]), read(&words[3])]
}

/// A load the compiler may not merge with others or turn into pointer arithmetic.
#[inline(always)]
fn read(field: &u32) -> u32 {
    // SAFETY: `field` is a valid reference into the program's context.
    unsafe { core::ptr::read_volatile(field) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
