"""The pipeline commands of `secateurs`: run (locally, through kfp.local), rehearse, plan, compile, submit, rerun,
lineage. Each command reads its options and calls the module that does the work:

- a local run, its directory and its checks: `secateurs.local_run`;
- what MLflow recorded of a run: `secateurs.run_records`;
- which steps a rerun runs and what it imports: `secateurs.rerun`;
- compiling and submitting to Kubeflow Pipelines: `secateurs.submit`;
- the rehearsal: `secateurs.rehearse`; the memory plan: `secateurs.plan` and `secateurs.trace`.

`rerun RUN --step STEP[:STUDENT]` runs one step again in a new pipeline whose inputs are the artifacts RUN recorded in
MLflow; its outputs land in a new directory, and its MLflow pipeline run is tagged
`secateurs.rerun_of=<RUN's pipeline run>`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from secateurs.config import PipelineConfig, load_config
from secateurs.errors import PipelineError, one_line_errors
from secateurs.local_run import (
    RUNNERS,
    check_local,
    ensure_dir,
    for_local_run,
    local_pipeline_root,
    open_run,
    read_run,
    run_locally,
)
from secateurs.rerun import rerun_phases, rerun_selection
from secateurs.run_records import TAG_RERUN_OF, recorded_outputs, report_table
from secateurs.submit import compile_pipeline, resolve_run_settings, submit_spec


# ------------------------------------------------------------------------------------------------ run
@one_line_errors
def run_cmd(
    config: Path = typer.Argument(..., help="Pipeline config YAML."),
    run_dir: Path = typer.Option(None, "--run-dir", help="Run directory (default: runs/<config name>)."),
    runner: Annotated[str, typer.Option(
        "--runner",
        help="subprocess: each step a process of this environment; container: each step in the pipeline's image "
        "through podman, as on the cluster (build it first: make images-local).",
    )] = "subprocess",
):
    """Run the whole pipeline on this machine (kfp.local); run it again to redo only what failed."""
    if runner not in RUNNERS:
        raise PipelineError(f"--runner {runner}: not one of {', '.join(RUNNERS)}")
    cfg = for_local_run(load_config(config))
    run_dir = (run_dir or Path("runs") / cfg.name).absolute()
    check_local(cfg)
    check_plan(cfg)
    pipeline_root = local_pipeline_root(cfg, run_dir)
    from secateurs.pipelines.recipe import build_pipeline

    if runner == "container":
        from secateurs import containers

        inputs = containers.local_inputs([cfg.teacher.source, *(s.source for s in cfg.data.blend())])
        # Made here, group-writable: a bind source that does not exist yet would be made by podman, root's alone.
        with containers.shared_with_group(), containers.podman_service(ensure_dir(run_dir)) as url:
            ensure_dir(pipeline_root)
            containers.require_image(url, cfg.placement.resolved_images()["secateurs"])
            state = open_run(cfg, run_dir)
            pipeline = build_pipeline(cfg, tracking_uri=state["tracking_uri"])
            run_locally(pipeline, state, pipeline_root, docker=(url, containers.runner_arguments(run_dir, inputs)))
    else:
        state = open_run(cfg, run_dir)
        run_locally(build_pipeline(cfg, tracking_uri=state["tracking_uri"]), state, pipeline_root)
    table = report_table(state)
    if table:
        typer.echo(table)
    typer.echo(f"artifacts: {pipeline_root}")
    typer.echo(f"MLflow UI: mlflow ui --backend-store-uri {state['tracking_uri']}")














# --------------------------------------------------------------------------------- what MLflow recorded









# ---------------------------------------------------------------------------------------------- rerun
@one_line_errors
def rerun_cmd(
    run: Path = typer.Argument(..., help="Run directory of an earlier `secateurs run`."),
    step: str = typer.Option(
        ..., "--step", help="Task to rerun, by its key: distill:width, evaluate:width-pruned, search-distill:auto/1 (one "
        "candidate of a search: the key of its step, a slash and the item).",
    ),
    downstream: bool = typer.Option(False, "--downstream", help="Also rerun every step that depends on it."),
):
    """Rerun exactly one step of RUN from the artifacts RUN recorded (and, with --downstream, what follows)."""
    cfg, state = read_run(run)
    cfg = for_local_run(cfg)
    check_local(cfg)
    from secateurs.pipelines.recipe import build_pipeline

    phases = rerun_phases(cfg, step, downstream)
    first = rerun_selection(cfg, *phases[0], recorded_outputs(state))  # a bad step or a missing input: before any work
    rerun_state = {**state, "pipeline_run": f"{state['pipeline_run']}-rerun-{time.strftime('%Y%m%d-%H%M%S')}"}
    ran = []
    for i, (keys, down) in enumerate(phases):
        # A later phase reads what the one before it recorded: a fan-out item rerun alone, then its readers,
        # which import every item's output (the new one included).
        steps, imports = first if i == 0 else rerun_selection(cfg, keys, down, recorded_outputs(state))
        pipeline = build_pipeline(cfg, steps=steps, imports=imports, fresh={s.key for s in steps},
                                  tracking_uri=state["tracking_uri"])  # fmt: skip
        run_locally(pipeline, rerun_state, local_pipeline_root(cfg, Path(state["run_dir"])),
                     rerun_of=state["pipeline_run"])  # fmt: skip
        ran += [k for s in steps for k in s.task_keys]
    for (key, output), uri in recorded_outputs(state).items():
        if key in ran:
            typer.echo(f"{key}.{output}: {uri}")
    typer.echo(
        f"rerun recorded in MLflow as pipeline run {rerun_state['pipeline_run']} ({TAG_RERUN_OF}={state['pipeline_run']})"
    )






# -------------------------------------------------------------------------------------------- rehearse
REHEARSAL_FILE = "rehearsal.json"


@one_line_errors
def rehearse_cmd(
    config: Path = typer.Argument(..., help="Pipeline config YAML (a cluster config)."),
    rehearsal_dir: Annotated[Path | None, typer.Option(
        "--dir", help="Rehearsal directory; everything it writes stays there (default: runs/<name>-rehearsal)."
    )] = None,
    teacher_config: Annotated[Path | None, typer.Option(
        "--teacher-config", help="The teacher's config.json (default: the teacher's own when it is a local "
        "directory, else its family's default)."
    )] = None,
):
    """Run CONFIG's own step graph and settings small on this machine (secateurs.rehearse): one row per step of
    what ran, what was scaled and what could not run here, then the real config's plan. Exit 0 only when every
    step ran as far as this machine allows."""
    directory = (rehearsal_dir or Path("runs") / f"{load_config(config).name}-rehearsal").absolute()
    from secateurs.rehearse import passed

    rows, _ = rehearse(config, directory, teacher_config)
    if not passed(rows):
        raise PipelineError(f"the rehearsal of {config} did not run every step; see the table above")


def rehearse(config: Path, directory: Path, teacher_config: Path | None = None) -> tuple[list[dict], PipelineConfig]:
    """Rehearse CONFIG in DIRECTORY (started afresh: a killed rehearsal is simply run again); print and return
    its table rows and the rehearsed config."""
    import shutil

    from secateurs import rehearse as lib

    real = load_config(config)
    if directory.exists() and any(directory.iterdir()) and not (directory / REHEARSAL_FILE).is_file():
        raise PipelineError(f"{directory} exists and is not a rehearsal directory: give another --dir")
    lib.check_sources(real, local_only=True)  # seconds, before anything is written
    lib.stop_leftovers(directory)  # of a killed rehearsal of the same directory, before its files go
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    (directory / REHEARSAL_FILE).write_text(json.dumps({"config": str(Path(config).absolute())}))
    failure = None
    from secateurs.evaluate import LM_EVAL_TASKS_ENV

    # Everything from here on inside the environment: the task overrides import lm_eval and with it datasets and
    # huggingface_hub, which fix their cache directories at import from HF_HOME and HOME, so an import before it
    # would have this process write its dataset locks into the user's ~/.cache.
    with lib.rehearsal_environment(directory, lib.s3_buckets(real)):
        tasks = lib.write_task_overrides(real.evaluate.tasks, directory)
        if tasks:
            os.environ[LM_EVAL_TASKS_ENV] = str(tasks)  # unset again with the rest when the environment ends
        cfg, scaling = real, lib.Scaling()
        if lib.asks_for_gpus(real):
            shape = lib.teacher_config(real.teacher.source, teacher_config)
            tokenizer = lib.write_shipped_tokenizer(directory / "tokenizer")
            widths = [w for s in real.students if s.prune for w in (s.prune.hidden_size, s.prune.ffn_hidden_size) if w]
            from secateurs.checkpoint import load_tokenizer

            small = lib.scaled_teacher_config(shape, lib.width_factor(shape, widths), len(load_tokenizer(tokenizer)))
            teacher = lib.write_rehearsal_teacher(small, tokenizer, directory / "teacher")
            sources = lib.write_rehearsal_sources(real, directory, lib.SEQUENCES_PER_SOURCE * 128)
            cfg, scaling = lib.scale_config(real, shape, teacher, directory, sources, small["vocab_size"])
            lib.upload_rehearsal_sources(cfg, directory)
        lib.check_sources(cfg)
        cfg = for_local_run(cfg)
        check_local(cfg)
        from secateurs.pipelines.recipe import build_pipeline

        state = open_run(cfg, directory)
        try:
            run_locally(build_pipeline(cfg, tracking_uri=state["tracking_uri"]), state, directory / "artifacts")
        except PipelineError as e:
            failure = str(e)
        recorded = recorded_outputs(state)
        rows = lib.rehearsal_rows(real, cfg, scaling, recorded)
        if lib.multi_node_steps(real):  # each as the Trainer runtime runs its nodes, on what the graph recorded
            rows += lib.rehearse_nodes(real, cfg, recorded, directory)
    typer.echo(f"rehearsal of {config} (width factor {scaling.width_factor}):")
    typer.echo(lib.format_rows(rows))
    if failure:
        typer.echo(f"rehearsal: {failure}")
    from secateurs import plan

    plans = plan.plan(real)
    if plans:
        typer.echo(f"the real config's plan ({config}):")
        typer.echo(plan.format_plan(plans, plan.MEASURED_TOKENS_PER_SECOND), nl=False)
    return rows, cfg


# ------------------------------------------------------------------------------------------------ plan
def check_plan(cfg: PipelineConfig) -> None:
    """Refuse, before anything is compiled, sent or run, a config whose GPU steps do not fit their GPUs: by the
    analytic plan where it is clear of the limit, else by the step's trace (`secateurs.fit.check`)."""
    from secateurs import fit, plan

    if not cfg.placement.gpus.requested():
        return
    try:
        fit.check(cfg)
    except plan.ShapeUnknown as e:
        typer.secho(f"warning: memory plan skipped: {e}", fg="yellow", err=True)
    except plan.PlanError as e:
        raise PipelineError(str(e)) from None


@one_line_errors
def plan_cmd(
    config: Path = typer.Argument(..., help="Pipeline config YAML."),
    tokens_per_second: float = typer.Option(
        None, "--tokens-per-second", help="Training tokens/s per GPU for the GPU-hours (default: measured on an H200)."
    ),
    # Annotated, so that a direct call (tests, other commands) gets plain defaults, not typer's OptionInfo.
    traced: Annotated[bool, typer.Option(
        "--trace", help="Also run each GPU step's own code under fake tensors at the real shapes "
        "(secateurs.trace) and print its peak per GPU beside the analytic plan's; fails if the trace does not fit."
    )] = False,
    json_out: Annotated[Path | None, typer.Option(
        "--json", help="With --trace: write [{step, analytic_gib, traced_gib, capacity_gib, fits}] to this file."
    )] = None,
):
    """Bytes per GPU of every GPU step (weights, gradients, optimizer, teacher, activations, KD chunk), the tokens
    each training step reads and its GPU-hours; fails if a step does not fit."""
    from secateurs import plan

    cfg = load_config(config)
    plans = plan.plan(cfg)
    if not plans:
        typer.echo(f"{config}: no step asks for a GPU (placement.gpus); nothing to plan")
        return
    typer.echo(plan.format_plan(plans, tokens_per_second or plan.MEASURED_TOKENS_PER_SECOND), nl=False)
    if traced:
        from secateurs import trace

        steps = trace.trace_plan(cfg)
        typer.echo(trace.format_traced(steps), nl=False)
        if json_out is not None:
            json_out.write_text(json.dumps(trace.to_json(steps), indent=1) + "\n")
        for step in steps:
            if not step.fits():
                raise PipelineError(trace.refusal(step, cfg))
    check_plan(cfg)
    typer.echo("every step fits its GPUs")


# -------------------------------------------------------------------------------------- compile, submit


_PIPELINE_ROOT_HELP = "Where KFP keeps artifacts, e.g. s3://bucket/prefix (default: tracking.pipeline_root)."


@one_line_errors
def compile_cmd(
    config: Path = typer.Argument(..., help="Pipeline config YAML."),
    output: Path = typer.Option(
        Path("pipeline.yaml"), "--output", "-o", help="Where to write the pipeline spec."
    ),
    pipeline_root: str = typer.Option(None, "--pipeline-root", help=_PIPELINE_ROOT_HELP),
):
    """Compile the pipeline to a KFP spec (YAML) to upload to a Kubeflow Pipelines endpoint."""
    cfg = load_config(config)
    check_plan(cfg)
    compile_pipeline(cfg, output, resolve_run_settings(cfg, pipeline_root)["pipeline_root"])
    typer.echo(f"wrote {output}")




@one_line_errors
def submit_cmd(
    config: Path = typer.Argument(..., help="Pipeline config YAML."),
    host: str = typer.Option(..., "--host", envvar="KFP_HOST", help="Kubeflow Pipelines endpoint URL."),
    experiment: str = typer.Option("secateurs", "--experiment", help="KFP experiment."),
    namespace: str = typer.Option(None, "--namespace", help="Kubernetes namespace (multi-user KFP)."),
    pipeline_root: str = typer.Option(None, "--pipeline-root", help=_PIPELINE_ROOT_HELP),
    service_account: str = typer.Option(
        None, "--service-account", help="ServiceAccount of the run's pods (default: placement.service_account)."
    ),
    rehearse_first: Annotated[bool, typer.Option(
        "--rehearse", help="Rehearse the config on this machine first (secateurs rehearse, into "
        "runs/<name>-rehearsal) and submit only when every step ran as far as this machine allows."
    )] = False,
):
    """Submit the pipeline to a Kubeflow Pipelines endpoint (token from KFP_TOKEN) and print the run's URL."""
    import tempfile

    cfg = load_config(config)
    check_plan(cfg)
    if rehearse_first:
        from secateurs.rehearse import passed

        rows, _ = rehearse(config, (Path("runs") / f"{cfg.name}-rehearsal").absolute())
        if not passed(rows):
            raise PipelineError(f"the rehearsal of {config} did not run every step (table above): not submitted")
    settings = resolve_run_settings(cfg, pipeline_root, service_account)
    pipeline_run = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory() as tmp:
        spec = compile_pipeline(cfg, Path(tmp) / "pipeline.yaml", settings["pipeline_root"])
        url = submit_spec(spec, host, {"pipeline_run": pipeline_run}, f"{pipeline_run}", experiment, namespace,
                          cfg.placement.caching, **settings)  # fmt: skip
    typer.echo(url)






# -------------------------------------------------------------------------------------------- lineage
@one_line_errors
def lineage_cmd(
    ref: str = typer.Argument(
        ..., help="Model id, registered model NAME or NAME/VERSION, run id, or artifact directory."
    ),
    tracking_uri: str = typer.Option(
        None, "--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI)."
    ),
    run_dir: Path = typer.Option(None, "--run-dir", help="A local run directory (its mlflow.db)."),
):
    """Print the chain of models from REF back to the teacher, as MLflow recorded it."""
    from rich.console import Console

    from secateurs import tracking

    Console().print(tracking.lineage_table(tracking.lineage(ref, uri=tracking_uri, run_dir=run_dir)))


__all__ = ["compile_cmd", "lineage_cmd", "rehearse_cmd", "rerun_cmd", "run_cmd", "submit_cmd"]
