//! The feed's interner: one copy of each string and label set that repeats across pods
//! (namespaces, nodes, service accounts, label keys and values, whole label sets, container
//! layouts), shared by every pod that has it. What no pod holds any more is dropped by
//! [`Interner::sweep`], run as the tables grow, so a cluster's churn does not accumulate.

use std::{
    collections::{BTreeMap, HashSet},
    hash::Hash,
    sync::{Arc, Mutex, PoisonError},
};

use crate::workloads::shared::{Labels, Str};

/// Below this many entries a table is never swept (sweeping a small table gains nothing).
const SWEEP_FLOOR: usize = 4096;

/// Interned values of one kind.
struct Table<T> {
    set: HashSet<T>,
    /// Entries after the last sweep: the next runs once the table has doubled.
    after_sweep: usize,
}

impl<T: Hash + Eq + Clone> Table<T> {
    fn new() -> Self {
        Table { set: HashSet::new(), after_sweep: 0 }
    }

    fn get_or_insert(&mut self, value: T) -> T {
        if let Some(v) = self.set.get(&value) {
            return v.clone();
        }
        self.set.insert(value.clone());
        value
    }

    fn due(&self) -> bool {
        self.set.len() > SWEEP_FLOOR.max(2 * self.after_sweep)
    }

    /// Drops the entries only this table holds.
    fn sweep(&mut self, holders: impl Fn(&T) -> usize) {
        self.set.retain(|v| holders(v) > 1);
        self.set.shrink_to_fit();
        self.after_sweep = self.set.len();
    }
}

/// Interned strings, label sets and shared layouts (any `Arc`'d value, e.g. a pod's
/// containers).
pub struct Interner<L = ()> {
    strs: Table<Str>,
    labels: Table<Labels>,
    layouts: Table<Arc<L>>,
}

impl<L: Hash + Eq> Default for Interner<L> {
    fn default() -> Self {
        Interner { strs: Table::new(), labels: Table::new(), layouts: Table::new() }
    }
}

impl<L: Hash + Eq> Interner<L> {
    pub fn str(&mut self, s: &str) -> Str {
        if let Some(v) = self.strs.set.get(s) {
            return v.clone();
        }
        let v = Str::from(s);
        self.strs.set.insert(v.clone());
        v
    }

    /// The label set, its keys and values shared with every pod that has them.
    pub fn labels(&mut self, map: &BTreeMap<String, String>) -> Labels {
        let pairs = map.iter().map(|(k, v)| (self.str(k), self.str(v))).collect();
        self.labels.get_or_insert(Labels::from_sorted(pairs))
    }

    pub fn layout(&mut self, value: L) -> Arc<L> {
        self.layouts.get_or_insert(Arc::new(value))
    }

    /// Drops what no pod holds any more, once a table has doubled since it was last swept
    /// (amortised: each entry is visited a bounded number of times per insertion).
    pub fn sweep_if_due(&mut self) {
        // Label sets and layouts first: they hold strings.
        if self.labels.due() {
            self.labels.sweep(Labels::holders);
        }
        if self.layouts.due() {
            self.layouts.sweep(|l| Arc::strong_count(l));
        }
        if self.strs.due() {
            self.strs.sweep(Str::holders);
        }
    }

    /// Entries held: strings, label sets, layouts.
    pub fn len(&self) -> (usize, usize, usize) {
        (self.strs.set.len(), self.labels.set.len(), self.layouts.set.len())
    }
}

/// An interner shared by the tasks of one feed.
pub type Shared<L> = Arc<Mutex<Interner<L>>>;

/// Runs `f` with the interner (a poisoned lock is still a consistent table: values are only
/// ever added or dropped whole).
pub fn with<L, R>(shared: &Shared<L>, f: impl FnOnce(&mut Interner<L>) -> R) -> R {
    let mut guard = shared.lock().unwrap_or_else(PoisonError::into_inner);
    f(&mut guard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_one_value_and_what_nobody_holds_is_swept() {
        let mut i: Interner<Vec<u16>> = Interner::default();
        let map: BTreeMap<String, String> = [("app".into(), "web".into())].into();
        let (a, b) = (i.labels(&map), i.labels(&map));
        assert_eq!(a, b);
        assert!(std::ptr::eq(a.pairs(), b.pairs()));
        let (x, y) = (i.str("ns"), i.str("ns"));
        assert!(Str::ptr_eq(&x, &y));
        assert!(Arc::ptr_eq(&i.layout(vec![1, 2]), &i.layout(vec![1, 2])));
        // Past the floor, a doubled table drops what only it holds.
        let kept: Vec<Str> = (0..10).map(|n| i.str(&format!("kept-{n}"))).collect();
        for n in 0..SWEEP_FLOOR {
            i.str(&format!("gone-{n}"));
        }
        drop((a, b, x, y));
        i.sweep_if_due();
        let (strs, labels, _) = i.len();
        assert_eq!(labels, 1, "under the floor: not swept");
        // The kept ones and the label set's key and value; not "ns" nor the gone ones.
        assert_eq!(strs, kept.len() + 2);
    }
}
