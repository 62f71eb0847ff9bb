"""Does the demo's distillation hold on every rendering of its corpus? The demo's KD for both students, per
python-docs rendering and seed: the pruned (step-0) and the final validation loss, as the demo's evaluate step reads
them (its `max_sequences` spread over the held-out split).

python-docs is the standard library's documentation rendered by `pydoc` in the interpreter that runs the
pipeline, so it changes with the Python build: the container image renders it with Debian's Python 3.11.2, a
developer's venv with its own. Each `--python` here renders it with that interpreter, through the very script the
built-in source runs (`secateurs.data.pydocs._RENDER_PYTHON_DOCS`, isolated the same way), into a JSON-lines file
the data step reads as a local source, then runs the demo's steps on it: prepare, correct the teacher, score
importance, prune each student (once per rendering), and distil each student once per seed:

    python bench/demo_spread.py --python /usr/bin/python3.11 .venv/bin/python --seeds 0,1,2 \\
        --lr 5e-4 --warmup 5 --clip 1.0 --work /tmp/demo-spread --out bench/results/cpu/demo-spread.json

Every other setting is the demo's (`--config`, default configs/demo-cpu.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def render(python: str, out: Path) -> dict:
    """python-docs as PYTHON renders it, one JSON document a line: the built-in source's own script and isolation."""
    from secateurs.data.pydocs import _RENDER_PYTHON_DOCS

    if not out.exists():
        loader = {
            k: v for k, v in os.environ.items() if k in ("LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "SYSTEMROOT")
        }
        done = subprocess.run([python, "-I", "-S", "-c", _RENDER_PYTHON_DOCS], env=loader, capture_output=True,
                              text=True, check=True)  # fmt: skip
        texts = json.loads(done.stdout)
        tmp = out.with_suffix(".partial")
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        tmp.rename(out)
    version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    return {"python": python, "version": version, "documents": len(texts), "characters": sum(map(len, texts))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo-cpu.yaml"))
    parser.add_argument("--python", nargs="+", default=["/usr/bin/python3.11", sys.executable],
                        help="interpreters whose python-docs renderings to run on")  # fmt: skip
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--students", default=None, help="comma list of the config's students (default: all)")
    parser.add_argument("--lr", type=float, default=None, help="distillation peak LR (default: the config's)")
    parser.add_argument("--min-lr", type=float, default=None, help="cosine floor (default: LR / 10)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: the config's)")
    parser.add_argument(
        "--clip", type=float, default=None, help="gradient clipping norm (default: the config's)"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/demo-spread"))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "demo-spread.json")
    args = parser.parse_args()

    from secateurs import train
    from secateurs.chain import prune_student
    from secateurs.checkpoint import import_model, load_model
    from secateurs.config import load_config
    from secateurs.data import load_packed, prepare_data
    from secateurs.evaluate import validation_loss

    config = load_config(args.config)
    overrides = {k: v for k, v in {"learning_rate": args.lr, "warmup_steps": args.warmup,
                                   "max_grad_norm": args.clip}.items() if v is not None}  # fmt: skip
    if args.lr is not None:
        overrides["min_learning_rate"] = args.min_lr if args.min_lr is not None else args.lr / 10
    distill = config.distill.model_copy(update={**overrides, "save_total_limit": 0})
    students = [s for s in config.students if args.students is None or s.name in args.students.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    teacher = args.work / "teacher"
    if not teacher.exists():
        import_model(config.teacher.source, teacher)

    previous = json.loads(args.out.read_text()) if args.out.exists() else {"runs": [], "renderings": []}
    rows = previous["runs"]
    # The renderings of earlier runs into the same file are kept (their rows are), unless rendered again here.
    renderings = [r for r in previous["renderings"] if r["python"] not in args.python]
    for python in args.python:
        tag = Path(python).resolve().as_posix().strip("/").replace("/", "-")
        where = args.work / tag
        where.mkdir(exist_ok=True)
        rendering = render(python, where / "python-docs.jsonl")
        renderings.append(rendering)
        data = where / "data"
        if not data.exists():
            prepare_data(
                teacher, data, config.data.model_copy(update={"source": str(where / "python-docs.jsonl")})
            )
        # The evaluate step's validation loss: max_sequences spread over the held-out split.
        val = load_packed(data)[0]["validation"].spread(config.evaluate.max_sequences)
        for student in students:
            chain = prune_student(teacher, data, where, student.prune.target(), config.importance,
                                  config.teacher_correction, name=student.name)  # fmt: skip
            pruned = validation_loss(load_model(chain.student), val)
            for seed in [int(s) for s in args.seeds.split(",")]:
                settings = distill.model_copy(update={"seed": seed})
                key = {"python": rendering["version"], "student": student.name, "seed": seed,
                       "learning_rate": settings.learning_rate, "warmup_steps": settings.warmup_steps,
                       "max_grad_norm": settings.max_grad_norm}  # fmt: skip
                if any(all(r.get(k) == v for k, v in key.items()) for r in rows):
                    continue
                out = where / "runs" / (f"{student.name}-seed{seed}-lr{settings.learning_rate:g}"
                                        f"-wu{settings.warmup_steps}-clip{settings.max_grad_norm:g}")  # fmt: skip
                report = train.distill(chain.teacher, chain.student, data, out, settings)
                final = validation_loss(load_model(out), val)
                losses = [round(h["loss"], 3) for h in report.get("log_history", []) if "loss" in h]
                rows.append({**key, "pruned": pruned, "final": final, "drop": pruned - final,
                             "training_loss": losses})  # fmt: skip
                shutil.rmtree(out)
                shutil.rmtree(f"{out}.checkpoints", ignore_errors=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"config": args.config, "renderings": renderings, "runs": rows},
                                               indent=1))  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)

    print(f"\n{'python':>8} {'student':>8} {'seed':>4} {'lr':>8} {'wu':>3} {'clip':>5} {'pruned':>7} {'final':>7} "
          f"{'drop':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['python']:>8} {r['student']:>8} {r['seed']:>4} {r['learning_rate']:>8g} {r['warmup_steps']:>3} "
              f"{r['max_grad_norm']:>5g} {r['pruned']:>7.3f} {r['final']:>7.3f} {r['drop']:>6.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
