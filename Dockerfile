# syntax=docker/dockerfile:1

# Strata as a container image: one `strata node start` per container.
#   docker build -t strata .
#   docker run -v strata-data:/data -v "$PWD/models:/models:ro" -p 8080:8080 -p 4001:4001 \
#       -p 4002:4002 -p 4002:4002/udp strata --model /models/model.gguf
# docker-compose.yml runs a private three-node swarm; docs/docker.md explains both.

ARG GO_VERSION=1.26

# ---- build ---------------------------------------------------------------------------------
# Bookworm, like the runtime image below: the binary links the glibc and libstdc++ it was
# built against.
FROM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src

# Modules first, so that this layer survives source changes. The module cache also holds the
# Llama 3 vocabulary (ollama's tokenizer test data) that the model synthesizer needs.
COPY go.mod go.sum ./
RUN go mod download

COPY . .
# ggml's CPU kernels are compiled by cgo with -march=$GGML_MARCH (see the Makefile). Native
# would tie the image to the build machine's CPU; x86-64-v3 (AVX2, FMA, F16C: Intel Haswell
# and AMD Excavator onwards) runs on any current x86-64 server and, measured on an AVX-512
# machine, decodes within noise of the native build (docs/docker.md). Older CPUs: x86-64-v2.
ARG GGML_MARCH=x86-64-v3
RUN --mount=type=cache,target=/root/.cache/go-build \
    GOFLAGS='-trimpath "-ldflags=-s -w"' make build GGML_MARCH="${GGML_MARCH}" BIN=/out/strata \
 && /out/strata --help >/dev/null
RUN vocab="$(go env GOMODCACHE)/github.com/ollama/ollama@v0.24.0/tokenizer/testdata/llama3.2" \
 && mkdir -p /out/vocab \
 && cp "$vocab/encoder.json" "$vocab/vocab.bpe" /out/vocab/ \
 && chmod 0644 /out/vocab/*

# ---- runtime -------------------------------------------------------------------------------
FROM debian:bookworm-slim

# ldd on the binary: libstdc++ (ggml is C++), libgcc_s, libm, libc. ggml's CPU backend runs
# its own thread pool, so no libgomp.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libstdc++6 \
 && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid, so that files mounted into the container (the swarm key) can be made
# readable by it, and Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 strata \
 && useradd --system --uid 10001 --gid strata --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin strata \
 && mkdir -p /data /models \
 && chown strata:strata /data /models

COPY --from=build /out/strata /usr/local/bin/strata
# testkit.VocabDir looks here: `strata model synth` works inside the container.
COPY --from=build /out/vocab/ /usr/share/strata/vocab/

ENV HOME=/data \
    STRATA_VOCAB_DIR=/usr/share/strata/vocab
USER 10001:10001
WORKDIR /data
# Identity key (the peer ID), slice cache and address files. Keep it across restarts, or the
# node comes back as a new peer and cuts its slice again.
VOLUME ["/data"]

# 4001/tcp libp2p (stage traffic), 4002 tcp+udp membership gossip (the libp2p port + 1),
# 8080/tcp the OpenAI-compatible API.
EXPOSE 4001/tcp 4002/tcp 4002/udp 8080/tcp

# Liveness: the API answers (readiness, a route through every layer, needs the whole swarm).
# It assumes the default --api port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["strata", "status", "--api", "127.0.0.1:8080"]

# --listen is left to the node's own default, /ip4/0.0.0.0/tcp/4001: it is a list flag, so
# setting it here would make a user's --listen an additional address instead of a
# replacement. --data-dir and --api are plain flags: a later one given to `docker run` wins.
ENTRYPOINT ["strata", "node", "start", "--data-dir=/data", "--api=0.0.0.0:8080"]
