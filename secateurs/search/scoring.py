"""The search's three pipeline steps, and the whole search in one process.

- `score_candidates` (the search step): every candidate pruned from the importance artifact in memory and scored by
  validation loss; the `top_k` kept as pruned checkpoints;
- `distill_candidate` (one search-distill task): a short distillation of one of them, run as the distill step runs;
- `pick_winner` (search-pick): the lowest validation loss after that short distillation.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from secateurs.config import DistillConfig, SearchConfig
from secateurs.families import Shape
from secateurs.search.candidates import enumerate_candidates
from secateurs.search.grid import (
    BYTES_PER_PARAMETER,
    Candidate,
    ParameterCounter,
    SearchError,
    describe_budget,
    parameter_limit,
)
from secateurs.search.latency import check_engine, measure_throughput

CANDIDATES_FILE = "candidates.json"
SCORE_FILE = "score.json"


def short_distill_settings(distill: DistillConfig, tokens: float, seq_len: int) -> DistillConfig:
    """The run's KD settings for a candidate's short distillation of about `tokens` tokens: the same loss,
    temperature, learning rates and batch, over as many steps as the tokens fill (at least one), with warm-up
    and checkpoints scaled into them."""
    steps = max(1, math.ceil(tokens / (distill.global_batch_size * seq_len)))
    return distill.model_copy(update={
        "max_steps": steps,
        "warmup_steps": min(distill.warmup_steps, steps // 10),
        "save_steps": min(distill.save_steps, steps),
        "logging_steps": min(distill.logging_steps, steps),
    })  # fmt: skip


def score_candidates(
    model_dir: str | Path, importance_dir: str | Path, data_dir: str | Path, out: str | Path,
    settings: SearchConfig, device: str | None = None, record=None,
) -> dict:  # fmt: skip
    """Steps 1-2 of the search: enumerate, prune and score every candidate; write the `top_k` pruned.

    Writes OUT: `candidates.json` and `top/<i>/`, the pruned checkpoint of the i-th best candidate by validation
    loss right after pruning (a stock checkpoint with prune's manifest).

    Args:
        model_dir: the model pruned (the teacher, or a parent student).
        importance_dir: its importance artifact.
        data_dir: a dataset prepared with its tokenizer; candidates are scored on `val_sequences` of its
            validation split, spread evenly.
        settings: budget, grid and scoring settings (`SearchConfig`).
        record: called once per candidate as `record(name, params=..., metrics=...)` with its shape, budget
            figures and loss after pruning (the pipeline step's `StepRun.item_run`: a nested MLflow run per
            candidate); what it returns is kept as the candidate's `mlflow_run_id`, for the steps that add to it.
    """

    from secateurs import prune
    from secateurs.checkpoint import check_checkpoint_dir, load_frozen, load_tokenizer
    from secateurs.data import check_matches, load_packed
    from secateurs.evaluate import validation_loss
    from secateurs.families import family_of, parameter_count
    from secateurs.files import atomic_output
    from secateurs.importance import load_importance
    from secateurs.manifest import write_manifest

    # Every bad input fails here, before a weight is read: the checkpoint, the importance artifact, the budget and
    # fixed dimensions (enumeration) and every candidate's pruning plan (the depth criterion's block sizes).
    config = check_checkpoint_dir(model_dir)
    source = Shape.of(config)
    scores, depth, manifest = load_importance(importance_dir)
    prune.check_importance_matches(manifest, model_dir, source)
    dd, data_config = load_packed(data_dir)
    check_matches(data_config, load_tokenizer(model_dir), where=f"dataset {data_dir}")
    check_engine(settings)
    counter = ParameterCounter(config, model_dir, data_dir)
    candidates = enumerate_candidates(counter, settings)
    if len(candidates) < settings.top_k:
        raise SearchError(f"top_k={settings.top_k} but only {len(candidates)} candidate shapes are within "
                          f"tolerance={settings.tolerance} under the {describe_budget(settings)}: lower top_k or "
                          "raise tolerance")  # fmt: skip
    plans = [prune.plan_pruning(source, scores, depth, c.target(settings.depth_criterion)) for c in candidates]

    model = load_frozen(model_dir, device)
    validation = dd["validation"].spread(settings.val_sequences)
    family, state = family_of(model.config), model.state_dict()
    rows = []
    for candidate, plan in zip(candidates, plans):
        pruned = prune.build_model(prune.pruned_config(model.config, plan, family), prune.prune_state_dict(state, plan))
        assert parameter_count(pruned) == candidate.parameters, (candidate.name, parameter_count(pruned))
        loss = validation_loss(pruned.to(model.device), validation, settings.batch_size)
        rows.append(_row(candidate, settings, pruned_loss=loss))
        if settings.latency is not None:  # measured during enumeration: read from the cache
            rows[-1]["output_tokens_per_s"] = measure_throughput(config, model_dir, candidate.shape, settings, data_dir)
        print(f"search: {candidate.name} {candidate.parameters:,} parameters, validation loss {loss:.4f} after pruning")
        del pruned
    del model, state
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["pruned_loss"], rows[i]["name"]))
    for rank, i in enumerate(order):
        rows[i]["pruned_rank"] = rank
    top = [rows[i]["name"] for i in order[: settings.top_k]]
    source_parameters = counter(source)
    limit = parameter_limit(settings, source_parameters)
    figures = ("parameters", "weight_bytes", "budget_share", "pruned_loss", "pruned_rank", "output_tokens_per_s")
    for row in rows:
        row["budget_share"] = row["parameters"] / limit
        if record is not None:
            row["mlflow_run_id"] = record(
                row["name"], params={"shape": row["shape"], "budget": describe_budget(settings)},
                metrics={k: row[k] for k in figures if k in row},
            )  # fmt: skip
    report = {
        "source_shape": source.as_dict(),
        "source_parameters": source_parameters,
        "parameter_limit": limit,
        "budget": describe_budget(settings),
        "candidates": rows,
        "top": top,
    }
    with atomic_output(out) as tmp:
        for i, name in enumerate(top):
            candidate = next(c for c in candidates if c.name == name)
            prune.run(model_dir, importance_dir, tmp / "top" / str(i), candidate.target(settings.depth_criterion))
        (tmp / CANDIDATES_FILE).write_text(json.dumps(report, indent=1))
        write_manifest(tmp, "search", inputs={"model": model_dir, "importance": importance_dir, "data": data_dir},
                       config=settings.model_dump(), report={k: v for k, v in report.items() if k != "candidates"})  # fmt: skip
    return report


def distill_candidate(
    teacher_dir: str | Path, candidates_dir: str | Path, index: int, data_dir: str | Path, out: str | Path,
    distill: DistillConfig, callbacks=(), processes: int = 1, trainjob: str = "",
) -> dict:  # fmt: skip
    """Step 3 for one candidate: distil the `index`-th of the top candidates with `distill` (the short settings,
    `short_distill_settings`) and score it again, on the sequences the search scored it on. Writes OUT:
    `score.json` and a manifest; the short-distilled weights and their checkpoints are dropped (the winner's full
    distillation starts again from its pruned checkpoint).

    The distillation runs as the distill step runs (`secateurs.training_launch.train`): in this process, under torchrun
    with `processes` on this node, or as a TrainJob over several nodes, so `parallelism: fsdp` shards a candidate
    over the same GPUs. The run scores it too (`DistillConfig.validation_sequences`): its main process reads back
    the student it wrote and computes the validation loss on its GPU, so a TrainJob's watching pod, which holds
    none, never loads the model.

    Args:
        processes: training processes on this node (the distill step's `placement.processes`); 1 trains here.
        trainjob: JSON of a `secateurs.trainjob.JobPlacement` to train on several nodes; "" for this node.
    """
    from secateurs import training_launch
    from secateurs.files import atomic_output
    from secateurs.manifest import read_manifest, write_manifest

    listing = json.loads((Path(candidates_dir) / CANDIDATES_FILE).read_text())
    scoring = SearchConfig.model_validate(read_manifest(candidates_dir)["config"])
    if not 0 <= index < len(listing["top"]):
        raise SearchError(f"candidate index {index} is out of range: the search kept {len(listing['top'])}")
    name = listing["top"][index]
    row = next(r for r in listing["candidates"] if r["name"] == name)
    student = Path(candidates_dir) / "top" / str(index)
    work = Path(f"{Path(out).absolute()}.work")
    inputs = {"teacher": str(teacher_dir), "student": str(student), "data": str(data_dir)}
    # Scored by the run that trains it, on the sequences the search scored it on after pruning.
    distill = distill.model_copy(update={"validation_sequences": scoring.val_sequences})
    report = training_launch.train("distill", inputs, str(work), distill, processes, callbacks, trainjob)
    shutil.rmtree(report["checkpoint_dir"], ignore_errors=True)
    loss = report["validation_loss"]
    shutil.rmtree(work, ignore_errors=True)
    score = {**row, "index": index, "distilled_loss": loss, "distill_steps": report["steps"],
             "distill_tokens": report["tokens_seen"], "distill_final_loss": report["final_loss"],
             "distill_processes": report["processes"]}  # fmt: skip
    print(f"search: {name} validation loss {row['pruned_loss']:.4f} after pruning, {loss:.4f} after "
          f"{report['steps']} steps of KD")  # fmt: skip
    with atomic_output(out) as tmp:
        (tmp / SCORE_FILE).write_text(json.dumps(score, indent=1))
        write_manifest(tmp, "search-distill", inputs={"teacher": teacher_dir, "model": student, "data": data_dir},
                       config=distill.model_dump(), report=score)  # fmt: skip
    return score


def pick_winner(candidates_dir: str | Path, scored: list[str | Path], out: str | Path) -> dict:
    """Step 4: rank the short-distilled candidates by validation loss; write the winner's pruned checkpoint to OUT
    (with its prune manifest, so lineage and the distill step read it as any pruned student) and the whole table
    to OUT/candidates.json."""
    from secateurs.files import atomic_output

    listing = json.loads((Path(candidates_dir) / CANDIDATES_FILE).read_text())
    scores = [json.loads((Path(p) / SCORE_FILE).read_text()) for p in scored]
    if not scores:
        raise SearchError("no candidate was distilled: nothing to pick from")
    by_name = {s["name"]: s for s in scores}
    ranked = sorted(scores, key=lambda s: (s["distilled_loss"], s["name"]))
    for rank, s in enumerate(ranked):
        by_name[s["name"]]["distilled_rank"] = rank
    rows = [{**r, **by_name.get(r["name"], {})} for r in listing["candidates"]]
    winner = ranked[0]
    result = {**{k: v for k, v in listing.items() if k != "candidates"}, "winner": winner["name"],
              "winner_shape": winner["shape"], "winner_parameters": winner["parameters"], "candidates": rows}  # fmt: skip
    with atomic_output(out) as tmp:
        shutil.copytree(Path(candidates_dir) / "top" / str(winner["index"]), tmp, dirs_exist_ok=True)
        (tmp / CANDIDATES_FILE).write_text(json.dumps(result, indent=1))
    return result


def run(
    model_dir: str | Path, importance_dir: str | Path, teacher_dir: str | Path, data_dir: str | Path,
    out: str | Path, settings: SearchConfig, distill: DistillConfig,
) -> dict:  # fmt: skip
    """The whole search in one process: score every candidate, distil the top_k one after another, pick the winner.

    Writes OUT: `candidates/` (the scoring artifact), `scored/<i>/` (each short distillation's score) and
    `winner/` (the winner's pruned checkpoint, with `candidates.json` holding the whole table).

    Args:
        model_dir: the model pruned (the teacher, or a parent student); importance_dir: its importance artifact.
        teacher_dir: the KD teacher (the corrected teacher).
        data_dir: a dataset prepared with their tokenizer.
        settings: the search settings; distill: the run's KD settings (the short runs use `short_distill_settings`).
    """
    from secateurs.data import load_packed

    out = Path(out)
    _, data_config = load_packed(data_dir)
    short = short_distill_settings(distill, settings.tokens, data_config["seq_len"])
    listing = score_candidates(model_dir, importance_dir, data_dir, out / "candidates", settings)
    scored = []
    for i in range(len(listing["top"])):
        distill_candidate(teacher_dir, out / "candidates", i, data_dir, out / "scored" / str(i), short)
        scored.append(out / "scored" / str(i))
    return pick_winner(out / "candidates", scored, out / "winner")


def _row(candidate: Candidate, settings: SearchConfig, **losses) -> dict:
    return {
        "name": candidate.name,
        "shape": candidate.shape.as_dict(),
        "parameters": candidate.parameters,
        "weight_bytes": int(candidate.parameters * BYTES_PER_PARAMETER[settings.precision]),
        **losses,
    }


def format_table(result: dict) -> str:
    """The candidate table: one line per candidate, winner marked, as `secateurs search` and the demo print."""
    speed = all("output_tokens_per_s" in r for r in result["candidates"])  # a latency budget measured them
    header = f"{'candidate':<28} {'params':>12}{' tokens/s' if speed else ''} {'loss pruned':>12} {'loss KD':>9}  "
    lines = [header, "-" * len(header)]
    for r in sorted(result["candidates"], key=lambda r: -r["parameters"]):
        kd = f"{r['distilled_loss']:.4f}" if r.get("distilled_loss") is not None else "-"
        tps = f" {r['output_tokens_per_s']:>8.1f}" if speed else ""
        mark = "winner" if r["name"] == result.get("winner") else ""
        lines.append(f"{r['name']:<28} {r['parameters']:>12,}{tps} {r['pruned_loss']:>12.4f} {kd:>9}  {mark}")
    return "\n".join(lines)

