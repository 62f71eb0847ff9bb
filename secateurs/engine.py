"""Inference engines and their throughput benchmark (recipe step 6: deployment).

Consumes a model artifact (a stock HF checkpoint dir with `config.json` and tokenizer files) and produces an
engine artifact: a directory a serving runtime loads, plus `secateurs.json` whose `config` records the
backend, precision, architecture, context length and vocabulary, so `bench_engine` needs nothing but the
directory.

Two backends:
- `onnxruntime-genai` (runs on any CPU; the local default): the ONNX Runtime GenAI model builder converts the
  checkpoint to int4 or fp32 for the CPU, or fp16 for CUDA where `onnxruntime-genai-cuda` is installed. The
  benchmark drives `og.Model` / `og.Generator` in-process.
- `tensorrt-llm` (1.2.x, in the TensorRT-LLM image, on a GPU): BF16 is the checkpoint cast to bfloat16; FP8
  is ModelOpt post-training quantization (`mtq.FP8_DEFAULT_CFG`, max calibration on our own dataset)
  exported as an HF checkpoint with `export_hf_checkpoint`. Both are served by the LLM API's PyTorch
  backend, the path that replaces the frozen TensorRT engine builder (`trtllm-build`), and are benchmarked
  with `trtllm-bench throughput` on a synthetic dataset we write ourselves.

Guarantees: every benchmark request has exactly the requested input length (random ids from the tokenizer's
vocabulary, special tokens excluded) and produces exactly the requested output length (EOS is masked until
the last position), so requests/s and output tokens/s of two models are comparable. Bad input (a precision
the backend lacks, FP8 on a GPU without FP8, an architecture the backend cannot convert, lengths beyond the
model's context, a missing runtime) raises before any expensive work and leaves existing outputs untouched.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from secateurs.manifest import atomic_output, read_manifest, write_manifest

ENGINE_STEP = "build-engine"
BENCH_FILE = "bench.json"
DEFAULT_LENGTHS: tuple[tuple[int, int], ...] = ((128, 128), (2048, 128))
# The image whose TensorRT-LLM version this code targets (docker/tensorrt-llm.Dockerfile's base; docs/cluster.md).
TENSORRT_LLM_IMAGE = "nvcr.io/nvidia/tensorrt-llm/release:1.2.1"
# The families secateurs prunes; both backends convert each of them.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# FP8 tensor cores arrived with Ada (sm_89) and Hopper (sm_90).
FP8_MIN_CAPABILITY = (8, 9)


class BackendUnavailable(RuntimeError):
    """The backend's runtime is not installed on this machine (a reason to skip, not a bad input)."""


# ----------------------------------------------------------------------------------------------------
# Length pairs and synthetic prompts (shared by both backends)


def parse_lengths(spec: str | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """`"128:128,2048:128"` -> `[(128, 128), (2048, 128)]` (input tokens, output tokens)."""
    if not isinstance(spec, str):
        pairs = [(int(i), int(o)) for i, o in spec]
    else:
        pairs = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            parts = item.split(":")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise ValueError(f"length pair {item!r} is not INPUT:OUTPUT (e.g. 128:128)")
            pairs.append((int(parts[0]), int(parts[1])))
    if not pairs:
        raise ValueError(f"no length pairs in {spec!r}; expected e.g. 128:128,2048:128")
    for i, o in pairs:
        if i < 1 or o < 1:
            raise ValueError(f"length pair {i}:{o} must have at least one input and one output token")
    return pairs


def check_lengths(lengths: Sequence[tuple[int, int]], context: int) -> None:
    """Refuse length pairs whose prompt + generation does not fit the model's context window."""
    for i, o in lengths:
        if i + o > context:
            raise ValueError(
                f"length pair {i}:{o} needs {i + o} positions but the model's context "
                f"(max_position_embeddings) is {context}"
            )


def synthetic_prompts(
    tokenizer_dir: str | Path, vocab_size: int, num: int, length: int, seed: int
) -> np.ndarray:
    """Random prompts of exactly `length` tokens drawn from the tokenizer's vocabulary.

    Special tokens (BOS/EOS/PAD, chat markers) are excluded so no prompt ends early or changes the chat state,
    the same rule `trtllm-bench prepare-dataset` applies to EOS.

    Returns:
        int32 array [num, length].
    """
    tokenizer_size, special_ids = _tokenizer_vocabulary(
        str(Path(tokenizer_dir).absolute()), _tokenizer_stamp(Path(tokenizer_dir))
    )
    # The model's embedding may be padded beyond the tokenizer; padded rows are not tokens.
    high = min(tokenizer_size, vocab_size)
    allowed = np.setdiff1d(np.arange(high), np.asarray(special_ids, dtype=np.int64))
    rng = np.random.default_rng(seed)
    return allowed[rng.integers(0, len(allowed), size=(num, length))].astype(np.int32)


def _tokenizer_stamp(tokenizer_dir: Path) -> tuple[float, ...]:
    return tuple(f.stat().st_mtime for f in sorted(tokenizer_dir.glob("tokenizer*")))


@functools.lru_cache(maxsize=8)
def _tokenizer_vocabulary(tokenizer_dir: str, stamp: tuple[float, ...]) -> tuple[int, tuple[int, ...]]:
    """(vocabulary size, special token ids); cached because loading a 150k-token tokenizer takes seconds.
    `stamp` (the tokenizer files' mtimes) makes a rewritten tokenizer a new cache key."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return len(tokenizer), tuple(tokenizer.all_special_ids)


def summarize_runs(seconds: Sequence[float], requests: int, output_tokens: int) -> dict[str, Any]:
    """Median and spread of requests/s and output tokens/s over timed repeats of the same work."""

    def spread(values: list[float]) -> dict[str, float]:
        med = statistics.median(values)
        return {
            "median": med,
            "min": min(values),
            "max": max(values),
            "rel_spread": (max(values) - min(values)) / med if med else 0.0,
        }

    return {
        "requests_per_s": spread([requests / s for s in seconds]),
        "output_tokens_per_s": spread([output_tokens / s for s in seconds]),
        "seconds": list(seconds),
    }


def _model_config(model_dir: Path) -> dict[str, Any]:
    f = model_dir / "config.json"
    if not f.is_file():
        raise ValueError(f"{model_dir} is not a Hugging Face checkpoint (no config.json)")
    return json.loads(f.read_text())


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


def _gpu_capability() -> tuple[int, int] | None:
    import torch

    return tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None


# ----------------------------------------------------------------------------------------------------
# onnxruntime-genai


class OnnxRuntimeGenAI:
    """ONNX Runtime GenAI: the model builder converts, `og.Generator` runs."""

    name = "onnxruntime-genai"
    # precision -> execution provider the builder targets
    precisions: ClassVar[dict[str, str]] = {"int4": "cpu", "fp32": "cpu", "fp16": "cuda"}
    architectures = SUPPORTED_ARCHITECTURES

    def check_runtime(self, precision: str, gpu_capability: tuple[int, int] | None) -> None:
        """Is the runtime that builds and runs `precision` engines installed here?"""
        if importlib.util.find_spec("onnxruntime_genai") is None:
            raise BackendUnavailable(f"{self.name} is not installed: pip install 'secateurs[engine]'")
        if self.precisions[precision] == "cuda":
            import onnxruntime_genai as og

            if not og.is_cuda_available():
                raise ValueError(
                    f"{self.name} {precision} runs on CUDA: install onnxruntime-genai-cuda "
                    "on a machine with an NVIDIA GPU, or build int4/fp32 for the CPU"
                )

    def builder_command(self, model_dir: Path, out_dir: Path, precision: str, cache_dir: Path) -> list[str]:
        """The model builder's command line (`-i` takes a local checkpoint; nothing is fetched from a hub)."""
        return [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(model_dir),
            "-o",
            str(out_dir),
            "-p",
            precision,
            "-e",
            self.precisions[precision],
            "-c",
            str(cache_dir),
        ]

    def build(self, model_dir: Path, out_dir: Path, precision: str, **_: Any) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="og-builder-cache-") as cache:
            cmd = self.builder_command(model_dir, out_dir, precision, Path(cache))
            # HF_HUB_OFFLINE: the input is local; a hub lookup would only hang on an offline machine.
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
            raise RuntimeError(f"onnxruntime-genai model builder failed ({proc.returncode}):\n{tail}")
        import importlib.metadata as md

        return {
            "execution_provider": self.precisions[precision],
            "onnxruntime_genai": md.version("onnxruntime-genai"),
        }

    def bench(
        self,
        engine_dir: Path,
        config: dict[str, Any],
        lengths: Sequence[tuple[int, int]],
        batch: int,
        repeats: int,
        warmup: int,
        seed: int,
        **_: Any,
    ) -> list[dict[str, Any]]:
        import onnxruntime_genai as og

        model = og.Model(str(engine_dir))
        results = []
        for input_len, output_len in lengths:
            prompts = synthetic_prompts(engine_dir, config["vocab_size"], batch, input_len, seed)
            for _ in range(warmup):
                self._generate(og, model, prompts, output_len)
            seconds, counts = [], []
            for _ in range(repeats):
                dt, produced = self._generate(og, model, prompts, output_len)
                seconds.append(dt)
                counts.append(produced)
            results.append(
                {
                    "input_len": input_len,
                    "output_len": output_len,
                    "batch": batch,
                    "requests_per_run": batch,
                    "output_tokens_per_request": counts,
                    **summarize_runs(seconds, batch, batch * output_len),
                }
            )
        return results

    @staticmethod
    def _generate(og, model, prompts: np.ndarray, output_len: int) -> tuple[float, list[int]]:
        """Greedy-generate exactly `output_len` tokens per prompt of `prompts` [B, L]; (seconds, counts)."""
        batch, input_len = prompts.shape
        params = og.GeneratorParams(model)
        # min_length == max_length masks EOS until the last position: every request runs to full length.
        params.set_search_options(
            batch_size=batch,
            max_length=input_len + output_len,
            min_length=input_len + output_len,
            do_sample=False,
        )
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompts)  # prefill is part of a request's cost
        while not generator.is_done():
            generator.generate_next_token()
        seconds = time.perf_counter() - start
        return seconds, [len(generator.get_sequence(i)) - input_len for i in range(batch)]


# ----------------------------------------------------------------------------------------------------
# TensorRT-LLM


class TensorRTLLM:
    """TensorRT-LLM 1.2.x: ModelOpt checkpoints on the LLM API's PyTorch backend, timed by trtllm-bench."""

    name = "tensorrt-llm"
    precisions = ("bf16", "fp8")
    architectures = SUPPORTED_ARCHITECTURES
    calib_samples = 512  # ModelOpt's hf_ptq default calibration size
    calib_seq_len = 512

    def check_runtime(self, precision: str, gpu_capability: tuple[int, int] | None) -> None:
        """tensorrt_llm installed, and a GPU that runs `precision`."""
        if importlib.util.find_spec("tensorrt_llm") is None:
            raise BackendUnavailable(
                f"tensorrt_llm is not installed: build and bench {self.name} engines "
                f"in the TensorRT-LLM image ({TENSORRT_LLM_IMAGE}) on a GPU"
            )
        check_gpu(precision, gpu_capability)

    def quantize_config(self, model_dir: Path, precision: str, calib_dataset: Path | None) -> dict[str, Any]:
        """What `build` does to the checkpoint, recorded in the engine's manifest."""
        if precision == "bf16":
            return {"precision": "bf16", "dtype": "bfloat16", "quantization": None}
        if calib_dataset is None:
            raise ValueError(
                "tensorrt-llm fp8 needs calibration data: pass calib_dataset "
                "(a dataset made by `secateurs prepare-data`)"
            )
        return {
            "precision": "fp8",
            "dtype": "bfloat16",
            "quantization": {
                "library": "modelopt",
                "config": "FP8_DEFAULT_CFG",  # per-tensor FP8 weights and activations; KV cache stays bf16
                "algorithm": "max",
                "export": "export_hf_checkpoint",
                "calibration": {
                    "dataset": str(calib_dataset),
                    "split": "validation",
                    "samples": self.calib_samples,
                    "seq_len": self.calib_seq_len,
                },
            },
        }

    def build(
        self, model_dir: Path, out_dir: Path, precision: str, calib_dataset: Path | None = None, **_: Any
    ) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        plan = self.quantize_config(model_dir, precision, calib_dataset)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16, device_map="cuda")
        if precision == "bf16":
            model.save_pretrained(str(out_dir))
        else:
            import modelopt.torch.quantization as mtq
            from modelopt.torch.export import export_hf_checkpoint

            calib = plan["quantization"]["calibration"]
            batches = _calibration_batches(Path(calib["dataset"]), calib["samples"], calib["seq_len"])

            def forward_loop(m):
                with torch.no_grad():
                    for ids in batches:
                        m(ids.to(m.device))

            mtq.quantize(model, getattr(mtq, plan["quantization"]["config"]), forward_loop)
            export_hf_checkpoint(model, export_dir=str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
        del model
        torch.cuda.empty_cache()
        # Load the result once with the runtime that serves it, so a checkpoint it cannot read fails here.
        from tensorrt_llm import LLM, SamplingParams

        llm = LLM(model=str(out_dir), backend="pytorch")
        out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=4))
        llm.shutdown()
        return {"plan": plan, "smoke_output": out[0].outputs[0].text}

    # -- benchmark ---------------------------------------------------------------------------------------

    @staticmethod
    def dataset_lines(prompts: np.ndarray, output_len: int) -> list[str]:
        """trtllm-bench's dataset format: one compact JSON object per request (see
        tensorrt_llm/bench/utils/data.py `create_dataset_from_stream`: `task_id`, `input_ids`,
        `output_tokens`)."""
        return [
            json.dumps(
                {"task_id": i, "input_ids": [int(t) for t in ids], "output_tokens": output_len},
                separators=(",", ":"),
            )
            for i, ids in enumerate(prompts)
        ]

    @staticmethod
    def bench_command(
        engine_dir: Path,
        model_name: str,
        workspace: Path,
        dataset: Path,
        report: Path,
        batch: int,
        num_requests: int,
        warmup: int,
        max_seq_len: int,
    ) -> list[str]:
        """One `trtllm-bench throughput` run at a fixed concurrency of `batch` requests."""
        return [
            "trtllm-bench",
            "--model",
            model_name,
            "--model_path",
            str(engine_dir),
            "--workspace",
            str(workspace),
            "throughput",
            "--backend",
            "pytorch",
            "--dataset",
            str(dataset),
            "--concurrency",
            str(batch),
            "--max_batch_size",
            str(batch),
            "--num_requests",
            str(num_requests),
            "--warmup",
            str(warmup),
            "--max_seq_len",
            str(max_seq_len),
            # -1 disables EOS, so every request generates exactly output_tokens
            "--eos_id",
            "-1",
            "--report_json",
            str(report),
        ]

    @staticmethod
    def parse_report(report: dict[str, Any], output_len: int) -> dict[str, float]:
        """requests/s and output tokens/s from trtllm-bench's `--report_json`."""
        perf, requests = report["performance"], report["request_info"]
        if abs(requests["avg_output_length"] - output_len) > 1e-6:
            raise RuntimeError(
                f"trtllm-bench generated {requests['avg_output_length']} tokens per request "
                f"on average instead of {output_len}: the numbers are not comparable"
            )
        return {
            "requests_per_s": float(perf["request_throughput_req_s"]),
            "output_tokens_per_s": float(perf["system_output_throughput_tok_s"]),
            "num_requests": int(requests["num_requests"]),
        }

    def bench(
        self,
        engine_dir: Path,
        config: dict[str, Any],
        lengths: Sequence[tuple[int, int]],
        batch: int,
        repeats: int,
        warmup: int,
        seed: int,
        num_requests: int | None = None,
        **_: Any,
    ) -> list[dict[str, Any]]:
        if shutil.which("trtllm-bench") is None:
            raise BackendUnavailable(
                f"trtllm-bench is not on PATH: run the benchmark in {TENSORRT_LLM_IMAGE}"
            )
        num_requests = num_requests or 4 * batch
        # trtllm-bench refuses a --model that names an existing path; the directory name is only a label.
        model_name = f"secateurs/{engine_dir.name}"
        results = []
        for input_len, output_len in lengths:
            prompts = synthetic_prompts(engine_dir, config["vocab_size"], num_requests, input_len, seed)
            runs = []
            with tempfile.TemporaryDirectory(prefix="trtllm-bench-") as ws:
                ws = Path(ws)
                dataset = ws / "dataset.jsonl"
                dataset.write_text("\n".join(self.dataset_lines(prompts, output_len)) + "\n")
                for r in range(repeats):
                    report = ws / f"report-{r}.json"
                    cmd = self.bench_command(
                        engine_dir,
                        model_name,
                        ws,
                        dataset,
                        report,
                        batch,
                        num_requests,
                        warmup * batch,
                        input_len + output_len,
                    )
                    proc = subprocess.run(cmd, cwd=ws, capture_output=True, text=True, check=False)
                    if proc.returncode != 0:
                        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
                        raise RuntimeError(f"trtllm-bench failed ({proc.returncode}):\n{tail}")
                    runs.append(self.parse_report(json.loads(report.read_text()), output_len))
            # trtllm-bench reports rates, not durations: turn them back into seconds for the shared summary.
            seconds = [num_requests / run["requests_per_s"] for run in runs]
            results.append(
                {
                    "input_len": input_len,
                    "output_len": output_len,
                    "batch": batch,
                    "requests_per_run": num_requests,
                    **summarize_runs(seconds, num_requests, num_requests * output_len),
                }
            )
        return results


def check_calibration(dataset: str | Path, model_dir: str | Path) -> None:
    """Refuse, before the model is loaded, a calibration dataset that `load_packed` cannot open or that was
    tokenized with another tokenizer than the model's."""
    from secateurs.checkpoint import load_tokenizer
    from secateurs.data import check_matches, load_packed

    _, data_config = load_packed(dataset)
    check_matches(data_config, load_tokenizer(model_dir), where=f"calibration dataset {dataset}")


def _calibration_batches(dataset: str | Path, samples: int, seq_len: int):
    """Up to `samples` sequences [1, seq_len] spread over the validation split of a dataset that `secateurs
    prepare-data` made (token shards + index, local or on S3), read through `data.load_packed` as every other
    step reads it."""
    from secateurs.data import load_packed

    dataset_splits, _ = load_packed(dataset)
    return [row[:seq_len].unsqueeze(0) for row in dataset_splits["validation"].spread(samples)]


BACKENDS: dict[str, OnnxRuntimeGenAI | TensorRTLLM] = {b.name: b for b in (OnnxRuntimeGenAI(), TensorRTLLM())}


def get_backend(name: str) -> OnnxRuntimeGenAI | TensorRTLLM:
    if name not in BACKENDS:
        raise ValueError(f"unknown engine backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def check_gpu(precision: str, gpu_capability: tuple[int, int] | None) -> None:
    """FP8 needs FP8 tensor cores (compute capability >= 8.9); every TensorRT-LLM precision needs a GPU."""
    if gpu_capability is None:
        raise ValueError(f"{precision} engines need an NVIDIA GPU and none is visible")
    if precision == "fp8" and tuple(gpu_capability) < FP8_MIN_CAPABILITY:
        raise ValueError(
            f"fp8 needs a GPU with compute capability >= 8.9 (Ada, Hopper or newer); "
            f"this GPU has {gpu_capability[0]}.{gpu_capability[1]}"
        )


# ----------------------------------------------------------------------------------------------------
# Public entry points


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
        gpu_capability = _gpu_capability() if backend == TensorRTLLM.name else None
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
