//! `mailproxy manpage` (hidden): the man page in roff on stdout;
//! `scripts/man` writes it to a file.

use anyhow::Result;
use clap::CommandFactory;

use super::args::Cli;

pub fn run() -> Result<u8> {
    clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
    Ok(0)
}
