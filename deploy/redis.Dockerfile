# Redis for the compose topology where the public redis image cannot be pulled:
#   scripts/build-image.sh with TARGET=redis (a Debian base with Debian's redis-server)
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
ENTRYPOINT ["redis-server"]
