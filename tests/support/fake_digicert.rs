//! A FAKE DigiCert Trust Lifecycle Manager (DigiCert ONE) REST API, in-process on
//! 127.0.0.1:0 over TLS with its own test CA. No DigiCert server exists offline; this one
//! follows the documented request/response shapes (see /work/shared/docs/backends.md,
//! DigiCert section) for exactly the endpoints the bridge uses:
//!
//! - `POST /mpki/api/v1/certificate` -> 201 `{"serial_number","delivery_format":"x509",
//!   "certificate":"<leaf PEM><chain PEM>"}` or 201 `{"status":"PENDING","request_id"}`;
//! - `POST /mpki/api/v1/certificate-pickup/<request_id>` with `{"profile":{"id"}}` -> 200,
//!   PENDING until the configured number of polls, then the certificate;
//! - `GET /mpki/api/v1/hello` -> 200 (what DigiCert's own clients use to test a key).
//!
//! It really signs: a root -> intermediate -> leaf chain made with rcgen, the leaf for the
//! CSR's public key with the SAN taken from the JSON (`attributes.extensions.san`), for the
//! validity asked. It CHECKS the request shape (headers `x-api-key`, `content-type` and
//! `accept` JSON; `profile.id`, `seat.seat_id`, a PEM CSR whose signature verifies and
//! whose URI SAN matches the JSON, `validity`, `delivery_format: x509`,
//! `include_ca_chain: true`, `attributes.extensions.san.uris == [spiffe id]`, no other
//! top-level field) and answers 400 on any drift, RECORDING it so the test fails loudly.
//!
//! Switchable behaviour: PENDING for N polls, 429 bursts with or without `Retry-After`,
//! forced 401/403, 400 with an error body, slow answers, the chain left out of the answer,
//! mutual TLS (a client certificate required, no API key). Every request is counted and its
//! arrival time kept, so tests can measure the busiest second.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::time::Instant;
use x509_parser::prelude::*;

pub const PROFILE: &str = "profile-7f3a";
pub const API_KEY: &str = "test-api-key-1";

/// What the next enrollments get (after any pending 429 burst).
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// 201 with the certificate.
    Immediate,
    /// 201 PENDING; the pickup answers PENDING `polls - 1` times, then the certificate.
    Pending {
        polls: u32,
    },
    /// Every API call answers 401 / 403.
    Unauthorized,
    Forbidden,
    /// Every enrollment answers 400 with `{"errors":[{"code","message"}]}`.
    BadRequest,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RetryAfter {
    Seconds(u64),
    /// An HTTP date this far in the future.
    Date(Duration),
}

struct Pending {
    polls_left: u32,
    body: serde_json::Value,
    spki: Vec<u8>,
}

#[derive(Default)]
pub struct Stats {
    /// Every API request (enrollments, pickups, hello) by arrival.
    pub arrivals: Vec<Instant>,
    pub enrollments: u64,
    pub pickups: u64,
    pub hellos: u64,
    /// Certificates signed and delivered.
    pub issued: u64,
    pub throttled: u64,
    pub seats: Vec<String>,
    pub validities: Vec<(String, u64)>,
    /// Request-shape violations: any entry fails the test.
    pub drifts: Vec<String>,
    /// TLS connections that presented a client certificate.
    pub client_cert_connections: u64,
}

struct Ca {
    root: rcgen::Certificate,
    inter: rcgen::Certificate,
    inter_issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

struct Inner {
    mode: Mutex<Mode>,
    throttle: Mutex<(u32, Option<RetryAfter>)>,
    delay: Mutex<Duration>,
    chain_in_answer: Mutex<bool>,
    api_key: Mutex<Option<String>>,
    pending: Mutex<HashMap<String, Pending>>,
    stats: Mutex<Stats>,
    ca: Ca,
    next_id: Mutex<u64>,
}

pub struct FakeDigicert {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    /// PEM of the CA that signed the fake's TLS certificate (the bridge's `caFile`).
    pub tls_ca_pem: String,
    /// PEM of the issuing root (the bridge's `trustBundleFile`) and intermediate.
    pub root_pem: String,
    pub intermediate_pem: String,
    /// In mTLS mode: a client certificate and key (PEM) the fake accepts.
    pub client_cert_pem: String,
    pub client_key_pem: String,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for FakeDigicert {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn ca_params(cn: &str) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    p.not_before = ::time::OffsetDateTime::now_utc() - ::time::Duration::days(1);
    p.not_after = ::time::OffsetDateTime::now_utc() + ::time::Duration::days(3650);
    p
}

fn key() -> rcgen::KeyPair {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

impl FakeDigicert {
    /// API-key mode: requests must carry `x-api-key: API_KEY`.
    pub async fn start() -> FakeDigicert {
        Self::start_opts(false).await
    }

    /// mTLS mode: the TLS handshake requires a client certificate (`client_cert_pem`); no
    /// API key is expected.
    pub async fn start_mtls() -> FakeDigicert {
        Self::start_opts(true).await
    }

    async fn start_opts(mtls: bool) -> FakeDigicert {
        istio_ca_bridge::install_crypto_provider();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        // TLS of the API itself.
        let tls_ca_key = key();
        let tls_ca_params = ca_params("fake-digicert-tls-ca");
        let tls_ca = tls_ca_params.self_signed(&tls_ca_key).unwrap();
        let tls_issuer = rcgen::Issuer::new(tls_ca_params, tls_ca_key);
        let srv_key = key();
        let srv = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap()
            .signed_by(&srv_key, &tls_issuer)
            .unwrap();
        // Client certificates for the mTLS host.
        let client_ca_key = key();
        let client_ca_params = ca_params("fake-digicert-client-ca");
        let client_ca = client_ca_params.self_signed(&client_ca_key).unwrap();
        let client_issuer = rcgen::Issuer::new(client_ca_params, client_ca_key);
        let client_key = key();
        let mut cp = rcgen::CertificateParams::new(vec![]).unwrap();
        cp.distinguished_name
            .push(rcgen::DnType::CommonName, "istio-ca-bridge");
        cp.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = cp.signed_by(&client_key, &client_issuer).unwrap();

        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if mtls {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(client_ca.der().clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut tls = builder
            .with_single_cert(
                vec![srv.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(srv_key.serialize_der().into()),
            )
            .unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];

        // The issuing hierarchy.
        let root_key = key();
        let root_params = ca_params("Fake DigiCert Root G5");
        let root = root_params.self_signed(&root_key).unwrap();
        let root_issuer = rcgen::Issuer::new(root_params, root_key);
        let inter_key = key();
        let inter_params = ca_params("Fake DigiCert Issuing CA");
        let inter = inter_params.signed_by(&inter_key, &root_issuer).unwrap();
        let inter_issuer = rcgen::Issuer::new(inter_params, inter_key);

        let inner = Arc::new(Inner {
            mode: Mutex::new(Mode::Immediate),
            throttle: Mutex::new((0, None)),
            delay: Mutex::new(Duration::ZERO),
            chain_in_answer: Mutex::new(true),
            api_key: Mutex::new((!mtls).then(|| API_KEY.to_string())),
            pending: Mutex::new(HashMap::new()),
            stats: Mutex::new(Stats::default()),
            ca: Ca {
                root,
                inter,
                inter_issuer,
            },
            next_id: Mutex::new(1),
        });
        let app = Router::new()
            .route("/mpki/api/v1/certificate", post(enroll))
            .route("/mpki/api/v1/certificate-pickup/{id}", post(pickup))
            .route("/mpki/api/v1/hello", get(hello))
            .fallback(not_found)
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let inner2 = inner.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let app = app.clone();
                let inner = inner2.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    if tls.get_ref().1.peer_certificates().is_some() {
                        inner.stats.lock().unwrap().client_cert_connections += 1;
                    }
                    let svc = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        FakeDigicert {
            addr,
            tls_ca_pem: tls_ca.pem(),
            root_pem: inner.ca.root.pem(),
            intermediate_pem: inner.ca.inter.pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
            inner,
            accept,
        }
    }

    pub fn base_url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    pub fn set_mode(&self, m: Mode) {
        *self.inner.mode.lock().unwrap() = m;
    }

    /// The next `n` API calls answer 429, with this Retry-After (or none).
    pub fn throttle_next(&self, n: u32, retry_after: Option<RetryAfter>) {
        *self.inner.throttle.lock().unwrap() = (n, retry_after);
    }

    pub fn set_delay(&self, d: Duration) {
        *self.inner.delay.lock().unwrap() = d;
    }

    pub fn set_chain_in_answer(&self, on: bool) {
        *self.inner.chain_in_answer.lock().unwrap() = on;
    }

    /// The key DigiCert accepts from now on (a rotation or revocation at DigiCert).
    pub fn set_api_key(&self, k: &str) {
        *self.inner.api_key.lock().unwrap() = Some(k.to_string());
    }

    pub fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.inner.stats.lock().unwrap()
    }

    pub fn issued(&self) -> u64 {
        self.stats().issued
    }

    /// Fails the test if any request drifted from the documented shape.
    pub fn assert_no_drift(&self) {
        let d = &self.stats().drifts;
        assert!(
            d.is_empty(),
            "the bridge's requests drifted from DigiCert's API: {d:#?}"
        );
    }

    /// The most API requests that arrived within any one second.
    pub fn busiest_second(&self) -> usize {
        let mut t = self.stats().arrivals.clone();
        t.sort();
        let mut worst = 0;
        for (i, a) in t.iter().enumerate() {
            let n = t[i..]
                .iter()
                .take_while(|b| **b - *a < Duration::from_secs(1))
                .count();
            worst = worst.max(n);
        }
        worst
    }
}

fn json(status: StatusCode, v: serde_json::Value) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    json(
        status,
        serde_json::json!({"errors": [{"code": code, "message": message}]}),
    )
}

/// The common gate of every API call: counting, slowness, 429 bursts, authentication,
/// forced 401/403. `Some(response)` ends the call.
async fn gate(inner: &Inner, headers: &HeaderMap) -> Option<Response> {
    inner.stats.lock().unwrap().arrivals.push(Instant::now());
    let delay = *inner.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    {
        let mut t = inner.throttle.lock().unwrap();
        if t.0 > 0 {
            t.0 -= 1;
            inner.stats.lock().unwrap().throttled += 1;
            let mut resp = error(
                StatusCode::TOO_MANY_REQUESTS,
                "request_limit_exceeded",
                "Rate limit exceeded",
            );
            match t.1 {
                Some(RetryAfter::Seconds(s)) => {
                    resp.headers_mut()
                        .insert("retry-after", s.to_string().parse().unwrap());
                }
                Some(RetryAfter::Date(d)) => {
                    let at = httpdate::fmt_http_date(SystemTime::now() + d);
                    resp.headers_mut()
                        .insert("retry-after", at.parse().unwrap());
                }
                None => {}
            }
            return Some(resp);
        }
    }
    let want = inner.api_key.lock().unwrap().clone();
    let got = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    if want.is_none() && got.is_some() {
        // mTLS: the client certificate is the credential; a key would be a leak.
        inner
            .stats
            .lock()
            .unwrap()
            .drifts
            .push("x-api-key sent on the mTLS host".into());
    }
    if let Some(w) = want
        && got != Some(w.as_str())
    {
        return Some(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Invalid API key",
        ));
    }
    match *inner.mode.lock().unwrap() {
        Mode::Unauthorized => {
            return Some(error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Invalid API key",
            ));
        }
        Mode::Forbidden => {
            return Some(error(
                StatusCode::FORBIDDEN,
                "access_denied",
                "User does not have permission to use this profile",
            ));
        }
        _ => {}
    }
    None
}

fn drift(inner: &Inner, what: String) -> Response {
    inner.stats.lock().unwrap().drifts.push(what.clone());
    error(StatusCode::BAD_REQUEST, "invalid_input_field", &what)
}

fn check_json_headers(headers: &HeaderMap) -> Result<(), String> {
    let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !h("content-type").starts_with("application/json") {
        return Err(format!("content-type {:?}", h("content-type")));
    }
    if h("accept") != "application/json" {
        return Err(format!("accept {:?}", h("accept")));
    }
    Ok(())
}

/// Checks an enrollment body; returns the CSR's SubjectPublicKeyInfo.
fn check_enrollment(body: &serde_json::Value) -> Result<Vec<u8>, String> {
    let obj = body.as_object().ok_or("body is not an object")?;
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort();
    let want = [
        "attributes",
        "csr",
        "delivery_format",
        "include_ca_chain",
        "profile",
        "seat",
        "validity",
    ];
    if keys != want {
        return Err(format!("top-level fields {keys:?}, expected {want:?}"));
    }
    if body["profile"] != serde_json::json!({"id": PROFILE}) {
        return Err(format!("profile {}", body["profile"]));
    }
    match body["seat"]["seat_id"].as_str() {
        Some(s) if !s.is_empty() && body["seat"].as_object().unwrap().len() == 1 => {}
        _ => return Err(format!("seat {}", body["seat"])),
    }
    if body["delivery_format"] != "x509" {
        return Err(format!("delivery_format {}", body["delivery_format"]));
    }
    if body["include_ca_chain"] != true {
        return Err(format!("include_ca_chain {}", body["include_ca_chain"]));
    }
    let v = &body["validity"];
    let unit_ok = matches!(v["unit"].as_str(), Some("hours" | "days"));
    if !unit_ok || v["duration"].as_u64().unwrap_or(0) < 1 || v.as_object().unwrap().len() != 2 {
        return Err(format!("validity {v}"));
    }
    let csr_pem = body["csr"].as_str().ok_or("csr is not a string")?;
    let p = ::pem::parse(csr_pem).map_err(|e| format!("csr is not PEM: {e}"))?;
    if p.tag() != "CERTIFICATE REQUEST" {
        return Err(format!("csr PEM tag {}", p.tag()));
    }
    let (_, csr) = X509CertificationRequest::from_der(p.contents())
        .map_err(|e| format!("csr does not parse: {e}"))?;
    csr.verify_signature()
        .map_err(|e| format!("csr signature: {e}"))?;
    let mut csr_uris = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for n in &san.general_names {
                if let GeneralName::URI(u) = n {
                    csr_uris.push(u.to_string());
                }
            }
        }
    }
    let san = &body["attributes"]["extensions"]["san"];
    if body["attributes"].as_object().map(|o| o.len()) != Some(1)
        || body["attributes"]["extensions"]
            .as_object()
            .map(|o| o.len())
            != Some(1)
    {
        return Err(format!("attributes {}", body["attributes"]));
    }
    match (san.get("uris"), san.get("dns_names")) {
        (Some(uris), None) => {
            let uris: Vec<String> =
                serde_json::from_value(uris.clone()).map_err(|e| format!("san.uris: {e}"))?;
            if uris.len() != 1 || !uris[0].starts_with("spiffe://") {
                return Err(format!("san.uris {uris:?}: expected one SPIFFE ID"));
            }
            if csr_uris != uris {
                return Err(format!("san.uris {uris:?} but the CSR says {csr_uris:?}"));
            }
            if san.as_object().unwrap().len() != 1 {
                return Err(format!("san {san}"));
            }
        }
        (None, Some(dns)) => {
            let dns: Vec<String> =
                serde_json::from_value(dns.clone()).map_err(|e| format!("san.dns_names: {e}"))?;
            if dns.is_empty() {
                return Err("san.dns_names empty".into());
            }
        }
        _ => return Err(format!("san {san}: expected uris or dns_names")),
    }
    Ok(csr.certification_request_info.subject_pki.raw.to_vec())
}

/// Signs a leaf for `spki` with the SAN and validity of the enrollment body; returns the
/// `certificate` field (leaf, then intermediate and root when the chain is included).
fn sign(inner: &Inner, body: &serde_json::Value, spki: &[u8]) -> (String, String) {
    let san = &body["attributes"]["extensions"]["san"];
    let mut names = Vec::new();
    for u in san["uris"].as_array().into_iter().flatten() {
        names.push(rcgen::SanType::URI(u.as_str().unwrap().try_into().unwrap()));
    }
    for d in san["dns_names"].as_array().into_iter().flatten() {
        names.push(rcgen::SanType::DnsName(
            d.as_str().unwrap().try_into().unwrap(),
        ));
    }
    for ip in san["ip_addresses"].as_array().into_iter().flatten() {
        names.push(rcgen::SanType::IpAddress(
            ip.as_str().unwrap().parse().unwrap(),
        ));
    }
    let unit = match body["validity"]["unit"].as_str() {
        Some("days") => 86400,
        _ => 3600,
    };
    let secs = body["validity"]["duration"].as_u64().unwrap() * unit;
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = names;
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = ::time::OffsetDateTime::now_utc();
    p.not_before = now - ::time::Duration::minutes(1);
    p.not_after = now + ::time::Duration::seconds(secs as i64);
    let serial: [u8; 16] = rand::random();
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let key = rcgen::SubjectPublicKeyInfo::from_der(spki).unwrap();
    let leaf = p.signed_by(&key, &inner.ca.inter_issuer).unwrap();
    let mut pem = leaf.pem();
    if *inner.chain_in_answer.lock().unwrap() {
        pem.push_str(&inner.ca.inter.pem());
        pem.push_str(&inner.ca.root.pem());
    }
    inner.stats.lock().unwrap().issued += 1;
    let serial_hex: String = serial.iter().map(|b| format!("{b:02X}")).collect();
    (serial_hex, pem)
}

fn issued_response(status: StatusCode, serial: String, pem: String) -> Response {
    json(
        status,
        serde_json::json!({"serial_number": serial, "delivery_format": "x509", "certificate": pem}),
    )
}

async fn enroll(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    inner.stats.lock().unwrap().enrollments += 1;
    if let Some(r) = gate(&inner, &headers).await {
        return r;
    }
    if let Err(e) = check_json_headers(&headers) {
        return drift(&inner, format!("enroll: {e}"));
    }
    let body: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return drift(&inner, format!("enroll: body is not JSON: {e}")),
    };
    let spki = match check_enrollment(&body) {
        Ok(s) => s,
        Err(e) => return drift(&inner, format!("enroll: {e}")),
    };
    {
        let mut st = inner.stats.lock().unwrap();
        st.seats
            .push(body["seat"]["seat_id"].as_str().unwrap().to_string());
        st.validities.push((
            body["validity"]["unit"].as_str().unwrap().to_string(),
            body["validity"]["duration"].as_u64().unwrap(),
        ));
    }
    let mode = inner.mode.lock().unwrap().clone();
    match mode {
        Mode::BadRequest => error(
            StatusCode::BAD_REQUEST,
            "invalid_csr",
            "The CSR key size is not allowed by this profile",
        ),
        Mode::Pending { polls } => {
            let id = {
                let mut n = inner.next_id.lock().unwrap();
                *n += 1;
                format!("req-{n}")
            };
            inner.pending.lock().unwrap().insert(
                id.clone(),
                Pending {
                    polls_left: polls,
                    body,
                    spki,
                },
            );
            json(
                StatusCode::CREATED,
                serde_json::json!({"status": "PENDING", "request_id": id}),
            )
        }
        _ => {
            let (serial, pem) = sign(&inner, &body, &spki);
            issued_response(StatusCode::CREATED, serial, pem)
        }
    }
}

async fn pickup(
    State(inner): State<Arc<Inner>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    inner.stats.lock().unwrap().pickups += 1;
    if let Some(r) = gate(&inner, &headers).await {
        return r;
    }
    if let Err(e) = check_json_headers(&headers) {
        return drift(&inner, format!("pickup: {e}"));
    }
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if body != serde_json::json!({"profile": {"id": PROFILE}}) {
        return drift(&inner, format!("pickup: body {body}"));
    }
    let ready = {
        let mut pending = inner.pending.lock().unwrap();
        let Some(p) = pending.get_mut(&id) else {
            drop(pending);
            return drift(&inner, format!("pickup: unknown request_id {id}"));
        };
        p.polls_left = p.polls_left.saturating_sub(1);
        if p.polls_left == 0 {
            pending.remove(&id)
        } else {
            None
        }
    };
    match ready {
        Some(p) => {
            let (serial, pem) = sign(&inner, &p.body, &p.spki);
            issued_response(StatusCode::OK, serial, pem)
        }
        None => json(
            StatusCode::OK,
            serde_json::json!({"status": "PENDING", "request_id": id}),
        ),
    }
}

async fn hello(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    inner.stats.lock().unwrap().hellos += 1;
    if let Some(r) = gate(&inner, &headers).await {
        return r;
    }
    (
        StatusCode::OK,
        "Hello from DigiCert ONE - Trust Lifecycle Manager REST API!",
    )
        .into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("no route {uri}"),
    )
}
