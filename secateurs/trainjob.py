"""A training step on several nodes: a Kubeflow Trainer v2 TrainJob that the pipeline step creates and watches.

The job runs the same command as one node does (`torchrun -m secateurs distill ...`, torchrun reading its node
count, node rank and rendezvous from the PET_* variables that the `torch-distributed` runtime sets in every pod),
in the same image, with the step's GPUs, CPU and memory (`placement.resources`), node selector, tolerations,
secrets, /dev/shm and cache volume; the KFP step's own pod only stages, creates and watches, so it asks for no GPU
and little CPU and memory (`secateurs.pipelines.recipe.place`). The job's pods cannot see the KFP step's artifact
paths, so the step stages its inputs on the shared cache volume
(`<cache>/trainjobs/<job>/`), the job writes its output there, and the step copies it to its own output path once
the job has completed (nothing is published from a failed job). The job is named after the run's identity (inputs'
content hashes and settings, as the checkpoints are), so a retried step finds its job: a running one is watched
again, a completed one is published, a failed one is replaced and resumes from the checkpoints on the volume.

The manifest is built with Kubeflow Trainer's own API models (`kubeflow-trainer-api`) and sent with the
`kubernetes` client.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
RUNTIME = "torch-distributed"
# Labels JobSet puts on a TrainJob's pods (the kubeflow SDK selects rank 0's pod by the same ones).
JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB = "jobset.sigs.k8s.io/replicatedjob-name"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# `placement.resources` fields as Kubernetes ResourceRequirements entries (the settings KFP's set_cpu_request,
# set_memory_limit, ... give a task): a multi-node step's pods get them instead of the pod that watches the job.
RESOURCE_FIELDS = {"cpu_request": ("requests", "cpu"), "cpu_limit": ("limits", "cpu"),
                   "memory_request": ("requests", "memory"), "memory_limit": ("limits", "memory")}  # fmt: skip


class TrainJobError(RuntimeError):
    """The job could not be created, did not start, or failed; the message says which and why."""


@dataclass
class JobPlacement:
    """What the job's pods need from the step's placement (the component receives it as JSON)."""

    image: str
    nodes: int
    gpus_per_node: int
    processes_per_node: int
    cache_pvc: str
    cache_mount: str
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict] = field(default_factory=list)
    secrets: list[dict] = field(default_factory=list)  # {"name": Secret, "env": {key: VARIABLE}}
    shm_size: str | None = None
    requests: dict[str, str] = field(default_factory=dict)  # per node, e.g. {"cpu": "32", "memory": "512G"}
    limits: dict[str, str] = field(default_factory=dict)  # per node, besides the GPUs
    pending_timeout: int = 1800
    poll_seconds: float = 10.0

    @classmethod
    def of(cls, placement, kind: str, image: str) -> JobPlacement:
        cache, resources = placement.cache_volume, {"requests": {}, "limits": {}}
        given = placement.resources.get(kind)
        for setting, value in (given.model_dump(exclude_none=True) if given else {}).items():
            where, name = RESOURCE_FIELDS[setting]
            resources[where][name] = value
        return cls(
            image=image, nodes=placement.nodes_of(kind), gpus_per_node=getattr(placement.gpus, kind),
            processes_per_node=placement.processes_of(kind), cache_pvc=cache.pvc, cache_mount=cache.mount_path,
            node_selector=dict(placement.node_selector),
            tolerations=[t.model_dump(exclude_none=True) for t in placement.tolerations],
            secrets=[s.model_dump() for s in placement.secrets], shm_size=placement.shm_size,
            requests=resources["requests"], limits=resources["limits"],
            pending_timeout=placement.trainjob_pending_timeout,
        )  # fmt: skip


def job_name(step: str, identity_digest: str) -> str:
    """A DNS-1123 name from the step and the run's identity (the same for a retry of the same run)."""
    return f"secateurs-{step}-{identity_digest[:12]}"


def train(step: str, inputs: dict[str, str], out: str, settings, job: JobPlacement, digest: str, api_client=None,
          namespace: str | None = None) -> dict:  # fmt: skip
    """Run training step `step` as a TrainJob and publish its output to `out`; returns the step's report.

    Args:
        inputs: command option -> input directory, as for `secateurs.training_launch.train`.
        digest: the run's identity digest (`secateurs.train.run_digest`), which names the job.
        api_client: a `kubernetes.client.ApiClient` (default: the pod's in-cluster configuration, else kubeconfig).
        namespace: default: the pod's own namespace.
    """
    from kubernetes import client

    from secateurs.files import atomic_output
    from secateurs.manifest import read_manifest

    api_client = api_client or _default_client()
    namespace = namespace or _own_namespace()
    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    name = job_name(step, digest)
    _check_trainer_installed(custom, namespace)
    work = Path(job.cache_mount) / "trainjobs" / name
    staged = {option: str(_stage(Path(path), work / "inputs" / option)) for option, path in inputs.items()}
    (work / "settings.json").write_text(settings.model_dump_json())
    existing = _get(custom, namespace, name)
    if existing is not None and _condition(existing, "Failed"):
        # A failed attempt: replace it; the new one resumes from the checkpoints on the cache volume.
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        _wait_gone(custom, namespace, name, job.poll_seconds)
        existing = None
    if existing is None:
        shutil.rmtree(work / "out", ignore_errors=True)
        manifest = trainjob_manifest(name, step, staged, str(work / "out"), str(work / "settings.json"), job)
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
        print(f"created TrainJob {namespace}/{name}: {job.nodes} nodes x {job.gpus_per_node} GPUs", flush=True)
    else:
        print(f"found TrainJob {namespace}/{name} of an earlier attempt; watching it", flush=True)
    _wait(custom, core, namespace, name, job)
    with atomic_output(out) as tmp:
        shutil.copytree(work / "out", tmp, dirs_exist_ok=True)
    return read_manifest(out)["report"]


def trainjob_manifest(name: str, step: str, inputs: dict[str, str], out: str, settings_file: str,
                      job: JobPlacement) -> dict:  # fmt: skip
    """The TrainJob (trainer.kubeflow.org/v1alpha1) as the Kubernetes API takes it."""
    from kubeflow_trainer_api import models as m

    command = ["python", "-m", "torch.distributed.run", "-m", "secateurs", step]
    command += [x for option, path in {**inputs, "out": out}.items() for x in (f"--{option}", path)]
    command += ["--settings", settings_file]
    env = [m.IoK8sApiCoreV1EnvVar(name=k, value=v) for k, v in {
        "SECATEURS_CACHE": f"{job.cache_mount}/secateurs", "HF_HOME": f"{job.cache_mount}/huggingface",
        "SECATEURS_CHECKPOINTS": f"{job.cache_mount}/checkpoints", "PYTHONUNBUFFERED": "1"}.items()]  # fmt: skip
    env += [
        m.IoK8sApiCoreV1EnvVar(name=variable, value_from=m.IoK8sApiCoreV1EnvVarSource(
            secret_key_ref=m.IoK8sApiCoreV1SecretKeySelector(name=secret["name"], key=key)))
        for secret in job.secrets for key, variable in secret["env"].items()
    ]  # fmt: skip
    volumes = [m.IoK8sApiCoreV1Volume(name="cache", persistent_volume_claim=m.IoK8sApiCoreV1PersistentVolumeClaimVolumeSource(claim_name=job.cache_pvc))]  # fmt: skip
    mounts = [m.IoK8sApiCoreV1VolumeMount(name="cache", mount_path=job.cache_mount)]
    if job.shm_size:
        volumes.append(m.IoK8sApiCoreV1Volume(name="shm", empty_dir=m.IoK8sApiCoreV1EmptyDirVolumeSource(
            medium="Memory", size_limit=m.IoK8sApimachineryPkgApiResourceQuantity(actual_instance=job.shm_size))))  # fmt: skip
        mounts.append(m.IoK8sApiCoreV1VolumeMount(name="shm", mount_path="/dev/shm"))
    pod = m.TrainerV1alpha1PodSpecPatch(
        node_selector=job.node_selector or None,
        tolerations=[m.IoK8sApiCoreV1Toleration(**t) for t in job.tolerations] or None,
        volumes=volumes,
        containers=[m.TrainerV1alpha1ContainerPatch(name="node", volume_mounts=mounts)],
    )
    # The patch reaches the runtime's "node" replicated job: JobSet -> ReplicatedJob -> Job -> Pod.
    pod_template = m.TrainerV1alpha1PodTemplatePatch(spec=pod)
    # Every rank loads the checkpoints on the host before they reach its GPU: the step's CPU and memory
    # (placement.resources) are each node's, beside the GPU limit (a GPU's request defaults to its limit).
    quantity = m.IoK8sApimachineryPkgApiResourceQuantity
    limits = {**job.limits, "nvidia.com/gpu": str(job.gpus_per_node)}
    resources = m.IoK8sApiCoreV1ResourceRequirements(
        requests={k: quantity(actual_instance=v) for k, v in job.requests.items()} or None,
        limits={k: quantity(actual_instance=v) for k, v in limits.items()},
    )
    node = m.TrainerV1alpha1ReplicatedJobPatch(
        name="node", template=m.TrainerV1alpha1JobTemplatePatch(spec=m.TrainerV1alpha1JobSpecPatch(template=pod_template))
    )
    jobset = m.TrainerV1alpha1JobSetTemplatePatch(spec=m.TrainerV1alpha1JobSetSpecPatch(replicated_jobs=[node]))
    patch = m.TrainerV1alpha1RuntimePatch(
        manager="secateurs", training_runtime_spec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(template=jobset)
    )
    trainjob = m.TrainerV1alpha1TrainJob(
        api_version=f"{GROUP}/{VERSION}",
        kind="TrainJob",
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(name=name, labels={"app.kubernetes.io/created-by": "secateurs"}),
        spec=m.TrainerV1alpha1TrainJobSpec(
            runtime_ref=m.TrainerV1alpha1RuntimeRef(name=RUNTIME, kind="ClusterTrainingRuntime", api_group=GROUP),
            trainer=m.TrainerV1alpha1Trainer(
                image=job.image, command=command, env=env, num_nodes=job.nodes,
                num_proc_per_node=job.processes_per_node, resources_per_node=resources,
            ),
            runtime_patches=[patch],
        ),
    )
    return trainjob.to_dict()


def _check_trainer_installed(custom, namespace: str) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, limit=1)
    except ApiException as e:
        if e.status == 404:
            raise TrainJobError(
                f"Kubeflow Trainer is not installed on this cluster (the API has no {PLURAL}.{GROUP}/{VERSION}): "
                "a step with placement.nodes > 1 runs as a TrainJob; install Kubeflow Trainer v2 or use one node"
            ) from None
        raise TrainJobError(f"listing TrainJobs in {namespace} failed: HTTP {e.status} {e.reason}") from None


def _get(custom, namespace: str, name: str) -> dict | None:
    from kubernetes.client.exceptions import ApiException

    try:
        return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def _condition(trainjob: dict, kind: str) -> dict | None:
    for c in (trainjob.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


def _wait_gone(custom, namespace: str, name: str, poll: float) -> None:
    while _get(custom, namespace, name) is not None:
        time.sleep(poll)


def _wait(custom, core, namespace: str, name: str, job: JobPlacement) -> None:
    """Until the job completes (return) or fails (raise), streaming rank 0's log once its pod runs."""
    # Polled rather than a `kubernetes.watch.Watch` with a field selector: each round reads two kinds of object
    # (the TrainJob's conditions, and its node pods for the pending timeout and for a restarted rank 0's log), so
    # it would take two watches, each ended by the server's timeout and resumed by resourceVersion (410 Gone
    # handled). A GET of each every `poll_seconds` (10 s) is a few requests a minute for a job of hours.
    started, streaming, streamed = time.monotonic(), None, 0
    while True:
        trainjob = _get(custom, namespace, name)
        if trainjob is None:
            raise TrainJobError(f"TrainJob {namespace}/{name} was deleted while the step waited for it")
        if _condition(trainjob, "Complete"):
            if streaming is not None:
                streaming.join(timeout=60)
            return
        failed = _condition(trainjob, "Failed")
        if failed:
            if streaming is not None:
                streaming.join(timeout=60)
            raise TrainJobError(
                f"TrainJob {namespace}/{name} failed: {failed.get('reason', '')}: {failed.get('message', '')}".strip()
            )
        pods = core.list_namespaced_pod(namespace, label_selector=f"{JOBSET_NAME}={name},{REPLICATED_JOB}=node").items
        running = [p for p in pods if p.status.phase in ("Running", "Succeeded", "Failed")]
        if not running and time.monotonic() - started > job.pending_timeout:
            custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            phases = ", ".join(sorted({p.status.phase for p in pods})) or "no pods"
            # Say why when the cluster said why (a missing Secret, a missing PVC, no node with free GPUs).
            why = "; ".join(sorted({r for p in pods if (r := _why_pending(p))})) or (
                f"Check that {job.nodes} nodes with {job.gpus_per_node} free GPUs match the node selector"
            )
            raise TrainJobError(
                f"TrainJob {namespace}/{name} did not start within {job.pending_timeout} s ({phases}); deleted it. {why}"
            )
        rank0 = [p for p in running if (p.metadata.labels or {}).get(COMPLETION_INDEX) == "0"]
        restarts = sum(c.restart_count or 0 for c in rank0[0].status.container_statuses or []) if rank0 else 0
        # The runtime restarts a failed node in place (JobSet's default restartPolicy OnFailure): a log stream
        # ends with its container, so follow the next container's once it has started.
        if rank0 and (streaming is None or (not streaming.is_alive() and restarts > streamed)):
            streamed = restarts
            streaming = threading.Thread(target=_stream_log, args=(core, namespace, rank0[0].metadata.name),
                                         daemon=True)  # fmt: skip
            streaming.start()
        time.sleep(job.poll_seconds)


def _why_pending(pod) -> str | None:
    """The reason a pending pod gives: its container's waiting reason (e.g. CreateContainerConfigError: secret
    "x" not found), else the scheduler's (PodScheduled False, e.g. persistentvolumeclaim "x" not found)."""
    for container in pod.status.container_statuses or []:
        waiting = container.state.waiting if container.state else None
        if waiting is not None and waiting.reason not in (None, "ContainerCreating", "PodInitializing"):
            return f"{waiting.reason}: {waiting.message}" if waiting.message else waiting.reason
    for condition in pod.status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False":
            return f"{condition.reason}: {condition.message}" if condition.message else condition.reason
    return None


def _stream_log(core, namespace: str, pod: str) -> None:
    try:
        response = core.read_namespaced_pod_log(pod, namespace, container="node", follow=True, _preload_content=False)
        for chunk in response.stream():
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
    except Exception as e:  # noqa: BLE001 -- the log is a convenience; the job's status decides the step
        print(f"(rank 0's log stopped: {type(e).__name__}: {e})", flush=True)


def _stage(source: Path, staged: Path) -> Path:
    """`source` on the shared volume: itself when it is there already, else a copy (made once per job)."""
    if staged.is_dir():
        return staged
    from secateurs.files import atomic_output

    with atomic_output(staged) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    return staged


def _default_client():
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def _own_namespace() -> str:
    path = Path(NAMESPACE_FILE)
    return path.read_text().strip() if path.is_file() else "default"


__all__ = ["JobPlacement", "TrainJobError", "job_name", "train", "trainjob_manifest"]
