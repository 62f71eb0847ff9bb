"""The pipeline commands of `secateurs`: run (locally, through kfp.local), compile, submit, rerun, lineage.

A local run lives in one directory, `runs/<name>` by default:
- `config.yaml`: the resolved config it ran;
- `run.json`: its pipeline run id and tracking URI. Running the same command again reuses them, so kfp.local's
  cache (under `artifacts/.kfp_cache`) serves every step that already succeeded and only what failed or changed
  runs again, under the same MLflow pipeline run;
- `artifacts/`: the pipeline root (every step's outputs), `mlflow.db`: the MLflow store (SQLite).

`rerun RUN --step STEP[:STUDENT]` runs one step again in a new pipeline whose inputs are the artifacts RUN recorded in
MLflow (brought in with `dsl.importer`); its outputs land in a new directory, so nothing RUN produced changes, and
its MLflow pipeline run is tagged `secateurs.rerun_of=<RUN's pipeline run>`. One task of a fan-out step is rerun
alone by its item (`--step search-distill:auto/1`: one candidate's short distillation).

Everything that can be checked before compute is: the config, GPUs asked of a machine without one, the MLflow
and S3 endpoints. kfp is imported inside the functions (the library core runs without it).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from secateurs.config import PipelineConfig, load_config
from secateurs.errors import one_line_errors

RUN_FILE = "run.json"
RUNNERS = ("subprocess", "container")
CONFIG_FILE = "config.yaml"
TAG_RERUN_OF = "secateurs.rerun_of"


class PipelineError(ValueError):
    """A pipeline that cannot be run, compiled, submitted or rerun as asked; the message says why."""


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
    pipeline_root = _local_pipeline_root(cfg, run_dir)
    from secateurs.pipelines.recipe import build_pipeline

    if runner == "container":
        from secateurs import containers

        inputs = containers.local_inputs([cfg.teacher.source, *(s.source for s in cfg.data.blend())])
        # Made here, group-writable: a bind source that does not exist yet would be made by podman, root's alone.
        with containers.shared_with_group(), containers.podman_service(_mkdir(run_dir)) as url:
            _mkdir(pipeline_root)
            containers.require_image(url, cfg.placement.resolved_images()["secateurs"])
            state = _open_run(cfg, run_dir)
            pipeline = build_pipeline(cfg, tracking_uri=state["tracking_uri"])
            _run_locally(pipeline, state, pipeline_root, docker=(url, containers.runner_arguments(run_dir, inputs)))
    else:
        state = _open_run(cfg, run_dir)
        _run_locally(build_pipeline(cfg, tracking_uri=state["tracking_uri"]), state, pipeline_root)
    table = report_table(state)
    if table:
        typer.echo(table)
    typer.echo(f"artifacts: {pipeline_root}")
    typer.echo(f"MLflow UI: mlflow ui --backend-store-uri {state['tracking_uri']}")


def for_local_run(cfg: PipelineConfig) -> PipelineConfig:
    """The config as a local run uses it: no retries (a failure on one machine is not transient; run the
    command again instead, which reuses every finished step)."""
    cfg = cfg.model_copy(deep=True)
    cfg.placement.retries = 0
    return cfg


def check_local(cfg: PipelineConfig) -> None:
    """Refuse, before any compute, what a local run cannot do: GPUs it lacks, unreachable MLflow or S3."""
    import torch

    from secateurs import storage, tracking

    gpus = cfg.placement.gpus.requested()
    if gpus and not torch.cuda.is_available():
        kind, n = next(iter(gpus.items()))
        raise PipelineError(
            f"placement.gpus.{kind}={n} but this machine has no CUDA GPU: set it to 0 for a local run"
        )
    if cfg.tracking.uri:
        tracking.check_reachable(tracking.resolve_tracking_uri(cfg.tracking.uri))
    from secateurs.search import SearchError, check_engine

    for s in cfg.students:  # a latency budget's engine backend, before the steps that precede the search
        if s.search is not None:
            try:
                check_engine(s.search)
            except SearchError as e:
                raise PipelineError(f"student {s.name}: {e}") from None
    sources = [(f"data.sources[{i}]" if cfg.data.sources else "data.source", s.source)
               for i, s in enumerate(cfg.data.blend())]  # fmt: skip
    for where, uri in [("teacher.source", cfg.teacher.source), *sources]:
        if storage.is_s3_uri(uri):
            try:
                storage.check_access(uri)
            except storage.StorageError as e:
                raise PipelineError(f"{where}: {e}") from None


def _local_pipeline_root(cfg: PipelineConfig, run_dir: Path) -> Path:
    from secateurs import storage

    root = cfg.tracking.pipeline_root
    if root and storage.is_s3_uri(root):
        raise PipelineError(
            f"tracking.pipeline_root={root} is on S3, but a local run keeps artifacts on local disk: "
            "leave it unset for `secateurs run` (it is for `submit`)"
        )
    return Path(root).absolute() if root else run_dir / "artifacts"


def _open_run(cfg: PipelineConfig, run_dir: Path) -> dict:
    """The run directory's state: a new pipeline run id the first time, the same one on every later run."""
    import yaml

    from secateurs import tracking

    run_dir.mkdir(parents=True, exist_ok=True)
    state_file = run_dir / RUN_FILE
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri, run_dir)
    tracking.check_reachable(uri)
    if state_file.is_file():
        state = json.loads(state_file.read_text())
    else:
        state = {"pipeline_run": f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}", "tracking_uri": uri}
        state_file.write_text(json.dumps(state, indent=1))
    state["run_dir"] = str(run_dir)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return state


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run_locally(pipeline, state: dict, pipeline_root: Path, rerun_of: str | None = None,
                 docker: tuple[str, dict] | None = None) -> None:  # fmt: skip
    """Run `pipeline` through kfp.local with caching, closing its MLflow pipeline run with the outcome.

    Args:
        docker: (DOCKER_HOST, DockerRunner arguments) to run each step in its image; default: subprocesses.
    """
    import contextlib

    from kfp import local

    from secateurs.tracking import Tracker

    # Opening the tracker here creates the pipeline run (or finds it again when resuming) before the steps do.
    tracker = Tracker(state["tracking_uri"], pipeline_run=state["pipeline_run"])
    if rerun_of and tracker.active:
        tracker.client.set_tag(tracker.parent_run_id, TAG_RERUN_OF, rerun_of)
    adapter = contextlib.nullcontext()
    if docker is None:
        runner = local.SubprocessRunner(use_venv=False)
    else:
        from secateurs.containers import through, writable_by_steps

        writable_by_steps(state["tracking_uri"])  # created by the tracker above, as SQLite creates files: 0o644
        runner, adapter = local.DockerRunner(**docker[1]), through(docker[0])
    local.init(runner, pipeline_root=str(pipeline_root), enable_caching=True)
    try:
        with adapter:
            pipeline(tracking_uri=state["tracking_uri"], pipeline_run=state["pipeline_run"])
    except RuntimeError as e:
        tracker.finish_pipeline("FAILED")
        failed = failed_steps(state)
        where = f"step {', '.join(failed)} failed" if failed else str(e).splitlines()[0]
        raise PipelineError(
            f"{where} (its log is above); run the same command again to redo only what did not finish"
        ) from None
    tracker.finish_pipeline("FINISHED")


# --------------------------------------------------------------------------------- what MLflow recorded
def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _step_runs(state: dict, pipeline_runs: list[str] | None = None, status: str | None = None) -> list:
    """The step runs of the run's pipeline run(s), newest first."""
    from secateurs.components.prologue import TAG_TASK
    from secateurs.tracking import EXPERIMENT, TAG_PIPELINE_RUN, TAG_ROLE

    client = _client(state["tracking_uri"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    runs = []
    for pipeline_run in pipeline_runs or [state["pipeline_run"]]:
        found = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{TAG_PIPELINE_RUN}` = '{pipeline_run}' AND tags.`{TAG_ROLE}` = 'step'",
            order_by=["attributes.start_time DESC"],
        )
        runs += [r for r in found if status is None or r.info.status == status]
    runs.sort(key=lambda r: r.info.start_time, reverse=True)
    return [r for r in runs if status != "FINISHED" or TAG_TASK in r.data.tags]


def failed_steps(state: dict) -> list[str]:
    from secateurs.tracking import TAG_STEP, TAG_STUDENT

    runs = _step_runs(state, status="FAILED")
    if not runs:
        return []
    from secateurs.components.prologue import TAG_ITEM

    latest = runs[0].data.tags
    item = f"/{latest[TAG_ITEM]}" if latest.get(TAG_ITEM) else ""
    return [latest.get(TAG_STEP, "?") + (f":{latest[TAG_STUDENT]}" if latest.get(TAG_STUDENT) else "") + item]


def recorded_outputs(state: dict) -> dict[tuple[str, str], str]:
    """(task key, output name) -> URI of every output the run's finished steps (and its reruns) recorded.

    The newest record of a task wins, so a step rerun after a failure supplies its outputs to later reruns.
    """
    from secateurs.components.prologue import TAG_OUTPUT_PREFIX, TAG_TASK
    from secateurs.tracking import EXPERIMENT, TAG_PIPELINE_RUN

    client = _client(state["tracking_uri"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    reruns = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{TAG_RERUN_OF}` = '{state['pipeline_run']}'"
    ) if experiment else []  # fmt: skip
    ids = [state["pipeline_run"]] + [r.data.tags[TAG_PIPELINE_RUN] for r in reruns]
    outputs: dict[tuple[str, str], str] = {}
    for run in reversed(_step_runs(state, ids, status="FINISHED")):  # oldest first, newest overwrites
        for tag, uri in run.data.tags.items():
            if tag.startswith(TAG_OUTPUT_PREFIX):
                outputs[(run.data.tags[TAG_TASK], tag.removeprefix(TAG_OUTPUT_PREFIX))] = uri
    return outputs


def report_table(state: dict) -> str | None:
    """The final comparison table of a finished local run, from the report step's recorded output."""
    from secateurs.report import format_table

    uri = recorded_outputs(state).get(("report", "comparison"))
    if uri is None or not (Path(uri) / "entries.json").is_file():
        return None
    return format_table(json.loads((Path(uri) / "entries.json").read_text()))


def read_run(run: Path) -> tuple[PipelineConfig, dict]:
    """The config and state of a local run directory."""
    state_file, config_file = Path(run) / RUN_FILE, Path(run) / CONFIG_FILE
    if not state_file.is_file() or not config_file.is_file():
        raise PipelineError(
            f"{run} is not a run directory of `secateurs run` ({RUN_FILE} or {CONFIG_FILE} is missing)"
        )
    state = json.loads(state_file.read_text())
    state["run_dir"] = str(Path(run).absolute())
    return load_config(config_file), state


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
    first = rerun_plan(cfg, *phases[0], recorded_outputs(state))  # a bad step or a missing input: before any work
    rerun_state = {**state, "pipeline_run": f"{state['pipeline_run']}-rerun-{time.strftime('%Y%m%d-%H%M%S')}"}
    ran = []
    for i, (keys, down) in enumerate(phases):
        # A later phase reads what the one before it recorded: a fan-out item rerun alone, then its readers,
        # which import every item's output (the new one included).
        steps, imports = first if i == 0 else rerun_plan(cfg, keys, down, recorded_outputs(state))
        pipeline = build_pipeline(cfg, steps=steps, imports=imports, fresh={s.key for s in steps},
                                  tracking_uri=state["tracking_uri"])  # fmt: skip
        _run_locally(pipeline, rerun_state, _local_pipeline_root(cfg, Path(state["run_dir"])),
                     rerun_of=state["pipeline_run"])  # fmt: skip
        ran += [k for s in steps for k in s.task_keys]
    for (key, output), uri in recorded_outputs(state).items():
        if key in ran:
            typer.echo(f"{key}.{output}: {uri}")
    typer.echo(
        f"rerun recorded in MLflow as pipeline run {rerun_state['pipeline_run']} ({TAG_RERUN_OF}={state['pipeline_run']})"
    )


def rerun_phases(cfg: PipelineConfig, key: str, downstream: bool) -> list[tuple[set[str], bool]]:
    """The pipelines a rerun of task `key` runs, in order: (task keys, with what depends on them).

    One pipeline, except for one item of a fan-out step with `downstream`: that item alone, then the steps that read
    the fan-out's outputs and everything after them (a `dsl.Collected` input gathers one loop's outputs, so the
    rerun item and the recorded others meet only in a second pipeline that imports them all)."""
    from secateurs.pipelines.recipe import recipe
    from secateurs.registry import split_item

    group, item = split_item(key)
    if not (item and downstream):
        return [({key}, downstream)]
    readers = {s.key for s in recipe(cfg) if any(ref[0] == group for ref in s.inputs.values())}
    return [({key}, False), (readers, True)]


def rerun_plan(cfg: PipelineConfig, keys: str | set[str], downstream: bool, recorded: dict[tuple[str, str], str]):
    """The steps a rerun of tasks `keys` runs and the recorded artifacts it imports.

    A key `STEP:STUDENT/ITEM` is one item of a fan-out step: that step is run over this item alone. An output of a
    fan-out step that is imported is a list of URIs, one per item, in item order.

    Untracked steps (the registry's `tracked=False`: the report's row gathering) record nothing to import: they
    are cheap, so any that a rerun step needs is run again too.

    Raises:
        PipelineError: a key is not a task of the config's pipeline, or an input was never recorded.
    """
    import dataclasses

    from secateurs.pipelines.recipe import recipe
    from secateurs.registry import STEPS, split_item

    steps = recipe(cfg)
    by_key = {s.key: s for s in steps}
    items: dict[str, list[str]] = {}  # a fan-out step rerun for some of its items only
    chosen = set()
    for key in {keys} if isinstance(keys, str) else keys:
        group, item = split_item(key)
        step = by_key.get(group)
        if step is None or (item and item not in step.items):
            listed = [k for s in steps for k in dict.fromkeys([s.key, *s.task_keys])]
            raise PipelineError(f"{key!r} is not a step of this pipeline; its steps are: {', '.join(listed)}")
        chosen.add(group)
        if item:
            items.setdefault(group, []).append(item)
    if downstream:
        for s in steps:  # recipe order is topological: one pass reaches every descendant
            if any(ref[0] in chosen for ref in s.inputs.values()):
                chosen.add(s.key)
    pending = list(chosen)
    while pending:  # pull in the untracked steps the chosen ones read
        for ref in by_key[pending.pop()].inputs.values():
            if not STEPS[by_key[ref[0]].kind].tracked and ref[0] not in chosen:
                chosen.add(ref[0])
                pending.append(ref[0])
    selected = [dataclasses.replace(s, items=items[s.key]) if s.key in items else s for s in steps if s.key in chosen]
    imports = {}
    for s in selected:
        for ref in s.inputs.values():
            if ref[0] in chosen:
                continue
            # A fan-out step's output is recorded per item: its reader imports every item's.
            wanted = [(key, ref[1]) for key in by_key[ref[0]].task_keys]
            for task, output in wanted:
                if (task, output) not in recorded:
                    raise PipelineError(
                        f"{s.key} needs {task}.{output}, which the run never finished: rerun {task} first"
                    )
            uris = [recorded[w] for w in wanted]
            imports[ref] = uris if by_key[ref[0]].items else uris[0]
    return selected, imports


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

    tasks = lib.write_task_overrides(real.evaluate.tasks, directory)
    extra = {LM_EVAL_TASKS_ENV: str(tasks)} if tasks else {}
    with lib.rehearsal_environment(directory, lib.s3_buckets(real), extra):
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

        state = _open_run(cfg, directory)
        try:
            _run_locally(build_pipeline(cfg, tracking_uri=state["tracking_uri"]), state, directory / "artifacts")
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
    analytic plan where it is clear of the limit, else by the step's trace (`secateurs.trace.check`)."""
    from secateurs import plan, trace

    if not cfg.placement.gpus.requested():
        return
    try:
        trace.check(cfg)
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
def resolve_run_settings(cfg: PipelineConfig, pipeline_root: str | None = None,
                         service_account: str | None = None) -> dict[str, str | None]:  # fmt: skip
    """Where a cluster run keeps its artifacts and which ServiceAccount its pods use.

    Each is the command line's value, else the config's (`tracking.pipeline_root`, `placement.service_account`),
    else the chart's defaults ConfigMap variable when it is in the environment (`SECATEURS_PIPELINE_ROOT`,
    `SECATEURS_SERVICE_ACCOUNT`: a notebook or job in the cluster that loads it), else None (KFP's own default).
    """
    return {
        "pipeline_root": pipeline_root or cfg.tracking.pipeline_root or os.environ.get("SECATEURS_PIPELINE_ROOT"),
        "service_account": service_account or cfg.placement.service_account
        or os.environ.get("SECATEURS_SERVICE_ACCOUNT"),
    }  # fmt: skip


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


def compile_pipeline(cfg: PipelineConfig, output: Path, pipeline_root: str | None = None) -> Path:
    """Compile `cfg`'s pipeline to `output`, with `pipeline_root` as the spec's default root.

    Credentials never enter the spec: secrets are referenced by name.
    """
    from kfp import compiler

    from secateurs.pipelines.recipe import build_pipeline

    output.parent.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(cfg, tracking_uri=cfg.tracking.uri or "", pipeline_root=pipeline_root)
    compiler.Compiler().compile(pipeline, str(output))
    return output


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


def submit_spec(spec: Path, host: str, arguments: dict, run_name: str, experiment: str, namespace: str | None,
                caching: bool, pipeline_root: str | None = None, service_account: str | None = None) -> str:  # fmt: skip
    """Create a run of a compiled spec on `host`; returns its URL. One-line errors for refused or unreachable.

    `pipeline_root` and `service_account` go on the run (None: KFP's defaults).
    """
    import kfp

    token = os.environ.get("KFP_TOKEN")
    _check_kfp_host(host, token)
    try:
        client = kfp.Client(host=host, existing_token=token, namespace=namespace)
        result = client.create_run_from_pipeline_package(
            str(spec), arguments=arguments, run_name=run_name, experiment_name=experiment,
            namespace=namespace, enable_caching=caching, pipeline_root=pipeline_root,
            service_account=service_account,
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 -- kfp raises urllib3, requests and ApiException errors alike
        status = getattr(e, "status", None)
        if status in (401, 403):
            raise PipelineError(
                f"Kubeflow Pipelines at {host} refused the token (HTTP {status}): set KFP_TOKEN to a valid one"
            ) from None
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        try:  # ApiException's first line is only "(400)": the reason is the API's JSON body (google.rpc.Status)
            body = json.loads(getattr(e, "body", None) or "null")
            text = body.get("message") or body.get("error_message") or text
        except (ValueError, AttributeError):
            pass
        if status is None:
            raise PipelineError(
                f"Kubeflow Pipelines at {host} is unreachable: {type(e).__name__}: {text}"
            ) from None
        raise PipelineError(f"Kubeflow Pipelines at {host} answered HTTP {status}: {text}") from None
    return f"{host.rstrip('/')}/#/runs/details/{result.run_id}"


def _check_kfp_host(host: str, token: str | None) -> None:
    """One authenticated request to the API's health endpoint, so that a refused token or an unreachable host is
    one line at once (kfp.Client retries its own health check five times with pauses and then reports any
    refusal as a timeout)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{host.rstrip('/')}/apis/v2beta1/healthz")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        urllib.request.urlopen(request, timeout=30).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise PipelineError(
                f"Kubeflow Pipelines at {host} refused the token (HTTP {e.code}): set KFP_TOKEN to a valid one"
            ) from None
        raise PipelineError(f"Kubeflow Pipelines at {host} answered HTTP {e.code} on /apis/v2beta1/healthz") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise PipelineError(f"Kubeflow Pipelines at {host} is unreachable: {type(reason).__name__}: {reason}") from None


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


__all__ = ["check_local", "compile_cmd", "lineage_cmd", "rehearse_cmd", "rerun_cmd", "run_cmd", "submit_cmd"]
