# syntax=docker/dockerfile:1
# walagent container image:  docker build -t walagent .
#                            docker run --rm walagent --help

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds (BuildKit); the binary is
# copied out of the cached target dir within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin walagent \
 && install -m 0755 target/release/walagent /usr/local/bin/walagent

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --user-group --uid 10001 --create-home --home-dir /var/lib/walagent \
        --shell /usr/sbin/nologin walagent
COPY --from=build /usr/local/bin/walagent /usr/local/bin/walagent
USER walagent:walagent
WORKDIR /var/lib/walagent
ENTRYPOINT ["walagent"]
