"""The tensorrt-llm engine step as a rehearsal runs it (`secateurs rehearse`): everything up to the GPU-only call.

The engine component calls `rehearse_tensorrt_llm` instead of `secateurs.engine.run` when REHEARSAL_ENV is set and
the backend is tensorrt-llm. Kept apart from `secateurs.rehearse`, the driver that imports the pipeline graph, so that
the components below it need not import it.
"""

from __future__ import annotations

import json
from pathlib import Path


class RehearsalError(ValueError):
    """A config the rehearsal cannot scale, or a step it cannot rehearse; the message says why."""


# Set in a rehearsal's environment: a tensorrt-llm engine step runs up to its GPU-only call (the
# engine component calls `rehearse_tensorrt_llm` instead of `secateurs.engine.run`).
REHEARSAL_ENV = "SECATEURS_REHEARSAL"
# The GPU the real config's fp8 check is made against when the rehearsal has none (H100: compute capability 9.0).
REHEARSAL_GPU_CAPABILITY = (9, 0)


def trtllm_bench_cli():
    """`trtllm-bench` and its `throughput` command as click commands with TensorRT-LLM's own option definitions
    (names, types, choices, flags): tensorrt_llm/commands/bench.py and tensorrt_llm/bench/benchmark/throughput.py
    (NVIDIA/TensorRT-LLM 000a01de). Transcribed because tensorrt_llm cannot be installed without CUDA; click (which
    trtllm-bench itself uses) then parses a command exactly as trtllm-bench would, up to the GPU."""
    import click

    @click.group(name="trtllm-bench")
    @click.option("--model", "-m", required=True, type=str)
    @click.option("--model_path", type=click.Path(path_type=Path))
    @click.option("--workspace", "-w", type=click.Path(path_type=Path), default="/tmp")
    @click.option("--log_level", type=click.Choice(["internal_error", "error", "warning", "info", "verbose", "debug", "trace"]))
    @click.option("--revision", type=str)
    def bench(**_):
        pass

    @bench.command(name="throughput")
    @click.option("--engine_dir", type=click.Path(path_type=Path))
    @click.option("--backend", type=click.Choice(["pytorch", "_autodeploy", "tensorrt"]), default="pytorch")
    @click.option("--extra_llm_api_options", type=str)
    @click.option("--max_batch_size", type=int)
    @click.option("--max_num_tokens", type=int)
    @click.option("--max_seq_len", type=int)
    @click.option("--beam_width", type=int, default=1)
    @click.option("--kv_cache_free_gpu_mem_fraction", type=float, default=0.9)
    @click.option("--dataset", type=click.Path(path_type=Path))
    @click.option("--eos_id", type=int, default=-1)
    @click.option("--modality", type=click.Choice(["image", "video"]))
    @click.option("--max_input_len", type=int, default=4096)
    @click.option("--num_requests", type=int, default=0)
    @click.option("--warmup", type=int, default=2)
    @click.option("--target_input_len", type=click.IntRange(min=1))
    @click.option("--target_output_len", type=click.IntRange(min=1))
    @click.option("--tp", type=int, default=1)
    @click.option("--pp", type=int, default=1)
    @click.option("--ep", type=int)
    @click.option("--cluster_size", type=int)
    @click.option("--concurrency", type=int, default=-1)
    @click.option("--streaming", is_flag=True)
    @click.option("--report_json", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--iteration_log", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--output_json", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--request_json", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--enable_chunked_context", is_flag=True)
    @click.option("--scheduler_policy", type=click.Choice(["guaranteed_no_evict", "max_utilization"]))
    def throughput(**_):
        pass

    return bench


def check_trtllm_bench_command(cmd: list[str]) -> dict:
    """Parse CMD (`trtllm-bench ... throughput ...`) with trtllm-bench's option definitions; returns the
    throughput command's parameters. Raises RehearsalError naming what trtllm-bench would refuse."""
    import click

    cli = trtllm_bench_cli()
    if cmd[0] != "trtllm-bench":
        raise RehearsalError(f"not a trtllm-bench command: {cmd[0]}")
    try:
        with cli.make_context("trtllm-bench", list(cmd[1:]), resilient_parsing=False) as ctx:
            name, sub, args = cli.resolve_command(ctx, ctx.protected_args + ctx.args)
            with sub.make_context(name, args, parent=ctx) as sub_ctx:
                return dict(sub_ctx.params)
    except click.ClickException as e:
        raise RehearsalError(f"trtllm-bench would refuse {' '.join(cmd)}: {e.format_message()}") from None


def rehearse_tensorrt_llm(model_dir: str | Path, calib_dataset: str | Path | None, out_dir: str | Path, settings) -> dict:
    """The tensorrt-llm engine step up to its GPU-only call: the quantization settings resolved, the calibration
    set read from the prepared dataset, ModelOpt's FP8 post-training quantization and checkpoint export run on CPU
    when ModelOpt is installed (nvidia-modelopt 0.47 runs both on CPU), the `LLM(...)` load and the trtllm-bench
    commands checked against TensorRT-LLM's argument definitions and printed. Writes an engine directory that says
    it is a rehearsal and returns its bench record (`dry_run`, no results).

    Every refusal the real step makes before its GPU call (fp8 without or with unreadable calibration data, a
    precision or architecture the backend lacks, lengths beyond the context) is made here, by the same code.
    """
    import importlib.util

    from secateurs import engine
    from secateurs.data import load_packed
    from secateurs.files import atomic_output
    from secateurs.manifest import write_manifest

    backend = engine.TensorRTLLM()
    lengths = engine.parse_lengths(settings.lengths)
    model_dir = Path(model_dir).absolute()
    calib = Path(calib_dataset).absolute() if calib_dataset is not None else None
    plan = backend.quantize_config(model_dir, settings.precision, calib)  # fp8 without calibration fails here
    if settings.precision == "fp8":
        engine.check_calibration(calib, model_dir)
    try:
        engine.validate_build(model_dir, backend.name, settings.precision, lengths, gpu_capability=REHEARSAL_GPU_CAPABILITY)
    except engine.BackendUnavailable:
        pass  # the last check: tensorrt_llm itself, which only the GPU image holds
    config = json.loads((model_dir / "config.json").read_text())
    report: dict = {"dry_run": True, "plan": plan}
    with atomic_output(out_dir) as tmp:
        if settings.precision == "fp8":
            q = plan["quantization"]["calibration"]
            batches = load_packed(calib)[0]["validation"].spread(q["samples"])[:, : q["seq_len"]]
            report["calibration"] = {"sequences": int(batches.shape[0]), "seq_len": int(batches.shape[1])}
            if importlib.util.find_spec("modelopt") is not None:
                report["modelopt"] = _modelopt_fp8(model_dir, batches, tmp, plan["quantization"]["config"])
            else:
                report["modelopt"] = "not installed here (pip install nvidia-modelopt: its FP8 PTQ and export run on CPU)"
        model_name = f"secateurs/{Path(out_dir).name}"
        commands = []
        for input_len, output_len in lengths:
            cmd = backend.bench_command(Path(out_dir), model_name, Path(out_dir) / "workspace", Path(out_dir) / "dataset.jsonl",
                                        Path(out_dir) / "report.json", settings.batch, 4 * settings.batch, settings.batch,
                                        input_len + output_len)  # fmt: skip
            check_trtllm_bench_command(cmd)
            commands.append(cmd)
        report["llm_call"] = f"tensorrt_llm.LLM(model={str(out_dir)!r}, backend='pytorch')"
        report["bench_commands"] = [" ".join(c) for c in commands]
        write_manifest(tmp, engine.ENGINE_STEP, inputs={"model": model_dir} | ({"calibration": calib} if calib else {}),
                       report=report, config={"backend": backend.name, "precision": settings.precision, "dry_run": True,
                                              "vocab_size": int(config["vocab_size"])})  # fmt: skip
    for line in [report["llm_call"], *report["bench_commands"]]:
        print(f"rehearsal: the GPU call would be: {line}", flush=True)
    return {"backend": backend.name, "precision": settings.precision, "model_name": model_dir.name,
            "batch": settings.batch, "repeats": settings.repeats, "warmup": 1, "seed": 0, "results": [],
            "dry_run": True, "report": report}  # fmt: skip


def _modelopt_fp8(model_dir: Path, batches, out: Path, config_name: str) -> dict:
    """ModelOpt's FP8 PTQ of the model on CPU with the calibration batches, exported as the real step exports it;
    returns what the exported checkpoint says of its quantization."""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)

    def forward_loop(m):
        with torch.no_grad():
            for ids in batches:
                m(ids.unsqueeze(0))

    mtq.quantize(model, getattr(mtq, config_name), forward_loop)
    export_hf_checkpoint(model, export_dir=str(out / "checkpoint"))
    quant = json.loads((out / "checkpoint" / "config.json").read_text()).get("quantization_config") or {}
    if quant.get("quant_algo") != "FP8":
        raise RehearsalError(f"ModelOpt exported no FP8 checkpoint (quantization_config: {quant})")
    return {"quant_algo": quant["quant_algo"], "ignore": quant.get("ignore", []),
            "files": sorted(p.name for p in (out / "checkpoint").iterdir())}  # fmt: skip


