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
