#!/usr/bin/env bash
# GPU check of the distillation losses, run once on a CUDA machine (one H100/H200) from the repository root:
#   1. the loss tests on CUDA (tests/test_losses.py with SECATEURS_TEST_DEVICE=cuda, Liger path included);
#   2. bench/distill.py --preset llama31-8b-4b-width (random Llama-3.1-8B teacher, 4B-Width student, bf16);
#   3. the same with every decoder layer of both models compiled (torch.compile, as `compile_layers: true` does in
#      training; informational: how much MFU compilation adds; its failure does not fail the check);
#   4. the traced memory plan against the allocator (bench/trace_vs_allocator.py): the distillation step at the
#      preset's shapes (8 decoder layers on CUDA, so that it fits one GPU) traced under FakeTensorMode, then run
#      for real, torch.cuda.max_memory_allocated() beside the traced peak (the goal: within 10%; informational);
#   5. our KD step beside its peers (bench/peers.py: ours, NeMo AutoModel's KD recipe, TRL's GKDTrainer, a plain
#      loop) on random-weight Llama shapes: 8B -> 4.5B-Width on a GPU over 120 GB, 3B -> width student otherwise;
#      NeMo and TRL only where bench/fetch_peer_wheels.sh put their wheels in .whl/peers/ (informational: its
#      failure does not fail the check; it runs last, under its own time limit).
# Needs python3 with torch, transformers, accelerate, triton and pytest; liger-kernel comes as a wheel from .whl/
# (bench/fetch_gpu_wheels.sh), installed without network. Results go to $OUT (default ./out).
# Parts 1-3 finish in well under 8 minutes, part 4 in at most 2.5 more, part 5 in at most 7: each part has its own
# time limit. Exit code non-zero if one of parts 1-3 failed.
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

echo "== the traced memory plan against the allocator, $PRESET on $DEVICE" | tee "$OUT/trace_vs_allocator.txt"
timeout 150 python3 bench/trace_vs_allocator.py --preset "$PRESET" --device "$DEVICE" \
    --out "$OUT/trace_vs_allocator.json" 2>&1 | tee -a "$OUT/trace_vs_allocator.txt"
trace_rc=${PIPESTATUS[0]}

echo "== our KD step beside its peers on $DEVICE" | tee "$OUT/peers.txt"
peer_args=()
peer_impls=ours,plain
for name in trl nemo; do
    if compgen -G ".whl/peers/$name/*.whl" > /dev/null \
        && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "/tmp/peers/$name" ".whl/peers/$name"/*.whl >> "$OUT/peers.txt" 2>&1; then
        peer_args+=(--peer-site "$name=/tmp/peers/$name")
        peer_impls="$peer_impls,$name"
    else
        echo "no wheels for $name in .whl/peers/$name (bench/fetch_peer_wheels.sh): left out" | tee -a "$OUT/peers.txt"
    fi
done
if [ "$DEVICE" = cuda ]; then
    # One 2,048-token sequence per forward pass, 8 per step: the GPU recipe's shapes, a few steps for speed and memory.
    peer_args+=(--device cuda --random-shapes auto --seq-len 2048 --global-batch 8 --micro-batch 1 --steps 6
                --eval-every 6 --val-sequences 4 --warmup-steps-untimed 2 --timeout 200)
else
    # The CPU dry run: tiny random shapes, two steps; NeMo's recipe needs CUDA, so its loss stands in on CPU.
    peer_impls="${peer_impls/nemo/nemo-loss}"
    peer_args+=(--device cpu --random-shapes tiny --seq-len 64 --global-batch 4 --micro-batch 2 --steps 2
                --eval-every 2 --val-sequences 2 --warmup-steps-untimed 0 --timeout 200)
fi
timeout 420 python3 bench/peers.py --impls "$peer_impls" --seeds 0 --processes 1 --students width \
    --work /tmp/peers-work --out "$OUT/peers.json" --plot "$OUT/peers.png" "${peer_args[@]}" \
    2>&1 | tee -a "$OUT/peers.txt"
peers_rc=${PIPESTATUS[0]}

echo "loss tests exit $test_rc, benchmark exit $bench_rc, with compiled layers exit $compiled_rc," \
    "traced vs allocator exit $trace_rc, peers exit $peers_rc (informational)" | tee "$OUT/summary.txt"
exit $status
