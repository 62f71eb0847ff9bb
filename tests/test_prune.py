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


# --- Which units pruning keeps, against a brute-force oracle ---------------------------------------------------
# Scores are written directly (a seeded permutation per axis, so every ranking is known and tie-free), and the
# oracle enumerates every admissible subset and keeps the one with the highest total score. It shares nothing
# with prune.py (no sort, no top-k): a plan that kept the least important units, or returned them in score order
# instead of original order, or ranked heads across KV groups, disagrees with it.


def _best_subset(scores: list[float], k: int) -> list[int]:
    """The k indices with the highest total score, by enumeration; ties go to the lexicographically smallest set
    (the lower indices), as prune.top_k_sorted documents."""
    from itertools import combinations

    return list(max(combinations(range(len(scores)), k), key=lambda s: (sum(scores[i] for i in s), [-i for i in s])))


def _beaten_fewer_than_k(scores: list[float], k: int) -> list[int]:
    """The same set by counting, for axes too wide to enumerate (C(64, 40) subsets): unit i is kept when fewer
    than k units beat it (a higher score, or an equal one at a lower index). O(n^2) comparisons, no sorting."""
    n = len(scores)
    return [i for i in range(n) if sum(scores[j] > scores[i] or (scores[j] == scores[i] and j < i) for j in range(n)) < k]


def _best_heads(head_scores: list[float], group_scores: list[float], per_group: int, kv: int, heads: int):
    """(kept KV groups, kept query heads): the best `kv` groups by their own score, then in each kept group the
    best `heads // kv` of its own heads (query head h belongs to group h // per_group), by enumeration."""
    from itertools import combinations, product

    groups = _best_subset(group_scores, kv)
    choices = [list(combinations(range(g * per_group, (g + 1) * per_group), heads // kv)) for g in groups]
    best = max(product(*choices), key=lambda c: (sum(head_scores[h] for s in c for h in s), [-h for s in c for h in s]))
    return groups, [h for s in best for h in s]


def _permuted_scores(shape: Shape, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Tie-free scores: a random permutation of 1..n for each axis and layer, and random distinct depth scores."""
    g = torch.Generator().manual_seed(seed)

    def perm(n):
        return (torch.randperm(n, generator=g) + 1).float()

    n = shape.num_hidden_layers
    scores = {"hidden": perm(shape.hidden_size)}
    for i in range(n):
        scores |= {
            f"layers.{i}.mlp": perm(shape.intermediate_size),
            f"layers.{i}.heads": perm(shape.num_attention_heads),
            f"layers.{i}.kv_groups": perm(shape.num_key_value_heads),
        }
    depth = {
        "base_loss": 5.0,
        "block_influence": perm(n).div(n + 1).tolist(),
        "single_layer_loss_increase": perm(n).tolist(),
        "contiguous_block_loss_increase": {str(k): perm(n - k + 1).tolist() for k in (1, 2, 3)},
    }
    return scores, depth


SMALL = Shape(hidden_size=9, intermediate_size=10, num_attention_heads=8, num_key_value_heads=4, head_dim=2,
              num_hidden_layers=6, vocab_size=11, tie_word_embeddings=False)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(
    "target",
    [
        PruneTarget(hidden_size=5),
        PruneTarget(ffn_hidden_size=4),
        PruneTarget(num_attention_heads=4),  # heads inside all 4 KV groups: 1 of 2 per group
        PruneTarget(num_key_value_heads=2),  # whole KV groups, all their heads
        PruneTarget(num_key_value_heads=3, num_attention_heads=3),  # both at once
        PruneTarget(hidden_size=7, ffn_hidden_size=6, num_key_value_heads=2, num_attention_heads=2, num_layers=4),
    ],
    ids=["hidden", "ffn", "heads-in-groups", "kv-groups", "groups-and-heads", "all"],
)
def test_plan_keeps_the_best_units_in_original_order(target, seed):
    scores, depth = _permuted_scores(SMALL, seed)
    plan = prune.plan_pruning(SMALL, scores, depth, target)
    kv = target.num_key_value_heads or SMALL.num_key_value_heads
    heads = target.num_attention_heads or kv * SMALL.num_attention_heads // SMALL.num_key_value_heads
    per_group = SMALL.num_attention_heads // SMALL.num_key_value_heads

    hidden = target.hidden_size or SMALL.hidden_size
    assert plan.hidden.tolist() == _best_subset(scores["hidden"].tolist(), hidden)
    assert _beaten_fewer_than_k(scores["hidden"].tolist(), hidden) == _best_subset(scores["hidden"].tolist(), hidden)
    assert sorted(plan.ffn) == plan.kept_layers
    for i in plan.kept_layers:
        ffn = target.ffn_hidden_size or SMALL.intermediate_size
        assert plan.ffn[i].tolist() == _best_subset(scores[f"layers.{i}.mlp"].tolist(), ffn), i
        groups, kept_heads = _best_heads(
            scores[f"layers.{i}.heads"].tolist(), scores[f"layers.{i}.kv_groups"].tolist(), per_group, kv, heads
        )
        assert plan.kv_groups[i].tolist() == groups, i
        assert plan.heads[i].tolist() == kept_heads, i
        # Every kept query head still reads a kept KV head, and the i-th kept KV group serves the i-th block of
        # heads // kv kept query heads (the GQA layout of the pruned model).
        assert [h // per_group for h in kept_heads] == [g for g in groups for _ in range(heads // kv)]
    assert plan.shape.num_attention_heads == heads and plan.shape.num_key_value_heads == kv


def _best_layers(n: int, keep: int, criterion: str, depth: dict) -> list[int]:
    """The layers a depth criterion keeps, by enumerating every set of layers to drop."""
    from itertools import combinations

    if criterion == "lm-loss-contiguous":
        blocks = depth["contiguous_block_loss_increase"][str(n - keep)]
        candidates = [set(range(s, s + n - keep)) for s in range(n - (n - keep) + 1)]
        drop = min(candidates, key=lambda d: blocks[min(d)])  # the block whose removal costs the least loss
    else:
        key = {"block-influence": "block_influence", "lm-loss": "single_layer_loss_increase"}[criterion]
        drop = min((set(c) for c in combinations(range(n), n - keep)), key=lambda d: sum(depth[key][i] for i in d))
    return [i for i in range(n) if i not in drop]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("keep", [3, 4, 5])
@pytest.mark.parametrize("criterion", ["block-influence", "lm-loss", "lm-loss-contiguous"])
def test_depth_criteria_drop_the_least_important_layers(criterion, keep, seed):
    scores, depth = _permuted_scores(SMALL, seed)
    plan = prune.plan_pruning(SMALL, scores, depth, PruneTarget(num_layers=keep, depth_criterion=criterion))
    assert plan.kept_layers == _best_layers(SMALL.num_hidden_layers, keep, criterion, depth)
    assert plan.shape.num_hidden_layers == keep


def test_plan_breaks_ties_toward_lower_indices():
    """Equal scores keep the lower index, so a plan is reproducible whatever the sort implementation."""
    shape = Shape(hidden_size=6, intermediate_size=6, num_attention_heads=4, num_key_value_heads=2, head_dim=2,
                  num_hidden_layers=3, vocab_size=11, tie_word_embeddings=False)
    tied = torch.tensor([1.0, 2.0, 2.0, 0.5, 2.0, 2.0])
    scores = {"hidden": tied}
    for i in range(3):
        scores |= {f"layers.{i}.mlp": tied, f"layers.{i}.heads": torch.ones(4), f"layers.{i}.kv_groups": torch.ones(2)}
    depth = {"block_influence": [0.3, 0.1, 0.1], "single_layer_loss_increase": [0.2, 0.2, 0.2]}
    plan = prune.plan_pruning(shape, scores, depth, PruneTarget(hidden_size=3, ffn_hidden_size=2,
                                                                num_key_value_heads=1, num_attention_heads=1))
    assert plan.hidden.tolist() == _best_subset(tied.tolist(), 3) == [1, 2, 4]
    assert plan.ffn[0].tolist() == _best_subset(tied.tolist(), 2) == _beaten_fewer_than_k(tied.tolist(), 2) == [1, 2]
    assert plan.kv_groups[0].tolist() == [0] and plan.heads[0].tolist() == [0]
    assert prune.choose_layers(3, depth, PruneTarget(num_layers=2)) == [0, 2]  # layers 1 and 2 tie; drop 1
    assert prune.choose_layers(3, depth, PruneTarget(num_layers=2, depth_criterion="lm-loss")) == [1, 2]


def _write_importance(template, out, scores, depth):
    """An importance artifact for the model `template` was computed on, holding these scores instead."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(template, out)
    save_file({k: v.contiguous() for k, v in scores.items()}, str(out / "importance.safetensors"))
    (out / "depth.json").write_text(json.dumps(depth))
    return out


# qwen2: tied embeddings, q/k/v biases; qwen3: untied LM head, q/k norms. The depth criteria differ only in
# choose_layers, checked for each above, so two runs cover the surgery.
@pytest.mark.parametrize("case, criterion", [("qwen2", "block-influence"), ("qwen3", "lm-loss-contiguous")])
def test_pruned_weights_are_the_oracles_rows_and_columns(case, criterion, tiny_models, tiny_importance, tmp_path):
    """End to end through `prune.run`: every saved tensor is the source tensor sliced, in original order, at the
    oracle's hidden channels, FFN neurons, query heads and KV heads of the oracle's layers. The slicing is written
    out per tensor here, independently of families.LAYER_PARAMETER_AXES."""
    src = tiny_models[case]
    before = load_model(src).state_dict()
    shape = Shape.of(load_model(src).config)  # hidden 64, ffn 96, 8 heads in 2 KV groups of 4, head_dim 16, 4 layers
    scores, depth = _permuted_scores(shape, seed=7)
    importance = _write_importance(tiny_importance[case], tmp_path / "importance", scores, depth)
    # hidden 48: Llama's config validator wants hidden_size divisible by the 3 heads kept.
    target = PruneTarget(hidden_size=48, ffn_hidden_size=50, num_key_value_heads=1, num_attention_heads=3,
                         num_layers=2, depth_criterion=criterion)
    report = prune.run(src, importance, tmp_path / "out", target)
    after = load_model(tmp_path / "out").state_dict()

    layers = _best_layers(4, 2, criterion, depth)
    assert report["kept_layers"] == layers
    hidden = torch.tensor(_beaten_fewer_than_k(scores["hidden"].tolist(), 48))
    d = shape.head_dim
    for new_i, old_i in enumerate(layers):
        ffn = torch.tensor(_beaten_fewer_than_k(scores[f"layers.{old_i}.mlp"].tolist(), 50))
        groups, heads = _best_heads(scores[f"layers.{old_i}.heads"].tolist(),
                                    scores[f"layers.{old_i}.kv_groups"].tolist(), 4, 1, 3)
        q = torch.tensor([h * d + j for h in heads for j in range(d)])
        kv = torch.tensor([g * d + j for g in groups for j in range(d)])
        old, new = f"model.layers.{old_i}.", f"model.layers.{new_i}."
        expected = {
            "input_layernorm.weight": before[old + "input_layernorm.weight"][hidden],
            "post_attention_layernorm.weight": before[old + "post_attention_layernorm.weight"][hidden],
            "self_attn.q_proj.weight": before[old + "self_attn.q_proj.weight"][q][:, hidden],
            "self_attn.k_proj.weight": before[old + "self_attn.k_proj.weight"][kv][:, hidden],
            "self_attn.v_proj.weight": before[old + "self_attn.v_proj.weight"][kv][:, hidden],
            "self_attn.o_proj.weight": before[old + "self_attn.o_proj.weight"][hidden][:, q],
            "mlp.gate_proj.weight": before[old + "mlp.gate_proj.weight"][ffn][:, hidden],
            "mlp.up_proj.weight": before[old + "mlp.up_proj.weight"][ffn][:, hidden],
            "mlp.down_proj.weight": before[old + "mlp.down_proj.weight"][hidden][:, ffn],
        }
        for bias, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            if old + f"self_attn.{bias}.bias" in before:  # qwen2
                expected[f"self_attn.{bias}.bias"] = before[old + f"self_attn.{bias}.bias"][rows]
        for norm in ("q_norm", "k_norm"):  # qwen3: per head_dim, shared by all heads, never pruned
            if old + f"self_attn.{norm}.weight" in before:
                expected[f"self_attn.{norm}.weight"] = before[old + f"self_attn.{norm}.weight"]
        assert sorted(k[len(new):] for k in after if k.startswith(new)) == sorted(expected)
        for name, value in expected.items():
            assert torch.equal(after[new + name], value), (case, old_i, name)
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"][:, hidden])
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"][hidden])
    if "lm_head.weight" in before and not load_model(src).config.tie_word_embeddings:
        assert torch.equal(after["lm_head.weight"], before["lm_head.weight"][:, hidden])
    assert not any(k.startswith("model.layers.2.") for k in after)
