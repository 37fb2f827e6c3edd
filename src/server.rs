//! The gRPC edge: `istio.v1.auth.IstioCertificateService/CreateCertificate`.
//!
//! One request, end to end: authenticate the caller ([`authn`]), decide which identity it
//! may be certified as ([`authz`]), check the CSR ([`csr`]) and the TTL ([`policy`]), have
//! the backend sign (its answer is verified by [`crate::backend::checked`]) and lay out
//! the chain ([`chain`]). The serving certificate is [`serving`]'s. Every step
//! has its own error type; [`to_status`] is the only place that turns them into gRPC
//! codes (protocol doc section 7), with a short message for the caller and the full
//! reason in the log.

pub mod authn;
pub mod authz;
pub mod chain;
pub mod csr;
pub mod policy;
pub mod serving;
pub mod tarpit;
pub mod tls;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use crate::backend::{CallerRef, SignError, SignRequest, Signer, Subject};
use crate::config::PolicyConfig;
use crate::metrics::Metrics;
use crate::pb::istio_certificate_service_server::IstioCertificateService;
use crate::pb::{IstioCertificateRequest, IstioCertificateResponse};

/// Metadata key ztunnel uses to ask for another pod's identity.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Everything that can go wrong with one request.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("authentication failed: {0}")]
    Authn(#[from] authn::AuthnError),
    #[error("not authorized: {0}")]
    Authz(#[from] authz::AuthzError),
    #[error("CSR rejected: {0}")]
    Csr(#[from] csr::CsrError),
    #[error("TTL rejected: {0}")]
    Ttl(#[from] policy::TtlError),
    #[error("signing failed: {0}")]
    Sign(#[from] SignError),
    /// The signer's answer reached the edge without passing
    /// [`crate::backend::checked::Checked`]: a composition bug, never handed out.
    #[error("bug: the issued chain was not verified before answering")]
    BugUnchecked,
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    #[error("abandoned: the shutdown grace period is over")]
    ShuttingDown,
}

impl RequestError {
    /// istiod's `citadel_server_csr_sign_err_count{error=...}` label, if this error counts.
    fn citadel_error(&self) -> Option<&'static str> {
        match self {
            RequestError::Authn(_) | RequestError::Authz(_) => None,
            RequestError::Csr(e) if e.is_identity_mismatch() => None,
            RequestError::Csr(_) => Some("CSR_ERROR"),
            RequestError::Ttl(_) => Some("TTL_ERROR"),
            RequestError::Sign(SignError::Unavailable(_))
            | RequestError::Timeout(_)
            | RequestError::ShuttingDown => Some("CA_NOT_READY"),
            RequestError::Sign(SignError::Rejected(_)) => Some("CSR_ERROR"),
            RequestError::Sign(_) | RequestError::BugUnchecked => Some("CERT_GEN_ERROR"),
        }
    }
}

/// The one mapping from errors to gRPC status (protocol doc section 7). istio-agent only
/// retries INTERNAL, UNAVAILABLE, RESOURCE_EXHAUSTED and ABORTED, so permanent rejections
/// must never use those codes. Messages are short and never contain credentials.
pub fn to_status(e: &RequestError) -> Status {
    match e {
        RequestError::Authn(a) if a.is_unavailable() => {
            Status::unavailable("authentication temporarily unavailable, retry later")
        }
        RequestError::Authn(_) => Status::unauthenticated("authentication failed"),
        RequestError::Authz(a) if a.is_transient() => {
            Status::unavailable("impersonation cannot be checked yet, retry later")
        }
        RequestError::Authz(_) => {
            Status::unauthenticated("not authorized for the requested identity")
        }
        RequestError::Csr(c) if c.is_identity_mismatch() => {
            Status::unauthenticated("CSR identity does not match the caller")
        }
        RequestError::Csr(c) => Status::invalid_argument(format!("invalid CSR: {c}")),
        RequestError::Ttl(t) => Status::invalid_argument(t.to_string()),
        RequestError::Sign(SignError::Unavailable(_)) => {
            Status::unavailable("certificate backend unavailable, retry later")
        }
        RequestError::Sign(SignError::Throttled { .. }) => {
            Status::resource_exhausted("certificate backend busy, retry later")
        }
        RequestError::Sign(SignError::Rejected(_)) => {
            Status::invalid_argument("certificate backend rejected the request")
        }
        RequestError::Sign(SignError::Internal(_)) | RequestError::BugUnchecked => {
            Status::internal("certificate issuance failed")
        }
        RequestError::Timeout(_) => {
            Status::unavailable("certificate issuance timed out, retry later")
        }
        RequestError::ShuttingDown => Status::unavailable("server shutting down, retry"),
    }
}

/// gRPC code name for metric labels.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The CreateCertificate handler and what it needs.
#[derive(Clone)]
pub struct CaService {
    inner: Arc<Inner>,
}

struct Inner {
    authn: authn::Chain,
    authz: authz::Authorizer,
    signer: Arc<dyn Signer>,
    csr_policy: csr::CsrPolicy,
    policy: PolicyConfig,
    request_timeout: Duration,
    metrics: Arc<Metrics>,
    /// Cancelled when the shutdown grace period is over: calls still running are answered
    /// UNAVAILABLE and their work dropped, so nothing is issued after the server said it
    /// stopped (tonic runs connections in their own tasks, which outlive the server future).
    hard_stop: tokio_util::sync::CancellationToken,
    /// Per-connection budget of authentication failures.
    tarpit: tarpit::Tarpit,
}

/// Request limits and policy for [`CaService`].
pub struct Settings {
    pub policy: PolicyConfig,
    pub max_csr_bytes: usize,
    pub request_timeout: Duration,
}

impl CaService {
    pub fn new(
        authn: authn::Chain,
        authz: authz::Authorizer,
        signer: Arc<dyn Signer>,
        settings: Settings,
        metrics: Arc<Metrics>,
        hard_stop: tokio_util::sync::CancellationToken,
    ) -> Self {
        let Settings {
            policy,
            max_csr_bytes,
            request_timeout,
        } = settings;
        let csr_policy = csr::CsrPolicy {
            key_types: policy.key_types.clone(),
            min_rsa_bits: policy.min_rsa_bits,
            max_bytes: max_csr_bytes,
        };
        Self {
            inner: Arc::new(Inner {
                authn,
                authz,
                signer,
                csr_policy,
                policy,
                request_timeout,
                metrics,
                hard_stop,
                tarpit: tarpit::Tarpit::default(),
            }),
        }
    }
}

/// Decrements the in-flight gauge even if the call future is dropped (client gone).
struct InFlight<'a>(&'a Metrics);
impl<'a> InFlight<'a> {
    fn new(m: &'a Metrics) -> Self {
        m.in_flight.inc();
        Self(m)
    }
}
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// What the log line of a successful call reports.
struct Issued {
    chain: Vec<String>,
    identity: String,
    via: &'static str,
    ttl: Duration,
    clamped: bool,
}

impl Inner {
    async fn handle(&self, req: &Request<IstioCertificateRequest>) -> Result<Issued, RequestError> {
        let md = req.metadata();
        let header = |k: &str| md.get(k).and_then(|v| v.to_str().ok());
        let peer_certs = req.peer_certs();
        let ctx = authn::RequestContext {
            authorization: header("authorization"),
            cluster_id: header("clusterid"),
            peer_certs: peer_certs.as_deref().map(|v| v.as_slice()),
            remote_addr: req.remote_addr(),
        };
        let caller = self.authn.authenticate(&ctx).await?;
        let body = req.get_ref();
        let impersonated = body
            .metadata
            .as_ref()
            .and_then(|s| s.fields.get(IMPERSONATED_IDENTITY))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.as_str()),
                _ => None,
            })
            .filter(|s| !s.is_empty());
        let target = self.authz.target(&caller, impersonated).await?;
        let checked = csr::check(body.csr.as_bytes(), &target, &self.csr_policy)?;
        let (ttl, clamped) = policy::ttl(body.validity_duration, &self.policy)?;
        let subject = Subject::Workload(target.clone());
        let sign_req = SignRequest {
            subject: subject.clone(),
            public_key_der: checked.public_key_der,
            csr_der: checked.csr_der,
            ttl,
            caller: Some(CallerRef {
                identity: caller.identity.to_string(),
                via: caller.via.as_str(),
                cluster_id: caller.cluster.clone(),
            }),
        };
        let issued = self.signer.sign(&sign_req).await?;
        let bundle = &issued
            .verified
            .as_ref()
            .ok_or(RequestError::BugUnchecked)?
            .bundle;
        let chain = chain::layout(&issued, bundle);
        Ok(Issued {
            chain,
            identity: target.to_string(),
            via: caller.via.as_str(),
            ttl,
            clamped,
        })
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let inner = &self.inner;
        let m = &inner.metrics;
        let _in_flight = InFlight::new(m);
        let start = Instant::now();
        m.csr_count.inc();
        let span = tracing::info_span!("create_certificate", remote = ?request.remote_addr());
        let res = async {
            tokio::select! {
                r = tokio::time::timeout(inner.request_timeout, inner.handle(&request)) => match r {
                    Ok(r) => r,
                    Err(_) => Err(RequestError::Timeout(inner.request_timeout)),
                },
                _ = inner.hard_stop.cancelled() => Err(RequestError::ShuttingDown),
            }
        }
        .instrument(span.clone())
        .await;
        let elapsed = start.elapsed().as_secs_f64();
        let _e = span.enter();
        match res {
            Ok(issued) => {
                m.success_issuance.inc();
                m.requests_ok.inc();
                m.request_duration_ok.observe(elapsed);
                tracing::info!(
                    identity = %issued.identity,
                    via = issued.via,
                    ttl_secs = issued.ttl.as_secs(),
                    clamped = issued.clamped,
                    "certificate issued"
                );
                Ok(Response::new(IstioCertificateResponse {
                    cert_chain: issued.chain,
                }))
            }
            Err(e) => {
                let status = to_status(&e);
                let mut hold = None;
                match &e {
                    RequestError::Authn(a) => {
                        if !a.is_unavailable()
                            && let Some(peer) = request.remote_addr()
                        {
                            hold = inner.tarpit.on_failure(peer);
                        }
                        m.authn_failures.inc();
                        m.authn_failure_reasons
                            .with_label_values(&[a.reason()])
                            .inc();
                    }
                    RequestError::Authz(a) => {
                        m.authn_failures.inc();
                        let reason = if a.is_transient() {
                            "unavailable"
                        } else {
                            "impersonation_denied"
                        };
                        m.authn_failure_reasons.with_label_values(&[reason]).inc();
                    }
                    RequestError::Csr(c) if c.is_identity_mismatch() => {
                        m.authn_failures.inc();
                        m.authn_failure_reasons
                            .with_label_values(&["identity_mismatch"])
                            .inc();
                    }
                    _ => {}
                }
                if let Some(label) = e.citadel_error() {
                    m.csr_sign_errors.with_label_values(&[label]).inc();
                }
                m.requests
                    .with_label_values(&["error", code_name(status.code())])
                    .inc();
                m.request_duration
                    .with_label_values(&["error"])
                    .observe(elapsed);
                match status.code() {
                    Code::Internal | Code::Unavailable | Code::ResourceExhausted => {
                        tracing::warn!(code = code_name(status.code()), error = %e, "request failed")
                    }
                    _ => {
                        tracing::info!(code = code_name(status.code()), error = %e, "request rejected")
                    }
                }
                if let Some(d) = hold {
                    m.tarpitted.inc();
                    drop(_e);
                    let d = d.min(inner.request_timeout.saturating_sub(start.elapsed()));
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = inner.hard_stop.cancelled() => {}
                    }
                }
                Err(status)
            }
        }
    }
}
