//! A simulated mesh for root-rotation tests: workloads that hold a certificate and the
//! roots of their last answer (as istio-agent keeps the answer's last element), renew at
//! half-life through the bridge while trusting only those roots, and complete mutual-TLS
//! handshakes with each other the way sidecars do (the peer's chain verified against one's
//! own roots, the SPIFFE ID checked instead of a DNS name).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::KeyPair;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::config::KeyType;
use crate::pki::{self, CsrShape};
use crate::trust::{TrustBundle, verify_path};

/// One workload: its identity, key, chain and the roots it trusts.
pub struct Workload {
    /// Its SPIFFE ID.
    pub uri: String,
    key: KeyPair,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The last element of its last answer.
    pub roots: Arc<TrustBundle>,
    issued_at: i64,
    not_after: i64,
    /// Renewals so far.
    pub renewals: u32,
}

fn now() -> i64 {
    pki::unix_secs(SystemTime::now())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl Workload {
    /// Due for renewal: half its lifetime is over (istio-agent's default grace ratio).
    pub fn due(&self, at: i64) -> bool {
        at >= self.issued_at + (self.not_after - self.issued_at) / 2
    }

    /// The common name of the leaf's issuer (which root signed it).
    pub fn issuer_cn(&self) -> String {
        let (_, c) = x509_parser::parse_x509_certificate(&self.chain[0]).expect("parsed before");
        c.issuer()
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .unwrap_or("")
            .to_string()
    }

    /// Asks the bridge at `port` for a certificate, connecting with only the roots this
    /// workload holds (`roots_pem` for a new one). Checks the answer and keeps it.
    pub async fn enroll(
        port: u16,
        uri: &str,
        roots_pem: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<Workload, String> {
        let key = pki::generate_key(KeyType::EcdsaP256).map_err(|e| e.to_string())?;
        let (chain, roots) = ask(port, uri, &key, roots_pem, token, ttl).await?;
        let info = pki::cert_info(&chain[0]).map_err(|e| e.to_string())?;
        Ok(Workload {
            uri: uri.to_string(),
            key,
            chain,
            roots,
            issued_at: now(),
            not_after: info.not_after,
            renewals: 0,
        })
    }

    /// Renews through the bridge at `port` (a new key, as istio-agent rotates keys).
    pub async fn renew(&mut self, port: u16, token: &str, ttl: Duration) -> Result<(), String> {
        let key = pki::generate_key(KeyType::EcdsaP256).map_err(|e| e.to_string())?;
        let (chain, roots) = ask(port, &self.uri, &key, self.roots.pem(), token, ttl)
            .await
            .map_err(|e| format!("{} renewing: {e}", self.uri))?;
        let info = pki::cert_info(&chain[0]).map_err(|e| e.to_string())?;
        self.key = key;
        self.chain = chain;
        self.roots = roots;
        self.issued_at = now();
        self.not_after = info.not_after;
        self.renewals += 1;
        Ok(())
    }

    fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }
}

async fn ask(
    port: u16,
    uri: &str,
    key: &KeyPair,
    roots_pem: &str,
    token: &str,
    ttl: Duration,
) -> Result<(Vec<CertificateDer<'static>>, Arc<TrustBundle>), String> {
    let csr = pki::workload_csr(key, uri, CsrShape::IstioAgent).map_err(|e| e.to_string())?;
    let mut client = super::requests::connect(port, roots_pem)
        .await
        .map_err(|e| format!("connecting to the bridge with the roots held: {e:#}"))?;
    let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    let resp = super::requests::call(&mut client, super::requests::request(csr, Some(token), ttl))
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    let n = resp.cert_chain.len();
    if n < 2 {
        return Err(format!("an answer of {n} elements"));
    }
    let mut chain = Vec::new();
    for pem in &resp.cert_chain[..n - 1] {
        chain.extend(pki::parse_certs_pem(pem.as_bytes()).map_err(|e| e.to_string())?);
    }
    let roots =
        TrustBundle::from_pem(resp.cert_chain[n - 1].as_bytes()).map_err(|e| e.to_string())?;
    Ok((chain, Arc::new(roots)))
}

/// Verifies a server's chain against the client's roots and its URI SAN against the
/// expected SPIFFE ID (no DNS name: that is how sidecars check each other).
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<TrustBundle>,
    expected_uri: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_path(
            end_entity,
            intermediates,
            &self.roots,
            webpki::KeyUsage::server_auth(),
            SystemTime::now(),
        )
        .map_err(|e| rustls::Error::General(format!("server chain: {e}")))?;
        let info = pki::cert_info(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        if info.uri_sans != [self.expected_uri.clone()] {
            return Err(rustls::Error::General(format!(
                "server is {:?}, not {}",
                info.uri_sans, self.expected_uri
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A mutual-TLS handshake from `client` to `server` over an in-memory pipe, each side
/// verifying the other with the roots it holds.
pub async fn mtls(client: &Workload, server: &Workload) -> Result<(), String> {
    let p = provider();
    let mut server_roots = rustls::RootCertStore::empty();
    for r in server.roots.roots() {
        server_roots.add(r.clone()).map_err(|e| e.to_string())?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(server_roots), p.clone())
        .build()
        .map_err(|e| e.to_string())?;
    let scfg = rustls::ServerConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(server.chain.clone(), server.key_der())
        .map_err(|e| e.to_string())?;
    let ccfg = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
            roots: client.roots.clone(),
            expected_uri: server.uri.clone(),
            provider: p,
        }))
        .with_client_auth_cert(client.chain.clone(), client.key_der())
        .map_err(|e| e.to_string())?;
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(scfg));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(ccfg));
    let name = ServerName::try_from("workload").expect("static name");
    let (s, c) = tokio::join!(acceptor.accept(b), connector.connect(name, a));
    let detail =
        |side: &str, e: std::io::Error| format!("{} -> {}: {side}: {e}", client.uri, server.uri);
    // The client finishes first in TLS 1.3; the server's result carries the client-cert check.
    c.map_err(|e| detail("client", e))?;
    s.map_err(|e| detail("server", e))?;
    Ok(())
}

/// Every pair of `fleet` shakes hands (each side verifies the other); returns the failures.
pub async fn all_pairs(fleet: &[Workload]) -> Vec<String> {
    let mut failures = Vec::new();
    for (i, a) in fleet.iter().enumerate() {
        for b in &fleet[i + 1..] {
            if let Err(e) = mtls(a, b).await {
                failures.push(e);
            }
        }
    }
    failures
}

/// Each workload with its successor (a ring, both directions); returns the failures.
pub async fn ring(fleet: &[Workload]) -> Vec<String> {
    let mut failures = Vec::new();
    let n = fleet.len();
    for i in 0..n {
        let (a, b) = (&fleet[i], &fleet[(i + 1) % n]);
        for (x, y) in [(a, b), (b, a)] {
            if let Err(e) = mtls(x, y).await {
                failures.push(e);
            }
        }
    }
    failures
}
