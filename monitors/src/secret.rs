//! Passwords: read from a file or the environment, never printed.

use std::fmt;
use std::path::PathBuf;

/// Where a password comes from. Passwords never appear on a command line
/// or in a spec, only their source.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretSource {
    /// The first line of this file (trailing newline removed).
    File(PathBuf),
    /// The value of this environment variable.
    Env(String),
}

/// Failure to obtain a secret. Messages name the source, never the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The password file could not be read.
    #[error("cannot read password file {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The variable is unset or not UTF-8.
    #[error("environment variable {0} is not set (or not UTF-8)")]
    Env(String),
    /// The source yielded an empty password.
    #[error("password from {0} is empty")]
    Empty(String),
}

impl SecretSource {
    /// Reads the secret now.
    pub fn resolve(&self) -> Result<Secret, SecretError> {
        let (value, name) = match self {
            SecretSource::File(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| SecretError::File { path: path.clone(), source })?;
                let first = text.lines().next().unwrap_or("").to_string();
                (first, format!("file {}", path.display()))
            }
            SecretSource::Env(var) => {
                let v = std::env::var(var).map_err(|_| SecretError::Env(var.clone()))?;
                (v, format!("environment variable {var}"))
            }
        };
        if value.is_empty() {
            return Err(SecretError::Empty(name));
        }
        Ok(Secret(value))
    }
}

/// A password. `Debug` and `Display` print `***`; only [`Secret::expose`]
/// gives the value, so every use is greppable.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value (tests and already-resolved sources).
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that sends it to the server.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_never_printed() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** Secret(***)");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn file_source_takes_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\nignored\n").unwrap();
        assert_eq!(SecretSource::File(p).resolve().unwrap().expose(), "s3cret");
    }

    #[test]
    fn missing_sources_name_the_source_not_the_value() {
        let e = SecretSource::Env("TANDEM_TEST_SURELY_UNSET".into()).resolve().unwrap_err();
        assert!(e.to_string().contains("TANDEM_TEST_SURELY_UNSET"));
        let e = SecretSource::File("/nonexistent/pw".into()).resolve().unwrap_err();
        assert!(e.to_string().contains("/nonexistent/pw"));
    }
}
