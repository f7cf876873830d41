//! mtls-agent eBPF programs: outbound capture.
//!
//! `connect4`/`connect6` run when a process in an enrolled pod calls `connect()`: they save the
//! original destination under the socket's cookie and rewrite the destination to the agent's
//! in-pod listener. `sock_ops` moves that record, at `TCP_CONNECT_CB` (the local port is known,
//! the SYN not yet sent), to `ORIG_DST` keyed by (netns cookie, client address, client port) where
//! the agent finds it on accept, and deletes it when the socket closes.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use mtls_agent_ebpf::{
    Config, ConnKey, OrigDst, PodInfo, SockAddr, AF_INET, AF_INET6, MAX_CONNS, MAX_PODS,
};

const IPPROTO_TCP: u32 = 6;
const SOCK_STREAM: u32 = 1;
/// `::ffff:0:0/96` prefix word (network byte order) of IPv4-mapped IPv6 addresses.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const LOOPBACK_V6_LAST: u32 = u32::from_ne_bytes([0, 0, 0, 1]);

#[map]
static ENROLLED: HashMap<u64, PodInfo> = HashMap::pinned(MAX_PODS, 0);
#[map]
static CONFIG: Array<Config> = Array::pinned(1, 0);
/// Socket cookie -> original destination, between connect() and TCP_CONNECT_CB. LRU so a
/// connect() that fails before TCP_CONNECT_CB cannot leak entries forever.
#[map]
static PENDING: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_CONNS, 0);
#[map]
static ORIG_DST: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(MAX_CONNS, 0);

/// Returns 1 (allow) always: capture only rewrites, it never blocks a connect().
#[cgroup_sock_addr(connect4)]
pub fn mtls_connect4(ctx: SockAddrContext) -> i32 {
    let _ = capture4(&ctx);
    1
}

#[cgroup_sock_addr(connect6)]
pub fn mtls_connect6(ctx: SockAddrContext) -> i32 {
    let _ = capture6(&ctx);
    1
}

/// The config when this socket belongs to an enrolled pod and is not the agent's own.
#[inline(always)]
fn should_capture(ctx: &SockAddrContext) -> Option<&'static Config> {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the duration of the program.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return None;
    }
    let cfg = CONFIG.get(0)?;
    // SAFETY: `sk` is always set for cgroup sock_addr programs.
    let mark = unsafe { (*sa.__bindgen_anon_1.sk).mark };
    if mark == cfg.agent_mark {
        return None;
    }
    // SAFETY: helper call with the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only presence check.
    unsafe { ENROLLED.get(&netns) }?;
    Some(cfg)
}

#[inline(always)]
fn save(ctx: &SockAddrContext, dst: SockAddr) -> Option<()> {
    // SAFETY: helper call with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    PENDING.insert(&cookie, &OrigDst { dst, _pad: 0 }, 0).ok()
}

fn capture4(ctx: &SockAddrContext) -> Option<()> {
    let cfg = should_capture(ctx)?;
    // SAFETY: valid for the duration of the program; connect4 may write user_ip4/user_port.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip = sa.user_ip4;
    if ip.to_ne_bytes()[0] == 127 {
        return None;
    }
    let port = u16::from_be(sa.user_port as u16);
    save(
        ctx,
        SockAddr {
            addr: [ip, 0, 0, 0],
            port,
            family: AF_INET,
        },
    )?;
    sa.user_ip4 = LOOPBACK_V4;
    sa.user_port = u32::from(cfg.outbound_port.to_be());
    debug!(ctx, "captured connect4 to port {}", port);
    Some(())
}

fn capture6(ctx: &SockAddrContext) -> Option<()> {
    let cfg = should_capture(ctx)?;
    // SAFETY: valid for the duration of the program; connect6 may write user_ip6/user_port.
    let sa = unsafe { &mut *ctx.sock_addr };
    let w = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let port = u16::from_be(sa.user_port as u16);
    let v4_mapped = w[0] == 0 && w[1] == 0 && w[2] == V4_MAPPED_WORD;
    if v4_mapped {
        if w[3].to_ne_bytes()[0] == 127 {
            return None;
        }
        save(
            ctx,
            SockAddr {
                addr: [w[3], 0, 0, 0],
                port,
                family: AF_INET,
            },
        )?;
        sa.user_ip6[3] = LOOPBACK_V4;
    } else {
        if w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == LOOPBACK_V6_LAST {
            return None;
        }
        save(
            ctx,
            SockAddr {
                addr: w,
                port,
                family: AF_INET6,
            },
        )?;
        sa.user_ip6[0] = 0;
        sa.user_ip6[1] = 0;
        sa.user_ip6[2] = 0;
        sa.user_ip6[3] = LOOPBACK_V6_LAST;
    }
    sa.user_port = u32::from(cfg.outbound_port.to_be());
    debug!(ctx, "captured connect6 to port {}", port);
    Some(())
}

#[sock_ops]
pub fn mtls_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            let _ = on_connect(&ctx);
        }
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == BPF_TCP_CLOSE {
                if let Some(key) = conn_key(&ctx) {
                    let _ = ORIG_DST.remove(&key);
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
    // SAFETY: copied out before the entry is removed.
    let orig = *unsafe { PENDING.get(&cookie) }?;
    let _ = PENDING.remove(&cookie);
    let key = conn_key(ctx)?;
    ORIG_DST.insert(&key, &orig, 0).ok()?;
    // Ask for state callbacks so the entry is deleted when this socket closes.
    ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32).ok()
}

/// The client side of this socket, as the agent's listener sees it (IPv4-mapped addresses
/// reduced to IPv4, since they arrive on the IPv4 listener).
#[inline(always)]
fn conn_key(ctx: &SockOpsContext) -> Option<ConnKey> {
    // SAFETY: helper call with the program's own context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let port = ctx.local_port() as u16;
    let client = match ctx.family() as u16 {
        AF_INET => SockAddr {
            addr: [ctx.local_ip4(), 0, 0, 0],
            port,
            family: AF_INET,
        },
        AF_INET6 => {
            let w = ctx.local_ip6();
            if w[0] == 0 && w[1] == 0 && w[2] == V4_MAPPED_WORD {
                SockAddr {
                    addr: [w[3], 0, 0, 0],
                    port,
                    family: AF_INET,
                }
            } else {
                SockAddr {
                    addr: w,
                    port,
                    family: AF_INET6,
                }
            }
        }
        _ => return None,
    };
    Some(ConnKey {
        netns_cookie,
        client,
        _pad: 0,
    })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
