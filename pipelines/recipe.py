"""The Minitron recipe as a KFP pipeline, built from a config (the students are known when it is compiled).

`recipe(config)` lists the steps in order, each with the outputs of earlier steps it reads; `build_pipeline`
turns that list (or the part of it a rerun needs, with the rest brought in by `dsl.importer`) into a pipeline
function; `place` is the one place where a task gets its cluster settings. What each step kind is (its task key,
inputs and outputs, GPU or not, image) comes from the step registry, `secateurs.registry`.

Task keys name the steps for people and for `secateurs rerun`: `import-model`, `prepare-data`,
`correct-teacher`, `importance` (of the teacher) and `importance:<student>` (of a distilled student that other
students are pruned from), `prune:<student>`, `search:<student>`, `search-distill:<student>/<i>` (the i-th
candidate's short distillation: one task of a ParallelFor), `search-pick:<student>`, `distill:<student>`,
`evaluate:teacher`, `evaluate:<student>-pruned`, `evaluate:<student>`, `engine:teacher`, `engine:<student>`,
`collect:<model>`, `report`.
"""

# No `from __future__ import annotations`: KFP reads the pipeline function's parameter types at run time.
from dataclasses import dataclass, field

from secateurs.config import PipelineConfig
from secateurs.placement import DEFAULTS_KEYS, PlacementConfig
from secateurs.registry import STEPS


@dataclass
class Step:
    """One task of the pipeline: the component `kind`, its artifact inputs and its plain parameters.

    `inputs` maps the component's input name to (task key, output name) of the step that produces it.
    """

    key: str
    kind: str
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    student: str = ""
    items: list[str] = field(default_factory=list)  # a fan-out step's ParallelFor items
    engine_backend: str = ""  # the engine backend it builds with, whose image it runs in (registry `engine_image`)

    @property
    def task_keys(self) -> list[str]:
        """The keys its tasks are recorded under: one per item for a fan-out step, else its own key."""
        from secateurs.registry import item_key

        return [item_key(self.key, i) for i in self.items] or [self.key]


def _step(kind: str, inputs=None, params=None, student: str = "", model: str = "",
          engine_backend: str = "") -> Step:  # fmt: skip
    """A task of step `kind`, keyed by the registry's pattern (`model`: the model it reads, for evaluation)."""
    key = STEPS[kind].task_key(student=student, model=model)
    return Step(key, kind, inputs or {}, params or {}, student, engine_backend=engine_backend)


def recipe(config: PipelineConfig) -> list[Step]:
    """The steps of the recipe in the order they run.

    1. import the teacher;
    2. prepare the data with its tokenizer;
    3. correct the teacher on that data (if `teacher_correction.enabled`);
    4. score the teacher's units (importance);
    5. for each student, parents before children: prune it from the teacher, or from its parent student's
       distilled model (scored by its own importance step), and evaluate the pruned model; a student with
       `search:` instead has its candidates scored (`search`), the top_k distilled briefly, one task each
       (`search-distill`, a ParallelFor, each run as distill runs: its GPUs, processes and nodes), and the winner
       picked (`search-pick`) as its pruned model;
    6. distill it from the (corrected) teacher and evaluate it; evaluate the teacher too;
    7. build and benchmark an engine of the teacher and of each distilled student (if `engine.enabled`);
    8. gather one report row per model and write the report.
    """
    steps = [_step("import_model", params={"settings": config.teacher.model_dump_json()})]
    teacher = (steps[-1].key, "model")
    steps.append(_step("prepare_data", {"model": teacher}, {"settings": config.data.model_dump_json()}))
    data = (steps[-1].key, "dataset")
    if config.teacher_correction.enabled:
        steps.append(_step("correct_teacher", {"model": teacher, "dataset": data},
                           {"settings": config.teacher_correction.model_dump_json()}))  # fmt: skip
        teacher = (steps[-1].key, "corrected")
    importance_settings = {"settings": config.importance.model_dump_json()}
    steps.append(_step("importance", {"model": teacher, "dataset": data}, importance_settings))
    evaluated = [_evaluate(config, "teacher", "teacher", "", "", teacher, data)]
    distilled = {"teacher": (teacher, steps[-1].key)}  # model name -> (its model output, its importance task)
    parents_of_others = {s.parent for s in config.students}
    searched = {}  # pruned model name -> the search-pick output that chose it
    for s in config.lineage_order():
        parent_model, parent_scores = distilled[s.parent]
        settings = s.distill or config.distill
        if s.search is not None:
            pruned = _search(steps, config, s, settings, (parent_model, parent_scores), teacher, data)
            searched[f"{s.name}-pruned"] = pruned
        else:
            steps.append(_step("prune", {"model": parent_model, "scores": (parent_scores, "scores")},
                               {"settings": s.prune.model_dump_json()}, s.name))  # fmt: skip
            pruned = (steps[-1].key, "pruned")
        evaluated.append(_evaluate(config, f"{s.name}-pruned", "pruned", s.parent, s.name, pruned, data))
        steps.append(_step("distill", {"teacher": teacher, "model": pruned, "dataset": data},
                           {"settings": settings.model_dump_json()}, s.name))  # fmt: skip
        model = (steps[-1].key, "distilled")
        evaluated.append(_evaluate(config, s.name, "distilled", f"{s.name}-pruned", s.name, model, data))
        scores = ""
        if s.name in parents_of_others:  # its children are pruned by importance measured on it
            steps.append(_step("importance", {"model": model, "dataset": data}, importance_settings, s.name))
            scores = steps[-1].key
        distilled[s.name] = (model, scores)
    steps += [step for _, step in evaluated]
    engines = {}
    if config.engine.enabled:
        for name, (model, _) in distilled.items():
            student = "" if name == "teacher" else name
            steps.append(_step("engine", {"model": model, "dataset": data}, {"settings": config.engine.model_dump_json()},
                               student, engine_backend=config.engine.backend))  # fmt: skip
            engines[name] = steps[-1].key
    previous = None
    for name, step in evaluated:
        inputs = {"metrics": (step.key, "metrics")}
        if previous:
            inputs["previous"] = (previous, "table")
        if name in engines:
            inputs["bench"] = (engines[name], "bench")
        if name in searched:
            inputs["search"] = searched[name]
        steps.append(_step("collect", inputs, model=name))
        previous = steps[-1].key
    steps.append(_step("report", {"table": (previous, "table")}))
    return steps


def _search(steps: list[Step], config, s, settings, parent: tuple, teacher, data) -> tuple[str, str]:
    """Append the search steps of student `s`; returns the winner's output (its pruned checkpoint)."""
    from secateurs.search import short_distill_settings

    (model, scores), short = parent, short_distill_settings(settings, s.search.tokens, config.data.seq_len)
    # A latency budget's candidates are built and measured as engines, in that backend's image.
    backend = s.search.engine_backend if s.search.latency is not None else ""
    steps.append(_step("search", {"model": model, "scores": (scores, "scores"), "dataset": data},
                       {"settings": s.search.model_dump_json()}, s.name, engine_backend=backend))  # fmt: skip
    candidates = (steps[-1].key, "candidates")
    steps.append(_step("search_distill", {"teacher": teacher, "candidates": candidates, "dataset": data},
                       {"settings": short.model_dump_json()}, s.name))  # fmt: skip
    steps[-1].items = [str(i) for i in range(s.search.top_k)]
    steps.append(_step("search_pick", {"candidates": candidates, "scored": (steps[-1].key, "scored")}, {}, s.name))
    return steps[-1].key, "winner"


def _evaluate(config, name, role, parent, student, model, data) -> tuple[str, Step]:
    params = {"settings": config.evaluate.model_dump_json(), "name": name, "role": role, "parent": parent}
    return name, _step("evaluate", {"model": model, "dataset": data}, params, student, model=name)


def build_pipeline(
    config: PipelineConfig,
    steps: list[Step] | None = None,
    imports: dict[tuple[str, str], str] | None = None,
    fresh: set[str] = frozenset(),
    tracking_uri: str = "",
    pipeline_root: str | None = None,
):
    """The pipeline function for `config`.

    Args:
        config: the validated pipeline config.
        steps: the steps to run (default: the whole `recipe(config)`); inputs from steps not listed must be in
            `imports`.
        imports: (task key, output name) -> URI of an artifact an earlier run produced, brought in with
            `dsl.importer`; for a fan-out step's output, the list of its items' URIs, each copied by a `recorded`
            task of a ParallelFor and read `dsl.Collected`, as the fan-out's own outputs are.
        fresh: task keys that must run even if the cache holds their outputs (a rerun's target).
        tracking_uri: the default of the pipeline's `tracking_uri` parameter ("" leaves it to the step's
            MLFLOW_TRACKING_URI, which the chart's defaults ConfigMap sets on a cluster).
        pipeline_root: the spec's default pipeline root (where KFP keeps artifacts); None leaves KFP's.

    Returns:
        A `@dsl.pipeline` function with parameters `tracking_uri` and `pipeline_run`.
    """
    from kfp import dsl

    from secateurs.components.steps import component, recorded_component
    from secateurs.files import DATA_STORE_ENV

    every = recipe(config)
    steps = every if steps is None else steps
    imports = imports or {}
    kinds = {s.key: s.kind for s in every}  # the producers of imported inputs too
    images = config.placement.resolved_images()
    placement = config.placement
    store = data_store(config, pipeline_root)

    @dsl.pipeline(name=config.name, description=f"secateurs: {config.teacher.source} -> "
                  f"{', '.join(s.name for s in config.students)}", pipeline_root=pipeline_root)  # fmt: skip
    def pipeline(tracking_uri: str = tracking_uri, pipeline_run: str = ""):
        tasks, imported = {}, {}  # task key -> its task; (task key, output) -> an imported artifact

        def artifact(ref):
            if ref[0] in tasks:
                output = tasks[ref[0]].outputs[ref[1]]
                # A fan-out step's outputs reach their reader as one list, gathered over its ParallelFor.
                return dsl.Collected(output) if STEPS[kinds[ref[0]]].fan_out else output
            if ref in imported:
                return imported[ref]
            if ref not in imports:
                raise ValueError(f"step input {ref[0]}.{ref[1]} is neither run nor imported")
            if isinstance(imports[ref], list):
                # A fan-out step's items, gathered as its own outputs are: a ParallelFor of container tasks that
                # republish one recorded item each. Not of importers: the KFP backend's driver gathers a loop's
                # outputs from container executions only (backend/src/v2/driver/resolve.go, CollectInputs, 2.17.0
                # line 940); an importer's (system.ImporterExecution) sends it to a task that does not exist.
                with dsl.ParallelFor(imports[ref]) as uri:
                    task = recorded_component(images["secateurs"])(uri=uri)
                    task.set_display_name(f"import {ref[0]}.{ref[1]}")
                    place(task, "", placement)
                imported[ref] = dsl.Collected(task.outputs["artifact"])
            else:
                kind = getattr(dsl, STEPS[kinds[ref[0]]].outputs[ref[1]])
                task = dsl.importer(artifact_uri=imports[ref], artifact_class=kind, reimport=False)
                task.set_display_name(f"import {ref[0]}.{ref[1]}")
                imported[ref] = task.output
            return imported[ref]

        for step in steps:
            spec = STEPS[step.kind]
            kwargs = {name: artifact(ref) for name, ref in step.inputs.items()} | step.params
            if spec.tracked:
                kwargs |= {"tracking_uri": tracking_uri, "pipeline_run": pipeline_run}
            if spec.per_student:
                kwargs.setdefault("student", step.student)
            image = images[spec.image(step.engine_backend)]
            placed = spec.placed_as or step.kind  # a search's short distillations: placed and run as distill
            if spec.distributed:
                kwargs["processes"] = placement.processes_of(placed)
                kwargs["trainjob"] = _trainjob(placement, placed, image)
            if spec.fan_out:
                with dsl.ParallelFor(step.items) as item:
                    task = component(step.kind, image)(**kwargs, item=item)
            else:
                task = component(step.kind, image)(**kwargs)
            task.set_display_name(step.key)
            place(task, placed, placement, watcher=spec.distributed and placement.nodes_of(placed) > 1)
            if step.kind == "prepare_data" and store:
                task.set_env_variable(DATA_STORE_ENV, store)
            if step.key in fresh:
                task.set_caching_options(False)
            tasks[step.key] = task

    return pipeline


def data_store(config: PipelineConfig, pipeline_root: str | None = None) -> str | None:
    """Where prepare-data publishes the token shards (its artifact then carries their index only, and no step
    downloads them as a KFP input, which the launcher does in full, into the pod's disk, before the step starts):
    `placement.data_store`, else `datasets` on the cache volume (read in place by every step), else `datasets`
    under an `s3://` pipeline root (fetched into each node's cache once); None for neither (a local run: the
    shards stay in the artifact)."""
    placement = config.placement
    if placement.data_store:
        return placement.data_store
    if placement.cache_volume is not None:
        return f"{placement.cache_volume.mount_path.rstrip('/')}/datasets"
    root = pipeline_root or config.tracking.pipeline_root
    if root and root.startswith("s3://"):
        return f"{root.rstrip('/')}/datasets"
    return None


def _trainjob(placement: PlacementConfig, kind: str, image: str) -> str:
    """The multi-node job a training step hands its work to, as JSON; "" for one node."""
    if placement.nodes_of(kind) == 1:
        return ""
    import dataclasses
    import json

    from secateurs.trainjob import JobPlacement

    return json.dumps(dataclasses.asdict(JobPlacement.of(placement, kind, image)))


# What the pod of a multi-node step asks for: it stages the inputs on the cache volume, creates the TrainJob and
# streams rank 0's log, in one Python process that imports secateurs (torch included, about 1 GB resident). The
# job's pods get the step's GPUs and placement.resources (secateurs.trainjob), so the watcher can land on any node.
WATCHER_RESOURCES = {"cpu_request": "1", "memory_request": "4G"}


def place(task, kind: str, placement: PlacementConfig, watcher: bool = False) -> None:
    """Every cluster setting of one task: GPUs, resources, node selection, the defaults ConfigMap, secrets,
    volumes, retries, caching.

    kfp.local ignores the Kubernetes ones (with a warning); GPUs are requested only by the registry's GPU steps.
    `kind` "" is a task of no step (a rerun's `recorded` one): no GPU and no resources. A `watcher` (a step that
    runs on several nodes as a TrainJob and only watches it) gets no GPU, node selector, toleration or /dev/shm,
    and `WATCHER_RESOURCES` instead of the step's: an N-node job then needs N GPU nodes, not N + 1.
    """
    from kfp import kubernetes

    gpus = getattr(placement.gpus, kind, 0) if kind and STEPS[kind].gpu and not watcher else 0
    if gpus:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
        for label, value in placement.node_selector.items():
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
        for t in placement.tolerations:
            kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
        if placement.shm_size:
            kubernetes.empty_dir_mount(task, volume_name="shm", mount_path="/dev/shm", medium="Memory",
                                       size_limit=placement.shm_size)  # fmt: skip
    resources = placement.resources.get(kind)
    resources = WATCHER_RESOURCES if watcher else resources.model_dump(exclude_none=True) if resources else {}
    for setting, value in resources.items():
        getattr(task, f"set_{setting}")(value)
    from_secrets = {env for secret in placement.secrets for env in secret.env.values()}
    if placement.defaults_config_map:
        # Every key optional: the chart writes some only when they are set. A variable a Secret fills is left to
        # the Secret (Kubernetes keeps the last of two same-named variables, in an order this code does not set).
        keys = {key: key for key in DEFAULTS_KEYS if key not in from_secrets}
        kubernetes.use_config_map_as_env(task, placement.defaults_config_map, keys, optional=True)
    for secret in placement.secrets:
        kubernetes.use_secret_as_env(task, secret_name=secret.name, secret_key_to_env=secret.env)
    if placement.cache_volume is not None:
        path = placement.cache_volume.mount_path
        kubernetes.mount_pvc(task, pvc_name=placement.cache_volume.pvc, mount_path=path)
        task.set_env_variable("SECATEURS_CACHE", f"{path}/secateurs")
        task.set_env_variable("HF_HOME", f"{path}/huggingface")
        # Training checkpoints outlive a preempted pod there: its retry resumes (secateurs.train._checkpoints_dir).
        task.set_env_variable("SECATEURS_CHECKPOINTS", f"{path}/checkpoints")
    if placement.retries:
        task.set_retry(
            num_retries=placement.retries, backoff_duration=placement.retry_backoff, backoff_factor=2
        )
    task.set_caching_options(placement.caching)
