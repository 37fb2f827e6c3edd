//! The audit log: one JSON line for every certificate the bridge hands out, in every mode.
//!
//! In direct mode the enterprise CA has its own record of each certificate; in intermediate
//! mode it only sees the bridge's intermediates, so this log is the record of what the
//! bridge signed. Each line says when, what (serial, identity, NotAfter), for whom (the
//! authenticated caller and its cluster, which differ from the identity when ztunnel asks
//! for a pod on its node), and by which CA (backend, mode, serial of the certificate that
//! signed the leaf).
//!
//! Records are written by a dedicated thread so that a slow disk never blocks the async
//! runtime; a call waits for room in a bounded queue, never drops a record. [`AuditLog::flush`]
//! waits until everything queued so far is written (used at shutdown).
//!
//! The writer group-commits: after each write it rests [`LINGER`] before it looks at the
//! queue again, so under load a batch of records costs one wake-up and one write instead
//! of one of each per certificate (at 10,000 certificates/s that was a sixth of the
//! bridge's CPU, almost all of it thread wake-ups). A record reaches the sink within about
//! `LINGER` of the call that issued it.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::backend::{IssuedChain, SignError, SignRequest, Signer};
use crate::config::{AuditConfig, AuditSink};
use crate::metrics::Metrics;
use crate::pki;

/// Records that may wait for the writer before callers are slowed down.
const QUEUE: usize = 8192;

/// How long the writer rests after a write before it takes the next batch.
const LINGER: std::time::Duration = std::time::Duration::from_millis(5);

/// One issued certificate.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Record {
    /// RFC 3339 UTC time of issuance.
    pub time: String,
    pub event: &'static str,
    /// Serial of the issued certificate (lowercase hex, colon separated).
    pub serial: String,
    /// What the certificate certifies: a SPIFFE ID, or `dns:<names>` for server certs.
    pub identity: String,
    /// Who asked: the authenticated caller's identity (`None` for the bridge's own certs).
    pub caller: Option<String>,
    /// How the caller authenticated (`jwt`, `token_review`, `client_cert`).
    pub via: Option<&'static str>,
    pub cluster_id: Option<String>,
    pub not_before: String,
    pub not_after: String,
    pub backend: &'static str,
    pub mode: &'static str,
    /// Serial of the certificate that signed this one (the bridge's intermediate in
    /// intermediate mode, else the backend's issuing CA).
    pub issuer_serial: Option<String>,
}

pub use crate::pki::rfc3339;

/// One root-rotation transition.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct RotationRecord<'a> {
    time: String,
    event: &'static str,
    from: &'static str,
    to: &'static str,
    action: &'a str,
    by: &'a str,
    forced: bool,
}

enum Msg {
    Record(Box<Record>),
    Line(String),
    Flush(oneshot::Sender<()>),
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit.path {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
}

/// Handle to the audit writer; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: Option<mpsc::Sender<Msg>>,
}

impl AuditLog {
    /// An audit log that records nothing (`sink: none`).
    pub fn disabled() -> Self {
        Self { tx: None }
    }

    /// Opens the sink (a file is created mode 0640 and appended to) and starts the writer.
    pub fn start(cfg: &AuditConfig, metrics: Arc<Metrics>) -> Result<Self, AuditError> {
        let out: Box<dyn Write + Send> = match cfg.sink {
            AuditSink::None => return Ok(Self::disabled()),
            AuditSink::Stdout => Box::new(std::io::stdout()),
            AuditSink::File => Box::new(open_append(cfg.path.as_deref().expect("validated"))?),
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer(rx, out, metrics))
            .expect("spawn the audit writer thread");
        Ok(Self { tx: Some(tx) })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues a record; waits only when the writer is far behind.
    pub async fn record(&self, r: Record) {
        if let Some(tx) = &self.tx
            && tx.send(Msg::Record(Box::new(r))).await.is_err()
        {
            tracing::error!("audit writer is gone; a record was lost");
        }
    }

    /// Queues the record of a root-rotation transition (`event: root_rotation`).
    pub async fn rotation(&self, t: &crate::rotation::Transition) {
        let r = RotationRecord {
            time: rfc3339(t.at),
            event: "root_rotation",
            from: t.from.as_str(),
            to: t.to.as_str(),
            action: &t.action,
            by: &t.by,
            forced: t.forced,
        };
        let line = serde_json::to_string(&r).expect("serializable");
        if let Some(tx) = &self.tx
            && tx.send(Msg::Line(line)).await.is_err()
        {
            tracing::error!("audit writer is gone; a record was lost");
        }
    }

    /// Returns once every record queued before the call is written and flushed.
    pub async fn flush(&self) {
        if let Some(tx) = &self.tx {
            let (done, wait) = oneshot::channel();
            if tx.send(Msg::Flush(done)).await.is_ok() {
                let _ = wait.await;
            }
        }
    }
}

/// A [`Signer`] decorator that writes an audit record for every certificate issued
/// through it (workloads with their caller, the serving certificate and istiod's without),
/// before the certificate is handed out.
pub struct Audited {
    inner: Arc<dyn Signer>,
    log: AuditLog,
    /// The last issuer seen (its DER, or the leaf's issuer name and key identifier when a
    /// root signed directly) and its serial: issuers change once per rotation, not per certificate.
    last_issuer: std::sync::Mutex<Option<(Vec<u8>, Option<String>)>>,
}

impl Audited {
    pub fn new(inner: Arc<dyn Signer>, log: AuditLog) -> Self {
        Self {
            inner,
            log,
            last_issuer: std::sync::Mutex::new(None),
        }
    }

    /// Serial of the certificate that signed the leaf: the first intermediate, or the root
    /// of the bundle whose subject is the leaf's issuer.
    fn issuer_serial(
        &self,
        issued: &IssuedChain,
        issuer_key: &[u8],
        leaf_issuer: &[u8],
    ) -> Option<String> {
        let key: &[u8] = match issued.intermediates.first() {
            Some(i) => i.as_ref(),
            None => issuer_key,
        };
        let mut last = self.last_issuer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, serial)) = &*last
            && k.as_slice() == key
        {
            return serial.clone();
        }
        let serial = match issued.intermediates.first() {
            Some(i) => x509_parser::parse_x509_certificate(i)
                .ok()
                .map(|(_, c)| c.raw_serial_as_string()),
            None => {
                let bundle = self.inner.trust_bundle().borrow().clone();
                bundle.roots().iter().find_map(|r| {
                    let (_, rc) = x509_parser::parse_x509_certificate(r).ok()?;
                    (rc.subject().as_raw() == leaf_issuer).then(|| rc.raw_serial_as_string())
                })
            }
        };
        *last = Some((key.to_vec(), serial.clone()));
        serial
    }

    fn record_for(&self, req: &SignRequest, issued: &IssuedChain) -> Option<Record> {
        // The central check read the leaf already; parsed here only if an answer reached the
        // audit unchecked (a bug the server refuses to answer with, but it was signed).
        let parsed;
        let facts = match &issued.verified {
            Some(v) => &v.leaf,
            None => {
                let (_, leaf) = x509_parser::parse_x509_certificate(&issued.leaf).ok()?;
                parsed = crate::trust::verify::leaf_facts(&leaf);
                &parsed
            }
        };
        // A root is named by the leaf's issuer name and authority key identifier (two roots
        // of a rotation may share a name).
        let issuer_serial = self.issuer_serial(issued, &facts.issuer_key, &facts.issuer_name);
        let caller = req.caller.as_ref();
        Some(Record {
            time: rfc3339(pki::unix_secs(std::time::SystemTime::now())),
            event: "certificate_issued",
            serial: facts.serial_hex.clone(),
            identity: req.subject.to_string(),
            caller: caller.map(|c| c.identity.clone()),
            via: caller.map(|c| c.via),
            cluster_id: caller.and_then(|c| c.cluster_id.clone()),
            not_before: rfc3339(facts.not_before),
            not_after: rfc3339(facts.not_after),
            backend: self.inner.kind(),
            mode: self.inner.mode(),
            issuer_serial,
        })
    }
}

crate::backend::forward_authority!(Audited, inner);

#[async_trait]
impl Signer for Audited {
    crate::backend::forward_signer_facts!(inner);

    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
        let issued = self.inner.sign(req).await?;
        if self.log.enabled() {
            match self.record_for(req, &issued) {
                Some(r) => self.log.record(r).await,
                None => {
                    tracing::error!(subject = %req.subject, "cannot build the audit record of an issued certificate")
                }
            }
        }
        Ok(issued)
    }
}

fn open_append(path: &Path) -> Result<std::fs::File, AuditError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(|source| AuditError::Open {
            path: path.display().to_string(),
            source,
        })
}

/// Writes batches: everything queued at once goes out in one write and one flush.
fn writer(mut rx: mpsc::Receiver<Msg>, mut out: Box<dyn Write + Send>, metrics: Arc<Metrics>) {
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut n = 0u64;
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Msg::Record(r) => {
                    if serde_json::to_writer(&mut buf, &r).is_ok() {
                        buf.push(b'\n');
                        n += 1;
                    }
                }
                Msg::Line(l) => {
                    buf.extend_from_slice(l.as_bytes());
                    buf.push(b'\n');
                    n += 1;
                }
                Msg::Flush(done) => waiting.push(done),
            }
            if buf.len() < 1 << 20 {
                next = rx.try_recv().ok();
            }
        }
        if !buf.is_empty() {
            match out.write_all(&buf).and_then(|_| out.flush()) {
                Ok(()) => metrics.audit_records.inc_by(n),
                Err(e) => {
                    metrics.audit_write_errors.inc();
                    tracing::error!(error = %e, records = n, "AUDIT LOG WRITE FAILED: records lost");
                }
            }
            buf.clear();
        }
        for w in waiting.drain(..) {
            let _ = w.send(());
        }
        // While it rests, senders find no parked receiver to wake: what they queue in the
        // meantime is the next batch.
        std::thread::sleep(LINGER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(serial: &str) -> Record {
        Record {
            time: rfc3339(0),
            event: "certificate_issued",
            serial: serial.into(),
            identity: "spiffe://td/ns/a/sa/b".into(),
            caller: Some("spiffe://td/ns/istio-system/sa/ztunnel".into()),
            via: Some("jwt"),
            cluster_id: Some("c1".into()),
            not_before: rfc3339(0),
            not_after: rfc3339(3600),
            backend: "vault",
            mode: "intermediate",
            issuer_serial: Some("01".into()),
        }
    }

    #[tokio::test]
    async fn every_record_is_one_json_line_in_order_after_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let cfg = AuditConfig {
            sink: AuditSink::File,
            path: Some(path.clone()),
        };
        let metrics = Arc::new(Metrics::new(true));
        let log = AuditLog::start(&cfg, metrics.clone()).unwrap();
        let tasks: Vec<_> = (0..500)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.record(rec(&format!("{i:04x}"))).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        log.flush().await;
        let text = std::fs::read_to_string(&path).unwrap();
        let mut serials: Vec<String> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert_eq!(v["mode"], "intermediate");
                assert_eq!(v["time"], "1970-01-01T00:00:00Z");
                v["serial"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(serials.len(), 500);
        serials.sort();
        serials.dedup();
        assert_eq!(serials.len(), 500, "no record lost or doubled");
        assert_eq!(metrics.audit_records.get(), 500);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }

    #[test]
    fn an_unwritable_path_is_a_start_error_naming_it() {
        let cfg = AuditConfig {
            sink: AuditSink::File,
            path: Some("/nonexistent-dir/audit.jsonl".into()),
        };
        let e = AuditLog::start(&cfg, Arc::new(Metrics::new(true)))
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("/nonexistent-dir/audit.jsonl"),
            "{e}"
        );
    }
}
