"""One KFP lightweight component per recipe step; each body checks its config and calls one library function.

Every component:
- takes its config section as a JSON string (`model_dump_json()` of the pipeline config's section) and validates
  it with the same pydantic model, so a pipeline compiled from a valid config cannot drift from the library;
- takes the MLflow tracking URI and the pipeline run id as plain strings and records its step there
  (`components.runtime.tracked_step`), with the artifact's URI (an S3 URI on a cluster);
- writes a file or directory to every output path, so kfp.local's cache can reuse it.

The functions below are plain Python; `for_image(image)` turns them into components that run in `image` (the
same image for every step; nothing is installed at run time). Under kfp.local they run in the current
environment instead. Imports live inside the bodies because KFP ships only the function's source.
"""

# No `from __future__ import annotations`: KFP reads the artifact types from the live annotations.
import functools
import os

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from secateurs.placement import DEFAULT_IMAGE


def import_model(source: str, dtype: str, tracking_uri: str, pipeline_run: str, model: Output[Model]):
    """1. Import the teacher as a stock Hugging Face checkpoint."""
    from secateurs.checkpoint import import_model as run_import
    from secateurs.components.runtime import tracked_step

    with tracked_step("import-model", tracking_uri, pipeline_run, outputs={"model": model}) as run:
        report = run_import(source, model.path, dtype=dtype)
        run.record(model.path, uri=model.uri)
    model.metadata.update({k: v for k, v in report.items() if isinstance(v, (int, float, str))})


def prepare_data(
    model: Input[Model], settings: str, tracking_uri: str, pipeline_run: str, dataset: Output[Dataset]
):
    """2. Tokenize, pack and split the distillation corpus with the teacher's tokenizer."""
    from secateurs.components.runtime import tracked_step
    from secateurs.config import DataConfig
    from secateurs.data import prepare_data as run_prepare

    c = DataConfig.model_validate_json(settings)
    with tracked_step("prepare-data", tracking_uri, pipeline_run, outputs={"dataset": dataset}) as run:
        report = run_prepare(
            c.source,
            model.path,
            c.seq_len,
            dataset.path,
            max_tokens=c.max_tokens,
            val_fraction=c.val_fraction,
            text_field=c.text_field,
            hub_config=c.hub_config,
            seed=c.seed,
        )
        run.record(dataset.path, uri=dataset.uri)
    dataset.metadata.update({k: v for k, v in report.items() if isinstance(v, (int, float, str))})


def correct_teacher(
    model: Input[Model],
    dataset: Input[Dataset],
    settings: str,
    tracking_uri: str,
    pipeline_run: str,
    corrected: Output[Model],
):
    """3. Teacher correction: a short LM fine-tune of the teacher on the distillation data."""
    from secateurs import train
    from secateurs.components.runtime import LossForwarder, tracked_step
    from secateurs.config import TeacherCorrectionConfig

    c = TeacherCorrectionConfig.model_validate_json(settings)
    with tracked_step("correct-teacher", tracking_uri, pipeline_run, outputs={"corrected": corrected}) as run:
        train.correct_teacher(model.path, dataset.path, corrected.path, c, callbacks=[LossForwarder(run)])
        run.record(corrected.path, uri=corrected.uri)


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
    from secateurs.components.runtime import tracked_step
    from secateurs.config import ImportanceConfig

    c = ImportanceConfig.model_validate_json(settings)
    with tracked_step("importance", tracking_uri, pipeline_run, student, outputs={"scores": scores}) as run:
        lib.run(
            model.path,
            dataset.path,
            scores.path,
            samples=c.samples,
            batch_size=c.batch_size,
            block_sizes=c.block_sizes,
            depth_samples=c.depth_samples,
        )
        run.record(scores.path, uri=scores.uri)


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
    from secateurs.components.runtime import tracked_step
    from secateurs.config import PruneConfig

    target = PruneConfig.model_validate_json(settings).target()
    with tracked_step("prune", tracking_uri, pipeline_run, student, outputs={"pruned": pruned}) as run:
        report = lib.run(model.path, scores.path, pruned.path, target)
        run.record(pruned.path, uri=pruned.uri)
    pruned.metadata["parameters"] = report.get("parameters", 0)


def distill(
    teacher: Input[Model],
    model: Input[Model],
    dataset: Input[Dataset],
    settings: str,
    student: str,
    tracking_uri: str,
    pipeline_run: str,
    distilled: Output[Model],
):
    """6. Knowledge distillation of the pruned student from the (corrected) teacher."""
    from secateurs import train
    from secateurs.components.runtime import LossForwarder, tracked_step
    from secateurs.config import DistillConfig

    c = DistillConfig.model_validate_json(settings)
    with tracked_step(
        "distill", tracking_uri, pipeline_run, student, outputs={"distilled": distilled}
    ) as run:
        report = train.distill(
            teacher.path, model.path, dataset.path, distilled.path, c, callbacks=[LossForwarder(run)]
        )
        run.record(distilled.path, uri=distilled.uri)
    distilled.metadata.update({k: report[k] for k in ("steps", "final_loss", "tokens_seen")})


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
    from secateurs.components.runtime import report_entry, tracked_step
    from secateurs.config import EvaluateConfig

    c = EvaluateConfig.model_validate_json(settings)
    with tracked_step(
        "evaluate",
        tracking_uri,
        pipeline_run,
        student,
        task=f"evaluate:{name}",
        outputs={"evaluation": evaluation, "metrics": metrics},
    ) as run:
        scores = lib.run(
            model.path,
            dataset.path,
            evaluation.path,
            tasks=tuple(c.tasks),
            batch_size=c.batch_size,
            max_sequences=c.max_sequences,
            limit=c.limit,
        )
        run.record(evaluation.path, uri=evaluation.uri)
        entry = report_entry(name, role, parent, scores)
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

    from secateurs import engine as lib
    from secateurs.components.runtime import tracked_step
    from secateurs.config import EngineConfig

    c = EngineConfig.model_validate_json(settings)
    with tracked_step(
        "engine",
        tracking_uri,
        pipeline_run,
        student,
        task=f"engine:{student or 'teacher'}",
        outputs={"built": built, "bench": bench},
    ) as run:
        lengths = lib.parse_lengths(c.lengths)
        lib.build_engine(
            model.path, c.backend, c.precision, built.path, lengths=lengths, calib_dataset=dataset.path
        )
        results = lib.bench_engine(built.path, lengths, batch=c.batch, repeats=c.repeats)
        run.record(built.path, uri=built.uri)
        with open(bench.path, "w") as f:
            json.dump(results, f)


def collect(
    metrics: Input[Metrics],
    table: Output[Artifact],
    previous: Input[Artifact] = None,
    bench: Input[Metrics] = None,
):
    """9a. Add one model's row (and its throughput) to the report table built so far.

    KFP components take a fixed set of inputs, so the rows are gathered by a chain of these small steps.
    """
    import json
    from pathlib import Path

    from secateurs.report import throughput_from_bench

    rows = json.loads(Path(previous.path).read_text()) if previous is not None else []
    entry = json.loads(Path(metrics.path).read_text())
    if bench is not None:
        entry["throughput"] = throughput_from_bench(json.loads(Path(bench.path).read_text()))
    with open(table.path, "w") as f:
        json.dump(rows + [entry], f, indent=1)


def report(table: Input[Artifact], tracking_uri: str, pipeline_run: str, comparison: Output[Artifact]):
    """9. The family report: tables and plots comparing the teacher, the pruned and the distilled students."""
    import json
    import os
    from pathlib import Path

    from secateurs.components.runtime import tracked_step
    from secateurs.report import format_table, write_report

    entries = json.loads(Path(table.path).read_text())
    with tracked_step("report", tracking_uri, pipeline_run, outputs={"comparison": comparison}) as run:
        paths = write_report(entries, comparison.path)
        with open(os.path.join(comparison.path, "entries.json"), "w") as f:
            json.dump(entries, f, indent=1)
        run.log_files([str(p) for p in paths.values()], artifact_path="report")
    print(format_table(entries))


STEPS = (
    import_model,
    prepare_data,
    correct_teacher,
    importance,
    prune,
    distill,
    evaluate,
    engine,
    collect,
    report,
)


@functools.cache
def for_image(image: str | None = None):
    """The components, each running in `image` (default: $SECATEURS_IMAGE, else the release image).

    Returns a namespace with one attribute per step. Nothing is installed when a step starts: the image (or,
    under kfp.local, the current environment) already holds secateurs and its dependencies.
    """
    import types

    image = image or os.environ.get("SECATEURS_IMAGE") or DEFAULT_IMAGE
    made = {
        f.__name__: dsl.component(f, base_image=image, packages_to_install=[], install_kfp_package=False)
        for f in STEPS
    }
    return types.SimpleNamespace(**made)
