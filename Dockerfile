# One binary, controller and node agent both. There is no Docker engine on the development
# machine: scripts/image.sh builds this final stage's image offline from the cargo build,
# and tests/image.rs checks that the two agree (user, entrypoint, cmd, labels, the files).
FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin sdfleet && strip target/release/sdfleet

FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="sdfleet" \
      org.opencontainers.image.description="Kubernetes operator for GPU Stable Diffusion (ComfyUI) fleets: controller and node agent" \
      org.opencontainers.image.version="0.1.0"
# The group first: useradd alone gives the user the next free gid (1000; 65532 is past
# GID_MAX) and home /home/sdfleet, where USER below is 65532:65532.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 sdfleet \
    && useradd --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin sdfleet
COPY --from=build /src/target/release/sdfleet /usr/local/bin/sdfleet
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sdfleet"]
CMD ["controller"]
