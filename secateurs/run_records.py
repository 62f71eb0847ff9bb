"""What MLflow recorded of a pipeline run: its step runs, the step that failed, every output's URI, the report.

A step run is tagged with its task key and the URI of each output (`secateurs.components.prologue`); a rerun's
pipeline run is tagged `secateurs.rerun_of=<the pipeline run it reruns>`, so that the outputs of a run and of its
reruns are found together.
"""

from __future__ import annotations

import json
from pathlib import Path

TAG_RERUN_OF = "secateurs.rerun_of"


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

