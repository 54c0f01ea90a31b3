# syntax=docker/dockerfile:1
# Tandem's images from one multi-stage build (no container engine runs on the development machines, so these
# are built elsewhere; tests/integration/test_dockerfile.py checks this file against a checklist):
#   docker build --target operator   -t tandem-operator:0.1.0 .
#   docker build --target worker     -t tandem-worker:0.1.0 .      # GPU worker: CUDA runtime + NCCL
#   docker build --target worker-cpu -t tandem-worker:0.1.0-cpu .  # CPU-only worker, no CUDA libraries
# Both build stages install dependencies with scripts/setup and build with scripts/build: the very steps CI
# runs. `build` is CPU-only (operator, worker-cpu); `build-cuda` adds the CUDA toolkit and NCCL and builds the
# GPU worker. Expected sizes (estimates, uncompressed): operator ~125 MB (Debian slim + gRPC/protobuf/yaml-cpp/
# OpenSSL/httplib/prometheus-cpp runtime libraries); worker-cpu ~350 MB (adds OpenBLAS, Gloo and the
# Fashion-MNIST package); worker about 1.1 GB (worker-cpu plus cuBLASLt ~520 MB and NCCL ~210 MB).
#
# CUDA comes from NVIDIA's official images, used only as COPY --from sources, never as a base: the toolkit
# directory and NCCL's header and library for the CUDA build, and just the shared libraries the worker loads
# for its image. Every stage stays Debian 12, as on the development machines (CUDA 13.0 under /usr/local/cuda,
# NCCL inside it): NVIDIA's libraries need only an old glibc (CUDA 13.0's ask for GLIBC_2.27 at most; Debian 12
# has 2.36), and scripts/setup's Debian package names stay valid. The tags are pinned here, once; the copied
# paths are amd64 ones (x86_64).
ARG CUDA_VERSION=13.0.2
ARG CUDA_IMAGE_DISTRO=ubuntu24.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-${CUDA_IMAGE_DISTRO} AS cuda-devel
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${CUDA_IMAGE_DISTRO} AS cuda-runtime

# Builds go to /out, outside /src, so that a build/ folder in the context never brings a stale CMake cache.
FROM debian:12 AS build
WORKDIR /src
COPY scripts/setup scripts/setup
RUN ./scripts/setup && rm -rf /var/lib/apt/lists/*
COPY . .
RUN TANDEM_BUILD_DIR=/out ./scripts/build -DTANDEM_CUDA=OFF -DTANDEM_BUILD_TESTS=OFF -DTANDEM_BUILD_BENCH=OFF \
    && strip /out/bin/tandem /out/bin/tandem-worker /out/bin/tandem-operator

# The same first steps as `build` (BuildKit shares those layers), then CUDA laid out as on the development
# machines: the toolkit at /usr/local/cuda (COPY follows the image's /usr/local/cuda symlink) and NCCL inside it
# (lib64 and include point into targets/x86_64-linux). CMake finds /usr/local/cuda/bin/nvcc by itself.
FROM debian:12 AS build-cuda
WORKDIR /src
COPY scripts/setup scripts/setup
RUN ./scripts/setup && rm -rf /var/lib/apt/lists/*
COPY --from=cuda-devel /usr/local/cuda/ /usr/local/cuda/
COPY --from=cuda-devel /usr/include/nccl.h /usr/local/cuda/targets/x86_64-linux/include/
COPY --from=cuda-devel /usr/lib/x86_64-linux-gnu/libnccl.so.2 /usr/local/cuda/targets/x86_64-linux/lib/
RUN ln -s libnccl.so.2 /usr/local/cuda/lib64/libnccl.so
COPY . .
RUN TANDEM_BUILD_DIR=/out ./scripts/build -DTANDEM_CUDA=ON -DTANDEM_BUILD_TESTS=OFF -DTANDEM_BUILD_BENCH=OFF \
    && strip /out/bin/tandem /out/bin/tandem-worker

FROM debian:12-slim AS runtime-base
# Runtime libraries only (the -dev packages of scripts/setup stay in the build stages).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       libgrpc++1.51 libprotobuf32 libyaml-cpp0.7 libssl3 zlib1g ca-certificates \
       libcpp-httplib0.11 libprometheus-cpp-core1.0 \
    && rm -rf /var/lib/apt/lists/*

FROM runtime-base AS operator
COPY --from=build /out/bin/tandem-operator /usr/local/bin/tandem-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tandem-operator"]

FROM runtime-base AS worker-base
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       libopenblas0-pthread libgloo0 dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*

FROM worker-base AS worker-cpu
COPY --from=build /out/bin/tandem-worker /out/bin/tandem /usr/local/bin/
USER 65532:65532
EXPOSE 9400 29400
ENTRYPOINT ["/usr/local/bin/tandem-worker"]

# The GPU worker. From NVIDIA's runtime image only the shared libraries it loads: cuBLASLt (the GEMMs) and NCCL
# (the GPU communicator); COPY follows their soname symlinks, so each file lands under its soname. The CUDA
# runtime is linked statically (CMake's default), and the driver (libcuda.so.1, libnvidia-ml.so.1) is mounted
# at run time by the NVIDIA container toolkit, as the variables below ask; the Kubernetes device plugin narrows
# NVIDIA_VISIBLE_DEVICES to the GPUs the pod requested.
FROM worker-base AS worker
COPY --from=cuda-runtime /usr/local/cuda/lib64/libcublasLt.so.13 /usr/lib/x86_64-linux-gnu/libnccl.so.2 \
     /usr/local/cuda/lib64/
COPY --from=build-cuda /out/bin/tandem-worker /out/bin/tandem /usr/local/bin/
# Registers the CUDA libraries with the loader, then fails the build, rather than a pod at start, if anything
# the binaries or those libraries need is missing here or too new for Debian's glibc (only the driver may be).
RUN echo /usr/local/cuda/lib64 > /etc/ld.so.conf.d/tandem-cuda.conf && ldconfig \
    && if ldd /usr/local/bin/tandem-worker /usr/local/bin/tandem /usr/local/cuda/lib64/* 2>&1 \
          | grep -v -e libcuda.so.1 -e libnvidia-ml.so.1 | grep 'not found'; then exit 1; fi
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility NVIDIA_REQUIRE_CUDA="cuda>=13.0"
USER 65532:65532
EXPOSE 9400 29400
ENTRYPOINT ["/usr/local/bin/tandem-worker"]
