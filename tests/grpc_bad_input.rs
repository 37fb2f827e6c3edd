//! Black-box tests of CreateCertificate's refusals over the real TLS listener: every kind
//! of bad input (malformed or oversized CSRs, wrong keys, SANs and extensions, an identity
//! other than the caller's; missing, expired, foreign or forged tokens; impersonation
//! without the node authorizer) gets its exact gRPC code without issuing anything or
//! leaking the token, the server keeps serving (TTLs defaulted and clamped), and a TTL over
//! the maximum is rejected when the policy says so.

use std::time::Duration;

use istio_ca_bridge::config::{KeyType, OverMax};
use istio_ca_bridge::pki::{self, CsrShape};
use istio_ca_bridge::testing::*;
use tonic::Code;

/// One bad request and the code it must get.
struct Bad {
    name: &'static str,
    csr: String,
    token: Option<String>,
    ttl: i64,
    code: Code,
}

fn openssl_csr(dir: &std::path::Path, name: &str, args: &[&str]) -> String {
    let out = dir.join(format!("{name}.csr"));
    let key = dir.join(format!("{name}.key"));
    let mut all = vec![
        "req",
        "-new",
        "-nodes",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        out.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let (ok, msg) = openssl(&all);
    assert!(ok, "openssl req {name}: {msg}");
    std::fs::read_to_string(out).unwrap()
}

fn rcgen_csr(params: rcgen::CertificateParams, alg: &'static rcgen::SignatureAlgorithm) -> String {
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn unsigned_token(claims: &serde_json::Value) -> String {
    use base64::Engine;
    let e = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    };
    format!(
        "{}.{}.",
        e(&serde_json::json!({"alg": "none", "typ": "JWT"})),
        e(claims)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_code_and_issues_nothing() {
    let b = Bridge::start().await;
    let mut client = b.client().await;
    let dir = b.dir.path();
    let id = spiffe("default", "demo");
    let token = b.issuer.token("default", "demo");
    let (_, good_csr) = csr_for(&id, KeyType::EcdsaP256, CsrShape::IstioAgent);
    let uri_san = format!("subjectAltName=critical,URI:{id}");

    let broken_sig = {
        let mut der = ::pem::parse(&good_csr).unwrap().contents().to_vec();
        let n = der.len();
        der[n - 5] ^= 0x55; // inside the signature value
        pki::pem_encode("CERTIFICATE REQUEST", &der)
    };

    let mut dns = rcgen::CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
    dns.distinguished_name = rcgen::DistinguishedName::new();
    dns.subject_alt_names
        .push(rcgen::SanType::URI(id.clone().try_into().unwrap()));
    let mut two_uris = rcgen::CertificateParams::new(vec![]).unwrap();
    two_uris.distinguished_name = rcgen::DistinguishedName::new();
    two_uris.subject_alt_names = vec![
        rcgen::SanType::URI(id.clone().try_into().unwrap()),
        rcgen::SanType::URI(spiffe("default", "other").try_into().unwrap()),
    ];
    let mut ip = rcgen::CertificateParams::new(vec![]).unwrap();
    ip.distinguished_name = rcgen::DistinguishedName::new();
    ip.subject_alt_names = vec![
        rcgen::SanType::URI(id.clone().try_into().unwrap()),
        rcgen::SanType::IpAddress("10.0.0.1".parse().unwrap()),
    ];
    let no_san = {
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        rcgen_csr(p, &rcgen::PKCS_ECDSA_P256_SHA256)
    };
    let workload_params = |uri: &str| {
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = vec![rcgen::SanType::URI(uri.to_string().try_into().unwrap())];
        p
    };
    let now = now();
    let claims = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = b.issuer.claims("default", "demo");
        f(&mut c);
        c
    };
    let stranger = TestIssuer::new(ISSUER);

    let mut cases = vec![
        Bad {
            name: "empty CSR",
            csr: String::new(),
            token: Some(token.clone()),
            ttl: 0,
            code: Code::InvalidArgument,
        },
        Bad {
            name: "garbage",
            csr: "hello, CA".into(),
            token: Some(token.clone()),
            ttl: 0,
            code: Code::InvalidArgument,
        },
        Bad {
            name: "truncated PEM",
            csr: good_csr[..good_csr.len() / 2].into(),
            token: Some(token.clone()),
            ttl: 0,
            code: Code::InvalidArgument,
        },
        Bad {
            name: "certificate instead of CSR",
            csr: b.root_pem(),
            token: Some(token.clone()),
            ttl: 0,
            code: Code::InvalidArgument,
        },
        Bad {
            name: "broken signature",
            csr: broken_sig,
            token: Some(token.clone()),
            ttl: 0,
            code: Code::InvalidArgument,
        },
        Bad {
            name: "RSA 1024",
            csr: openssl_csr(
                dir,
                "rsa1024",
                &["-newkey", "rsa:1024", "-subj", "/O=x", "-addext", &uri_san],
            ),
            token: Some(token.clone()),
            ttl: 0,
            code: Code::InvalidArgument,
        },
        Bad {
            name: "P-521",
            csr: rcgen_csr(workload_params(&id), &rcgen::PKCS_ECDSA_P521_SHA512),
            token: Some(token.clone()),
            ttl: 0,
            code: Code::InvalidArgument,
        },
        Bad {
            name: "Ed25519",
            csr: rcgen_csr(workload_params(&id), &rcgen::PKCS_ED25519),
            token: Some(token.clone()),
            ttl: 0,
            code: Code::InvalidArgument,
        },
        Bad {
            name: "DNS SAN",
            csr: rcgen_csr(dns, &rcgen::PKCS_ECDSA_P256_SHA256),
            token: Some(token.clone()),
            ttl: 0,
            code: Code::InvalidArgument,
        },
        Bad {
            name: "IP SAN",
            csr: rcgen_csr(ip, &rcgen::PKCS_ECDSA_P256_SHA256),
            token: Some(token.clone()),
            ttl: 0,
            code: Code::InvalidArgument,
        },
        Bad {
            name: "two URIs",
            csr: rcgen_csr(two_uris, &rcgen::PKCS_ECDSA_P256_SHA256),
            token: Some(token.clone()),
            ttl: 0,
            code: Code::InvalidArgument,
        },
        Bad {
            name: "no SAN",
            csr: no_san,
            token: Some(token.clone()),
            ttl: 0,
            code: Code::InvalidArgument,
        },
        Bad {
            name: "CN in subject",
            csr: openssl_csr(
                dir,
                "cn",
                &[
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-subj",
                    "/CN=demo",
                    "-addext",
                    &uri_san,
                ],
            ),
            token: Some(token.clone()),
            ttl: 0,
            code: Code::InvalidArgument,
        },
        Bad {
            name: "email SAN",
            csr: openssl_csr(
                dir,
                "email",
                &[
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-subj",
                    "/O=x",
                    "-addext",
                    &format!("subjectAltName=URI:{id},email:a@b.c"),
                ],
            ),
            token: Some(token.clone()),
            ttl: 0,
            code: Code::InvalidArgument,
        },
        Bad {
            name: "CA requested",
            csr: openssl_csr(
                dir,
                "ca",
                &[
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-subj",
                    "/O=x",
                    "-addext",
                    &uri_san,
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                ],
            ),
            token: Some(token.clone()),
            ttl: 0,
            code: Code::InvalidArgument,
        },
        Bad {
            name: "other extension",
            csr: openssl_csr(
                dir,
                "ext",
                &[
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-subj",
                    "/O=x",
                    "-addext",
                    &uri_san,
                    "-addext",
                    "nsComment=hi",
                ],
            ),
            token: Some(token.clone()),
            ttl: 0,
            code: Code::InvalidArgument,
        },
        Bad {
            name: "1 MiB CSR",
            csr: format!(
                "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
                "A".repeat(1 << 20)
            ),
            token: Some(token.clone()),
            ttl: 0,
            code: Code::InvalidArgument,
        },
        Bad {
            name: "another namespace",
            csr: csr_for(
                &spiffe("kube-system", "demo"),
                KeyType::EcdsaP256,
                CsrShape::IstioAgent,
            )
            .1,
            token: Some(token.clone()),
            ttl: 0,
            code: Code::Unauthenticated,
        },
        Bad {
            name: "another service account",
            csr: csr_for(
                &spiffe("default", "admin"),
                KeyType::EcdsaP256,
                CsrShape::Ztunnel,
            )
            .1,
            token: Some(token.clone()),
            ttl: 0,
            code: Code::Unauthenticated,
        },
        Bad {
            name: "another trust domain",
            csr: csr_for(
                "spiffe://evil.corp/ns/default/sa/demo",
                KeyType::EcdsaP256,
                CsrShape::IstioAgent,
            )
            .1,
            token: Some(token.clone()),
            ttl: 0,
            code: Code::Unauthenticated,
        },
        Bad {
            name: "not a SPIFFE URI",
            csr: csr_for(
                "https://example.com/ns/default/sa/demo",
                KeyType::EcdsaP256,
                CsrShape::IstioAgent,
            )
            .1,
            token: Some(token.clone()),
            ttl: 0,
            code: Code::InvalidArgument,
        },
        Bad {
            name: "missing authorization",
            csr: good_csr.clone(),
            token: None,
            ttl: 0,
            code: Code::Unauthenticated,
        },
        Bad {
            name: "empty bearer",
            csr: good_csr.clone(),
            token: Some(String::new()),
            ttl: 0,
            code: Code::Unauthenticated,
        },
        Bad {
            name: "not a JWT",
            csr: good_csr.clone(),
            token: Some("not-a-jwt".into()),
            ttl: 0,
            code: Code::Unauthenticated,
        },
        Bad {
            name: "expired token",
            csr: good_csr.clone(),
            token: Some(b.issuer.sign_es(
                &claims(&|c| {
                    c["exp"] = (now - 3600).into();
                    c["iat"] = (now - 7200).into();
                    c["nbf"] = (now - 7200).into();
                }),
                Some("es"),
            )),
            ttl: 0,
            code: Code::Unauthenticated,
        },
        Bad {
            name: "token not yet valid",
            csr: good_csr.clone(),
            token: Some(b.issuer.sign_es(
                &claims(&|c| {
                    c["nbf"] = (now + 3600).into();
                }),
                Some("es"),
            )),
            ttl: 0,
            code: Code::Unauthenticated,
        },
        Bad {
            name: "wrong audience",
            csr: good_csr.clone(),
            token: Some(b.issuer.sign_es(
                &claims(&|c| {
                    c["aud"] = serde_json::json!(["kubernetes"]);
                }),
                Some("es"),
            )),
            ttl: 0,
            code: Code::Unauthenticated,
        },
        Bad {
            name: "wrong issuer",
            csr: good_csr.clone(),
            token: Some(b.issuer.sign_es(
                &claims(&|c| {
                    c["iss"] = "https://evil.test".into();
                }),
                Some("es"),
            )),
            ttl: 0,
            code: Code::Unauthenticated,
        },
        Bad {
            name: "alg none",
            csr: good_csr.clone(),
            token: Some(unsigned_token(&b.issuer.claims("default", "demo"))),
            ttl: 0,
            code: Code::Unauthenticated,
        },
        Bad {
            name: "unknown key (same kid)",
            csr: good_csr.clone(),
            token: Some(stranger.sign_es(&b.issuer.claims("default", "demo"), Some("es"))),
            ttl: 0,
            code: Code::Unauthenticated,
        },
        Bad {
            name: "unknown kid",
            csr: good_csr.clone(),
            token: Some(
                stranger.sign_es(&b.issuer.claims("default", "demo"), Some("rotated-away")),
            ),
            ttl: 0,
            code: Code::Unauthenticated,
        },
        Bad {
            name: "HS256 with the public key as secret",
            csr: good_csr.clone(),
            token: Some({
                let k = jsonwebtoken::EncodingKey::from_secret(
                    serde_json::to_string(&b.issuer.jwks).unwrap().as_bytes(),
                );
                let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
                h.kid = Some("es".into());
                jsonwebtoken::encode(&h, &b.issuer.claims("default", "demo"), &k).unwrap()
            }),
            ttl: 0,
            code: Code::Unauthenticated,
        },
        Bad {
            name: "sub not a service account",
            csr: good_csr.clone(),
            token: Some(b.issuer.sign_es(
                &claims(&|c| {
                    c["sub"] = "system:node:worker-1".into();
                }),
                Some("es"),
            )),
            ttl: 0,
            code: Code::Unauthenticated,
        },
        Bad {
            name: "no sub",
            csr: good_csr.clone(),
            token: Some(b.issuer.sign_es(
                &claims(&|c| {
                    c.as_object_mut().unwrap().remove("sub");
                }),
                Some("es"),
            )),
            ttl: 0,
            code: Code::Unauthenticated,
        },
    ];
    let before = b.issued();
    for case in cases.drain(..) {
        let mut req = request(case.csr, None, case.ttl);
        if let Some(t) = &case.token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let err = call(&mut client, req).await.expect_err(case.name);
        assert_eq!(err.code(), case.code, "{}: {:?}", case.name, err);
        assert!(
            !err.message().contains(&token),
            "{}: message leaks the token",
            case.name
        );
        assert_eq!(
            b.issued(),
            before,
            "{}: a certificate was issued",
            case.name
        );
    }
    let mut req = request(good_csr.clone(), None, 0);
    req.metadata_mut()
        .insert("authorization", "Basic dXNlcjpwYXNz".parse().unwrap());
    assert_eq!(
        call(&mut client, req).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // Impersonation without the Kubernetes node authorizer is refused, even for ztunnel.
    let zt_token = b.issuer.token("istio-system", "ztunnel");
    let mut req = request(good_csr.clone(), Some(&zt_token), 0);
    req.get_mut().metadata.as_mut().unwrap().fields.insert(
        "ImpersonatedIdentity".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(id.clone())),
        },
    );
    assert_eq!(
        call(&mut client, req).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(b.issued(), before);

    // The server still serves, with RS256 tokens too, and a negative validity_duration
    // means the default (24h); an absurd one is clamped to the maximum.
    let rs_token = b
        .issuer
        .sign_rs(&b.issuer.claims("default", "demo"), Some("rs"));
    for (ttl, want) in [(-5i64, 86400i64), (i64::MAX, 86400), (600, 600)] {
        let resp = call(&mut client, request(good_csr.clone(), Some(&rs_token), ttl))
            .await
            .unwrap();
        let info = pki::cert_info(&pki::parse_certs_pem(resp.cert_chain[0].as_bytes()).unwrap()[0])
            .unwrap();
        assert_eq!(info.not_after - info.not_before - 120, want, "ttl {ttl}");
    }
    assert_eq!(b.issued(), before + 3);
    let metrics = b.admin_get("/metrics").await.1;
    // 13 token cases + 3 CSR identity mismatches + the Basic scheme + the impersonation attempt.
    assert!(
        metrics.contains("citadel_server_authentication_failure_count 18"),
        "{metrics}"
    );
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_ttl_is_rejected_when_configured() {
    let b = Bridge::start_with(|c| {
        c.policy.over_max = OverMax::Reject;
        c.policy.max_ttl = Duration::from_secs(3600);
        c.policy.default_ttl = Duration::from_secs(3600);
    })
    .await;
    let mut client = b.client().await;
    let id = spiffe("default", "demo");
    let token = b.issuer.token("default", "demo");
    let (_, csr) = csr_for(&id, KeyType::EcdsaP256, CsrShape::IstioAgent);
    for ttl in [3601, i64::MAX] {
        let e = call(&mut client, request(csr.clone(), Some(&token), ttl))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{ttl}");
    }
    assert_eq!(b.issued(), 0);
    call(&mut client, request(csr, Some(&token), 3600))
        .await
        .unwrap();
    let m = b.admin_get("/metrics").await.1;
    assert!(
        m.contains("citadel_server_csr_sign_err_count{error=\"TTL_ERROR\"} 2"),
        "{m}"
    );
    b.shutdown().await.unwrap();
}
