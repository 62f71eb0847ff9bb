"""MLflow tracking and lineage for secateurs runs.

Consumes: artifact directories with their `secateurs.json` manifests (see `secateurs.manifest`), and metrics
that steps report while they run (training curves).

Produces, in MLflow:
- one parent run per pipeline run and one nested run per step, tagged `secateurs.step` / `secateurs.student`;
  each step run holds the step's resolved config as params, its report numbers as metrics, its input datasets
  (`log_input`, digest = the artifact's content hash) and input models (`LoggedModelInput` edges), and its
  manifest as an artifact;
- one LoggedModel per model artifact (teacher, corrected teacher, pruned student, distilled student). The
  weights stay where the step wrote them (local disk or S3): the model is an *external* LoggedModel that
  records the URI, the content hash, the shape and the parameter count, and names the model it came from in
  the tags `secateurs.parent_model_id` / `secateurs.parent_uri` (the MLflow UI draws no lineage graph, tags
  are readable anywhere);
- one registered model version per distilled student, tagged with its teacher, shape, parameter count, tokens
  seen and, once evaluated, its scores.

Guarantees:
- Tracking never stops a step. Every MLflow call goes through `Tracker._guarded`: on a connection error or an
  MLflow error it logs one warning line ("mlflow: could not log metrics step 120 (ConnectionError: ...)"),
  records it in `Tracker.failures` and carries on. Metrics that failed are retried once when the step ends.
  HTTP retries and timeouts are shortened (unless set) so an outage costs seconds, not the client's default
  minutes of backoff, and after a connection error training metrics are skipped for `cooldown_s`.
- Only rank 0 logs (`RANK`, else `LOCAL_RANK`); other ranks get a tracker that does nothing.
- Runs are ended only by whoever created them: a step run that the KFP MLflow plugin created (`MLFLOW_RUN_ID`)
  is used as is and left to the plugin to close.

A pipeline step uses it in three lines::

    tracker = Tracker(tracking_uri, pipeline_run=kfp_run_id)
    with tracker.step("distill", student="width") as run:
        report = distill.run(..., on_metrics=run.log_metrics)
        run.record(out_dir)

or, for a step with nothing to log while it runs, `record_step(tracker, "prune", out_dir, student="width")`,
and `lineage(model_or_run_or_name)` walks the recorded chain back to the teacher.

mlflow is imported inside the functions that use it, so `secateurs` imports without it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import posixpath
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from secateurs.manifest import MANIFEST, content_hash, read_manifest
from secateurs.steps import BY_NAME

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

EXPERIMENT = "secateurs"

# Tags secateurs writes. Dotted keys need backticks in MLflow filters: tags.`secateurs.sha256` = '...'.
TAG_ROLE = "secateurs.role"  # "pipeline" on parent runs, "step" on step runs
TAG_CREATED_BY = "secateurs.created_by"  # on runs secateurs created (and therefore may end)
TAG_PIPELINE_RUN = "secateurs.pipeline_run"
TAG_STEP = "secateurs.step"
TAG_STUDENT = "secateurs.student"
TAG_URI = "secateurs.uri"
TAG_SHA256 = "secateurs.sha256"
TAG_PARENT_MODEL_ID = "secateurs.parent_model_id"
TAG_PARENT_URI = "secateurs.parent_uri"
TAG_TEACHER_MODEL_ID = "secateurs.teacher_model_id"
TAG_REGISTERED = "secateurs.registered_model"  # "name/version"
MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's own nested-run tag

# MLflow's server-side limits (mlflow/utils/validation.py in 3.17).
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_DATASET_DIGEST_LENGTH = 36

# The MLflow client retries 7 times with a backoff factor of 2 and a 120 s timeout by default: minutes per
# call when the server is down. A training step would stall that long at every logging interval.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}

# Which model input a step's output model was made from, in order of preference. The distillation teacher is
# an input too (an edge), but the student it distils into descends from the pruned student.
PARENT_INPUTS = ("student", "model", "base", "teacher")
# Config keys that describe a checkpoint's shape (transformers' vocabulary).
SHAPE_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
)


class TrackingUnreachable(ConnectionError):
    """The MLflow tracking backend cannot be reached (raised by `check_reachable` only)."""


def resolve_tracking_uri(uri: str | None = None, run_dir: str | Path | None = None) -> str:
    """The tracking URI to use: `uri`, else `MLFLOW_TRACKING_URI`, else SQLite under `run_dir`.

    A bare path ending in `.db` is read as a SQLite file. The file store (`file:` URIs, plain directories)
    errors out since MLflow 3.13, so it is refused here with the fix in the message.

    Raises:
        ValueError: no URI can be derived, or the URI names the file store.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        if run_dir is None:
            raise ValueError(
                "no MLflow tracking URI: pass one, set MLFLOW_TRACKING_URI, or give a run directory for "
                "sqlite:///<run_dir>/mlflow.db"
            )
        return f"sqlite:///{(Path(run_dir).absolute() / 'mlflow.db')}"
    scheme = urlparse(uri).scheme
    if not scheme and uri.endswith(".db"):
        return f"sqlite:///{Path(uri).absolute()}"
    if scheme in ("", "file"):
        raise ValueError(
            f"MLflow tracking URI {uri!r} names the file store, which MLflow 3.13+ no longer supports: "
            "use sqlite:///path/mlflow.db or an http(s):// tracking server"
        )
    return uri


def _set_global_tracking_uri(uri: str) -> None:
    """mlflow.set_tracking_uri, without the MLFLOW_TRACKING_URI it also exports: left set, it would become the
    tracking URI of every later run this process starts (a second `run` with another run directory, in tests)."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Check before any compute that the tracking backend answers.

    http(s): GET `<uri>/health`; sqlite: the database's directory exists or can be created and is writable.
    Other schemes (databricks, ...) are not checked.

    Raises:
        TrackingUnreachable: with a one-line reason, e.g.
            "MLflow tracking server at http://mlflow:5000 is unreachable: ConnectionError: ...".
    """
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        import requests

        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as exc:
            raise TrackingUnreachable(
                f"MLflow tracking server at {uri} is unreachable: {_describe(exc)}"
            ) from exc
        if response.status_code != 200:
            hint = (
                " (the server refuses this host name: add it to --allowed-hosts /"
                " MLFLOW_SERVER_ALLOWED_HOSTS)"
                if response.status_code == 403
                else ""
            )
            raise TrackingUnreachable(
                f"MLflow tracking server at {uri} is unreachable: /health answered HTTP "
                f"{response.status_code}"
                f"{hint}"
            )
    elif scheme == "sqlite":
        db = _sqlite_path(uri)
        if db is None:
            return
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingUnreachable(f"MLflow SQLite store {uri} is unusable: {_describe(exc)}") from exc
        if not os.access(db.parent, os.W_OK):
            raise TrackingUnreachable(f"MLflow SQLite store {uri} is unusable: {db.parent} is not writable")


def is_rank_zero() -> bool:
    """True unless `RANK` (or, without it, `LOCAL_RANK`) names another process of a distributed job."""
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    return rank.strip() in ("", "0")


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
        run_name: name of the parent run when this tracker creates it.
        cooldown_s: after a connection error, training metrics are skipped (and recorded as not logged) for
            this long instead of each paying the HTTP retries again.
    """

    def __init__(
        self,
        uri: str | None = None,
        *,
        run_dir: str | Path | None = None,
        experiment: str = EXPERIMENT,
        pipeline_run: str | None = None,
        run_name: str | None = None,
        cooldown_s: float = 60.0,
    ) -> None:
        self.uri = resolve_tracking_uri(uri, run_dir)
        if pipeline_run is not None and "'" in pipeline_run:
            raise ValueError(f"pipeline_run={pipeline_run!r} must not contain a single quote")
        self.experiment_name = experiment
        self.pipeline_run = pipeline_run
        self.cooldown_s = cooldown_s
        self.failures: list[str] = []
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._task_run_id: str | None = None  # a step run created by the KFP plugin
        self._owns_parent = False
        self._down_until = 0.0
        self._warned_skip_until = 0.0
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
        if self._guarded("open the pipeline run", self._open_parent, run_name) is None:
            self.active = False  # failure recorded; the step goes on untracked

    # ---------------------------------------------------------------------------------------------- lifecycle
    def _open_parent(self, run_name: str | None) -> str:
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
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            self.parent_run_id, self._owns_parent = run.info.run_id, True
            return self.parent_run_id
        found = self._pipeline_runs()
        if found:
            self.parent_run_id = found[0].info.run_id
            return self.parent_run_id
        tags[TAG_PIPELINE_RUN] = self.pipeline_run
        mine = self.client.create_run(self.experiment_id, run_name=run_name or self.pipeline_run, tags=tags)
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
    def step(
        self, name: str, student: str | None = None, params: Mapping[str, Any] | None = None
    ) -> Iterator[StepRun]:
        """Open the run of one step, nested under the pipeline run; end it (if created here) on exit.

        The run ends FINISHED, or FAILED when the block raises (the exception propagates). Metrics that could
        not be logged during the step are retried once before it ends.

        Args:
            name: the step (`import-model`, `prepare-data`, `correct-teacher`, `importance`, `prune`,
                `distill`, `evaluate`, `report`).
            student: the student this step works on, if any.
            params: params to log right away (flattened like a manifest's config).
        """
        run = self._open_step(name, student)
        if params:
            run.log_params(params)
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
                self._guarded(f"end the run of step {name}", self.client.set_terminated, run.run_id, status)
            if run.failures:
                log.warning("mlflow: step %s: %d tracking call(s) failed, see above", name, len(run.failures))

    def _open_step(self, name: str, student: str | None) -> StepRun:
        if not self.active:
            return StepRun(self, None, name, student, owned=False)
        tags = {TAG_ROLE: "step", TAG_STEP: name}
        if student:
            tags[TAG_STUDENT] = student
        if self.pipeline_run:
            tags[TAG_PIPELINE_RUN] = self.pipeline_run
        if self._task_run_id:
            self._guarded(f"tag the run of step {name}", self._set_tags, self._task_run_id, tags)
            return StepRun(self, self._task_run_id, name, student, owned=False)
        tags[MLFLOW_PARENT_RUN_ID] = self.parent_run_id
        tags[TAG_CREATED_BY] = "secateurs"
        run_name = f"{name}-{student}" if student else name
        run = self._guarded(
            f"open the run of step {run_name}",
            self.client.create_run,
            self.experiment_id,
            run_name=run_name,
            tags=tags,
        )
        return StepRun(self, run.info.run_id if run else None, name, student, owned=run is not None)

    def close(self, status: str = "FINISHED") -> None:
        """End the parent run if this tracker created it for itself (no pipeline_run, no MLFLOW_RUN_ID)."""
        if self.active and self._owns_parent:
            self._guarded("end the pipeline run", self.client.set_terminated, self.parent_run_id, status)
            self._owns_parent = False

    def finish_pipeline(self, status: str = "FINISHED") -> None:
        """End the shared pipeline run; for the last step (or an exit handler) of a pipeline.

        Only a parent run that secateurs created is ended: one made by the KFP MLflow plugin is the plugin's.
        """
        if not self.active:
            return
        run = self._guarded("read the pipeline run", self.client.get_run, self.parent_run_id)
        if run is not None and run.data.tags.get(TAG_CREATED_BY) == "secateurs":
            self._guarded("end the pipeline run", self.client.set_terminated, self.parent_run_id, status)
            self._owns_parent = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FINISHED" if exc_type is None else "FAILED")

    def failure_report(self) -> str:
        """What could not be logged, one line each ('' when everything was)."""
        return "\n".join(self.failures)

    # ------------------------------------------------------------------------------------------------- guard
    def _guarded(
        self, what: str, fn: Callable[..., Any], *args: Any, essential: bool = True, **kwargs: Any
    ) -> Any:
        """Call `fn`; on a tracking error warn, record `what` in `failures` and return None.

        Non-essential calls (training metrics) are skipped without a network round trip while the server is
        known to be down; essential ones (runs, models, the final report) always try.
        """
        now = time.monotonic()
        if not essential and now < self._down_until:
            message = f"mlflow: could not {what} (server unreachable, skipped)"
            self.failures.append(message)
            if now >= self._warned_skip_until:
                log.warning("%s; skipping training metrics for up to %.0f s", message, self._down_until - now)
                self._warned_skip_until = self._down_until
            return None
        try:
            return fn(*args, **kwargs)
        except _tracking_errors() as exc:
            if _is_connection_error(exc):
                self._down_until = time.monotonic() + self.cooldown_s
            message = f"mlflow: could not {what} ({_describe(exc)})"
            self.failures.append(message)
            log.warning(message)
            return None

    def _set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(
            run_id,
            tags=[RunTag(mlflow_key(k), _truncate(str(v), MAX_TAG_VALUE_LENGTH)) for k, v in tags.items()],
        )

    # ------------------------------------------------------------------------------------------------ lookups
    def find_model(self, sha256: str) -> Any | None:
        """The newest LoggedModel recorded for the artifact with this content hash, or None."""
        if not self.active or not sha256:
            return None
        models = self._guarded(
            "search models by content hash",
            self.client.search_logged_models,
            [self.experiment_id],
            filter_string=f"tags.`{TAG_SHA256}` = '{sha256}'",
            order_by=[{"field_name": "creation_time", "ascending": False}],
            max_results=1,
        )
        return models[0] if models else None


@dataclass
class StepRecord:
    """What `StepRun.record` logged: the output model (if any) and the models it read."""

    run_id: str | None
    model_id: str | None = None
    parent_model_id: str | None = None
    input_model_ids: dict[str, str] = field(default_factory=dict)
    registered: str | None = None  # "name/version"


class StepRun:
    """The MLflow run of one step. Every method is a no-op when tracking is off (other ranks, no server)."""

    def __init__(
        self, tracker: Tracker, run_id: str | None, name: str, student: str | None, owned: bool
    ) -> None:
        self.tracker = tracker
        self.run_id = run_id
        self.name = name
        self.student = student
        self._owned = owned
        self._pending: list[tuple[str, list]] = []  # (failure message, metrics) to retry at the end
        self._first_failure = len(tracker.failures)

    @property
    def failures(self) -> list[str]:
        """The tracker's failures since this step started."""
        return self.tracker.failures[self._first_failure :]

    @property
    def active(self) -> bool:
        return self.run_id is not None and self.tracker.active

    # ---------------------------------------------------------------------------------------- params, metrics
    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        """Log params: nested mappings flattened to dotted keys, 100 a call, values cut to MLflow's limit."""
        if not self.active:
            return
        from mlflow.entities import Param

        flat = [
            Param(mlflow_key(key), _truncate(_param_text(value), MAX_PARAM_VALUE_LENGTH))
            for key, value in flatten(params, prefix).items()
        ]
        for i in range(0, len(flat), MAX_PARAMS_PER_BATCH):
            batch = flat[i : i + MAX_PARAMS_PER_BATCH]
            self.tracker._guarded(
                f"log params {batch[0].key}..", self.tracker.client.log_batch, self.run_id, params=batch
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
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for key, value in flatten(metrics).items():
            number = _as_number(value)
            if number is not None:
                batch.append(Metric(mlflow_key(key), number, now, step or 0, model_id=model_id))
        self._send_metrics(batch, "metrics" + (f" step {step}" if step is not None else ""))

    def _send_metrics(self, batch: list, what: str) -> None:
        for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
            chunk = batch[i : i + MAX_METRICS_PER_BATCH]
            before = len(self.tracker.failures)
            self.tracker._guarded(
                f"log {what}", self.tracker.client.log_batch, self.run_id, metrics=chunk, essential=False
            )
            if len(self.tracker.failures) > before:
                self._pending.append((self.tracker.failures[-1], chunk))

    def _flush_pending(self) -> None:
        """Retry metrics that failed during the step; drop their failure lines when they get through."""
        if not self.active or not self._pending:
            return
        pending, self._pending = self._pending, []
        self.tracker._down_until = 0.0  # one more try, whatever the cooldown says
        metrics = [m for _, chunk in pending for m in chunk]
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            sent = self.tracker._guarded(
                f"log {len(metrics)} metric values that failed earlier in step {self.name}",
                lambda chunk: self.tracker.client.log_batch(self.run_id, metrics=chunk) or True,
                metrics[i : i + MAX_METRICS_PER_BATCH],
            )
            if not sent:
                return
        for message, _ in pending:
            with contextlib.suppress(ValueError):
                self.tracker.failures.remove(message)
        log.info(
            "mlflow: logged %d metric values that had failed earlier in step %s", len(metrics), self.name
        )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.active:
            self.tracker._guarded("set run tags", self.tracker._set_tags, self.run_id, tags)

    # --------------------------------------------------------------------------------------- inputs, outputs
    def log_dataset(
        self,
        uri: str,
        sha256: str | None,
        name: str,
        context: str = "training",
    ) -> None:
        """Record a dataset artifact as an input of this run.

        Args:
            uri: where the dataset lives (local path, s3://...): the dataset's source.
            sha256: its content hash (the manifest's); MLflow keeps the first 36 characters as the digest
                (its limit), the full hash goes into the input tag `secateurs.sha256`.
            name: the dataset's name in MLflow.
            context: what the step used it for (MLflow's `mlflow.data.context` input tag).
        """
        if not self.active:
            return
        entity = self.tracker._guarded(f"describe dataset {name}", _dataset_entity, uri, sha256, name)
        if entity is None:
            return
        from mlflow.entities import DatasetInput, InputTag

        tags = [InputTag("mlflow.data.context", context)]
        if sha256:
            tags.append(InputTag(TAG_SHA256, sha256))
        self.tracker._guarded(
            f"log input dataset {name}",
            self.tracker.client.log_inputs,
            self.run_id,
            datasets=[DatasetInput(entity, tags)],
        )

    def log_blend(self, path: str | Path, context: str, uri: str | None = None) -> None:
        """Record each source of a prepared dataset as an input dataset of this run: named after the source, its
        digest the hash of the documents read from it, its MLflow source where its shards live (the dataset's
        URI / the source's name), and in its profile the origin, weight, realised share, documents and tokens."""
        if not self.active:
            return
        from mlflow.entities import DatasetInput, InputTag

        uri = str(uri or path)
        inputs = []
        for source in _blend_sources(path):
            entity = self.tracker._guarded(
                f"describe dataset {source['name']}", _dataset_entity, f"{uri.rstrip('/')}/{source['name']}",
                source["content_sha256"], source["name"], source["profile"],
            )  # fmt: skip
            if entity is not None:
                tags = [InputTag("mlflow.data.context", context), InputTag(TAG_SHA256, source["content_sha256"])]
                inputs.append(DatasetInput(entity, tags))
        if inputs:
            self.tracker._guarded("log input datasets", self.tracker.client.log_inputs, self.run_id, datasets=inputs)

    def log_input_model(self, model_id: str) -> None:
        """Draw the edge model -> this run (`LoggedModelInput`)."""
        if not self.active:
            return
        from mlflow.entities import LoggedModelInput

        self.tracker._guarded(
            f"log input model {model_id}",
            self.tracker.client.log_inputs,
            self.run_id,
            models=[LoggedModelInput(model_id)],
        )

    def log_model(
        self,
        uri: str,
        sha256: str,
        name: str,
        *,
        path: str | Path | None = None,
        parent: Any | None = None,
        teacher: Any | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Create the LoggedModel of a checkpoint that stays where it is (an external model), output of this
        run.

        Args:
            uri: where the checkpoint lives; recorded as tag `secateurs.uri`, weights are not copied.
            sha256: its content hash, tag `secateurs.sha256` (how later steps find this model).
            name: the LoggedModel's name (`teacher`, `width-pruned`, ...).
            path: a local copy, to read the shape from config.json and count parameters from safetensors
                headers.
            parent: the LoggedModel it was made from; tags `secateurs.parent_model_id` /
                `secateurs.parent_uri`.
            teacher: the LoggedModel that taught it (distillation), tag `secateurs.teacher_model_id`.
            params: extra params for the model.
            tags: extra tags for the model.

        Returns:
            The model id, or None when it could not be logged.
        """
        if not self.active:
            return None
        model_params = checkpoint_params(path) if path is not None else {}
        model_params.update({k: _param_text(v) for k, v in (params or {}).items()})
        model_tags = {TAG_URI: uri, TAG_SHA256: sha256, TAG_STEP: self.name}
        if self.student:
            model_tags[TAG_STUDENT] = self.student
        if parent is not None:
            model_tags[TAG_PARENT_MODEL_ID] = parent.model_id
            model_tags[TAG_PARENT_URI] = parent.tags.get(TAG_URI, "")
        if teacher is not None:
            model_tags[TAG_TEACHER_MODEL_ID] = teacher.model_id
        model_tags.update({k: str(v) for k, v in (tags or {}).items()})
        model_tags = {k: _truncate(v, MAX_TAG_VALUE_LENGTH) for k, v in model_tags.items()}
        model_params = {mlflow_key(k): _truncate(v, MAX_PARAM_VALUE_LENGTH) for k, v in model_params.items()}
        model = self.tracker._guarded(
            f"log model {name}", self._create_external_model, name, model_tags, model_params
        )
        if model is None:
            return None
        from mlflow.entities import LoggedModelOutput

        self.tracker._guarded(
            f"log model {name} as output",
            self.tracker.client.log_outputs,
            self.run_id,
            [LoggedModelOutput(model.model_id, step=0)],
        )
        return model.model_id

    def _create_external_model(self, name: str, tags: dict[str, str], params: dict[str, str]) -> Any:
        import mlflow

        _set_global_tracking_uri(self.tracker.uri)  # create_external_model uses the global client
        return mlflow.create_external_model(
            name=name,
            source_run_id=self.run_id,
            tags=tags,
            params=params,
            model_type="hf-causal-lm",
            experiment_id=self.tracker.experiment_id,
        )

    def log_files(self, paths: list[str | Path], artifact_path: str | None = None) -> None:
        """Upload small files (manifests, JSON reports) to the run's artifacts."""
        if not self.active:
            return
        for p in paths:
            self.tracker._guarded(
                f"log artifact {Path(p).name}",
                self.tracker.client.log_artifact,
                self.run_id,
                str(p),
                artifact_path,
            )

    def register(self, model_id: str, name: str, tags: Mapping[str, Any] | None = None) -> str | None:
        """Register a LoggedModel as a new version of registered model `name`; returns "name/version"."""
        if not self.active:
            return None
        version = self.tracker._guarded(f"register model {name}", self._register, model_id, name, tags or {})
        if version is None:
            return None
        ref = f"{name}/{version.version}"
        self.tracker._guarded(
            f"tag model {model_id}",
            self.tracker.client.set_logged_model_tags,
            model_id,
            {TAG_REGISTERED: ref},
        )
        return ref

    def _register(self, model_id: str, name: str, tags: Mapping[str, Any]) -> Any:
        from mlflow.exceptions import MlflowException

        client = self.tracker.client
        try:
            client.create_registered_model(name, tags={"secateurs": "student"})
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        return client.create_model_version(
            name,
            source=f"models:/{model_id}",
            run_id=self.run_id,
            tags={k: _truncate(str(v), MAX_TAG_VALUE_LENGTH) for k, v in tags.items()},
            model_id=model_id,
            await_creation_for=0,
        )

    # ---------------------------------------------------------------------------------------------- manifests
    def record(
        self,
        out_dir: str | Path,
        *,
        uri: str | None = None,
        model_name: str | None = None,
        parent_input: str | None = None,
        register_as: str | None = None,
    ) -> StepRecord:
        """Log what a step's manifest says: config, report, inputs, and the output model if it is one.

        - `config` -> params (flattened, 100 per call, truncated); `report` numbers -> metrics (lists of
          numbers -> one value per step), other report scalars -> params `report.*`.
        - each input -> tag `secateurs.input.<name>` = "uri sha256"; inputs that are recorded LoggedModels
          (found by content hash) -> model edges; other inputs with a hash that are not checkpoints ->
          datasets (context = the input's name).
        - out_dir with a config.json -> an external LoggedModel named after the step (the registry's
          `StepSpec.model`) whose parent is the input `parent_input` (default: the first of `PARENT_INPUTS` that
          is a recorded model); for a step whose spec says `registered` (distill) it is also registered as
          `register_as` (default: "<experiment>-<student>").
        - for steps that score their input (`StepSpec.scores_input`: evaluation), the report's numbers also go
          to the model read (the parent input), and onto its registered version as `score.*` tags when it has one.
        - the manifest (and small JSON reports of non-model artifacts) -> run artifacts.

        Args:
            out_dir: the step's output directory (local).
            uri: where the output lives for later readers (an S3 URI on a cluster); default: out_dir.
            model_name: LoggedModel name, default from the step registry.
            parent_input: name of the manifest input the output model was made from.
            register_as: registered model name for the output model (also for steps the registry does not register).

        Raises:
            ValueError: out_dir has no manifest (checked before anything is logged).
        """
        out_dir = Path(out_dir)
        manifest = read_manifest(out_dir)
        if not manifest:
            raise ValueError(f"{out_dir} has no {MANIFEST}: not an artifact written by a secateurs step")
        record = StepRecord(self.run_id)
        if not self.active:
            return record
        uri = uri or str(out_dir.absolute())
        sha256 = content_hash(out_dir)
        self.log_params(manifest.get("config") or {})
        numbers, texts = split_report(manifest.get("report") or {})
        self.log_params(texts, prefix="report")
        self.set_tags({"secateurs.output_uri": uri, "secateurs.output_sha256": sha256, TAG_STEP: self.name})

        inputs = manifest.get("inputs") or {}
        models: dict[str, Any] = {}
        self.set_tags(
            {
                f"secateurs.input.{k}": f"{v.get('uri', '')} {v.get('sha256') or ''}".strip()
                for k, v in inputs.items()
            }
        )
        for input_name, spec in inputs.items():
            in_uri, in_sha = str(spec.get("uri", "")), spec.get("sha256") or ""
            model = self.tracker.find_model(in_sha)
            if model is not None:
                models[input_name] = model
                self.log_input_model(model.model_id)
            elif in_sha and _blend_sources(in_uri):
                self.log_blend(in_uri, context=input_name)
            elif in_sha and not (Path(in_uri) / "config.json").is_file():
                self.log_dataset(in_uri, in_sha, input_name, context=input_name)
        record.input_model_ids = {k: m.model_id for k, m in models.items()}
        spec = BY_NAME.get(self.name)
        parent_key = parent_input or next((k for k in PARENT_INPUTS if k in models), None)
        if parent_key is None and len(models) == 1:
            parent_key = next(iter(models))
        parent = models.get(parent_key) if parent_key else None
        record.parent_model_id = parent.model_id if parent is not None else None

        if _blend_sources(out_dir):  # prepare-data: the sources it read are the run's datasets
            self.log_blend(out_dir, context="source", uri=uri)
        files = [out_dir / MANIFEST]
        if (out_dir / "config.json").is_file():
            teacher = models.get("teacher") if parent_key != "teacher" else None
            name = model_name or (spec.model if spec and spec.model else "{student}-" + self.name)
            name = name.format(student=self.student or "model")
            record.model_id = self.log_model(uri, sha256, name, path=out_dir, parent=parent, teacher=teacher)
            # Logged with the model id, the report's metrics show on the run and on the model.
            self._log_report_metrics(numbers, model_id=record.model_id)
            if record.model_id and (register_as or (spec is not None and spec.registered)):
                registry_name = register_as or f"{self.tracker.experiment_name}-{self.student or name}"
                record.registered = self.register(
                    record.model_id,
                    registry_name,
                    self._version_tags(out_dir, uri, sha256, numbers, teacher or parent),
                )
        else:
            files += sorted(
                p for p in out_dir.glob("*.json") if p.name != MANIFEST and p.stat().st_size < 1 << 20
            )
            scored = parent if spec is not None and spec.scores_input else None
            self._log_report_metrics(numbers, model_id=scored.model_id if scored is not None else None)
            if scored is not None:
                self._tag_registered_scores(scored.model_id, numbers)
        self.log_files(files)
        return record

    def _log_report_metrics(self, numbers: Mapping[str, Any], model_id: str | None = None) -> None:
        if not numbers:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for key, value in numbers.items():
            # A list is a series (per epoch, per layer): one value per step.
            for step, v in enumerate(value) if isinstance(value, list) else [(0, value)]:
                batch.append(Metric(mlflow_key(key), float(v), now, step, model_id=model_id))
        self._send_metrics(batch, "report metrics")

    def _version_tags(
        self, out_dir: Path, uri: str, sha256: str, numbers: Mapping[str, Any], teacher: Any
    ) -> dict[str, Any]:
        shape = checkpoint_params(out_dir)
        tags = {
            "student": self.student or "",
            "shape": shape.get("shape", ""),
            "parameters": shape.get("parameters", ""),
            "uri": uri,
            "sha256": sha256,
        }
        if teacher is not None:
            tags["teacher"] = teacher.tags.get(TAG_URI, teacher.name)
            tags["teacher_model_id"] = teacher.model_id
        for key in ("tokens_seen", "tokens"):
            if key in numbers and not isinstance(numbers[key], list):
                tags["tokens_seen"] = numbers[key]
                break
        return tags

    def _tag_registered_scores(self, model_id: str, numbers: Mapping[str, Any]) -> None:
        model = self.tracker._guarded(
            f"read model {model_id}", self.tracker.client.get_logged_model, model_id
        )
        ref = model.tags.get(TAG_REGISTERED) if model is not None else None
        if not ref:
            return
        name, version = ref.rsplit("/", 1)
        for key, value in numbers.items():
            if not isinstance(value, list):
                self.tracker._guarded(
                    f"tag {ref} with score {key}",
                    self.tracker.client.set_model_version_tag,
                    name,
                    version,
                    mlflow_key(f"score.{key}"),
                    str(value),
                )


def record_step(
    tracker: Tracker,
    step: str,
    out_dir: str | Path,
    student: str | None = None,
    **record_kwargs: Any,
) -> StepRecord:
    """Open the run of `step`, log the manifest of `out_dir` into it (see `StepRun.record`), end it.

    For steps with nothing to log while they run. Raises ValueError (before logging) if out_dir has no
    manifest.
    """
    if not read_manifest(out_dir):
        raise ValueError(f"{out_dir} has no {MANIFEST}: not an artifact written by a secateurs step")
    with tracker.step(step, student) as run:
        return run.record(out_dir, **record_kwargs)


# ---------------------------------------------------------------------------------------------------- lineage
def lineage(
    ref: str | Path, uri: str | None = None, run_dir: str | Path | None = None
) -> list[dict[str, Any]]:
    """The chain of models from `ref` back to the teacher, newest first.

    Args:
        ref: a LoggedModel id (`m-...`, `models:/m-...`), a registered model (`name`, `name/3`,
            `models:/name/3`; a bare name means its newest version), a run id (the model the run produced; for
            a step run without one, e.g. evaluate, the model it read), or a local artifact directory (found by
            content hash).
        uri, run_dir: where to look; see `resolve_tracking_uri`.

    Returns:
        One dict per model: model_id, name, step, student, uri, sha256, run_id, registered ("name/version" or
        None), params (the model's params: shape, parameters, ...).

    Raises:
        ValueError: `ref` names nothing recorded, or a run that produced several models (they are listed).
    """
    from mlflow import MlflowClient

    tracking_uri = resolve_tracking_uri(uri, run_dir)
    client = MlflowClient(
        tracking_uri=tracking_uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri
    )
    model = _resolve_model(client, str(ref))
    chain, seen = [], set()
    while model is not None and model.model_id not in seen:
        seen.add(model.model_id)
        chain.append(
            {
                "model_id": model.model_id,
                "name": model.name,
                "step": model.tags.get(TAG_STEP),
                "student": model.tags.get(TAG_STUDENT),
                "uri": model.tags.get(TAG_URI),
                "sha256": model.tags.get(TAG_SHA256),
                "run_id": model.source_run_id,
                "registered": model.tags.get(TAG_REGISTERED),
                "params": dict(model.params),
            }
        )
        parent_id = model.tags.get(TAG_PARENT_MODEL_ID)
        model = client.get_logged_model(parent_id) if parent_id else None
    return chain


def format_lineage(chain: list[dict[str, Any]]) -> str:
    """A table of a `lineage` chain, newest first, one model per line, each made from the one below it."""
    if not chain:
        return "(no recorded models)"
    rows = [("", "model", "step", "id", "parameters", "shape", "registered", "uri")]
    for i, m in enumerate(chain):
        params = m.get("params") or {}
        parameters = params.get("parameters", "")
        rows.append(
            (
                "" if i == 0 else "<-",
                m.get("name") or "",
                m.get("step") or "",
                m.get("model_id") or "",
                _human_count(parameters) if parameters else "",
                params.get("shape", ""),
                m.get("registered") or "",
                m.get("uri") or "",
            )
        )
    widths = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def _resolve_model(client: Any, ref: str) -> Any:
    from mlflow.exceptions import MlflowException

    ref = ref.removeprefix("models:/")
    if ref.startswith("m-"):
        return client.get_logged_model(ref)
    experiment_ids = [e.experiment_id for e in _all_experiments(client)]
    path = Path(ref)
    if path.is_dir():
        sha = content_hash(path)
        found = client.search_logged_models(
            experiment_ids,
            filter_string=f"tags.`{TAG_SHA256}` = '{sha}'",
            order_by=[{"field_name": "creation_time", "ascending": False}],
            max_results=1,
        )
        if not found:
            raise ValueError(f"no recorded model has the content of {ref} (sha256 {sha[:12]})")
        return found[0]
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        with contextlib.suppress(MlflowException):
            return _model_of_run(client, client.get_run(ref), experiment_ids)
    name, _, version = ref.partition("/")
    if "'" in name:
        raise ValueError(f"{ref!r}: not a model id, run id, registered model or artifact directory")
    if version:
        mv = client.get_model_version(name, version)
    else:
        versions = client.search_model_versions(
            f"name = '{name}'", order_by=["version_number DESC"], max_results=1
        )
        if not versions:
            raise ValueError(f"{ref!r}: not a model id, run id, registered model or artifact directory")
        mv = versions[0]
    # The SQL registry keeps the model id only in the version's source ("models:/m-..."), not in model_id.
    model_id = mv.model_id or (
        mv.source.removeprefix("models:/") if mv.source.startswith("models:/m-") else None
    )
    if not model_id:
        raise ValueError(f"registered model {name}/{mv.version} has no logged model to trace")
    return client.get_logged_model(model_id)


def _model_of_run(client: Any, run: Any, experiment_ids: list[str]) -> Any:
    run_id = run.info.run_id
    models = client.search_logged_models(experiment_ids, filter_string=f"source_run_id = '{run_id}'")
    if not models:  # a pipeline run: the models of its steps
        children = client.search_runs(
            experiment_ids, filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}'"
        )
        for child in children:
            models += client.search_logged_models(
                experiment_ids, filter_string=f"source_run_id = '{child.info.run_id}'"
            )
        if len(models) > 1:
            # Of a pipeline run, trace the models nothing else was made from: the ends of the chains.
            parents = {m.tags.get(TAG_PARENT_MODEL_ID) for m in models}
            models = [m for m in models if m.model_id not in parents]
    if not models and run.inputs and run.inputs.model_inputs:  # e.g. evaluate: the model it read
        return client.get_logged_model(run.inputs.model_inputs[0].model_id)
    if not models:
        raise ValueError(f"run {run_id} produced no recorded model")
    if len(models) > 1:
        listing = ", ".join(f"{m.name} ({m.model_id})" for m in models)
        raise ValueError(f"run {run_id} produced several models, name one: {listing}")
    return models[0]


def _all_experiments(client: Any) -> list:
    experiments, token = [], None
    while True:
        page = client.search_experiments(page_token=token)
        experiments += list(page)
        token = page.token
        if not token:
            return experiments


# ------------------------------------------------------------------------------------------------- helpers
def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings (and lists of mappings) to dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                flat.update(flatten(item, f"{name}.{i}"))
        else:
            flat[name] = value
    return flat


def mlflow_key(name: str) -> str:
    """`name` as a valid MLflow param/metric/tag key; one bad key would fail its whole batch.

    Characters outside letters, digits, `_ - . /` and space become `_` (lm-eval reports keys like "acc,none");
    a key that is not a normalised path (MLflow may store it as a file) loses its slashes; at most 250
    characters.
    """
    key = re.sub(r"[^/\w.\- ]", "_", str(name))
    if not key or posixpath.normpath(key) != key or key.startswith(("/", "..")):
        key = key.replace("/", "_") or "_"
    return _truncate(key, MAX_KEY_LENGTH)


def split_report(report: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A report's numbers (scalars, and lists of numbers as series) and its other scalar values, flattened."""
    numbers, texts = {}, {}
    for key, value in flatten(report).items():
        if isinstance(value, (list, tuple)):
            series = [_as_number(v) for v in value]
            if series and all(v is not None for v in series):
                numbers[key] = series
            else:
                texts[key] = value
        elif _as_number(value) is not None:
            numbers[key] = value
        elif value is not None:
            texts[key] = value
    return numbers, texts


def checkpoint_params(path: str | Path) -> dict[str, str]:
    """Shape params of a local HF checkpoint: config.json's shape keys, `shape` in one string, and
    `parameters` counted from the safetensors headers (no weights are read)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        return {}
    config = json.loads(config_file.read_text())
    config = config.get("text_config", config)  # multimodal wrappers keep the LM's shape one level down
    params = {k: str(config[k]) for k in SHAPE_KEYS if k in config}
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    head_dim = config.get("head_dim") or (
        config["hidden_size"] // heads if heads and config.get("hidden_size") else None
    )
    params["shape"] = (
        f"layers={config.get('num_hidden_layers')} hidden={config.get('hidden_size')} "
        f"heads={heads}/{kv or heads} head_dim={head_dim} mlp={config.get('intermediate_size')}"
    )
    count = count_parameters(path)
    if count:
        params["parameters"] = str(count)
    return params


def count_parameters(path: str | Path) -> int:
    """Number of weights in a checkpoint's safetensors files, from their headers (tied weights count once:
    transformers saves them once)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                total += math.prod(st.get_slice(key).get_shape())
    return total


def _dataset_entity(uri: str, sha256: str | None, name: str, profile: dict[str, Any] | None = None) -> Any:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset

    with warnings.catch_warnings():
        # Local paths match two equivalent source types; MLflow warns and picks one.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(uri)
    meta = MetaDataset(source, name=name, digest=(sha256 or None) and sha256[:MAX_DATASET_DIGEST_LENGTH])
    entity = meta._to_mlflow_entity()
    return Dataset(
        name=entity.name,
        digest=entity.digest,
        source_type=entity.source_type,
        source=entity.source,
        schema=entity.schema,
        profile=json.dumps(profile) if profile else None,
    )


def _blend_sources(path: str | Path) -> list[dict[str, Any]]:
    """The sources of a dataset made by prepare-data, each with its MLflow profile ([] for anything else)."""
    index_file = Path(path) / "index.json"
    if not index_file.is_file() or read_manifest(path).get("step") != "prepare-data":
        return []
    index = json.loads(index_file.read_text())
    seq_len, blend = index["seq_len"], index["blend"]
    sources = []
    for source in index["sources"]:
        sequences = {split: sum(s["sequences"] for s in shards) for split, shards in source["shards"].items()}
        profile = {
            "origin": source["uri"], "weight": source["weight"], "documents": source["documents"],
            "tokens": source["tokens"], "seq_len": seq_len, "num_rows": sequences,
            "share": {split: b["shares"][source["name"]] for split, b in blend.items()},
        }  # fmt: skip
        sources.append({"name": source["name"], "content_sha256": source["content_sha256"], "profile": profile})
    return sources


def _tracking_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean 'tracking failed', not 'our code is wrong' (a TypeError still propagates)."""
    import requests
    from mlflow.exceptions import MlflowException

    errors: tuple[type[BaseException], ...] = (MlflowException, requests.RequestException, OSError)
    try:
        from sqlalchemy.exc import SQLAlchemyError

        errors += (SQLAlchemyError,)
    except ImportError:
        pass
    return errors


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _is_connection_error(exc: BaseException) -> bool:
    import requests

    for e in _chain(exc):
        if isinstance(e, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
            return True
        if any(
            s in str(e) for s in ("Max retries exceeded", "Failed to establish a new connection", "timed out")
        ):
            return True
    return False


def _describe(exc: BaseException) -> str:
    """'<cause type>: <reason>', short enough for one log line.

    MLflow wraps transport errors in an MlflowException whose context is the real cause, and whose message
    buries the reason ("[Errno 111] Connection refused") after 300 characters of URL and retry state: name the
    cause's type and pull the reason and the URL out.
    """
    chain = list(_chain(exc))
    cause = chain[0]
    if type(cause).__module__.startswith("mlflow"):
        cause = next((e for e in chain[1:] if not type(e).__module__.startswith("mlflow")), cause)
    text = " ".join(str(exc).split())
    reason = re.search(r"\[Errno -?\d+\][^'\")]*", text) or re.search(r"Read timed out[^'\")]*", text)
    if reason:
        url = re.search(r"API request to (\S+)", text)
        return f"{type(cause).__name__}: {reason.group(0).strip()}" + (f" ({url.group(1)})" if url else "")
    return f"{type(cause).__name__}: {_truncate(text, 200)}"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (SQLAlchemy: three slashes + a relative path, four + an absolute
    one), or None for other URIs and in-memory databases."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _param_text(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes)):
        return None
    try:
        number = float(value)  # ints, floats, numpy and 0-d torch scalars
    except (TypeError, ValueError, RuntimeError):
        return None
    return number


def _human_count(value: Any) -> str:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return str(value)
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
