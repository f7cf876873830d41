//! Source lines of YAML values, looked up by path.
//!
//! serde_yaml reports a location for its own errors, but checks made after
//! deserialisation (duplicates, files that must exist, cross references) only
//! know *which* value is wrong. [`YamlIndex`] recovers *where* it is: it parses
//! the source once with yaml-rust2's event parser and answers queries such as
//! `workloads[3].netns` or, for Kubernetes objects,
//! `spec.selector.matchLabels["app.kubernetes.io/name"]` in the N-th document
//! of a multi-document stream.
//!
//! Path syntax: keys separated by `.`, sequence indices as `[n]`, and keys
//! that contain `.`, `[`, `]`, `"` or `\` written as `["..."]` (with `\"` and
//! `\\` escapes). The empty path is the document root. Lines are 1-based.
//!
//! The line reported for a mapping entry is the line of its *key*, so that
//! `labels` points at `labels:` rather than at the first label below it; for
//! a sequence item it is the line where the item's content starts.

use std::collections::HashMap;
use std::fmt::Write as _;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// The YAML source could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct YamlPosError {
    /// 1-based line of the problem.
    pub line: usize,
    /// 1-based column of the problem.
    pub column: usize,
    pub message: String,
}

/// One step of a path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// A key that occurs twice in the same mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateKey {
    /// Path of the duplicated entry, e.g. `workloads[0].labels.app`.
    pub path: String,
    /// Line of the second occurrence.
    pub line: usize,
    /// Line of the first occurrence.
    pub first_line: usize,
}

/// Positions of every node of a YAML stream, queryable by path.
#[derive(Debug, Clone, Default)]
pub struct YamlIndex {
    /// All nodes of all documents, in document order (an arena, so that
    /// neither building nor dropping deeply nested input recurses).
    nodes: Vec<Node>,
    /// Root node of each document.
    docs: Vec<usize>,
}

#[derive(Debug, Clone)]
struct Node {
    line: usize,
    /// Parent and the segment leading here; `None` for document roots and
    /// for nodes that are not addressable by a path (complex keys).
    up: Option<(usize, Segment)>,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Scalar,
    /// Target node of the alias, if its anchor was seen.
    Alias(Option<usize>),
    Seq(Vec<usize>),
    Map(Vec<Entry>),
}

#[derive(Debug, Clone)]
struct Entry {
    /// `None` for keys that are not scalars (`? [a, b]: c`).
    key: Option<String>,
    key_line: usize,
    value: usize,
}

impl YamlIndex {
    /// Parses every document of `src`.
    pub fn parse(src: &str) -> Result<Self, YamlPosError> {
        let mut parser = Parser::new_from_str(src);
        let mut builder = Builder::default();
        // Pull events one by one instead of `Parser::load`, which recurses
        // once per nesting level and could overflow the stack on hostile input.
        loop {
            let (event, mark) = parser.next_token().map_err(|e| YamlPosError {
                line: e.marker().line(),
                column: e.marker().col() + 1,
                message: e.info().to_string(),
            })?;
            if event == Event::StreamEnd {
                break;
            }
            builder.on_event(event, mark);
        }
        Ok(builder.index)
    }

    /// Number of documents in the stream.
    pub fn documents(&self) -> usize {
        self.docs.len()
    }

    /// Line of the value at `path` in document `doc` (0-based), or `None` if
    /// the path is malformed or does not exist.
    pub fn line(&self, doc: usize, path: &str) -> Option<usize> {
        match self.walk(doc, path)? {
            (line, true) => Some(line),
            (_, false) => None,
        }
    }

    /// Like [`line`](Self::line), but if the path does not exist returns the
    /// line of its longest existing prefix (e.g. the mapping a missing field
    /// belongs in).
    pub fn nearest_line(&self, doc: usize, path: &str) -> Option<usize> {
        self.walk(doc, path).map(|(line, _)| line)
    }

    /// The first key (by line) that is repeated within one mapping of
    /// document `doc`. serde_yaml silently keeps the last value of a repeated
    /// map key, which hides typos such as a label given twice.
    pub fn duplicate_key(&self, doc: usize) -> Option<DuplicateKey> {
        let start = *self.docs.get(doc)?;
        let end = self.docs.get(doc + 1).copied().unwrap_or(self.nodes.len());
        let mut best: Option<(usize, usize, String)> = None; // (line, map node, key)
        let mut first_line = 0;
        for id in start..end {
            let Some(Node { kind: Kind::Map(entries), .. }) = self.nodes.get(id) else {
                continue;
            };
            let mut seen: HashMap<&str, usize> = HashMap::new();
            for e in entries {
                let Some(key) = e.key.as_deref() else {
                    continue;
                };
                if let Some(&first) = seen.get(key) {
                    if best.as_ref().is_none_or(|(line, _, _)| e.key_line < *line) {
                        best = Some((e.key_line, id, key.to_string()));
                        first_line = first;
                    }
                    break;
                }
                seen.insert(key, e.key_line);
            }
        }
        let (line, map, key) = best?;
        // Maps inside complex keys have no path; report them at the root.
        let parent = self.path_of(map).unwrap_or_default();
        Some(DuplicateKey { path: join_key(&parent, &key), line, first_line })
    }

    /// Follows `path` as far as it exists: the line reached and whether the
    /// whole path matched. `None` if the document or path syntax is invalid.
    fn walk(&self, doc: usize, path: &str) -> Option<(usize, bool)> {
        let segments = parse_path(path)?;
        let mut cur = *self.docs.get(doc)?;
        let mut line = self.nodes.get(cur)?.line;
        for seg in &segments {
            let Some(next) = self.step(cur, seg) else {
                return Some((line, false));
            };
            (cur, line) = next;
        }
        Some((line, true))
    }

    /// The child of `id` reached by `seg`, looking through aliases.
    fn step(&self, id: usize, seg: &Segment) -> Option<(usize, usize)> {
        let mut node = self.nodes.get(id)?;
        if let Kind::Alias(target) = node.kind {
            node = self.nodes.get(target?)?;
        }
        match (&node.kind, seg) {
            (Kind::Map(entries), Segment::Key(k)) => entries
                .iter()
                .find(|e| e.key.as_deref() == Some(k.as_str()))
                .map(|e| (e.value, e.key_line)),
            (Kind::Seq(items), Segment::Index(i)) => {
                let item = *items.get(*i)?;
                Some((item, self.nodes.get(item)?.line))
            }
            _ => None,
        }
    }

    /// Path from the document root to `id`, if it is addressable.
    fn path_of(&self, mut id: usize) -> Option<String> {
        let mut segments = Vec::new();
        while let Some((parent, seg)) = &self.nodes.get(id)?.up {
            segments.push(seg.clone());
            id = *parent;
        }
        if !self.docs.contains(&id) {
            return None;
        }
        segments.reverse();
        Some(format_path(&segments))
    }
}

/// Line of `path` in document `doc` of `src`; a one-shot [`YamlIndex`] query.
pub fn line_of(src: &str, doc: usize, path: &str) -> Result<Option<usize>, YamlPosError> {
    Ok(YamlIndex::parse(src)?.line(doc, path))
}

/// Splits a path such as `a.b[2]["c.d"]` into segments; `None` if malformed.
pub fn parse_path(path: &str) -> Option<Vec<Segment>> {
    let mut segments = Vec::new();
    let mut chars = path.chars().peekable();
    if path == "." {
        return Some(segments); // serde_yaml's name for the root
    }
    let mut first = true;
    while let Some(&c) = chars.peek() {
        match c {
            '[' => {
                chars.next();
                if chars.peek() == Some(&'"') {
                    chars.next();
                    let mut key = String::new();
                    loop {
                        match chars.next()? {
                            '"' => break,
                            '\\' => key.push(chars.next()?),
                            c => key.push(c),
                        }
                    }
                    if chars.next()? != ']' {
                        return None;
                    }
                    segments.push(Segment::Key(key));
                } else {
                    let mut digits = String::new();
                    loop {
                        match chars.next()? {
                            ']' => break,
                            c => digits.push(c),
                        }
                    }
                    segments.push(Segment::Index(digits.parse().ok()?));
                }
            }
            _ => {
                if !first {
                    if c != '.' {
                        return None;
                    }
                    chars.next();
                }
                let mut key = String::new();
                while let Some(&c) = chars.peek() {
                    if c == '.' || c == '[' {
                        break;
                    }
                    key.push(c);
                    chars.next();
                }
                if key.is_empty() {
                    return None;
                }
                segments.push(Segment::Key(key));
            }
        }
        first = false;
    }
    Some(segments)
}

/// Formats segments back into a path that [`parse_path`] accepts.
pub fn format_path(segments: &[Segment]) -> String {
    let mut path = String::new();
    for seg in segments {
        match seg {
            Segment::Key(k) => path = join_key(&path, k),
            Segment::Index(i) => {
                let _ = write!(path, "[{i}]");
            }
        }
    }
    path
}

/// `parent.key`, quoting the key as `parent["key"]` when it needs it.
pub fn join_key(parent: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && !key.contains(['.', '[', ']', '"', '\\'])
        && !key.contains(char::is_whitespace);
    if plain && parent.is_empty() {
        key.to_string()
    } else if plain {
        format!("{parent}.{key}")
    } else {
        let escaped = key.replace('\\', "\\\\").replace('"', "\\\"");
        format!("{parent}[\"{escaped}\"]")
    }
}

/// Turns parser events into the node arena.
#[derive(Default)]
struct Builder {
    index: YamlIndex,
    /// Open collections, innermost last.
    open: Vec<Open>,
    /// Anchor id (unique across the stream) to node.
    anchors: HashMap<usize, usize>,
}

struct Open {
    node: usize,
    /// For mappings: the key waiting for its value, with its line.
    pending_key: Option<(Option<String>, usize)>,
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::DocumentStart => self.open.clear(),
            Event::Scalar(text, _, anchor, _) => {
                let id = self.add(mark, Kind::Scalar, anchor);
                self.attach(id, Some(text));
            }
            Event::Alias(anchor) => {
                let target = self.anchors.get(&anchor).copied();
                let id = self.add(mark, Kind::Alias(target), 0);
                self.attach(id, None);
            }
            Event::SequenceStart(anchor, _) => {
                let id = self.add(mark, Kind::Seq(Vec::new()), anchor);
                self.attach(id, None);
                self.open.push(Open { node: id, pending_key: None });
            }
            Event::MappingStart(anchor, _) => {
                let id = self.add(mark, Kind::Map(Vec::new()), anchor);
                self.attach(id, None);
                self.open.push(Open { node: id, pending_key: None });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                self.open.pop();
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

impl Builder {
    fn add(&mut self, mark: Marker, kind: Kind, anchor: usize) -> usize {
        let id = self.index.nodes.len();
        self.index.nodes.push(Node { line: mark.line(), up: None, kind });
        // Anchor id 0 means "no anchor".
        if anchor != 0 {
            self.anchors.insert(anchor, id);
        }
        id
    }

    /// Links a new node into its parent collection, or makes it a root.
    /// `key_text` is the scalar's text, used if the node turns out to be a key.
    fn attach(&mut self, id: usize, key_text: Option<String>) {
        let line = self.index.nodes.get(id).map_or(0, |n| n.line);
        let Some(open) = self.open.last_mut() else {
            self.index.docs.push(id);
            return;
        };
        let parent = open.node;
        let up = match self.index.nodes.get_mut(parent).map(|n| &mut n.kind) {
            Some(Kind::Seq(items)) => {
                items.push(id);
                Some((parent, Segment::Index(items.len() - 1)))
            }
            Some(Kind::Map(entries)) => match open.pending_key.take() {
                None => {
                    open.pending_key = Some((key_text, line));
                    None
                }
                Some((key, key_line)) => {
                    entries.push(Entry { key: key.clone(), key_line, value: id });
                    key.map(|k| (parent, Segment::Key(k)))
                }
            },
            _ => None,
        };
        if let Some(node) = self.index.nodes.get_mut(id) {
            node.up = up;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NESTED: &str = "\
workloads:
- name: frontend
  labels:
    app: frontend
    tier: web
  probePorts:
  - 8080
  - 8081
- name: cart
  netns: /var/run/netns/cart
";

    #[test]
    fn nested_maps_and_sequences() {
        let idx = YamlIndex::parse(NESTED).unwrap();
        assert_eq!(idx.documents(), 1);
        assert_eq!(idx.line(0, ""), Some(1));
        assert_eq!(idx.line(0, "workloads"), Some(1));
        assert_eq!(idx.line(0, "workloads[0]"), Some(2));
        assert_eq!(idx.line(0, "workloads[0].name"), Some(2));
        assert_eq!(idx.line(0, "workloads[0].labels"), Some(3));
        assert_eq!(idx.line(0, "workloads[0].labels.tier"), Some(5));
        assert_eq!(idx.line(0, "workloads[0].probePorts[1]"), Some(8));
        assert_eq!(idx.line(0, "workloads[1]"), Some(9));
        assert_eq!(idx.line(0, "workloads[1].netns"), Some(10));
    }

    #[test]
    fn missing_paths() {
        let idx = YamlIndex::parse(NESTED).unwrap();
        assert_eq!(idx.line(0, "workloads[2]"), None);
        assert_eq!(idx.line(0, "workloads[1].ip"), None);
        assert_eq!(idx.line(0, "workloads.name"), None);
        assert_eq!(idx.line(1, ""), None);
        assert_eq!(idx.nearest_line(0, "workloads[1].ip"), Some(9));
        assert_eq!(idx.nearest_line(0, "workloads[0].labels.x.y"), Some(3));
        // Malformed paths are not found rather than an error.
        for bad in ["a..b", "a[", "a[x]", "[\"a", ".a", "a]"] {
            assert_eq!(idx.line(0, bad), None, "{bad}");
        }
    }

    #[test]
    fn flow_style() {
        let src = "a: 1\nb: {c: 1, d: [x, {e: 2}]}\nf:\n  {g: 3,\n   h: 4}\n";
        let idx = YamlIndex::parse(src).unwrap();
        assert_eq!(idx.line(0, "b.c"), Some(2));
        assert_eq!(idx.line(0, "b.d[1].e"), Some(2));
        assert_eq!(idx.line(0, "f.g"), Some(4));
        assert_eq!(idx.line(0, "f.h"), Some(5));
    }

    #[test]
    fn second_document() {
        let src = "kind: A\nspec: {}\n---\nkind: B\nspec:\n  ingress:\n  - from: x\n...\n---\n# empty-ish\nkind: C\n";
        let idx = YamlIndex::parse(src).unwrap();
        assert_eq!(idx.documents(), 3);
        assert_eq!(idx.line(0, "kind"), Some(1));
        assert_eq!(idx.line(1, "kind"), Some(4));
        assert_eq!(idx.line(1, "spec.ingress[0].from"), Some(7));
        assert_eq!(idx.line(2, "kind"), Some(11));
        assert_eq!(idx.line(0, "spec.ingress"), None);
        assert_eq!(line_of(src, 1, "spec.ingress").unwrap(), Some(6));
    }

    #[test]
    fn quoted_keys_and_block_scalars() {
        let src = "metadata:\n  labels:\n    app.kubernetes.io/name: web\n    \"a\\\"b\": 1\n  note: |\n    x\n    y\n  after: 1\n";
        let idx = YamlIndex::parse(src).unwrap();
        assert_eq!(idx.line(0, "metadata.labels[\"app.kubernetes.io/name\"]"), Some(3));
        assert_eq!(idx.line(0, r#"metadata.labels["a\"b"]"#), Some(4));
        assert_eq!(idx.line(0, "metadata.note"), Some(5));
        assert_eq!(idx.line(0, "metadata.after"), Some(8));
    }

    #[test]
    fn aliases_are_followed() {
        let src = "base: &b\n  port: 80\nsvc:\n  spec: *b\n";
        let idx = YamlIndex::parse(src).unwrap();
        assert_eq!(idx.line(0, "svc.spec"), Some(4));
        assert_eq!(idx.line(0, "svc.spec.port"), Some(2));
    }

    #[test]
    fn paths_round_trip() {
        let segs = vec![
            Segment::Key("a".into()),
            Segment::Index(3),
            Segment::Key("x.y".into()),
            Segment::Key(r#"q"\"#.into()),
            Segment::Key("b".into()),
        ];
        let path = format_path(&segs);
        assert_eq!(path, r#"a[3]["x.y"]["q\"\\"].b"#);
        assert_eq!(parse_path(&path), Some(segs));
        assert_eq!(parse_path(""), Some(vec![]));
        assert_eq!(parse_path("."), Some(vec![]));
        assert_eq!(join_key("", "a"), "a");
        assert_eq!(join_key("", ""), "[\"\"]");
    }

    #[test]
    fn duplicate_keys() {
        let src = "a:\n  x: 1\n  y: 2\n  x: 3\nb: 1\nb: 2\n";
        let idx = YamlIndex::parse(src).unwrap();
        assert_eq!(
            idx.duplicate_key(0),
            Some(DuplicateKey { path: "a.x".into(), line: 4, first_line: 2 })
        );
        let idx = YamlIndex::parse("a: {k: 1}\n---\nl: [{m: 1, m: 2}]\n").unwrap();
        assert_eq!(idx.duplicate_key(0), None);
        assert_eq!(idx.duplicate_key(1).unwrap().path, "l[0].m");
        assert_eq!(idx.duplicate_key(2), None);
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let err = YamlIndex::parse("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert!(err.line >= 2, "{err}");
        let err = YamlIndex::parse("a: 1\n  b: 2\n").unwrap_err();
        assert_eq!(err.line, 2, "{err}");
    }

    #[test]
    fn empty_and_hostile_input() {
        assert_eq!(YamlIndex::parse("").unwrap().documents(), 0);
        assert_eq!(YamlIndex::parse("# only a comment\n").unwrap().documents(), 0);
        // An empty document still has a (null) root.
        assert!(YamlIndex::parse("---\n").unwrap().line(0, "").is_some());
        // Deep nesting must neither overflow the stack nor panic.
        let deep = "[".repeat(100_000);
        let _ = YamlIndex::parse(&deep);
        let deep = format!("{}1{}", "[".repeat(5_000), "]".repeat(5_000));
        let _ = YamlIndex::parse(&deep);
        // Every prefix of a document parses or errors, never panics.
        for end in (0..=NESTED.len()).filter(|&i| NESTED.is_char_boundary(i)) {
            if let Ok(idx) = YamlIndex::parse(&NESTED[..end]) {
                let _ = idx.line(0, "workloads[1].netns");
                let _ = idx.duplicate_key(0);
            }
        }
    }
}
