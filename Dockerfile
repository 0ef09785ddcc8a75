# idsync image: built with the Rust toolchain, run on distroless "cc" (glibc + CA certificates, which
# reqwest's rustls needs to trust the IdP), as a non-root user. Entrypoint `idsync`, default `serve`.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin idsync \
    && strip target/release/idsync

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/idsync /usr/local/bin/idsync
USER nonroot:nonroot
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/idsync"]
CMD ["serve"]
