"""The step registry: what each step of the recipe is, written once.

One `StepSpec` per step kind says how its tasks are keyed, what it reads and writes (with KFP artifact types),
which settings model holds its options, whether it wants a GPU, which image it runs in, and which MLflow model
it records. The pipeline graph (`secateurs.pipelines.recipe`), task placement (`place`), the components and their
shared prologue (`secateurs.components.prologue.step`), tracking (model names, registration) and `secateurs rerun`
all read this table; none of them restates it.

Pure Python, and the bottom floor: it imports no module of secateurs, so that the config (`secateurs.config`,
`secateurs.placement`) can be built from it; `secateurs.config.settings_model` resolves a step's settings name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# KFP artifact classes (`kfp.dsl.<name>`): the types of step inputs and outputs.
ArtifactType = Literal["Model", "Dataset", "Artifact", "Metrics"]
# The images a step can run in: the secateurs image, or the TensorRT-LLM one (docker/tensorrt-llm.Dockerfile).
Image = Literal["secateurs", "tensorrt-llm"]


@dataclass(frozen=True)
class StepSpec:
    """What one step kind is.

    Attributes:
        kind: component name and the key of `placement.gpus` / `placement.resources` ("correct_teacher").
        name: step name in task keys, MLflow step runs and failure injection ("correct-teacher").
        key: task key pattern: `{name}`, `{student}` (the student the task works for), `{model}` (the model it
            reads, e.g. `teacher`, `width-pruned`); `[:{student}]` is left out for the teacher.
        inputs: input name -> artifact type; `optional` ones may be absent.
        outputs: output name -> artifact type.
        settings: class name of its settings model in `secateurs.config` (None: the step has no options).
        params: plain parameters besides `settings`, `student` and the tracking ones.
        gpu: may ask for GPUs (`placement.gpus.<kind>`).
        tracked: records an MLflow step run (the rest are cheap bookkeeping, rerun rather than imported).
        per_student: works for one student (`student` parameter; empty for the teacher).
        model: name of the MLflow LoggedModel its model output becomes (None: its output is not a model).
        registered: that model is also registered as a new version in the model registry.
        scores_input: its report's numbers also go to the model it read (evaluation).
        engine_image: runs in the image of the engine backend it builds with rather than the secateurs one (the
            engine step: the pipeline's `engine.backend`; a search: its latency budget's `engine_backend`).
        distributed: a training step, run under torchrun with one process per GPU (`placement.processes`), or as
            a TrainJob over several nodes (`placement.nodes`): its `processes` and `trainjob` parameters.
        placed_as: the step kind whose placement (GPUs, node selection, resources, and for a distributed step its
            processes and nodes) its tasks take (a search's short distillations run as distillation runs); None:
            its own.
        fan_out: one task per item of a `dsl.ParallelFor` (a search's short distillations, one per candidate);
            its `item` parameter holds the item, and readers of its outputs get them `dsl.Collected`. Each item's
            task has a key of its own, the step's key and `/<item>` (`search-distill:auto/1`), so that it is
            recorded, and can be rerun, alone.
    """

    kind: str
    name: str
    key: str
    inputs: dict[str, ArtifactType]
    outputs: dict[str, ArtifactType]
    settings: str | None = None
    params: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    gpu: bool = False
    tracked: bool = True
    per_student: bool = False
    model: str | None = None
    registered: bool = False
    scores_input: bool = False
    engine_image: bool = False
    distributed: bool = False
    placed_as: str | None = None
    fan_out: bool = False

    def task_key(self, student: str = "", model: str = "", item: str = "") -> str:
        """The task key of this step for `student` (and the model it reads, and the fan-out item it does), e.g.
        `distill:width`, `search-distill:auto/1`."""
        key = self.key.replace("{name}", self.name)
        key = key.replace("[:{student}]", f":{student}" if student else "")
        key = key.format(student=student, model=model or student or "teacher")
        return item_key(key, item) if self.fan_out and item != "" else key

    def image(self, engine_backend: str) -> Image:
        """Which image the step runs in, given the engine backend it builds with ("" for none)."""
        return "tensorrt-llm" if self.engine_image and engine_backend == "tensorrt-llm" else "secateurs"


_MODEL, _DATA = {"model": "Model"}, {"model": "Model", "dataset": "Dataset"}

STEPS: dict[str, StepSpec] = {
    s.kind: s
    for s in (
        StepSpec("import_model", "import-model", "{name}", {}, {"model": "Model"}, "TeacherConfig", model="teacher"),
        StepSpec("prepare_data", "prepare-data", "{name}", _MODEL, {"dataset": "Dataset"}, "DataConfig"),
        StepSpec("correct_teacher", "correct-teacher", "{name}", _DATA, {"corrected": "Model"},
                 "TeacherCorrectionConfig", params=("processes", "trainjob"), gpu=True, model="teacher-corrected",
                 distributed=True),
        # Of the teacher, and of every distilled student that other students are pruned from.
        StepSpec("importance", "importance", "{name}[:{student}]", _DATA, {"scores": "Artifact"},
                 "ImportanceConfig", gpu=True, per_student=True),
        StepSpec("prune", "prune", "{name}:{student}", {"model": "Model", "scores": "Artifact"},
                 {"pruned": "Model"}, "PruneConfig", per_student=True, model="{student}-pruned"),
        # Architecture search (students with `search:`): score the candidates (forward passes, placed like
        # importance; a latency budget builds engines, in its backend's image), distil the top_k briefly, one task
        # each (placed like distill, and run as distill runs: its processes, torchrun or a TrainJob), pick the
        # winner, which the student's distill step then reads as its pruned model.
        StepSpec("search", "search", "{name}:{student}", {"model": "Model", "scores": "Artifact", "dataset": "Dataset"},
                 {"candidates": "Artifact"}, "SearchConfig", per_student=True, placed_as="importance",
                 engine_image=True),
        StepSpec("search_distill", "search-distill", "{name}:{student}",
                 {"teacher": "Model", "candidates": "Artifact", "dataset": "Dataset"}, {"scored": "Artifact"},
                 "DistillConfig", params=("processes", "trainjob", "item"), per_student=True, placed_as="distill",
                 distributed=True, fan_out=True),
        StepSpec("search_pick", "search-pick", "{name}:{student}", {"candidates": "Artifact", "scored": "Artifact"},
                 {"winner": "Model"}, per_student=True, model="{student}-pruned"),
        StepSpec("distill", "distill", "{name}:{student}", {"teacher": "Model", **_DATA}, {"distilled": "Model"},
                 "DistillConfig", params=("processes", "trainjob"), gpu=True, per_student=True, model="{student}",
                 registered=True, distributed=True),
        StepSpec("evaluate", "evaluate", "{name}:{model}", _DATA, {"evaluation": "Artifact", "metrics": "Metrics"},
                 "EvaluateConfig", params=("name", "role", "parent"), gpu=True, per_student=True,
                 scores_input=True),
        StepSpec("engine", "engine", "{name}:{model}", _DATA, {"built": "Artifact", "bench": "Metrics"},
                 "EngineConfig", gpu=True, per_student=True, engine_image=True),
        # The report's rows are gathered by a chain of these (a KFP component has a fixed set of inputs).
        StepSpec("collect", "collect", "{name}:{model}",
                 {"metrics": "Metrics", "previous": "Artifact", "bench": "Metrics", "search": "Model"},
                 {"table": "Artifact"}, optional=("previous", "bench", "search"), tracked=False),
        StepSpec("report", "report", "{name}", {"table": "Artifact"}, {"comparison": "Artifact"}),
    )
}  # fmt: skip

BY_NAME: dict[str, StepSpec] = {s.name: s for s in STEPS.values()}
GPU_STEPS: tuple[str, ...] = tuple(k for k, s in STEPS.items() if s.gpu)
# The kinds `placement.processes` and `placement.nodes` name: the distributed steps placed as themselves.
TRAINING_STEPS: tuple[str, ...] = tuple(k for k, s in STEPS.items() if s.distributed and s.placed_as is None)


def item_key(key: str, item: str) -> str:
    """The task key of one item of a fan-out step's task: (`search-distill:auto`, `1`) -> `search-distill:auto/1`."""
    return f"{key}/{item}"


def split_item(key: str) -> tuple[str, str]:
    """A task key split into the step's key and its fan-out item: `search-distill:auto/1` -> (`search-distill:auto`,
    `1`); ("distill:a", "") for a key without one."""
    group, _, item = key.partition("/")
    return group, item


def output_type(kind: str, output: str) -> ArtifactType:
    """The artifact type of output `output` of step kind `kind`."""
    return STEPS[kind].outputs[output]


__all__ = ["BY_NAME", "GPU_STEPS", "STEPS", "TRAINING_STEPS", "StepSpec", "item_key", "output_type", "split_item"]
