"""The `secateurs` command line: one subcommand per recipe step, usable by hand and by the pipeline components.

Every subcommand validates its inputs before heavy work and exits non-zero with a one-line reason on failure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from secateurs.errors import fail, one_line_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Prune and distil Hugging Face LLMs (the Minitron recipe).")


def _model_options(model_cls, exclude: tuple[str, ...] = (), include: tuple[str, ...] | None = None):
    """Expose the fields of a pydantic settings model as `--field-name` options (a required field as a positional
    argument) and pass the validated model as `settings`: the model is the one definition of a step's options,
    for the YAML config, the components and the command line.

    typer builds options from a function signature, so the signature is generated from the model's fields;
    list-valued fields are given comma-separated (`--block-sizes 15,18`) or as JSON (`--layer-pairs
    '[[3, 7], [5, 11]]'`).
    """
    import inspect
    import typing

    from pydantic import ValidationError

    from secateurs.config import format_error

    fields = {n: f for n, f in model_cls.model_fields.items()
              if n not in exclude and (include is None or n in include)}  # fmt: skip

    def option_type(annotation):
        if typing.get_origin(annotation) is typing.Literal:
            return str
        if annotation in (int, float, str, bool):
            return annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return Optional[args[0]] if len(args) == 1 and args[0] in (int, float, str) else Optional[str]

    listed = {n for n, f in fields.items() if "list[" in str(f.annotation)}

    def decorate(fn):
        sig = inspect.signature(fn)
        # The command's own annotations are strings (postponed evaluation): resolved here, or typer cannot build
        # the converter of an `Optional[Path]` option.
        hints = typing.get_type_hints(fn)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
               if p.name != "settings"]  # fmt: skip
        arguments, options = [], []
        for name, f in fields.items():
            if f.is_required():
                default, kind, into = typer.Argument(..., help=f.description), inspect.Parameter.POSITIONAL_OR_KEYWORD, arguments
            else:
                # A list default is shown in the form the option is read in (`lambada-docs`, not the Python repr
                # that typer would hand back as the value); an option left out takes the model's own default.
                default = typer.Option(_shown(f.default), "--" + name.replace("_", "-"), help=f.description)
                kind, into = inspect.Parameter.KEYWORD_ONLY, options
            into.append(inspect.Parameter(name, kind, annotation=option_type(f.annotation), default=default))
        from_file = inspect.Parameter(
            "settings_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
            default=typer.Option(None, "--settings", help="JSON or YAML file of these settings (the config "
                                 "section); options given as well override it."),
        )  # fmt: skip
        # typer hands the command's context to a parameter annotated typer.Context.
        context = inspect.Parameter(CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        params = arguments + own + options + [from_file, context]

        def wrapper(*args, **kwargs):
            # Only the options given on the command line: the rest take the model's defaults, or the file's values
            # (an option given equal to its default still overrides the file). The context records each one's source.
            context = kwargs.pop(CONTEXT)
            values = {n: kwargs.pop(n) for n in fields}
            values = {n: v for n, v in values.items()
                      if getattr(context.get_parameter_source(n), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}  # fmt: skip
            for n in listed & {n for n, v in values.items() if isinstance(v, str)}:
                v = values[n]
                values[n] = json.loads(v) if v.lstrip().startswith("[") else [x for x in v.split(",") if x]
            settings_file = kwargs.pop("settings_file")
            if settings_file is not None:
                import yaml

                values = {**{n: v for n, v in (yaml.safe_load(settings_file.read_text()) or {}).items()
                             if n in fields}, **values}  # fmt: skip
            try:
                settings = model_cls(**values)
            except ValidationError as e:
                fail(ValueError("; ".join(format_error(err) for err in e.errors())))
            return fn(*args, settings=settings, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
        return wrapper

    return decorate


CONTEXT = "_command_context"


def _shown(default):
    """A field's default as its option reads it: a list of plain values comma-separated, other lists as JSON."""
    if isinstance(default, (list, tuple)):
        plain = all(isinstance(x, (str, int, float)) and "," not in str(x) for x in default)
        return ",".join(str(x) for x in default) if plain and default else json.dumps(default)
    return default


def _main_process() -> bool:
    """False in the processes of a torchrun run other than the first (RANK > 0): they print nothing."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _print_report(report: dict) -> None:
    if _main_process():
        typer.echo(json.dumps(report, indent=2, default=str))


def _summarise_training(report: dict) -> None:
    curve = ", ".join(f"{h['step']}:{h['loss']:.3f}" for h in report.get("log_history", []))
    report = {k: v for k, v in report.items() if k != "log_history"}
    if _main_process():
        typer.echo(f"loss curve (step:loss): {curve}")
    _print_report(report)


# The settings models are pydantic only (importing them loads no torch); the step modules load inside commands.
from secateurs.config import (  # noqa: E402
    DataConfig,
    DistillConfig,
    EngineConfig,
    EvaluateConfig,
    ImportanceConfig,
    PruneConfig,
    SearchConfig,
    TeacherConfig,
    TeacherCorrectionConfig,
)


@app.command("import-model")
@one_line_errors
@_model_options(TeacherConfig)
def import_model_cmd(
    out: Path = typer.Option(..., "--out", help="Output checkpoint directory."),
    settings: TeacherConfig = None,
):
    """Import a model as a stock Hugging Face checkpoint."""
    from secateurs.checkpoint import import_model

    _print_report(import_model(settings.source, out, dtype=settings.dtype))


@app.command("prepare-data")
@one_line_errors
@_model_options(DataConfig)
def prepare_data_cmd(
    tokenizer: Path = typer.Option(..., "--tokenizer", help="Directory holding the model's tokenizer."),
    # A string: an s3:// prefix read as a Path loses a slash (s3:/bucket/...).
    out: str = typer.Option(..., "--out", help="Output directory, or an s3://bucket/prefix."),
    store: Optional[str] = typer.Option(
        None, "--store", envvar="SECATEURS_DATA_STORE",  # secateurs.files.DATA_STORE_ENV
        help="Publish the shards under <store>/<digest>/ (a shared directory or an s3:// prefix, reused when "
        "already there) and write to --out only their index and manifest.",
    ),
    settings: DataConfig = None,
):
    """Tokenize, pack and split a text corpus."""
    from secateurs.data import prepare_data

    _print_report(prepare_data(tokenizer, out, settings, store=store or None))


@app.command("importance")
@one_line_errors
@_model_options(ImportanceConfig)
def importance_cmd(
    model: Path = typer.Option(..., "--model"),
    data: Path = typer.Option(..., "--data"),
    out: Path = typer.Option(..., "--out"),
    settings: ImportanceConfig = None,
):
    """Estimate the importance of neurons, heads, KV groups, channels and layers."""
    from secateurs import importance

    _print_report(importance.run(model, data, out, settings))


@app.command("prune")
@one_line_errors
@_model_options(PruneConfig)
def prune_cmd(
    model: Path = typer.Option(..., "--model"),
    importance: Path = typer.Option(..., "--importance"),
    out: Path = typer.Option(..., "--out"),
    settings: PruneConfig = None,
):
    """Prune a model to a target shape."""
    from secateurs import prune

    targets = [name for name in PruneConfig.model_fields if name != "depth_criterion"]  # every field names a target
    if all(getattr(settings, name) is None for name in targets):
        # The library keeps every unit for an empty target (a lossless copy: the identity the tests check); typed
        # by hand, that is a forgotten option, not a wish.
        raise ValueError("no pruning target: give at least one of " + ", ".join(
            "--" + name.replace("_", "-") for name in targets))  # fmt: skip
    report = prune.run(model, importance, out, settings.target())
    typer.echo(
        f"parameters: {report['parameters_before']:,} -> {report['parameters_after']:,} "
        f"({report['parameter_ratio']:.1%}); layers kept: {len(report['kept_layers'])}"
    )
    _print_report(report)


@app.command("correct-teacher")
@one_line_errors
@_model_options(TeacherCorrectionConfig, exclude=("enabled",))
def correct_teacher_cmd(
    model: Path = typer.Option(..., "--model"),
    data: Path = typer.Option(..., "--data"),
    out: Path = typer.Option(..., "--out"),
    settings: TeacherCorrectionConfig = None,
):
    """Teacher correction: a short LM fine-tune of the teacher on the distillation data."""
    from secateurs import train

    _summarise_training(train.correct_teacher(model, data, out, settings))


@app.command("distill")
@one_line_errors
@_model_options(DistillConfig)
def distill_cmd(
    teacher: Path = typer.Option(..., "--teacher"),
    student: Path = typer.Option(..., "--student"),
    data: Path = typer.Option(..., "--data"),
    out: Path = typer.Option(..., "--out"),
    settings: DistillConfig = None,
):
    """Retrain a pruned student by knowledge distillation from the teacher."""
    from secateurs import train

    _summarise_training(train.distill(teacher, student, data, out, settings))


@app.command("evaluate")
@one_line_errors
@_model_options(EvaluateConfig)
def evaluate_cmd(
    model: Path = typer.Option(..., "--model"),
    data: Path = typer.Option(..., "--data"),
    out: Path = typer.Option(..., "--out", help="Metrics directory (metrics.json + secateurs.json)."),
    settings: EvaluateConfig = None,
):
    """Validation loss, perplexity and downstream tasks."""
    from secateurs import evaluate

    _print_report(evaluate.run(model, data, out, settings))


@app.command("build-engine")
@one_line_errors
@_model_options(EngineConfig, include=("backend", "precision", "lengths"))
def build_engine_cmd(
    model: Path = typer.Option(..., "--model"),
    out: Path = typer.Option(..., "--out"),
    calib_dataset: Optional[Path] = typer.Option(None, "--calib-dataset", help="Prepared dataset for FP8 calibration."),
    settings: EngineConfig = None,
):
    """Build an inference engine from a checkpoint."""
    from secateurs import engine

    lengths = engine.parse_lengths(settings.lengths)
    _print_report(engine.build_engine(model, settings.backend, settings.precision, out, lengths, calib_dataset))


@app.command("bench")
@one_line_errors
@_model_options(EngineConfig, include=("lengths", "batch", "repeats"))
def bench_cmd(
    engine_dir: Path = typer.Option(..., "--engine"),
    out: Optional[Path] = typer.Option(None, "--out", help="Results JSON (default ENGINE/bench.json)."),
    settings: EngineConfig = None,
):
    """Requests/s and output tokens/s of an engine per input:output length pair."""
    from secateurs import engine

    _print_report(engine.bench_engine(engine_dir, settings.lengths, settings.batch, settings.repeats, out=out))


def _axis_values(spec: str | None, option: str) -> dict:
    """'num_layers=24,hidden_size=512' -> {"num_layers": "24", "hidden_size": "512"} (pydantic converts the values)."""
    values = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        axis, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{option}: {part!r} is not AXIS=VALUE (e.g. num_layers=24)")
        values[axis.strip()] = value.strip()
    return values


@app.command("search")
@one_line_errors
@_model_options(SearchConfig, exclude=("max_pruning", "fixed"))
def search_cmd(
    model: Path = typer.Option(..., "--model", help="The model to prune (the teacher, or a parent student)."),
    importance: Path = typer.Option(..., "--importance", help="Its importance artifact."),
    data: Path = typer.Option(..., "--data"),
    out: Path = typer.Option(..., "--out", help="Search directory: candidates/, scored/<i>/, winner/."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="The KD teacher (default: --model)."),
    distill_file: Optional[Path] = typer.Option(None, "--distill", help="JSON or YAML file of the KD settings (the "
                                                "config's distill section; default: its defaults)."),
    fixed: Optional[str] = typer.Option(None, "--fixed", help="Dimensions held at one value, e.g. num_layers=24."),
    max_pruning: Optional[str] = typer.Option(None, "--max-pruning", help="Largest fraction of an axis pruned, "
                                              "e.g. num_layers=0.6,hidden_size=0.4 (default 0.5 each)."),
    settings: SearchConfig = None,
):
    """Search the student's shape under a parameter or memory budget: prune candidates, distil the best briefly,
    pick the lowest validation loss."""
    import yaml
    from pydantic import ValidationError

    from secateurs.config import format_error

    try:
        settings = SearchConfig.model_validate({
            **settings.model_dump(exclude={"fixed", "max_pruning"}),
            "fixed": _axis_values(fixed, "--fixed"), "max_pruning": _axis_values(max_pruning, "--max-pruning"),
        })  # fmt: skip
        kd = DistillConfig.model_validate(yaml.safe_load(distill_file.read_text()) or {} if distill_file else {})
    except ValidationError as e:
        raise ValueError("; ".join(format_error(err) for err in e.errors())) from None
    from secateurs import search

    result = search.run(model, importance, teacher or model, data, out, settings, kd)
    typer.echo(search.format_table(result))
    typer.echo(f"winner: {result['winner']} ({result['winner_parameters']:,} parameters); pruned checkpoint: "
               f"{out / 'winner'}")  # fmt: skip


@app.command("validate")
@one_line_errors
def validate_cmd(config: Path = typer.Argument(..., help="Pipeline config YAML.")):
    """Validate a pipeline config without running anything."""
    from secateurs.config import load_config

    cfg = load_config(config)
    typer.echo(f"{config}: ok ({len(cfg.students)} students: {', '.join(s.name for s in cfg.students)})")


# The pipeline commands: whole runs locally through kfp.local, compile, submit to KFP, rerun one step, lineage.
from secateurs import pipeline_cli  # noqa: E402

app.command("run")(pipeline_cli.run_cmd)
app.command("plan")(pipeline_cli.plan_cmd)
app.command("rehearse")(pipeline_cli.rehearse_cmd)
app.command("compile")(pipeline_cli.compile_cmd)
app.command("submit")(pipeline_cli.submit_cmd)
app.command("rerun")(pipeline_cli.rerun_cmd)
app.command("lineage")(pipeline_cli.lineage_cmd)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
