"""MLflow tracking and lineage for secateurs runs, one module per job:

- `backend`: the tracking URI, its health, and the guard that keeps a step going when MLflow is down;
- `runs`: `Tracker`, one parent run per pipeline run, and `StepRun`, one nested run per step;
- `recording`: a step's manifest as params, metrics, input models and datasets, and its output as an external
  LoggedModel (the weights stay where the step wrote them), registered for distilled students;
- `lineage`: the chain of recorded models back to the teacher.

mlflow is imported inside the functions that use it, so `secateurs` imports without it.
"""
# ruff: noqa: F401 (the package's names, re-exported)

from secateurs.tracking.backend import TrackingUnreachable, check_reachable, mlflow_key, resolve_tracking_uri
from secateurs.tracking.lineage import format_lineage, lineage, lineage_table
from secateurs.tracking.recording import (
    TAG_PARENT_MODEL_ID,
    TAG_PARENT_URI,
    TAG_SHA256,
    TAG_STEP,
    TAG_STUDENT,
    TAG_TEACHER_MODEL_ID,
    TAG_URI,
    StepRecord,
)
from secateurs.tracking.runs import EXPERIMENT, TAG_PIPELINE_RUN, TAG_ROLE, StepRun, Tracker
