//! Deserialisation helpers shared by the YAML parsers (`workloads`, `policy`): error locations
//! as `file:line: field: message`, required fields that report "missing field", and scalars
//! checked inside the visitor so serde_yaml points at the scalar itself.

use std::{fmt, path::Path};

use serde::{
    de::{self, Visitor},
    Deserialize, Deserializer,
};

/// `file:line`, or just `file` when the line is unknown.
pub(crate) struct At<'a>(pub &'a Path, pub Option<usize>);

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Some(line) => write!(f, "{}:{line}", self.0.display()),
            None => write!(f, "{}", self.0.display()),
        }
    }
}

pub(crate) struct FieldPrefix<'a>(pub &'a str);

impl fmt::Display for FieldPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, "{}: ", self.0)
        }
    }
}

/// For required fields. Without `deserialize_with`, serde would default a
/// missing `Option` field to `None` instead of reporting "missing field". The
/// `Option` itself catches null (`name:`, `name: ~`), which would otherwise
/// reach a string field as the text "~" or "null"; `convert` rejects it.
/// (An error raised here for null would point at the parent mapping.)
pub(crate) fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d)
}

/// Deserialises a string scalar (verbatim: `name: 0x10` is "0x10") through
/// `check`. The check runs inside the visitor so that serde_yaml attributes
/// its error to the scalar itself; an error raised after deserialising a
/// `String` would point at the parent mapping.
pub(crate) fn checked_str<'de, D, T>(
    d: D,
    expecting: &'static str,
    check: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct StrVisitor<F>(&'static str, F);

    impl<T, F: FnOnce(&str) -> Result<T, String>> Visitor<'_> for StrVisitor<F> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.1)(v).map_err(E::custom)
        }
    }

    d.deserialize_str(StrVisitor(expecting, check))
}

/// A non-empty string.
pub(crate) struct Name(pub String);

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "a name", |s| {
            if s.trim().is_empty() {
                Err("must not be empty".to_string())
            } else {
                Ok(Name(s.to_string()))
            }
        })
    }
}

/// The error's line and its text without the ` at line L column C` part.
pub(crate) fn strip_location(err: &serde_yaml::Error) -> (Option<usize>, String) {
    let mut text = err.to_string();
    let Some(loc) = err.location() else {
        return (None, text);
    };
    let suffix = format!(" at line {} column {}", loc.line(), loc.column());
    if let Some(pos) = text.find(&suffix) {
        text.replace_range(pos..pos + suffix.len(), "");
    }
    (Some(loc.line()), text)
}

/// Splits serde_yaml's `path: message` (the path is omitted at the root).
/// Paths contain no whitespace while messages start with at least two words,
/// which tells the two apart.
pub(crate) fn split_serde_message(text: &str) -> (&str, &str) {
    match text.split_once(": ") {
        Some((path, msg)) if !path.is_empty() && !path.contains(char::is_whitespace) => (path, msg),
        _ => ("", text),
    }
}
