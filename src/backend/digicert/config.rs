//! DigiCert Trust Lifecycle Manager's configuration (`backend.type: digicert`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::validate::{FieldError, Problems, Shared, empty_as_none};

/// The DigiCert Trust Lifecycle Manager (DigiCert ONE) backend: every certificate is one
/// REST enrollment (`POST /mpki/api/v1/certificate`), see docs/digicert.md. Like the other
/// backends it holds no secret itself: the API key is read from a file or the environment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DigicertConfig {
    /// DigiCert ONE base URL, without the API path (`/mpki/api/v1` is appended). With a
    /// client certificate this is usually `https://clientauth.one.digicert.com`.
    pub base_url: String,
    pub auth: DigicertAuthConfig,
    /// Roots (PEM) for DigiCert's own TLS certificate. Default: the public web roots.
    #[serde(deserialize_with = "empty_as_none")]
    pub ca_file: Option<PathBuf>,
    /// Trust Lifecycle Manager certificate profile that enrolls workload certificates.
    pub profile_id: String,
    pub seat: DigicertSeatConfig,
    /// Unit of the `validity` sent with each enrollment; the requested TTL is rounded DOWN
    /// to whole units, with a minimum of one unit.
    pub validity_unit: DigicertValidityUnit,
    /// Budget for one certificate: rate-limit wait, the enrollment with its retries and the
    /// pickup polling. Must be below `server.requestTimeout`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// First wait before polling a PENDING enrollment; doubles up to `pollMaxInterval`.
    #[serde(with = "humantime_serde")]
    pub poll_initial_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub poll_max_interval: Duration,
    /// Client-side DigiCert API calls per second (token bucket; enrollments and pickups).
    pub rate_limit: f64,
    /// Calls allowed at once above the steady rate.
    pub rate_burst: u32,
    /// Roots (PEM) the issued chains must chain to: the trust bundle handed to workloads.
    #[serde(deserialize_with = "empty_as_none")]
    pub trust_bundle_file: Option<PathBuf>,
    /// How often `trustBundleFile` is re-read: a root added there is published (and, with
    /// `rotation.followUpstream`, starts a root rotation; docs/root-rotation.md).
    #[serde(with = "humantime_serde")]
    pub trust_bundle_refresh_interval: Duration,
    /// Intermediates (PEM) appended when DigiCert's answer lacks the ones linking the leaf
    /// to a root of `trustBundleFile`.
    #[serde(deserialize_with = "empty_as_none")]
    pub intermediates_file: Option<PathBuf>,
}

impl Default for DigicertConfig {
    fn default() -> Self {
        Self {
            base_url: DIGICERT_DEFAULT_BASE_URL.into(),
            auth: DigicertAuthConfig::default(),
            ca_file: None,
            profile_id: String::new(),
            seat: DigicertSeatConfig::default(),
            validity_unit: DigicertValidityUnit::Hours,
            request_timeout: Duration::from_secs(5),
            poll_initial_interval: Duration::from_millis(250),
            poll_max_interval: Duration::from_secs(2),
            rate_limit: 10.0,
            rate_burst: 20,
            trust_bundle_file: None,
            trust_bundle_refresh_interval: Duration::from_secs(60),
            intermediates_file: None,
        }
    }
}

pub const DIGICERT_DEFAULT_BASE_URL: &str = "https://one.digicert.com";

/// How the bridge authenticates to DigiCert: exactly one of an API key (file or
/// environment variable, sent as `x-api-key`) or a client certificate (mutual TLS).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DigicertAuthConfig {
    /// File holding the API key (surrounding whitespace and the trailing newline are
    /// trimmed); re-read at every call, so a rotated key is picked up.
    #[serde(deserialize_with = "empty_as_none")]
    pub api_key_file: Option<PathBuf>,
    /// Name of the environment variable holding the API key.
    #[serde(deserialize_with = "empty_as_none")]
    pub api_key_env: Option<String>,
    /// Client certificate chain and key (PEM) for DigiCert's mTLS host.
    #[serde(deserialize_with = "empty_as_none")]
    pub client_cert_file: Option<PathBuf>,
    #[serde(deserialize_with = "empty_as_none")]
    pub client_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DigicertSeatConfig {
    pub strategy: DigicertSeatStrategy,
    /// The one shared seat id (`strategy: fixed` only).
    pub id: String,
}

/// Which DigiCert seat an enrollment is counted against (every seat is a license).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DigicertSeatStrategy {
    /// seat_id = the workload's SPIFFE ID (a serving certificate: its first DNS name): one
    /// licensed seat per identity, and DigiCert's inventory shows every identity.
    #[default]
    SpiffeId,
    /// Every enrollment uses `seat.id`: one seat, no per-identity inventory in DigiCert.
    Fixed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DigicertValidityUnit {
    Hours,
    Days,
}

impl DigicertValidityUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            DigicertValidityUnit::Hours => "hours",
            DigicertValidityUnit::Days => "days",
        }
    }

    /// One unit, in seconds.
    pub fn seconds(self) -> u64 {
        match self {
            DigicertValidityUnit::Hours => 3600,
            DigicertValidityUnit::Days => 86400,
        }
    }

    /// The validity duration sent for `ttl`: whole units rounded down, at least one.
    pub fn duration_for(self, ttl: Duration) -> u64 {
        (ttl.as_secs() / self.seconds()).max(1)
    }
}

impl DigicertConfig {
    /// The API root, `<baseUrl>/mpki/api/v1`.
    pub fn api_url(&self) -> String {
        format!("{}/mpki/api/v1", self.base_url.trim_end_matches('/'))
    }

    /// Problems, with fields relative to `backend`.
    pub fn problems(&self, shared: &Shared) -> Vec<FieldError> {
        let mut p = Problems::new();
        match reqwest::Url::parse(&self.base_url) {
            Ok(u) if u.scheme() == "https" && u.host().is_some() => {
                if u.path() != "/" && !u.path().is_empty() {
                    p.push(
                        "baseUrl",
                        "give the base URL only; /mpki/api/v1 is appended by the bridge",
                    );
                }
            }
            _ => p.push(
                "baseUrl",
                format!(
                    "{:?} is not an https URL (the API key must not travel in clear)",
                    self.base_url
                ),
            ),
        }
        let a = &self.auth;
        let modes = [
            a.api_key_file.is_some(),
            a.api_key_env.is_some(),
            a.client_cert_file.is_some() || a.client_key_file.is_some(),
        ];
        if modes.iter().filter(|m| **m).count() != 1 {
            p.push(
                "auth",
                "set exactly one of apiKeyFile, apiKeyEnv or clientCertFile + clientKeyFile",
            );
        }
        if a.client_cert_file.is_some() != a.client_key_file.is_some() {
            p.push(
                "auth.clientKeyFile",
                "clientCertFile and clientKeyFile must be set together",
            );
        }
        if let Some(e) = &a.api_key_env {
            p.env_name("auth.apiKeyEnv", e);
        }
        if self.profile_id.trim().is_empty() {
            p.push(
                "profileId",
                "required: the certificate profile to enroll with",
            );
        }
        match self.seat.strategy {
            DigicertSeatStrategy::Fixed if self.seat.id.trim().is_empty() => {
                p.push("seat.id", "required when seat.strategy is fixed")
            }
            DigicertSeatStrategy::SpiffeId if !self.seat.id.is_empty() => p.push(
                "seat.id",
                "only used with seat.strategy: fixed (spiffeId derives the seat per identity)",
            ),
            _ => {}
        }
        p.at_least(
            "requestTimeout",
            self.request_timeout,
            Duration::from_secs(1),
            "1s",
        );
        p.positive("pollInitialInterval", self.poll_initial_interval);
        if self.poll_max_interval < self.poll_initial_interval {
            p.push("pollMaxInterval", "must be at least pollInitialInterval");
        }
        p.rate_limit("rateLimit", self.rate_limit, "rateBurst", self.rate_burst);
        if self.trust_bundle_file.is_none() {
            p.push(
                "trustBundleFile",
                "required: the root(s) DigiCert's chains must chain to",
            );
        }
        p.at_least(
            "trustBundleRefreshInterval",
            self.trust_bundle_refresh_interval,
            Duration::from_secs(1),
            "1s",
        );
        p.below_request_timeout("requestTimeout", self.request_timeout, shared);
        p.into_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{backend_problems, section};

    #[test]
    fn validity_rounds_down_with_a_minimum_of_one_unit() {
        let h = DigicertValidityUnit::Hours;
        let d = DigicertValidityUnit::Days;
        assert_eq!(h.duration_for(Duration::from_secs(24 * 3600)), 24);
        assert_eq!(h.duration_for(Duration::from_secs(3600 + 3599)), 1);
        assert_eq!(h.duration_for(Duration::from_secs(600)), 1);
        assert_eq!(d.duration_for(Duration::from_secs(24 * 3600)), 1);
        assert_eq!(d.duration_for(Duration::from_secs(47 * 3600)), 1);
        assert_eq!(d.duration_for(Duration::from_secs(3600)), 1);
        assert_eq!(d.duration_for(Duration::from_secs(90 * 86400)), 90);
    }

    #[test]
    fn digicert_backend_defaults_and_validation_names_fields() {
        // The `backend` section as the top-level parser reads it, and its problems.
        let parse = |yaml: &str| section::<DigicertConfig>(yaml, "backend", "type");
        let validate = |cfg: &DigicertConfig| backend_problems(cfg.problems(&Shared::default()));
        let ok = "backend:\n  type: digicert\n  auth: {apiKeyFile: /k}\n  profileId: p1\n  trustBundleFile: /r.pem\n";
        let cfg = parse(ok).unwrap();
        let d = &cfg;
        assert_eq!(d.base_url, DIGICERT_DEFAULT_BASE_URL);
        assert_eq!(d.api_url(), "https://one.digicert.com/mpki/api/v1");
        assert_eq!(d.seat.strategy, DigicertSeatStrategy::SpiffeId);
        assert_eq!(d.validity_unit, DigicertValidityUnit::Hours);
        assert_eq!(d.request_timeout, Duration::from_secs(5));
        assert_eq!(d.poll_initial_interval, Duration::from_millis(250));
        assert_eq!((d.rate_limit, d.rate_burst), (10.0, 20));
        assert!(validate(&cfg).is_ok(), "{:?}", validate(&cfg));
        // Empty strings (what a chart renders for unset values) mean unset.
        let cfg = parse(&format!(
            "{ok}  intermediatesFile: \"\"\n  caFile: \"\"\n  seat: {{strategy: spiffeId, id: \"\"}}\n"
        ))
        .unwrap();
        let d = &cfg;
        assert!(d.intermediates_file.is_none() && d.ca_file.is_none());
        assert!(validate(&cfg).is_ok());

        let (field, msg) = parse("backend:\n  type: digicert\n  profileID: x\n").unwrap_err();
        assert!(field.starts_with("backend"), "{field}");
        assert!(msg.contains("profileID"), "{msg}");

        let fields = |yaml: &str| -> Vec<String> {
            validate(&parse(yaml).unwrap())
                .unwrap_err()
                .into_iter()
                .map(|e| e.field)
                .collect()
        };
        // Missing profileId and trust bundle; both apiKeyFile and apiKeyEnv.
        let f = fields("backend:\n  type: digicert\n  auth: {apiKeyFile: /k, apiKeyEnv: K}\n");
        for want in [
            "backend.profileId",
            "backend.trustBundleFile",
            "backend.auth",
        ] {
            assert!(f.iter().any(|x| x == want), "{want} missing from {f:?}");
        }
        // No credentials at all; half a client certificate.
        let f = fields(&ok.replace("auth: {apiKeyFile: /k}", "auth: {}"));
        assert_eq!(f, ["backend.auth"]);
        let f = fields(&ok.replace("auth: {apiKeyFile: /k}", "auth: {clientCertFile: /c}"));
        assert_eq!(f, ["backend.auth.clientKeyFile"]);
        // mTLS alone is fine.
        let cfg = parse(&ok.replace(
            "auth: {apiKeyFile: /k}",
            "auth: {clientCertFile: /c, clientKeyFile: /k}\n  baseUrl: https://clientauth.one.digicert.com",
        ))
        .unwrap();
        assert!(validate(&cfg).is_ok());
        // Seats.
        assert_eq!(
            fields(&format!("{ok}  seat: {{strategy: fixed}}\n")),
            ["backend.seat.id"]
        );
        assert_eq!(
            fields(&format!("{ok}  seat: {{id: s1}}\n")),
            ["backend.seat.id"]
        );
        assert!(
            validate(&parse(&format!("{ok}  seat: {{strategy: fixed, id: s1}}\n")).unwrap())
                .is_ok()
        );
        assert!(parse(&format!("{ok}  seat: {{strategy: perNode}}\n")).is_err());
        assert!(parse(&format!("{ok}  validityUnit: weeks\n")).is_err());
        // Timeouts, polling, limits, URL.
        let f = fields(&format!(
            "{ok}  requestTimeout: 10s\n  pollInitialInterval: 3s\n  pollMaxInterval: 1s\n  rateLimit: 0\n  rateBurst: 0\n  baseUrl: http://one.digicert.com/mpki/api/v1\n"
        ));
        for want in [
            "backend.requestTimeout",
            "backend.pollMaxInterval",
            "backend.rateLimit",
            "backend.rateBurst",
            "backend.baseUrl",
        ] {
            assert!(f.iter().any(|x| x == want), "{want} missing from {f:?}");
        }
        let errs = validate(&parse(&format!("{ok}  requestTimeout: 10s\n")).unwrap()).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].message.contains("server.requestTimeout"),
            "{errs:?}"
        );
        assert_eq!(
            fields(&format!(
                "{ok}  baseUrl: https://one.digicert.com/mpki/api/v1\n"
            )),
            ["backend.baseUrl"]
        );
    }
}
