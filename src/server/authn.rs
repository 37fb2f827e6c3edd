//! Caller authentication: who is calling, as a SPIFFE identity.
//!
//! Each way of proving identity is an [`Authenticator`]; a [`Chain`] tries them in order
//! (client certificate, then JWT issuers, then Kubernetes TokenReview, which leaves the
//! configured issuers' tokens to them) and the first that yields a [`Caller`] wins. An authenticator answers `Ok(None)`
//! when the request carries no credential of its kind, and an error when it does but the
//! credential is invalid; the chain still tries the others (like istiod), and reports all
//! reasons if none succeeds.

pub mod client_cert;
pub mod jwt;
pub mod token_review;

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use rustls_pki_types::CertificateDer;

use crate::identity::SpiffeId;

/// What the authenticators may look at.
#[derive(Debug, Default, Clone, Copy)]
pub struct RequestContext<'a> {
    /// Raw `authorization` header value.
    pub authorization: Option<&'a str>,
    /// `clusterid` header: the cluster the caller says it runs in.
    pub cluster_id: Option<&'a str>,
    /// TLS client certificate chain, if one was presented (leaf first).
    pub peer_certs: Option<&'a [CertificateDer<'static>]>,
    pub remote_addr: Option<SocketAddr>,
}

impl<'a> RequestContext<'a> {
    /// The bearer token, `None` if there is no authorization header, an error if the header
    /// is not a bearer credential.
    pub fn bearer(&self) -> Result<Option<&'a str>, AuthnError> {
        let Some(h) = self.authorization else {
            return Ok(None);
        };
        let h = h.trim();
        let (scheme, token) = h.split_once(' ').unwrap_or((h, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthnError::Malformed(
                "authorization header is not a Bearer token".into(),
            ));
        }
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthnError::Malformed("empty bearer token".into()));
        }
        Ok(Some(token))
    }

    /// The cluster id, with empty treated as absent.
    pub fn cluster(&self) -> Option<&'a str> {
        self.cluster_id.filter(|c| !c.is_empty())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ClientCert,
    Jwt,
    TokenReview,
}

impl AuthMethod {
    pub fn as_str(&self) -> &'static str {
        match self {
            AuthMethod::ClientCert => "client_cert",
            AuthMethod::Jwt => "jwt",
            AuthMethod::TokenReview => "token_review",
        }
    }
}

/// The pod behind a caller, when the authenticator knows it (TokenReview does); needed to
/// authorize ztunnel impersonation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub name: String,
    pub uid: String,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: SpiffeId,
    /// The cluster the credential proves (a TokenReview by that cluster's API server, or a
    /// JWT issuer configured with `clusterId`); `None` when nothing proves one, whatever
    /// the `clusterid` header says. Audit records carry this.
    pub cluster: Option<String>,
    pub via: AuthMethod,
    pub pod: Option<PodRef>,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AuthnError {
    #[error("no credentials presented")]
    NoCredentials,
    #[error("malformed credentials: {0}")]
    Malformed(String),
    #[error("invalid credentials: {0}")]
    Invalid(String),
    /// We could not check the credential (e.g. keys never loaded): our problem, not the
    /// caller's, so the caller should retry.
    #[error("authenticator unavailable: {0}")]
    Unavailable(String),
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    All(Vec<AuthnError>),
}

impl AuthnError {
    /// Low-cardinality label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthnError::NoCredentials => "no_credentials",
            AuthnError::Malformed(_) => "malformed",
            AuthnError::Invalid(_) => "invalid",
            AuthnError::Unavailable(_) => "unavailable",
            AuthnError::All(v) => v.first().map(|e| e.reason()).unwrap_or("invalid"),
        }
    }

    /// True if the failure is ours (the caller should retry), not the caller's.
    pub fn is_unavailable(&self) -> bool {
        match self {
            AuthnError::Unavailable(_) => true,
            AuthnError::All(v) => !v.is_empty() && v.iter().all(|e| e.is_unavailable()),
            _ => false,
        }
    }
}

#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    async fn authenticate(&self, ctx: &RequestContext<'_>) -> Result<Option<Caller>, AuthnError>;
}

/// Authenticators tried in order.
#[derive(Clone, Default)]
pub struct Chain {
    authenticators: Vec<Arc<dyn Authenticator>>,
}

impl Chain {
    pub fn new(authenticators: Vec<Arc<dyn Authenticator>>) -> Self {
        Self { authenticators }
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.authenticators.iter().map(|a| a.name()).collect()
    }

    pub async fn authenticate(&self, ctx: &RequestContext<'_>) -> Result<Caller, AuthnError> {
        let mut errors = Vec::new();
        for a in &self.authenticators {
            match a.authenticate(ctx).await {
                Ok(Some(caller)) => return Ok(caller),
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        match errors.len() {
            0 => Err(AuthnError::NoCredentials),
            1 => Err(errors.pop().expect("one")),
            _ => Err(AuthnError::All(errors)),
        }
    }
}
