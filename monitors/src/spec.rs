//! Building probes from a [`ProbeSpec`]: a URL whose scheme picks the probe,
//! plus options. Unknown options and malformed values are errors that name
//! the option and list the valid ones.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::time::Duration;

use url::Url;

use crate::secret::{Secret, SecretError, SecretSource};
use crate::{Probe, RunLimits};

/// What to probe and how; mirrors `tandem.v1.ProbeSpec`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProbeSpec {
    /// A URL (`postgresql://…`, `http://…`, `smtp://…`, `tcp://…`, …),
    /// `exec`, or `ocf:PROVIDER:AGENT`.
    pub target: String,
    /// Program and arguments for `exec`.
    pub args: Vec<String>,
    /// OCF parameters (without the `OCF_RESKEY_` prefix) for `ocf:` targets.
    pub params: BTreeMap<String, String>,
    /// Probe-specific options (see docs/monitors.md).
    pub options: BTreeMap<String, String>,
    /// Hard deadline and warning threshold.
    pub limits: RunLimits,
    /// Where a password comes from, if the probe logs in.
    pub password: Option<SecretSource>,
}

/// A spec that cannot be turned into a probe.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The target is not a URL, `exec`, or `ocf:P:A`.
    #[error("invalid target {target:?}: {why}")]
    Target {
        /// The target as given.
        target: String,
        /// What is wrong and what is expected.
        why: String,
    },
    /// No probe handles this URL scheme.
    #[error("unknown probe scheme {scheme:?}; known: {known}")]
    UnknownScheme {
        /// The scheme.
        scheme: String,
        /// The supported schemes.
        known: String,
    },
    /// Options the probe does not know.
    #[error("unknown option(s) {unknown} for the {kind} probe; known: {known}")]
    UnknownOptions {
        /// The probe kind.
        kind: &'static str,
        /// The unknown keys.
        unknown: String,
        /// The keys it accepts.
        known: String,
    },
    /// An option with a malformed value.
    #[error("option {key}={value:?}: {why}")]
    BadOption {
        /// The key.
        key: String,
        /// The value as given.
        value: String,
        /// What is expected.
        why: String,
    },
    /// A required part is missing (host, port, program, user for login…).
    #[error("{0}")]
    Missing(String),
    /// The password source could not be read.
    #[error("password")]
    Secret(#[from] SecretError),
    /// A file the probe needs (CA bundle, pid file directory) is unusable.
    #[error("{what} {path}")]
    File {
        /// Which file this is.
        what: &'static str,
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The URL schemes [`build_probe`] knows.
pub const SCHEMES: &[&str] = &[
    "postgresql",
    "postgres",
    "http",
    "https",
    "smtp",
    "smtps",
    "imap",
    "imaps",
    "pop3",
    "pop3s",
    "ftp",
    "oracle",
    "tcp",
    "process",
];

/// Everything a probe constructor may read. Options are consumed through
/// the accessors, so that anything left over is reported as unknown.
#[derive(Debug)]
pub struct SpecContext<'a> {
    /// The parsed URL (for URL targets).
    pub url: Option<Url>,
    /// The spec.
    pub spec: &'a ProbeSpec,
    asked: RefCell<BTreeSet<String>>,
}

impl<'a> SpecContext<'a> {
    /// A context for `spec` with an already-parsed URL.
    pub fn new(spec: &'a ProbeSpec, url: Option<Url>) -> Self {
        Self { url, spec, asked: RefCell::new(BTreeSet::new()) }
    }

    /// The URL; constructors of URL probes may rely on it.
    pub fn url(&self) -> &Url {
        self.url.as_ref().expect("URL probe built without a URL")
    }

    /// Host from the URL, or an error naming what is missing.
    pub fn host(&self) -> Result<String, SpecError> {
        match self.url().host_str() {
            Some(h) if !h.is_empty() => Ok(h.trim_start_matches('[').trim_end_matches(']').to_string()),
            _ => Err(SpecError::Missing(format!("{}: the URL has no host", self.url()))),
        }
    }

    /// Port from the URL, else `default`.
    pub fn port_or(&self, default: u16) -> u16 {
        self.url().port().unwrap_or(default)
    }

    /// Percent-decoded user name from the URL, if any.
    pub fn user(&self) -> Option<String> {
        let u = self.url().username();
        if u.is_empty() { None } else { Some(percent_decode(u)) }
    }

    /// The password: from the spec's source, else refused if the URL
    /// carries one inline (it would end up in shell history and logs).
    pub fn password(&self) -> Result<Option<Secret>, SpecError> {
        if self.url.as_ref().is_some_and(|u| u.password().is_some()) {
            return Err(SpecError::Target {
                target: redact_url(self.url()),
                why: "passwords in URLs are refused (they leak into shell history and logs); \
                      use --password-file or --password-env"
                    .into(),
            });
        }
        Ok(self.spec.password.as_ref().map(|s| s.resolve()).transpose()?)
    }

    /// A string option.
    pub fn opt(&self, key: &str) -> Option<String> {
        self.asked.borrow_mut().insert(key.to_string());
        self.spec.options.get(key).cloned()
    }

    /// A boolean option: true/false/yes/no/1/0/on/off.
    pub fn opt_bool(&self, key: &str, default: bool) -> Result<bool, SpecError> {
        match self.opt(key) {
            None => Ok(default),
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "true" | "yes" | "1" | "on" | "" => Ok(true),
                "false" | "no" | "0" | "off" => Ok(false),
                _ => Err(SpecError::BadOption { key: key.into(), value: v, why: "expected true or false".into() }),
            },
        }
    }

    /// An option parsed with `FromStr`.
    pub fn opt_parse<T: FromStr>(&self, key: &str) -> Result<Option<T>, SpecError>
    where
        T::Err: std::fmt::Display,
    {
        match self.opt(key) {
            None => Ok(None),
            Some(v) => v.parse::<T>().map(Some).map_err(|e| SpecError::BadOption {
                key: key.into(),
                value: v,
                why: e.to_string(),
            }),
        }
    }

    /// A duration option in seconds (fractions allowed).
    pub fn opt_secs(&self, key: &str) -> Result<Option<Duration>, SpecError> {
        match self.opt_parse::<f64>(key)? {
            None => Ok(None),
            Some(s) if s.is_finite() && s >= 0.0 => Ok(Some(Duration::from_secs_f64(s))),
            Some(s) => {
                Err(SpecError::BadOption { key: key.into(), value: s.to_string(), why: "expected seconds >= 0".into() })
            }
        }
    }

    /// Errors if the spec has options no accessor asked for.
    pub fn finish(&self, kind: &'static str) -> Result<(), SpecError> {
        let asked = self.asked.borrow();
        let unknown: Vec<&str> = self.spec.options.keys().filter(|k| !asked.contains(*k)).map(String::as_str).collect();
        if unknown.is_empty() {
            return Ok(());
        }
        Err(SpecError::UnknownOptions {
            kind,
            unknown: unknown.join(", "),
            known: if asked.is_empty() {
                "(none)".into()
            } else {
                asked.iter().cloned().collect::<Vec<_>>().join(", ")
            },
        })
    }
}

/// Builds the probe a spec describes.
pub fn build_probe(spec: &ProbeSpec) -> Result<Box<dyn Probe>, SpecError> {
    let target = spec.target.trim();
    if target == "exec" {
        let ctx = SpecContext::new(spec, None);
        let p = crate::exec::build(&ctx)?;
        ctx.finish("exec")?;
        return Ok(p);
    }
    if let Some(rest) = target.strip_prefix("ocf:") {
        let ctx = SpecContext::new(spec, None);
        let p = crate::ocf::build(&ctx, rest)?;
        ctx.finish("ocf")?;
        return Ok(p);
    }
    let url = Url::parse(target).map_err(|e| SpecError::Target {
        target: target.to_string(),
        why: format!("{e}; expected a URL such as tcp://HOST:PORT, `exec` or ocf:PROVIDER:AGENT"),
    })?;
    let ctx = SpecContext::new(spec, Some(url));
    // Checked for every scheme, also those that never log in, so an inline
    // password is refused before anything could echo the URL.
    ctx.password()?;
    let scheme = ctx.url().scheme().to_ascii_lowercase();
    let (kind, probe): (&'static str, Box<dyn Probe>) = match scheme.as_str() {
        "postgresql" | "postgres" => ("postgresql", crate::postgres::build(&ctx)?),
        "http" | "https" => ("http", crate::http::build(&ctx)?),
        "smtp" | "smtps" => ("smtp", crate::smtp::build(&ctx)?),
        "imap" | "imaps" => ("imap", crate::imap::build(&ctx)?),
        "pop3" | "pop3s" => ("pop3", crate::pop3::build(&ctx)?),
        "ftp" => ("ftp", crate::ftp::build(&ctx)?),
        "oracle" => ("oracle", crate::oracle::build(&ctx)?),
        "tcp" => ("tcp", crate::tcp::build(&ctx)?),
        "process" => ("process", crate::process::build(&ctx)?),
        other => {
            return Err(SpecError::UnknownScheme { scheme: other.to_string(), known: SCHEMES.join(", ") });
        }
    };
    ctx.finish(kind)?;
    Ok(probe)
}

/// The URL with any password replaced by `***`, for messages.
pub fn redact_url(url: &Url) -> String {
    let mut u = url.clone();
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    u.to_string()
}

/// Decodes `%XX` escapes (URL user names, process names); malformed escapes stay as written.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(target: &str) -> ProbeSpec {
        ProbeSpec { target: target.into(), ..Default::default() }
    }

    #[test]
    fn unknown_scheme_lists_known_ones() {
        let e = build_probe(&spec("gopher://x")).unwrap_err().to_string();
        assert!(e.contains("gopher") && e.contains("postgresql"), "{e}");
    }

    #[test]
    fn inline_password_is_refused_and_not_echoed() {
        let s = spec("tcp://user:hunter2@localhost:1");
        let url = Url::parse(&s.target).unwrap();
        let ctx = SpecContext::new(&s, Some(url));
        let e = ctx.password().unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn leftover_options_are_reported() {
        let mut s = spec("tcp://localhost:1");
        s.options.insert("bogus".into(), "1".into());
        let e = build_probe(&s).unwrap_err().to_string();
        assert!(e.contains("bogus") && e.contains("tcp"), "{e}");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%40b"), "a@b");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("x%"), "x%");
    }
}
