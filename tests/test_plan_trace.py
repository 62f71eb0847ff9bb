"""The traced memory plan (`secateurs.trace`): the fake-tensor trace of a step against the same step really run on
CPU, its peak read from torch's CPU memory profiler; the flagship's configs; the one-line refusal."""

import json
from pathlib import Path

import pytest

from secateurs import trace
from secateurs.config import TeacherCorrectionConfig

DATA = Path(__file__).parent / "data"
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000, "tie_word_embeddings": False}  # fmt: skip


def measured_peak(fn) -> int:
    """Peak bytes of CPU tensors allocated while `fn` runs, from the profiler's allocation and free events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("seq_len", [128, 512])
def test_traced_training_step_matches_the_measured_one(seq_len):
    settings = TeacherCorrectionConfig(micro_batch_size=2, gradient_checkpointing=True, global_batch_size=4)
    traced = trace.trace_training("correct_teacher", TINY, settings, seq_len, bf16=False)
    real = measured_peak(lambda: trace.trace_training("correct_teacher", TINY, settings, seq_len, bf16=False,
                                                      fake=False))  # fmt: skip
    print(f"seq {seq_len}: traced {traced.peak:,} measured {real:,} ratio {traced.peak / real:.3f}")
    assert traced.peak == pytest.approx(real, rel=0.10)


@pytest.mark.parametrize("seq_len", [128, 512])
def test_traced_validation_loss_matches_the_measured_one(seq_len):
    traced = trace.trace_forward(TINY, 2, seq_len, bf16=False)
    real = measured_peak(lambda: trace.trace_forward(TINY, 2, seq_len, bf16=False, fake=False))
    print(f"seq {seq_len}: traced {traced.peak:,} measured {real:,} ratio {traced.peak / real:.3f}")
    assert traced.peak == pytest.approx(real, rel=0.10)


def flagship(edit=lambda raw: None):
    import yaml

    from secateurs.config import PipelineConfig

    raw = yaml.safe_load(Path("configs/llama31-8b-minitron.yaml").read_text())
    edit(raw)
    return PipelineConfig.model_validate(raw)


def test_flagship_configs_are_the_plans_shapes():
    from types import SimpleNamespace

    from secateurs import plan
    from secateurs.families import Shape

    shapes = plan.shapes_of(flagship())
    for name, file in [("teacher", "llama-3.1-8b"), ("width", "llama-3.1-minitron-4b-width"),
                       ("depth", "llama-3.1-minitron-4b-depth")]:  # fmt: skip
        values = json.loads((DATA / f"{file}.config.json").read_text())
        assert Shape.of(SimpleNamespace(**values)) == shapes[name]
    assert plan.KNOWN_SHAPES["meta-llama/Llama-3.1-8B"].items() <= json.loads(
        (DATA / "llama-3.1-8b.config.json").read_text()).items()


def test_a_config_the_trace_says_cannot_fit_is_refused_in_one_line():
    # One 80 GiB GPU under ddp: the 8B teacher (bf16) beside a 4.5B student's fp32 weights, gradients and AdamW state.
    def edit(raw):
        raw["placement"]["gpus"] = {"distill": 1}
        raw["teacher_correction"]["enabled"] = False
        raw["students"] = raw["students"][:1]
        raw["distill"]["parallelism"] = "ddp"

    cfg = flagship(edit)
    steps = trace.trace_plan(cfg)
    assert [s.analytic.task for s in steps] == ["distill:width"] and not steps[0].fits()
    line = trace.refusal(steps[0])
    print(line)
    assert "\n" not in line and f"{steps[0].total / trace.GiB:.1f} GiB" in line
    assert steps[0].traced.largest[0] in line


FSDP_SETTINGS = {"micro_batch_size": 2, "gradient_checkpointing": True, "global_batch_size": 8, "parallelism": "fsdp"}


def _fsdp_peaks(how: str, seq_lens: list[int]) -> None:
    """Print, as JSON, the peak of the tiny model's fsdp step over 2 processes at each length: traced under a fake
    process group (`how` = "fake") or run over gloo under torchrun and measured by the profiler (rank 0's)."""
    import torch.distributed as dist

    settings = TeacherCorrectionConfig(**FSDP_SETTINGS)
    peaks = {}
    if how == "real":
        dist.init_process_group("gloo")
    for seq_len in seq_lens:
        def run(fake, seq_len=seq_len):
            return trace.trace_training("correct_teacher", TINY, settings, seq_len, bf16=False, fake=fake, world=2)

        peaks[seq_len] = run(True).peak if how == "fake" else measured_peak(lambda: run(False))
    if how == "fake" or dist.get_rank() == 0:
        print("PEAKS " + json.dumps(peaks))
    if how == "real":
        dist.destroy_process_group()


def test_traced_fsdp_step_over_two_processes_matches_the_measured_one():
    import subprocess
    import sys

    lengths = ["128", "512"]
    runs = {
        "fake": [sys.executable, __file__, "fake", *lengths],
        "real": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 __file__, "real", *lengths],
    }  # fmt: skip
    peaks = {}
    for how, command in runs.items():
        out = subprocess.run(command, check=False, capture_output=True, text=True, timeout=240)
        line = [x for x in out.stdout.splitlines() if x.startswith("PEAKS ")]
        assert line, out.stderr[-3000:]
        peaks[how] = json.loads(line[0][len("PEAKS "):])
    for n in lengths:
        print(f"fsdp x2, seq {n}: traced {peaks['fake'][n]:,} measured {peaks['real'][n]:,} "
              f"ratio {peaks['fake'][n] / peaks['real'][n]:.3f}")  # fmt: skip
        assert peaks["fake"][n] == pytest.approx(peaks["real"][n], rel=0.10)


if __name__ == "__main__":
    import sys

    _fsdp_peaks(sys.argv[1], [int(n) for n in sys.argv[2:]])
