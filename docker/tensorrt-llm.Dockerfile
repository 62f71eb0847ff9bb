# The image of the TensorRT-LLM steps (ModelOpt checkpoint export, trtllm-bench throughput): NVIDIA's release
# image with secateurs added. Build from the repository root:
# docker build -f docker/tensorrt-llm.Dockerfile -t REGISTRY/secateurs-tensorrt-llm:TAG .
# No credentials are baked in. BASE_IMAGE: `make images-local` builds this file's project layer on the local CPU
# base to check that what it copies and installs resolves (the TensorRT-LLM release itself needs NVIDIA's image).
ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.1
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/var/cache/secateurs/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/secateurs

# TensorRT-LLM 1.2.1 is built and tested against the torch, transformers and ModelOpt versions this image
# ships; the image keeps them (constraints) and the project's requirements on them are dropped, because the
# project's own pins (e.g. transformers 5) would otherwise replace them. Everything else the `pipeline` extra
# needs (kfp for the component executor, mlflow, boto3) is installed normally.
COPY pyproject.toml docker/project_requirements.py ./
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    set -- /wheels/*.whl; if [ -e "$1" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels; fi \
    && python3 project_requirements.py pyproject.toml --extras pipeline \
        --image-owns tensorrt-llm,tensorrt,torch,transformers,tokenizers,accelerate,safetensors,nvidia-modelopt,numpy \
        --requirements /tmp/requirements.txt --constraints /tmp/constraints.txt \
    && pip install --no-cache-dir -c /tmp/constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt /tmp/constraints.txt

COPY README.md ./
COPY secateurs ./secateurs
COPY components ./components
COPY pipelines ./pipelines
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    set -- /wheels/*.whl; if [ -e "$1" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels; fi \
    && pip install --no-cache-dir --no-deps . \
    && python3 -c "import secateurs, mlflow, kfp"

RUN useradd --no-log-init --uid 10001 --gid 0 --create-home --home-dir /home/secateurs secateurs \
    && mkdir -p "$HF_HOME" \
    && chown -R 10001:0 /var/cache/secateurs \
    && chmod -R g=u /var/cache/secateurs
USER 10001
WORKDIR /home/secateurs

CMD ["secateurs", "--help"]
