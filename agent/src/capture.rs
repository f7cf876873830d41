//! Capture: loads the eBPF programs, pins them, and owns the maps the agent shares with them.
//!
//! Programs and maps are pinned under the node's bpffs directory and outlive the agent, so
//! while it is down an enrolled pod's connect() is still redirected to the (absent) in-pod
//! listener and fails fast: fail closed, never silently plaintext.
//!
//! Layout under `--bpffs DIR`:
//! - `maps/<NAME>`: the maps, reused by the next agent instance;
//! - `links/<program>_<generation>` (bpffs forbids dots in names): the cgroup links. A new instance attaches its programs
//!   next to the old ones (cgroup links always stack; the programs are idempotent) and only then
//!   removes the old links, so there is no moment without capture.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::{
    maps::{Array, HashMap, Map, MapData},
    programs::{links::FdLink, CgroupAttachMode, CgroupSockAddr, SockOps},
    Ebpf, EbpfLoader,
};
use mtls_agent_ebpf::{
    map_names, prog_names, Config, ConnKey, OrigDst, PodInfo, SockAddr, AF_INET, AF_INET6,
    AGENT_MARK, OUTBOUND_PORT,
};
use tracing::{debug, info, warn};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at build time.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MTLS_AGENT_EBPF_OBJ"));

/// bpf_link attachments to a cgroup are always multi-attach in the kernel and it rejects
/// explicit flags there, so links are created in aya's "single" mode (flags 0).
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("bpffs directory {path}: {source}")]
    BpffsDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not on a bpffs mount (mount one with `mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpffs { path: PathBuf },
    #[error("mounting bpffs at {DEFAULT_BPFFS}: {0}")]
    Mount(nix::Error),
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("pinning link at {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("eBPF link: {0}")]
    Link(#[from] aya::programs::links::LinkError),
}

/// Where and how to attach.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// The node's bpffs directory (`/sys/fs/bpf/mtls-agent/<node>` by default).
    pub bpffs: PathBuf,
    /// The cgroup v2 directory that holds every pod of the node.
    pub cgroup: PathBuf,
}

/// Loaded and attached programs plus handles on their maps.
pub struct Capture {
    // Keeps the programs' file descriptors (and aya-log's buffer) alive.
    _ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, PodInfo>,
    orig_dst: Option<OrigDstMap>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Capture {
    /// Loads the programs, reusing pinned maps of an earlier instance, and attaches them.
    pub fn load(cfg: &CaptureConfig) -> Result<Capture, CaptureError> {
        ensure_bpffs(&cfg.bpffs)?;
        let maps_dir = cfg.bpffs.join("maps");
        let links_dir = cfg.bpffs.join("links");
        for dir in [&cfg.bpffs, &maps_dir, &links_dir] {
            fs::create_dir_all(dir).map_err(|source| CaptureError::BpffsDir {
                path: dir.clone(),
                source,
            })?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(EBPF_OBJECT)?;

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!("eBPF logging unavailable: {e}");
                None
            }
        };

        let mut config: Array<_, Config> = take_map(&mut ebpf, map_names::CONFIG)?;
        let value = Config {
            agent_mark: AGENT_MARK,
            outbound_port: OUTBOUND_PORT,
            _pad: 0,
        };
        config
            .set(0, value, 0)
            .map_err(|source| CaptureError::Map {
                name: map_names::CONFIG,
                source,
            })?;

        let enrolled = take_map(&mut ebpf, map_names::ENROLLED)?;
        let orig_dst = Some(OrigDstMap {
            map: take_map(&mut ebpf, map_names::ORIG_DST)?,
        });

        let cgroup = fs::File::open(&cfg.cgroup).map_err(|source| CaptureError::Cgroup {
            path: cfg.cgroup.clone(),
            source,
        })?;
        let old_links = existing_links(&links_dir);
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();

        for name in [prog_names::CONNECT4, prog_names::CONNECT6] {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(CaptureError::MissingProgram(name))?
                .try_into()
                .map_err(|source| CaptureError::Program { name, source })?;
            prog.load()
                .map_err(|source| CaptureError::Program { name, source })?;
            let id = prog
                .attach(cgroup.as_fd(), LINK_MODE)
                .map_err(|source| CaptureError::Program { name, source })?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(|source| CaptureError::Program { name, source })?
                .try_into()?;
            pin_link(link, &links_dir.join(format!("{name}_{generation}")))?;
        }
        {
            let name = prog_names::SOCK_OPS;
            let prog: &mut SockOps = ebpf
                .program_mut(name)
                .ok_or(CaptureError::MissingProgram(name))?
                .try_into()
                .map_err(|source| CaptureError::Program { name, source })?;
            prog.load()
                .map_err(|source| CaptureError::Program { name, source })?;
            let id = prog
                .attach(cgroup.as_fd(), LINK_MODE)
                .map_err(|source| CaptureError::Program { name, source })?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(|source| CaptureError::Program { name, source })?
                .try_into()?;
            pin_link(link, &links_dir.join(format!("{name}_{generation}")))?;
        }

        // The new programs are live: retire the previous instance's links.
        for old in old_links {
            match aya::programs::links::PinnedLink::from_pin(&old) {
                Ok(pinned) => {
                    if let Err(e) = pinned.unpin() {
                        warn!(path = %old.display(), "removing old link pin: {e}");
                    }
                }
                Err(e) => warn!(path = %old.display(), "opening old link pin: {e}"),
            }
            debug!(path = %old.display(), "detached previous link");
        }
        info!(bpffs = %cfg.bpffs.display(), cgroup = %cfg.cgroup.display(), "eBPF capture attached");
        Ok(Capture {
            _ebpf: ebpf,
            enrolled,
            orig_dst,
            logger,
        })
    }

    /// Starts capturing connect()s made in the network namespace with this cookie.
    pub fn enroll(&mut self, netns_cookie: u64) -> Result<(), CaptureError> {
        self.enrolled
            .insert(netns_cookie, PodInfo::default(), 0)
            .map_err(|source| CaptureError::Map {
                name: map_names::ENROLLED,
                source,
            })
    }

    /// Stops capturing for this network namespace.
    pub fn release(&mut self, netns_cookie: u64) -> Result<(), CaptureError> {
        match self.enrolled.remove(&netns_cookie) {
            Ok(()) => Ok(()),
            // Already gone: releasing is idempotent.
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(CaptureError::Map {
                name: map_names::ENROLLED,
                source,
            }),
        }
    }

    /// Cookies currently enrolled (possibly by an earlier agent instance).
    pub fn enrolled_cookies(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(Result::ok).collect()
    }

    /// The handle for looking up original destinations (shared by the connection tasks).
    pub fn take_orig_dst(&mut self) -> Option<OrigDstMap> {
        self.orig_dst.take()
    }

    /// The aya-log reader; the caller polls its fd and calls `flush`.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }
}

/// Read-only view of `ORIG_DST`, shared by the connection tasks.
pub struct OrigDstMap {
    map: HashMap<MapData, ConnKey, OrigDst>,
}

impl OrigDstMap {
    /// Opens the pinned map of a node (used by tests and diagnostics).
    pub fn open_pinned(bpffs: &Path) -> Result<OrigDstMap, CaptureError> {
        let path = bpffs.join("maps").join(map_names::ORIG_DST);
        let data = MapData::from_pin(&path).map_err(|source| CaptureError::Map {
            name: map_names::ORIG_DST,
            source,
        })?;
        let map = HashMap::try_from(Map::LruHashMap(data)).map_err(|source| CaptureError::Map {
            name: map_names::ORIG_DST,
            source,
        })?;
        Ok(OrigDstMap { map })
    }

    /// The destination a captured client meant to reach. `client` is the peer address seen
    /// by the in-pod listener of the pod whose netns has `netns_cookie`.
    pub fn lookup(&self, netns_cookie: u64, client: SocketAddr) -> Option<SocketAddr> {
        let key = ConnKey {
            netns_cookie,
            client: to_sock_addr(client),
            _pad: 0,
        };
        let v = self.map.get(&key, 0).ok()?;
        from_sock_addr(v.dst)
    }

    /// Number of entries (connections captured and not yet closed).
    pub fn len(&self) -> usize {
        self.map.keys().filter(Result::is_ok).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(CaptureError::MissingMap(name))?;
    T::try_from(map).map_err(|source| CaptureError::Map { name, source })
}

fn pin_link(link: FdLink, path: &Path) -> Result<(), CaptureError> {
    // The pinned link keeps the program attached after this process exits.
    link.pin(path).map_err(|source| CaptureError::Pin {
        path: path.to_owned(),
        source,
    })?;
    Ok(())
}

fn existing_links(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Makes sure `path` (or the nearest existing ancestor) is on bpffs, mounting the default
/// bpffs at /sys/fs/bpf when it is not mounted yet and `path` lies under it.
fn ensure_bpffs(path: &Path) -> Result<(), CaptureError> {
    let probe = |p: &Path| -> Option<bool> {
        let mut anc = Some(p);
        while let Some(a) = anc {
            if a.exists() {
                let st = nix::sys::statfs::statfs(a).ok()?;
                return Some(st.filesystem_type().0 as i64 == BPF_FS_MAGIC);
            }
            anc = a.parent();
        }
        None
    };
    if probe(path) == Some(true) {
        return Ok(());
    }
    if path.starts_with(DEFAULT_BPFFS) {
        fs::create_dir_all(DEFAULT_BPFFS).map_err(|source| CaptureError::BpffsDir {
            path: PathBuf::from(DEFAULT_BPFFS),
            source,
        })?;
        if probe(Path::new(DEFAULT_BPFFS)) != Some(true) {
            nix::mount::mount(
                Some("bpf"),
                DEFAULT_BPFFS,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(CaptureError::Mount)?;
            info!("mounted bpffs at {DEFAULT_BPFFS}");
        }
        if probe(path) == Some(true) {
            return Ok(());
        }
    }
    Err(CaptureError::NotBpffs {
        path: path.to_owned(),
    })
}

/// Removes every pin of a node (`mtls-agent uninstall`): links first, so capture stops before
/// the maps it uses disappear.
pub fn unpin_all(bpffs: &Path) -> std::io::Result<()> {
    for sub in ["links", "maps"] {
        let dir = bpffs.join(sub);
        if dir.exists() {
            for e in fs::read_dir(&dir)?.flatten() {
                fs::remove_file(e.path())?;
            }
            fs::remove_dir(&dir)?;
        }
    }
    if bpffs.exists() {
        fs::remove_dir(bpffs)?;
    }
    Ok(())
}

pub fn to_sock_addr(a: SocketAddr) -> SockAddr {
    match a.ip() {
        IpAddr::V4(ip) => SockAddr {
            addr: [u32::from_ne_bytes(ip.octets()), 0, 0, 0],
            port: a.port(),
            family: AF_INET,
        },
        IpAddr::V6(ip) => {
            if let Some(v4) = ip.to_ipv4_mapped() {
                return to_sock_addr(SocketAddr::new(IpAddr::V4(v4), a.port()));
            }
            let o = ip.octets();
            let mut addr = [0u32; 4];
            for (i, w) in addr.iter_mut().enumerate() {
                *w = u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]);
            }
            SockAddr {
                addr,
                port: a.port(),
                family: AF_INET6,
            }
        }
    }
}

pub fn from_sock_addr(s: SockAddr) -> Option<SocketAddr> {
    match s.family {
        AF_INET => Some(SocketAddr::new(
            Ipv4Addr::from(s.addr[0].to_ne_bytes()).into(),
            s.port,
        )),
        AF_INET6 => {
            let mut o = [0u8; 16];
            for (i, w) in s.addr.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(SocketAddr::new(Ipv6Addr::from(o).into(), s.port))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sock_addr_round_trips_v4_v6_and_reduces_v4_mapped() {
        let v4: SocketAddr = "10.244.1.2:8080".parse().unwrap();
        assert_eq!(from_sock_addr(to_sock_addr(v4)), Some(v4));
        // Network byte order: the first octet is the lowest-addressed byte.
        assert_eq!(to_sock_addr(v4).addr[0].to_ne_bytes(), [10, 244, 1, 2]);
        let v6: SocketAddr = "[fd00::1:2]:443".parse().unwrap();
        assert_eq!(from_sock_addr(to_sock_addr(v6)), Some(v6));
        let mapped: SocketAddr = "[::ffff:10.0.0.7]:80".parse().unwrap();
        assert_eq!(
            from_sock_addr(to_sock_addr(mapped)),
            Some("10.0.0.7:80".parse().unwrap())
        );
    }

    #[test]
    fn unknown_family_is_rejected() {
        assert_eq!(
            from_sock_addr(SockAddr {
                addr: [0; 4],
                port: 1,
                family: 99
            }),
            None
        );
    }
}
