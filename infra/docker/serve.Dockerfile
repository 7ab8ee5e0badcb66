# The serving image: SGLang with the idlm plugin, the environment scripts/setup_serve.sh
# builds, serving one exported bundle (outputs/export/{isd,risd}) mounted at /bundle:
#   docker build -f infra/docker/serve.Dockerfile -t <registry>/idlm-serve:<tag> .
#   docker run --gpus all -p 30000:30000 -v "$PWD/outputs/export/isd:/bundle:ro" \
#       <registry>/idlm-serve:<tag>
#
# CUDA 13.0: sglang 0.5.21 pins torch==2.13.0, whose PyPI build is CUDA 13.0, and its
# kernels (flashinfer, sglang-kernel) are the cu13 builds; the toolkit matches them.
ARG CUDA_VERSION=13.0.2

# devel, not runtime: flashinfer, DeepGEMM and Triton compile kernels with nvcc when the
# server first runs a shape, so the toolkit is part of what the server needs.
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04
ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Versions pinned to the upstream release and left open on the Ubuntu revision (the
# archive keeps only the newest security revision; see train.Dockerfile).
# libnuma1: sglang-kernel's compiled ops link libnuma.so.1 and no wheel ships it.
# UID 1000 (the base image's `ubuntu` user gives it up), numeric USER below so that
# Kubernetes' runAsNonRoot can verify it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential=12.10ubuntu1* \
      libnuma1=2.0.18-* \
      python3.12=3.12.3-* \
      python3.12-dev=3.12.3-* \
      python3.12-venv=3.12.3-* \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --create-home --uid 1000 --shell /bin/bash idlm

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# The `serve` extra of pyproject.toml with SGLang's own dependencies (its transformers
# pin conflicts with training's, which is why this is an image of its own), then idlm
# without dependencies: the plugin needs only torch and pyyaml, both there.
ARG SGLANG_VERSION=0.5.21
RUN python3.12 -m venv /opt/venv \
 && pip install --no-cache-dir pip==26.3 \
 && pip install --no-cache-dir "sglang==${SGLANG_VERSION}" "pyyaml>=6"

COPY pyproject.toml README.md /opt/idlm/
COPY src /opt/idlm/src
# The algorithm module is written into sglang's package now, as root: the server runs as
# an unprivileged user who cannot write site-packages, and the plugin then finds it in
# place. The entry point check is the one scripts/setup_serve.sh ends with.
RUN pip install --no-cache-dir --no-deps /opt/idlm \
 && python -m idlm.serving.sglang.install \
 && python -c "from importlib.metadata import entry_points; \
names = [ep.name for ep in entry_points(group='sglang.srt.plugins')]; \
assert 'idlm_isd' in names, names"

USER 1000:1000
WORKDIR /home/idlm
EXPOSE 30000
# The bundle's own launch.sh is the server command (the flags export wrote for it, paths
# relative to the bundle); arguments after it are appended to SGLang's. SGLang listens on
# 127.0.0.1 by default, unreachable from outside the container, hence --host. Hugging
# Face credentials (an R-ISD bundle may name a hub base model) come from the environment
# at run time (HF_TOKEN), never from the image.
ENTRYPOINT ["bash", "/bundle/launch.sh"]
CMD ["--host", "0.0.0.0", "--port", "30000"]
