"""The tensorrt-llm backend (1.2.x, in the TensorRT-LLM image, on a GPU): BF16, or FP8 by ModelOpt calibrated on our
own dataset, served by the LLM API's PyTorch backend and measured with `trtllm-bench throughput`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from secateurs.engine.workload import (
    SUPPORTED_ARCHITECTURES,
    BackendUnavailable,
    summarize_runs,
    synthetic_prompts,
)

# The image whose TensorRT-LLM version this code targets (docker/tensorrt-llm.Dockerfile's base; docs/cluster.md).
TENSORRT_LLM_IMAGE = "nvcr.io/nvidia/tensorrt-llm/release:1.2.1"


# FP8 tensor cores arrived with Ada (sm_89) and Hopper (sm_90).
FP8_MIN_CAPABILITY = (8, 9)


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


def check_gpu(precision: str, gpu_capability: tuple[int, int] | None) -> None:
    """FP8 needs FP8 tensor cores (compute capability >= 8.9); every TensorRT-LLM precision needs a GPU."""
    if gpu_capability is None:
        raise ValueError(f"{precision} engines need an NVIDIA GPU and none is visible")
    if precision == "fp8" and tuple(gpu_capability) < FP8_MIN_CAPABILITY:
        raise ValueError(
            f"fp8 needs a GPU with compute capability >= 8.9 (Ada, Hopper or newer); "
            f"this GPU has {gpu_capability[0]}.{gpu_capability[1]}"
        )
