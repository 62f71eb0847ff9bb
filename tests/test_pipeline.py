"""The pipeline end to end through kfp.local on tiny models: a student chain, MLflow records, the failure
injection, resuming a failed run, rerunning one step, and the compiled spec's placement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

pytest.importorskip("kfp")
pytest.importorskip("mlflow")


def tiny_config(teacher, corpus, **extra) -> dict:
    """A whole recipe on a 4-layer model: student `a` (width) and `b` derived from `a` (depth)."""
    train = {"max_steps": 2, "micro_batch_size": 2, "global_batch_size": 4, "warmup_steps": 0, "save_steps": 50,
             "logging_steps": 1}  # fmt: skip
    return {
        "name": "tiny",
        "teacher": {"source": str(teacher), "dtype": "float32"},
        "data": {"source": str(corpus), "seq_len": 32, "max_tokens": 32 * 400, "val_fraction": 0.25},
        "teacher_correction": {"enabled": True, **train},
        "importance": {"samples": 8, "batch_size": 4, "block_sizes": [1], "depth_samples": 4},
        "distill": train,
        "students": [
            {"name": "a", "prune": {"hidden_size": 48, "ffn_hidden_size": 64}},
            {"name": "b", "parent": "a", "prune": {"num_layers": 3, "depth_criterion": "lm-loss-contiguous"}},
        ],
        "evaluate": {"tasks": ["lambada-docs"], "batch_size": 8, "max_sequences": 8, "limit": 8},
        **extra,
    }


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_models, docs_txt):
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_models["llama-tied"], docs_txt)))
    return path


@pytest.fixture(scope="module")
def failed_then_resumed(tmp_path_factory, config_file):
    """One run that fails at distill:b (injected), then the same command again, which finishes it."""
    import typer

    from secateurs.pipeline_cli import read_run, recorded_outputs, run_cmd

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    mp = pytest.MonkeyPatch()
    mp.setenv("SECATEURS_FAIL_STEP", "distill:b")
    with pytest.raises(typer.Exit):
        run_cmd(config_file, run_dir)
    mp.undo()
    _, state = read_run(run_dir)
    after_failure = recorded_outputs(state)
    run_cmd(config_file, run_dir)
    return run_dir, after_failure


def _step_runs(run_dir):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("secateurs")
    return client.search_runs([experiment.experiment_id], max_results=1000)


def test_failure_stops_at_the_injected_step_and_resume_runs_only_the_rest(failed_then_resumed):
    run_dir, after_failure = failed_then_resumed
    # Everything upstream of distill:b (and independent of it) finished in the first attempt.
    assert ("prune:b", "pruned") in after_failure and ("distill:a", "distilled") in after_failure
    assert ("distill:b", "distilled") not in after_failure

    runs = _step_runs(run_dir)
    steps = [r for r in runs if r.data.tags.get("secateurs.role") == "step"]
    by_task = {}
    for r in steps:
        tags = r.data.tags
        key = tags.get("secateurs.task") or f"{tags['secateurs.step']}:{tags['secateurs.student']}"
        by_task.setdefault(key, []).append(r.info.status)
    # The resumed run reused every finished step from the cache: one MLflow run each.
    assert by_task["import-model"] == ["FINISHED"]
    assert by_task["distill:a"] == ["FINISHED"]
    assert by_task["prune:b"] == ["FINISHED"]
    assert sorted(by_task["distill:b"]) == ["FAILED", "FINISHED"]
    assert by_task["report"] == ["FINISHED"]
    # One pipeline run, every step run nested under it.
    parents = [r for r in runs if r.data.tags.get("secateurs.role") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in steps} == {parents[0].info.run_id}


def test_lineage_of_the_derived_student_reaches_the_teacher(failed_then_resumed):
    from secateurs.pipeline_cli import read_run, recorded_outputs
    from secateurs.tracking import lineage

    run_dir, _ = failed_then_resumed
    _, state = read_run(run_dir)
    distilled_b = recorded_outputs(state)[("distill:b", "distilled")]
    chain = lineage(distilled_b, uri=state["tracking_uri"])
    assert [m["name"] for m in chain] == ["b", "b-pruned", "a", "a-pruned", "teacher-corrected", "teacher"]


def test_report_compares_every_model(failed_then_resumed):
    from secateurs.pipeline_cli import read_run, recorded_outputs

    run_dir, _ = failed_then_resumed
    _, state = read_run(run_dir)
    report = recorded_outputs(state)[("report", "comparison")]
    entries = json.loads(Path(report, "entries.json").read_text())
    assert [(e["name"], e["role"], e["parent"]) for e in entries] == [
        ("teacher", "teacher", None), ("a-pruned", "pruned", "teacher"), ("a", "distilled", "a-pruned"),
        ("b-pruned", "pruned", "a"), ("b", "distilled", "b-pruned"),
    ]  # fmt: skip
    assert entries[0]["parameters"] > entries[2]["parameters"] > entries[4]["parameters"]
    for png in ("quality_vs_parameters.png", "speedup.png"):
        assert Path(report, png).read_bytes()[:4] == b"\x89PNG"


def test_rerun_one_step_reproduces_it_and_leaves_the_run_untouched(failed_then_resumed):
    from secateurs.manifest import content_hash
    from secateurs.pipeline_cli import read_run, recorded_outputs, rerun_cmd

    run_dir, _ = failed_then_resumed
    _, state = read_run(run_dir)
    before = recorded_outputs(state)
    original = before[("distill:b", "distilled")]
    original_hash = content_hash(original)
    runs_before = len(_step_runs(run_dir))

    rerun_cmd(run_dir, "distill:b", downstream=False)

    after = recorded_outputs(state)
    rerun = after[("distill:b", "distilled")]
    assert rerun != original
    assert content_hash(original) == original_hash  # the original artifact is untouched
    a, b = load_file(f"{original}/model.safetensors"), load_file(f"{rerun}/model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name
    # Exactly one step ran again, recorded in a pipeline run that names the original.
    new = [r for r in _step_runs(run_dir)][: len(_step_runs(run_dir)) - runs_before]
    steps = [r for r in new if r.data.tags.get("secateurs.role") == "step"]
    assert [r.data.tags["secateurs.task"] for r in steps] == ["distill:b"]
    parents = [r for r in new if r.data.tags.get("secateurs.role") == "pipeline"]
    assert [p.data.tags["secateurs.rerun_of"] for p in parents] == [state["pipeline_run"]]
    # Everything else still points at the original run's artifacts.
    assert {k: v for k, v in after.items() if k[0] != "distill:b"} == {
        k: v for k, v in before.items() if k[0] != "distill:b"
    }


# ------------------------------------------------------------------------------------------ compiled spec
GPU_TASKS = ("correct-teacher", "importance", "distill", "evaluate")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, monkeypatch_module):
    """The Llama-3.1-8B recipe compiled with credentials in the environment that must not leak into it."""
    from secateurs.config import load_config
    from secateurs.pipeline_cli import compile_pipeline

    secrets = {"AWS_ACCESS_KEY_ID": "AKIAFAKEKEY123456", "AWS_SECRET_ACCESS_KEY": "fake-secret-value-9f8e7d",
               "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-password-42", "KFP_TOKEN": "fake-kfp-token-abc"}  # fmt: skip
    for k, v in secrets.items():
        monkeypatch_module.setenv(k, v)
    monkeypatch_module.setenv("SECATEURS_IMAGE", "registry.example/secateurs:test")
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "llama31-8b-minitron.yaml")
    out = compile_pipeline(config, tmp_path_factory.mktemp("spec") / "pipeline.yaml")
    docs = list(yaml.safe_load_all(out.read_text()))
    return config, out.read_text(), docs[0], (docs[1] if len(docs) > 1 else {}), secrets


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _task_executors(spec):
    """display name -> executor spec of every task of the root DAG."""
    tasks = spec["root"]["dag"]["tasks"]
    executors = spec["deploymentSpec"]["executors"]
    components = spec["components"]
    out = {}
    for task in tasks.values():
        component = components[task["componentRef"]["name"]]
        name = task.get("taskInfo", {}).get("name")
        out[name] = (task, executors[component["executorLabel"]])
    return out


def test_compiled_spec_requests_gpus_only_on_gpu_steps(compiled):
    config, _, spec, _, _ = compiled
    tasks = _task_executors(spec)
    assert "distill:width" in tasks and "evaluate:depth-pruned" in tasks and "report" in tasks
    for name, (_, executor) in tasks.items():
        container = executor.get("container")
        if container is None:  # importers
            continue
        accelerator = container.get("resources", {}).get("accelerator")
        kind = name.split(":")[0]
        if kind in GPU_TASKS or kind == "engine":
            expected = getattr(config.placement.gpus, kind.replace("-", "_"))
            assert accelerator["resourceType"] == "nvidia.com/gpu", name
            assert int(accelerator["resourceCount"]) == expected, name
        else:
            assert accelerator is None, name
        assert container["image"] == "registry.example/secateurs:test"


def test_compiled_spec_caching_retries_and_kubernetes_settings(compiled):
    _, _, spec, platform, _ = compiled
    tasks = _task_executors(spec)
    for name, (task, _) in tasks.items():
        if not name.startswith("import "):
            assert task["cachingOptions"].get("enableCache") is True, name
            assert task["retryPolicy"]["maxRetryCount"] == 2, name
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    distill = next(v for k, v in k8s.items() if "distill" in k)
    assert {s["secretName"] for s in distill["secretAsEnv"]} == {
        "secateurs-s3",
        "secateurs-mlflow",
        "secateurs-hf",
    }
    assert distill["pvcMount"][0]["constant"] == "secateurs-cache"
    # Checkpoints live on that volume, so a retried pod resumes from them.
    env = {e["name"]: e["value"] for e in tasks[next(n for n in tasks if "distill" in n)][1]["container"]["env"]}
    assert env["SECATEURS_CHECKPOINTS"] == "/cache/checkpoints"
    assert (
        distill["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
        and distill["emptyDirMounts"][0]["medium"] == "Memory"
    )
    assert distill["tolerations"][0]["key"] == "nvidia.com/gpu"
    prune = next(v for k, v in k8s.items() if "prune" in k)
    assert "tolerations" not in prune and "emptyDirMounts" not in prune


def test_compiled_spec_holds_no_credentials(compiled):
    _, text, _, _, secrets = compiled
    for value in secrets.values():
        assert value not in text
    assert "secateurs-s3" in text  # secrets are referenced by name


def test_local_run_refuses_gpus_it_does_not_have(tmp_path, tiny_models, docs_txt, capsys):
    import torch
    import typer

    from secateurs.pipeline_cli import run_cmd

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    path = tmp_path / "gpu.yaml"
    path.write_text(
        yaml.safe_dump(tiny_config(tiny_models["llama-tied"], docs_txt, placement={"gpus": {"distill": 1}}))
    )
    with pytest.raises(typer.Exit):
        run_cmd(path, tmp_path / "run")
    err = capsys.readouterr().err.strip()
    assert (
        err == "error: placement.gpus.distill=1 but this machine has no CUDA GPU: set it to 0 for a local run"
    )
    assert not (tmp_path / "run").exists()


def test_local_run_refuses_an_unreachable_mlflow_server(tmp_path, tiny_models, docs_txt, capsys):
    import socket

    import typer

    from secateurs.pipeline_cli import run_cmd

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "c.yaml"
    cfg = tiny_config(tiny_models["llama-tied"], docs_txt, tracking={"uri": f"http://127.0.0.1:{port}"})
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(typer.Exit):
        run_cmd(path, tmp_path / "run")
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: MLflow tracking server at http://127.0.0.1:{port} is unreachable")
    assert "\n" not in err


def test_submit_to_an_unreachable_host_is_one_line(capsys):
    import socket

    import typer

    from secateurs.pipeline_cli import submit_cmd

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo-cpu.yaml"
    with pytest.raises(typer.Exit):
        submit_cmd(demo, f"http://127.0.0.1:{port}", "secateurs", None)
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: Kubeflow Pipelines at http://127.0.0.1:{port} is unreachable"), err
    assert "\n" not in err


class _KfpApi:
    """An HTTP server on 127.0.0.1 answering the Kubeflow Pipelines v2beta1 REST calls that `kfp.Client` makes to
    submit a run (experiments, runs, healthz), recording each request; with `refuse`, it answers 401 to all."""

    def __init__(self, refuse: bool = False):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[dict] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                api.requests.append({"method": self.command, "path": self.path, "body": body,
                                     "authorization": self.headers.get("Authorization")})  # fmt: skip
                path = self.path.split("?")[0]
                if refuse:
                    status, reply = 401, {"error": "invalid bearer token", "code": 16}
                elif path.endswith("/healthz"):
                    status, reply = 200, {"multi_user": False, "tag_name": "2.5.0"}
                elif path == "/apis/v2beta1/experiments" and self.command == "GET":
                    status, reply = 200, {}  # no experiment of that name yet
                elif path == "/apis/v2beta1/experiments":
                    status, reply = 200, {"experiment_id": "exp-1", "display_name": body["display_name"]}
                elif path == "/apis/v2beta1/runs" and self.command == "POST":
                    status, reply = 200, {**body, "run_id": "run-42", "state": "PENDING"}
                else:
                    status, reply = 404, {"error": f"no route {path}", "code": 5}
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_submit_sends_the_compiled_spec_with_the_token_and_prints_the_run_url(monkeypatch, capsys):
    from secateurs.pipeline_cli import submit_cmd

    api = _KfpApi()
    monkeypatch.setenv("KFP_TOKEN", "t0ken")
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo-cpu.yaml"
    try:
        submit_cmd(demo, api.url, "secateurs", None)
    finally:
        api.close()
    # kfp.Client prints its own "Run details: ..." lines first; the last line is ours.
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"{api.url}/#/runs/details/run-42"
    runs = [r for r in api.requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/runs"]
    assert len(runs) == 1 and all(r["authorization"] == "Bearer t0ken" for r in api.requests)
    run = runs[0]["body"]
    assert run["experiment_id"] == "exp-1"
    spec = run["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "demo-cpu"
    assert {"comp-distill", "comp-prune", "comp-evaluate"} <= set(spec["components"])
    assert run["runtime_config"]["parameters"]["pipeline_run"].startswith("demo-cpu-")
    assert "t0ken" not in json.dumps(spec)


def test_submit_with_a_refused_token_is_one_line(monkeypatch, capsys):
    import typer

    from secateurs.pipeline_cli import submit_cmd

    api = _KfpApi(refuse=True)
    monkeypatch.setenv("KFP_TOKEN", "expired")
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo-cpu.yaml"
    try:
        with pytest.raises(typer.Exit):
            submit_cmd(demo, api.url, "secateurs", None)
    finally:
        api.close()
    err = capsys.readouterr().err.strip()
    assert err == f"error: Kubeflow Pipelines at {api.url} refused the token (HTTP 401): set KFP_TOKEN to a valid one"
