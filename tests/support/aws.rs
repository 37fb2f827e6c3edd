//! AWS Private CA test support: a moto server per test, a root CA created and activated
//! through the acm-pca API, and a fault-injecting HTTP proxy in front of moto that counts
//! what reaches it. Included with `#[path]` by the AWS test binaries only.
#![allow(dead_code)]

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
use istio_ca_bridge::config::{AwsPcaConfig, BackendConfig, Config, KeyType};
use istio_ca_bridge::pki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::support::{free_port, require_tool};

pub const REGION: &str = "us-east-1";

/// Dummy credentials for the SDK default chain (environment provider), set once.
pub fn aws_test_env() {
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
pub struct Moto {
    pub child: Child,
    pub url: String,
}

impl Moto {
    pub async fn start() -> Moto {
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

pub fn pca_client(endpoint: &str) -> aws_sdk_acmpca::Client {
    let conf = aws_sdk_acmpca::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .build();
    aws_sdk_acmpca::Client::from_conf(conf)
}

/// Creates and activates a root CA the way AWS documents it; returns (CA ARN, root PEM).
pub async fn create_root_ca(endpoint: &str) -> (String, String) {
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

pub fn aws_backend(
    c: &mut Config,
    ca_arn: &str,
    endpoint: &str,
    edit: impl FnOnce(&mut AwsPcaConfig),
) {
    let mut a = AwsPcaConfig {
        ca_arn: ca_arn.to_string(),
        endpoint: Some(endpoint.to_string()),
        ..Default::default()
    };
    edit(&mut a);
    c.backend = BackendConfig::AwsPca(a);
}

/// A self-signed CA certificate (PEM) standing for another root to trust.
pub fn other_root(name: &str) -> String {
    let key = pki::generate_key(KeyType::EcdsaP256).unwrap();
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_string());
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.self_signed(&key).unwrap().pem()
}

// ---------------------------------------------------------------------------------------
// Fault-injecting proxy.

/// What the proxy does to the next calls.
#[derive(Default)]
pub struct Faults {
    /// The next N IssueCertificate calls get ThrottlingException.
    pub throttle_issue: u32,
    /// Every IssueCertificate call gets ThrottlingException.
    pub throttle_issue_always: bool,
    /// The next N GetCertificate calls get RequestInProgressException.
    pub in_progress: u32,
    pub in_progress_always: bool,
    /// The next N IssueCertificate calls reach moto, but the connection is dropped before
    /// the answer (the call was issued; the client cannot know).
    pub reset_issue_after_forward: u32,
    /// The next N GetCertificate calls: connection dropped before anything is forwarded.
    pub reset_get: u32,
    /// Every answer is delayed this long.
    pub delay: Duration,
}

#[derive(Default)]
pub struct Stats {
    /// IssueCertificate calls received, by IdempotencyToken.
    pub received: HashMap<String, u32>,
    /// IssueCertificate calls that reached moto, by IdempotencyToken.
    pub forwarded: HashMap<String, u32>,
    /// When each forwarded IssueCertificate reached moto.
    pub forward_times: Vec<Instant>,
    pub get_calls: u32,
    /// Access key ids that signed the requests (SigV4 `Credential=`).
    pub access_keys: std::collections::HashSet<String>,
}

pub struct ProxyState {
    pub upstream: String,
    pub http: reqwest::Client,
    pub faults: Mutex<Faults>,
    pub stats: Mutex<Stats>,
    /// AWS dedupes IssueCertificate by IdempotencyToken; moto does not, so the proxy does.
    pub answered: Mutex<HashMap<String, (u16, Vec<u8>)>>,
}

pub struct Proxy {
    pub url: String,
    pub state: Arc<ProxyState>,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
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

    pub fn faults(&self, f: Faults) {
        *self.state.faults.lock().unwrap() = f;
    }

    pub fn take_stats(&self) -> Stats {
        std::mem::take(&mut *self.state.stats.lock().unwrap())
    }
}

/// Reads one HTTP/1.1 request (Content-Length bodies only): (lower-cased headers, body).
pub async fn read_request(
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

pub async fn respond(sock: &mut TcpStream, status: u16, body: &[u8]) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/x-amz-json-1.1\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body).await
}

pub fn aws_error(kind: &str) -> Vec<u8> {
    serde_json::to_vec(
        &serde_json::json!({"__type": kind, "message": "injected by the test proxy"}),
    )
    .unwrap()
}

pub async fn forward(
    st: &ProxyState,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
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

pub async fn serve_conn(mut sock: TcpStream, st: Arc<ProxyState>) {
    let mut buf = Vec::new();
    while let Some((headers, body)) = read_request(&mut sock, &mut buf).await {
        let target = headers
            .iter()
            .find(|(k, _)| k == "x-amz-target")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let op = target.strip_prefix("ACMPrivateCA.").unwrap_or("");
        if let Some(key) = headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .and_then(|(_, v)| v.split("Credential=").nth(1))
            .and_then(|c| c.split('/').next())
        {
            st.stats.lock().unwrap().access_keys.insert(key.to_string());
        }
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
pub fn one_token(s: &Stats) -> (u32, u32) {
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
