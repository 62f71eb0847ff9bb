"""MLflow runs of a secateurs pipeline: `Tracker`, one parent run per pipeline run, and `StepRun`, one nested run
per step. Only rank 0 logs (`RANK`, else `LOCAL_RANK`): other ranks get a tracker that does nothing. A run is ended
only by whoever created it: a step run that the KFP MLflow plugin created (`MLFLOW_RUN_ID`) is left to the plugin.

Training metrics go through MLflow's async logging, one batch in flight, whose outcome the next call reads: the
training loop does not wait on the network, and a failure is recorded one logging interval late. Metrics that
failed are retried once when the step ends; what still could not be logged is said in one warning line.

    tracker = Tracker(tracking_uri, pipeline_run=kfp_run_id)
    with tracker.step("distill", student="width") as run:
        report = train.distill(..., callbacks=[LossForwarder(run)])  # run.log_metrics every logging step
        run.record(out_dir)
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Self

from secateurs.tracking.backend import (
    HTTP_DEFAULTS,
    Failure,
    Guard,
    _set_global_tracking_uri,
    _sqlite_path,
    _truncate,
    health_probe,
    is_rank_zero,
    mlflow_key,
    resolve_tracking_uri,
)
from secateurs.tracking.recording import (
    TAG_SHA256,
    TAG_STEP,
    TAG_STUDENT,
    ModelRecorder,
    _as_number,
    _param_text,
    flatten,
)

log = logging.getLogger(__package__)

EXPERIMENT = "secateurs"

TAG_ROLE = "secateurs.role"  # "pipeline" on parent runs, "step" on step runs, "item" on runs nested in a step
TAG_CREATED_BY = "secateurs.created_by"  # on runs secateurs created (and therefore may end)
TAG_PIPELINE_RUN = "secateurs.pipeline_run"
MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's own nested-run tag


class Tracker:
    """One pipeline run's connection to MLflow: the experiment, the parent run, and the failures so far.

    The parent run is found in this order:
    1. `MLFLOW_RUN_ID` (set by the KFP MLflow plugin): if that run is itself nested, it is this task's step
       run and its parent is the pipeline run; otherwise it is the parent and steps nest under it.
    2. `pipeline_run`: the run tagged `secateurs.pipeline_run=<id>`, created by whichever step comes first.
       All steps of one pipeline run pass the same id (the KFP run id), so they share one parent.
    3. neither: a new parent run for this tracker alone (a step run by hand), ended by `close()`.

    Args:
        uri: tracking URI; see `resolve_tracking_uri` for the defaults.
        run_dir: directory of the local run, for the SQLite default `sqlite:///<run_dir>/mlflow.db`.
        experiment: experiment name (ignored when `MLFLOW_EXPERIMENT_ID` or `MLFLOW_RUN_ID` decide it).
        pipeline_run: identifier shared by all steps of one pipeline run.
        cooldown_s: after a connection error, training metrics are skipped (and recorded as not logged) for
            this long instead of each paying the HTTP retries again (see `Guard`).
    """

    def __init__(
        self,
        uri: str | None = None,
        *,
        run_dir: str | Path | None = None,
        experiment: str = EXPERIMENT,
        pipeline_run: str | None = None,
        cooldown_s: float = 60.0,
    ) -> None:
        self.uri = resolve_tracking_uri(uri, run_dir)
        if pipeline_run is not None and "'" in pipeline_run:
            raise ValueError(f"pipeline_run={pipeline_run!r} must not contain a single quote")
        self.experiment_name = experiment
        self.pipeline_run = pipeline_run
        self.guard = Guard(cooldown_s, probe=health_probe(self.uri))  # every MLflow call goes through it
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._task_run_id: str | None = None  # a step run created by the KFP plugin
        self._owns_parent = False
        self.active = is_rank_zero()
        if not self.active:
            return
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient

        # The fluent API (create_external_model) reads the global URI: set it, as transformers' callback does.
        _set_global_tracking_uri(self.uri)
        registry_uri = os.environ.get("MLFLOW_REGISTRY_URI") or self.uri
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=registry_uri)
        if self.guard("open the pipeline run", self._open_parent) is None:
            self.active = False  # failure recorded; the step goes on untracked

    @property
    def failures(self) -> list[Failure]:
        """What could not be logged so far, one `Failure` line each."""
        return self.guard.failures

    # ---------------------------------------------------------------------------------------------- lifecycle
    def _open_parent(self) -> str:
        env_run = os.environ.get("MLFLOW_RUN_ID")
        if env_run:
            run = self.client.get_run(env_run)
            self.experiment_id = run.info.experiment_id
            parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
            if parent:
                self._task_run_id, self.parent_run_id = env_run, parent
            else:
                self.parent_run_id = env_run
            return self.parent_run_id
        self.experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID") or self._experiment_id()
        tags = {TAG_ROLE: "pipeline", TAG_CREATED_BY: "secateurs"}
        if self.pipeline_run is None:
            run = self.client.create_run(self.experiment_id, tags=tags)
            self.parent_run_id, self._owns_parent = run.info.run_id, True
            return self.parent_run_id
        found = self._pipeline_runs()
        if found:
            self.parent_run_id = found[0].info.run_id
            return self.parent_run_id
        tags[TAG_PIPELINE_RUN] = self.pipeline_run
        mine = self.client.create_run(self.experiment_id, run_name=self.pipeline_run, tags=tags)
        # Parallel first steps may each have created one: the earliest wins, the others delete their own.
        winner = self._pipeline_runs()[0].info.run_id
        if winner != mine.info.run_id:
            self.client.delete_run(mine.info.run_id)
        self.parent_run_id = winner
        return winner

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        # With SQLite the default artifact root is ./mlruns relative to the working directory: keep artifacts
        # next to the database instead. A server chooses its own (artifact proxying).
        db = _sqlite_path(self.uri)
        location = (db.parent.absolute() / "mlartifacts").as_uri() if db is not None else None
        try:
            return self.client.create_experiment(self.experiment_name, artifact_location=location)
        except MlflowException:  # created meanwhile by a parallel step
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _pipeline_runs(self) -> list:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=(
                f"tags.`{TAG_PIPELINE_RUN}` = '{self.pipeline_run}' AND tags.`{TAG_ROLE}` = 'pipeline'"
            ),
            order_by=["attributes.start_time ASC"],
        )
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    @contextlib.contextmanager
    def step(self, name: str, student: str | None = None) -> Iterator[StepRun]:
        """Open the run of one step, nested under the pipeline run; end it (if created here) on exit.

        The run ends FINISHED, or FAILED when the block raises (the exception propagates). Metrics that could
        not be logged during the step are retried once before it ends.

        Args:
            name: the step (`import-model`, `prepare-data`, `correct-teacher`, `importance`, `prune`,
                `distill`, `evaluate`, `report`).
            student: the student this step works on, if any.
        """
        run = self._open_step(name, student)
        status = "FAILED"
        try:
            yield run
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            run._flush_pending()
            if run.run_id and run._owned:
                self.guard(f"end the run of step {name}", self.client.set_terminated, run.run_id, status)
            run._say_what_was_lost()

    def _open_step(self, name: str, student: str | None) -> StepRun:
        if not self.active:
            return StepRun(self, None, name, student, owned=False)
        tags = self._run_tags("step", name, student)
        if self._task_run_id:
            self.guard(f"tag the run of step {name}", self._set_tags, self._task_run_id, tags)
            return StepRun(self, self._task_run_id, name, student, owned=False)
        tags[MLFLOW_PARENT_RUN_ID] = self.parent_run_id
        tags[TAG_CREATED_BY] = "secateurs"
        run_name = f"{name}-{student}" if student else name
        run = self.guard(
            f"open the run of step {run_name}",
            self.client.create_run,
            self.experiment_id,
            run_name=run_name,
            tags=tags,
        )
        return StepRun(self, run.info.run_id if run else None, name, student, owned=run is not None)

    def _run_tags(self, role: str, step: str, student: str | None) -> dict[str, str]:
        """The tags that place a run: its role, its step, its student and its pipeline run."""
        tags = {TAG_ROLE: role, TAG_STEP: step}
        if student:
            tags[TAG_STUDENT] = student
        if self.pipeline_run:
            tags[TAG_PIPELINE_RUN] = self.pipeline_run
        return tags

    def close(self, status: str = "FINISHED") -> None:
        """End the parent run if this tracker created it for itself (no pipeline_run, no MLFLOW_RUN_ID)."""
        if self.active and self._owns_parent:
            self.guard("end the pipeline run", self.client.set_terminated, self.parent_run_id, status)
            self._owns_parent = False

    def finish_pipeline(self, status: str = "FINISHED") -> None:
        """End the shared pipeline run; for the last step (or an exit handler) of a pipeline.

        Only a parent run that secateurs created is ended: one made by the KFP MLflow plugin is the plugin's.
        """
        if not self.active:
            return
        run = self.guard("read the pipeline run", self.client.get_run, self.parent_run_id)
        if run is not None and run.data.tags.get(TAG_CREATED_BY) == "secateurs":
            self.guard("end the pipeline run", self.client.set_terminated, self.parent_run_id, status)
            self._owns_parent = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FINISHED" if exc_type is None else "FAILED")

    def failure_report(self) -> str:
        """What could not be logged, one line each ('' when everything was)."""
        return "\n".join(self.failures)

    def _set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self.client.log_batch(run_id, tags=_tags(tags), synchronous=True)

    # ------------------------------------------------------------------------------------------------ lookups
    def find_model(self, sha256: str) -> Any | None:
        """The newest LoggedModel recorded for the artifact with this content hash, or None."""
        if not self.active or not sha256:
            return None
        models = self.guard(
            "search models by content hash",
            self.client.search_logged_models,
            [self.experiment_id],
            filter_string=f"tags.`{TAG_SHA256}` = '{sha256}'",
            order_by=[{"field_name": "creation_time", "ascending": False}],
            max_results=1,
        )
        return models[0] if models else None


class StepRun(ModelRecorder):
    """The MLflow run of one step. Every method is a no-op when tracking is off (other ranks, no server)."""

    def __init__(
        self, tracker: Tracker, run_id: str | None, name: str, student: str | None, owned: bool
    ) -> None:
        self.tracker = tracker
        self.run_id = run_id
        self.name = name
        self.student = student
        self._owned = owned
        self._in_flight: tuple[str, list, Any] | None = None  # (what, metrics, RunOperations) sent async
        self._pending: list[tuple[Failure, list]] = []  # (failure, metrics) to retry at the end
        self._first_failure = len(tracker.failures)

    @property
    def failures(self) -> list[Failure]:
        """The tracker's failures since this step started."""
        return self.tracker.failures[self._first_failure :]

    @property
    def active(self) -> bool:
        return self.run_id is not None and self.tracker.active

    # ---------------------------------------------------------------------------------------- params, metrics
    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        """Log params: nested mappings flattened to dotted keys, values cut to MLflow's limit (`log_batch`
        sends them 100 a request)."""
        if not self.active:
            return
        flat = _params(params, prefix)
        if flat:
            what = f"log {len(flat)} param{'s' if len(flat) > 1 else ''}"
            self.tracker.guard(
                what, self.tracker.client.log_batch, self.run_id, params=flat, synchronous=True
            )

    def log_metrics(
        self, metrics: Mapping[str, Any], step: int | None = None, model_id: str | None = None
    ) -> None:
        """Log scalar metrics at `step`: the callback a training loop calls every few steps.

        Values that are not numbers (strings, None, booleans) are left out; 0-d tensors and numpy scalars are
        converted (NaN is kept: a diverging loss is worth seeing). A failure is recorded and the values are
        retried when the step ends.
        """
        if not self.active:
            return
        what = "metrics" + (f" step {step}" if step is not None else "")
        self._send_metrics(_metrics(metrics, step or 0, model_id), what)

    def _send_metrics(self, batch: list, what: str) -> None:
        """Hand `batch` to MLflow's async logging once the previous batch is settled; skipped (and kept for the
        retry) while the server is known to be down."""
        if not batch:
            return
        self.settle_metrics()
        before = len(self.tracker.failures)
        operations = self.tracker.guard(
            f"log {what}",
            self.tracker.client.log_batch,
            self.run_id,
            metrics=batch,
            synchronous=False,
            essential=False,
        )
        if operations is not None:
            self._in_flight = (what, batch, operations)
        elif len(self.tracker.failures) > before:
            self._pending.append((self.tracker.failures[-1], batch))

    def settle_metrics(self) -> None:
        """Wait for the batch in flight (sent one logging interval ago, so usually done) and record its outcome."""
        if self._in_flight is None:
            return
        (what, batch, operations), self._in_flight = self._in_flight, None
        before = len(self.tracker.failures)
        self.tracker.guard(f"log {what}", _wait, operations)
        if len(self.tracker.failures) > before:
            self._pending.append((self.tracker.failures[-1], batch))

    def _flush_pending(self) -> None:
        """Settle the batch in flight, then retry the metrics that failed during the step, once; drop their
        failure lines when they get through."""
        if not self.active:
            return
        self.settle_metrics()
        if not self._pending:
            return
        self.tracker.guard.down_until = 0.0  # one more try, whatever the cooldown says
        metrics = [m for _, batch in self._pending for m in batch]
        what = f"log {len(metrics)} metric value{'s' if len(metrics) > 1 else ''} that failed earlier"
        client = self.tracker.client
        if self.tracker.guard(
            what, lambda: client.log_batch(self.run_id, metrics=metrics, synchronous=True) or True
        ):
            for failure, _ in self._pending:
                with contextlib.suppress(ValueError):
                    self.tracker.failures.remove(failure)
            log.info(
                "mlflow: logged %d metric values that had failed earlier in step %s", len(metrics), self.name
            )
            self._pending = []

    def _say_what_was_lost(self) -> None:
        """One warning line naming everything this step could not log, and why (the last reason)."""
        retried = {id(failure) for failure, _ in self._pending}
        lost = [f for f in self.failures if id(f) not in retried]
        if lost:
            whats = ", ".join(dict.fromkeys(f.what for f in lost))
            log.warning("mlflow: step %s: could not %s (%s)", self.name, whats, lost[-1].reason)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.active:
            self.tracker.guard("set run tags", self.tracker._set_tags, self.run_id, tags)

    # ---------------------------------------------------------------------------------------- nested item runs
    def item_run(self, name: str, *, params: Mapping[str, Any] | None = None,
                 metrics: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None) -> str | None:  # fmt: skip
        """A run nested under this step's run for one of the things it weighs (a search candidate), holding its
        params, metrics and tags, ended FINISHED at once; later steps add to it with `log_item`. Its id, or None
        when tracking is off or MLflow refused it."""
        if not self.active:
            return None
        client = self.tracker.client
        placed = {**self.tracker._run_tags("item", self.name, self.student), MLFLOW_PARENT_RUN_ID: self.run_id,
                  TAG_CREATED_BY: "secateurs"}  # fmt: skip
        run = self.tracker.guard(f"open the run of {name}", client.create_run, self.tracker.experiment_id,
                                 run_name=name, tags=placed)  # fmt: skip
        if run is None:
            return None
        self.log_item(run.info.run_id, params=params, metrics=metrics, tags=tags)
        self.tracker.guard(f"end the run of {name}", client.set_terminated, run.info.run_id, "FINISHED")
        return run.info.run_id

    def log_item(self, run_id: str | None, *, params: Mapping[str, Any] | None = None,
                 metrics: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        """Add params, metrics (numbers only) and tags to an item run (`item_run`), e.g. a candidate's loss after
        its short distillation, logged by the step that distils it."""
        if not self.active or run_id is None:
            return
        batch = {"params": _params(params or {}), "metrics": _metrics(metrics or {}), "tags": _tags(tags or {})}
        if any(batch.values()):
            self.tracker.guard(f"log to item run {run_id}", self.tracker.client.log_batch, run_id, **batch,
                               synchronous=True)  # fmt: skip


def _params(params: Mapping[str, Any], prefix: str = "") -> list:
    """MLflow Params: nested mappings flattened to dotted keys, values cut to MLflow's limit."""
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    return [Param(mlflow_key(k), _truncate(_param_text(v), MAX_PARAM_VAL_LENGTH))
            for k, v in flatten(params, prefix).items()]  # fmt: skip


def _metrics(metrics: Mapping[str, Any], step: int = 0, model_id: str | None = None) -> list:
    """MLflow Metrics at `step`, now: the numbers among the flattened values (see `StepRun.log_metrics`)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    numbers = {k: _as_number(v) for k, v in flatten(metrics).items()}
    return [Metric(mlflow_key(k), v, now, step, model_id=model_id) for k, v in numbers.items() if v is not None]


def _tags(tags: Mapping[str, Any]) -> list:
    """MLflow RunTags, values cut to MLflow's limit."""
    from mlflow.entities import RunTag
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    return [RunTag(mlflow_key(k), _truncate(str(v), MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]


def _wait(operations: Any) -> None:
    """Wait for MLflow async logging operations, raising a failed one's own exception: `RunOperations.wait()`
    raises a new MlflowException that has lost the cause (ConnectionError, timeout) the guard needs."""
    futures = getattr(operations, "_operation_futures", None)
    if futures is None:
        operations.wait()
    for future in futures or ():
        future.result()
