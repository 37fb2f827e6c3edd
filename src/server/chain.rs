//! Lays out the response: `[leaf, intermediates.., root bundle]`, one PEM per element
//! except the last (all roots together), each ending in a newline. The chain was checked
//! by [`crate::backend::checked`] against exactly the bundle that ends the answer.

use crate::backend::IssuedChain;
use crate::pki;
use crate::trust::TrustBundle;

/// The response chain for a checked `issued`, ending in the roots it was checked with.
pub fn layout(issued: &IssuedChain, bundle: &TrustBundle) -> Vec<String> {
    let mut out = Vec::with_capacity(issued.intermediates.len() + 2);
    out.push(pki::cert_pem(&issued.leaf));
    match issued.own_issuer() {
        // An in-process CA encoded its chain once (`SigningCa::sign` copies both from it).
        Some(own) if own.chain_pem().len() == issued.intermediates.len() => {
            out.extend(own.chain_pem().iter().cloned())
        }
        _ => out.extend(issued.intermediates.iter().map(|c| pki::cert_pem(c))),
    }
    out.push(bundle.pem().to_string());
    out
}
