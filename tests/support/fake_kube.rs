//! A FAKE Kubernetes API server, in-process on 127.0.0.1:0 over TLS (a test CA).
//!
//! It exists because no kube-apiserver can run offline on this machine. It follows the
//! documented API for exactly the endpoints the bridge uses, with the real JSON shapes,
//! status codes and query parameters, and is driven through the SAME kube-rs client code
//! as production (the bridge reads a kubeconfig file pointing at it):
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews` -> 201 with the TokenReview echoed
//!   and a `status` the test decided per token. A registered service-account token behaves
//!   like the real authenticator: authenticated only if its audiences intersect
//!   `spec.audiences`, and then `status.audiences` is that intersection. Unknown tokens
//!   are unauthenticated. Requests without the kubeconfig's bearer token get 401.
//! - `GET /api/v1/pods` (list): a `PodList` with `metadata.resourceVersion`. With
//!   `resourceVersion=0` (what the bridge sends, like client-go informers) it answers from
//!   the "watch cache": everything, `limit` ignored; otherwise `limit` pages with
//!   `continue` tokens.
//! - `GET /api/v1/pods?watch=true&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=S`:
//!   a chunked stream of newline-delimited `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK",
//!   "object":{...}}` events: first every change after N, then live changes; the stream
//!   ends after `timeoutSeconds`. A resourceVersion older than the retained history gets
//!   the real `410 Gone` ERROR event.
//! - `GET /api/v1/namespaces/{ns}/pods/{name}`: served and COUNTED, so tests can prove
//!   the bridge never fetches single pods.
//! - `GET /api/v1/namespaces` list and watch, exactly like pods (one resourceVersion counter
//!   for everything, like etcd's revision).
//! - `PATCH /api/v1/namespaces/{ns}/configmaps/{name}` as server-side apply
//!   (`application/apply-patch+yaml`, `fieldManager` required): create or update, 404 if the
//!   namespace does not exist.
//! - Secrets: GET, and server-side apply like ConfigMaps.
//! - `coordination.k8s.io/v1` Leases: GET, POST (409 AlreadyExists), PUT with optimistic
//!   concurrency (409 Conflict unless `metadata.resourceVersion` is the current one).
//!
//! Every request is counted per endpoint. `stop()` drops the listener and every open
//! connection (watches included), like an API server going away; `start()` serves again
//! on the same port with the same state.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio::task::JoinSet;

/// The bearer token the bridge's kubeconfig presents to the fake.
pub const CLIENT_TOKEN: &str = "bridge-sa-token-for-the-fake-apiserver";

/// What the fake answers for one token.
#[derive(Clone, Debug)]
pub enum Review {
    /// A service-account token bound to `pod` (name, uid), valid for `audiences`.
    ServiceAccount {
        namespace: String,
        name: String,
        pod: Option<(String, String)>,
        audiences: Vec<String>,
    },
    /// This exact `status` object, whatever was asked.
    Raw(Value),
}

/// One resource type's objects.
#[derive(Default)]
struct Collection {
    /// Current objects by (namespace, name); cluster-scoped ones have namespace "".
    current: BTreeMap<(String, String), Value>,
    /// Every change: (resourceVersion, event type, object).
    history: Vec<(u64, &'static str, Value)>,
}

/// All objects. resourceVersion is one counter for everything, like etcd's revision.
#[derive(Default)]
struct Store {
    /// Last resourceVersion handed out.
    rv: u64,
    colls: HashMap<&'static str, Collection>,
    /// Changes at or below this resourceVersion are no longer retained (compaction).
    compacted: u64,
}

impl Store {
    fn coll(&mut self, kind: &'static str) -> &mut Collection {
        self.colls.entry(kind).or_default()
    }

    fn key(obj: &Value) -> (String, String) {
        (
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            obj["metadata"]["name"].as_str().unwrap().to_string(),
        )
    }

    /// Creates or replaces; returns the stored object (with its new resourceVersion).
    fn put(&mut self, kind: &'static str, mut obj: Value) -> (u64, &'static str, Value) {
        self.rv += 1;
        let rv = self.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(format!("uid-{kind}-{rv}"));
        }
        let key = Self::key(&obj);
        let c = self.coll(kind);
        let ev = if c.current.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        c.current.insert(key, obj.clone());
        c.history.push((rv, ev, obj.clone()));
        (rv, ev, obj)
    }

    fn delete(&mut self, kind: &'static str, ns: &str, name: &str) -> Option<(u64, Value)> {
        let mut obj = self
            .coll(kind)
            .current
            .remove(&(ns.to_string(), name.to_string()))?;
        self.rv += 1;
        let rv = self.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.coll(kind).history.push((rv, "DELETED", obj.clone()));
        Some((rv, obj))
    }

    fn get(&mut self, kind: &'static str, ns: &str, name: &str) -> Option<Value> {
        self.coll(kind)
            .current
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }
}

/// (collection, resourceVersion, event type, object)
type Change = (&'static str, u64, &'static str, Value);

struct Inner {
    reviews: Mutex<HashMap<String, Review>>,
    review_delay: Mutex<Duration>,
    /// When set, TokenReviews get this HTTP status (e.g. 403: the bridge lacks RBAC).
    review_failure: Mutex<Option<u16>>,
    /// When set, pod lists and watches get this HTTP status (the pod cache cannot sync).
    pods_failure: Mutex<Option<u16>>,
    store: Mutex<Store>,
    events: broadcast::Sender<Change>,
    counts: Mutex<HashMap<&'static str, u64>>,
    /// Query strings of list and watch requests, in order.
    pod_queries: Mutex<Vec<String>>,
    /// `spec.audiences` of each review received.
    review_audiences: Mutex<Vec<Vec<String>>>,
}

struct Running {
    accept: tokio::task::JoinHandle<()>,
    conns: Arc<Mutex<JoinSet<()>>>,
}

pub struct FakeKube {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    tls: Arc<rustls::ServerConfig>,
    pub ca_pem: String,
    running: Option<Running>,
}

/// A pod object as the API server returns it.
pub fn pod_json(ns: &str, name: &str, uid: &str, sa: &str, node: &str, phase: &str) -> Value {
    json!({
        "metadata": {
            "name": name, "namespace": ns, "uid": uid,
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"app": name},
        },
        "spec": {
            "serviceAccountName": sa,
            "nodeName": node,
            "containers": [{"name": "app", "image": "registry.example/app:1"}],
        },
        "status": {"phase": phase, "podIP": "10.0.0.1"},
    })
}

impl FakeKube {
    pub async fn start_new() -> FakeKube {
        istio_ca_bridge::install_crypto_provider();
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = rcgen::CertificateParams::new(vec![]).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fake-kube-ca");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fake = FakeKube {
            addr,
            inner: Arc::new(Inner {
                reviews: Mutex::new(HashMap::new()),
                review_delay: Mutex::new(Duration::ZERO),
                review_failure: Mutex::new(None),
                pods_failure: Mutex::new(None),
                store: Mutex::new(Store {
                    rv: 1000,
                    ..Default::default()
                }),
                events: broadcast::channel(1024).0,
                counts: Mutex::new(HashMap::new()),
                pod_queries: Mutex::new(Vec::new()),
                review_audiences: Mutex::new(Vec::new()),
            }),
            tls: Arc::new(tls),
            ca_pem: ca.pem(),
            running: None,
        };
        fake.serve(listener);
        fake
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = Router::new()
            .route(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                post(token_review),
            )
            .route("/api/v1/pods", get(list_or_watch_pods))
            .route("/api/v1/namespaces", get(list_or_watch_namespaces))
            .route("/api/v1/namespaces/{ns}/pods/{name}", get(get_pod))
            .route(
                "/api/v1/namespaces/{ns}/configmaps/{name}",
                axum::routing::patch(apply_configmap),
            )
            .route(
                "/api/v1/namespaces/{ns}/secrets/{name}",
                get(get_secret).patch(apply_secret),
            )
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
                post(create_lease),
            )
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}",
                get(get_lease).put(replace_lease),
            )
            .fallback(not_found)
            .with_state(self.inner.clone());
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.clone());
        let c2 = conns.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let app = app.clone();
                c2.lock().unwrap().spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        self.running = Some(Running { accept, conns });
    }

    /// The API server goes away: no listener, every connection (and watch) cut.
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.accept.abort();
            let _ = r.accept.await;
            r.conns.lock().unwrap().abort_all();
        }
    }

    /// Serves again on the same address, with the same state.
    pub async fn start(&mut self) {
        assert!(self.running.is_none(), "already running");
        let mut last = None;
        for _ in 0..50 {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => {
                    self.serve(l);
                    return;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cannot re-bind {}: {last:?}", self.addr);
    }

    /// Writes a kubeconfig for this fake (TLS with its CA, bearer-token user).
    pub fn write_kubeconfig(&self, path: &Path, context: &str) {
        let ca = base64::engine::general_purpose::STANDARD.encode(self.ca_pem.as_bytes());
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: {context}\nclusters:\n- name: {context}\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority-data: {ca}\ncontexts:\n- name: {context}\n  context:\n    cluster: {context}\n    user: bridge\nusers:\n- name: bridge\n  user:\n    token: {CLIENT_TOKEN}\n",
            port = self.addr.port()
        );
        std::fs::write(path, text).unwrap();
    }

    pub fn set_review(&self, token: &str, r: Review) {
        self.inner
            .reviews
            .lock()
            .unwrap()
            .insert(token.to_string(), r);
    }

    /// Registers a service-account token valid for `istio-ca`.
    pub fn sa_token(&self, token: &str, ns: &str, sa: &str, pod: Option<(&str, &str)>) {
        self.set_review(
            token,
            Review::ServiceAccount {
                namespace: ns.into(),
                name: sa.into(),
                pod: pod.map(|(n, u)| (n.to_string(), u.to_string())),
                audiences: vec!["istio-ca".into()],
            },
        );
    }

    /// Makes TokenReviews fail with `code` (403 Forbidden, 429, 500...), or work again.
    pub fn set_review_failure(&self, code: Option<u16>) {
        *self.inner.review_failure.lock().unwrap() = code;
    }

    /// Makes pod lists and watches fail with `code` (e.g. 403: no RBAC for pods), or work.
    pub fn set_pods_failure(&self, code: Option<u16>) {
        *self.inner.pods_failure.lock().unwrap() = code;
    }

    pub fn set_review_delay(&self, d: Duration) {
        *self.inner.review_delay.lock().unwrap() = d;
    }

    /// Requests seen for an endpoint: `tokenreviews`, `pods.list`, `pods.watch`,
    /// `pods.get`, `namespaces.list`, `namespaces.watch`, `configmaps.apply`, `secrets.get`,
    /// `secrets.apply`, `leases.get`,
    /// `leases.create`, `leases.replace`, `unauthorized`, `other`.
    pub fn count(&self, endpoint: &str) -> u64 {
        self.inner
            .counts
            .lock()
            .unwrap()
            .get(endpoint)
            .copied()
            .unwrap_or(0)
    }

    pub fn pod_queries(&self) -> Vec<String> {
        self.inner.pod_queries.lock().unwrap().clone()
    }

    pub fn review_audiences(&self) -> Vec<Vec<String>> {
        self.inner.review_audiences.lock().unwrap().clone()
    }

    fn put(&self, kind: &'static str, obj: Value) {
        let (rv, ev, obj) = self.inner.store.lock().unwrap().put(kind, obj);
        let _ = self.inner.events.send((kind, rv, ev, obj));
    }

    /// Creates or replaces a pod (ADDED or MODIFIED event).
    pub fn put_pod(&self, pod: Value) {
        self.put("pods", pod);
    }

    pub fn delete_pod(&self, ns: &str, name: &str) {
        let d = self.inner.store.lock().unwrap().delete("pods", ns, name);
        if let Some((rv, obj)) = d {
            let _ = self.inner.events.send(("pods", rv, "DELETED", obj));
        }
    }

    /// Creates a namespace (phase Active).
    pub fn put_namespace(&self, name: &str) {
        self.put(
            "namespaces",
            json!({"metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
                   "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}),
        );
    }

    pub fn configmap(&self, ns: &str, name: &str) -> Option<Value> {
        self.inner.store.lock().unwrap().get("configmaps", ns, name)
    }

    /// Someone deletes a ConfigMap.
    pub fn delete_configmap(&self, ns: &str, name: &str) {
        let d = self
            .inner
            .store
            .lock()
            .unwrap()
            .delete("configmaps", ns, name);
        if let Some((rv, obj)) = d {
            let _ = self.inner.events.send(("configmaps", rv, "DELETED", obj));
        }
    }

    pub fn secret(&self, ns: &str, name: &str) -> Option<Value> {
        self.inner.store.lock().unwrap().get("secrets", ns, name)
    }

    pub fn lease(&self, ns: &str, name: &str) -> Option<Value> {
        self.inner.store.lock().unwrap().get("leases", ns, name)
    }

    /// Sends a BOOKMARK (current resourceVersion) to every open watch.
    pub fn bookmark(&self) {
        let rv = self.inner.store.lock().unwrap().rv;
        for kind in ["pods", "namespaces"] {
            let obj = json!({"metadata": {"resourceVersion": rv.to_string()}});
            let _ = self.inner.events.send((kind, rv, "BOOKMARK", obj));
        }
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.accept.abort();
            r.conns.lock().unwrap().abort_all();
        }
    }
}

fn count(inner: &Inner, endpoint: &'static str) {
    *inner.counts.lock().unwrap().entry(endpoint).or_default() += 1;
}

fn status_json(code: u16, reason: &str, message: &str) -> Response {
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
fn unauthorized(inner: &Inner, headers: &HeaderMap) -> Option<Response> {
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

async fn apply_configmap(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> Response {
    apply_object(inner, headers, ns, name, q, body, "configmaps", "ConfigMap").await
}

async fn apply_secret(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> Response {
    apply_object(inner, headers, ns, name, q, body, "secrets", "Secret").await
}

async fn get_secret(
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

async fn get_lease(
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

async fn create_lease(
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
async fn replace_lease(
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
