//! The backend seam: who signs certificates.
//!
//! Every backend (the embedded local CA, Vault, AWS Private CA, DigiCert, and the
//! intermediate mode over Vault or AWS Private CA) implements the small async [`Signer`] trait and is held as
//! `Arc<dyn Signer>`. Remote backends are slow, rate limited and sometimes down, so
//! [`SignError`] tells the caller what to do (retry later, give up, back off) rather than
//! what went wrong inside. Cross-cutting concerns (metrics now; limits, deadlines and
//! coalescing later) are decorators over any `Signer`, see [`instrumented`]; what every
//! backend returns is verified once, by [`checked`].
//!
//! Each backend is a folder (`local/`, `vault/`, `aws_pca/`, `digicert/`) that owns its
//! configuration type, its validation, its client and its unit tests, and implements
//! [`Plugin`] for its config type. `crate::config` lists them in its registry;
//! [`remote`] is the kit every remote backend calls its CA with, and [`intermediate`]
//! turns any [`intermediate::UpstreamAuthority`] into a `Signer`. See
//! docs/architecture.md, "Adding a backend".

pub mod aws_pca;
pub mod cert_manager;
pub mod checked;
pub mod digicert;
pub mod follow;
pub mod instrumented;
pub mod intermediate;
pub mod local;
pub mod remote;
pub mod vault;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;

pub use crate::identity::Subject;
use crate::metrics::Metrics;
use crate::trust::SharedBundle;
use crate::validate::{FieldError, Shared};

/// A checked request to sign. `public_key_der` is the SubjectPublicKeyInfo taken from a
/// CSR whose signature was verified; `csr_der` is kept for remote backends whose API only
/// accepts a CSR (they must still put only `subject` into the certificate).
#[derive(Debug, Clone)]
pub struct SignRequest {
    pub subject: Subject,
    pub public_key_der: Vec<u8>,
    pub csr_der: Vec<u8>,
    /// Requested lifetime after policy; the backend may shorten it (issuer expiry, role caps).
    pub ttl: Duration,
    /// Who asked, for the audit log; `None` for the bridge's own certificates.
    pub caller: Option<CallerRef>,
}

/// The authenticated caller of a workload request, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerRef {
    pub identity: String,
    pub via: &'static str,
    pub cluster_id: Option<String>,
}

/// What a backend issued: the leaf and the intermediates that link it to a root of the
/// trust bundle (leaf-most first, roots excluded).
#[derive(Debug, Clone)]
pub struct IssuedChain {
    pub leaf: CertificateDer<'static>,
    pub intermediates: Vec<CertificateDer<'static>>,
    /// Set by [`checked::Checked`] once the chain passed its check; `None` until then.
    pub verified: Option<Verified>,
    /// Set only by [`local::SigningCa::sign`]: the leaf was signed in this process by a CA
    /// whose key was matched with its certificate when it was loaded.
    own: Option<local::OwnIssuer>,
}

/// What [`checked::Checked`] established about an [`IssuedChain`] it accepted.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The bundle the chain was verified against (so the answer ends in exactly the roots it
    /// was checked with).
    pub bundle: SharedBundle,
    /// What the check read off the leaf, so nobody after it parses the leaf again.
    pub leaf: crate::trust::LeafFacts,
}

impl IssuedChain {
    pub fn new(leaf: CertificateDer<'static>, intermediates: Vec<CertificateDer<'static>>) -> Self {
        Self {
            leaf,
            intermediates,
            verified: None,
            own: None,
        }
    }

    /// The in-process CA that signed this leaf, if one did.
    pub fn own_issuer(&self) -> Option<&local::OwnIssuer> {
        self.own.as_ref()
    }
}

/// Why signing failed, phrased as what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// Transient: backend down, sealed, timed out, not yet ready. Clients retry.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The backend (or our own limiter) is throttling. Clients back off and retry.
    #[error("backend throttled: {reason}")]
    Throttled {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Permanent: the backend refused this request (policy, bad CSR). Do not retry.
    #[error("backend rejected the request: {0}")]
    Rejected(String),
    /// Anything else; a bug or an unexpected answer.
    #[error("backend error: {0}")]
    Internal(String),
}

impl SignError {
    /// Low-cardinality label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SignError::Unavailable(_) => "unavailable",
            SignError::Throttled { .. } => "throttled",
            SignError::Rejected(_) => "rejected",
            SignError::Internal(_) => "internal",
        }
    }
}

/// Whether the backend can sign right now (drives /readyz).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ready,
    NotReady(String),
}

/// The certificate that signed a presented client certificate, as renewal decides on it.
#[derive(Debug, Clone, Copy)]
pub struct IssuerRef<'a> {
    /// Its SubjectPublicKeyInfo (DER).
    pub spki: &'a [u8],
    /// Its subject's common name, if any.
    pub common_name: Option<&'a str>,
}

/// Facts about the CA that signs leaves, for expiry gauges and TTL clamping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SigningCaInfo {
    /// NotAfter of the certificate that signs leaves (unix seconds), if known.
    pub not_after: Option<i64>,
}

/// What every CA the bridge talks to has, whether it signs leaves ([`Signer`]) or the
/// bridge's intermediates ([`intermediate::UpstreamAuthority`]).
pub trait Authority: Send + Sync + 'static {
    /// Short backend name for logs and metric labels (`local`, `vault`, ...).
    fn kind(&self) -> &'static str;

    /// The current trust bundle; the receiver sees every later change.
    fn trust_bundle(&self) -> watch::Receiver<SharedBundle>;

    /// Whether the CA can be used right now (drives /readyz).
    fn health(&self) -> Health;

    /// Which roots of [`Self::trust_bundle`] this CA can sign under; the others are only
    /// trusted (a federated root, or one added to a bundle file). A new root among these
    /// starts a rotation of the upstream root ([`follow`]); a new one among the others is
    /// just published. `None`: it cannot tell, so every root is.
    fn signing_roots(&self) -> Option<Vec<CertificateDer<'static>>> {
        None
    }
}

/// Implements [`Authority`] for a decorator by forwarding to the signer in `self.$field`.
macro_rules! forward_authority {
    ($ty:ty, $field:ident) => {
        impl $crate::backend::Authority for $ty {
            fn kind(&self) -> &'static str {
                self.$field.kind()
            }
            fn trust_bundle(&self) -> tokio::sync::watch::Receiver<$crate::trust::SharedBundle> {
                self.$field.trust_bundle()
            }
            fn health(&self) -> $crate::backend::Health {
                self.$field.health()
            }
            fn signing_roots(&self) -> Option<Vec<rustls_pki_types::CertificateDer<'static>>> {
                self.$field.signing_roots()
            }
        }
    };
}
pub(crate) use forward_authority;

/// Inside a decorator's `impl Signer`: forwards the facts about the signing CA (mode,
/// signing CA, renewal issuers, asked lifetime) to `self.$field`, so only `sign` (and, where
/// it matters, the async `refresh_trust_bundle`, which `async_trait` must see) is the
/// decorator's own.
macro_rules! forward_signer_facts {
    ($field:ident) => {
        fn mode(&self) -> &'static str {
            self.$field.mode()
        }
        fn signing_ca(&self) -> $crate::backend::SigningCaInfo {
            self.$field.signing_ca()
        }
        fn issued_under(&self, issuer: &$crate::backend::IssuerRef<'_>) -> bool {
            self.$field.issued_under(issuer)
        }
        fn asked_lifetime(&self, ttl: std::time::Duration) -> std::time::Duration {
            self.$field.asked_lifetime(ttl)
        }
        fn root_rotation(&self) -> Option<std::sync::Arc<dyn $crate::backend::RootRotation>> {
            self.$field.root_rotation()
        }
        fn follow_root_choice(
            &self,
            choice: tokio::sync::watch::Receiver<$crate::backend::RootChoice>,
        ) -> bool {
            self.$field.follow_root_choice(choice)
        }
    };
}
pub(crate) use forward_signer_facts;

#[async_trait]
pub trait Signer: Authority {
    /// `direct` when the backend signs each certificate, `intermediate` when the bridge
    /// signs with its own intermediate from the backend (audit records, logs).
    fn mode(&self) -> &'static str {
        "direct"
    }

    /// Issues a certificate for `req.subject` with `req.public_key_der`. What comes back
    /// is verified by [`checked::Checked`], not by the backend.
    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError>;

    /// Re-reads the trust bundle now, out of schedule; true if it changed. Called when an
    /// answer does not chain to the bundle (the CA's roots may have just rotated).
    async fn refresh_trust_bundle(&self) -> bool {
        false
    }

    fn signing_ca(&self) -> SigningCaInfo {
        SigningCaInfo { not_after: None }
    }

    /// Whether leaves signed by `issuer` were issued by this deployment, so that a client
    /// certificate under it may renew itself (`authn.clientCert`). Default: no; the
    /// operator lists the backend's issuing CAs in `authn.clientCertIssuersFile`.
    fn issued_under(&self, _issuer: &IssuerRef<'_>) -> bool {
        false
    }

    /// The lifetime this backend really asks its CA for when the request's TTL is `ttl`
    /// (DigiCert sends whole validity units). A leaf living longer is refused by
    /// [`checked::Checked`].
    fn asked_lifetime(&self, ttl: Duration) -> Duration {
        ttl
    }

    /// The root rotation this signer runs, if it can rotate its root (the local CA with a
    /// generated root).
    fn root_rotation(&self) -> Option<Arc<dyn RootRotation>> {
        None
    }

    /// Signs under the root `choice` names from now on, following its changes (the upstream
    /// root rotation of [`follow`]). False if this backend cannot choose: the CA signs under
    /// whichever root it has (AWS Private CA, DigiCert), or the operator pinned one
    /// (`issuerRef`).
    fn follow_root_choice(&self, _choice: watch::Receiver<RootChoice>) -> bool {
        false
    }
}

/// Which of its roots an upstream CA should sign under, during and after a rotation of its
/// root ([`follow`]). `None`: the CA's default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootChoice {
    /// Leaves (direct mode) and the bridge's intermediates are signed under this root.
    pub sign_under: Option<CertificateDer<'static>>,
    /// Intermediate mode prepares its next intermediate under this root now, so that the
    /// switch to it is instant (publishing: the new root).
    pub prepare_under: Option<CertificateDer<'static>>,
}

/// Why a rotation request did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// Not now: the text says why and what to do (a wait not over, nothing in progress).
    #[error("{0}")]
    Refused(String),
    /// Another replica changed the state first; read the status and try again.
    #[error("another replica changed the rotation state first; check `rotate status` and retry")]
    Conflict,
    /// The shared state cannot be read or written.
    #[error("{0}")]
    Unavailable(String),
}

/// A running root rotation (see [`crate::rotation`]), driven from the admin port.
#[async_trait]
pub trait RootRotation: Send + Sync {
    async fn status(&self) -> Result<crate::rotation::RotationStatus, RotationError>;
    /// Generates the next root and begins publishing it.
    async fn start(&self, reason: &str) -> Result<crate::rotation::RotationStatus, RotationError>;
    async fn step(
        &self,
        step: crate::rotation::Step,
    ) -> Result<crate::rotation::RotationStatus, RotationError>;
    /// Every transition this replica writes (for the audit log).
    fn transitions(&self) -> tokio::sync::broadcast::Receiver<crate::rotation::Transition>;
}

/// What building a backend needs from the rest of the config.
#[derive(Clone)]
pub struct BuildContext {
    /// The top-level trust domain (the local CA's generated root is named after it).
    pub trust_domain: String,
    /// `policy.maxTtl`: intermediate mode switches early enough for it.
    pub max_leaf_ttl: Duration,
    pub metrics: Arc<Metrics>,
    /// The `rotation` section.
    pub rotation: crate::rotation::RotationConfig,
    /// Where a generated local CA is shared between replicas (a Kubernetes Secret, built by
    /// the composition root); `None`: the local CA's state directory.
    pub ca_store: Option<Arc<dyn local::CaStore>>,
}

/// A backend that could not be built, with the cause as its source (so an error chain,
/// `{:#}`, prints it once).
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct BuildError {
    what: &'static str,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl BuildError {
    /// `what` names the backend as an operator knows it ("vault", "AWS Private CA").
    pub fn new(
        what: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            what,
            source: source.into(),
        }
    }
}

/// A backend's side of the configuration: what the registry in `crate::config`
/// dispatches to. Implemented by each backend's config type.
#[async_trait]
pub trait Plugin: Send + Sync {
    /// The backend's name in logs and metric labels, as its `Signer` reports it.
    fn kind(&self) -> &'static str;

    /// Problems, with fields relative to the `backend` section.
    fn problems(&self, shared: &Shared) -> Vec<FieldError>;

    /// Logs in, fetches the trust bundle and returns the signer; in intermediate mode also
    /// obtains the first intermediate.
    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn Signer>, BuildError>;
}
