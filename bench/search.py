"""Does a short distillation rank search candidates the way a longer one does? (secateurs.search's premise)

SmolLM2-135M, a 50% parameter budget, the candidates `secateurs search` enumerates (width and depth mixed), each
pruned from one importance artifact and scored by validation loss right after pruning; then every candidate is
distilled from the teacher twice, for `--short` and for `--long` steps, each run with its own schedule (as a search
with that token budget would run it), and scored again on the same held-out sequences. Reports the Spearman rank
correlation between the three rankings, and whether the short ranking picks the long ranking's winner.

    python bench/search.py [--candidates 10] [--short 10] [--long 60] [--seq-len 64] [--batch 4] [--work DIR]

Sized for 2 shared CPU cores: `--measure` distils one candidate for 3 steps and prints the seconds per step, so
the whole run's time can be estimated before it starts. On a machine whose cores other processes share, run it
with OMP_NUM_THREADS=1: with torch's default two threads a step here took 10x longer (threads waiting on each
other) than with one.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="teacher checkpoint dir or built-in model name")
    parser.add_argument("--budget", type=float, default=0.5, help="parameter budget as a fraction of the teacher's")
    parser.add_argument("--candidates", type=int, default=10, help="candidates scored and distilled (>= 8)")
    parser.add_argument("--tolerance", type=float, default=0.03)
    parser.add_argument("--short", type=int, default=10, help="steps of the short distillation")
    parser.add_argument("--long", type=int, default=60, help="steps of the longer distillation")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak LR (the CPU demo's KD setting)")
    parser.add_argument("--sequences", type=int, default=3000, help="python-docs sequences prepared")
    parser.add_argument("--val-sequences", type=int, default=64, help="held-out sequences every loss is read on")
    parser.add_argument("--distil", type=int, default=None, help="distil only the best N by loss after pruning")
    parser.add_argument("--measure", action="store_true", help="time 3 distillation steps of one candidate and stop")
    parser.add_argument("--work", default=None, help="keep the prepared teacher/data/importance here (default: temp)")
    parser.add_argument("--out", default="bench/results/cpu/search.json")
    args = parser.parse_args()

    import torch

    from secateurs import importance, search
    from secateurs.checkpoint import import_model, load_model
    from secateurs.config import DataConfig, DistillConfig, ImportanceConfig, SearchConfig
    from secateurs.data import load_packed, prepare_data
    from secateurs.families import parameter_count

    work = Path(args.work or tempfile.mkdtemp(prefix="search-bench-"))
    teacher = Path(args.model) if Path(args.model).is_dir() else work / "teacher"
    if not teacher.exists():
        import_model(args.model, teacher)
    data = work / f"data-{args.seq_len}"
    if not data.exists():
        prepare_data(teacher, data, DataConfig(source="python-docs", seq_len=args.seq_len,
                                               max_tokens=args.seq_len * args.sequences, val_fraction=0.1))  # fmt: skip
    scores = work / f"importance-{args.seq_len}"
    if not scores.exists():
        importance.run(teacher, data, scores, ImportanceConfig(samples=128, batch_size=8, depth_samples=8))
    teacher_parameters = parameter_count(load_model(teacher))
    settings = SearchConfig(
        params=args.budget * teacher_parameters, tolerance=args.tolerance, max_candidates=args.candidates,
        top_k=args.candidates, hidden_divisor=64, ffn_divisor=128, val_sequences=args.val_sequences,
    )  # fmt: skip
    candidates = work / f"candidates-{args.seq_len}-{args.candidates}"
    start, scoring_s = time.perf_counter(), None  # None: scored by an earlier run (kept in --work)
    if not candidates.exists():
        search.score_candidates(teacher, scores, data, candidates, settings)
        scoring_s = round(time.perf_counter() - start, 1)
    listing = json.loads((candidates / search.CANDIDATES_FILE).read_text())
    kd = DistillConfig(micro_batch_size=args.batch, global_batch_size=args.batch, learning_rate=args.lr,
                       min_learning_rate=args.lr / 10, warmup_steps=3, logging_steps=5, save_steps=1000)  # fmt: skip
    seq_len = load_packed(data)[1]["seq_len"]

    def distil(index: int, steps: int) -> dict:
        out = work / f"scored-{args.seq_len}-{args.candidates}" / f"{steps}" / str(index)
        if (out / search.SCORE_FILE).exists():
            return json.loads((out / search.SCORE_FILE).read_text())
        short = search.short_distill_settings(kd, steps * args.batch * seq_len, seq_len)
        begin = time.perf_counter()
        score = search.distill_candidate(teacher, candidates, index, data, out, short)
        print(f"  {steps} steps in {time.perf_counter() - begin:.0f} s", flush=True)
        return score

    if args.measure:
        begin = time.perf_counter()
        distil(0, 3)
        print(f"3 steps of {args.batch} x {seq_len} tokens (with loading and scoring): {time.perf_counter() - begin:.1f} s")
        return

    def write(rows: list[dict]) -> None:
        """Correlations and winners of the candidates distilled so far, printed and written to --out."""
        pruned = [r["pruned_loss"] for r in rows]
        after_short = [r[f"loss_after_{args.short}_steps"] for r in rows]
        after_long = [r[f"loss_after_{args.long}_steps"] for r in rows]
        best = {k: rows[min(range(len(rows)), key=v.__getitem__)]["name"]
                for k, v in (("pruned", pruned), ("short", after_short), ("long", after_long))}  # fmt: skip
        result = {
            "command": "python bench/search.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                            (("candidates", args.candidates), ("short", args.short),
                                                             ("long", args.long), ("seq_len", args.seq_len),
                                                             ("batch", args.batch), ("lr", args.lr),
                                                         ("distil", args.distil))),  # fmt: skip
            "teacher_parameters": teacher_parameters,
            "budget": settings.params,
            "tokens_per_step": args.batch * seq_len,
            "validation_sequences": args.val_sequences,
            "scoring_seconds": scoring_s,
        "torch_threads": torch.get_num_threads(),
            "candidates_scored": len(listing["candidates"]),
        "candidates": rows,
            "spearman": {
                f"pruned_vs_{args.short}_steps": spearman(pruned, after_short),
                f"pruned_vs_{args.long}_steps": spearman(pruned, after_long),
                f"{args.short}_vs_{args.long}_steps": spearman(after_short, after_long),
            },
            "winner": best,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"{'candidate':<26} {'params':>11} {'pruned':>8} {f'{args.short} st':>8} {f'{args.long} st':>8}")
        for r in rows:
            print(f"{r['name']:<26} {r['parameters']:>11,} {r['pruned_loss']:>8.3f} "
                  f"{r[f'loss_after_{args.short}_steps']:>8.3f} {r[f'loss_after_{args.long}_steps']:>8.3f}")  # fmt: skip
        for k, v in result["spearman"].items():
            print(f"Spearman {k}: {v:+.2f}")
        print(f"best: {best}; written to {args.out}")

    rows = []
    # Best first by the loss right after pruning, as a search with top_k = --distil picks them; the results are
    # written after every candidate, so a run stopped early still reports the ones it finished.
    for i, name in enumerate(listing["top"][: args.distil]):
        row = next(r for r in listing["candidates"] if r["name"] == name)
        short, long = distil(i, args.short), distil(i, args.long)
        rows.append({"name": name, "shape": row["shape"], "parameters": row["parameters"],
                     "pruned_loss": row["pruned_loss"], f"loss_after_{args.short}_steps": short["distilled_loss"],
                     f"loss_after_{args.long}_steps": long["distilled_loss"]})  # fmt: skip
        if len(rows) >= 3:
            write(rows)


if __name__ == "__main__":
    main()
