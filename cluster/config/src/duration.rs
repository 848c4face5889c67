//! Durations in the configuration: a number of seconds (`5`, `1.5`) or a
//! string with units (`"1.5s"`, `"500ms"`, `"2m"`, `"1h30m"`).
//!
//! Both forms are accepted so that short timeouts read naturally
//! (`"300ms"`) and plain numbers still work; written back, a duration is
//! always a string in the largest unit that keeps it exact.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

/// What a duration looks like, for messages.
pub const DURATION_HINT: &str =
    "expected seconds as a number (5, 1.5) or a string with units such as \"1.5s\", \"500ms\", \"2m\", \"1h30m\"";

/// Parses `"1.5s"`, `"500ms"`, `"2m"`, `"1h30m"`, `"250us"`, `"10ns"` or a bare
/// number of seconds (`"3"`).
pub fn parse(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let bad = || format!("invalid duration {text:?}: {DURATION_HINT}");
    if s.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = s.parse::<f64>() {
        return from_secs(secs).ok_or_else(bad);
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        if num_len == 0 {
            return Err(bad());
        }
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "h" => 3600.0,
            "m" | "min" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad()),
        };
        let value: f64 = num.parse().map_err(|_| bad())?;
        total = total.checked_add(from_secs(value * scale).ok_or_else(bad)?).ok_or_else(bad)?;
        rest = tail.trim_start();
    }
    Ok(total)
}

fn from_secs(secs: f64) -> Option<Duration> {
    if secs.is_finite() && secs >= 0.0 { Duration::try_from_secs_f64(secs).ok() } else { None }
}

/// Formats a duration the way [`parse`] reads it back exactly.
pub fn format(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        "0s".to_string()
    } else if nanos % 1_000_000_000 == 0 {
        let secs = d.as_secs();
        let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
        let mut out = String::new();
        for (n, unit) in [(h, "h"), (m, "m"), (s, "s")] {
            if n > 0 {
                out.push_str(&format!("{n}{unit}"));
            }
        }
        out
    } else if nanos % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else if nanos % 1_000 == 0 {
        format!("{}us", d.as_micros())
    } else {
        format!("{nanos}ns")
    }
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration: seconds as a number (5, 1.5) or a string such as \"1.5s\", \"500ms\", \"2m\"")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        u64::try_from(v).map(Duration::from_secs).map_err(|_| E::custom(format!("duration {v} is negative")))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        Ok(Duration::from_secs(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        from_secs(v).ok_or_else(|| E::custom(format!("invalid duration {v}: {DURATION_HINT}")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        parse(v).map_err(E::custom)
    }
}

/// `#[serde(with = "duration")]` for a [`Duration`] field.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

/// `#[serde(with = "duration")]` for a [`Duration`] field.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor)
}

/// `#[serde(with = "duration::option")]` for an `Option<Duration>` field.
pub mod option {
    use super::*;

    /// Writes `Some` as a duration string (fields using this skip `None`).
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    /// A present value is a duration; absence is handled by `#[serde(default)]`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::deserialize(d).map(Some)
    }
}

/// The JSON Schema of a duration (`#[schemars(with = "DurationSchema")]`).
#[derive(Debug)]
pub struct DurationSchema;

impl JsonSchema for DurationSchema {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Seconds as a number (5, 1.5) or a string with units: \"1.5s\", \"500ms\", \"2m\", \"1h30m\".",
            "oneOf": [
                { "type": "number", "minimum": 0 },
                { "type": "string", "pattern": "^\\s*([0-9]+(\\.[0-9]*)?|\\.[0-9]+)\\s*((h|m|min|s|ms|us|µs|ns)\\s*(([0-9]+(\\.[0-9]*)?|\\.[0-9]+)(h|m|min|s|ms|us|µs|ns)\\s*)*)?$" }
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_numbers_and_units() {
        assert_eq!(parse("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("250us").unwrap(), Duration::from_micros(250));
        for bad in ["", "s", "5x", "-1s", "1.5.5s", "ms5", "1h-3m", "inf", "NaN"] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn format_round_trips() {
        for d in [0, 1, 999, 1_000, 1_500_000, 1_000_000_000, 90_000_000_000, 1_234_567_891, 5_430_000_000_000] {
            let d = Duration::from_nanos(d);
            assert_eq!(parse(&format(d)).unwrap(), d, "{}", format(d));
        }
        assert_eq!(format(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format(Duration::from_secs(30)), "30s");
        assert_eq!(format(Duration::from_secs(600)), "10m");
        assert_eq!(format(Duration::from_secs(5430)), "1h30m30s");
    }
}
