# Runtime image for an MPREG node.
#
# No container registry is reachable from our machines, so there is no rust:* image to
# compile in and no debian:* image to pull. Instead:
#   1. docker/build-base-image.sh   -> local mpreg-base:bookworm (debootstrap + import)
#   2. cargo build --release        -> target/release/mpreg, built on the (bookworm) host
#   3. docker build -t mpreg-node .  -> this file: wraps that binary
# The host and the base image are both Debian bookworm, so the dynamically linked binary
# finds the same glibc it was built against.
ARG BASE_IMAGE=mpreg-base:bookworm
FROM ${BASE_IMAGE}

# `docker import` images carry no config at all; set PATH rather than rely on defaults.
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    RUST_LOG=info

# Non-root runtime user with a fixed uid, so bind-mounted /data can be chowned on the
# host predictably. minbase includes `passwd` (Priority: required), hence useradd.
# /data is the node's data_dir: durable state (DESIGN.md section 10).
RUN useradd --uid 10001 --user-group --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin mpreg \
 && install -d -o mpreg -g mpreg -m 0750 /data

# Ready-to-run settings files, for `server start-config /etc/mpreg/<file>.toml`.
COPY config/ /etc/mpreg/
# Last, since it changes on every build; cargo already sets the executable bit.
COPY target/release/mpreg /usr/local/bin/mpreg

VOLUME ["/data"]
# 9000: websocket RPC (clients and peers); 9100: HTTP monitoring (/health, /metrics, ...).
EXPOSE 9000 9100
USER mpreg
WORKDIR /data

# The binary is its own probe (the image has no curl): exits 0 iff GET returns 200.
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 \
    CMD ["mpreg", "client", "health", "--url", "http://127.0.0.1:9100/health"]

# The node listens on 0.0.0.0, so it authenticates its peer links: mount credentials
# made by docker/make-credentials.sh read-only at /run/mpreg-keys (node.cred here; the
# node takes its name from the certificate). Without them it refuses to start and says
# why; `--insecure` would run it open, for development only.
ENTRYPOINT ["mpreg"]
CMD ["server", "start", "--host", "0.0.0.0", "--port", "9000", "--monitoring-port", "9100", \
     "--functions", "demo", "--data-dir", "/data", "--credentials", "/run/mpreg-keys/node.cred"]
