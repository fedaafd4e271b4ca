# rampart: build in the Rust image, run on a slim Debian with the CA store (https upstreams).
# docker build -t rampart .
# docker run -p 8080:8080 -p 9901:9901 -e RAMPART_ADMIN_TOKEN="$(openssl rand -hex 24)" \
#   -e BACKEND_URL=http://backend:3001 -e FASTGPT_URL=http://fastgpt:3000 rampart
# Without BACKEND_URL and FASTGPT_URL the upstreams are 127.0.0.1 inside the container:
# rampart starts, answers 502/503 and /readyz stays 503 until they point somewhere real.
# The admin listener is on 0.0.0.0 here, so rampart refuses to start without a token: give
# it RAMPART_ADMIN_TOKEN (16+ characters; in Kubernetes from a Secret, see examples/kubernetes/).
# The probes (/livez, /readyz, /health) stay open without it.
FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo.toml declares the test binary and the benches by name: cargo refuses to load the
# manifest (any build) while one of their files is missing.
COPY tests ./tests
COPY benches ./benches
# Debug info stripped for the image only (40 MB -> a few): the release profile keeps line
# tables for local backtraces and profiling.
RUN CARGO_PROFILE_RELEASE_STRIP=debuginfo cargo build --release --locked --bin rampart

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 rampart
COPY --from=build /src/target/release/rampart /usr/local/bin/rampart
COPY proxy.yaml /etc/rampart/proxy.yaml
USER rampart
# 8080 inbound, 8081 the app's egress to FastGPT, 9901 admin (probes, /metrics).
EXPOSE 8080 8081 9901
ENV RAMPART_CONFIG=/etc/rampart/proxy.yaml \
    RAMPART_ADMIN_LISTEN=0.0.0.0:9901
# The image has no curl: rampart asks its own admin listener (127.0.0.1:9901), exit 0 or 1.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s \
    CMD ["/usr/local/bin/rampart", "probe", "livez"]
# SIGTERM drains (readiness off, grace, stop accepting, finish in flight); see docs/operations.md.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/rampart"]
CMD ["run"]
