//! What the kernel needs to judge plaintext by the AuthorizationPolicies of one pod: plaintext
//! has no identity, so its verdict depends only on the source address and the port (and the
//! destination address, see below). This module compiles the policies that apply to a pod into
//! longest-prefix-match entries `(port, source block) -> verdict` that give, for every source
//! address, the verdict [`super::evaluate`] gives for a plaintext connection from it.
//!
//! * Ports: only the ports the rules name (`ports`, `notPorts`, `destination.port`) can be
//!   judged differently from each other; every other port is judged as one, under port `0`.
//! * Sources: the blocks the rules name (`ipBlocks`, `notIpBlocks`, `remoteIpBlocks`,
//!   `source.ip`) cut the address space into regions of one verdict; each block becomes an
//!   entry judged at an address of it that no more specific block covers, and `::/0` covers the
//!   rest (and `::ffff:0:0/96` the rest of IPv4). IPv4 is written as IPv4-mapped IPv6, so one
//!   table serves both families.
//! * An entry that gives the verdict of the block it sits in is left out.
//! * `destination.ip` conditions: the kernel entry has no destination, so a region is allowed
//!   only if plaintext to every address of the pod is (fail closed).
//!
//! No policy for the pod: no entries, and the kernel allows (the mode alone decides).

use std::net::{IpAddr, Ipv6Addr};

use ipnet::{IpNet, Ipv6Net};

use super::{Attr, AuthzPolicy, Conn, Pattern, RuleRef};
use crate::workloads::Workload;

/// Most distinct ports and source blocks the policies of one pod may name before its
/// plaintext is simply refused on every port: the table costs ports x blocks verdicts.
pub const MAX_PORTS: usize = 256;
pub const MAX_BLOCKS: usize = 256;

/// [`PlaintextRefusals`] of pods, remembered per set of applicable policies (pods of one
/// deployment share them) until the policies change: the agent asks for every pod on every
/// reconcile.
#[derive(Default)]
pub struct RefusalCache {
    /// Which `PolicySet` the entries are for (held, so its address cannot be reused).
    set: Option<std::sync::Arc<crate::policy::PolicySet>>,
    map: std::collections::HashMap<(Vec<usize>, Vec<IpAddr>), PlaintextRefusals>,
}

impl RefusalCache {
    pub fn get(
        &mut self,
        ps: &std::sync::Arc<crate::policy::PolicySet>,
        w: &Workload,
    ) -> PlaintextRefusals {
        if !self.set.as_ref().is_some_and(|s| std::sync::Arc::ptr_eq(s, ps)) {
            self.map.clear();
            self.set = Some(ps.clone());
        }
        let all = ps.authz_policies();
        let root = ps.root_namespace();
        let applicable: Vec<usize> =
            (0..all.len()).filter(|&i| all[i].applies_to(root, w)).collect();
        // The pod's addresses matter only to `destination.ip` conditions.
        let by_dst = applicable.iter().any(|&i| {
            all[i].rules.iter().any(|r| {
                r.from
                    .iter()
                    .flatten()
                    .chain(r.to.iter().flatten())
                    .chain(&r.when)
                    .any(|m| m.attr == Attr::DestinationIp)
            })
        });
        let ips = if by_dst { w.ips.iter().copied().chain([w.ip]).collect() } else { Vec::new() };
        let key = (applicable, ips);
        if let Some(r) = self.map.get(&key) {
            return r.clone();
        }
        let r = PlaintextRefusals::of(&plaintext_rules(key.0.iter().map(|&i| &all[i]), root, w));
        self.map.insert(key, r.clone());
        r
    }
}

/// One entry of the plaintext table of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainRule {
    /// `0`: every port the rules do not name.
    pub port: u16,
    /// The source block, as IPv6 (IPv4 mapped).
    pub source: Ipv6Net,
    pub allow: bool,
    /// The rule that decided (`None`: no rule did).
    pub decided_by: Option<RuleRef>,
}

/// The entries for plaintext to workload `w`, with `root` as the root namespace.
pub fn plaintext_rules<'a>(
    policies: impl IntoIterator<Item = &'a AuthzPolicy>,
    root: &str,
    w: &Workload,
) -> Vec<PlainRule> {
    let applicable: Vec<&AuthzPolicy> =
        policies.into_iter().filter(|p| p.applies_to(root, w)).collect();
    if applicable.is_empty() {
        return Vec::new();
    }
    let mut ports = Vec::new();
    // `::/0` for IPv6, and the IPv4 space apart: an IPv6 block never matches an IPv4 source
    // (nor the reverse), so a lookup of an IPv4 source must never end in an IPv6 block.
    let mut blocks = vec![Ipv6Net::default(), v4_space()];
    for p in &applicable {
        for r in &p.rules {
            let fields = r.from.iter().flatten().chain(r.to.iter().flatten()).chain(&r.when);
            for m in fields {
                for v in &m.values {
                    match (m.attr, v) {
                        (Attr::DestinationPort, Pattern::Port(port)) => ports.push(*port),
                        (Attr::SourceIp, Pattern::Net(net)) => blocks.push(as_v6(net)),
                        _ => {}
                    }
                }
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    blocks.sort_by_key(|b| (b.prefix_len(), b.network()));
    blocks.dedup();
    if ports.len() > MAX_PORTS || blocks.len() > MAX_BLOCKS {
        // Too many to compile (the work grows with ports x blocks): all plaintext refused.
        tracing::warn!(pod = %w.key(), ports = ports.len(), blocks = blocks.len(),
            "AuthorizationPolicies of this pod name more than {MAX_PORTS} ports or {MAX_BLOCKS} \
             address blocks: plaintext to it is refused on every port (fail closed)");
        return vec![PlainRule {
            port: 0,
            source: Ipv6Net::default(),
            allow: false,
            decided_by: None,
        }];
    }
    // Where each block is judged: an address of it no more specific block covers (the same
    // for every port).
    let at: Vec<Option<Ipv6Addr>> = blocks
        .iter()
        .enumerate()
        .map(|(i, block)| {
            let inner: Vec<Ipv6Net> = blocks[i + 1..]
                .iter()
                .filter(|b| block.contains(*b) && *b != block)
                .copied()
                .collect();
            uncovered(*block, &inner)
        })
        .collect();
    // A port no rule names stands for all of them.
    let other = (1..=u16::MAX).find(|p| ports.binary_search(p).is_err()).unwrap_or(0);
    let mut out = Vec::new();
    for (port, judged_as) in std::iter::once((0, other)).chain(ports.iter().map(|p| (*p, *p))) {
        // Shortest first, so a block's enclosing entry is decided before it.
        let mut kept: Vec<PlainRule> = Vec::new();
        for (block, at) in blocks.iter().zip(&at) {
            let Some(at) = *at else { continue };
            let (allow, decided_by) = judge(&applicable, root, w, at, judged_as);
            let parent = kept.iter().rev().find(|k| k.source.contains(block));
            if parent.is_some_and(|k| k.allow == allow) {
                continue;
            }
            kept.push(PlainRule { port, source: *block, allow, decided_by });
        }
        out.extend(kept);
    }
    out
}

/// The verdict for plaintext from `src` to `port`, allowed only if it is for every address of
/// the pod.
fn judge(
    policies: &[&AuthzPolicy],
    root: &str,
    w: &Workload,
    src: Ipv6Addr,
    port: u16,
) -> (bool, Option<RuleRef>) {
    let src = super::canonical(IpAddr::V6(src));
    let mut first = None;
    for dst in w.ips.iter().copied().chain(std::iter::once(w.ip)) {
        let v = super::evaluate(
            policies.iter().copied(),
            root,
            w,
            &Conn { peer: None, src, dst, port },
        );
        if !v.allowed {
            return (false, v.decided_by);
        }
        first.get_or_insert(v.decided_by);
    }
    (true, first.flatten())
}

/// `::ffff:0:0/96`: the IPv4 addresses, mapped.
fn v4_space() -> Ipv6Net {
    Ipv6Net::new(std::net::Ipv4Addr::UNSPECIFIED.to_ipv6_mapped(), 96).unwrap_or_default()
}

/// IPv4 blocks as IPv4-mapped IPv6.
pub fn as_v6(net: &IpNet) -> Ipv6Net {
    match net {
        IpNet::V6(n) => n.trunc(),
        IpNet::V4(n) => {
            let addr = n.network().to_ipv6_mapped();
            Ipv6Net::new(addr, 96 + n.prefix_len()).map(|n| n.trunc()).unwrap_or_default()
        }
    }
}

/// An address of `block` that none of `inner` (blocks inside it) covers, if there is one.
fn uncovered(block: Ipv6Net, inner: &[Ipv6Net]) -> Option<Ipv6Addr> {
    if inner.iter().any(|b| b.contains(&block)) {
        return None;
    }
    if !inner.iter().any(|b| block.contains(b)) {
        return Some(block.network());
    }
    // Some inner block lies inside: look in each half.
    let halves = block.subnets(block.prefix_len() + 1).ok()?;
    for half in halves {
        let within: Vec<Ipv6Net> =
            inner.iter().filter(|b| half.contains(*b) || b.contains(&half)).copied().collect();
        if let Some(a) = uncovered(half, &within) {
            return Some(a);
        }
    }
    None
}

/// What the kernel enforces for plaintext today, from [`plaintext_rules`]: the kernel's rules
/// hold one mode per port, not per source, so a port where the policies refuse plaintext from
/// any source refuses all plaintext (as STRICT does), failing closed for the sources they
/// would admit. `ports`: the ports the rules name, each with whether plaintext to it is
/// refused; `others`: the same for every other port.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlaintextRefusals {
    pub ports: Vec<(u16, bool)>,
    pub others: bool,
}

impl PlaintextRefusals {
    pub fn of(rules: &[PlainRule]) -> PlaintextRefusals {
        let refused = |port: u16| rules.iter().any(|r| r.port == port && !r.allow);
        let mut ports: Vec<u16> = rules.iter().map(|r| r.port).filter(|p| *p != 0).collect();
        ports.dedup();
        // Every named port has its own `::/0` entry, so its entries alone decide it.
        PlaintextRefusals {
            ports: ports.into_iter().map(|p| (p, refused(p))).collect(),
            others: refused(0),
        }
    }

    /// Whether plaintext to `port` is refused.
    pub fn refuses(&self, port: u16) -> bool {
        match self.ports.iter().find(|(p, _)| *p == port) {
            Some((_, r)) => *r,
            None => self.others,
        }
    }
}

/// The entry a longest-prefix lookup of `(port, src)` finds, as the kernel does it: the port's
/// own entries first, then port 0's. `None`: no entry (allowed).
pub fn lookup(rules: &[PlainRule], port: u16, src: IpAddr) -> Option<&PlainRule> {
    let src = match super::canonical(src) {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let best = |port: u16| {
        rules
            .iter()
            .filter(|r| r.port == port && r.source.contains(&src))
            .max_by_key(|r| r.source.prefix_len())
    };
    best(port).or_else(|| best(0))
}

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use super::*;
    use crate::policy::testutil::{set, workloads};

    fn ap(i: usize, spec: &str) -> String {
        format!("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i}, namespace: hipster-app}}\nspec:\n{spec}")
    }

    /// The kernel's answer and the evaluator's agree for every source and port tried.
    fn agree(src: &str, addrs: &[IpAddr], ports: &[u16]) -> Result<usize, String> {
        let s = set(src);
        let ws = workloads();
        let w = ws.workloads.iter().find(|w| w.name.as_str() == "cart").expect("cart");
        let rules = plaintext_rules(s.authz_policies(), s.root_namespace(), w);
        for &port in ports {
            for &a in addrs {
                let want = s.authorize(w, &Conn { peer: None, src: a, dst: w.ip, port }).allowed;
                let got = lookup(&rules, port, a).is_none_or(|r| r.allow);
                if got != want {
                    return Err(format!(
                        "{a} port {port}: kernel {got}, evaluator {want}\nrules: {rules:#?}\n{src}"
                    ));
                }
            }
        }
        Ok(rules.len())
    }

    #[test]
    fn too_many_blocks_refuse_all_plaintext_and_the_cache_follows_the_set() {
        let blocks: Vec<String> =
            (0..300).map(|i| format!("\"10.{}.{}.0/24\"", i / 256, i % 256)).collect();
        let s = std::sync::Arc::new(set(&ap(
            0,
            &format!("  rules:\n  - from:\n    - source: {{ipBlocks: [{}]}}\n", blocks.join(", ")),
        )));
        let ws = workloads();
        let w = ws.workloads.iter().find(|w| w.name.as_str() == "cart").expect("cart");
        let mut cache = RefusalCache::default();
        let r = cache.get(&s, w);
        assert!(r.others && r.refuses(7070), "{r:?}");
        // A new set (no policy): the cache does not answer from the old one.
        let empty = std::sync::Arc::new(set(""));
        assert!(!cache.get(&empty, w).refuses(7070));
    }

    #[test]
    fn refusals_per_port() {
        let s = set(&(ap(0, "  selector: {matchLabels: {app: cart}}\n  rules:\n  - from:\n    - source: {principals: [\"*\"]}\n    to:\n    - operation: {ports: [\"7070\"]}\n  - to:\n    - operation: {ports: [\"9100\"]}\n")));
        let ws = workloads();
        let w = ws.workloads.iter().find(|w| w.name.as_str() == "cart").expect("cart");
        let r = PlaintextRefusals::of(&plaintext_rules(s.authz_policies(), s.root_namespace(), w));
        // 7070 needs an identity: refused; 9100 admits anyone; other ports: no rule, refused.
        assert!(r.refuses(7070));
        assert!(!r.refuses(9100));
        assert!(r.refuses(8080));
        let redis = ws.workloads.iter().find(|w| w.name.as_str() == "redis").expect("redis");
        let r =
            PlaintextRefusals::of(&plaintext_rules(s.authz_policies(), s.root_namespace(), redis));
        assert_eq!(r, PlaintextRefusals::default(), "no policy applies to redis");
        assert!(!r.refuses(6379));
    }

    #[test]
    fn hand_picked_policies() {
        let addrs: Vec<IpAddr> =
            ["10.0.0.1", "10.0.0.200", "10.0.1.1", "192.0.2.1", "fd00::1", "::ffff:10.0.0.1"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect();
        let ports = [7070, 9100, 1];
        for spec in [
            "  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/24]}\n    - source: {notIpBlocks: [10.0.0.128/25]}\n",
            "  action: DENY\n  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/16]}\n    to:\n    - operation: {ports: [\"9100\"]}\n",
            "  rules:\n  - from:\n    - source: {principals: [\"*\"]}\n",
            "  action: DENY\n  rules:\n  - from:\n    - source: {notPrincipals: [\"*\"]}\n",
            "  rules:\n  - to:\n    - operation: {notPorts: [\"9100\"]}\n    when:\n    - {key: source.ip, notValues: [\"fd00::/8\"]}\n",
            "  {}\n",
        ] {
            agree(&ap(0, spec), &addrs, &ports).unwrap();
        }
        // No policy: no entries.
        assert_eq!(agree("", &addrs, &ports), Ok(0));
    }

    /// Random policies of ipBlocks, notIpBlocks and ports, ALLOW and DENY: a lookup in the
    /// compiled entries gives the evaluator's verdict for every address and port tried.
    #[test]
    fn compiled_entries_match_the_evaluator() {
        let mut rng = StdRng::seed_from_u64(18);
        let nets = [
            "10.0.0.0/8",
            "10.0.0.0/24",
            "10.0.0.128/25",
            "10.0.0.7",
            "192.0.2.0/24",
            "0.0.0.0/0",
            "fd00::/8",
            "fd00::1/128",
            "::/0",
            "::ffff:10.0.0.0/104",
            "::ffff:10.0.0.8",
            "::/1",
        ];
        let addrs: Vec<IpAddr> = [
            "10.0.0.7",
            "10.0.0.8",
            "10.0.0.130",
            "10.1.2.3",
            "192.0.2.9",
            "198.51.100.1",
            "fd00::1",
            "fd00::2",
            "2001:db8::1",
            "::ffff:10.0.0.8",
            "::1",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let ports = [7070u16, 8080, 9100, 1];
        for _case in 0..600 {
            let mut doc = String::new();
            for i in 0..rng.gen_range(1..4) {
                let action = ["ALLOW", "DENY"][rng.gen_range(0..2)];
                let mut spec = format!("  action: {action}\n  rules:\n");
                for _ in 0..rng.gen_range(1..3) {
                    let field = ["ipBlocks", "notIpBlocks"][rng.gen_range(0..2)];
                    let n: Vec<String> = (0..rng.gen_range(1..3))
                        .map(|_| format!("\"{}\"", nets[rng.gen_range(0..nets.len())]))
                        .collect();
                    spec += &format!("  - from:\n    - source: {{{field}: [{}]}}\n", n.join(", "));
                    if rng.gen_bool(0.5) {
                        let pf = ["ports", "notPorts"][rng.gen_range(0..2)];
                        spec += &format!(
                            "    to:\n    - operation: {{{pf}: [\"{}\"]}}\n",
                            ports[rng.gen_range(0..3)]
                        );
                    }
                }
                doc += &ap(i, &spec);
            }
            agree(&doc, &addrs, &ports).unwrap();
        }
    }
}
