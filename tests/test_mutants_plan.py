"""The plan's table columns worked by hand, the search's short distillations planned, and the hub asked for the
teacher's config.json: each kills mutants of `secateurs.plan` that survived `bench/mutation.py` (docs/mutation.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secateurs import plan
from secateurs.config import DistillConfig, PipelineConfig, load_config

FLAGSHIP = Path(__file__).resolve().parents[1] / "configs" / "llama31-8b-minitron.yaml"


def _row(table: str, step: str) -> dict[str, str]:
    """The cells of STEP's row in `format_plan`'s table, by column name."""
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("┃ step"))
    names = [c.strip() for c in header.strip("┃").split("┃")]
    row = next(line for line in lines if line.startswith(f"│ {step} "))
    return dict(zip(names, (c.strip() for c in row.strip("│").split("│")), strict=True))


def test_the_hours_columns_of_the_flagship_s_distillation_worked_by_hand():
    """distill:width of the flagship: 10,000 steps of 1,152 sequences of 8,192 tokens on 1 node of 8 GPUs. At
    10,000 tokens/s per GPU: 94,371,840,000 / 10,000 / 3,600 = 2,621.44 GPU-hours, 327.68 hours on its 8 GPUs; its
    communication per micro-batch of 8,192 tokens at 450 GB/s, over the 11,520,000 micro-batches of the run."""
    plans = {s.task: s for s in plan.plan(load_config(FLAGSHIP))}
    step = plans["distill:width"]
    row = _row(plan.format_plan(list(plans.values()), 10_000.0), "distill:width")
    assert step.tokens == 10_000 * 1_152 * 8_192 == 94_371_840_000
    assert (row["GPUs"], row["tokens"], row["GPU-hours"], row["hours"]) == ("1x8", "94.37B", "2,621", "327.7")
    comm_gpu_hours = step.communication * (94_371_840_000 / 8_192) / 450e9 / 3600
    assert (
        row["comm GB/mb"] == f"{step.communication / 1e9:.1f}"
        and row["comm GPU-h"] == f"{comm_gpu_hours:,.0f}"
    )
    assert row["comm GPU-h"] == "215"
    assert _row(plan.format_plan(list(plans.values()), 10_000.0), "importance")["hours"] == "-"


def test_a_search_s_short_distillations_are_planned():
    """top_k candidates each distilled for search.tokens rounded up to whole steps: ceil(1e8 / (64 x 4096)) = 382
    steps of 262,144 tokens, three times."""
    raw = {
        "teacher": {"source": "meta-llama/Llama-3.1-8B"},
        "data": {"seq_len": 4096},
        "distill": {"global_batch_size": 64, "micro_batch_size": 1},
        "students": [{"name": "auto-4b", "search": {"params": 4.5e9, "tokens": 1e8, "top_k": 3}}],
        "placement": {"gpus": {"importance": 1, "distill": 8}, "gpu_memory": "80Gi"},
    }  # fmt: skip
    steps = {s.task: s for s in plan.plan(PipelineConfig.model_validate(raw))}
    assert steps["search-distill:auto-4b"].tokens == 3 * 382 * 64 * 4096 == 300_417_024
    assert steps["distill:auto-4b"].tokens == DistillConfig().max_steps * 64 * 4096  # the winner's full run


def test_the_hub_is_asked_for_the_teacher_s_config_json(tmp_path, monkeypatch):
    """A teacher neither local nor of a published shape: its repository's config.json, through huggingface_hub
    (replaced here by a function answering as `hf_hub_download` does, with the path of the file in its cache)."""
    import huggingface_hub

    asked = []
    config = {"model_type": "llama", "hidden_size": 64}

    def hf_hub_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        path = tmp_path / repo_id / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    assert plan.teacher_config("acme/Tiny-1B") == config
    assert asked == [("acme/Tiny-1B", "config.json")]

    def offline(repo_id, filename, **kwargs):
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(plan.ShapeUnknown, match=r"^teacher.source=acme/Tiny-1B: its config.json is neither local nor "
                                                r"reachable \(OfflineModeIsEnabled\); the plan needs the teacher's shape$"):  # fmt: skip
        plan.teacher_config("acme/Tiny-1B")
