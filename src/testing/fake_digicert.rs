//! A FAKE DigiCert Trust Lifecycle Manager (DigiCert ONE) REST API, in-process on
//! 127.0.0.1:0 over TLS with its own test CA. No DigiCert server exists offline; this one
//! follows the documented request/response shapes (see /work/shared/docs/backends.md, DigiCert
//! section) for exactly the endpoints the bridge uses:
//!
//! - `POST /mpki/api/v1/certificate` -> 201 `{"serial_number","delivery_format":"x509",
//!   "certificate":"<leaf PEM><chain PEM>"}` or 201 `{"status":"PENDING","request_id"}`;
//! - `POST /mpki/api/v1/certificate-pickup/<request_id>` with `{"profile":{"id"}}` -> 200,
//!   PENDING until the configured number of polls, then the certificate;
//! - `GET /mpki/api/v1/hello` -> 200 (what DigiCert's own clients use to test a key).
//!
//! It really signs: a root -> intermediate -> leaf chain made with rcgen, the leaf for the
//! CSR's public key with the SAN taken from the JSON (`attributes.extensions.san`), for the
//! validity asked. It CHECKS the request shape (`api.rs`) and answers 400 on any drift,
//! RECORDING it so the test fails loudly.
//!
//! Switchable behaviour: PENDING for N polls, 429 bursts with or without `Retry-After`,
//! forced 401/403, 400 with an error body, slow answers, the chain left out of the answer,
//! mutual TLS (a client certificate required, no API key). Every request is counted and its
//! arrival time kept, so tests can measure the busiest second.

mod api;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use tokio::time::Instant;

use super::tls_server::{TestServerCert, TlsServer, ca_params, key};

/// The certificate profile the fake serves (the bridge's `profileId`).
pub const PROFILE: &str = "profile-7f3a";
/// The API key the fake accepts by default (API-key mode).
pub const API_KEY: &str = "test-api-key-1";

/// What the next enrollments get (after any pending 429 burst).
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// 201 with the certificate.
    Immediate,
    /// 201 PENDING; the pickup answers PENDING `polls - 1` times, then the certificate.
    Pending {
        /// Pickups until the certificate is delivered.
        polls: u32,
    },
    /// Every API call answers 401.
    Unauthorized,
    /// Every API call answers 403.
    Forbidden,
    /// Every enrollment answers 400 with `{"errors":[{"code","message"}]}`.
    BadRequest,
}

/// The `Retry-After` of throttled (429) answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RetryAfter {
    /// Delay-seconds.
    Seconds(u64),
    /// An HTTP date this far in the future.
    Date(Duration),
}

/// An enrollment answered PENDING, waiting for its pickups.
struct Pending {
    polls_left: u32,
    body: serde_json::Value,
    spki: Vec<u8>,
}

/// What the fake saw, for the test's assertions.
#[derive(Default)]
pub struct Stats {
    /// Every API request (enrollments, pickups, hello) by arrival.
    pub arrivals: Vec<Instant>,
    /// Enrollment requests (`POST /certificate`).
    pub enrollments: u64,
    /// Pickup requests.
    pub pickups: u64,
    /// `GET /hello` requests.
    pub hellos: u64,
    /// Certificates signed and delivered.
    pub issued: u64,
    /// Requests answered 429.
    pub throttled: u64,
    /// `seat.seat_id` of each well-formed enrollment.
    pub seats: Vec<String>,
    /// (`validity.unit`, `validity.duration`) of each well-formed enrollment.
    pub validities: Vec<(String, u64)>,
    /// Request-shape violations: any entry fails the test.
    pub drifts: Vec<String>,
    /// TLS connections that presented a client certificate.
    pub client_cert_connections: u64,
}

/// The issuing hierarchy.
struct Ca {
    root: rcgen::Certificate,
    inter: rcgen::Certificate,
    inter_issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// The fake's state, shared with the request handlers.
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

/// A running fake DigiCert API; stops on drop.
pub struct FakeDigicert {
    /// Where it listens.
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    /// PEM of the CA that signed the fake's TLS certificate (the bridge's `caFile`).
    pub tls_ca_pem: String,
    /// PEM of the issuing root (the bridge's `trustBundleFile`).
    pub root_pem: String,
    /// PEM of the issuing intermediate.
    pub intermediate_pem: String,
    /// In mTLS mode: a client certificate (PEM) the fake accepts.
    pub client_cert_pem: String,
    /// The key of `client_cert_pem` (PEM).
    pub client_key_pem: String,
    _server: TlsServer,
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
        crate::install_crypto_provider();
        // TLS of the API itself.
        let tls_cert = TestServerCert::new("fake-digicert-tls-ca");
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
        let client_auth = mtls.then(|| {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(client_ca.der().clone()).unwrap();
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            )
            .build()
            .unwrap()
        });
        let tls = tls_cert.server_config(client_auth);

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
            .route("/mpki/api/v1/certificate", post(api::enroll))
            .route("/mpki/api/v1/certificate-pickup/{id}", post(api::pickup))
            .route("/mpki/api/v1/hello", get(api::hello))
            .fallback(api::not_found)
            .with_state(inner.clone());
        let counted = inner.clone();
        let server = TlsServer::bind("127.0.0.1:0".parse().unwrap(), tls, move |conn| {
            if conn.peer_certificates().is_some() {
                counted.stats.lock().unwrap().client_cert_connections += 1;
            }
            app.clone()
        })
        .await
        .unwrap();
        FakeDigicert {
            addr: server.addr(),
            tls_ca_pem: tls_cert.ca_pem,
            root_pem: inner.ca.root.pem(),
            intermediate_pem: inner.ca.inter.pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
            inner,
            _server: server,
        }
    }

    /// The bridge's `baseUrl` for this fake.
    pub fn base_url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// What the next enrollments get.
    pub fn set_mode(&self, m: Mode) {
        *self.inner.mode.lock().unwrap() = m;
    }

    /// The next `n` API calls answer 429, with this Retry-After (or none).
    pub fn throttle_next(&self, n: u32, retry_after: Option<RetryAfter>) {
        *self.inner.throttle.lock().unwrap() = (n, retry_after);
    }

    /// Every API call waits `d` before it is answered (a slow DigiCert).
    pub fn set_delay(&self, d: Duration) {
        *self.inner.delay.lock().unwrap() = d;
    }

    /// Whether answers carry the intermediate and root after the leaf.
    pub fn set_chain_in_answer(&self, on: bool) {
        *self.inner.chain_in_answer.lock().unwrap() = on;
    }

    /// The key DigiCert accepts from now on (a rotation or revocation at DigiCert).
    pub fn set_api_key(&self, k: &str) {
        *self.inner.api_key.lock().unwrap() = Some(k.to_string());
    }

    /// What the fake saw so far (locked while the guard lives).
    pub fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.inner.stats.lock().unwrap()
    }

    /// Certificates delivered so far.
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
