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


def test_a_config_the_trace_says_cannot_fit_is_refused_in_one_line(tmp_path, capsys):
    # One 80 GiB GPU under ddp: the 8B teacher (bf16) beside a 4.5B student's fp32 weights, gradients and AdamW state.
    import typer
    import yaml

    from secateurs import plan
    from secateurs.pipeline_cli import compile_cmd

    def edit(raw):
        raw["placement"]["gpus"] = {"distill": 1}
        raw["teacher_correction"]["enabled"] = False
        raw["students"] = raw["students"][:1]
        raw["distill"]["parallelism"] = "ddp"

    raw = yaml.safe_load(Path("configs/llama31-8b-minitron.yaml").read_text())
    edit(raw)
    path = tmp_path / "one-gpu.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(typer.Exit):
        compile_cmd(path, tmp_path / "p.yaml", None)
    line = capsys.readouterr().err.strip()
    print(line)
    [step] = trace.trace_plan(flagship(edit))  # what the refusal traced
    assert step.analytic.task == "distill:width" and not step.fits()
    name, largest = step.traced.largest
    assert line.startswith(f"error: distill:width needs {step.total / trace.GiB:.1f} GiB per GPU traced "
                           f"({step.traced.peak / trace.GiB:.1f} of tensors, largest {name} {largest / trace.GiB:.1f}")  # fmt: skip
    assert name == "Optstate" and f"the analytic plan {step.analytic.total / trace.GiB:.1f})" in line
    assert "\n" not in line and not (tmp_path / "p.yaml").exists()
    # One process: no DDP buckets, no NCCL; the trace sees all but the runtime.
    assert step.unseen == step.analytic.bytes["runtime"] == plan.runtime_bytes(1)


# ------------------------------------------------------------------------- the flagship, traced and analytic
@pytest.fixture(scope="module")
def flagship_trace():
    """Every GPU step of the flagship traced once (its models from the config.json files in tests/data)."""
    models = {name: json.loads((DATA / f"{file}.config.json").read_text())
              for name, file in [("teacher", "llama-3.1-8b"), ("width", "llama-3.1-minitron-4b-width"),
                                 ("depth", "llama-3.1-minitron-4b-depth")]}  # fmt: skip
    return trace.trace_plan(flagship(), model_configs=models)


def test_the_flagship_traced_and_analytic_agree_within_10_percent_per_step(flagship_trace):
    from secateurs import plan

    print(plan.format_plan([s.analytic for s in flagship_trace]))
    print(trace.format_traced(flagship_trace))
    assert [s.analytic.task for s in flagship_trace] == [
        "correct-teacher", "importance", "distill:width", "distill:depth", "evaluate"]
    for s in flagship_trace:
        assert s.ratio == pytest.approx(1, abs=0.10), s.analytic.task
        assert s.fits()
    # Evaluation peaks in lm-eval's scoring, the training steps at the loss of the traced step's micro-batch.
    steps = {s.analytic.task: s for s in flagship_trace}
    assert steps["evaluate"].traced.peak_phase == "lm-eval scoring" and steps["evaluate"].analytic.moment == "lm-eval"
    assert all(steps[t].traced.peak_phase.startswith("micro-batch") for t in ("correct-teacher", "distill:width"))


def test_evaluation_holds_three_copies_of_a_batch_of_logits(flagship_trace):
    """lm-eval's HFLM forms a batch's bf16 logits and their log-softmax in fp32, which first copies them to fp32:
    2 + 4 + 4 bytes a vocabulary entry of `batch_size` requests (the analytic plan had 2 + 4). At the flagship's
    8 x 4096 tokens and a 128k vocabulary, 39 GiB: the evaluation's peak, above the weights."""
    from secateurs import plan

    evaluate = {s.analytic.task: s for s in flagship_trace}["evaluate"]
    logits = 10 * 8 * plan.LM_EVAL_CONTEXT_TOKENS * 128256
    activation = evaluate.traced.phases["lm-eval scoring"][1]["Activation"]
    assert activation == pytest.approx(logits, rel=0.001)
    assert evaluate.analytic.bytes["logits"] == logits


@pytest.mark.parametrize("tokens", [128, 512])
def test_traced_lm_eval_scoring_matches_the_measured_one(tokens):
    """The same lm-eval scoring (HFLM's loglikelihood over a batch of 2 requests) run for real on CPU in bf16,
    its peak from the profiler, against its trace; its logits are all but the whole peak."""
    def run(fake):
        return trace.trace_forward(TINY, 2, 16, fake=fake, step="evaluate", lm_eval_tokens=tokens)

    traced = run(True)
    real = measured_peak(lambda: run(False))
    print(f"lm-eval, {tokens} tokens: traced {traced.peak:,} measured {real:,} ratio {traced.peak / real:.3f}")
    assert traced.peak == pytest.approx(real, rel=0.10)
    assert traced.peak_phase == "lm-eval scoring"
    assert traced.phases["lm-eval scoring"][1]["Activation"] >= 10 * 2 * tokens * TINY["vocab_size"]


def test_the_kd_chunk_holds_five_fp32_buffers_and_the_lm_head_gradient():
    """The chunked KD loss (`losses.chunked_kd_loss`), traced alone at the width student's shapes: beyond its
    inputs it holds what `plan.kd_chunk_bytes` counts (the analytic plan had three fp32 buffers, no gradient)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from secateurs import losses, plan
    from secateurs.families import Shape

    tokens, hidden, teacher_hidden, vocab = 8192, 3072, 4096, 128256
    with FakeTensorMode():
        student = torch.empty(tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
        head = torch.empty(vocab, hidden, dtype=torch.bfloat16, requires_grad=True)
        teacher, teacher_head = torch.empty(tokens, teacher_hidden, dtype=torch.bfloat16), torch.empty(
            vocab, teacher_hidden, dtype=torch.bfloat16)  # fmt: skip
        inputs = (student, head, teacher, teacher_head)
        tracker = trace._memory_tracker()
        tracker.track_external(*inputs)
        with tracker, trace._watched(set(), True):
            losses.chunked_kd_loss(*inputs, chunk_size=2048).backward()
        peak, _ = trace._snapshot(tracker)
    work = peak - sum(t.numel() * 2 for t in inputs)
    shape = Shape(hidden_size=hidden, intermediate_size=9216, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=vocab, tie_word_embeddings=False)  # fmt: skip
    print(f"KD chunk: traced {work / trace.GiB:.2f} GiB, counted {plan.kd_chunk_bytes(shape, 2048) / trace.GiB:.2f}")
    assert work == pytest.approx(plan.kd_chunk_bytes(shape, 2048), rel=0.10)
    assert work > 2 * 3 * 4 * 2048 * vocab


def test_a_training_step_is_traced_with_the_optimizer_state_of_the_steps_before():
    """AdamW makes its state at the first step, and every later step's micro-batches run beside it: the traced
    step is the second, whose peak holds exactly AdamW's two fp32 moments and a step count per parameter."""
    settings = TeacherCorrectionConfig(micro_batch_size=2, gradient_checkpointing=True, global_batch_size=4)
    traced = trace.trace_training("correct_teacher", TINY, settings, 128, bf16=False)
    model = trace.model_from_config(TINY, __import__("torch").float32)
    n, tensors = sum(p.numel() for p in model.parameters()), len(list(model.parameters()))
    peak = traced.phases["micro-batch 2"][1]
    assert peak["Optstate"] == 8 * n + 4 * tensors
    assert peak["Parameter"] == peak["Gradient"] == 4 * n


def test_fsdp_keeps_no_unsharded_gradients_across_micro_batches(flagship_trace):
    """Accumulating under FSDP2 without a reduction keeps every unsharded gradient until the optimizer step (2
    bytes a parameter in bf16: +8.4 GiB a GPU for the 4.5B student). `secateurs.train` reduce-scatters every
    micro-batch instead, so at the second micro-batch's peak the trace finds only the fp32 gradient shards of
    the first (4 bytes a parameter over 8) and at most one unit's unsharded gradients, the largest unit
    ([final norm, LM head]) the analytic plan's `grad reduce` counts."""
    from secateurs import plan

    width = {s.analytic.task: s for s in flagship_trace}["distill:width"]
    n, head_unit = 4_512_746_496, 128256 * 3072 + 3072
    second = width.traced.phases["micro-batch 2"][1]
    assert second["Sharded Grad"] == pytest.approx(4 * n / 8, rel=0.001)
    assert second.get("Unsharded Grad", 0) <= 2 * head_unit < 2 * n / 8
    analytic = plan.plan(flagship())[2]
    assert analytic.task == "distill:width" and "gradients" in analytic.bytes
    assert analytic.bytes["gradients"] == 4 * n // 8


def test_the_roofline_is_pytorch_s_cost_model_at_the_datasheet_figures():
    """One bf16 [4096, 4096] x [4096, 4096] matmul on an H100: the larger of its multiply-adds over 75% of 989
    TFLOPS and its three 32 MiB tensors over 3.35 TB/s (torch.utils._runtime_estimation's formulas)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a, b = torch.empty(4096, 4096, dtype=torch.bfloat16), torch.empty(4096, 4096, dtype=torch.bfloat16)
        estimator = trace._roofline_estimator("H100")
        with estimator:
            torch.mm(a, b)
    flops, bandwidth = trace.GPU_PEAKS["H100"]
    expected = max(2 * 4096**3 / 2 / (0.75 * flops), 3 * 4096 * 4096 * 2 / bandwidth)
    assert estimator.total_runtime == pytest.approx(expected * 1e3, rel=1e-9)


def test_the_flagship_training_steps_have_roofline_hours(flagship_trace):
    from secateurs import plan

    text = trace.format_traced(flagship_trace)
    for s in flagship_trace:
        if s.analytic.tokens:
            assert s.gpu == "H100" and s.roofline_hours > 0 and s.micro_batch_seconds > 0
            assert f"{s.roofline_hours:,.0f}" in text and plan.communication_hours(s.analytic) > 0
    assert "GPU-h roofline: PyTorch's RuntimeEstimator cost model" in text


def test_a_search_s_scoring_is_traced_beside_its_parent():
    """The search scores its largest candidate (`search.enumerate_candidates`) beside the parent it prunes from:
    both models' bf16 weights, exactly, and the candidate's validation loss; traced against the same run measured
    on CPU."""
    from secateurs.config import SearchConfig
    from secateurs.families import Shape

    from types import SimpleNamespace

    parent = dict(TINY, num_hidden_layers=4)
    candidate = trace.largest_candidate(parent, SearchConfig(params=0.7 * Shape.of(SimpleNamespace(**parent)).parameters()))
    shapes = [Shape.of(SimpleNamespace(**c)) for c in (candidate, parent)]
    assert shapes[0].parameters() <= 0.7 * shapes[1].parameters()

    def run(fake):
        return trace.trace_forward(candidate, 2, 128, fake=fake, beside=parent)

    traced = run(True)
    assert traced.categories["Parameter"] == 2 * (shapes[0].parameters() + shapes[1].parameters())
    real = measured_peak(lambda: run(False))
    print(f"search scoring: traced {traced.peak:,} measured {real:,} ratio {traced.peak / real:.3f}")
    assert traced.peak == pytest.approx(real, rel=0.10)


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

        peaks[seq_len] = run(True).peak if how == "fake" else _traced_step_measured(lambda: run(False))
    if how == "fake" or dist.get_rank() == 0:
        print("PEAKS " + json.dumps(peaks))
    if how == "real":
        dist.destroy_process_group()


def _traced_step_measured(run) -> int:
    """The real run's peak over the step the trace traces (the second; the first makes AdamW's state): the bytes
    of the real tensors it starts with (the local shards of the parameters, the buffers, AdamW's state, the
    micro-batches) plus the peak of what the profiler sees it allocate.

    Not the profiler over the whole run: over 2 gloo processes that reads 0.7 to 0.9 MB (12-16%) above the
    second step's own peak, varying from run to run, where the step alone agrees with the trace within 1% (both
    steps measured apart: +4.60 MB the first, +4.34 MB the second above what each starts with)."""
    import sys

    import torch

    steps = []
    step = trace.training_step

    def measured(trainer, model, optimizer, batches, *args, **kwargs):
        def local(t):
            return t.to_local() if hasattr(t, "to_local") else t

        tensors = [local(p) for p in model.parameters()] + list(model.buffers()) + list(batches)
        tensors += [local(t) for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        live = sum(storages.values())
        steps.append(live + measured_peak(lambda: step(trainer, model, optimizer, batches, *args, **kwargs)))

    trace.training_step = measured
    try:
        run()
    finally:
        trace.training_step = step
    return steps[-1]


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
