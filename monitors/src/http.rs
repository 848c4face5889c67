//! HTTP/HTTPS probe: `http://HOST[:PORT]/PATH` or `https://…`.
//!
//! A user in the URL (`http://USER@HOST/…`) turns on HTTP basic
//! authentication with the password from the spec's password source.
//!
//! Options: `method` (GET), `expect` (status set, default `200-399`),
//! `body_regex`, `follow_redirects` (false), `header` (`Name: value`, several
//! separated by newlines), `max_body` (bytes read at most, default 1 MiB),
//! and the TLS options `ca_file` / `insecure`.
//!
//! The client is built once per probe. Idle connections are never kept
//! (`pool_max_idle_per_host(0)`): every check opens a fresh connection, so a
//! server that stopped accepting connections cannot hide behind a pooled
//! keep-alive socket, and the TLS handshake is verified every time.

use std::error::Error as StdError;
use std::io;

use regex::bytes::Regex;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, Method, Url};

use crate::spec::{SpecContext, SpecError};
use crate::tls::TlsOptions;
use crate::{CheckFuture, Deadline, FailureClass, Probe, ProbeFailure, ProbeSuccess, Secret};

/// Default cap on the body bytes read per check.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// At most this many redirects are followed with `follow_redirects=true`.
pub const MAX_REDIRECTS: usize = 10;

/// A set of accepted HTTP status codes, e.g. `200,204,301-302`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSet(Vec<(u16, u16)>);

impl StatusSet {
    /// Parses `CODE` / `LOW-HIGH` items separated by commas.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut ranges = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (lo, hi) = match item.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (item, item),
            };
            let code = |x: &str| match x.parse::<u16>() {
                Ok(c) if (100..=599).contains(&c) => Ok(c),
                _ => Err(format!("{x:?} is not an HTTP status code (100-599)")),
            };
            let (lo, hi) = (code(lo)?, code(hi)?);
            if lo > hi {
                return Err(format!("range {item:?} is empty"));
            }
            ranges.push((lo, hi));
        }
        if ranges.is_empty() {
            return Err("expected status codes such as 200,204,301-302".into());
        }
        Ok(Self(ranges))
    }

    /// Whether `code` is in the set.
    pub fn contains(&self, code: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&code))
    }
}

impl std::fmt::Display for StatusSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let items: Vec<String> =
            self.0.iter().map(|&(lo, hi)| if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") }).collect();
        f.write_str(&items.join(","))
    }
}

/// An HTTP(S) probe.
#[derive(Debug)]
pub struct HttpProbe {
    url: Url,
    method: Method,
    expect: StatusSet,
    body_regex: Option<Regex>,
    max_body: usize,
    /// HTTP basic authentication: user and password.
    auth: Option<(String, Option<Secret>)>,
    client: Client,
}

fn bad(key: &str, value: &str, why: impl Into<String>) -> SpecError {
    SpecError::BadOption { key: key.into(), value: value.into(), why: why.into() }
}

/// Builds an [`HttpProbe`] from a spec.
pub fn build(ctx: &SpecContext<'_>) -> Result<Box<dyn Probe>, SpecError> {
    ctx.host()?;
    // Credentials: the user from the URL, the password only from the
    // spec's password source (ctx.password() refuses one inline in the URL).
    let password = ctx.password()?;
    let auth = match (ctx.user(), password) {
        (Some(user), password) => Some((user, password)),
        (None, None) => None,
        (None, Some(_)) => {
            return Err(SpecError::Missing(format!(
                "{}: a password source is set but the URL names no user (http://USER@HOST/…)",
                ctx.url()
            )));
        }
    };
    let mut url = ctx.url().clone();
    // The user travels in the Authorization header, not the request URL.
    let _ = url.set_username("");
    let method = match ctx.opt("method") {
        None => Method::GET,
        Some(m) => {
            Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|e| bad("method", &m, e.to_string()))?
        }
    };
    let expect = match ctx.opt("expect") {
        None => StatusSet(vec![(200, 399)]),
        Some(v) => StatusSet::parse(&v).map_err(|why| bad("expect", &v, why))?,
    };
    let body_regex = match ctx.opt("body_regex") {
        None => None,
        Some(r) => Some(Regex::new(&r).map_err(|e| bad("body_regex", &r, e.to_string()))?),
    };
    let max_body = ctx.opt_parse::<usize>("max_body")?.unwrap_or(DEFAULT_MAX_BODY);
    let follow = ctx.opt_bool("follow_redirects", false)?;
    let mut headers = HeaderMap::new();
    if let Some(h) = ctx.opt("header") {
        for line in h.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (k, v) = line.split_once(':').ok_or_else(|| bad("header", line, "expected `Name: value`"))?;
            let name = HeaderName::from_bytes(k.trim().as_bytes()).map_err(|e| bad("header", line, e.to_string()))?;
            let value = HeaderValue::from_str(v.trim()).map_err(|e| bad("header", line, e.to_string()))?;
            headers.append(name, value);
        }
    }
    let tls = TlsOptions::from_spec(ctx)?;
    if let Some(name) = &tls.server_name {
        return Err(bad("tls_server_name", name, "not supported by the http probe: put the name in the URL"));
    }
    let tls_config = (*tls.client_config()?).clone();
    let client = Client::builder()
        .use_preconfigured_tls(tls_config)
        .redirect(if follow {
            reqwest::redirect::Policy::limited(MAX_REDIRECTS)
        } else {
            reqwest::redirect::Policy::none()
        })
        .pool_max_idle_per_host(0)
        // A monitor checks the server itself, not whatever proxy the
        // environment of the agent happens to name.
        .no_proxy()
        .default_headers(headers)
        .user_agent(concat!("tandem-monitor/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| SpecError::Missing(format!("cannot build the HTTP client: {e}")))?;
    Ok(Box::new(HttpProbe { url, method, expect, body_regex, max_body, auth, client }))
}

impl HttpProbe {
    async fn run(&self, deadline: Deadline) -> Result<ProbeSuccess, ProbeFailure> {
        let mut req = self.client.request(self.method.clone(), self.url.clone());
        if let Some((user, password)) = &self.auth {
            req = req.basic_auth(user, password.as_ref().map(Secret::expose));
        }
        let mut resp = deadline
            .run("waiting for the response headers", req.send())
            .await?
            .map_err(|e| classify(&e, "sending the request"))?;
        let status = resp.status();
        let code = status.as_u16();
        let final_url = resp.url().clone();
        let mut body = Vec::new();
        let mut truncated = false;
        while !truncated {
            let chunk = deadline
                .run(&format!("reading the body of the {code} response"), resp.chunk())
                .await?
                .map_err(|e| classify(&e, "reading the body"))?;
            let Some(chunk) = chunk else { break };
            let room = self.max_body - body.len();
            if chunk.len() > room {
                truncated = true;
            }
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        // Dropping `resp` with unread body closes the connection; with the
        // idle pool disabled nothing is kept anyway.
        drop(resp);
        let redirected =
            if final_url != self.url { format!(" (after redirects to {final_url})") } else { String::new() };
        if !self.expect.contains(code) {
            return Err(ProbeFailure::critical(
                FailureClass::UnexpectedAnswer,
                format!("HTTP {status}{redirected}, expected status {}", self.expect),
            ));
        }
        let mut what = format!("HTTP {status}{redirected}, {} bytes{}", body.len(), if truncated { "+" } else { "" });
        if let Some(re) = &self.body_regex {
            if !re.is_match(&body) {
                let scope = if truncated {
                    format!("the first {} bytes of the body do not match", self.max_body)
                } else {
                    "the body does not match".to_string()
                };
                return Err(ProbeFailure::critical(
                    FailureClass::UnexpectedAnswer,
                    format!("HTTP {status}: {scope} /{}/", re.as_str()),
                ));
            }
            what.push_str(&format!(", body matches /{}/", re.as_str()));
        }
        Ok(ProbeSuccess::new(what))
    }
}

/// Classifies a reqwest error by walking its source chain.
fn classify(e: &reqwest::Error, stage: &str) -> ProbeFailure {
    let mut chain = Vec::new();
    let mut tls = false;
    let mut io_kind = None;
    let mut src: Option<&(dyn StdError + 'static)> = e.source();
    while let Some(s) = src {
        chain.push(s.to_string());
        if s.downcast_ref::<rustls::Error>().is_some() {
            tls = true;
        }
        // tokio-rustls reports TLS alerts and verification failures as
        // io::Error(InvalidData) wrapping a rustls::Error, which hyper-rustls
        // wraps in another io::Error; io::Error::source() skips the wrapped
        // error itself, so unwrap the layers by hand.
        let mut inner = s.downcast_ref::<io::Error>();
        while let Some(ioe) = inner {
            io_kind.get_or_insert(ioe.kind());
            let wrapped = ioe.get_ref();
            if wrapped.is_some_and(|w| w.downcast_ref::<rustls::Error>().is_some()) {
                tls = true;
            }
            inner = wrapped.and_then(|w| w.downcast_ref::<io::Error>());
        }
        src = s.source();
    }
    // Nested errors often repeat their sources' text; keep distinct parts.
    chain.dedup();
    let detail = if chain.is_empty() { String::new() } else { format!(": {}", chain.join(": ")) };
    let class = if tls {
        FailureClass::Tls
    } else if io_kind == Some(io::ErrorKind::ConnectionRefused) {
        FailureClass::Refused
    } else if e.is_timeout() || io_kind == Some(io::ErrorKind::TimedOut) {
        FailureClass::Timeout
    } else if e.is_connect() {
        if chain.iter().any(|c| c.contains("dns error") || c.contains("failed to lookup address")) {
            FailureClass::Resolve
        } else {
            FailureClass::Io
        }
    } else if e.is_redirect() {
        FailureClass::UnexpectedAnswer
    } else {
        // Connected, but the answer was not HTTP (garbage, truncated, reset).
        FailureClass::Protocol
    };
    ProbeFailure::critical(class, format!("{stage}: {e}{detail}"))
}

impl Probe for HttpProbe {
    fn kind(&self) -> &'static str {
        "http"
    }

    fn target(&self) -> String {
        match &self.auth {
            Some((user, _)) => format!("{} {} (as {user})", self.method, self.url),
            None => format!("{} {}", self.method, self.url),
        }
    }

    fn check<'a>(&'a self, deadline: Deadline) -> CheckFuture<'a> {
        Box::pin(self.run(deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_sets() {
        let s = StatusSet::parse("200,204, 301-302").unwrap();
        assert!(s.contains(200) && s.contains(204) && s.contains(301) && s.contains(302));
        assert!(!s.contains(201) && !s.contains(303) && !s.contains(500));
        assert_eq!(s.to_string(), "200,204,301-302");
        for bad in ["", "abc", "99", "600", "302-301", "200-"] {
            assert!(StatusSet::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
