"""Teacher correction and distillation on tiny models: resumable after SIGKILL, bad inputs refused up front."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from secateurs import prune, train
from secateurs.config import DistillConfig, TeacherCorrectionConfig
from secateurs.data import DataError
from secateurs.prune import PruneTarget

FAST = dict(max_steps=6, micro_batch_size=2, global_batch_size=4, warmup_steps=2, save_steps=2, logging_steps=1,
            learning_rate=1e-3, min_learning_rate=1e-4)


@pytest.fixture(scope="module")
def student(tiny_models, tiny_importance, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student") / "width-depth"
    prune.run(tiny_models["llama-tied"], tiny_importance["llama-tied"], out,
              PruneTarget(hidden_size=48, ffn_hidden_size=64, num_attention_heads=4, drop_layers=[1]))
    return out


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def _distill_cmd(teacher, student, data, out, **settings):
    cmd = [sys.executable, "-m", "secateurs.cli", "distill", "--teacher", str(teacher), "--student", str(student),
           "--data", str(data), "--out", str(out)]
    for k, v in settings.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


def test_distill_resumes_after_sigkill_with_the_same_final_loss(tiny_models, student, tiny_data, tmp_path):
    teacher = tiny_models["llama-tied"]
    # Steps of the tiny model take milliseconds: the kill lands as soon as checkpoint-3 is whole, with 27 steps
    # still to go, so that it cannot miss the run (a fixed wait after checkpoint-3 once let 8 steps finish).
    settings = dict(FAST, max_steps=30, save_steps=3)
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    straight = train.distill(teacher, student, tiny_data, tmp_path / "straight", DistillConfig(**settings))

    out = tmp_path / "killed"
    proc = subprocess.Popen(_distill_cmd(teacher, student, tiny_data, out, **settings), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = Path(f"{out}.checkpoints") / "checkpoint-3" / "trainer_state.json"
    deadline = time.time() + 600
    while not _parses(state) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()

    rerun = subprocess.run(_distill_cmd(teacher, student, tiny_data, out, **settings), env=env,
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed = json.loads((out / "secateurs.json").read_text())["report"]
    assert resumed["resumed_from"] is not None and resumed["steps"] == straight["steps"] == 30
    # Bit-exact: the resumed run restores the weights, the optimizer and scheduler state, the RNG states and the
    # data position, and the CPU arithmetic is deterministic (measured: equal to the last bit).
    assert resumed["final_loss"] == straight["final_loss"]
    # A checkpoint every 3 steps; both runs keep only the newest two (save_total_limit's default).
    for run in ("straight", "killed"):
        kept = sorted(p.name for p in Path(f"{tmp_path / run}.checkpoints").glob("checkpoint-*"))
        assert kept == ["checkpoint-27", "checkpoint-30"], run
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # a stock checkpoint


def test_resume_skips_a_checkpoint_killed_while_being_written(tiny_models, student, tiny_data, tmp_path):
    """A SIGKILL during a checkpoint write leaves a newer, partial checkpoint: the rerun resumes from the last
    whole one (and removes the partial one) instead of failing on it."""
    teacher = tiny_models["llama-tied"]
    settings = DistillConfig(**dict(FAST, max_steps=6, save_steps=3))
    out = tmp_path / "run"
    straight = train.distill(teacher, student, tiny_data, out, settings)  # uninterrupted; keeps its checkpoints
    checkpoints = Path(f"{out}.checkpoints")
    shutil.rmtree(out)
    # As if killed mid-write: the newest checkpoint lacks the trainer state the Trainer writes last.
    (checkpoints / "checkpoint-6" / "trainer_state.json").unlink()
    with pytest.warns(UserWarning, match="checkpoint-6: incomplete"):
        resumed = train.distill(teacher, student, tiny_data, out, settings)
    assert resumed["resumed_from"] == "checkpoint-3" and resumed["steps"] == 6
    assert resumed["final_loss"] == straight["final_loss"]  # bit-exact, as in the SIGKILL test above
    assert (checkpoints / "checkpoint-6" / "trainer_state.json").is_file()
    # As if a process was killed writing its RNG state while the main one wrote the trainer state: the state is
    # whole, the RNG file cut short.
    shutil.rmtree(out)
    rng = checkpoints / "checkpoint-6" / "rng_state.pth"
    rng.write_bytes(rng.read_bytes()[: rng.stat().st_size // 2])
    with pytest.warns(UserWarning, match="checkpoint-6: incomplete"):
        again = train.distill(teacher, student, tiny_data, out, settings)
    assert again["resumed_from"] == "checkpoint-3" and again["final_loss"] == resumed["final_loss"]


def test_a_resumed_run_reads_the_sequences_the_uninterrupted_run_reads_after_the_same_step(
    tiny_models, student, tiny_data, tmp_path, monkeypatch
):
    """The data order continues across a resume: none of the sequences read before checkpoint-3 is read again, and
    the steps after it read what the uninterrupted run read."""
    from secateurs import data

    seen: list[int] = []
    read = data.PackedSplit.__getitem__

    def traced(self, i):
        if self.split == "train":
            seen.append(int(i))
        return read(self, i)

    monkeypatch.setattr(data.PackedSplit, "__getitem__", traced)
    teacher, out = tiny_models["llama-tied"], tmp_path / "run"
    settings = DistillConfig(**dict(FAST, max_steps=6, save_steps=3))
    train.distill(teacher, student, tiny_data, out, settings)
    straight, seen[:] = list(seen), []
    shutil.rmtree(out)
    shutil.rmtree(Path(f"{out}.checkpoints") / "checkpoint-6")  # as if killed after checkpoint-3
    resumed = train.distill(teacher, student, tiny_data, out, settings)
    assert resumed["resumed_from"] == "checkpoint-3"
    per_step = FAST["global_batch_size"]
    assert len(set(straight[: 6 * per_step])) == 6 * per_step  # one pass over 64 sequences: no repeats yet
    assert seen[: 3 * per_step] == straight[3 * per_step : 6 * per_step]


def test_a_retry_with_another_output_path_resumes_from_secateurs_checkpoints(
    tiny_models, student, tiny_data, tmp_path, monkeypatch
):
    """On a cluster a retried pod writes its output to a new path. With SECATEURS_CHECKPOINTS on a volume that
    outlives the pod, the retry finds the checkpoints by the run's identity and resumes."""
    volume = tmp_path / "volume"
    monkeypatch.setenv("SECATEURS_CHECKPOINTS", str(volume))
    teacher = tiny_models["llama-tied"]
    settings = DistillConfig(**dict(FAST, max_steps=6, save_steps=3))
    first = train.distill(teacher, student, tiny_data, tmp_path / "pod-1" / "distilled", settings)
    (work,) = volume.iterdir()
    assert work.name.startswith("distill-") and first["checkpoint_dir"] == str(work)
    assert not (tmp_path / "pod-1" / "distilled.checkpoints").exists()
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    shutil.rmtree(work / "checkpoint-6")  # as if the first pod was preempted after checkpoint-3
    retry = train.distill(teacher, student, tiny_data, tmp_path / "pod-2" / "distilled", settings)
    assert retry["resumed_from"] == "checkpoint-3" and retry["steps"] == 6
    assert retry["final_loss"] == first["final_loss"]  # bit-exact, as in the SIGKILL test above
    # Other settings are another run: a directory of its own beside the first, not a refusal.
    train.distill(teacher, student, tiny_data, tmp_path / "other", DistillConfig(**dict(FAST, max_steps=1)))
    assert len(list(volume.iterdir())) == 2


def test_distillation_lowers_the_kd_loss_and_writes_a_stock_checkpoint(tiny_models, student, tiny_data, tmp_path):
    report = train.distill(tiny_models["llama-tied"], student, tiny_data, tmp_path / "s",
                           DistillConfig(**dict(FAST, max_steps=10), intermediate_loss=True, validation_sequences=5))
    losses_ = [h["loss"] for h in report["log_history"]]
    assert losses_[-1] < losses_[0]
    # validation_sequences: the run scores what it wrote, on sequences spread over the held-out split.
    from secateurs.checkpoint import load_model
    from secateurs.data import load_packed
    from secateurs.evaluate import validation_loss

    written = validation_loss(load_model(tmp_path / "s"), load_packed(tiny_data)[0]["validation"].spread(5), 4)
    assert report["validation_loss"] == pytest.approx(written, rel=1e-6)
    assert report["layer_pairs"] == [(1, 2), (2, 3)]  # after the cut layer 1, plus the last layer
    manifest = json.loads((tmp_path / "s" / "secateurs.json").read_text())
    assert manifest["step"] == "distill" and manifest["inputs"]["teacher"]["sha256"]


def test_teacher_correction(tiny_models, tiny_data, tmp_path):
    from secateurs.checkpoint import load_model
    from secateurs.data import load_packed
    from secateurs.evaluate import validation_loss

    report = train.correct_teacher(tiny_models["qwen3"], tiny_data, tmp_path / "t", TeacherCorrectionConfig(**FAST))
    assert report["steps"] == 6 and report["tokens_seen"] == 6 * 4 * 32
    # What correction is for: the LM loss on the data it trained on falls. Measured on this random-weight model
    # (loss ln(vocab) = 10.82 before), 6 steps at lr 1e-3 (2 of warm-up) take 0.33 nats off the whole train split
    # (10.822 -> 10.489; CPU arithmetic is deterministic); a step that did not update the weights, or trained on
    # wrong labels, leaves it where it was or raises it. 0.1 nats is a 3x margin.
    train_split = load_packed(tiny_data)[0]["train"].head(None)
    before = validation_loss(load_model(tiny_models["qwen3"]), train_split)
    after = validation_loss(load_model(tmp_path / "t"), train_split)
    assert after < before - 0.1
    # save_dtype: the same training, written in bf16: each tensor is the fp32 run's rounded to bf16, and the stock
    # loader reads the checkpoint as bf16.
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    train.correct_teacher(tiny_models["qwen3"], tiny_data, tmp_path / "b",
                          TeacherCorrectionConfig(**FAST, save_dtype="bfloat16"))  # fmt: skip
    fp32, bf16 = load_file(tmp_path / "t" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert fp32.keys() == bf16.keys()
    for name, tensor in fp32.items():
        assert tensor.dtype == torch.float32 and torch.equal(bf16[name], tensor.to(torch.bfloat16)), name
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "b").dtype == torch.bfloat16


def test_bad_inputs_are_refused_before_training(tiny_models, student, tiny_data, tmp_path):
    teacher = tiny_models["llama-tied"]
    with pytest.raises(train.TrainingError, match="is not smaller than teacher"):
        train.distill(student, teacher, tiny_data, tmp_path / "x", DistillConfig(**FAST))

    other_tok = tmp_path / "other"
    shutil.copytree(student, other_tok)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(other_tok)
    tok.add_tokens(["<extra_token_for_test>"])
    tok.save_pretrained(other_tok)
    with pytest.raises(train.TrainingError, match="use different tokenizers"):
        train.distill(teacher, other_tok, tiny_data, tmp_path / "x", DistillConfig(**FAST))

    other_data = tmp_path / "data"
    shutil.copytree(tiny_data, other_data)
    manifest = json.loads((other_data / "secateurs.json").read_text())
    manifest["config"]["tokenizer"] = "feedfacefeedface"
    (other_data / "secateurs.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="tokenized with tokenizer feedfacefeedface"):
        train.distill(teacher, student, other_data, tmp_path / "x", DistillConfig(**FAST))

    # A checkpoint dir left by another run (other settings) is not resumed from.
    out = tmp_path / "run"
    train.distill(teacher, student, tiny_data, out, DistillConfig(**dict(FAST, max_steps=2)))
    shutil.rmtree(out)
    with pytest.raises(train.TrainingError, match="belongs to another run"):
        train.distill(teacher, student, tiny_data, out, DistillConfig(**dict(FAST, max_steps=2, learning_rate=5e-4)))
    assert not (tmp_path / "x").exists()


def test_divergence_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_models, student, tiny_data, tmp_path):
    settings = DistillConfig(**dict(FAST, max_steps=12, save_steps=1, learning_rate=1e12, min_learning_rate=1e11,
                                    warmup_steps=0, max_grad_norm=1e30))
    with pytest.raises(train.TrainingError, match=r"training diverged: loss is nan at step \d+"):
        train.distill(tiny_models["llama-tied"], student, tiny_data, tmp_path / "d", settings)
    assert not (tmp_path / "d").exists()
    assert list(Path(f"{tmp_path / 'd'}.checkpoints").glob("checkpoint-*"))


def test_compiled_layers_train_to_the_same_losses_and_save_a_plain_checkpoint(
    tiny_models, student, tiny_data, tmp_path, monkeypatch
):
    """`compile_layers` (torch.compile of every decoder layer of both models) changes speed, not the arithmetic:
    the per-step losses match the eager run and the saved checkpoint has the plain model's keys. Graphs are traced
    forward and backward with the aot_eager backend (inductor's code generation takes minutes on 2 CPU cores; it
    runs in `make gpu-check`'s benchmark)."""
    from safetensors import safe_open

    monkeypatch.setattr(train, "COMPILE_BACKEND", "aot_eager")
    settings = dict(FAST, max_steps=3, save_steps=100)
    eager = train.distill(tiny_models["llama-tied"], student, tiny_data, tmp_path / "eager", DistillConfig(**settings))
    compiled = train.distill(tiny_models["llama-tied"], student, tiny_data, tmp_path / "compiled",
                             DistillConfig(**settings, compile_layers=True))
    want = [h["loss"] for h in eager["log_history"]]
    got = [h["loss"] for h in compiled["log_history"]]
    assert len(got) == len(want) == 3 and got == pytest.approx(want, rel=1e-3)
    keys = {name: set(safe_open(tmp_path / name / "model.safetensors", "pt").keys()) for name in ("eager", "compiled")}
    assert keys["compiled"] == keys["eager"] and not any("_orig_mod" in k for k in keys["compiled"])


def test_gradient_checkpointing_is_switched_on_and_keeps_the_losses(tiny_models, student, tiny_data, tmp_path):
    """`gradient_checkpointing: true` reaches the student (recomputation in backward) without a deprecation
    warning from transformers, and trains to the same per-step losses as the plain run."""
    import warnings

    from transformers import TrainerCallback

    class Seen(TrainerCallback):
        checkpointing = None
        recompute = None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            Seen.checkpointing = getattr(model, "is_activation_checkpointing", None)
            if Seen.checkpointing is None:  # transformers releases before the rename
                Seen.checkpointing = model.is_gradient_checkpointing
            Seen.recompute = getattr(model.model.layers[0], "_gradient_checkpointing_func", None)

    settings = dict(FAST, max_steps=3, save_steps=100)
    plain = train.distill(tiny_models["llama-tied"], student, tiny_data, tmp_path / "plain", DistillConfig(**settings),
                          callbacks=[Seen()])
    assert Seen.checkpointing is False
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
        recomputed = train.distill(tiny_models["llama-tied"], student, tiny_data, tmp_path / "ckpt",
                                   DistillConfig(**settings, gradient_checkpointing=True), callbacks=[Seen()])
    assert Seen.checkpointing is True
    assert Seen.recompute.keywords == {"use_reentrant": False}  # what FSDP2 needs (train.py says why)
    want = [h["loss"] for h in plain["log_history"]]
    assert [h["loss"] for h in recomputed["log_history"]] == pytest.approx(want, rel=1e-5)


def test_cross_entropy_only_is_the_lm_fine_tune_without_the_teacher(tiny_models, student, tiny_data, tmp_path,
                                                                    monkeypatch):
    """`ce_alpha: 1` (the KD-vs-CE baseline) trains on the data alone: the KD loss (and the teacher forward it
    needs) is never run, and the per-step losses are exactly those of a plain LM fine-tune of the student with
    the same schedule."""
    from secateurs import losses

    calls = []
    real = losses.fused_kd_loss
    monkeypatch.setattr(losses, "fused_kd_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    settings = dict(FAST, max_steps=3, save_steps=100)
    kd = train.distill(tiny_models["llama-tied"], student, tiny_data, tmp_path / "kd", DistillConfig(**settings))
    assert len(calls) == 3 * 2  # steps x micro-batches per step
    calls.clear()
    ce = train.distill(tiny_models["llama-tied"], student, tiny_data, tmp_path / "ce",
                       DistillConfig(**settings, ce_alpha=1.0))
    assert calls == []
    lm = train.correct_teacher(student, tiny_data, tmp_path / "lm", TeacherCorrectionConfig(**settings))
    want = [h["loss"] for h in lm["log_history"]]
    assert len(want) == 3 and [h["loss"] for h in ce["log_history"]] == want
    assert [h["loss"] for h in kd["log_history"]] != want


@pytest.mark.parametrize("temperature, ce_alpha", [(1.0, 0.0), (2.0, 0.3)])
def test_trainer_kd_loss_and_gradients_equal_stock_forwards(tiny_models, student, tiny_data, tmp_path, temperature,
                                                            ce_alpha):
    """The Trainer's loss (student hidden state caught at the final norm, fused LM head + KL, tied weights) equals
    the plain computation on the stock models' full logits, in float64, with the same parameter gradients."""
    import torch
    from transformers import TrainingArguments

    from secateurs.checkpoint import load_model
    from secateurs.data import load_packed

    teacher = load_model(tiny_models["llama-tied"], dtype=torch.float32).eval().requires_grad_(False)
    model = load_model(student, dtype=torch.float32)
    settings = DistillConfig(temperature=temperature, ce_alpha=ce_alpha, kd_chunk_size=7)
    trainer = train.DistillationTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))
    trainer.ctx, trainer.settings = train._Context(teacher=teacher), settings
    ids = load_packed(tiny_data)[0]["train"].head(3)
    params = [p for p in model.parameters() if p.requires_grad]
    got = trainer.compute_loss(model, {"input_ids": ids})
    grads_got = torch.autograd.grad(got, params)

    s, t = model(input_ids=ids).logits.double(), teacher(input_ids=ids).logits.double()
    p_t, log_q = (t / temperature).softmax(-1), (s / temperature).log_softmax(-1)
    kl = (p_t * (p_t.log() - log_q)).sum(-1).mean()  # every position has a teacher target
    ce = torch.nn.functional.cross_entropy(s[:, :-1].flatten(0, 1), ids[:, 1:].flatten())  # the last has no label
    want = (1 - ce_alpha) * temperature**2 * kl + ce_alpha * ce
    grads_want = torch.autograd.grad(want, params)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for g_got, g_want in zip(grads_got, grads_want):
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    return LlamaForCausalLM(config).to(torch.float32)


def test_fsdp_on_gpus_reduces_gradients_every_micro_batch_in_fp32(tmp_path, monkeypatch):
    """The arguments of a GPU run under fsdp (built here on CPU): every micro-batch's gradients are reduce-scattered
    at once rather than held unsharded through the step (accelerate's sync_each_batch, which the Trainer's loop
    reads), and the FSDP2 plugin that accelerate builds from them for a bf16 run computes in bf16 but reduces in
    fp32 (accelerate's own bf16 policy reduces in bf16). tests/test_distributed.py sees the reductions happen."""
    import torch
    import transformers.training_args
    from accelerate.utils import FullyShardedDataParallelPlugin

    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    settings = DistillConfig(**FAST, parallelism="fsdp")
    args = train._training_arguments(_tiny_llama(), settings, tmp_path, world=2, cuda=True)
    assert args.accelerator_config.gradient_accumulation_kwargs == {"sync_each_batch": True}
    # As accelerate's AcceleratorState does with the Trainer's plugin when mixed precision is on (state.py).
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    plugin.set_mixed_precision(args.mixed_precision)
    policy = plugin.mixed_precision_policy
    assert (args.mixed_precision, policy.param_dtype, policy.reduce_dtype) == ("bf16", torch.bfloat16, torch.float32)

    ddp = train._training_arguments(_tiny_llama(), DistillConfig(**FAST), tmp_path, world=2, cuda=True)
    assert ddp.accelerator_config.gradient_accumulation_kwargs is None  # ddp reduces once a step, into its buffers


def test_fsdp_refuses_an_accelerate_that_shards_the_lm_head_after_forward(monkeypatch):
    import accelerate

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(accelerate, "__version__", "1.13.0")
    with pytest.raises(train.TrainingError) as e:
        train._check_processes(DistillConfig(**FAST, parallelism="fsdp"))
    assert str(e.value) == (
        "parallelism=fsdp needs accelerate >= 1.14 (found 1.13.0): older releases shard the LM head after forward, "
        "where the distillation loss reads it; upgrade accelerate"
    )
    assert train._check_processes(DistillConfig(**FAST)) == 2  # ddp never reads a sharded head
    monkeypatch.setattr(accelerate, "__version__", "1.14.0")
    assert train._check_processes(DistillConfig(**FAST, parallelism="fsdp")) == 2
