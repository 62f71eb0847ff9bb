# The local stand-in for the release base image (pytorch/pytorch), built with no registry pull: Debian bookworm's
# root file system (made by debootstrap and imported by docker/build_local.py as ROOTFS) with Python 3.11 and the
# pinned CPU torch wheel from docker/wheels/, in a venv first on PATH.
ARG ROOTFS=localhost/secateurs-rootfs:bookworm
FROM ${ROOTFS}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1

ARG TORCH_VERSION=2.13.0
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    python3 -m venv /opt/venv \
    && pip install --no-cache-dir --no-index --find-links /wheels "torch==${TORCH_VERSION}" \
    && python3 -c "import torch; print('torch', torch.__version__)"
