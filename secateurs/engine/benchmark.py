"""The throughput benchmark of a built engine: requests/s and output tokens/s per input:output length pair."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from secateurs.engine.build import get_backend
from secateurs.engine.trtllm import TensorRTLLM
from secateurs.engine.workload import BENCH_FILE, DEFAULT_LENGTHS, ENGINE_STEP, check_lengths, parse_lengths
from secateurs.manifest import read_manifest


def hardware_identity(backend: str) -> dict[str, Any]:
    """What a throughput measurement on `backend` depends on besides the model: the device (GPU name and driver
    for TensorRT-LLM; CPU model and core count otherwise) and the runtime's version."""
    import platform

    import torch

    if backend == TensorRTLLM.name and torch.cuda.is_available():
        device = {"gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                  "cuda": torch.version.cuda}  # fmt: skip
    else:
        cpu = platform.processor()
        with contextlib.suppress(OSError):
            cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("model name")), cpu)  # fmt: skip
        device = {"cpu": cpu, "machine": platform.machine(), "cores": len(os.sched_getaffinity(0))}
    runtime = {"tensorrt-llm": "tensorrt_llm", "onnxruntime-genai": "onnxruntime-genai"}.get(backend, backend)
    try:
        version = importlib.metadata.version(runtime)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {**device, "runtime": f"{runtime} {version}"}


def bench_engine(
    engine_dir: str | Path,
    lengths: str | Sequence[tuple[int, int]] = DEFAULT_LENGTHS,
    batch: int = 8,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    out: str | Path | None = None,
    num_requests: int | None = None,
) -> dict[str, Any]:
    """Throughput of an engine per (input, output) length pair, written as JSON.

    For each pair: `warmup` untimed runs, then `repeats` timed runs of the same synthetic requests
    (onnxruntime-genai: one batch of `batch` prompts per run; tensorrt-llm: `num_requests` requests, default
    4 x batch, at concurrency `batch`). Reports median, min, max and relative spread of requests/s and output
    tokens/s.

    Args:
        out: where to write the results; default `engine_dir/bench.json`.

    Returns:
        {"backend", "precision", "model_name", "batch", "repeats", "warmup", "seed", "results": [per pair]}.
    """
    engine_dir = Path(engine_dir).absolute()
    manifest = read_manifest(engine_dir)
    if manifest.get("step") != ENGINE_STEP:
        raise ValueError(f"{engine_dir} is not an engine made by `secateurs build-engine`")
    config = manifest["config"]
    lengths = parse_lengths(lengths)
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"batch={batch} and repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    check_lengths(lengths, config["max_position_embeddings"])
    engine = get_backend(config["backend"])
    results = engine.bench(
        engine_dir,
        config,
        lengths,
        batch=batch,
        repeats=repeats,
        warmup=warmup,
        seed=seed,
        num_requests=num_requests,
    )
    bench = {
        "backend": config["backend"],
        "precision": config["precision"],
        "model_name": config["model_name"],
        "batch": batch,
        "repeats": repeats,
        "warmup": warmup,
        "seed": seed,
        "results": results,
    }
    out = Path(out) if out is not None else engine_dir / BENCH_FILE
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(bench, indent=2))
    os.replace(tmp, out)
    return bench
