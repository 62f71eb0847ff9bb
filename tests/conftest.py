"""Shared fixtures: a real tokenizer, tiny random-weight models of every family, a small packed dataset, and the
real SmolLM2-135M (converted once per machine into the secateurs cache, then copied)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Never reach for a hub in tests; a stray download would hang CI.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("SECATEURS_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "secateurs"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILY_CASES = ["llama-tied", "llama-untied", "mistral", "qwen2", "qwen3"]


def pytest_sessionstart(session):
    # A full disk shows up as dozens of unrelated safetensors errors; this line says up front how much room there is.
    import shutil
    import tempfile

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    base = Path(session.config.option.basetemp or tempfile.gettempdir()).absolute()
    existing = next(p for p in (base, *base.parents) if p.exists())
    free = shutil.disk_usage(existing).free / 2**30
    if reporter is not None:
        reporter.write_line(f"free disk under {base}: {free:.1f} GiB (the suite needs about 4.5 GiB there at its peak)")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M as a stock checkpoint (import-model smollm2-135m)."""
    from secateurs.checkpoint import import_model

    out = tmp_path_factory.mktemp("smollm2") / "teacher"
    import_model("smollm2-135m", out)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(smollm2_dir) -> Path:
    return smollm2_dir


def tiny_config(case: str, vocab_size: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    if case == "llama-tied":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if case == "llama-untied":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if case == "mistral":
        return MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
    if case == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if case == "qwen3":
        return Qwen3Config(**common, tie_word_embeddings=False)
    raise ValueError(case)


def make_tiny_model(case: str, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """A random-weight model of one family, saved with a real tokenizer and a manifest."""
    from transformers import AutoModelForCausalLM

    from secateurs.checkpoint import load_tokenizer, save_checkpoint
    from secateurs.manifest import write_manifest

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(case, len(tokenizer)), dtype=torch.float32)
    # Random norms and biases, so pruning bugs that drop or misplace them change the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    save_checkpoint(model, tokenizer, out)
    write_manifest(out, "import-model", config={"source": f"tiny-{case}"})
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {case: make_tiny_model(case, tokenizer_dir, root / case) for case in FAMILY_CASES}


@pytest.fixture(scope="session")
def docs_dir(tmp_path_factory) -> Path:
    """A few hundred KB of real English prose and signatures (python-docs) as a local corpus: a directory of 40
    .txt files, one document (one module's documentation) each."""
    from secateurs.data import python_docs_texts

    path = tmp_path_factory.mktemp("corpus") / "docs"
    path.mkdir()
    for i, text in enumerate(python_docs_texts()[:40]):
        (path / f"{i:02d}.txt").write_text(text)
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tokenizer_dir, docs_dir) -> Path:
    from secateurs.config import DataConfig
    from secateurs.data import prepare_data

    out = tmp_path_factory.mktemp("data") / "packed"
    prepare_data(tokenizer_dir, out, DataConfig(source=str(docs_dir), seq_len=32, max_tokens=32 * 80, val_fraction=0.2))
    return out


@pytest.fixture(scope="session")
def tiny_importance(tmp_path_factory, tiny_models, tiny_data) -> dict[str, Path]:
    from secateurs import importance
    from secateurs.config import ImportanceConfig

    root = tmp_path_factory.mktemp("importance")
    return {
        case: (importance.run(path, tiny_data, root / case, ImportanceConfig(samples=16, batch_size=8, block_sizes=[1, 2], depth_samples=4)), root / case)[1]
        for case, path in tiny_models.items()
    }


@pytest.fixture(scope="session")
def failed_then_resumed(tmp_path_factory, tiny_models, docs_dir):
    """One tiny pipeline run (tests/test_pipeline.py's `tiny_config`: students a and b, teacher correction, distill
    in two processes, the data's shards in a store) that fails at distill:b (injected), then the same command
    again, which finishes it. Shared: the pipeline tests read its steps and records, the MLflow UI tests render
    what it recorded.

    Returns:
        (the run directory, the outputs recorded after the failure).
    """
    import typer
    import yaml
    from test_pipeline import tiny_config

    from secateurs.local_run import read_run
    from secateurs.pipeline_cli import run_cmd
    from secateurs.run_records import recorded_outputs

    config = tiny_config(tiny_models["llama-tied"], docs_dir)
    # The shards in a store, as on a cluster's cache volume: every step reads them through the run's dataset
    # artifact, which holds only their index.
    config["placement"]["data_store"] = str(tmp_path_factory.mktemp("volume") / "datasets")
    config_file = tmp_path_factory.mktemp("config") / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config))
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    mp = pytest.MonkeyPatch()
    mp.setenv("SECATEURS_FAIL_STEP", "distill:b")
    with pytest.raises(typer.Exit):
        run_cmd(config_file, run_dir)
    mp.undo()
    _, state = read_run(run_dir)
    after_failure = recorded_outputs(state)
    run_cmd(config_file, run_dir)
    return run_dir, after_failure


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on a free port of 127.0.0.1 (SQLite backend, proxied artifacts under `root`).

    It starts when made, and takes seconds to answer: make it early, do other work, then `wait()`.

    Args:
        root: directory for its log, artifacts and (unless `backend_store_uri` is given) its SQLite database.
        backend_store_uri: the store to serve, e.g. the `sqlite:///.../mlflow.db` a local run wrote.
    """

    def __init__(self, root: Path, backend_store_uri: str | None = None) -> None:
        import subprocess
        import sys

        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--backend-store-uri", backend_store_uri or f"sqlite:///{root / 'mlflow.db'}", "--workers", "1"]
        command += ["--artifacts-destination", str(root / "artifacts")]
        # The server's job runner (GenAI evaluation jobs) is unused here and more than doubles its start time.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.log, "w") as log_file:
            self.proc = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )

    def wait(self, timeout: float = 180) -> str:
        """The server's URI once `/health` answers."""
        import time

        import requests

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                if requests.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return self.uri
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer /health: {self.log.read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        import signal
        import subprocess

        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=3)  # it waits for idle keep-alive connections; nothing to save
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
