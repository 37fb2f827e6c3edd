//! DigiCert's REST API as the backend uses it: the HTTP client with its credentials (an
//! API key re-read at every call, or a client certificate), one POST and how its answer
//! reads as a [`remote::Failure`] (status, `Retry-After`, DigiCert's error body), whether
//! DigiCert currently refuses the credentials, and `GET /hello` to notice when it accepts
//! them again.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;

use super::{DigicertConfig, KIND};
use crate::backend::SignError;
use crate::backend::remote::{self, Failure, error_chain};
use crate::pki;

#[derive(Debug, thiserror::Error)]
pub enum DigicertError {
    #[error("{0}")]
    Config(String),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

pub(super) fn file_err(path: &std::path::Path, message: impl ToString) -> DigicertError {
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
pub(super) struct Enrollment {
    #[serde(default)]
    certificate: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    request_id: Option<serde_json::Value>,
    #[serde(default)]
    serial_number: Option<String>,
}

/// What an enrollment or pickup answered.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answer {
    /// The certificate PEM: the leaf first, the chain after it.
    Issued(String),
    /// PENDING: the request id to pick up.
    Pending(String),
}

impl Enrollment {
    /// The certificate, or the request id to poll; any other status is a refusal.
    pub(super) fn answer(self, op: &str) -> Result<Answer, SignError> {
        if let Some(pem) = self.certificate.filter(|c| !c.trim().is_empty()) {
            tracing::debug!(
                backend = KIND,
                serial = self.serial_number.as_deref().unwrap_or("?"),
                "DigiCert issued"
            );
            return Ok(Answer::Issued(pem));
        }
        let status = self.status.unwrap_or_default();
        if status.eq_ignore_ascii_case("PENDING") {
            let id = match self.request_id {
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
            return Ok(Answer::Pending(id));
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

/// The DigiCert API client: credentials, one classified POST, the denied state.
pub(super) struct Client {
    http: reqwest::Client,
    api: String,
    key: Option<ApiKey>,
    profile_id: String,
    /// Why DigiCert refused our credentials, until a call succeeds again.
    denied: Mutex<Option<String>>,
}

impl Client {
    /// Reads the credentials and the TLS material; fails when none is usable.
    pub(super) fn new(cfg: &DigicertConfig) -> Result<Self, DigicertError> {
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
        Ok(Self {
            http,
            api: cfg.api_url(),
            key,
            profile_id: cfg.profile_id.clone(),
            denied: Mutex::new(None),
        })
    }

    /// Why DigiCert refuses the credentials, if it does.
    pub(super) fn denied(&self) -> Option<String> {
        self.denied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn set_denied(&self, why: Option<String>) {
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
    /// retried (pickups) or not (enrollments). The caller bounds it by its deadline.
    pub(super) async fn post(
        &self,
        op: &'static str,
        path: &str,
        body: &serde_json::Value,
        idempotent: bool,
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
        let (status, headers, text) = match send.await {
            Err(e) if e.is_connect() => {
                return Err(Failure::Transient(format!(
                    "{op}: cannot connect: {}",
                    error_chain(&e)
                )));
            }
            Err(e) => {
                let m = format!("{op}: {}", error_chain(&e));
                return Err(if idempotent {
                    Failure::Transient(m)
                } else {
                    Failure::Final(SignError::Unavailable(m))
                });
            }
            Ok(r) => r,
        };
        if status.is_success() {
            return serde_json::from_str::<Enrollment>(&text).map_err(|e| {
                Failure::Final(SignError::Internal(format!(
                    "{op}: unreadable answer (HTTP {status}): {e}"
                )))
            });
        }
        Err(self.classify(op, status, &headers, &text, idempotent))
    }

    /// What a failed answer means. 401/403 also mark the credentials as refused.
    fn classify(
        &self,
        op: &str,
        status: StatusCode,
        headers: &reqwest::header::HeaderMap,
        body: &str,
        idempotent: bool,
    ) -> remote::Failure {
        let message = format!("{op}: HTTP {status}: {}", error_text(body));
        match status {
            StatusCode::TOO_MANY_REQUESTS => Failure::Throttled {
                message,
                retry_after: remote::retry_after(headers),
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                let why = match status {
                    StatusCode::UNAUTHORIZED => "the API key or client certificate is not accepted",
                    _ => "the credentials lack permission for this profile",
                };
                tracing::error!(
                    backend = KIND,
                    status = status.as_u16(),
                    profile = %self.profile_id,
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
        }
    }

    /// `GET /hello` with the current credentials: true if DigiCert accepts them.
    pub(super) async fn probe(&self, timeout: Duration) -> bool {
        let Ok(rb) = self.request(reqwest::Method::GET, "hello") else {
            return false;
        };
        matches!(
            tokio::time::timeout(timeout, rb.send()).await,
            Ok(Ok(r)) if r.status().is_success()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let answer = |s: &str| serde_json::from_str::<Enrollment>(s).unwrap().answer("t");
        assert!(matches!(
            answer(r#"{"serial_number":"1","delivery_format":"x509","certificate":"PEM"}"#),
            Ok(Answer::Issued(p)) if p == "PEM"
        ));
        assert!(matches!(
            answer(r#"{"status":"PENDING","request_id":"r-1"}"#),
            Ok(Answer::Pending(id)) if id == "r-1"
        ));
        assert!(matches!(
            answer(r#"{"status":"PENDING","request_id":42}"#),
            Ok(Answer::Pending(id)) if id == "42"
        ));
        assert!(matches!(
            answer(r#"{"status":"PENDING","request_id":"../x"}"#),
            Err(SignError::Internal(_))
        ));
        assert!(matches!(
            answer(r#"{"status":"REJECTED"}"#),
            Err(SignError::Rejected(_))
        ));
        assert!(matches!(answer(r#"{}"#), Err(SignError::Internal(_))));
    }
}
