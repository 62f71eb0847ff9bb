"""The CPU demo: the whole recipe on the real SmolLM2-135M and the python-docs corpus, in minutes.

import -> prepare data -> importance -> for a width and a depth student (each about half the teacher's
parameters): prune -> distill -> evaluate; the teacher and the pruned students evaluated too; onnxruntime-genai
engines built and benchmarked for the teacher and the distilled students; then the comparison table and report.
Every step is the same library call the CLI and the pipeline components make; artifacts land under OUT.
"""

from __future__ import annotations

import json
from pathlib import Path

from secateurs.config import DistillConfig
from secateurs.prune import PruneTarget

STUDENTS = {
    # hidden 576 -> 384, MLP 1536 -> 1024, 9 -> 6 heads (2 in each of the 3 KV groups): 50% of the parameters.
    "width": PruneTarget(hidden_size=384, ffn_hidden_size=1024, num_attention_heads=6),
    # 30 -> 12 layers, the 18-layer block whose removal costs the least validation loss: 53%.
    "depth": PruneTarget(num_layers=12, depth_criterion="lm-loss-contiguous"),
}
DISTILL = DistillConfig(max_steps=30, micro_batch_size=4, global_batch_size=8, learning_rate=5e-4,
                        min_learning_rate=5e-5, warmup_steps=3, save_steps=10, logging_steps=5)
LENGTHS, BATCH = "64:32", 4


def run(out: str | Path, with_engines: bool = True, log=print) -> list[dict]:
    from secateurs import engine, evaluate, importance, prune, train
    from secateurs.checkpoint import import_model
    from secateurs.data import prepare_data
    from secateurs.report import format_table, throughput_from_bench, write_report

    out = Path(out)
    entries: list[dict] = []

    def done(path: Path) -> bool:  # a finished artifact from an earlier demo run is reused
        return (path / "secateurs.json").is_file()

    def step(name: str, path: Path, fn) -> Path:
        if done(path):
            log(f"[demo] {name}: reusing {path}")
        else:
            log(f"[demo] {name} -> {path}")
            fn()
        return path

    def evaluated(name, role, parent, model_dir, report_params):
        metrics = out / "metrics" / name
        step(f"evaluate {name}", metrics, lambda: evaluate.run(model_dir, data, metrics, ["lambada-docs"], limit=100))
        m = json.loads((metrics / "metrics.json").read_text())
        entry = {"name": name, "role": role, "parent": parent, "parameters": report_params,
                 "val_loss": m["validation_loss"], "perplexity": m["perplexity"],
                 "tasks": {t: v["acc"] for t, v in m["tasks"].items()}}
        if with_engines and role != "pruned":
            eng = out / "engines" / name
            step(f"build engine {name}", eng, lambda: engine.build_engine(model_dir, "onnxruntime-genai", "int4", eng))
            bench = eng / "bench.json"
            if not bench.is_file():
                engine.bench_engine(eng, LENGTHS, batch=BATCH, repeats=3)
            entry["throughput"] = throughput_from_bench(json.loads(bench.read_text()))
        entries.append(entry)

    teacher = step("import SmolLM2-135M", out / "teacher", lambda: import_model("smollm2-135m", out / "teacher"))
    data = step("prepare python-docs", out / "data",
                lambda: prepare_data("python-docs", teacher, seq_len=128, out=out / "data", max_tokens=128 * 800))
    imp = step("importance", out / "importance",
               lambda: importance.run(teacher, data, out / "importance", samples=64, batch_size=8,
                                      block_sizes=[18], depth_samples=8))
    t_params = json.loads((teacher / "secateurs.json").read_text())["report"]["parameters"]
    evaluated("teacher", "teacher", None, teacher, t_params)
    for name, target in STUDENTS.items():
        pruned = step(f"prune {name}", out / "pruned" / name, lambda: prune.run(teacher, imp, out / "pruned" / name, target))
        params = json.loads((pruned / "secateurs.json").read_text())["report"]["parameters_after"]
        evaluated(f"{name}-pruned", "pruned", "teacher", pruned, params)
        student = step(f"distill {name}", out / "students" / name,
                       lambda: train.distill(teacher, pruned, data, out / "students" / name, DISTILL))
        evaluated(name, "distilled", f"{name}-pruned", student, params)
    paths = write_report(entries, out / "report")
    log(format_table(entries))
    log(f"report: {paths['markdown']} (plots beside it)")
    return entries
