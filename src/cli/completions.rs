//! `mailproxy completions`: a shell completion script on stdout.

use clap::CommandFactory;

use super::args::{Cli, CompletionShell};

pub fn run(shell: CompletionShell) -> u8 {
    let shell = match shell {
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut Cli::command(), "mailproxy", &mut std::io::stdout());
    0
}
