//! A minimal synchronous rtnetlink client.
//!
//! The socket belongs to the network namespace of the thread that creates it,
//! so callers create an [`Rtnl`] on a thread that has already entered the
//! target namespace (see [`crate::netns::run_in`]).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoBridge, InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Upper bound for one request/response exchange with the kernel.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// An interface as seen in a link dump.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LinkSummary {
    pub index: u32,
    pub name: String,
}

pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    /// Opens a route netlink socket in the calling thread's network namespace.
    pub fn new() -> Result<Rtnl> {
        let mut socket = Socket::new(NETLINK_ROUTE).context("netlink socket")?;
        socket.bind_auto().context("bind netlink socket")?;
        socket.connect(&SocketAddr::new(0, 0)).context("connect netlink socket")?;
        set_recv_timeout(socket.as_raw_fd(), REQUEST_TIMEOUT)?;
        Ok(Rtnl { socket, seq: 0 })
    }

    /// Sends one request and collects the replies until the ACK (or DONE for
    /// dumps). Kernel errors become `Err` with the errno.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        let sent = self.socket.send(&buf, 0).context("netlink send")?;
        if sent != buf.len() {
            bail!("netlink send: short write ({sent} of {})", buf.len());
        }

        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let mut replies = Vec::new();
        loop {
            if Instant::now() > deadline {
                bail!("netlink: no complete answer within {REQUEST_TIMEOUT:?}");
            }
            let (data, _) =
                self.socket.recv_from_full().context("netlink receive (timed out or failed)")?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .context("decode netlink reply")?;
                let len = reply.header.length as usize;
                if len == 0 {
                    bail!("netlink: zero-length message");
                }
                // Messages are 4-byte aligned inside one datagram.
                offset += (len + 3) & !3;
                if reply.header.sequence_number != seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(err) => match err.code {
                        // ACK: for a dump it precedes nothing useful; we are done.
                        None => return Ok(replies),
                        Some(_) => return Err(err.to_io()).context("netlink request rejected"),
                    },
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::InnerMessage(inner) => replies.push(inner),
                    NetlinkPayload::Overrun(_) => bail!("netlink overrun"),
                    _ => {}
                }
            }
        }
    }

    fn new_link(&mut self, msg: LinkMessage) -> Result<()> {
        self.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL).map(drop)
    }

    /// Creates a bridge without STP so that ports forward immediately.
    pub fn add_bridge(&mut self, name: &str) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Bridge),
            LinkInfo::Data(InfoData::Bridge(vec![InfoBridge::ForwardDelay(0)])),
        ]));
        self.new_link(msg).with_context(|| format!("create bridge {name}"))
    }

    /// Creates a veth pair: `name` in this namespace, `peer_name` directly in
    /// the namespace referred to by `peer_netns_fd`.
    pub fn add_veth(&mut self, name: &str, peer_name: &str, peer_netns_fd: RawFd) -> Result<()> {
        let mut peer = LinkMessage::default();
        peer.attributes.push(LinkAttribute::IfName(peer_name.to_owned()));
        peer.attributes.push(LinkAttribute::NetNsFd(peer_netns_fd));
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        self.new_link(msg).with_context(|| format!("create veth {name} <-> {peer_name}"))
    }

    /// Looks an interface up by name.
    pub fn link_index(&mut self, name: &str) -> Result<u32> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        let replies = self
            .request(RouteNetlinkMessage::GetLink(msg), 0)
            .with_context(|| format!("look up interface {name}"))?;
        replies
            .iter()
            .find_map(|r| match r {
                RouteNetlinkMessage::NewLink(link) => Some(link.header.index),
                _ => None,
            })
            .with_context(|| format!("interface {name}: no answer"))
    }

    fn set_link(&mut self, msg: LinkMessage) -> Result<()> {
        self.request(RouteNetlinkMessage::SetLink(msg), 0).map(drop)
    }

    pub fn set_up(&mut self, index: u32) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.set_link(msg).with_context(|| format!("set interface #{index} up"))
    }

    pub fn set_master(&mut self, index: u32, master: u32) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::Controller(master));
        self.set_link(msg).with_context(|| format!("enslave interface #{index} to #{master}"))
    }

    pub fn delete_link(&mut self, index: u32) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.request(RouteNetlinkMessage::DelLink(msg), 0)
            .map(drop)
            .with_context(|| format!("delete interface #{index}"))
    }

    pub fn add_address(&mut self, index: u32, addr: IpAddr, prefix_len: u8) -> Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = match addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.prefix_len = prefix_len;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(addr));
        msg.attributes.push(AddressAttribute::Address(addr));
        if addr.is_ipv6() {
            // Usable at once: no duplicate address detection (the bed allots every address).
            msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.request(RouteNetlinkMessage::NewAddress(msg), NLM_F_CREATE | NLM_F_EXCL)
            .map(drop)
            .with_context(|| format!("add address {addr}/{prefix_len} to interface #{index}"))
    }

    /// All interfaces of this namespace.
    pub fn links(&mut self) -> Result<Vec<LinkSummary>> {
        let replies = self
            .request(RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP)
            .context("dump interfaces")?;
        let mut links: Vec<LinkSummary> = replies
            .into_iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewLink(link) => {
                    let name = link.attributes.iter().find_map(|a| match a {
                        LinkAttribute::IfName(n) => Some(n.clone()),
                        _ => None,
                    })?;
                    Some(LinkSummary { index: link.header.index, name })
                }
                _ => None,
            })
            .collect();
        links.sort();
        Ok(links)
    }

    /// Every route of every table, as text: destination/prefix, gateway, output interface
    /// index and table. Routes learned from router advertisements come and go on their own
    /// and are left out.
    pub fn routes(&mut self) -> Result<Vec<String>> {
        let replies = self
            .request(RouteNetlinkMessage::GetRoute(RouteMessage::default()), NLM_F_DUMP)
            .context("dump routes")?;
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewRoute(m) if m.header.protocol != RouteProtocol::Ra => {
                    let (mut dst, mut gw, mut oif, mut table) =
                        (None, None, None, u32::from(m.header.table));
                    for attr in &m.attributes {
                        match attr {
                            RouteAttribute::Destination(a) => dst = Some(format!("{a:?}")),
                            RouteAttribute::Gateway(a) => gw = Some(format!("{a:?}")),
                            RouteAttribute::Oif(i) => oif = Some(*i),
                            RouteAttribute::Table(t) => table = *t,
                            _ => {}
                        }
                    }
                    Some(format!(
                        "{:?} {}/{} via {} dev {} table {table}",
                        m.header.address_family,
                        dst.unwrap_or_else(|| "default".into()),
                        m.header.destination_prefix_length,
                        gw.unwrap_or_else(|| "-".into()),
                        oif.map_or_else(|| "-".into(), |i| i.to_string()),
                    ))
                }
                _ => None,
            })
            .collect())
    }

    /// All addresses of this namespace as (interface index, address, prefix).
    pub fn addresses(&mut self) -> Result<Vec<(u32, IpAddr, u8)>> {
        let replies = self
            .request(RouteNetlinkMessage::GetAddress(AddressMessage::default()), NLM_F_DUMP)
            .context("dump addresses")?;
        let mut addrs: Vec<(u32, IpAddr, u8)> = replies
            .into_iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewAddress(a) => {
                    let ip = a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })?;
                    Some((a.header.index, ip, a.header.prefix_len))
                }
                _ => None,
            })
            .collect();
        addrs.sort();
        Ok(addrs)
    }
}

fn set_recv_timeout(fd: RawFd, timeout: Duration) -> Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` is a valid timeval for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("set SO_RCVTIMEO");
    }
    Ok(())
}
