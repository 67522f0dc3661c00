# xbuild for CI runners.
#
#   docker build -t xbuild .                  # build, push, pull (images from registries, the daemon, files)
#   docker build -t xbuild:full --target full .   # + kernel builds and boot checks (QEMU)
#
# No ENTRYPOINT: CI systems (GitLab, Tekton) run shell scripts in the image. The cache lives in /cache;
# mount it (or a CI cache) there to share blobs, diffs, kernels and the compiled init between jobs.
# The wheel ships kernels/, initramfs/ and recipes/ inside the package: a plain (non-editable) install.

FROM debian:bookworm-slim AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XBUILD_CACHE=/cache \
    PATH=/opt/venv/bin:$PATH
# musl-tools: the guest init (~60 KB static); skopeo: inspecting pushed artifacts in CI scripts
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates musl-tools gcc libc6-dev \
        skopeo zstd lz4 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/xbuild
COPY . .
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install . \
 && mkdir -p /cache \
 && xbuild --version
CMD ["xbuild", "--help"]

FROM base AS full
# kernel builds (linux-source-6.1 + toolchain) and `xbuild run` under QEMU (TCG unless /dev/kvm works)
RUN apt-get update \
 && apt-get install -y --no-install-recommends linux-source-6.1 build-essential bc bison flex libelf-dev \
        libssl-dev dwarves xz-utils cpio qemu-system-x86 \
 && rm -rf /var/lib/apt/lists/*

FROM base
