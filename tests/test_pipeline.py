"""The pipeline end to end through kfp.local on tiny models: a student chain, MLflow records, the failure
injection, resuming a failed run, rerunning one step, and the compiled spec's placement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kfp_api import KfpApi
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
        # Distillation in two torchrun processes (gloo on CPU), launched by the component as on a GPU node.
        "placement": {"processes": {"distill": 2}},
        **extra,
    }


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


def test_the_run_s_dataset_artifact_is_an_index_of_the_shards_in_the_store(failed_then_resumed, tiny_models,
                                                                           docs_dir, tmp_path):
    """The run's data by reference (conftest: `placement.data_store`): every step above read it from there, and
    it holds the sequences a preparation without a store makes."""
    from secateurs.config import DataConfig
    from secateurs.data import load_packed, prepare_data
    from secateurs.local_run import read_run
    from secateurs.run_records import recorded_outputs

    run_dir, _ = failed_then_resumed
    cfg, state = read_run(run_dir)
    dataset = Path(recorded_outputs(state)[("prepare-data", "dataset")])
    files = [p for p in dataset.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["index.json", "secateurs.json"]
    assert sum(p.stat().st_size for p in files) < 1 << 20
    location = Path(json.loads((dataset / "index.json").read_text())["location"])
    assert location.parent == Path(cfg.placement.data_store) and list(location.rglob("*.bin"))
    prepare_data(tiny_models["llama-tied"], tmp_path / "whole", DataConfig(**tiny_config("", docs_dir)["data"]))
    by_reference, whole = load_packed(dataset)[0], load_packed(tmp_path / "whole")[0]
    for split in ("train", "validation"):
        assert by_reference[split].head(None).tolist() == whole[split].head(None).tolist(), split


def test_lineage_of_the_derived_student_reaches_the_teacher(failed_then_resumed):
    from secateurs.local_run import read_run
    from secateurs.run_records import recorded_outputs
    from secateurs.tracking import lineage

    run_dir, _ = failed_then_resumed
    _, state = read_run(run_dir)
    distilled_b = recorded_outputs(state)[("distill:b", "distilled")]
    chain = lineage(distilled_b, uri=state["tracking_uri"])
    assert [m["name"] for m in chain] == ["b", "b-pruned", "a", "a-pruned", "teacher-corrected", "teacher"]


def test_report_compares_every_model(failed_then_resumed):
    from secateurs.local_run import read_run
    from secateurs.run_records import recorded_outputs

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
    from secateurs.local_run import read_run
    from secateurs.manifest import content_hash
    from secateurs.pipeline_cli import rerun_cmd
    from secateurs.run_records import recorded_outputs

    run_dir, _ = failed_then_resumed
    _, state = read_run(run_dir)
    before = recorded_outputs(state)
    original = before[("distill:b", "distilled")]
    original_hash = content_hash(original)
    # The component ran it under torchrun in the two processes placement asked for.
    report = json.loads(Path(original, "secateurs.json").read_text())["report"]
    assert (report["processes"], report["parallelism"]) == (2, "ddp")
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
FLAGSHIP = Path(__file__).resolve().parents[1] / "configs" / "llama31-8b-minitron.yaml"
IMAGES = {"SECATEURS_IMAGE": "registry.example/secateurs:test",
          "SECATEURS_TENSORRT_LLM_IMAGE": "registry.example/secateurs-tensorrt-llm:test"}  # fmt: skip


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, monkeypatch_module):
    """The Llama-3.1-8B recipe compiled with credentials in the environment that must not leak into it."""
    from secateurs.config import load_config
    from secateurs.pipeline_cli import compile_cmd

    secrets = {"AWS_ACCESS_KEY_ID": "AKIAFAKEKEY123456", "AWS_SECRET_ACCESS_KEY": "fake-secret-value-9f8e7d",
               "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-password-42", "KFP_TOKEN": "fake-kfp-token-abc"}  # fmt: skip
    for k, v in {**secrets, **IMAGES}.items():
        monkeypatch_module.setenv(k, v)
    out = tmp_path_factory.mktemp("spec") / "pipeline.yaml"
    compile_cmd(FLAGSHIP, out, None)  # the command itself, so its pipeline-root resolution is what is checked
    docs = list(yaml.safe_load_all(out.read_text()))
    return load_config(FLAGSHIP), out.read_text(), docs[0], (docs[1] if len(docs) > 1 else {}), secrets


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _tasks(spec, platform):
    """display name -> (task, container, Kubernetes executor config) of every task of the root DAG."""
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    out = {}
    for task in spec["root"]["dag"]["tasks"].values():
        label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        out[task["taskInfo"]["name"]] = (task, executors[label].get("container"), k8s.get(label, {}))
    return out


def test_compiled_spec_is_valid_for_kfp_protos(compiled):
    """KFP's own protobufs parse the spec and every task's Kubernetes config, rejecting unknown fields."""
    from google.protobuf import json_format
    from kfp.kubernetes import kubernetes_executor_config_pb2
    from kfp.pipeline_spec import pipeline_spec_pb2

    _, _, spec, platform, _ = compiled
    json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec(), ignore_unknown_fields=False)
    json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec(), ignore_unknown_fields=False)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for config in executors.values():
        json_format.ParseDict(config, kubernetes_executor_config_pb2.KubernetesExecutorConfig(),
                              ignore_unknown_fields=False)  # fmt: skip
    assert set(executors) == set(spec["deploymentSpec"]["executors"])  # every task has its Kubernetes settings


def test_compiled_flagship_sets_every_cluster_setting_on_every_task(compiled):
    """Setting by setting, what a KFP 2.x cluster with the chart installed needs to run the flagship config."""
    from secateurs.placement import DEFAULTS_KEYS
    from secateurs.registry import STEPS

    config, _, spec, platform, _ = compiled
    assert spec["defaultPipelineRoot"] == "s3://secateurs/pipeline-root" == config.tracking.pipeline_root
    # The config's MLflow URI is the pipeline's default; without one, each step reads the ConfigMap's (below).
    assert spec["root"]["inputDefinitions"]["parameters"]["tracking_uri"]["defaultValue"] == config.tracking.uri
    tasks = {name: t for name, t in _tasks(spec, platform).items() if not name.startswith("import ")}
    kinds = {s.key: s.kind for s in __import__("secateurs.pipelines.recipe", fromlist=["recipe"]).recipe(config)}
    assert sorted(tasks) == sorted(kinds)
    secret_env = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_USERNAME",
                  "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN"}  # fmt: skip
    for name, (task, container, k8s) in tasks.items():
        spec_of = STEPS[kinds[name]]
        # Image: the engine builds TensorRT-LLM engines, so it runs in that image; every other step in ours.
        expected_image = IMAGES["SECATEURS_TENSORRT_LLM_IMAGE" if spec_of.kind == "engine" else "SECATEURS_IMAGE"]
        assert container["image"] == expected_image, name
        # GPUs, node selector, tolerations and /dev/shm only on GPU steps, with the configured counts.
        gpus = getattr(config.placement.gpus, spec_of.kind) if spec_of.gpu else 0
        accelerator = container.get("resources", {}).get("accelerator")
        if gpus:
            assert (accelerator["resourceType"], int(accelerator["resourceCount"])) == ("nvidia.com/gpu", gpus), name
            assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, name
            assert k8s["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            assert k8s["emptyDirMounts"] == [{"volumeName": "shm", "mountPath": "/dev/shm", "medium": "Memory",
                                              "sizeLimit": "64Gi"}], name  # fmt: skip
        else:
            assert accelerator is None and "nodeSelector" not in k8s and "tolerations" not in k8s, name
            assert "emptyDirMounts" not in k8s, name
        # The chart's defaults as env, each key optional; a variable a Secret fills comes from the Secret only.
        (config_map,) = k8s["configMapAsEnv"]
        assert config_map["configMapName"] == "secateurs-defaults" and config_map["optional"] is True, name
        loaded = [m["envVar"] for m in config_map["keyToEnv"]]
        assert loaded == [k for k in DEFAULTS_KEYS if k != "AWS_ENDPOINT_URL"], name
        # Secrets by name and key; their values are nowhere in the spec (test_compiled_spec_holds_no_credentials).
        from_secrets = {m["envVar"]: (s["secretName"], m["secretKey"]) for s in k8s["secretAsEnv"]
                        for m in s["keyToEnv"]}  # fmt: skip
        assert set(from_secrets) == secret_env and from_secrets["HF_TOKEN"] == ("secateurs-hf", "token"), name
        # The cache volume, and the variables that point into it (a retried training pod resumes from there).
        assert [(m["constant"], m["mountPath"]) for m in k8s["pvcMount"]] == [("secateurs-cache", "/cache")], name
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        # prepare-data publishes the shards on the volume too: its artifact carries their index only.
        store = {"SECATEURS_DATA_STORE": "/cache/datasets"} if spec_of.kind == "prepare_data" else {}
        assert env == {"SECATEURS_CACHE": "/cache/secateurs", "HF_HOME": "/cache/huggingface",
                       "SECATEURS_CHECKPOINTS": "/cache/checkpoints", **store}, name  # fmt: skip
        # Requests and limits from placement.resources.
        resources = config.placement.resources.get(spec_of.kind)
        if resources and resources.memory_request:
            assert container["resources"]["resourceMemoryRequest"] == resources.memory_request, name
        assert task["retryPolicy"]["maxRetryCount"] == 2 and task["retryPolicy"]["backoffDuration"] == "60s", name
        assert task["cachingOptions"].get("enableCache") is True, name


def test_the_data_store_is_the_cache_volume_else_an_s3_pipeline_root_else_none(tmp_path, monkeypatch):
    """Where prepare-data publishes the shards (the flagship's cache volume: above): under an `s3://` pipeline root
    without a volume; `placement.data_store` when set; nowhere for a config with neither (a local run keeps the
    shards in its artifact). Only the prepare-data task gets it."""
    from secateurs.config import load_config
    from secateurs.submit import compile_pipeline

    for k, v in IMAGES.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SECATEURS_PIPELINE_ROOT", raising=False)

    def stores(config, root=None):
        spec = next(yaml.safe_load_all(compile_pipeline(config, tmp_path / "p.yaml", root).read_text()))
        found = {}
        for name, (_, container, _) in _tasks(spec, {"platforms": {"kubernetes": {"deploymentSpec": {
                "executors": {}}}}}).items():  # fmt: skip
            for e in container.get("env", []):
                if e["name"] == "SECATEURS_DATA_STORE":
                    found[name] = e["value"]
        return found

    config = load_config(FLAGSHIP)
    config.placement.cache_volume = None
    assert stores(config) == {"prepare-data": "s3://secateurs/pipeline-root/datasets"}
    assert stores(config, "s3://other/root/") == {"prepare-data": "s3://other/root/datasets"}
    config.placement.data_store = "s3://corpora/prepared"
    assert stores(config) == {"prepare-data": "s3://corpora/prepared"}
    config.placement.data_store, config.tracking.pipeline_root = None, str(tmp_path / "artifacts")
    assert stores(config) == {}
    with pytest.raises(ValueError, match="data_store='datasets': expected an absolute path"):
        type(config.placement).model_validate({"data_store": "datasets"})


def test_engine_image_follows_the_engine_backend(tmp_path, monkeypatch):
    """With the onnxruntime-genai backend the engine runs in the secateurs image; with tensorrt-llm (the
    flagship, above) in the TensorRT-LLM one."""
    from secateurs.config import load_config
    from secateurs.submit import compile_pipeline

    for k, v in IMAGES.items():
        monkeypatch.setenv(k, v)
    config = load_config(FLAGSHIP)
    config.engine.backend, config.engine.precision = "onnxruntime-genai", "int4"
    config.tracking.uri = None
    spec = next(yaml.safe_load_all(compile_pipeline(config, tmp_path / "p.yaml").read_text()))
    assert spec["root"]["inputDefinitions"]["parameters"]["tracking_uri"]["defaultValue"] == ""
    engines = [c for name, (_, c, _) in _tasks(spec, {"platforms": {"kubernetes": {"deploymentSpec": {
        "executors": {}}}}}).items() if name.startswith("engine:")]  # fmt: skip
    assert len(engines) == 3 and {c["image"] for c in engines} == {IMAGES["SECATEURS_IMAGE"]}
    assert "defaultPipelineRoot" not in spec  # compile_pipeline without a root leaves KFP's


def test_four_nodes_hand_distillation_to_a_trainjob(tmp_path, monkeypatch):
    """With placement.nodes.distill = 4 the distill tasks carry the TrainJob they create: 4 nodes of 8 GPUs, in
    the step's own image; teacher correction stays on its node."""
    from secateurs.config import load_config
    from secateurs.submit import compile_pipeline

    for k, v in IMAGES.items():
        monkeypatch.setenv(k, v)
    config = load_config(FLAGSHIP)
    config.placement.nodes = {"distill": 4}
    spec = next(yaml.safe_load_all(compile_pipeline(config, tmp_path / "p.yaml").read_text()))
    params = {name: task["inputs"].get("parameters", {}) for name, task in
              ((t["taskInfo"]["name"], t) for t in spec["root"]["dag"]["tasks"].values())}  # fmt: skip
    job = json.loads(params["distill:width"]["trainjob"]["runtimeValue"]["constant"])
    assert (job["nodes"], job["gpus_per_node"], job["processes_per_node"]) == (4, 8, 8)
    assert job["image"] == IMAGES["SECATEURS_IMAGE"] and job["cache_pvc"] == "secateurs-cache"
    assert params["correct-teacher"]["trainjob"]["runtimeValue"]["constant"] == ""


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, monkeypatch_module):
    """The flagship compiled with its distillations on 2 nodes each: the config and the spec's tasks."""
    from secateurs.config import load_config
    from secateurs.submit import compile_pipeline

    for k, v in IMAGES.items():
        monkeypatch_module.setenv(k, v)
    config = load_config(FLAGSHIP)
    config.placement.nodes = {"distill": 2}
    docs = list(yaml.safe_load_all(compile_pipeline(config, tmp_path_factory.mktemp("two") / "p.yaml").read_text()))
    return config, _tasks(docs[0], docs[1])


def test_a_multi_node_step_holds_no_gpu_node_while_it_watches_its_trainjob(two_nodes):
    """The KFP pod of a 2-node distillation only creates and watches the TrainJob: no GPU, node selector,
    toleration or /dev/shm, and small requests (else a 2-node pool waits for a third node); teacher correction,
    on one node, keeps its node's GPUs and resources."""
    from secateurs.pipelines.recipe import WATCHER_RESOURCES

    config, tasks = two_nodes
    distills = {name: t for name, t in tasks.items() if name.startswith("distill:")}
    assert sorted(distills) == ["distill:depth", "distill:width"]
    for name, (_, container, k8s) in distills.items():
        resources = container.get("resources", {})
        assert "accelerator" not in resources, name
        assert not {"nodeSelector", "tolerations", "emptyDirMounts"} & set(k8s), name
        assert {k: v for k, v in resources.items() if k.startswith("resource")} == {
            "resourceCpuRequest": WATCHER_RESOURCES["cpu_request"],
            "resourceMemoryRequest": WATCHER_RESOURCES["memory_request"]}, name  # fmt: skip
        # It still stages the inputs on the cache volume and reads the S3 and MLflow secrets.
        assert [m["constant"] for m in k8s["pvcMount"]] == ["secateurs-cache"] and k8s["secretAsEnv"], name
    _, container, k8s = tasks["correct-teacher"]
    resources, wanted = container["resources"], config.placement.resources["correct_teacher"]
    assert int(resources["accelerator"]["resourceCount"]) == config.placement.gpus.correct_teacher
    assert resources["resourceMemoryRequest"] == wanted.memory_request
    assert k8s["nodeSelector"]["labels"] == config.placement.node_selector


def test_the_trainjob_of_a_multi_node_step_carries_the_step_resources(two_nodes):
    """The TrainJob that the compiled distill task creates (from the JobPlacement in its spec) asks for the GPUs
    and placement.resources on every node, and is valid against Kubeflow Trainer v2.3.0's CRD schema."""
    import jsonschema
    from k8s_api import trainjob_schema

    from secateurs.trainjob import JobPlacement, trainjob_manifest

    config, tasks = two_nodes
    task, _, _ = tasks["distill:width"]
    job = JobPlacement(**json.loads(task["inputs"]["parameters"]["trainjob"]["runtimeValue"]["constant"]))
    manifest = trainjob_manifest("secateurs-distill-0123456789ab", "distill", {"teacher": "/cache/t"}, "/cache/o",
                                 "/cache/s.json", job)  # fmt: skip
    jsonschema.validate(manifest, trainjob_schema())
    wanted = config.placement.resources["distill"]
    assert manifest["spec"]["trainer"]["numNodes"] == 2
    assert manifest["spec"]["trainer"]["resourcesPerNode"] == {
        "requests": {"cpu": wanted.cpu_request, "memory": wanted.memory_request},
        "limits": {"memory": wanted.memory_limit, "nvidia.com/gpu": str(config.placement.gpus.distill)},
    }


def test_components_declare_the_registry_inputs_and_outputs():
    """A lightweight component's interface is its Python signature (KFP ships the source); it must be the
    registry's, artifact types included."""
    from secateurs.components.steps import FUNCTIONS, component
    from secateurs.registry import STEPS

    assert set(FUNCTIONS) == set(STEPS)
    for kind, spec in STEPS.items():
        c = component(kind, "img").component_spec
        artifacts = {n: i.type for n, i in c.inputs.items() if i.type.startswith("system.")}
        assert artifacts == {n: f"system.{t}@0.0.1" for n, t in spec.inputs.items()}, kind
        assert {n for n, i in c.inputs.items() if i.optional and n in artifacts} == set(spec.optional), kind
        assert {n: o.type for n, o in c.outputs.items()} == {n: f"system.{t}@0.0.1" for n, t in spec.outputs.items()}
        params = {n for n in c.inputs if n not in artifacts}
        expected = ({"settings"} if spec.settings else set()) | set(spec.params)
        expected |= {"tracking_uri", "pipeline_run"} if spec.tracked else set()
        expected |= {"student"} if spec.per_student else set()
        assert params == expected, kind


def test_compiled_spec_holds_no_credentials(compiled):
    _, text, _, _, secrets = compiled
    for value in secrets.values():
        assert value not in text
    assert "secateurs-s3" in text  # secrets are referenced by name


def test_local_run_refuses_gpus_it_does_not_have(tmp_path, tiny_models, docs_dir, capsys):
    import torch
    import typer

    from secateurs.pipeline_cli import run_cmd

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    path = tmp_path / "gpu.yaml"
    path.write_text(
        yaml.safe_dump(tiny_config(tiny_models["llama-tied"], docs_dir, placement={"gpus": {"distill": 1}}))
    )
    with pytest.raises(typer.Exit):
        run_cmd(path, tmp_path / "run")
    err = capsys.readouterr().err.strip()
    assert (
        err == "error: placement.gpus.distill=1 but this machine has no CUDA GPU: set it to 0 for a local run"
    )
    assert not (tmp_path / "run").exists()


def test_local_run_refuses_an_unreachable_mlflow_server(tmp_path, tiny_models, docs_dir, capsys):
    import socket

    import typer

    from secateurs.pipeline_cli import run_cmd

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "c.yaml"
    cfg = tiny_config(tiny_models["llama-tied"], docs_dir, tracking={"uri": f"http://127.0.0.1:{port}"})
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
        submit_cmd(demo, f"http://127.0.0.1:{port}", "secateurs", None, None, None)
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: Kubeflow Pipelines at http://127.0.0.1:{port} is unreachable"), err
    assert "\n" not in err


def test_submit_sends_the_compiled_spec_with_the_token_and_prints_the_run_url(monkeypatch, capsys):
    from secateurs.pipeline_cli import submit_cmd

    api = KfpApi()
    monkeypatch.setenv("KFP_TOKEN", "t0ken")
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo-cpu.yaml"
    try:
        submit_cmd(demo, api.url, "secateurs", None, None, None)
    finally:
        api.close()
    # kfp.Client prints its own "Run details: ..." lines first; the last line is ours.
    (run_id,) = api.runs
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"{api.url}/#/runs/details/{run_id}"
    runs = [r for r in api.requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/runs"]
    assert len(runs) == 1 and all(r["authorization"] == "Bearer t0ken" for r in api.requests)
    run = runs[0]["body"]
    (experiment,) = api.experiments.values()
    assert run["experiment_id"] == experiment["experiment_id"] and experiment["display_name"] == "secateurs"
    # kfp.Client sends a spec with Kubernetes settings as {pipeline_spec, platform_spec}.
    spec, platform = run["pipeline_spec"]["pipeline_spec"], run["pipeline_spec"]["platform_spec"]
    assert "kubernetes" in platform["platforms"]
    assert spec["pipelineInfo"]["name"] == "demo-cpu"
    assert {"comp-distill", "comp-prune", "comp-evaluate"} <= set(spec["components"])
    assert run["runtime_config"]["parameters"]["pipeline_run"].startswith("demo-cpu-")
    assert "t0ken" not in json.dumps(spec)


def test_submit_with_a_refused_token_is_one_line(monkeypatch, capsys):
    import typer

    from secateurs.pipeline_cli import submit_cmd

    api = KfpApi(refuse=True)
    monkeypatch.setenv("KFP_TOKEN", "expired")
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo-cpu.yaml"
    try:
        with pytest.raises(typer.Exit):
            submit_cmd(demo, api.url, "secateurs", None, None, None)
    finally:
        api.close()
    err = capsys.readouterr().err.strip()
    assert err == f"error: Kubeflow Pipelines at {api.url} refused the token (HTTP 401): set KFP_TOKEN to a valid one"


def test_submit_of_a_package_kfp_refuses_is_one_line_with_the_server_s_reason(tmp_path, capsys):
    """The strict stand-in parses the run's spec with KFP's PipelineSpec proto, as the API server does: a package
    without a root component is "unknown template format" (HTTP 500, as KFP wraps it), and the one-line error
    carries that reason rather than ApiException's bare "(500)"."""
    from secateurs.errors import PipelineError
    from secateurs.submit import submit_spec

    package = tmp_path / "p.yaml"
    package.write_text("pipelineInfo:\n  name: not-a-spec\nschemaVersion: 2.1.0\n")
    api = KfpApi()
    try:
        with pytest.raises(PipelineError) as refused:
            submit_spec(package, api.url, {}, "r", "secateurs", None, True)
    finally:
        api.close()
    assert str(refused.value).startswith(f"Kubeflow Pipelines at {api.url} answered HTTP 500: Failed to create a new run")
    assert str(refused.value).endswith("InvalidInputError: unknown template format: pipeline spec is invalid")
    assert api.runs == {}


def test_the_kfp_stand_in_refuses_what_the_api_server_refuses():
    """Unknown fields (grpc-gateway with DiscardUnknown false), a missing run name, and unknown routes get the real
    status and google.rpc.Status body; the stand-in is no kinder than the server it stands for."""
    import urllib.error
    import urllib.request

    api = KfpApi()

    def post(path, body):
        request = urllib.request.Request(api.url + path, json.dumps(body).encode(), method="POST")
        try:
            with urllib.request.urlopen(request) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    try:
        assert post("/apis/v2beta1/experiments", {"display_name": "e", "colour": "red"}) == (
            400, {"code": 3, "message": 'proto: unknown field "colour" in V2beta1Experiment', "details": []})
        assert post("/apis/v2beta1/runs", {"runtime_config": {"pipelineRoot": 1}})[0] == 400
        assert post("/apis/v2beta1/runs", {"pipeline_spec": {}})[1]["details"][0]["message"] == (
            "The run name is empty. Please specify a valid name")
        assert post("/apis/v2beta1/run", {}) == (404, {"code": 5, "message": "Not Found", "details": []})
    finally:
        api.close()


@pytest.mark.parametrize("override", [None, "s3://other-bucket/root"])
def test_submit_sends_the_pipeline_root_and_service_account(monkeypatch, capsys, override):
    """The flagship config's S3 pipeline root and the chart's ServiceAccount reach the created run (and the spec's
    default root); `--pipeline-root` / `--service-account` override them."""
    from secateurs.pipeline_cli import submit_cmd

    api = KfpApi()
    try:
        submit_cmd(FLAGSHIP, api.url, "secateurs", None, override, "sa-override" if override else None)
    finally:
        api.close()
    (run,) = [r["body"] for r in api.requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/runs"]
    root = override or "s3://secateurs/pipeline-root"
    assert run["runtime_config"]["pipeline_root"] == root
    assert run["pipeline_spec"]["pipeline_spec"]["defaultPipelineRoot"] == root
    assert run["service_account"] == ("sa-override" if override else "secateurs-pipeline")


def test_config_validation_and_compile_import_no_torch(tmp_path):
    """`import secateurs.config`, `validate`, `compile` and `submit --help` load pydantic and kfp, never torch
    (checked with the interpreter's own import log, -X importtime)."""
    import subprocess
    import sys

    commands = [
        ["-c", "import secateurs.config"],
        ["-m", "secateurs.cli", "validate", str(FLAGSHIP)],
        ["-m", "secateurs.cli", "compile", str(FLAGSHIP), "-o", str(tmp_path / "p.yaml")],
        ["-m", "secateurs.cli", "submit", "--help"],
    ]
    for args in commands:
        done = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, check=True)
        modules = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
        assert "pydantic" in modules, args
        heavy = sorted(m for m in modules if m.split(".")[0] in ("torch", "transformers", "datasets", "mlflow"))
        assert heavy == [], (args, heavy[:5])
    assert (tmp_path / "p.yaml").is_file()
