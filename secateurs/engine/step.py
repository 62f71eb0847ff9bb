"""The pipeline's engine step: build an engine of a model and benchmark it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from secateurs.engine.benchmark import bench_engine
from secateurs.engine.build import build_engine
from secateurs.engine.workload import parse_lengths


def run(model_dir: str | Path, calib_dataset: str | Path | None, out_dir: str | Path, settings) -> dict[str, Any]:
    """The pipeline's engine step: build an engine of MODEL into OUT_DIR and benchmark it.

    Args:
        calib_dataset: a secateurs dataset directory (tensorrt-llm fp8 calibrates on its validation split).
        settings: an `EngineConfig`: backend, precision, input:output lengths, batch and repeats.

    Returns:
        The benchmark results (`bench_engine`'s).
    """
    lengths = parse_lengths(settings.lengths)
    build_engine(model_dir, settings.backend, settings.precision, out_dir, lengths=lengths, calib_dataset=calib_dataset)
    return bench_engine(out_dir, lengths, batch=settings.batch, repeats=settings.repeats)
