//! What the bridge writes: ConfigMaps and Secrets by server-side apply (the root
//! ConfigMaps, istiod's TLS Secret) and `coordination.k8s.io/v1` Leases with optimistic
//! concurrency (leader election).

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
    if let Some(r) = unauthorized(&inner, &headers) {
        return r;
    }
    count(&inner, "secrets.get");
    let secret = inner.store.lock().unwrap().get("secrets", &ns, &name);
    match secret {
        Some(mut s) => {
            s["kind"] = json!("Secret");
            s["apiVersion"] = json!("v1");
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                s.to_string(),
            )
                .into_response()
        }
        None => status_json(404, "NotFound", &format!("secrets \"{name}\" not found")),
    }
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

fn lease_response(code: StatusCode, mut lease: Value) -> Response {
    lease["kind"] = json!("Lease");
    lease["apiVersion"] = json!("coordination.k8s.io/v1");
    (
        code,
        [("content-type", "application/json")],
        lease.to_string(),
    )
        .into_response()
}

pub(super) async fn get_lease(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    if let Some(r) = unauthorized(&inner, &headers) {
        return r;
    }
    count(&inner, "leases.get");
    let lease = inner.store.lock().unwrap().get("leases", &ns, &name);
    match lease {
        Some(l) => lease_response(StatusCode::OK, l),
        None => status_json(
            404,
            "NotFound",
            &format!("leases.coordination.k8s.io \"{name}\" not found"),
        ),
    }
}

pub(super) async fn create_lease(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath(ns): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = unauthorized(&inner, &headers) {
        return r;
    }
    count(&inner, "leases.create");
    let Ok(mut lease) = serde_json::from_slice::<Value>(&body) else {
        return status_json(400, "BadRequest", "invalid Lease");
    };
    let Some(name) = lease["metadata"]["name"].as_str().map(str::to_string) else {
        return status_json(422, "Invalid", "metadata.name is required");
    };
    lease["metadata"]["namespace"] = json!(ns);
    let mut store = inner.store.lock().unwrap();
    if store.get("leases", &ns, &name).is_some() {
        return status_json(
            409,
            "AlreadyExists",
            &format!("leases.coordination.k8s.io \"{name}\" already exists"),
        );
    }
    let (_, _, lease) = store.put("leases", lease);
    lease_response(StatusCode::CREATED, lease)
}

/// PUT with optimistic concurrency: `metadata.resourceVersion` must be the current one.
pub(super) async fn replace_lease(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = unauthorized(&inner, &headers) {
        return r;
    }
    count(&inner, "leases.replace");
    let Ok(mut lease) = serde_json::from_slice::<Value>(&body) else {
        return status_json(400, "BadRequest", "invalid Lease");
    };
    let mut store = inner.store.lock().unwrap();
    let Some(current) = store.get("leases", &ns, &name) else {
        return status_json(
            404,
            "NotFound",
            &format!("leases.coordination.k8s.io \"{name}\" not found"),
        );
    };
    if lease["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
        return status_json(
            409,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ),
        );
    }
    lease["metadata"]["namespace"] = json!(ns);
    lease["metadata"]["uid"] = current["metadata"]["uid"].clone();
    let (_, _, lease) = store.put("leases", lease);
    lease_response(StatusCode::OK, lease)
}
