//! The state a new layout takes over from an older one's pinned maps, before its programs run.
//!
//! Only what enforcement needs at once is copied: which namespaces are captured (`ENROLLED`),
//! which cgroups are held closed, which cgroups are agents' own (the old instance still dials
//! from inside pods), the pods' inbound rules and the kubelet's open connections. In-flight
//! records (`PENDING`, `ORIG_DST`) stay with the old programs that write them, and the agent
//! reads the old `ORIG_DST` as well while both run; listeners are each instance's own sockets.
//! The first reconcile then re-writes every pod's entries itself.

use std::path::Path;

use aya::{
    maps::{HashMap, Map, MapData},
    Pod,
};
use mtls_agent_ebpf::{map_names, ConnKey, OrigDst, PodInfo, PortKey, PortPolicy, ProbeConn};
use tracing::{info, warn};

use super::layout;

// Version 1's key and value types are today's: a layout change must freeze copies of the old
// ones here instead (these checks then fail to build).
const _: () = {
    assert!(size_of::<PodInfo>() == 8);
    assert!(size_of::<PortKey>() == 16);
    assert!(size_of::<PortPolicy>() == 8);
    assert!(size_of::<ProbeConn>() == 40);
    assert!(size_of::<ConnKey>() == 32);
    assert!(size_of::<OrigDst>() == 24);
};

const BPF_NOEXIST: u64 = 1;

/// Opens a pinned hash (or LRU hash) map, `None` (with a warning) when it is absent or not
/// of that layout.
fn open<K: Pod, V: Pod>(path: &Path, lru: bool) -> Option<HashMap<MapData, K, V>> {
    if !path.exists() {
        return None;
    }
    let map = MapData::from_pin(path).map_err(|e| e.to_string()).and_then(|d| {
        let m = if lru { Map::LruHashMap(d) } else { Map::HashMap(d) };
        HashMap::try_from(m).map_err(|e| e.to_string())
    });
    match map {
        Ok(m) => Some(m),
        Err(e) => {
            warn!(path = %path.display(), "opening an older layout's map: {e}");
            None
        }
    }
}

/// Copies every entry of `from` into `to` (`flags`: `BPF_NOEXIST` keeps what is there),
/// changed by `convert` (`None`: skipped). Returns how many were written.
fn copy<K: Pod, V: Pod, W: Pod>(
    from: &HashMap<MapData, K, V>,
    to: &mut HashMap<MapData, K, W>,
    flags: u64,
    convert: impl Fn(&V) -> Option<W>,
) -> usize {
    let entries: Vec<(K, V)> = from.iter().filter_map(Result::ok).collect();
    entries
        .iter()
        .filter_map(|(k, v)| Some((k, convert(v)?)))
        .filter(|(k, w)| to.insert(**k, *w, flags).is_ok())
        .count()
}

/// Takes over layout 1's enforcement state into this layout's maps (pinned in `new_dir`).
/// Best effort per map: what cannot be read is re-written by the first reconcile, and the old
/// programs keep enforcing from their own maps until then.
pub fn take_over_v1(bpffs: &Path, new_dir: &Path, pid_running: fn(u32) -> bool) {
    let old_dir = layout::version_dir(bpffs, 1);
    let new_hash = |name: &str, lru: bool| (old_dir.join(name), new_dir.join(name), lru);
    let mut counts = Vec::new();

    let (old, new, _) = new_hash(map_names::ENROLLED, false);
    if let (Some(from), Some(mut to)) = (open::<u64, PodInfo>(&old, false), open(&new, false)) {
        // The pending count belongs to the old PENDING map's records: the new map starts at 0.
        let n = copy(&from, &mut to, BPF_NOEXIST, |v: &PodInfo| {
            Some(PodInfo { flags: v.flags, pending: 0 })
        });
        counts.push((map_names::ENROLLED, n));
    }
    // `ENROLLED`, of a layout before `ENROLLED_PODS` (same key, the value was padding).
    if let (Some(from), Some(mut to)) =
        (open::<u64, u64>(&old_dir.join("ENROLLED"), false), open(&new, false))
    {
        let n = copy(&from, &mut to, BPF_NOEXIST, |_| Some(PodInfo::default()));
        info!("carried over the previous layout's ENROLLED map: {n} enrolled pod(s)");
        counts.push(("ENROLLED", n));
    }
    let (old, new, _) = new_hash(map_names::AGENT_CGROUPS, false);
    if let (Some(from), Some(mut to)) = (open::<u64, u32>(&old, false), open(&new, false)) {
        let n = copy(&from, &mut to, 0, |pid: &u32| pid_running(*pid).then_some(*pid));
        counts.push((map_names::AGENT_CGROUPS, n));
    }
    let (old, new, _) = new_hash(map_names::HELD_CGROUPS, false);
    if let (Some(from), Some(mut to)) = (open::<u64, u32>(&old, false), open(&new, false)) {
        counts.push((map_names::HELD_CGROUPS, copy(&from, &mut to, 0, |v: &u32| Some(*v))));
    }
    let (old, new, _) = new_hash(map_names::INBOUND, false);
    if let (Some(from), Some(mut to)) =
        (open::<PortKey, PortPolicy>(&old, false), open(&new, false))
    {
        counts.push((map_names::INBOUND, copy(&from, &mut to, 0, |v: &PortPolicy| Some(*v))));
    }
    let (old, new, lru) = new_hash(map_names::PROBE_CONNS, true);
    if let (Some(from), Some(mut to)) = (open::<ProbeConn, u32>(&old, lru), open(&new, lru)) {
        counts.push((map_names::PROBE_CONNS, copy(&from, &mut to, 0, |v: &u32| Some(*v))));
    }
    info!(?counts, "took over the enforcement state of map layout v1");
}

/// Writes this instance's cgroup into layout 1's `AGENT_CGROUPS` too: while the old programs
/// are attached they see this instance's dials inside pods first, and must not capture them.
/// Ids of instances that are gone go first, so crashed ones never fill the map.
pub fn register_in_v1(bpffs: &Path, cgroup_id: u64) {
    let path = layout::version_dir(bpffs, 1).join(map_names::AGENT_CGROUPS);
    if let Some(mut map) = open::<u64, u32>(&path, false) {
        super::forget_gone_instances(&mut map);
        if let Err(e) = map.insert(cgroup_id, std::process::id(), 0) {
            warn!(path = %path.display(), "writing this instance's cgroup id: {e}");
        }
    }
}

/// Pids of the other agent instances layout 1's `AGENT_CGROUPS` names that still run (the old
/// agent during a surge rollout): while one does, it may attach a layout-1 inbound link to a
/// pod again, so layout 1 must stay pinned and its links attached.
pub fn v1_instances_running(bpffs: &Path, pid_running: fn(u32) -> bool) -> Vec<u32> {
    let path = layout::version_dir(bpffs, 1).join(map_names::AGENT_CGROUPS);
    let Some(map) = open::<u64, u32>(&path, false) else { return Vec::new() };
    let own = std::process::id();
    let mut pids: Vec<u32> = map
        .iter()
        .filter_map(Result::ok)
        .map(|(_, pid)| pid)
        .filter(|pid| *pid != own && pid_running(*pid))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Layout 1's `ORIG_DST`: connections captured by the old programs while both run.
pub fn v1_orig_dst(bpffs: &Path) -> Option<HashMap<MapData, ConnKey, OrigDst>> {
    open(&layout::version_dir(bpffs, 1).join(map_names::ORIG_DST), true)
}
