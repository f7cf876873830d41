//! Packet capture on the fabric bridge, to prove what does (not) cross the wire.

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use anyhow::{Context, Result};

/// Total captured bytes are capped; later frames are counted but not kept.
pub const CAPTURE_CAP: usize = 64 << 20;
/// Large enough for a GSO super-frame from a veth (up to 64 KiB + headers).
const FRAME_BUF: usize = 128 << 10;
const POLL_MS: libc::c_int = 50;
/// Bounds one drain under a flood; the next call picks up the rest.
const MAX_FRAMES_PER_DRAIN: usize = 100_000;

struct State {
    data: Vec<u8>,
    /// End offset in `data` of every kept frame.
    frame_ends: Vec<usize>,
    frames: u64,
    truncated: bool,
    kernel_drops: u64,
    scratch: Vec<u8>,
}

struct Inner {
    fd: OwnedFd,
    state: Mutex<State>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves every queued frame from the socket into the buffer.
    fn drain(&self) -> MutexGuard<'_, State> {
        let mut state = self.lock();
        let st = &mut *state;
        for _ in 0..MAX_FRAMES_PER_DRAIN {
            // SAFETY: scratch is a valid writable buffer of the given length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    st.scratch.as_mut_ptr().cast(),
                    st.scratch.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                // EAGAIN: queue empty. Anything else: nothing more to read either.
                break;
            }
            let n = n as usize;
            st.frames += 1;
            let room = CAPTURE_CAP.saturating_sub(st.data.len());
            st.truncated |= n > room;
            st.data.extend_from_slice(&st.scratch[..n.min(room)]);
            if n.min(room) > 0 {
                st.frame_ends.push(st.data.len());
            }
        }
        st.kernel_drops += read_drops(self.fd.as_raw_fd());
        state
    }
}

/// A running capture of every frame seen on the fabric bridge (the bridge is
/// put in promiscuous mode so frames forwarded between ports are seen too).
/// Frames are stored back to back; stopped on drop.
pub struct Capture {
    inner: Arc<Inner>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Capture {
    /// Opens the socket on the calling thread, which must be inside the fabric
    /// netns; the socket stays bound to that netns afterwards.
    pub(crate) fn open_here(bridge_index: u32) -> Result<OwnedFd> {
        // Protocol 0 until bound, so nothing from other interfaces is queued.
        // SAFETY: plain socket(2) call; the fd is owned right below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error()).context("socket(AF_PACKET)");
        }
        // SAFETY: raw is a fresh, valid fd that nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let ifindex = i32::try_from(bridge_index).context("bridge ifindex out of range")?;

        let rcvbuf: libc::c_int = 16 << 20;
        setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &rcvbuf)
            .context("SO_RCVBUFFORCE")?;

        // SAFETY: sockaddr_ll is plain data; zeroed is a valid starting value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as libc::c_ushort;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = ifindex;
        // SAFETY: addr is a properly initialised sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("bind AF_PACKET to bridge");
        }

        // SAFETY: packet_mreq is plain data.
        let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
        mreq.mr_ifindex = ifindex;
        mreq.mr_type = libc::PACKET_MR_PROMISC as libc::c_ushort;
        setsockopt(fd.as_raw_fd(), libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq)
            .context("PACKET_MR_PROMISC on bridge")?;
        Ok(fd)
    }

    pub(crate) fn start(fd: OwnedFd) -> Result<Capture> {
        let inner = Arc::new(Inner {
            fd,
            state: Mutex::new(State {
                data: Vec::new(),
                frame_ends: Vec::new(),
                frames: 0,
                truncated: false,
                kernel_drops: 0,
                scratch: vec![0u8; FRAME_BUF],
            }),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let inner = Arc::clone(&inner);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("fabric-capture".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let mut pfd = libc::pollfd {
                            fd: inner.fd.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        };
                        // SAFETY: one valid pollfd; the timeout bounds each iteration.
                        unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
                        drop(inner.drain());
                    }
                })
                .context("spawn capture thread")?
        };
        Ok(Capture { inner, stop, thread: Some(thread) })
    }

    /// Whether `needle` occurs in any frame captured so far (frames queued in
    /// the kernel are collected first). A needle split across TCP segments
    /// will not be found, so keep needles shorter than one segment.
    pub fn contains(&self, needle: &[u8]) -> bool {
        let state = self.inner.drain();
        !needle.is_empty() && state.data.windows(needle.len()).any(|w| w == needle)
    }

    /// Whether the TCP payload of some captured IPv4 frame from `src` (any port) to `dst`
    /// contains `needle`: what one flow carried, not just anything on the wire.
    pub fn tcp_payload_contains(&self, src: Ipv4Addr, dst: SocketAddrV4, needle: &[u8]) -> bool {
        let state = self.inner.drain();
        let mut start = 0;
        state.frame_ends.iter().any(|&end| {
            let frame = &state.data[start..end];
            start = end;
            tcp_payload(frame, src, dst)
                .is_some_and(|p| !needle.is_empty() && p.windows(needle.len()).any(|w| w == needle))
        })
    }

    /// Number of frames seen so far (including ones past the byte cap).
    pub fn frames(&self) -> u64 {
        self.inner.drain().frames
    }

    /// Frames the kernel dropped because we read too slowly; a non-zero value
    /// weakens any "X never crossed the fabric" conclusion.
    pub fn kernel_drops(&self) -> u64 {
        self.inner.drain().kernel_drops
    }

    /// Whether the byte cap was hit (later frames were not kept).
    pub fn truncated(&self) -> bool {
        self.inner.drain().truncated
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // Bounded: the thread checks the flag every POLL_MS.
            let _ = thread.join();
        }
    }

    /// Stops capturing and returns all frames, concatenated.
    pub fn stop(mut self) -> Vec<u8> {
        self.halt();
        let mut state = self.inner.drain();
        std::mem::take(&mut state.data)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The TCP payload of an Ethernet + IPv4 + TCP frame from `src` to `dst`, else `None`.
fn tcp_payload(frame: &[u8], src: Ipv4Addr, dst: SocketAddrV4) -> Option<&[u8]> {
    const ETH: usize = 14;
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = frame.get(ETH..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if ip.get(9)? != &6 || ip.get(12..16)? != src.octets() || ip.get(16..20)? != dst.ip().octets() {
        return None;
    }
    // A GSO super-frame may carry 0 as its total length; then the frame bounds the packet.
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let ip = if total == 0 { ip } else { ip.get(..total.min(ip.len()))? };
    let tcp = ip.get(ihl..)?;
    if tcp.get(2..4)? != dst.port().to_be_bytes() {
        return None;
    }
    let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
    tcp.get(data_offset..)
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: value points to a live T of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Kernel drop counter since the last call (reading resets it).
fn read_drops(fd: RawFd) -> u64 {
    let mut stats = libc::tpacket_stats { tp_packets: 0, tp_drops: 0 };
    let mut len = size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: stats/len describe a valid tpacket_stats buffer.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut stats as *mut libc::tpacket_stats).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        u64::from(stats.tp_drops)
    } else {
        0
    }
}
