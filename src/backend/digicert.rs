//! DigiCert Trust Lifecycle Manager (DigiCert ONE) backend: every certificate is one REST
//! enrollment, `POST /mpki/api/v1/certificate`.
//!
//! One request: wait for the client-side token bucket (DigiCert rate limits its API and
//! answers 429), send the CSR with the identity in `attributes.extensions.san` (a SPIFFE URI
//! for workloads, DNS names for serving certificates), the seat, a validity in whole hours
//! or days and `include_ca_chain: true`. DigiCert answers the certificate at once, or
//! `{"status":"PENDING","request_id":..}` when the profile needs approval or issues
//! asynchronously: then `POST /mpki/api/v1/certificate-pickup/<request_id>` is polled with
//! exponential backoff from `pollInitialInterval` to `pollMaxInterval`. Everything happens
//! within `requestTimeout`:
//!
//! - 429 (with `Retry-After` in seconds or as an HTTP date, or without it) is retried after
//!   that delay (or a jittered backoff) while the budget allows, then [`SignError::Throttled`]
//!   carrying the server's `Retry-After`;
//! - 401/403 are [`SignError::Unavailable`], logged loudly (the cause, never the key), and
//!   flip readiness until a later call succeeds (a background `GET /hello` every few
//!   seconds notices a fixed key even without traffic);
//! - other 4xx are [`SignError::Rejected`] with DigiCert's `errors[].message` logged;
//! - 502/503/504 and refused connections are retried (nothing was enrolled); other 5xx,
//!   timeouts and broken answers are [`SignError::Unavailable`] without a retry, because an
//!   enrollment that may have succeeded must not be sent twice (DigiCert documents no
//!   idempotency key). Pickups are idempotent and retried on any transient failure.
//!
//! What comes back is checked: the leaf parses, certifies the CSR's public key, carries
//! exactly the requested names and is not a CA; the chain is assembled by issuer names from
//! DigiCert's answer and the configured intermediates up to a root of `trustBundleFile`.
//! The signature check of that chain is left to the server's pre-answer check
//! (`server::chain`), which runs on every issued chain.

mod config;

pub use config::*;

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use reqwest::StatusCode;
use rustls_pki_types::CertificateDer;
use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Instant;
use x509_parser::prelude::*;

use super::remote::{TokenBucket, backoff};
use super::{
    Authority, Health, IssuedChain, SignError, SignRequest, Signer, SigningCaInfo, Subject,
};
use crate::metrics::Metrics;
use crate::pki;
use crate::trust::{SharedBundle, TrustBundle};

const KIND: &str = "digicert";
/// While DigiCert refuses the credentials, how often `GET /hello` checks whether they work
/// again (so readiness recovers without traffic).
const DENIED_PROBE_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DigicertError {
    #[error("{0}")]
    Config(String),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

fn file_err(path: &std::path::Path, message: impl ToString) -> DigicertError {
    DigicertError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Where the API key comes from; read at every call so a rotated key is picked up.
enum ApiKey {
    File(PathBuf),
    Env(String),
}

impl ApiKey {
    fn read(&self) -> Result<String, String> {
        let raw = match self {
            ApiKey::File(p) => {
                std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?
            }
            ApiKey::Env(name) => {
                std::env::var(name).map_err(|e| format!("environment variable {name}: {e}"))?
            }
        };
        let key = raw.trim();
        if key.is_empty() {
            return Err(match self {
                ApiKey::File(p) => format!("{} is empty", p.display()),
                ApiKey::Env(name) => format!("environment variable {name} is empty"),
            });
        }
        Ok(key.to_string())
    }
}

/// A successful answer of `certificate` or `certificate-pickup`.
#[derive(Debug, Deserialize)]
struct Enrollment {
    #[serde(default)]
    certificate: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    request_id: Option<serde_json::Value>,
    #[serde(default)]
    serial_number: Option<String>,
}

/// DigiCert's error body as its own clients read it (`{"errors":[{"code","message"}]}`);
/// UNVERIFIED against the service, so anything else falls back to the raw text.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    errors: Vec<ErrorItem>,
}

#[derive(Debug, Deserialize)]
struct ErrorItem {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

fn error_text(body: &str) -> String {
    if let Ok(e) = serde_json::from_str::<ErrorBody>(body)
        && !e.errors.is_empty()
    {
        return e
            .errors
            .iter()
            .map(|i| {
                format!(
                    "{}: {}",
                    i.code.as_deref().unwrap_or("error"),
                    i.message.as_deref().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
    }
    let t = body.trim();
    let mut end = t.len().min(300);
    while !t.is_char_boundary(end) {
        end -= 1;
    }
    if t.is_empty() {
        "(empty body)".into()
    } else {
        t[..end].to_string()
    }
}

/// `Retry-After`: delay-seconds or an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// How one failed API call should be handled.
#[derive(Debug)]
enum Failure {
    /// 429: wait (Retry-After or backoff) and retry while the budget allows.
    Throttled {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Nothing happened at DigiCert (or the call is idempotent): retry while the budget allows.
    Transient(String),
    /// Do not retry.
    Final(SignError),
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

struct Shared {
    http: reqwest::Client,
    api: String,
    key: Option<ApiKey>,
    cfg: DigicertConfig,
    bucket: TokenBucket,
    bundle: watch::Sender<SharedBundle>,
    /// Raw subjects of the trust bundle's roots (chain assembly stops at one of them).
    root_subjects: Vec<Vec<u8>>,
    intermediates: Vec<CertificateDer<'static>>,
    /// Why DigiCert refused our credentials, until a call succeeds again.
    denied: Mutex<Option<String>>,
    issuing_ca_not_after: AtomicI64,
    metrics: Arc<Metrics>,
}

pub struct Digicert {
    shared: Arc<Shared>,
}

impl Digicert {
    /// Reads the credentials, TLS material, trust bundle and intermediates; fails at start
    /// with a clear error when any of them is unusable. DigiCert itself is first reached by
    /// the first enrollment (the bridge's serving certificate, in most set-ups).
    pub fn connect(cfg: &DigicertConfig, metrics: Arc<Metrics>) -> Result<Self, DigicertError> {
        let a = &cfg.auth;
        let identity = match (&a.client_cert_file, &a.client_key_file) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        let key = match (&a.api_key_file, &a.api_key_env) {
            (Some(p), _) => Some(ApiKey::File(p.clone())),
            (None, Some(e)) => Some(ApiKey::Env(e.clone())),
            (None, None) => None,
        };
        if let Some(k) = &key {
            k.read()
                .map_err(|e| DigicertError::Config(format!("DigiCert API key: {e}")))?;
        }
        if key.is_none() && identity.is_none() {
            return Err(DigicertError::Config(
                "no DigiCert credentials: set auth.apiKeyFile, auth.apiKeyEnv or a client certificate".into(),
            ));
        }
        let tls = pki::client_tls_config_with_identity(cfg.ca_file.as_deref(), identity)
            .map_err(DigicertError::Config)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(cfg.request_timeout)
            .user_agent(concat!("istio-ca-bridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| DigicertError::Config(error_chain(&e)))?;

        let bundle_path = cfg
            .trust_bundle_file
            .as_deref()
            .ok_or_else(|| DigicertError::Config("backend.trustBundleFile is required".into()))?;
        let text = std::fs::read(bundle_path).map_err(|e| file_err(bundle_path, e))?;
        let bundle = TrustBundle::from_pem(&text).map_err(|e| file_err(bundle_path, e))?;
        let mut root_subjects = Vec::new();
        for r in bundle.roots() {
            let (_, c) = parse_x509_certificate(r).map_err(|e| file_err(bundle_path, e))?;
            root_subjects.push(c.subject().as_raw().to_vec());
        }
        let intermediates = match &cfg.intermediates_file {
            Some(p) => {
                let text = std::fs::read(p).map_err(|e| file_err(p, e))?;
                pki::parse_certs_pem(&text).map_err(|e| file_err(p, e))?
            }
            None => Vec::new(),
        };
        let (bundle_tx, _) = watch::channel(Arc::new(bundle));
        let shared = Arc::new(Shared {
            http,
            api: cfg.api_url(),
            key,
            cfg: cfg.clone(),
            bucket: TokenBucket::new(cfg.rate_limit, cfg.rate_burst),
            bundle: bundle_tx,
            root_subjects,
            intermediates,
            denied: Mutex::new(None),
            issuing_ca_not_after: AtomicI64::new(0),
            metrics,
        });
        spawn_denied_probe(Arc::downgrade(&shared));
        Ok(Self { shared })
    }
}

impl Shared {
    fn count_retry(&self, reason: &str) {
        self.metrics
            .backend_retries
            .with_label_values(&[KIND, reason])
            .inc();
    }

    fn set_denied(&self, why: Option<String>) {
        *self.denied.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::RequestBuilder, SignError> {
        let mut rb = self
            .http
            .request(method, format!("{}/{path}", self.api))
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(k) = &self.key {
            let key = k.read().map_err(|e| {
                tracing::error!(backend = KIND, error = %e, "DigiCert API key unreadable");
                SignError::Unavailable(format!("DigiCert API key: {e}"))
            })?;
            rb = rb.header("x-api-key", key);
        }
        Ok(rb)
    }

    /// One POST with a JSON body, classified. `idempotent`: may a failure after sending be
    /// retried (pickups) or not (enrollments).
    async fn post(
        &self,
        op: &'static str,
        path: &str,
        body: &serde_json::Value,
        idempotent: bool,
        deadline: Instant,
    ) -> Result<Enrollment, Failure> {
        let rb = self
            .request(reqwest::Method::POST, path)
            .map_err(Failure::Final)?
            .json(body);
        let send = async {
            let resp = rb.send().await?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let text = resp.text().await?;
            Ok::<_, reqwest::Error>((status, headers, text))
        };
        let (status, headers, text) = match tokio::time::timeout_at(deadline, send).await {
            Err(_) => {
                return Err(Failure::Final(SignError::Unavailable(format!(
                    "{op}: no answer within requestTimeout"
                ))));
            }
            Ok(Err(e)) if e.is_connect() => {
                return Err(Failure::Transient(format!(
                    "{op}: cannot connect: {}",
                    error_chain(&e)
                )));
            }
            Ok(Err(e)) => {
                let m = format!("{op}: {}", error_chain(&e));
                return Err(if idempotent {
                    Failure::Transient(m)
                } else {
                    Failure::Final(SignError::Unavailable(m))
                });
            }
            Ok(Ok(r)) => r,
        };
        if status.is_success() {
            return serde_json::from_str::<Enrollment>(&text).map_err(|e| {
                Failure::Final(SignError::Internal(format!(
                    "{op}: unreadable answer (HTTP {status}): {e}"
                )))
            });
        }
        let message = format!("{op}: HTTP {status}: {}", error_text(&text));
        Err(match status {
            StatusCode::TOO_MANY_REQUESTS => Failure::Throttled {
                message,
                retry_after: retry_after(&headers),
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                let why = match status {
                    StatusCode::UNAUTHORIZED => "the API key or client certificate is not accepted",
                    _ => "the credentials lack permission for this profile",
                };
                tracing::error!(
                    backend = KIND,
                    status = status.as_u16(),
                    profile = %self.cfg.profile_id,
                    error = %message,
                    "DIGICERT REFUSED THE BRIDGE'S CREDENTIALS: {why}; not ready until a call succeeds"
                );
                self.set_denied(Some(format!("{why} ({message})")));
                Failure::Final(SignError::Unavailable(message))
            }
            StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => Failure::Transient(message),
            s if s.is_server_error() && idempotent => Failure::Transient(message),
            s if s.is_server_error() => Failure::Final(SignError::Unavailable(message)),
            _ => {
                tracing::warn!(backend = KIND, status = status.as_u16(), error = %message, "DigiCert rejected the request");
                Failure::Final(SignError::Rejected(message))
            }
        })
    }

    /// [`Self::post`] behind the rate limiter, retrying throttles and transient failures
    /// while the deadline allows.
    async fn post_with_retries(
        &self,
        op: &'static str,
        path: &str,
        body: &serde_json::Value,
        idempotent: bool,
        deadline: Instant,
    ) -> Result<Enrollment, SignError> {
        // A slot is only worth taking if it leaves time for the call itself.
        let keep = (self.cfg.request_timeout / 4).min(Duration::from_secs(1));
        let mut attempt = 0u32;
        loop {
            self.bucket
                .acquire(deadline, keep, KIND, &self.metrics)
                .await?;
            let failure = match self.post(op, path, body, idempotent, deadline).await {
                Ok(e) => return Ok(e),
                Err(f) => f,
            };
            let (delay, reason, on_deadline) = match failure {
                Failure::Final(e) => return Err(e),
                Failure::Throttled {
                    message,
                    retry_after,
                } => {
                    self.metrics
                        .backend_throttles
                        .with_label_values(&[KIND, "remote"])
                        .inc();
                    let d = retry_after.unwrap_or_else(|| {
                        backoff(attempt, Duration::from_millis(200), Duration::from_secs(2))
                    });
                    tracing::debug!(backend = KIND, delay = ?d, "DigiCert throttled the call");
                    (
                        d,
                        "throttled",
                        SignError::Throttled {
                            reason: message,
                            retry_after: Some(d),
                        },
                    )
                }
                Failure::Transient(m) => (
                    backoff(attempt, Duration::from_millis(100), Duration::from_secs(1)),
                    "transient",
                    SignError::Unavailable(m),
                ),
            };
            if Instant::now() + delay >= deadline {
                return Err(on_deadline);
            }
            self.count_retry(reason);
            attempt += 1;
            tokio::time::sleep(delay).await;
        }
    }

    fn enrollment_body(&self, req: &SignRequest) -> serde_json::Value {
        let (san, derived_seat) = match &req.subject {
            Subject::Workload(id) => (serde_json::json!({ "uris": [id.uri()] }), id.uri()),
            Subject::Server { dns_names } => {
                let (ips, dns): (Vec<&String>, Vec<&String>) = dns_names
                    .iter()
                    .partition(|n| n.parse::<std::net::IpAddr>().is_ok());
                let mut san = serde_json::json!({ "dns_names": dns });
                if !ips.is_empty() {
                    san["ip_addresses"] = serde_json::json!(ips);
                }
                (san, dns_names.first().cloned().unwrap_or_default())
            }
        };
        let seat = match self.cfg.seat.strategy {
            DigicertSeatStrategy::SpiffeId => derived_seat,
            DigicertSeatStrategy::Fixed => self.cfg.seat.id.clone(),
        };
        let unit = self.cfg.validity_unit;
        serde_json::json!({
            "profile": { "id": self.cfg.profile_id },
            "seat": { "seat_id": seat },
            "csr": pki::pem_encode("CERTIFICATE REQUEST", &req.csr_der),
            "validity": { "unit": unit.as_str(), "duration": unit.duration_for(req.ttl) },
            "delivery_format": "x509",
            "include_ca_chain": true,
            "attributes": { "extensions": { "san": san } },
        })
    }

    /// Enrolls and, when DigiCert answers PENDING, polls the pickup until the certificate
    /// is there. Returns the certificate PEM (leaf first, chain after it).
    async fn enroll(&self, req: &SignRequest, deadline: Instant) -> Result<String, SignError> {
        let body = self.enrollment_body(req);
        let first = self
            .post_with_retries("enroll", "certificate", &body, false, deadline)
            .await?;
        let request_id = match ready_or_pending("enroll", first)? {
            Ok(pem) => return Ok(pem),
            Err(id) => id,
        };
        tracing::debug!(backend = KIND, request_id = %request_id, "DigiCert enrollment pending; polling the pickup");
        let pickup_body = serde_json::json!({ "profile": { "id": self.cfg.profile_id } });
        let path = format!("certificate-pickup/{request_id}");
        let mut attempt = 0u32;
        loop {
            let delay = self
                .cfg
                .poll_initial_interval
                .saturating_mul(2u32.saturating_pow(attempt.min(16)))
                .min(self.cfg.poll_max_interval);
            if Instant::now() + delay >= deadline {
                return Err(SignError::Unavailable(format!(
                    "DigiCert request {request_id} still PENDING at the end of requestTimeout"
                )));
            }
            tokio::time::sleep(delay).await;
            self.count_retry("pending");
            attempt += 1;
            let answer = self
                .post_with_retries("pickup", &path, &pickup_body, true, deadline)
                .await?;
            match ready_or_pending("pickup", answer)? {
                Ok(pem) => return Ok(pem),
                Err(_) => continue,
            }
        }
    }

    /// Checks the issued leaf against the request and lays out the chain: certificates
    /// from DigiCert's answer, then the configured intermediates, linked by issuer name up
    /// to a root of the bundle (roots themselves are dropped).
    fn assemble(&self, req: &SignRequest, pem: &str) -> Result<IssuedChain, SignError> {
        let bad = |m: String| {
            tracing::error!(backend = KIND, error = %m, "DigiCert returned an unusable certificate");
            SignError::Internal(format!("DigiCert returned an unusable certificate: {m}"))
        };
        let mut certs = pki::parse_certs_pem(pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let leaf = certs.remove(0);
        let (_, parsed) = parse_x509_certificate(&leaf).map_err(|e| bad(e.to_string()))?;
        if parsed.public_key().raw != req.public_key_der.as_slice() {
            return Err(bad("the certificate is for another public key".into()));
        }
        if matches!(parsed.basic_constraints(), Ok(Some(bc)) if bc.value.ca) {
            return Err(bad("the leaf is a CA certificate".into()));
        }
        let names: Vec<&GeneralName> = match parsed.subject_alternative_name() {
            Ok(Some(san)) => san.value.general_names.iter().collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(bad(e.to_string())),
        };
        match &req.subject {
            Subject::Workload(id) => {
                let want = id.uri();
                let ok = names.len() == 1
                    && matches!(names[0], GeneralName::URI(u) if *u == want.as_str());
                if !ok {
                    return Err(bad(format!(
                        "subjectAltName is {names:?}, expected exactly URI:{want}"
                    )));
                }
            }
            Subject::Server { dns_names } => {
                for n in dns_names {
                    if !pki::names_include(names.iter().copied(), n) {
                        return Err(bad(format!("{n} missing from subjectAltName")));
                    }
                }
            }
        }
        let not_after = parsed.validity().not_after.timestamp();
        let now = pki::unix_secs(SystemTime::now());
        if not_after <= now {
            return Err(bad("the certificate has already expired".into()));
        }
        if not_after > now + req.ttl.as_secs() as i64 + 300 {
            // Whole validity units (at least one) round short TTLs up; profiles may also
            // impose a minimum. Accept, as for AWS: clients renew at half of what they see.
            tracing::debug!(
                backend = KIND,
                subject = %req.subject,
                requested_ttl_secs = req.ttl.as_secs(),
                issued_secs = not_after - now,
                "DigiCert issued a longer lifetime than requested; accepted"
            );
            self.metrics
                .backend_ttl_exceeded
                .with_label_values(&[KIND])
                .inc();
        }

        let candidates: Vec<CertificateDer<'static>> = certs
            .into_iter()
            .chain(self.intermediates.iter().cloned())
            .collect();
        let mut intermediates: Vec<CertificateDer<'static>> = Vec::new();
        let mut issuer = parsed.issuer().as_raw().to_vec();
        // Bounded: a chain longer than this is not a chain.
        for _ in 0..8 {
            if self.root_subjects.contains(&issuer) {
                break;
            }
            let next = candidates.iter().find_map(|c| {
                let (_, p) = parse_x509_certificate(c).ok()?;
                let self_signed = p.subject() == p.issuer();
                (p.subject().as_raw() == issuer.as_slice()
                    && !self_signed
                    && !intermediates.contains(c))
                .then(|| (c.clone(), p.issuer().as_raw().to_vec()))
            });
            match next {
                Some((c, up)) => {
                    intermediates.push(c);
                    issuer = up;
                }
                // The server's chain check reports what is missing.
                None => break,
            }
        }
        if let Some(first) = intermediates.first()
            && let Ok(info) = pki::cert_info(first)
        {
            self.issuing_ca_not_after
                .store(info.not_after, Ordering::Relaxed);
        }
        Ok(IssuedChain::new(leaf, intermediates))
    }

    /// `GET /hello` with the current credentials: true if DigiCert accepts them.
    async fn probe(&self) -> bool {
        let Ok(rb) = self.request(reqwest::Method::GET, "hello") else {
            return false;
        };
        matches!(
            tokio::time::timeout(self.cfg.request_timeout, rb.send()).await,
            Ok(Ok(r)) if r.status().is_success()
        )
    }
}

/// The certificate PEM of an answer, or the request id to poll.
fn ready_or_pending(op: &str, e: Enrollment) -> Result<Result<String, String>, SignError> {
    if let Some(pem) = e.certificate.filter(|c| !c.trim().is_empty()) {
        tracing::debug!(
            backend = KIND,
            serial = e.serial_number.as_deref().unwrap_or("?"),
            "DigiCert issued"
        );
        return Ok(Ok(pem));
    }
    let status = e.status.unwrap_or_default();
    if status.eq_ignore_ascii_case("PENDING") {
        let id = match e.request_id {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s,
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => {
                return Err(SignError::Internal(format!(
                    "{op}: PENDING without a request_id"
                )));
            }
        };
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(SignError::Internal(format!(
                "{op}: unusable request_id {id:?}"
            )));
        }
        return Ok(Err(id));
    }
    if status.is_empty() {
        return Err(SignError::Internal(format!(
            "{op}: answer has neither a certificate nor a status"
        )));
    }
    // REJECTED, DENIED, ...: an approver or the profile refused it.
    tracing::warn!(backend = KIND, status = %status, "DigiCert did not issue the certificate");
    Err(SignError::Rejected(format!("{op}: status {status}")))
}

fn spawn_denied_probe(me: Weak<Shared>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(DENIED_PROBE_INTERVAL).await;
            let Some(sh) = me.upgrade() else { return };
            let denied = sh
                .denied
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some();
            if denied && sh.probe().await {
                tracing::info!(backend = KIND, "DigiCert accepts the credentials again");
                sh.set_denied(None);
            }
        }
    });
}

impl Authority for Digicert {
    fn kind(&self) -> &'static str {
        KIND
    }
    fn trust_bundle(&self) -> watch::Receiver<SharedBundle> {
        self.shared.bundle.subscribe()
    }
    fn health(&self) -> Health {
        match &*self.shared.denied.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(why) => Health::NotReady(format!("DigiCert refuses the credentials: {why}")),
            None => Health::Ready,
        }
    }
}

#[async_trait]
impl Signer for Digicert {
    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
        let sh = &self.shared;
        let deadline = Instant::now() + sh.cfg.request_timeout;
        let pem = sh.enroll(req, deadline).await?;
        // DigiCert answered with a certificate: the credentials work.
        sh.set_denied(None);
        sh.assemble(req, &pem)
    }

    fn signing_ca(&self) -> SigningCaInfo {
        let t = self.shared.issuing_ca_not_after.load(Ordering::Relaxed);
        SigningCaInfo {
            not_after: (t != 0).then_some(t),
        }
    }
}

#[async_trait]
impl super::Plugin for DigicertConfig {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn problems(&self, shared: &crate::validate::Shared) -> Vec<crate::validate::FieldError> {
        DigicertConfig::problems(self, shared)
    }

    async fn build(&self, ctx: &super::BuildContext) -> Result<Arc<dyn Signer>, super::BuildError> {
        let d = Digicert::connect(self, ctx.metrics.clone())
            .map_err(|e| super::BuildError::new("DigiCert", e))?;
        Ok(Arc::new(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn retry_after_takes_seconds_or_an_http_date() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(reqwest::header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        let later = SystemTime::now() + Duration::from_secs(30);
        h.insert(
            reqwest::header::RETRY_AFTER,
            httpdate::fmt_http_date(later).parse().unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(27) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        h.insert(
            reqwest::header::RETRY_AFTER,
            "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn error_bodies_name_digicerts_message() {
        assert_eq!(
            error_text(r#"{"errors":[{"code":"invalid_csr","message":"bad CSR"}]}"#),
            "invalid_csr: bad CSR"
        );
        assert_eq!(error_text("<html>oops</html>"), "<html>oops</html>");
        assert_eq!(error_text(""), "(empty body)");
        assert_eq!(error_text(&"é".repeat(400)).len(), 300);
    }

    #[test]
    fn answers_are_a_certificate_a_pending_id_or_a_refusal() {
        let parse = |s: &str| serde_json::from_str::<Enrollment>(s).unwrap();
        assert!(matches!(
            ready_or_pending("t", parse(r#"{"serial_number":"1","delivery_format":"x509","certificate":"PEM"}"#)),
            Ok(Ok(p)) if p == "PEM"
        ));
        assert!(matches!(
            ready_or_pending("t", parse(r#"{"status":"PENDING","request_id":"r-1"}"#)),
            Ok(Err(id)) if id == "r-1"
        ));
        assert!(matches!(
            ready_or_pending("t", parse(r#"{"status":"PENDING","request_id":42}"#)),
            Ok(Err(id)) if id == "42"
        ));
        assert!(matches!(
            ready_or_pending("t", parse(r#"{"status":"PENDING","request_id":"../x"}"#)),
            Err(SignError::Internal(_))
        ));
        assert!(matches!(
            ready_or_pending("t", parse(r#"{"status":"REJECTED"}"#)),
            Err(SignError::Rejected(_))
        ));
        assert!(matches!(
            ready_or_pending("t", parse(r#"{}"#)),
            Err(SignError::Internal(_))
        ));
    }
}
