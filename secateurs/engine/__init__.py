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

The package, one job a module: `onnxruntime_genai` and `trtllm` (the two backends), `build` (choosing a backend,
the refusals, the engine artifact), `benchmark` (measuring a built engine), `step` (the pipeline's engine step:
build, then benchmark); `workload` holds what they share (lengths, prompts, figures). This face hands on their
public names.
"""

from secateurs.engine.benchmark import bench_engine, hardware_identity
from secateurs.engine.build import BACKENDS, build_engine, get_backend, validate_build
from secateurs.engine.onnxruntime_genai import OnnxRuntimeGenAI
from secateurs.engine.step import run
from secateurs.engine.trtllm import (
    FP8_MIN_CAPABILITY,
    TENSORRT_LLM_IMAGE,
    TensorRTLLM,
    check_calibration,
    check_gpu,
)
from secateurs.engine.workload import (
    BENCH_FILE,
    DEFAULT_LENGTHS,
    ENGINE_STEP,
    SUPPORTED_ARCHITECTURES,
    BackendUnavailable,
    check_lengths,
    detect_gpu_capability,
    parse_lengths,
    summarize_runs,
    synthetic_prompts,
)

__all__ = [
    "BACKENDS",
    "BENCH_FILE",
    "BackendUnavailable",
    "DEFAULT_LENGTHS",
    "ENGINE_STEP",
    "FP8_MIN_CAPABILITY",
    "OnnxRuntimeGenAI",
    "SUPPORTED_ARCHITECTURES",
    "TENSORRT_LLM_IMAGE",
    "TensorRTLLM",
    "bench_engine",
    "build_engine",
    "check_calibration",
    "check_gpu",
    "check_lengths",
    "get_backend",
    "detect_gpu_capability",
    "hardware_identity",
    "parse_lengths",
    "run",
    "summarize_runs",
    "synthetic_prompts",
    "validate_build",
]
