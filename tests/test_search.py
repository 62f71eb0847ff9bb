"""Architecture search on tiny models: exact enumeration (checked against pruned models, brute force over the
grid), one-line refusals before any weight is read, and a whole search through the library."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from secateurs import engine, prune, search
from secateurs.checkpoint import load_model
from secateurs.config import DistillConfig, SearchConfig
from secateurs.families import Shape, family_of, parameter_count
from secateurs.importance import load_importance


def _pruned_parameters(model, scores, depth, shape: Shape) -> int | None:
    """parameter_count of the model really pruned to `shape` (in memory, with prune.py's own functions); None when
    transformers refuses the pruned config (it would not save)."""
    from huggingface_hub.errors import StrictDataclassClassValidationError

    target = search.Candidate(shape, 0).target("block-influence")
    plan = prune.plan_pruning(Shape.of(model.config), scores, depth, target)
    config = prune.pruned_config(model.config, plan, family_of(model.config))
    try:
        config.validate()
    except StrictDataclassClassValidationError:
        return None
    return parameter_count(prune.build_model(config, prune.prune_state_dict(model.state_dict(), plan)))


@pytest.mark.parametrize("case", ["llama-tied", "qwen2", "qwen3"])  # tied embeddings; q/k/v biases; q/k norms
def test_candidates_are_exactly_the_grid_shapes_under_the_budget(case, tiny_models, tiny_importance):
    """Brute force: every shape of the divisor grid (written out plainly here) is pruned for real and counted with
    `families.parameter_count`; the candidates are exactly those in the budget's band, with those counts."""
    model = load_model(tiny_models[case])
    scores, depth, _ = load_importance(tiny_importance[case])
    source = Shape.of(model.config)  # hidden 64, MLP 96, 8 heads in 2 KV groups, 4 layers
    teacher = parameter_count(model)
    settings = SearchConfig(params=0.9 * teacher, tolerance=0.3, max_candidates=10_000, hidden_divisor=16,
                            ffn_divisor=16, max_pruning={"num_layers": 0.5, "hidden_size": 0.5})  # fmt: skip
    candidates = search.enumerate_candidates(search.ParameterCounter(model.config), settings)

    expected = {}
    for hidden, ffn, heads, kv, layers in itertools.product(range(1, 65), range(1, 97), range(1, 9), range(1, 3),
                                                            range(1, 5)):  # fmt: skip
        on_grid = (hidden % 16 == 0 or hidden == 64) and (ffn % 16 == 0 or ffn == 96)
        within = hidden >= 32 and ffn >= 48 and heads >= 4 and kv >= 1 and layers >= 2  # max_pruning 0.5 each
        valid_gqa = heads % kv == 0 and heads // kv <= 4
        if on_grid and within and valid_gqa:
            shape = Shape(hidden, ffn, heads, kv, source.head_dim, layers, source.vocab_size, source.tie_word_embeddings)
            n = _pruned_parameters(model, scores, depth, shape)
            if n is not None and 0.7 * settings.params <= n <= settings.params:
                expected[search.Candidate(shape, n).name] = n
    assert len(expected) > 10
    assert {c.name: c.parameters for c in candidates} == expected
    # Closest to the budget first.
    assert [c.parameters for c in candidates] == sorted((c.parameters for c in candidates), reverse=True)
    # A memory budget is the same limit in bytes: bf16 weights take two bytes each.
    by_memory = search.enumerate_candidates(
        search.ParameterCounter(model.config), settings.model_copy(update={"params": None, "memory": 2 * settings.params})
    )
    assert by_memory == candidates


def test_fixed_dimensions_and_caps_shape_the_grid(tiny_models):
    counter = search.ParameterCounter(load_model(tiny_models["llama-tied"]).config)
    teacher = counter(counter.source)
    settings = SearchConfig(params=0.95 * teacher, tolerance=0.5, max_candidates=5, hidden_divisor=16, ffn_divisor=16,
                            fixed={"num_layers": 3, "num_attention_heads": 4})  # fmt: skip
    candidates = search.enumerate_candidates(counter, settings)
    assert len(candidates) == 5
    assert {(c.shape.num_hidden_layers, c.shape.num_attention_heads) for c in candidates} == {(3, 4)}
    # 4 heads: one KV group of 4 or two of 2, both valid GQA.
    every = search.enumerate_candidates(counter, settings.model_copy(update={"max_candidates": 1000}))
    assert {c.shape.num_key_value_heads for c in every} == {1, 2}


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(params=1e12), "not fewer than the source's"),
        (dict(params=1e3), "below the smallest candidate shape"),
        (dict(memory=1e12, precision="int4"), "memory=1e\\+12 bytes at int4 allows 2,000,000,000,000 parameters"),
        (dict(params=2.9e6, tolerance=1e-6, hidden_divisor=16), "no candidate shape within tolerance=1e-06"),
        (dict(params=2e6, fixed={"hidden_size": 80}), "fixed hidden_size=80 is larger than the source's 64"),
        (dict(params=2e6, fixed={"num_layers": 1}), "fixed num_layers=1 prunes more than max_pruning.num_layers=0.5"),
        (dict(params=2e6, fixed={"num_attention_heads": 8, "num_key_value_heads": 1}),
         "needs 8 query heads per KV group; the source has 4"),
        (dict(params=2e6, fixed={"num_attention_heads": 7}, max_pruning={"num_attention_heads": 0.9}),
         "num_attention_heads=7 is no whole number of KV groups"),
    ],
)
def test_bad_budgets_fail_in_one_line_before_any_weight_is_read(settings, message, tiny_models, tiny_importance,
                                                                tiny_data, tmp_path, monkeypatch):  # fmt: skip
    import secateurs.checkpoint

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the search settings were checked")

    monkeypatch.setattr(secateurs.checkpoint, "load_model", no_weights)
    with pytest.raises(search.SearchError, match=message) as e:
        search.score_candidates(tiny_models["llama-tied"], tiny_importance["llama-tied"], tiny_data, tmp_path / "o",
                                SearchConfig(**settings))  # fmt: skip
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_a_depth_criterion_the_importance_cannot_serve_fails_before_pruning(tiny_models, tiny_importance, tiny_data,
                                                                            tmp_path):  # fmt: skip
    # The importance artifact scanned contiguous blocks of 1 and 2 layers only; max_pruning lets candidates drop
    # 3 of the 4 layers (k=3), which it has no scan of.
    settings = SearchConfig(params=2.9e6, tolerance=0.9, max_candidates=1000, depth_criterion="lm-loss-contiguous", hidden_divisor=16,
                            max_pruning={"num_layers": 0.75})  # fmt: skip
    with pytest.raises(prune.PruneError, match="block size k=3"):
        search.score_candidates(tiny_models["llama-tied"], tiny_importance["llama-tied"], tiny_data, tmp_path / "o",
                                settings)  # fmt: skip
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "raw, message",
    [
        (dict(params=1e6, top_k=0), "top_k"),
        (dict(top_k=2), "give a budget: params, memory or latency"),
        (dict(params=1e6, fixed={"num_attention_heads": 6, "num_key_value_heads": 4}),
         "num_attention_heads=6 is not a multiple of num_key_value_heads=4"),
        (dict(params=1e6, max_pruning={"hidden_size": 1.0}), "max_pruning.hidden_size"),
    ],
)
def test_settings_refuse_bad_values(raw, message):
    with pytest.raises(ValidationError, match=message):
        SearchConfig(**raw)


def test_cli_refuses_top_k_zero_in_one_line(tiny_models, tiny_importance, tiny_data, tmp_path):
    from typer.testing import CliRunner

    from secateurs.cli import app

    args = ["search", "--model", str(tiny_models["llama-tied"]), "--importance", str(tiny_importance["llama-tied"]),
            "--data", str(tiny_data), "--out", str(tmp_path / "o"), "--params", "2e6"]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--top-k", "0"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["error: top_k=0: Input should be greater than or equal to 1"]
    result = CliRunner().invoke(app, [*args, "--fixed", "num_layers=9"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["error: fixed num_layers=9 is larger than the source's 4"]


def test_short_distillation_settings_keep_the_kd_settings():
    run = DistillConfig(max_steps=1000, global_batch_size=8, micro_batch_size=4, warmup_steps=40, temperature=2.0,
                        top_k=64, learning_rate=3e-4)  # fmt: skip
    short = search.short_distill_settings(run, tokens=10_000, seq_len=128)
    assert short.max_steps == math.ceil(10_000 / (8 * 128)) == 10
    assert short.warmup_steps == 1 and short.save_steps == 10
    same = {k: v for k, v in run.model_dump().items() if k not in ("max_steps", "warmup_steps", "save_steps", "logging_steps")}
    assert {k: v for k, v in short.model_dump().items() if k in same} == same


def test_search_end_to_end_picks_the_lowest_loss_after_short_distillation(tiny_models, tiny_importance, tiny_data,
                                                                          tmp_path):  # fmt: skip
    model = tiny_models["llama-tied"]
    teacher = parameter_count(load_model(model))
    settings = SearchConfig(params=0.9 * teacher, tolerance=0.3, max_candidates=4, top_k=2, tokens=2 * 4 * 32,
                            hidden_divisor=16, ffn_divisor=32, val_sequences=8)  # fmt: skip
    kd = DistillConfig(max_steps=50, micro_batch_size=2, global_batch_size=4, warmup_steps=0, logging_steps=1)
    result = search.run(model, tiny_importance["llama-tied"], model, tiny_data, tmp_path / "s", settings, kd)

    rows = result["candidates"]
    assert len(rows) == 4 and all(r["parameters"] <= settings.params for r in rows)
    distilled = [r for r in rows if "distilled_loss" in r]
    assert len(distilled) == 2
    # The two distilled are the two best right after pruning; each ran the short budget: 2 steps of 4 x 32 tokens.
    assert sorted(r["pruned_rank"] for r in distilled) == [0, 1]
    assert all(r["distill_steps"] == 2 and r["distill_tokens"] == 256 for r in distilled)
    best = min(distilled, key=lambda r: r["distilled_loss"])
    assert result["winner"] == best["name"] and best["distilled_rank"] == 0
    # The winner's pruned checkpoint: a stock checkpoint of that shape and count, with prune's manifest.
    winner = load_model(tmp_path / "s" / "winner")
    assert Shape.of(winner.config).as_dict() == best["shape"]
    assert parameter_count(winner) == best["parameters"] == result["winner_parameters"]
    manifest = json.loads((tmp_path / "s" / "winner" / "secateurs.json").read_text())
    assert manifest["step"] == "prune" and manifest["report"]["parameters_after"] == best["parameters"]
    assert json.loads((tmp_path / "s" / "winner" / "candidates.json").read_text())["winner"] == best["name"]
    # Short-distilled weights and their checkpoints are not kept.
    assert not list((tmp_path / "s" / "scored").glob("*/model.safetensors"))
    assert not list((tmp_path / "s" / "scored").glob("*.checkpoints"))
    table = search.format_table(result)
    assert best["name"] in table and "winner" in table and len(table.splitlines()) == 2 + 4
    with torch.no_grad():
        assert torch.isfinite(winner(torch.tensor([[1, 2, 3, 4]])).logits).all()


# ------------------------------------------------------------------------------------------ the pipeline step
@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_models, docs_dir):
    """A pipeline run whose student is given by a budget (top_k 3 of 5 candidates), through kfp.local.

    Returns:
        (the run directory, its state, the outputs recorded right after it).
    """
    pytest.importorskip("kfp")
    import yaml

    from secateurs.local_run import read_run
    from secateurs.pipeline_cli import run_cmd
    from secateurs.run_records import recorded_outputs

    train = {"max_steps": 2, "micro_batch_size": 2, "global_batch_size": 4, "warmup_steps": 0, "logging_steps": 1}
    teacher = parameter_count(load_model(tiny_models["llama-tied"]))
    config = {
        "name": "tiny-search",
        "teacher": {"source": str(tiny_models["llama-tied"]), "dtype": "float32"},
        "data": {"source": str(docs_dir), "seq_len": 32, "max_tokens": 32 * 300, "val_fraction": 0.25},
        "teacher_correction": {"enabled": False},
        "importance": {"samples": 8, "batch_size": 4, "block_sizes": [1], "depth_samples": 4},
        "distill": train,
        "students": [{"name": "auto", "search": {"params": 0.9 * teacher, "top_k": 3, "tokens": 4 * 32,
                                                 "tolerance": 0.3, "max_candidates": 5, "hidden_divisor": 16,
                                                 "ffn_divisor": 32, "val_sequences": 8}}],  # fmt: skip
        "evaluate": {"tasks": ["lambada-docs"], "batch_size": 8, "max_sequences": 8, "limit": 8},
    }
    path = tmp_path_factory.mktemp("config") / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path_factory.mktemp("runs") / "search"
    run_cmd(path, run_dir)
    _, state = read_run(run_dir)
    return run_dir, state, recorded_outputs(state)


def _runs(state, role: str, pipeline_run: str | None = None) -> list:
    """The MLflow runs of `role` (step, item) of the run's pipeline run (or of `pipeline_run`)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=state["tracking_uri"])
    experiment = client.get_experiment_by_name("secateurs")
    return client.search_runs([experiment.experiment_id], max_results=1000, filter_string=(
        f"tags.`secateurs.role` = '{role}' AND tags.`secateurs.pipeline_run` = '{pipeline_run or state['pipeline_run']}'"
    ))  # fmt: skip


@pytest.mark.e2e  # the search pipeline through kfp.local (minutes): make test-e2e
def test_search_student_runs_through_kfp_local(searched):
    """A student given by a budget: the search step, three short distillations (one ParallelFor task each), the
    winner (the lowest loss after them) distilled as the student; MLflow holds one nested run per candidate (shape,
    budget figures, both losses) and one step run per distilled candidate."""
    _, state, outputs = searched
    winner = json.loads(Path(outputs[("search-pick:auto", "winner")], "candidates.json").read_text())
    distilled = [r for r in winner["candidates"] if r.get("distilled_loss") is not None]
    assert len(winner["candidates"]) == 5 and len(distilled) == 3
    assert sorted(r["index"] for r in distilled) == [0, 1, 2]
    assert winner["winner"] == min(distilled, key=lambda r: r["distilled_loss"])["name"]
    # Each short distillation is a task of its own, recorded under its item's key.
    assert {k for k in outputs if k[0].startswith("search-distill")} == {
        (f"search-distill:auto/{i}", "scored") for i in range(3)
    }
    # The student distilled with the full budget is the winner's shape.
    student = load_model(outputs[("distill:auto", "distilled")])
    assert Shape.of(student.config).as_dict() == winner["winner_shape"]

    steps = [r for r in _runs(state, "step") if r.data.tags.get("secateurs.step") == "search-distill"]
    assert len(steps) == 3 and {r.info.status for r in steps} == {"FINISHED"}
    assert sorted(r.data.tags["secateurs.task"] for r in steps) == [f"search-distill:auto/{i}" for i in range(3)]
    assert sorted(r.data.metrics["distilled_loss"] for r in steps) == sorted(r["distilled_loss"] for r in distilled)
    # One run per candidate, nested in the search step's run, with its shape, budget figures and losses.
    (search_step,) = [r for r in _runs(state, "step") if r.data.tags.get("secateurs.step") == "search"]
    candidates = {r.info.run_name: r for r in _runs(state, "item")}
    assert set(candidates) == {r["name"] for r in winner["candidates"]}
    limit = winner["parameter_limit"]
    for row in winner["candidates"]:
        run = candidates[row["name"]]
        assert run.info.run_id == row["mlflow_run_id"] and run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == search_step.info.run_id
        assert json.loads(run.data.params["shape.hidden_size"]) == row["shape"]["hidden_size"]
        assert run.data.params["budget"] == winner["budget"]
        assert run.data.metrics["parameters"] == row["parameters"]
        assert run.data.metrics["budget_share"] == pytest.approx(row["parameters"] / limit) and row["parameters"] <= limit
        assert run.data.metrics["pruned_loss"] == pytest.approx(row["pruned_loss"])
        if row.get("distilled_loss") is None:
            assert "distilled_loss" not in run.data.metrics and "secateurs.search_winner" not in run.data.tags
        else:
            assert run.data.metrics["distilled_loss"] == pytest.approx(row["distilled_loss"])
            assert run.data.metrics["distilled_rank"] == row["distilled_rank"]
            assert run.data.tags["secateurs.search_winner"] == str(row["name"] == winner["winner"]).lower()
    # Lineage: the distilled student, the winner's pruned checkpoint (recorded by search-pick), the teacher.
    from secateurs.tracking import lineage

    chain = lineage(outputs[("distill:auto", "distilled")], uri=state["tracking_uri"])
    assert [m["name"] for m in chain] == ["auto", "auto-pruned", "teacher"]
    report = outputs[("report", "comparison")]
    assert "winner" in Path(report, "report.md").read_text()
    assert Path(report, "search_loss_vs_parameters.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.e2e  # the search pipeline through kfp.local (minutes): make test-e2e
def test_rerun_of_one_candidate_leaves_the_others_and_the_winner_lineage_intact(searched):
    """`secateurs rerun --step search-distill:auto/1` redoes that candidate's short distillation alone (the same
    loss again, into a new artifact); with --downstream, the pick then reads it with the others' recorded ones."""
    from mlflow import MlflowClient

    from secateurs.errors import PipelineError
    from secateurs.local_run import read_run
    from secateurs.manifest import content_hash
    from secateurs.pipeline_cli import rerun_cmd
    from secateurs.rerun import rerun_phases, rerun_selection
    from secateurs.run_records import recorded_outputs
    from secateurs.tracking import lineage

    run_dir, state, _ = searched
    cfg, _ = read_run(run_dir)
    before = recorded_outputs(state)
    hashes = {k: content_hash(v) for k, v in before.items() if k[0].startswith("search")}
    old = json.loads(Path(before[("search-distill:auto/1", "scored")], "score.json").read_text())

    rerun_cmd(run_dir, "search-distill:auto/1", downstream=False)

    after = recorded_outputs(state)
    new_uri = after[("search-distill:auto/1", "scored")]
    assert new_uri != before[("search-distill:auto/1", "scored")]
    assert {k: v for k, v in after.items() if k[0] != "search-distill:auto/1"} == {
        k: v for k, v in before.items() if k[0] != "search-distill:auto/1"
    }
    assert {k: content_hash(before[k]) for k in hashes} == hashes  # no artifact of the run changed
    new = json.loads(Path(new_uri, "score.json").read_text())
    assert new["name"] == old["name"] and new["distilled_loss"] == old["distilled_loss"]
    # One task ran, under a rerun pipeline run; the candidate's own run now holds both short-KD losses.
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    experiment = client.get_experiment_by_name("secateurs")
    (rerun,) = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`secateurs.rerun_of` = '{state['pipeline_run']}'")  # fmt: skip
    rerun_id = rerun.data.tags["secateurs.pipeline_run"]
    assert [r.data.tags["secateurs.task"] for r in _runs(state, "step", rerun_id)] == ["search-distill:auto/1"]
    history = client.get_metric_history(old["mlflow_run_id"], "distilled_loss")
    assert [m.value for m in history] == pytest.approx([old["distilled_loss"]] * 2)
    # The winner's lineage is what it was.
    chain = lineage(after[("distill:auto", "distilled")], uri=state["tracking_uri"])
    assert [m["name"] for m in chain] == ["auto", "auto-pruned", "teacher"]

    # With --downstream: the candidate alone, then the pick (reading the three recorded scores, the new one among
    # them) and all after it. The same winner, and the same student distilled from it.
    rerun_cmd(run_dir, "search-distill:auto/1", downstream=True)
    now = recorded_outputs(state)
    picked, first = now[("search-pick:auto", "winner")], before[("search-pick:auto", "winner")]
    assert picked != first and now[("search-distill:auto/0", "scored")] == before[("search-distill:auto/0", "scored")]
    result, original = (json.loads(Path(p, "candidates.json").read_text()) for p in (picked, first))
    assert result["winner"] == original["winner"] and result["candidates"] == original["candidates"]
    student, earlier = now[("distill:auto", "distilled")], before[("distill:auto", "distilled")]
    assert student != earlier
    assert Path(student, "model.safetensors").read_bytes() == Path(earlier, "model.safetensors").read_bytes()
    chain = lineage(student, uri=state["tracking_uri"])
    assert [m["name"] for m in chain] == ["auto", "auto-pruned", "teacher"]
    assert chain[1]["uri"] == picked

    # The plans behind it, and their refusals.
    assert rerun_phases(cfg, "search-distill:auto/1", True) == [
        ({"search-distill:auto/1"}, False), ({"search-pick:auto"}, True)
    ]
    assert rerun_phases(cfg, "search-distill:auto", True) == [({"search-distill:auto"}, True)]
    steps, imports = rerun_selection(cfg, {"search-pick:auto"}, True, recorded_outputs(state))
    assert imports[("search-distill:auto", "scored")] == [
        recorded_outputs(state)[(f"search-distill:auto/{i}", "scored")] for i in range(3)
    ]
    assert {"search-pick:auto", "distill:auto", "report"} <= {s.key for s in steps}
    (one,), _ = rerun_selection(cfg, "search-distill:auto/2", False, before)
    assert (one.key, one.items) == ("search-distill:auto", ["2"])
    with pytest.raises(PipelineError, match="'search-distill:auto/7' is not a step of this pipeline.*"
                                            "search-distill:auto/0, search-distill:auto/1"):  # fmt: skip
        rerun_selection(cfg, "search-distill:auto/7", False, before)
    missing = {k: v for k, v in before.items() if k[0] != "search-distill:auto/2"}
    with pytest.raises(PipelineError, match="search-pick:auto needs search-distill:auto/2.scored, which the run "
                                            "never finished: rerun search-distill:auto/2 first"):  # fmt: skip
        rerun_selection(cfg, "search-pick:auto", False, missing)


def test_compiled_search_fans_out_one_gpu_task_per_candidate(tmp_path):
    """The short distillations compile to a ParallelFor over the top_k ranks, each task placed as distill is; the
    pick step reads their outputs collected."""
    pytest.importorskip("kfp")
    import yaml
    from kfp import compiler

    from secateurs.config import PipelineConfig
    from secateurs.pipelines.recipe import build_pipeline

    config = PipelineConfig.model_validate({
        "teacher": {"source": "meta-llama/Llama-3.1-8B"},
        "students": [{"name": "auto-4b", "search": {"params": 4.5e9, "top_k": 6, "tokens": 2e8}}],
        "placement": {"gpus": {"distill": 8, "importance": 1}, "processes": {"distill": 1}},
    })  # fmt: skip
    compiler.Compiler().compile(build_pipeline(config), str(tmp_path / "p.yaml"))
    spec, platform = list(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))
    loops = {n: t for n, t in spec["root"]["dag"]["tasks"].items() if "parameterIterator" in t}
    (loop,) = loops.values()
    assert json.loads(loop["parameterIterator"]["items"]["raw"]) == [str(i) for i in range(6)]
    inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    (task,) = inner.values()
    executor = spec["components"][task["componentRef"]["name"]]["executorLabel"]
    container = spec["deploymentSpec"]["executors"][executor]["container"]
    accelerator = container["resources"]["accelerator"]
    assert (accelerator["resourceType"], int(accelerator["resourceCount"])) == ("nvidia.com/gpu", 8)
    # The short run: the distill settings over 2e8 tokens at 16 sequences of 4096 tokens a step.
    settings = json.loads(task["inputs"]["parameters"]["settings"]["runtimeValue"]["constant"])
    assert settings["max_steps"] == math.ceil(2e8 / (16 * 4096))
    pick = next(t for t in spec["root"]["dag"]["tasks"].values() if t["taskInfo"]["name"] == "search-pick:auto-4b")
    assert pick["inputs"]["artifacts"]["scored"]["taskOutputArtifact"]["producerTask"] == next(iter(loops))
    distill = next(t for t in spec["root"]["dag"]["tasks"].values() if t["taskInfo"]["name"] == "distill:auto-4b")
    assert distill["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "search-pick"


def test_the_rerun_of_one_candidate_compiles_without_an_importer_in_a_loop(tmp_path):
    """The pipelines of `rerun --step search-distill:auto-4b/1 --downstream`, compiled: no importer task in a
    for-loop DAG (the KFP 2.17 driver gathers a loop's outputs from container tasks only: `CollectInputs` in
    backend/src/v2/driver/resolve.go). The pick reads the recorded items, in item order, from a loop of container
    tasks; the other recorded inputs are imported once each, outside any loop."""
    pytest.importorskip("kfp")
    import yaml
    from kfp import compiler

    from secateurs.config import PipelineConfig
    from secateurs.pipelines.recipe import build_pipeline, recipe
    from secateurs.registry import STEPS
    from secateurs.rerun import rerun_phases, rerun_selection

    config = PipelineConfig.model_validate({
        "teacher": {"source": "meta-llama/Llama-3.1-8B"},
        "students": [{"name": "auto-4b", "search": {"params": 4.5e9, "top_k": 3, "tokens": 2e8}}],
        "placement": {"gpus": {"distill": 8, "importance": 1}, "processes": {"distill": 1}},
    })  # fmt: skip

    def executor(task) -> dict:  # of `spec`, the last compiled; {} for a DAG's task
        label = spec["components"][task["componentRef"]["name"]].get("executorLabel")
        return spec["deploymentSpec"]["executors"].get(label, {})

    recorded = {(key, output): f"s3://runs/root/{key}/{output}" for s in recipe(config) for key in s.task_keys
                for output in STEPS[s.kind].outputs}  # fmt: skip
    phases = rerun_phases(config, "search-distill:auto-4b/1", True)
    assert len(phases) == 2
    for i, (keys, downstream) in enumerate(phases):
        steps, imports = rerun_selection(config, keys, downstream, recorded)
        compiler.Compiler().compile(build_pipeline(config, steps=steps, imports=imports), str(tmp_path / f"{i}.yaml"))
        spec = next(yaml.safe_load_all((tmp_path / f"{i}.yaml").read_text()))
        loops = [c["dag"]["tasks"] for name, c in spec["components"].items() if name.startswith("comp-for-loop")]
        assert loops, i
        for tasks in loops:
            assert all("importer" not in executor(t) for t in tasks.values()), i
        importers = [t for t in spec["root"]["dag"]["tasks"].values() if "importer" in executor(t)]
        assert len(importers) == len({ref for ref, uri in imports.items() if isinstance(uri, str)}), i
    # The second phase: the pick's scored items come from a loop of `recorded` tasks over the three recorded URIs.
    loop = next(t for t in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in t)
    assert json.loads(loop["parameterIterator"]["items"]["raw"]) == [
        recorded[(f"search-distill:auto-4b/{i}", "scored")] for i in range(3)]  # fmt: skip
    (inner,) = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"].values()
    assert "container" in executor(inner) and inner["taskInfo"]["name"] == "import search-distill:auto-4b.scored"
    pick = next(t for t in spec["root"]["dag"]["tasks"].values() if t["taskInfo"]["name"] == "search-pick:auto-4b")
    assert pick["inputs"]["artifacts"]["scored"]["taskOutputArtifact"]["producerTask"] == loop["taskInfo"]["name"]


FLAGSHIP = Path(__file__).resolve().parents[1] / "configs" / "llama31-8b-minitron.yaml"


def _flagship_with_search(nodes: dict[str, int] | None = None):
    """The flagship config with a student found by search (Minitron's 4.5B budget), its distillations on `nodes`."""
    import yaml

    from secateurs.config import PipelineConfig

    raw = yaml.safe_load(FLAGSHIP.read_text())
    raw["students"].append({"name": "auto-4b", "search": {"params": 4.5e9, "top_k": 3, "tokens": 2e8}})
    raw["placement"]["nodes"] = nodes or {}
    return PipelineConfig.model_validate(raw)


def _search_distill_task(config, tmp_path) -> tuple[dict, dict, dict]:
    """The compiled search-distill task of `config` (inside its ParallelFor): its parameters, its container and
    its Kubernetes executor config."""
    import yaml

    from secateurs.submit import compile_pipeline

    spec, platform = yaml.safe_load_all(compile_pipeline(config, tmp_path / "p.yaml").read_text())
    (loop,) = [t for t in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in t]
    (task,) = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"].values()
    assert task["taskInfo"]["name"] == "search-distill:auto-4b"
    executor = spec["components"][task["componentRef"]["name"]]["executorLabel"]
    params = {k: v["runtimeValue"]["constant"] for k, v in task["inputs"]["parameters"].items() if "runtimeValue" in v}
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].get(executor, {})
    return params, spec["deploymentSpec"]["executors"][executor]["container"], k8s


def test_flagship_search_plans_and_compiles_its_distillations_across_the_gpus(tmp_path):
    """Under the flagship's `parallelism: fsdp` on 8 GPUs a candidate's short distillation cannot run in one
    process (fsdp needs several, and a 4.5B candidate with AdamW state does not fit one GPU): each search-distill
    task gets distill's 8 GPUs and resources and runs 8 processes, as distill does, and the plan counts it so: a
    `search-distill:<student>` row sharded over the 8 GPUs, with the top_k short runs' tokens."""
    pytest.importorskip("kfp")
    from secateurs import plan

    config = _flagship_with_search()
    assert config.distill.parallelism == "fsdp" and config.placement.gpus.distill == 8
    rows = {row.task: row for row in plan.check(config)}  # refuses a step that does not fit
    row = rows["search-distill:auto-4b"]
    assert (row.gpus, row.nodes, row.parallelism) == (8, 1, "fsdp") and row.fits()
    # Sharded over 8: the student's fp32 weights, gradients and AdamW state an eighth each; the candidate is bounded
    # by the parent's shape, as the student's own distillation is planned.
    assert row.bytes == rows["distill:auto-4b"].bytes and row.bytes["optimizer"] == 8 * 8_030_261_248 // 8
    short = search.short_distill_settings(config.distill, 2e8, 8192)
    assert row.tokens == 3 * short.max_steps * 1152 * 8192 == 3 * 22 * 1152 * 8192

    params, container, k8s = _search_distill_task(config, tmp_path)
    assert int(params["processes"]) == 8 and params["trainjob"] == ""
    settings = DistillConfig.model_validate_json(params["settings"])
    assert (settings.parallelism, settings.max_steps) == ("fsdp", short.max_steps)
    resources, wanted = container["resources"], config.placement.resources["distill"]
    assert (resources["accelerator"]["resourceType"], int(resources["accelerator"]["resourceCount"])) == (
        "nvidia.com/gpu", 8)  # fmt: skip
    assert (resources["resourceCpuRequest"], resources["resourceMemoryRequest"]) == (wanted.cpu_request,
                                                                                     wanted.memory_request)  # fmt: skip
    assert k8s["nodeSelector"]["labels"] == config.placement.node_selector


def test_flagship_search_on_two_nodes_hands_each_distillation_to_a_trainjob(tmp_path):
    """With distill on 2 nodes, each candidate's short distillation is a TrainJob of 2 nodes x 8 GPUs, as the
    student's own distillation is, and its KFP pod only watches it (no GPU held while the job runs)."""
    pytest.importorskip("kfp")
    from secateurs import plan

    config = _flagship_with_search({"distill": 2})
    row = {row.task: row for row in plan.check(config)}["search-distill:auto-4b"]
    assert (row.gpus, row.nodes, row.parallelism) == (8, 2, "fsdp")
    params, container, k8s = _search_distill_task(config, tmp_path)
    job = json.loads(params["trainjob"])
    assert (job["nodes"], job["gpus_per_node"], job["processes_per_node"]) == (2, 8, 8)
    assert "accelerator" not in container.get("resources", {}) and "nodeSelector" not in k8s


def test_the_candidates_of_a_search_are_placed_only_as_distill(tmp_path):
    """placement.processes and placement.nodes name the training steps placed as themselves: search-distill
    takes distill's."""
    from secateurs.config import PipelineConfig

    raw = {"teacher": {"source": "meta-llama/Llama-3.1-8B"}, "placement": {"processes": {"search_distill": 2}}}
    with pytest.raises(ValidationError, match="processes: not training step"):
        PipelineConfig.model_validate(raw)


def test_a_candidate_distils_and_is_scored_in_two_fsdp_processes(tiny_models, tiny_importance, tiny_data, tmp_path):
    """One candidate's short distillation under `parallelism: fsdp` in 2 torchrun processes (gloo, CPU): trained
    as the distill step trains and scored by the run's main process on what it wrote; the Trainer callbacks
    get the run's logged losses afterwards, and the short-distilled weights and checkpoints are dropped."""
    model = tiny_models["llama-untied"]
    teacher = parameter_count(load_model(model))
    settings = SearchConfig(params=0.9 * teacher, tolerance=0.3, max_candidates=1, top_k=1, hidden_divisor=16,
                            ffn_divisor=32, val_sequences=8)  # fmt: skip
    search.score_candidates(model, tiny_importance["llama-untied"], tiny_data, tmp_path / "c", settings)
    kd = DistillConfig(max_steps=2, micro_batch_size=1, global_batch_size=2, warmup_steps=0, logging_steps=1,
                       parallelism="fsdp")  # fmt: skip

    class Logged:
        def __init__(self):
            self.losses = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.losses.append((state.global_step, logs["loss"]))

    logged = Logged()
    score = search.distill_candidate(model, tmp_path / "c", 0, tiny_data, tmp_path / "s", kd, callbacks=[logged],
                                     processes=2)  # fmt: skip
    assert (score["distill_processes"], score["distill_steps"], score["distill_tokens"]) == (2, 2, 2 * 2 * 32)
    assert math.isfinite(score["distilled_loss"]) and score["distilled_loss"] != score["pruned_loss"]
    assert [step for step, _ in logged.losses] == [1, 2] and logged.losses[-1][1] == score["distill_final_loss"]
    assert json.loads((tmp_path / "s" / "score.json").read_text()) == score
    assert not list(tmp_path.glob("s.work*")) and not list(tmp_path.glob("**/*.checkpoints"))


def test_a_tensorrt_llm_latency_search_runs_in_its_image_on_a_gpu(tmp_path):
    """The search step builds its candidates' engines in the image of its latency budget's backend (the
    TensorRT-LLM one, on the importance step's GPU); a search by parameters stays in the secateurs image. Refused
    when the config is read: a TensorRT-LLM latency budget without a GPU for the search, a latency budget measured
    on another backend than the pipeline's engines."""
    pytest.importorskip("kfp")
    import yaml
    from kfp import compiler

    from secateurs.config import PipelineConfig
    from secateurs.pipelines.recipe import build_pipeline

    raw = {
        "teacher": {"source": "meta-llama/Llama-3.1-8B"},
        "students": [
            {"name": "fast", "search": {"params": 6e9, "latency": 2000}},
            {"name": "small", "search": {"params": 4.5e9}},
        ],
        "engine": {"enabled": True, "backend": "tensorrt-llm", "precision": "fp8"},
        "placement": {"gpus": {"distill": 8, "importance": 1, "engine": 1}, "processes": {"distill": 1}},
    }  # fmt: skip
    config = PipelineConfig.model_validate(raw)
    # Measured on the backend and at the precision the pipeline's engines use.
    assert (config.students[0].search.engine_backend, config.students[0].search.engine_precision) == (
        "tensorrt-llm", "fp8")  # fmt: skip
    compiler.Compiler().compile(build_pipeline(config), str(tmp_path / "p.yaml"))
    spec = next(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))
    images = config.placement.resolved_images()
    by_task = {t["taskInfo"]["name"]: t for t in spec["root"]["dag"]["tasks"].values()}

    def image(task):
        executor = spec["components"][by_task[task]["componentRef"]["name"]]["executorLabel"]
        return spec["deploymentSpec"]["executors"][executor]["container"]

    assert image("search:fast")["image"] == images["tensorrt-llm"] != images["secateurs"]
    assert image("search:fast")["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert image("search:small")["image"] == images["secateurs"]
    raw["placement"]["gpus"] = {"distill": 8, "engine": 1}
    with pytest.raises(ValidationError, match=r"students\[0\].search measures latency with tensorrt-llm, which builds "
                                              "engines on a GPU, but the search step has none"):  # fmt: skip
        PipelineConfig.model_validate(raw)
    raw["students"][0]["search"]["engine_backend"] = "onnxruntime-genai"
    with pytest.raises(ValidationError, match=r"students\[0\].search.engine_backend=onnxruntime-genai but "
                                              "engine.backend=tensorrt-llm: a latency budget is measured on"):  # fmt: skip
        PipelineConfig.model_validate(raw)


def test_a_local_run_refuses_a_latency_budget_its_engine_cannot_measure(tmp_path, tiny_models, docs_dir, capsys):
    """Checked with the rest of a local run's inputs: before the first step, not when the search step starts."""
    import typer
    import yaml

    from secateurs.pipeline_cli import run_cmd

    config = {
        "name": "bad-latency", "teacher": {"source": str(tiny_models["llama-tied"])}, "data": {"source": str(docs_dir)},
        "students": [{"name": "auto", "search": {"params": 1e6, "latency": 10, "engine_precision": "fp8"}}],
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(typer.Exit):
        run_cmd(tmp_path / "c.yaml", tmp_path / "run")
    assert capsys.readouterr().err.strip() == (
        "error: student auto: engine_precision='fp8' is not one of onnxruntime-genai's: int4, fp32, fp16"
    )
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ latency budget
def test_latency_budget_keeps_shapes_whose_measured_throughput_meets_it(tiny_models, tiny_importance, tiny_data,
                                                                         tmp_path, monkeypatch):  # fmt: skip
    """onnxruntime-genai int4 engines of random-weight candidates, measured once per shape (then cached)."""
    pytest.importorskip("onnxruntime_genai")
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    model = tiny_models["llama-tied"]
    counter = search.ParameterCounter(load_model(model).config, model)
    # Two shapes: 4 query heads as one KV group of 4 or two of 2.
    fixed = {"hidden_size": 48, "ffn_hidden_size": 64, "num_layers": 3, "num_attention_heads": 4}
    settings = SearchConfig(latency=1.0, fixed=fixed, engine_lengths="16:8", engine_batch=2)
    candidates = search.enumerate_candidates(counter, settings)
    assert {c.shape.num_key_value_heads for c in candidates} == {1, 2}
    measured = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "search-throughput").glob("*.json")]
    assert len(measured) == 2
    for m in measured:
        assert m["output_tokens_per_s"] >= settings.latency
        assert m["backend"] == "onnxruntime-genai" and m["precision"] == "int4"
    # The same shapes again: read from the cache, not built again (the files are not rewritten).
    stamps = sorted(p.stat().st_mtime_ns for p in (tmp_path / "cache" / "search-throughput").glob("*.json"))
    fastest = max(m["output_tokens_per_s"] for m in measured)
    with pytest.raises(search.SearchError, match="no candidate shape meets the budget latency="):
        search.enumerate_candidates(counter, settings.model_copy(update={"latency": 2 * fastest}))
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "cache" / "search-throughput").glob("*.json")) == stamps
    # Combined with a parameter budget, the parameter budget bounds the shapes measured.
    both = settings.model_copy(update={"params": min(c.parameters for c in candidates)})
    assert [c.parameters for c in search.enumerate_candidates(counter, both)] == [both.params]
    # Through the scoring step: each candidate's row holds its measured throughput, above the budget.
    report = search.score_candidates(model, tiny_importance["llama-tied"], tiny_data, tmp_path / "s",
                                     settings.model_copy(update={"top_k": 1, "val_sequences": 4}))  # fmt: skip
    assert len(report["candidates"]) == 2
    assert all(r["output_tokens_per_s"] >= settings.latency for r in report["candidates"])
    assert search.format_table(report).splitlines()[0].split() == ["candidate", "params", "tokens/s", "loss", "pruned",
                                                                   "loss", "KD"]  # fmt: skip
    # A latency budget alone admits anything smaller than the source: its own count, taken here from the loaded
    # weights by families.parameter_count (tied embeddings once), not from the search's ParameterCounter.
    assert report["parameter_limit"] == parameter_count(load_model(model)) - 1
    assert all(r["parameters"] < parameter_count(load_model(model)) for r in report["candidates"])
    # Measured on this machine's CPU and runtime: another machine (a GPU kind sharing the cache volume) measures
    # again rather than reading figures taken elsewhere.
    assert all(m["hardware"] == engine.hardware_identity("onnxruntime-genai") for m in measured)
    assert measured[0]["hardware"]["cores"] >= 1 and measured[0]["hardware"]["runtime"].startswith("onnxruntime-genai 0.")
    monkeypatch.setattr(engine, "hardware_identity", lambda backend: {"cpu": "another", "runtime": backend})
    search.enumerate_candidates(counter, settings)
    assert len(list((tmp_path / "cache" / "search-throughput").glob("*.json"))) == 4


def test_fp8_latency_search_calibrates_its_engines_on_the_search_data(tiny_models, tiny_importance, tiny_data,
                                                                      tmp_path, monkeypatch):  # fmt: skip
    """TensorRT-LLM's fp8 build needs calibration data: the candidates' engines get the search's dataset. Only the
    GPU-bound pieces (the runtime check and ModelOpt's build) stand in for what needs a GPU."""
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    built = []

    def build(self, model_dir, out_dir, precision, calib_dataset=None, **_):
        built.append((precision, calib_dataset))
        raise RuntimeError("no GPU here")

    monkeypatch.setattr(engine.TensorRTLLM, "check_runtime", lambda self, precision, capability: None)
    monkeypatch.setattr(engine.TensorRTLLM, "build", build)
    settings = SearchConfig(latency=1.0, engine_backend="tensorrt-llm", engine_precision="fp8", engine_lengths="16:8",
                            fixed={"hidden_size": 48, "ffn_hidden_size": 64, "num_layers": 3, "num_attention_heads": 4})
    with pytest.raises(RuntimeError, match="no GPU here"):
        search.score_candidates(tiny_models["llama-tied"], tiny_importance["llama-tied"], tiny_data, tmp_path / "o",
                                settings)  # fmt: skip
    assert built == [("fp8", Path(tiny_data).absolute())]


def test_latency_budget_without_its_engine_backend_fails_before_pruning(tiny_models, tiny_importance, tiny_data,
                                                                         tmp_path, monkeypatch):  # fmt: skip
    import secateurs.checkpoint

    monkeypatch.setattr(secateurs.checkpoint, "load_model", lambda *a, **k: pytest.fail("weights were read"))
    settings = SearchConfig(params=2e6, latency=100.0, engine_backend="tensorrt-llm", engine_precision="bf16")
    with pytest.raises(search.SearchError, match="latency budget: the tensorrt-llm engine backend is not available"):
        search.score_candidates(tiny_models["llama-tied"], tiny_importance["llama-tied"], tiny_data, tmp_path / "o",
                                settings)  # fmt: skip
    with pytest.raises(search.SearchError, match="engine_precision='fp8' is not one of onnxruntime-genai's"):
        search.score_candidates(tiny_models["llama-tied"], tiny_importance["llama-tied"], tiny_data, tmp_path / "o",
                                settings.model_copy(update={"engine_backend": "onnxruntime-genai",
                                                            "engine_precision": "fp8"}))  # fmt: skip

