"""Lineage: the chain of recorded models from a model, a registered version, a run or an artifact directory back
to the teacher, following the `secateurs.parent_model_id` tags that `ModelRecorder.log_model` writes.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secateurs.manifest import content_hash
from secateurs.tracking.backend import resolve_tracking_uri
from secateurs.tracking.recording import (
    TAG_PARENT_MODEL_ID,
    TAG_REGISTERED,
    TAG_SHA256,
    TAG_STEP,
    TAG_STUDENT,
    TAG_URI,
)
from secateurs.tracking.runs import MLFLOW_PARENT_RUN_ID

if TYPE_CHECKING:
    from rich.table import Table


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


def lineage_table(chain: list[dict[str, Any]]) -> Table:
    """A `lineage` chain as a rich Table: newest first, one model per row, each made from the one below it."""
    from rich.table import Table
    from rich.text import Text

    table = Table("", "model", "step", "id", "parameters", "shape", "registered", "uri", box=None)
    for i, m in enumerate(chain):
        params = m.get("params") or {}
        parameters = params.get("parameters")
        row = (
            "<-" if i else "",
            m.get("name"),
            m.get("step"),
            m.get("model_id"),
            parameters and _human_count(parameters),
            params.get("shape"),
            m.get("registered"),
            m.get("uri"),
        )
        table.add_row(*(Text(cell or "") for cell in row))  # Text: a name or URI is not rich markup
    return table


def format_lineage(chain: list[dict[str, Any]]) -> str:
    """`lineage_table` as plain text, unwrapped, for logs and tests."""
    from rich.console import Console

    console = Console(file=io.StringIO(), width=10_000, color_system=None)
    console.print(lineage_table(chain))
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


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


def _human_count(value: Any) -> str:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return str(value)
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
