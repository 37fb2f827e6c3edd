//! The fake API server's routes and read side: its authentication of its own client (the
//! bridge's kubeconfig token), per-endpoint counting, `Status` errors, TokenReviews, and
//! lists and watches of pods and namespaces.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::objects::{
    apply_cluster_trust_bundle, apply_configmap, apply_secret, create_lease, create_secret,
    get_lease, get_secret, replace_lease, replace_secret,
};
use super::{CLIENT_TOKEN, Inner, Review};

/// Every endpoint the fake serves (anything else is a counted 404).
pub(super) fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            post(token_review),
        )
        .route("/openid/v1/jwks", get(jwks))
        .route("/api/v1/pods", get(list_or_watch_pods))
        .route("/api/v1/namespaces", get(list_or_watch_namespaces))
        .route("/api/v1/namespaces/{ns}/pods/{name}", get(get_pod))
        .route(
            "/api/v1/namespaces/{ns}/configmaps/{name}",
            axum::routing::patch(apply_configmap).get(super::objects::get_configmap),
        )
        .route("/api/v1/namespaces/{ns}/secrets", post(create_secret))
        .route(
            "/apis/certificates.k8s.io/v1beta1/clustertrustbundles/{name}",
            axum::routing::patch(apply_cluster_trust_bundle),
        )
        .route(
            "/api/v1/namespaces/{ns}/secrets/{name}",
            get(get_secret).patch(apply_secret).put(replace_secret),
        )
        .route(
            "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
            post(create_lease),
        )
        .route(
            "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}",
            get(get_lease).put(replace_lease),
        )
        .route(
            "/apis/cert-manager.io/v1/namespaces/{ns}/certificaterequests",
            get(super::cert_requests::list_or_watch).post(super::cert_requests::create),
        )
        .route(
            "/apis/cert-manager.io/v1/namespaces/{ns}/certificaterequests/{name}",
            get(super::cert_requests::get).delete(super::cert_requests::delete),
        )
        .route(
            "/apis/cert-manager.io/v1/namespaces/{ns}/certificaterequests/{name}/status",
            axum::routing::put(super::cert_requests::update_status)
                .patch(super::cert_requests::update_status),
        )
        .fallback(not_found)
        .with_state(inner)
}

pub(super) fn count(inner: &Inner, endpoint: &'static str) {
    *inner.counts.lock().unwrap().entry(endpoint).or_default() += 1;
}

pub(super) fn status_json(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    (
        StatusCode::from_u16(code).unwrap(),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The API server's authentication of its own client (the bridge).
/// `Some(401 response)` if the request lacks the kubeconfig's bearer token.
pub(super) fn unauthorized(inner: &Inner, headers: &HeaderMap) -> Option<Response> {
    let ok = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {CLIENT_TOKEN}"));
    if ok {
        None
    } else {
        count(inner, "unauthorized");
        Some(status_json(401, "Unauthorized", "Unauthorized"))
    }
}

async fn not_found(State(inner): State<Arc<Inner>>) -> Response {
    count(&inner, "other");
    status_json(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

async fn jwks(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&inner, &headers) {
        return r;
    }
    count(&inner, "jwks");
    if let Some(code) = *inner.jwks_failure.lock().unwrap() {
        return status_json(
            code,
            "Forbidden",
            "forbidden: User \"system:serviceaccount:istio-system:istio-ca-bridge\" cannot get path \"/openid/v1/jwks\"",
        );
    }
    let keys = inner.jwks.lock().unwrap().clone();
    (
        StatusCode::OK,
        [("content-type", "application/jwk-set+json")],
        json!({ "keys": keys }).to_string(),
    )
        .into_response()
}

async fn token_review(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = unauthorized(&inner, &headers) {
        return r;
    }
    count(&inner, "tokenreviews");
    let failure = *inner.review_failure.lock().unwrap();
    if let Some(code) = failure {
        return match code {
            403 => status_json(
                403,
                "Forbidden",
                "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:istio-system:istio-ca-bridge\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope",
            ),
            429 => status_json(
                429,
                "TooManyRequests",
                "too many requests, please try again later",
            ),
            c => status_json(c, "InternalError", "Internal error occurred"),
        };
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return status_json(400, "BadRequest", "invalid TokenReview");
    };
    if req["apiVersion"] != "authentication.k8s.io/v1" || req["kind"] != "TokenReview" {
        return status_json(400, "BadRequest", "wrong apiVersion/kind");
    }
    let token = req["spec"]["token"].as_str().unwrap_or("").to_string();
    let asked: Vec<String> = req["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    inner.review_audiences.lock().unwrap().push(asked.clone());
    let delay = *inner.review_delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let review = inner.reviews.lock().unwrap().get(&token).cloned();
    let status = match review {
        None => json!({"user": {}, "error": "[invalid bearer token, token lookup failed]"}),
        Some(Review::Raw(v)) => v,
        Some(Review::ServiceAccount {
            namespace,
            name,
            pod,
            audiences,
        }) => {
            // The API server's audience check: without spec.audiences it checks its own.
            let wanted = if asked.is_empty() {
                vec!["https://kubernetes.default.svc.cluster.local".to_string()]
            } else {
                asked.clone()
            };
            let both: Vec<String> = wanted
                .iter()
                .filter(|a| audiences.contains(a))
                .cloned()
                .collect();
            if both.is_empty() {
                json!({"user": {}, "error": format!(
                    "[invalid bearer token, token audiences {audiences:?} is invalid for the target audiences {wanted:?}]")})
            } else {
                let mut extra = serde_json::Map::new();
                extra.insert(
                    "authentication.kubernetes.io/credential-id".into(),
                    json!(["JTI=0b4e3c6e-fake"]),
                );
                if let Some((pn, pu)) = pod {
                    extra.insert("authentication.kubernetes.io/pod-name".into(), json!([pn]));
                    extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([pu]));
                    extra.insert(
                        "authentication.kubernetes.io/node-name".into(),
                        json!(["unused-by-the-bridge"]),
                    );
                }
                json!({
                    "authenticated": true,
                    "user": {
                        "username": format!("system:serviceaccount:{namespace}:{name}"),
                        "uid": "6b1f6f1c-fake-sa-uid",
                        "groups": ["system:serviceaccounts",
                                   format!("system:serviceaccounts:{namespace}"),
                                   "system:authenticated"],
                        "extra": extra,
                    },
                    "audiences": both,
                })
            }
        }
    };
    let mut resp = req.clone();
    resp["metadata"] = json!({"creationTimestamp": null});
    resp["status"] = status;
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        resp.to_string(),
    )
        .into_response()
}

async fn get_pod(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    if let Some(r) = unauthorized(&inner, &headers) {
        return r;
    }
    count(&inner, "pods.get");
    let pod = inner.store.lock().unwrap().get("pods", &ns, &name);
    match pod {
        Some(mut pod) => {
            pod["kind"] = json!("Pod");
            pod["apiVersion"] = json!("v1");
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                pod.to_string(),
            )
                .into_response()
        }
        None => status_json(404, "NotFound", &format!("pods \"{name}\" not found")),
    }
}

async fn list_or_watch_pods(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    uri: axum::http::Uri,
) -> Response {
    list_or_watch(inner, headers, q, uri, "pods", "Pod").await
}

async fn list_or_watch_namespaces(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    uri: axum::http::Uri,
) -> Response {
    list_or_watch(inner, headers, q, uri, "namespaces", "Namespace").await
}

async fn list_or_watch(
    inner: Arc<Inner>,
    headers: HeaderMap,
    q: HashMap<String, String>,
    uri: axum::http::Uri,
    coll: &'static str,
    kind: &'static str,
) -> Response {
    if let Some(r) = unauthorized(&inner, &headers) {
        return r;
    }
    if coll == "pods"
        && let Some(code) = *inner.pods_failure.lock().unwrap()
    {
        count(&inner, "pods.failed");
        return status_json(code, "Forbidden", "injected failure");
    }
    if coll == "pods" {
        inner
            .pod_queries
            .lock()
            .unwrap()
            .push(uri.query().unwrap_or("").to_string());
    }
    if q.get("watch").map(String::as_str) == Some("true") {
        count(
            &inner,
            if coll == "pods" {
                "pods.watch"
            } else {
                "namespaces.watch"
            },
        );
        return watch(inner, q, coll, kind);
    }
    count(
        &inner,
        if coll == "pods" {
            "pods.list"
        } else {
            "namespaces.list"
        },
    );
    let mut store = inner.store.lock().unwrap();
    let current_rv = store.rv;
    let items: Vec<Value> = store.coll(coll).current.values().cloned().collect();
    // resourceVersion=0 is served from the watch cache: everything at once, `limit`
    // ignored. Otherwise (a consistent read) `limit` pages with `continue` tokens; the
    // token pins the list's resourceVersion, like the real one.
    let from_cache = q.get("resourceVersion").map(String::as_str) == Some("0");
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
    let (offset, rv) = match q.get("continue") {
        Some(c) => {
            let (o, rv) = c.split_once(':').unwrap_or(("0", "0"));
            (o.parse().unwrap_or(0), rv.to_string())
        }
        None => (0, current_rv.to_string()),
    };
    let mut metadata = json!({"resourceVersion": rv});
    let page: Vec<Value> = if from_cache || limit == 0 {
        items
    } else {
        let page: Vec<Value> = items.iter().skip(offset).take(limit).cloned().collect();
        if offset + limit < items.len() {
            metadata["continue"] = json!(format!("{}:{rv}", offset + limit));
            metadata["remainingItemCount"] = json!(items.len() - offset - limit);
        }
        page
    };
    let body = json!({
        "kind": format!("{kind}List"), "apiVersion": "v1",
        "metadata": metadata,
        "items": page,
    });
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn event_line(ev: &str, kind: &str, object: &Value) -> bytes::Bytes {
    let mut obj = object.clone();
    obj["kind"] = json!(kind);
    obj["apiVersion"] = json!("v1");
    let mut line = json!({"type": ev, "object": obj}).to_string();
    line.push('\n');
    line.into()
}

fn watch(
    inner: Arc<Inner>,
    q: HashMap<String, String>,
    coll: &'static str,
    kind: &'static str,
) -> Response {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = Duration::from_secs(
        q.get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1800),
    );
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    // Subscribe before reading the history so that no change falls in between.
    let mut live = inner.events.subscribe();
    let (backlog, compacted) = {
        let mut store = inner.store.lock().unwrap();
        let compacted = from != 0 && from < store.compacted;
        let backlog: Vec<(u64, &'static str, Value)> = store
            .coll(coll)
            .history
            .iter()
            .filter(|(rv, _, _)| *rv > from)
            .cloned()
            .collect();
        (backlog, compacted)
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(64);
    tokio::spawn(async move {
        if compacted {
            let err = json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from}"),
                "reason": "Expired", "code": 410}});
            let _ = tx.send(Ok(format!("{err}\n").into())).await;
            return;
        }
        let mut last = from;
        for (rv, ev, obj) in backlog {
            last = rv;
            if tx.send(Ok(event_line(ev, kind, &obj))).await.is_err() {
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
                    Ok((c, _, _, _)) if c != coll => {}
                    Ok((_, rv, "BOOKMARK", obj)) => {
                        if bookmarks && tx.send(Ok(event_line("BOOKMARK", kind, &obj))).await.is_err() {
                            return;
                        }
                        last = last.max(rv);
                    }
                    Ok((_, rv, ev, obj)) if rv > last => {
                        last = rv;
                        if tx.send(Ok(event_line(ev, kind, &obj))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}
