//! CSR policy (`server::csr::check`, and `decode` on its own) on arbitrary bytes: PEM or DER,
//! any structure. Must never panic; what passes must be a CSR for the target identity.
#![no_main]

use std::sync::OnceLock;

use istio_ca_bridge::identity::SpiffeId;
use istio_ca_bridge::pki::KeyType;
use istio_ca_bridge::server::csr::{self, CsrPolicy};
use libfuzzer_sys::fuzz_target;

/// The identity the seed CSRs ask for.
const TARGET: &str = "spiffe://cluster.local/ns/default/sa/default";

fn setup() -> &'static (SpiffeId, CsrPolicy) {
    static S: OnceLock<(SpiffeId, CsrPolicy)> = OnceLock::new();
    S.get_or_init(|| {
        let policy = CsrPolicy {
            key_types: vec![KeyType::Rsa, KeyType::EcdsaP256, KeyType::EcdsaP384],
            min_rsa_bits: 2048,
            max_bytes: 64 * 1024,
        };
        (SpiffeId::parse(TARGET).expect("target identity"), policy)
    })
}

fuzz_target!(|data: &[u8]| {
    let (target, policy) = setup();
    let decoded = csr::decode(data, policy.max_bytes);
    match csr::check(data, target, policy) {
        Ok(checked) => {
            // A CSR that passes was decodable, and what is kept is the CSR itself.
            assert_eq!(decoded.as_deref().ok(), Some(checked.csr_der.as_slice()));
            assert!(!checked.public_key_der.is_empty());
            assert!(policy.key_types.contains(&checked.key_type));
        }
        Err(e) => {
            // Every refusal maps to a metric label and a gRPC status.
            let _ = (e.reason(), e.is_identity_mismatch(), e.to_string());
        }
    }
});
