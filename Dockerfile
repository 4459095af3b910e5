# hboned node proxy image. Build: docker build -t hboned .
#
# Runtime needs (set in deploy/daemonset.yaml, nothing more):
#   - hostNetwork: false is fine; hboned runs in its own netns and enters pod namespaces.
#   - capabilities NET_ADMIN (SO_MARK, IP_TRANSPARENT, iptables in pod namespaces) and
#     SYS_ADMIN (setns into a pod's network namespace); NET_RAW is not needed.
#   - the node agent's ZDS socket (/var/run/ztunnel) mounted, or /var/run/netns for standalone.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rust-toolchain.toml build.rs ./
COPY proto proto
COPY config config
COPY src src
COPY benches benches
RUN cargo build --release --locked --bin hboned

FROM debian:bookworm-slim
# iptables/iproute2: `hboned redirect install|remove` in standalone mode.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables iproute2 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/hboned /usr/local/bin/hboned
USER 0
ENTRYPOINT ["/usr/local/bin/hboned"]
CMD ["run", "--config", "/etc/hboned/config.yaml"]
