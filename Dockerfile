# syntax=docker/dockerfile:1
# istio-ca-bridge image: a static-ish Rust binary (aws-lc-rs linked in, glibc from the base) on
# distroless. The Helm chart's defaults agree with it (tests/helm/check_chart.py `image`):
# the same command, uid/gid 65532 ("nonroot"), read-only root filesystem (nothing is written
# outside the mounted state volume).
#
#   docker build -t registry.example.com/istio-ca-bridge:0.1.0 .

FROM rust:1.95-bookworm AS builder
WORKDIR /src
# Dependencies first, so source edits do not rebuild them: a stub main with the real manifests.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
RUN mkdir src && echo 'fn main() {}' > src/main.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
# The stub's build artefacts are older than the real sources; touch so cargo rebuilds the crate.
RUN touch src/main.rs && cargo build --release --locked \
    && install -D -m 0755 target/release/istio-ca-bridge /out/istio-ca-bridge

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/istio-ca-bridge /usr/local/bin/istio-ca-bridge
# distroless' "nonroot" user; the chart's securityContext runs as the same uid/gid.
USER 65532:65532
# gRPC (Istio's CA port) and the admin port (/metrics, /healthz, /readyz).
EXPOSE 15012 15014
ENTRYPOINT ["istio-ca-bridge", "serve", "--config", "/etc/istio-ca-bridge/config.yaml"]
