#!/usr/bin/env bash
# Downloads into .whl/peers/<name>/ the wheels of each peer environment of bench/peers.py (trl, nemo), for
# bench/gpu_check.sh on the GPU machine, which has no network. The versions are those the CPU environments under
# .cache/peers/<name> resolved (`python bench/peers.py` makes them), for the GPU machine's python3 (3.12, x86_64);
# torch and triton are left out: the GPU machine's own CUDA builds serve every environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
missing=()
for name in trl nemo; do
    venv=".cache/peers/$name"
    [ -x "$venv/bin/python" ] || { echo "no $venv: run python bench/peers.py once first" >&2; exit 1; }
    mkdir -p ".whl/peers/$name"
    while read -r pin; do
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform any -d ".whl/peers/$name" "$pin" || missing+=("$name: $pin")
    done < <("$venv/bin/python" -m pip freeze --exclude-editable | grep -viE '^(torch|triton)==')
done
du -sh .whl/peers/* | cat
if [ ${#missing[@]} -gt 0 ]; then
    printf 'no wheel for python 3.12 x86_64: %s\n' "${missing[@]}" >&2
fi
