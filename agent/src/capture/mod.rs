//! Capture: loads the eBPF programs, pins them, and owns the maps the agent shares with them.
//!
//! Programs and maps are pinned under the node's bpffs directory and outlive the agent, so
//! while it is down an enrolled pod's connect() is still redirected to the (absent) in-pod
//! listener and fails fast: fail closed, never silently plaintext.
//!
//! Layout under `--bpffs DIR`:
//! - `maps/v<N>/<NAME>`: the maps of layout version N ([`mtls_agent_ebpf::LAYOUT_VERSION`];
//!   pins straight under `maps/` are version 1), reused by the next instance of the same
//!   layout;
//! - `links/<program>_<generation>` (bpffs forbids dots in names): the cgroup links. A new instance attaches its programs
//!   next to the old ones (cgroup links always stack; the programs are idempotent) and only then
//!   removes the old links, so there is no moment without capture.
//!
//! Over pins of an older layout a new instance never reopens the old maps: it loads its own in
//! its version's directory, takes the enforcement state over ([`upgrade`]), attaches beside the
//! old programs, and detaches those and removes the old pins only after its first reconcile
//! ([`Capture::finish_layout_handover`]), when its own programs and maps enforce for the pods.
//! Pins of a newer layout are refused (a downgrade), leaving them enforcing.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray, RingBuf, SockHash},
    programs::{links::FdLink, CgroupAttachMode, CgroupSock, CgroupSockAddr, SkLookup, SockOps},
    Ebpf, EbpfLoader,
};
use mtls_agent_ebpf::{
    map_names, prog_names, stats, Config, ConnKey, ListenerKey, OrigDst, PendingDst, PodInfo,
    PortKey, PortPolicy, SockAddr, AF_INET, AF_INET6, LAYOUT_VERSION, MODE_DISABLE,
    MODE_PERMISSIVE, MODE_STRICT, OUTBOUND_PORT,
};
use tracing::{debug, info, warn};

pub mod cgroup2;
pub mod layout;
pub mod probe;
pub mod self_cgroup;
pub mod upgrade;

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
    BpffsDir { path: PathBuf, source: std::io::Error },
    #[error("{path} is not on a bpffs mount (mount one with `mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpffs { path: PathBuf },
    #[error("mounting bpffs at {DEFAULT_BPFFS}: {0}")]
    Mount(nix::Error),
    #[error("cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("pinning link at {path}: {source}")]
    Pin { path: PathBuf, source: aya::pin::PinError },
    #[error("eBPF link: {0}")]
    Link(#[from] aya::programs::links::LinkError),
    #[error(transparent)]
    Kernel(#[from] probe::ProbeError),
    #[error("--kubelet-cgroup {kubelet}: {why} the pods' cgroup {pods}; give the kubelet's own cgroup, outside the pods' hierarchy")]
    KubeletCgroup { kubelet: PathBuf, pods: PathBuf, why: &'static str },
    #[error("--kubelet-cgroup: {0}")]
    KubeletCgroupDir(self_cgroup::SelfCgroupError),
    #[error("the agent's own cgroup: {0}")]
    SelfCgroup(#[from] self_cgroup::SelfCgroupError),
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
}

/// Where and how to attach.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// The node's bpffs directory (`/sys/fs/bpf/mtls-agent/<node>` by default).
    pub bpffs: PathBuf,
    /// The cgroup v2 directory that holds every pod of the node.
    pub cgroup: PathBuf,
    /// The node's address. Grants nothing since issue 14 (kept in `CONFIG`'s layout).
    pub node_ip: Option<IpAddr>,
    /// The kubelet's cgroup v2 directory: connections opened from there may reach STRICT pods'
    /// probe ports in plaintext. `None`: no probe exemption.
    pub kubelet_cgroup: Option<PathBuf>,
    /// Whether the programs write their debug lines (costly: only when debugging).
    pub ebpf_log: bool,
}

/// Inbound enforcement mode of a pod port, as the eBPF program applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundMode {
    Strict,
    Permissive,
    Disable,
}

impl InboundMode {
    fn to_raw(self) -> u8 {
        match self {
            InboundMode::Strict => MODE_STRICT,
            InboundMode::Permissive => MODE_PERMISSIVE,
            InboundMode::Disable => MODE_DISABLE,
        }
    }
}

/// One entry of a pod's inbound rules: `port` 0 is the pod's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundRule {
    pub port: u16,
    pub mode: InboundMode,
    /// The node may probe this port in plaintext even under STRICT.
    pub probe: bool,
}

/// Counters kept by the eBPF programs (summed over CPUs).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EbpfStats {
    pub strict_rejected: u64,
    pub probe_allowed: u64,
    pub captured: u64,
    /// connect()s redirected without a record because their pod was at its quota of pending
    /// records (refused by the agent: that pod's own connections fail closed).
    pub pending_over_quota: u64,
    /// Connections to the agent's ports in a pod where the agent had no listener (refused).
    pub agent_port_unserved: u64,
    /// TCP connect()s refused from a pod held closed until its enrollment (Kubernetes mode).
    pub held_refused: u64,
}

/// Loaded and attached programs plus handles on their maps.
pub struct Capture {
    // Keeps the programs' file descriptors (and aya-log's buffer) alive.
    _ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, PodInfo>,
    agent_cgroups: HashMap<MapData, u64, u32>,
    /// Pod cgroups held closed until their pods are enrolled.
    held: HashMap<MapData, u64, u32>,
    /// This instance's cgroup v2 directory and id (its connect()s are never captured).
    own_cgroup: (PathBuf, u64),
    inbound: HashMap<MapData, PortKey, PortPolicy>,
    listeners: SockHash<MapData, ListenerKey>,
    stats: PerCpuArray<MapData, u64>,
    maps_dir: PathBuf,
    links_dir: PathBuf,
    /// Set while an older layout's programs still run beside ours.
    handover: Option<Handover>,
    bpffs: PathBuf,
    generation: u128,
    orig_dst: Option<OrigDstMap>,
    /// The older layout's `ORIG_DST`, shared with [`OrigDstMap`] until the handover ends.
    legacy_orig_dst: LegacySlot,
    events: Option<RingBuf<MapData>>,
    plaintext_events: Option<RingBuf<MapData>>,
    /// Kernel ids of the programs this instance loaded.
    program_ids: std::sync::Arc<ProgramIds>,
    // Keeps the kernel's run-time statistics for BPF programs switched on while we run.
    _stats_enabled: Option<std::os::fd::OwnedFd>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    log_switch: std::sync::Arc<EbpfLogSwitch>,
}

/// What is left of an older layout until this instance enforces on its own.
struct Handover {
    older: Vec<u32>,
    /// The old node-wide links (capture of every pod), detached at the end.
    node_links: Vec<PathBuf>,
    /// Older instances still running when last looked (logged when it changes).
    waiting_for: Vec<u32>,
}

/// Turns the programs' debug lines on and off at run time (the `CONFIG` log flag), so that
/// `/logging?level=debug` reaches them as it reaches the agent's own lines.
pub struct EbpfLogSwitch {
    config: std::sync::Mutex<Array<MapData, Config>>,
}

impl EbpfLogSwitch {
    /// Sets the flag; the programs read it on their next run.
    pub fn set(&self, on: bool) -> Result<(), CaptureError> {
        let mut map = self.config.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let err = |source| CaptureError::Map { name: map_names::CONFIG, source };
        let mut c = map.get(&0, 0).map_err(err)?;
        c.flags = if on {
            c.flags | mtls_agent_ebpf::CONFIG_FLAG_LOG
        } else {
            c.flags & !mtls_agent_ebpf::CONFIG_FLAG_LOG
        };
        map.set(0, c, 0).map_err(err)
    }

    /// Whether the programs currently write their debug lines.
    pub fn is_on(&self) -> bool {
        let map = self.config.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(&0, 0).is_ok_and(|c| c.flags & mtls_agent_ebpf::CONFIG_FLAG_LOG != 0)
    }
}

impl Capture {
    /// Loads the programs, reusing pinned maps of an earlier instance, and attaches them.
    pub fn load(cfg: &CaptureConfig) -> Result<Capture, CaptureError> {
        probe::probe()?;
        ensure_bpffs(&cfg.bpffs)?;
        // Before anything is created: a newer layout's pins are refused untouched.
        let found = layout::inspect(&cfg.bpffs)?;
        let maps_dir = layout::maps_dir(&cfg.bpffs);
        let links_dir = cfg.bpffs.join("links");
        let fresh = !maps_dir.exists();
        // Layout 1's state is copied only into maps this start makes (staged, renamed once the
        // copy is done): a restart mid-handover never copies it over live maps again.
        let take_over = fresh && found.older.contains(&1);
        let pin_dir = if take_over { layout::start_staging(&cfg.bpffs)? } else { maps_dir.clone() };
        for dir in [&cfg.bpffs, &pin_dir, &links_dir] {
            fs::create_dir_all(dir)
                .map_err(|source| CaptureError::BpffsDir { path: dir.clone(), source })?;
        }
        if found.older.is_empty() && fresh {
            info!(version = LAYOUT_VERSION, dir = %maps_dir.display(), "map layout: none pinned yet, maps pinned fresh");
        } else if found.older.is_empty() {
            info!(version = LAYOUT_VERSION, dir = %maps_dir.display(), "map layout: same version, pinned maps re-opened");
        } else {
            info!(from = ?found.older, to = LAYOUT_VERSION, dir = %maps_dir.display(),
                "map layout handover: own maps beside the older layout's, old programs detached after the first reconcile");
        }
        let mut ebpf = EbpfLoader::new().default_map_pin_directory(&pin_dir).load(EBPF_OBJECT)?;
        // Before the new programs run: the pods the older layout captured, held and guarded
        // stay so in between (the first reconcile then keeps or releases each).
        if take_over {
            upgrade::take_over_v1(&cfg.bpffs, &pin_dir, pid_running);
            layout::commit_staging(&cfg.bpffs)?;
        } else if found.older.contains(&1) {
            info!("map layout handover resumed: this layout's maps were taken over before, kept as they are");
        }

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!("eBPF logging unavailable: {e}");
                None
            }
        };

        let mut config: Array<_, Config> = take_map(&mut ebpf, map_names::CONFIG)?;
        let (node_ip_family, node_ip) = match cfg.node_ip {
            Some(ip) => {
                let a = to_sock_addr(SocketAddr::new(ip, 0));
                (a.family, a.addr)
            }
            None => (0, [0; 4]),
        };
        let value = Config {
            _unused: 0,
            outbound_port: OUTBOUND_PORT,
            node_ip_family,
            node_ip,
            flags: if cfg.ebpf_log { mtls_agent_ebpf::CONFIG_FLAG_LOG } else { 0 },
            _pad: 0,
        };
        config
            .set(0, value, 0)
            .map_err(|source| CaptureError::Map { name: map_names::CONFIG, source })?;

        let enrolled = take_map(&mut ebpf, map_names::ENROLLED)?;
        // Before any program is attached: from then on this instance's connect()s inside pods'
        // namespaces must already be recognised as its own.
        let own_cgroup = self_cgroup::own_cgroup()?;
        let mut agent_cgroups: HashMap<MapData, u64, u32> =
            take_map(&mut ebpf, map_names::AGENT_CGROUPS)?;
        forget_gone_instances(&mut agent_cgroups);
        agent_cgroups
            .insert(own_cgroup.1, std::process::id(), 0)
            .map_err(|source| CaptureError::Map { name: map_names::AGENT_CGROUPS, source })?;
        if found.older.contains(&1) {
            upgrade::register_in_v1(&cfg.bpffs, own_cgroup.1);
        }
        info!(cgroup = %own_cgroup.0.display(), id = own_cgroup.1, "own connections told apart by this cgroup");
        let held = take_map(&mut ebpf, map_names::HELD_CGROUPS)?;
        let inbound = take_map(&mut ebpf, map_names::INBOUND)?;
        let listeners = take_map(&mut ebpf, map_names::LISTENERS)?;
        let stats = take_map(&mut ebpf, map_names::STATS)?;
        let events = Some(take_map(&mut ebpf, map_names::EVENTS)?);
        let plaintext_events = Some(take_map(&mut ebpf, map_names::PLAINTEXT_EVENTS)?);
        let legacy = found.older.contains(&1).then(|| upgrade::v1_orig_dst(&cfg.bpffs)).flatten();
        let legacy_orig_dst = std::sync::Arc::new(std::sync::Mutex::new(
            legacy.map(|map| LegacyOrigDst { map, until: None }),
        ));
        let orig_dst = Some(OrigDstMap {
            map: take_map(&mut ebpf, map_names::ORIG_DST)?,
            legacy: legacy_orig_dst.clone(),
        });

        let cgroup = fs::File::open(&cfg.cgroup)
            .map_err(|source| CaptureError::Cgroup { path: cfg.cgroup.clone(), source })?;
        let kubelet = match &cfg.kubelet_cgroup {
            Some(k) => {
                check_kubelet_cgroup(k, &cfg.cgroup)?;
                Some(
                    fs::File::open(k)
                        .map_err(|source| CaptureError::Cgroup { path: k.clone(), source })?,
                )
            }
            None => None,
        };
        // Only the node-wide links are replaced here; a pod's inbound link is replaced when the
        // pod is re-enrolled, so enforcement never pauses.
        let old_links: Vec<PathBuf> = existing_links(&links_dir)
            .into_iter()
            .filter(|p| !link_name(p).starts_with(INBOUND_LINK_PREFIX))
            .collect();
        let generation =
            SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();

        // The same steps for each cgroup program; their aya types differ, hence a macro.
        macro_rules! attach_to_cgroup {
            ($ty:ty, $name:expr) => {
                attach_to_cgroup!($ty, $name, cgroup)
            };
            ($ty:ty, $name:expr, $cgroup:expr) => {{
                let name: &'static str = $name;
                let err = |source| CaptureError::Program { name, source };
                let prog: &mut $ty = ebpf
                    .program_mut(name)
                    .ok_or(CaptureError::MissingProgram(name))?
                    .try_into()
                    .map_err(err)?;
                prog.load().map_err(err)?;
                let id = prog.attach($cgroup.as_fd(), LINK_MODE).map_err(err)?;
                let link: FdLink = prog.take_link(id).map_err(err)?.try_into()?;
                pin_link(link, &links_dir.join(format!("{name}_{generation}")))?;
            }};
        }
        attach_to_cgroup!(CgroupSockAddr, prog_names::CONNECT4);
        attach_to_cgroup!(CgroupSockAddr, prog_names::CONNECT6);
        attach_to_cgroup!(SockOps, prog_names::SOCK_OPS);
        attach_to_cgroup!(CgroupSock, prog_names::SOCK_RELEASE);
        if let Some(kubelet) = &kubelet {
            attach_to_cgroup!(SockOps, prog_names::KUBELET_SOCK_OPS, kubelet);
        }

        // The inbound program is loaded once per pod (`attach_inbound`), with the pod's cookie.
        let fixed: Vec<(String, u32)> = [
            prog_names::CONNECT4,
            prog_names::CONNECT6,
            prog_names::SOCK_OPS,
            prog_names::SOCK_RELEASE,
        ]
        .iter()
        .filter_map(|n| Some((n.to_string(), ebpf.program(n)?.info().ok()?.id())))
        .collect();
        let program_ids = std::sync::Arc::new(ProgramIds { fixed, inbound: Default::default() });
        let _stats_enabled = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Some(fd),
            Err(e) => {
                warn!("BPF run-time statistics unavailable: {e}");
                None
            }
        };

        // The new programs are live: retire the previous instance's links, at once when it
        // shared our maps; an older layout's only once ours are populated.
        let handover = if found.older.is_empty() {
            for old in old_links {
                remove_link_pin(&old);
                debug!(path = %old.display(), "detached previous link");
            }
            None
        } else {
            Some(Handover { older: found.older, node_links: old_links, waiting_for: Vec::new() })
        };
        info!(bpffs = %cfg.bpffs.display(), cgroup = %cfg.cgroup.display(), "eBPF capture attached");
        Ok(Capture {
            _ebpf: ebpf,
            enrolled,
            agent_cgroups,
            held,
            own_cgroup,
            inbound,
            listeners,
            stats,
            maps_dir,
            links_dir,
            handover,
            bpffs: cfg.bpffs.clone(),
            generation,
            orig_dst,
            legacy_orig_dst,
            events,
            plaintext_events,
            program_ids,
            _stats_enabled,
            logger,
            log_switch: std::sync::Arc::new(EbpfLogSwitch {
                config: std::sync::Mutex::new(config),
            }),
        })
    }

    /// Other agent instances of an older layout still running (the old pod of a surge
    /// rollout): the handover waits for them, as they may attach their inbound program to a
    /// pod again. Empty without a handover.
    pub fn layout_handover_blocked_by(&mut self) -> Vec<u32> {
        let Some(h) = self.handover.as_mut() else { return Vec::new() };
        let pids = if h.older.contains(&1) {
            upgrade::v1_instances_running(&self.bpffs, pid_running)
        } else {
            Vec::new()
        };
        if !pids.is_empty() && pids != h.waiting_for {
            info!(?pids, "map layout handover waits: an older agent instance still runs");
        }
        h.waiting_for.clone_from(&pids);
        pids
    }

    /// Whether an older layout's programs still run beside ours.
    pub fn in_layout_handover(&self) -> bool {
        self.handover.is_some()
    }

    /// Ends a handover from an older map layout, once this instance enforces on its own (after
    /// its first reconcile: every pod it keeps has its entries in our maps and our inbound
    /// program): detaches the old node-wide links and removes the old layouts' pins. A pod's
    /// old inbound link went when this instance attached its own; one that is left (its pod
    /// not enrolled again yet) keeps guarding it until then. No-op without a handover.
    pub fn finish_layout_handover(&mut self) {
        let Some(h) = self.handover.take() else { return };
        for old in &h.node_links {
            remove_link_pin(old);
            debug!(path = %old.display(), "detached an older layout's link");
        }
        let removed: usize = h.older.iter().map(|v| layout::remove_version(&self.bpffs, *v)).sum();
        // Connections the old programs captured are accepted within moments; then its map goes.
        if let Some(l) = lock_slot(&self.legacy_orig_dst).as_mut() {
            l.until = Some(std::time::Instant::now() + LEGACY_ORIG_DST_GRACE);
        }
        let ours = format!("_{}", self.generation);
        let old_pod_links = existing_links(&self.links_dir)
            .iter()
            .map(|p| link_name(p))
            .filter(|n| n.starts_with(INBOUND_LINK_PREFIX) && !n.ends_with(&ours))
            .count();
        info!(from = ?h.older, to = LAYOUT_VERSION, node_links = h.node_links.len(), pins = removed,
            "map layout handover done: the older layout's programs detached, its pins removed");
        if old_pod_links > 0 {
            warn!(
                pods = old_pod_links,
                "older inbound links stay on pods not enrolled again: they guard them until then"
            );
        }
    }

    /// Attaches inbound enforcement to a pod's network namespace, replacing the link an
    /// earlier agent instance left there (after the new one is live).
    pub fn attach_inbound(&mut self, netns: &crate::inpod::PodNetns) -> Result<(), CaptureError> {
        let name = prog_names::INBOUND;
        let prefix = format!("{INBOUND_LINK_PREFIX}{}_", netns.cookie());
        let old: Vec<PathBuf> = existing_links(&self.links_dir)
            .into_iter()
            .filter(|p| link_name(p).starts_with(&prefix))
            .collect();
        let path = self.links_dir.join(format!("{prefix}{}", self.generation));
        if old.contains(&path) {
            // Already attached by this instance; a link another instance put back beside it
            // (an older one still running) goes.
            for p in old.iter().filter(|p| **p != path) {
                remove_link_pin(p);
            }
            return Ok(());
        }
        // sk_lookup programs cannot ask for their netns cookie: each pod gets its own instance
        // with the cookie set at load time. Its maps are the pinned ones every instance shares;
        // the pinned link keeps program and maps alive once this `Ebpf` is dropped.
        let cookie = netns.cookie();
        let mut ebpf = EbpfLoader::new()
            .override_global("POD_COOKIE", &cookie, true)
            .default_map_pin_directory(&self.maps_dir)
            .load(EBPF_OBJECT)?;
        let err = |source| CaptureError::Program { name, source };
        let prog: &mut SkLookup = ebpf
            .program_mut(name)
            .ok_or(CaptureError::MissingProgram(name))?
            .try_into()
            .map_err(err)?;
        prog.load().map_err(err)?;
        let prog_id = prog.info().map_err(err)?.id();
        let id = prog.attach(netns.file()).map_err(err)?;
        let link: FdLink = prog.take_link(id).map_err(err)?.into();
        pin_link(link, &path)?;
        self.program_ids.inbound_ids().insert(cookie, prog_id);
        for p in old {
            remove_link_pin(&p);
        }
        Ok(())
    }

    /// Removes a pod's inbound enforcement (the pod left the mesh, or is gone).
    pub fn detach_inbound(&mut self, netns_cookie: u64) {
        self.program_ids.inbound_ids().remove(&netns_cookie);
        let prefix = format!("{INBOUND_LINK_PREFIX}{netns_cookie}_");
        for p in existing_links(&self.links_dir) {
            if link_name(&p).starts_with(&prefix) {
                remove_link_pin(&p);
            }
        }
    }

    /// Netns cookies of pods that have an inbound link (possibly from an earlier instance).
    pub fn inbound_link_cookies(&self) -> Vec<u64> {
        existing_links(&self.links_dir)
            .iter()
            .filter_map(|p| {
                let n = link_name(p);
                n.strip_prefix(INBOUND_LINK_PREFIX)?.split('_').next()?.parse().ok()
            })
            .collect()
    }

    /// Whether the network namespace of `netns_cookie` still exists, from its pinned inbound
    /// links (the kernel reports a link's namespace as inode 0 once the namespace is gone):
    /// `None` when it has no link to ask (or none answers).
    pub fn netns_alive(&self, netns_cookie: u64) -> Option<bool> {
        let prefix = format!("{INBOUND_LINK_PREFIX}{netns_cookie}_");
        let mut alive = None;
        for p in existing_links(&self.links_dir) {
            if !link_name(&p).starts_with(&prefix) {
                continue;
            }
            match pinned_link_netns_ino(&p) {
                Ok(ino) => alive = Some(alive.unwrap_or(false) || ino != 0),
                Err(e) => debug!(path = %p.display(), "reading link info: {e}"),
            }
        }
        alive
    }

    /// Replaces the inbound rules of the pod whose network namespace has `netns_cookie`.
    pub fn set_inbound_rules(
        &mut self,
        netns_cookie: u64,
        rules: &[InboundRule],
    ) -> Result<(), CaptureError> {
        let key = |port: u16| PortKey { netns_cookie, port, _pad: [0; 3] };
        let wanted: Vec<PortKey> = rules.iter().map(|r| key(r.port)).collect();
        // Write the new rules before removing stale ones, so no port is briefly unprotected.
        for r in rules {
            let value =
                PortPolicy { mode: r.mode.to_raw(), probe: u8::from(r.probe), _pad: [0; 6] };
            self.inbound
                .insert(key(r.port), value, 0)
                .map_err(|source| CaptureError::Map { name: map_names::INBOUND, source })?;
        }
        let stale: Vec<PortKey> = self
            .inbound
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.netns_cookie == netns_cookie && !wanted.contains(k))
            .collect();
        for k in stale {
            let _ = self.inbound.remove(&k);
        }
        Ok(())
    }

    /// Removes the inbound rules of every pod not in `keep` (netns cookies; pods gone while
    /// the agent was down).
    pub fn retain_inbound_rules(&mut self, keep: &[u64]) {
        let stale: Vec<PortKey> = self
            .inbound
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(&k.netns_cookie))
            .collect();
        for k in stale {
            let _ = self.inbound.remove(&k);
        }
    }

    /// Removes every inbound rule of the pod whose network namespace has `netns_cookie`.
    pub fn clear_inbound_rules(&mut self, netns_cookie: u64) -> Result<(), CaptureError> {
        self.set_inbound_rules(netns_cookie, &[])
    }

    /// Makes `listener` the agent's socket in `slot` (`SLOT_*`) of the pod with
    /// `netns_cookie`: the pod's inbound program hands the agent's port to it. The entry goes
    /// by itself when the socket closes.
    pub fn set_listener(
        &mut self,
        netns_cookie: u64,
        slot: u32,
        listener: &impl std::os::fd::AsRawFd,
    ) -> Result<(), CaptureError> {
        let key = ListenerKey { netns_cookie, slot, _pad: 0 };
        self.listeners
            .insert(key, listener.as_raw_fd(), 0)
            .map_err(|source| CaptureError::Map { name: map_names::LISTENERS, source })
    }

    /// The eBPF programs' own counters.
    pub fn stats(&self) -> EbpfStats {
        read_stats(&self.stats)
    }

    /// Writes this instance's cgroup id again (cheap): should another process have removed it
    /// from the pinned map, capture tells the agent's own connections apart again within one
    /// refresh.
    pub fn refresh_own_cgroup(&mut self) {
        if let Err(e) = self.agent_cgroups.insert(self.own_cgroup.1, std::process::id(), 0) {
            warn!("refreshing the agent's cgroup id in {}: {e}", map_names::AGENT_CGROUPS);
        }
    }

    /// On a clean exit: forgets this instance's cgroup id, unless another process still runs in
    /// that cgroup (a second instance started there, as during a rolling update on one host).
    pub fn forget_own_cgroup(&mut self) {
        let (dir, id) = &self.own_cgroup;
        let me = std::process::id().to_string();
        let others = fs::read_to_string(dir.join("cgroup.procs"))
            .map(|t| t.lines().any(|l| l.trim() != me))
            .unwrap_or(true);
        if others {
            debug!(cgroup = %dir.display(), "other processes share the agent's cgroup: its id stays");
            return;
        }
        match self.agent_cgroups.remove(id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => {
                warn!("removing the agent's cgroup id from {}: {e}", map_names::AGENT_CGROUPS)
            }
        }
    }

    /// Starts capturing connect()s made in the network namespace with this cookie.
    /// Idempotent: an entry left by an earlier instance stays as it is, so its count of
    /// pending records (kept by the programs) is never reset by a restart or a handover.
    pub fn enroll(&mut self, netns_cookie: u64) -> Result<(), CaptureError> {
        self.enroll_with_flags(netns_cookie, 0)
    }

    /// [`Capture::enroll`], recording `flags` ([`POD_SET_MIGRATE_REQ`]) with a new entry. An
    /// entry that exists keeps the flags of the instance that made it: that one knows what it
    /// changed in the pod.
    pub fn enroll_with_flags(&mut self, netns_cookie: u64, flags: u32) -> Result<(), CaptureError> {
        const BPF_NOEXIST: u64 = 1;
        let info = PodInfo { flags, ..PodInfo::default() };
        match self.enrolled.insert(netns_cookie, info, BPF_NOEXIST) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            Err(source) => Err(CaptureError::Map { name: map_names::ENROLLED, source }),
        }
    }

    /// The flags recorded with an enrolled pod ([`POD_SET_MIGRATE_REQ`]).
    pub fn pod_flags(&self, netns_cookie: u64) -> Option<u32> {
        self.enrolled.get(&netns_cookie, 0).ok().map(|i| i.flags)
    }

    /// Holds a pod cgroup closed: TCP connect()s from it, or from cgroups below it, whose
    /// namespace is not enrolled are refused. `cgroup_id` is its directory's inode.
    pub fn hold(&mut self, cgroup_id: u64) -> Result<(), CaptureError> {
        self.held
            .insert(cgroup_id, 1, 0)
            .map_err(|source| CaptureError::Map { name: map_names::HELD_CGROUPS, source })
    }

    /// Lifts a hold (the pod is gone or left the mesh).
    pub fn unhold(&mut self, cgroup_id: u64) -> Result<(), CaptureError> {
        match self.held.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(CaptureError::Map { name: map_names::HELD_CGROUPS, source }),
        }
    }

    /// The cgroups held closed (possibly by an earlier agent instance).
    pub fn held_cgroups(&self) -> Vec<u64> {
        self.held.keys().filter_map(Result::ok).collect()
    }

    /// The cgroups held closed in a node's pinned map (for tests and diagnostics).
    pub fn held_cgroups_pinned(bpffs: &Path) -> Result<Vec<u64>, CaptureError> {
        let name = map_names::HELD_CGROUPS;
        let map = open_pinned_hash::<u32>(bpffs, name)?;
        Ok(map.keys().filter_map(Result::ok).collect())
    }

    /// Stops capturing for this network namespace.
    pub fn release(&mut self, netns_cookie: u64) -> Result<(), CaptureError> {
        match self.enrolled.remove(&netns_cookie) {
            Ok(()) => Ok(()),
            // Already gone: releasing is idempotent.
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(CaptureError::Map { name: map_names::ENROLLED, source }),
        }
    }

    /// Cookies currently enrolled (possibly by an earlier agent instance).
    pub fn enrolled_cookies(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(Result::ok).collect()
    }

    /// Records in a node's pinned `PENDING` map (for tests and diagnostics).
    pub fn pending_len_pinned(bpffs: &Path) -> Result<usize, CaptureError> {
        let name = map_names::PENDING;
        let map = open_pinned_hash::<PendingDst>(bpffs, name)?;
        Ok(map.keys().filter(Result::is_ok).count())
    }

    /// The cgroup ids in a node's pinned `AGENT_CGROUPS` map (for tests and diagnostics).
    pub fn agent_cgroups_pinned(bpffs: &Path) -> Result<Vec<u64>, CaptureError> {
        let name = map_names::AGENT_CGROUPS;
        let map = open_pinned_hash::<u32>(bpffs, name)?;
        Ok(map.keys().filter_map(Result::ok).collect())
    }

    /// The pids of the agent instances in a node's pinned `AGENT_CGROUPS` that are running
    /// (`uninstall` refuses to pull the programs from under a live agent).
    pub fn running_instances_pinned(bpffs: &Path) -> Result<Vec<u32>, CaptureError> {
        let name = map_names::AGENT_CGROUPS;
        let map = open_pinned_hash::<u32>(bpffs, name)?;
        let mut pids: Vec<u32> = map
            .iter()
            .filter_map(Result::ok)
            .map(|(_, pid)| pid)
            .filter(|p| pid_running(*p))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    /// The count of pending records each enrolled pod holds, by netns cookie, in a node's
    /// pinned `ENROLLED` map (for tests and diagnostics).
    pub fn pending_by_pod_pinned(bpffs: &Path) -> Result<Vec<(u64, i32)>, CaptureError> {
        let name = map_names::ENROLLED;
        let map = open_pinned_hash::<PodInfo>(bpffs, name)?;
        Ok(map.iter().filter_map(Result::ok).map(|(k, v)| (k, v.pending as i32)).collect())
    }

    /// The flags of each pod in a node's pinned `ENROLLED` map, by netns cookie (`uninstall`).
    pub fn enrolled_flags_pinned(bpffs: &Path) -> Result<Vec<(u64, u32)>, CaptureError> {
        let name = map_names::ENROLLED;
        let map = open_pinned_hash::<PodInfo>(bpffs, name)?;
        Ok(map.iter().filter_map(Result::ok).map(|(k, v)| (k, v.flags)).collect())
    }

    /// The handle for looking up original destinations (shared by the connection tasks).
    pub fn take_orig_dst(&mut self) -> Option<OrigDstMap> {
        self.orig_dst.take()
    }

    /// Kernel ids of the loaded programs, for run-time statistics (kept up to date as pods'
    /// inbound instances come and go).
    pub fn program_ids(&self) -> std::sync::Arc<ProgramIds> {
        self.program_ids.clone()
    }

    /// The ring buffer of refusals by the inbound program; the caller polls its fd.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// The ring buffer of plaintext connections accepted by enrolled pods' apps, opened and
    /// closed ([`parse_plaintext_event`]); the caller polls its fd.
    pub fn take_plaintext_events(&mut self) -> Option<RingBuf<MapData>> {
        self.plaintext_events.take()
    }

    /// The switch for the programs' debug lines.
    pub fn log_switch(&self) -> std::sync::Arc<EbpfLogSwitch> {
        self.log_switch.clone()
    }

    /// The aya-log reader; the caller polls its fd and calls `flush`.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }
}

/// Refuses a kubelet cgroup that holds the pods' cgroup or lies inside it: either would let pods'
/// own connections (host-network pods among them) pass as the kubelet's.
fn check_kubelet_cgroup(kubelet: &Path, pods: &Path) -> Result<(), CaptureError> {
    self_cgroup::cgroup_id(kubelet).map_err(CaptureError::KubeletCgroupDir)?;
    let canon = |p: &Path| {
        fs::canonicalize(p).map_err(|source| CaptureError::Cgroup { path: p.to_owned(), source })
    };
    let (k, p) = (canon(kubelet)?, canon(pods)?);
    let err = |why| CaptureError::KubeletCgroup { kubelet: k.clone(), pods: p.clone(), why };
    if p.starts_with(&k) {
        return Err(err("contains (or is)"));
    }
    if k.starts_with(&p) {
        return Err(err("lies inside"));
    }
    Ok(())
}

/// Removes the cgroup ids of agent instances that are no longer running (their pid is gone),
/// so ids of crashed instances never fill `AGENT_CGROUPS`. The ids of running instances (the
/// old one during a rolling update) stay.
pub(super) fn forget_gone_instances(map: &mut HashMap<MapData, u64, u32>) {
    let gone: Vec<u64> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, pid)| !pid_running(*pid))
        .map(|(id, _)| id)
        .collect();
    for id in gone {
        let _ = map.remove(&id);
        debug!(cgroup_id = id, "forgot the cgroup id of an agent instance that is gone");
    }
}

/// Whether a process with this pid exists (in the agent's pid namespace: the host's, in a
/// cluster, where the DaemonSet runs with `hostPID`).
fn pid_running(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        // Exists, but is not ours to signal.
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

fn read_stats(map: &PerCpuArray<MapData, u64>) -> EbpfStats {
    let sum =
        |i: u32| -> u64 { map.get(&i, 0).map(|v| v.iter().copied().sum()).unwrap_or_default() };
    EbpfStats {
        strict_rejected: sum(stats::STRICT_REJECTED),
        probe_allowed: sum(stats::PROBE_ALLOWED),
        captured: sum(stats::CAPTURED),
        pending_over_quota: sum(stats::PENDING_OVER_QUOTA),
        agent_port_unserved: sum(stats::AGENT_PORT_UNSERVED),
        held_refused: sum(stats::HELD_REFUSED),
    }
}

/// Run statistics of one program, from the kernel (`kernel.bpf_stats_enabled`).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgramRuns {
    pub program: String,
    pub runs: u64,
    pub run_time_ns: u64,
}

/// Kernel ids of an agent instance's programs: the node-wide ones, and one inbound instance
/// per enrolled pod (by netns cookie).
#[derive(Debug, Default)]
pub struct ProgramIds {
    fixed: Vec<(String, u32)>,
    inbound: std::sync::Mutex<std::collections::BTreeMap<u64, u32>>,
}

impl ProgramIds {
    fn inbound_ids(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, u32>> {
        self.inbound.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A second, read-only handle on the programs' counters (for the admin API and metrics).
pub struct StatsReader {
    map: PerCpuArray<MapData, u64>,
    programs: std::sync::Arc<ProgramIds>,
}

impl StatsReader {
    /// Run counts and times of this agent's programs; the pods' inbound instances are summed
    /// into one row.
    pub fn programs(&self) -> Vec<ProgramRuns> {
        let inbound: Vec<u32> = self.programs.inbound_ids().values().copied().collect();
        let mut rows: Vec<ProgramRuns> = Vec::new();
        for info in aya::programs::loaded_programs().filter_map(Result::ok) {
            let name = match self.programs.fixed.iter().find(|(_, id)| *id == info.id()) {
                Some((name, _)) => name.as_str(),
                None if inbound.contains(&info.id()) => prog_names::INBOUND,
                None => continue,
            };
            let run_time_ns = info.run_time().as_nanos() as u64;
            match rows.iter_mut().find(|r| r.program == name) {
                Some(r) => {
                    r.runs += info.run_count();
                    r.run_time_ns += run_time_ns;
                }
                None => rows.push(ProgramRuns {
                    program: name.to_string(),
                    runs: info.run_count(),
                    run_time_ns,
                }),
            }
        }
        rows
    }

    pub fn open_pinned(
        bpffs: &Path,
        programs: std::sync::Arc<ProgramIds>,
    ) -> Result<StatsReader, CaptureError> {
        let path = layout::maps_dir(bpffs).join(map_names::STATS);
        let data = MapData::from_pin(&path)
            .map_err(|source| CaptureError::Map { name: map_names::STATS, source })?;
        let map = PerCpuArray::try_from(Map::PerCpuArray(data))
            .map_err(|source| CaptureError::Map { name: map_names::STATS, source })?;
        Ok(StatsReader { map, programs })
    }

    pub fn read(&self) -> EbpfStats {
        read_stats(&self.map)
    }
}

/// Read-only view of `ORIG_DST`, shared by the connection tasks.
pub struct OrigDstMap {
    map: HashMap<MapData, ConnKey, OrigDst>,
    /// An older layout's, while its programs may still have captured a connection.
    legacy: LegacySlot,
}

/// An older layout's `ORIG_DST` and when to let it go (set once its programs are detached).
struct LegacyOrigDst {
    map: HashMap<MapData, ConnKey, OrigDst>,
    until: Option<std::time::Instant>,
}

type LegacySlot = std::sync::Arc<std::sync::Mutex<Option<LegacyOrigDst>>>;

/// How long the older layout's `ORIG_DST` is still read after its programs are detached.
const LEGACY_ORIG_DST_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

fn lock_slot(slot: &LegacySlot) -> std::sync::MutexGuard<'_, Option<LegacyOrigDst>> {
    slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl OrigDstMap {
    /// Opens the pinned map of a node (used by tests and diagnostics).
    pub fn open_pinned(bpffs: &Path) -> Result<OrigDstMap, CaptureError> {
        let path = layout::maps_dir(bpffs).join(map_names::ORIG_DST);
        let data = MapData::from_pin(&path)
            .map_err(|source| CaptureError::Map { name: map_names::ORIG_DST, source })?;
        let map = HashMap::try_from(Map::LruHashMap(data))
            .map_err(|source| CaptureError::Map { name: map_names::ORIG_DST, source })?;
        Ok(OrigDstMap { map, legacy: Default::default() })
    }

    /// The destination a captured client meant to reach. `client` is the peer address seen
    /// by the in-pod listener of the pod whose netns has `netns_cookie`.
    pub fn lookup(&self, netns_cookie: u64, client: SocketAddr) -> Option<SocketAddr> {
        let key = ConnKey { netns_cookie, client: to_sock_addr(client), _pad: 0 };
        let v = match self.map.get(&key, 0) {
            Ok(v) => v,
            // Only on a miss: captured by an older layout's programs during a handover.
            Err(_) => {
                let mut slot = lock_slot(&self.legacy);
                if slot.as_ref()?.until.is_some_and(|t| std::time::Instant::now() >= t) {
                    *slot = None;
                    return None;
                }
                slot.as_ref()?.map.get(&key, 0).ok()?
            }
        };
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
    link.pin(path).map_err(|source| CaptureError::Pin { path: path.to_owned(), source })?;
    Ok(())
}

/// Pin names of per-pod inbound links: `inbound_<netns cookie>_<generation>`.
const INBOUND_LINK_PREFIX: &str = "inbound_";

fn link_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn remove_link_pin(p: &Path) {
    // Unpinning drops the last reference: the kernel detaches the program.
    match aya::programs::links::PinnedLink::from_pin(p) {
        Ok(pinned) => {
            if let Err(e) = pinned.unpin() {
                warn!(path = %p.display(), "removing link pin: {e}");
            }
        }
        Err(e) => warn!(path = %p.display(), "opening link pin: {e}"),
    }
}

fn existing_links(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default()
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
    Err(CaptureError::NotBpffs { path: path.to_owned() })
}

/// `PodInfo::flags` bit: the agent turned `net.ipv4.tcp_migrate_req` on in the pod's namespace
/// (it was off), so `uninstall` turns it off again.
pub const POD_SET_MIGRATE_REQ: u32 = 1;

/// What [`unpin_all`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Unpinned {
    /// Node-wide cgroup links (connect, sock_ops, ...): capture of every pod.
    pub node_links: usize,
    /// Per-pod inbound (`sk_lookup`) links: STRICT enforcement in pods' namespaces.
    pub pod_links: usize,
    pub maps: usize,
}

/// A node's pinned hash map keyed by u64 (netns cookie, cgroup id), opened read-write from
/// its pin: what the `*_pinned` readers for tests, diagnostics and `uninstall` share.
fn open_pinned_hash<V: aya::Pod>(
    bpffs: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, u64, V>, CaptureError> {
    // A node still on layout 1 (an agent of the version before) is read where it pinned.
    let mut path = layout::maps_dir(bpffs).join(name);
    if !path.exists() {
        path = layout::version_dir(bpffs, 1).join(name);
    }
    let data = MapData::from_pin(path).map_err(|source| CaptureError::Map { name, source })?;
    HashMap::try_from(Map::HashMap(data)).map_err(|source| CaptureError::Map { name, source })
}

/// Removes every pin of a node (`mtls-agent uninstall`): links first, so capture stops before
/// the maps it uses disappear.
pub fn unpin_all(bpffs: &Path) -> std::io::Result<Unpinned> {
    let mut done = Unpinned::default();
    for sub in ["links", "maps"] {
        let dir = bpffs.join(sub);
        if dir.exists() {
            for e in fs::read_dir(&dir)?.flatten() {
                if sub == "links" {
                    // The kernel frees an unpinned link from a work queue, some time later;
                    // detaching first means capture has stopped when uninstall returns.
                    if let Err(err) = detach_pinned_link(&e.path()) {
                        warn!(path = %e.path().display(), "detaching link: {err}");
                    }
                    if link_name(&e.path()).starts_with(INBOUND_LINK_PREFIX) {
                        done.pod_links += 1;
                    } else {
                        done.node_links += 1;
                    }
                } else if e.file_type()?.is_dir() {
                    // A layout version's directory (`maps/v<N>`).
                    for pin in fs::read_dir(e.path())?.flatten() {
                        fs::remove_file(pin.path())?;
                        done.maps += 1;
                    }
                    fs::remove_dir(e.path())?;
                    continue;
                } else {
                    done.maps += 1;
                }
                fs::remove_file(e.path())?;
            }
            fs::remove_dir(&dir)?;
        }
    }
    if bpffs.exists() {
        fs::remove_dir(bpffs)?;
    }
    Ok(done)
}

/// `BPF_LINK_DETACH` (5.9) of the link pinned at `path`: the program stops running at once.
fn detach_pinned_link(path: &Path) -> std::io::Result<()> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let get = ObjGet { pathname: c_path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // SAFETY: a valid bpf_attr prefix for BPF_OBJ_GET, whose path outlives the call.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &get as *const ObjGet, size_of::<ObjGet>())
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own from here on.
    let link = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let detach = LinkDetach { link_fd: std::os::fd::AsRawFd::as_raw_fd(&link) as u32 };
    // SAFETY: a valid bpf_attr prefix for BPF_LINK_DETACH.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &detach as *const LinkDetach,
            size_of::<LinkDetach>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The inode of the network namespace a pinned netns link (`sk_lookup`) is attached to: 0
/// once that namespace is gone (`BPF_OBJ_GET_INFO_BY_FD`, `bpf_link_info.netns`).
fn pinned_link_netns_ino(path: &Path) -> std::io::Result<u32> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    /// The head of `struct bpf_link_info` up to its `netns` member (the union is 8-aligned).
    #[repr(C)]
    #[derive(Default)]
    struct LinkInfoNetns {
        link_type: u32,
        id: u32,
        prog_id: u32,
        _pad: u32,
        netns_ino: u32,
        attach_type: u32,
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let get = ObjGet { pathname: c_path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // SAFETY: a valid bpf_attr prefix for BPF_OBJ_GET, whose path outlives the call.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &get as *const ObjGet, size_of::<ObjGet>())
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own from here on.
    let link = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let mut info = LinkInfoNetns::default();
    let attr = InfoByFd {
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&link) as u32,
        info_len: size_of::<LinkInfoNetns>() as u32,
        info: &mut info as *mut LinkInfoNetns as u64,
    };
    // SAFETY: a valid bpf_attr prefix for BPF_OBJ_GET_INFO_BY_FD; the kernel writes at most
    // `info_len` bytes into `info`, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const InfoByFd,
            size_of::<InfoByFd>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info.netns_ino)
}

/// A refusal by the inbound program: (client, pod address and port, whether the pod had no
/// rules at all: being enrolled, or held closed after a failed enrollment).
pub fn parse_reject_event(bytes: &[u8]) -> Option<(SocketAddr, SocketAddr, bool)> {
    if bytes.len() < std::mem::size_of::<mtls_agent_ebpf::RejectEvent>() {
        return None;
    }
    // SAFETY: length checked; RejectEvent is plain data and read unaligned.
    let e: mtls_agent_ebpf::RejectEvent =
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let addr =
        |a: [u32; 4], port: u16| from_sock_addr(SockAddr { addr: a, port, family: e.family });
    let no_rules = e.reason == mtls_agent_ebpf::REJECT_NO_RULES;
    Some((addr(e.remote, e.remote_port)?, addr(e.local, e.local_port)?, no_rules))
}

/// A plaintext connection an enrolled pod's app accepted, as the kernel reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlaintextSeen {
    Opened {
        cookie: u64,
        client: SocketAddr,
        pod: SocketAddr,
    },
    /// Bytes as the pod's app counts them: received from the client, sent to it (acknowledged).
    Closed {
        cookie: u64,
        bytes_received: u64,
        bytes_sent: u64,
    },
}

/// Decodes an item of the plaintext ring buffer; IPv4-mapped addresses become IPv4.
pub fn parse_plaintext_event(bytes: &[u8]) -> Option<PlaintextSeen> {
    if bytes.len() < std::mem::size_of::<mtls_agent_ebpf::PlaintextEvent>() {
        return None;
    }
    // SAFETY: length checked; PlaintextEvent is plain data and read unaligned.
    let e: mtls_agent_ebpf::PlaintextEvent =
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let addr = |a: [u32; 4], port: u16| {
        let s = from_sock_addr(SockAddr { addr: a, port, family: e.family })?;
        Some(SocketAddr::new(s.ip().to_canonical(), s.port()))
    };
    match e.kind {
        mtls_agent_ebpf::PLAINTEXT_OPENED => Some(PlaintextSeen::Opened {
            cookie: e.cookie,
            client: addr(e.remote, e.remote_port)?,
            pod: addr(e.local, e.local_port)?,
        }),
        mtls_agent_ebpf::PLAINTEXT_CLOSED => {
            let (fin_in, fin_out) = fins_counted(e.old_state);
            Some(PlaintextSeen::Closed {
                cookie: e.cookie,
                bytes_received: e.bytes_received.saturating_sub(fin_in.into()),
                bytes_sent: e.bytes_sent.saturating_sub(fin_out.into()),
            })
        }
        _ => None,
    }
}

/// Whether the kernel's byte counts of a socket closing from TCP state `old` include the peer's
/// FIN (received) and our FIN (acknowledged): both take one sequence number. FIN_WAIT2 is left
/// at once when the app closed first and the peer acknowledged our FIN, before the peer's own
/// FIN arrives (the usual end of a server that closes first, e.g. an HTTP probe); only when that
/// FIN came in the same segment as the acknowledgement is the received count one high. A
/// LAST_ACK reset is one low.
fn fins_counted(old: u16) -> (bool, bool) {
    // Linux TCP states (include/net/tcp_states.h).
    const FIN_WAIT2: u16 = 5;
    const TIME_WAIT: u16 = 6;
    const CLOSE_WAIT: u16 = 8;
    const LAST_ACK: u16 = 9;
    const CLOSING: u16 = 11;
    match old {
        FIN_WAIT2 => (false, true),
        TIME_WAIT | CLOSING | LAST_ACK => (true, true),
        CLOSE_WAIT => (true, false),
        _ => (false, false),
    }
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
            SockAddr { addr, port: a.port(), family: AF_INET6 }
        }
    }
}

pub fn from_sock_addr(s: SockAddr) -> Option<SocketAddr> {
    match s.family {
        AF_INET => Some(SocketAddr::new(Ipv4Addr::from(s.addr[0].to_ne_bytes()).into(), s.port)),
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
    fn plaintext_close_reports_payload_bytes_without_fins() {
        let event = |old_state, received, sent| {
            let e = mtls_agent_ebpf::PlaintextEvent {
                cookie: 7,
                bytes_received: received,
                bytes_sent: sent,
                kind: mtls_agent_ebpf::PLAINTEXT_CLOSED,
                old_state,
                family: AF_INET,
                ..Default::default()
            };
            // SAFETY: plain data, read as the ring buffer hands it over.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    (&e as *const mtls_agent_ebpf::PlaintextEvent).cast::<u8>(),
                    std::mem::size_of_val(&e),
                )
            };
            parse_plaintext_event(bytes)
        };
        let closed = |bytes_received, bytes_sent| {
            Some(PlaintextSeen::Closed { cookie: 7, bytes_received, bytes_sent })
        };
        // Both FINs went through (LAST_ACK: the app closed after the client).
        assert_eq!(event(9, 13, 15), closed(12, 14));
        // The app closed first; the peer acknowledged our FIN but has not sent its own.
        assert_eq!(event(5, 13, 15), closed(13, 14));
        // Reset while established: no FIN in the counts.
        assert_eq!(event(1, 13, 15), closed(13, 15));
        // The client's FIN came, ours was never acknowledged.
        assert_eq!(event(8, 13, 15), closed(12, 15));
        // Short items are ignored, not misread.
        assert_eq!(parse_plaintext_event(&[0; 8]), None);
    }

    #[test]
    fn sock_addr_round_trips_v4_v6_and_reduces_v4_mapped() {
        let v4: SocketAddr = "10.244.1.2:8080".parse().unwrap();
        assert_eq!(from_sock_addr(to_sock_addr(v4)), Some(v4));
        // Network byte order: the first octet is the lowest-addressed byte.
        assert_eq!(to_sock_addr(v4).addr[0].to_ne_bytes(), [10, 244, 1, 2]);
        let v6: SocketAddr = "[fd00::1:2]:443".parse().unwrap();
        assert_eq!(from_sock_addr(to_sock_addr(v6)), Some(v6));
        let mapped: SocketAddr = "[::ffff:10.0.0.7]:80".parse().unwrap();
        assert_eq!(from_sock_addr(to_sock_addr(mapped)), Some("10.0.0.7:80".parse().unwrap()));
    }

    #[test]
    fn a_kubelet_cgroup_around_or_inside_the_pods_cgroup_is_refused() {
        // Two fresh cgroups side by side and one inside the first (the unit tests run as root).
        let base = self_cgroup::cgroup2_root()
            .unwrap()
            .join(format!("mtls-unit-kubelet-{}", std::process::id()));
        let pods = base.join("pods");
        let inner = pods.join("inner");
        let kubelet = base.join("kubelet");
        for d in [&base, &pods, &inner, &kubelet] {
            fs::create_dir(d).unwrap();
        }
        let result = (|| {
            check_kubelet_cgroup(&kubelet, &pods)?;
            let around = check_kubelet_cgroup(&base, &pods).unwrap_err().to_string();
            assert!(around.contains("contains") && around.contains("pods"), "{around}");
            let same = check_kubelet_cgroup(&pods, &pods).unwrap_err().to_string();
            assert!(same.contains("contains (or is)"), "{same}");
            let inside = check_kubelet_cgroup(&inner, &pods).unwrap_err().to_string();
            assert!(inside.contains("lies inside"), "{inside}");
            let tmp = tempfile::tempdir().unwrap();
            let not_cgroup = check_kubelet_cgroup(tmp.path(), &pods).unwrap_err().to_string();
            assert!(not_cgroup.contains("not a cgroup v2 directory"), "{not_cgroup}");
            Ok::<(), CaptureError>(())
        })();
        for d in [&inner, &kubelet, &pods, &base] {
            let _ = fs::remove_dir(d);
        }
        result.unwrap();
    }

    #[test]
    fn only_the_ids_of_running_instances_are_kept() {
        // This process runs; a pid beyond the kernel's maximum never does.
        assert!(pid_running(std::process::id()));
        assert!(!pid_running(1 << 30));
        assert!(!pid_running(u32::MAX));
    }

    #[test]
    fn unknown_family_is_rejected() {
        assert_eq!(from_sock_addr(SockAddr { addr: [0; 4], port: 1, family: 99 }), None);
    }
}
