"""What bench/mutation.py found no test for in importance.py: which dataset a refusal names, the manifest, and
reading an importance artifact back."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from secateurs import importance
from secateurs.config import ImportanceConfig
from secateurs.data import DataError
from secateurs.manifest import MANIFEST, content_hash, read_manifest


def test_a_dataset_of_another_tokenizer_is_named_in_the_refusal(tiny_models, tiny_data, tmp_path):
    other = tmp_path / "data"
    shutil.copytree(tiny_data, other)
    manifest = read_manifest(other)
    manifest["config"]["tokenizer"] = "0123456789abcdef"
    (other / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"^dataset {other} was tokenized with tokenizer 0123456789abcdef, "):
        importance.run(tiny_models["llama-tied"], other, tmp_path / "imp", ImportanceConfig(samples=2))


def test_load_importance_reads_back_what_run_wrote_and_refuses_anything_else(tiny_importance, tmp_path):
    path = tiny_importance["qwen3"]
    scores, depth, manifest = importance.load_importance(str(path))  # a str, as the CLI passes it
    # Read independently: the safetensors file, the depth JSON and the manifest as written.
    expected = load_file(str(path / importance.SCORES_FILE))
    assert scores.keys() == expected.keys() and all(torch.equal(scores[k], expected[k]) for k in expected)
    assert depth == json.loads((path / importance.DEPTH_FILE).read_text())
    assert manifest == json.loads((path / MANIFEST).read_text()) and manifest["step"] == "importance"

    not_scores = tmp_path / "model"
    shutil.copytree(path, not_scores)
    (not_scores / importance.SCORES_FILE).unlink()
    for bad in (not_scores, tmp_path):
        with pytest.raises(importance.ImportanceError,
                           match=f"^{bad} is not an importance artifact made by `secateurs importance`$"):
            importance.load_importance(bad)


def test_an_importance_artifact_records_its_inputs_and_settings(tiny_models, tiny_data, tmp_path):
    """prune.check_importance_matches reads inputs.model.sha256 to refuse scores of another model: the manifest
    names both inputs under those keys with their content hashes, and the settings as run."""

    model = tiny_models["mistral"]
    settings = ImportanceConfig(samples=4, batch_size=4, block_sizes=[1, 2], depth_samples=2)
    importance.run(model, tiny_data, tmp_path / "imp", settings)
    manifest = read_manifest(tmp_path / "imp")
    assert manifest["inputs"] == {
        "model": {"uri": str(model), "sha256": content_hash(model)},
        "data": {"uri": str(tiny_data), "sha256": content_hash(tiny_data)},
    }
    assert manifest["config"] == {**settings.model_dump(), "block_sizes": [1, 2]}
    assert (manifest["step"], manifest["family"]) == ("importance", "mistral")
