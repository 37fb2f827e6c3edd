//! Where the replicas keep an upstream rotation's state: [`RootsStore`], in memory, in
//! `rotation.stateDir` ([`FileRootsStore`]), or in the CA Secret
//! (`k8s::ca_secret::UpstreamRootsSecret`).

use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::backend::local::{self, StoreError};
use crate::rotation::RotationState;

/// What the replicas share about the upstream's roots (PEM certificates).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RootsDocument {
    /// The first signs outside a rotation (A during one); the others are further roots the
    /// CA offers, published throughout.
    pub current: Vec<String>,
    /// The root a rotation moves to (B).
    #[serde(default)]
    pub next: Option<String>,
    #[serde(default)]
    pub declined: Vec<String>,
    pub rotation: RotationState,
}

/// A document as read, with the version a write must name.
#[derive(Debug, Clone)]
pub struct StoredRoots {
    pub doc: RootsDocument,
    pub version: String,
}

/// Where the replicas keep a [`RootsDocument`].
#[async_trait]
pub trait RootsStore: Send + Sync {
    fn describe(&self) -> String;
    async fn load(&self) -> Result<Option<StoredRoots>, StoreError>;
    /// Creates the state; [`StoreError::Conflict`] if it exists.
    async fn create(&self, doc: &RootsDocument) -> Result<StoredRoots, StoreError>;
    /// Replaces the state read at `version`; [`StoreError::Conflict`] if it changed since.
    async fn replace(&self, doc: &RootsDocument, version: &str) -> Result<StoredRoots, StoreError>;
}

/// One process's memory: no replica shares it and a restart forgets the phase (the
/// bridge warns at start). For a bridge without Kubernetes or `rotation.stateDir`.
#[derive(Default)]
pub struct MemoryRootsStore(std::sync::Mutex<Option<(RootsDocument, u64)>>);

#[async_trait]
impl RootsStore for MemoryRootsStore {
    fn describe(&self) -> String {
        "memory (set rotation.stateDir to keep it across restarts)".into()
    }
    async fn load(&self) -> Result<Option<StoredRoots>, StoreError> {
        Ok(self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(doc, g)| StoredRoots {
                doc: doc.clone(),
                version: g.to_string(),
            }))
    }
    async fn create(&self, doc: &RootsDocument) -> Result<StoredRoots, StoreError> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_some() {
            return Err(StoreError::Conflict);
        }
        *g = Some((doc.clone(), 0));
        Ok(StoredRoots {
            doc: doc.clone(),
            version: "0".into(),
        })
    }
    async fn replace(&self, doc: &RootsDocument, version: &str) -> Result<StoredRoots, StoreError> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = g.as_ref().map(|(_, v)| v.to_string());
        if now.as_deref() != Some(version) {
            return Err(StoreError::Conflict);
        }
        let next = version.parse::<u64>().unwrap_or(0) + 1;
        *g = Some((doc.clone(), next));
        Ok(StoredRoots {
            doc: doc.clone(),
            version: next.to_string(),
        })
    }
}

/// `upstream-roots.json` in `rotation.stateDir`, with a generation number, written under an
/// exclusive lock (replicas on one machine share it).
pub struct FileRootsStore {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct RootsFile {
    generation: u64,
    document: RootsDocument,
}

const ROOTS_FILE: &str = "upstream-roots.json";

impl FileRootsStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn lock(&self) -> Result<std::fs::File, StoreError> {
        let unavailable = |e: String| StoreError::Unavailable(format!("{}: {e}", self.describe()));
        local::create_private_dir(&self.dir).map_err(|e| unavailable(e.to_string()))?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(".upstream-roots.lock"))
            .map_err(|e| unavailable(e.to_string()))?;
        f.lock().map_err(|e| unavailable(format!("locking: {e}")))?;
        Ok(f)
    }

    fn read(&self) -> Result<Option<RootsFile>, StoreError> {
        let path = self.dir.join(ROOTS_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Unavailable(format!("{}: {e}", path.display()))),
        }
    }

    fn write(&self, doc: &RootsDocument, generation: u64) -> Result<StoredRoots, StoreError> {
        let f = RootsFile {
            generation,
            document: doc.clone(),
        };
        let json = serde_json::to_vec_pretty(&f).expect("serializable");
        local::write_file(&self.dir.join(ROOTS_FILE), &json, 0o600)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(StoredRoots {
            doc: doc.clone(),
            version: generation.to_string(),
        })
    }
}

#[async_trait]
impl RootsStore for FileRootsStore {
    fn describe(&self) -> String {
        format!("{}", self.dir.join(ROOTS_FILE).display())
    }
    async fn load(&self) -> Result<Option<StoredRoots>, StoreError> {
        Ok(self.read()?.map(|f| StoredRoots {
            doc: f.document,
            version: f.generation.to_string(),
        }))
    }
    async fn create(&self, doc: &RootsDocument) -> Result<StoredRoots, StoreError> {
        let _lock = self.lock()?;
        if self.read()?.is_some() {
            return Err(StoreError::Conflict);
        }
        self.write(doc, 0)
    }
    async fn replace(&self, doc: &RootsDocument, version: &str) -> Result<StoredRoots, StoreError> {
        let _lock = self.lock()?;
        let now = self.read()?.map(|f| f.generation.to_string());
        if now.as_deref() != Some(version) {
            return Err(StoreError::Conflict);
        }
        self.write(doc, version.parse::<u64>().unwrap_or(0) + 1)
    }
}
