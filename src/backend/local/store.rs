//! Where the local CA's keys and the rotation state live, and how replicas agree on them.
//!
//! One [`CaDocument`] holds the current root with its key, the next root during a rotation,
//! and the [`RotationState`]. A [`CaStore`] keeps it: [`FileStore`] in the state directory
//! (one replica, or several on one machine), or a Kubernetes Secret (`k8s::ca_secret`) that
//! every replica shares, as istiod keeps `istio-ca-secret`. Every write names the version it
//! was computed from and fails with [`StoreError::Conflict`] if another writer came first, so
//! two replicas never both create a root or both advance a phase.

use std::fs::File;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{LocalError, write_file, write_private};
use crate::rotation::RotationState;

/// A CA certificate and its private key, both PEM.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for KeyedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedCert")
            .field("cert_pem", &self.cert_pem.len())
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Everything the replicas share about the local CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaDocument {
    /// The root that signs outside a rotation (A during one).
    pub current: KeyedCert,
    /// The root a rotation moves to (B), from `rotate start` until it is done or aborted.
    pub next: Option<KeyedCert>,
    pub rotation: RotationState,
}

/// A document as read, with the version a write must name.
#[derive(Debug, Clone)]
pub struct Stored {
    pub doc: CaDocument,
    pub version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer changed the state since it was read.
    #[error("another replica changed the CA state first")]
    Conflict,
    /// The store cannot be reached (API server down, forbidden, disk error).
    #[error("CA state unavailable: {0}")]
    Unavailable(String),
    /// What is stored does not parse; never overwritten automatically.
    #[error("CA state is corrupt: {0}")]
    Corrupt(String),
}

#[async_trait]
pub trait CaStore: Send + Sync {
    /// Where the state is, for logs and errors.
    fn describe(&self) -> String;
    async fn load(&self) -> Result<Option<Stored>, StoreError>;
    /// Creates the state; [`StoreError::Conflict`] if it exists.
    async fn create(&self, doc: &CaDocument) -> Result<Stored, StoreError>;
    /// Replaces the state read at `version`; [`StoreError::Conflict`] if it changed since.
    async fn replace(&self, doc: &CaDocument, version: &str) -> Result<Stored, StoreError>;
}

/// The rotation's file: everything but the current root, which stays in `root-cert.pem`
/// and `root-key.pem` as before rotation existed.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RotationFile {
    generation: u64,
    /// A copy of the current root, so that the file alone is the whole state (the two
    /// PEM files are rewritten from it after every change).
    current: KeyedCert,
    next: Option<KeyedCert>,
    rotation: RotationState,
}

pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";
const ROTATION_FILE: &str = "rotation.json";
const LOCK_FILE: &str = ".lock";

/// The state directory as a store. `rotation.json` (mode 0600) is the state once a rotation
/// began; before that, the root files alone are. Writers take an exclusive lock on `.lock`.
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn lock(&self) -> Result<File, StoreError> {
        super::create_private_dir(&self.dir).map_err(unavailable)?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.path(LOCK_FILE))
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", self.describe())))?;
        f.lock()
            .map_err(|e| StoreError::Unavailable(format!("locking {}: {e}", self.describe())))?;
        Ok(f)
    }

    fn read(&self) -> Result<Option<(CaDocument, u64)>, StoreError> {
        let rotation = self.path(ROTATION_FILE);
        match std::fs::read(&rotation) {
            Ok(bytes) => {
                let f: RotationFile = serde_json::from_slice(&bytes)
                    .map_err(|e| StoreError::Corrupt(format!("{}: {e}", rotation.display())))?;
                return Ok(Some((
                    CaDocument {
                        current: f.current,
                        next: f.next,
                        rotation: f.rotation,
                    },
                    f.generation,
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StoreError::Unavailable(format!(
                    "{}: {e}",
                    rotation.display()
                )));
            }
        }
        let (cert, key) = (self.path(ROOT_CERT_FILE), self.path(ROOT_KEY_FILE));
        if !cert.exists() && !key.exists() {
            return Ok(None);
        }
        let text = |p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", p.display())))
        };
        Ok(Some((
            CaDocument {
                current: KeyedCert {
                    cert_pem: text(&cert)?,
                    key_pem: text(&key)?,
                },
                next: None,
                rotation: RotationState::default(),
            },
            0,
        )))
    }

    fn write(&self, doc: &CaDocument, generation: u64) -> Result<(), StoreError> {
        if generation > 0 {
            let f = RotationFile {
                generation,
                current: doc.current.clone(),
                next: doc.next.clone(),
                rotation: doc.rotation.clone(),
            };
            let json = serde_json::to_vec_pretty(&f).expect("serializable");
            write_private(&self.path(ROTATION_FILE), &json).map_err(unavailable)?;
        }
        write_private(&self.path(ROOT_KEY_FILE), doc.current.key_pem.as_bytes())
            .map_err(unavailable)?;
        write_file(
            &self.path(ROOT_CERT_FILE),
            doc.current.cert_pem.as_bytes(),
            0o644,
        )
        .map_err(unavailable)
    }
}

fn unavailable(e: LocalError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

#[async_trait]
impl CaStore for FileStore {
    fn describe(&self) -> String {
        format!("state directory {}", self.dir.display())
    }

    async fn load(&self) -> Result<Option<Stored>, StoreError> {
        Ok(self.read()?.map(|(doc, g)| Stored {
            doc,
            version: g.to_string(),
        }))
    }

    async fn create(&self, doc: &CaDocument) -> Result<Stored, StoreError> {
        let _lock = self.lock()?;
        if self.read()?.is_some() {
            return Err(StoreError::Conflict);
        }
        self.write(doc, 0)?;
        Ok(Stored {
            doc: doc.clone(),
            version: "0".into(),
        })
    }

    async fn replace(&self, doc: &CaDocument, version: &str) -> Result<Stored, StoreError> {
        let _lock = self.lock()?;
        let now = self.read()?.map(|(_, g)| g.to_string());
        if now.as_deref() != Some(version) {
            return Err(StoreError::Conflict);
        }
        let generation = version.parse::<u64>().unwrap_or(0) + 1;
        self.write(doc, generation)?;
        Ok(Stored {
            doc: doc.clone(),
            version: generation.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(tag: &str) -> CaDocument {
        CaDocument {
            current: KeyedCert {
                cert_pem: format!("cert {tag}"),
                key_pem: format!("key {tag}"),
            },
            next: None,
            rotation: RotationState::default(),
        }
    }

    #[tokio::test]
    async fn writes_name_the_version_they_were_computed_from() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::new(dir.path().join("ca"));
        assert!(s.load().await.unwrap().is_none());
        let first = s.create(&doc("a")).await.unwrap();
        assert!(matches!(
            s.create(&doc("b")).await,
            Err(StoreError::Conflict)
        ));
        let second = s.replace(&doc("a2"), &first.version).await.unwrap();
        assert!(matches!(
            s.replace(&doc("a3"), &first.version).await,
            Err(StoreError::Conflict)
        ));
        let loaded = s.load().await.unwrap().unwrap();
        assert_eq!(loaded.version, second.version);
        assert_eq!(loaded.doc, doc("a2"));
        // The root files follow the current root; the key stays private.
        let cert = std::fs::read_to_string(dir.path().join("ca").join(ROOT_CERT_FILE)).unwrap();
        assert_eq!(cert, "cert a2");
        use std::os::unix::fs::PermissionsExt;
        for f in [ROOT_KEY_FILE, ROTATION_FILE] {
            let mode = std::fs::metadata(dir.path().join("ca").join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{f}");
        }
        assert!(!format!("{:?}", loaded.doc).contains("key a2"));
    }

    #[tokio::test]
    async fn a_corrupt_state_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::new(dir.path());
        s.create(&doc("a")).await.unwrap();
        std::fs::write(dir.path().join(ROTATION_FILE), b"{").unwrap();
        assert!(matches!(s.load().await, Err(StoreError::Corrupt(_))));
        assert!(matches!(
            s.replace(&doc("b"), "1").await,
            Err(StoreError::Corrupt(_))
        ));
    }
}
