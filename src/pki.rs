//! Small PKI helpers shared by the server, backends and CLI: PEM in and out, key loading
//! and generation, and reading certificate facts (expiry, SANs) with x509-parser.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::*;

/// A key algorithm the bridge generates or accepts (config: `rsa`, `ecdsaP256`, `ecdsaP384`).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum KeyType {
    Rsa,
    EcdsaP256,
    EcdsaP384,
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("no PEM certificate found")]
    NoCertificate,
    #[error("no PEM private key found")]
    NoKey,
    #[error("malformed PEM: {0}")]
    Pem(String),
    #[error("unusable private key: {0}")]
    Key(String),
    #[error("malformed certificate: {0}")]
    Certificate(String),
    #[error("key generation failed: {0}")]
    Generate(String),
}

/// PEM-encodes DER with `\n` line endings and a trailing newline (what Istio expects).
pub fn pem_encode(tag: &str, der: &[u8]) -> String {
    let p = ::pem::Pem::new(tag, der.to_vec());
    ::pem::encode_config(
        &p,
        ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF),
    )
}

pub fn cert_pem(der: &[u8]) -> String {
    pem_encode("CERTIFICATE", der)
}

/// All CERTIFICATE blocks of a PEM text, in order; other blocks are ignored.
pub fn parse_certs_pem(text: &[u8]) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let mut rd = text;
    let certs = rustls_pemfile::certs(&mut rd)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(PkiError::NoCertificate);
    }
    for c in &certs {
        parse_x509_certificate(c).map_err(|e| PkiError::Certificate(e.to_string()))?;
    }
    Ok(certs)
}

pub fn parse_key_pem(text: &[u8]) -> Result<PrivateKeyDer<'static>, PkiError> {
    let mut rd = text;
    rustls_pemfile::private_key(&mut rd)
        .map_err(|e| PkiError::Pem(e.to_string()))?
        .ok_or(PkiError::NoKey)
}

/// Loads a signing key (PKCS#8, PKCS#1 RSA or SEC1 EC PEM).
pub fn load_key_pair(text: &[u8]) -> Result<KeyPair, PkiError> {
    let der = parse_key_pem(text)?;
    KeyPair::try_from(&der).map_err(|e| PkiError::Key(e.to_string()))
}

pub fn generate_key(kind: KeyType) -> Result<KeyPair, PkiError> {
    let r = match kind {
        KeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        KeyType::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
        KeyType::Rsa => {
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        }
    };
    r.map_err(|e| PkiError::Generate(e.to_string()))
}

/// Formats unix seconds as RFC 3339 UTC.
pub fn rfc3339(secs: i64) -> String {
    ::time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&::time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

pub fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

pub fn from_unix(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// The certificates that link `leaf` to a root, from the PEM texts a backend answered
/// with: in order, without roots (self-signed: trust anchors, not chain elements), without
/// the leaf itself and without repeats. Empty texts are skipped.
pub fn chain_links<'a>(
    pems: impl IntoIterator<Item = &'a str>,
    leaf: &CertificateDer<'_>,
) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let mut links: Vec<CertificateDer<'static>> = Vec::new();
    for pem in pems.into_iter().filter(|p| !p.trim().is_empty()) {
        for c in parse_certs_pem(pem.as_bytes())? {
            if !is_self_signed(&c)? && c.as_ref() != leaf.as_ref() && !links.contains(&c) {
                links.push(c);
            }
        }
    }
    Ok(links)
}

/// Whether `der` is self-signed (a root): its subject is its issuer, and its own key
/// verifies its signature. The verdicts on self-issued certificates are remembered (a
/// backend sends the same root with every answer), so that signature is checked once per
/// certificate, not once per answer.
pub fn is_self_signed(der: &[u8]) -> Result<bool, PkiError> {
    let (_, cert) =
        parse_x509_certificate(der).map_err(|e| PkiError::Certificate(e.to_string()))?;
    Ok(self_signed(der, &cert))
}

fn self_signed(der: &[u8], cert: &x509_parser::certificate::X509Certificate<'_>) -> bool {
    /// At most this many verdicts are kept (a backend's chain holds a root or two; a
    /// rotation adds one more).
    const KEEP: usize = 32;
    static SEEN: std::sync::Mutex<Vec<(Vec<u8>, bool)>> = std::sync::Mutex::new(Vec::new());
    if cert.subject().as_raw() != cert.issuer().as_raw() {
        return false;
    }
    let seen = |d: &[u8]| {
        let s = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        s.iter().find(|(k, _)| k.as_slice() == d).map(|(_, v)| *v)
    };
    if let Some(v) = seen(der) {
        return v;
    }
    let v = cert.verify_signature(None).is_ok();
    let mut s = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if s.len() >= KEEP {
        s.clear();
    }
    s.push((der.to_vec(), v));
    v
}

/// The root of `roots` that signed `top` (the last certificate of a chain below its root):
/// same name, and the signature verifies with the root's key.
pub fn signing_root<'r>(
    top: &[u8],
    roots: &'r [CertificateDer<'static>],
) -> Option<&'r CertificateDer<'static>> {
    let (_, cert) = parse_x509_certificate(top).ok()?;
    roots.iter().find(|r| {
        parse_x509_certificate(r).is_ok_and(|(_, root)| {
            root.subject().as_raw() == cert.issuer().as_raw()
                && cert.verify_signature(Some(root.public_key())).is_ok()
        })
    })
}

/// When to renew a certificate obtained at `issued_at` (unix seconds) that expires at
/// `not_after`: `renew_before` ahead of expiry, but not before half of the lifetime really
/// granted (a backend role or the intermediate's own expiry may cap it below
/// `renew_before`, which would otherwise mean renewing in a tight loop), and at least 1 s
/// after issuance.
pub fn renew_at(issued_at: i64, not_after: i64, renew_before: Duration) -> i64 {
    let by_margin = not_after - renew_before.as_secs() as i64;
    let half = issued_at + (not_after - issued_at) / 2;
    by_margin.max(half).max(issued_at + 1)
}

/// Facts about one certificate that the rest of the bridge needs.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub not_before: i64,
    pub not_after: i64,
    pub is_ca: bool,
    pub self_signed: bool,
    pub serial_hex: String,
    pub subject: String,
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
}

/// The first common name of a certificate's subject, if it has one.
pub fn common_name(der: &[u8]) -> Option<String> {
    parse_x509_certificate(der).ok().and_then(|(_, c)| {
        c.subject()
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .map(str::to_string)
    })
}

pub fn cert_info(der: &[u8]) -> Result<CertInfo, PkiError> {
    let (_, cert) =
        parse_x509_certificate(der).map_err(|e| PkiError::Certificate(e.to_string()))?;
    let mut uri_sans = Vec::new();
    let mut dns_sans = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => uri_sans.push(u.to_string()),
                GeneralName::DNSName(d) => dns_sans.push(d.to_string()),
                _ => {}
            }
        }
    }
    let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    Ok(CertInfo {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        is_ca,
        self_signed: self_signed(der, &cert),
        serial_hex: serial_hex(cert.raw_serial()),
        subject: cert.subject().to_string(),
        uri_sans,
        dns_sans,
    })
}

/// A rustls client config for outbound HTTPS (JWKS, backends): the given CA bundle, or
/// the public web roots when none is given.
pub fn client_tls_config(
    ca_file: Option<&std::path::Path>,
) -> Result<rustls::ClientConfig, String> {
    client_tls_config_with_identity(ca_file, None)
}

/// Like [`client_tls_config`], optionally presenting a client certificate (chain file,
/// key file) to servers that require mutual TLS.
pub fn client_tls_config_with_identity(
    ca_file: Option<&std::path::Path>,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(p) => {
            let pem = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
            let certs = parse_certs_pem(&pem).map_err(|e| format!("{}: {e}", p.display()))?;
            for c in certs {
                roots.add(c).map_err(|e| format!("{}: {e}", p.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let cfg = match identity {
        None => cfg.with_no_client_auth(),
        Some((cert_file, key_file)) => {
            let read =
                |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
            let chain = parse_certs_pem(&read(cert_file)?)
                .map_err(|e| format!("{}: {e}", cert_file.display()))?;
            let key = parse_key_pem(&read(key_file)?)
                .map_err(|e| format!("{}: {e}", key_file.display()))?;
            cfg.with_client_auth_cert(chain, key)
                .map_err(|e| format!("{}: {e}", key_file.display()))?
        }
    };
    Ok(cfg)
}

/// How a workload CSR is shaped, after the two Istio clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsrShape {
    /// istio-agent: subject `O=` (one empty O), critical SAN with the URI.
    IstioAgent,
    /// ztunnel: empty subject, SAN with the URI.
    Ztunnel,
}

/// DER of a critical-or-not subjectAltName extension value holding one URI.
fn san_uri_value(uri: &str) -> Vec<u8> {
    fn len(n: usize) -> Vec<u8> {
        if n < 0x80 {
            vec![n as u8]
        } else if n < 0x100 {
            vec![0x81, n as u8]
        } else {
            vec![0x82, (n >> 8) as u8, n as u8]
        }
    }
    let mut name = vec![0x86];
    name.extend(len(uri.len()));
    name.extend(uri.as_bytes());
    let mut seq = vec![0x30];
    seq.extend(len(name.len()));
    seq.extend(name);
    seq
}

/// Builds a PEM CSR for `uri` the way Istio's clients do.
pub fn workload_csr(key: &KeyPair, uri: &str, shape: CsrShape) -> Result<String, PkiError> {
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    if shape == CsrShape::IstioAgent {
        dn.push(rcgen::DnType::OrganizationName, "");
    }
    params.distinguished_name = dn;
    let mut ext = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 17], san_uri_value(uri));
    ext.set_criticality(true);
    params.custom_extensions = vec![ext];
    let csr = params
        .serialize_request(key)
        .map_err(|e| PkiError::Generate(e.to_string()))?;
    csr.pem().map_err(|e| PkiError::Generate(e.to_string()))
}

/// True if `names` contains `wanted` as a DNS name (case-insensitive) or, when `wanted` is an
/// IP literal, as an IP address SAN.
pub fn names_include<'a, 'b: 'a>(
    names: impl IntoIterator<Item = &'a GeneralName<'b>>,
    wanted: &str,
) -> bool {
    let ip = wanted.parse::<std::net::IpAddr>().ok();
    names.into_iter().any(|g| match (g, ip) {
        (GeneralName::DNSName(d), _) => d.eq_ignore_ascii_case(wanted),
        (GeneralName::IPAddress(got), Some(std::net::IpAddr::V4(v4))) => *got == v4.octets(),
        (GeneralName::IPAddress(got), Some(std::net::IpAddr::V6(v6))) => *got == v6.octets(),
        _ => false,
    })
}

/// A serial number as x509-parser's `raw_serial_as_string` writes it (lowercase hex bytes
/// joined by `:`), without a `format!` per byte: it is on every certificate's audit record.
pub fn serial_hex(raw: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(raw.len() * 3);
    for (i, b) in raw.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn renewal_waits_for_half_of_a_capped_lifetime() {
        let h = std::time::Duration::from_secs(3600);
        // 24 h certificate, renew 1 h before: at 23 h.
        assert_eq!(super::renew_at(0, 24 * 3600, h), 23 * 3600);
        // Capped to 60 s by the intermediate: at 30 s, not at once.
        assert_eq!(super::renew_at(1000, 1060, h), 1030);
        // Already expired or zero-length: one second later, never a tight loop.
        assert_eq!(super::renew_at(1000, 1000, h), 1001);
    }

    #[test]
    fn serial_hex_writes_what_x509_parser_writes() {
        for raw in [
            &[][..],
            &[0],
            &[0x0a],
            &[0x00, 0xff, 0x10, 0x9c],
            &[0xde; 20],
        ] {
            assert_eq!(
                super::serial_hex(raw),
                x509_parser::utils::format_serial(raw)
            );
        }
    }
}
