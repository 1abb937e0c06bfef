# syntax=docker/dockerfile:1
#
# conveyor container image: a release build on the Rust toolchain image, run
# from distroless (glibc, libgcc, CA certificates, nothing else: no shell, no
# package manager). Build from the repository root:
#   docker build -t conveyor:$(git describe --always) .

ARG RUST_VERSION=1

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# rdkafka builds its bundled librdkafka with gcc and make (both in this image),
# against this image's libssl-dev (Kafka TLS/SASL). Link zlib statically so the
# binary needs only glibc, libgcc and libssl3 at run time, which is exactly
# what the distroless cc image has.
ENV LIBZ_SYS_STATIC=1 \
    CARGO_TERM_COLOR=never
COPY . .
# The cache mounts keep the registry and the target directory between builds;
# the binary is copied out because the mounted target/ is not in the layer.
# --locked: build exactly the dependency versions in Cargo.lock.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin conveyor \
    && install -D -m 0755 target/release/conveyor /out/conveyor

# :nonroot already defaults to an unprivileged user; pin both bases by digest
# (image@sha256:…) in a release pipeline for reproducible images.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /out/conveyor /usr/local/bin/conveyor
# Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd;
# the Helm chart runs the pod as the same UID.
USER 10001:10001
# The daemon's own default is 127.0.0.1:9464, unreachable from outside a
# container: serve /metrics /healthz /readyz on every interface.
ENV CONVEYOR__HTTP__LISTEN=0.0.0.0:9464
EXPOSE 9464
# No HEALTHCHECK: there is no shell or curl in the image; orchestrators probe
# /healthz and /readyz over HTTP (see helm/conveyor).
ENTRYPOINT ["/usr/local/bin/conveyor"]
CMD ["run"]
