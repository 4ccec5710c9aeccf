//! The config text being parsed, as every section's parser points into it:
//! an error names the file, the line and the key; a relative path is taken
//! from the file's folder.

use std::ops::Range;
use std::path::{Path, PathBuf};

use super::ConfigError;

/// The text being parsed and where it came from, for errors and relative paths.
pub(super) struct Source<'a> {
    text: &'a str,
    path: &'a Path,
}

impl<'a> Source<'a> {
    pub(super) fn new(text: &'a str, path: &'a Path) -> Source<'a> {
        Source { text, path }
    }
}

impl Source<'_> {
    pub(super) fn err(
        &self,
        span: Option<Range<usize>>,
        key: Option<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            path: self.path.to_owned(),
            line: span.map(|s| line_of(self.text, s.start)),
            key,
            message: message.into(),
        }
    }

    pub(super) fn path(&self) -> &Path {
        self.path
    }

    /// The line `span` starts on, for errors found later (files on disk).
    pub(super) fn line(&self, span: &Range<usize>) -> usize {
        line_of(self.text, span.start)
    }

    /// Relative paths in the config are relative to the config file.
    pub(super) fn resolve(&self, p: &Path) -> PathBuf {
        super::resolve(self.path, p)
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// One account's table, for errors: `accounts."NAME".KEY` at the table's line.
pub(super) struct At<'a> {
    pub(super) src: &'a Source<'a>,
    pub(super) name: &'a str,
    pub(super) span: Range<usize>,
}

impl At<'_> {
    pub(super) fn key(&self, k: &str) -> Option<String> {
        Some(if k.is_empty() {
            format!("accounts.\"{}\"", self.name)
        } else {
            format!("accounts.\"{}\".{k}", self.name)
        })
    }

    pub(super) fn err(&self, k: &str, message: impl Into<String>) -> ConfigError {
        self.src.err(Some(self.span.clone()), self.key(k), message)
    }

    pub(super) fn err_at(&self, span: Option<Range<usize>>, k: &str, message: impl Into<String>) -> ConfigError {
        self.src.err(span.or(Some(self.span.clone())), self.key(k), message)
    }
}

/// What an account's settings depend on outside its own table.
pub(super) struct AccountContext<'a> {
    /// `[server] ca_file`, the default for every account.
    pub(super) server_ca: Option<&'a Path>,
    /// Which listeners are configured (IMAP, SMTP, POP3): Microsoft accounts
    /// ask only for the scopes of protocols that can actually be used.
    pub(super) listening: [bool; 3],
}
