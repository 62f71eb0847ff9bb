"""The search's candidate shapes: the divisor grids, exact parameter counts of pruned shapes, the budget.

Hidden and MLP widths in multiples of a channel divisor, attention as whole KV groups times query heads per group
(so GQA stays valid), layers; each axis pruned at most `max_pruning` of it (the flow: `secateurs.search`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from secateurs.config import PruneTarget, SearchConfig
from secateurs.families import LAYER_PARAMETER_AXES, MODEL_PARAMETER_AXES, Shape

# Bytes a weight takes at each `precision` of a memory budget (int4: two weights a byte, scales not counted).
BYTES_PER_PARAMETER = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int4": 0.5}


class SearchError(ValueError):
    """A budget or search setting no candidate can satisfy."""


@dataclass(frozen=True)
class Candidate:
    """One student shape and its exact parameter count."""

    shape: Shape
    parameters: int

    @property
    def name(self) -> str:
        """`h384-f1024-a6-kv3-l24`: hidden, MLP, query heads, KV groups, layers."""
        s = self.shape
        return (f"h{s.hidden_size}-f{s.intermediate_size}-a{s.num_attention_heads}-kv{s.num_key_value_heads}"
                f"-l{s.num_hidden_layers}")  # fmt: skip

    def target(self, depth_criterion: str) -> PruneTarget:
        """The `PruneTarget` that prunes to this shape."""
        s = self.shape
        return PruneTarget(
            hidden_size=s.hidden_size,
            ffn_hidden_size=s.intermediate_size,
            num_attention_heads=s.num_attention_heads,
            num_key_value_heads=s.num_key_value_heads,
            num_layers=s.num_hidden_layers,
            depth_criterion=depth_criterion,
        )


class ParameterCounter:
    """Exact parameter counts of pruned shapes of one source model, without building them.

    Counted from the source's own parameter shapes (a model built on the meta device: no weights), each dimension
    scaled along the axis pruning cuts it on (`families.LAYER_PARAMETER_AXES`), so biases and Qwen3's q/k norms
    count exactly as `families.parameter_count` counts the pruned model; tied embeddings count once.
    """

    def __init__(self, config, model_dir: str | Path | None = None, data_dir: str | Path | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        # For latency measurements: the model dir's tokenizer, and the dataset an fp8 engine calibrates on.
        self.config, self.model_dir, self.data_dir = config, model_dir, data_dir
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        # named_parameters() lists a tied lm_head once, under the embedding's name.
        params = dict(model.named_parameters())
        self.source = Shape.of(config)
        self.root = {n: tuple(p.shape) for n, p in params.items() if n in MODEL_PARAMETER_AXES}
        prefix = "model.layers.0."
        self.layer = {n[len(prefix) :]: tuple(p.shape) for n, p in params.items() if n.startswith(prefix)}
        unknown = [n for n in params if n not in self.root and not n.startswith("model.layers.")]
        unknown += [f"{prefix}{n}" for n in self.layer if n not in LAYER_PARAMETER_AXES]
        if unknown:
            raise SearchError(f"unknown parameter {unknown[0]}: this model's layout is not the one secateurs prunes")

    def loadable(self, shape: Shape) -> bool:
        """Whether transformers accepts a config of this shape: some families add rules of their own (Llama's
        config refuses a hidden size that is not a multiple of the query heads, even with an explicit head_dim)."""
        from secateurs.families import family_of
        from secateurs.prune import PrunePlan, pruned_config

        # The config prune would write (which layers survive does not change what is validated).
        plan = PrunePlan(kept_layers=list(range(shape.num_hidden_layers)), hidden=None, shape=shape)
        config = pruned_config(self.config, plan, family_of(self.config))
        try:
            from huggingface_hub.errors import StrictDataclassClassValidationError as Refused
        except ImportError:  # older hubs: configs without validation
            return True
        try:
            config.validate()
        except (Refused, ValueError):
            return False
        return True

    def __call__(self, shape: Shape) -> int:
        size = {"hidden": shape.hidden_size, "ffn": shape.intermediate_size,
                "q": shape.num_attention_heads * shape.head_dim, "kv": shape.num_key_value_heads * shape.head_dim}  # fmt: skip

        def numel(dims, axes):
            return math.prod(d if a is None else size[a] for d, a in zip(dims, axes))

        root = sum(numel(d, MODEL_PARAMETER_AXES[n]) for n, d in self.root.items())
        layer = sum(numel(d, LAYER_PARAMETER_AXES[n]) for n, d in self.layer.items())
        return root + shape.num_hidden_layers * layer


def parameter_limit(settings: SearchConfig, source: int) -> float:
    """The largest parameter count the budget allows (both budgets, when both are given); a latency budget alone
    bounds only by the source's own count `source`."""
    limits = []
    if settings.params is not None:
        limits.append(settings.params)
    if settings.memory is not None:
        limits.append(settings.memory / BYTES_PER_PARAMETER[settings.precision])
    return min(limits) if limits else source - 1


def axis_grids(source: Shape, settings: SearchConfig) -> dict[str, list[int]]:
    """The values each axis may take: divisor multiples from the most pruning allowed up to the source's size
    (the source's size itself always included), or the one fixed value. KV groups and query heads per group are
    separate axes, so any pair keeps GQA valid. Raises SearchError for contradictory fixed dimensions."""
    fixed, most = settings.fixed, settings.max_pruning
    per_group = source.num_attention_heads // source.num_key_value_heads
    sources = {"hidden_size": source.hidden_size, "ffn_hidden_size": source.intermediate_size,
               "num_key_value_heads": source.num_key_value_heads, "num_attention_heads": source.num_attention_heads,
               "num_layers": source.num_hidden_layers}  # fmt: skip
    for axis, value in fixed.model_dump(exclude_none=True).items():
        if value > sources[axis]:
            raise SearchError(f"fixed {axis}={value} is larger than the source's {sources[axis]}")
        floor = math.ceil(sources[axis] * (1 - getattr(most, axis)))
        if value < floor:
            raise SearchError(
                f"fixed {axis}={value} prunes more than max_pruning.{axis}={getattr(most, axis)} allows "
                f"(at least {floor} of {sources[axis]})"
            )
    if fixed.num_attention_heads is not None and fixed.num_key_value_heads is not None:
        heads, kv = fixed.num_attention_heads, fixed.num_key_value_heads
        if heads % kv:
            raise SearchError(f"fixed num_attention_heads={heads} is not a multiple of fixed num_key_value_heads={kv}")
        if heads // kv > per_group:
            raise SearchError(
                f"fixed num_attention_heads={heads} with num_key_value_heads={kv} needs {heads // kv} query heads "
                f"per KV group; the source has {per_group}"
            )
    if fixed.num_attention_heads is not None and fixed.num_key_value_heads is None:
        if not any(fixed.num_attention_heads % kv == 0 and fixed.num_attention_heads // kv <= per_group
                   for kv in range(1, source.num_key_value_heads + 1)):  # fmt: skip
            raise SearchError(f"fixed num_attention_heads={fixed.num_attention_heads} is no whole number of KV groups "
                              f"of at most {per_group} query heads")  # fmt: skip

    def grid(axis: str, divisor: int) -> list[int]:
        if getattr(fixed, axis) is not None:
            return [getattr(fixed, axis)]
        full = sources[axis]
        floor = max(1, math.ceil(full * (1 - getattr(most, axis))))
        return sorted({v for v in range(divisor, full + 1, divisor) if v >= floor} | {full})

    return {
        "hidden_size": grid("hidden_size", settings.hidden_divisor),
        "ffn_hidden_size": grid("ffn_hidden_size", settings.ffn_divisor),
        "num_key_value_heads": grid("num_key_value_heads", 1),
        "heads_per_group": list(range(1, per_group + 1)),
        "num_layers": grid("num_layers", settings.layer_divisor),
    }


def grid_shapes(source: Shape, settings: SearchConfig):
    """Every shape of the grid whose query-head count respects the fixed value and max_pruning."""
    grids = axis_grids(source, settings)
    heads_floor = math.ceil(source.num_attention_heads * (1 - settings.max_pruning.num_attention_heads))
    for hidden, ffn, kv, per_group, layers in itertools.product(*grids.values()):
        heads = kv * per_group
        if heads < heads_floor or settings.fixed.num_attention_heads not in (None, heads):
            continue
        yield Shape(
            hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=kv,
            head_dim=source.head_dim, num_hidden_layers=layers, vocab_size=source.vocab_size,
            tie_word_embeddings=source.tie_word_embeddings,
        )  # fmt: skip


def describe_budget(settings: SearchConfig) -> str:
    parts = []
    if settings.params is not None:
        parts.append(f"params={settings.params:g}")
    if settings.memory is not None:
        parts.append(f"memory={settings.memory:g} bytes at {settings.precision}")
    if settings.latency is not None:
        parts.append(f"latency={settings.latency:g} output tokens/s ({settings.engine_backend} "
                     f"{settings.engine_precision}, {settings.engine_lengths}, batch {settings.engine_batch})")  # fmt: skip
    return "budget " + " and ".join(parts)

