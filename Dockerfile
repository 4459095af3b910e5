# hboned node proxy image. Build: docker build -t hboned .
#
# Runtime needs (set in the deploy/ DaemonSets, nothing more):
#   - the proxy (`hboned run`): its own netns (no hostNetwork, no hostPID); NET_ADMIN (SO_MARK,
#     IP_TRANSPARENT), NET_RAW and SYS_ADMIN (setns into a pod's network namespace); the node
#     agent's ZDS socket mounted. deploy/standalone starts it through setpriv (util-linux, in
#     the base image) as user 65532 with those three as its only, ambient, capabilities.
#   - the node agent (`hboned agent`, deploy/standalone): root, hostNetwork, hostPID, the CNI
#     directories; it installs /usr/local/bin/hboned-cni into the node's CNI bin directory.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rust-toolchain.toml build.rs ./
COPY proto proto
COPY config config
COPY src src
COPY benches benches
RUN cargo build --release --locked --bin hboned --bin hboned-cni

FROM debian:bookworm-slim
# iptables/iproute2: the rules the node agent installs in pods.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables iproute2 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/hboned /usr/local/bin/hboned
COPY --from=build /src/target/release/hboned-cni /usr/local/bin/hboned-cni
USER 0
ENTRYPOINT ["/usr/local/bin/hboned"]
CMD ["run", "--config", "/etc/hboned/config.yaml"]
