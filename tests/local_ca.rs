//! The embedded local CA: a CA from files (an RSA intermediate under a root), TTL clamped to
//! the issuer's NotAfter, the generated root persisted across restarts with a private key
//! file only its owner can read, and the listener's TLS versions and ALPN.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use istio_ca_bridge::backend::local::LocalCa;
use istio_ca_bridge::config::{BackendConfig, KeyType, LocalConfig};
use istio_ca_bridge::identity::SpiffeId;
use istio_ca_bridge::pki::{self, CsrShape};
use istio_ca_bridge::testing::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyUsagePurpose};
use time::OffsetDateTime;

/// A root and an RSA intermediate expiring in `inter_life`, written as PEM files.
fn write_ca_files(dir: &std::path::Path, inter_life: time::Duration) -> (String, String) {
    let root_key = pki::generate_key(KeyType::EcdsaP384).unwrap();
    let mut rp = CertificateParams::default();
    rp.distinguished_name
        .push(DnType::CommonName, "Test Enterprise Root");
    rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    rp.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = rp.self_signed(&root_key).unwrap();

    let inter_key = pki::generate_key(KeyType::Rsa).unwrap();
    let mut ip = CertificateParams::default();
    ip.distinguished_name
        .push(DnType::CommonName, "Test Mesh Intermediate");
    ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    ip.not_before = now - time::Duration::hours(1);
    ip.not_after = now + inter_life;
    ip.use_authority_key_identifier_extension = true;
    let issuer = Issuer::from_params(&rp, &root_key);
    let inter = ip.signed_by(&inter_key, &issuer).unwrap();

    std::fs::write(dir.join("ca-cert.pem"), inter.pem()).unwrap();
    // PKCS#1 RSA key, as many enterprise CAs hand them out.
    let pkcs1 = {
        use x509_parser::der_parser::der::parse_der;
        let der = inter_key.serialize_der();
        let (_, obj) = parse_der(&der).unwrap();
        obj.as_sequence().unwrap()[2].as_slice().unwrap().to_vec()
    };
    std::fs::write(
        dir.join("ca-key.pem"),
        pki::pem_encode("RSA PRIVATE KEY", &pkcs1),
    )
    .unwrap();
    std::fs::write(dir.join("root.pem"), root.pem()).unwrap();
    (inter.pem(), root.pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_from_files_with_intermediate_clamps_to_issuer_expiry() {
    let files = tempfile::tempdir().unwrap();
    let fdir = files.path().to_path_buf();
    let (inter_pem, root_pem) = write_ca_files(&fdir, time::Duration::hours(2));
    let b = Bridge::start_with(move |c| {
        c.backend = BackendConfig::Local(LocalConfig {
            ca_cert_file: Some(fdir.join("ca-cert.pem")),
            ca_key_file: Some(fdir.join("ca-key.pem")),
            root_bundle_file: Some(fdir.join("root.pem")),
            ..Default::default()
        });
    })
    .await;
    assert_eq!(b.root_pem(), root_pem);
    let mut client = b.client().await;
    let id = spiffe("default", "demo");
    let (key, csr) = csr_for(&id, KeyType::EcdsaP256, CsrShape::IstioAgent);
    let chain = call(
        &mut client,
        request(csr, Some(&b.issuer.token("default", "demo")), 86400),
    )
    .await
    .unwrap()
    .cert_chain;
    assert_eq!(chain.len(), 3, "leaf, intermediate, root bundle");
    assert_eq!(chain[1], inter_pem);
    assert_eq!(chain[2], root_pem);
    istio_ca_bridge::cli::request::verify_response(&chain, &SpiffeId::parse(&id).unwrap(), &key)
        .unwrap();
    let leaf = pki::cert_info(&pki::parse_certs_pem(chain[0].as_bytes()).unwrap()[0]).unwrap();
    let inter = pki::cert_info(&pki::parse_certs_pem(chain[1].as_bytes()).unwrap()[0]).unwrap();
    assert_eq!(
        leaf.not_after, inter.not_after,
        "24h asked, clamped to the intermediate's NotAfter"
    );

    let dir = b.dir.path();
    std::fs::write(dir.join("leaf.pem"), &chain[0]).unwrap();
    std::fs::write(dir.join("inter.pem"), &chain[1]).unwrap();
    std::fs::write(dir.join("root.pem"), &chain[2]).unwrap();
    let p = |n: &str| dir.join(n).display().to_string();
    let (ok, out) = openssl(&[
        "verify",
        "-CAfile",
        &p("root.pem"),
        "-untrusted",
        &p("inter.pem"),
        &p("leaf.pem"),
    ]);
    assert!(ok, "{out}");
    b.shutdown().await.unwrap();
}

#[test]
fn ca_files_that_do_not_fit_together_are_refused() {
    let files = tempfile::tempdir().unwrap();
    let d = files.path();
    write_ca_files(d, time::Duration::hours(2));
    let other = pki::generate_key(KeyType::EcdsaP256).unwrap();
    std::fs::write(d.join("other-key.pem"), other.serialize_pem()).unwrap();
    let cfg = |cert: &str, key: &str, bundle: Option<&str>| LocalConfig {
        ca_cert_file: Some(d.join(cert)),
        ca_key_file: Some(d.join(key)),
        root_bundle_file: bundle.map(|b| d.join(b)),
        ..Default::default()
    };
    let err = |c: LocalConfig| match LocalCa::from_files(&c) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err(cfg("ca-cert.pem", "other-key.pem", Some("root.pem"))).contains("does not match"));
    // An intermediate without its root: no trust anchor known.
    assert!(err(cfg("ca-cert.pem", "ca-key.pem", None)).contains("rootBundleFile"));
    // A leaf-only "CA".
    assert!(err(cfg("missing.pem", "ca-key.pem", None)).contains("missing.pem"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_root_persists_across_restarts_with_a_private_key_file() {
    let state = tempfile::tempdir().unwrap();
    let sd = state.path().join("ca");
    let start = |sd: std::path::PathBuf| {
        Bridge::start_with(move |c| {
            let BackendConfig::Local(l) = &mut c.backend else {
                unreachable!("tests start with the local backend")
            };
            l.state_dir = sd;
        })
    };
    let first = start(sd.clone()).await;
    let root1 = first.root_pem();
    // Operators read the bundle from the admin port to publish it (istio-ca-root-cert).
    let (status, served) = first.admin_get("/roots").await;
    assert_eq!((status, served.as_str()), (200, root1.as_str()));
    assert_eq!(
        root1,
        std::fs::read_to_string(sd.join("root-cert.pem")).unwrap()
    );
    first.shutdown().await.unwrap();
    let mode = std::fs::metadata(sd.join("root-key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "CA key readable by others");
    let dmode = std::fs::metadata(&sd).unwrap().permissions().mode() & 0o777;
    assert_eq!(dmode, 0o700);
    let second = start(sd.clone()).await;
    assert_eq!(
        second.root_pem(),
        root1,
        "the root is reused after a restart"
    );
    let mut client = second.client().await;
    let (_, csr) = csr_for(&spiffe("a", "b"), KeyType::EcdsaP256, CsrShape::Ztunnel);
    call(
        &mut client,
        request(csr, Some(&second.issuer.token("a", "b")), 0),
    )
    .await
    .unwrap();
    second.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_speaks_tls13_and_tls12_with_h2_and_client_certs_optional() {
    require_tool("openssl", "apt-get install -y openssl");
    let b = Bridge::start().await;
    let root = b.root_file();
    let connect = format!("127.0.0.1:{}", b.grpc.port());
    for (flag, proto) in [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")] {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "timeout 10 openssl s_client -connect {connect} -servername localhost {flag} -alpn h2 \
                 -CAfile {} -verify_return_error -verify_hostname localhost </dev/null 2>&1",
                root.display()
            ))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("ALPN protocol: h2"), "{flag}: {text}");
        assert!(text.contains(proto), "{flag}: {text}");
        assert!(
            text.contains("Verify return code: 0 (ok)"),
            "{flag}: {text}"
        );
        // The server asks for a client certificate (optional): OpenSSL shows the request.
        assert!(
            text.contains("Acceptable client certificate CA names")
                || text.contains("Client Certificate Types")
                || text.contains("Requested Signature Algorithms"),
            "{flag}: no certificate request seen: {text}"
        );
    }
    // Plaintext is refused (no gRPC without TLS).
    let ch = tonic::transport::Channel::from_shared(format!("http://{connect}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await;
    if let Ok(ch) = ch {
        let mut c = istio_ca_bridge::pb::istio_certificate_service_client::IstioCertificateServiceClient::new(ch);
        let (_, csr) = csr_for(&spiffe("a", "b"), KeyType::EcdsaP256, CsrShape::Ztunnel);
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            call(&mut c, request(csr, Some(&b.issuer.token("a", "b")), 0)),
        )
        .await;
        assert!(!matches!(r, Ok(Ok(_))), "plaintext call succeeded");
    }
    assert_eq!(b.issued(), 0);
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_records_every_issued_certificate_and_no_secret() {
    let b = Bridge::start().await;
    let mut client = b.client().await;
    let id = spiffe("default", "audited");
    let token = b.issuer.token("default", "audited");
    let (_, csr) = csr_for(&id, KeyType::EcdsaP256, CsrShape::IstioAgent);
    let chain = call(&mut client, request(csr.clone(), Some(&token), 3600))
        .await
        .unwrap()
        .cert_chain;
    // A refused call leaves no record.
    let (_, other) = csr_for(
        &spiffe("default", "someone-else"),
        KeyType::EcdsaP256,
        CsrShape::IstioAgent,
    );
    call(&mut client, request(other, Some(&token), 3600))
        .await
        .unwrap_err();

    let recs = b.audit_records().await;
    let leaf = pki::cert_info(&pki::parse_certs_pem(chain[0].as_bytes()).unwrap()[0]).unwrap();
    let root = pki::cert_info(&pki::parse_certs_pem(b.root_pem().as_bytes()).unwrap()[0]).unwrap();
    let workload: Vec<_> = recs
        .iter()
        .filter(|r| r["identity"] == id.as_str())
        .collect();
    assert_eq!(workload.len(), 1, "{recs:?}");
    let r = workload[0];
    assert_eq!(r["event"], "certificate_issued");
    assert_eq!(r["serial"], leaf.serial_hex.as_str());
    assert_eq!(r["caller"], id.as_str());
    assert_eq!(r["via"], "jwt");
    assert_eq!(r["backend"], "local");
    assert_eq!(r["mode"], "direct");
    assert_eq!(r["issuer_serial"], root.serial_hex.as_str());
    let na = time::OffsetDateTime::parse(
        r["not_after"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(na.unix_timestamp(), leaf.not_after);
    assert!(
        !recs
            .iter()
            .any(|r| r["identity"] == spiffe("default", "someone-else").as_str()),
        "refused calls are not recorded"
    );
    // The serving certificate is recorded too, without a caller.
    let serving = recs
        .iter()
        .find(|r| r["identity"] == "dns:localhost")
        .expect("serving certificate record");
    assert!(serving["caller"].is_null());
    // Nothing secret in the file.
    let text = std::fs::read_to_string(b.cfg.audit.path.as_ref().unwrap()).unwrap();
    assert!(!text.contains(&token) && !text.contains("BEGIN"), "{text}");
    assert!(!text.contains(csr.lines().nth(1).unwrap()));
    b.shutdown().await.unwrap();
}
