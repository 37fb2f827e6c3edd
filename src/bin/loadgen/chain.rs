//! `--make-padded-chain DIR`: the client-certificate chain of the chain-padding attack
//! (hardening issue, attack 1). A workload-shaped leaf followed by `n` self-issued CAs
//! (subject = issuer = the same name, each with its own P-256 key), each certifying the key
//! that signed the one before it, so that a naive path builder has `n` candidate issuers at
//! every step. None of them chains to anything the bridge trusts.

use std::path::Path;

use anyhow::Context;
use istio_ca_bridge::config::KeyType;
use istio_ca_bridge::pki;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyUsagePurpose, SanType,
};

const PADDING_NAME: &str = "Padding CA";

fn padding_ca() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, PADDING_NAME);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    p
}

/// Writes `chain.pem` (leaf first, then the `n` CAs, nearest first) and `key.pem` (the
/// leaf's key) into `dir`.
pub fn write_padded_chain(dir: &Path, n: usize, uri: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // The key that signs the first CA is in no certificate at all.
    let mut signer_key = pki::generate_key(KeyType::EcdsaP256)?;
    let mut signer_params = padding_ca();
    let mut cas = Vec::with_capacity(n);
    for _ in 0..n {
        let key = pki::generate_key(KeyType::EcdsaP256)?;
        let params = padding_ca();
        let cert = params.signed_by(&key, &Issuer::from_params(&signer_params, &signer_key))?;
        cas.push(cert.pem());
        signer_key = key;
        signer_params = params;
    }
    let leaf_key = pki::generate_key(KeyType::EcdsaP256)?;
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name = rcgen::DistinguishedName::new();
    leaf.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.is_ca = IsCa::ExplicitNoCa;
    let leaf = leaf.signed_by(&leaf_key, &Issuer::from_params(&signer_params, &signer_key))?;
    let mut chain = leaf.pem();
    for ca in cas.iter().rev() {
        chain.push_str(ca);
    }
    std::fs::write(dir.join("chain.pem"), chain)?;
    std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem())?;
    Ok(())
}
