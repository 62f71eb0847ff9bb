"""A local pipeline run: its directory, the checks before any compute, and running it through kfp.local.

A local run lives in one directory, `runs/<name>` by default:
- `config.yaml`: the resolved config it ran;
- `run.json`: its pipeline run id and tracking URI. Running the same command again reuses them, so kfp.local's
  cache (under `artifacts/.kfp_cache`) serves every step that already succeeded and only what failed or changed
  runs again, under the same MLflow pipeline run;
- `artifacts/`: the pipeline root (every step's outputs), `mlflow.db`: the MLflow store (SQLite).

Everything that can be checked before compute is: GPUs asked of a machine without one, the MLflow and S3
endpoints, a latency budget's engine. kfp is imported inside the functions (the library core runs without it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from secateurs.config import PipelineConfig, load_config
from secateurs.errors import PipelineError
from secateurs.run_records import TAG_RERUN_OF, failed_steps

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
# How `secateurs run --runner` runs each step: a process of this environment, or a container of the step's image.
RUNNERS = ("subprocess", "container")


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


def local_pipeline_root(cfg: PipelineConfig, run_dir: Path) -> Path:
    from secateurs import storage

    root = cfg.tracking.pipeline_root
    if root and storage.is_s3_uri(root):
        raise PipelineError(
            f"tracking.pipeline_root={root} is on S3, but a local run keeps artifacts on local disk: "
            "leave it unset for `secateurs run` (it is for `submit`)"
        )
    return Path(root).absolute() if root else run_dir / "artifacts"


def open_run(cfg: PipelineConfig, run_dir: Path) -> dict:
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


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_locally(pipeline, state: dict, pipeline_root: Path, rerun_of: str | None = None,
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

