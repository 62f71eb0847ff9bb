"""Building an engine: the backend chosen, every refusal made before expensive work, the engine artifact written
atomically.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from secateurs.engine.onnxruntime_genai import OnnxRuntimeGenAI
from secateurs.engine.trtllm import TensorRTLLM, check_calibration
from secateurs.engine.workload import ENGINE_STEP, _model_config, check_lengths, detect_gpu_capability
from secateurs.files import atomic_output
from secateurs.manifest import write_manifest

BACKENDS: dict[str, OnnxRuntimeGenAI | TensorRTLLM] = {b.name: b for b in (OnnxRuntimeGenAI(), TensorRTLLM())}


def get_backend(name: str) -> OnnxRuntimeGenAI | TensorRTLLM:
    if name not in BACKENDS:
        raise ValueError(f"unknown engine backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def validate_build(
    model_dir: str | Path,
    backend: str,
    precision: str,
    lengths: Sequence[tuple[int, int]] | None = None,
    gpu_capability: tuple[int, int] | None | str = "detect",
) -> dict[str, Any]:
    """Every check `build_engine` makes before it starts; returns the model's config.json.

    Args:
        gpu_capability: the CUDA compute capability (major, minor) to check FP8 against, None for no GPU;
            "detect" asks torch.
    """
    model_dir = Path(model_dir)
    engine = get_backend(backend)
    config = _model_config(model_dir)
    if precision not in engine.precisions:
        raise ValueError(
            f"{backend} does not support precision {precision!r}; "
            f"choose one of {', '.join(engine.precisions)}"
        )
    arch = (config.get("architectures") or ["<none>"])[0]
    if arch not in engine.architectures:
        raise ValueError(
            f"{backend} cannot convert {arch} models; supported: {', '.join(engine.architectures)}"
        )
    if lengths is not None:
        check_lengths(lengths, int(config["max_position_embeddings"]))
    if gpu_capability == "detect":
        gpu_capability = detect_gpu_capability() if backend == TensorRTLLM.name else None
    engine.check_runtime(precision, gpu_capability)
    return config


def build_engine(
    model_dir: str | Path,
    backend: str,
    precision: str,
    out_dir: str | Path,
    lengths: Sequence[tuple[int, int]] | None = None,
    calib_dataset: str | Path | None = None,
    overwrite: bool = True,
) -> dict[str, Any]:
    """Convert a checkpoint into an engine directory for `backend` at `precision`.

    Args:
        model_dir: HF checkpoint directory (a secateurs model artifact).
        backend: "onnxruntime-genai" or "tensorrt-llm".
        precision: int4 | fp32 | fp16 (onnxruntime-genai); bf16 | fp8 (tensorrt-llm).
        out_dir: the engine directory; replaced atomically, and only when the build succeeds.
        lengths: (input, output) pairs the engine will be benchmarked at; checked against the context now so a
            bad pair fails before the build.
        calib_dataset: a secateurs dataset directory; tensorrt-llm fp8 calibrates on its validation split.

    Returns:
        The engine manifest (also written to `out_dir/secateurs.json`).
    """
    model_dir = Path(model_dir).absolute()
    calib = Path(calib_dataset).absolute() if calib_dataset is not None else None
    engine = get_backend(backend)
    if isinstance(engine, TensorRTLLM) and precision == "fp8":
        engine.quantize_config(model_dir, precision, calib)  # fp8 without calibration data fails here
        check_calibration(calib, model_dir)  # and with data it cannot read, before the GPU is asked for
    config = validate_build(model_dir, backend, precision, lengths)
    start = time.perf_counter()
    with atomic_output(out_dir, overwrite=overwrite) as tmp:
        report = engine.build(model_dir, tmp, precision, calib_dataset=calib)
        report["build_seconds"] = time.perf_counter() - start
        report["size_bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        inputs = {"model": model_dir} | ({"calibration": calib} if calib else {})
        manifest = write_manifest(
            tmp,
            ENGINE_STEP,
            inputs=inputs,
            report=report,
            config={
                "backend": backend,
                "precision": precision,
                "architecture": config["architectures"][0],
                "max_position_embeddings": int(config["max_position_embeddings"]),
                "vocab_size": int(config["vocab_size"]),
                "model_name": model_dir.name,
            },
        )
    return manifest
