"""secateurs.tracking against a real `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifacts), and
against a local SQLite store.

One server serves the whole module (it takes seconds to start). A chain of small but real artifacts (tiny
Llama checkpoints saved with transformers, a DatasetDict saved with datasets, each with its manifest) is
recorded step by step, each step through its own Tracker as separate pipeline processes would, and what MLflow
then holds is read back through MlflowClient.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow", reason="mlflow is in the `pipeline` extra")
requests = pytest.importorskip("requests")

from conftest import MlflowServer, free_port
from mlflow import MlflowClient

from secateurs.manifest import content_hash, write_manifest
from secateurs.tracking import (
    TAG_PARENT_MODEL_ID,
    TAG_PARENT_URI,
    TAG_PIPELINE_RUN,
    TAG_SHA256,
    TAG_TEACHER_MODEL_ID,
    TAG_URI,
    Tracker,
    TrackingUnreachable,
    check_reachable,
    format_lineage,
    lineage,
    mlflow_key,
    resolve_tracking_uri,
)

EXPERIMENT = "secateurs-test"
PIPELINE_RUN = "kfp-run-0001"
SEQ_LEN = 16


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_RUN_ID",
        "MLFLOW_EXPERIMENT_ID",
        "MLFLOW_REGISTRY_URI",
        "RANK",
        "LOCAL_RANK",
    ):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # no internet here; nothing to report to
    # One quick retry: the outage tests stop the server on purpose.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    """The module's server, stopped at the end of the module."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(server_process):
    """The server's URI once `/health` answers."""
    return server_process.wait()


class Outage:
    """A TCP forwarder to the server that the test can stop and restart: a real network outage."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the forwarding thread (Linux)
        self.listener.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# -------------------------------------------------------------------------------------------------- artifacts
def save_llama(out: Path, seed: int, hidden: int, mlp: int, layers: int, heads: int, kv_heads: int) -> int:
    """A tiny random Llama checkpoint with an explicit head_dim; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, max_position_embeddings=64, head_dim=16, hidden_size=hidden,
                         intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads)  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, server_process, tokenizer_dir):
    """teacher -> importance -> pruned student -> distilled student, a dataset, and an evaluation, as dirs.

    Depends on `server_process` only so that the server boots while the checkpoints are written.
    """
    from secateurs.config import DataConfig
    from secateurs.data import prepare_data

    root = tmp_path_factory.mktemp("artifacts")
    a = {
        name: root / name
        for name in ("teacher", "dataset", "importance", "pruned", "distilled", "evaluation")
    }
    counts = {}
    counts["teacher"] = save_llama(a["teacher"], 0, hidden=64, mlp=128, layers=2, heads=4, kv_heads=2)
    write_manifest(
        a["teacher"],
        "import-model",
        inputs={"source": "HuggingFaceTB/SmolLM2-135M"},
        config={"source": "HuggingFaceTB/SmolLM2-135M", "dtype": "float32"},
        report={"parameters": counts["teacher"]},
    )

    # A blend of two sources, 3:1.
    for name, n in (("web", 30), ("code", 20)):
        lines = [json.dumps({"text": f"{name} document {i} " * (8 + i % 5)}) for i in range(n)]
        (root / f"{name}.jsonl").write_text("\n".join(lines))
    sources = [{"source": str(root / "web.jsonl"), "weight": 3}, {"source": str(root / "code.jsonl")}]
    prepare_data(tokenizer_dir, a["dataset"], DataConfig(sources=sources, seq_len=SEQ_LEN, val_fraction=0.2))

    a["importance"].mkdir()
    (a["importance"] / "depth.json").write_text(json.dumps({"layer_scores": [0.9, 0.1]}))
    write_manifest(
        a["importance"],
        "importance",
        inputs={"model": a["teacher"], "dataset": a["dataset"]},
        config={"batches": 2},
        report={"layers_scored": 2},
    )

    counts["pruned"] = save_llama(a["pruned"], 1, hidden=48, mlp=96, layers=1, heads=2, kv_heads=1)
    write_manifest(
        a["pruned"],
        "prune",
        inputs={"model": a["teacher"], "importance": a["importance"]},
        config={"target": {"hidden_size": 48, "num_hidden_layers": 1}},
        report={"kept_layers": [0]},
    )

    counts["distilled"] = save_llama(a["distilled"], 2, hidden=48, mlp=96, layers=1, heads=2, kv_heads=1)
    # 150 flattened keys (two log-batch calls) and one value over MLflow's 6000-character limit.
    distill_config = {"optimizer": {f"opt_{i}": i for i in range(150)}, "notes": "x" * 7000, "lr": 1e-4}
    write_manifest(
        a["distilled"],
        "distill",
        inputs={"student": a["pruned"], "teacher": a["teacher"], "dataset": a["dataset"]},
        config=distill_config,
        report={"tokens_seen": 4096, "loss": [3.0, 2.5, 2.0], "final_loss": 2.0, "stopped": "max_steps"},
    )

    a["evaluation"].mkdir()
    (a["evaluation"] / "metrics.json").write_text(
        json.dumps({"hellaswag": {"acc,none": 0.31}, "val_loss": 2.1})
    )
    write_manifest(
        a["evaluation"],
        "evaluate",
        inputs={"model": a["distilled"]},
        config={"tasks": ["hellaswag"]},
        report={"hellaswag": {"acc,none": 0.31}, "val_loss": 2.1},  # lm-eval's key style
    )
    return a, counts


def record_step(tracker: Tracker, step: str, out_dir: Path, student: str | None = None):
    """One step's run holding the manifest of `out_dir`, as `components.prologue.step` records a step's output."""
    with tracker.step(step, student) as run:
        return run.record(out_dir)


@pytest.fixture(scope="module")
def recorded(artifacts, server):
    """Every step recorded through its own Tracker (as separate pipeline processes), sharing PIPELINE_RUN."""
    a, _ = artifacts
    results = {}

    def tracker() -> Tracker:
        return Tracker(server, experiment=EXPERIMENT, pipeline_run=PIPELINE_RUN)

    results["import-model"] = record_step(tracker(), "import-model", a["teacher"])
    results["prepare-data"] = record_step(tracker(), "prepare-data", a["dataset"])
    results["importance"] = record_step(tracker(), "importance", a["importance"])
    results["prune"] = record_step(tracker(), "prune", a["pruned"], student="width")
    t = tracker()
    with t.step("distill", student="width") as run:
        for step, loss in ((0, 3.0), (10, 2.5), (20, 2.0)):  # what the training loop's callback does
            run.log_metrics({"train/loss": loss, "train/lr": 1e-4}, step=step)
        results["distill"] = run.record(a["distilled"])
    results["distill_failures"] = list(t.failures)
    results["evaluate"] = record_step(tracker(), "evaluate", a["evaluation"], student="width")
    last = tracker()
    last.finish_pipeline()
    results["parent_run_id"] = last.parent_run_id
    return results


@pytest.fixture(scope="module")
def client(server):
    return MlflowClient(tracking_uri=server, registry_uri=server)


def test_one_parent_run_with_a_nested_run_per_step(recorded, client):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{TAG_PIPELINE_RUN}` = '{PIPELINE_RUN}' AND tags.`secateurs.role` = 'pipeline'",
    )
    assert [r.info.run_id for r in parents] == [recorded["parent_run_id"]]
    assert parents[0].info.status == "FINISHED"  # finish_pipeline ended the run secateurs created
    steps = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{recorded['parent_run_id']}'"
    )
    assert sorted(r.data.tags["secateurs.step"] for r in steps) == sorted(
        ["import-model", "prepare-data", "importance", "prune", "distill", "evaluate"]
    )
    assert {r.info.status for r in steps} == {"FINISHED"}
    assert {
        r.data.tags.get("secateurs.student")
        for r in steps
        if r.data.tags["secateurs.step"] in ("prune", "distill", "evaluate")
    } == {"width"}
    assert recorded["distill_failures"] == []


def test_params_batched_and_truncated_metrics_and_curves(recorded, client):
    run = client.get_run(recorded["distill"].run_id)
    params = run.data.params
    assert {f"optimizer.opt_{i}" for i in range(150)} <= set(params)
    assert params["optimizer.opt_149"] == "149"
    assert params["lr"] == "0.0001"
    assert len(params["notes"]) == 6000 and params["notes"].endswith("...")
    assert params["report.stopped"] == "max_steps"
    assert run.data.metrics["tokens_seen"] == 4096
    assert run.data.metrics["final_loss"] == 2.0
    curve = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in curve] == [(0, 3.0), (10, 2.5), (20, 2.0)]
    series = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in series) == [(0, 3.0), (1, 2.5), (2, 2.0)]
    assert "secateurs.json" in [f.path for f in client.list_artifacts(run.info.run_id)]


def test_a_blend_is_logged_as_one_dataset_per_source(recorded, client, artifacts):
    a, _ = artifacts
    index = json.loads((a["dataset"] / "index.json").read_text())
    report = json.loads((a["dataset"] / "secateurs.json").read_text())["report"]["sources"]
    for step, context in (("prepare-data", "source"), ("distill", "dataset")):
        run = client.get_run(recorded[step].run_id)
        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        assert sorted(inputs) == ["code", "web"], step
        for source in index["sources"]:
            ds_input = inputs[source["name"]]
            assert ds_input.dataset.digest == source["content_sha256"][:36]
            assert json.loads(ds_input.dataset.source) == {"uri": f"{a['dataset']}/{source['name']}"}
            tags = {t.key: t.value for t in ds_input.tags}
            assert tags == {"mlflow.data.context": context, TAG_SHA256: source["content_sha256"]}
            profile = json.loads(ds_input.dataset.profile)
            sequences = {split: sum(s["sequences"] for s in shards) for split, shards in source["shards"].items()}
            assert profile == {
                "origin": source["uri"], "weight": source["weight"], "documents": source["documents"],
                "tokens": source["tokens"], "seq_len": SEQ_LEN, "num_rows": sequences,
                "share": {split: index["blend"][split]["shares"][source["name"]] for split in ("train", "validation")},
            }  # fmt: skip
            assert profile["share"]["train"] == report[source["name"]]["train_share"]
        assert inputs["web"].dataset.profile and json.loads(inputs["web"].dataset.profile)["share"]["train"] == pytest.approx(0.75, abs=0.01)
    prune = client.get_run(recorded["prune"].run_id)
    assert [d.dataset.name for d in prune.inputs.dataset_inputs] == ["importance"]
    assert [d.dataset.digest for d in prune.inputs.dataset_inputs] == [content_hash(a["importance"])[:36]]


def test_logged_models_and_edges(recorded, client, artifacts):
    a, counts = artifacts
    teacher_id = recorded["import-model"].model_id
    pruned_id = recorded["prune"].model_id
    distilled_id = recorded["distill"].model_id
    assert None not in (teacher_id, pruned_id, distilled_id)
    assert recorded["importance"].model_id is None and recorded["evaluate"].model_id is None

    teacher = client.get_logged_model(teacher_id)
    assert teacher.name == "teacher" and TAG_PARENT_MODEL_ID not in teacher.tags
    assert teacher.tags[TAG_URI] == str(a["teacher"]) and teacher.tags[TAG_SHA256] == content_hash(
        a["teacher"]
    )
    assert teacher.params["parameters"] == str(counts["teacher"])
    assert teacher.params["shape"] == "layers=2 hidden=64 heads=4/2 head_dim=16 mlp=128"
    assert teacher.tags["mlflow.model.isExternal"] == "true"

    pruned = client.get_logged_model(pruned_id)
    assert pruned.name == "width-pruned"
    assert pruned.tags[TAG_PARENT_MODEL_ID] == teacher_id and pruned.tags[TAG_PARENT_URI] == str(a["teacher"])
    assert pruned.params["parameters"] == str(counts["pruned"])

    distilled = client.get_logged_model(distilled_id)
    assert distilled.name == "width"
    assert distilled.tags[TAG_PARENT_MODEL_ID] == pruned_id and distilled.tags[TAG_PARENT_URI] == str(
        a["pruned"]
    )
    assert distilled.tags[TAG_TEACHER_MODEL_ID] == teacher_id
    assert distilled.source_run_id == recorded["distill"].run_id

    # The edges in the step runs: each run names the models it read and the model it made.
    distill_run = client.get_run(recorded["distill"].run_id)
    assert sorted(m.model_id for m in distill_run.inputs.model_inputs) == sorted([pruned_id, teacher_id])
    assert [m.model_id for m in distill_run.outputs.model_outputs] == [distilled_id]
    prune_run = client.get_run(recorded["prune"].run_id)
    assert [m.model_id for m in prune_run.inputs.model_inputs] == [teacher_id]
    importance_run = client.get_run(recorded["importance"].run_id)
    assert [m.model_id for m in importance_run.inputs.model_inputs] == [teacher_id]
    assert sorted(d.dataset.name for d in importance_run.inputs.dataset_inputs) == ["code", "web"]


def test_distilled_student_registered_with_tags_and_scores(recorded, client, artifacts):
    _, counts = artifacts
    assert recorded["distill"].registered == f"{EXPERIMENT}-width/1"
    version = client.get_model_version(f"{EXPERIMENT}-width", "1")
    assert version.source == f"models:/{recorded['distill'].model_id}"
    assert version.tags["teacher_model_id"] == recorded["import-model"].model_id
    assert version.tags["student"] == "width"
    assert version.tags["parameters"] == str(counts["distilled"])
    assert version.tags["shape"] == "layers=1 hidden=48 heads=2/1 head_dim=16 mlp=96"
    assert version.tags["tokens_seen"] == "4096"
    # Added by the evaluate step, which read the distilled model.
    assert version.tags["score.hellaswag.acc_none"] == "0.31"
    assert version.tags["score.val_loss"] == "2.1"
    evaluated = client.get_logged_model(recorded["distill"].model_id)
    assert {m.key: m.value for m in evaluated.metrics if m.run_id == recorded["evaluate"].run_id} == {
        "hellaswag.acc_none": 0.31,
        "val_loss": 2.1,
    }


def test_lineage_back_to_the_teacher(recorded, server, artifacts):
    a, counts = artifacts
    expected = [
        (recorded["distill"].model_id, "width", "distill"),
        (recorded["prune"].model_id, "width-pruned", "prune"),
        (recorded["import-model"].model_id, "teacher", "import-model"),
    ]
    refs = [
        recorded["distill"].model_id,
        f"models:/{recorded['distill'].model_id}",
        f"{EXPERIMENT}-width",  # registered name: newest version
        f"{EXPERIMENT}-width/1",
        recorded["distill"].run_id,
        recorded["evaluate"].run_id,  # the model it evaluated
        recorded["parent_run_id"],  # the pipeline run: the end of its only chain
        str(a["distilled"]),  # an artifact directory, found by content hash
    ]
    for ref in refs:
        chain = lineage(ref, uri=server)
        assert [(m["model_id"], m["name"], m["step"]) for m in chain] == expected, ref
    chain = lineage(recorded["distill"].model_id, uri=server)
    assert chain[0]["registered"] == f"{EXPERIMENT}-width/1"
    assert chain[0]["params"]["parameters"] == str(counts["distilled"])
    assert chain[2]["uri"] == str(a["teacher"])
    text = format_lineage(chain).splitlines()
    assert text[0].split() == ["model", "step", "id", "parameters", "shape", "registered", "uri"]
    assert text[1].split()[:3] == ["width", "distill", recorded["distill"].model_id]
    assert text[2].split()[:4] == ["<-", "width-pruned", "prune", recorded["prune"].model_id]
    assert text[3].split()[:4] == ["<-", "teacher", "import-model", recorded["import-model"].model_id]
    with pytest.raises(ValueError, match="no-such-model"):
        lineage("no-such-model", uri=server)


def test_student_derived_from_a_student_of_an_earlier_run(recorded, server, artifacts, tmp_path):
    """A later pipeline run prunes the distilled student of the first one further (15B -> 8B -> 4B chains):
    the lineage crosses pipeline runs back to the first teacher."""
    a, counts = artifacts
    derived = tmp_path / "half"
    n = save_llama(derived, 3, hidden=32, mlp=64, layers=1, heads=2, kv_heads=1)
    write_manifest(derived, "prune", inputs={"model": a["distilled"]}, config={"target": {"hidden_size": 32}})
    tracker = Tracker(server, experiment=EXPERIMENT, pipeline_run="kfp-run-0002")
    record = record_step(tracker, "prune", derived, student="half")
    assert tracker.parent_run_id != recorded["parent_run_id"]
    assert record.parent_model_id == recorded["distill"].model_id
    chain = lineage(record.model_id, uri=server)
    assert [m["name"] for m in chain] == ["half-pruned", "width", "width-pruned", "teacher"]
    assert [m["params"]["parameters"] for m in chain] == [
        str(n),
        str(counts["distilled"]),
        str(counts["pruned"]),
        str(counts["teacher"]),
    ]


def test_outage_during_training_does_not_stop_the_step(server, caplog, client):
    proxy = Outage(int(server.rsplit(":", 1)[1]))
    proxy.up()
    tracker = Tracker(proxy.uri, experiment=EXPERIMENT, pipeline_run="kfp-run-outage", cooldown_s=60)
    with tracker.step("distill", student="depth") as run:
        run.log_metrics({"train/loss": 4.0}, step=0)
        run.settle_metrics()  # step 0 reaches the server before the outage (metrics are sent async)
        proxy.down()
        with caplog.at_level(logging.WARNING, logger="secateurs.tracking"):
            run.log_metrics({"train/loss": 3.5}, step=120)  # sent async: pays the (short) retries meanwhile
            run.log_metrics({"train/loss": 3.0}, step=130)  # reads 120's failure; skipped: the server is down
        assert tracker.failures[0].startswith("mlflow: could not log metrics step 120 (ConnectionError: ")
        assert tracker.failures[1] == "mlflow: could not log metrics step 130 (server unreachable, skipped)"
        assert len(tracker.failures) == 2
        assert any(
            r.getMessage().startswith("mlflow: could not log metrics step 120 (ConnectionError")
            for r in caplog.records
        )
        proxy.up()
    # Back up before the step ended: the two failed values were logged then, and the run ended.
    assert tracker.failures == []
    history = client.get_metric_history(run.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 4.0), (120, 3.5), (130, 3.0)]
    assert client.get_run(run.run_id).info.status == "FINISHED"

    # Down for good: the step still ends normally; what was lost is listed.
    with tracker.step("evaluate", student="depth") as run2:
        proxy.down()
        run2.log_metrics({"score": 1.0}, step=1)
    assert tracker.failures[0].startswith("mlflow: could not log metrics step 1 (ConnectionError")
    assert any(f.startswith("mlflow: could not end the run of step evaluate") for f in tracker.failures)
    assert "could not log metrics step 1" in tracker.failure_report()


def test_nothing_listening(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(
        TrackingUnreachable, match=rf"MLflow tracking server at {uri} is unreachable: ConnectionError"
    ):
        check_reachable(uri, timeout=2)
    tracker = Tracker(uri, pipeline_run="kfp-run-nowhere")
    assert not tracker.active
    assert tracker.failures[0].startswith("mlflow: could not open the pipeline run (ConnectionError")
    with tracker.step("prune", student="width") as run:
        run.log_metrics({"loss": 1.0}, step=0)
        run.log_params({"a": 1})
    assert run.run_id is None


def test_reuses_the_kfp_plugin_task_run(server, client, monkeypatch):
    """With MLFLOW_RUN_ID naming a nested run (the KFP plugin's task run), the step logs into it and leaves it
    open for the plugin to close."""
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    plugin_parent = client.create_run(experiment_id, run_name="kfp-pipeline")
    task = client.create_run(
        experiment_id, run_name="prune-task", tags={"mlflow.parentRunId": plugin_parent.info.run_id}
    )
    monkeypatch.setenv("MLFLOW_RUN_ID", task.info.run_id)
    tracker = Tracker(server)
    assert tracker.parent_run_id == plugin_parent.info.run_id
    with tracker.step("prune", student="depth") as run:
        run.log_metrics({"kept": 3.0})
    assert run.run_id == task.info.run_id
    after = client.get_run(task.info.run_id)
    assert after.info.status == "RUNNING"
    assert after.data.tags["secateurs.step"] == "prune" and after.data.metrics["kept"] == 3.0
    tracker.finish_pipeline()  # not ours: left running
    assert client.get_run(plugin_parent.info.run_id).info.status == "RUNNING"


def test_local_sqlite_store(tmp_path, artifacts):
    a, _ = artifacts
    run_dir = tmp_path / "run"
    with Tracker(run_dir=run_dir, experiment="local") as tracker:
        assert tracker.uri == f"sqlite:///{run_dir}/mlflow.db"
        teacher = record_step(tracker, "import-model", a["teacher"])
        pruned = record_step(tracker, "prune", a["pruned"], student="width")
        parent_run_id = tracker.parent_run_id
    assert tracker.failures == []
    assert (run_dir / "mlflow.db").is_file()
    chain = lineage(pruned.model_id, run_dir=run_dir)
    assert [m["model_id"] for m in chain] == [pruned.model_id, teacher.model_id]
    local = MlflowClient(tracking_uri=tracker.uri)
    steps = local.search_runs([tracker.experiment_id], filter_string="tags.`secateurs.role` = 'step'")
    assert sorted(r.data.tags["secateurs.step"] for r in steps) == ["import-model", "prune"]
    # A tracker without a pipeline run made its own parent run, and ended it.
    assert local.get_run(parent_run_id).info.status == "FINISHED"
    # Artifacts stay next to the database, not in ./mlruns of the working directory.
    assert list(run_dir.glob("mlartifacts/**/secateurs.json"))
    assert "mlartifacts" in local.get_run(pruned.run_id).info.artifact_uri
    # A directory without a manifest is refused before anything is logged into the step's run.
    refused = pytest.raises(ValueError, match="has no secateurs.json: not an artifact")
    with Tracker(run_dir=run_dir, experiment="local") as again, again.step("prune") as run, refused:
        run.record(tmp_path)
    assert local.get_run(run.run_id).data.params == {}


def test_only_rank_zero_logs(tmp_path, monkeypatch, artifacts):
    a, _ = artifacts
    monkeypatch.setenv("RANK", "1")
    tracker = Tracker(run_dir=tmp_path)
    assert not tracker.active
    assert record_step(tracker, "import-model", a["teacher"]).model_id is None
    assert not (tmp_path / "mlflow.db").exists()


def test_tracking_uri_and_bad_input(tmp_path, monkeypatch):
    assert resolve_tracking_uri(run_dir=tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("runs/x.db") == f"sqlite:///{Path('runs/x.db').absolute()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri(run_dir=tmp_path) == "http://mlflow:5000"
    assert resolve_tracking_uri("sqlite:///a.db") == "sqlite:///a.db"
    with pytest.raises(ValueError, match="file store"):
        resolve_tracking_uri("file:///tmp/mlruns")
    with pytest.raises(ValueError, match="file store"):
        resolve_tracking_uri(str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ValueError, match="no MLflow tracking URI"):
        resolve_tracking_uri()


def test_core_imports_without_mlflow():
    """mlflow is an optional dependency: importing the module must not import it."""
    import secateurs

    code = "import sys, secateurs.tracking; assert 'mlflow' not in sys.modules, 'mlflow imported'"
    root = str(Path(secateurs.__file__).parent.parent)  # the copy of the package under test
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": root})


def test_mlflow_keys():
    assert mlflow_key("acc,none") == "acc_none"
    assert mlflow_key("train/loss") == "train/loss"
    assert mlflow_key("a//b") == "a__b"  # not a normalised path: MLflow would refuse it
    assert mlflow_key("/abs") == "_abs"
    assert mlflow_key("k" * 300) == "k" * 247 + "..."


def test_the_server_killed_during_training(tmp_path, tiny_models, tiny_data, caplog):
    """A real short training run (teacher correction of a tiny model) logs its loss to a real server, which is
    killed (SIGKILL) after step 2: training goes on to the end, its checkpoint is whole, and the step ends with
    one warning line saying what it could not log."""
    from transformers import TrainerCallback

    from secateurs import train
    from secateurs.checkpoint import load_model
    from secateurs.config import TeacherCorrectionConfig
    from secateurs.families import parameter_count
    from secateurs.manifest import read_manifest

    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server")
    proc = server.proc

    class ForwardThenKill(TrainerCallback):  # components.prologue.LossForwarder, and the outage
        def __init__(self, run):
            self.run = run

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.run.log_metrics(logs, step=state.global_step)
            if state.global_step == 2 and proc.poll() is None:
                self.run.settle_metrics()
                self.on_server = MlflowClient(server.uri).get_metric_history(self.run.run_id, "loss")
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    teacher, out = tiny_models["llama-tied"], tmp_path / "corrected"
    settings = TeacherCorrectionConfig(max_steps=6, micro_batch_size=2, global_batch_size=4, warmup_steps=2,
                                       save_steps=2, logging_steps=1, learning_rate=1e-3)  # fmt: skip
    try:
        tracker = Tracker(server.wait(), experiment=EXPERIMENT, pipeline_run="kfp-run-killed")
        logs = caplog.at_level(logging.INFO, logger="secateurs.tracking")
        with logs, tracker.step("correct-teacher", student="killed") as run:
            callback = ForwardThenKill(run)
            report = train.correct_teacher(teacher, tiny_data, out, settings, [callback])
            run.record(out)
    finally:
        if proc.poll() is None:
            server.stop()
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not stopped at the end
    assert [m.step for m in callback.on_server] == [1, 2]  # logged while the server was up
    assert report["steps"] == 6
    assert read_manifest(out)["step"] == "correct-teacher"
    assert parameter_count(load_model(out)) == parameter_count(teacher)

    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("mlflow: step correct-teacher: ")]
    assert len(said) == 1 and "\n" not in said[0], said
    assert said[0].startswith("mlflow: step correct-teacher: could not log ")
    assert "metric values that failed earlier" in said[0] and "log model teacher-corrected" in said[0]
    assert "end the run of step correct-teacher" in said[0] and "ConnectionError: [Errno 111]" in said[0]
    # The last calls found the server down with one probe each, not MLflow's HTTP retries (bench/tracking_outage.py).
    assert said[0].endswith("; not tried)")
    # Tracking's own warnings are one line each, and the async logger's 400-character ERROR lines are not repeated.
    assert all("\n" not in r.getMessage() for r in caplog.records if r.name == "secateurs.tracking")
    assert not [r for r in caplog.records if r.name.startswith("mlflow.utils.async_logging")]


def test_one_parameter_count_for_a_model_and_its_checkpoint(tiny_models):
    from secateurs.checkpoint import load_model
    from secateurs.families import parameter_count

    for case, path in tiny_models.items():
        model = load_model(path)
        assert parameter_count(path) == parameter_count(str(path)) == parameter_count(model), case
        # The state dict lists a tied embedding twice; the count has it once, as the safetensors file does.
        listed = sum(t.numel() for t in model.state_dict().values())
        assert (parameter_count(model) < listed) == model.config.tie_word_embeddings, case


def test_lineage_command_prints_the_chain(recorded, server):
    from typer.testing import CliRunner

    from secateurs.cli import app

    result = CliRunner().invoke(app, ["lineage", recorded["distill"].model_id, "--tracking-uri", server],
                                env={"COLUMNS": "400"})  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines() if line.strip()]
    assert rows[0] == ["model", "step", "id", "parameters", "shape", "registered", "uri"]
    assert rows[1][:3] == ["width", "distill", recorded["distill"].model_id]
    assert f"{EXPERIMENT}-width/1" in rows[1]
    assert rows[2][:4] == ["<-", "width-pruned", "prune", recorded["prune"].model_id]
    assert rows[3][:4] == ["<-", "teacher", "import-model", recorded["import-model"].model_id]
    assert len(rows) == 4


def test_guard_tries_essential_calls_during_an_outage_only_when_the_probe_finds_the_server():
    """After a connection error (a real refused connection), an essential call asks the probe first: while it says
    down, the call is not made and fails with its reason; once the server answers, calls go through again."""
    import requests

    from secateurs.tracking.backend import Guard, health_probe

    uri = f"http://127.0.0.1:{free_port()}"
    probe = health_probe(uri, timeout=2)
    guard = Guard(60.0, probe=lambda: state["probe"])
    state = {"probe": probe()}
    assert state["probe"].startswith("ConnectionError: [Errno 111]")
    assert guard("open a run", requests.get, uri, timeout=2) is None  # the real error: the server is now down
    made = []
    assert guard("end a run", made.append, 1) is None and made == []
    assert guard.failures[-1] == f"mlflow: could not end a run ({state['probe']}; not tried)"
    state["probe"] = None  # it answers again
    assert guard("end a run", lambda: made.append(2) or "ok") == "ok" and made == [2]
    assert health_probe("sqlite:///x.db") is None  # a file store has no outage to wait out
