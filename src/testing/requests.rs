//! What a workload sends: Istio-shaped CSRs, CreateCertificate requests with istio-agent's
//! headers, and a TLS probe of the serving certificate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rcgen::KeyPair;
use tonic::transport::Channel;

use crate::config::KeyType;
use crate::pb::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::pb::{IstioCertificateRequest, IstioCertificateResponse};
use crate::pki::{self, CsrShape};

/// A key and an Istio-shaped CSR for `uri`.
pub fn csr_for(uri: &str, key_type: KeyType, shape: CsrShape) -> (KeyPair, String) {
    let key = pki::generate_key(key_type).unwrap();
    let csr = pki::workload_csr(&key, uri, shape).unwrap();
    (key, csr)
}

/// Builds a CreateCertificate request with the usual Istio headers (`CertSigner`
/// metadata, `clusterid: Kubernetes`, the bearer `token` if any).
pub fn request(
    csr: String,
    token: Option<&str>,
    ttl: i64,
) -> tonic::Request<IstioCertificateRequest> {
    let mut md = prost_types::Struct::default();
    md.fields.insert(
        "CertSigner".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(String::new())),
        },
    );
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: ttl,
        metadata: Some(md),
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req.metadata_mut()
        .insert("clusterid", "Kubernetes".parse().unwrap());
    req
}

/// Sends `req`: the response body or the gRPC status.
pub async fn call(
    client: &mut IstioCertificateServiceClient<Channel>,
    req: tonic::Request<IstioCertificateRequest>,
) -> Result<IstioCertificateResponse, tonic::Status> {
    client.create_certificate(req).await.map(|r| r.into_inner())
}

/// CreateCertificate for `uri` with `token`, as ztunnel asks: `cluster` is the clusterid
/// header (None: no header); `impersonate` sets ImpersonatedIdentity. Returns the chain.
pub async fn ask(
    client: &mut IstioCertificateServiceClient<Channel>,
    uri: &str,
    token: &str,
    cluster: Option<&str>,
    impersonate: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let (_, csr) = csr_for(uri, KeyType::EcdsaP256, CsrShape::Ztunnel);
    let mut req = request(csr, Some(token), 3600);
    match cluster {
        Some(c) => {
            req.metadata_mut().insert("clusterid", c.parse().unwrap());
        }
        None => {
            req.metadata_mut().remove("clusterid");
        }
    }
    if let Some(id) = impersonate {
        req.get_mut().metadata.as_mut().unwrap().fields.insert(
            "ImpersonatedIdentity".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(id.into())),
            },
        );
    }
    call(client, req).await.map(|r| r.cert_chain)
}

/// The one URI SAN of the leaf (first PEM) of `chain`.
pub fn leaf_uri(chain: &[String]) -> String {
    let info = pki::cert_info(&pki::parse_certs_pem(chain[0].as_bytes()).unwrap()[0]).unwrap();
    assert_eq!(info.uri_sans.len(), 1);
    info.uri_sans[0].clone()
}

/// A new TLS gRPC connection to `localhost:port` trusting `root_pem`, as istio-agent
/// connects (an error, not a panic: tests connect to servers that are going away).
pub async fn connect(
    port: u16,
    root_pem: &str,
) -> anyhow::Result<IstioCertificateServiceClient<Channel>> {
    let ch = crate::cli::request::connect(
        &format!("localhost:{port}"),
        root_pem.as_bytes(),
        Some("localhost"),
        None,
    )
    .await?;
    Ok(IstioCertificateServiceClient::new(ch))
}

/// Completes a TLS handshake with `addr` the way a gRPC client does (ALPN h2, verifying
/// `server_name` against `root_pem`) and returns the serial (hex) of the server's leaf.
pub async fn serving_serial(
    addr: SocketAddr,
    root_pem: &str,
    server_name: &str,
) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in pki::parse_certs_pem(root_pem.as_bytes()).map_err(|e| e.to_string())? {
        roots.add(c).map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("server sent no certificate")?;
    Ok(pki::cert_info(leaf).map_err(|e| e.to_string())?.serial_hex)
}
