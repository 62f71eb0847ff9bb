# Container images of secateurs: `make images REGISTRY=registry.example.com/team TAG=0.1.0` builds both images
# from the repository root and pushes them:
#   $(REGISTRY)/secateurs:$(TAG)               pipeline steps + the chart's MLflow server (docker/Dockerfile)
#   $(REGISTRY)/secateurs-tensorrt-llm:$(TAG)  TensorRT-LLM steps (docker/tensorrt-llm.Dockerfile)
# Included by the top-level Makefile; `make -f docker/images.mk images ...` works on its own too.

REGISTRY ?=
TAG ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
# GPU nodes are x86-64; override for Arm (Grace) nodes, the TensorRT-LLM base image ships both.
PLATFORM ?= linux/amd64
DOCKER ?= docker
IMAGE_SECATEURS = $(REGISTRY)/secateurs:$(TAG)
IMAGE_TENSORRT_LLM = $(REGISTRY)/secateurs-tensorrt-llm:$(TAG)

.PHONY: images images-preflight image-secateurs image-tensorrt-llm

images: image-secateurs image-tensorrt-llm
	@echo "pushed $(IMAGE_SECATEURS) and $(IMAGE_TENSORRT_LLM)"

# Fail early, with the reason, where no image can be built: no Docker CLI, no reachable engine, no registry.
images-preflight:
	@command -v $(DOCKER) >/dev/null 2>&1 || { \
		echo "make images: '$(DOCKER)' is not installed; building images needs a Docker engine (set DOCKER=... or run on a machine that has one)" >&2; exit 1; }
	@$(DOCKER) info >/dev/null 2>&1 || { \
		echo "make images: no Docker engine reachable ('$(DOCKER) info' failed); building images needs a running Docker engine" >&2; exit 1; }
	@test -n "$(REGISTRY)" || { \
		echo "make images: REGISTRY is empty; e.g. make images REGISTRY=ghcr.io/your-org TAG=0.1.0" >&2; exit 1; }

image-secateurs: images-preflight
	$(DOCKER) build --platform $(PLATFORM) -f docker/Dockerfile -t $(IMAGE_SECATEURS) .
	$(DOCKER) push $(IMAGE_SECATEURS)

image-tensorrt-llm: images-preflight
	$(DOCKER) build --platform $(PLATFORM) -f docker/tensorrt-llm.Dockerfile -t $(IMAGE_TENSORRT_LLM) .
	$(DOCKER) push $(IMAGE_TENSORRT_LLM)
