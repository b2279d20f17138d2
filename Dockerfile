# Both binaries, feeder and consumer, in one small image.
#   docker build -t avatar-migration .
#   docker run --env-file .env avatar-migration feeder
#   docker run --env-file .env avatar-migration consumer

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies are cached across builds in BuildKit cache mounts; only our crates rebuild.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin feeder --bin consumer \
    && mkdir -p /out \
    && cp target/release/feeder target/release/consumer /out/

FROM debian:bookworm-slim
# CA certificates for TLS to AWS and to PostgreSQL; nothing else.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin migrator
COPY --from=build /out/feeder /out/consumer /usr/local/bin/
COPY add-ons/sre-challenge-addon1.sql /usr/share/avatar-migration/
# Amazon RDS's CA bundle, for sslmode=verify-full against RDS: sqlx trusts only the roots
# compiled into it, which do not hold RDS's CAs. DATABASE_URL=…?sslmode=verify-full&sslrootcert=/usr/share/avatar-migration/rds-global-bundle.pem
# A build without access to AWS's site passes the bundle another way: a file in the build
# context or a mirror's URL (`--build-arg RDS_CA_BUNDLE=…`).
ARG RDS_CA_BUNDLE=https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem
# A URL by default, which ADD fetches and COPY cannot:
# hadolint ignore=DL3020
ADD --chmod=644 ${RDS_CA_BUNDLE} /usr/share/avatar-migration/rds-global-bundle.pem
USER 10001
ENV LOG_FORMAT=json
# The consumer's /metrics, /live and /ready (`consumer --health-check` asks /live; the ECS
# task definition uses that as its health check).
ENV METRICS_ADDR=0.0.0.0:9090
EXPOSE 9090
# The consumer is the long-running service; run `feeder` for the one-shot task.
CMD ["consumer"]
