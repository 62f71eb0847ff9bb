#!/usr/bin/env bash
# GPU check of the distillation losses, run once on a CUDA machine (one H100/H200) from the repository root:
#   1. the loss tests on CUDA (tests/test_losses.py with SECATEURS_TEST_DEVICE=cuda, Liger path included);
#   2. bench/distill.py --preset llama31-8b-4b-width (random Llama-3.1-8B teacher, 4B-Width student, bf16);
#   3. the same with every decoder layer of both models compiled (torch.compile, as `compile_layers: true` does in
#      training; informational: how much MFU compilation adds; its failure does not fail the check).
# Needs python3 with torch, transformers, accelerate, triton and pytest; liger-kernel comes as a wheel from .whl/
# (bench/fetch_gpu_wheels.sh), installed without network. Results go to $OUT (default ./out).
# Finishes in well under 8 minutes: each part has its own time limit. Exit code non-zero if a part failed.
# A dry run of the script itself on CPU: GPU_CHECK_DEVICE=cpu GPU_CHECK_PRESET=tiny bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
PRESET="${GPU_CHECK_PRESET:-llama31-8b-4b-width}"
mkdir -p "$OUT"

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
else
    echo "no wheels in .whl/ (bench/fetch_gpu_wheels.sh): the Liger path will be skipped" >&2
    export PYTHONPATH="$PWD"
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    python3 -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "transformers", transformers.__version__)'
    python3 -c 'import triton; print("triton", triton.__version__)' 2>&1
    python3 -c 'import liger_kernel.transformers.functional as f; from importlib.metadata import version;
print("liger-kernel", version("liger-kernel"))' 2>&1 | tail -1
} | tee "$OUT/environment.txt"

status=0
echo "== loss tests on $DEVICE" | tee "$OUT/test_losses_$DEVICE.txt"
SECATEURS_TEST_DEVICE="$DEVICE" timeout 90 python3 -m pytest tests/test_losses.py -q -p no:cacheprovider --noconftest -rs \
    2>&1 | tee -a "$OUT/test_losses_$DEVICE.txt"
test_rc=${PIPESTATUS[0]}
[ "$test_rc" -eq 0 ] || status=1

echo "== distillation step benchmark, $PRESET on $DEVICE" | tee "$OUT/distill_$PRESET.txt"
timeout 170 python3 bench/distill.py --preset "$PRESET" --device "$DEVICE" --out "$OUT/distill_$PRESET.json" \
    2>&1 | tee -a "$OUT/distill_$PRESET.txt"
bench_rc=${PIPESTATUS[0]}
[ "$bench_rc" -eq 0 ] || status=1

compiled_rc=skipped
if [ "$DEVICE" = cuda ]; then
    echo "== the same with compiled decoder layers" | tee "$OUT/distill_${PRESET}_compiled.txt"
    timeout 170 python3 bench/distill.py --preset "$PRESET" --device "$DEVICE" --compile \
        --out "$OUT/distill_${PRESET}_compiled.json" 2>&1 | tee -a "$OUT/distill_${PRESET}_compiled.txt"
    compiled_rc=${PIPESTATUS[0]}
fi

echo "loss tests exit $test_rc, benchmark exit $bench_rc, with compiled layers exit $compiled_rc" \
    | tee "$OUT/summary.txt"
exit $status
