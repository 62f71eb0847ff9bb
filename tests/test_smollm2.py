"""The real SmolLM2-135M: import from its GGUF, prune to about half in width and in depth, and check that the
pruned models are real language models (finite validation loss on python-docs, far below a random-initialised
model of the same shape)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from secateurs import importance, prune
from secateurs.checkpoint import load_model
from secateurs.config import DataConfig, ImportanceConfig
from secateurs.data import load_packed, prepare_data
from secateurs.evaluate import validation_loss
from secateurs.prune import PruneTarget

WIDTH = PruneTarget(hidden_size=384, ffn_hidden_size=1024, num_attention_heads=6)
DEPTH = PruneTarget(num_layers=12, depth_criterion="lm-loss-contiguous")


@pytest.fixture(scope="session")
def smollm2_data(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol-data") / "python-docs"
    prepare_data(smollm2_dir, out, DataConfig(source="python-docs", seq_len=128, max_tokens=128 * 200, val_fraction=0.1))
    return out


@pytest.fixture(scope="session")
def smollm2_importance(smollm2_dir, smollm2_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol-imp") / "importance"
    importance.run(smollm2_dir, smollm2_data, out, ImportanceConfig(samples=16, batch_size=8, block_sizes=[18], depth_samples=4))
    return out


@pytest.fixture(scope="session")
def smollm2_students(smollm2_dir, smollm2_importance, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol-students")
    return {
        name: (prune.run(smollm2_dir, smollm2_importance, root / name, target), root / name)
        for name, target in (("width", WIDTH), ("depth", DEPTH))
    }


def test_import_is_a_stock_checkpoint_that_answers(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["head_dim"] == 64
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


@pytest.mark.e2e  # SmolLM2 pruned and scored twice (about 90 s on 2 cores): make test-e2e
@pytest.mark.parametrize("name", ["width", "depth"])
def test_half_size_students_are_language_models(name, smollm2_students, smollm2_data):
    report, path = smollm2_students[name]
    assert 0.45 < report["parameter_ratio"] < 0.56, report["parameter_ratio"]
    dd, _ = load_packed(smollm2_data)
    val = dd["validation"].head(8)
    pruned = load_model(path)
    loss = validation_loss(pruned, val)
    torch.manual_seed(0)
    random_init = AutoModelForCausalLM.from_config(pruned.config).eval()
    random_loss = validation_loss(random_init, val)
    print(f"{name}: {report['parameters_after']:,} parameters, validation loss {loss:.3f} (random init {random_loss:.3f})")
    assert math.isfinite(loss) and loss < random_loss - 1.0
    if name == "depth":
        assert report["kept_layers"] == sorted(report["kept_layers"]) and len(report["kept_layers"]) == 12
        dropped = report["dropped_layers"]
        assert dropped == list(range(dropped[0], dropped[0] + 18))  # one contiguous block


@pytest.fixture(scope="session")
def smollm2_wide_data(smollm2_dir, tmp_path_factory):
    """2,000 python-docs sequences, half held out. One python-docs document is one module's documentation (~4,300
    tokens on average), so the 200-sequence set holds out a single module; this one holds out about 30."""
    out = tmp_path_factory.mktemp("smol-wide-data") / "python-docs"
    prepare_data(smollm2_dir, out, DataConfig(source="python-docs", seq_len=128, max_tokens=128 * 2000, val_fraction=0.5))
    return out


@pytest.mark.e2e  # about 5 minutes on 2 cores: make test-e2e
def test_pruned_students_beat_random_init_and_kd_keeps_up_with_ce(smollm2_dir, smollm2_wide_data, tmp_path):
    """The recipe in its order on SmolLM2-135M: teacher correction, importance on the corrected teacher, width
    pruning to half, then the same 20 steps three ways: KD from the pruned weights, cross-entropy from the pruned
    weights (at its own best LR), KD from a random init of the same shape. Validation cross-entropy on 64 held-out
    sequences spread over the ~30 held-out modules. `bench/kd_vs_ce.py` runs this setting for seeds 0-2 and other
    LRs (README)."""
    from secateurs import train
    from secateurs.chain import prune_student, random_init
    from secateurs.config import DistillConfig, TeacherCorrectionConfig

    data = smollm2_wide_data
    correction = TeacherCorrectionConfig(max_steps=40, micro_batch_size=4, global_batch_size=4, learning_rate=5e-4,
                                         min_learning_rate=5e-5, warmup_steps=2, save_steps=40, logging_steps=10)
    scoring = ImportanceConfig(samples=16, batch_size=8, block_sizes=[18], depth_samples=1)
    chain = prune_student(smollm2_dir, data, tmp_path, WIDTH, scoring, correction, name="width")
    teacher, width = chain.teacher, chain.student
    random_dir = random_init(width, tmp_path / "random-init", seed=0)

    val = load_packed(data)[0]["validation"].spread(64)
    common = {"max_steps": 20, "micro_batch_size": 4, "global_batch_size": 4, "learning_rate": 5e-4,
              "min_learning_rate": 5e-5, "warmup_steps": 2, "save_steps": 100, "logging_steps": 10}
    # Each loss at its own LR: cross-entropy at 2.5e-4, its best of 1.25e-4 / 2.5e-4 / 5e-4 / 1e-3 over seeds 0-2
    # (bench/kd_vs_ce.py, README), so that KD is compared with the strongest cross-entropy baseline.
    ce = dict(common, learning_rate=2.5e-4, min_learning_rate=2.5e-5, ce_alpha=1.0)
    runs = {"kd": (width, DistillConfig(**common)), "ce": (width, DistillConfig(**ce)),
            "random-init kd": (random_dir, DistillConfig(**common))}
    result = {"teacher": validation_loss(load_model(smollm2_dir), val),
              "corrected teacher": validation_loss(load_model(teacher), val)}
    for name, (student, settings) in runs.items():
        train.distill(teacher, student, data, tmp_path / name, settings)
        result[name] = validation_loss(load_model(tmp_path / name), val)
        shutil.rmtree(f"{tmp_path / name}.checkpoints")
    print("validation loss after 20 steps: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    assert result["corrected teacher"] < result["teacher"] - 0.5
    # Pruned weights beat random ones by over 4 nats either way (measured, seeds 0-2): a 2-nat margin.
    assert max(result["kd"], result["ce"]) < result["random-init kd"] - 2.0
    # KD against CE is a claim about the mean over seeds, not about one: the paired difference KD - CE measured
    # -0.083, -0.058, -0.228 for seeds 0-2 (sd 0.09, as large as its mean -0.12), so a single seed's ordering is
    # nearly a coin, and the corpus a Python patch version renders changes it. `python bench/kd_vs_ce_paired.py`
    # holds the ordering over 3 seeds (mean + 2 standard errors < 0). Here only what one seed shows robustly: KD is
    # not clearly worse than CE (no seed measured it above CE; 0.1 leaves 0.16 to the closest, 1.7 sd).
    assert result["kd"] < result["ce"] + 0.1
