"""Importance estimation against a plain forward pass over the same calibration data.

Both sides run the decoder (`model.model`, no LM head: importance needs no logits) over the same sequences in the
same batches; ours adds the activation hooks (MLP neurons, heads, KV groups, hidden channels) and Block Influence.
Repeats alternate between the two so drift in machine load hits both. Goal: ratio <= 1.15x.

    python bench/importance.py [--model smollm2-135m|DIR] [--samples 32] [--seq-len 256] [--repeats 3]

The LM-loss depth scan (one extra forward pass over the validation sequences per removed layer or block) is a
separate, optional cost and is not part of this ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="checkpoint dir or built-in model name")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/bench/importance.json")
    args = parser.parse_args()

    from secateurs.checkpoint import import_model, load_model
    from secateurs.importance import collect_activation_scores

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        model_dir = Path(tempfile.mkdtemp()) / "model"
        import_model(args.model, model_dir)
    model = load_model(model_dir)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.samples, args.seq_len))

    @torch.inference_mode()
    def plain():
        for start in range(0, len(ids), args.batch_size):
            model.model(input_ids=ids[start : start + args.batch_size], use_cache=False)

    def ours():
        collect_activation_scores(model, ids, args.batch_size)

    plain()  # warm-up (allocator, thread pools)
    times = {"plain": [], "importance": []}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("importance", ours)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    plain_s, ours_s = statistics.median(times["plain"]), statistics.median(times["importance"])
    result = {
        "model": args.model,
        "tokens": ids.numel(),
        "threads": torch.get_num_threads(),
        "plain_forward_s": plain_s,
        "importance_s": ours_s,
        "ratio": ours_s / plain_s,
        "goal": 1.15,
        "runs": times,
    }
    print(f"plain forward: {plain_s:.2f} s   importance: {ours_s:.2f} s   ratio: {ours_s / plain_s:.3f}x (goal <= 1.15x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
