"""Where the pipeline's steps run: the `placement` config section.

Consumed by `secateurs.pipelines` (which turns `PlacementConfig` into KFP task settings in one helper) and by
`secateurs.local_run` (which checks, before any compute, that a local run asks for no GPU it does not have
and that the storage endpoints answer). Pure pydantic: importing it needs no kfp.

Secrets are named, never given: `secrets` maps a Kubernetes Secret to the environment variables it fills, so a
compiled pipeline holds Secret names and keys only, never credential values.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from secateurs.registry import GPU_STEPS, STEPS, TRAINING_STEPS

# Every step kind of the pipeline, as named in `resources`.
STEP_KINDS = tuple(STEPS)
# The release images (`make images` pushes both; the chart's defaults ConfigMap names the ones installed).
DEFAULT_IMAGES = {
    "secateurs": "ghcr.io/secateurs/secateurs:0.1.0",
    "tensorrt-llm": "ghcr.io/secateurs/secateurs-tensorrt-llm:0.1.0",
}
DEFAULT_IMAGE = DEFAULT_IMAGES["secateurs"]
# Environment variables that name each image when the config does not (the chart's ConfigMap sets both).
IMAGE_ENV = {"secateurs": "SECATEURS_IMAGE", "tensorrt-llm": "SECATEURS_TENSORRT_LLM_IMAGE"}
# The keys of the chart's defaults ConfigMap (charts/secateurs/templates/configmap-defaults.yaml) that every
# task loads as environment variables; the chart sets some only when their value is given, so each is optional.
DEFAULTS_KEYS = (
    "MLFLOW_TRACKING_URI",
    "SECATEURS_IMAGE",
    "SECATEURS_TENSORRT_LLM_IMAGE",
    "SECATEURS_SERVICE_ACCOUNT",
    "SECATEURS_PIPELINE_ROOT",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _GpuCounts(_Section):
    def requested(self) -> dict[str, int]:
        """Step kind -> GPUs, for the kinds that ask for at least one."""
        return {k: n for k, n in self.model_dump().items() if n}


# One field per GPU step of the registry. One GPU per step fits the 8B recipe's importance and evaluation;
# distillation of an 8B teacher wants a whole node (the published run used 8 x H100 per job).
GpuConfig = create_model(
    "GpuConfig",
    __base__=_GpuCounts,
    __doc__="GPUs per task (`nvidia.com/gpu`); 0 runs the step on CPU. CPU-only steps take none.",
    **{kind: (int, Field(0, ge=0, description=f"GPUs for each {STEPS[kind].name} task.")) for kind in GPU_STEPS},
)


class ResourceConfig(_Section):
    """Kubernetes requests/limits of one step kind (KFP: set_cpu_request, set_memory_limit, ...)."""

    cpu_request: str | None = Field(None, description="e.g. '4' or '500m'.")
    cpu_limit: str | None = Field(None, description="e.g. '8'.")
    memory_request: str | None = Field(None, description="e.g. '32G'.")
    memory_limit: str | None = Field(None, description="e.g. '64G'.")


class Toleration(_Section):
    key: str = Field(description="Taint key, e.g. nvidia.com/gpu.")
    operator: Literal["Equal", "Exists"] = Field("Exists", description="Taint match operator.")
    value: str | None = Field(None, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect."
    )


class SecretEnv(_Section):
    """A Kubernetes Secret whose keys become environment variables of every step."""

    name: str = Field(description="Secret name in the pipeline's namespace.")
    env: dict[str, str] = Field(
        description="Secret key -> environment variable, e.g. {access-key: AWS_ACCESS_KEY_ID}."
    )


class CacheVolume(_Section):
    """An existing PersistentVolumeClaim mounted into every step (hub, dataset and S3 download caches, and the
    training checkpoints a retried step resumes from)."""

    pvc: str = Field(description="Name of an existing ReadWriteMany PVC in the pipeline's namespace (the chart does not create it).")
    mount_path: str = Field(
        "/cache", description="Where it is mounted; SECATEURS_CACHE, HF_HOME and SECATEURS_CHECKPOINTS point into it."
    )


class PlacementConfig(_Section):
    image: str | None = Field(
        None, description=f"Image of the steps (default: $SECATEURS_IMAGE, else {DEFAULT_IMAGE})."
    )
    tensorrt_llm_image: str | None = Field(
        None,
        description="Image of the steps that build TensorRT-LLM engines: the engine steps when engine.backend is "
        "tensorrt-llm, a search whose latency budget uses it (default: "
        f"$SECATEURS_TENSORRT_LLM_IMAGE, else {DEFAULT_IMAGES['tensorrt-llm']}).",
    )
    defaults_config_map: str | None = Field(
        "secateurs-defaults",
        description="ConfigMap (the chart's `pipeline.defaultsConfigMap`) every task loads as environment "
        "variables (MLflow URI, images, S3 endpoint); None loads none.",
    )
    service_account: str | None = Field(
        None,
        description="Kubernetes ServiceAccount the submitted run's pods use (the chart creates "
        "`<release>-pipeline`); None leaves KFP's default.",
    )
    gpus: GpuConfig = GpuConfig()
    resources: dict[str, ResourceConfig] = Field(
        default_factory=dict, description="Step kind -> requests/limits."
    )
    processes: dict[str, int] = Field(
        default_factory=dict,
        description="Training step kind -> torchrun processes per node (default: one per GPU of the step, 1 without "
        "GPUs). On a machine without GPUs, more than 1 runs that many CPU processes (gloo).",
    )
    nodes: dict[str, int] = Field(
        default_factory=dict,
        description="Training step kind -> nodes (default 1). More than 1 runs the step as a Kubeflow Trainer v2 "
        "TrainJob (torch-distributed runtime) with `gpus` per node; its pods share the step's inputs and output "
        "through cache_volume.",
    )
    trainjob_pending_timeout: int = Field(
        1800, ge=1, description="Seconds a TrainJob may wait for its pods to start before the step fails."
    )
    gpu_memory: str | None = Field(
        None,
        description="Memory of one GPU, e.g. 80GiB, for the memory plan (default: read from the node selector's "
        "nvidia.com/gpu.product label, e.g. NVIDIA-H100-80GB-HBM3).",
    )
    # Default: NVIDIA's DGX H100 datasheet, eight 400 Gb/s ConnectX-7 adapters for the compute fabric, one per GPU:
    # 50 GB/s a GPU each way. Clusters without RDMA (NCCL over TCP) get less: set yours.
    network_bandwidth: str = Field(
        "50GB",
        description="Bytes per second one GPU sends to other nodes, e.g. 50GB (400 Gb/s), for the plan's FSDP "
        "communication time across nodes (`secateurs plan`: all-gather and reduce-scatter bytes per step).",
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels for GPU steps.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations for GPU steps.")
    secrets: list[SecretEnv] = Field(default_factory=list, description="Secrets exposed as env (S3, MLflow).")
    cache_volume: CacheVolume | None = Field(None, description="PVC for download caches and training checkpoints.")
    data_store: str | None = Field(
        None,
        description="Where prepare-data publishes the token shards, so that its dataset artifact holds only their "
        "index and every step reads them without a KFP download: an absolute path every step mounts, or an "
        "s3://bucket/prefix (default: <cache_volume.mount_path>/datasets, else <pipeline root>/datasets when the "
        "run's pipeline root is on S3, else none: the shards stay in the artifact).",
    )
    # PyTorch data loaders and NCCL use /dev/shm; a container's default is 64 MiB.
    shm_size: str | None = Field(
        "16Gi", description="Memory-backed /dev/shm size for GPU steps (None: leave it)."
    )
    retries: int = Field(
        2, ge=0, description="Retries of a step after a transient failure (node loss, OOM kill)."
    )
    retry_backoff: str = Field("60s", description="First retry delay; doubles each retry.")
    caching: bool = Field(True, description="Reuse the outputs of a step already run with the same inputs.")

    @field_validator("resources", "processes", "nodes")
    @classmethod
    def _kinds(cls, v, info):
        name = info.field_name
        allowed, what = (STEP_KINDS, "unknown step kind(s)") if name == "resources" else (
            TRAINING_STEPS, f"{name}: not training step(s):")  # fmt: skip
        unknown = sorted(set(v) - set(allowed))
        if unknown:
            raise ValueError(f"{what} {unknown}; expected some of {list(allowed)}")
        if name != "resources" and any(n < 1 for n in v.values()):
            raise ValueError(f"{name}: every count must be at least 1, got {v}")
        return v

    @field_validator("data_store")
    @classmethod
    def _store(cls, v):
        if v is not None and not (v.startswith("s3://") or v.startswith("/")):
            raise ValueError(f"data_store={v!r}: expected an absolute path (on a volume every step mounts) or an "
                             "s3://bucket/prefix")  # fmt: skip
        return v

    @model_validator(mode="after")
    def _multi_node(self):
        for kind, n in self.nodes.items():
            if n > 1 and self.cache_volume is None:
                raise ValueError(
                    f"nodes.{kind}={n} needs cache_volume: the TrainJob's pods read the step's inputs and write its "
                    "output on that shared ReadWriteMany volume"
                )
            if n > 1 and not getattr(self.gpus, kind):
                raise ValueError(f"nodes.{kind}={n} needs GPUs per node (gpus.{kind})")
        return self

    def nodes_of(self, kind: str) -> int:
        return self.nodes.get(kind, 1)

    def processes_of(self, kind: str) -> int:
        """torchrun processes per node of training step `kind`: as set, else one per GPU, else 1."""
        return self.processes.get(kind) or getattr(self.gpus, kind, 0) or 1

    def resolved_images(self, environ: dict[str, str] | None = None) -> dict[str, str]:
        """Image role ("secateurs", "tensorrt-llm") -> reference: the config's, else its environment variable
        (the chart's ConfigMap names them), else the release image."""
        import os

        env = os.environ if environ is None else environ
        given = {"secateurs": self.image, "tensorrt-llm": self.tensorrt_llm_image}
        return {role: given[role] or env.get(IMAGE_ENV[role]) or DEFAULT_IMAGES[role] for role in DEFAULT_IMAGES}
