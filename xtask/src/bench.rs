//! `cargo xtask bench` (being written).

use anyhow::{bail, Result};

pub fn run(_args: &[String]) -> Result<()> {
    bail!("cargo xtask bench is not implemented yet")
}
