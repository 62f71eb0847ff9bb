"""The pipeline config: one YAML file describes a whole run.

Pydantic v2 models, one per step, composed into `PipelineConfig`. Every field has a description and a default
whose origin is named; `extra="forbid"` so a mistyped key fails; cross-field rules are validators. Validation
happens before any compute and names the field and the reason, e.g.
`students[1].prune.num_attention_heads=20 is not a multiple of the 8 KV groups`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from secateurs.placement import PlacementConfig
from secateurs.registry import STEPS

# How layers are ranked for depth pruning (Minitron, arXiv 2407.14679 and 2408.11796: Block Influence, LM-loss
# increase of one layer or of a contiguous block; docs/steps.md). Kept here, not in `prune`, so that validating a config imports no torch.
DEPTH_CRITERIA = ("block-influence", "lm-loss", "lm-loss-contiguous")
DepthCriterion = Literal["block-influence", "lm-loss", "lm-loss-contiguous"]


def parse_layer_list(spec: str) -> list[int]:
    """'15-30,7' -> [7, 15, 16, ..., 30] (0-based, inclusive ranges)."""
    layers: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            lo, _, hi = part.partition("-")
            lo_i, hi_i = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ValueError(f"drop_layers: {part!r} is not a layer index or an inclusive range like 15-30") from None
        if lo_i > hi_i:
            raise ValueError(f"drop_layers: range {part!r} is empty")
        layers.update(range(lo_i, hi_i + 1))
    if not layers:
        raise ValueError(f"drop_layers: {spec!r} names no layer")
    return sorted(layers)


@dataclass
class PruneTarget:
    """What `secateurs.prune.run` keeps. `None` keeps that dimension as it is.

    A plain dataclass on this floor, beside `PruneConfig` which describes it, so that a config can name its target
    without importing pruning (and torch)."""

    hidden_size: int | None = None
    ffn_hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    num_layers: int | None = None
    depth_criterion: DepthCriterion = "block-influence"
    drop_layers: list[int] | None = None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class TeacherConfig(Section):
    source: str = Field(description="Local checkpoint dir, hub id, .gguf file, s3:// prefix, or built-in name (smollm2-135m).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype of the imported checkpoint.")


class DataSource(Section):
    """One corpus of a blend (Megatron's data blend, NeMo's `data_paths`): where it is and how much of it to draw."""

    source: str = Field(description="Hub dataset name, local .txt/.jsonl/.parquet file or dir, s3:// URI, python-docs, or a dataset already made by prepare-data.")
    weight: float = Field(1.0, ge=0, description="Relative share of the training sequences drawn from this source.")
    name: str | None = Field(None, description="Name in the dataset and in MLflow (default: from the source).")
    text_field: str = Field("text", description="Column holding the text.")
    hub_config: str | None = Field(None, description="Hub dataset configuration name.")
    # datasets' text builder names this `sample_by`; a blank line is where prose (and python-docs) breaks.
    sample_by: Literal["paragraph", "line"] = Field("paragraph", description="Documents of a .txt file: blank-line separated paragraphs, or lines. Either is cut at 65,536 characters, so a file is read in bounded pieces, whatever its size.")

    @model_validator(mode="before")
    @classmethod
    def _plain_source(cls, v):
        return {"source": v} if isinstance(v, str) else v  # `sources: [a.jsonl, b.jsonl]`: equal weights


class DataConfig(Section):
    source: str = Field("python-docs", description="Hub dataset name, local .txt/.jsonl/.parquet file or dir, s3:// URI, python-docs, or a dataset already made by prepare-data (one source; `sources` blends several).")
    hub_config: str | None = Field(None, description="Hub dataset configuration name.")
    text_field: str = Field("text", description="Column holding the text.")
    # datasets' text builder names this `sample_by`; a blank line is where prose (and python-docs) breaks.
    sample_by: Literal["paragraph", "line"] = Field("paragraph", description="Documents of a .txt file: blank-line separated paragraphs, or lines. Either is cut at 65,536 characters, so a file is read in bounded pieces, whatever its size.")
    sources: list[DataSource] | None = Field(None, description="A weighted blend of sources, instead of `source`.")
    # 8192 in the Llama-3.1-Minitron recipe; small models and CPU demos use less.
    seq_len: int = Field(4096, ge=2, description="Tokens per packed sequence.")
    max_tokens: int | None = Field(None, ge=2, description="Cap on the tokens kept, shared by the sources by weight (None keeps all).")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="Fraction of each source's tokens held out for validation, by whole documents.")
    seed: int = Field(0, description="Document shuffle and blend sampling seed.")
    # datasets' own default buffer; memory grows with it (10,000 documents of ~3 KB: +200 MiB, bench/data.py).
    shuffle_buffer: int = Field(1000, ge=0, description="Documents in the streaming shuffle buffer (0 keeps the source's order).")
    num_proc: int = Field(1, ge=1, description="Tokenizer processes (1: the tokenizer's own threads in this process).")
    batch_documents: int = Field(200, ge=1, description="Documents per tokenizer call.")
    # 2^27 tokens: 256 MiB shards for vocabularies under 65,536 tokens, 512 MiB above.
    shard_tokens: int = Field(2**27, ge=1, description="Tokens per shard file (rounded down to whole sequences).")

    @model_validator(mode="after")
    def _one_way_to_name_sources(self):
        if self.sources is not None:
            # Given with a value of its own: a dump of a valid config (every field set, at its default) reads back.
            shorthand = {f for f in ("source", "hub_config", "text_field", "sample_by")
                         if f in self.model_fields_set and getattr(self, f) != type(self).model_fields[f].default}  # fmt: skip
            if shorthand:
                raise ValueError(f"give either sources or {'/'.join(sorted(shorthand))}, not both")
            if not self.sources:
                raise ValueError("sources is empty")
            if sum(s.weight for s in self.sources) <= 0:
                raise ValueError("the weights of sources sum to zero")
            names = [n for n in self.source_names() if n]
            if len(set(names)) != len(names):
                raise ValueError(f"sources have duplicate names: {names}")
        return self

    def blend(self) -> list[DataSource]:
        """The sources to prepare, each named (one of weight 1 for the `source` shorthand)."""
        sources = self.sources or [DataSource(source=self.source, text_field=self.text_field, hub_config=self.hub_config,
                                              sample_by=self.sample_by)]  # fmt: skip
        return [s.model_copy(update={"name": n}) for s, n in zip(sources, self.source_names(sources))]

    def source_names(self, sources: list[DataSource] | None = None) -> list[str]:
        import re

        names = []
        for s in sources or self.sources or []:
            stem = s.name or re.sub(r"\.(txt|jsonl|json|parquet)$", "", s.source.rstrip("/").rsplit("/", 1)[-1])
            names.append(re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "source")
        return names


class ImportanceConfig(Section):
    # Minitron used 1024 calibration samples (arXiv 2407.14679, Sec. 4).
    samples: int = Field(1024, ge=1, description="Calibration sequences for activation statistics.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
    block_sizes: list[int] | None = Field(None, description="Contiguous block lengths k for the LM-loss depth scan (default: half the layers).")
    depth_samples: int = Field(64, ge=1, description="Validation sequences per LM-loss evaluation in the depth scan, spread evenly over the split.")

    @field_validator("block_sizes")
    @classmethod
    def _positive(cls, v):
        if v is not None and any(k < 1 for k in v):
            raise ValueError(f"block sizes must be >= 1, got {v}")
        return v


def kv_grouping_problem(heads: int, kv: int, per_group: int | None = None) -> str | None:
    """The GQA rule for `heads` query heads over `kv` KV groups: whole groups, each of at most `per_group` query
    heads (the source's; None: not checked). What breaks it, as the end of a sentence about
    `num_attention_heads=<heads>`; None when nothing does."""
    if heads % kv:
        return f"is not a multiple of the {kv} KV groups"
    if per_group is not None and heads // kv > per_group:
        return f"needs {heads // kv} heads per KV group; the source has {per_group}"
    return None


class PruneConfig(Section):
    hidden_size: int | None = Field(None, ge=1, description="Embedding channels to keep.")
    ffn_hidden_size: int | None = Field(None, ge=1, description="MLP neurons to keep per layer.")
    num_attention_heads: int | None = Field(None, ge=1, description="Query heads to keep, equally per KV group.")
    num_key_value_heads: int | None = Field(None, ge=1, description="Whole KV groups to keep.")
    num_layers: int | None = Field(None, ge=1, description="Decoder layers to keep, chosen by depth_criterion.")
    depth_criterion: DepthCriterion = Field(
        "block-influence", description="How layers are ranked when num_layers is given."
    )
    drop_layers: str | None = Field(None, description="Explicit 0-based layers to drop, e.g. '15-30,7'.")

    @field_validator("drop_layers")
    @classmethod
    def _layers(cls, v):
        if v is not None:
            parse_layer_list(v)
        return v

    @model_validator(mode="after")
    def _depth_exclusive(self):
        if self.num_layers is not None and self.drop_layers is not None:
            raise ValueError("give either num_layers or drop_layers, not both")
        if self.num_key_value_heads and self.num_attention_heads:
            problem = kv_grouping_problem(self.num_attention_heads, self.num_key_value_heads)
            if problem:
                raise ValueError(f"num_attention_heads={self.num_attention_heads} {problem}")
        return self

    def target(self) -> PruneTarget:
        """The `PruneTarget` this config describes."""
        return PruneTarget(
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            num_layers=self.num_layers,
            depth_criterion=self.depth_criterion,
            drop_layers=parse_layer_list(self.drop_layers) if self.drop_layers else None,
        )


class TrainingConfig(Section):
    """Optimisation knobs shared by teacher correction and distillation."""

    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per GPU per forward pass.")
    # 1152 for Llama-3.1-Minitron-4B (NVIDIA's later guideline: 768); CPU demos use far less.
    global_batch_size: int = Field(16, ge=1, description="Sequences per optimizer step (gradient accumulation fills it).")
    learning_rate: float = Field(1e-4, gt=0, description="Peak LR (Llama-3.1-Minitron-4B: 1e-4).")
    min_learning_rate: float = Field(1e-5, ge=0, description="Cosine decay floor (Llama-3.1-Minitron-4B: 1e-5).")
    warmup_steps: int = Field(40, ge=0, description="Linear warm-up steps (Llama-3.1-Minitron-4B: 40).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps (weights, optimizer, scheduler, data position, RNG).")
    # One checkpoint of a 4.5B student (fp32 weights and AdamW moments) is about 54 GB: keeping every one of a
    # 20,000-step run would fill any volume. The older of the two is what a resume falls back to when the newest
    # was cut short by a kill.
    save_total_limit: int = Field(2, ge=0, description="Keep only the newest N checkpoints (older ones are deleted as new ones land); 0 keeps every one.")
    logging_steps: int = Field(10, ge=1, description="Log the loss every N steps.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    # ddp keeps a whole copy of the model, its gradients and AdamW state on every GPU (16 bytes a parameter);
    # fsdp shards all three over the GPUs of the run (FSDP2, through the Trainer's accelerate support).
    parallelism: Literal["ddp", "fsdp"] = Field("ddp", description="How state is spread over the processes of a torchrun run: ddp replicates the model, fsdp (FSDP2) shards its parameters, gradients and optimizer state.")
    compile_layers: bool = Field(False, description="torch.compile every decoder layer (the teacher's too when distilling); on an H200 the 8B -> 4B distillation step ran 1.21x faster (bench/results/gpu/compile).")
    seed: int = Field(0, description="Seed for initialisation order and data shuffling.")
    # Training keeps fp32 master weights; the output need not: an 8B model is 32 GB in fp32, 16 GB in bf16, and
    # every later step (pruning, distillation's frozen teacher, evaluation, engines) runs it in bf16 on GPUs.
    save_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the trained checkpoint written (the weights train in fp32 either way).")

    @model_validator(mode="after")
    def _batches(self):
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}"
            )
        if self.min_learning_rate > self.learning_rate:
            raise ValueError(f"min_learning_rate={self.min_learning_rate} is above learning_rate={self.learning_rate}")
        return self


class TeacherCorrectionConfig(TrainingConfig):
    """NeMo's Llama-3.1 tutorial: 30 steps, LR 1e-4 -> 1e-5, warm-up 2."""

    enabled: bool = Field(True, description="Run teacher correction (on by default in the recipe).")
    max_steps: int = Field(30, ge=1, description="Optimizer steps (NeMo tutorial: 30).")
    warmup_steps: int = Field(2, ge=0, description="Linear warm-up steps (NeMo tutorial: 2).")


class DistillConfig(TrainingConfig):
    """Knowledge distillation: forward KL on logits by default, as the recipe recommends."""

    temperature: float = Field(1.0, gt=0, description="Softmax temperature; the KL term is multiplied by T^2 (recipe: 1).")
    top_k: int | None = Field(None, ge=1, description="Keep only the K largest teacher logits per token (recipe: ~1024), both sides renormalised.")
    ce_alpha: float = Field(0.0, ge=0, le=1, description="Weight of a cross-entropy term: (1-a) KD + a CE (recipe: 0).")
    validation_sequences: int | None = Field(None, ge=1, description="After training, the validation loss of the written student over N sequences spread over the held-out split, in the report (how a search scores its candidates, inside the run that trained them).")
    intermediate_loss: bool = Field(False, description="Add cosine losses between hidden states (for students with many layers cut).")
    layer_pairs: list[tuple[int, int]] | None = Field(None, description="(student layer, teacher layer) pairs; default: losses.default_layer_mapping.")
    kd_chunk_size: int = Field(2048, ge=1, description="Tokens per chunk of the fused LM-head + KL loss (2048: as fast as full logits on an H200 at 41% of their extra memory, bench/results/gpu/compile).")
    kd_backend: Literal["auto", "liger", "chunked"] = Field("auto", description="Fused loss implementation: auto = chunked (faster than Liger on an H200, bench/results/gpu); liger on CUDA with liger-kernel.")


class EvaluateConfig(Section):
    """Evaluation of the teacher and of every student before and after distillation (secateurs.evaluate)."""

    tasks: list[str] = Field(
        ["lambada-docs"], min_length=1, description="Task names, task YAML paths or lm-eval task names."
    )
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
    max_sequences: int | None = Field(None, ge=1, description="Cap on the validation sequences for the loss, spread evenly over the split.")
    limit: int | None = Field(None, ge=1, description="Cap on the items of every task.")


class EngineConfig(Section):
    """Optional inference-engine build and throughput benchmark of the teacher and the distilled students."""

    enabled: bool = Field(False, description="Build and benchmark an engine per model.")
    backend: Literal["onnxruntime-genai", "tensorrt-llm"] = Field("onnxruntime-genai", description="Engine backend.")
    precision: str = Field("int4", description="int4|fp32|fp16 (onnxruntime-genai), bf16|fp8 (tensorrt-llm).")
    lengths: str = Field("128:128", description="INPUT:OUTPUT token pairs to benchmark, comma separated.")
    batch: int = Field(8, ge=1, description="Concurrent requests.")
    repeats: int = Field(3, ge=1, description="Timed repeats per length pair (the median is reported).")


class MaxPruning(Section):
    """The largest fraction of each axis a search candidate may lose (Model Optimizer's Minitron search bounds width
    and depth pruning the same way; half of each axis reaches the recipe's 2x compressions)."""

    hidden_size: float = Field(0.5, ge=0, lt=1, description="Of the embedding channels.")
    ffn_hidden_size: float = Field(0.5, ge=0, lt=1, description="Of the MLP neurons.")
    num_attention_heads: float = Field(0.5, ge=0, lt=1, description="Of the query heads.")
    num_key_value_heads: float = Field(0.5, ge=0, lt=1, description="Of the KV groups.")
    num_layers: float = Field(0.5, ge=0, lt=1, description="Of the decoder layers.")


class FixedShape(Section):
    """Dimensions a search keeps at one value (the others are searched)."""

    hidden_size: int | None = Field(None, ge=1, description="Embedding channels.")
    ffn_hidden_size: int | None = Field(None, ge=1, description="MLP neurons per layer.")
    num_attention_heads: int | None = Field(None, ge=1, description="Query heads.")
    num_key_value_heads: int | None = Field(None, ge=1, description="KV groups.")
    num_layers: int | None = Field(None, ge=1, description="Decoder layers.")

    @model_validator(mode="after")
    def _whole_groups(self):
        if self.num_key_value_heads and self.num_attention_heads and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of num_key_value_heads="
                f"{self.num_key_value_heads}"
            )
        return self


class SearchConfig(Section):
    """Architecture search (secateurs.search): the student's shape chosen under a budget, scored after a short
    distillation of the best candidates."""

    params: float | None = Field(None, gt=0, description="Budget: the student's total parameter count at most.")
    memory: float | None = Field(None, gt=0, description="Budget: bytes of the student's weights at `precision` at most.")
    precision: Literal["fp32", "bf16", "fp16", "fp8", "int4"] = Field("bf16", description="Bytes per weight of the memory budget (int4: half a byte).")
    # Puzzle (Nemotron-51B, arXiv 2411.19146) budgets measured throughput rather than parameters.
    latency: float | None = Field(None, gt=0, description="Budget: output tokens/s the student's engine reaches at least, measured at engine_lengths and engine_batch on a random-weight build of each candidate.")
    engine_backend: Literal["onnxruntime-genai", "tensorrt-llm"] = Field("onnxruntime-genai", description="Engine backend of the latency budget (in a pipeline config: engine.backend, the default).")
    engine_precision: str = Field("int4", description="Engine precision of the latency budget (in a pipeline config: engine.precision unless given).")
    engine_lengths: str = Field("64:32", description="INPUT:OUTPUT tokens of the latency measurement.")
    engine_batch: int = Field(4, ge=1, description="Concurrent requests of the latency measurement.")
    # Minitron ranked candidates after ~400 steps (~1.8B tokens) of light distillation (arXiv 2407.14679, Sec. 3).
    tokens: float = Field(1.8e9, ge=1, description="Tokens of the short distillation of each of the top_k candidates.")
    # Model Optimizer's Minitron search keeps its top 10 candidates by parameter count; distilling each costs a run.
    top_k: int = Field(3, ge=1, description="Candidates (best by validation loss right after pruning) distilled briefly and ranked again.")
    tolerance: float = Field(0.05, gt=0, lt=1, description="Candidates have between (1 - tolerance) x budget and the budget parameters.")
    max_candidates: int = Field(24, ge=1, description="At most this many candidates are pruned and scored, closest to the budget first.")
    # Model Optimizer's grids: channels in multiples of 64, layers in steps of 1.
    hidden_divisor: int = Field(64, ge=1, description="Hidden sizes searched are multiples of this.")
    ffn_divisor: int = Field(64, ge=1, description="MLP sizes searched are multiples of this.")
    layer_divisor: int = Field(1, ge=1, description="Layer counts searched are multiples of this.")
    max_pruning: MaxPruning = Field(MaxPruning(), description="The largest fraction of each axis a candidate may lose.")
    fixed: FixedShape = Field(FixedShape(), description="Dimensions held at one value.")
    depth_criterion: DepthCriterion = Field("block-influence", description="How layers are ranked for candidates with fewer layers.")
    val_sequences: int = Field(64, ge=1, description="Validation sequences (spread over the split) each candidate is scored on.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass when scoring.")

    @model_validator(mode="after")
    def _a_budget(self):
        if self.params is None and self.memory is None and self.latency is None:
            raise ValueError("give a budget: params, memory or latency")
        return self


class StudentConfig(Section):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="Short name (lower case, digits, dashes).")
    parent: str = Field("teacher", description="'teacher' or the name of another student to prune from (15B -> 8B -> 4B chains).")
    prune: PruneConfig | None = Field(None, description="The pruning target (or `search` for one chosen under a budget).")
    search: SearchConfig | None = Field(None, description="Search the pruning target under a budget instead of giving it.")
    distill: DistillConfig | None = Field(None, description="Per-student distillation settings (default: the pipeline's).")

    @model_validator(mode="after")
    def _prune_or_search(self):
        if (self.prune is None) == (self.search is None):
            raise ValueError("give either prune (a target shape) or search (a budget), not both or neither")
        return self


class TrackingConfig(Section):
    """Where the run's records go: the MLflow server and the KFP pipeline root."""

    uri: str | None = Field(
        None,
        description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<run dir>/mlflow.db).",
    )
    pipeline_root: str | None = Field(
        None,
        description="Where KFP keeps artifacts: a local dir or s3://bucket/prefix (default: <run dir>/artifacts).",
    )


class PipelineConfig(Section):
    name: str = Field("secateurs", description="Pipeline/run name.")
    teacher: TeacherConfig
    data: DataConfig = DataConfig()
    teacher_correction: TeacherCorrectionConfig = TeacherCorrectionConfig()
    importance: ImportanceConfig = ImportanceConfig()
    distill: DistillConfig = DistillConfig()
    students: list[StudentConfig] = Field(min_length=1)
    evaluate: EvaluateConfig = EvaluateConfig()
    engine: EngineConfig = EngineConfig()
    placement: PlacementConfig = PlacementConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _student_graph(self):
        names = [s.name for s in self.students]
        for i, s in enumerate(self.students):
            if s.name == "teacher" or names.count(s.name) > 1:
                raise ValueError(f"students[{i}].name={s.name!r} is used twice or is reserved")
            if s.parent != "teacher" and s.parent not in names:
                raise ValueError(f"students[{i}].parent={s.parent!r} is neither 'teacher' nor a student name")
        for s in self.students:
            seen, node = [s.name], s
            while node.parent != "teacher":
                node = next(x for x in self.students if x.name == node.parent)
                if node.name in seen:
                    raise ValueError(f"student chain has a cycle: {' -> '.join(seen + [node.name])}")
                seen.append(node.name)
        return self

    @model_validator(mode="after")
    def _latency_budget_engine(self):
        """A latency budget is measured on the backend the pipeline's engines use: a search's engine backend and
        precision default to `engine`'s, and another backend is refused. TensorRT-LLM builds engines on a GPU, so
        a search measured with it needs one (it is placed like importance)."""
        for i, s in enumerate(self.students):
            if s.search is None or s.search.latency is None:
                continue
            given = s.search.model_fields_set
            if "engine_backend" in given and s.search.engine_backend != self.engine.backend:
                raise ValueError(f"students[{i}].search.engine_backend={s.search.engine_backend} but "
                                 f"engine.backend={self.engine.backend}: a latency budget is measured on the "
                                 "backend the pipeline's engines use")  # fmt: skip
            update = {"engine_backend": self.engine.backend}
            if "engine_precision" not in given:
                update["engine_precision"] = self.engine.precision
            s.search = s.search.model_copy(update=update)
            if s.search.engine_backend == "tensorrt-llm" and not self.placement.gpus.importance:
                raise ValueError(f"students[{i}].search measures latency with tensorrt-llm, which builds engines on "
                                 "a GPU, but the search step has none: set placement.gpus.importance (the search "
                                 "is placed like it)")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _fits_processes(self):
        """Each training step's settings against the processes placement gives it (before anything runs)."""
        runs = [("teacher_correction", "correct_teacher", self.teacher_correction)] if self.teacher_correction.enabled else []
        runs += [("distill", "distill", self.distill)]
        runs += [(f"students[{i}].distill", "distill", s.distill) for i, s in enumerate(self.students) if s.distill]
        for where, kind, settings in runs:
            n = self.placement.processes_of(kind) * self.placement.nodes_of(kind)
            if settings.parallelism == "fsdp" and n == 1:
                raise ValueError(
                    f"{where}.parallelism=fsdp but the {kind} step runs in 1 process: give it more GPUs "
                    f"(placement.gpus.{kind}) or processes (placement.processes.{kind}), or use ddp"
                )
            if settings.global_batch_size % (settings.micro_batch_size * n):
                raise ValueError(
                    f"{where}.global_batch_size={settings.global_batch_size} is not a multiple of micro_batch_size x "
                    f"processes x nodes = {settings.micro_batch_size} x {n}"
                )
        return self

    def lineage_order(self) -> list[StudentConfig]:
        """Students ordered so every parent comes before its children."""
        done, order = {"teacher"}, []
        while len(order) < len(self.students):
            for s in self.students:
                if s.name not in done and s.parent in done:
                    order.append(s)
                    done.add(s.name)
        return order


class ConfigError(ValueError):
    """A config file that does not validate."""


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a YAML config; errors name the field and the reason in one line each."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: " + "; ".join(format_error(err) for err in e.errors())) from None


def format_error(err: dict) -> str:
    """'students[1].prune.hidden_size=0: Input should be greater than or equal to 1'."""
    where = ""
    for part in err["loc"]:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    value = err.get("input")
    shown = f"={value!r}" if err["type"] not in ("missing",) and not isinstance(value, dict) else ""
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where or 'config'}{shown}: {msg}"


def settings_model(kind: str) -> type[Section] | None:
    """The pydantic model of step `kind`'s options: the class of this module that the registry names
    (`secateurs.registry.StepSpec.settings`); None for a step without options."""
    name = STEPS[kind].settings
    return globals()[name] if name else None


__all__ = ["PipelineConfig", "PruneTarget", "load_config", "ConfigError", "DEPTH_CRITERIA", "settings_model"]
