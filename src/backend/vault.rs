//! The Vault (and OpenBao) PKI backend: every certificate is signed by a PKI role through
//! `POST /v1/<mount>/sign/<role>` (or `/v1/<mount>/issuer/<ref>/sign/<role>`), never
//! through `sign-verbatim`, which would copy whatever the CSR asks for.
//!
//! This module owns:
//! - the HTTP client towards Vault (the project's reqwest + rustls/aws-lc-rs, the
//!   configured CA bundle and optional client certificate, a per-call timeout);
//! - the token lifecycle: log in, renew before expiry (`auth/token/renew-self`), log in
//!   again when a renewal hits the token's max TTL or Vault refuses the token. A
//!   background task does this; [`Signer::sign`] only reads the current token from an
//!   `ArcSwap`, so a slow or failing renewal never stalls a call. A 403 on a sign call
//!   triggers one coalesced re-login and one retry;
//! - the trust bundle: the self-signed certificates of the mount's CA chain and/or a
//!   bundle file, refreshed periodically and published on the watch channel;
//! - checking what Vault returned (the CSR's key, exactly the requested names, a chain to
//!   the bundle, the lifetime: Vault silently caps the TTL at the role's `max_ttl`) and
//!   turning Vault's answers into [`SignError`]s clients can act on;
//! - health: not ready while Vault is unreachable or sealed, or the bridge cannot log in.
//!
//! # vaultrs and direct calls
//! The `vaultrs` crate covers role sign, the AppRole / Kubernetes / JWT logins and
//! `renew-self` / `lookup-self`, and is used for those. We use the 0.7 line: it is built on
//! reqwest 0.12 like the rest of the bridge, and its `VaultClient` has public fields, so it
//! is assembled here around our own `reqwest::Client`: one HTTP and TLS stack (rustls with
//! aws-lc-rs; no ring, no native-tls) and no environment variables (`VAULT_ADDR`,
//! `VAULT_TOKEN`, `VAULT_SKIP_VERIFY`) consulted behind the config's back. vaultrs 0.8
//! moved to reqwest 0.13 and its own TLS feature set, which would compile in a second
//! HTTP client stack. What vaultrs lacks goes directly over the same client:
//! issuer-path sign, `sys/health`, and the CA chain (`<mount>/ca_chain` as PEM and
//! `<mount>/issuer/<ref>/json`; vaultrs only has `cert/ca_chain`, which would cover the
//! default issuer alone, so one direct path serves both cases).
//! vaultrs also logs failed requests itself (at ERROR, without bodies or tokens, and
//! without the cause); the binary's default log filter turns `vaultrs` and `rustify` off,
//! since this module logs the same failures with their cause.

mod config;

pub use config::*;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use rustls_pki_types::CertificateDer;
use serde::Deserialize;
use tokio::sync::{Notify, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use vaultrs::api::EndpointMiddleware;
use vaultrs::client::{VaultClient, VaultClientSettings};
use x509_parser::prelude::*;

use super::intermediate::{IntermediateRequest, UpstreamAuthority};
use super::{
    Authority, Health, IssuedChain, SignError, SignRequest, Signer, SigningCaInfo, Subject,
};
use crate::metrics::Metrics;
use crate::pki;
use crate::trust::verify_path;
use crate::trust::{SharedBundle, TrustBundle};

pub(crate) const KIND: &str = "vault";
/// How often an unhealthy backend probes `sys/health` to notice Vault is back.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Upper bound of the retry backoff for renewals and logins.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long a refused fresh token (policy problem) keeps the backend not ready.
const DENIED_NOT_READY: Duration = Duration::from_secs(30);
/// A failed login is reused for this long by callers that queued behind it, so a burst
/// of requests with broken credentials makes one login attempt, not one each.
const LOGIN_FAILURE_REUSE: Duration = Duration::from_secs(1);
/// Never schedule token work closer than this (tokens with tiny TTLs).
const MIN_WAIT: Duration = Duration::from_millis(250);

/// Why the backend could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("HTTP client: {0}")]
    Client(String),
    #[error("login failed: {0}")]
    Login(String),
    #[error("trust bundle: {0}")]
    Bundle(String),
}

/// The outcome of one failed call to Vault, before it is given a meaning.
#[derive(Debug, Clone, thiserror::Error)]
enum CallError {
    #[error("cannot reach vault: {0}")]
    Transport(String),
    #[error("vault answered {code}: {}", if errors.is_empty() { "(no message)".to_string() } else { errors.join("; ") })]
    Status { code: u16, errors: Vec<String> },
    #[error("unexpected answer from vault: {0}")]
    Malformed(String),
}

impl CallError {
    /// Vault is down, sealed, overloaded or unreachable: worth retrying later.
    fn is_transient(&self) -> bool {
        match self {
            CallError::Transport(_) => true,
            CallError::Status { code, .. } => matches!(code, 412 | 429 | 500 | 502 | 503 | 504),
            CallError::Malformed(_) => false,
        }
    }

    fn code(&self) -> Option<u16> {
        match self {
            CallError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// The display chain of an error (`a: b: c`), for messages that must say *why* a
/// connection failed (refused, timed out, TLS) without any request body.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

fn from_vaultrs(e: vaultrs::error::ClientError) -> CallError {
    use rustify::errors::ClientError as R;
    use vaultrs::error::ClientError as V;
    match e {
        V::APIError { code, errors } => CallError::Status { code, errors },
        V::RestClientError { source } => match source {
            R::ServerResponseError { code, content } => CallError::Status {
                code,
                // Not JSON (a proxy's page?): keep a short excerpt; error pages carry no
                // secrets, request bodies are never part of it.
                errors: content
                    .map(|c| vec![c.chars().take(200).collect()])
                    .unwrap_or_default(),
            },
            R::RequestError { source, .. } | R::ResponseError { source } => {
                CallError::Transport(format!("{source:#}"))
            }
            // The Display of these never includes the response body (which may hold a
            // token); their Debug would.
            other => CallError::Malformed(other.to_string()),
        },
        other => CallError::Malformed(other.to_string()),
    }
}

/// What a sign call returned (the same shape for the role and the issuer path).
#[derive(Debug, Deserialize)]
struct SignData {
    certificate: String,
    #[serde(default)]
    issuing_ca: String,
    #[serde(default)]
    ca_chain: Option<Vec<String>>,
}

impl SignData {
    /// The CA certificates of the answer: `ca_chain` when Vault sent one, else `issuing_ca`.
    fn chain_pems(&self) -> Vec<&str> {
        match &self.ca_chain {
            Some(c) if !c.is_empty() => c.iter().map(String::as_str).collect(),
            _ => vec![self.issuing_ca.as_str()],
        }
    }
}

/// Vault's error body.
#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<String>,
}

/// A token and what we know about its lifetime.
struct Session {
    /// vaultrs client carrying this token (cheap: shares the HTTP client).
    client: VaultClient,
    /// Bumped at every login, so concurrent callers that saw a refused token log in once.
    generation: u64,
    life: Lifetime,
}

impl Session {
    fn token(&self) -> &str {
        &self.client.settings.token
    }
}

/// What Vault told us about a token's lifetime, at login or the last renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lifetime {
    /// When the token was obtained or last renewed, and the lease granted then.
    refreshed_at: Instant,
    /// `None`: the token does not expire (e.g. a root token).
    lease: Option<Duration>,
    renewable: bool,
    /// The longest lease a login or renewal granted this token; a renewal granting less
    /// has hit the token's max TTL, so the next step is a new login.
    full_lease: Option<Duration>,
}

/// The token task's next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Renew,
    Login,
}

impl Lifetime {
    fn expires_at(&self) -> Option<Instant> {
        self.lease.map(|l| self.refreshed_at + l)
    }

    /// What to do next and when (`None`: nothing until something happens). Renew at 2/3
    /// of the lease; log in instead when the token cannot be renewed or renewals have
    /// started to shrink (max TTL in sight); after failures, retry with backoff, logging
    /// in if the token has expired meanwhile or logins are what failed.
    fn plan(&self, now: Instant, login_broken: bool, failures: u32) -> Option<(Step, Instant)> {
        if login_broken || failures > 0 {
            let expired = self.expires_at().is_some_and(|e| e <= now);
            let step = if login_broken || expired {
                Step::Login
            } else {
                Step::Renew
            };
            return Some((step, now + backoff(failures)));
        }
        let lease = self.lease?;
        let capped = self.full_lease.is_some_and(|full| lease < full);
        let at = (self.refreshed_at + (lease * 2 / 3).max(MIN_WAIT)).max(now + MIN_WAIT);
        let step = if !self.renewable || capped {
            Step::Login
        } else {
            Step::Renew
        };
        Some((step, at))
    }
}

/// Stateless access to one Vault server: URL, HTTP client, namespace.
struct Conn {
    cfg: VaultConfig,
    http: reqwest::Client,
    base: String,
    url: reqwest::Url,
}

#[derive(Clone)]
enum LoginError {
    /// Vault could not be asked (down, sealed, timeout): retry.
    Transient(CallError),
    /// The credentials were refused or cannot be read: an operator must act.
    Credentials(String),
}

impl std::fmt::Display for LoginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoginError::Transient(e) => write!(f, "{e}"),
            LoginError::Credentials(m) => f.write_str(m),
        }
    }
}

fn read_secret_file(path: &std::path::Path) -> Result<String, LoginError> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| LoginError::Credentials(format!("{}: {e}", path.display())))?;
    let s = s.trim().to_string();
    if s.is_empty() {
        return Err(LoginError::Credentials(format!(
            "{} is empty",
            path.display()
        )));
    }
    Ok(s)
}

impl Conn {
    fn new(cfg: &VaultConfig) -> Result<Self, VaultError> {
        let identity = match (&cfg.tls.client_cert_file, &cfg.tls.client_key_file) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        let tls = pki::client_tls_config_with_identity(cfg.tls.ca_file.as_deref(), identity)
            .map_err(VaultError::Client)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(cfg.request_timeout)
            .connect_timeout(cfg.request_timeout)
            .user_agent(concat!("istio-ca-bridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| VaultError::Client(error_chain(&e)))?;
        let base = cfg.address.trim_end_matches('/').to_string();
        let url = reqwest::Url::parse(&base).map_err(|e| VaultError::Client(e.to_string()))?;
        Ok(Self {
            cfg: cfg.clone(),
            http,
            base,
            url,
        })
    }

    /// A vaultrs client sending `token` (empty: none) through our HTTP client.
    fn vaultrs(&self, token: &str) -> VaultClient {
        let settings = VaultClientSettings {
            address: self.url.clone(),
            ca_certs: Vec::new(),
            identity: None,
            timeout: Some(self.cfg.request_timeout),
            token: token.to_string(),
            verify: true,
            version: 1,
            wrapping: false,
            namespace: self.cfg.namespace.clone(),
        };
        VaultClient {
            http: rustify::clients::reqwest::Client::new(&self.base, self.http.clone()),
            middle: EndpointMiddleware {
                token: token.to_string(),
                version: "v1".into(),
                wrap: None,
                namespace: self.cfg.namespace.clone(),
            },
            settings,
        }
    }

    /// One direct API call; returns the raw body of a 2xx answer.
    async fn call(
        &self,
        token: Option<&str>,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<bytes::Bytes, CallError> {
        let mut rb = self
            .http
            .request(method, format!("{}/v1/{path}", self.base))
            .header("X-Vault-Request", "true");
        if let Some(t) = token.filter(|t| !t.is_empty()) {
            rb = rb.header("X-Vault-Token", t);
        }
        if let Some(ns) = &self.cfg.namespace {
            rb = rb.header("X-Vault-Namespace", ns);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| CallError::Transport(error_chain(&e)))?;
        let code = resp.status().as_u16();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| CallError::Transport(error_chain(&e)))?;
        if !(200..300).contains(&code) {
            let errors = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.errors)
                .unwrap_or_default();
            return Err(CallError::Status { code, errors });
        }
        Ok(bytes)
    }

    /// A direct call answering `{"data": T}`.
    async fn call_data<T: serde::de::DeserializeOwned>(
        &self,
        token: Option<&str>,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T, CallError> {
        #[derive(Deserialize)]
        struct Envelope<T> {
            data: Option<T>,
        }
        let bytes = self.call(token, method, path, body).await?;
        let env: Envelope<T> = serde_json::from_slice(&bytes)
            .map_err(|e| CallError::Malformed(format!("{path}: {e}")))?;
        env.data
            .ok_or_else(|| CallError::Malformed(format!("{path}: no data in the answer")))
    }

    /// Logs in with the configured method and returns the new session (generation 0).
    async fn login(&self) -> Result<Session, LoginError> {
        let bare = self.vaultrs("");
        let fail = |what: &str, e: vaultrs::error::ClientError| {
            let e = from_vaultrs(e);
            if e.is_transient() {
                LoginError::Transient(e)
            } else {
                LoginError::Credentials(format!("{what} refused: {e}"))
            }
        };
        let auth = match &self.cfg.auth {
            VaultAuthConfig::Token(t) => {
                let token = match (&t.token_file, &t.token_env) {
                    (Some(f), _) => read_secret_file(f)?,
                    (None, Some(var)) => std::env::var(var)
                        .ok()
                        .map(|v| v.trim().to_string())
                        .filter(|v| !v.is_empty())
                        .ok_or_else(|| {
                            LoginError::Credentials(format!(
                                "environment variable {var} is not set"
                            ))
                        })?,
                    (None, None) => {
                        return Err(LoginError::Credentials("no token source".into()));
                    }
                };
                let client = self.vaultrs(&token);
                let info = vaultrs::token::lookup_self(&client)
                    .await
                    .map_err(|e| fail("token lookup", e))?;
                // Only tokens without an expiry time never expire (ttl 0 may also mean
                // "about to expire").
                let lease = info
                    .expire_time
                    .as_ref()
                    .map(|_| Duration::from_secs(info.ttl));
                return Ok(Session {
                    client,
                    generation: 0,
                    life: Lifetime {
                        refreshed_at: Instant::now(),
                        lease,
                        renewable: info.renewable,
                        // What remains of a given token says nothing about what a
                        // renewal grants; the first renewal will tell.
                        full_lease: None,
                    },
                });
            }
            VaultAuthConfig::AppRole(a) => {
                let role_id = read_secret_file(&a.role_id_file)?;
                let secret_id = read_secret_file(&a.secret_id_file)?;
                vaultrs::auth::approle::login(&bare, &a.mount, &role_id, &secret_id)
                    .await
                    .map_err(|e| fail("approle login", e))?
            }
            VaultAuthConfig::Kubernetes(k) => {
                let jwt = read_secret_file(&k.token_file)?;
                vaultrs::auth::kubernetes::login(&bare, &k.mount, &k.role, &jwt)
                    .await
                    .map_err(|e| fail("kubernetes login", e))?
            }
            VaultAuthConfig::Jwt(j) => {
                let jwt = read_secret_file(&j.token_file)?;
                vaultrs::auth::oidc::login(&bare, &j.mount, &jwt, j.role.clone())
                    .await
                    .map_err(|e| fail("jwt login", e))?
            }
        };
        let lease = (auth.lease_duration > 0).then(|| Duration::from_secs(auth.lease_duration));
        Ok(Session {
            client: self.vaultrs(&auth.client_token),
            generation: 0,
            life: Lifetime {
                refreshed_at: Instant::now(),
                lease,
                renewable: auth.renewable,
                full_lease: lease,
            },
        })
    }

    /// The roots to trust: self-signed certificates of the mount's (or issuer's) CA chain
    /// and/or the configured bundle file.
    async fn fetch_roots(&self, token: &str) -> Result<Vec<CertificateDer<'static>>, String> {
        let mut roots = Vec::new();
        let mount = &self.cfg.mount;
        if self.cfg.roots_from_mount {
            let pem = match &self.cfg.issuer_ref {
                None => self
                    .call(
                        Some(token),
                        reqwest::Method::GET,
                        &format!("{mount}/ca_chain"),
                        None,
                    )
                    .await
                    .map_err(|e| format!("{mount}/ca_chain: {e}"))?
                    .to_vec(),
                Some(r) => {
                    #[derive(Deserialize)]
                    struct Issuer {
                        certificate: String,
                        #[serde(default)]
                        ca_chain: Vec<String>,
                    }
                    let path = format!("{mount}/issuer/{r}/json");
                    let i: Issuer = self
                        .call_data(Some(token), reqwest::Method::GET, &path, None)
                        .await
                        .map_err(|e| format!("{path}: {e}"))?;
                    let mut pem = i.certificate;
                    pem.push('\n');
                    pem.push_str(&i.ca_chain.join("\n"));
                    pem.into_bytes()
                }
            };
            let certs = pki::parse_certs_pem(&pem)
                .map_err(|e| format!("the CA chain of mount {mount}: {e}"))?;
            for c in certs {
                let info = pki::cert_info(&c).map_err(|e| e.to_string())?;
                if info.self_signed && !roots.contains(&c) {
                    roots.push(c);
                }
            }
            if roots.is_empty() && self.cfg.root_bundle_file.is_none() {
                return Err(format!(
                    "the CA chain of mount {mount} does not include a root (self-signed) certificate; \
                     import the issuer with its full chain or set backend.rootBundleFile"
                ));
            }
        }
        if let Some(f) = &self.cfg.root_bundle_file {
            let pem = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
            for c in pki::parse_certs_pem(&pem).map_err(|e| format!("{}: {e}", f.display()))? {
                if !roots.contains(&c) {
                    roots.push(c);
                }
            }
        }
        Ok(roots)
    }

    /// `sys/health`: Ok when an unsealed server answers (active or standby).
    async fn probe(&self) -> Result<(), CallError> {
        match self
            .call(
                None,
                reqwest::Method::GET,
                "sys/health?standbyok=true&perfstandbyok=true",
                None,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(CallError::Status { code: 503, .. }) => Err(CallError::Status {
                code: 503,
                errors: vec!["vault is sealed".into()],
            }),
            Err(e) => Err(e),
        }
    }

    /// One sign call with `session`'s token.
    async fn sign(&self, session: &Session, req: &SignRequest) -> Result<SignData, CallError> {
        let csr = pki::pem_encode("CERTIFICATE REQUEST", &req.csr_der);
        let ttl = format!("{}s", req.ttl.as_secs().max(1));
        let mut body = serde_json::json!({
            "csr": csr,
            "ttl": ttl,
            "format": "pem",
        });
        let role = match &req.subject {
            Subject::Workload(id) => {
                // The identity goes in as uri_sans, and only it: with the recommended role
                // (use_csr_sans=false) Vault ignores whatever names the CSR carries.
                body["uri_sans"] = id.uri().into();
                body["exclude_cn_from_sans"] = true.into();
                &self.cfg.role
            }
            Subject::Server { dns_names } => {
                let (ips, names): (Vec<&String>, Vec<&String>) = dns_names
                    .iter()
                    .partition(|n| n.parse::<std::net::IpAddr>().is_ok());
                if let Some(first) = names.first() {
                    body["common_name"] = first.as_str().into();
                }
                if names.len() > 1 {
                    body["alt_names"] = names[1..]
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                        .into();
                }
                if !ips.is_empty() {
                    body["ip_sans"] = ips
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                        .into();
                }
                body["exclude_cn_from_sans"] = false.into();
                self.cfg.server_role.as_ref().unwrap_or(&self.cfg.role)
            }
        };
        let mount = &self.cfg.mount;
        match &self.cfg.issuer_ref {
            Some(r) => {
                // vaultrs has no issuer-path sign.
                self.call_data(
                    Some(session.token()),
                    reqwest::Method::POST,
                    &format!("{mount}/issuer/{r}/sign/{role}"),
                    Some(&body),
                )
                .await
            }
            None => {
                let mut opts = vaultrs::api::pki::requests::SignCertificateRequest::builder();
                opts.ttl(ttl).format("pem");
                let s = |k: &str| body.get(k).and_then(|v| v.as_str()).map(str::to_string);
                if let Some(v) = s("uri_sans") {
                    opts.uri_sans(v);
                }
                if let Some(v) = s("alt_names") {
                    opts.alt_names(v);
                }
                if let Some(v) = s("ip_sans") {
                    opts.ip_sans(v);
                }
                if let Some(v) = body.get("exclude_cn_from_sans").and_then(|v| v.as_bool()) {
                    opts.exclude_cn_from_sans(v);
                }
                let cn = s("common_name").unwrap_or_default();
                let r = vaultrs::pki::cert::ca::sign(
                    &session.client,
                    mount,
                    role,
                    &csr,
                    &cn,
                    Some(&mut opts),
                )
                .await
                .map_err(from_vaultrs)?;
                Ok(SignData {
                    certificate: r.certificate,
                    issuing_ca: r.issuing_ca,
                    ca_chain: r.ca_chain,
                })
            }
        }
    }
}

/// Why the backend is not ready; cleared by the event that proves the opposite.
#[derive(Default)]
struct HealthState {
    /// Logging in fails with refused or unreadable credentials (cleared by a login).
    login: Option<String>,
    /// A fresh token was refused by the sign endpoint: policy (cleared by a signature).
    /// Time-bounded: a not-ready bridge gets no traffic to prove a fixed policy with.
    denied: Option<(Instant, String)>,
    /// Vault cannot be reached or is sealed (cleared by any answer).
    unreachable: Option<String>,
}

struct Shared {
    conn: Conn,
    session: ArcSwap<Session>,
    /// Serializes logins; callers that waited find a newer generation and skip theirs,
    /// or a fresh failure and return it. Holds the last failure and when it happened.
    login_lock: tokio::sync::Mutex<Option<(Instant, LoginError)>>,
    bundle: watch::Sender<SharedBundle>,
    health: Mutex<HealthState>,
    metrics: Arc<Metrics>,
    /// Wakes the token task (a refused token was seen).
    token_event: Notify,
    /// NotAfter of the CA that signed the last leaf (0: unknown).
    issuing_ca_not_after: AtomicI64,
    capped_warned: AtomicBool,
}

impl Shared {
    fn set_health(&self, f: impl FnOnce(&mut HealthState)) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut h);
    }

    fn mark_unreachable(&self, e: &CallError) {
        let msg = e.to_string();
        self.set_health(|h| {
            if h.unreachable.is_none() {
                tracing::warn!(backend = KIND, error = %msg, "vault unreachable; not ready until it answers again");
            }
            h.unreachable = Some(msg);
        });
    }

    fn count(&self, which: &prometheus::IntCounterVec, ok: bool) {
        which
            .with_label_values(&[KIND, if ok { "success" } else { "failure" }])
            .inc();
    }

    fn mark_reachable(&self) {
        self.set_health(|h| {
            if h.unreachable.take().is_some() {
                tracing::info!(backend = KIND, "vault reachable again");
            }
        });
    }

    /// Logs in again unless someone already did since `seen` was current.
    async fn relogin(&self, seen: u64) -> Result<(), LoginError> {
        let mut last_failure = self.login_lock.lock().await;
        let current = self.session.load().generation;
        if current != seen {
            return Ok(());
        }
        if let Some((at, e)) = &*last_failure
            && at.elapsed() < LOGIN_FAILURE_REUSE
        {
            return Err(e.clone());
        }
        let res = self.conn.login().await;
        *last_failure = match &res {
            Ok(_) => None,
            Err(e) => Some((Instant::now(), e.clone())),
        };
        self.count(&self.metrics.backend_logins, res.is_ok());
        match res {
            Ok(mut s) => {
                s.generation = current + 1;
                tracing::info!(
                    backend = KIND,
                    generation = s.generation,
                    lease_secs = s.life.lease.map(|l| l.as_secs()),
                    renewable = s.life.renewable,
                    "logged in to vault"
                );
                self.session.store(Arc::new(s));
                self.set_health(|h| {
                    if h.login.take().is_some() {
                        tracing::info!(backend = KIND, "vault login works again");
                    }
                });
                self.mark_reachable();
                self.token_event.notify_one();
                Ok(())
            }
            Err(LoginError::Transient(e)) => {
                self.mark_unreachable(&e);
                Err(LoginError::Transient(e))
            }
            Err(LoginError::Credentials(m)) => {
                tracing::error!(
                    backend = KIND,
                    error = %m,
                    "VAULT LOGIN FAILED: the bridge cannot obtain a token; no certificate can be issued until the credentials are fixed"
                );
                self.mark_reachable();
                self.set_health(|h| h.login = Some(m.clone()));
                Err(LoginError::Credentials(m))
            }
        }
    }

    /// Renews the current token. On a refused token, logs in again.
    async fn renew(&self, session: &Session) -> Result<(), LoginError> {
        let res = vaultrs::token::renew_self(&session.client, None).await;
        self.count(&self.metrics.backend_token_renewals, res.is_ok());
        match res {
            Ok(auth) => {
                self.mark_reachable();
                let lease =
                    (auth.lease_duration > 0).then(|| Duration::from_secs(auth.lease_duration));
                let renewed = Session {
                    client: self.conn.vaultrs(session.token()),
                    generation: session.generation,
                    life: Lifetime {
                        refreshed_at: Instant::now(),
                        lease,
                        renewable: auth.renewable,
                        full_lease: match (session.life.full_lease, lease) {
                            (Some(a), Some(b)) => Some(a.max(b)),
                            (a, b) => a.or(b),
                        },
                    },
                };
                let _g = self.login_lock.lock().await;
                // Store only if no login replaced the token meanwhile.
                if self.session.load().generation == session.generation {
                    tracing::debug!(
                        backend = KIND,
                        lease_secs = auth.lease_duration,
                        "vault token renewed"
                    );
                    self.session.store(Arc::new(renewed));
                }
                Ok(())
            }
            Err(e) => {
                let e = from_vaultrs(e);
                // Down, sealed or busy: keep the token and retry. Any other answer (403
                // revoked, 400, and the 500 "past the max TTL, cannot renew" Vault and
                // OpenBao give for a token at its max TTL) means: log in again.
                if matches!(e, CallError::Transport(_)) || matches!(e.code(), Some(429 | 503)) {
                    if e.code() != Some(429) {
                        self.mark_unreachable(&e);
                    }
                    return Err(LoginError::Transient(e));
                }
                tracing::info!(backend = KIND, error = %e, "vault refused to renew the token; logging in again");
                self.relogin(session.generation).await
            }
        }
    }

    async fn refresh_bundle(&self) -> Result<bool, String> {
        let token = self.session.load().token().to_string();
        let roots = self.conn.fetch_roots(&token).await?;
        self.mark_reachable();
        if roots.as_slice() == self.bundle.borrow().roots() {
            return Ok(false);
        }
        let bundle = TrustBundle::new(roots).map_err(|e| e.to_string())?;
        tracing::info!(
            backend = KIND,
            roots = bundle.roots().len(),
            "trust bundle changed in vault"
        );
        self.bundle.send_replace(Arc::new(bundle));
        Ok(true)
    }

    /// Maps a failed sign call to what the caller should do, logging what an operator
    /// needs to see.
    fn classify(&self, e: CallError, role: &str) -> SignError {
        let msg = e.to_string();
        match &e {
            CallError::Status { code: 429, .. } => SignError::Throttled {
                reason: msg,
                retry_after: None,
            },
            _ if e.is_transient() => {
                self.mark_unreachable(&e);
                SignError::Unavailable(msg)
            }
            CallError::Status { code: 400, errors }
                if errors.iter().any(|m| {
                    let m = m.to_ascii_lowercase();
                    m.contains("unknown role") || m.contains("issuer")
                }) =>
            {
                tracing::error!(backend = KIND, role, error = %msg, "vault PKI misconfigured (role or issuer)");
                SignError::Internal(msg)
            }
            CallError::Status { code: 400, .. } => {
                tracing::info!(backend = KIND, role, vault_error = %msg, "vault rejected the request");
                SignError::Rejected(msg)
            }
            CallError::Status { code: 404, .. } => {
                tracing::error!(backend = KIND, role, error = %msg, "vault PKI mount or role not found");
                SignError::Internal(msg)
            }
            _ => SignError::Internal(msg),
        }
    }
}

/// The Vault PKI signer. Dropping it stops its background tasks.
pub struct VaultSigner {
    shared: Arc<Shared>,
    _stop: DropGuard,
}

impl VaultSigner {
    /// Logs in, fetches the trust bundle and starts the token and bundle maintenance.
    pub async fn connect(cfg: &VaultConfig, metrics: Arc<Metrics>) -> Result<Self, VaultError> {
        let conn = Conn::new(cfg)?;
        let login = conn.login().await;
        metrics
            .backend_logins
            .with_label_values(&[KIND, if login.is_ok() { "success" } else { "failure" }])
            .inc();
        let session = login.map_err(|e| match e {
            LoginError::Transient(e) => VaultError::Login(e.to_string()),
            LoginError::Credentials(m) => VaultError::Login(m),
        })?;
        let roots = conn
            .fetch_roots(session.token())
            .await
            .map_err(VaultError::Bundle)?;
        let bundle = TrustBundle::new(roots).map_err(|e| VaultError::Bundle(e.to_string()))?;
        tracing::info!(
            backend = KIND,
            address = %cfg.address,
            mount = %cfg.mount,
            role = %cfg.role,
            roots = bundle.roots().len(),
            lease_secs = session.life.lease.map(|l| l.as_secs()),
            renewable = session.life.renewable,
            "connected to vault"
        );
        let (tx, _) = watch::channel(Arc::new(bundle));
        let shared = Arc::new(Shared {
            conn,
            session: ArcSwap::from_pointee(Session {
                generation: 1,
                ..session
            }),
            login_lock: tokio::sync::Mutex::new(None),
            bundle: tx,
            health: Mutex::new(HealthState::default()),
            metrics,
            token_event: Notify::new(),
            issuing_ca_not_after: AtomicI64::new(0),
            capped_warned: AtomicBool::new(false),
        });
        let stop = CancellationToken::new();
        tokio::spawn(token_task(shared.clone(), stop.clone()));
        tokio::spawn(bundle_task(shared.clone(), stop.clone()));
        tokio::spawn(probe_task(shared.clone(), stop.clone()));
        Ok(Self {
            shared,
            _stop: stop.drop_guard(),
        })
    }

    /// Runs one authenticated call; when Vault refuses the token (expired, revoked) logs in
    /// again, once for all callers that saw that token refused, and tries once more. A
    /// fresh token refused too is a policy problem: loud log, not ready for a while.
    async fn with_relogin<'a, T, F, Fut>(
        &'a self,
        what: &str,
        role: &str,
        call: F,
    ) -> Result<T, SignError>
    where
        F: Fn(Arc<Session>) -> Fut,
        Fut: std::future::Future<Output = Result<T, CallError>> + 'a,
    {
        let sh = &self.shared;
        let session = sh.session.load_full();
        let generation = session.generation;
        let out = match call(session).await {
            Ok(d) => d,
            Err(e) if e.code() == Some(403) => {
                tracing::info!(backend = KIND, error = %e, "vault refused the token; logging in again");
                if let Err(le) = sh.relogin(generation).await {
                    return Err(SignError::Unavailable(format!("vault login failed: {le}")));
                }
                match call(sh.session.load_full()).await {
                    Ok(d) => d,
                    Err(e) if e.code() == Some(403) => {
                        let m = format!(
                            "vault refused a fresh token for {what}: {e}; check the bridge's policy"
                        );
                        tracing::error!(backend = KIND, error = %m, "VAULT PERMISSION DENIED");
                        sh.set_health(|h| h.denied = Some((Instant::now(), m.clone())));
                        return Err(SignError::Unavailable(m));
                    }
                    Err(e) => return Err(sh.classify(e, role)),
                }
            }
            Err(e) => return Err(sh.classify(e, role)),
        };
        sh.mark_reachable();
        sh.set_health(|h| h.denied = None);
        Ok(out)
    }

    /// Checks what Vault returned and lays it out as leaf + intermediates (roots dropped).
    async fn assemble(
        &self,
        data: SignData,
        req: &SignRequest,
        asked_at: SystemTime,
    ) -> Result<IssuedChain, SignError> {
        let bad = |m: String| {
            tracing::error!(backend = KIND, error = %m, "vault returned an unusable certificate");
            SignError::Internal(format!("vault returned an unusable certificate: {m}"))
        };
        let leaf = pki::parse_certs_pem(data.certificate.as_bytes())
            .map_err(|e| bad(format!("certificate: {e}")))?
            .into_iter()
            .next()
            .expect("parse_certs_pem returns at least one");
        let intermediates = pki::chain_links(data.chain_pems(), &leaf)
            .map_err(|e| bad(format!("ca_chain: {e}")))?;

        let (_, parsed) = parse_x509_certificate(&leaf).map_err(|e| bad(e.to_string()))?;
        if parsed.public_key().raw != req.public_key_der.as_slice() {
            return Err(bad("the certificate is for another public key".into()));
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
                    let present = pki::names_include(names.iter().copied(), n);
                    if !present {
                        return Err(bad(format!("{n} missing from subjectAltName")));
                    }
                }
            }
        }
        let not_after = parsed.validity().not_after.timestamp();
        let now = SystemTime::now();
        if not_after <= pki::unix_secs(now) {
            return Err(bad("the certificate has already expired".into()));
        }

        // It must chain to the bundle; if not, the roots may have rotated in Vault: look
        // once more before giving up.
        let usage = match req.subject {
            Subject::Workload(_) => webpki::KeyUsage::client_auth(),
            Subject::Server { .. } => webpki::KeyUsage::server_auth(),
        };
        let bundle = self.shared.bundle.borrow().clone();
        if let Err(first) = verify_path(&leaf, &intermediates, &bundle, usage, now) {
            match self.shared.refresh_bundle().await {
                Ok(true) => {
                    let bundle = self.shared.bundle.borrow().clone();
                    verify_path(&leaf, &intermediates, &bundle, usage, now)
                        .map_err(|e| bad(format!("does not chain to the trust bundle: {e}")))?;
                }
                _ => return Err(bad(format!("does not chain to the trust bundle: {first}"))),
            }
        }

        // Vault caps the TTL at the role's max_ttl (and the issuer's NotAfter) with only a
        // warning: accept the shorter certificate, clients renew at half-life anyway.
        let asked_until = pki::unix_secs(asked_at) + req.ttl.as_secs() as i64;
        let tolerance = (req.ttl.as_secs() as i64 / 10).clamp(1, 60);
        if not_after + tolerance < asked_until {
            self.shared
                .metrics
                .backend_ttl_capped
                .with_label_values(&[KIND])
                .inc();
            let requested_secs = req.ttl.as_secs();
            let issued_secs = not_after - pki::unix_secs(asked_at);
            if !self.shared.capped_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    backend = KIND,
                    requested_secs,
                    issued_secs,
                    "vault issued a shorter certificate than requested (the role's max_ttl or the issuer's expiry caps it); \
                     raise the role's max_ttl or lower policy.maxTtl (logged once, counted in istio_ca_bridge_backend_ttl_capped_total)"
                );
            } else {
                tracing::debug!(
                    backend = KIND,
                    requested_secs,
                    issued_secs,
                    "vault capped the TTL"
                );
            }
        } else if not_after > asked_until + 300 {
            return Err(bad(format!(
                "lifetime exceeds the requested TTL ({}s)",
                req.ttl.as_secs()
            )));
        }
        if let Some(first) = intermediates.first()
            && let Ok(info) = pki::cert_info(first)
        {
            self.shared
                .issuing_ca_not_after
                .store(info.not_after, Ordering::Relaxed);
        }
        Ok(IssuedChain::new(leaf, intermediates))
    }
}

impl Authority for VaultSigner {
    fn kind(&self) -> &'static str {
        KIND
    }
    fn trust_bundle(&self) -> watch::Receiver<SharedBundle> {
        self.shared.bundle.subscribe()
    }
    fn health(&self) -> Health {
        let h = self.shared.health.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = &h.login {
            Health::NotReady(format!("vault login failing: {m}"))
        } else if let Some((at, m)) = &h.denied
            && at.elapsed() < DENIED_NOT_READY
        {
            Health::NotReady(format!("vault permission denied: {m}"))
        } else if let Some(m) = &h.unreachable {
            Health::NotReady(format!("vault unavailable: {m}"))
        } else {
            Health::Ready
        }
    }
}

#[async_trait]
impl Signer for VaultSigner {
    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
        let sh = &self.shared;
        let role = match req.subject {
            Subject::Workload(_) => sh.conn.cfg.role.as_str(),
            Subject::Server { .. } => sh
                .conn
                .cfg
                .server_role
                .as_deref()
                .unwrap_or(&sh.conn.cfg.role),
        };
        let asked_at = SystemTime::now();
        let what = format!("{}/sign/{role}", sh.conn.cfg.mount);
        let data = self
            .with_relogin(&what, role, |s| async move { sh.conn.sign(&s, req).await })
            .await?;
        self.assemble(data, req, asked_at).await
    }

    fn signing_ca(&self) -> SigningCaInfo {
        let t = self.shared.issuing_ca_not_after.load(Ordering::Relaxed);
        SigningCaInfo {
            not_after: (t != 0).then_some(t),
        }
    }
}

/// Intermediate mode: the mount's issuer (or `issuerRef`) signs the bridge's intermediate
/// through `root/sign-intermediate` (`issuer/<ref>/sign-intermediate`), the endpoint SPIRE's
/// Vault upstream authority uses. `use_csr_values=false`: the subject is ours, not the
/// CSR's; `max_path_length=0` when asked. Vault caps the TTL at the mount's
/// max_lease_ttl; the intermediate mode reads the real NotAfter from the certificate.
#[async_trait]
impl UpstreamAuthority for VaultSigner {
    async fn sign_intermediate(&self, req: &IntermediateRequest) -> Result<IssuedChain, SignError> {
        let sh = &self.shared;
        let mount = &sh.conn.cfg.mount;
        let path = match &sh.conn.cfg.issuer_ref {
            Some(r) => format!("{mount}/issuer/{r}/sign-intermediate"),
            None => format!("{mount}/root/sign-intermediate"),
        };
        let mut body = serde_json::json!({
            "csr": pki::pem_encode("CERTIFICATE REQUEST", &req.csr_der),
            "common_name": req.common_name,
            "ttl": format!("{}s", req.ttl.as_secs().max(1)),
            "format": "pem",
            "use_csr_values": false,
            "exclude_cn_from_sans": true,
        });
        if req.path_len_zero {
            body["max_path_length"] = 0.into();
        }
        let (path, body) = (&path, &body);
        let data: SignData = self
            .with_relogin(path, path, |s| async move {
                sh.conn
                    .call_data(Some(s.token()), reqwest::Method::POST, path, Some(body))
                    .await
            })
            .await?;
        let bad = |m: String| SignError::Internal(format!("{path}: {m}"));
        let leaf = pki::parse_certs_pem(data.certificate.as_bytes())
            .map_err(|e| bad(format!("certificate: {e}")))?
            .remove(0);
        let intermediates =
            pki::chain_links(data.chain_pems(), &leaf).map_err(|e| bad(e.to_string()))?;
        Ok(IssuedChain::new(leaf, intermediates))
    }
}

fn backoff(failures: u32) -> Duration {
    (Duration::from_millis(500) * 2u32.saturating_pow(failures.saturating_sub(1).min(6)))
        .min(MAX_BACKOFF)
}

/// Keeps a valid token: renews at 2/3 of each lease, logs in again when renewal stops
/// extending the token (max TTL reached), when it is not renewable, when Vault refuses
/// it, or after a failed login (with backoff).
async fn token_task(sh: Arc<Shared>, stop: CancellationToken) {
    let mut failures = 0u32;
    loop {
        let session = sh.session.load_full();
        let login_broken = sh
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .login
            .is_some();
        let plan = session.life.plan(Instant::now(), login_broken, failures);
        let woken = tokio::select! {
            _ = stop.cancelled() => return,
            _ = sh.token_event.notified() => true,
            _ = async {
                match plan {
                    Some((_, at)) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => false,
        };
        if woken {
            // A login happened (or was asked for); recompute the schedule.
            failures = 0;
            continue;
        }
        let session = sh.session.load_full();
        let res = match plan {
            Some((Step::Login, _)) => sh.relogin(session.generation).await,
            Some((Step::Renew, _)) => sh.renew(&session).await,
            None => continue,
        };
        match res {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                tracing::warn!(backend = KIND, error = %e, retry_in = ?backoff(failures), "vault token maintenance failed; the current token stays in use");
            }
        }
    }
}

/// Re-reads the roots periodically and publishes changes.
async fn bundle_task(sh: Arc<Shared>, stop: CancellationToken) {
    let every = sh.conn.cfg.root_refresh_interval;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = sh.refresh_bundle().await {
            tracing::warn!(backend = KIND, error = %e, "trust bundle refresh failed; keeping the current roots");
        }
    }
}

/// While Vault is marked unreachable, asks `sys/health` every second so readiness
/// comes back without waiting for traffic (a not-ready pod gets none).
async fn probe_task(sh: Arc<Shared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
        let unreachable = sh
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unreachable
            .is_some();
        if !unreachable {
            continue;
        }
        match sh.conn.probe().await {
            Ok(()) => {
                sh.mark_reachable();
                // The token may have expired during the outage.
                sh.token_event.notify_one();
            }
            Err(e) => sh.set_health(|h| h.unreachable = Some(e.to_string())),
        }
    }
}

#[async_trait]
impl super::Plugin for VaultConfig {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn problems(&self, shared: &crate::validate::Shared) -> Vec<crate::validate::FieldError> {
        VaultConfig::problems(self, shared)
    }

    async fn build(&self, ctx: &super::BuildContext) -> Result<Arc<dyn Signer>, super::BuildError> {
        let what = |e| super::BuildError::new("vault", e);
        if self.mode == super::intermediate::BackendMode::Direct {
            let s = VaultSigner::connect(self, ctx.metrics.clone())
                .await
                .map_err(what)?;
            return Ok(Arc::new(s));
        }
        let (cfg, metrics) = (self.clone(), ctx.metrics.clone());
        let connect: super::intermediate::UpstreamConnect = Arc::new(move || {
            let (cfg, metrics) = (cfg.clone(), metrics.clone());
            Box::pin(async move {
                let s = VaultSigner::connect(&cfg, metrics).await.map_err(what)?;
                Ok(Arc::new(s) as Arc<dyn super::intermediate::UpstreamAuthority>)
            })
        });
        super::intermediate::build(KIND, connect, &self.intermediate, ctx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn life(now: Instant, lease: Option<u64>, renewable: bool, full: Option<u64>) -> Lifetime {
        Lifetime {
            refreshed_at: now,
            lease: lease.map(S),
            renewable,
            full_lease: full.map(S),
        }
    }

    #[test]
    fn renews_at_two_thirds_of_the_lease_while_renewals_grant_the_full_lease() {
        let now = Instant::now();
        let l = life(now, Some(3600), true, Some(3600));
        assert_eq!(l.plan(now, false, 0), Some((Step::Renew, now + S(2400))));
    }

    #[test]
    fn logs_in_when_renewals_shrink_or_the_token_is_not_renewable() {
        let now = Instant::now();
        // max TTL in sight: the renewal granted 2 s of a 3 s token.
        let capped = life(now, Some(2), true, Some(3));
        assert_eq!(capped.plan(now, false, 0).unwrap().0, Step::Login);
        let fixed = life(now, Some(60), false, Some(60));
        assert_eq!(fixed.plan(now, false, 0), Some((Step::Login, now + S(40))));
    }

    #[test]
    fn a_token_given_to_the_bridge_is_renewed_before_its_full_lease_is_known() {
        let now = Instant::now();
        let given = life(now, Some(1), true, None);
        let (step, at) = given.plan(now, false, 0).unwrap();
        assert_eq!(step, Step::Renew);
        assert!(at <= now + S(1));
    }

    #[test]
    fn tokens_without_expiry_need_nothing() {
        let now = Instant::now();
        assert_eq!(life(now, None, false, None).plan(now, false, 0), None);
    }

    #[test]
    fn failures_back_off_and_log_in_once_the_token_is_gone() {
        let now = Instant::now();
        let l = life(now, Some(10), true, Some(10));
        assert_eq!(l.plan(now, false, 1), Some((Step::Renew, now + backoff(1))));
        let later = now + S(11);
        assert_eq!(
            l.plan(later, false, 3),
            Some((Step::Login, later + backoff(3)))
        );
        assert_eq!(l.plan(now, true, 0).unwrap().0, Step::Login);
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), S(1));
        assert_eq!(backoff(20), MAX_BACKOFF);
    }

    #[test]
    fn never_schedules_in_a_tight_loop() {
        let now = Instant::now();
        let expired = life(now - S(100), Some(0), true, Some(3));
        let (_, at) = expired.plan(now, false, 0).unwrap();
        assert!(at >= now + MIN_WAIT);
    }
}
