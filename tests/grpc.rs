//! Black-box tests of CreateCertificate over the real TLS listener: Istio-shaped requests
//! succeed and verify with OpenSSL, two workloads complete a mutual-TLS handshake with
//! OpenSSL, a certificate from the bridge authenticates its own renewal, and a JWKS served
//! from a URL is fetched and refreshed on an unknown key id. The refusals are in
//! `grpc_bad_input.rs`.

use std::process::{Command, Stdio};
use std::time::Duration;

use istio_ca_bridge::config::KeyType;
use istio_ca_bridge::pb::istio_certificate_service_client::IstioCertificateServiceClient;
use istio_ca_bridge::pki::{self, CsrShape};
use istio_ca_bridge::testing::*;
use tonic::Code;

fn write(dir: &std::path::Path, name: &str, data: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p.display().to_string()
}

/// Leaf + intermediates as one PEM, and the root bundle, from a response.
fn split_chain(chain: &[String]) -> (String, String) {
    (
        chain[..chain.len() - 1].concat(),
        chain[chain.len() - 1].clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_shaped_requests_get_verifiable_chains() {
    let b = Bridge::start().await;
    let mut client = b.client().await;
    let token = b.issuer.token("default", "bookinfo");
    let id = spiffe("default", "bookinfo");
    for key_type in [KeyType::EcdsaP256, KeyType::Rsa, KeyType::EcdsaP384] {
        for shape in [CsrShape::IstioAgent, CsrShape::Ztunnel] {
            let (key, csr) = csr_for(&id, key_type, shape);
            let resp = call(&mut client, request(csr, Some(&token), 86400))
                .await
                .unwrap_or_else(|s| panic!("{key_type:?} {shape:?}: {s:?}"));
            let chain = resp.cert_chain;
            // Layout: leaf, root bundle; every element one PEM ending in a newline.
            assert_eq!(chain.len(), 2, "{chain:?}");
            assert!(chain.iter().all(|e| e.ends_with('\n')));
            let target = istio_ca_bridge::identity::SpiffeId::parse(&id).unwrap();
            istio_ca_bridge::cli::request::verify_response(&chain, &target, &key).unwrap();

            let info =
                pki::cert_info(&pki::parse_certs_pem(chain[0].as_bytes()).unwrap()[0]).unwrap();
            assert_eq!(info.uri_sans, vec![id.clone()]);
            assert!(info.dns_sans.is_empty());
            assert!(!info.is_ca);
            assert_eq!(info.subject, "");
            let life = info.not_after - info.not_before;
            assert_eq!(life, 86400 + 120, "NotBefore is now-2min, NotAfter now+TTL");

            // OpenSSL, an independent verifier, accepts it for both TLS roles.
            let dir = b.dir.path();
            let (leaf, root) = split_chain(&chain);
            let leaf_f = write(dir, "leaf.pem", &leaf);
            let root_f = write(dir, "root.pem", &root);
            for purpose in ["sslclient", "sslserver"] {
                let (ok, out) =
                    openssl(&["verify", "-purpose", purpose, "-CAfile", &root_f, &leaf_f]);
                assert!(ok, "openssl verify {purpose}: {out}");
            }
            let (_, text) = openssl(&["x509", "-in", &leaf_f, "-noout", "-text"]);
            assert!(
                text.contains("X509v3 Subject Alternative Name: critical"),
                "{text}"
            );
            assert!(
                text.contains("Digital Signature, Key Encipherment"),
                "{text}"
            );
            assert!(
                text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
                "{text}"
            );
            assert!(text.contains("CA:FALSE"), "{text}");
        }
    }
    assert_eq!(b.issued(), 6);
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workloads_complete_a_mutual_tls_handshake_with_openssl() {
    require_tool("openssl", "apt-get install -y openssl");
    let b = Bridge::start().await;
    let mut client = b.client().await;
    let dir = b.dir.path();
    let mut files = Vec::new();
    for (sa, kt) in [("server", KeyType::EcdsaP256), ("client", KeyType::Rsa)] {
        let id = spiffe("default", sa);
        let (key, csr) = csr_for(&id, kt, CsrShape::IstioAgent);
        let chain = call(
            &mut client,
            request(csr, Some(&b.issuer.token("default", sa)), 3600),
        )
        .await
        .unwrap()
        .cert_chain;
        let (leaf, root) = split_chain(&chain);
        files.push((
            write(dir, &format!("{sa}.pem"), &leaf),
            write(dir, &format!("{sa}.key"), &key.serialize_pem()),
            write(dir, "root.pem", &root),
        ));
    }
    let (srv_cert, srv_key, root) = files[0].clone();
    let (cli_cert, cli_key, _) = files[1].clone();

    // A foreign CA's client certificate must be refused by the same server.
    let foreign_key = pki::generate_key(KeyType::EcdsaP256).unwrap();
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        spiffe("default", "client").try_into().unwrap(),
    )];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let foreign = p.self_signed(&foreign_key).unwrap();
    let foreign_cert = write(dir, "foreign.pem", &foreign.pem());
    let foreign_key_f = write(dir, "foreign.key", &foreign_key.serialize_pem());

    for (cert, key, expect_ok) in [
        (&cli_cert, &cli_key, true),
        (&foreign_cert, &foreign_key_f, false),
    ] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Command::new("openssl")
            .args([
                "s_server",
                "-accept",
                &format!("127.0.0.1:{port}"),
                "-cert",
                &srv_cert,
                "-key",
                &srv_key,
                "-CAfile",
                &root,
                "-Verify",
                "2",
                "-verify_return_error",
                "-purpose",
                "sslclient",
                "-naccept",
                "1",
                "-rev",
                "-quiet",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = String::new();
        let mut ok = false;
        for _ in 0..50 {
            let o = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "(echo ping; sleep 1) | timeout 10 openssl s_client -connect 127.0.0.1:{port} -cert {cert} -key {key} \
                     -CAfile {root} -verify_return_error -purpose sslserver -verify 2 2>&1"
                ))
                .output()
                .unwrap();
            out = String::from_utf8_lossy(&o.stdout).to_string();
            if out.contains("Connection refused") || out.contains("connect:errno") {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            ok = o.status.success()
                && out.contains("Verify return code: 0 (ok)")
                && out.contains("gnip");
            break;
        }
        let _ = server.kill();
        let srv = server.wait_with_output().unwrap();
        let srv_out = String::from_utf8_lossy(&srv.stderr).to_string();
        assert_eq!(
            ok, expect_ok,
            "client {cert}: s_client output:\n{out}\ns_server:\n{srv_out}"
        );
    }
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_the_bridge_authenticates_its_renewal() {
    let b = Bridge::start().await;
    let mut client = b.client().await;
    let id = spiffe("vms", "db");
    let (key, csr) = csr_for(&id, KeyType::EcdsaP256, CsrShape::IstioAgent);
    let chain = call(
        &mut client,
        request(csr, Some(&b.issuer.token("vms", "db")), 3600),
    )
    .await
    .unwrap()
    .cert_chain;
    let (leaf, _) = split_chain(&chain);

    // Renew with only the client certificate (the token has "expired").
    let ch = istio_ca_bridge::cli::request::connect(
        &format!("localhost:{}", b.grpc.port()),
        b.root_pem().as_bytes(),
        Some("localhost"),
        Some((leaf.clone().into_bytes(), key.serialize_pem().into_bytes())),
    )
    .await
    .unwrap();
    let mut mtls = IstioCertificateServiceClient::new(ch);
    let (_, csr2) = csr_for(&id, KeyType::EcdsaP256, CsrShape::IstioAgent);
    mtls_ok(&mut mtls, csr2, None).await;
    // The certificate only proves its own identity.
    let (_, other) = csr_for(
        &spiffe("vms", "other"),
        KeyType::EcdsaP256,
        CsrShape::IstioAgent,
    );
    let e = call(&mut mtls, request(other, None, 3600))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // A certificate from another CA proves nothing.
    let foreign_key = pki::generate_key(KeyType::EcdsaP256).unwrap();
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(id.clone().try_into().unwrap())];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let foreign = p.self_signed(&foreign_key).unwrap();
    let ch = istio_ca_bridge::cli::request::connect(
        &format!("localhost:{}", b.grpc.port()),
        b.root_pem().as_bytes(),
        Some("localhost"),
        Some((
            foreign.pem().into_bytes(),
            foreign_key.serialize_pem().into_bytes(),
        )),
    )
    .await
    .unwrap();
    let mut foreign_client = IstioCertificateServiceClient::new(ch);
    let (_, csr3) = csr_for(&id, KeyType::EcdsaP256, CsrShape::IstioAgent);
    let e = call(&mut foreign_client, request(csr3.clone(), None, 3600))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // ...but a valid token on the same connection still works (first success wins).
    mtls_ok(
        &mut foreign_client,
        csr3,
        Some(&b.issuer.token("vms", "db")),
    )
    .await;
    b.shutdown().await.unwrap();
}

async fn mtls_ok(
    c: &mut IstioCertificateServiceClient<tonic::transport::Channel>,
    csr: String,
    token: Option<&str>,
) {
    let r = call(c, request(csr, token, 3600)).await;
    assert!(r.is_ok(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_from_a_url_is_fetched_and_refreshed_on_unknown_kid() {
    use std::sync::{Arc, Mutex};
    let issuer = Arc::new(TestIssuer::new("https://remote.test"));
    let mut only_es = issuer.jwks.clone();
    only_es["keys"].as_array_mut().unwrap().truncate(1);
    let served = Arc::new(Mutex::new(only_es));
    let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = {
        let served = served.clone();
        let fetches = fetches.clone();
        axum::Router::new().route(
            "/jwks",
            axum::routing::get(move |headers: axum::http::HeaderMap| {
                let v = served.lock().unwrap().clone();
                fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // Like the API server's /openid/v1/jwks: only for authenticated readers.
                let authorized = headers
                    .get("authorization")
                    .is_some_and(|h| h == "Bearer jwks-reader-token");
                async move {
                    if authorized {
                        Ok(axum::Json(v))
                    } else {
                        Err(axum::http::StatusCode::UNAUTHORIZED)
                    }
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("sa-token");
    std::fs::write(&token_file, "jwks-reader-token\n").unwrap();
    let iss = issuer.clone();
    let b = Bridge::start_with(move |c| {
        c.authn.jwt.push(istio_ca_bridge::config::JwtIssuerConfig {
            issuer: iss.issuer.clone(),
            jwks_file: None,
            jwks_uri: Some(format!("http://{jwks_addr}/jwks")),
            jwks_ca_file: None,
            jwks_token_file: Some(token_file),
            audiences: vec!["istio-ca".into()],
            trust_domain: Some("remote.example".into()),
            cluster_id: Some("remote".into()),
            refresh_interval: Duration::from_secs(300),
            insecure_http: true,
        });
    })
    .await;
    let mut client = b.client().await;
    let remote_id = "spiffe://remote.example/ns/default/sa/demo";
    let (_, csr) = csr_for(remote_id, KeyType::EcdsaP256, CsrShape::IstioAgent);
    let remote = |token: &str| {
        let mut r = request(csr.clone(), Some(token), 3600);
        r.metadata_mut()
            .insert("clusterid", "remote".parse().unwrap());
        r
    };
    call(&mut client, remote(&issuer.token("default", "demo")))
        .await
        .expect("ES256 key from the URL works; identity in the issuer's trust domain");
    let before = fetches.load(std::sync::atomic::Ordering::SeqCst);

    // The issuer rotates in its RSA key: the first token naming it triggers a refresh.
    *served.lock().unwrap() = issuer.jwks.clone();
    let rs = issuer.sign_rs(&issuer.claims("default", "demo"), Some("rs"));
    call(&mut client, remote(&rs))
        .await
        .expect("refreshed on unknown kid");
    assert_eq!(
        fetches.load(std::sync::atomic::Ordering::SeqCst),
        before + 1
    );

    // A token from that issuer naming another cluster is refused.
    let mut req = request(csr, Some(&rs), 3600);
    req.metadata_mut()
        .insert("clusterid", "other".parse().unwrap());
    assert_eq!(
        call(&mut client, req).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    b.shutdown().await.unwrap();
}
