"""The `secateurs` command line: one subcommand per recipe step, usable by hand and by the pipeline components.

Every subcommand validates its inputs before heavy work and exits non-zero with a one-line reason on failure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Prune and distil Hugging Face LLMs (the Minitron recipe).")


def _fail(e: BaseException) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _guarded(fn):
    """Turn expected errors (bad input) into one line on stderr and exit code 1."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
            _fail(e)

    return wrapper


def _model_options(model_cls, exclude: tuple[str, ...] = ()):
    """Expose every field of a pydantic config model as a `--field-name` option and pass the validated model
    as `settings`; one definition serves the YAML config and the command line."""
    import inspect
    import typing

    from pydantic import ValidationError

    from secateurs.config import format_error

    fields = {n: f for n, f in model_cls.model_fields.items() if n not in exclude}

    def decorate(fn):
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.name != "settings"]
        for name, f in fields.items():
            annotation = f.annotation
            origin = typing.get_origin(annotation)
            if origin is typing.Literal:
                annotation = str
            elif origin in (list, typing.Union) or "list" in str(annotation) or "|" in str(annotation):
                args = [a for a in typing.get_args(annotation) if a is not type(None)]
                annotation = Optional[args[0]] if len(args) == 1 and args[0] in (int, float, str) else Optional[str]
            params.append(inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                default=typer.Option(f.default, "--" + name.replace("_", "-"), help=f.description),
            ))  # fmt: skip

        def wrapper(**kwargs):
            values = {n: kwargs.pop(n) for n in fields}
            for n, v in values.items():
                if isinstance(v, str) and fields[n].annotation not in (str,) and "Literal" not in str(fields[n].annotation):
                    values[n] = json.loads(v)  # list-valued options are given as JSON, e.g. '[[3, 7], [5, 11]]'
            try:
                settings = model_cls(**values)
            except ValidationError as e:
                _fail(ValueError("; ".join(format_error(err) for err in e.errors())))
            return fn(settings=settings, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
        return wrapper

    return decorate


def _print_report(report: dict) -> None:
    typer.echo(json.dumps(report, indent=2, default=str))


@app.command("import-model")
@_guarded
def import_model_cmd(
    source: str = typer.Argument(..., help="Checkpoint dir, hub id, .gguf file, s3:// prefix or built-in name (smollm2-135m)."),
    out: Path = typer.Option(..., "--out", help="Output checkpoint directory."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
):
    """Import a model as a stock Hugging Face checkpoint."""
    from secateurs.checkpoint import import_model

    _print_report(import_model(source, out, dtype=dtype))


@app.command("prepare-data")
@_guarded
def prepare_data_cmd(
    source: str = typer.Option(..., "--source", help="Hub dataset, .txt/.jsonl/.parquet file or dir, s3:// URI, or python-docs."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="Directory holding the model's tokenizer."),
    seq_len: int = typer.Option(..., "--seq-len", help="Tokens per packed sequence."),
    out: Path = typer.Option(..., "--out"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens"),
    val_fraction: float = typer.Option(0.05, "--val-fraction"),
    text_field: str = typer.Option("text", "--text-field"),
    hub_config: Optional[str] = typer.Option(None, "--hub-config"),
    seed: int = typer.Option(0, "--seed"),
):
    """Tokenize, pack and split a text corpus."""
    from secateurs.data import prepare_data

    _print_report(prepare_data(source, tokenizer, seq_len, out, max_tokens, val_fraction, text_field, hub_config, seed))


@app.command("importance")
@_guarded
def importance_cmd(
    model: Path = typer.Option(..., "--model"),
    data: Path = typer.Option(..., "--data"),
    out: Path = typer.Option(..., "--out"),
    samples: int = typer.Option(1024, "--samples", help="Calibration sequences (the paper used 1024)."),
    batch_size: int = typer.Option(8, "--batch-size"),
    block_sizes: Optional[str] = typer.Option(None, "--block-sizes", help="Comma-separated k for the contiguous-block LM-loss scan."),
    depth_samples: int = typer.Option(64, "--depth-samples", help="Validation sequences per depth-scan evaluation, spread evenly over the split."),
):
    """Estimate the importance of neurons, heads, KV groups, channels and layers."""
    from secateurs import importance

    ks = [int(k) for k in block_sizes.split(",")] if block_sizes else None
    _print_report(importance.run(model, data, out, samples, batch_size, ks, depth_samples))


@app.command("prune")
@_guarded
def prune_cmd(
    model: Path = typer.Option(..., "--model"),
    importance: Path = typer.Option(..., "--importance"),
    out: Path = typer.Option(..., "--out"),
    hidden_size: Optional[int] = typer.Option(None, "--hidden-size"),
    ffn_hidden_size: Optional[int] = typer.Option(None, "--ffn-hidden-size"),
    num_attention_heads: Optional[int] = typer.Option(None, "--num-attention-heads"),
    num_key_value_heads: Optional[int] = typer.Option(None, "--num-key-value-heads"),
    num_layers: Optional[int] = typer.Option(None, "--num-layers"),
    depth_criterion: str = typer.Option("block-influence", "--depth-criterion", help="block-influence, lm-loss or lm-loss-contiguous."),
    drop_layers: Optional[str] = typer.Option(None, "--drop-layers", help="0-based layers to drop, e.g. 15-30,7."),
):
    """Prune a model to a target shape."""
    from secateurs.config import PruneConfig
    from secateurs import prune

    try:
        target = PruneConfig(
            hidden_size=hidden_size,
            ffn_hidden_size=ffn_hidden_size,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            num_layers=num_layers,
            depth_criterion=depth_criterion,
            drop_layers=drop_layers,
        ).target()
    except Exception as e:  # pydantic ValidationError: show the first reason only
        from pydantic import ValidationError

        if isinstance(e, ValidationError):
            from secateurs.config import format_error

            _fail(ValueError("; ".join(format_error(err) for err in e.errors())))
        raise
    report = prune.run(model, importance, out, target)
    typer.echo(
        f"parameters: {report['parameters_before']:,} -> {report['parameters_after']:,} "
        f"({report['parameter_ratio']:.1%}); layers kept: {len(report['kept_layers'])}"
    )
    _print_report(report)


from secateurs.config import DistillConfig, TeacherCorrectionConfig  # noqa: E402  (light: pydantic only)


def _summarise_training(report: dict) -> None:
    curve = ", ".join(f"{h['step']}:{h['loss']:.3f}" for h in report.get("log_history", []))
    report = {k: v for k, v in report.items() if k != "log_history"}
    typer.echo(f"loss curve (step:loss): {curve}")
    _print_report(report)


@app.command("correct-teacher")
@_guarded
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
@_guarded
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
@_guarded
def evaluate_cmd(
    model: Path = typer.Option(..., "--model"),
    data: Path = typer.Option(..., "--data"),
    out: Path = typer.Option(..., "--out", help="Metrics directory (metrics.json + secateurs.json)."),
    tasks: str = typer.Option("lambada-docs", "--tasks", help="Comma-separated: lambada-docs, a task YAML path, or lm-eval task names."),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_sequences: Optional[int] = typer.Option(None, "--max-sequences", help="Validation sequences for loss/perplexity, spread evenly over the split (default all)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Items per task (default all)."),
):
    """Validation loss, perplexity and downstream tasks."""
    from secateurs import evaluate

    _print_report(evaluate.run(model, data, out, [t for t in tasks.split(",") if t], batch_size, max_sequences, limit))


@app.command("build-engine")
@_guarded
def build_engine_cmd(
    model: Path = typer.Option(..., "--model"),
    backend: str = typer.Option("onnxruntime-genai", "--backend", help="onnxruntime-genai or tensorrt-llm."),
    precision: str = typer.Option("int4", "--precision", help="onnxruntime-genai: int4, fp32 (CPU), fp16 (CUDA); tensorrt-llm: bf16, fp8."),
    out: Path = typer.Option(..., "--out"),
    lengths: Optional[str] = typer.Option(None, "--lengths", help="Input:output lengths the engine must serve, e.g. 128:128,2048:128."),
    calib_dataset: Optional[Path] = typer.Option(None, "--calib-dataset", help="Prepared dataset for FP8 calibration."),
):
    """Build an inference engine from a checkpoint."""
    from secateurs import engine

    parsed = engine.parse_lengths(lengths) if lengths else None
    _print_report(engine.build_engine(model, backend, precision, out, parsed, calib_dataset))


@app.command("bench")
@_guarded
def bench_cmd(
    engine_dir: Path = typer.Option(..., "--engine"),
    batch: int = typer.Option(8, "--batch"),
    lengths: str = typer.Option("128:128,2048:128", "--lengths"),
    repeats: int = typer.Option(3, "--repeats"),
    out: Optional[Path] = typer.Option(None, "--out", help="Results JSON (default ENGINE/bench.json)."),
):
    """Requests/s and output tokens/s of an engine per input:output length pair."""
    from secateurs import engine

    _print_report(engine.bench_engine(engine_dir, lengths, batch, repeats, out=out))


@app.command("validate")
@_guarded
def validate_cmd(config: Path = typer.Argument(..., help="Pipeline config YAML.")):
    """Validate a pipeline config without running anything."""
    from secateurs.config import load_config

    cfg = load_config(config)
    typer.echo(f"{config}: ok ({len(cfg.students)} students: {', '.join(s.name for s in cfg.students)})")


# The pipeline commands: whole runs locally through kfp.local, compile, submit to KFP, rerun one step, lineage.
from secateurs import pipeline_cli  # noqa: E402

app.command("run")(pipeline_cli.run_cmd)
app.command("compile")(pipeline_cli.compile_cmd)
app.command("submit")(pipeline_cli.submit_cmd)
app.command("rerun")(pipeline_cli.rerun_cmd)
app.command("lineage")(pipeline_cli.lineage_cmd)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
