//! Diagnostics: what is wrong, where (file:line:column and the field), and
//! what to do, in the `file:line:col: field: message` form of compilers.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Whether a diagnostic blocks loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The configuration is rejected.
    Error,
    /// The configuration loads, but something is probably not what was meant.
    Warning,
}

/// What kind of problem a diagnostic reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The file could not be read.
    Io,
    /// Not valid TOML.
    Syntax,
    /// A value of the wrong type or form, or a required field missing.
    Type,
    /// A field this section does not have.
    UnknownField,
    /// Two things share a name, id or address.
    Duplicate,
    /// A reference to a node, link or resource that does not exist.
    UnknownReference,
    /// Resources that depend on each other in a circle.
    DependencyCycle,
    /// A node without an address on some link.
    MissingLinkAddress,
    /// A value outside what is allowed (name syntax, ranges, paths).
    InvalidValue,
    /// Lease timeouts that do not prove the self-fencing ordering.
    LeaseTiming,
    /// A monitor whose probe cannot be built.
    MonitorSpec,
    /// A group without nodes, or a cluster without nodes or links.
    Empty,
    /// A node that may own a shared disk but has no fencing configured.
    FenceRequired,
    /// A group with a shared disk but no `[lease]` section.
    LeaseRequired,
    /// Advice: fewer links or nodes than high availability needs.
    Redundancy,
    /// An API reachable from the network without TLS.
    Insecure,
    /// A group that can never be placed (its demand exceeds every eligible node's
    /// capacity), or placement rules that contradict each other.
    Placement,
}

/// A position in the file: 1-based line, 1-based column counted in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Location {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1, in characters.
    pub column: usize,
}

impl Location {
    /// The location of byte `offset` in `source` (clamped to the end).
    pub fn of_offset(source: &str, offset: usize) -> Self {
        let mut offset = offset.min(source.len());
        while !source.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &source[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Location { line: before.matches('\n').count() + 1, column: before[line_start..].chars().count() + 1 }
    }
}

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// What kind of problem.
    pub kind: ProblemKind,
    /// The configuration file.
    pub file: PathBuf,
    /// Where in it (absent when the file could not be read).
    pub location: Option<Location>,
    /// Byte range of the offending key or value.
    pub span: Option<Range<usize>>,
    /// The field, as a path: `group "pg".resource "data".device`.
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.location {
            write!(f, ":{}:{}", l.line, l.column)?;
        }
        if self.severity == Severity::Warning {
            f.write_str(": warning")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every error found in a configuration (and the warnings found with them).
///
/// Displays as one `file:line:col: field: message` line per error, in file
/// order; iterating yields the errors as [`Diagnostic`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    /// The errors, in file order (never empty).
    pub errors: Vec<Diagnostic>,
    /// Warnings found on the way, in file order.
    pub warnings: Vec<Diagnostic>,
}

impl ConfigErrors {
    /// The errors.
    pub fn iter(&self) -> std::slice::Iter<'_, Diagnostic> {
        self.errors.iter()
    }

    /// Number of errors.
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    /// Always false: a `ConfigErrors` holds at least one error.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    pub(crate) fn io(file: &Path, err: &std::io::Error) -> Self {
        ConfigErrors {
            errors: vec![Diagnostic {
                severity: Severity::Error,
                kind: ProblemKind::Io,
                file: file.to_path_buf(),
                location: None,
                span: None,
                field: String::new(),
                message: format!("cannot read the configuration file: {err}; check the path given to --config"),
            }],
            warnings: Vec::new(),
        }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a Diagnostic;
    type IntoIter = std::slice::Iter<'a, Diagnostic>;

    fn into_iter(self) -> Self::IntoIter {
        self.errors.iter()
    }
}

impl IntoIterator for ConfigErrors {
    type Item = Diagnostic;
    type IntoIter = std::vec::IntoIter<Diagnostic>;

    fn into_iter(self) -> Self::IntoIter {
        self.errors.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_become_lines_and_character_columns() {
        let s = "ab\nцdx\n";
        assert_eq!(Location::of_offset(s, 0), Location { line: 1, column: 1 });
        assert_eq!(Location::of_offset(s, 3), Location { line: 2, column: 1 });
        // 'ц' is two bytes: byte 5 is the 'd', the second character.
        assert_eq!(Location::of_offset(s, 5), Location { line: 2, column: 2 });
        assert_eq!(Location::of_offset(s, 4), Location { line: 2, column: 1 });
        assert_eq!(Location::of_offset(s, 99), Location { line: 3, column: 1 });
    }
}
