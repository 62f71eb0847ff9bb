#!/usr/bin/env bash
# Downloads into .whl/ the wheels bench/gpu_check.sh installs on the GPU machine, which has no network and whose
# python3 (3.12, x86_64) has torch, transformers, accelerate, triton and pytest but not these.
# liger-kernel is pure Python (its Triton kernels compile on the GPU machine); it needs only torch and triton there.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
    "liger-kernel==0.8.5"
)
PYTHON="${PYTHON:-python3}"
mkdir -p .whl
for wheel in "${WHEELS[@]}"; do
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "$wheel"
done
du -ch .whl/*.whl | tail -1
