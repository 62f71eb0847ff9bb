"""The traced memory plan against the allocator: one distillation step traced, then run for real.

`secateurs plan --trace` runs each step's own code under FakeTensorMode and reads the peak from PyTorch's memory
trackers (secateurs/trace.py). This script checks that figure against a real run of the same code: the
distillation step (`secateurs.train.DistillationTrainer.compute_loss` over two micro-batches, then fused AdamW),
at bench/distill.py's shapes, traced on the CPU and then run on DEVICE:

- cuda: the peak is `torch.cuda.max_memory_allocated()` (the caching allocator's live tensors, the quantity the
  trace models; `memory_reserved` adds the allocator's cached blocks, reported beside it).
- cpu: the peak of the profiler's allocation and free events (as tests/test_plan_trace.py measures it).

At the Llama-3.1-8B -> 4B-Width preset the whole student (fp32 weights, gradients and AdamW state, 72 GB) beside the
bf16 teacher does not fit one 80 GB GPU (the flagship shards it over 8 with FSDP2), so both models keep their widths
and vocabulary and drop to `--layers` decoder layers (default 8 on CUDA), which keeps every per-layer and
per-token term the plan counts at its real size.

    python bench/trace_vs_allocator.py --device cuda --out out/trace_vs_allocator.json     # make gpu-check, part 5
    python bench/trace_vs_allocator.py --device cpu --preset tiny                           # the dry run here

Prints traced, measured and their ratio; the goal is within 10%.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill import PRESETS

from secateurs import trace
from secateurs.config import DistillConfig


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama31-8b-4b-width")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers of both models (default: 8 on cuda, the preset's on cpu)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    preset = PRESETS[args.preset]
    teacher = dict(preset["teacher"])
    layers = args.layers or (8 if args.device == "cuda" else teacher["num_hidden_layers"])
    teacher["num_hidden_layers"] = layers
    student = {**teacher, **preset["student"]}
    bf16 = preset["dtype"] == "bfloat16"
    settings = DistillConfig(micro_batch_size=preset["batch"], global_batch_size=2 * preset["batch"],
                             gradient_checkpointing=preset["gradient_checkpointing"],
                             kd_chunk_size=preset["chunk_size"], kd_backend="chunked")  # fmt: skip

    def step(fake: bool):
        return trace.trace_training("distill", student, settings, preset["seq_len"], teacher=teacher, bf16=bf16,
                                    fake=fake)  # fmt: skip

    start = time.perf_counter()
    traced = step(True)
    trace_seconds = time.perf_counter() - start
    reserved = None
    if args.device == "cuda":
        torch.cuda.init()
        with torch.device("cuda"):
            torch.cuda.reset_peak_memory_stats()
            step(False)
            torch.cuda.synchronize()
        measured, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        device_name = torch.cuda.get_device_name()
    else:
        measured = profiled_peak(lambda: step(False))
        device_name = "cpu"
    result = {
        "preset": args.preset, "layers": layers, "device": device_name, "torch": torch.__version__,
        "seq_len": preset["seq_len"], "micro_batch": preset["batch"], "micro_batches": trace.MICRO_BATCHES,
        "traced_bytes": traced.peak, "traced_phase": traced.peak_phase, "traced_categories": traced.categories,
        "measured_bytes": measured, "measured_reserved_bytes": reserved, "ratio": traced.peak / measured,
        "trace_seconds": round(trace_seconds, 1),
        "measured_by": "torch.cuda.max_memory_allocated()" if args.device == "cuda" else "torch.profiler memory events",
    }  # fmt: skip
    gib = 2**30
    print(f"{args.preset}, {layers} layers, on {device_name}: traced {traced.peak / gib:.2f} GiB "
          f"(peak in {traced.peak_phase}), measured {measured / gib:.2f} GiB, ratio {result['ratio']:.3f}"
          + (f"; reserved {reserved / gib:.2f} GiB" if reserved else ""))  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def profiled_peak(fn) -> int:
    """Peak bytes of CPU tensors allocated while `fn` runs, from the profiler's allocation and free events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


if __name__ == "__main__":
    sys.exit(main())
