"""One KFP lightweight component per recipe step; each body calls one library function.

The step registry (`secateurs.registry`) says what each step reads, writes and records; the signatures below are
its inputs and outputs written as KFP annotations, because KFP ships a lightweight component's body as source and
reads its interface from the function (`tests/test_pipeline.py` checks the two agree). The prologue every
tracked body shares lives once, in `secateurs.components.prologue.step`: it validates the step's settings (the
JSON of its config section) with the registry's settings model, opens the step's MLflow run, records every
output and copies the report into the artifacts' metadata.

Besides the steps, `recorded` publishes again an output that an earlier run recorded (how a rerun brings in a
fan-out step's items).

`component(kind, image)` turns a function into a component that runs in `image`; nothing is installed when a
step starts. Under kfp.local they run in the current environment instead. Imports live inside the bodies
because KFP ships only the function's source.
"""

# No `from __future__ import annotations`: KFP reads the artifact types from the live annotations.
import functools

from kfp import dsl
from typing import List

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def import_model(settings: str, tracking_uri: str, pipeline_run: str, model: Output[Model]):
    """1. Import the teacher as a stock Hugging Face checkpoint."""
    from secateurs.checkpoint import import_model as run_import
    from secateurs.components.prologue import step

    with step("import_model", locals()) as s:
        s.report = run_import(s.settings.source, model.path, dtype=s.settings.dtype)


def prepare_data(
    model: Input[Model], settings: str, tracking_uri: str, pipeline_run: str, dataset: Output[Dataset]
):
    """2. Tokenize, pack and split the distillation corpus with the teacher's tokenizer. With a data store (set by
    the pipeline in the task's environment) the shards go there and `dataset` holds only their index."""
    import os

    from secateurs.components.prologue import step
    from secateurs.data import prepare_data as run_prepare
    from secateurs.files import DATA_STORE_ENV

    with step("prepare_data", locals()) as s:
        s.report = run_prepare(model.path, dataset.path, s.settings, store=os.environ.get(DATA_STORE_ENV))


def correct_teacher(
    model: Input[Model],
    dataset: Input[Dataset],
    settings: str,
    processes: int,
    trainjob: str,
    tracking_uri: str,
    pipeline_run: str,
    corrected: Output[Model],
):
    """3. Teacher correction: a short LM fine-tune of the teacher on the distillation data (under torchrun when
    `processes` > 1, as a Kubeflow Trainer TrainJob over several nodes when `trainjob` describes one)."""
    from secateurs import training_launch
    from secateurs.components.prologue import step

    with step("correct_teacher", locals()) as s:
        inputs = {"model": model.path, "data": dataset.path}
        training_launch.train("correct-teacher", inputs, corrected.path, s.settings, processes, s.callbacks, trainjob)


def importance(
    model: Input[Model],
    dataset: Input[Dataset],
    settings: str,
    student: str,
    tracking_uri: str,
    pipeline_run: str,
    scores: Output[Artifact],
):
    """4. Importance of every head, KV group, neuron, channel and layer of `model` (for its children)."""
    from secateurs import importance as lib
    from secateurs.components.prologue import step

    with step("importance", locals()) as s:
        lib.run(model.path, dataset.path, scores.path, s.settings)


def prune(
    model: Input[Model],
    scores: Input[Artifact],
    settings: str,
    student: str,
    tracking_uri: str,
    pipeline_run: str,
    pruned: Output[Model],
):
    """5. Structured pruning of `model` to the student's shape, keeping its most important units."""
    from secateurs import prune as lib
    from secateurs.components.prologue import step

    with step("prune", locals()) as s:
        report = lib.run(model.path, scores.path, pruned.path, s.settings.target())
        s.report = {"parameters": report["parameters_after"]}


def search(
    model: Input[Model],
    scores: Input[Artifact],
    dataset: Input[Dataset],
    settings: str,
    student: str,
    tracking_uri: str,
    pipeline_run: str,
    candidates: Output[Artifact],
):
    """5s. Architecture search: prune every candidate shape under the budget from `scores`, score each, keep the
    top_k pruned checkpoints."""
    from secateurs import search as lib
    from secateurs.components.prologue import step

    with step("search", locals()) as s:
        report = lib.score_candidates(model.path, scores.path, dataset.path, candidates.path, s.settings,
                                      record=s.run.item_run)  # fmt: skip
        s.report = {"candidates": len(report["candidates"]), "parameter_limit": report["parameter_limit"]}


def search_distill(
    teacher: Input[Model],
    candidates: Input[Artifact],
    dataset: Input[Dataset],
    settings: str,
    processes: int,
    trainjob: str,
    item: str,
    student: str,
    tracking_uri: str,
    pipeline_run: str,
    scored: Output[Artifact],
):
    """5s. Short distillation of one top candidate (`item`: its rank after pruning), run as the distill step runs
    (`processes`, `trainjob`), and its validation loss, computed by that run on what it wrote."""
    from secateurs import search as lib
    from secateurs.components.prologue import step

    with step("search_distill", locals()) as s:
        score = lib.distill_candidate(teacher.path, candidates.path, int(item), dataset.path, scored.path, s.settings,
                                      callbacks=s.callbacks, processes=processes, trainjob=trainjob)  # fmt: skip
        s.report = {k: score[k] for k in ("name", "parameters", "pruned_loss", "distilled_loss")}
        # The candidate's own run (made by the search step) gets its loss after the short distillation too.
        s.run.log_item(score.get("mlflow_run_id"), metrics={k: score[k] for k in ("distilled_loss", "distill_steps",
                       "distill_tokens")}, tags={"secateurs.search_distill_run": s.run.run_id or ""})  # fmt: skip


def search_pick(
    candidates: Input[Artifact],
    scored: Input[List[Artifact]],
    student: str,
    tracking_uri: str,
    pipeline_run: str,
    winner: Output[Model],
):
    """5s. The candidate with the lowest validation loss after its short distillation: its pruned checkpoint."""
    from secateurs import search as lib
    from secateurs.components.prologue import step

    with step("search_pick", locals()) as s:
        result = lib.pick_winner(candidates.path, [a.path for a in scored], winner.path)
        s.report = {"winner": result["winner"], "parameters": result["winner_parameters"]}
        for row in result["candidates"]:  # the ranking after the short distillations, on each candidate's run
            if "distilled_rank" in row:
                s.run.log_item(row.get("mlflow_run_id"), metrics={"distilled_rank": row["distilled_rank"]},
                               tags={"secateurs.search_winner": str(row["name"] == result["winner"]).lower()})  # fmt: skip
    print(lib.format_table(result))


def distill(
    teacher: Input[Model],
    model: Input[Model],
    dataset: Input[Dataset],
    settings: str,
    processes: int,
    trainjob: str,
    student: str,
    tracking_uri: str,
    pipeline_run: str,
    distilled: Output[Model],
):
    """6. Knowledge distillation of the pruned student from the (corrected) teacher (under torchrun when
    `processes` > 1, as a Kubeflow Trainer TrainJob over several nodes when `trainjob` describes one)."""
    from secateurs import training_launch
    from secateurs.components.prologue import step

    with step("distill", locals()) as s:
        inputs = {"teacher": teacher.path, "student": model.path, "data": dataset.path}
        report = training_launch.train("distill", inputs, distilled.path, s.settings, processes, s.callbacks, trainjob)
        s.report = {k: report[k] for k in ("steps", "final_loss", "tokens_seen", "processes")}


def evaluate(
    model: Input[Model],
    dataset: Input[Dataset],
    settings: str,
    name: str,
    role: str,
    parent: str,
    student: str,
    tracking_uri: str,
    pipeline_run: str,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
):
    """7. Validation loss and task scores of one model; `metrics` holds its row of the report."""
    import json

    from secateurs import evaluate as lib
    from secateurs.components.prologue import report_entry, step

    with step("evaluate", locals()) as s:
        entry = report_entry(name, role, parent, lib.run(model.path, dataset.path, evaluation.path, s.settings))
        with open(metrics.path, "w") as f:  # a file, so kfp.local's cache can reuse this step
            json.dump(entry, f)
    for key in ("val_loss", "perplexity"):
        metrics.log_metric(key, entry[key])


def engine(
    model: Input[Model],
    dataset: Input[Dataset],
    settings: str,
    student: str,
    tracking_uri: str,
    pipeline_run: str,
    built: Output[Artifact],
    bench: Output[Metrics],
):
    """8. Build an inference engine of `model` and measure its throughput."""
    import json
    import os

    from secateurs import engine as lib
    from secateurs.components.prologue import step
    from secateurs.engine_rehearsal import REHEARSAL_ENV, rehearse_tensorrt_llm

    with step("engine", locals()) as s:
        if s.settings.backend == "tensorrt-llm" and os.environ.get(REHEARSAL_ENV):
            results = rehearse_tensorrt_llm(model.path, dataset.path, built.path, s.settings)  # up to the GPU call
        else:
            results = lib.run(model.path, dataset.path, built.path, s.settings)
        with open(bench.path, "w") as f:
            json.dump(results, f)


def collect(
    metrics: Input[Metrics],
    table: Output[Artifact],
    previous: Input[Artifact] = None,
    bench: Input[Metrics] = None,
    search: Input[Model] = None,
):
    """9a. Add one model's row (and its throughput, or the search that chose its shape) to the report table.

    KFP components take a fixed set of inputs, so the rows are gathered by a chain of these small steps.
    """
    import json
    from pathlib import Path

    from secateurs.report import search_rows, throughput_from_bench

    rows = json.loads(Path(previous.path).read_text()) if previous is not None else []
    entry = json.loads(Path(metrics.path).read_text())
    if bench is not None:
        entry["throughput"] = throughput_from_bench(json.loads(Path(bench.path).read_text()))
    if search is not None:
        entry["search"] = search_rows(json.loads(Path(search.path, "candidates.json").read_text()))
    with open(table.path, "w") as f:
        json.dump(rows + [entry], f, indent=1)


def report(table: Input[Artifact], tracking_uri: str, pipeline_run: str, comparison: Output[Artifact]):
    """9. The family report: tables and plots comparing the teacher, the pruned and the distilled students."""
    import json
    import os
    from pathlib import Path

    from secateurs.components.prologue import step
    from secateurs.report import format_table, write_report

    entries = json.loads(Path(table.path).read_text())
    with step("report", locals()) as s:
        paths = write_report(entries, comparison.path)
        with open(os.path.join(comparison.path, "entries.json"), "w") as f:
            json.dump(entries, f, indent=1)
        s.run.log_files([str(p) for p in paths.values()], artifact_path="report")
    print(format_table(entries))


def recorded(uri: str, artifact: Output[Artifact]):
    """An output that an earlier run recorded at `uri`, published again as this task's: how a rerun brings in the
    items of a fan-out step's output, inside a ParallelFor (`secateurs.pipelines.recipe.build_pipeline` says why
    not with `dsl.importer`). Not a step: nothing is tracked, so a later rerun still imports the recorded item."""
    import shutil

    from secateurs.storage import localize

    shutil.copytree(localize(uri), artifact.path, dirs_exist_ok=True)


FUNCTIONS = {f.__name__: f for f in (import_model, prepare_data, correct_teacher, importance, prune, search,
                                     search_distill, search_pick, distill, evaluate, engine, collect, report)}  # fmt: skip


@functools.cache
def component(kind: str, image: str):
    """The component of step `kind`, running in `image`.

    Nothing is installed when a step starts: the image (or, under kfp.local, the current environment) already
    holds secateurs and its dependencies.
    """
    return dsl.component(FUNCTIONS[kind], base_image=image, packages_to_install=[], install_kfp_package=False)


@functools.cache
def recorded_component(image: str):
    """The `recorded` component, running in `image`."""
    return dsl.component(recorded, base_image=image, packages_to_install=[], install_kfp_package=False)
