//! What the bridge writes: ConfigMaps and Secrets by server-side apply (the root
//! ConfigMaps, istiod's TLS Secret), and `coordination.k8s.io/v1` Leases (leader election)
//! and Secrets (the shared local CA) by create and replace with optimistic concurrency.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::Inner;
use super::handlers::{count, status_json, unauthorized};

pub(super) async fn apply_configmap(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> Response {
    apply_object(inner, headers, ns, name, q, body, "configmaps", "ConfigMap").await
}

pub(super) async fn apply_secret(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> Response {
    apply_object(inner, headers, ns, name, q, body, "secrets", "Secret").await
}

pub(super) async fn get_secret(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    get_object(&inner, &headers, &SECRETS, &ns, &name)
}

/// Server-side apply (`PATCH` with `application/apply-patch+yaml`, `fieldManager`
/// required): creates or updates (labels merged, `data` and `type` taken); the namespace
/// must exist.
#[allow(clippy::too_many_arguments)]
async fn apply_object(
    inner: Arc<Inner>,
    headers: HeaderMap,
    ns: String,
    name: String,
    q: HashMap<String, String>,
    body: axum::body::Bytes,
    coll: &'static str,
    kind: &'static str,
) -> Response {
    if let Some(r) = unauthorized(&inner, &headers) {
        return r;
    }
    count(
        &inner,
        if coll == "secrets" {
            "secrets.apply"
        } else {
            "configmaps.apply"
        },
    );
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct != "application/apply-patch+yaml" {
        return status_json(
            415,
            "UnsupportedMediaType",
            &format!("unsupported patch type {ct}"),
        );
    }
    if q.get("fieldManager").is_none_or(|m| m.is_empty()) {
        return status_json(422, "Invalid", "fieldManager is required for apply patch");
    }
    // JSON is YAML; the bridge sends JSON.
    let Ok(obj) = serde_json::from_slice::<Value>(&body) else {
        return status_json(400, "BadRequest", "cannot parse apply patch");
    };
    if obj["kind"] != kind || obj["metadata"]["name"] != name.as_str() {
        return status_json(400, "BadRequest", "patch does not match the URL");
    }
    let mut store = inner.store.lock().unwrap();
    if store.get("namespaces", "", &ns).is_none() {
        return status_json(404, "NotFound", &format!("namespaces \"{ns}\" not found"));
    }
    let mut cm = store
        .get(coll, &ns, &name)
        .unwrap_or_else(|| json!({"metadata": {"name": name, "namespace": ns}}));
    if let Some(labels) = obj["metadata"]["labels"].as_object() {
        for (k, v) in labels {
            cm["metadata"]["labels"][k] = v.clone();
        }
    }
    cm["data"] = obj["data"].clone();
    if !obj["type"].is_null() {
        cm["type"] = obj["type"].clone();
    }
    let (rv, ev, cm) = store.put(coll, cm);
    drop(store);
    let _ = inner.events.send((coll, rv, ev, cm.clone()));
    let mut cm = cm;
    cm["kind"] = json!(kind);
    cm["apiVersion"] = json!("v1");
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        cm.to_string(),
    )
        .into_response()
}

fn object_response(code: StatusCode, t: &Typed, mut obj: Value) -> Response {
    obj["kind"] = json!(t.kind);
    obj["apiVersion"] = json!(t.api_version);
    (
        code,
        [("content-type", "application/json")],
        obj.to_string(),
    )
        .into_response()
}

/// What the generic create/get/replace handlers need to know of a kind.
struct Typed {
    coll: &'static str,
    kind: &'static str,
    api_version: &'static str,
    /// As API errors name it (`leases.coordination.k8s.io`).
    resource: &'static str,
    counts: [&'static str; 3],
}

const LEASES: Typed = Typed {
    coll: "leases",
    kind: "Lease",
    api_version: "coordination.k8s.io/v1",
    resource: "leases.coordination.k8s.io",
    counts: ["leases.get", "leases.create", "leases.replace"],
};

const CONFIGMAPS: Typed = Typed {
    coll: "configmaps",
    kind: "ConfigMap",
    api_version: "v1",
    resource: "configmaps",
    counts: ["configmaps.get", "configmaps.create", "configmaps.replace"],
};

pub(super) async fn get_configmap(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    get_object(&inner, &headers, &CONFIGMAPS, &ns, &name)
}

const SECRETS: Typed = Typed {
    coll: "secrets",
    kind: "Secret",
    api_version: "v1",
    resource: "secrets",
    counts: ["secrets.get", "secrets.create", "secrets.replace"],
};

fn get_object(inner: &Inner, headers: &HeaderMap, t: &Typed, ns: &str, name: &str) -> Response {
    if let Some(r) = unauthorized(inner, headers) {
        return r;
    }
    count(inner, t.counts[0]);
    let obj = inner.store.lock().unwrap().get(t.coll, ns, name);
    match obj {
        Some(o) => object_response(StatusCode::OK, t, o),
        None => status_json(
            404,
            "NotFound",
            &format!("{} \"{name}\" not found", t.resource),
        ),
    }
}

fn create_object(inner: &Inner, headers: &HeaderMap, t: &Typed, ns: &str, body: &[u8]) -> Response {
    if let Some(r) = unauthorized(inner, headers) {
        return r;
    }
    count(inner, t.counts[1]);
    let Ok(mut obj) = serde_json::from_slice::<Value>(body) else {
        return status_json(400, "BadRequest", &format!("invalid {}", t.kind));
    };
    let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
        return status_json(422, "Invalid", "metadata.name is required");
    };
    if !obj["metadata"]["resourceVersion"].is_null() {
        return status_json(
            400,
            "BadRequest",
            "resourceVersion should not be set on objects to be created",
        );
    }
    obj["metadata"]["namespace"] = json!(ns);
    let mut store = inner.store.lock().unwrap();
    if store.get(t.coll, ns, &name).is_some() {
        return status_json(
            409,
            "AlreadyExists",
            &format!("{} \"{name}\" already exists", t.resource),
        );
    }
    let (_, _, obj) = store.put(t.coll, obj);
    object_response(StatusCode::CREATED, t, obj)
}

/// PUT with optimistic concurrency: `metadata.resourceVersion` must be the current one.
fn replace_object(
    inner: &Inner,
    headers: &HeaderMap,
    t: &Typed,
    ns: &str,
    name: &str,
    body: &[u8],
) -> Response {
    if let Some(r) = unauthorized(inner, headers) {
        return r;
    }
    count(inner, t.counts[2]);
    let Ok(mut obj) = serde_json::from_slice::<Value>(body) else {
        return status_json(400, "BadRequest", &format!("invalid {}", t.kind));
    };
    let mut store = inner.store.lock().unwrap();
    let Some(current) = store.get(t.coll, ns, name) else {
        return status_json(
            404,
            "NotFound",
            &format!("{} \"{name}\" not found", t.resource),
        );
    };
    if obj["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
        return status_json(
            409,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                t.resource
            ),
        );
    }
    obj["metadata"]["namespace"] = json!(ns);
    obj["metadata"]["uid"] = current["metadata"]["uid"].clone();
    let (_, _, obj) = store.put(t.coll, obj);
    object_response(StatusCode::OK, t, obj)
}

pub(super) async fn get_lease(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    get_object(&inner, &headers, &LEASES, &ns, &name)
}

pub(super) async fn create_lease(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath(ns): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    create_object(&inner, &headers, &LEASES, &ns, &body)
}

pub(super) async fn replace_lease(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    replace_object(&inner, &headers, &LEASES, &ns, &name, &body)
}

pub(super) async fn create_secret(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath(ns): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    create_object(&inner, &headers, &SECRETS, &ns, &body)
}

pub(super) async fn replace_secret(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    replace_object(&inner, &headers, &SECRETS, &ns, &name, &body)
}

/// Server-side apply of a cluster-scoped `certificates.k8s.io/v1beta1` ClusterTrustBundle:
/// `spec.signerName` and `spec.trustBundle` taken; the name must carry the signer name as
/// its prefix, as the API requires.
pub(super) async fn apply_cluster_trust_bundle(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = unauthorized(&inner, &headers) {
        return r;
    }
    count(&inner, "clustertrustbundles.apply");
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct != "application/apply-patch+yaml" || q.get("fieldManager").is_none_or(|m| m.is_empty()) {
        return status_json(
            422,
            "Invalid",
            "server-side apply with a fieldManager expected",
        );
    }
    let Ok(obj) = serde_json::from_slice::<Value>(&body) else {
        return status_json(400, "BadRequest", "cannot parse apply patch");
    };
    if obj["kind"] != "ClusterTrustBundle" || obj["metadata"]["name"] != name.as_str() {
        return status_json(400, "BadRequest", "patch does not match the URL");
    }
    let signer = obj["spec"]["signerName"].as_str().unwrap_or("");
    if !signer.is_empty() && !name.starts_with(&format!("{}:", signer.replace('/', ":"))) {
        return status_json(
            422,
            "Invalid",
            "metadata.name: must begin with the signer name, '/' replaced by ':'",
        );
    }
    let mut store = inner.store.lock().unwrap();
    let mut ctb = store
        .get("clustertrustbundles", "", &name)
        .unwrap_or_else(|| json!({"metadata": {"name": name}}));
    ctb["metadata"]["labels"] = obj["metadata"]["labels"].clone();
    ctb["spec"] = obj["spec"].clone();
    let (_, _, ctb) = store.put("clustertrustbundles", ctb);
    let t = Typed {
        coll: "clustertrustbundles",
        kind: "ClusterTrustBundle",
        api_version: "certificates.k8s.io/v1beta1",
        resource: "clustertrustbundles.certificates.k8s.io",
        counts: ["", "", ""],
    };
    object_response(StatusCode::OK, &t, ctb)
}
