//! The one TLS accept loop of the in-process fakes (DigiCert, the Kubernetes API): bind a
//! loopback port, complete TLS with the fake's rustls config, serve an axum app over HTTP/1.1
//! per connection, and tear everything down (listener and open connections, watches
//! included) on [`TlsServer::stop`] or drop. Also the fakes' throwaway TLS identity.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// A TLS server task serving an axum app; stops on drop.
pub struct TlsServer {
    addr: SocketAddr,
    /// The accept loop; `None` once stopped.
    accept: Option<JoinHandle<()>>,
    /// Open connections, cut together when the server stops (a watch must end too).
    conns: Arc<Mutex<JoinSet<()>>>,
}

impl TlsServer {
    /// Serves on `addr` (127.0.0.1:0, or a fake's old port when it comes back) to every
    /// client that completes TLS with `tls`; each connection gets the app `per_connection`
    /// returns once its handshake is done (which may look at the TLS session, e.g. count
    /// client certificates).
    pub async fn bind<F>(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        per_connection: F,
    ) -> std::io::Result<TlsServer>
    where
        F: Fn(&rustls::ServerConnection) -> Router + Send + Sync + 'static,
    {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let per_connection = Arc::new(per_connection);
        let c2 = conns.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let per_connection = per_connection.clone();
                let mut conns = c2.lock().unwrap();
                // Reap finished connections so a long test does not accumulate them.
                while conns.try_join_next().is_some() {}
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let app = per_connection(tls.get_ref().1);
                    let svc = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Ok(TlsServer {
            addr,
            accept: Some(accept),
            conns,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server goes away: the listener is closed (the port can be bound again once this
    /// returns) and every open connection is cut.
    pub async fn stop(mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
        self.conns.lock().unwrap().abort_all();
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        self.conns.lock().unwrap().abort_all();
    }
}

/// A throwaway CA and a certificate for `localhost` and `127.0.0.1` signed by it: what a
/// fake presents, and what the bridge under test is told to trust.
pub struct TestServerCert {
    /// PEM of the CA (the bridge's `caFile`, a kubeconfig's `certificate-authority-data`).
    pub ca_pem: String,
    /// The serving certificate.
    pub cert: CertificateDer<'static>,
    /// Its key.
    pub key: PrivateKeyDer<'static>,
}

impl TestServerCert {
    /// A fresh CA with common name `ca_name`, and the serving certificate.
    pub fn new(ca_name: &str) -> TestServerCert {
        let ca_key = key();
        let ca_params = ca_params(ca_name);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let srv_key = key();
        let srv = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap()
            .signed_by(&srv_key, &issuer)
            .unwrap();
        TestServerCert {
            ca_pem: ca.pem(),
            cert: srv.der().clone(),
            key: PrivateKeyDer::Pkcs8(srv_key.serialize_der().into()),
        }
    }

    /// A server config (HTTP/1.1 ALPN) with this certificate and `client_auth` (e.g.
    /// `WebPkiClientVerifier` for mutual TLS), or none.
    pub fn server_config(
        &self,
        client_auth: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    ) -> Arc<rustls::ServerConfig> {
        let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap();
        let builder = match client_auth {
            Some(v) => builder.with_client_cert_verifier(v),
            None => builder.with_no_client_auth(),
        };
        let mut tls = builder
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())
            .unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(tls)
    }
}

/// Parameters of a test CA named `cn`: unconstrained, certificate and CRL signing, valid
/// from yesterday for ten years.
pub fn ca_params(cn: &str) -> rcgen::CertificateParams {
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

/// A fresh ECDSA P-256 key for test certificates.
pub fn key() -> rcgen::KeyPair {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}
