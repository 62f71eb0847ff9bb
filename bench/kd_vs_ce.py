"""KD on logits against cross-entropy against random init, at equal steps, over several seeds.

The setting of the KD/CE/random-init test in tests/test_smollm2.py (SmolLM2-135M width-pruned to half,
python-docs, 128-token sequences, 16 held-out sequences by default), run for more seeds and with the validation loss read
every `--eval-every` steps from the run's own checkpoints, so the ordering can be judged against run-to-run noise.

    python bench/kd_vs_ce.py [--steps 30] [--micro-batch 2] [--lr 5e-4] [--seeds 0,1,2] [--eval-every 10]

Prints one row per (seed, step) and the mean of each method at the last step; writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WIDTH = {"hidden_size": 384, "ffn_hidden_size": 1024, "num_attention_heads": 6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="smollm2-135m", help="teacher checkpoint dir or built-in model name"
    )
    parser.add_argument(
        "--sequences", type=int, default=200, help="python-docs sequences prepared (see --val-fraction)"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of the prepared sequences held out for validation"
    )
    parser.add_argument("--val-sequences", type=int, default=16, help="held-out sequences the loss is read on")
    parser.add_argument(
        "--val-spread", action="store_true",
        help="read the loss on --val-sequences spread evenly over the whole validation split instead of its first "
        "ones (a python-docs document is one module's documentation, ~4,300 tokens on average: the first 16 "
        "sequences are one module)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=None, help="sequences per step (default: --micro-batch)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=2, help="linear warm-up steps")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument(
        "--correct-steps", type=int, default=0,
        help="teacher correction first (recipe step 1; 4 x 128 tokens per step); the students distil from the "
        "corrected teacher (see --prune-from)",
    )  # fmt: skip
    parser.add_argument("--correct-lr", type=float, default=5e-4)
    parser.add_argument(
        "--prune-from", choices=["corrected", "original"], default="corrected",
        help="with --correct-steps: score and prune the corrected teacher (the recipe's order) or the original one "
        "(correction run alongside distillation)",
    )  # fmt: skip
    parser.add_argument("--methods", default="kd,ce,random-init", help="comma list of kd, ce, random-init")
    parser.add_argument(
        "--work", default=None, help="keep the prepared teacher/data/student here (default: temp)"
    )
    parser.add_argument("--out", default="runs/bench/kd-vs-ce.json")
    args = parser.parse_args()
    batch = args.global_batch or args.micro_batch

    from secateurs import prune, train
    from secateurs.chain import prune_student, random_init
    from secateurs.checkpoint import import_model, load_model
    from secateurs.config import DataConfig, DistillConfig, ImportanceConfig, TeacherCorrectionConfig
    from secateurs.data import load_packed, prepare_data
    from secateurs.evaluate import validation_loss

    work = Path(args.work or tempfile.mkdtemp(prefix="kd-vs-ce-"))
    teacher = Path(args.model) if Path(args.model).is_dir() else work / "teacher"
    if not teacher.exists():
        import_model(args.model, teacher)
    data = work / "data"
    if not data.exists():
        settings = DataConfig(source="python-docs", seq_len=128, max_tokens=128 * args.sequences,
                              val_fraction=args.val_fraction)  # fmt: skip
        prepare_data(teacher, data, settings)
    held_out = load_packed(data)[0]["validation"]
    val = held_out.spread(args.val_sequences) if args.val_spread else held_out.head(args.val_sequences)
    teacher_loss = {"original": validation_loss(load_model(teacher), val)}
    tag, correction = "", None
    if args.correct_steps:
        tag = f"-corrected{args.correct_steps}"
        correction = TeacherCorrectionConfig(
            max_steps=args.correct_steps, micro_batch_size=4, global_batch_size=4,
            learning_rate=args.correct_lr, min_learning_rate=args.correct_lr / 10, warmup_steps=2,
            save_steps=args.correct_steps, logging_steps=10,
        )  # fmt: skip
    # The recipe's steps 1-3 (correction, importance, width pruning), kept in work/chain<tag> for later runs.
    scoring = ImportanceConfig(samples=16, batch_size=8, block_sizes=[18], depth_samples=4)
    chain = prune_student(teacher, data, work / f"chain{tag}", prune.PruneTarget(**WIDTH), scoring, correction,
                          prune_from=args.prune_from, name="width")  # fmt: skip
    if args.correct_steps:
        teacher_loss["corrected"] = validation_loss(load_model(chain.teacher), val)
    print(f"teacher validation loss: {teacher_loss}", flush=True)
    teacher, width = chain.teacher, chain.student
    random_dir = random_init(width, work / f"chain{tag}" / f"random-init-from{args.prune_from}", seed=0)

    methods = {"kd": (width, 0.0), "ce": (width, 1.0), "random-init": (random_dir, 0.0)}
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in args.methods.split(","):
            student, ce_alpha = methods[method]
            settings = DistillConfig(
                max_steps=args.steps, micro_batch_size=args.micro_batch,
                global_batch_size=batch, learning_rate=args.lr,
                min_learning_rate=args.lr / 10, warmup_steps=args.warmup, save_steps=args.eval_every,
                logging_steps=args.eval_every, save_total_limit=0, ce_alpha=ce_alpha, seed=seed,
            )  # fmt: skip
            name = f"{method}{tag}-from{args.prune_from}-seed{seed}-{args.steps}x{batch}-lr{args.lr:g}-wu{args.warmup}"
            out = work / "runs" / name
            train.distill(teacher, student, data, out, settings)
            checkpoints = Path(f"{out}.checkpoints")
            for step in range(args.eval_every, args.steps, args.eval_every):
                loss = validation_loss(load_model(checkpoints / f"checkpoint-{step}"), val)
                rows.append({"seed": seed, "method": method, "step": step, "validation_loss": loss})
            loss = validation_loss(load_model(out), val)
            rows.append({"seed": seed, "method": method, "step": args.steps, "validation_loss": loss})
            shutil.rmtree(checkpoints)  # optimizer state: ~0.8 GB per checkpoint of the 67M student
            print(json.dumps(rows[-1]), flush=True)

    print(
        f"\nvalidation loss ({len(val)} held-out sequences), {args.steps} steps of {batch} x 128 tokens, lr {args.lr}"
    )
    print("seed  step  " + "  ".join(f"{m:>12}" for m in args.methods.split(",")))
    for seed in sorted({r["seed"] for r in rows}):
        for step in sorted({r["step"] for r in rows}):
            cells = {
                r["method"]: r["validation_loss"] for r in rows if r["seed"] == seed and r["step"] == step
            }
            print(
                f"{seed:>4}  {step:>4}  " + "  ".join(f"{cells[m]:>12.3f}" for m in args.methods.split(","))
            )
    last = {
        m: statistics.mean(r["validation_loss"] for r in rows if r["method"] == m and r["step"] == args.steps)
        for m in args.methods.split(",")
    }
    print("mean at the last step: " + ", ".join(f"{m} {v:.3f}" for m, v in last.items()))
    print("teacher: " + ", ".join(f"{k} {v:.3f}" for k, v in teacher_loss.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "teacher": teacher_loss, "rows": rows, "mean_last": last}, indent=1))


if __name__ == "__main__":
    main()
