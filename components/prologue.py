"""What every component body shares at run time: the step prologue (`step`: settings, MLflow step run, recorded
outputs), the failure injection, the loss forwarder.

Imported inside component bodies (they run in the image, or in the local venv under kfp.local), so it may use
kfp-free parts of secateurs only.

Failure injection (for tests and drills): `SECATEURS_FAIL_STEP=distill:width` makes the `distill` step of
student `width` raise before doing any work (`SECATEURS_FAIL_STEP=prepare-data` for a step without a student,
`search-distill:auto/1` for one item of a fan-out step; several entries are separated by commas). The step's
MLflow run ends FAILED, as a real failure's would.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from transformers import TrainerCallback
from transformers.integrations import rewrite_logs

FAIL_STEP_ENV = "SECATEURS_FAIL_STEP"
# Tags on a step's MLflow run that let `secateurs rerun` find what the step produced: its task key in the
# recipe (`distill:width`, `evaluate:width-pruned`) and the URI of each of its outputs.
TAG_TASK = "secateurs.task"
TAG_OUTPUT_PREFIX = "secateurs.kfp_output."
TAG_ITEM = "secateurs.item"  # the item of a fan-out step's task (`1` of `search-distill:auto/1`)


class InjectedFailure(RuntimeError):
    """Raised by a step named in SECATEURS_FAIL_STEP."""


def check_injected_failure(step: str, student: str = "", item: str = "") -> None:
    """Raise InjectedFailure when SECATEURS_FAIL_STEP names this step (and student; and fan-out item, or none)."""
    from secateurs.registry import item_key

    wanted = {w.strip() for w in os.environ.get(FAIL_STEP_ENV, "").split(",") if w.strip()}
    me = f"{step}:{student}" if student else step
    if me in wanted or (item != "" and item_key(me, item) in wanted):
        raise InjectedFailure(f"{FAIL_STEP_ENV}={os.environ[FAIL_STEP_ENV]} stops step {me} before it starts")


@contextlib.contextmanager
def tracked_step(
    step: str, tracking_uri: str, pipeline_run: str, student: str = "", *, outputs: dict, task: str = "",
    item: str = "",
) -> Iterator:
    """The MLflow run of one step, nested under the pipeline run `pipeline_run` (see secateurs.tracking).

    An empty `tracking_uri` falls back to MLFLOW_TRACKING_URI (set by the KFP MLflow plugin on a cluster).
    On success the run is tagged with the task key (default `step[:student]`) and the URI of every output
    ({output name: KFP artifact}), which is what `secateurs rerun` imports later. A fan-out step's `item` is
    tagged from the start, so that a failed item is named.
    """
    from secateurs.tracking import Tracker

    tracker = Tracker(tracking_uri or None, pipeline_run=pipeline_run or None)
    with tracker.step(step, student=student or None) as run:
        if item != "":
            run.set_tags({TAG_ITEM: item})
        check_injected_failure(step, student, item)
        yield run
        tags = {TAG_OUTPUT_PREFIX + name: artifact.uri for name, artifact in outputs.items()}
        run.set_tags({TAG_TASK: task or (f"{step}:{student}" if student else step), **tags})


class StepContext:
    """What `step` hands a component body: its validated settings, the step's MLflow run, callbacks for
    training steps, and `report`, which the body sets to the library's report."""

    def __init__(self, settings, run) -> None:
        self.settings = settings
        self.run = run
        self.callbacks = [LossForwarder(run)]
        self.report: dict = {}


@contextlib.contextmanager
def step(kind: str, args: dict) -> Iterator[StepContext]:
    """The prologue and epilogue every tracked component shares, driven by the step registry.

    Validates `args["settings"]` with the step's settings model (`secateurs.registry.STEPS[kind]`), opens its MLflow
    step run under the pipeline run (task key from the registry), and, once the body is done, records every output
    that carries a manifest and copies the report's scalars into the metadata of its non-metrics outputs.

    Args:
        kind: the step kind, e.g. "distill".
        args: the component's arguments (`locals()` at the top of its body).
    """
    from secateurs.config import settings_model
    from secateurs.manifest import MANIFEST
    from secateurs.registry import STEPS

    spec = STEPS[kind]
    model = settings_model(kind)
    settings = model.model_validate_json(args["settings"]) if model is not None else None
    outputs = {name: args[name] for name in spec.outputs}
    student = args.get("student", "")
    item = args.get("item", "")
    task = spec.task_key(student=student, model=args.get("name", ""), item=item)
    with tracked_step(spec.name, args["tracking_uri"], args["pipeline_run"], student, outputs=outputs, task=task,
                      item=item) as run:  # fmt: skip
        context = StepContext(settings, run)
        yield context
        for artifact in outputs.values():
            if os.path.isfile(os.path.join(artifact.path, MANIFEST)):
                run.record(artifact.path, uri=artifact.uri)
    scalars = {k: v for k, v in context.report.items() if isinstance(v, (int, float, str))}
    for name, artifact in outputs.items():
        if spec.outputs[name] != "Metrics":
            artifact.metadata.update(scalars)


class LossForwarder(TrainerCallback):
    """Forwards the Trainer's logged numbers to the step's MLflow run: its metric history `train/loss`,
    `train/learning_rate`, `train/grad_norm`, ... (transformers' own naming for logged metrics, `rewrite_logs`)."""

    def __init__(self, run) -> None:
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.run.log_metrics(rewrite_logs(logs), step=state.global_step)


def report_entry(name: str, role: str, parent: str, metrics: dict) -> dict:
    """The report's view of one evaluation (`secateurs.report.ReportEntry` fields)."""
    tasks = {t: v["acc"] for t, v in (metrics.get("tasks") or {}).items() if "acc" in v}
    return {
        "name": name,
        "role": role,
        "parent": parent or None,
        "parameters": metrics["parameters"],
        "val_loss": metrics.get("validation_loss"),
        "perplexity": metrics.get("perplexity"),
        "tasks": tasks,
    }
