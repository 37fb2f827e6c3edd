//! The Vault (and OpenBao) PKI backend: every certificate is signed by a PKI role through
//! `POST /v1/<mount>/sign/<role>` (or `/v1/<mount>/issuer/<ref>/sign/<role>`), never
//! through `sign-verbatim`, which would copy whatever the CSR asks for. In intermediate
//! mode the mount's issuer signs the bridge's intermediate instead.
//!
//! The backend is split by concern:
//! - `config`: [`VaultConfig`], the `backend` section, its validation and tests;
//! - `client`: the HTTP client towards Vault (the project's reqwest + rustls/aws-lc-rs,
//!   the configured CA bundle and optional client certificate, a per-call timeout) and
//!   the login for every auth method;
//! - `session`: the token lifecycle (renewal before expiry, a new login when a renewal
//!   hits the token's max TTL or Vault refuses the token), the trust bundle (the
//!   self-signed certificates of the mount's CA chain and/or a bundle file, refreshed
//!   periodically and on demand) and health (not ready while Vault is unreachable or
//!   sealed, or the bridge cannot log in), kept by background tasks so that a sign call
//!   only reads the current token;
//! - `signer`: [`VaultSigner`], the sign calls (retried by the remote kit,
//!   `backend::remote`, within `requestTimeout`) and what Vault's answers mean for the
//!   caller. What Vault issues is verified by the central check (`backend::checked`),
//!   not here.
//!
//! # vaultrs and direct calls
//! The `vaultrs` crate covers the AppRole / Kubernetes / JWT logins and `renew-self` /
//! `lookup-self`, and is used for those. We use the 0.7 line: it is built on reqwest 0.12
//! like the rest of the bridge, and its `VaultClient` has public fields, so it is
//! assembled here around our own `reqwest::Client`: one HTTP and TLS stack (rustls with
//! aws-lc-rs; no ring, no native-tls) and no environment variables (`VAULT_ADDR`,
//! `VAULT_TOKEN`, `VAULT_SKIP_VERIFY`) consulted behind the config's back. vaultrs 0.8
//! moved to reqwest 0.13 and its own TLS feature set, which would compile in a second
//! HTTP client stack. The rest goes directly over the same client: the sign calls (role
//! and issuer path alike: vaultrs has no issuer-path sign and does not pass on an
//! answer's `Retry-After`), `sys/health`, and the CA chain (`<mount>/ca_chain` as PEM and
//! `<mount>/issuer/<ref>/json`; vaultrs only has `cert/ca_chain`, which would cover the
//! default issuer alone, so one direct path serves both cases).
//! vaultrs also logs failed requests itself (at ERROR, without bodies or tokens, and
//! without the cause); the binary's default log filter turns `vaultrs` and `rustify` off,
//! since this module logs the same failures with their cause.

mod client;
mod config;
mod session;
mod signer;

pub use client::VaultError;
pub use config::*;
pub use signer::VaultSigner;

use std::sync::Arc;

use async_trait::async_trait;

use super::{BuildContext, BuildError, Plugin, Signer, remote};
use crate::validate::{FieldError, Shared};

/// The backend's name in logs and metric labels.
pub(crate) const KIND: &str = "vault";

#[async_trait]
impl Plugin for VaultConfig {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn problems(&self, shared: &Shared) -> Vec<FieldError> {
        VaultConfig::problems(self, shared)
    }

    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn Signer>, BuildError> {
        let cfg = self.clone();
        remote::build_in_mode(KIND, self.mode, &self.intermediate, ctx, move |metrics| {
            let cfg = cfg.clone();
            async move {
                let signer = VaultSigner::connect(&cfg, metrics)
                    .await
                    .map_err(|e| BuildError::new("vault", e))?;
                Ok(Arc::new(signer))
            }
        })
        .await
    }
}
