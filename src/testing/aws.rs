//! AWS Private CA test support: a moto server per test (`pip install "moto[server]"`), a
//! root CA created and activated through the acm-pca API, and (in [`proxy`]) a
//! fault-injecting HTTP proxy in front of moto that counts what reaches it.
//!
//! The bridge's SDK takes its credentials from the default chain, i.e. from the process
//! environment. Setting it is `unsafe` (edition 2024) and this crate forbids unsafe code,
//! so each AWS test binary sets [`TEST_ENV`] itself, once, before its first [`Moto`];
//! [`Moto::start`] fails the test if it did not.

pub mod proxy;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aws_sdk_acmpca::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_acmpca::primitives::Blob;
use aws_sdk_acmpca::types::{
    Asn1Subject, CertificateAuthorityConfiguration, CertificateAuthorityType, KeyAlgorithm,
    SigningAlgorithm, Validity, ValidityPeriodType,
};
use tokio::net::TcpStream;
use tokio::time::Instant;

pub use proxy::{Faults, Proxy, Stats, one_token};

use crate::config::{AwsPcaConfig, BackendConfig, Config, KeyType};
use crate::pki;
use crate::testing::{free_port, require_tool};

/// The region of every test CA.
pub const REGION: &str = "us-east-1";

/// Dummy credentials for the SDK default chain (environment provider), and no instance
/// metadata or config files: what an AWS test binary puts in its environment.
pub const TEST_ENV: [(&str, &str); 5] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_CONFIG_FILE", "/nonexistent/aws-config"),
    (
        "AWS_SHARED_CREDENTIALS_FILE",
        "/nonexistent/aws-credentials",
    ),
];

/// Fails the test unless the process environment holds [`TEST_ENV`].
pub fn assert_test_env() {
    for (k, v) in TEST_ENV {
        assert_eq!(
            std::env::var(k).ok().as_deref(),
            Some(v),
            "set testing::aws::TEST_ENV in the test binary before starting moto"
        );
    }
}

/// A moto server on a free loopback port, killed on drop.
pub struct Moto {
    /// The moto_server process.
    pub child: Child,
    /// Its endpoint (`http://127.0.0.1:<port>`), for the SDK's endpoint override.
    pub url: String,
}

impl Moto {
    /// Starts moto_server and waits (bounded) until it listens. The test binary must have
    /// set [`TEST_ENV`] first.
    pub async fn start() -> Moto {
        require_tool("moto_server", "pip install \"moto[server]\"");
        assert_test_env();
        crate::install_crypto_provider();
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

/// An acm-pca client for `endpoint` with the dummy credentials, for the test's own set-up
/// calls (the bridge builds its own).
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

/// Makes `c` use the AWS Private CA backend for `ca_arn` at `endpoint`, then `edit`.
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
    // moto ignores IssueCertificate's Validity and signs for a year: the documented opt-in
    // for such backends (real AWS Private CA honours the validity asked).
    c.policy.accept_longer_lifetimes = true;
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
