//! `cargo xtask fuzz` (being written).

use anyhow::{bail, Result};

pub fn run(_seconds: u64, _targets: &[String]) -> Result<()> {
    bail!("cargo xtask fuzz is not implemented yet")
}
