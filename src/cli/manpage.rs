//! `mailproxy manpage` (hidden): the man page in roff on stdout, or with
//! `--dir` one page per command (`mailproxy-login.1`, …) in that
//! directory, so `man mailproxy-login` works; `scripts/man` writes them.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

use super::args::Cli;

pub fn run(dir: Option<&Path>) -> Result<u8> {
    let Some(dir) = dir else {
        clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
        return Ok(0);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Walks clap's own tree: every visible command, added ones included.
    clap_mangen::generate_to(Cli::command(), dir).with_context(|| format!("writing man pages in {}", dir.display()))?;
    Ok(0)
}
