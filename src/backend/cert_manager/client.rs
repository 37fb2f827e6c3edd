//! The CertificateRequest calls, through kube-rs: create, watch (by name, from the created
//! object's resourceVersion) until the request is terminal, delete; each behind the
//! client-side token bucket. What cert-manager wrote is read into an [`Outcome`]; API errors
//! become [`SignError`]s.

use std::time::Duration;

use base64::Engine;
use futures::{StreamExt, TryStreamExt};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, PostParams, WatchEvent, WatchParams,
};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{CertManagerConfig, KIND};
use crate::backend::SignError;
use crate::backend::remote::TokenBucket;
use crate::metrics::Metrics;

fn resource() -> ApiResource {
    ApiResource {
        group: "cert-manager.io".into(),
        version: "v1".into(),
        api_version: "cert-manager.io/v1".into(),
        kind: "CertificateRequest".into(),
        plural: "certificaterequests".into(),
    }
}

/// What a terminal CertificateRequest says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `status.certificate` (PEM: the leaf, maybe intermediates) and `status.ca` (PEM).
    Issued {
        certificate: String,
        ca: Option<String>,
    },
    /// An approver denied it: `reason: message`.
    Denied(String),
    /// The issuer failed it; `invalid`: cert-manager also marked it `InvalidRequest`.
    Failed { message: String, invalid: bool },
}

fn condition<'a>(status: &'a Value, t: &str) -> Option<&'a Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == t)
}

fn said(c: &Value) -> String {
    format!(
        "{}: {}",
        c["reason"].as_str().unwrap_or("-"),
        c["message"].as_str().unwrap_or("")
    )
}

fn decode(field: &Value) -> Result<Option<String>, String> {
    let Some(b64) = field.as_str().filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("not base64: {e}"))?;
    String::from_utf8(raw)
        .map(Some)
        .map_err(|_| "not PEM text".to_string())
}

/// The outcome of a request's `status`, or `None` while it is pending.
pub fn outcome(status: &Value) -> Result<Option<Outcome>, String> {
    let is_true = |t: &str| condition(status, t).filter(|c| c["status"] == "True");
    if let Some(c) = is_true("Denied") {
        return Ok(Some(Outcome::Denied(said(c))));
    }
    if let Some(c) = is_true("InvalidRequest") {
        return Ok(Some(Outcome::Failed {
            message: said(c),
            invalid: true,
        }));
    }
    let Some(ready) = condition(status, "Ready") else {
        return Ok(None);
    };
    match (ready["status"].as_str(), ready["reason"].as_str()) {
        (Some("True"), _) => {
            let certificate = decode(&status["certificate"])
                .map_err(|e| format!("status.certificate: {e}"))?
                .ok_or("Ready without status.certificate")?;
            let ca = decode(&status["ca"]).map_err(|e| format!("status.ca: {e}"))?;
            Ok(Some(Outcome::Issued { certificate, ca }))
        }
        (_, Some("Denied")) => Ok(Some(Outcome::Denied(said(ready)))),
        (_, Some("Failed")) => Ok(Some(Outcome::Failed {
            message: said(ready),
            invalid: false,
        })),
        _ => Ok(None),
    }
}

/// An API error, as the caller should take it.
pub fn api_error(op: &str, e: kube::Error) -> SignError {
    match e {
        kube::Error::Api(s) if s.code == 429 => SignError::Throttled {
            reason: format!("the Kubernetes API throttles {op}: {}", s.message),
            retry_after: None,
        },
        kube::Error::Api(s) if s.code == 401 || s.code == 403 => SignError::Unavailable(format!(
            "the Kubernetes API refuses {op} ({}): {}; the bridge needs create, get, list, watch and delete on certificaterequests.cert-manager.io in backend.namespace",
            s.code, s.message
        )),
        kube::Error::Api(s) if s.code == 404 && op == "create" => SignError::Unavailable(format!(
            "{op}: {} (is cert-manager installed, and does backend.namespace exist?)",
            s.message
        )),
        kube::Error::Api(s) if s.code == 422 || s.code == 400 => SignError::Internal(format!(
            "the Kubernetes API refuses the CertificateRequest as invalid ({op}): {}",
            s.message
        )),
        kube::Error::Api(s) => SignError::Unavailable(format!(
            "{op}: the Kubernetes API answered {}: {}",
            s.code, s.message
        )),
        other => SignError::Unavailable(format!("{op}: {other}")),
    }
}

/// The CertificateRequest API of one namespace, rate-limited.
pub struct Requests {
    api: Api<DynamicObject>,
    bucket: TokenBucket,
    metrics: std::sync::Arc<Metrics>,
    /// Requests to delete, in order, by one background task.
    deletes: tokio::sync::mpsc::UnboundedSender<String>,
}

/// How far ahead the deleter reserves a call: little, so that during a storm deletes
/// wait for spare capacity instead of queueing ahead of callers (they run once it passes).
const DELETE_MAX_WAIT: Duration = Duration::from_secs(1);

impl Requests {
    /// The API, and the task that deletes finished requests one at a time, each behind
    /// the bucket (so their calls, too, stay within `qps`).
    pub fn start(
        client: kube::Client,
        cfg: &CertManagerConfig,
        metrics: std::sync::Arc<Metrics>,
    ) -> std::sync::Arc<Self> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let me = std::sync::Arc::new(Self {
            api: Api::namespaced_with(client, &cfg.namespace, &resource()),
            bucket: TokenBucket::new(cfg.qps, cfg.burst),
            metrics,
            deletes: tx,
        });
        let weak = std::sync::Arc::downgrade(&me);
        tokio::spawn(async move {
            while let Some(name) = rx.recv().await {
                let Some(me) = weak.upgrade() else { return };
                let mut failures = 0;
                while let Err(e) = me.delete_now(&name).await {
                    failures += 1;
                    if failures >= 5 {
                        tracing::warn!(backend = KIND, request = %name, error = %e, "could not delete the CertificateRequest; delete it by hand (label app.kubernetes.io/managed-by=istio-ca-bridge)");
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500) * failures).await;
                }
            }
        });
        me
    }

    /// Queues `name` for deletion.
    pub fn delete_later(&self, name: String) {
        let _ = self.deletes.send(name);
    }

    async fn slot(&self, deadline: Instant) -> Result<(), SignError> {
        self.slots(1, deadline).await
    }

    async fn slots(&self, n: u32, deadline: Instant) -> Result<(), SignError> {
        self.bucket
            .acquire_n(n, deadline, Duration::from_millis(50), KIND, &self.metrics)
            .await
    }

    /// Creates the request `body` (its `metadata.name` set) and waits, until `deadline`,
    /// for it to be terminal; and whether it was created. It is left in place: the caller
    /// deletes it with [`Self::delete`]. The create and the watch are admitted together, so
    /// an admitted request is never throttled halfway, its create wasted.
    pub async fn run(&self, body: Value, deadline: Instant) -> (Result<Outcome, SignError>, bool) {
        let name = body["metadata"]["name"]
            .as_str()
            .expect("a named request")
            .to_string();
        let obj: DynamicObject = serde_json::from_value(body).expect("a CertificateRequest");
        if let Err(e) = self.slots(2, deadline).await {
            return (Err(e), false);
        }
        let created = match within(
            deadline,
            "create",
            self.api.create(&PostParams::default(), &obj),
        )
        .await
        {
            Ok(c) => c,
            // A create that timed out may have happened: delete it anyway.
            Err(e) => return (Err(e), true),
        };
        let rv = created
            .metadata
            .resource_version
            .clone()
            .unwrap_or_default();
        (self.wait(&name, rv, deadline).await, true)
    }

    async fn wait(
        &self,
        name: &str,
        mut rv: String,
        deadline: Instant,
    ) -> Result<Outcome, SignError> {
        let mut first = true;
        loop {
            // The first watch was reserved with the create.
            if !first {
                self.slot(deadline).await?;
            }
            first = false;
            let left = deadline.saturating_duration_since(Instant::now());
            let wp = WatchParams::default()
                .fields(&format!("metadata.name={name}"))
                .timeout(left.as_secs().clamp(1, 290) as u32);
            let stream = within(deadline, "watch", self.api.watch(&wp, &rv)).await?;
            let mut stream = stream.boxed();
            loop {
                let next = tokio::time::timeout_at(deadline, stream.try_next()).await;
                let ev = match next {
                    Err(_) => return Err(pending(name, "no answer")),
                    Ok(Err(e)) => return Err(api_error("watch", e)),
                    // The server ended the watch (its timeout): watch again from here.
                    Ok(Ok(None)) => break,
                    Ok(Ok(Some(ev))) => ev,
                };
                match ev {
                    WatchEvent::Added(o) | WatchEvent::Modified(o) => {
                        rv = o.metadata.resource_version.clone().unwrap_or(rv);
                        let status = o.data.get("status").cloned().unwrap_or(Value::Null);
                        match outcome(&status) {
                            Ok(Some(out)) => return Ok(out),
                            Ok(None) => {}
                            Err(e) => {
                                return Err(SignError::Internal(format!(
                                    "CertificateRequest {name}: {e}"
                                )));
                            }
                        }
                    }
                    WatchEvent::Deleted(_) => {
                        return Err(SignError::Unavailable(format!(
                            "CertificateRequest {name} was deleted before it was issued"
                        )));
                    }
                    WatchEvent::Bookmark(b) => rv = b.metadata.resource_version,
                    WatchEvent::Error(s) if s.code == 410 => {
                        // Too old: read it once, then watch from now.
                        self.slot(deadline).await?;
                        let o = within(deadline, "get", self.api.get(name)).await?;
                        let status = o.data.get("status").cloned().unwrap_or(Value::Null);
                        if let Ok(Some(out)) = outcome(&status) {
                            return Ok(out);
                        }
                        rv = o.metadata.resource_version.clone().unwrap_or_default();
                        break;
                    }
                    WatchEvent::Error(s) => {
                        return Err(api_error("watch", kube::Error::Api(s)));
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(pending(name, "no answer"));
            }
        }
    }

    /// Whether the API lets the bridge read its requests again: a GET of a name that does
    /// not exist answers 404 when it may, 401/403 when not.
    pub async fn probe(&self) -> bool {
        if self.bucket.reserve(Duration::ZERO).is_err() {
            return false;
        }
        let call = self.api.get("istio-ca-bridge-access-probe");
        match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(Ok(_)) => true,
            Ok(Err(kube::Error::Api(s))) => s.code == 404,
            _ => false,
        }
    }

    /// Deletes `name` now, once the bucket has a call to spare; a request already gone is
    /// fine.
    pub async fn delete_now(&self, name: &str) -> Result<(), SignError> {
        loop {
            match self.bucket.reserve(DELETE_MAX_WAIT) {
                Ok(wait) => {
                    tokio::time::sleep(wait).await;
                    break;
                }
                Err(wait) => tokio::time::sleep(wait.min(DELETE_MAX_WAIT)).await,
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let call = async {
            match self.api.delete(name, &DeleteParams::default()).await {
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                other => other.map(|_| ()),
            }
        };
        within(deadline, "delete", call).await
    }
}

fn pending(name: &str, what: &str) -> SignError {
    SignError::Unavailable(format!(
        "CertificateRequest {name}: {what} within backend.requestTimeout (not approved, or the issuer is slow or not ready)"
    ))
}

async fn within<T>(
    deadline: Instant,
    op: &str,
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, SignError> {
    match tokio::time::timeout_at(deadline, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(api_error(op, e)),
        Err(_) => Err(SignError::Unavailable(format!(
            "{op}: the Kubernetes API did not answer within backend.requestTimeout"
        ))),
    }
}

/// The CertificateRequest for a CSR: `spec.request` (PEM, base64 as the API encodes bytes),
/// `spec.duration`, `spec.usages`, `spec.isCA`, `spec.issuerRef`, labels and annotations.
pub fn request_body(
    cfg: &CertManagerConfig,
    name: &str,
    csr_der: &[u8],
    ttl: Duration,
    is_ca: bool,
) -> Value {
    let pem = crate::pki::pem_encode("CERTIFICATE REQUEST", csr_der);
    let usages: &[&str] = if is_ca {
        &["cert sign", "crl sign", "digital signature"]
    } else {
        &[
            "digital signature",
            "key encipherment",
            "server auth",
            "client auth",
        ]
    };
    let r = &cfg.issuer_ref;
    json!({
        "apiVersion": "cert-manager.io/v1",
        "kind": "CertificateRequest",
        "metadata": {
            "name": name,
            "namespace": cfg.namespace,
            "labels": labels(cfg),
            "annotations": cfg.annotations,
        },
        "spec": {
            "request": base64::engine::general_purpose::STANDARD.encode(pem),
            "duration": format!("{}s", ttl.as_secs().max(1)),
            "usages": usages,
            "isCA": is_ca,
            "issuerRef": {"name": r.name, "kind": r.kind, "group": r.group},
        },
    })
}

/// The label every request of the bridge carries (besides the configured ones).
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "istio-ca-bridge");

fn labels(cfg: &CertManagerConfig) -> Value {
    let mut l = serde_json::Map::new();
    for (k, v) in &cfg.labels {
        l.insert(k.clone(), json!(v));
    }
    l.insert(MANAGED_BY.0.into(), json!(MANAGED_BY.1));
    Value::Object(l)
}
