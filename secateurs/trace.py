"""The traced memory plan: each GPU step's own code run under fake tensors at the config's real shapes.

`secateurs plan CONFIG --trace` builds every model of the config from its config.json alone (no weights) inside
PyTorch's `FakeTensorMode`, where a tensor has a shape, dtype and device but no storage, and runs the step's own
code on it:
- teacher correction: `secateurs.train.LMTrainer.compute_loss`, its backward, for `MICRO_BATCHES` micro-batches of
  gradient accumulation, then the Trainer's optimizer (`adamw_torch_fused`, transformers' default) step; the
  traced step is the second (the first, untraced, makes AdamW's state, which every later step runs beside);
- distillation (and a search's short distillations): `secateurs.train.DistillationTrainer.compute_loss` (frozen
  bf16 teacher, chunked KD loss, the intermediate loss and its projections where configured), the same way;
- importance: its own `collect_activation_scores` (statistic hooks, block influence) and `lm_loss_depth_scan`
  (the validation loss of the model and of each model with layers left out) on one batch;
- evaluation: `secateurs.evaluate.validation_loss` on one batch, then lm-eval's own scoring
  (`HFLM._loglikelihood_tokens`, built as `secateurs.evaluate.score_tasks` builds it) of one batch of
  `evaluate.batch_size` requests of `plan.LM_EVAL_CONTEXT_TOKENS` tokens; its data-dependent reads (`.item()`,
  `.all()`) return 1 under fake tensors, which leaves its memory unchanged;
- a search's scoring: the validation loss of its largest candidate (`search.enumerate_candidates`) beside the
  parent it is pruned from.
Peak bytes per GPU and their categories are read by PyTorch's `MemTracker` (one process) or `FSDPMemTracker`
(fsdp), as torchtitan's memory estimator does (scripts/estimate/estimation.py). Under fsdp the world size is the
step's processes, formed by a fake process group (`torch.testing._internal.distributed.fake_pg.FakeStore`) whose
collectives return at once with outputs of the right shapes; FSDP2 is applied as `secateurs.train` asks
accelerate to (each decoder layer a unit resharded after forward, the final norm and LM head one unit kept
gathered after forward, bf16 parameters and fp32 gradient reduction), one reduce-scatter per micro-batch
(`sync_each_batch`). Under ddp the step runs in one process with bf16 autocast, as the Trainer runs it (DDP's
reducer buckets, a second fp32 copy of the gradients with more than one process, are added from the plan).
Each training step's micro-batch is also timed by PyTorch's `RuntimeEstimator` roofline cost model at the node's
GPU (`GPU_PEAKS`, NVIDIA datasheet figures).

What the trace cannot see, and is added from the analytic plan's constants (`secateurs.plan.runtime_bytes`, each
sourced there) or left to its headroom (docs/memory-plan.md cites each):
- the CUDA context and cuBLAS/cuBLASLt workspaces (`plan.CUDA_CONTEXT`, `plan.CUBLAS_WORKSPACES`);
- NCCL's buffers with more than one process (`plan.NCCL_BUFFERS`);
- the caching allocator's fragmentation and its 512-byte rounding of CPU tensors (`plan.HEADROOM`; MemTracker
  rounds CUDA tensors only, torch/distributed/_tools/mem_tracker.py `_WeakRefInfo._calculate_mem_consumed`);
- kernel workspaces other than cuBLAS's (cuDNN, flash attention's split-KV scratch);
- kernels that differ on a GPU: the KD loss runs its chunked path on CPU (on CUDA with liger-kernel installed,
  Liger's fused linear JSD), and on CPU its logits matmuls write a bf16 [chunk, V] buffer that CUDA's fp32-output
  matmul skips (`losses._logits_fp32`), which the trace counts and a GPU does not;
- attention: the models run with `attn_implementation="sdpa"` on fake CPU tensors, where SDPA dispatches to
  `_scaled_dot_product_flash_attention_for_cpu` (aten/src/ATen/native/transformers/attention.cpp,
  `_fused_sdp_choice_cpp`), which like FlashAttention-2 on a GPU keeps the output and a [batch, heads, seq] fp32
  log-sum-exp for backward and no [seq, seq] matrix; the GPU's flash kernel keeps the same tensors, so no
  correction is made. `Traced.attention_kernels` records which kernel the trace saw.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

GiB = 2**30
# Micro-batches of gradient accumulation traced before the optimizer step (the peak often comes at the first step).
MICRO_BATCHES = 2


@dataclass
class Traced:
    """Peak bytes of one process, by the tracker's category."""

    peak: int
    categories: dict[str, int] = field(default_factory=dict)
    attention_kernels: set[str] = field(default_factory=set)
    seconds: float = 0.0
    phases: dict[str, tuple[int, dict[str, int]]] = field(default_factory=dict)  # name -> (peak, categories)
    peak_phase: str = ""

    @property
    def largest(self) -> tuple[str, int]:
        return max(self.categories.items(), key=lambda kv: kv[1])


def model_from_config(config: dict, dtype: torch.dtype):
    """A causal LM of `config` (a config.json's values) with freshly initialised weights in `dtype`, SDPA attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(config)
    values.setdefault("model_type", "llama")
    hf = AutoConfig.for_model(**values)
    hf._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(hf, dtype=dtype, attn_implementation="sdpa")


# ----------------------------------------------------------------------------------------------- the steps' code
def training_step(trainer, model, optimizer, batches: list[torch.Tensor], autocast: bool, phase=None) -> None:
    """What transformers' Trainer does for one optimizer step: each micro-batch's `compute_loss` (the step's own,
    from `secateurs.train`), scaled by the accumulation and backpropagated, then the optimizer step.

    Args:
        phase: called with a phase's name ("micro-batch 1", ..., "optimizer") as it ends.
    """
    phase = phase or (lambda name: None)
    for i, ids in enumerate(batches):
        with torch.autocast(ids.device.type, torch.bfloat16, enabled=autocast):  # cpu, or cuda when run to measure
            loss = trainer.compute_loss(model, {"input_ids": ids})
        (loss / len(batches)).backward()
        del loss
        phase(f"micro-batch {i + 1}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    phase("optimizer")


def forward_step(model, batch: torch.Tensor) -> None:
    """The validation loss (`secateurs.evaluate.validation_loss`) of one batch, as importance and evaluation run it."""
    from secateurs.evaluate import validation_loss

    try:
        validation_loss(model, batch, batch_size=len(batch))
    except Exception as e:  # under fake tensors the final `.item()` has no value to give
        if "DataDependent" not in type(e).__name__:
            raise


def trainer_for(kind: str, settings, teacher=None, pairs=(), projections=None):
    """The step's Trainer class with only what its `compute_loss` reads (no data, no accelerate)."""
    from secateurs.train import DistillationTrainer, LMTrainer, _Context

    cls = DistillationTrainer if kind == "distill" else LMTrainer
    trainer = cls.__new__(cls)
    trainer.ctx = _Context(teacher=teacher, pairs=list(pairs), projections=projections) if teacher else None
    trainer.settings = settings
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda m: m)
    return trainer


# ------------------------------------------------------------------------------------------------- the tracing
@contextlib.contextmanager
def _watched(seen: set[str], fake: bool):
    """Record which SDPA kernel aten dispatches to (the module docstring says why it matters), and under fake
    tensors give `nonzero` (the KD loss's kept rows, data-dependent) its largest result: every row kept, which is
    what packed sequences without padding give; `.item()` (the KD loss's backward reads its incoming gradient) reads 1.""" 
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "attention" in func.__name__:
                seen.add(func.__name__.split(".")[0])
            if fake and func is torch.ops.aten.nonzero.default:
                x = args[0]
                return torch.empty((x.numel(), x.dim()), dtype=torch.long, device=x.device)
            # (`aten.item` itself reaches this mode under inference mode, as the importance scan runs.)
            if fake and func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
                return 1.0 if args[0].is_floating_point() else 1  # `.item()`: a value is needed, not its bytes
            return func(*args, **(kwargs or {}))

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # The GPU's kernel: flash attention (on CPU its CPU implementation), never the math fallback that materialises
    # the [batch, heads, seq, seq] scores; a config flash cannot run fails here rather than planning the fallback.
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), Watch():
        yield


def _memory_tracker():
    """PyTorch's MemTracker, which installs gradient hooks on every parameter it meets: a frozen teacher's refuse
    them (they have no gradients), so modules without trainable parameters are tracked without."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            trainable = any(p.requires_grad for p in module.parameters())
            return super()._track_module_params_and_buffers(module, install_grad_hooks and trainable)

        def _pre_fw_hook(self, module, inputs):
            # A step that calls its model again (the depth scan: one validation loss per layer left out) starts a
            # new iteration, which MemTracker refuses unless its per-module statistics are cleared; the peak and
            # its categories, which the trace reads, are kept.
            name = self._mod_tracker.get_known_fqn(module)
            if module in self.memory_tracking and not self._mod_tracker.is_bw and \
                    set(self._mod_tracker.parents) - {name} == {"Global"}:  # fmt: skip
                self.reset_mod_stats()
            return super()._pre_fw_hook(module, inputs)

    return Tracker()


def _snapshot(tracker) -> tuple[int, dict[str, int]]:
    snap = tracker.get_tracker_snapshot("peak")
    categories: dict[str, int] = {}
    for per_device in snap.values():
        for key, value in per_device.items():
            name = getattr(key, "value", key)
            categories[name] = categories.get(name, 0) + value
    total = categories.pop("Total", sum(categories.values()))
    return total, {k: v for k, v in categories.items() if v}


class _Phases:
    """The tracker's peak of each phase of a step, the peak restarted from the current memory at each phase's end.
    Each phase's peak is linear in the number of layers, where the step's peak (the largest of them) need not be:
    the optimizer's phase grows faster with layers than a micro-batch's."""

    def __init__(self, tracker):
        self.tracker, self.peaks = tracker, {}

    def __call__(self, name: str) -> None:
        peak, categories = _snapshot(self.tracker)
        if "Inputs" in categories:  # FSDPMemTracker's name for what `track_inputs` gave it: the teacher, the batches
            categories["Teacher + inputs"] = categories.pop("Inputs")
        self.peaks[name] = (peak, categories)
        # MemTracker keeps one peak for its whole context; restart it (its private fields, torch 2.13's names).
        current = self.tracker.get_tracker_snapshot("current")
        self.tracker._peak_mem_snap = current
        self.tracker._peak_mem = {dev: snap["Total"] for dev, snap in current.items()}
        # And let the root module be called again (MemTracker refuses a second iteration otherwise).
        self.tracker.reset_mod_stats()

    def traced(self, seen, seconds) -> Traced:
        name = max(self.peaks, key=lambda n: self.peaks[n][0])
        return Traced(*self.peaks[name], seen, seconds, phases=dict(self.peaks), peak_phase=name)


def trace_training(kind: str, student: dict, settings, seq_len: int, teacher: dict | None = None,
                   bf16: bool = True, fake: bool = True, world: int = 1) -> Traced:  # fmt: skip
    """Peak bytes of one process of a training step of one process (ddp's arithmetic, no DDP reducer): the step's
    `compute_loss` over `MICRO_BATCHES` micro-batches, then the optimizer step.

    Args:
        kind: "correct_teacher" or "distill".
        student: the trained model's config.json values.
        settings: its `TeacherCorrectionConfig` / `DistillConfig`.
        teacher: the frozen teacher's config.json values (distill).
        bf16: run as on GPUs (bf16 autocast, bf16 teacher); False: as on CPU (fp32).
        fake: under `FakeTensorMode` (False runs it for real, to measure).
        world: processes; more than one under `settings.parallelism == "fsdp"` shards the student with FSDP2
            over a process group of `world` (a fake one when `fake`, else the one already initialised).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from secateurs import losses

    start = time.perf_counter()
    seen: set[str] = set()
    sharded = settings.parallelism == "fsdp" and world > 1
    mesh = device_mesh(world, fake) if sharded else None
    with FakeTensorMode() if fake else contextlib.nullcontext():
        model = model_from_config(student, torch.float32).train()
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        frozen, pairs, projections = None, [], None
        if kind == "distill":
            frozen = model_from_config(teacher, torch.bfloat16 if bf16 else torch.float32).eval().requires_grad_(False)
            if settings.intermediate_loss:
                pairs = settings.layer_pairs or losses.default_layer_mapping(
                    student["num_hidden_layers"], teacher["num_hidden_layers"], None)
                projections = losses.intermediate_projections(student["hidden_size"], teacher["hidden_size"],
                                                              len(pairs))  # fmt: skip
        if sharded:
            if projections is not None:  # as `secateurs.train.distill` does under fsdp
                model.add_module("secateurs_kd_projections", projections)
            shard(model, mesh, bf16)
        trainer = trainer_for(kind, settings, frozen, pairs, projections)
        params = list(model.parameters())
        if projections is not None and not sharded:
            params += list(projections.parameters())
        if sharded and fake:
            optimizer = _LocalAdamW(params, lr=settings.learning_rate)
        else:
            optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, fused=True)
        vocab = student["vocab_size"]
        batches = [torch.randint(0, vocab, (settings.micro_batch_size, seq_len)) for _ in range(MICRO_BATCHES)]
        # AdamW makes its state at the first optimizer step, and every later step's micro-batches run beside it:
        # the first step runs untraced, and the second, which every later step repeats, is traced.
        with _watched(seen, fake):
            training_step(trainer, model, optimizer, batches, autocast=bf16 and not sharded)
        if sharded:
            from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs(tuple(batches))
            if frozen is not None:  # FSDPMemTracker.track_external is a no-op: the teacher counts as "Inputs"
                tracker.track_inputs(tuple(frozen.parameters()))
        else:
            tracker = _memory_tracker()
            tracker.track_external(model, optimizer, *batches, *([frozen] if frozen is not None else []))
        phases = _Phases(tracker)
        with tracker, _watched(seen, fake):
            training_step(trainer, model, optimizer, batches, autocast=bf16 and not sharded, phase=phases)
    return phases.traced(seen, time.perf_counter() - start)


class _LocalAdamW(torch.optim.AdamW):
    """Fused AdamW over each sharded parameter's local shard, for fake tensors only.

    Under fake tensors and a fake process group, the fused AdamW step over FSDP2's DTensor parameters allocates
    about 16 bytes of every unsharded parameter (measured against 2 gloo processes, tests/test_plan_trace.py), where
    the same step on real shards allocates only the shard's AdamW state; DTensor runs the fused kernel on the
    local shards (its pointwise strategy for `_fused_adamw_`, torch/distributed/tensor/_ops/_pointwise_ops.py), so
    this does so directly."""

    def __init__(self, params, lr: float):
        self.sharded = list(params)
        super().__init__([p.to_local().detach() for p in self.sharded], lr=lr, fused=True)  # same storage

    @torch.no_grad()
    def step(self, closure=None):
        for p, local in zip(self.sharded, self.param_groups[0]["params"]):
            local.grad = None if p.grad is None else p.grad.to_local()
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none)
        for p in self.sharded:
            p.grad = None


def device_mesh(world: int, fake: bool):
    """A CPU mesh of `world` processes: over a fake process group when `fake` (made outside fake tensors: the mesh
    reads real ranks)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if fake and not dist.is_initialized():
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    if dist.get_world_size() != world:
        raise ValueError(f"a process group of {dist.get_world_size()} is initialised; this trace needs {world}")
    return init_device_mesh("cpu", (world,))


def shard(model, mesh, bf16: bool) -> None:
    """FSDP2 as `secateurs.train` asks accelerate for it: each decoder layer a unit resharded after forward, the
    final norm and LM head one unit kept whole after forward (accelerate >= 1.14, `fsdp2_prepare_model`), the rest
    (embeddings) the root; bf16 compute, fp32 gradient reduction (`secateurs.train._fsdp_mixed_precision`)."""
    from torch.distributed.fsdp import fully_shard

    from secateurs.train import _fsdp_mixed_precision

    policy = _fsdp_mixed_precision(bf16)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard([model.model.norm, model.lm_head], mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)


def trace_forward(config: dict, batch: int, seq_len: int, bf16: bool = True, fake: bool = True,
                  step: str = "validation", block_sizes: tuple[int, ...] = (),
                  lm_eval_tokens: int = 0, beside: dict | None = None) -> Traced:  # fmt: skip
    """Peak bytes of a forward-only step on one batch of `batch` x `seq_len` tokens, through the step's own code.

    Args:
        step: "validation": `secateurs.evaluate.validation_loss`; "importance": the importance step's
            `collect_activation_scores` (its statistic hooks, block influence), then its `lm_loss_depth_scan` (the
            validation loss of the model and of each model with layers left out, `block_sizes` as configured);
            "evaluate": the validation loss, then lm-eval's scoring (`lm_loss_requests`) of `batch` requests of
            `lm_eval_tokens` tokens.
        beside: the config.json values of a model held beside it in memory (a search's parent, beside the
            candidate it scores).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from secateurs import importance

    start = time.perf_counter()
    seen: set[str] = set()
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    with mode:
        model = model_from_config(config, torch.bfloat16 if bf16 else torch.float32).eval()
        held = model_from_config(beside, torch.bfloat16 if bf16 else torch.float32).eval() if beside else None
        ids = torch.randint(0, config["vocab_size"], (batch, seq_len))
    lm = lm_eval_model(model, batch) if step == "evaluate" else None  # outside fake tensors: it reads real values
    with mode:
        tracker = _memory_tracker()
        tracker.track_external(model, ids, *([held] if held is not None else []))
        phases = _Phases(tracker)
        with tracker, _watched(seen, fake):
            if step == "importance":
                with _unless_data_dependent():  # its `.tolist()` of the block influence has no fake value
                    importance.collect_activation_scores(model, ids, batch)
                phases("activation scores")
                importance.lm_loss_depth_scan(model, ids, batch, list(block_sizes))
                phases("depth scan")
            else:
                forward_step(model, ids)
                phases("validation loss")
            if step == "evaluate":
                lm_loss_requests(lm, config["vocab_size"], batch, lm_eval_tokens)
                phases("lm-eval scoring")
    return phases.traced(seen, time.perf_counter() - start)


@contextlib.contextmanager
def _unless_data_dependent():
    """Under fake tensors, a step's last lines that read values (`.tolist()`) fail once its memory is spent."""
    try:
        yield
    except Exception as e:
        if "DataDependent" not in type(e).__name__ and "data" not in str(e).lower():
            raise


def lm_eval_model(model, batch_size: int):
    """lm-eval's HFLM over `model` as `secateurs.evaluate.score_tasks` makes it (batch size, fp32 log-softmax).

    Its tokenizer is a two-word one made here: the traced requests come already tokenized
    (`lm_loss_requests`), and HFLM reads only its special tokens."""
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", eos_token="</s>")
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype=torch.float32)


def lm_loss_requests(lm, vocab_size: int, batch: int, tokens: int) -> None:
    """One batch of lm-eval's log-likelihood scoring (`HFLM._loglikelihood_tokens`, what every loglikelihood and
    multiple-choice task runs): `batch` requests of a `tokens`-token context and one continuation token. The
    contexts differ, so HFLM's cache of shared contexts (`logits_cache`) merges none of them: the largest batch."""
    requests = [(("", ""), [(1 + i) % vocab_size] * tokens, [0]) for i in range(batch)]
    lm._loglikelihood_tokens(requests, disable_tqdm=True)


# ------------------------------------------------------------------------------------------------ the runtime
# Dense bf16 tensor-core FLOP/s and DRAM bytes/s of the GPUs the roofline knows, from NVIDIA's datasheets: H100
# SXM5 989 TFLOPS (1,979 "with sparsity") and 3.35 TB/s (the figures torch/_inductor/analysis/device_info.py
# carries, from nvidia.com/en-us/data-center/h100/); H200 SXM 989 TFLOPS and 4.8 TB/s (NVIDIA H200 datasheet).
GPU_PEAKS = {"H100": (989 * 10**12, 3.35 * 10**12), "H200": (989 * 10**12, 4.8 * 10**12)}


def gpu_model(placement) -> str | None:
    """"H100" or "H200" from the node selector's GPU product label, else None (no roofline)."""
    product = placement.node_selector.get("nvidia.com/gpu.product", "")
    return next((name for name in GPU_PEAKS if name in product), None)


def _roofline_estimator(gpu: str):
    """PyTorch's RuntimeEstimator in its roofline mode ("operator-level-cost-model") at `gpu`'s datasheet figures.

    Upstream's roofline reads the figures of the CUDA device it runs on (`_roofline_estimate` asserts
    `torch.cuda.is_available()`; `torch.utils._runtime_estimation` asks triton for the DRAM bandwidth), so on a CPU
    the same cost model is applied here with the stated figures: per aten op, the larger of its FLOPs (torch's
    `flop_registry`) as multiply-adds over 75% of the peak (upstream's `flops_to_ns`) and the bytes it reads and
    writes (upstream's `get_num_bytes`) over the DRAM bandwidth."""
    import torch.utils._pytree as pytree
    from torch.distributed._tools.runtime_estimator import RuntimeEstimator
    from torch.utils._runtime_estimation import _FLOAT_TYPES, _IGNORE_OPS, get_num_bytes
    from torch.utils.flop_counter import flop_registry

    flops_per_second, bytes_per_second = GPU_PEAKS[gpu]

    class Roofline(RuntimeEstimator):
        @classmethod
        def _roofline_estimate(cls, func, args, kwargs):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            packet = func._overloadpacket
            if packet in _IGNORE_OPS:
                return out, 0.0
            inputs = [t for t in pytree.tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            outputs = [t for t in pytree.tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            transfer = sum(get_num_bytes(t) for t in inputs + outputs) / bytes_per_second
            dtypes = {t.dtype for t in outputs if t.dtype in _FLOAT_TYPES}
            compute = 0.0
            if packet in flop_registry and len(dtypes) == 1:
                compute = flop_registry[packet](*args, **kwargs, out_val=out) / 2 / (0.75 * flops_per_second)
            return out, max(transfer, compute) * 1e3  # milliseconds, as RuntimeEstimator sums them

        def __call__(self, estimate_mode_type: str):
            super().__call__(estimate_mode_type)
            self._estimate = Roofline._roofline_estimate  # upstream names its own class's method here
            return self

    return Roofline()("operator-level-cost-model")


def roofline_seconds(kind: str, student: dict, settings, seq_len: int, teacher: dict | None, gpu: str) -> float:
    """Seconds one GPU computes one micro-batch of a training step (its forward, the teacher's for distillation,
    the loss and the backward) by the roofline at `gpu`'s figures; one process in bf16, as FSDP computes (its
    communication is counted apart: `plan.communication_bytes`)."""
    import io

    from torch._subclasses.fake_tensor import FakeTensorMode

    from secateurs import losses

    with FakeTensorMode():
        model = model_from_config(student, torch.bfloat16).train()
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        frozen, pairs, projections = None, [], None
        if kind == "distill":
            frozen = model_from_config(teacher, torch.bfloat16).eval().requires_grad_(False)
            if settings.intermediate_loss:
                pairs = settings.layer_pairs or losses.default_layer_mapping(
                    student["num_hidden_layers"], teacher["num_hidden_layers"], None)
                projections = losses.intermediate_projections(student["hidden_size"], teacher["hidden_size"],
                                                              len(pairs))  # fmt: skip
                if projections is not None:  # None where the hidden sizes are equal
                    projections = projections.to(torch.bfloat16)
        trainer = trainer_for(kind, settings, frozen, pairs, projections)
        ids = torch.randint(0, student["vocab_size"], (settings.micro_batch_size, seq_len))
        estimator = _roofline_estimator(gpu)
        with contextlib.redirect_stdout(io.StringIO()), _watched(set(), True), estimator:  # it prints its total
            trainer.compute_loss(model, {"input_ids": ids}).backward()
    return estimator.total_runtime / 1e3


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class TracedStep:
    """One GPU step's traced peak per GPU beside the analytic plan's (`secateurs.plan.StepPlan`)."""

    analytic: object  # plan.StepPlan
    traced: Traced
    layers_traced: str  # e.g. "1, 2 of 32 (extrapolated)"
    micro_batch_seconds: float | None = None  # the roofline's compute time of one micro-batch on one GPU
    gpu: str | None = None  # the GPU the roofline assumed (`GPU_PEAKS`)

    @property
    def roofline_hours(self) -> float | None:
        """GPU-hours of the step's tokens at the roofline's compute time per micro-batch."""
        a = self.analytic
        if self.micro_batch_seconds is None or not a.micro_batch_tokens:
            return None
        return a.tokens / a.micro_batch_tokens * self.micro_batch_seconds / 3600

    @property
    def unseen(self) -> int:
        """What the trace cannot see, from the analytic plan: its runtime constants and, under ddp over several
        processes (traced as one process, without DDP), the reducer's buckets."""
        buckets = self.analytic.bytes.get("grad reduce", 0) if self.analytic.parallelism == "ddp" else 0
        return self.analytic.bytes.get("runtime", 0) + buckets

    @property
    def total(self) -> int:
        """Traced tensors plus what the trace cannot see."""
        return self.traced.peak + self.unseen

    @property
    def ratio(self) -> float:
        """Traced over analytic, both with what the trace cannot see taken out."""
        return self.traced.peak / max(1, self.analytic.total - self.unseen)

    def fits(self) -> bool:
        from secateurs.plan import HEADROOM

        return self.analytic.available is None or self.total <= HEADROOM * self.analytic.available


def trace_plan(config, extrapolate: bool = True, model_configs: dict[str, dict] | None = None,
               tasks: set[str] | None = None, roofline: bool = True) -> list[TracedStep]:  # fmt: skip
    """Trace every GPU step of `config` (a `PipelineConfig`) that `secateurs.plan.plan` plans.

    With `extrapolate`, each step is traced twice with every model's layers cut by the same factor (2L/g and 3L/g
    of each model's L layers, g their greatest common divisor; whole when g <= 3) and each category extrapolated linearly in the number
    of layers to the real count: every term (weights, gradients, optimizer state, checkpointed layer inputs,
    sharded or not) is linear in it, and the trace of a 32-layer 8B step takes minutes on 2 cores where two traces
    of 2-3 layers take seconds. Without it, the models are traced whole. `model_configs` (model name ->
    config.json values) replaces the configs made from the teacher's config.json and the students' pruning targets.
    `tasks` limits the trace to those steps. With `roofline`, each training step's micro-batch is also timed by
    the roofline (`roofline_seconds`) at the node selector's GPU, extrapolated in the same way.
    """
    from secateurs import plan

    shapes = plan.shapes_of(config)
    configs = {name: dict(plan.teacher_config(config.teacher.source), **shape.as_dict())
               for name, shape in shapes.items()}  # fmt: skip
    configs.update(model_configs or {})
    seq_len = config.data.seq_len
    students = {s.name: s for s in config.lineage_order()}
    gpu = gpu_model(config.placement) if roofline else None
    steps = []
    for analytic in plan.plan(config, shapes):
        task = analytic.task
        if tasks is not None and task not in tasks:
            continue
        search = students[task.split(":", 1)[1]].search if task.startswith("search") else None
        if task.startswith("search:") and search.latency is not None:
            continue  # its candidates are chosen by measured engine throughput: the analytic plan decides
        if task.startswith("search:"):
            # The largest candidate the search scores (`search.enumerate_candidates`), beside its parent.
            parent = students[task.split(":", 1)[1]].parent
            models = {"student": largest_candidate(configs[parent], search), "parent": configs[parent]}
            settings, kind = None, "search"
        elif task.startswith("search-distill:"):
            # Its short distillations, of a candidate no larger than the parent-bounded student shape.
            from secateurs.search import short_distill_settings

            name = task.split(":", 1)[1]
            models = {"student": configs[name], "teacher": configs["teacher"]}
            settings = short_distill_settings(students[name].distill or config.distill, search.tokens, seq_len)
            kind = "distill"
        elif task == "correct-teacher":
            models = {"student": configs["teacher"]}
            settings, kind = config.teacher_correction, "correct_teacher"
        elif task.startswith("distill:"):
            name = task.split(":", 1)[1]
            models = {"student": configs[name], "teacher": configs["teacher"]}
            settings, kind = students[name].distill or config.distill, "distill"
        else:  # importance (the teacher's depth scan), evaluate (the largest model)
            largest = max(shapes, key=lambda n: shapes[n].parameters())
            models = {"student": configs["teacher" if task == "importance" else largest]}
            settings, kind = None, "forward"
        batch = {"importance": config.importance.batch_size, "evaluate": config.evaluate.batch_size}.get(
            task, search.batch_size if search else 0)  # fmt: skip
        world = analytic.gpus * analytic.nodes

        def run(cut: dict[str, dict], kind=kind, batch=batch, settings=settings, world=world, task=task) -> Traced:
            if kind == "search":
                return trace_forward(cut["student"], batch, seq_len, beside=cut["parent"])
            if kind == "forward":
                return trace_forward(cut["student"], batch, seq_len, step=task,
                                     block_sizes=tuple(config.importance.block_sizes or ()),
                                     lm_eval_tokens=plan.LM_EVAL_CONTEXT_TOKENS)  # fmt: skip
            return trace_training(kind, cut["student"], settings, seq_len, cut.get("teacher"), world=world)

        timed = None
        if kind not in ("forward", "search") and gpu is not None and analytic.tokens:
            def timed(cut: dict[str, dict], kind=kind, settings=settings) -> float:
                return roofline_seconds(kind, cut["student"], settings, seq_len, cut.get("teacher"), gpu)

        steps.append(_traced_step(analytic, models, run, extrapolate, timed))
        steps[-1].gpu = gpu if timed else None
    return steps


def largest_candidate(parent: dict, settings) -> dict:
    """The config.json values of the largest candidate a search of `parent` scores: the first of
    `search.enumerate_candidates`, which lists them closest to the budget first."""
    from transformers import AutoConfig

    from secateurs.search import ParameterCounter, enumerate_candidates

    values = dict(parent)
    values.setdefault("model_type", "llama")
    counter = ParameterCounter(AutoConfig.for_model(**values))
    shape = enumerate_candidates(counter, settings)[0].shape
    return dict(parent, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
                num_hidden_layers=shape.num_hidden_layers)  # fmt: skip


def _traced_step(analytic, models: dict[str, dict], run, extrapolate: bool, timed=None) -> TracedStep:
    import math

    counts = {k: c["num_hidden_layers"] for k, c in models.items()}
    g = math.gcd(*counts.values())
    if not extrapolate or max(counts.values()) <= 3:
        return TracedStep(analytic, run(models), "all", timed(models) if timed else None)
    if g <= 3:  # layer counts without a common cut (a search's candidate beside its parent)
        return _traced_apart(analytic, models, run)
    # Two and three times the smallest cut: with one layer the peak can sit where a deeper model's does not (a
    # forward pass's last layer output beside the loss), so one-layer traces are not on the line.
    m1, m2 = 2, 3
    cut = [{k: dict(c, num_hidden_layers=counts[k] // g * m) for k, c in models.items()} for m in (m1, m2)]
    small, large = run(cut[0]), run(cut[1])

    def at_g(a: int, b: int) -> int:  # linear in m (the layers' multiple): the value at m = g
        return int(a + (b - a) * (g - m1) / (m2 - m1))

    phases = {}
    for name in small.phases:
        (p1, c1), (p2, c2) = small.phases[name], large.phases[name]
        categories = {k: at_g(c1.get(k, 0), c2.get(k, 0)) for k in {*c1, *c2}}
        phases[name] = (at_g(p1, p2), {k: v for k, v in categories.items() if v})
    name = max(phases, key=lambda n: phases[n][0])
    traced = Traced(*phases[name], small.attention_kernels | large.attention_kernels, small.seconds + large.seconds,
                    phases=phases, peak_phase=name)  # fmt: skip
    layers = ", ".join(f"{k}: {counts[k] // g * m1} and {counts[k] // g * m2} of {counts[k]}" for k in counts)
    seconds = None
    if timed is not None:
        t1, t2 = timed(cut[0]), timed(cut[1])
        seconds = t1 + (t2 - t1) * (g - m1) / (m2 - m1)
    return TracedStep(analytic, traced, f"{layers} (extrapolated)", seconds)


def _traced_apart(analytic, models: dict[str, dict], run) -> TracedStep:
    """Each category extrapolated linearly in each model's layer count apart: traced with every model at 2 layers,
    then with each model in turn at 3 (every term is linear in each model's layers, as `_traced_step` says)."""
    counts = {k: c["num_hidden_layers"] for k, c in models.items()}
    base = run({k: dict(c, num_hidden_layers=2) for k, c in models.items()})
    moved = {k: run({j: dict(c, num_hidden_layers=3 if j == k else 2) for j, c in models.items()}) for k in models}
    phases = {}
    for name in base.phases:
        p0, c0 = base.phases[name]
        peak = p0 + sum((moved[k].phases[name][0] - p0) * (counts[k] - 2) for k in models)
        categories = {}
        for cat in {*c0, *(c for k in models for c in moved[k].phases[name][1])}:
            v0 = c0.get(cat, 0)
            categories[cat] = int(v0 + sum((moved[k].phases[name][1].get(cat, 0) - v0) * (counts[k] - 2)
                                           for k in models))  # fmt: skip
        phases[name] = (int(peak), {k: v for k, v in categories.items() if v})
    name = max(phases, key=lambda n: phases[n][0])
    kernels = base.attention_kernels.union(*(t.attention_kernels for t in moved.values()))
    traced = Traced(*phases[name], kernels, base.seconds + sum(t.seconds for t in moved.values()), phases=phases,
                    peak_phase=name)  # fmt: skip
    layers = ", ".join(f"{k}: 2 and 3 of {counts[k]}" for k in counts)
    return TracedStep(analytic, traced, f"{layers} (extrapolated apart)")


def format_traced(steps: list[TracedStep]) -> str:
    """The traced plan as a table (GiB per GPU), what the trace cannot see, then the training steps' GPU-hours
    by the measured throughput, by the roofline at the steps' GPU, and of their communication."""
    from secateurs import plan

    gpu = next((s.gpu for s in steps if s.gpu), None)

    header = (f"{'step':<22} {'GPUs':>5} {'traced':>8} {'+unseen':>8} {'analytic':>9} {'ratio':>6} {'of':>5} "
              f"{'fits':>4}  {'peak in':<17} traced by category")  # fmt: skip
    lines = [header]
    for s in steps:
        a = s.analytic
        cats = ", ".join(f"{k} {v / GiB:.1f}" for k, v in sorted(s.traced.categories.items(), key=lambda kv: -kv[1]))
        lines.append(
            f"{a.task:<22} {f'{a.nodes}x{a.gpus}':>5} {s.traced.peak / GiB:>8.1f} {s.total / GiB:>8.1f} "
            f"{a.total / GiB:>9.1f} {s.ratio:>6.2f} {(a.available or 0) / GiB:>5.0f} {'yes' if s.fits() else 'NO':>4}"
            f"  {s.traced.peak_phase:<17} {cats}"
        )  # fmt: skip
    kernels = sorted(set().union(*(s.traced.attention_kernels for s in steps))) if steps else []
    lines += [
        (
            "traced: peak tensor bytes of one process under FakeTensorMode (MemTracker / FSDPMemTracker); "
            "+unseen adds what it cannot see from the analytic plan (CUDA context, cuBLAS workspaces, NCCL buffers; "
            "DDP's buckets); ratio = traced / analytic, both without it"
        ),
        "layers traced: " + "; ".join(f"{s.analytic.task}: {s.layers_traced}" for s in steps),
        f"attention kernels seen: {', '.join(kernels)}",
        (
            "not seen by the trace: CUDA context, NCCL buffers, kernel workspaces, allocator fragmentation (left "
            "to the 10% headroom); on CPU the KD loss runs its chunked path (a GPU with liger-kernel runs Liger's "
            "fused JSD) and its matmuls write a bf16 buffer a GPU's fp32-output matmul skips; CPU SDPA (flash for "
            "CPU) keeps what GPU flash attention keeps (docs/memory-plan.md)"
        ),
    ]
    timed = [s for s in steps if s.analytic.tokens]
    if timed:
        lines += ["", f"{'step':<22} {'tokens':>8} {'GPU-h measured':>15} {'GPU-h roofline':>15} "
                      f"{'comm GPU-h':>11} {'comm GB/s':>10}  time set by"]  # fmt: skip
        for s in timed:
            a = s.analytic
            measured = a.tokens / plan.MEASURED_TOKENS_PER_SECOND / 3600
            roof = s.roofline_hours
            comm = plan.communication_hours(a)
            compute = roof if roof is not None else measured
            lines.append(
                f"{a.task:<22} {a.tokens / 1e9:>7.2f}B {measured:>15,.0f} "
                f"{f'{roof:,.0f}' if roof is not None else '-':>15} {comm:>11,.0f} "
                f"{a.bandwidth / 1e9 if a.communication else 0:>10.0f}  {'the network' if comm > compute else 'the GPUs'}"
            )  # fmt: skip
        peaks = plan_gpu_peaks(gpu)
        lines += [
            f"GPU-h measured: at {plan.MEASURED_TOKENS_PER_SECOND:,} tokens/s per GPU (distillation on one H200, "
            "bench/results/gpu; no FSDP communication)",
            f"GPU-h roofline: PyTorch's RuntimeEstimator cost model over the step's own micro-batch at {peaks} "
            "(NVIDIA datasheet figures), compute only",
            "comm GPU-h: FSDP's all-gathers and reduce-scatters (ddp: all-reduce) at the bandwidth shown, if none "
            "overlapped compute; where it passes the compute hours, the interconnect sets the time",
        ]
    return "\n".join(lines) + "\n"


def plan_gpu_peaks(gpu: str | None) -> str:
    if gpu is None:
        return "no known GPU (placement.node_selector names none of " + ", ".join(GPU_PEAKS) + ": no roofline)"
    flops, bandwidth = GPU_PEAKS[gpu]
    return f"{gpu}: {flops / 1e12:,.0f} bf16 TFLOPS dense, {bandwidth / 1e12:.2f} TB/s"


def to_json(steps: list[TracedStep]) -> list[dict]:
    return [
        {"step": s.analytic.task, "analytic_gib": round(s.analytic.total / GiB, 2), "traced_gib": round(s.total / GiB, 2),
         "capacity_gib": round(s.analytic.available / GiB, 2) if s.analytic.available else None, "fits": s.fits()}
        for s in steps
    ]  # fmt: skip


def refusal(step: TracedStep, config) -> str:
    """One line: the traced figure, its largest category, the analytic plan's figure, and what would fit."""
    from secateurs import plan

    name, largest = step.traced.largest
    a = step.analytic
    return (f"{a.task} needs {step.total / GiB:.1f} GiB per GPU traced ({step.traced.peak / GiB:.1f} of tensors, "
            f"largest {name} {largest / GiB:.1f}, + {step.unseen / GiB:.1f} the trace cannot see; the analytic plan "
            f"{a.total / GiB:.1f}) but {plan.gpu_capacity(a, config)}; what would fit: {plan.what_would_fit(a)}")  # fmt: skip
