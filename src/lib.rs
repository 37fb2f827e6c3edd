//! istio-ca-bridge: an Istio external CA (`istio.v1.auth.IstioCertificateService`) that
//! authenticates istio-agent and ztunnel, checks their CSRs against their SPIFFE identity
//! and has the certificates signed by a pluggable backend.
//!
//! # Layout
//! - [`app`]: the composition root: builds everything from [`config`] and runs it.
//! - [`server`]: the gRPC edge and the request pipeline: [`server::authn`] (who calls),
//!   [`server::authz`] (which identity it may get), [`server::csr`] (CSR policy),
//!   [`server::policy`] (TTL), [`server::chain`] (verify and lay out the answer),
//!   [`server::tls`] (listener TLS).
//! - [`backend`]: the [`backend::Signer`] seam, the local CA, the remote backends, the
//!   intermediate mode ([`backend::intermediate`]) and decorators.
//! - [`audit`]: the JSON-lines record of every issued certificate.
//! - [`k8s`]: Kubernetes API clients per cluster, TokenReview calls and the pod caches
//!   behind the impersonation check.
//! - [`trust`]: the trust bundle and the serving certificate.
//! - [`admin`], [`metrics`]: the operator's port.
//! - [`cli`]: the `request`, `check-config` and `dev-token` subcommands.
//! - `testing` (feature `testing`, and unit tests): the support code of the integration
//!   tests, compiled once instead of into every test binary.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod audit;
pub mod backend;
pub mod cli;
pub mod config;
pub mod dev;
pub mod identity;
pub mod jwks;
pub mod k8s;
pub mod metrics;
pub mod pki;
pub mod publish;
pub mod rotation;
pub mod server;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod trust;
pub mod validate;

/// Generated from `proto/ca.proto`, with [`pb::codec::Codec`] as the gRPC codec.
pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("istio.v1.auth");

    /// prost's codec with smaller per-call buffers. tonic's default allocates 8 KiB to
    /// decode each request and 8 KiB to encode each answer; a CSR is about 1 KiB and an
    /// answer a few, and the buffers grow when a message needs it. With 1,000 calls in flight
    /// that is 12 MiB less memory (BENCHMARKS.md, issue #17).
    pub mod codec {
        use std::marker::PhantomData;

        use tonic::codec::BufferSettings;
        use tonic_prost::ProstCodec;

        /// First allocation of a call's decode and encode buffers.
        pub const BUFFER_BYTES: usize = 2 * 1024;

        fn settings() -> BufferSettings {
            // The yield threshold is tonic's default: it matters for streams only.
            BufferSettings::new(BUFFER_BYTES, 32 * 1024)
        }

        pub struct Codec<T, U>(PhantomData<(T, U)>);

        impl<T, U> Default for Codec<T, U> {
            fn default() -> Self {
                Self(PhantomData)
            }
        }

        impl<T, U> tonic::codec::Codec for Codec<T, U>
        where
            T: prost::Message + Send + 'static,
            U: prost::Message + Default + Send + 'static,
        {
            type Encode = T;
            type Decode = U;
            type Encoder = <ProstCodec<T, U> as tonic::codec::Codec>::Encoder;
            type Decoder = <ProstCodec<T, U> as tonic::codec::Codec>::Decoder;

            fn encoder(&mut self) -> Self::Encoder {
                ProstCodec::<T, U>::raw_encoder(settings())
            }

            fn decoder(&mut self) -> Self::Decoder {
                ProstCodec::<T, U>::raw_decoder(settings())
            }
        }
    }
}

/// Installs the one rustls crypto provider this program uses (aws-lc-rs). Call before
/// building any TLS client or server; calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
