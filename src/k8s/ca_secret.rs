//! The local CA's shared state in a Kubernetes Secret (as istiod keeps `istio-ca-secret`):
//! every replica reads it, the first creates it, and every change is a `replace` naming the
//! `resourceVersion` it was computed from, so the API server lets exactly one writer win.
//!
//! Keys: `ca-cert.pem` and `ca-key.pem` (the current root), `next-ca-cert.pem` and
//! `next-ca-key.pem` (a rotation's next root), `rotation.json` (the rotation's state).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};

use crate::backend::follow::{RootsDocument, RootsStore, StoredRoots};
use crate::backend::local::{CaDocument, CaStore, KeyedCert, StoreError, Stored};
use crate::rotation::RotationState;

const CERT: &str = "ca-cert.pem";
const KEY: &str = "ca-key.pem";
const NEXT_CERT: &str = "next-ca-cert.pem";
const NEXT_KEY: &str = "next-ca-key.pem";
const ROTATION: &str = "rotation.json";

/// Every call is bounded; a replica that cannot reach the API server keeps signing with
/// what it last read.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct SecretStore {
    api: Api<Secret>,
    namespace: String,
    name: String,
}

impl SecretStore {
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    fn to_secret(&self, doc: &CaDocument, version: Option<&str>) -> Secret {
        let mut data = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
        };
        put(CERT, &doc.current.cert_pem);
        put(KEY, &doc.current.key_pem);
        if let Some(n) = &doc.next {
            put(NEXT_CERT, &n.cert_pem);
            put(NEXT_KEY, &n.key_pem);
        }
        put(
            ROTATION,
            &serde_json::to_string(&doc.rotation).expect("serializable"),
        );
        Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                resource_version: version.map(str::to_string),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "istio-ca-bridge".to_string(),
                )])),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(data),
            ..Default::default()
        }
    }

    fn parse_secret(&self, s: Secret) -> Result<Stored, StoreError> {
        let corrupt = |m: String| StoreError::Corrupt(format!("{}: {m}", self.describe()));
        let version = s
            .metadata
            .resource_version
            .clone()
            .ok_or_else(|| corrupt("no resourceVersion".into()))?;
        let data = s.data.unwrap_or_default();
        let text = |k: &str| -> Result<Option<String>, StoreError> {
            data.get(k)
                .map(|b| {
                    String::from_utf8(b.0.clone()).map_err(|_| corrupt(format!("{k} is not text")))
                })
                .transpose()
        };
        let need = |k: &str| text(k)?.ok_or_else(|| corrupt(format!("{k} is missing")));
        let current = KeyedCert {
            cert_pem: need(CERT)?,
            key_pem: need(KEY)?,
        };
        let next = match (text(NEXT_CERT)?, text(NEXT_KEY)?) {
            (Some(cert_pem), Some(key_pem)) => Some(KeyedCert { cert_pem, key_pem }),
            (None, None) => None,
            _ => {
                return Err(corrupt(format!(
                    "{NEXT_CERT} and {NEXT_KEY} must come together"
                )));
            }
        };
        let rotation: RotationState = match text(ROTATION)? {
            Some(j) => serde_json::from_str(&j).map_err(|e| corrupt(format!("{ROTATION}: {e}")))?,
            None => RotationState::default(),
        };
        Ok(Stored {
            doc: CaDocument {
                current,
                next,
                rotation,
            },
            version,
        })
    }
}

fn api_error(what: &str, e: kube::Error) -> StoreError {
    match e {
        kube::Error::Api(s) if s.code == 409 => StoreError::Conflict,
        e => StoreError::Unavailable(format!("{what}: {e}")),
    }
}

async fn bounded<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r.map_err(|e| api_error(what, e)),
        Err(_) => Err(StoreError::Unavailable(format!("{what}: timed out"))),
    }
}

#[async_trait]
impl CaStore for SecretStore {
    fn describe(&self) -> String {
        format!("Secret {}/{}", self.namespace, self.name)
    }

    async fn load(&self) -> Result<Option<Stored>, StoreError> {
        let what = format!("reading {}", self.describe());
        bounded(&what, self.api.get_opt(&self.name))
            .await?
            .map(|s| self.parse_secret(s))
            .transpose()
    }

    async fn create(&self, doc: &CaDocument) -> Result<Stored, StoreError> {
        let what = format!("creating {}", self.describe());
        let s = bounded(
            &what,
            self.api
                .create(&PostParams::default(), &self.to_secret(doc, None)),
        )
        .await?;
        self.parse_secret(s)
    }

    async fn replace(&self, doc: &CaDocument, version: &str) -> Result<Stored, StoreError> {
        let what = format!("updating {}", self.describe());
        let s = bounded(
            &what,
            self.api.replace(
                &self.name,
                &PostParams::default(),
                &self.to_secret(doc, Some(version)),
            ),
        )
        .await?;
        self.parse_secret(s)
    }
}

/// A remote backend's root rotation state ([`crate::backend::follow`]) as the key
/// `upstream-roots.json` of the same Secret. Other keys of the Secret are kept as they are:
/// every write reads it, merges, and names the `resourceVersion` it read.
pub struct UpstreamRootsSecret {
    api: Api<Secret>,
    namespace: String,
    name: String,
}

const UPSTREAM_ROOTS: &str = "upstream-roots.json";

impl UpstreamRootsSecret {
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    fn parse(&self, s: &Secret) -> Result<Option<StoredRoots>, StoreError> {
        let corrupt = |m: String| StoreError::Corrupt(format!("{}: {m}", self.describe()));
        let Some(bytes) = s.data.as_ref().and_then(|d| d.get(UPSTREAM_ROOTS)) else {
            return Ok(None);
        };
        let version = s
            .metadata
            .resource_version
            .clone()
            .ok_or_else(|| corrupt("no resourceVersion".into()))?;
        let doc: RootsDocument = serde_json::from_slice(&bytes.0)
            .map_err(|e| corrupt(format!("{UPSTREAM_ROOTS}: {e}")))?;
        Ok(Some(StoredRoots { doc, version }))
    }

    fn with_doc(&self, mut s: Secret, doc: &RootsDocument) -> Secret {
        let json = serde_json::to_vec(doc).expect("serializable");
        s.data
            .get_or_insert_with(BTreeMap::new)
            .insert(UPSTREAM_ROOTS.to_string(), ByteString(json));
        s
    }

    fn stored(&self, s: Secret) -> Result<StoredRoots, StoreError> {
        self.parse(&s)?.ok_or_else(|| {
            StoreError::Corrupt(format!(
                "{}: written without {UPSTREAM_ROOTS}",
                self.describe()
            ))
        })
    }
}

#[async_trait]
impl RootsStore for UpstreamRootsSecret {
    fn describe(&self) -> String {
        format!("Secret {}/{} ({UPSTREAM_ROOTS})", self.namespace, self.name)
    }

    async fn load(&self) -> Result<Option<StoredRoots>, StoreError> {
        let what = format!("reading {}", self.describe());
        match bounded(&what, self.api.get_opt(&self.name)).await? {
            Some(s) => self.parse(&s),
            None => Ok(None),
        }
    }

    async fn create(&self, doc: &RootsDocument) -> Result<StoredRoots, StoreError> {
        let what = format!("creating {}", self.describe());
        match bounded(&what, self.api.get_opt(&self.name)).await? {
            // The Secret exists (it holds other keys): add ours, unless another replica did.
            Some(s) => {
                if self.parse(&s)?.is_some() {
                    return Err(StoreError::Conflict);
                }
                let s = self.with_doc(s, doc);
                let s = bounded(
                    &what,
                    self.api.replace(&self.name, &PostParams::default(), &s),
                )
                .await?;
                self.stored(s)
            }
            None => {
                let empty = Secret {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(self.namespace.clone()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/managed-by".to_string(),
                            "istio-ca-bridge".to_string(),
                        )])),
                        ..Default::default()
                    },
                    type_: Some("Opaque".into()),
                    ..Default::default()
                };
                let s = bounded(
                    &what,
                    self.api
                        .create(&PostParams::default(), &self.with_doc(empty, doc)),
                )
                .await?;
                self.stored(s)
            }
        }
    }

    async fn replace(&self, doc: &RootsDocument, version: &str) -> Result<StoredRoots, StoreError> {
        let what = format!("updating {}", self.describe());
        let Some(s) = bounded(&what, self.api.get_opt(&self.name)).await? else {
            return Err(StoreError::Conflict);
        };
        if s.metadata.resource_version.as_deref() != Some(version) {
            return Err(StoreError::Conflict);
        }
        let s = self.with_doc(s, doc);
        let s = bounded(
            &what,
            self.api.replace(&self.name, &PostParams::default(), &s),
        )
        .await?;
        self.stored(s)
    }
}
