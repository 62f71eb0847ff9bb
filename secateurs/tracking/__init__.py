"""MLflow tracking and lineage for secateurs runs, one module per job.

Consumes: artifact directories with their `secateurs.json` manifests (see `secateurs.manifest`), and metrics
that steps report while they run (training curves).

Produces, in MLflow:
- one parent run per pipeline run and one nested run per step, tagged `secateurs.step` / `secateurs.student`;
  each step run holds the step's resolved config as params, its report numbers as metrics, its input datasets
  (`log_input`, digest = the artifact's content hash) and input models (`LoggedModelInput` edges), and its
  manifest as an artifact;
- one LoggedModel per model artifact (teacher, corrected teacher, pruned student, distilled student). The
  weights stay where the step wrote them (local disk or S3): the model is an *external* LoggedModel that
  records the URI, the content hash, the shape and the parameter count, and names the model it came from in
  the tags `secateurs.parent_model_id` / `secateurs.parent_uri`;
- one registered model version per distilled student, tagged with its teacher, shape, parameter count, tokens
  seen and, once evaluated, its scores.

Modules:
- `backend`: the tracking URI, its health, the errors that mean "tracking failed" and MLflow's limits;
- `runs`: `Tracker` (the pipeline run, and the guard that keeps a step going when MLflow is down) and `StepRun`;
- `recording`: a step's manifest as params, metrics, input models and datasets, and its output LoggedModel;
- `lineage`: the chain of recorded models back to the teacher.

mlflow is imported inside the functions that use it, so `secateurs` imports without it.
"""

from secateurs.tracking.backend import (
    HTTP_DEFAULTS,
    MAX_DATASET_DIGEST_LENGTH,
    MAX_KEY_LENGTH,
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    TrackingUnreachable,
    check_reachable,
    is_rank_zero,
    mlflow_key,
    resolve_tracking_uri,
)
from secateurs.tracking.lineage import format_lineage, lineage, lineage_table
from secateurs.tracking.recording import (
    PARENT_INPUTS,
    SHAPE_KEYS,
    TAG_PARENT_MODEL_ID,
    TAG_PARENT_URI,
    TAG_REGISTERED,
    TAG_SHA256,
    TAG_STEP,
    TAG_STUDENT,
    TAG_TEACHER_MODEL_ID,
    TAG_URI,
    ModelRecorder,
    StepRecord,
    checkpoint_params,
    flatten,
    split_report,
)
from secateurs.tracking.runs import (
    EXPERIMENT,
    MLFLOW_PARENT_RUN_ID,
    TAG_CREATED_BY,
    TAG_PIPELINE_RUN,
    TAG_ROLE,
    StepRun,
    Tracker,
)

__all__ = [
    "EXPERIMENT",
    "HTTP_DEFAULTS",
    "MAX_DATASET_DIGEST_LENGTH",
    "MAX_KEY_LENGTH",
    "MAX_PARAM_VALUE_LENGTH",
    "MAX_TAG_VALUE_LENGTH",
    "MLFLOW_PARENT_RUN_ID",
    "PARENT_INPUTS",
    "SHAPE_KEYS",
    "TAG_CREATED_BY",
    "TAG_PARENT_MODEL_ID",
    "TAG_PARENT_URI",
    "TAG_PIPELINE_RUN",
    "TAG_REGISTERED",
    "TAG_ROLE",
    "TAG_SHA256",
    "TAG_STEP",
    "TAG_STUDENT",
    "TAG_TEACHER_MODEL_ID",
    "TAG_URI",
    "ModelRecorder",
    "StepRecord",
    "StepRun",
    "Tracker",
    "TrackingUnreachable",
    "check_reachable",
    "checkpoint_params",
    "flatten",
    "format_lineage",
    "is_rank_zero",
    "lineage",
    "lineage_table",
    "mlflow_key",
    "resolve_tracking_uri",
    "split_report",
]
