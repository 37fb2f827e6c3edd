//! Which identity a caller may be certified as: its own, or (ztunnel only) the identity of
//! another pod on its node.
//!
//! Impersonation needs a pod-level check (the caller's pod and a pod with the requested
//! service account on the same node), which is a [`NodeAuthorizer`] backed by the
//! Kubernetes API ([`node`], when `authn.kubernetes` is configured).
//! Without one, every impersonation request is refused: the protocol notes call that check
//! a requirement for any CA integrating with ztunnel.

pub mod node;

use std::sync::Arc;

use async_trait::async_trait;

use super::authn::Caller;
use crate::identity::{ServiceAccount, SpiffeId};

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AuthzError {
    #[error("caller {0} is not a trusted node account and cannot impersonate")]
    NotTrustedNode(String),
    #[error("impersonated identity is not a SPIFFE ID: {0}")]
    BadTarget(String),
    #[error("impersonated identity {target} is outside the caller's trust domain {caller_td}")]
    OtherTrustDomain { target: String, caller_td: String },
    #[error("impersonation requires the Kubernetes node authorizer, which is not configured")]
    NotEnabled,
    #[error("impersonation of {target} denied: {reason}")]
    Denied { target: String, reason: String },
    /// The node check cannot be made yet (pod cache not synced, API server unreachable):
    /// the caller should retry, so this is not an authentication failure.
    #[error("impersonation of {target} cannot be checked yet: {reason}")]
    NotReady { target: String, reason: String },
}

impl AuthzError {
    /// Transient: the same request may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, AuthzError::NotReady { .. })
    }
}

/// Why a [`NodeAuthorizer`] said no.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeDenial {
    /// The facts say no (other node, dead pod, uid mismatch...).
    Denied(String),
    /// The facts are not known yet; retrying later may succeed.
    NotReady(String),
}

impl From<String> for NodeDenial {
    fn from(reason: String) -> Self {
        NodeDenial::Denied(reason)
    }
}

impl From<&str> for NodeDenial {
    fn from(reason: &str) -> Self {
        NodeDenial::Denied(reason.to_string())
    }
}

/// Checks that a trusted node agent may act for `target` (pods on the same node).
#[async_trait]
pub trait NodeAuthorizer: Send + Sync + 'static {
    async fn authorize(&self, caller: &Caller, target: &SpiffeId) -> Result<(), NodeDenial>;
}

pub struct Authorizer {
    trusted_node_accounts: Vec<ServiceAccount>,
    node: Option<Arc<dyn NodeAuthorizer>>,
}

impl Authorizer {
    pub fn new(
        trusted_node_accounts: Vec<ServiceAccount>,
        node: Option<Arc<dyn NodeAuthorizer>>,
    ) -> Self {
        Self {
            trusted_node_accounts,
            node,
        }
    }

    /// istiod's default trusted node account.
    pub fn default_accounts() -> Vec<ServiceAccount> {
        vec![ServiceAccount::new("istio-system", "ztunnel").expect("valid")]
    }

    /// The identity to certify for this call.
    pub async fn target(
        &self,
        caller: &Caller,
        impersonated: Option<&str>,
    ) -> Result<SpiffeId, AuthzError> {
        let Some(requested) = impersonated else {
            return Ok(caller.identity.clone());
        };
        if !self
            .trusted_node_accounts
            .contains(caller.identity.account())
        {
            return Err(AuthzError::NotTrustedNode(caller.identity.to_string()));
        }
        let target =
            SpiffeId::parse(requested).map_err(|e| AuthzError::BadTarget(format!("{e}")))?;
        if target.trust_domain() != caller.identity.trust_domain() {
            return Err(AuthzError::OtherTrustDomain {
                target: target.to_string(),
                caller_td: caller.identity.trust_domain().to_string(),
            });
        }
        let Some(node) = &self.node else {
            return Err(AuthzError::NotEnabled);
        };
        node.authorize(caller, &target)
            .await
            .map_err(|denial| match denial {
                NodeDenial::Denied(reason) => AuthzError::Denied {
                    target: target.to_string(),
                    reason,
                },
                NodeDenial::NotReady(reason) => AuthzError::NotReady {
                    target: target.to_string(),
                    reason,
                },
            })?;
        Ok(target)
    }
}
