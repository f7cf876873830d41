//! Strings and label sets shared between the pods that repeat them: a cluster of 150,000 pods
//! has a few hundred namespaces, service accounts and label keys, and every pod of a
//! ReplicaSet has the same labels. Kept once ([`crate::kubernetes::intern`]), each pod holds a
//! pointer.

use std::{borrow::Borrow, collections::BTreeMap, fmt, ops::Deref, sync::Arc};

use serde::{Serialize, Serializer};

/// An immutable string, cheap to clone (a shared pointer); reads as a `str`.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Str(Arc<str>);

impl Str {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether both are the one shared string (not merely equal).
    pub fn ptr_eq(a: &Str, b: &Str) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }

    /// How many holders share it (the interner counts as one).
    pub(crate) fn holders(&self) -> usize {
        Arc::strong_count(&self.0)
    }
}

impl Deref for Str {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Str {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Str {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<std::path::Path> for Str {
    fn as_ref(&self) -> &std::path::Path {
        self.0.as_ref().as_ref()
    }
}

impl fmt::Display for Str {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl fmt::Debug for Str {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for Str {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl From<&str> for Str {
    fn from(s: &str) -> Str {
        Str(s.into())
    }
}

impl From<String> for Str {
    fn from(s: String) -> Str {
        Str(s.into())
    }
}

impl From<&String> for Str {
    fn from(s: &String) -> Str {
        Str(s.as_str().into())
    }
}

impl From<Str> for String {
    fn from(s: Str) -> String {
        s.0.as_ref().to_owned()
    }
}

impl PartialEq<str> for Str {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for Str {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<String> for Str {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Str> for str {
    fn eq(&self, other: &Str) -> bool {
        *self == *other.0
    }
}

impl PartialEq<Str> for &str {
    fn eq(&self, other: &Str) -> bool {
        **self == *other.0
    }
}

impl PartialEq<Str> for String {
    fn eq(&self, other: &Str) -> bool {
        **self == *other.0
    }
}

/// A pod's labels: sorted by key, each key once; cheap to clone (one shared slice of shared
/// strings), compared and printed as the map it is.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels(Arc<[(Str, Str)]>);

impl Labels {
    /// The value of label `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        let i = self.0.binary_search_by(|(k, _)| k.as_str().cmp(key)).ok()?;
        Some(self.0[i].1.as_str())
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The pairs, as shared strings.
    pub fn pairs(&self) -> &[(Str, Str)] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether every pair of `selector` is one of these labels.
    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(k, v)| self.get(k) == Some(v.as_str()))
    }

    /// These labels with `key` set to `value`.
    pub fn with(&self, key: &str, value: &str) -> Labels {
        let mut map = self.to_map();
        map.insert(key.to_owned(), value.to_owned());
        Labels::from(&map)
    }

    /// The labels as owned strings.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
    }

    /// From pairs already sorted by key, each key once (as a `BTreeMap` iterates).
    pub(crate) fn from_sorted(pairs: Vec<(Str, Str)>) -> Labels {
        debug_assert!(pairs.windows(2).all(|w| w[0].0 < w[1].0));
        Labels(pairs.into())
    }

    pub(crate) fn holders(&self) -> usize {
        Arc::strong_count(&self.0)
    }
}

impl From<&BTreeMap<String, String>> for Labels {
    fn from(map: &BTreeMap<String, String>) -> Labels {
        Labels::from_sorted(map.iter().map(|(k, v)| (Str::from(k), Str::from(v))).collect())
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Labels {
        Labels::from(&map)
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_read_as_the_map_they_were_made_from() {
        let map: BTreeMap<String, String> =
            [("b", "2"), ("a", "1"), ("c", "3")].map(|(k, v)| (k.into(), v.into())).into();
        let l = Labels::from(&map);
        assert_eq!((l.get("a"), l.get("c"), l.get("z")), (Some("1"), Some("3"), None));
        assert_eq!(l.to_map(), map);
        assert!(l.matches(&[("a".to_owned(), "1".to_owned())].into()));
        assert!(!l.matches(&[("a".to_owned(), "2".to_owned())].into()));
        assert_eq!(serde_json::to_string(&l).unwrap(), r#"{"a":"1","b":"2","c":"3"}"#);
        assert_eq!(format!("{l:?}"), format!("{map:?}"));
        assert_eq!(l.with("a", "9").get("a"), Some("9"));
        assert_eq!(l.get("a"), Some("1"));
        assert!(Labels::default().is_empty());
    }

    #[test]
    fn a_shared_string_compares_as_its_text() {
        let s = Str::from("web");
        let owned = String::from("web");
        assert_eq!(s, "web");
        assert_eq!("web", s);
        assert_eq!(s, owned);
        assert_eq!(owned, s);
        assert_eq!(format!("{s} {s:?}"), "web \"web\"");
        assert!(Str::ptr_eq(&s, &s.clone()) && !Str::ptr_eq(&s, &Str::from("web")));
    }
}
