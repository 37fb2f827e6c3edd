//! Certificate text as backends and files hand it to the bridge: `pki::parse_certs_pem`,
//! `pki::cert_info` of each certificate, `backend::remote::issued_chain` (leaf text and
//! chain text) and `trust::TrustBundle::from_pem`.
#![no_main]

use istio_ca_bridge::backend::remote;
use istio_ca_bridge::pki;
use istio_ca_bridge::trust::TrustBundle;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(certs) = pki::parse_certs_pem(data) {
        assert!(!certs.is_empty());
        for c in &certs {
            if let Ok(info) = pki::cert_info(c) {
                let _ = (info.not_before, info.not_after, info.serial_hex.len());
            }
        }
    }
    if let Ok(bundle) = TrustBundle::from_pem(data) {
        assert!(!bundle.roots().is_empty());
        assert_eq!(bundle.roots().len(), bundle.anchors().len());
        // The bundle's own PEM reads back as the same roots.
        let again = pki::parse_certs_pem(bundle.pem().as_bytes()).expect("bundle PEM re-parses");
        assert_eq!(again.as_slice(), bundle.roots());
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The leaf and its chain in one text (DigiCert), and split at a NUL into the leaf's
    // text and a chain text (Vault's certificate / ca_chain).
    let _ = remote::issued_chain(text, [text]);
    if let Some((leaf, chain)) = text.split_once('\0') {
        let _ = remote::issued_chain(leaf, chain.split('\0'));
    }
});
