# syntax=docker/dockerfile:1
# walagent container image:  docker build -t walagent .
#                            docker run --rm walagent --help
#
# One static binary (glibc, linked statically by scripts/build-static, which also checks it is
# static) on an empty base: no shell, no package manager, no libc. The image carries only what
# the binary reads: CA certificates (TLS to PostgreSQL and S3, at the path the native-roots lookup reads first),
# /etc/nsswitch.conf ("hosts: files dns", so /etc/hosts is read before DNS), passwd/group entries
# for the non-root user 10001 (walagent), its home /var/lib/walagent and a /tmp. Docker provides
# /etc/hosts and /etc/resolv.conf at run time.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds (BuildKit); the binary is
# copied out of the cached target dir within the same step, without its debug info (about 24 MB
# instead of 96 MB; the symbol names stay, for backtraces).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    bin=$(scripts/build-static | tail -n1) \
 && install -D -m 0755 "$bin" /rootfs/usr/local/bin/walagent \
 && strip --strip-debug /rootfs/usr/local/bin/walagent
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /rootfs/etc/ssl/certs /rootfs/var/lib/walagent /rootfs/tmp \
 && cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ca-certificates.crt \
 && printf 'hosts: files dns\n' >/rootfs/etc/nsswitch.conf \
 && printf 'root:x:0:0:root:/root:/sbin/nologin\nwalagent:x:10001:10001:walagent:/var/lib/walagent:/sbin/nologin\n' >/rootfs/etc/passwd \
 && printf 'root:x:0:\nwalagent:x:10001:\n' >/rootfs/etc/group \
 && chown 10001:10001 /rootfs/var/lib/walagent \
 && chmod 0700 /rootfs/var/lib/walagent \
 && chmod 1777 /rootfs/tmp

FROM scratch
COPY --from=build /rootfs/ /
ENV HOME=/var/lib/walagent
# Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/walagent
# The metrics and health port used in the README's examples (--metrics-addr / metrics_addr;
# nothing listens unless one of them is set): /metrics, /healthz, /readyz.
EXPOSE 9790
ENTRYPOINT ["/usr/local/bin/walagent"]
