//! The gRPC serving certificate: issued by the bridge's own backend and renewed before
//! expiry, or loaded from PEM files and reloaded when they change. Either way the new
//! certificate is installed into the [`CertResolver`] that every TLS handshake reads, so
//! rotation never interrupts a call.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, DnType};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::backend::{SignRequest, Signer, Subject};
use crate::config::ServerTlsConfig;
use crate::metrics::Metrics;
use crate::pki;
use crate::pki::KeyType;
use crate::server::tls::CertResolver;

#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("key generation: {0}")]
    Key(String),
    #[error("signing the serving certificate: {0}")]
    Sign(#[from] crate::backend::SignError),
    #[error("issued serving certificate does not verify: {0}")]
    Verify(String),
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

/// A certificate ready to install, with its expiry.
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    pub not_after: i64,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A server certificate the backend issued for a key generated here, already checked to
/// chain to the signer's trust bundle for server authentication.
pub struct IssuedServerCert {
    pub key: rcgen::KeyPair,
    pub leaf: CertificateDer<'static>,
    pub intermediates: Vec<CertificateDer<'static>>,
    pub bundle: crate::trust::SharedBundle,
    pub not_after: i64,
}

/// Generates a P-256 key and a CSR for `dns_names`, has `signer` issue a server certificate
/// (verified by [`crate::backend::checked`]; used for the bridge's own serving certificate and istiod's).
pub async fn issue_server_cert(
    signer: &dyn Signer,
    dns_names: &[String],
    ttl: Duration,
) -> Result<IssuedServerCert, ServingError> {
    let key =
        pki::generate_key(KeyType::EcdsaP256).map_err(|e| ServingError::Key(e.to_string()))?;
    let mut params =
        CertificateParams::new(dns_names.to_vec()).map_err(|e| ServingError::Key(e.to_string()))?;
    let mut dn = DistinguishedName::new();
    if let Some(first) = dns_names.first() {
        dn.push(DnType::CommonName, first.as_str());
    }
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .map_err(|e| ServingError::Key(e.to_string()))?;
    let req = SignRequest {
        subject: Subject::Server {
            dns_names: dns_names.to_vec(),
        },
        public_key_der: rcgen::PublicKeyData::subject_public_key_info(&key),
        csr_der: csr.der().to_vec(),
        ttl,
        caller: None,
    };
    let issued = signer.sign(&req).await?;
    // `signer` is the composed one: its answer was verified for server auth and these names.
    let verified = issued
        .verified
        .clone()
        .ok_or_else(|| ServingError::Verify("bug: the signer's answer was not verified".into()))?;
    let (bundle, not_after) = (verified.bundle, verified.leaf.not_after);
    Ok(IssuedServerCert {
        key,
        leaf: issued.leaf,
        intermediates: issued.intermediates,
        bundle,
        not_after,
    })
}

/// Issues the bridge's serving certificate, ready to install.
pub async fn issue(
    signer: &dyn Signer,
    dns_names: &[String],
    ttl: Duration,
) -> Result<Loaded, ServingError> {
    let c = issue_server_cert(signer, dns_names, ttl).await?;
    let mut chain = vec![c.leaf];
    chain.extend(c.intermediates);
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key.serialize_der()));
    let certified = CertifiedKey::from_der(chain, key_der, &provider())
        .map_err(|e| ServingError::Verify(e.to_string()))?;
    Ok(Loaded {
        key: Arc::new(certified),
        not_after: c.not_after,
    })
}

/// Loads a certificate chain and key from PEM files, checking that they belong together.
pub fn load_files(cert_file: &Path, key_file: &Path) -> Result<Loaded, ServingError> {
    let file_err = |p: &Path, message: String| ServingError::File {
        path: p.display().to_string(),
        message,
    };
    let cert_pem = std::fs::read(cert_file).map_err(|e| file_err(cert_file, e.to_string()))?;
    let key_pem = std::fs::read(key_file).map_err(|e| file_err(key_file, e.to_string()))?;
    let certs: Vec<CertificateDer<'static>> =
        pki::parse_certs_pem(&cert_pem).map_err(|e| file_err(cert_file, e.to_string()))?;
    let key = pki::parse_key_pem(&key_pem).map_err(|e| file_err(key_file, e.to_string()))?;
    let not_after = pki::cert_info(&certs[0])
        .map_err(|e| file_err(cert_file, e.to_string()))?
        .not_after;
    let certified = CertifiedKey::from_der(certs, key, &provider())
        .map_err(|e| file_err(key_file, format!("does not match the certificate: {e}")))?;
    Ok(Loaded {
        key: Arc::new(certified),
        not_after,
    })
}

fn install(resolver: &CertResolver, metrics: &Metrics, loaded: Loaded) -> i64 {
    resolver.set(loaded.key);
    metrics.serving_cert_expiry.set(loaded.not_after as f64);
    metrics.serving_cert_rotations.inc();
    loaded.not_after
}

/// Obtains the first serving certificate (before the listener starts).
pub async fn initial(
    cfg: &ServerTlsConfig,
    signer: &dyn Signer,
    resolver: &CertResolver,
    metrics: &Metrics,
) -> Result<i64, ServingError> {
    let loaded = match cfg.mode {
        crate::config::ServingCertMode::Issued => issue(signer, &cfg.dns_names, cfg.ttl).await?,
        crate::config::ServingCertMode::Files => load_files(
            cfg.cert_file.as_deref().expect("validated"),
            cfg.key_file.as_deref().expect("validated"),
        )?,
    };
    Ok(install(resolver, metrics, loaded))
}

/// Keeps the serving certificate fresh until `shutdown`.
pub fn spawn_maintainer(
    cfg: ServerTlsConfig,
    signer: Arc<dyn Signer>,
    resolver: Arc<CertResolver>,
    metrics: Arc<Metrics>,
    mut not_after: i64,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        match cfg.mode {
            crate::config::ServingCertMode::Issued => {
                let mut failures = 0u32;
                let mut issued_at = pki::unix_secs(SystemTime::now());
                // A new bundle may come with a new signing root (a root rotation's phases):
                // the certificate is re-issued at once, so it chains to what clients
                // will trust next.
                let mut bundle_rx = signer.trust_bundle();
                bundle_rx.mark_unchanged();
                loop {
                    let renew_at =
                        pki::from_unix(pki::renew_at(issued_at, not_after, cfg.renew_before));
                    let wait = if failures > 0 {
                        // Capped: after a signing-CA switch (intermediate mode) the next
                        // attempt should not be a minute away.
                        Duration::from_millis(500 << failures.min(7)).min(Duration::from_secs(10))
                    } else {
                        renew_at
                            .duration_since(SystemTime::now())
                            .unwrap_or(Duration::ZERO)
                    };
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                        r = bundle_rx.changed() => {
                            if r.is_err() {
                                return;
                            }
                            bundle_rx.mark_unchanged();
                            tracing::info!("trust bundle changed; re-issuing the serving certificate");
                        }
                    }
                    match issue(signer.as_ref(), &cfg.dns_names, cfg.ttl).await {
                        Ok(loaded) => {
                            failures = 0;
                            issued_at = pki::unix_secs(SystemTime::now());
                            not_after = install(&resolver, &metrics, loaded);
                            tracing::info!(not_after, "serving certificate renewed");
                        }
                        Err(e) => {
                            failures += 1;
                            metrics.serving_cert_errors.inc();
                            tracing::error!(error = %e, not_after, "serving certificate renewal failed; retrying");
                        }
                    }
                }
            }
            crate::config::ServingCertMode::Files => {
                let cert_file = cfg.cert_file.clone().expect("validated");
                let key_file = cfg.key_file.clone().expect("validated");
                let mut last = file_digest(&cert_file, &key_file);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(cfg.reload_interval) => {}
                    }
                    let now = file_digest(&cert_file, &key_file);
                    if now == last {
                        continue;
                    }
                    match load_files(&cert_file, &key_file) {
                        Ok(loaded) => {
                            last = now;
                            let na = install(&resolver, &metrics, loaded);
                            tracing::info!(
                                not_after = na,
                                "serving certificate reloaded from files"
                            );
                        }
                        Err(e) => {
                            // Files mid-update (cert written, key not yet): keep the old
                            // certificate and try again next tick.
                            metrics.serving_cert_errors.inc();
                            tracing::warn!(error = %e, "serving certificate files changed but do not load; keeping the current one");
                        }
                    }
                }
            }
        }
    });
}

fn file_digest(a: &Path, b: &Path) -> Option<[u8; 32]> {
    let mut h = Sha256::new();
    h.update(std::fs::read(a).ok()?);
    h.update(std::fs::read(b).ok()?);
    Some(h.finalize().into())
}
