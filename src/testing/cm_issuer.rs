//! A test-side loop that plays a cert-manager issuer against [`FakeKube`]: it picks up every
//! CertificateRequest without a `Ready` condition and, as its [`Behaviour`] says, signs it
//! with its own test CA (a root and an issuing intermediate; the CSR's key and SANs, the
//! requested duration, usages and isCA), denies it, fails it, leaves it pending, or answers
//! with a wrong name or a wrong key. It writes the status exactly as cert-manager does:
//! `status.certificate` (the leaf and the intermediate, base64 PEM), `status.ca` (the root,
//! base64 PEM) and the conditions `Ready` / `Denied` / `Approved` / `InvalidRequest`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use tokio_util::sync::{CancellationToken, DropGuard};
use x509_parser::prelude::*;

use super::fake_kube::FakeKube;
use crate::pki::{self, KeyType};

/// What the issuer does with the next requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// Approves and signs.
    Sign,
    /// An approver denies it (condition `Denied`, reason given).
    Deny(String),
    /// The issuer fails it (`Ready=False`, reason `Failed`); `invalid`: also
    /// `InvalidRequest=True` (the request itself is bad).
    Fail {
        /// The condition's message.
        message: String,
        /// Also `InvalidRequest=True`.
        invalid: bool,
    },
    /// Never answers (the bridge's deadline passes).
    Ignore,
    /// Signs a certificate for another SPIFFE ID.
    WrongName,
    /// Signs the request's names for another key.
    WrongKey,
}

/// The running issuer loop; stops when dropped.
pub struct CmIssuer {
    behaviour: Arc<Mutex<Behaviour>>,
    /// The root every answer chains to (PEM).
    pub root_pem: String,
    /// The issuing intermediate (PEM).
    pub intermediate_pem: String,
    handled: Arc<Mutex<u64>>,
    _stop: DropGuard,
}

struct Ca {
    root_pem: String,
    inter_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn ca_params(cn: &str) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let now = ::time::OffsetDateTime::now_utc();
    p.not_before = now - ::time::Duration::minutes(5);
    p.not_after = now + ::time::Duration::days(3650);
    p
}

impl CmIssuer {
    /// Starts the loop over `fake` (every namespace), signing by default.
    pub fn start(fake: Arc<FakeKube>) -> CmIssuer {
        let root_key = pki::generate_key(KeyType::EcdsaP256).unwrap();
        let root_params = ca_params("cert-manager Test Root");
        let root = root_params.self_signed(&root_key).unwrap();
        let root_issuer = rcgen::Issuer::new(root_params, root_key);
        let inter_key = pki::generate_key(KeyType::EcdsaP256).unwrap();
        let inter_params = ca_params("cert-manager Test Issuing CA");
        let inter = inter_params.signed_by(&inter_key, &root_issuer).unwrap();
        let ca = Arc::new(Ca {
            root_pem: root.pem(),
            inter_pem: inter.pem(),
            issuer: rcgen::Issuer::new(inter_params, inter_key),
        });
        let behaviour = Arc::new(Mutex::new(Behaviour::Sign));
        let handled = Arc::new(Mutex::new(0));
        let stop = CancellationToken::new();
        let (b, h, s) = (behaviour.clone(), handled.clone(), stop.clone());
        let loop_ca = ca.clone();
        tokio::spawn(async move {
            let mut ignored: HashSet<String> = HashSet::new();
            loop {
                tokio::select! {
                    _ = s.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
                for cr in fake.certificate_requests() {
                    let uid = cr["metadata"]["uid"].as_str().unwrap_or("").to_string();
                    if !cr["status"]["conditions"].is_null() || ignored.contains(&uid) {
                        continue;
                    }
                    let now = b.lock().unwrap().clone();
                    let ns = cr["metadata"]["namespace"].as_str().unwrap_or("");
                    let name = cr["metadata"]["name"].as_str().unwrap_or("");
                    let status = match &now {
                        Behaviour::Ignore => {
                            ignored.insert(uid);
                            continue;
                        }
                        Behaviour::Deny(reason) => json!({"conditions": [
                            cond("Denied", "True", "ApprovalDenied", reason),
                            cond("Ready", "False", "Denied", "The CertificateRequest was denied by an approval controller"),
                        ]}),
                        Behaviour::Fail { message, invalid } => {
                            let mut c = vec![
                                cond("Approved", "True", "cert-manager.io", "approved"),
                                cond("Ready", "False", "Failed", message),
                            ];
                            if *invalid {
                                c.push(cond(
                                    "InvalidRequest",
                                    "True",
                                    "RequestParsingError",
                                    message,
                                ));
                            }
                            json!({"conditions": c, "failureTime": pki::rfc3339(pki::unix_secs(std::time::SystemTime::now()))})
                        }
                        _ => match sign(&loop_ca, &cr, &now) {
                            Ok(leaf) => {
                                let b64 =
                                    |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
                                json!({
                                    "certificate": b64(&format!("{leaf}{}", loop_ca.inter_pem)),
                                    "ca": b64(&loop_ca.root_pem),
                                    "conditions": [
                                        cond("Approved", "True", "cert-manager.io", "approved"),
                                        cond("Ready", "True", "Issued", "Certificate fetched from issuer successfully"),
                                    ],
                                })
                            }
                            Err(e) => json!({"conditions": [
                                cond("Ready", "False", "Failed", &e),
                                cond("InvalidRequest", "True", "RequestParsingError", &e),
                            ]}),
                        },
                    };
                    if fake.set_certificate_request_status(ns, name, status) {
                        *h.lock().unwrap() += 1;
                    }
                }
            }
        });
        CmIssuer {
            behaviour,
            root_pem: ca.root_pem.clone(),
            intermediate_pem: ca.inter_pem.clone(),
            handled,
            _stop: stop.drop_guard(),
        }
    }

    /// What the next requests get.
    pub fn set(&self, b: Behaviour) {
        *self.behaviour.lock().unwrap() = b;
    }

    /// How many requests got a status from this loop.
    pub fn handled(&self) -> u64 {
        *self.handled.lock().unwrap()
    }
}

fn cond(t: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({"type": t, "status": status, "reason": reason, "message": message,
        "lastTransitionTime": pki::rfc3339(pki::unix_secs(std::time::SystemTime::now()))})
}

/// Go's duration text as cert-manager accepts it: `<n>s`, `<n>m`, `<n>h` and sums of them.
fn go_duration(s: &str) -> Option<i64> {
    let mut total = 0i64;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: i64 = num.parse().ok()?;
        num.clear();
        total += n * match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
    }
    num.is_empty().then_some(total)
}

/// Issues what `cr` asks for, as a CA issuer does (the CSR's key and SANs, spec.duration,
/// spec.usages, spec.isCA), or the wrong thing `how` says.
fn sign(ca: &Ca, cr: &Value, how: &Behaviour) -> Result<String, String> {
    let spec = &cr["spec"];
    let pem = base64::engine::general_purpose::STANDARD
        .decode(spec["request"].as_str().ok_or("no spec.request")?)
        .map_err(|e| format!("spec.request: {e}"))?;
    let block = ::pem::parse(&pem).map_err(|e| format!("spec.request: {e}"))?;
    if block.tag() != "CERTIFICATE REQUEST" {
        return Err(format!("spec.request holds a {} block", block.tag()));
    }
    let der = block.into_contents();
    let (_, csr) = X509CertificationRequest::from_der(&der).map_err(|e| e.to_string())?;
    csr.verify_signature()
        .map_err(|e| format!("CSR signature: {e}"))?;
    let mut names = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for n in &san.general_names {
                match n {
                    GeneralName::URI(u) => {
                        let u = if *how == Behaviour::WrongName {
                            "spiffe://cluster.local/ns/other/sa/other".to_string()
                        } else {
                            u.to_string()
                        };
                        names.push(rcgen::SanType::URI(u.as_str().try_into().unwrap()));
                    }
                    GeneralName::DNSName(d) => {
                        names.push(rcgen::SanType::DnsName((*d).try_into().unwrap()))
                    }
                    _ => return Err("unsupported SAN type".into()),
                }
            }
        }
    }
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    let is_ca = spec["isCA"].as_bool().unwrap_or(false);
    if is_ca {
        // A CA issuer keeps the CSR's subject for a CA request.
        for attr in csr.certification_request_info.subject.iter_attributes() {
            if let Ok(v) = attr.as_str() {
                if attr.attr_type() == &x509_parser::oid_registry::OID_X509_COMMON_NAME {
                    p.distinguished_name.push(rcgen::DnType::CommonName, v);
                } else if attr.attr_type() == &x509_parser::oid_registry::OID_X509_ORGANIZATION_NAME
                {
                    p.distinguished_name
                        .push(rcgen::DnType::OrganizationName, v);
                }
            }
        }
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    } else {
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
    }
    p.subject_alt_names = names;
    for u in spec["usages"].as_array().into_iter().flatten() {
        match u.as_str().unwrap_or("") {
            "digital signature" => p.key_usages.push(rcgen::KeyUsagePurpose::DigitalSignature),
            "key encipherment" => p.key_usages.push(rcgen::KeyUsagePurpose::KeyEncipherment),
            "cert sign" => p.key_usages.push(rcgen::KeyUsagePurpose::KeyCertSign),
            "crl sign" => p.key_usages.push(rcgen::KeyUsagePurpose::CrlSign),
            "server auth" => p
                .extended_key_usages
                .push(rcgen::ExtendedKeyUsagePurpose::ServerAuth),
            "client auth" => p
                .extended_key_usages
                .push(rcgen::ExtendedKeyUsagePurpose::ClientAuth),
            other => return Err(format!("unknown usage {other:?}")),
        }
    }
    let secs = spec["duration"]
        .as_str()
        .map(|d| go_duration(d).ok_or(format!("spec.duration {d:?}")))
        .transpose()?
        .unwrap_or(90 * 86400);
    let now = ::time::OffsetDateTime::now_utc();
    p.not_before = now - ::time::Duration::seconds(30);
    p.not_after = now + ::time::Duration::seconds(secs);
    let serial: [u8; 16] = rand::random();
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let cert = if *how == Behaviour::WrongKey {
        let other = pki::generate_key(KeyType::EcdsaP256).unwrap();
        p.signed_by(&other, &ca.issuer)
    } else {
        let spki =
            rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
                .map_err(|e| e.to_string())?;
        p.signed_by(&spki, &ca.issuer)
    }
    .map_err(|e| e.to_string())?;
    Ok(cert.pem())
}
