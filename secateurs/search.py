"""Architecture search: from a parameter, memory or latency budget to the student shape that distils best.

Consumes the model to prune (the teacher, or a parent student), its importance artifact (one importance run serves
every candidate), the KD teacher and a prepared dataset. Produces a search artifact: `candidates.json` (every
candidate's shape, exact parameter count, weight bytes, validation loss right after pruning and, for the `top_k`
distilled, after a short distillation) and the winner's pruned checkpoint, which the full distillation starts from.

The flow (Minitron, arXiv 2407.14679 Sec. 3: candidates ranked after light retraining, because the ranking right
after pruning is a poor guide):
1. enumerate shapes on divisor grids, as NVIDIA Model Optimizer's Minitron search does: hidden and MLP widths in
   multiples of a channel divisor, attention as whole KV groups times query heads per group (so GQA stays valid),
   layers; width and depth mixed, each axis pruned at most `max_pruning` of it. The candidates are the shapes whose
   exact parameter count lies in a band just under the budget (`tolerance`), so the grid does not explode. A
   latency budget (output tokens/s) is measured: an engine of each shape, with random weights, built and
   benchmarked by `secateurs.engine` from the largest shape down, each shape measured once (cached);
2. prune each one from the importance artifact in memory (prune.py's own plan and surgery) and score it by
   validation loss;
3. distil the best `top_k` for `tokens` tokens each with the run's KD settings, as the distill step runs
   (`secateurs.training_launch.train`: in one process, under torchrun, or as a TrainJob), and score them again;
4. pick the lowest validation loss after that short distillation.

Guarantees: every bad budget, fixed dimension or depth criterion fails in one line before any weight is read; a
candidate's recorded parameter count is the one `families.parameter_count` gives its pruned model (asserted).
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from secateurs.config import DistillConfig, PruneTarget, SearchConfig
from secateurs.families import LAYER_PARAMETER_AXES, MODEL_PARAMETER_AXES, Shape

CANDIDATES_FILE = "candidates.json"
SCORE_FILE = "score.json"
# Bytes a weight takes at each `precision` of a memory budget (int4: two weights a byte, scales not counted).
BYTES_PER_PARAMETER = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int4": 0.5}


class SearchError(ValueError):
    """A budget or search setting no candidate can satisfy."""


@dataclass(frozen=True)
class Candidate:
    """One student shape and its exact parameter count."""

    shape: Shape
    parameters: int

    @property
    def name(self) -> str:
        """`h384-f1024-a6-kv3-l24`: hidden, MLP, query heads, KV groups, layers."""
        s = self.shape
        return (f"h{s.hidden_size}-f{s.intermediate_size}-a{s.num_attention_heads}-kv{s.num_key_value_heads}"
                f"-l{s.num_hidden_layers}")  # fmt: skip

    def target(self, depth_criterion: str) -> PruneTarget:
        """The `PruneTarget` that prunes to this shape."""
        s = self.shape
        return PruneTarget(
            hidden_size=s.hidden_size,
            ffn_hidden_size=s.intermediate_size,
            num_attention_heads=s.num_attention_heads,
            num_key_value_heads=s.num_key_value_heads,
            num_layers=s.num_hidden_layers,
            depth_criterion=depth_criterion,
        )


# ------------------------------------------------------------------------------------------------ enumeration


class ParameterCounter:
    """Exact parameter counts of pruned shapes of one source model, without building them.

    Counted from the source's own parameter shapes (a model built on the meta device: no weights), each dimension
    scaled along the axis pruning cuts it on (`families.LAYER_PARAMETER_AXES`), so biases and Qwen3's q/k norms
    count exactly as `families.parameter_count` counts the pruned model; tied embeddings count once.
    """

    def __init__(self, config, model_dir: str | Path | None = None, data_dir: str | Path | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        # For latency measurements: the model dir's tokenizer, and the dataset an fp8 engine calibrates on.
        self.config, self.model_dir, self.data_dir = config, model_dir, data_dir
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        # named_parameters() lists a tied lm_head once, under the embedding's name.
        params = dict(model.named_parameters())
        self.source = Shape.of(config)
        self.root = {n: tuple(p.shape) for n, p in params.items() if n in MODEL_PARAMETER_AXES}
        prefix = "model.layers.0."
        self.layer = {n[len(prefix) :]: tuple(p.shape) for n, p in params.items() if n.startswith(prefix)}
        unknown = [n for n in params if n not in self.root and not n.startswith("model.layers.")]
        unknown += [f"{prefix}{n}" for n in self.layer if n not in LAYER_PARAMETER_AXES]
        if unknown:
            raise SearchError(f"unknown parameter {unknown[0]}: this model's layout is not the one secateurs prunes")

    def loadable(self, shape: Shape) -> bool:
        """Whether transformers accepts a config of this shape: some families add rules of their own (Llama's
        config refuses a hidden size that is not a multiple of the query heads, even with an explicit head_dim)."""
        from secateurs.families import family_of
        from secateurs.prune import PrunePlan, pruned_config

        # The config prune would write (which layers survive does not change what is validated).
        plan = PrunePlan(kept_layers=list(range(shape.num_hidden_layers)), hidden=None, shape=shape)
        config = pruned_config(self.config, plan, family_of(self.config))
        try:
            from huggingface_hub.errors import StrictDataclassClassValidationError as Refused
        except ImportError:  # older hubs: configs without validation
            return True
        try:
            config.validate()
        except (Refused, ValueError):
            return False
        return True

    def __call__(self, shape: Shape) -> int:
        size = {"hidden": shape.hidden_size, "ffn": shape.intermediate_size,
                "q": shape.num_attention_heads * shape.head_dim, "kv": shape.num_key_value_heads * shape.head_dim}  # fmt: skip

        def numel(dims, axes):
            return math.prod(d if a is None else size[a] for d, a in zip(dims, axes))

        root = sum(numel(d, MODEL_PARAMETER_AXES[n]) for n, d in self.root.items())
        layer = sum(numel(d, LAYER_PARAMETER_AXES[n]) for n, d in self.layer.items())
        return root + shape.num_hidden_layers * layer


def parameter_limit(settings: SearchConfig, source: int) -> float:
    """The largest parameter count the budget allows (both budgets, when both are given); a latency budget alone
    bounds only by the source's own count `source`."""
    limits = []
    if settings.params is not None:
        limits.append(settings.params)
    if settings.memory is not None:
        limits.append(settings.memory / BYTES_PER_PARAMETER[settings.precision])
    return min(limits) if limits else source - 1


def axis_grids(source: Shape, settings: SearchConfig) -> dict[str, list[int]]:
    """The values each axis may take: divisor multiples from the most pruning allowed up to the source's size
    (the source's size itself always included), or the one fixed value. KV groups and query heads per group are
    separate axes, so any pair keeps GQA valid. Raises SearchError for contradictory fixed dimensions."""
    fixed, most = settings.fixed, settings.max_pruning
    per_group = source.num_attention_heads // source.num_key_value_heads
    sources = {"hidden_size": source.hidden_size, "ffn_hidden_size": source.intermediate_size,
               "num_key_value_heads": source.num_key_value_heads, "num_attention_heads": source.num_attention_heads,
               "num_layers": source.num_hidden_layers}  # fmt: skip
    for axis, value in fixed.model_dump(exclude_none=True).items():
        if value > sources[axis]:
            raise SearchError(f"fixed {axis}={value} is larger than the source's {sources[axis]}")
        floor = math.ceil(sources[axis] * (1 - getattr(most, axis)))
        if value < floor:
            raise SearchError(
                f"fixed {axis}={value} prunes more than max_pruning.{axis}={getattr(most, axis)} allows "
                f"(at least {floor} of {sources[axis]})"
            )
    if fixed.num_attention_heads is not None and fixed.num_key_value_heads is not None:
        heads, kv = fixed.num_attention_heads, fixed.num_key_value_heads
        if heads % kv:
            raise SearchError(f"fixed num_attention_heads={heads} is not a multiple of fixed num_key_value_heads={kv}")
        if heads // kv > per_group:
            raise SearchError(
                f"fixed num_attention_heads={heads} with num_key_value_heads={kv} needs {heads // kv} query heads "
                f"per KV group; the source has {per_group}"
            )
    if fixed.num_attention_heads is not None and fixed.num_key_value_heads is None:
        if not any(fixed.num_attention_heads % kv == 0 and fixed.num_attention_heads // kv <= per_group
                   for kv in range(1, source.num_key_value_heads + 1)):  # fmt: skip
            raise SearchError(f"fixed num_attention_heads={fixed.num_attention_heads} is no whole number of KV groups "
                              f"of at most {per_group} query heads")  # fmt: skip

    def grid(axis: str, divisor: int) -> list[int]:
        if getattr(fixed, axis) is not None:
            return [getattr(fixed, axis)]
        full = sources[axis]
        floor = max(1, math.ceil(full * (1 - getattr(most, axis))))
        return sorted({v for v in range(divisor, full + 1, divisor) if v >= floor} | {full})

    return {
        "hidden_size": grid("hidden_size", settings.hidden_divisor),
        "ffn_hidden_size": grid("ffn_hidden_size", settings.ffn_divisor),
        "num_key_value_heads": grid("num_key_value_heads", 1),
        "heads_per_group": list(range(1, per_group + 1)),
        "num_layers": grid("num_layers", settings.layer_divisor),
    }


def grid_shapes(source: Shape, settings: SearchConfig):
    """Every shape of the grid whose query-head count respects the fixed value and max_pruning."""
    grids = axis_grids(source, settings)
    heads_floor = math.ceil(source.num_attention_heads * (1 - settings.max_pruning.num_attention_heads))
    for hidden, ffn, kv, per_group, layers in itertools.product(*grids.values()):
        heads = kv * per_group
        if heads < heads_floor or settings.fixed.num_attention_heads not in (None, heads):
            continue
        yield Shape(
            hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=kv,
            head_dim=source.head_dim, num_hidden_layers=layers, vocab_size=source.vocab_size,
            tie_word_embeddings=source.tie_word_embeddings,
        )  # fmt: skip


def enumerate_candidates(counter: ParameterCounter, settings: SearchConfig) -> list[Candidate]:
    """The grid shapes whose parameter count is in `[(1 - tolerance) x limit, limit]`, closest to the budget
    first (at most `max_candidates`, as Model Optimizer keeps the top candidates by parameter count).

    Raises SearchError when the budget is not below the source, or no grid shape meets it."""
    source = counter(counter.source)
    limit = parameter_limit(settings, source)
    budget = _describe_budget(settings)
    if limit >= source:
        raise SearchError(f"{budget} allows {limit:,.0f} parameters, not fewer than the source's {source:,}: "
                          "nothing to prune")  # fmt: skip
    counted = [Candidate(shape, counter(shape)) for shape in grid_shapes(counter.source, settings)
               if counter.loadable(shape)]  # fmt: skip
    under = [c for c in counted if c.parameters <= limit]
    if not under:
        smallest = min(c.parameters for c in counted)
        raise SearchError(
            f"{budget} allows {limit:,.0f} parameters, below the smallest candidate shape ({smallest:,}, with "
            "max_pruning and fixed dimensions as given)"
        )
    if settings.latency is not None:
        return _within_latency(under, counter, settings)
    band = [c for c in under if c.parameters >= (1 - settings.tolerance) * limit]
    if not band:
        best = max(under, key=lambda c: c.parameters)
        raise SearchError(
            f"no candidate shape within tolerance={settings.tolerance} under the {budget}; the largest under it has "
            f"{best.parameters:,} parameters ({best.parameters / limit:.1%} of the budget): raise tolerance"
        )
    band.sort(key=lambda c: (-c.parameters, c.name))
    return band[: settings.max_candidates]


def _within_latency(under: list[Candidate], counter: ParameterCounter, settings: SearchConfig) -> list[Candidate]:
    """The largest shapes under the parameter budget whose measured throughput meets the latency budget: shapes
    are measured from the largest down (throughput grows as shapes shrink, but not monotonically across width
    and depth, so each is measured) until `max_candidates` meet it, or every shape was measured."""
    under = sorted(under, key=lambda c: (-c.parameters, c.name))
    met = []
    for candidate in under:
        speed = measure_throughput(counter.config, counter.model_dir, candidate.shape, settings, counter.data_dir)
        if speed >= settings.latency:
            met.append(candidate)
            if len(met) == settings.max_candidates:
                break
    if not met:
        raise SearchError(f"no candidate shape meets the {_describe_budget(settings)}: the fastest of the "
                          f"{len(under)} measured shapes is below it")  # fmt: skip
    return met


def check_engine(settings: SearchConfig) -> None:
    """A latency budget needs its engine backend on this machine: one line before any work when it is not."""
    if settings.latency is None:
        return
    from secateurs import engine

    backend = engine.get_backend(settings.engine_backend)
    if settings.engine_precision not in backend.precisions:
        raise SearchError(f"engine_precision={settings.engine_precision!r} is not one of {settings.engine_backend}'s: "
                          f"{', '.join(backend.precisions)}")  # fmt: skip
    engine.parse_lengths(settings.engine_lengths)
    try:
        backend.check_runtime(settings.engine_precision, engine.detect_gpu_capability() if
                              settings.engine_backend == engine.TensorRTLLM.name else None)  # fmt: skip
    except engine.BackendUnavailable as e:
        raise SearchError(f"latency budget: the {settings.engine_backend} engine backend is not available here "
                          f"({e})") from None  # fmt: skip


def measure_throughput(
    config, model_dir: str | Path, shape: Shape, settings: SearchConfig, calib_dataset: str | Path | None = None
) -> float:
    """Median output tokens/s of an engine of `shape` (random weights: speed does not depend on their values) at
    the settings' lengths and batch, cached by shape, measurement settings and the hardware and runtime measured
    on, under the secateurs cache (which may be a volume that machines of several kinds share). An fp8 engine is
    calibrated on `calib_dataset` (its values do not change the speed, but TensorRT-LLM's fp8 build needs them)."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from secateurs import engine
    from secateurs.checkpoint import load_tokenizer, save_checkpoint
    from secateurs.families import family_of
    from secateurs.files import cache_dir
    from secateurs.manifest import json_digest
    from secateurs.prune import PrunePlan, pruned_config

    new = pruned_config(config, PrunePlan(kept_layers=list(range(shape.num_hidden_layers)), hidden=None,
                                          shape=shape), family_of(config))  # fmt: skip
    key = {"config": new.to_dict(), "backend": settings.engine_backend, "precision": settings.engine_precision,
           "lengths": settings.engine_lengths, "batch": settings.engine_batch,
           "hardware": engine.hardware_identity(settings.engine_backend)}  # fmt: skip
    cached = cache_dir() / "search-throughput" / f"{json_digest(key)}.json"
    if cached.is_file():
        return json.loads(cached.read_text())["output_tokens_per_s"]
    lengths = engine.parse_lengths(settings.engine_lengths)
    with tempfile.TemporaryDirectory(prefix="search-engine-") as tmp:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(new, dtype=torch.float32)
        save_checkpoint(model, load_tokenizer(model_dir), Path(tmp) / "model")
        engine.build_engine(Path(tmp) / "model", settings.engine_backend, settings.engine_precision,
                            Path(tmp) / "engine", lengths, calib_dataset=calib_dataset)  # fmt: skip
        bench = engine.bench_engine(Path(tmp) / "engine", lengths, batch=settings.engine_batch, repeats=2)
    speed = min(r["output_tokens_per_s"]["median"] for r in bench["results"])
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps({**key, "shape": shape.as_dict(), "output_tokens_per_s": speed}, indent=1))
    print(f"search: {Candidate(shape, 0).name} measured at {speed:.1f} output tokens/s")
    return speed


def _describe_budget(settings: SearchConfig) -> str:
    parts = []
    if settings.params is not None:
        parts.append(f"params={settings.params:g}")
    if settings.memory is not None:
        parts.append(f"memory={settings.memory:g} bytes at {settings.precision}")
    if settings.latency is not None:
        parts.append(f"latency={settings.latency:g} output tokens/s ({settings.engine_backend} "
                     f"{settings.engine_precision}, {settings.engine_lengths}, batch {settings.engine_batch})")  # fmt: skip
    return "budget " + " and ".join(parts)


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


# ------------------------------------------------------------------------------------------------ the steps


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
                          f"tolerance={settings.tolerance} under the {_describe_budget(settings)}: lower top_k or "
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
                row["name"], params={"shape": row["shape"], "budget": _describe_budget(settings)},
                metrics={k: row[k] for k in figures if k in row},
            )  # fmt: skip
    report = {
        "source_shape": source.as_dict(),
        "source_parameters": source_parameters,
        "parameter_limit": limit,
        "budget": _describe_budget(settings),
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
