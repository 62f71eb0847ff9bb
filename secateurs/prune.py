"""Structured pruning (recipe step 3): cut a model to a homogeneous target shape.

Consumes a checkpoint and an importance artifact of that same checkpoint; produces a stock Hugging Face checkpoint
of the target shape (every layer the same width, since serving engines need that) with `head_dim`,
`num_key_value_heads`, `intermediate_size`, `hidden_size` and `num_hidden_layers` written explicitly.

Guarantees: kept units stay in their original order, so a target equal to the source shape reproduces the source
exactly; depth pruning copies surviving layers bit for bit; tied embeddings stay tied; the output is reloaded with
`AutoModelForCausalLM.from_pretrained` and checked before it replaces anything.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from secateurs.checkpoint import check_checkpoint_dir, load_model, load_tokenizer
from secateurs.config import (  # noqa: F401 (re-exported)
    DEPTH_CRITERIA,
    DepthCriterion,
    PruneTarget,
    kv_grouping_problem,
    parse_layer_list,
)
from secateurs.families import (
    LAYER_PARAMETER_AXES,
    MODEL_PARAMETER_AXES,
    Shape,
    family_of,
    parameter_count,
    set_explicit_shape,
)
from secateurs.files import atomic_output
from secateurs.importance import load_importance
from secateurs.manifest import content_hash, write_manifest


class PruneError(ValueError):
    """A pruning target that cannot be applied to this model."""


@dataclass
class PrunePlan:
    """Indices to keep (sorted, original numbering); a pure function of shape, scores and target."""

    kept_layers: list[int]
    hidden: torch.Tensor
    ffn: dict[int, torch.Tensor] = field(default_factory=dict)
    heads: dict[int, torch.Tensor] = field(default_factory=dict)
    kv_groups: dict[int, torch.Tensor] = field(default_factory=dict)
    shape: Shape | None = None


def run(model_dir: str | Path, importance_dir: str | Path, out: str | Path, target: PruneTarget) -> dict:
    """Prune MODEL to TARGET using IMPORTANCE; write the checkpoint to OUT and return a report."""
    config = check_checkpoint_dir(model_dir)
    family = family_of(config)
    source = Shape.of(config)
    scores, depth, manifest = load_importance(importance_dir)
    check_importance_matches(manifest, model_dir, source)
    plan = plan_pruning(source, scores, depth, target)  # every target error is raised here, before loading weights

    model = load_model(model_dir, dtype="auto")
    before = parameter_count(model)
    new_config = pruned_config(model.config, plan, family)
    state = prune_state_dict(model.state_dict(), plan)
    del model
    with atomic_output(out) as tmp:
        pruned = build_model(new_config, state)
        from secateurs.checkpoint import save_checkpoint

        save_checkpoint(pruned, load_tokenizer(model_dir), tmp)
        after = parameter_count(pruned)
        check_saved(tmp, plan.shape, after)
        report = {
            "family": family.model_type,
            "parameters_before": before,
            "parameters_after": after,
            "parameter_ratio": after / before,
            "source_shape": source.as_dict(),
            "shape": plan.shape.as_dict(),
            "kept_layers": plan.kept_layers,
            "dropped_layers": [i for i in range(source.num_hidden_layers) if i not in plan.kept_layers],
        }
        write_manifest(
            tmp,
            "prune",
            inputs={"model": model_dir, "importance": importance_dir},
            config={k: v for k, v in target.__dict__.items()},
            report=report,
        )
    return report


def check_importance_matches(manifest: dict, model_dir: str | Path, shape: Shape) -> None:
    """Refuse an importance artifact computed on another model."""
    if manifest.get("shape") != shape.as_dict():
        raise PruneError(
            f"importance artifact was computed on a model of shape {manifest.get('shape')}, "
            f"not on {model_dir} (shape {shape.as_dict()})"
        )
    recorded = manifest.get("inputs", {}).get("model", {}).get("sha256")
    if recorded and recorded != content_hash(model_dir):
        raise PruneError(f"importance artifact was computed on another model than {model_dir} (weights differ)")


def plan_pruning(shape: Shape, scores: dict[str, torch.Tensor], depth: dict, target: PruneTarget) -> PrunePlan:
    """Choose the units to keep. Raises PruneError naming the offending value for any impossible target."""
    hidden = _check_size("hidden_size", target.hidden_size, shape.hidden_size)
    ffn = _check_size("ffn_hidden_size", target.ffn_hidden_size, shape.intermediate_size)
    kv = _check_size("num_key_value_heads", target.num_key_value_heads, shape.num_key_value_heads)
    per_group = shape.num_attention_heads // shape.num_key_value_heads
    if target.num_attention_heads is None:
        heads = kv * per_group
    else:
        heads = _check_size("num_attention_heads", target.num_attention_heads, shape.num_attention_heads)
        problem = kv_grouping_problem(heads, kv, per_group)
        if problem:
            raise PruneError(f"num_attention_heads={heads} {problem}")
    kept_layers = choose_layers(shape.num_hidden_layers, depth, target)

    plan = PrunePlan(kept_layers=kept_layers, hidden=top_k_sorted(scores["hidden"], hidden))
    for i in kept_layers:
        plan.ffn[i] = top_k_sorted(scores[f"layers.{i}.mlp"], ffn)
        groups = top_k_sorted(scores[f"layers.{i}.kv_groups"], kv)
        head_scores = scores[f"layers.{i}.heads"].view(shape.num_key_value_heads, per_group)
        # Rank heads inside each kept KV group and keep the same number in each, so every query head still
        # reads the key/value head it was trained with (query head h uses KV head h // heads_per_group).
        plan.heads[i] = torch.cat([g * per_group + top_k_sorted(head_scores[g], heads // kv) for g in groups.tolist()])
        plan.kv_groups[i] = groups
    plan.shape = Shape(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=shape.head_dim,
        num_hidden_layers=len(kept_layers),
        vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tie_word_embeddings,
    )
    return plan


def choose_layers(n_layers: int, depth: dict, target: PruneTarget) -> list[int]:
    """The decoder layers that survive, by explicit list or by a depth criterion."""
    if target.drop_layers is not None and target.num_layers is not None:
        raise PruneError("give either num_layers (with a depth criterion) or drop_layers, not both")
    if target.drop_layers is not None:
        drop = sorted(set(target.drop_layers))
        bad = [i for i in drop if not 0 <= i < n_layers]
        if bad:
            raise PruneError(f"drop_layers: layer {bad[0]} is out of range (the model has layers 0..{n_layers - 1})")
    else:
        keep_n = _check_size("num_layers", target.num_layers, n_layers)
        k = n_layers - keep_n
        if k == 0:
            drop = []
        elif target.depth_criterion == "block-influence":
            drop = _lowest(depth["block_influence"], k)
        elif target.depth_criterion == "lm-loss":
            drop = _lowest(depth["single_layer_loss_increase"], k)
        elif target.depth_criterion == "lm-loss-contiguous":
            blocks = depth["contiguous_block_loss_increase"]
            if str(k) not in blocks:
                raise PruneError(
                    f"depth_criterion=lm-loss-contiguous needs block size k={k} in the importance artifact "
                    f"(it has k={', '.join(blocks) or 'none'}); rerun importance with --block-sizes {k}"
                )
            start = min(range(len(blocks[str(k)])), key=blocks[str(k)].__getitem__)
            drop = list(range(start, start + k))
        else:
            raise PruneError(f"depth_criterion={target.depth_criterion!r} is not one of {', '.join(DEPTH_CRITERIA)}")
    if len(drop) >= n_layers:
        raise PruneError(f"cannot drop all {n_layers} layers")
    return [i for i in range(n_layers) if i not in set(drop)]


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in ascending index order (ties broken by lower index)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return order.sort().values


def pruned_config(config, plan: PrunePlan, family):
    new = copy.deepcopy(config)
    s = plan.shape
    new.hidden_size, new.intermediate_size = s.hidden_size, s.intermediate_size
    new.num_attention_heads, new.num_key_value_heads = s.num_attention_heads, s.num_key_value_heads
    new.head_dim, new.num_hidden_layers = s.head_dim, s.num_hidden_layers
    for name in family.per_layer_config_fields:
        values = getattr(new, name, None)
        if values is not None:
            setattr(new, name, [values[i] for i in plan.kept_layers])
    for name in family.layer_count_fields:
        if getattr(new, name, None) is not None:
            setattr(new, name, min(getattr(new, name), s.num_hidden_layers))
    set_explicit_shape(new)
    return new


def prune_state_dict(state: dict[str, torch.Tensor], plan: PrunePlan) -> dict[str, torch.Tensor]:
    """Slice every weight along its pruned axes; renumber the surviving layers 0..N-1."""
    head_dim = plan.shape.head_dim

    def rows(units: torch.Tensor) -> torch.Tensor:
        # Head h owns rows [h*head_dim, (h+1)*head_dim) of q_proj (and of k/v_proj for KV heads).
        return (units[:, None] * head_dim + torch.arange(head_dim)).flatten()

    def cut(tensor: torch.Tensor, axes: tuple, index: dict) -> torch.Tensor:
        for dim, axis in enumerate(axes):
            if axis is not None:
                tensor = tensor.index_select(dim, index[axis])
        return tensor.clone()

    out = {}
    for name, axes in MODEL_PARAMETER_AXES.items():
        if name in state:
            out[name] = cut(state[name], axes, {"hidden": plan.hidden})
    for new_i, old_i in enumerate(plan.kept_layers):
        index = {"hidden": plan.hidden, "ffn": plan.ffn[old_i], "q": rows(plan.heads[old_i]), "kv": rows(plan.kv_groups[old_i])}
        prefix = f"model.layers.{old_i}."
        for name in [n for n in state if n.startswith(prefix)]:
            local = name[len(prefix) :]
            if local not in LAYER_PARAMETER_AXES:
                raise PruneError(f"unknown parameter {name}: this checkpoint's layout is not the one secateurs prunes")
            out[f"model.layers.{new_i}.{local}"] = cut(state[name], LAYER_PARAMETER_AXES[local], index)
    known = set(MODEL_PARAMETER_AXES) | {n for n in state if n.startswith("model.layers.")}
    unknown = sorted(set(state) - known)
    if unknown:
        raise PruneError(f"unknown parameter {unknown[0]}: this checkpoint's layout is not the one secateurs prunes")
    return out


def build_model(config, state: dict[str, torch.Tensor]):
    """A model of the pruned config holding exactly `state` (no random init: parameters made empty, then assigned)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    # Parameters on the meta device, buffers (the rotary frequencies, not in a state dict) made as usual.
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=next(iter(state.values())).dtype)
    model.load_state_dict(state, assign=True, strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def check_saved(path: Path, shape: Shape, parameters: int) -> None:
    """Reload the written checkpoint with the stock loader and assert it is what was planned."""
    reloaded = load_model(path, dtype="auto")
    assert Shape.of(reloaded.config) == shape, (Shape.of(reloaded.config), shape)
    assert parameter_count(reloaded) == parameters
    if shape.tie_word_embeddings:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def _check_size(name: str, value: int | None, source: int) -> int:
    if value is None:
        return source
    if value > source:
        raise PruneError(f"{name}={value} is larger than the source's {source}")
    if value < 1:
        raise PruneError(f"{name}={value} must be at least 1")
    return value


def _lowest(values: list[float], k: int) -> list[int]:
    return sorted(sorted(range(len(values)), key=values.__getitem__)[:k])
