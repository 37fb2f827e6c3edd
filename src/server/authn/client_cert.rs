//! Client-certificate authentication: a TLS client certificate that chains to the trust
//! bundle proves the SPIFFE identity in its URI SAN. This is how VMs (and anything else
//! holding a mesh certificate) renew once their bootstrap token has expired.
//!
//! The TLS layer accepts any client certificate whose handshake signature verifies (proof
//! of possession) and leaves the chain decision here, so that a bad certificate gets a
//! clear UNAUTHENTICATED instead of a TLS alert, and so that trust bundle rotations apply
//! without rebuilding the TLS config.

use std::time::SystemTime;

use async_trait::async_trait;
use tokio::sync::watch;

use super::{AuthMethod, Authenticator, AuthnError, Caller, RequestContext};
use crate::identity::SpiffeId;
use crate::pki;
use crate::trust::SharedBundle;
use crate::trust::verify_path;

pub struct ClientCertAuthenticator {
    bundle: watch::Receiver<SharedBundle>,
    trust_domains: Vec<String>,
}

impl ClientCertAuthenticator {
    pub fn new(bundle: watch::Receiver<SharedBundle>, trust_domains: Vec<String>) -> Self {
        Self {
            bundle,
            trust_domains,
        }
    }
}

#[async_trait]
impl Authenticator for ClientCertAuthenticator {
    fn name(&self) -> &'static str {
        "client_cert"
    }

    async fn authenticate(&self, ctx: &RequestContext<'_>) -> Result<Option<Caller>, AuthnError> {
        let Some(certs) = ctx.peer_certs.filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        let bundle = self.bundle.borrow().clone();
        verify_path(
            &certs[0],
            &certs[1..],
            &bundle,
            webpki::KeyUsage::client_auth(),
            SystemTime::now(),
        )
        .map_err(|e| AuthnError::Invalid(format!("client certificate not trusted: {e}")))?;
        let info = pki::cert_info(&certs[0])
            .map_err(|e| AuthnError::Malformed(format!("client certificate: {e}")))?;
        let [uri] = info.uri_sans.as_slice() else {
            return Err(AuthnError::Invalid(format!(
                "client certificate must carry exactly one URI SAN, has {}",
                info.uri_sans.len()
            )));
        };
        let identity = SpiffeId::parse(uri)
            .map_err(|e| AuthnError::Invalid(format!("client certificate URI SAN: {e}")))?;
        if !self
            .trust_domains
            .iter()
            .any(|td| td == identity.trust_domain())
        {
            return Err(AuthnError::Invalid(format!(
                "client certificate trust domain {} is not served here",
                identity.trust_domain()
            )));
        }
        Ok(Some(Caller {
            identity,
            // A certificate proves an identity, not a cluster: the header is not evidence.
            cluster: None,
            via: AuthMethod::ClientCert,
            pod: None,
        }))
    }
}
