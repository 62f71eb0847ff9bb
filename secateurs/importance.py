"""Importance estimation (recipe step 2): which structure the student can lose.

Consumes a model checkpoint and a prepared dataset; produces an importance artifact: `importance.safetensors`
(per-layer score tensors) and `depth.json` (per-layer and per-block depth scores). Forward passes only, one shot.
One artifact serves any number of pruning targets: it ranks everything, `prune.py` chooses how much to keep.

Activation statistic (Minitron, arXiv 2407.14679): for a hooked activation X_n[s, c] of calibration sample n,
`a_n[c] = mean_s |X_n[s, c]|` and `I[c] = sqrt(sum_n a_n[c]^2)`, accumulated in fp32.
- MLP neurons: the input of `down_proj` (after SwiGLU), shape [intermediate_size].
- Attention heads: the input of `o_proj` as [heads, head_dim] channels; a head's score is the L2 norm of its
  channels' scores. KV groups: the summed score of their query heads.
- Hidden channels: the outputs of every `input_layernorm`, `post_attention_layernorm` and the final norm, summed.
- Depth: Block Influence `1 - mean cos(h_in, h_out)` per layer over all calibration tokens; the validation LM-loss
  increase when each single layer is removed, and when each contiguous block of k layers is removed.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from secateurs.checkpoint import load_frozen, load_tokenizer
from secateurs.config import ImportanceConfig
from secateurs.data import check_matches, load_packed
from secateurs.evaluate import validation_loss
from secateurs.families import Shape, decoder_layers, family_of
from secateurs.files import atomic_output
from secateurs.manifest import read_manifest, write_manifest

SCORES_FILE = "importance.safetensors"
DEPTH_FILE = "depth.json"


class ImportanceError(ValueError):
    """An importance artifact that cannot be used."""


def run(
    model_dir: str | Path,
    data_dir: str | Path,
    out: str | Path,
    settings: ImportanceConfig | None = None,
    device: str | None = None,
) -> dict:
    """Score every prunable unit of MODEL on DATA and write the importance artifact to OUT.

    Args:
        settings: calibration samples, batch size, depth-scan block sizes (default: half the layers, as the
            published depth student drops 16 of 32) and depth-scan samples; `ImportanceConfig` says each.
        device: torch device; default cuda when available.
    """
    settings = settings or ImportanceConfig()
    samples, batch_size, depth_samples = settings.samples, settings.batch_size, settings.depth_samples
    model = load_frozen(model_dir, device)
    dd, data_config = load_packed(data_dir)
    check_matches(data_config, load_tokenizer(model_dir), where=f"dataset {data_dir}")
    n_layers = model.config.num_hidden_layers
    block_sizes = sorted(set(settings.block_sizes or [max(1, n_layers // 2)]))
    for k in block_sizes:
        if not 1 <= k < n_layers:
            raise ImportanceError(f"block size k={k} must be between 1 and {n_layers - 1} (the model has {n_layers} layers)")

    calibration = dd["train"].head(samples)
    validation = dd["validation"].spread(depth_samples)
    scores, block_influence = collect_activation_scores(model, calibration, batch_size)
    depth = lm_loss_depth_scan(model, validation, batch_size, block_sizes)
    depth["block_influence"] = block_influence

    shape = Shape.of(model.config)
    report = {
        "calibration_sequences": len(calibration),
        "calibration_tokens": int(calibration.numel()),
        "validation_sequences": len(validation),
        "base_validation_loss": depth["base_loss"],
        "block_sizes": block_sizes,
    }
    with atomic_output(out) as tmp:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in scores.items()}, str(tmp / SCORES_FILE))
        (tmp / DEPTH_FILE).write_text(json.dumps(depth, indent=2))
        write_manifest(
            tmp,
            "importance",
            inputs={"model": model_dir, "data": data_dir},
            config={**settings.model_dump(), "block_sizes": block_sizes},
            report=report,
            shape=shape.as_dict(),
            family=family_of(model.config).model_type,
        )
    return report


def channel_score_terms(x: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel `mean_s |X[s, c]|` in fp32.

    Args:
        x: [batch, seq, channels] activations.
    Returns:
        [batch, channels] fp32.
    """
    return torch.mean(x.abs(), dim=1, dtype=torch.float32)


@contextmanager
def _hooks(model):
    """Register the statistic hooks; yields the accumulators (sums of squared per-sample terms)."""
    layers = decoder_layers(model)
    acc: dict[str, torch.Tensor] = {}
    cos = {"sum": torch.zeros(len(layers), dtype=torch.float64), "count": 0}
    handles = []

    def add(name):
        def hook(x):
            t = channel_score_terms(x)
            acc[name] = acc[name] + t.square().sum(0) if name in acc else t.square().sum(0)

        return hook

    def on_input(fn):
        return lambda module, args: fn(args[0])

    def on_output(fn):
        return lambda module, args, output: fn(output[0] if isinstance(output, tuple) else output)

    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_input(add(f"layers.{i}.mlp"))))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_input(add(f"layers.{i}.attn"))))
        handles.append(layer.input_layernorm.register_forward_hook(on_output(add(f"layers.{i}.input_norm"))))
        handles.append(layer.post_attention_layernorm.register_forward_hook(on_output(add(f"layers.{i}.post_attention_norm"))))

        # Block Influence needs the layer's input and output hidden states together.
        def bi_pre(module, args, kwargs, i=i):
            module._secateurs_h_in = args[0] if args else kwargs["hidden_states"]

        def bi_post(module, args, kwargs, output, i=i):
            h_out = output[0] if isinstance(output, tuple) else output
            c = F.cosine_similarity(module._secateurs_h_in.float(), h_out.float(), dim=-1)
            cos["sum"][i] += c.sum().item()
            if i == 0:
                cos["count"] += c.numel()
            del module._secateurs_h_in

        handles.append(layer.register_forward_pre_hook(bi_pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(bi_post, with_kwargs=True))
    handles.append(model.model.norm.register_forward_hook(on_output(add("final_norm"))))
    try:
        yield acc, cos
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def collect_activation_scores(model, input_ids: torch.Tensor, batch_size: int = 8):
    """One hooked pass over the calibration sequences.

    Args:
        input_ids: [samples, seq_len] token ids.
    Returns:
        (scores, block_influence): scores maps `layers.{i}.mlp` [intermediate], `layers.{i}.heads` [heads],
        `layers.{i}.kv_groups` [kv_heads], `hidden` [hidden] to fp32 tensors; block_influence is a list of
        `1 - mean cos(h_in, h_out)` per layer.
    """
    if len(input_ids) == 0:
        raise ImportanceError("no calibration sequences")
    shape = Shape.of(model.config)
    device = next(model.parameters()).device
    with _hooks(model) as (acc, cos):
        for start in tqdm(range(0, len(input_ids), batch_size), desc="importance", unit="batch"):
            model.model(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
    scores = {}
    hidden = torch.zeros(shape.hidden_size, dtype=torch.float32, device=device)
    for i in range(shape.num_hidden_layers):
        scores[f"layers.{i}.mlp"] = acc[f"layers.{i}.mlp"].sqrt()
        attn = acc[f"layers.{i}.attn"].sqrt().view(shape.num_attention_heads, shape.head_dim)
        heads = attn.norm(dim=1)
        scores[f"layers.{i}.heads"] = heads
        scores[f"layers.{i}.kv_groups"] = heads.view(shape.num_key_value_heads, -1).sum(1)
        hidden += acc[f"layers.{i}.input_norm"].sqrt() + acc[f"layers.{i}.post_attention_norm"].sqrt()
    scores["hidden"] = hidden + acc["final_norm"].sqrt()
    block_influence = (1 - cos["sum"] / cos["count"]).tolist()
    return {k: v.cpu() for k, v in scores.items()}, block_influence


@contextmanager
def without_layers(model, drop: set[int]):
    """Temporarily run the model with some decoder layers skipped (the residual stream passes them by)."""
    layers = decoder_layers(model)
    kept = torch.nn.ModuleList([layer for i, layer in enumerate(layers) if i not in drop])
    model.model.layers = kept
    try:
        yield model
    finally:
        model.model.layers = layers


def lm_loss_depth_scan(model, input_ids: torch.Tensor, batch_size: int, block_sizes: list[int]) -> dict:
    """Validation LM loss of the full model, and its increase with each single layer / contiguous block removed."""
    n = model.config.num_hidden_layers
    base = validation_loss(model, input_ids, batch_size)
    progress = tqdm(total=n + sum(n - k + 1 for k in block_sizes), desc="depth scan", unit="pass")

    def increase_without(start: int, k: int) -> float:
        with without_layers(model, set(range(start, start + k))):
            loss = validation_loss(model, input_ids, batch_size)
        progress.update()
        return loss - base

    single = [increase_without(i, 1) for i in range(n)]
    contiguous = {str(k): [increase_without(s, k) for s in range(n - k + 1)] for k in block_sizes}
    progress.close()
    return {"base_loss": base, "single_layer_loss_increase": single, "contiguous_block_loss_increase": contiguous}


def load_importance(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(scores, depth scores, manifest) of an importance artifact."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("step") != "importance" or not (path / SCORES_FILE).is_file():
        raise ImportanceError(f"{path} is not an importance artifact made by `secateurs importance`")
    return load_file(str(path / SCORES_FILE)), json.loads((path / DEPTH_FILE).read_text()), manifest
