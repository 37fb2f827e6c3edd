//! The AWS Private CA backend against a real acm-pca API: moto's server (`pip install
//! "moto[server]"`), started per test on a loopback port. A CA is created and activated
//! through the API exactly as on AWS (CreateCertificateAuthority, GetCertificateAuthorityCsr,
//! IssueCertificate with RootCACertificate/V1, ImportCertificateAuthorityCertificate); the
//! bridge reaches it with dummy credentials through the SDK's endpoint override, either
//! directly or through a fault-injecting HTTP proxy written here, which also counts what
//! reaches moto (moto itself ignores IdempotencyToken, so the proxy plays AWS's dedupe).

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use aws_sdk_acmpca::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_acmpca::primitives::Blob;
use aws_sdk_acmpca::types::{
    Asn1Subject, CertificateAuthorityConfiguration, CertificateAuthorityType, KeyAlgorithm,
    SigningAlgorithm, Validity, ValidityPeriodType,
};
use istio_ca_bridge::config::{AwsPcaBackendConfig, BackendConfig, Config, KeyType};
use istio_ca_bridge::pki::{self, CsrShape};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tonic::Code;

const REGION: &str = "us-east-1";

/// Dummy credentials for the SDK default chain (environment provider), set once.
fn aws_test_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY (test-only): set once before any AWS client exists, to constant values.
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
            std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
            std::env::set_var("AWS_CONFIG_FILE", "/nonexistent/aws-config");
            std::env::set_var(
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/aws-credentials",
            );
        }
    });
}

/// A moto server on a free loopback port, killed on drop.
struct Moto {
    child: Child,
    url: String,
}

impl Moto {
    async fn start() -> Moto {
        require_tool("moto_server", "pip install \"moto[server]\"");
        aws_test_env();
        istio_ca_bridge::install_crypto_provider();
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-p", &port.to_string(), "-H", "127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let moto = Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "moto_server did not listen within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        moto
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pca_client(endpoint: &str) -> aws_sdk_acmpca::Client {
    let conf = aws_sdk_acmpca::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .build();
    aws_sdk_acmpca::Client::from_conf(conf)
}

/// Creates and activates a root CA the way AWS documents it; returns (CA ARN, root PEM).
async fn create_root_ca(endpoint: &str) -> (String, String) {
    let c = pca_client(endpoint);
    let cfg = CertificateAuthorityConfiguration::builder()
        .key_algorithm(KeyAlgorithm::Rsa2048)
        .signing_algorithm(SigningAlgorithm::Sha256Withrsa)
        .subject(
            Asn1Subject::builder()
                .organization("istio-ca-bridge tests")
                .common_name("Test Private CA root")
                .build(),
        )
        .build()
        .unwrap();
    let arn = c
        .create_certificate_authority()
        .certificate_authority_configuration(cfg)
        .certificate_authority_type(CertificateAuthorityType::Root)
        .send()
        .await
        .unwrap()
        .certificate_authority_arn()
        .unwrap()
        .to_string();
    let csr = c
        .get_certificate_authority_csr()
        .certificate_authority_arn(&arn)
        .send()
        .await
        .unwrap()
        .csr()
        .unwrap()
        .to_string();
    let cert_arn = c
        .issue_certificate()
        .certificate_authority_arn(&arn)
        .csr(Blob::new(csr.as_bytes()))
        .signing_algorithm(SigningAlgorithm::Sha256Withrsa)
        .template_arn("arn:aws:acm-pca:::template/RootCACertificate/V1")
        .validity(
            Validity::builder()
                .r#type(ValidityPeriodType::Years)
                .value(10)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap()
        .certificate_arn()
        .unwrap()
        .to_string();
    let root = c
        .get_certificate()
        .certificate_authority_arn(&arn)
        .certificate_arn(&cert_arn)
        .send()
        .await
        .unwrap()
        .certificate()
        .unwrap()
        .to_string();
    c.import_certificate_authority_certificate()
        .certificate_authority_arn(&arn)
        .certificate(Blob::new(root.as_bytes()))
        .send()
        .await
        .unwrap();
    (arn, root)
}

fn aws_backend(
    c: &mut Config,
    ca_arn: &str,
    endpoint: &str,
    edit: impl FnOnce(&mut AwsPcaBackendConfig),
) {
    let mut a = AwsPcaBackendConfig {
        ca_arn: ca_arn.to_string(),
        endpoint: Some(endpoint.to_string()),
        ..Default::default()
    };
    edit(&mut a);
    c.backend = BackendConfig::AwsPca(a);
}

/// A self-signed CA certificate (PEM) standing for another root to trust.
fn other_root(name: &str) -> String {
    let key = pki::generate_key(KeyType::EcdsaP256).unwrap();
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_string());
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.self_signed(&key).unwrap().pem()
}

fn write(dir: &std::path::Path, name: &str, data: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_csrs_get_chains_to_the_private_ca_root() {
    let moto = Moto::start().await;
    let (arn, root) = create_root_ca(&moto.url).await;
    let extra_dir = tempfile::tempdir().unwrap();
    let extra_file = extra_dir.path().join("extra-roots.pem");
    let extra_a = other_root("next root A");
    std::fs::write(&extra_file, &extra_a).unwrap();
    let b = Bridge::start_with(|c| {
        aws_backend(c, &arn, &moto.url, |a| {
            a.extra_roots_file = Some(extra_file.clone());
            a.bundle_refresh_interval = Duration::from_secs(1);
        })
    })
    .await;
    assert_eq!(b.signer.kind(), "aws_pca");
    // The bundle is the CA's root (GetCertificateAuthorityCertificate) plus the extra roots.
    let pca_root = pki::parse_certs_pem(root.as_bytes()).unwrap().remove(0);
    let roots = |pem: &str| pki::parse_certs_pem(pem.as_bytes()).unwrap();
    assert_eq!(
        roots(&b.root_pem()),
        vec![pca_root.clone(), roots(&extra_a).remove(0)]
    );
    // The serving certificate came from the Private CA too: this client trusts only its root.
    let mut client = b.client().await;
    let token = b.issuer.token("default", "bookinfo");
    let id = spiffe("default", "bookinfo");
    let exceeded = || {
        b.metrics
            .backend_ttl_exceeded
            .with_label_values(&["aws_pca"])
            .get()
    };
    let before = exceeded();
    let root_f = write(b.dir.path(), "pca-root.pem", &root);
    let cases = [
        (KeyType::EcdsaP256, CsrShape::Ztunnel),
        (KeyType::EcdsaP256, CsrShape::IstioAgent),
        (KeyType::Rsa, CsrShape::IstioAgent),
    ];
    for (key_type, shape) in cases {
        let (key, csr) = csr_for(&id, key_type, shape);
        let chain = call(&mut client, request(csr, Some(&token), 3600))
            .await
            .unwrap_or_else(|s| panic!("{key_type:?} {shape:?}: {s:?}"))
            .cert_chain;
        assert_eq!(
            chain.len(),
            2,
            "leaf + root bundle (a root CA has no intermediates)"
        );
        let target = istio_ca_bridge::identity::SpiffeId::parse(&id).unwrap();
        istio_ca_bridge::cli::request::verify_response(&chain, &target, &key).unwrap();
        let leaf = pki::parse_certs_pem(chain[0].as_bytes()).unwrap().remove(0);
        let info = pki::cert_info(&leaf).unwrap();
        assert_eq!(info.uri_sans, vec![id.clone()], "SAN kept");
        assert!(info.dns_sans.is_empty());
        let leaf_f = write(b.dir.path(), "leaf.pem", &chain[0]);
        for purpose in ["sslclient", "sslserver"] {
            let (ok, out) = openssl(&["verify", "-purpose", purpose, "-CAfile", &root_f, &leaf_f]);
            assert!(ok, "openssl verify {purpose} {key_type:?}: {out}");
        }
        // moto ignores Validity and signs for a year: the rule is accept + count + log.
        let life = info.not_after - now() as i64;
        assert!(life > 300 * 86400, "moto signs for a year: {life}");
    }
    assert_eq!(exceeded() - before, 3, "every over-long leaf is counted");

    // The bundle is re-read periodically: a changed extra roots file shows up by itself.
    let extra_b = other_root("next root B");
    std::fs::write(&extra_file, &extra_b).unwrap();
    let want = vec![pca_root, roots(&extra_b).remove(0)];
    let start = Instant::now();
    while roots(&b.root_pem()) != want {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "bundle not refreshed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, metrics) = b.admin_get("/metrics").await;
    assert!(
        metrics.contains("istio_ca_bridge_backend_ttl_exceeded_total{backend=\"aws_pca\"}"),
        "{metrics}"
    );
    b.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Fault-injecting proxy.

/// What the proxy does to the next calls.
#[derive(Default)]
struct Faults {
    /// The next N IssueCertificate calls get ThrottlingException.
    throttle_issue: u32,
    /// Every IssueCertificate call gets ThrottlingException.
    throttle_issue_always: bool,
    /// The next N GetCertificate calls get RequestInProgressException.
    in_progress: u32,
    in_progress_always: bool,
    /// The next N IssueCertificate calls reach moto, but the connection is dropped before
    /// the answer (the call was issued; the client cannot know).
    reset_issue_after_forward: u32,
    /// The next N GetCertificate calls: connection dropped before anything is forwarded.
    reset_get: u32,
    /// Every answer is delayed this long.
    delay: Duration,
}

#[derive(Default)]
struct Stats {
    /// IssueCertificate calls received, by IdempotencyToken.
    received: HashMap<String, u32>,
    /// IssueCertificate calls that reached moto, by IdempotencyToken.
    forwarded: HashMap<String, u32>,
    /// When each forwarded IssueCertificate reached moto.
    forward_times: Vec<Instant>,
    get_calls: u32,
}

struct ProxyState {
    upstream: String,
    http: reqwest::Client,
    faults: Mutex<Faults>,
    stats: Mutex<Stats>,
    /// AWS dedupes IssueCertificate by IdempotencyToken; moto does not, so the proxy does.
    answered: Mutex<HashMap<String, (u16, Vec<u8>)>>,
}

struct Proxy {
    url: String,
    state: Arc<ProxyState>,
}

impl Proxy {
    async fn start(upstream: &str) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = l.local_addr().unwrap();
        let state = Arc::new(ProxyState {
            upstream: upstream.to_string(),
            // A fresh connection per call: moto's server closes idle keep-alive connections
            // in a way that races with reuse.
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
            faults: Mutex::new(Faults::default()),
            stats: Mutex::new(Stats::default()),
            answered: Mutex::new(HashMap::new()),
        });
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = l.accept().await {
                tokio::spawn(serve_conn(sock, st.clone()));
            }
        });
        Proxy {
            url: format!("http://{addr}"),
            state,
        }
    }

    fn faults(&self, f: Faults) {
        *self.state.faults.lock().unwrap() = f;
    }

    fn take_stats(&self) -> Stats {
        std::mem::take(&mut *self.state.stats.lock().unwrap())
    }
}

/// Reads one HTTP/1.1 request (Content-Length bodies only): (lower-cased headers, body).
async fn read_request(
    sock: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Option<(Vec<(String, String)>, Vec<u8>)> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 8192];
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let headers: Vec<(String, String)> = head
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 8192];
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + len].to_vec();
    buf.drain(..head_end + len);
    Some((headers, body))
}

async fn respond(sock: &mut TcpStream, status: u16, body: &[u8]) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/x-amz-json-1.1\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body).await
}

fn aws_error(kind: &str) -> Vec<u8> {
    serde_json::to_vec(
        &serde_json::json!({"__type": kind, "message": "injected by the test proxy"}),
    )
    .unwrap()
}

async fn forward(st: &ProxyState, headers: &[(String, String)], body: Vec<u8>) -> (u16, Vec<u8>) {
    let mut req = st.http.post(&st.upstream).body(body);
    for (k, v) in headers {
        if !matches!(k.as_str(), "host" | "content-length" | "connection") {
            req = req.header(k, v);
        }
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("moto does not answer: {e:?}"));
    let status = resp.status().as_u16();
    (status, resp.bytes().await.unwrap().to_vec())
}

async fn serve_conn(mut sock: TcpStream, st: Arc<ProxyState>) {
    let mut buf = Vec::new();
    while let Some((headers, body)) = read_request(&mut sock, &mut buf).await {
        let target = headers
            .iter()
            .find(|(k, _)| k == "x-amz-target")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let op = target.strip_prefix("ACMPrivateCA.").unwrap_or("");
        let delay = st.faults.lock().unwrap().delay;
        tokio::time::sleep(delay).await;
        let answer = match op {
            "IssueCertificate" => {
                let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let token = json["IdempotencyToken"].as_str().unwrap_or("").to_string();
                *st.stats
                    .lock()
                    .unwrap()
                    .received
                    .entry(token.clone())
                    .or_default() += 1;
                let (throttle, reset) = {
                    let mut f = st.faults.lock().unwrap();
                    if f.throttle_issue_always || f.throttle_issue > 0 {
                        f.throttle_issue = f.throttle_issue.saturating_sub(1);
                        (true, false)
                    } else if f.reset_issue_after_forward > 0 {
                        f.reset_issue_after_forward -= 1;
                        (false, true)
                    } else {
                        (false, false)
                    }
                };
                if throttle {
                    (400, aws_error("ThrottlingException"))
                } else {
                    let cached = st.answered.lock().unwrap().get(&token).cloned();
                    let answer = match cached {
                        Some(a) if !token.is_empty() => a,
                        _ => {
                            {
                                let mut s = st.stats.lock().unwrap();
                                *s.forwarded.entry(token.clone()).or_default() += 1;
                                s.forward_times.push(Instant::now());
                            }
                            let a = forward(&st, &headers, body).await;
                            if a.0 == 200 && !token.is_empty() {
                                st.answered.lock().unwrap().insert(token, a.clone());
                            }
                            a
                        }
                    };
                    if reset {
                        return; // drop the connection: the answer is lost
                    }
                    answer
                }
            }
            "GetCertificate" => {
                st.stats.lock().unwrap().get_calls += 1;
                let action = {
                    let mut f = st.faults.lock().unwrap();
                    if f.reset_get > 0 {
                        f.reset_get -= 1;
                        "reset"
                    } else if f.in_progress_always || f.in_progress > 0 {
                        f.in_progress = f.in_progress.saturating_sub(1);
                        "in_progress"
                    } else {
                        "forward"
                    }
                };
                match action {
                    "reset" => return,
                    "in_progress" => (400, aws_error("RequestInProgressException")),
                    _ => forward(&st, &headers, body).await,
                }
            }
            _ => forward(&st, &headers, body).await,
        };
        if respond(&mut sock, answer.0, &answer.1).await.is_err() {
            return;
        }
    }
}

/// The one IssueCertificate token of a call and how often it was (received, forwarded).
fn one_token(s: &Stats) -> (u32, u32) {
    assert_eq!(
        s.received.len(),
        1,
        "one request, one token: {:?}",
        s.received
    );
    let (token, received) = s.received.iter().next().unwrap();
    assert!(token.len() <= 36 && !token.is_empty(), "{token:?}");
    (*received, s.forwarded.get(token).copied().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_retried_within_the_deadline_and_never_issue_twice() {
    let moto = Moto::start().await;
    let (arn, _) = create_root_ca(&moto.url).await;
    let proxy = Proxy::start(&moto.url).await;
    let b = Bridge::start_with(|c| {
        c.server.request_timeout = Duration::from_secs(10);
        aws_backend(c, &arn, &proxy.url, |a| {
            a.issue_timeout = Duration::from_secs(3);
        })
    })
    .await;
    let mut client = b.client().await;
    let token = b.issuer.token("default", "faults");
    let id = spiffe("default", "faults");
    proxy.take_stats();

    async fn attempt(
        client: &mut istio_ca_bridge::pb::istio_certificate_service_client::IstioCertificateServiceClient<tonic::transport::Channel>,
        id: &str,
        token: &str,
    ) -> (Result<(), Code>, Duration) {
        let (_, csr) = csr_for(id, KeyType::EcdsaP256, CsrShape::Ztunnel);
        let start = Instant::now();
        let r = call(client, request(csr, Some(token), 3600)).await;
        (r.map(|_| ()).map_err(|s| s.code()), start.elapsed())
    }

    // A burst of ThrottlingException: retried with backoff, same token, issued once.
    proxy.faults(Faults {
        throttle_issue: 3,
        ..Default::default()
    });
    let (r, _) = attempt(&mut client, &id, &token).await;
    assert_eq!(r, Ok(()), "throttling burst within the deadline");
    assert_eq!(one_token(&proxy.take_stats()), (4, 1));

    // Issuance in progress for a while: GetCertificate is polled until ready.
    proxy.faults(Faults {
        in_progress: 4,
        ..Default::default()
    });
    let (r, _) = attempt(&mut client, &id, &token).await;
    assert_eq!(r, Ok(()), "RequestInProgressException polled through");
    let s = proxy.take_stats();
    assert_eq!(s.get_calls, 5);
    assert_eq!(one_token(&s), (1, 1));

    // The IssueCertificate answer is lost (connection dropped after moto issued): the
    // retry carries the same token, so AWS (here the proxy) answers with the same
    // certificate instead of issuing another.
    proxy.faults(Faults {
        reset_issue_after_forward: 1,
        reset_get: 2,
        ..Default::default()
    });
    let (r, _) = attempt(&mut client, &id, &token).await;
    assert_eq!(r, Ok(()), "connection resets retried");
    let s = proxy.take_stats();
    assert_eq!(
        one_token(&s),
        (2, 1),
        "retried with the same token, issued once"
    );
    assert_eq!(s.get_calls, 3);

    // Slow answers that fit the deadline.
    proxy.faults(Faults {
        delay: Duration::from_millis(400),
        ..Default::default()
    });
    let (r, took) = attempt(&mut client, &id, &token).await;
    assert_eq!(r, Ok(()), "slow but in time");
    assert!(took >= Duration::from_millis(800), "{took:?}");
    assert_eq!(one_token(&proxy.take_stats()), (1, 1));

    // Throttled beyond the deadline: RESOURCE_EXHAUSTED, nothing issued, within the budget.
    proxy.faults(Faults {
        throttle_issue_always: true,
        ..Default::default()
    });
    let (r, took) = attempt(&mut client, &id, &token).await;
    assert_eq!(r, Err(Code::ResourceExhausted));
    assert!(took < Duration::from_secs(4), "{took:?}");
    let (received, forwarded) = one_token(&proxy.take_stats());
    assert!(received >= 3, "retried before giving up: {received}");
    assert_eq!(forwarded, 0);

    // Never ready within the deadline: UNAVAILABLE (istio-agent and ztunnel retry).
    proxy.faults(Faults {
        in_progress_always: true,
        ..Default::default()
    });
    let (r, took) = attempt(&mut client, &id, &token).await;
    assert_eq!(r, Err(Code::Unavailable));
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert_eq!(one_token(&proxy.take_stats()), (1, 1));

    // Slower than the deadline: UNAVAILABLE after issueTimeout, not after requestTimeout.
    proxy.faults(Faults {
        delay: Duration::from_secs(5),
        ..Default::default()
    });
    let (r, took) = attempt(&mut client, &id, &token).await;
    assert_eq!(r, Err(Code::Unavailable));
    assert!(took < Duration::from_secs(4), "{took:?}");
    proxy.faults(Faults::default());

    let m = &b.metrics;
    assert!(
        m.backend_throttles
            .with_label_values(&["aws_pca", "remote"])
            .get()
            >= 6
    );
    assert!(
        m.backend_retries
            .with_label_values(&["aws_pca", "in_progress"])
            .get()
            >= 4
    );
    assert!(
        m.backend_retries
            .with_label_values(&["aws_pca", "transient"])
            .get()
            >= 3
    );
    b.shutdown().await.unwrap();
}

/// A restart storm: 500 concurrent calls against a bucket of 5/s (burst 5). moto signs
/// about a dozen certificates a second on this machine, so the rate stays well below that;
/// the bucket must hold it, hand out only slots that leave time to finish within
/// `issueTimeout`, and refuse the rest at once with RESOURCE_EXHAUSTED (never reaching AWS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_bucket_holds_the_configured_rate_under_a_burst() {
    const CALLS: usize = 500;
    const RATE: f64 = 5.0;
    const BURST: u32 = 5;
    const ISSUE_TIMEOUT: Duration = Duration::from_secs(8);
    let moto = Moto::start().await;
    let (arn, _) = create_root_ca(&moto.url).await;
    let proxy = Proxy::start(&moto.url).await;
    let b = Bridge::start_with(|c| {
        c.server.request_timeout = Duration::from_secs(15);
        aws_backend(c, &arn, &proxy.url, |a| {
            a.issue_timeout = ISSUE_TIMEOUT;
            a.rate_limit = RATE;
            a.rate_burst = BURST;
        })
    })
    .await;
    let token = b.issuer.token("default", "storm");
    let id = spiffe("default", "storm");
    let csrs: Vec<String> = (0..CALLS)
        .map(|_| csr_for(&id, KeyType::EcdsaP256, CsrShape::Ztunnel).1)
        .collect();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(b.client().await);
    }
    // Let the bucket refill after the serving certificate.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    proxy.take_stats();
    let start = Instant::now();
    let calls = csrs.into_iter().enumerate().map(|(i, csr)| {
        let mut c = clients[i % clients.len()].clone();
        let req = request(csr, Some(&token), 3600);
        async move { call(&mut c, req).await.map(|_| ()).map_err(|s| s.code()) }
    });
    let results = futures::future::join_all(calls).await;
    let took = start.elapsed();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let exhausted = results
        .iter()
        .filter(|r| **r == Err(Code::ResourceExhausted))
        .count();
    assert_eq!(
        ok + exhausted,
        CALLS,
        "only OK or RESOURCE_EXHAUSTED: {results:?}"
    );
    // Slots are handed out while they leave 2 s of the 8 s budget: burst + 6 s of rate
    // (a little more when the calls reach the backend spread over time on a busy machine).
    let expected = f64::from(BURST) + RATE * 6.0;
    assert!(
        ok as f64 >= expected - 3.0 && ok as f64 <= expected + RATE * 3.0,
        "{ok} issued, expected about {expected}"
    );
    assert!(took < ISSUE_TIMEOUT + Duration::from_secs(3), "{took:?}");
    let s = proxy.take_stats();
    assert_eq!(s.forward_times.len(), ok, "refused calls never reach AWS");
    assert!(
        s.forwarded.values().all(|n| *n == 1),
        "no token issued twice"
    );
    let mut t = s.forward_times.clone();
    t.sort();
    let span = (t[ok - 1] - t[0]).as_secs_f64();
    let ideal = (ok as f64 - f64::from(BURST)) / RATE;
    assert!(
        span >= ideal - 0.3,
        "{ok} calls spread over {span:.2}s, expected >= {ideal:.2}s"
    );
    // No one-second window sees more than the rate plus the burst (+1 for arrival jitter
    // at the window edges).
    let mut worst = 0;
    for (i, a) in t.iter().enumerate() {
        let n = t[i..]
            .iter()
            .take_while(|b| **b - *a < Duration::from_secs(1))
            .count();
        worst = worst.max(n);
    }
    assert!(
        worst <= RATE as usize + BURST as usize + 2,
        "{worst} IssueCertificate calls within one second"
    );
    let local = b
        .metrics
        .backend_throttles
        .with_label_values(&["aws_pca", "local"])
        .get();
    assert_eq!(local as usize, exhausted);
    let waits = b
        .metrics
        .backend_rate_limit_wait
        .with_label_values(&["aws_pca"])
        .get_sample_count();
    assert!(waits as usize >= ok);
    eprintln!(
        "{CALLS} calls in {took:?}: {ok} issued over {span:.2}s (busiest second {worst}), {exhausted} RESOURCE_EXHAUSTED"
    );
    b.shutdown().await.unwrap();
}
