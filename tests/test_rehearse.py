"""`secateurs rehearse`: the scaling arithmetic (exact), its refusals, the TensorRT-LLM command check, the
rehearsal environment; the flagship's whole rehearsal is an e2e test (and `make rehearse`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from secateurs import rehearse
from secateurs.config import DataConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
FLAGSHIP = ROOT / "configs" / "llama31-8b-minitron.yaml"
LLAMA_8B = ROOT / "tests" / "data" / "llama-3.1-8b.config.json"


def scaled_flagship(tmp_path, sources=None):
    real = load_config(FLAGSHIP)
    shape = rehearse.teacher_config(real.teacher.source, LLAMA_8B)
    cfg, scaling = rehearse.scale_config(real, shape, tmp_path / "teacher", tmp_path, sources)
    return real, cfg, scaling


def test_family_default_is_the_real_config():
    """With no config.json at hand, a Llama hub id gets Llama-3.1-8B's shape: the file's every field."""
    real = json.loads(LLAMA_8B.read_text())
    default = rehearse.teacher_config("meta-llama/Llama-3.1-8B")
    assert {k: default[k] for k in default} == {k: real[k] for k in default}
    assert set(real) - set(default) <= {"bos_token_id", "eos_token_id", "torch_dtype"}


def test_unknown_family_refused_in_one_line():
    with pytest.raises(rehearse.RehearsalError, match=r"teacher.source=acme/Falcon-9B: its config.json is not at hand"):
        rehearse.teacher_config("acme/Falcon-9B")


def test_width_factor_brute_force():
    """The largest power of two dividing every width that leaves hidden >= 128 and an even head_dim, against
    every power of two tried in turn."""
    teacher = json.loads(LLAMA_8B.read_text())
    for widths in ([3072, 9216], [3072, 9200], [], [4000]):
        ok = [f for f in (2**i for i in range(13))
              if all(w % f == 0 for w in [4096, 14336, 128, *widths]) and 4096 // f >= 128 and (128 // f) % 2 == 0]
        assert rehearse.width_factor(teacher, widths) == max(ok)
    assert rehearse.width_factor(teacher, [3072, 9216]) == 32


def test_flagship_scaled_exactly(tmp_path):
    real, cfg, scaling = scaled_flagship(tmp_path)
    assert scaling.width_factor == 32
    small = rehearse.scaled_teacher_config(json.loads(LLAMA_8B.read_text()), 32, 49152)
    # Every count the targets refer to is kept; every width divided by the one factor.
    assert (small["num_hidden_layers"], small["num_attention_heads"], small["num_key_value_heads"]) == (32, 32, 8)
    assert (small["hidden_size"], small["intermediate_size"], small["head_dim"]) == (128, 448, 4)
    width = next(s for s in cfg.students if s.name == "width").prune
    real_width = next(s for s in real.students if s.name == "width").prune
    assert (width.hidden_size, width.ffn_hidden_size) == (96, 288)
    assert width.hidden_size / small["hidden_size"] == real_width.hidden_size / 4096
    assert width.ffn_hidden_size / small["intermediate_size"] == real_width.ffn_hidden_size / 14336
    assert (width.num_attention_heads, width.num_key_value_heads) == (32, 8)
    depth = next(s for s in cfg.students if s.name == "depth")
    assert depth.prune.drop_layers == "15-30" and depth.distill.intermediate_loss
    # A few steps, warm-up and schedule in proportion, accumulation kept, at 2 gloo processes.
    for t in (cfg.teacher_correction, cfg.distill, depth.distill):
        assert t.max_steps == 4 and t.warmup_steps == 1 and t.parallelism == "fsdp" and t.gradient_checkpointing
        assert t.global_batch_size == t.micro_batch_size * 2 * 2
    assert cfg.distill.save_steps == 1  # 200 of 10,000 steps: a checkpoint every step of 4 (at least one)
    assert cfg.teacher_correction.save_steps == 7  # 50 of 30: no checkpoint, as in the real run
    assert cfg.placement.processes == {"correct_teacher": 2, "distill": 2} and not cfg.placement.gpus.requested()
    # The data keeps its sources, weights, names, text fields and validation share.
    assert [(s.name, s.weight, s.text_field, s.source) for s in cfg.data.blend()] == \
        [(s.name, s.weight, s.text_field, s.source) for s in real.data.blend()]
    assert (cfg.data.seq_len, cfg.data.val_fraction) == (128, real.data.val_fraction)
    assert cfg.data.max_tokens == 5 * rehearse.SEQUENCES_PER_SOURCE * 128
    assert cfg.engine.backend == "tensorrt-llm" and cfg.engine.precision == "fp8"
    assert cfg.evaluate.tasks == real.evaluate.tasks
    # Tracking and storage come home.
    assert cfg.tracking.uri is None and cfg.tracking.pipeline_root is None
    assert cfg.placement.cache_volume.mount_path == str(tmp_path / "volume")


def test_demo_configs_rehearsed_as_they_are(tmp_path):
    for path in sorted((ROOT / "configs").glob("demo-*.yaml")):
        real = load_config(path)
        cfg, scaling = rehearse.scale_config(real, {}, tmp_path / "teacher", tmp_path)
        assert cfg.model_dump() == real.model_dump() and scaling.changes == {}


def test_blend_settings_read_back_as_the_components_read_them():
    """A component parses its settings from the full JSON dump: the flagship's blend must read back (it did not:
    prepare-data failed with `give either sources or ...` in every pipeline run of a blend)."""
    data = load_config(FLAGSHIP).data
    assert DataConfig.model_validate_json(data.model_dump_json()) == data


def test_trtllm_bench_command_checked_by_its_option_definitions(tmp_path):
    from secateurs.engine import TensorRTLLM

    cmd = TensorRTLLM.bench_command(tmp_path, "secateurs/e", tmp_path / "w", tmp_path / "d.jsonl", tmp_path / "r.json",
                                    32, 128, 32, 256)  # fmt: skip
    params = rehearse.check_trtllm_bench_command(cmd)
    assert (params["concurrency"], params["max_batch_size"], params["num_requests"], params["max_seq_len"]) == (32, 32, 128, 256)
    assert (params["backend"], params["eos_id"]) == ("pytorch", -1)
    with pytest.raises(rehearse.RehearsalError, match="No such option '--bogus'"):
        rehearse.check_trtllm_bench_command(cmd + ["--bogus", "1"])
    bad = [*cmd]
    bad[bad.index("--concurrency") + 1] = "many"
    with pytest.raises(rehearse.RehearsalError, match="'many' is not a valid integer"):
        rehearse.check_trtllm_bench_command(bad)
    bad = [*cmd]
    bad[bad.index("--backend") + 1] = "vllm"
    with pytest.raises(rehearse.RehearsalError, match="'vllm' is not one of"):
        rehearse.check_trtllm_bench_command(bad)


def test_environment_points_home_and_is_restored(tmp_path):
    """Inside: caches, credentials and S3 in the directory, a real S3 server on 127.0.0.1 holding the buckets;
    after: the environment as it was and the server gone."""
    before = dict(os.environ)
    with rehearse.rehearsal_environment(tmp_path, {"secateurs"}) as env:
        from secateurs import storage

        endpoint = env["AWS_ENDPOINT_URL"]
        assert endpoint.startswith("http://127.0.0.1:")
        (tmp_path / "x").mkdir()
        (tmp_path / "x" / "a.txt").write_text("hello")
        storage.upload(tmp_path / "x", "s3://secateurs/data/x/")
        assert set(storage.list_objects("s3://secateurs/data/x/")) == {"a.txt"}
        assert os.environ["SECATEURS_CACHE"] == str(tmp_path / "cache") and os.environ["HF_HUB_OFFLINE"] == "1"
    assert dict(os.environ) == before
    host, port = endpoint.removeprefix("http://").split(":")
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2).close()


_CACHES_AT_THE_FIRST_STEP = """
import sys
from pathlib import Path

from secateurs import pipeline_cli


class Stop(Exception):
    pass


def first_step(cfg, directory):
    # What the rehearsing process itself has loaded by the time the graph would start.
    import datasets.config
    import huggingface_hub.constants
    import matplotlib
    from mlflow.telemetry.installation_id import _get_telemetry_file_path
    from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY

    print(MLFLOW_DISABLE_TELEMETRY.get(), _get_telemetry_file_path(), matplotlib.get_configdir(),
          datasets.config.HF_DATASETS_CACHE, huggingface_hub.constants.HF_HUB_CACHE, sep="\\n")
    raise Stop


pipeline_cli.open_run = first_step
try:
    pipeline_cli.rehearse(Path(sys.argv[1]), Path(sys.argv[2]))
except Stop:
    pass
"""


def test_the_rehearsing_process_caches_inside_the_directory(tmp_path):
    """The flagship's registry tasks (mmlu, hellaswag, winogrande) make the rehearsal import lm-eval, and with it
    datasets and huggingface_hub, which fix their cache directories at import: the process writing its dataset
    locks into the user's ~/.cache when that import came before the rehearsal's environment. MLflow (its telemetry
    id) and matplotlib (the report's plots) write ~/.config unless told otherwise."""
    pytest.importorskip("lm_eval")
    home, directory = tmp_path / "home", tmp_path / "rehearsal"
    home.mkdir()
    done = subprocess.run([sys.executable, "-c", _CACHES_AT_THE_FIRST_STEP, str(FLAGSHIP), str(directory)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "HOME": str(home), "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    telemetry_off, telemetry_file, matplotlib_config, datasets_cache, hub_cache = done.stdout.splitlines()[-5:]
    # MLflow's telemetry (it posts to the network) off; its installation id and matplotlib's config in the directory.
    assert telemetry_off == "True"
    assert Path(telemetry_file) == directory / "config" / "mlflow" / "telemetry.json"
    assert Path(matplotlib_config) == directory / "config" / "matplotlib"
    assert Path(datasets_cache) == directory / "cache" / "huggingface" / "datasets"
    assert Path(hub_cache) == directory / "cache" / "huggingface" / "hub"
    assert list(home.iterdir()) == []


# ----------------------------------------------------------------------------------------- broken on purpose
def _flagship_with(tmp_path, change) -> Path:
    import yaml

    raw = yaml.safe_load(FLAGSHIP.read_text())
    change(raw)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _secateurs(*args, env=None, timeout=1200):
    return subprocess.run([sys.executable, "-m", "secateurs", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=timeout)  # fmt: skip


def _passes_validate_and_compile(config: Path, tmp_path: Path) -> None:
    assert _secateurs("validate", config).returncode == 0
    done = _secateurs("compile", config, "-o", tmp_path / "p.yaml")
    assert done.returncode == 0, done.stderr


def _one_line_error(done) -> str:
    assert done.returncode == 1
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.e2e
def test_blend_source_without_its_text_field(tmp_path):
    """Caught before the graph, by prepare-data's own check, naming the step."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"content": f"document {i} " * 20}) + "\n" for i in range(20)))

    def change(raw):
        raw["data"]["sources"][1] = {"source": str(corpus), "weight": 0.2}
        raw["evaluate"]["tasks"] = ["lambada-docs"]  # the registry's index costs 20 s; this check needs none

    config = _flagship_with(tmp_path, change)
    _passes_validate_and_compile(config, tmp_path)
    line = _one_line_error(_secateurs("rehearse", config, "--dir", tmp_path / "r"))
    assert line == (f"error: step prepare-data: data source {corpus} has no text field 'text' (fields: content)")


@pytest.mark.e2e
def test_registry_task_with_a_wrong_few_shot_count(tmp_path):
    """mmlu's few-shot split (dev) holds 5 questions a subject: mmlu:6 fails in every first evaluation on the
    cluster, after the distillations; the rehearsal says so before the graph, in lm-eval's words."""
    def change(raw):
        raw["evaluate"]["tasks"] = ["mmlu:6"]

    config = _flagship_with(tmp_path, change)
    _passes_validate_and_compile(config, tmp_path)
    line = _one_line_error(_secateurs("rehearse", config, "--dir", tmp_path / "r"))
    assert line.startswith("error: step evaluate: lm-eval task 'mmlu_")
    assert line.endswith("asks for 6 few-shot examples: number of fewshot samples requested exceeds the 5 that are "
                         "available (its 'dev' split)")  # fmt: skip


@pytest.mark.parametrize("change, error", [
    (lambda raw: raw["placement"].update(nodes={"distill": 2}, cache_volume=None),
     "nodes.distill=2 needs cache_volume"),
    (lambda raw: raw["placement"]["gpus"].update(distill=1),
     "distill.parallelism=fsdp but the distill step runs in 1 process"),
])  # fmt: skip
def test_refused_by_validate_already(tmp_path, change, error):
    """Two of the issue's broken configs never pass `validate` (the config's own rules refuse them); the rehearsal
    refuses them with the same line, before anything runs."""
    config = _flagship_with(tmp_path, change)
    assert error in _one_line_error(_secateurs("validate", config))
    assert error in _one_line_error(_secateurs("rehearse", config, "--dir", tmp_path / "r"))
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------- the flagship
@pytest.mark.e2e
def test_flagship_rehearsal(tmp_path):
    """The whole flagship graph at the rehearsal's scale: every step ran, the engines up to the TensorRT-LLM
    call; nothing written outside the rehearsal directory (HOME is an empty directory) and no process left."""
    import psutil

    home = tmp_path / "home"
    home.mkdir()
    directory = tmp_path / "rehearsal"
    done = _secateurs("rehearse", FLAGSHIP, "--dir", directory, env={"HOME": str(home)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout[done.stdout.index("| step |"):].split("\n\n")[0]
    rows = [line.split(" | ")[:2] for line in table.splitlines()[2:]]
    status = {step.removeprefix("| "): s for step, s in rows}
    assert status["engine:teacher"] == status["engine:width"] == "ran up to the GPU-only call"
    assert {s for k, s in status.items() if not k.startswith("engine")} == {"ran"}
    for key in ("correct-teacher", "distill:width", "distill:depth", "evaluate:teacher", "evaluate:depth"):
        assert key in status
    assert "trtllm-bench --model secateurs/" in done.stdout and "| correct_teacher |" not in done.stdout
    assert list(home.iterdir()) == []
    mine = [p for p in psutil.process_iter(["cmdline"]) if str(directory) in " ".join(p.info["cmdline"] or [])]
    assert mine == []


def test_leftovers_of_a_killed_rehearsal_are_ended(tmp_path):
    """A step process outlives a SIGKILL of its rehearsal; the next rehearsal of the directory ends it first (and
    spares itself and what started it)."""
    import psutil

    directory = tmp_path / "rehearsal"
    step = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(directory / "artifacts")])
    try:
        rehearse.stop_leftovers(directory)
        step.wait(timeout=20)  # returns: the 600 s sleep is over (psutil reaped it, so its status reads 0)
        assert not psutil.pid_exists(step.pid)
    finally:
        step.kill()
    assert psutil.Process().is_running()


def test_children_ended_when_the_rehearsal_ends(tmp_path):
    import psutil

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    rehearse.end_children(timeout=5)
    child.wait(timeout=20)
    assert not psutil.pid_exists(child.pid)


def _flagship_with_search(raw):
    raw["students"] = [{"name": "auto", "search": {"params": 4.5e9, "tolerance": 0.05, "top_k": 3}}]


def test_search_budget_is_the_same_fraction_of_the_teacher(tmp_path):
    from secateurs.families import Shape

    config = _flagship_with(tmp_path, _flagship_with_search)
    real = load_config(config)
    shape = json.loads(LLAMA_8B.read_text())
    cfg, _ = rehearse.scale_config(real, shape, tmp_path / "t", tmp_path, None, 49152)
    params = {k: Shape.of(type("C", (), c)).parameters() for k, c in
              (("real", shape), ("small", rehearse.scaled_teacher_config(shape, 32, 49152)))}  # fmt: skip
    assert params["real"] == 8_030_261_248  # Llama-3.1-8B's published count
    search = cfg.students[0].search
    assert search.params == pytest.approx(4.5e9 * params["small"] / params["real"], rel=1e-12)
    assert (search.hidden_divisor, search.ffn_divisor, search.top_k) == (2, 2, 2)
    assert search.tokens == 4 * cfg.distill.global_batch_size * cfg.data.seq_len
    assert cfg.distill.parallelism == "fsdp" and cfg.placement.processes["distill"] == 2


@pytest.mark.e2e
def test_search_student_under_fsdp_rehearsed(tmp_path):
    """A search student's candidates distilled briefly under fsdp at 2 processes, through the flagship's graph."""
    config = _flagship_with(tmp_path, _flagship_with_search)
    done = _secateurs("rehearse", config, "--dir", tmp_path / "r", env={"HOME": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for key in ("search:auto", "search-distill:auto", "search-pick:auto", "distill:auto"):
        assert f"| {key} | ran |" in done.stdout
