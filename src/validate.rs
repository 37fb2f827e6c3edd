//! The vocabulary every configuration section validates with.
//!
//! Each section (server, authn, each backend, ...) owns its config type and a
//! `problems()` that returns [`FieldError`]s with paths relative to the section; the
//! top-level [`crate::config::Config::validate`] prefixes them with the section's name and
//! collects them all. The checks that several sections share (durations, rate limits,
//! URLs, names) are the small functions here, so a given mistake reads the same wherever
//! it is made. This module sits at the bottom: it imports nothing of the crate but
//! [`crate::identity`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::identity::normalize_trust_domain;

/// One validation failure, naming the field by its YAML path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Collects a section's problems, with field paths relative to the section.
#[derive(Debug, Default)]
pub struct Problems(Vec<FieldError>);

impl Problems {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    /// Adds a sub-section's problems under `prefix` (`prefix.field`; a problem of the
    /// sub-section as a whole, with an empty field, is named `prefix`).
    pub fn nest(&mut self, prefix: &str, errs: Vec<FieldError>) {
        self.0.extend(errs.into_iter().map(|e| FieldError {
            field: if e.field.is_empty() {
                prefix.to_string()
            } else {
                format!("{prefix}.{}", e.field)
            },
            message: e.message,
        }));
    }

    /// `d` must be at least `min` (written `min_text` in the message, e.g. "1s").
    pub fn at_least(&mut self, field: &str, d: Duration, min: Duration, min_text: &str) {
        if d < min {
            self.push(field, format!("must be at least {min_text}"));
        }
    }

    /// `d` must not be zero.
    pub fn positive(&mut self, field: &str, d: Duration) {
        if d.is_zero() {
            self.push(field, "must be > 0");
        }
    }

    /// A remote backend's budget for one certificate must end before the whole call's, so
    /// callers get the backend's RESOURCE_EXHAUSTED / UNAVAILABLE rather than a timeout.
    pub fn below_request_timeout(&mut self, field: &str, d: Duration, shared: &Shared) {
        if d >= shared.request_timeout {
            self.push(
                field,
                "must be below server.requestTimeout (callers then get the backend's \
                 RESOURCE_EXHAUSTED / UNAVAILABLE instead of a generic timeout)",
            );
        }
    }

    /// A client-side token bucket: a finite rate above zero and a burst of at least one.
    pub fn rate_limit(&mut self, rate_field: &str, rate: f64, burst_field: &str, burst: u32) {
        if !(rate > 0.0 && rate.is_finite()) {
            self.push(rate_field, "must be > 0");
        }
        if burst == 0 {
            self.push(burst_field, "must be at least 1");
        }
    }

    /// An environment variable name given in the config.
    pub fn env_name(&mut self, field: &str, name: &str) {
        if name.is_empty() || name.contains('=') {
            self.push(
                field,
                format!("{name:?} is not an environment variable name"),
            );
        }
    }

    pub fn into_vec(self) -> Vec<FieldError> {
        self.0
    }
}

/// What a section's checks may need from the rest of the config.
#[derive(Debug, Clone, Copy)]
pub struct Shared {
    /// `server.requestTimeout`: the bound on one CreateCertificate call.
    pub request_timeout: Duration,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// A trust domain must be written in its normalized form.
pub fn check_trust_domain(td: &str) -> Result<(), String> {
    match normalize_trust_domain(td) {
        Ok(n) if n == td => Ok(()),
        Ok(n) => Err(format!("write the normalized form {n:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// A DNS name (RFC 1123 labels) or an IP literal.
pub fn valid_dns_or_ip(n: &str) -> bool {
    if n.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// An empty string (what templating tools render for an unset value) means "not set".
pub fn empty_as_none<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: From<String>,
{
    let s: Option<String> = Option::deserialize(d)?;
    Ok(s.filter(|s| !s.is_empty()).map(T::from))
}

/// A secret value (token, API key). Its `Debug` and `Serialize` never show the value.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// Parses YAML into `T`; on error returns (field path, message). Every config file and
/// every section test goes through this, so errors name fields the same way.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, (String, String)> {
    let de = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let field = match field.as_str() {
            "." => "(top level)".to_string(),
            "?" | "" => "(YAML syntax)".to_string(),
            _ => field,
        };
        (field, e.into_inner().to_string())
    })
}

/// Section tests: parses the `section` mapping of a whole-config YAML document as `T`
/// (dropping `drop`, e.g. the backend's `type` tag) and returns it with its problems,
/// named as the top-level validation names them (`section.field`).
#[cfg(test)]
pub fn section<T: serde::de::DeserializeOwned>(
    yaml: &str,
    section: &str,
    drop: &str,
) -> Result<T, (String, String)> {
    let mut doc: serde_norway::Value = serde_norway::from_str(yaml).expect("test YAML");
    let mut inner = doc
        .get_mut(section)
        .map(std::mem::take)
        .unwrap_or(serde_norway::Value::Null);
    if let Some(m) = inner.as_mapping_mut() {
        m.remove(drop);
    }
    let text = serde_norway::to_string(&inner).expect("re-serialize");
    parse_yaml::<T>(&text).map_err(|(f, m)| (format!("{section}.{f}"), m))
}

/// Section tests: `errs` named as the top-level validation names them.
#[cfg(test)]
pub fn prefixed(section: &str, errs: Vec<FieldError>) -> Vec<FieldError> {
    let mut p = Problems::new();
    p.nest(section, errs);
    p.into_vec()
}

/// Backend config tests: the `backend` section of a whole config (its `type` tag
/// dropped), as the top-level parser reads it.
#[cfg(test)]
pub fn backend_section<T: serde::de::DeserializeOwned>(yaml: &str) -> Result<T, (String, String)> {
    section(yaml, "backend", "type")
}

/// Backend section tests: a backend's problems named as the top-level validation names
/// them (`backend.field`); `Ok` when there are none.
#[cfg(test)]
pub fn backend_problems(errs: Vec<FieldError>) -> Result<(), Vec<FieldError>> {
    let errs = prefixed("backend", errs);
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_redacted() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"<redacted>\"");
    }
}
