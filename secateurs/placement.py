"""Where the pipeline's steps run and where their records go: the `placement` and `tracking` config sections.

Consumed by `secateurs.pipelines` (which turns `PlacementConfig` into KFP task settings in one helper) and by
`secateurs.pipeline_cli` (which checks, before any compute, that a local run asks for no GPU it does not have
and that the tracking and storage endpoints answer). Pure pydantic: importing it needs no kfp.

Secrets are named, never given: `secrets` maps a Kubernetes Secret to the environment variables it fills, so a
compiled pipeline holds Secret names and keys only, never credential values.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The step kinds that may ask for GPUs (all others are CPU-only bookkeeping or data work).
GPU_STEPS = ("correct_teacher", "importance", "distill", "evaluate", "engine")
# Every step kind of the pipeline, as named in `resources` and `retries`.
STEP_KINDS = ("import_model", "prepare_data", *GPU_STEPS, "prune", "report")
DEFAULT_IMAGE = "ghcr.io/secateurs/secateurs:0.1.0"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GpuConfig(_Section):
    """GPUs per task (`nvidia.com/gpu`); 0 runs the step on CPU. CPU-only steps take none."""

    # One GPU per step fits the 8B recipe's importance and evaluation; distillation of an 8B teacher wants a
    # whole node (the published run used 8 x H100 per job), set here or through a TrainJob step.
    correct_teacher: int = Field(0, ge=0, description="GPUs for teacher correction.")
    importance: int = Field(0, ge=0, description="GPUs for importance estimation.")
    distill: int = Field(0, ge=0, description="GPUs for distillation.")
    evaluate: int = Field(0, ge=0, description="GPUs for evaluation.")
    engine: int = Field(0, ge=0, description="GPUs for the engine build and benchmark.")

    def requested(self) -> dict[str, int]:
        """Step kind -> GPUs, for the kinds that ask for at least one."""
        return {k: n for k, n in self.model_dump().items() if n}


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
        None, description=f"Image of every step (default: $SECATEURS_IMAGE, else {DEFAULT_IMAGE})."
    )
    gpus: GpuConfig = GpuConfig()
    resources: dict[str, ResourceConfig] = Field(
        default_factory=dict, description="Step kind -> requests/limits."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels for GPU steps.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations for GPU steps.")
    secrets: list[SecretEnv] = Field(default_factory=list, description="Secrets exposed as env (S3, MLflow).")
    cache_volume: CacheVolume | None = Field(None, description="PVC for download caches and training checkpoints.")
    # PyTorch data loaders and NCCL use /dev/shm; a container's default is 64 MiB.
    shm_size: str | None = Field(
        "16Gi", description="Memory-backed /dev/shm size for GPU steps (None: leave it)."
    )
    retries: int = Field(
        2, ge=0, description="Retries of a step after a transient failure (node loss, OOM kill)."
    )
    retry_backoff: str = Field("60s", description="First retry delay; doubles each retry.")
    caching: bool = Field(True, description="Reuse the outputs of a step already run with the same inputs.")

    @field_validator("resources")
    @classmethod
    def _kinds(cls, v):
        unknown = sorted(set(v) - set(STEP_KINDS))
        if unknown:
            raise ValueError(f"unknown step kind(s) {unknown}; expected some of {list(STEP_KINDS)}")
        return v

    def resolved_image(self, environ: dict[str, str] | None = None) -> str:
        """The image every step runs in: `image`, else SECATEURS_IMAGE, else the release image."""
        import os

        env = os.environ if environ is None else environ
        return self.image or env.get("SECATEURS_IMAGE") or DEFAULT_IMAGE


class TrackingConfig(_Section):
    uri: str | None = Field(
        None,
        description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<run dir>/mlflow.db).",
    )
    pipeline_root: str | None = Field(
        None,
        description="Where KFP keeps artifacts: a local dir or s3://bucket/prefix (default: <run dir>/artifacts).",
    )
