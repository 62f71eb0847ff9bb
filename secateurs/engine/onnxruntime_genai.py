"""The onnxruntime-genai backend: runs on any CPU (the local default), int4 or fp32, fp16 on CUDA."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from secateurs.engine.workload import (
    SUPPORTED_ARCHITECTURES,
    BackendUnavailable,
    summarize_runs,
    synthetic_prompts,
)


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
