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

# TensorRT-LLM 1.2.1 is built and tested against every package this image ships (torch, transformers, ModelOpt,
# and also datasets 3.1, protobuf, requests, urllib3, ...). The image owns all of them (`--image-owns '*'`): each
# is held at its installed version (constraints) and the project's own requirements on them are dropped (our
# datasets>=4 among them: the engine step reads token shards with numpy, not datasets). What is still missing
# (kfp for the component executor, mlflow, boto3) is installed within those pins, or the build fails; and
# `pip check` fails it on any conflict pip would only warn about.
COPY pyproject.toml docker/project_requirements.py ./
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    set -- /wheels/*.whl; if [ -e "$1" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels; fi \
    && python3 project_requirements.py pyproject.toml --extras pipeline --image-owns '*' \
        --requirements /tmp/requirements.txt --constraints /tmp/constraints.txt \
    && pip install --no-cache-dir -c /tmp/constraints.txt -r /tmp/requirements.txt \
    && pip check \
    && rm /tmp/requirements.txt /tmp/constraints.txt

COPY README.md ./
COPY secateurs ./secateurs
COPY components ./components
COPY pipelines ./pipelines
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    set -- /wheels/*.whl; if [ -e "$1" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels; fi \
    && pip install --no-cache-dir --no-deps . \
    && python3 -c "import secateurs, secateurs.engine, secateurs.data, mlflow, kfp"

RUN useradd --no-log-init --uid 10001 --gid 0 --create-home --home-dir /home/secateurs secateurs \
    && mkdir -p "$HF_HOME" \
    && chown -R 10001:0 /var/cache/secateurs \
    && chmod -R g=u /var/cache/secateurs
USER 10001
WORKDIR /home/secateurs

CMD ["secateurs", "--help"]
