//! istio-ca-bridge: an Istio external CA (`istio.v1.auth.IstioCertificateService`) that
//! authenticates istio-agent and ztunnel, checks their CSRs against their SPIFFE identity
//! and has the certificates signed by a pluggable backend.
//!
//! # Layout
//! - [`app`]: the composition root: builds everything from [`config`] and runs it.
//! - [`server`]: the gRPC edge and the request pipeline: [`server::authn`] (who calls),
//!   [`server::authz`] (which identity it may get), [`server::csr`] (CSR policy),
//!   [`server::policy`] (TTL), [`server::chain`] (verify and lay out the answer),
//!   [`server::tls`] (listener TLS).
//! - [`backend`]: the [`backend::Signer`] seam, the local CA, the remote backends, the
//!   intermediate mode ([`backend::intermediate`]) and decorators.
//! - [`audit`]: the JSON-lines record of every issued certificate.
//! - [`k8s`]: Kubernetes API clients per cluster, TokenReview calls and the pod caches
//!   behind the impersonation check.
//! - [`trust`]: the trust bundle and the serving certificate.
//! - [`admin`], [`metrics`]: the operator's port.
//! - [`cli`]: the `request`, `check-config` and `dev-token` subcommands.
//! - `testing` (feature `testing`, and unit tests): the support code of the integration
//!   tests, compiled once instead of into every test binary.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod audit;
pub mod backend;
pub mod cli;
pub mod config;
pub mod dev;
pub mod identity;
pub mod jwks;
pub mod k8s;
pub mod metrics;
pub mod pki;
pub mod publish;
pub mod rotation;
pub mod server;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod trust;
pub mod validate;

/// Generated from `proto/ca.proto`.
pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("istio.v1.auth");
}

/// Installs the one rustls crypto provider this program uses (aws-lc-rs). Call before
/// building any TLS client or server; calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
