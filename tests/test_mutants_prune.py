"""What bench/mutation.py found no test for in prune.py: the manifest a pruned checkpoint carries, and a weight
outside the layout pruning knows."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoConfig

from secateurs import prune
from secateurs.checkpoint import load_model
from secateurs.families import Shape
from secateurs.importance import load_importance
from secateurs.manifest import MANIFEST, content_hash
from secateurs.prune import PruneTarget


def test_a_pruned_checkpoint_records_its_inputs_target_and_report(tiny_models, tiny_importance, tmp_path):
    """The manifest names both inputs with their content hashes (what lineage and the importance check read), the
    target as given, and the report prune.run returned, whose family is the stock loader's model_type."""
    model, importance = tiny_models["qwen2"], tiny_importance["qwen2"]
    target = PruneTarget(ffn_hidden_size=64, num_layers=3, depth_criterion="lm-loss")
    report = prune.run(model, importance, tmp_path / "out", target)

    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["step"] == "prune"
    assert manifest["inputs"] == {
        "model": {"uri": str(model), "sha256": content_hash(model)},
        "importance": {"uri": str(importance), "sha256": content_hash(importance)},
    }
    assert manifest["config"] == dataclasses.asdict(target)
    assert manifest["report"] == json.loads(json.dumps(report))
    assert report["family"] == AutoConfig.from_pretrained(model).model_type == "qwen2"


def test_a_parameter_outside_the_known_layout_is_refused(tiny_models, tiny_importance):
    """A checkpoint with a weight pruning does not know (outside the decoder layers too) is refused by name, not
    silently dropped from the pruned model."""
    model = load_model(tiny_models["llama-untied"])
    scores, depth, _ = load_importance(tiny_importance["llama-untied"])
    plan = prune.plan_pruning(Shape.of(model.config), scores, depth, PruneTarget(num_layers=3))
    state = dict(model.state_dict())
    assert len(prune.prune_state_dict(state, plan)) == len(state) - sum(
        1 for n in state if n.startswith(f"model.layers.{set(range(4)).difference(plan.kept_layers).pop()}."))
    state["model.vision_tower.weight"] = torch.zeros(2)
    with pytest.raises(prune.PruneError, match="^unknown parameter model.vision_tower.weight: "):
        prune.prune_state_dict(state, plan)
