//! A pod's UDP listeners, from the kernel's `/proc/net/udp` and `/proc/net/udp6` read inside
//! the pod's network namespace. The agent neither captures nor enforces UDP; `check` lists these
//! so that the operator sees what STRICT does not cover.
//!
//! The files are the kernel's own output (`udp4_seq_show`), not untrusted input, but a pod may
//! hold many sockets: what is read is bounded.

use std::{
    collections::BTreeSet,
    io::Read,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use crate::inpod::{InpodError, PodNetns};

/// Read from each file at most this much: about 8,000 sockets (a line is 128 bytes for IPv4,
/// 166 for IPv6), far more than `check` lists; the admin API reads it while answering.
const MAX_READ: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ProcNetError {
    #[error("reading {UDP4} and {UDP6} in the pod's network namespace: {0}")]
    Read(#[source] InpodError),
    #[error("{file}:{line}: {field}: {detail}")]
    Parse { file: &'static str, line: usize, field: &'static str, detail: String },
}

/// `/proc/thread-self/net` is the namespace of the reading thread, which
/// [`PodNetns::run`] has moved into the pod's (`/proc/self/net` would be the main thread's).
const UDP4: &str = "/proc/thread-self/net/udp";
const UDP6: &str = "/proc/thread-self/net/udp6";

/// A pod's UDP listeners.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UdpListeners {
    /// The addresses its UDP sockets are bound to and receive on from anyone (those not
    /// connected to one peer). Sorted, each once: `SO_REUSEPORT` groups list one line per socket.
    pub addrs: Vec<SocketAddr>,
    /// A file was longer than [`MAX_READ`]: there may be more.
    pub truncated: bool,
}

/// Reads the UDP listeners of the pod whose namespace is `netns` (one short-lived thread in it).
pub fn udp_listeners(netns: &PodNetns) -> Result<UdpListeners, ProcNetError> {
    let texts = netns
        .run(|| {
            let mut texts = Vec::new();
            for file in [UDP4, UDP6] {
                let mut text = String::new();
                match std::fs::File::open(file) {
                    Ok(f) => {
                        f.take(MAX_READ).read_to_string(&mut text)?;
                    }
                    // A kernel without IPv6 has no udp6.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && file == UDP6 => {}
                    Err(e) => return Err(e),
                }
                texts.push((file, text));
            }
            Ok(texts)
        })
        .map_err(ProcNetError::Read)?;
    let mut all = BTreeSet::new();
    let mut truncated = false;
    for (file, text) in texts {
        truncated |= text.len() as u64 >= MAX_READ;
        all.extend(parse(&text, file)?);
    }
    Ok(UdpListeners { addrs: all.into_iter().collect(), truncated })
}

/// The unconnected, bound sockets of one `/proc/net/udp{,6}` text. A last line cut short by
/// [`MAX_READ`] is left out.
pub fn parse(text: &str, file: &'static str) -> Result<Vec<SocketAddr>, ProcNetError> {
    let mut out = Vec::new();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    // The first line is the header.
    for (i, line) in complete.lines().enumerate().skip(1) {
        let err = |field, detail: String| ProcNetError::Parse { file, line: i + 1, field, detail };
        let mut cols = line.split_whitespace();
        let _slot = cols.next();
        let local = cols.next().ok_or_else(|| err("local_address", "missing".into()))?;
        let remote = cols.next().ok_or_else(|| err("rem_address", "missing".into()))?;
        let local = endpoint(local).map_err(|d| err("local_address", d))?;
        let remote = endpoint(remote).map_err(|d| err("rem_address", d))?;
        // A connected socket takes datagrams from its peer only: a client, not a listener.
        if local.port() != 0 && remote.port() == 0 {
            out.push(local);
        }
    }
    Ok(out)
}

/// `0100007F:14E9` (IPv4) or 32 hex digits `:PORT` (IPv6). The kernel prints each 32-bit
/// word of the address as a native-endian integer, the port in host order.
fn endpoint(s: &str) -> Result<SocketAddr, String> {
    let (addr, port) = s.split_once(':').ok_or_else(|| format!("{s:?}: no ':'"))?;
    let port = u16::from_str_radix(port, 16).map_err(|e| format!("port {port:?}: {e}"))?;
    let word = |h: &str| {
        u32::from_str_radix(h, 16)
            .map(u32::to_ne_bytes)
            .map_err(|e| format!("address {addr:?}: {e}"))
    };
    let ip = match addr.len() {
        8 if addr.is_ascii() => IpAddr::V4(Ipv4Addr::from(word(addr)?)),
        32 if addr.is_ascii() => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(&addr[i * 8..i * 8 + 8])?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return Err(format!("address {addr:?}: neither 8 nor 32 hex digits")),
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use super::*;

    /// What the kernel printed for a wildcard listener on 5353, one on 127.0.0.1:53, a socket
    /// connected to 10.0.0.9:53 and two of one `SO_REUSEPORT` group.
    const UDP: &str = "\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  121: 00000000:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 31337 2 0000000000000000 0
  189: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 31338 2 0000000000000000 0
  201: 0A00000F:A3F1 0900000A:0035 01 00000000:00000000 00:00000000 00000000     0        0 31339 2 0000000000000000 0
  222: 0200000A:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 31340 2 0000000000000000 0
  222: 0200000A:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 31341 2 0000000000000000 0
";

    const UDP6: &str = "\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  121: 00000000000000000000000000000000:14EA 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 41 2 0000000000000000 0
  133: 000080FE00000000FFFEFF020200FE00:0222 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 42 2 0000000000000000 0
";

    fn addrs(v: &[SocketAddr]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn ipv4_listeners_are_unconnected_bound_sockets_in_network_order() {
        // Native-endian words: these literals are what a little-endian kernel prints.
        if cfg!(target_endian = "big") {
            return;
        }
        let got = parse(UDP, "udp").unwrap();
        assert_eq!(
            addrs(&got),
            ["0.0.0.0:5353", "127.0.0.1:53", "10.0.0.2:8080", "10.0.0.2:8080"],
            "the connected socket (to 10.0.0.9:53) is not a listener"
        );
    }

    #[test]
    fn ipv6_listeners_parse_each_word_in_host_order() {
        if cfg!(target_endian = "big") {
            return;
        }
        let got = parse(UDP6, "udp6").unwrap();
        assert_eq!(addrs(&got), ["[::]:5354", "[fe80::2ff:feff:fe:2]:546"]);
    }

    #[test]
    fn a_malformed_line_names_file_line_and_field_and_a_cut_last_line_is_left_out() {
        let bad = UDP.replace("0100007F:0035", "0100007G:0035");
        let err = parse(&bad, "udp").unwrap_err().to_string();
        assert!(err.starts_with("udp:3: local_address: address \"0100007G\""), "{err}");
        let bad = UDP.replace("0900000A:0035", "0900000A");
        let err = parse(&bad, "udp").unwrap_err().to_string();
        assert!(err.starts_with("udp:4: rem_address:"), "{err}");
        let cut = &UDP[..UDP.len() - 30];
        assert_eq!(parse(cut, "udp").unwrap().len(), 3);
        assert!(parse("", "udp").unwrap().is_empty());
    }

    /// The real file, on a private namespace: what the kernel prints for sockets bound there.
    #[test]
    fn listeners_of_a_namespace_are_read_from_inside_it() {
        let (path, stop) = crate::inpod::tests::private_netns();
        let ns = PodNetns::open(&path).unwrap();
        let bound = ns
            .run(|| {
                // Loopback is down in a fresh namespace: binds work, connects would not (the
                // parser's test covers connected sockets with the kernel's text).
                let a = UdpSocket::bind("0.0.0.0:0")?;
                let b = UdpSocket::bind("127.0.0.1:0")?;
                let c = UdpSocket::bind("[::]:0");
                Ok((a, b, c.ok()))
            })
            .unwrap();
        let got = udp_listeners(&ns).unwrap();
        assert!(!got.truncated);
        let got = got.addrs;
        let (a, b, c) = &bound;
        assert!(got.contains(&a.local_addr().unwrap()), "{got:?}");
        assert!(got.contains(&b.local_addr().unwrap()), "{got:?}");
        if let Some(c) = c {
            assert!(got.contains(&c.local_addr().unwrap()), "{got:?}");
        }
        assert_eq!(got.len(), 2 + usize::from(c.is_some()), "{got:?}");
        // The host's own sockets are not the namespace's.
        let host = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(!got.contains(&host.local_addr().unwrap()), "{got:?}");
        drop(stop);
    }
}
