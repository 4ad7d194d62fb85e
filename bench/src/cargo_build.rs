//! Builds the workspace binaries the suite runs, in the same target directory.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::context::Context;

/// `cargo build --release ARGS` in the workspace (a no-op when up to date).
pub fn cargo_build(ctx: &Context, args: &[&str]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet"])
        .args(args)
        .current_dir(&ctx.root)
        .status()
        .context("starting cargo")?;
    if !status.success() {
        bail!("cargo build --release {} failed ({status})", args.join(" "));
    }
    Ok(())
}
