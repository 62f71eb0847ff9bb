"""Pruning on tiny random models of every family: exactness, stock-loader round trips, GQA correctness, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from secateurs import prune
from secateurs.checkpoint import load_model
from secateurs.families import Shape, family_of, parameter_count
from secateurs.prune import PruneError, PruneTarget, parse_layer_list

from conftest import FAMILY_CASES

INPUT = torch.tensor([[1, 400, 2500, 17, 9000, 42, 7, 3000, 12, 99, 5, 1234]])


def logits(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(INPUT).logits


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_keep_all_is_lossless(case, tiny_models, tiny_importance, tmp_path):
    src = tiny_models[case]
    shape = Shape.of(load_model(src).config)
    target = PruneTarget(
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        num_layers=shape.num_hidden_layers,
    )
    prune.run(src, tiny_importance[case], tmp_path / "out", target)
    torch.testing.assert_close(logits(tmp_path / "out"), logits(src), rtol=0, atol=1e-5)
    prune.run(src, tiny_importance[case], tmp_path / "nodrop", PruneTarget(drop_layers=[]))
    torch.testing.assert_close(logits(tmp_path / "nodrop"), logits(src), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_width_and_depth_prune_loads_with_stock_loader(case, tiny_models, tiny_importance, tmp_path):
    src = tiny_models[case]
    target = PruneTarget(hidden_size=48, ffn_hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_layers=3)
    report = prune.run(src, tiny_importance[case], tmp_path / "out", target)

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    for key, value in dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                           num_hidden_layers=3, head_dim=16).items():
        assert config[key] == value, key
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert parameter_count(model) == report["parameters_after"] < report["parameters_before"]
    if config["tie_word_embeddings"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    out = model.generate(INPUT[:, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)
    assert torch.isfinite(logits(tmp_path / "out")).all()


@pytest.mark.parametrize("case", ["llama-untied", "qwen2", "qwen3"])
def test_depth_prune_keeps_surviving_layers_bit_identical(case, tiny_models, tiny_importance, tmp_path):
    src = tiny_models[case]
    report = prune.run(src, tiny_importance[case], tmp_path / "out", PruneTarget(drop_layers=[0, 2]))
    assert report["kept_layers"] == [1, 3]
    before = load_model(src).state_dict()
    after = load_model(tmp_path / "out").state_dict()
    assert len(after) == len(before) - 2 * sum(1 for k in before if k.startswith("model.layers.0."))
    for new_i, old_i in enumerate([1, 3]):
        for key, value in before.items():
            if key.startswith(f"model.layers.{old_i}."):
                assert torch.equal(after[key.replace(f"layers.{old_i}.", f"layers.{new_i}.")], value), key
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    if "layer_types" in json.loads((tmp_path / "out" / "config.json").read_text()):
        assert len(json.loads((tmp_path / "out" / "config.json").read_text())["layer_types"]) == 2


def _prune_in_memory(model, scores, target):
    shape = Shape.of(model.config)
    plan = prune.plan_pruning(shape, scores, {}, target)
    config = prune.pruned_config(model.config, plan, family_of(model.config))
    return plan, prune.build_model(config, prune.prune_state_dict(model.state_dict(), plan))


def _silence_heads(model, heads, head_dim):
    with torch.no_grad():
        for layer in model.model.layers:
            for h in heads:
                layer.self_attn.o_proj.weight[:, h * head_dim : (h + 1) * head_dim] = 0


@pytest.mark.parametrize("case", ["llama-untied", "qwen2", "qwen3"])
def test_removing_silent_units_is_exact(case, tiny_models):
    """Units whose output weights are zero contribute nothing, so pruning exactly them must leave the logits
    unchanged. This checks the row/column bookkeeping of q/k/v/o and gate/up/down, and that each query head keeps
    its own KV head under GQA (query head h reads KV head h // heads_per_group)."""
    model = load_model(tiny_models[case])
    shape = Shape.of(model.config)  # 8 query heads in 2 KV groups of 4
    silent_heads = [1, 3, 6, 7]  # two in each group
    silent_neurons = list(range(0, shape.intermediate_size, 3))
    _silence_heads(model, silent_heads, shape.head_dim)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, silent_neurons] = 0
    with torch.no_grad():
        reference = model(INPUT).logits

    scores = {"hidden": torch.ones(shape.hidden_size)}
    for i in range(shape.num_hidden_layers):
        heads = torch.ones(shape.num_attention_heads)
        heads[silent_heads] = 0
        mlp = torch.ones(shape.intermediate_size)
        mlp[silent_neurons] = 0
        scores |= {f"layers.{i}.heads": heads, f"layers.{i}.mlp": mlp, f"layers.{i}.kv_groups": torch.tensor([0.0, 1.0])}
    target = PruneTarget(ffn_hidden_size=shape.intermediate_size - len(silent_neurons), num_attention_heads=4)
    plan, pruned = _prune_in_memory(model, scores, target)
    assert plan.heads[0].tolist() == [0, 2, 4, 5] and plan.kv_groups[0].tolist() == [0, 1]
    with torch.no_grad():
        torch.testing.assert_close(pruned(INPUT).logits, reference, rtol=0, atol=1e-5)

    # Silence all of group 0 and prune that whole KV group away.
    _silence_heads(model, range(4), shape.head_dim)
    with torch.no_grad():
        reference = model(INPUT).logits
    plan, pruned = _prune_in_memory(model, scores, PruneTarget(num_key_value_heads=1))
    assert plan.kv_groups[0].tolist() == [1] and plan.heads[0].tolist() == [4, 5, 6, 7]
    with torch.no_grad():
        torch.testing.assert_close(pruned(INPUT).logits, reference, rtol=0, atol=1e-5)


def test_depth_criteria_choose_documented_layers(tiny_importance):
    depth = {
        "block_influence": [0.9, 0.1, 0.2, 0.8],
        "single_layer_loss_increase": [0.5, 0.4, 0.01, 0.02],
        "contiguous_block_loss_increase": {"2": [3.0, 0.5, 1.0]},
    }
    choose = prune.choose_layers
    assert choose(4, depth, PruneTarget(num_layers=2, depth_criterion="block-influence")) == [0, 3]
    assert choose(4, depth, PruneTarget(num_layers=2, depth_criterion="lm-loss")) == [0, 1]
    assert choose(4, depth, PruneTarget(num_layers=2, depth_criterion="lm-loss-contiguous")) == [0, 3]
    assert choose(4, depth, PruneTarget(drop_layers=parse_layer_list("1-2"))) == [0, 3]
    with pytest.raises(PruneError, match="block size k=3"):
        choose(4, depth, PruneTarget(num_layers=1, depth_criterion="lm-loss-contiguous"))


def test_parse_layer_list():
    assert parse_layer_list("15-30,7") == [7] + list(range(15, 31))
    assert parse_layer_list("3") == [3]
    for bad in ("a-b", "5-2", ","):
        with pytest.raises(ValueError, match="drop_layers"):
            parse_layer_list(bad)


@pytest.mark.parametrize(
    "target, message",
    [
        (PruneTarget(hidden_size=65), "hidden_size=65 is larger than the source's 64"),
        (PruneTarget(ffn_hidden_size=1000), "ffn_hidden_size=1000 is larger than the source's 96"),
        (PruneTarget(num_attention_heads=5), "num_attention_heads=5 is not a multiple of the 2 KV groups"),
        (PruneTarget(num_attention_heads=6, num_key_value_heads=1), "needs 6 heads per KV group; the source has 4"),
        (PruneTarget(num_key_value_heads=3), "num_key_value_heads=3 is larger than the source's 2"),
        (PruneTarget(drop_layers=[0, 1, 2, 3]), "cannot drop all 4 layers"),
        (PruneTarget(drop_layers=[4]), "layer 4 is out of range"),
        (PruneTarget(num_layers=9), "num_layers=9 is larger than the source's 4"),
    ],
)
def test_bad_targets_fail_before_work_and_keep_outputs(target, message, tiny_models, tiny_importance, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("existing result")
    with pytest.raises(PruneError, match=message):
        prune.run(tiny_models["llama-tied"], tiny_importance["llama-tied"], out, target)
    assert (out / "keep.txt").read_text() == "existing result"


def test_importance_from_another_model_is_refused(tiny_models, tiny_importance, tmp_path):
    with pytest.raises(PruneError, match="importance artifact was computed on another model"):
        prune.run(tiny_models["llama-untied"], tiny_importance["mistral"], tmp_path / "o", PruneTarget(hidden_size=32))
    with pytest.raises(PruneError, match="importance artifact was computed on a model of shape"):
        prune.run(tiny_models["llama-tied"], tiny_importance["llama-untied"], tmp_path / "o", PruneTarget(hidden_size=32))
