"""A latency budget: an engine of each shape measured for output tokens/s, cached, and the shapes that meet it.

An engine of each shape, with random weights, is built and benchmarked by `secateurs.engine` from the largest shape
down, each shape measured once (cached under the secateurs cache, by shape, settings and hardware).
"""

from __future__ import annotations

import json
from pathlib import Path

from secateurs.config import SearchConfig
from secateurs.families import Shape
from secateurs.search.grid import Candidate, ParameterCounter, SearchError, describe_budget


def within_latency(under: list[Candidate], counter: ParameterCounter, settings: SearchConfig) -> list[Candidate]:
    """The largest shapes under the parameter budget whose measured throughput meets the latency budget: shapes
    are measured from the largest down (throughput grows as shapes shrink, but not monotonically across width
    and depth, so each is measured) until `max_candidates` meet it, or every shape was measured."""
    under = sorted(under, key=lambda c: (-c.parameters, c.name))
    met = []
    for candidate in under:
        speed = measure_throughput(counter.config, counter.model_dir, candidate.shape, settings, counter.data_dir)
        if speed >= settings.latency:
            met.append(candidate)
            if len(met) == settings.max_candidates:
                break
    if not met:
        raise SearchError(f"no candidate shape meets the {describe_budget(settings)}: the fastest of the "
                          f"{len(under)} measured shapes is below it")  # fmt: skip
    return met


def check_engine(settings: SearchConfig) -> None:
    """A latency budget needs its engine backend on this machine: one line before any work when it is not."""
    if settings.latency is None:
        return
    from secateurs import engine

    backend = engine.get_backend(settings.engine_backend)
    if settings.engine_precision not in backend.precisions:
        raise SearchError(f"engine_precision={settings.engine_precision!r} is not one of {settings.engine_backend}'s: "
                          f"{', '.join(backend.precisions)}")  # fmt: skip
    engine.parse_lengths(settings.engine_lengths)
    try:
        backend.check_runtime(settings.engine_precision, engine.detect_gpu_capability() if
                              settings.engine_backend == engine.TensorRTLLM.name else None)  # fmt: skip
    except engine.BackendUnavailable as e:
        raise SearchError(f"latency budget: the {settings.engine_backend} engine backend is not available here "
                          f"({e})") from None  # fmt: skip


def measure_throughput(
    config, model_dir: str | Path, shape: Shape, settings: SearchConfig, calib_dataset: str | Path | None = None
) -> float:
    """Median output tokens/s of an engine of `shape` (random weights: speed does not depend on their values) at
    the settings' lengths and batch, cached by shape, measurement settings and the hardware and runtime measured
    on, under the secateurs cache (which may be a volume that machines of several kinds share). An fp8 engine is
    calibrated on `calib_dataset` (its values do not change the speed, but TensorRT-LLM's fp8 build needs them)."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from secateurs import engine
    from secateurs.checkpoint import load_tokenizer, save_checkpoint
    from secateurs.families import family_of
    from secateurs.files import cache_dir
    from secateurs.manifest import json_digest
    from secateurs.prune import PrunePlan, pruned_config

    new = pruned_config(config, PrunePlan(kept_layers=list(range(shape.num_hidden_layers)), hidden=None,
                                          shape=shape), family_of(config))  # fmt: skip
    key = {"config": new.to_dict(), "backend": settings.engine_backend, "precision": settings.engine_precision,
           "lengths": settings.engine_lengths, "batch": settings.engine_batch,
           "hardware": engine.hardware_identity(settings.engine_backend)}  # fmt: skip
    cached = cache_dir() / "search-throughput" / f"{json_digest(key)}.json"
    if cached.is_file():
        return json.loads(cached.read_text())["output_tokens_per_s"]
    lengths = engine.parse_lengths(settings.engine_lengths)
    with tempfile.TemporaryDirectory(prefix="search-engine-") as tmp:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(new, dtype=torch.float32)
        save_checkpoint(model, load_tokenizer(model_dir), Path(tmp) / "model")
        engine.build_engine(Path(tmp) / "model", settings.engine_backend, settings.engine_precision,
                            Path(tmp) / "engine", lengths, calib_dataset=calib_dataset)  # fmt: skip
        bench = engine.bench_engine(Path(tmp) / "engine", lengths, batch=settings.engine_batch, repeats=2)
    speed = min(r["output_tokens_per_s"]["median"] for r in bench["results"])
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps({**key, "shape": shape.as_dict(), "output_tokens_per_s": speed}, indent=1))
    print(f"search: {Candidate(shape, 0).name} measured at {speed:.1f} output tokens/s")
    return speed

