//! Workload identities: SPIFFE IDs of the Istio shape and Kubernetes service accounts.
//!
//! Istio only ever certifies `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//! so this module accepts exactly that shape and nothing looser: every other module can
//! then rely on a `SpiffeId` being well formed.

use std::fmt;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("not a SPIFFE ID (must start with spiffe://)")]
    NotSpiffe,
    #[error("SPIFFE ID must have the form spiffe://<trust-domain>/ns/<namespace>/sa/<account>")]
    BadPath,
    #[error("invalid trust domain {0:?}")]
    BadTrustDomain(String),
    #[error("invalid {what} {value:?} (must be a Kubernetes DNS label or subdomain)")]
    BadName { what: &'static str, value: String },
    #[error("subject must be system:serviceaccount:<namespace>:<name>")]
    NotServiceAccount,
}

/// A namespace + service account pair, e.g. from a token's `sub`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccount {
    /// Parses `system:serviceaccount:<ns>:<sa>` (the Kubernetes username / JWT `sub`).
    pub fn from_k8s_username(s: &str) -> Result<Self, IdentityError> {
        let rest = s
            .strip_prefix("system:serviceaccount:")
            .ok_or(IdentityError::NotServiceAccount)?;
        let (ns, sa) = rest
            .split_once(':')
            .ok_or(IdentityError::NotServiceAccount)?;
        Self::new(ns, sa).map_err(|_| IdentityError::NotServiceAccount)
    }

    /// Parses `<ns>/<sa>` (the form used in config, like istiod's CA_TRUSTED_NODE_ACCOUNTS).
    pub fn from_slash(s: &str) -> Result<Self, IdentityError> {
        let (ns, sa) = s.split_once('/').ok_or(IdentityError::BadName {
            what: "service account (want <namespace>/<name>)",
            value: s.to_string(),
        })?;
        Self::new(ns, sa)
    }

    pub fn new(namespace: &str, name: &str) -> Result<Self, IdentityError> {
        check_name("namespace", namespace)?;
        check_name("service account", name)?;
        Ok(Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    account: ServiceAccount,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, account: ServiceAccount) -> Result<Self, IdentityError> {
        let trust_domain = normalize_trust_domain(trust_domain)?;
        Ok(Self {
            trust_domain,
            account,
        })
    }

    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or(IdentityError::NotSpiffe)?;
        let (td, path) = rest.split_once('/').ok_or(IdentityError::BadPath)?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] => {
                // Parsing must round-trip exactly: no normalisation of what the caller sent.
                if normalize_trust_domain(td)? != td {
                    return Err(IdentityError::BadTrustDomain(td.to_string()));
                }
                Self::new(td, ServiceAccount::new(ns, sa)?)
            }
            _ => Err(IdentityError::BadPath),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    pub fn account(&self) -> &ServiceAccount {
        &self.account
    }
    pub fn namespace(&self) -> &str {
        &self.account.namespace
    }
    pub fn service_account(&self) -> &str {
        &self.account.name
    }
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.account.namespace, self.account.name
        )
    }
}

/// Istio replaces `@` with `.` in trust domains; SPIFFE allows lowercase letters, digits,
/// `.`, `-` and `_`.
pub fn normalize_trust_domain(td: &str) -> Result<String, IdentityError> {
    let td = td.replace('@', ".");
    let ok = !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_'
        });
    if ok {
        Ok(td)
    } else {
        Err(IdentityError::BadTrustDomain(td))
    }
}

fn check_name(what: &'static str, value: &str) -> Result<(), IdentityError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !value.starts_with(['-', '.'])
        && !value.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadName {
            what,
            value: value.to_string(),
        })
    }
}

/// What a certificate is for. Backends build the certificate from this, never from the
/// CSR's own contents, and every issued leaf is checked against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A workload: one URI SAN, the SPIFFE ID; client and server auth.
    Workload(SpiffeId),
    /// The bridge's own serving certificate (or istiod's): DNS names / IP literals.
    Server { dns_names: Vec<String> },
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Workload(id) => write!(f, "{id}"),
            Subject::Server { dns_names } => write!(f, "dns:{}", dns_names.join(",")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_shape() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/bookinfo").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo"
        );
    }

    #[test]
    fn rejects_other_shapes() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://a@b/ns/a/sa/b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn service_account_subjects() {
        let sa = ServiceAccount::from_k8s_username("system:serviceaccount:istio-system:ztunnel")
            .unwrap();
        assert_eq!(sa.to_string(), "istio-system/ztunnel");
        assert!(ServiceAccount::from_k8s_username("system:node:foo").is_err());
        assert!(ServiceAccount::from_k8s_username("system:serviceaccount:a").is_err());
        assert!(ServiceAccount::from_k8s_username("system:serviceaccount:a:b:c").is_err());
        assert_eq!(
            normalize_trust_domain("corp@example.com").unwrap(),
            "corp.example.com"
        );
    }
}
