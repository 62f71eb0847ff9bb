"""The memory plan: parameter counts exact against real models, the flagship config's numbers worked by hand,
and configs that cannot fit refused in one line before anything is compiled, sent or run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from secateurs import plan
from secateurs.config import ConfigError, PipelineConfig, load_config

FLAGSHIP = Path(__file__).resolve().parents[1] / "configs" / "llama31-8b-minitron.yaml"
GiB = 2**30


@pytest.mark.parametrize("case", ["llama-tied", "llama-untied", "mistral"])
def test_shape_parameters_equal_the_model_s(case, tiny_models, tiny_importance, tmp_path):
    """The plan counts parameters from shapes alone; a real model of the shape (teacher and a student pruned in
    width and depth, whose shape the plan derives from the pruning target) has exactly as many."""
    import json

    from secateurs import prune
    from secateurs.checkpoint import load_model
    from secateurs.families import parameter_count
    from secateurs.prune import PruneTarget

    from types import SimpleNamespace

    teacher = plan.Shape.of(SimpleNamespace(**json.loads((tiny_models[case] / "config.json").read_text())))
    assert teacher.parameters() == parameter_count(load_model(tiny_models[case]))
    config = PipelineConfig.model_validate({
        "teacher": {"source": str(tiny_models[case])},
        "students": [{"name": "s", "prune": {"hidden_size": 48, "ffn_hidden_size": 64, "num_attention_heads": 4,
                                             "drop_layers": "1"}}],
    })  # fmt: skip
    shapes = plan.shapes_of(config)
    target = PruneTarget(hidden_size=48, ffn_hidden_size=64, num_attention_heads=4, drop_layers=[1])
    prune.run(tiny_models[case], tiny_importance[case], tmp_path / "s", target)
    assert shapes["s"].parameters() == parameter_count(load_model(tmp_path / "s"))


def test_flagship_plan_worked_by_hand():
    """Llama-3.1-8B -> 4B-width on 8 x H100-80GB under FSDP, micro-batch 1 x 8192 tokens, checkpointing on."""
    config = load_config(FLAGSHIP)
    steps = {s.task: s for s in plan.plan(config)}
    assert list(steps) == ["correct-teacher", "importance", "distill:width", "distill:depth", "evaluate"]

    # Student (width): hidden 3072, MLP 9216, 32 heads / 8 KV groups of 128, 32 layers, vocab 128256, untied.
    layer = 3072 * 32 * 128 * 2 + 3072 * 8 * 128 * 2 + 3 * 3072 * 9216 + 2 * 3072
    root = 128256 * 3072 * 2 + 3072
    student = root + 32 * layer
    assert student == 4_512_746_496  # Llama-3.1-Minitron-4B-Width: 4.5B
    teacher_layer = 4096 * 32 * 128 * 2 + 4096 * 8 * 128 * 2 + 3 * 4096 * 14336 + 2 * 4096
    teacher = 128256 * 4096 * 2 + 4096 + 32 * teacher_layer
    assert teacher == 8_030_261_248  # Llama-3.1-8B

    width = steps["distill:width"]
    assert (width.gpus, width.parallelism, width.checkpointing) == (8, "fsdp", True)
    tokens = 8192
    # Its peak is at the KD loss: the checkpointed layer inputs and the teacher's last hidden states; the KD
    # chunk's five fp32 [2048, V] buffers and the student LM head's fp32 gradient; FSDP2's root and
    # [final norm, LM head] units gathered. A layer's backward (both units and two layers gathered, the head
    # unit's reduction buffers, a layer's recomputed activations) needs less.
    eight_processes = plan.CUDA_CONTEXT + plan.CUBLAS_WORKSPACES + plan.NCCL_BUFFERS
    assert width.moment == "loss"
    assert width.bytes == {
        "weights": 4 * student // 8,
        "gradients": 4 * student // 8,
        "optimizer": 8 * student // 8,
        "teacher": 2 * teacher,
        "runtime": eight_processes,
        "gathered": 2 * root,
        "activations": 32 * 2 * tokens * 3072 + 2 * tokens * 4096,
        "kd chunk": 5 * 4 * 2048 * 128256 + 4 * 128256 * 3072,
    }
    # The largest FSDP unit is [final norm, LM head], larger than a decoder layer at a 128k vocabulary. Reduced
    # every micro-batch in fp32: its bf16 unsharded gradients, the fp32 reduce-scatter input and one fp32 shard.
    head_unit = 128256 * 3072 + 3072
    assert head_unit > layer
    recompute = 2 * tokens * (4 * 3072 + 2 * 32 * 128 + 2 * 8 * 128 + 4 * 9216)
    backward = 2 * (root + 2 * layer) + (2 * head_unit + 4 * head_unit + 4 * head_unit // 8) + (
        32 * 2 * tokens * 3072 + recompute)
    assert width.moments == {
        "loss": 2 * root + 32 * 2 * tokens * 3072 + 2 * tokens * 4096 + 5 * 4 * 2048 * 128256 + 4 * 128256 * 3072,
        "layer backward": backward,
        "teacher forward": 2 * tokens * (3 * 14336 + 4 * 4096 + 32 * 128),
    }
    # Not the full unsharded gradients that accumulating across micro-batches without a reduction would keep.
    assert backward - 2 * (root + 2 * layer) - 32 * 2 * tokens * 3072 - recompute < 2 * student
    assert width.available == 80 * GiB and width.fits()
    # The budget the config sets: max_steps x 1152 x 8192 tokens.
    assert width.tokens == config.distill.max_steps * 1152 * 8192
    # The 8B teacher's own correction: 16 bytes a parameter over 8 shards, and at its loss transformers' logits
    # of the whole 8192-token batch (bf16, an fp32 copy, its log-softmax: 12 bytes counted).
    correct = steps["correct-teacher"]
    teacher_root = 2 * 128256 * 4096 + 4096
    assert correct.moment == "loss"
    assert correct.bytes == {
        "weights": 4 * teacher // 8, "gradients": 4 * teacher // 8, "optimizer": 8 * teacher // 8,
        "runtime": eight_processes, "gathered": 2 * teacher_root, "activations": 32 * 2 * tokens * 4096,
        "logits": 12 * tokens * 128256,
    }  # fmt: skip
    assert correct.fits()


def test_forward_steps_count_the_logits_that_remain():
    """Importance (its depth scan) and evaluation compute the validation loss one fp32 chunk of logits at a time
    (`evaluate.validation_loss`), not the whole batch's; evaluation's lm-eval tasks then hold a padded batch's
    bf16 logits, their fp32 copy and fp32 log-softmax, at the assumed longest request. A layer's transients, the
    loss and the tasks come one after the other: the largest counts. One process: no NCCL."""
    config = load_config(FLAGSHIP)
    steps = {s.task: s for s in plan.plan(config)}
    importance, evaluate = steps["importance"], steps["evaluate"]
    tokens = config.importance.batch_size * 8192
    layer = 2 * tokens * (3 * 14336 + 4 * 4096 + 32 * 128)
    loss = 2 * tokens * 4096 + 4 * plan.LOSS_CHUNK_TOKENS * 128256  # 1 GiB of logits, not 4 x 32 GiB
    assert importance.moments == {"layers": layer, "validation loss": loss}
    assert importance.moment == "layers" and importance.bytes["activations"] == layer
    lm_eval = (2 + 4 + 4) * config.evaluate.batch_size * plan.LM_EVAL_CONTEXT_TOKENS * 128256
    assert evaluate.moments == {"layers": layer, "validation loss": loss, "lm-eval": lm_eval}
    assert evaluate.moment == "lm-eval" and evaluate.bytes["logits"] == lm_eval
    for step in (importance, evaluate):
        assert step.bytes["runtime"] == plan.CUDA_CONTEXT + plan.CUBLAS_WORKSPACES
        assert step.bytes["weights"] == 2 * 8_030_261_248 and step.fits()
        assert step.total == sum(step.bytes.values()) == step.bytes["weights"] + step.bytes["runtime"] + max(
            step.moments.values())


def test_gradient_buffers_by_parallelism():
    """fsdp: the largest unit's buffers, a decoder layer when the vocabulary is small; ddp over several processes:
    DDP's buckets, a second fp32 copy of the gradients; one process runs without DDP and has none."""
    small_vocab = plan.Shape(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=2, head_dim=16, vocab_size=100, tie_word_embeddings=False)  # fmt: skip
    layer = small_vocab.layer_parameters()
    assert layer > 100 * 64 + 64
    assert plan.gradient_buffers(small_vocab, "fsdp", 4, 4) == 6 * layer + 4 * layer // 4
    assert plan.gradient_buffers(small_vocab, "ddp", 1, 8) == 4 * small_vocab.parameters()
    assert plan.gradient_buffers(small_vocab, "ddp", 1, 1) == 0
    assert plan.runtime_bytes(1) == plan.CUDA_CONTEXT + plan.CUBLAS_WORKSPACES
    assert plan.runtime_bytes(16) == plan.runtime_bytes(1) + plan.NCCL_BUFFERS


def test_plan_command_prints_the_table_and_fits(capsys):
    from secateurs.pipeline_cli import plan_cmd

    plan_cmd(FLAGSHIP, 10680.0)
    out = capsys.readouterr().out
    tokens = load_config(FLAGSHIP).distill.max_steps * 1152 * 8192
    assert "distill:width" in out and f"{tokens / 1e9:.2f}B" in out and out.strip().endswith("every step fits its GPUs")
    # The table's foot says what is counted, what is assumed (with the constants) and what is measured.
    lines = out.splitlines()
    assert lines[-5].startswith("counted from the shapes and settings: every column but runtime")
    assert lines[-4].startswith(f"assumed: runtime = CUDA context {plan.CUDA_CONTEXT / GiB:.1f} GiB")
    assert f"allocator fragmentation {1 - plan.HEADROOM:.0%}" in lines[-4]
    assert lines[-3] == "measured: 10,680 tokens/s per GPU (distillation on one H200, bench/results/gpu)"
    assert lines[-2].startswith("comm: bytes one GPU sends per micro-batch")


def _flagship(tmp_path, **changes) -> Path:
    raw = yaml.safe_load(FLAGSHIP.read_text())
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[last] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("command", ["compile", "submit", "plan"])
def test_a_config_that_cannot_fit_is_refused_in_one_line(command, tmp_path, capsys):
    """Unsharded, the width student's fp32 state (16 bytes x 4.5B) plus the bf16 teacher pass an H100's 80 GiB."""
    import typer

    from secateurs import pipeline_cli

    path = _flagship(tmp_path, **{"distill.parallelism": "ddp"})
    call = {"compile": lambda: pipeline_cli.compile_cmd(path, tmp_path / "p.yaml", None),
            "submit": lambda: pipeline_cli.submit_cmd(path, "http://127.0.0.1:9", "secateurs", None, None, None),
            "plan": lambda: pipeline_cli.plan_cmd(path, None)}[command]  # fmt: skip
    with pytest.raises(typer.Exit):
        call()
    err = capsys.readouterr().err.strip()
    # ddp over 8 processes: the whole fp32 state on every GPU, and DDP's buckets, a second copy of the gradients.
    width = {s.task: s for s in plan.plan(load_config(path))}["distill:width"]
    n = 4_512_746_496
    assert [width.bytes[k] for k in ("weights", "gradients", "optimizer", "grad reduce")] == [4 * n, 4 * n, 8 * n, 4 * n]
    assert width.total > 0.9 * 80 * GiB
    # Refused by the step's trace (one process under bf16 autocast, DDP's buckets and the runtime added), whose
    # figure and largest category the line names beside the analytic plan's.
    traced = re.fullmatch(
        r"error: distill:width needs ([\d.]+) GiB per GPU traced \(([\d.]+) of tensors, largest (\w[\w +]*) "
        r"([\d.]+), \+ ([\d.]+) the trace cannot see; the analytic plan ([\d.]+)\) but a NVIDIA-H100-80GB-HBM3 GPU "
        r"has 80.0 GiB \(90% usable: 72.0\); what would fit: parallelism: fsdp .*", err)  # fmt: skip
    assert traced, err
    total, tensors, largest, largest_gib, unseen, analytic = traced.groups()
    assert float(analytic) == round(width.total / GiB, 1)
    assert float(unseen) == round((width.bytes["runtime"] + width.bytes["grad reduce"]) / GiB, 1)
    assert largest == "Optstate" and float(largest_gib) == pytest.approx(8 * n / GiB, abs=0.05)
    assert float(tensors) == pytest.approx(float(analytic) - float(unseen), rel=0.10)
    assert "\n" not in err and not (tmp_path / "p.yaml").exists()


def test_gpu_memory_from_the_config_or_the_node_label():
    config = load_config(FLAGSHIP)
    assert plan.gpu_memory(config.placement) == 80 * GiB
    config.placement.node_selector = {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert plan.gpu_memory(config.placement) == 141 * 10**9
    config.placement.gpu_memory = "40GiB"
    assert plan.gpu_memory(config.placement) == 40 * GiB
    with pytest.raises(ValueError, match="is not a size"):
        plan.parse_bytes("lots")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"placement.gpus.distill": 1},
         "distill.parallelism=fsdp but the distill step runs in 1 process: give it more GPUs (placement.gpus.distill) "
         "or processes (placement.processes.distill), or use ddp"),
        ({"distill.global_batch_size": 1100},
         "distill.global_batch_size=1100 is not a multiple of micro_batch_size x processes x nodes = 1 x 8"),
        ({"placement.processes": {"prune": 2}},
         "processes: not training step(s): ['prune']; expected some of ['correct_teacher', 'distill']"),
        ({"placement.nodes": {"evaluate": 2}},
         "nodes: not training step(s): ['evaluate']; expected some of ['correct_teacher', 'distill']"),
        ({"placement.nodes": {"distill": 4}, "placement.cache_volume": None},
         "nodes.distill=4 needs cache_volume: the TrainJob's pods read the step's inputs and write its output on "
         "that shared ReadWriteMany volume"),
    ],
)  # fmt: skip
def test_training_placement_errors_name_the_field(changes, message, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_flagship(tmp_path, **changes))
    assert message in str(e.value)


def test_a_search_is_planned_with_a_candidate_beside_its_parent(tmp_path, capsys):
    """The search step holds the parent (the 8B teacher) and one candidate at most the budget's size, both bf16;
    on a 24 GiB GPU that does not fit, and the config is refused in one line before anything is compiled."""
    import typer

    from secateurs.config import PipelineConfig
    from secateurs.pipeline_cli import compile_cmd

    raw = {
        "teacher": {"source": "meta-llama/Llama-3.1-8B"},
        "importance": {"batch_size": 1},
        "students": [{"name": "auto-4b", "search": {"params": 4.5e9, "batch_size": 4}}],
        "placement": {"gpus": {"importance": 1}, "gpu_memory": "80Gi"},
    }  # fmt: skip
    steps = {s.task: s for s in plan.plan(PipelineConfig.model_validate(raw))}
    assert list(steps) == ["importance", "search:auto-4b"]
    search, importance = steps["search:auto-4b"], steps["importance"]
    # Scoring 4 sequences of the default 4096 tokens: a layer's transients outweigh the loss's chunk of logits.
    assert search.bytes == {"weights": importance.bytes["weights"], "runtime": importance.bytes["runtime"],
                            "activations": 2 * 4 * 4096 * (3 * 14336 + 4 * 4096 + 32 * 128),
                            "candidate": 2 * 4_500_000_000}  # fmt: skip
    assert search.bytes["weights"] == 2 * 8_030_261_248 and search.fits()
    raw["placement"]["gpu_memory"] = "24Gi"
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(typer.Exit):
        compile_cmd(path, tmp_path / "p.yaml", None)
    err = capsys.readouterr().err.strip()
    parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in search.bytes.items())
    assert err == (f"error: search:auto-4b needs {search.total / GiB:.1f} GiB per GPU ({parts}) but a "
                   "placement.gpu_memory GPU has 24.0 GiB (90% usable: 21.6); what would fit: a smaller batch_size"), err  # fmt: skip
    assert not (tmp_path / "p.yaml").exists()


def test_fsdp_communication_per_micro_batch_and_the_bandwidth_it_runs_at(tmp_path):
    """FSDP2 over 8 GPUs sends, per GPU and micro-batch, 7/8 of: every bf16 parameter gathered for the forward,
    the decoder layers' again for the backward, and every fp32 gradient reduce-scattered. In one node at NVLink's
    bandwidth; across nodes at placement.network_bandwidth, where at 10 GB/s the network, not the GPUs, sets the
    time (its GPU-hours pass those of the measured throughput)."""
    width = {s.task: s for s in plan.plan(load_config(FLAGSHIP))}["distill:width"]
    n, layer = 4_512_746_496, 3072 * 32 * 128 * 2 + 3072 * 8 * 128 * 2 + 3 * 3072 * 9216 + 2 * 3072
    assert width.communication == int(7 / 8 * (2 * n + 2 * 32 * layer + 4 * n))
    assert width.bandwidth == plan.NVLINK_BANDWIDTH and width.micro_batch_tokens == 8192
    micro_batches_per_gpu = width.tokens / 8192 / 8
    assert plan.communication_hours(width) == pytest.approx(
        micro_batches_per_gpu * width.communication / plan.NVLINK_BANDWIDTH * 8 / 3600)
    two_nodes = load_config(_flagship(tmp_path, **{"placement.nodes": {"distill": 2},
                                                   "placement.network_bandwidth": "10GB"}))  # fmt: skip
    width = {s.task: s for s in plan.plan(two_nodes)}["distill:width"]
    assert width.bandwidth == 10 * 10**9 and width.communication == int(15 / 16 * (2 * n + 2 * 32 * layer + 4 * n))
    measured = width.tokens / plan.MEASURED_TOKENS_PER_SECOND / 3600
    assert plan.communication_hours(width) > measured
    assert load_config(FLAGSHIP).placement.network_bandwidth == "50GB"
