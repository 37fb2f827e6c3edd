//! Whole-config tests: parsing names the offending field, validation collects every
//! section's problems under the section's name. Each backend's own section is tested in
//! its folder.

use super::*;
use crate::identity::ServiceAccount;

#[test]
fn empty_file_is_defaults_and_needs_an_authenticator_only_if_cert_authn_off() {
    let cfg = Config::parse("").unwrap();
    assert_eq!(cfg.trust_domain, "cluster.local");
    assert!(cfg.validate().is_ok());
}

#[test]
fn unknown_field_is_named() {
    let (field, msg) = Config::parse("server:\n  tls:\n    mdoe: files\n").unwrap_err();
    assert_eq!(field, "server.tls.mdoe");
    assert!(msg.contains("mdoe"), "{msg}");
    let (field, msg) = Config::parse("backend:\n  type: local\n  stateDri: /x\n").unwrap_err();
    assert!(field.starts_with("backend"), "{field}");
    assert!(msg.contains("stateDri"), "{msg}");
    let (field, _) = Config::parse("policy:\n  maxTtl: forever\n").unwrap_err();
    assert_eq!(field, "policy.maxTtl");
}

#[test]
fn validation_names_fields() {
    let cfg = Config::parse(
        "authn:\n  jwt:\n    - issuer: a\n  clientCert: false\nserver:\n  tls:\n    mode: files\n",
    )
    .unwrap();
    let errs = cfg.validate().unwrap_err();
    let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
    assert!(fields.contains(&"authn.jwt[0].jwksFile"), "{fields:?}");
    assert!(fields.contains(&"server.tls.certFile"), "{fields:?}");
    assert!(fields.contains(&"server.tls.keyFile"), "{fields:?}");
}

#[test]
fn kubernetes_validation_names_fields() {
    let cfg = Config::parse(
        "authn:\n  trustedNodeAccounts: [ztunnel]\n  kubernetes:\n    requestTimeout: 30s\n    audiences: []\n    clusters:\n      - id: a\n        inCluster: true\n        kubeconfig: /x\n        qps: 0\n      - id: a\n        trustDomain: Bad\n",
    )
    .unwrap();
    let errs = cfg.validate().unwrap_err();
    let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
    for f in [
        "authn.trustedNodeAccounts[0]",
        "authn.kubernetes.requestTimeout",
        "authn.kubernetes.audiences",
        "authn.kubernetes.clusters[0].kubeconfig",
        "authn.kubernetes.clusters[0].qps",
        "authn.kubernetes.clusters[1].id",
        "authn.kubernetes.clusters[1].kubeconfig",
        "authn.kubernetes.clusters[1].trustDomain",
    ] {
        assert!(fields.contains(&f), "{f} missing from {fields:?}");
    }
    let (field, _) = Config::parse(
        "authn:\n  kubernetes:\n    clusters:\n      - id: a\n        inClustr: true\n",
    )
    .unwrap_err();
    assert!(field.starts_with("authn.kubernetes.clusters"), "{field}");
    let ok = Config::parse(
        "authn:\n  kubernetes:\n    clusters:\n      - id: a\n        inCluster: true\n        trustDomain: a.example\n",
    )
    .unwrap();
    ok.validate().unwrap();
    assert_eq!(ok.trust_domains(), vec!["cluster.local", "a.example"]);
    assert_eq!(
        parse_accounts(&ok.authn.trusted_node_accounts).unwrap(),
        vec![ServiceAccount::new("istio-system", "ztunnel").unwrap()]
    );
}

#[test]
fn cluster_writers_validation_names_fields() {
    let cfg = Config::parse(
        "kubernetes:\n  rootConfigMap:\n    enabled: true\n    name: Bad_Name\n  istiodCert:\n    enabled: true\n    dnsNames: [bad_name]\n    ttl: 1h\n    renewBefore: 2h\n  leaderElection:\n    leaseDuration: 3s\n    retryPeriod: 2s\n",
    )
    .unwrap();
    let errs = cfg.validate().unwrap_err();
    let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
    for f in [
        "kubernetes.rootConfigMap.enabled",
        "kubernetes.rootConfigMap.name",
        "kubernetes.istiodCert.dnsNames[0]",
        "kubernetes.istiodCert.renewBefore",
        "kubernetes.leaderElection.leaseDuration",
    ] {
        assert!(fields.contains(&f), "{f} missing from {fields:?}");
    }
    // Disabled (the default), nothing is checked.
    assert!(Config::parse("").unwrap().validate().is_ok());
    let ic = IstiodCertConfig {
        revisions: vec!["canary".into()],
        ..Default::default()
    };
    assert_eq!(
        ic.effective_dns_names(),
        vec!["istiod.istio-system.svc", "istiod-canary.istio-system.svc"]
    );
}

#[test]
fn plain_http_jwks_needs_the_issuers_own_flag() {
    let base = "authn:\n  jwt:\n    - issuer: https://a.test\n      jwksUri: http://a.test/jwks\n";
    let fields = |yaml: &str| -> Vec<String> {
        match Config::parse(yaml).unwrap().validate() {
            Ok(()) => Vec::new(),
            Err(errs) => errs.into_iter().map(|e| e.field).collect(),
        }
    };
    assert_eq!(fields(base), ["authn.jwt[0].jwksUri"]);
    assert!(fields(&format!("{base}      insecureHttp: true\n")).is_empty());
    let with_token = format!("{base}      jwksTokenFile: /var/run/token\n");
    assert_eq!(fields(&with_token), ["authn.jwt[0].jwksUri"]);
    assert!(fields(&format!("{with_token}      insecureHttp: true\n")).is_empty());
    assert_eq!(
        fields(
            "authn:\n  jwt:\n    - issuer: https://a.test\n      jwksUri: https://a.test/jwks\n      insecureHttp: true\n"
        ),
        ["authn.jwt[0].insecureHttp"]
    );
}
