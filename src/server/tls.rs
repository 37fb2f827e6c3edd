//! TLS for the gRPC listener: TLS 1.3 and 1.2, ALPN h2, client certificates requested but
//! optional, and the serving certificate resolved on every handshake so that rotation
//! never restarts the listener or drops a connection.
//!
//! Handshakes run concurrently in their own tasks with a timeout, so one slow or hostile
//! peer cannot hold up accepting others.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::config::ServerConfig;
use crate::pb::istio_certificate_service_server::IstioCertificateServiceServer;
use crate::server::CaService;

/// The current serving certificate, swapped atomically by the renewal task and read by
/// every handshake.
#[derive(Default)]
pub struct CertResolver {
    current: ArcSwapOption<CertifiedKey>,
}

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertResolver")
            .field("loaded", &self.current.load().is_some())
            .finish()
    }
}

impl CertResolver {
    pub fn set(&self, key: Arc<CertifiedKey>) {
        self.current.store(Some(key));
    }
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

/// Requests a client certificate but does not require one, and accepts any certificate
/// whose handshake signature verifies. Whether the chain is trusted is decided by the
/// client-certificate authenticator against the current trust bundle (see
/// `server::authn::client_cert`), never here, and a connection without a trusted client
/// certificate must still present another credential.
#[derive(Debug)]
struct OptionalClientCert {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for OptionalClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The rustls server config for the gRPC listener.
pub fn server_config(resolver: Arc<CertResolver>) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let algs = provider.signature_verification_algorithms;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("aws-lc-rs supports TLS 1.2 and 1.3")
        .with_client_cert_verifier(Arc::new(OptionalClientCert { algs }))
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// tonic refuses a message over the decoding limit with OUT_OF_RANGE before any handler
/// runs. For Istio's clients an oversized CSR is bad input like any other, so it gets
/// INVALID_ARGUMENT (protocol doc section 7; never retried) and a message naming the limit.
fn too_large_is_invalid_argument(
    mut r: http::Response<tonic::body::Body>,
    max_csr_bytes: usize,
) -> http::Response<tonic::body::Body> {
    let out_of_range = tonic::Code::OutOfRange as i32;
    let is_too_large = r
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        == Some(out_of_range);
    if is_too_large {
        let h = r.headers_mut();
        h.insert(
            "grpc-status",
            http::HeaderValue::from(tonic::Code::InvalidArgument as i32),
        );
        let msg = format!("request too large (the CSR limit is {max_csr_bytes} bytes)");
        if let Ok(v) = http::HeaderValue::from_str(&msg) {
            h.insert("grpc-message", v);
        }
    }
    r
}

/// A served connection: the TLS stream and the permit that counts it against
/// `server.maxConnections` (released when the connection is dropped).
pub struct Counted {
    stream: TlsStream<TcpStream>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for Counted {
    // The TLS stream's own, so `Request::peer_certs` and `remote_addr` work unchanged.
    type ConnectInfo = <TlsStream<TcpStream> as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts TCP connections until `shutdown`, handshaking each in its own task; at most
/// `max_connections` are open (handshaking or served) at once.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
    max_connections: usize,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<Counted, io::Error>> {
    let (tx, rx) = mpsc::channel(256);
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => p.expect("never closed"),
            };
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    let acceptor = acceptor.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => {
                                let _ = tx
                                    .send(Ok(Counted {
                                        stream,
                                        _permit: permit,
                                    }))
                                    .await;
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        tracing::debug!("stopped accepting gRPC connections");
    });
    ReceiverStream::new(rx)
}

/// Serves CreateCertificate on `listener` until `shutdown`, then drains: stops accepting,
/// sends GOAWAY and returns once in-flight calls are done. The caller bounds the drain
/// with its grace period.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    service: CaService,
    opts: &ServerConfig,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let stream = incoming(
        listener,
        tls,
        opts.handshake_timeout,
        opts.max_connections,
        shutdown.clone(),
    );
    // Bounds before any credential is looked at: the message size (refused from the gRPC
    // length prefix, never buffered), streams per connection, and the whole call including
    // reading its body (the handler's own timeout starts only once the body is in; this
    // one is a little longer so the handler's clearer UNAVAILABLE wins when both apply).
    let grpc = IstioCertificateServiceServer::new(service)
        .max_decoding_message_size(opts.max_message_bytes())
        .max_encoding_message_size(4 * 1024 * 1024);
    let limit = opts.max_csr_bytes;
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(opts.keepalive_interval))
        .http2_keepalive_timeout(Some(opts.keepalive_timeout))
        .max_concurrent_streams(Some(opts.max_concurrent_streams))
        .timeout(opts.request_timeout + Duration::from_secs(1))
        .layer(tower::util::MapResponseLayer::new(
            move |r: http::Response<tonic::body::Body>| too_large_is_invalid_argument(r, limit),
        ))
        .add_service(grpc)
        .serve_with_incoming_shutdown(stream, shutdown.cancelled_owned())
        .await
}
