# The training image: CUDA torch, DeepSpeed with its FusedAdam op compiled at build time,
# and idlm with its `cluster` extra. Build from the repo root (infra/docker/README.md):
#   docker build -f infra/docker/train.Dockerfile -t <registry>/idlm-train:<tag> .
#
# CUDA 13.0 everywhere. torch==2.13.0 on PyPI, which scripts/setup.sh installs on GPU
# nodes outside containers, is the CUDA 13.0 build (it requires cuda-toolkit 13.0.3), so
# the image trains on the same CUDA as a bare-metal venv. DeepSpeed compiles an op only
# when nvcc's major.minor equals torch.version.cuda (its tolerance table ends at 12.x), so
# the toolkit below (CUDA_VERSION) and the wheel index (TORCH_INDEX_URL) change together.
# CUDA 13 needs an R580 or newer driver on the nodes.
ARG CUDA_VERSION=13.0.2
# Within one minor version of the cluster's API server (kubectl's supported skew).
ARG KUBECTL_VERSION=v1.34.1

# kubectl: a flow run in this image submits the PyTorchJobs of `cluster.launch:
# kubernetes` stages (idlm.cluster.kubernetes). Kubernetes' own image, a static binary.
FROM registry.k8s.io/kubectl:${KUBECTL_VERSION} AS kubectl

# ---------------------------------------------------------------- builder
# devel: DeepSpeed's ops compile with nvcc.
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS builder
ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Versions pinned to the upstream release and left open on the Ubuntu revision: the
# archive keeps only the newest security revision, so an exact pin stops building within
# weeks while the upstream version holds for the life of 24.04.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential=12.10ubuntu1* \
      python3.12=3.12.3-* \
      python3.12-dev=3.12.3-* \
      python3.12-venv=3.12.3-* \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The runtime stage copies this venv whole: same path, same /usr/bin/python3.12 behind it.
RUN python3.12 -m venv /opt/venv \
 && pip install --no-cache-dir pip==26.3 setuptools==84.2.1 ninja==1.13.2

# torch first and alone: DeepSpeed's op build imports it, and installing the project
# first would let pip choose torch's build. The PyTorch index names the CUDA build; PyPI
# serves the dependencies that index does not mirror.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
      --extra-index-url https://pypi.org/simple "torch==${TORCH_VERSION}"

# Only FusedAdam is compiled: it is the optimizer of every GPU profile (zero2/zero3 set
# torch_adam false) and needs no host CPU flags. CPU Adam is left to JIT: no profile
# offloads the optimizer, and DeepSpeed builds it with -march=native, which would tie the
# image to the CPU of the machine that built it. DS_ACCELERATOR: a build has no GPU, and
# without it DeepSpeed picks its CPU accelerator and skips CUDA ops. An op that cannot be
# built is skipped without an error, hence the check of installed_ops after the install.
# TORCH_CUDA_ARCH_LIST: A100 (8.0), H100 and H200 (9.0); add 10.0 for B200.
ARG DEEPSPEED_VERSION=0.19.8
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"
RUN DS_ACCELERATOR=cuda DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 \
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
    pip install --no-cache-dir --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" \
 && python -c "import importlib.util, os, runpy; \
folder = importlib.util.find_spec('deepspeed').submodule_search_locations[0]; \
info = runpy.run_path(os.path.join(folder, 'git_version_info_installed.py')); \
assert info['installed_ops']['fused_adam'] and info['accelerator_name'] == 'cuda', info"

# Editable, from /workspace: on the cluster the shared workspace (a checkout) is mounted
# over /workspace, and its src/ is then the library the stages import, so the code of a
# run is the checkout's and the image supplies only the environment. torch and deepspeed
# are already the pinned versions, so pip keeps the builds above.
WORKDIR /workspace
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir -e ".[cluster]"

# ---------------------------------------------------------------- runtime
# runtime, not devel: the one compiled op is prebuilt. A C compiler and Python's headers
# stay: Triton (flex_attention through torch.compile) builds its launcher with them.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS runtime
ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# git: runs record their commit and push their results branch (idlm.orchestration).
# UID 1000 (the base image's `ubuntu` user gives it up): the usual owner of a shared
# workspace volume. USER is numeric so that Kubernetes' runAsNonRoot can verify it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      gcc=4:13.2.0-* \
      git=1:2.43.0-* \
      libc6-dev=2.39-* \
      python3.12=3.12.3-* \
      python3.12-dev=3.12.3-* \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --create-home --uid 1000 --shell /bin/bash idlm

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
COPY --from=builder /opt/venv /opt/venv
COPY --from=kubectl /bin/kubectl /usr/local/bin/kubectl
WORKDIR /workspace
# The repo as the default workspace (.dockerignore leaves out outputs, caches, venvs and
# .git); a mounted checkout replaces it. Credentials never enter the image: S3, MLflow and
# Hugging Face keys come from the environment at run time.
COPY --chown=1000:1000 . /workspace
USER 1000:1000
CMD ["idlm", "--help"]
