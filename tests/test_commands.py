"""Every command as a person types it: each step command with only its required options, and the shell blocks
of the docs (docs/steps.md, docs/cluster.md, the README) as written (at tiny sizes).

The commands run in this process through typer's test runner (the same `app` the `secateurs` script runs; a new
interpreter per command would spend ~5 s a command importing torch), except torchrun, which starts real
processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from secateurs.cli import app
from secateurs.config import (
    DistillConfig,
    EvaluateConfig,
    ImportanceConfig,
    TeacherCorrectionConfig,
)
from secateurs.manifest import json_digest, read_manifest

ROOT = Path(__file__).resolve().parents[1]
# A hung rendezvous or a step gone wrong fails the test instead of hanging the suite.
TIMEOUT = 600


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """torch on one thread while these commands run: their operations are tiny, and on cores other processes share,
    two threads waiting on each other made a step up to 10x slower (bench/search.py) and these tests 30x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def secateurs(*args) -> str:
    """`secateurs ARGS` in this process; fails the test with the command's output unless it exits 0."""
    start, cpu = time.monotonic(), time.process_time()
    result = CliRunner().invoke(app, [str(a) for a in args])
    print(f"secateurs {args[0]}: {time.monotonic() - start:.1f} s ({time.process_time() - cpu:.1f} s of CPU)")
    assert result.exit_code == 0, f"secateurs {shlex.join(map(str, args))}:\n{result.output}{result.exception!r}"
    return result.output


def _checkpoint(path: Path) -> None:
    """A stock checkpoint: config, weights, tokenizer."""
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (path / name).is_file(), f"{path} has no {name}"


# ---------------------------------------------------------------------------- every step with its defaults
# Only the required options. Size options are given where the default would take minutes on the tiny data (each
# marked): the point is that every other option works at its default.


@pytest.fixture(scope="module")
def student(tiny_models, tiny_importance, tmp_path_factory) -> Path:
    """A depth-pruned student of the tiny Llama (distill refuses a student no smaller than its teacher)."""
    from secateurs import prune
    from secateurs.prune import PruneTarget

    out = tmp_path_factory.mktemp("commands") / "student"
    prune.run(tiny_models["llama-tied"], tiny_importance["llama-tied"], out, PruneTarget(num_layers=2))
    return out


def test_import_model_with_defaults(tiny_models, tmp_path):
    secateurs("import-model", tiny_models["llama-tied"], "--out", tmp_path / "teacher")
    _checkpoint(tmp_path / "teacher")
    assert read_manifest(tmp_path / "teacher")["config"]["dtype"] == "auto"


def test_prepare_data_with_defaults(tokenizer_dir, tmp_path):
    from secateurs.data import load_packed

    secateurs("prepare-data", "--tokenizer", tokenizer_dir, "--out", tmp_path / "data")
    dataset, config = load_packed(tmp_path / "data")
    assert (config["source"], config["seq_len"], config["max_tokens"]) == ("python-docs", 4096, None)
    assert len(dataset["train"]) > 0 and len(dataset["validation"]) > 0


def test_importance_with_defaults(tiny_models, tiny_data, tmp_path):
    out = tmp_path / "importance"
    secateurs("importance", "--model", tiny_models["llama-tied"], "--data", tiny_data, "--out", out)
    assert {"importance.safetensors", "depth.json"} <= {p.name for p in out.iterdir()}
    # The block sizes of the depth scan default to half the layers: the manifest records them resolved.
    assert read_manifest(out)["config"] == ImportanceConfig(block_sizes=[2]).model_dump()


def test_prune_with_defaults(tiny_models, tiny_importance, tmp_path):
    """No target is refused in one line (a forgotten option, not a wish for a copy), before anything is written;
    one target option with the rest at their defaults prunes that axis alone."""
    out = tmp_path / "pruned"
    result = CliRunner().invoke(app, ["prune", "--model", str(tiny_models["llama-tied"]), "--importance",
                                      str(tiny_importance["llama-tied"]), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 1 and not out.exists()
    assert result.output.strip() == ("error: no pruning target: give at least one of --hidden-size, --ffn-hidden-size, "
                                     "--num-attention-heads, --num-key-value-heads, --num-layers, --drop-layers")
    secateurs("prune", "--model", tiny_models["llama-tied"], "--importance", tiny_importance["llama-tied"],
              "--out", out, "--num-layers", "3")  # fmt: skip
    _checkpoint(out)
    original, pruned = (json.loads((p / "config.json").read_text()) for p in (tiny_models["llama-tied"], out))
    shape = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    assert [pruned[k] for k in shape] == [original[k] for k in shape] and pruned["num_hidden_layers"] == 3


def test_correct_teacher_with_defaults(tiny_models, tiny_data, tmp_path):
    out = tmp_path / "corrected"
    # Size: 2 of the default 30 steps (30 steps of 16 sequences take ~40 s here).
    secateurs("correct-teacher", "--model", tiny_models["llama-tied"], "--data", tiny_data, "--out", out,
              "--max-steps", 2)  # fmt: skip
    _checkpoint(out)
    assert read_manifest(out)["config"] == TeacherCorrectionConfig(max_steps=2).model_dump()


def test_distill_with_defaults(tiny_models, student, tiny_data, tmp_path):
    out = tmp_path / "distilled"
    # Size: 2 of the default 100 steps (2 minutes here).
    secateurs("distill", "--teacher", tiny_models["llama-tied"], "--student", student, "--data", tiny_data,
              "--out", out, "--max-steps", 2)  # fmt: skip
    _checkpoint(out)
    assert read_manifest(out)["config"] == DistillConfig(max_steps=2).model_dump()


def test_evaluate_with_defaults(student, tiny_data, tmp_path):
    out = tmp_path / "metrics"
    secateurs("evaluate", "--model", student, "--data", tiny_data, "--out", out)
    assert "lambada-docs" in json.loads((out / "metrics.json").read_text())["tasks"]
    assert read_manifest(out)["config"] == EvaluateConfig().model_dump()


def test_build_engine_and_bench_with_defaults(student, tmp_path):
    pytest.importorskip("onnxruntime_genai", reason="the engine extra is not installed")
    out = tmp_path / "engine"
    secateurs("build-engine", "--model", student, "--out", out)
    assert {"genai_config.json", "model.onnx"} <= {p.name for p in out.iterdir()}
    config = read_manifest(out)["config"]
    assert (config["backend"], config["precision"]) == ("onnxruntime-genai", "int4")
    secateurs("bench", "--engine", out)
    bench = json.loads((out / "bench.json").read_text())  # its --out default
    assert (bench["batch"], bench["repeats"]) == (8, 3)
    assert [(r["input_len"], r["output_len"]) for r in bench["results"]] == [(128, 128)]


def test_search_with_defaults(tiny_models, tiny_importance, tiny_data, tmp_path):
    out = tmp_path / "search"
    # A budget is required: this one has 3 of the tiny model's shapes (its embeddings are 95% of it) within the
    # default tolerance, as many as the default top_k distils. Size: 512 tokens each (default 1.8e9), one step.
    secateurs("search", "--model", tiny_models["llama-tied"], "--importance", tiny_importance["llama-tied"],
              "--data", tiny_data, "--out", out, "--params", 3.205e6, "--tokens", 512)  # fmt: skip
    assert {p.name for p in out.iterdir()} == {"candidates", "scored", "winner"}
    assert sorted(p.name for p in (out / "scored").iterdir()) == ["0", "1", "2"]
    _checkpoint(out / "winner")


@pytest.mark.parametrize("config", ["demo-cpu.yaml", "llama31-8b-minitron.yaml"])
def test_plan_and_validate_with_defaults(config):
    path = ROOT / "configs" / config
    assert "ok (2 students: width, depth)" in secateurs("validate", path)
    planned = secateurs("plan", path)
    assert "every step fits its GPUs" in planned if "minitron" in config else "nothing to plan" in planned


# ---------------------------------------------------------------------------- the docs' blocks
# Tiny mode: the guide's size options at the values its blocks run with here (the model stays SmolLM2-135M). The
# guide (docs/steps.md) says so in one sentence under "The steps, by hand"; every option of the table must still be
# in the blocks.
TINY = {
    "--seq-len": "16",
    "--max-tokens": "8192",
    "--samples": "8",
    "--depth-samples": "2",
    "--max-steps": "1",
    "--batch": "2",
    "--lengths": "16:8,24:4",
    "--nproc-per-node": "2",
}
# A block marked `<!-- cluster-only -->` needs a cluster (or a Docker engine and a registry): its commands are
# checked, not run. `<!-- cluster-only: COMMAND -->` marks only COMMAND's lines so; `<!-- after make demo -->` a
# block that reads the runs `make demo` leaves (runs/<name>, from configs/<config> as the Makefile's DEMO_RUN says).
MARK = re.compile(r"(?:^<!-- (?P<mark>[^\n]*?) -->\n)?^```bash\n(?P<body>.*?)^```", re.DOTALL | re.MULTILINE)
# The guide whose block runs every step by hand.
STEPS_GUIDE = ROOT / "docs" / "steps.md"
DEMO_RUNS = {"runs/demo": "configs/demo-cpu.yaml", "runs/demo-search-cpu": "configs/demo-search-cpu.yaml"}


def readme_blocks(title: str | None, path: Path = ROOT / "README.md") -> list[tuple[str, str, list[list[str]]]]:
    """The ```bash blocks of section `title` (None: of the whole file): each one's mark ('' for none), its text, and
    its commands as argument lists (continuation lines joined, comments dropped)."""
    text = path.read_text()
    start = text.index(f"## {title}\n") if title else 0
    end = text.find("\n## ", start + 1) if title else -1
    blocks = []
    for m in MARK.finditer(text[start : end if end >= 0 else None]):
        lines = m["body"].replace("\\\n", " ").splitlines()
        commands = [argv for line in lines if (argv := shlex.split(line, comments=True))]
        blocks.append((m["mark"] or "", m["body"], commands))
    return blocks


def tiny(argv: list[str], used: set[str]) -> list[str]:
    """`argv` with the values of the size options in TINY replaced."""
    argv = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg in TINY:
            argv[i + 1] = TINY[arg]
            used.add(arg)
    return argv


def check_syntax(argv: list[str]) -> None:
    """A command that is not run here: `secateurs CMD` (and `mlflow CMD`) must accept every option it uses; a make
    target must exist. Other tools (kubectl, helm) are not installed everywhere: the shell's `-n` check only."""
    if argv[0] in ("secateurs", "mlflow"):
        import click

        if argv[0] == "secateurs":
            group = typer.main.get_command(app)
        else:
            from mlflow.cli import cli as group
        command = group.get_command(click.Context(group), argv[1])
        assert command is not None, f"{shlex.join(argv)}: {argv[0]} has no command {argv[1]}"
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        used = {a.split("=")[0] for a in argv[2:] if a.startswith("-")}
        assert used <= known, f"{shlex.join(argv)}: {argv[0]} {argv[1]} has no option {sorted(used - known)}"
    elif argv[0] == "make":
        done = subprocess.run(["make", "-n", *argv[1:]], check=False, cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, f"{shlex.join(argv)}: {done.stderr}"


def torchrun(argv: list[str]) -> None:
    """`torchrun ARGS` as real processes on 127.0.0.1 (gloo on the CPU), as tests/test_distributed.py runs them."""
    from conftest import free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    start, cpu = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command + argv, check=False, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"torchrun {shlex.join(argv)}: {time.monotonic() - start:.1f} s "
          f"({used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime:.1f} s of CPU)")
    assert done.returncode == 0, f"torchrun {shlex.join(argv)}:\n{done.stdout[-3000:]}{done.stderr[-5000:]}"


def run_block(mark: str, commands: list[list[str]], used: set[str], monkeypatch) -> None:
    """Run a docs block's commands in order, at tiny sizes; check those its mark says cannot run here."""
    assert mark in ("", "cluster-only", "after make demo") or mark.startswith("cluster-only: "), f"mark {mark!r}?"
    whole = mark in ("cluster-only", "after make demo")
    only = mark.removeprefix("cluster-only: ") if mark.startswith("cluster-only: ") else None
    for argv in commands:
        if whole or (only and shlex.join(argv).startswith(only)):
            check_syntax(argv)
        elif argv[0] == "secateurs":
            secateurs(*tiny(argv, used)[1:])
        elif argv[0] == "torchrun":
            torchrun(tiny(argv, used)[1:])
        elif argv[0] == "export":
            monkeypatch.setenv(*argv[1].split("=", 1))
        else:
            raise AssertionError(f"the docs run {shlex.join(argv)}: add it to this test, or mark its block")
        # The training steps' last checkpoints (the corrected teacher's AdamW state alone is 1.6 GB) are read by no
        # later line: dropped as they land, which keeps this test's disk peak near 3 GB instead of 5.3.
        for work in Path().glob("runs/*/*.checkpoints"):
            shutil.rmtree(work)


def test_the_steps_by_hand_run_as_written(tmp_path, monkeypatch):
    """docs/steps.md "The steps, by hand": the real SmolLM2-135M through every step at tiny sizes, its torchrun line
    as two gloo processes with FSDP2."""
    monkeypatch.chdir(tmp_path)
    [(mark, _, commands)] = readme_blocks("The steps, by hand", STEPS_GUIDE)
    used = set()
    run_block(mark, commands, used, monkeypatch)
    assert used == set(TINY), f"TINY has options docs/steps.md no longer uses: {sorted(set(TINY) - used)}"
    # The guide's sentence on the tiny mode names these values.
    said = STEPS_GUIDE.read_text().replace("\n", " ")
    assert all(f"`{option} {value}" in said for option, value in TINY.items()), "docs/steps.md: the tiny mode's values"

    m = tmp_path / "runs" / "m"
    for name in ("teacher", "width", "depth", "teacher-corrected", "width-kd", "depth-kd"):
        _checkpoint(m / name)
    width, depth = (json.loads((m / name / "config.json").read_text()) for name in ("width", "depth"))
    assert (width["hidden_size"], width["intermediate_size"], width["num_attention_heads"]) == (384, 1024, 6)
    assert depth["num_hidden_layers"] == 12
    report = read_manifest(m / "depth-kd")["report"]
    assert (report["processes"], report["parallelism"], report["steps"]) == (2, "fsdp", 1)
    assert "lambada-docs" in json.loads((m / "width-kd-metrics" / "metrics.json").read_text())["tasks"]
    bench = json.loads((m / "width-engine" / "bench.json").read_text())
    assert [(r["input_len"], r["output_len"]) for r in bench["results"]] == [(16, 8), (24, 4)]


def test_the_cluster_guide_runs_as_written(tmp_path, monkeypatch):
    """docs/cluster.md: what runs without a cluster runs (the compile line), the rest is checked against the
    commands' options; a rerun's step keys are tasks of the demo's configs."""
    from secateurs.config import load_config
    from secateurs.pipelines.recipe import recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    blocks = readme_blocks(None, ROOT / "docs" / "cluster.md")
    assert {mark for mark, _, _ in blocks} == {"cluster-only", "cluster-only: secateurs submit", "after make demo"}
    for mark, body, commands in blocks:
        subprocess.run(["bash", "-n"], input=body, check=True, text=True)
        run_block(mark, commands, set(), monkeypatch)
        for argv in commands:
            if argv[:2] == ["secateurs", "rerun"]:
                cfg = load_config(ROOT / DEMO_RUNS[argv[2]])
                keys = {k for s in recipe(cfg) for k in (s.key, *s.task_keys)}
                assert argv[argv.index("--step") + 1] in keys, shlex.join(argv)
    assert (tmp_path / "pipeline.yaml").is_file()


def test_a_json_digest_is_the_sha256_of_the_sorted_json_cut_to_its_length():
    # It names training checkpoint directories and TrainJobs, the search's throughput cache and a dataset's
    # preparation: a change of its value orphans what they hold.
    whole = hashlib.sha256(b'{"a": "x", "b": [1, 2]}').hexdigest()
    assert json_digest({"b": [1, 2], "a": Path("x")}) == whole[:16]
    assert json_digest({"a": Path("x"), "b": [1, 2]}, length=None) == whole
