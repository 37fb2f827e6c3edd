//! The work no CA can avoid per certificate, measured on this machine with the aws-lc the
//! bridge uses: one signature verification (the CSR's proof of possession) and one
//! signature (the leaf), single-threaded, for ECDSA P-256 and RSA 2048. Prints one JSON
//! object; `scripts/bench.py` divides the bridge's CPU per certificate by it.
//!
//! `crypto-floor [--seconds S]` (default 2 per operation).

use std::hint::black_box;
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair, UnparsedPublicKey};

/// Runs `op` for about `budget`; operations per second.
fn rate(budget: Duration, mut op: impl FnMut()) -> f64 {
    // Warm up caches and the CPU's clock first.
    for _ in 0..50 {
        op();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for _ in 0..32 {
            op();
        }
        n += 32;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let mut budget = Duration::from_secs(2);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--seconds", Some(s)) => {
                budget = Duration::from_secs_f64(s.parse().expect("--seconds takes a number"))
            }
            _ => {
                eprintln!("usage: crypto-floor [--seconds S]");
                std::process::exit(2);
            }
        }
    }
    let rng = SystemRandom::new();
    // A message the size of a leaf's TBSCertificate.
    let msg = vec![0x5a_u8; 600];

    let p256 = &signature::ECDSA_P256_SHA256_ASN1_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(p256, &rng).expect("P-256 key");
    let ec = EcdsaKeyPair::from_pkcs8(p256, pkcs8.as_ref()).expect("P-256 key");
    let ec_sig = ec.sign(&rng, &msg).expect("sign");
    let ec_pub = UnparsedPublicKey::new(
        &signature::ECDSA_P256_SHA256_ASN1,
        ec.public_key().as_ref().to_vec(),
    );
    let p256_sign = rate(budget, || {
        black_box(ec.sign(&rng, black_box(&msg)).expect("sign"));
    });
    let p256_verify = rate(budget, || {
        ec_pub
            .verify(black_box(&msg), ec_sig.as_ref())
            .expect("verify");
    });

    let rsa = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("RSA 2048 key");
    let mut rsa_sig = vec![0u8; rsa.public_modulus_len()];
    rsa.sign(&signature::RSA_PKCS1_SHA256, &rng, &msg, &mut rsa_sig)
        .expect("sign");
    let rsa_pub = UnparsedPublicKey::new(
        &signature::RSA_PKCS1_2048_8192_SHA256,
        rsa.public_key().as_ref().to_vec(),
    );
    let rsa_sign = rate(budget, || {
        let mut out = vec![0u8; rsa.public_modulus_len()];
        rsa.sign(
            &signature::RSA_PKCS1_SHA256,
            &rng,
            black_box(&msg),
            &mut out,
        )
        .expect("sign");
        black_box(out);
    });
    let rsa_verify = rate(budget, || {
        rsa_pub.verify(black_box(&msg), &rsa_sig).expect("verify");
    });

    // The floor of one certificate: one verify (the CSR) + one sign (the leaf), in ms.
    let floor = |v: f64, s: f64| 1000.0 / v + 1000.0 / s;
    println!(
        "{}",
        serde_json::json!({
            "p256_sign_per_s": p256_sign.round(),
            "p256_verify_per_s": p256_verify.round(),
            "p256_floor_ms": floor(p256_verify, p256_sign),
            "rsa2048_sign_per_s": rsa_sign.round(),
            "rsa2048_verify_per_s": rsa_verify.round(),
            "rsa2048_floor_ms": floor(rsa_verify, rsa_sign),
        })
    );
}
