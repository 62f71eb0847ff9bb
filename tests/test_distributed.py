"""Training under torchrun: real processes on 127.0.0.1 with the gloo backend, on tiny models.

The same distillation (KD with intermediate-layer losses and learned projections, so the hooked layers, the LM
head and the projections are all exercised) runs in one process, in two processes with DDP, in two with FSDP2, and
on two "nodes" started as Kubeflow Trainer starts its pods; all see the same global batch of 4 sequences per step.
The two-process FSDP2 run also accumulates: micro-batches of 1, two a process, against one process accumulating
four of 1, and it counts its reduce-scatters to show that every micro-batch's gradients are reduced at once.

Tolerance: every variant computes the same sums in another order (two micro-batches accumulated in one process
against an all-reduce or a reduce-scatter of two processes' gradients), so results agree to float32 rounding, not
bit for bit. Measured over these 6 steps: DDP within 4e-6 of the losses and 2e-8 of the weights; FSDP2 within
2e-4 of the losses and 4e-5 of every weight but a few embedding entries. Those are AdamW's doing: it scales each
entry's update to about +-lr whatever the gradient's size, so an entry whose gradient is rounding noise (an
embedding row of a token the batch barely touches: 11 of 2.4M entries here) can move by up to lr per step either
way. So the test allows FSDP2 1e-3 relative on losses, 1e-4 on weights for all but 1e-5 of the entries, and
lr x steps for those. DDP's all-reduce only reorders one sum per step and showed no such entries, so it is held to
about 10x its measured gaps on every entry: losses within 4e-5 relative, weights within 1e-5 (measured again on
2 shared CPU cores: 2.2e-6 and 5.3e-7, no entry above 1e-4). A wrong batch split, a missing gradient average or
unsynchronised projections change the first losses or thousands of entries by far more.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from secateurs import prune, train
from secateurs.config import DistillConfig
from secateurs.prune import PruneTarget

SETTINGS = dict(max_steps=6, micro_batch_size=2, global_batch_size=4, warmup_steps=2, save_steps=3,
                logging_steps=1, learning_rate=1e-3, min_learning_rate=1e-4, intermediate_loss=True)  # fmt: skip
LOSS_RTOL, WEIGHT_ATOL = 1e-3, 1e-4  # why: the module docstring
DDP_LOSS_RTOL, DDP_WEIGHT_ATOL = 4e-5, 1e-5  # DDP, measured up to 4e-6 and 5.3e-7: the module docstring
# Under fsdp the two processes run a step's 4 sequences as micro-batches of 1, two each, accumulated.
FSDP_MICRO_BATCH = {"micro_batch_size": 1}
# A run's whole time is bounded: a hung rendezvous fails the test instead of hanging the suite.
TIMEOUT = 600


@pytest.fixture(scope="module")
def student(tiny_models, tiny_importance, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist-student") / "width-depth"
    prune.run(tiny_models["llama-untied"], tiny_importance["llama-untied"], out,
              PruneTarget(hidden_size=48, ffn_hidden_size=64, num_attention_heads=4, drop_layers=[1]))  # fmt: skip
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(teacher, student, data, out, parallelism="ddp", **overrides) -> list[str]:
    cmd = ["-m", "secateurs", "distill", "--teacher", str(teacher), "--student", str(student), "--data", str(data),
           "--out", str(out), "--parallelism", parallelism]  # fmt: skip
    for k, v in {**SETTINGS, **overrides}.items():
        flag = f"--{k.replace('_', '-')}"
        cmd += [flag] if v is True else [flag, str(v)]
    return cmd


def _torchrun(nproc: int, nnodes: int = 1) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}"]


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def _report(out: Path) -> dict:
    return json.loads((out / "secateurs.json").read_text())["report"]


def _losses(report: dict) -> list[float]:
    return [h["loss"] for h in report["log_history"]]


@pytest.fixture(scope="module")
def single(tiny_models, student, tiny_data, tmp_path_factory):
    """The reference: one process, two micro-batches of 2 accumulated per step."""
    out = tmp_path_factory.mktemp("single") / "distilled"
    train.distill(tiny_models["llama-untied"], student, tiny_data, out, DistillConfig(**SETTINGS))
    return out


@pytest.fixture(scope="module")
def single_by_ones(tiny_models, student, tiny_data, tmp_path_factory):
    """The reference of the fsdp run that accumulates: one process, four micro-batches of 1 accumulated per step.
    (Not `single`: the intermediate loss is rescaled a micro-batch at a time, so its gradient depends on how the
    batch is cut.)"""
    out = tmp_path_factory.mktemp("single-by-ones") / "distilled"
    train.distill(tiny_models["llama-untied"], student, tiny_data, out, DistillConfig(**SETTINGS | FSDP_MICRO_BATCH))
    return out


def _assert_same_run(out: Path, reference: Path, processes: int, parallelism: str) -> None:
    report, expected = _report(out), _report(reference)
    assert (report["processes"], report["parallelism"]) == (processes, parallelism)
    assert report["steps"] == expected["steps"] == 6 and len(_losses(report)) == 6
    loss_gap = max(abs(x - y) / abs(y) for x, y in zip(_losses(report), _losses(expected)))
    a, b = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys()
    gaps = torch.cat([(a[name] - b[name]).abs().flatten() for name in a])
    outliers = int((gaps > WEIGHT_ATOL).sum())
    print(f"{processes} processes, {parallelism}: loss gap {loss_gap:.1e} (relative), weight gap {gaps.max():.1e}, "
          f"{outliers} of {gaps.numel()} entries above {WEIGHT_ATOL}")  # fmt: skip
    if parallelism == "ddp":
        assert loss_gap < DDP_LOSS_RTOL and gaps.max() <= DDP_WEIGHT_ATOL
    assert loss_gap < LOSS_RTOL
    assert outliers <= 1e-5 * gaps.numel() and gaps.max() <= SETTINGS["learning_rate"] * SETTINGS["max_steps"]


# Run under torchrun: the step as its command runs it, with each process noting, for each of its micro-batches (a
# call of the Trainer's `training_step`: forward and backward), how many gradient reduce-scatters it ran.
_COUNTED_STEP = """
import json, os, sys
import torch.distributed as dist
from transformers import Trainer
from secateurs.cli import main

counts, reductions = [], [0]

def counting(real):
    def counted(*args, **kwargs):
        reductions[0] += 1
        return real(*args, **kwargs)
    return counted

for name in ("reduce_scatter_single", "reduce_scatter_tensor"):  # what FSDP2 calls, by torch release
    if hasattr(dist, name):
        setattr(dist, name, counting(getattr(dist, name)))
training_step = Trainer.training_step

def counted_step(self, *args, **kwargs):
    before = reductions[0]
    try:
        return training_step(self, *args, **kwargs)
    finally:
        counts.append(reductions[0] - before)

Trainer.training_step = counted_step
trace, sys.argv[1:] = sys.argv[1], sys.argv[2:]
try:
    main()
finally:
    with open(os.path.join(trace, "rank-%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(counts, f)
"""


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_processes_train_as_one(parallelism, tiny_models, student, tiny_data, request, tmp_path):
    """Under fsdp a step is 4 micro-batches of 1, 2 a process accumulated (FSDP_MICRO_BATCH), and every one of
    them reduce-scatters its gradients as its backward ends: no process holds the whole model's unsharded
    gradients through a step (sync_each_batch; train.py)."""
    out, trace = tmp_path / "distilled", tmp_path / "trace"
    trace.mkdir()
    script = tmp_path / "counted.py"
    script.write_text(_COUNTED_STEP)
    overrides = FSDP_MICRO_BATCH if parallelism == "fsdp" else {}
    reference = request.getfixturevalue("single_by_ones" if overrides else "single")
    cmd = _torchrun(2) + ["--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(script), str(trace)]
    # The script stands for `-m secateurs`.
    command = _command(tiny_models["llama-untied"], student, tiny_data, out, parallelism, **overrides)[2:]
    done = subprocess.run(cmd + command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_run(out, reference, 2, parallelism)
    if parallelism == "fsdp":
        micro_batches = SETTINGS["max_steps"] * SETTINGS["global_batch_size"] // (2 * overrides["micro_batch_size"])
        for rank in (0, 1):
            counts = json.loads((trace / f"rank-{rank}.json").read_text())
            # The same reduce-scatters (one a parameter group) after every micro-batch; accelerate's no_sync would
            # leave all but each step's last with none.
            assert len(counts) == micro_batches and counts[0] > 0 and set(counts) == {counts[0]}, counts
        # each process wrote its own shard of the weights and of the optimizer state
        checkpoint = Path(_report(out)["checkpoint_dir"]) / "checkpoint-6"
        assert {p.name for p in checkpoint.iterdir()} >= {"pytorch_model_fsdp_0", "optimizer_0"}
        assert not (checkpoint / "model.safetensors").exists()


# Run under torchrun: the step as its command runs it, with each process noting the training sequences it reads.
_TRACED_STEP = """
import json, os, sys
from secateurs import data
from secateurs.cli import main

read, seen = data.PackedSplit.__getitem__, []

def traced(self, i):
    if self.split == "train":
        seen.append(int(i))
    return read(self, i)

data.PackedSplit.__getitem__ = traced
trace, sys.argv[1:] = sys.argv[1], sys.argv[2:]
try:
    main()
finally:
    with open(os.path.join(trace, "rank-%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(seen, f)
"""


def test_each_process_reads_its_own_part_of_the_data(tiny_models, tiny_data, tmp_path):
    """Two processes read disjoint sequences, and between them the ones a single process reads in the same steps
    (the Trainer's sampler over the blended split, sharded by accelerate)."""
    script = tmp_path / "traced.py"
    script.write_text(_TRACED_STEP)
    steps, per_step = 3, 4
    command = ["correct-teacher", "--model", str(tiny_models["llama-untied"]), "--data", str(tiny_data),
               "--max-steps", str(steps), "--micro-batch-size", "2", "--global-batch-size", str(per_step),
               "--save-steps", "100", "--warmup-steps", "1"]  # fmt: skip
    reads = {}
    for processes in (1, 2):
        trace = tmp_path / f"trace-{processes}"
        trace.mkdir()
        launcher = _torchrun(processes) + ["--master-addr=127.0.0.1", f"--master-port={_free_port()}"]
        done = subprocess.run(launcher + [str(script), str(trace)] + command + ["--out", str(tmp_path / f"out-{processes}")],
                              env=_env(), capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        reads[processes] = [json.loads((trace / f"rank-{r}.json").read_text()) for r in range(processes)]
    (single,), (rank0, rank1) = reads[1], reads[2]
    assert not set(rank0) & set(rank1)
    # Each process reads micro-batches of 2; the steps' sequences are the first steps x micro-batches of each.
    used = steps * per_step // 2
    assert set(rank0[:used]) | set(rank1[:used]) == set(single[: steps * per_step])


def test_two_nodes_started_as_the_trainer_runtime_starts_its_pods(tiny_models, student, tiny_data, single, tmp_path):
    """Kubeflow Trainer's torch-distributed runtime runs `torchrun` in each node's pod with PET_* variables
    (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT), which torchrun reads as its
    options; the command itself names none of them."""
    out = tmp_path / "distilled"
    port = str(_free_port())
    command = [sys.executable, "-m", "torch.distributed.run"] + _command(
        tiny_models["llama-untied"], student, tiny_data, out, "fsdp"
    )
    nodes = [
        subprocess.Popen(command, env=_env(PET_NNODES="2", PET_NPROC_PER_NODE="1", PET_NODE_RANK=str(rank),
                                           PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=port),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=TIMEOUT)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    _assert_same_run(out, single, 2, "fsdp")


def _workers(agent: subprocess.Popen) -> list[int]:
    """The worker processes torchrun's agent started (its children)."""
    children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []


@pytest.mark.e2e  # two full torchrun trainings, one killed and resumed (about a minute): make test-e2e
def test_sigkill_of_one_rank_stops_the_run_and_the_same_command_resumes(tiny_models, student, tiny_data, tmp_path):
    out = tmp_path / "distilled"
    settings = dict(max_steps=30, save_steps=3)
    command = _torchrun(2) + ["--master-addr=127.0.0.1", f"--master-port={_free_port()}"]
    command += _command(tiny_models["llama-untied"], student, tiny_data, out, "fsdp", **settings)
    straight = tmp_path / "straight"
    uninterrupted = command[: command.index("--out") + 1] + [str(straight)] + command[command.index("--out") + 2 :]
    done = subprocess.run(uninterrupted, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]

    agent = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Both runs have the same identity, so they name the same checkpoint directory only through `--out`.
    state = Path(f"{out}.checkpoints") / "checkpoint-3" / "trainer_state.json"
    deadline = time.time() + TIMEOUT
    while not state.is_file() and agent.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert agent.poll() is None, "the run ended before it could be killed"
    victim = max(_workers(agent))  # rank 1, most likely; any rank will do
    os.kill(victim, signal.SIGKILL)
    assert agent.wait(timeout=TIMEOUT) != 0  # torchrun stops the other rank and fails the run
    assert not out.exists()  # nothing half-written was published

    again = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed, expected = _report(out), _report(straight)
    assert resumed["resumed_from"] is not None and resumed["steps"] == expected["steps"] == 30
    assert resumed["final_loss"] == pytest.approx(expected["final_loss"], rel=1e-4)


def test_fsdp_with_one_process_is_refused_in_one_line(tiny_models, student, tiny_data, tmp_path):
    done = subprocess.run([sys.executable] + _command(tiny_models["llama-untied"], student, tiny_data,
                                                      tmp_path / "o", "fsdp"),
                          env=_env(), capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "error: parallelism=fsdp shards over processes, and this run has one: start it under "
        "`torchrun --nproc-per-node N` with N > 1, or use parallelism=ddp"
    )
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- Kubeflow Trainer TrainJob
def _job_placement(cache: Path, **overrides):
    from secateurs.trainjob import JobPlacement

    fields = dict(image="registry.example/secateurs:test", nodes=2, gpus_per_node=1, processes_per_node=1,
                  cache_pvc="secateurs-cache", cache_mount=str(cache), shm_size="1Gi", pending_timeout=600,
                  poll_seconds=0.2)  # fmt: skip
    return JobPlacement(**{**fields, **overrides})


def test_a_two_node_trainjob_is_valid_against_the_trainer_crd():
    """The TrainJob of the flagship config with 4 nodes, checked against Kubeflow Trainer v2.3.0's CRD schema
    (tests/data, from the kubeflow/trainer v2.3.0 release manifests)."""
    import jsonschema
    from k8s_api import trainjob_schema

    from secateurs.config import load_config
    from secateurs.trainjob import JobPlacement, trainjob_manifest

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "llama31-8b-minitron.yaml")
    config.placement.nodes = {"distill": 4}
    job = JobPlacement.of(config.placement, "distill", "registry.example/secateurs:test")
    manifest = trainjob_manifest("secateurs-distill-0123456789ab", "distill", {"teacher": "/cache/t"}, "/cache/o",
                                 "/cache/s.json", job)  # fmt: skip
    jsonschema.validate(manifest, trainjob_schema())
    trainer = manifest["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["resourcesPerNode"]) == (
        4, 8, {"requests": {"cpu": "32", "memory": "512G"}, "limits": {"memory": "1000G", "nvidia.com/gpu": "8"}})  # fmt: skip
    assert manifest["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                              "name": "torch-distributed"}  # fmt: skip
    pod = manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = pod["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {v["name"] for v in pod["volumes"]} == {"cache", "shm"}
    assert {e["name"] for e in trainer["env"] if "valueFrom" in e} == {
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN"}  # fmt: skip
    assert trainer["command"][:6] == ["python", "-m", "torch.distributed.run", "-m", "secateurs", "distill"]


def test_trainjob_runs_on_two_nodes_publishes_its_output_and_a_retry_finds_it(
    tiny_models, student, tiny_data, single, tmp_path, capsys
):
    """Create -> the job's two nodes train (the stand-in runs them as the runtime would) -> Complete -> the
    output is copied to the step's own path; a retried step finds the completed job and creates none."""
    from k8s_api import KubernetesApi

    from secateurs import trainjob

    api = KubernetesApi(tmp_path, pvcs={"secateurs-cache"})
    job = _job_placement(tmp_path / "cache")
    inputs = {"teacher": str(tiny_models["llama-untied"]), "student": str(student), "data": str(tiny_data)}
    settings = DistillConfig(**SETTINGS, parallelism="fsdp")
    digest = train.run_digest("distill", list(inputs.values()), settings)
    try:
        report = trainjob.train("distill", inputs, str(tmp_path / "out"), settings, job, digest,
                                api_client=api.client(), namespace="team")  # fmt: skip
        assert api.posts() == 1
        again = trainjob.train("distill", inputs, str(tmp_path / "retry-out"), settings, job, digest,
                               api_client=api.client(), namespace="team")  # fmt: skip
        assert api.posts() == 1 and again == report  # found, not created again
    finally:
        api.close()
    assert "loss curve" in capsys.readouterr().out  # rank 0's log, streamed to the step's own
    _assert_same_run(tmp_path / "out", single, 2, "fsdp")


def test_trainjob_without_the_trainer_installed_is_refused_before_anything_is_created(tmp_path, student, tiny_data):
    from k8s_api import KubernetesApi

    from secateurs import trainjob

    api = KubernetesApi(tmp_path, mode="no_trainer")
    try:
        with pytest.raises(trainjob.TrainJobError) as e:
            trainjob.train("distill", {"data": str(tiny_data)}, str(tmp_path / "out"), DistillConfig(**SETTINGS),
                           _job_placement(tmp_path / "cache"), "0" * 16, api_client=api.client(), namespace="team")
    finally:
        api.close()
    assert str(e.value) == (
        "Kubeflow Trainer is not installed on this cluster (the API has no trainjobs.trainer.kubeflow.org/v1alpha1): "
        "a step with placement.nodes > 1 runs as a TrainJob; install Kubeflow Trainer v2 or use one node"
    )
    assert api.posts() == 0 and not (tmp_path / "out").exists()


def test_a_trainjob_that_stays_pending_is_deleted_and_fails_the_step(tmp_path, tiny_data):
    from k8s_api import KubernetesApi

    from secateurs import trainjob

    api = KubernetesApi(tmp_path, mode="pending")
    try:
        with pytest.raises(trainjob.TrainJobError, match=r"did not start within 1 s \(Pending\); deleted it"):
            trainjob.train("distill", {"data": str(tiny_data)}, str(tmp_path / "out"), DistillConfig(**SETTINGS),
                           _job_placement(tmp_path / "cache", pending_timeout=1), "1" * 16, api_client=api.client(),
                           namespace="team")  # fmt: skip
    finally:
        api.close()
    assert ("DELETE", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team/trainjobs/secateurs-distill-111111111111") \
        in api.requests and not api.jobs  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing, why", [
    ("secret", 'CreateContainerConfigError: secret "s3-credentials" not found'),
    ("key", "CreateContainerConfigError: couldn't find key access-key in Secret team/s3-credentials"),
    ("pvc", ('Unschedulable: 0/1 nodes are available: persistentvolumeclaim "secateurs-cache" not found. '
             "preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling.")),
], ids=["secret", "key", "pvc"])  # fmt: skip
def test_a_trainjob_missing_a_secret_or_its_volume_stays_pending_and_the_step_says_why(tmp_path, tiny_data, missing,
                                                                                       why):  # fmt: skip
    """As on a cluster: a Secret (or key) that the env references fails container creation, a missing PVC leaves
    the pods unscheduled; neither fails the job, so the step's pending timeout ends it, naming the cause."""
    from k8s_api import KubernetesApi

    from secateurs import trainjob

    secrets = {"secret": {}, "key": {"s3-credentials": {"secret-key": "s"}}}.get(missing, {"s3-credentials": {"access-key": "a"}})
    api = KubernetesApi(tmp_path, secrets=secrets, pvcs=set() if missing == "pvc" else {"secateurs-cache"})
    job = _job_placement(tmp_path / "cache", pending_timeout=1,
                         secrets=[{"name": "s3-credentials", "env": {"access-key": "AWS_ACCESS_KEY_ID"}}])  # fmt: skip
    try:
        with pytest.raises(trainjob.TrainJobError) as refused:
            trainjob.train("distill", {"data": str(tiny_data)}, str(tmp_path / "out"), DistillConfig(**SETTINGS), job,
                           "2" * 16, api_client=api.client(), namespace="team")  # fmt: skip
    finally:
        api.close()
    assert str(refused.value) == (
        f"TrainJob team/secateurs-distill-222222222222 did not start within 1 s (Pending); deleted it. {why}"
    )
    assert not list(tmp_path.glob("*-node-*.log")) and not (tmp_path / "out").exists()  # no container ever ran


def test_a_node_that_fails_once_is_restarted_in_place_and_the_step_follows_its_new_log(tmp_path, capsys):
    """JobSet's default restartPolicy OnFailure: rank 0's container fails once, the kubelet restarts it in the same
    pod, the job completes, and the step streams the second container's log too. (A one-line command stands in
    for training: only the restart is under test.)"""
    from k8s_api import KubernetesApi
    from kubernetes import client

    from secateurs import trainjob

    # The second attempt outlives a few polls, as training does, so that the step sees the container running.
    script = ("import os, pathlib, sys, time; rank = os.environ['PET_NODE_RANK']; marker = pathlib.Path(sys.argv[1], rank); "
              "print(f'rank {rank} attempt {int(marker.exists())}', flush=True); "
              "sys.exit(time.sleep(2) if marker.exists() or rank != '0' else marker.touch() or 3)")  # fmt: skip
    job = _job_placement(tmp_path / "cache")
    manifest = trainjob.trainjob_manifest("restarted", "distill", {}, "out", "settings.json", job)
    manifest["spec"]["trainer"]["command"] = ["python", "-c", script, str(tmp_path)]
    api = KubernetesApi(tmp_path, pvcs={"secateurs-cache"}, crash_backoff_s=0.5)
    try:
        custom = client.CustomObjectsApi(api.client())
        custom.create_namespaced_custom_object(trainjob.GROUP, trainjob.VERSION, "team", trainjob.PLURAL, manifest)
        trainjob._wait(custom, client.CoreV1Api(api.client()), "team", "restarted", job)
        assert [n.restarts for n in api.nodes[("team", "restarted")]] == [1, 0]
    finally:
        api.close()
    out = capsys.readouterr().out
    assert "rank 0 attempt 0" in out and "rank 0 attempt 1" in out


@pytest.mark.e2e  # two full torchrun trainings, one killed and resumed (about a minute): make test-e2e
def test_a_rank_that_keeps_dying_fails_the_job_publishes_nothing_and_the_retry_resumes(
    tiny_models, student, tiny_data, tmp_path
):
    """The torch-distributed runtime restarts a failed node in place (JobSet defaults its pods to restartPolicy
    OnFailure) and fails the TrainJob only when the Job's restarts reach its backoffLimit, 6 (tests/k8s_api.py
    cites the upstream files). A node killed at every start fails the job, nothing is published, and the retried
    step replaces the job and resumes from the checkpoints on the volume."""
    from k8s_api import BACKOFF_LIMIT, KubernetesApi

    from secateurs import trainjob

    api = KubernetesApi(tmp_path, pvcs={"secateurs-cache"}, crash_backoff_s=0.05)
    job = _job_placement(tmp_path / "cache")
    inputs = {"teacher": str(tiny_models["llama-untied"]), "student": str(student), "data": str(tiny_data)}
    settings = DistillConfig(**{**SETTINGS, "max_steps": 30, "save_steps": 3}, parallelism="fsdp")
    digest = train.run_digest("distill", list(inputs.values()), settings)
    name = trainjob.job_name("distill", digest)
    checkpoint = tmp_path / "cache" / "checkpoints" / f"distill-{digest}" / "checkpoint-3" / "trainer_state.json"
    restarts = []

    def kill_node_1_at_every_start_after_a_checkpoint():
        deadline = time.time() + TIMEOUT
        while not checkpoint.is_file() and time.time() < deadline:
            time.sleep(0.01)
        first = api.jobs[("team", name)]
        while not first["status"].get("conditions") and time.time() < deadline:
            api.kill_node("team", name, 1)
            time.sleep(0.01)
        restarts.extend(n.restarts for n in api.nodes[("team", name)])

    try:
        killer = threading.Thread(target=kill_node_1_at_every_start_after_a_checkpoint, daemon=True)
        killer.start()
        failed = f"TrainJob team/{name} failed: FailedJobs: jobset failed due to one or more job failures " \
                 f"(first failed job: {name}-node-0)"  # fmt: skip
        with pytest.raises(trainjob.TrainJobError, match=re.escape(failed)):
            trainjob.train("distill", inputs, str(tmp_path / "out"), settings, job, digest, api_client=api.client(),
                           namespace="team")  # fmt: skip
        killer.join(timeout=60)
        assert sum(restarts) == BACKOFF_LIMIT  # restarts in place, until the Job's backoffLimit
        assert not (tmp_path / "out").exists()
        report = trainjob.train("distill", inputs, str(tmp_path / "out"), settings, job, digest,
                                api_client=api.client(), namespace="team")  # fmt: skip
    finally:
        api.close()
    assert api.posts() == 2  # the failed job was replaced
    assert report["resumed_from"] is not None and report["steps"] == 30
