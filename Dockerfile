# syntax=docker/dockerfile:1
# Two images from one multi-stage build (no container engine runs on the development machines, so these
# are built elsewhere; tests/integration/test_dockerfile.py checks this file against a checklist):
#   docker build --target operator -t tandem-operator:0.1.0 .
#   docker build --target worker   -t tandem-worker:0.1.0 .
# The build stage installs dependencies with scripts/setup and builds with scripts/build: the very steps
# CI runs. Expected sizes: operator ~125 MB (Debian slim + gRPC/protobuf/yaml-cpp/OpenSSL/httplib/
# prometheus-cpp runtime libraries), worker ~350 MB on CPU (adds OpenBLAS, Gloo and the Fashion-MNIST package); the CUDA worker
# base (CUDA runtime + NCCL) arrives with the GPU path.

FROM debian:12 AS build
WORKDIR /src
COPY scripts/setup scripts/setup
RUN ./scripts/setup && rm -rf /var/lib/apt/lists/*
COPY . .
RUN ./scripts/build -DTANDEM_BUILD_TESTS=OFF -DTANDEM_BUILD_BENCH=OFF \
    && strip build/bin/tandem build/bin/tandem-worker build/bin/tandem-operator

FROM debian:12-slim AS runtime-base
# Runtime libraries only (the -dev packages of scripts/setup stay in the build stage).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       libgrpc++1.51 libprotobuf32 libyaml-cpp0.7 libssl3 zlib1g ca-certificates \
       libcpp-httplib0.11 libprometheus-cpp-core1.0 \
    && rm -rf /var/lib/apt/lists/*

FROM runtime-base AS operator
COPY --from=build /src/build/bin/tandem-operator /usr/local/bin/tandem-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tandem-operator"]

FROM runtime-base AS worker
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       libopenblas0-pthread libgloo0 libprometheus-cpp-pull1.0 dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/build/bin/tandem-worker /src/build/bin/tandem /usr/local/bin/
USER 65532:65532
EXPOSE 9400 29400
ENTRYPOINT ["/usr/local/bin/tandem-worker"]
