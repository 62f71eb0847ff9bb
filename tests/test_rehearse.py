"""`secateurs rehearse`: the scaling arithmetic (exact), its refusals, the TensorRT-LLM command check, the
rehearsal environment; the flagship's whole rehearsal is an e2e test (and `make rehearse`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from secateurs import rehearse
from secateurs.config import DataConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
FLAGSHIP = ROOT / "configs" / "llama31-8b-minitron.yaml"
LLAMA_8B = ROOT / "tests" / "data" / "llama-3.1-8b.config.json"


def scaled_flagship(tmp_path, sources=None):
    real = load_config(FLAGSHIP)
    shape = rehearse.teacher_config(real.teacher.source, LLAMA_8B)
    cfg, scaling = rehearse.scale_config(real, shape, tmp_path / "teacher", tmp_path, sources)
    return real, cfg, scaling


def test_family_default_is_the_real_config():
    """With no config.json at hand, a Llama hub id gets Llama-3.1-8B's shape: the file's every field."""
    real = json.loads(LLAMA_8B.read_text())
    default = rehearse.teacher_config("meta-llama/Llama-3.1-8B")
    assert {k: default[k] for k in default} == {k: real[k] for k in default}
    assert set(real) - set(default) <= {"bos_token_id", "eos_token_id", "torch_dtype"}


def test_unknown_family_refused_in_one_line():
    with pytest.raises(rehearse.RehearsalError, match=r"teacher.source=acme/Falcon-9B: its config.json is not at hand"):
        rehearse.teacher_config("acme/Falcon-9B")


def test_width_factor_brute_force():
    """The largest power of two dividing every width that leaves hidden >= 128 and an even head_dim, against
    every power of two tried in turn."""
    teacher = json.loads(LLAMA_8B.read_text())
    for widths in ([3072, 9216], [3072, 9200], [], [4000]):
        ok = [f for f in (2**i for i in range(13))
              if all(w % f == 0 for w in [4096, 14336, 128, *widths]) and 4096 // f >= 128 and (128 // f) % 2 == 0]
        assert rehearse.width_factor(teacher, widths) == max(ok)
    assert rehearse.width_factor(teacher, [3072, 9216]) == 32


def test_flagship_scaled_exactly(tmp_path):
    real, cfg, scaling = scaled_flagship(tmp_path)
    assert scaling.width_factor == 32
    small = rehearse.scaled_teacher_config(json.loads(LLAMA_8B.read_text()), 32, 49152)
    # Every count the targets refer to is kept; every width divided by the one factor.
    assert (small["num_hidden_layers"], small["num_attention_heads"], small["num_key_value_heads"]) == (32, 32, 8)
    assert (small["hidden_size"], small["intermediate_size"], small["head_dim"]) == (128, 448, 4)
    width = next(s for s in cfg.students if s.name == "width").prune
    real_width = next(s for s in real.students if s.name == "width").prune
    assert (width.hidden_size, width.ffn_hidden_size) == (96, 288)
    assert width.hidden_size / small["hidden_size"] == real_width.hidden_size / 4096
    assert width.ffn_hidden_size / small["intermediate_size"] == real_width.ffn_hidden_size / 14336
    assert (width.num_attention_heads, width.num_key_value_heads) == (32, 8)
    depth = next(s for s in cfg.students if s.name == "depth")
    assert depth.prune.drop_layers == "15-30" and depth.distill.intermediate_loss
    # A few steps, warm-up and schedule in proportion, accumulation kept, at 2 gloo processes.
    for t in (cfg.teacher_correction, cfg.distill, depth.distill):
        assert t.max_steps == 4 and t.warmup_steps == 1 and t.parallelism == "fsdp" and t.gradient_checkpointing
        assert t.global_batch_size == t.micro_batch_size * 2 * 2
    assert cfg.distill.save_steps == 1  # 200 of 10,000 steps: a checkpoint every step of 4 (at least one)
    assert cfg.teacher_correction.save_steps == 7  # 50 of 30: no checkpoint, as in the real run
    assert cfg.placement.processes == {"correct_teacher": 2, "distill": 2} and not cfg.placement.gpus.requested()
    # The data keeps its sources, weights, names, text fields and validation share.
    assert [(s.name, s.weight, s.text_field, s.source) for s in cfg.data.blend()] == \
        [(s.name, s.weight, s.text_field, s.source) for s in real.data.blend()]
    assert (cfg.data.seq_len, cfg.data.val_fraction) == (128, real.data.val_fraction)
    assert cfg.data.max_tokens == 5 * rehearse.SEQUENCES_PER_SOURCE * 128
    assert cfg.engine.backend == "tensorrt-llm" and cfg.engine.precision == "fp8"
    assert cfg.evaluate.tasks == real.evaluate.tasks
    # Tracking and storage come home.
    assert cfg.tracking.uri is None and cfg.tracking.pipeline_root is None
    assert cfg.placement.cache_volume.mount_path == str(tmp_path / "volume")


def test_demo_configs_rehearsed_as_they_are(tmp_path):
    for path in sorted((ROOT / "configs").glob("demo-*.yaml")):
        real = load_config(path)
        cfg, scaling = rehearse.scale_config(real, {}, tmp_path / "teacher", tmp_path)
        assert cfg.model_dump() == real.model_dump() and scaling.changes == {}


def test_blend_settings_read_back_as_the_components_read_them():
    """A component parses its settings from the full JSON dump: the flagship's blend must read back (it did not:
    prepare-data failed with `give either sources or ...` in every pipeline run of a blend)."""
    data = load_config(FLAGSHIP).data
    assert DataConfig.model_validate_json(data.model_dump_json()) == data


def test_trtllm_bench_command_checked_by_its_option_definitions(tmp_path):
    from secateurs.engine import TensorRTLLM

    cmd = TensorRTLLM.bench_command(tmp_path, "secateurs/e", tmp_path / "w", tmp_path / "d.jsonl", tmp_path / "r.json",
                                    32, 128, 32, 256)  # fmt: skip
    params = rehearse.check_trtllm_bench_command(cmd)
    assert (params["concurrency"], params["max_batch_size"], params["num_requests"], params["max_seq_len"]) == (32, 32, 128, 256)
    assert (params["backend"], params["eos_id"]) == ("pytorch", -1)
    with pytest.raises(rehearse.RehearsalError, match="No such option '--bogus'"):
        rehearse.check_trtllm_bench_command(cmd + ["--bogus", "1"])
    bad = [*cmd]
    bad[bad.index("--concurrency") + 1] = "many"
    with pytest.raises(rehearse.RehearsalError, match="'many' is not a valid integer"):
        rehearse.check_trtllm_bench_command(bad)
    bad = [*cmd]
    bad[bad.index("--backend") + 1] = "vllm"
    with pytest.raises(rehearse.RehearsalError, match="'vllm' is not one of"):
        rehearse.check_trtllm_bench_command(bad)


def test_environment_points_home_and_is_restored(tmp_path):
    """Inside: caches, credentials and S3 in the directory, a real S3 server on 127.0.0.1 holding the buckets;
    after: the environment as it was and the server gone."""
    before = dict(os.environ)
    with rehearse.rehearsal_environment(tmp_path, {"secateurs"}) as env:
        from secateurs import storage

        endpoint = env["AWS_ENDPOINT_URL"]
        assert endpoint.startswith("http://127.0.0.1:")
        (tmp_path / "x").mkdir()
        (tmp_path / "x" / "a.txt").write_text("hello")
        storage.upload(tmp_path / "x", "s3://secateurs/data/x/")
        assert set(storage.list_objects("s3://secateurs/data/x/")) == {"a.txt"}
        assert os.environ["SECATEURS_CACHE"] == str(tmp_path / "cache") and os.environ["HF_HUB_OFFLINE"] == "1"
    assert dict(os.environ) == before
    host, port = endpoint.removeprefix("http://").split(":")
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2).close()
