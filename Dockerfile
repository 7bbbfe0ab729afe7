# One binary, controller and node agent both. Not buildable on the development machine
# (no Docker engine there); kept correct by reading it against `cargo build --release`.
FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin sdfleet && strip target/release/sdfleet

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* && useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin sdfleet
COPY --from=build /src/target/release/sdfleet /usr/local/bin/sdfleet
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sdfleet"]
CMD ["controller"]
