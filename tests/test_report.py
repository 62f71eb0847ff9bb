"""The comparison report: tables, HTML, real PNG plots, speed-ups only between like measurements."""

from __future__ import annotations

import pytest

from secateurs.report import ReportEntry, format_table, speedups, throughput_from_bench, write_report

pytest.importorskip("matplotlib", reason="the engine extra is not installed")


def _bench(backend, precision, rps_by_pair, batch=8):
    """A bench.json as `bench_engine` writes it (only the fields the report reads vary)."""
    return {
        "backend": backend,
        "precision": precision,
        "model_name": "m",
        "batch": batch,
        "repeats": 3,
        "warmup": 1,
        "seed": 0,
        "results": [
            {
                "input_len": i,
                "output_len": o,
                "batch": batch,
                "requests_per_run": batch,
                "requests_per_s": {"median": rps, "min": rps * 0.9, "max": rps * 1.1, "rel_spread": 0.2},
                "output_tokens_per_s": {
                    "median": rps * o,
                    "min": rps * o * 0.9,
                    "max": rps * o * 1.1,
                    "rel_spread": 0.2,
                },
                "seconds": [batch / rps] * 3,
            }
            for (i, o), rps in rps_by_pair.items()
        ],
    }


def _family():
    def tp(*benches):
        return [p for b in benches for p in throughput_from_bench(b)]

    return [
        {
            "name": "teacher-135m",
            "role": "teacher",
            "parameters": 134_515_008,
            "val_loss": 2.10,
            "perplexity": 8.17,
            "tasks": {"arc_easy": 0.58, "hellaswag": 0.41},
            "throughput": tp(
                _bench("onnxruntime-genai", "int4", {(128, 128): 4.0, (512, 64): 2.0}),
                _bench("onnxruntime-genai", "fp32", {(128, 128): 2.0}),
            ),
        },
        {
            "name": "pruned-90m",
            "role": "pruned",
            "parent": "teacher-135m",
            "parameters": 90_000_000,
            "val_loss": 3.40,
            "perplexity": 29.96,
            "tasks": {"arc_easy": 0.40, "hellaswag": 0.30},
            "throughput": tp(_bench("onnxruntime-genai", "int4", {(128, 128): 6.0, (512, 64): 3.0})),
        },
        {
            "name": "distilled-90m",
            "role": "distilled",
            "parent": "pruned-90m",
            "parameters": 90_000_000,
            "val_loss": 2.45,
            "perplexity": 11.59,
            "tasks": {"arc_easy": 0.52, "hellaswag": 0.37},
            # batch 16 was not measured for the teacher: no speed-up for it
            "throughput": tp(
                _bench("onnxruntime-genai", "int4", {(128, 128): 6.2}),
                _bench("onnxruntime-genai", "fp32", {(128, 128): 3.0}),
                _bench("onnxruntime-genai", "int4", {(128, 128): 9.0}, batch=16),
            ),
        },
    ]


def test_speedups_compare_only_like_settings():
    entries = [ReportEntry.model_validate(e) for e in _family()]
    got = {
        (r["name"], r["precision"], r["lengths"], r["batch"]): round(r["speedup"], 6)
        for r in speedups(entries)
    }
    assert got == {
        ("pruned-90m", "int4", "128:128", 8): 1.5,
        ("pruned-90m", "int4", "512:64", 8): 1.5,
        ("distilled-90m", "int4", "128:128", 8): 1.55,
        ("distilled-90m", "fp32", "128:128", 8): 1.5,
    }


def test_write_report_renders_markdown_html_and_valid_pngs(tmp_path):
    from PIL import Image

    paths = write_report(_family(), tmp_path / "report")
    assert set(paths) == {"markdown", "html", "quality_plot", "throughput_plot", "speedup_plot"}
    for key in ("quality_plot", "throughput_plot", "speedup_plot"):
        with Image.open(paths[key]) as im:
            im.verify()
        with Image.open(paths[key]) as im:
            assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 400
            # not a blank canvas: a plot has many colours
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 20

    md = paths["markdown"].read_text()
    assert "| model | role | parent | params (M) | val loss | perplexity | arc_easy | hellaswag |" in md
    assert "| distilled-90m | distilled | pruned-90m | 90.0 | 2.450 | 11.59 | 0.520 | 0.370 |" in md
    assert "| pruned-90m | onnxruntime-genai | int4 | 512:64 | 8 | 3.00 | 192.0 | 1.50x |" in md
    assert "| teacher-135m | onnxruntime-genai | fp32 | 128:128 | 8 | 2.00 | 256.0 | 1.00x |" in md
    assert "| distilled-90m | onnxruntime-genai | int4 | 128:128 | 16 | 9.00 | 1152.0 | - |" in md
    for png in ("quality_vs_parameters.png", "throughput_vs_parameters.png", "speedup.png"):
        assert f"]({png})" in md

    page = paths["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("<table>") == 2 and page.count("<img ") == 3
    assert "<td>distilled-90m</td><td>distilled</td><td>pruned-90m</td>" in page


def test_format_table_for_the_terminal():
    text = format_table(_family())
    lines = text.splitlines()
    assert any(line.split()[:3] == ["teacher-135m", "teacher", "-"] for line in lines)
    assert any("pruned-90m" in line and "1.50x" in line and "512:64" in line for line in lines)
    assert "Models" in text and "Throughput" in text


def test_report_without_task_scores_or_throughput_plots_validation_loss(tmp_path):
    entries = [
        {"name": "t", "role": "teacher", "parameters": 1_000_000, "val_loss": 2.0},
        {"name": "s", "role": "distilled", "parent": "t", "parameters": 500_000, "val_loss": 2.5},
    ]
    paths = write_report(entries, tmp_path)
    assert all(p.is_file() for p in paths.values())
    assert "_none measured_" in paths["markdown"].read_text()


@pytest.mark.parametrize(
    "entries, msg",
    [
        ([], "at least one model entry"),
        (
            [
                {"name": "a", "role": "teacher", "parameters": 1},
                {"name": "a", "role": "pruned", "parameters": 1},
            ],
            "model names in the report must be unique",
        ),
        (
            [
                {"name": "a", "role": "teacher", "parameters": 1},
                {"name": "b", "role": "teacher", "parameters": 1},
            ],
            "one teacher",
        ),
        (
            [{"name": "a", "role": "pruned", "parent": "x", "parameters": 1}],
            "a's parent 'x' is not in the report",
        ),
        ([{"name": "a", "role": "student", "parameters": 1}], "role"),
    ],
)
def test_bad_entries(entries, msg, tmp_path):
    with pytest.raises(ValueError, match=msg):
        write_report(entries, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_searches_get_their_candidate_tables_and_plot(tmp_path):
    """A parameter-budget search plots loss against parameters; a latency-budget one against the measured output
    tokens/s, with that column in its table."""
    from PIL import Image

    from secateurs.report import search_rows

    def searched(name, speeds):
        result = {"winner": "h64-f128-a4-kv2-l2", "candidates": [
            {"name": "h64-f128-a4-kv2-l2", "parameters": 90_000, "pruned_loss": 6.5, "distilled_loss": 4.1},
            {"name": "h48-f192-a3-kv1-l3", "parameters": 89_000, "pruned_loss": 6.1, "distilled_loss": 4.4},
            {"name": "h64-f96-a4-kv2-l3", "parameters": 88_000, "pruned_loss": 7.0},
        ]}  # fmt: skip
        for row, speed in zip(result["candidates"], speeds or []):
            row["output_tokens_per_s"] = speed
        return ReportEntry(name=name, role="pruned", parent="teacher", parameters=90_000, val_loss=6.5,
                           search=search_rows(result))  # fmt: skip

    teacher = ReportEntry(name="teacher", role="teacher", parameters=180_000, val_loss=3.0)
    paths = write_report([teacher, searched("by-params-pruned", None), searched("fast-pruned", [310.5, 280.0, 402.25])],
                         tmp_path / "report")  # fmt: skip
    md = paths["markdown"].read_text()
    assert "| candidate | parameters | val loss pruned | val loss short KD |  |" in md
    assert "| h64-f128-a4-kv2-l2 | 90,000 | 6.5000 | 4.1000 | winner |" in md
    assert "| candidate | parameters | output tokens/s | val loss pruned | val loss short KD |  |" in md
    assert "| h64-f96-a4-kv2-l3 | 88,000 | 402.2 | 7.0000 | - |  |" in md
    with Image.open(paths["search_plot"]) as im:
        assert im.format == "PNG" and im.size[0] >= 1200  # two panels
