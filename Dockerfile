# Herald gateway image: `docker build -t herald .` from the repository root.
# Two stages: the release build on rust:bookworm, the binary alone on debian:bookworm-slim
# (same Debian release, so the glibc the binary was linked against is there).
# See docs/deploy.md; deploy/compose.yml runs three of these behind a load balancer.

# rust:1-bookworm is the newest stable Rust: Cargo.lock needs 1.89 or later (async-nats,
# uuid), above the workspace's rust-version.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the registry and target/ between builds (BuildKit, the default
# builder of current Docker); the binary is copied out of the cached target/.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p herald-gateway --bin herald \
    && install -m 0755 target/release/herald /usr/local/bin/herald

FROM debian:bookworm-slim
# ca-certificates: FCM, APNs and JWKS are reached over HTTPS.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 herald \
    && useradd --system --uid 10001 --gid herald --home-dir /var/lib/herald \
        --shell /usr/sbin/nologin herald \
    && mkdir -p /var/lib/herald /etc/herald \
    && chown herald:herald /var/lib/herald
COPY --from=build /usr/local/bin/herald /usr/local/bin/herald
# Every setting can be overridden the same way (docs/configuration.md); a config file
# can be mounted and named with HERALD_CONFIG=/etc/herald/herald.toml.
ENV HERALD_LISTEN=0.0.0.0:8080 \
    HERALD_DATA_DIR=/var/lib/herald
USER herald
WORKDIR /var/lib/herald
VOLUME ["/var/lib/herald"]
EXPOSE 8080
# No curl in the slim image: `herald healthcheck` asks /healthz of the listen address.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["herald", "healthcheck"]
# SIGTERM drains (limits.shutdown_drain_ms, 10 s): give `docker stop` more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["herald"]
CMD ["serve"]
