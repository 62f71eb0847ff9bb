"""Every example config under configs/ validates."""

from pathlib import Path

import pytest

from secateurs.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_configs_exist():
    assert CONFIGS, "no YAML configs found under configs/"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path):
    config = load_config(path)
    assert config.students and [s.name for s in config.lineage_order()]


def test_flagship_states_the_paper_s_token_budget():
    """Llama-3.1-Minitron-4B distilled each student on 94B tokens (arXiv 2408.11796): the flagship's steps x
    global batch x seq_len come within 10% of it, for every student, and evaluation is bounded."""
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "llama31-8b-minitron.yaml")
    for student in config.students:
        distill = student.distill or config.distill
        tokens = distill.max_steps * distill.global_batch_size * config.data.seq_len
        assert abs(tokens / 94e9 - 1) <= 0.10, (student.name, tokens)
    assert config.evaluate.max_sequences is not None
    # Trained outputs in the run's dtype (bf16 on GPUs), not fp32: 16 GB for the corrected teacher, not 32.
    assert config.teacher_correction.save_dtype == "bfloat16"
    assert {(s.distill or config.distill).save_dtype for s in config.students} == {"bfloat16"}
