//! The HTTP client towards Vault and the login for every auth method.
//!
//! [`Conn`] is stateless access to one server: the project's reqwest client (rustls with
//! aws-lc-rs, the configured CA bundle and optional client certificate, `requestTimeout`
//! on every call), the namespace header, vaultrs clients assembled around that same
//! reqwest client, and [`Conn::login`], which turns the configured credentials into a
//! [`Session`]. Failures come back as [`CallError`]s; what they mean for a caller is
//! decided by the session (renewals, logins) and the signer (sign calls).

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;
use vaultrs::api::EndpointMiddleware;
use vaultrs::client::{VaultClient, VaultClientSettings};

use super::{VaultAuthConfig, VaultConfig};
use crate::backend::remote::{self, error_chain};
use crate::pki;

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
pub(super) enum CallError {
    #[error("cannot reach vault: {0}")]
    Transport(String),
    #[error("vault answered {code}: {}", if errors.is_empty() { "(no message)".to_string() } else { errors.join("; ") })]
    Status {
        code: u16,
        errors: Vec<String>,
        /// The answer's `Retry-After` (Vault sends it with a 429 when
        /// `enable_rate_limit_response_headers` is on); `None` for calls through vaultrs.
        retry_after: Option<Duration>,
    },
    #[error("unexpected answer from vault: {0}")]
    Malformed(String),
}

impl CallError {
    /// Vault is down, sealed, overloaded or unreachable: worth trying again later.
    pub(super) fn is_transient(&self) -> bool {
        match self {
            CallError::Transport(_) => true,
            CallError::Status { code, .. } => matches!(code, 412 | 429 | 500 | 502 | 503 | 504),
            CallError::Malformed(_) => false,
        }
    }

    pub(super) fn code(&self) -> Option<u16> {
        match self {
            CallError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

fn from_vaultrs(e: vaultrs::error::ClientError) -> CallError {
    use rustify::errors::ClientError as R;
    use vaultrs::error::ClientError as V;
    match e {
        V::APIError { code, errors } => CallError::Status {
            code,
            errors,
            retry_after: None,
        },
        V::RestClientError { source } => match source {
            R::ServerResponseError { code, content } => CallError::Status {
                code,
                // Not JSON (a proxy's page?): keep a short excerpt; error pages carry no
                // secrets, request bodies are never part of it.
                errors: content
                    .map(|c| vec![c.chars().take(200).collect()])
                    .unwrap_or_default(),
                retry_after: None,
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

/// Vault's error body.
#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<String>,
}

/// A token and what we know about its lifetime.
pub(super) struct Session {
    /// vaultrs client carrying this token (cheap: shares the HTTP client).
    pub(super) client: VaultClient,
    /// Bumped at every login, so concurrent callers that saw a refused token log in once.
    pub(super) generation: u64,
    pub(super) life: Lifetime,
}

impl Session {
    pub(super) fn token(&self) -> &str {
        &self.client.settings.token
    }
}

/// What Vault told us about a token's lifetime, at login or the last renewal. When to
/// renew it is planned by the session (`Lifetime::plan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Lifetime {
    /// When the token was obtained or last renewed, and the lease granted then.
    pub(super) refreshed_at: Instant,
    /// `None`: the token does not expire (e.g. a root token).
    pub(super) lease: Option<Duration>,
    pub(super) renewable: bool,
    /// The longest lease a login or renewal granted this token; a renewal granting less
    /// has hit the token's max TTL, so the next step is a new login.
    pub(super) full_lease: Option<Duration>,
}

/// Why a login failed.
#[derive(Clone)]
pub(super) enum LoginError {
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

impl From<LoginError> for VaultError {
    fn from(e: LoginError) -> Self {
        VaultError::Login(e.to_string())
    }
}

fn read_secret_file(path: &Path) -> Result<String, LoginError> {
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

/// Stateless access to one Vault server: URL, HTTP client, namespace.
pub(super) struct Conn {
    pub(super) cfg: VaultConfig,
    http: reqwest::Client,
    base: String,
    url: reqwest::Url,
}

impl Conn {
    pub(super) fn new(cfg: &VaultConfig) -> Result<Self, VaultError> {
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
    pub(super) fn vaultrs(&self, token: &str) -> VaultClient {
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
    pub(super) async fn call(
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
        let retry_after = remote::retry_after(resp.headers());
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| CallError::Transport(error_chain(&e)))?;
        if !(200..300).contains(&code) {
            let errors = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.errors)
                .unwrap_or_default();
            return Err(CallError::Status {
                code,
                errors,
                retry_after,
            });
        }
        Ok(bytes)
    }

    /// A direct call answering `{"data": T}`.
    pub(super) async fn call_data<T: serde::de::DeserializeOwned>(
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

    /// `sys/health`: Ok when an unsealed server answers (active or standby).
    pub(super) async fn probe(&self) -> Result<(), CallError> {
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
                retry_after: None,
            }),
            Err(e) => Err(e),
        }
    }

    /// Renews `session`'s token (`auth/token/renew-self`): the new lease and whether the
    /// token can be renewed again.
    pub(super) async fn renew(
        &self,
        session: &Session,
    ) -> Result<(Option<Duration>, bool), CallError> {
        let auth = vaultrs::token::renew_self(&session.client, None)
            .await
            .map_err(from_vaultrs)?;
        Ok((lease(auth.lease_duration), auth.renewable))
    }

    /// Logs in with the configured method and returns the new session (generation 0).
    pub(super) async fn login(&self) -> Result<Session, LoginError> {
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
        let lease = lease(auth.lease_duration);
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
}

/// A lease as Vault reports it in seconds; 0 means the token does not expire.
fn lease(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}
