"""import-model and checkpoint checks: stock round trips, refusals with one-line reasons."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from secateurs.checkpoint import (
    CheckpointError,
    check_checkpoint_dir,
    frozen_dtype,
    import_model,
    load_frozen,
    load_model,
)
from secateurs.families import UnsupportedModelError


def test_import_from_local_dir_round_trips(tiny_models, tmp_path):
    src = tiny_models["qwen2"]
    report = import_model(str(src), tmp_path / "m")
    assert report["family"] == "qwen2"
    a = AutoModelForCausalLM.from_pretrained(src)
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(tmp_path / "m")
    # strict: a tensor missing from either side fails instead of being skipped by zip.
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["head_dim"] == 16


def test_unsupported_architecture_lists_supported(tmp_path, tokenizer_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gpt2'.*supported: llama, mistral, qwen2, qwen3"):
        import_model(str(tmp_path / "gpt2"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_and_corrupt_checkpoints(tiny_models, tmp_path):
    import shutil

    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not found"):
        import_model("./nowhere", tmp_path / "o")
    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["llama-tied"], bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt checkpoint .*truncated"):
        check_checkpoint_dir(bad)
    weights.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        load_model(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json cannot be read"):
        load_model(bad)


def test_hub_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(CheckpointError, match="hub .* is unreachable"):
        import_model("some-org/some-model", tmp_path / "o")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set"):
        import_model("some-org/some-model", tmp_path / "o")


def test_hub_offline_reads_the_environment_as_huggingface_hub_does():
    # The oracle: huggingface_hub's own reading, its constants module reloaded after each change of the environment
    # (it reads the variables once, on import), in a fresh process so that this one's modules stay as they are.
    script = """
import importlib, itertools, os
import huggingface_hub.constants as constants
from secateurs.checkpoint import hub_offline
values = ["1", "0", "yes", "no", "on", "off", "true", "False", "TRUE", ""]
for hub, transformers in itertools.product(values, ["", "1", "off"]):
    os.environ["HF_HUB_OFFLINE"], os.environ["TRANSFORMERS_OFFLINE"] = hub, transformers
    importlib.reload(constants)
    assert hub_offline() == constants.HF_HUB_OFFLINE, (hub, transformers, hub_offline())
print("agreed")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "agreed", done.stderr[-2000:]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_load_and_import_take_the_config_s_dtype_names(tiny_models, tmp_path, dtype):
    # Each name of TeacherConfig.dtype loads as the torch dtype of that name; "auto" keeps the checkpoint's own.
    assert load_model(tiny_models["llama-tied"], dtype=dtype).dtype == getattr(torch, dtype)
    import_model(str(tiny_models["llama-tied"]), tmp_path / "o", dtype=dtype)
    saved = json.loads((tmp_path / "o" / "config.json").read_text())["dtype"]
    assert saved == dtype
    assert load_model(tmp_path / "o", dtype="auto").dtype == getattr(torch, dtype)


def test_a_frozen_model_is_bf16_on_a_gpu_and_fp32_on_the_cpu(tiny_models):
    # The rule of every step that scores or teaches with a model (evaluate, importance, search, the teacher).
    assert frozen_dtype("cuda") == frozen_dtype("cuda:1") == torch.bfloat16
    assert frozen_dtype("cpu") == torch.float32
    model = load_frozen(tiny_models["qwen2"], "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not model.training
