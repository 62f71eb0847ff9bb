"""Architecture adapters: what differs between the model families secateurs prunes.

Llama 3.x, Mistral, Qwen2 and Qwen3 share one decoder layout in transformers (`model.embed_tokens`,
`model.layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj}`,
`model.norm`, `lm_head`), so the surgery in `prune.py` and the hooks in `importance.py` are written once against it.
Each family is one small adapter naming its deltas, read like transformers' modular files (`Qwen2MLP(LlamaMLP)`
plus a comment on the one difference).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Family:
    """One supported model family and its differences from Llama."""

    model_type: str
    architecture: str
    # Per-layer lists in the config that must follow the kept layers when depth is pruned.
    per_layer_config_fields: tuple[str, ...] = ()
    # Config fields that count layers and must be clamped to the new depth.
    layer_count_fields: tuple[str, ...] = ()
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


LLAMA = Family("llama", "LlamaForCausalLM", notes="GQA; tied or untied embeddings; optional attention/MLP bias")
# Mistral: Llama's layout; differs only by an optional sliding window, which pruning leaves alone.
MISTRAL = Family("mistral", "MistralForCausalLM", notes="Llama layout with optional sliding-window attention")
# Qwen2: biases on q/k/v (o_proj has none); a per-layer attention type list and a sliding-window layer count.
QWEN2 = Family(
    "qwen2",
    "Qwen2ForCausalLM",
    per_layer_config_fields=("layer_types",),
    layer_count_fields=("max_window_layers",),
    notes="q/k/v biases",
)
# Qwen3: RMSNorm on each query and key head (`q_norm`/`k_norm`, shape [head_dim]); they are shared by all heads
# and untouched by head or hidden pruning because head_dim never changes.
QWEN3 = Family(
    "qwen3",
    "Qwen3ForCausalLM",
    per_layer_config_fields=("layer_types",),
    layer_count_fields=("max_window_layers",),
    notes="q/k norms",
)

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3)}
SUPPORTED = ", ".join(sorted(FAMILIES))


class UnsupportedModelError(ValueError):
    """A model family secateurs does not prune."""


def family_of(config) -> Family:
    """The adapter for a transformers config, or a one-line error listing the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r} ({', '.join(getattr(config, 'architectures', None) or [])}); "
            f"supported: {SUPPORTED}"
        )
    return FAMILIES[model_type]


@dataclass(frozen=True)
class Shape:
    """The prunable dimensions of a model, as written in its config."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    vocab_size: int
    tie_word_embeddings: bool

    @classmethod
    def of(cls, config) -> "Shape":
        heads = config.num_attention_heads
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            num_hidden_layers=config.num_hidden_layers,
            vocab_size=config.vocab_size,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    # Parameter counts of the Llama-family layout (no q/k/v bias, no q/k norms), for the memory plan, which works
    # from shapes before any weight exists; tests check them against `parameter_count` of real models.
    def layer_parameters(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attention = h * self.num_attention_heads * d * 2 + h * self.num_key_value_heads * d * 2  # q, o; k, v
        return attention + 3 * h * self.intermediate_size + 2 * h  # gate, up, down; two norms

    def root_parameters(self) -> int:
        """Embeddings, LM head (unless tied) and the final norm."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def parameters(self) -> int:
        return self.root_parameters() + self.num_hidden_layers * self.layer_parameters()


def decoder_layers(model) -> "torch.nn.ModuleList":  # noqa: F821 (no torch import: the memory plan reads Shape)
    return model.model.layers


def compile_decoder_layers(*models, backend: str = "inductor") -> None:
    """torch.compile every decoder layer of `models`, in place: state-dict keys and checkpoints stay those of the
    plain model, and layers of one shape share one compiled graph."""
    for model in models:
        for layer in decoder_layers(model):
            layer.compile(backend=backend)


def set_explicit_shape(config) -> None:
    """Write every pruned dimension explicitly: hidden pruning makes head_dim != hidden/heads, and loaders that
    derive head_dim from hidden_size would silently build the wrong attention."""
    shape = Shape.of(config)
    config.head_dim = shape.head_dim
    config.num_key_value_heads = shape.num_key_value_heads
    config.intermediate_size = shape.intermediate_size
    config.hidden_size = shape.hidden_size
    config.num_hidden_layers = shape.num_hidden_layers


def parameter_count(model: Any) -> int:
    """Unique parameters (tied embeddings counted once) of a loaded model, or of a checkpoint directory from its
    safetensors headers, without reading a weight (transformers saves a tied weight once)."""
    if not isinstance(model, (str, os.PathLike)):
        return model.num_parameters()  # `named_parameters()` yields a tied weight once
    from safetensors import safe_open

    shapes = []
    for file in sorted(Path(model).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as st:
            shapes += [st.get_slice(key).get_shape() for key in st.keys()]  # noqa: SIM118 (not iterable)
    return sum(math.prod(shape) for shape in shapes)


# Which pruned axis each weight dimension follows, for the layout all four families share. `None` is an axis
# pruning never touches (vocabulary, head_dim of Qwen3's q_norm/k_norm). Axes: `hidden` (embedding channels),
# `q` (query-head rows, head by head), `kv` (key/value-head rows, group by group), `ffn` (MLP neurons).
LAYER_PARAMETER_AXES: dict[str, tuple[str | None, ...]] = {
    "input_layernorm.weight": ("hidden",),
    "post_attention_layernorm.weight": ("hidden",),
    "self_attn.q_proj.weight": ("q", "hidden"),
    "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("kv", "hidden"),
    "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.weight": ("kv", "hidden"),
    "self_attn.v_proj.bias": ("kv",),
    "self_attn.o_proj.weight": ("hidden", "q"),
    "self_attn.o_proj.bias": ("hidden",),
    "self_attn.q_norm.weight": (None,),
    "self_attn.k_norm.weight": (None,),
    "mlp.gate_proj.weight": ("ffn", "hidden"),
    "mlp.gate_proj.bias": ("ffn",),
    "mlp.up_proj.weight": ("ffn", "hidden"),
    "mlp.up_proj.bias": ("ffn",),
    "mlp.down_proj.weight": ("hidden", "ffn"),
    "mlp.down_proj.bias": ("hidden",),
}
MODEL_PARAMETER_AXES: dict[str, tuple[str | None, ...]] = {
    "model.embed_tokens.weight": (None, "hidden"),
    "model.norm.weight": ("hidden",),
    "lm_head.weight": (None, "hidden"),
}
