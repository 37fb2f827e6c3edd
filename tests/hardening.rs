//! The trust boundary, black-box through the real listener (issue: hardening):
//! - CSR subjects other than Istio's two shapes are INVALID_ARGUMENT and issue nothing;
//! - SHA-1 proofs of possession are INVALID_ARGUMENT;
//! - a client-certificate chain padded with self-issued CAs is refused cheaply;
//! - a client certificate renews only if this deployment issued it (a leaf from another
//!   CA under the same root does not, unless `authn.clientCertIssuersFile` lists that CA);
//! - audit records name the cluster a credential proves, never the `clusterid` header alone.

use std::time::{Duration, Instant};

use istio_ca_bridge::config::{BackendConfig, KeyType, LocalConfig};
use istio_ca_bridge::pb::istio_certificate_service_client::IstioCertificateServiceClient;
use istio_ca_bridge::pki::{self, CsrShape};
use istio_ca_bridge::testing::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tonic::Code;

/// A CSR for `uri` made by OpenSSL with `subj` and `digest`, PEM.
fn openssl_csr(dir: &std::path::Path, uri: &str, subj: &str, digest: &str) -> String {
    let out = dir.join(format!("csr{digest}.pem"));
    let key = dir.join("key.pem");
    let san = format!("subjectAltName=critical,URI:{uri}");
    let (ok, msg) = openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        digest,
        "-subj",
        subj,
        "-addext",
        &san,
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{msg}");
    std::fs::read_to_string(out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_subjects_and_sha1_are_refused_and_issue_nothing() {
    let b = Bridge::start().await;
    let mut client = b.client().await;
    let dir = tempfile::tempdir().unwrap();
    let id = spiffe("default", "web");
    let token = b.issuer.token("default", "web");
    let before = b.issued();
    for (subj, digest) in [
        ("/O=system:masters/O=Acme Admins", "-sha256"),
        ("/CN=admin", "-sha256"),
        ("/", "-sha1"),
    ] {
        let csr = openssl_csr(dir.path(), &id, subj, digest);
        let e = call(&mut client, request(csr, Some(&token), 3600))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{subj} {digest}: {e:?}");
        assert!(
            !e.message().contains("masters"),
            "values are not echoed: {e:?}"
        );
    }
    assert_eq!(b.issued(), before, "nothing issued");
    // The two shapes Istio's clients send still pass (and OpenSSL's empty subject).
    let csr = openssl_csr(dir.path(), &id, "/", "-sha256");
    call(&mut client, request(csr, Some(&token), 3600))
        .await
        .unwrap();
    for shape in [CsrShape::IstioAgent, CsrShape::Ztunnel] {
        let (_, csr) = csr_for(&id, KeyType::EcdsaP256, shape);
        call(&mut client, request(csr, Some(&token), 3600))
            .await
            .unwrap();
    }
}

fn ca(cn: &str, pathlen: Option<u8>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(match pathlen {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

/// A leaf with the bridge's exact workload profile for `uri`, signed by `issuer`.
fn workload_leaf<S: rcgen::SigningKey>(uri: &str, key: &KeyPair, issuer: &Issuer<'_, S>) -> String {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.is_ca = IsCa::ExplicitNoCa;
    p.signed_by(key, issuer).unwrap().pem()
}

async fn mtls_client(
    b: &Bridge,
    chain_pem: String,
    key: &KeyPair,
) -> IstioCertificateServiceClient<tonic::transport::Channel> {
    let ch = istio_ca_bridge::cli::request::connect(
        &format!("localhost:{}", b.grpc.port()),
        b.root_pem().as_bytes(),
        Some("localhost"),
        Some((chain_pem.into_bytes(), key.serialize_pem().into_bytes())),
    )
    .await
    .unwrap();
    IstioCertificateServiceClient::new(ch)
}

/// The bridge's local CA is intermediate "mesh" under an enterprise root; a second
/// intermediate "other" under the same root is not the bridge's.
struct Pki {
    dir: tempfile::TempDir,
    other_key: KeyPair,
    other_params: CertificateParams,
    other_pem: String,
}

fn enterprise_pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let root_key = pki::generate_key(KeyType::EcdsaP256).unwrap();
    let root_params = ca("Enterprise Root", None);
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::from_params(&root_params, &root_key);
    let mesh_key = pki::generate_key(KeyType::EcdsaP256).unwrap();
    let mesh = ca("Mesh Issuing CA", Some(0))
        .signed_by(&mesh_key, &root_issuer)
        .unwrap();
    let other_key = pki::generate_key(KeyType::EcdsaP256).unwrap();
    let other_params = ca("Other Team CA", Some(0));
    let other = other_params.signed_by(&other_key, &root_issuer).unwrap();
    let w = |n: &str, s: &str| std::fs::write(dir.path().join(n), s).unwrap();
    w("root.pem", &root.pem());
    w("ca-cert.pem", &mesh.pem());
    w("ca-key.pem", &mesh_key.serialize_pem());
    w("other.pem", &other.pem());
    Pki {
        dir,
        other_key,
        other_params,
        other_pem: other.pem(),
    }
}

async fn bridge_on(p: &Pki, issuers_file: bool) -> Bridge {
    let d = p.dir.path().to_path_buf();
    Bridge::start_with(move |c| {
        c.backend = BackendConfig::Local(LocalConfig {
            ca_cert_file: Some(d.join("ca-cert.pem")),
            ca_key_file: Some(d.join("ca-key.pem")),
            root_bundle_file: Some(d.join("root.pem")),
            ..Default::default()
        });
        if issuers_file {
            c.authn.client_cert_issuers_file = Some(d.join("other.pem"));
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_renew_only_when_this_deployment_issued_them() {
    let p = enterprise_pki();
    let b = bridge_on(&p, false).await;
    let id = spiffe("vms", "db");
    let (_, csr) = csr_for(&id, KeyType::EcdsaP256, CsrShape::IstioAgent);

    // A leaf with the exact profile, chaining to the trust bundle, but from another CA
    // under the same root: refused, and nothing issued.
    let leaf_key = pki::generate_key(KeyType::EcdsaP256).unwrap();
    let other = Issuer::from_params(&p.other_params, &p.other_key);
    let leaf = workload_leaf(&id, &leaf_key, &other);
    let chain = format!("{leaf}{}", p.other_pem);
    let mut client = mtls_client(&b, chain.clone(), &leaf_key).await;
    let before = b.issued();
    let e = call(&mut client, request(csr.clone(), None, 3600))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(b.issued(), before);

    // Listed in authn.clientCertIssuersFile, the same certificate renews.
    let b2 = bridge_on(&p, true).await;
    let mut client = mtls_client(&b2, chain, &leaf_key).await;
    let (_, csr) = csr_for(&id, KeyType::EcdsaP256, CsrShape::IstioAgent);
    call(&mut client, request(csr, None, 3600)).await.unwrap();

    // A leaf the bridge issued renews; one with extra usages, signed by the same CA, not.
    let mut tok = b.client().await;
    let (key, csr) = csr_for(&id, KeyType::EcdsaP256, CsrShape::IstioAgent);
    let issued = call(
        &mut tok,
        request(csr, Some(&b.issuer.token("vms", "db")), 3600),
    )
    .await
    .unwrap()
    .cert_chain;
    let own = issued[..issued.len() - 1].concat();
    let mut client = mtls_client(&b, own, &key).await;
    let (_, csr) = csr_for(&id, KeyType::EcdsaP256, CsrShape::IstioAgent);
    call(&mut client, request(csr, None, 3600)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_padded_with_self_issued_cas_is_refused_before_path_building() {
    let b = Bridge::start().await;
    let id = spiffe("default", "attacker");
    let leaf_key = pki::generate_key(KeyType::EcdsaP256).unwrap();
    // Ten self-issued CAs (subject = issuer, distinct keys), each "signing" the next.
    let mut chain = String::new();
    let mut issuer_params = ca("Loop CA", None);
    let mut issuer_key = pki::generate_key(KeyType::EcdsaP256).unwrap();
    let mut cas = Vec::new();
    for _ in 0..10 {
        let k = pki::generate_key(KeyType::EcdsaP256).unwrap();
        let params = ca("Loop CA", None);
        let c = params
            .signed_by(&k, &Issuer::from_params(&issuer_params, &issuer_key))
            .unwrap();
        cas.push(c.pem());
        issuer_params = params;
        issuer_key = k;
    }
    let leaf = workload_leaf(
        &id,
        &leaf_key,
        &Issuer::from_params(&issuer_params, &issuer_key),
    );
    chain.push_str(&leaf);
    for c in cas.iter().rev() {
        chain.push_str(c);
    }
    let mut client = mtls_client(&b, chain, &leaf_key).await;
    let (_, csr) = csr_for(&id, KeyType::EcdsaP256, CsrShape::IstioAgent);
    let start = Instant::now();
    // Fewer calls than the connection's failure budget (server::tarpit::BURST), so none is
    // held back: this measures the refusal itself.
    for _ in 0..30 {
        let e = call(&mut client, request(csr.clone(), None, 3600))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    }
    // Generous for a debug build on a loaded machine: the unbounded path search took
    // ~50 ms a call in release; refused from the count, 30 calls take a few ms each.
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "{:?}",
        start.elapsed()
    );
    let (code, _) = b.admin_get("/healthz").await;
    assert_eq!(code, 200);

    // The same connection keeps failing: past its budget each refusal is held for a second
    // (its stream stays open), so it can no longer ask for thousands per second. Other
    // connections, and successful calls, are not slowed.
    let burst = istio_ca_bridge::server::tarpit::BURST as usize;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let mut c = client.clone();
        let csr = csr.clone();
        tasks.push(tokio::spawn(async move {
            call(&mut c, request(csr, None, 3600))
                .await
                .unwrap_err()
                .code()
        }));
    }
    let mut legit = b.client().await;
    let web = spiffe("default", "web");
    let t = Instant::now();
    ask(
        &mut legit,
        &web,
        &b.issuer.token("default", "web"),
        None,
        None,
    )
    .await
    .expect("another connection is not slowed");
    let legit_took = t.elapsed();
    for t in tasks {
        assert_eq!(t.await.unwrap(), Code::Unauthenticated);
    }
    let held = metric(&b, "istio_ca_bridge_authn_failures_delayed_total", "");
    assert!(
        held >= (30 + 40 - burst - 4) as f64,
        "{held} refusals held back"
    );
    assert!(
        start.elapsed() >= istio_ca_bridge::server::tarpit::DELAY,
        "{:?}",
        start.elapsed()
    );
    assert!(
        legit_took < istio_ca_bridge::server::tarpit::DELAY,
        "{legit_took:?}"
    );
    assert_eq!(b.issued(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_the_cluster_a_credential_proves_not_the_header() {
    let b = Bridge::start().await;
    let mut client = b.client().await;
    let id = spiffe("default", "audited");
    let (key, csr) = csr_for(&id, KeyType::EcdsaP256, CsrShape::IstioAgent);
    // The test issuer has no clusterId: the header's "Kubernetes" proves nothing.
    let chain = call(
        &mut client,
        request(csr, Some(&b.issuer.token("default", "audited")), 3600),
    )
    .await
    .unwrap()
    .cert_chain;
    // A client certificate with a made-up clusterid header proves no cluster either.
    let own = chain[..chain.len() - 1].concat();
    let mut mtls = mtls_client(&b, own, &key).await;
    let (_, csr) = csr_for(&id, KeyType::EcdsaP256, CsrShape::IstioAgent);
    let mut req = request(csr, None, 3600);
    req.metadata_mut()
        .insert("clusterid", "prod-east".parse().unwrap());
    call(&mut mtls, req).await.unwrap();
    let records = b.audit_records().await;
    let mine: Vec<_> = records
        .iter()
        .filter(|r| r["identity"] == id.as_str())
        .collect();
    assert_eq!(mine.len(), 2, "{records:?}");
    for r in mine {
        assert!(r["cluster_id"].is_null(), "{r}");
    }
}
