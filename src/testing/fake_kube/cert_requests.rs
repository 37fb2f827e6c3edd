//! `cert-manager.io/v1` CertificateRequests, as the API server serves the CRD: create
//! (POST, 409 AlreadyExists), get, delete, list and watch (namespaced, with
//! `fieldSelector=metadata.name=<name>`), and the `status` subresource (PUT or merge PATCH).
//! The fake does not issue anything: a test-side loop plays the issuer
//! (`testing::cm_issuer`). Injected failures (429 with `Retry-After`, 403, 500) hit every
//! CertificateRequest call, and the time of each call is recorded, so a test can prove the
//! bridge's client-side rate.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::Inner;
use super::handlers::{count, status_json, unauthorized};

pub(super) const COLL: &str = "certificaterequests";
const API_VERSION: &str = "cert-manager.io/v1";
const KIND: &str = "CertificateRequest";

fn json_response(code: StatusCode, v: &Value) -> Response {
    (code, [("content-type", "application/json")], v.to_string()).into_response()
}

fn with_kind(mut v: Value) -> Value {
    v["apiVersion"] = json!(API_VERSION);
    v["kind"] = json!(KIND);
    v
}

/// Authentication, the injected failure, and the call's record; `Some` ends the call.
fn admit(inner: &Inner, headers: &HeaderMap, op: &'static str) -> Option<Response> {
    if let Some(r) = unauthorized(inner, headers) {
        return Some(r);
    }
    inner
        .cr_calls
        .lock()
        .unwrap()
        .push((std::time::Instant::now(), op));
    count(inner, op);
    let failure = *inner.cr_failure.lock().unwrap();
    match failure {
        Some(429) => {
            let mut r = status_json(
                429,
                "TooManyRequests",
                "the server has received too many requests",
            );
            r.headers_mut()
                .insert("retry-after", "1".parse().expect("a header value"));
            Some(r)
        }
        Some(403) => Some(status_json(
            403,
            "Forbidden",
            "certificaterequests.cert-manager.io is forbidden: injected",
        )),
        Some(code) => Some(status_json(code, "InternalError", "injected failure")),
        None => None,
    }
}

pub(super) async fn create(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath(ns): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = admit(&inner, &headers, "certificaterequests.create") {
        return r;
    }
    let Ok(mut obj) = serde_json::from_slice::<Value>(&body) else {
        return status_json(400, "BadRequest", "the body is not JSON");
    };
    if obj["apiVersion"] != API_VERSION || obj["kind"] != KIND {
        return status_json(
            400,
            "BadRequest",
            "apiVersion/kind must be cert-manager.io/v1 CertificateRequest",
        );
    }
    let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
        return status_json(422, "Invalid", "metadata.name: Required value");
    };
    if obj["spec"]["request"].as_str().is_none()
        || obj["spec"]["issuerRef"]["name"].as_str().is_none()
    {
        return status_json(
            422,
            "Invalid",
            "spec.request and spec.issuerRef.name are required",
        );
    }
    obj["metadata"]["namespace"] = json!(ns);
    obj["metadata"]["creationTimestamp"] = json!(crate::pki::rfc3339(crate::pki::unix_secs(
        std::time::SystemTime::now()
    )));
    // What a client may not set.
    if let Some(o) = obj.as_object_mut() {
        o.remove("status");
    }
    let change = {
        let mut store = inner.store.lock().unwrap();
        if store.get(COLL, &ns, &name).is_some() {
            return status_json(
                409,
                "AlreadyExists",
                &format!("certificaterequests.cert-manager.io \"{name}\" already exists"),
            );
        }
        store.put(COLL, obj)
    };
    let (rv, ev, obj) = change;
    let _ = inner.events.send((COLL, rv, ev, obj.clone()));
    json_response(StatusCode::CREATED, &with_kind(obj))
}

pub(super) async fn get(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    if let Some(r) = admit(&inner, &headers, "certificaterequests.get") {
        return r;
    }
    match inner.store.lock().unwrap().get(COLL, &ns, &name) {
        Some(o) => json_response(StatusCode::OK, &with_kind(o)),
        None => not_found(&name),
    }
}

fn not_found(name: &str) -> Response {
    status_json(
        404,
        "NotFound",
        &format!("certificaterequests.cert-manager.io \"{name}\" not found"),
    )
}

pub(super) async fn delete(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    if let Some(r) = admit(&inner, &headers, "certificaterequests.delete") {
        return r;
    }
    let d = inner.store.lock().unwrap().delete(COLL, &ns, &name);
    match d {
        Some((rv, obj)) => {
            let _ = inner.events.send((COLL, rv, "DELETED", obj.clone()));
            json_response(StatusCode::OK, &with_kind(obj))
        }
        None => not_found(&name),
    }
}

/// PUT or merge PATCH of `status` (what an issuer writes); the rest of the object is kept.
pub(super) async fn update_status(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = unauthorized(&inner, &headers) {
        return r;
    }
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return status_json(400, "BadRequest", "the body is not JSON");
    };
    match put_status(&inner, &ns, &name, patch["status"].clone()) {
        Some(o) => json_response(StatusCode::OK, &with_kind(o)),
        None => not_found(&name),
    }
}

/// Replaces the status of `ns`/`name` (MODIFIED event); `None` if it does not exist.
pub(super) fn put_status(inner: &Inner, ns: &str, name: &str, status: Value) -> Option<Value> {
    let (rv, ev, obj) = {
        let mut store = inner.store.lock().unwrap();
        let mut obj = store.get(COLL, ns, name)?;
        obj["status"] = status;
        store.put(COLL, obj)
    };
    let _ = inner.events.send((COLL, rv, ev, obj.clone()));
    Some(obj)
}

/// The `metadata.name` a `fieldSelector` asks for (the only selector the fake knows);
/// `Err` with the selector it does not know.
fn selected_name(q: &HashMap<String, String>) -> Result<Option<String>, String> {
    match q.get("fieldSelector") {
        None => Ok(None),
        Some(s) => match s.strip_prefix("metadata.name=") {
            Some(n) if !n.contains(',') => Ok(Some(n.to_string())),
            _ => Err(s.clone()),
        },
    }
}

pub(super) async fn list_or_watch(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath(ns): UrlPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let watching = q.get("watch").map(String::as_str) == Some("true");
    let op = if watching {
        "certificaterequests.watch"
    } else {
        "certificaterequests.list"
    };
    if let Some(r) = admit(&inner, &headers, op) {
        return r;
    }
    let name = match selected_name(&q) {
        Ok(n) => n,
        Err(s) => {
            return status_json(
                400,
                "BadRequest",
                &format!("field selector {s:?} not supported"),
            );
        }
    };
    let matches = move |o: &Value| {
        o["metadata"]["namespace"] == ns.as_str()
            && name.as_deref().is_none_or(|n| o["metadata"]["name"] == n)
    };
    if !watching {
        let store = &mut *inner.store.lock().unwrap();
        let rv = store.rv;
        let items: Vec<Value> = store
            .coll(COLL)
            .current
            .values()
            .filter(|o| matches(o))
            .cloned()
            .collect();
        let body = json!({"apiVersion": API_VERSION, "kind": "CertificateRequestList",
            "metadata": {"resourceVersion": rv.to_string()}, "items": items});
        return json_response(StatusCode::OK, &body);
    }
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = Duration::from_secs(
        q.get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1800),
    );
    let mut live = inner.events.subscribe();
    let backlog: Vec<(u64, &'static str, Value)> = inner
        .store
        .lock()
        .unwrap()
        .coll(COLL)
        .history
        .iter()
        .filter(|(rv, _, o)| *rv > from && matches(o))
        .cloned()
        .collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(16);
    let line = |ev: &str, o: &Value| -> bytes::Bytes {
        let mut l = json!({"type": ev, "object": with_kind(o.clone())}).to_string();
        l.push('\n');
        l.into()
    };
    tokio::spawn(async move {
        let mut last = from;
        for (rv, ev, o) in backlog {
            last = rv;
            if tx.send(Ok(line(ev, &o))).await.is_err() {
                return;
            }
        }
        let end = tokio::time::sleep(timeout);
        tokio::pin!(end);
        loop {
            tokio::select! {
                _ = &mut end => return,
                _ = tx.closed() => return,
                ev = live.recv() => match ev {
                    Ok((c, rv, ev, o)) if c == COLL && rv > last && ev != "BOOKMARK" && matches(&o) => {
                        last = rv;
                        if tx.send(Ok(line(ev, &o))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                },
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .expect("a response")
}
