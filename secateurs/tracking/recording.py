"""Recording a step's manifest in MLflow: its params and report, its input models and datasets, and its output
as an external LoggedModel (registered for the steps the registry says), through `ModelRecorder`, the part of
`StepRun` that knows manifests.

A model's page in the MLflow UI tells its story through MLflow's own fields: its description (Markdown: made
from which model by which step, taught by which, on which data, with links to those models' pages), its params
(`parent_model`, `teacher_model`, `training_data` by name, and its shape), "Datasets used" (each data source it
learned from, through the summary metric `train_share.<source>` logged against that dataset) and "Model versions"
(the `mlflow.modelVersions` tag). Its metrics are the report's top-level numbers; nested sections, series and the
training log are the run's.

mlflow is imported inside the functions that use it, so `secateurs` imports without it.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secateurs.families import parameter_count
from secateurs.manifest import MANIFEST, content_hash, read_manifest
from secateurs.registry import BY_NAME
from secateurs.tracking.backend import (
    _set_global_tracking_uri,
    _truncate,
    mlflow_key,
)

# Tags secateurs writes. Dotted keys need backticks in MLflow filters: tags.`secateurs.sha256` = '...'.
TAG_STEP = "secateurs.step"
TAG_STUDENT = "secateurs.student"
TAG_URI = "secateurs.uri"
TAG_SHA256 = "secateurs.sha256"
TAG_PARENT_MODEL_ID = "secateurs.parent_model_id"
TAG_PARENT_URI = "secateurs.parent_uri"
TAG_TEACHER_MODEL_ID = "secateurs.teacher_model_id"
TAG_REGISTERED = "secateurs.registered_model"  # "name/version"
# MLflow's description field (runs, models): the UI shows it as Markdown at the top of the model's page.
TAG_DESCRIPTION = "mlflow.note.content"

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


@dataclass
class StepRecord:
    """What `StepRun.record` logged: the output model (if any) and the models it read."""

    run_id: str | None
    model_id: str | None = None
    parent_model_id: str | None = None
    input_model_ids: dict[str, str] = field(default_factory=dict)
    registered: str | None = None  # "name/version"


class ModelRecorder:
    """The recording half of `StepRun` (see `secateurs.tracking.runs`): it uses the run's `tracker`, `run_id`,
    `name`, `student`, `active`, `log_params`, `set_tags` and `_send_metrics`."""

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
        entity = self.tracker.guard(f"describe dataset {name}", _dataset_entity, uri, sha256, name)
        if entity is None:
            return
        from mlflow.entities import DatasetInput, InputTag

        tags = [InputTag("mlflow.data.context", context)]
        if sha256:
            tags.append(InputTag(TAG_SHA256, sha256))
        self.tracker.guard(
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
            entity = self.tracker.guard(
                f"describe dataset {source['name']}", _dataset_entity, f"{uri.rstrip('/')}/{source['name']}",
                source["content_sha256"], source["name"], source["profile"],
            )  # fmt: skip
            if entity is not None:
                tags = [
                    InputTag("mlflow.data.context", context),
                    InputTag(TAG_SHA256, source["content_sha256"]),
                ]
                inputs.append(DatasetInput(entity, tags))
        if inputs:
            self.tracker.guard(
                "log input datasets", self.tracker.client.log_inputs, self.run_id, datasets=inputs
            )

    def log_input_model(self, model_id: str) -> None:
        """Draw the edge model -> this run (`LoggedModelInput`)."""
        if not self.active:
            return
        from mlflow.entities import LoggedModelInput

        self.tracker.guard(
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
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

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
        model_tags = {k: _truncate(v, MAX_TAG_VAL_LENGTH) for k, v in model_tags.items()}
        model_params = {mlflow_key(k): _truncate(v, MAX_PARAM_VAL_LENGTH) for k, v in model_params.items()}
        model = self.tracker.guard(
            f"log model {name}", self._create_external_model, name, model_tags, model_params
        )
        if model is None:
            return None
        from mlflow.entities import LoggedModelOutput

        self.tracker.guard(
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
            self.tracker.guard(
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
        version = self.tracker.guard(f"register model {name}", self._register, model_id, name, tags or {})
        if version is None:
            return None
        ref = f"{name}/{version.version}"
        self.tracker.guard(f"tag model {model_id}", self._link_version, model_id, name, version.version)
        return ref

    def _link_version(self, model_id: str, name: str, version: str | int) -> None:
        """Tag the model with its registered version: `secateurs.registered_model` ("name/version") and the list
        in `mlflow.modelVersions`, which the UI's "Model versions" reads. MLflow's REST server adds the latter
        when it creates a version from a model id; its SQL store, used directly (a `sqlite:///` tracking URI, as a
        local run has), does not: added here, once either way."""
        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

        client = self.tracker.client
        versions = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
        if not any(v.get("name") == name and str(v.get("version")) == str(version) for v in versions):
            versions.append({"name": name, "version": version})
        client.set_logged_model_tags(
            model_id, {TAG_REGISTERED: f"{name}/{version}", MLFLOW_MODEL_VERSIONS: json.dumps(versions)}
        )

    def _register(self, model_id: str, name: str, tags: Mapping[str, Any]) -> Any:
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

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
            tags={k: _truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()},
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
          numbers -> one value per step), other report scalars -> params `report.*`. The report's
          `log_history` (the Trainer's log) is left out: the training callback already sent it to the run as
          the metric history `train/loss`, `train/grad_norm`, ... (live, or replayed by `secateurs.training_launch`).
        - each input -> tag `secateurs.input.<name>` = "uri sha256"; inputs that are recorded LoggedModels
          (found by content hash) -> model edges; other inputs with a hash that are not checkpoints ->
          datasets (context = the input's name), one per source for a dataset made by prepare-data.
        - out_dir with a config.json -> an external LoggedModel named after the step (the registry's
          `StepSpec.model`) whose parent is the input `parent_input` (default: the first of `PARENT_INPUTS` that
          is a recorded model), with the report's top-level numbers as its metrics and its story on its page
          (see the module docstring); for a step whose spec says `registered` (distill) it is also registered as
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
        report = {k: v for k, v in (manifest.get("report") or {}).items() if k != "log_history"}
        numbers, texts = split_report(report)
        self.log_params(texts, prefix="report")
        self.set_tags({"secateurs.output_uri": uri, "secateurs.output_sha256": sha256, TAG_STEP: self.name})

        inputs = manifest.get("inputs") or {}
        models: dict[str, Any] = {}
        data_sources: list[dict[str, Any]] = []  # the sources of the prepared datasets this step read
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
            elif in_sha and (sources := _blend_sources(in_uri)):
                self.log_blend(in_uri, context=input_name)
                data_sources += sources
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
            story = {
                "params": _lineage_params(parent, teacher, data_sources),
                "tags": {TAG_DESCRIPTION: self._description(manifest, uri, parent, teacher, data_sources)},
            }
            record.model_id = self.log_model(
                uri, sha256, name, path=out_dir, parent=parent, teacher=teacher, **story
            )
            # Logged with the model id, the report's top-level numbers show on the run and on the model; its
            # nested sections (the shapes) are the model's params already, and stay on the run.
            summary = {k for k, v in report.items() if _as_number(v) is not None}
            self._log_report_metrics(numbers, record.model_id, summary, data_sources)
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

    def _log_report_metrics(
        self,
        numbers: Mapping[str, Any],
        model_id: str | None = None,
        summary: Collection[str] | None = None,
        data_sources: Sequence[dict] = (),
    ) -> None:
        """The report's numbers as run metrics; its scalars named in `summary` (default: all) also as the
        model's (`model_id`), with one `train_share.<source>` per data source, logged against that source's
        dataset: MLflow lists the datasets of a model's metrics as the model's "Datasets used"."""
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_DATASET_DIGEST_SIZE

        now = int(time.time() * 1000)
        batch = []
        for key, value in numbers.items():
            if isinstance(value, list):  # a series (per epoch, per layer): one value a step, the run's only
                batch += [Metric(mlflow_key(key), float(v), now, step) for step, v in enumerate(value)]
            else:
                to_model = model_id if summary is None or key in summary else None
                batch.append(Metric(mlflow_key(key), float(value), now, 0, model_id=to_model))
        for source in data_sources if model_id else ():
            share = source["profile"]["share"].get("train")
            if share is not None:
                batch.append(Metric(
                    mlflow_key(f"train_share.{source['name']}"), float(share), now, 0, model_id=model_id,
                    dataset_name=source["name"], dataset_digest=source["content_sha256"][:MAX_DATASET_DIGEST_SIZE],
                ))  # fmt: skip
        if batch:
            self._send_metrics(batch, "report metrics")

    def _description(
        self, manifest: Mapping[str, Any], uri: str, parent: Any, teacher: Any, data_sources: list[dict]
    ) -> str:
        """The model page's description: "Made from [a-pruned](link) by step `distill` (student `a`), taught by
        [teacher](link), on data `docs`." and where its weights are."""
        by = f"by step `{self.name}`" + (f" (student `{self.student}`)" if self.student else "")
        if parent is not None:
            text = f"Made from {_model_link(parent)} {by}"
        else:
            source = (manifest.get("config") or {}).get("source")
            text = f"Imported from `{source}` {by}" if source else f"Written {by}"
        if teacher is not None:
            text += f", taught by {_model_link(teacher)}"
        if data_sources:
            text += ", on data " + ", ".join(f"`{s['name']}`" for s in data_sources)
        return f"{text}.\n\nWeights: `{uri}`"

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
        model = self.tracker.guard(
            f"read model {model_id}", self.tracker.client.get_logged_model, model_id
        )
        ref = model.tags.get(TAG_REGISTERED) if model is not None else None
        if not ref:
            return
        name, version = ref.rsplit("/", 1)
        for key, value in numbers.items():
            if not isinstance(value, list):
                self.tracker.guard(
                    f"tag {ref} with score {key}",
                    self.tracker.client.set_model_version_tag,
                    name,
                    version,
                    mlflow_key(f"score.{key}"),
                    str(value),
                )


def _model_link(model: Any) -> str:
    """A Markdown link to a LoggedModel's page in the MLflow UI, named after the model. The URL is the UI's own
    route, relative, so it works wherever the UI is served."""
    name = model.name.replace("[", "\\[").replace("]", "\\]")
    return f"[{name}](#/experiments/{model.experiment_id}/models/{model.model_id})"


def _lineage_params(parent: Any, teacher: Any, data_sources: list[dict]) -> dict[str, str]:
    """The models and data a model was made from, by name, as params (shown on its page, and searchable:
    `params.parent_model = 'a-pruned'`)."""
    params = {}
    if parent is not None:
        params["parent_model"] = parent.name
    if teacher is not None:
        params["teacher_model"] = teacher.name
    if data_sources:
        params["training_data"] = ", ".join(s["name"] for s in data_sources)
    return params


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
    count = parameter_count(path)
    if count:
        params["parameters"] = str(count)
    return params


def _dataset_entity(uri: str, sha256: str | None, name: str, profile: dict[str, Any] | None = None) -> Any:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset
    from mlflow.utils.validation import MAX_DATASET_DIGEST_SIZE

    with warnings.catch_warnings():
        # Local paths match two equivalent source types; MLflow warns and picks one.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(uri)
    meta = MetaDataset(source, name=name, digest=(sha256 or None) and sha256[:MAX_DATASET_DIGEST_SIZE])
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
        sources.append(
            {"name": source["name"], "content_sha256": source["content_sha256"], "profile": profile}
        )
    return sources


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
