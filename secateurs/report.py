"""The comparison report: teacher, pruned students and distilled students side by side.

Consumes one entry per model (name, role, parent, parameter count, validation loss, perplexity, task scores
and the throughput `bench_engine` measured) and produces, in one directory: `report.md` (Markdown tables),
`report.html` (the same tables and the plots) and three PNG plots drawn with matplotlib's Agg backend:
- `quality_vs_parameters.png`: mean task score (validation loss where no model has task scores) against size;
- `throughput_vs_parameters.png`: output tokens/s against size, one line per backend and precision, one panel
  per length pair;
- `speedup.png`: each student's request throughput over the teacher's, at the same backend, precision,
  lengths and batch (a speed-up is only defined against a measurement made the same way);
- `search_loss_vs_parameters.png`, when a student's shape was searched (secateurs.search): each candidate's
  validation loss right after pruning and after its short distillation against its size (against its measured
  output tokens/s under a latency budget), the winner marked; the candidate table goes with the others.

Guarantees: entries are validated before anything is written; a speed-up is never computed across different
backends, precisions, lengths or batch sizes.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ROLES = ("teacher", "pruned", "distilled")
ROLE_COLORS = {"teacher": "#1f77b4", "pruned": "#ff7f0e", "distilled": "#2ca02c"}


class Throughput(BaseModel):
    """One benchmark point: a model on one backend at one precision, lengths and batch size."""

    model_config = ConfigDict(extra="forbid")
    backend: str
    precision: str
    input_len: int
    output_len: int
    batch: int
    requests_per_s: float = Field(description="median over the timed repeats")
    output_tokens_per_s: float = Field(description="median over the timed repeats")

    @property
    def setting(self) -> tuple[str, str, int, int, int]:
        """What must match for two points to be compared."""
        return (self.backend, self.precision, self.input_len, self.output_len, self.batch)


class SearchCandidate(BaseModel):
    """One candidate shape of an architecture search (secateurs.search), as the report shows it."""

    model_config = ConfigDict(extra="forbid")
    name: str
    parameters: int
    pruned_loss: float = Field(description="validation loss right after pruning")
    distilled_loss: float | None = Field(None, description="validation loss after the short distillation (top_k only)")
    output_tokens_per_s: float | None = Field(None, description="measured engine throughput (latency budgets only)")
    winner: bool = False


def search_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's candidates of one search result (`candidates.json` of the winner `pick_winner` wrote)."""
    return [
        {"name": r["name"], "parameters": r["parameters"], "pruned_loss": r["pruned_loss"],
         "distilled_loss": r.get("distilled_loss"), "output_tokens_per_s": r.get("output_tokens_per_s"),
         "winner": r["name"] == result.get("winner")}
        for r in result["candidates"]
    ]  # fmt: skip


class ReportEntry(BaseModel):
    """One model of the family."""

    model_config = ConfigDict(extra="forbid")
    name: str
    role: Literal["teacher", "pruned", "distilled"]
    parent: str | None = Field(None, description="the model this one was pruned or distilled from")
    parameters: int = Field(gt=0)
    val_loss: float | None = None
    perplexity: float | None = None
    tasks: dict[str, float] = Field(default_factory=dict, description="task name -> accuracy in [0, 1]")
    throughput: list[Throughput] = Field(default_factory=list)
    search: list[SearchCandidate] = Field(default_factory=list, description="the search that chose a pruned shape")

    @property
    def mean_task_score(self) -> float | None:
        return sum(self.tasks.values()) / len(self.tasks) if self.tasks else None


def throughput_from_bench(bench: dict[str, Any]) -> list[dict[str, Any]]:
    """The `throughput` list of a report entry from one `bench.json` (as `bench_engine` returns it)."""
    return [
        {
            "backend": bench["backend"],
            "precision": bench["precision"],
            "input_len": r["input_len"],
            "output_len": r["output_len"],
            "batch": r["batch"],
            "requests_per_s": r["requests_per_s"]["median"],
            "output_tokens_per_s": r["output_tokens_per_s"]["median"],
        }
        for r in bench["results"]
    ]


def speedups(entries: Sequence[ReportEntry]) -> list[dict[str, Any]]:
    """Request-throughput ratio of every non-teacher model over the teacher, per matching setting."""
    teachers = [e for e in entries if e.role == "teacher"]
    if not teachers:
        return []
    teacher = {t.setting: t for t in teachers[0].throughput}
    rows = []
    for e in entries:
        if e.role == "teacher":
            continue
        for t in e.throughput:
            if t.setting in teacher and teacher[t.setting].requests_per_s > 0:
                rows.append(
                    {
                        "name": e.name,
                        "backend": t.backend,
                        "precision": t.precision,
                        "lengths": f"{t.input_len}:{t.output_len}",
                        "batch": t.batch,
                        "speedup": t.requests_per_s / teacher[t.setting].requests_per_s,
                    }
                )
    return rows


# ----------------------------------------------------------------------------------------------------
# Tables


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def quality_rows(entries: Sequence[ReportEntry]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the model table (one row per model)."""
    tasks = sorted({t for e in entries for t in e.tasks})
    header = ["model", "role", "parent", "params (M)", "val loss", "perplexity", *tasks]
    rows = [
        [
            e.name,
            e.role,
            e.parent or "-",
            f"{e.parameters / 1e6:.1f}",
            _fmt(e.val_loss),
            _fmt(e.perplexity, 2),
            *(_fmt(e.tasks.get(t)) for t in tasks),
        ]
        for e in entries
    ]
    return header, rows


def throughput_rows(entries: Sequence[ReportEntry]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the throughput table (one row per model and measured setting)."""
    speed = {
        (s["name"], s["backend"], s["precision"], s["lengths"], s["batch"]): s["speedup"]
        for s in speedups(entries)
    }
    header = ["model", "backend", "precision", "in:out", "batch", "requests/s", "output tok/s", "speed-up"]
    rows = []
    for e in entries:
        for t in e.throughput:
            lengths = f"{t.input_len}:{t.output_len}"
            s = speed.get((e.name, t.backend, t.precision, lengths, t.batch))
            rows.append(
                [
                    e.name,
                    t.backend,
                    t.precision,
                    lengths,
                    str(t.batch),
                    f"{t.requests_per_s:.2f}",
                    f"{t.output_tokens_per_s:.1f}",
                    "1.00x" if e.role == "teacher" else (f"{s:.2f}x" if s is not None else "-"),
                ]
            )
    return header, rows


def search_tables(entries: Sequence[ReportEntry]) -> list[tuple[str, tuple[list[str], list[list[str]]]]]:
    """One candidate table per searched model: (title, (header, rows)), largest candidate first; with the measured
    output tokens/s under a latency budget."""
    tables = []
    for e in entries:
        if e.search:
            speed = _measured(e.search)
            header = ["candidate", "parameters", *(["output tokens/s"] if speed else []), "val loss pruned",
                      "val loss short KD", ""]  # fmt: skip
            rows = [[c.name, f"{c.parameters:,}", *([_fmt(c.output_tokens_per_s, 1)] if speed else []),
                     _fmt(c.pruned_loss, 4), _fmt(c.distilled_loss, 4), "winner" if c.winner else ""]
                    for c in sorted(e.search, key=lambda c: -c.parameters)]  # fmt: skip
            tables.append((f"Search: {e.name}", (header, rows)))
    return tables


def _measured(candidates: Sequence[SearchCandidate]) -> bool:
    """Whether the search measured every candidate's engine (a latency budget)."""
    return all(c.output_tokens_per_s is not None for c in candidates)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    # A pipe table is three lines of string joining; a library would add a dependency for nothing.
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def format_table(entries: Sequence[ReportEntry | dict[str, Any]]) -> str:
    """The model and throughput tables as text for a terminal."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    entries = _validate(entries)
    console = Console(file=io.StringIO(), width=160, color_system=None)
    for title, (header, rows) in (
        ("Models", quality_rows(entries)),
        ("Throughput", throughput_rows(entries)),
        *search_tables(entries),
    ):
        if not rows:
            continue
        table = Table(*header, title=title, box=box.SIMPLE)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    return console.file.getvalue()


# ----------------------------------------------------------------------------------------------------
# Plots


def _plot_quality(entries: Sequence[ReportEntry], path: Path) -> None:
    import matplotlib.pyplot as plt

    use_tasks = any(e.tasks for e in entries)
    label = "mean task score" if use_tasks else "validation loss"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = {e.name: (e.parameters / 1e6, e.mean_task_score if use_tasks else e.val_loss) for e in entries}
    for e in entries:
        x, y = points[e.name]
        if y is None:
            continue
        ax.scatter(
            x,
            y,
            color=ROLE_COLORS[e.role],
            s=60,
            zorder=3,
            label=e.role if e.role not in ax.get_legend_handles_labels()[1] else None,
        )
        ax.annotate(e.name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        parent = points.get(e.parent or "")
        if parent and parent[1] is not None:  # lineage: an arrow from the parent to the child
            ax.annotate("", xy=(x, y), xytext=parent, arrowprops={"arrowstyle": "->", "color": "0.6"})
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel(label)
    ax.set_title(f"{label} against size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_search(entries: Sequence[ReportEntry], path: Path) -> None:
    """Validation loss after the short distillation against parameters (against measured output tokens/s under a
    latency budget), one panel per search, winner marked (candidates not distilled: their loss right after
    pruning, hollow)."""
    import matplotlib.pyplot as plt

    searched = [e for e in entries if e.search]
    fig, axes = plt.subplots(1, len(searched), figsize=(6 * len(searched), 4.2), squeeze=False)
    for ax, e in zip(axes[0], searched):
        speed = _measured(e.search)

        def x(c):
            return c.output_tokens_per_s if speed else c.parameters / 1e6

        kd = [c for c in e.search if c.distilled_loss is not None]
        ax.scatter([x(c) for c in e.search], [c.pruned_loss for c in e.search], facecolors="none",
                   edgecolors=ROLE_COLORS["pruned"], label="right after pruning")  # fmt: skip
        ax.scatter([x(c) for c in kd], [c.distilled_loss for c in kd], color=ROLE_COLORS["distilled"],
                   label="after the short distillation", zorder=3)  # fmt: skip
        for c in kd:
            ax.annotate(c.name, (x(c), c.distilled_loss), textcoords="offset points", xytext=(5, 3), fontsize=7,
                        color="0.35")  # fmt: skip
        for c in (c for c in kd if c.winner):
            ax.scatter([x(c)], [c.distilled_loss], marker="*", s=260, color="gold", edgecolors="k", zorder=4,
                       label=f"winner: {c.name}")  # fmt: skip
        ax.set_title(f"search for {e.name}")
        ax.set_xlabel("measured output tokens/s" if speed else "parameters (millions)")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_throughput(entries: Sequence[ReportEntry], path: Path) -> None:
    import matplotlib.pyplot as plt

    pairs = sorted({(t.input_len, t.output_len) for e in entries for t in e.throughput})
    fig, axes = plt.subplots(1, max(len(pairs), 1), figsize=(5 * max(len(pairs), 1), 4.2), squeeze=False)
    for ax, (i, o) in zip(axes[0], pairs):
        series: dict[str, list[tuple[float, float]]] = {}
        for e in entries:
            for t in e.throughput:
                if (t.input_len, t.output_len) == (i, o):
                    series.setdefault(f"{t.backend} {t.precision} (batch {t.batch})", []).append(
                        (e.parameters / 1e6, t.output_tokens_per_s)
                    )
                    ax.annotate(
                        e.name,
                        (e.parameters / 1e6, t.output_tokens_per_s),
                        textcoords="offset points",
                        xytext=(5, 3),
                        fontsize=7,
                        color="0.35",
                    )
        for name, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_title(f"input {i} : output {o} tokens")
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel("output tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if not pairs:
        axes[0][0].text(0.5, 0.5, "no throughput measured", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_speedup(entries: Sequence[ReportEntry], path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = speedups(entries)
    settings = sorted({(r["backend"], r["precision"], r["lengths"], r["batch"]) for r in rows})
    names = list(dict.fromkeys(r["name"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names) * max(len(settings), 1) / 2), 4.5))
    width = 0.8 / max(len(settings), 1)
    for k, setting in enumerate(settings):
        values = {
            r["name"]: r["speedup"]
            for r in rows
            if (r["backend"], r["precision"], r["lengths"], r["batch"]) == setting
        }
        xs = [j + k * width for j, n in enumerate(names) if n in values]
        ys = [values[n] for n in names if n in values]
        bars = ax.bar(xs, ys, width=width, label=f"{setting[0]} {setting[1]} {setting[2]} b{setting[3]}")
        ax.bar_label(bars, fmt="%.2fx", fontsize=7)
    ax.axhline(1.0, color="0.4", linestyle="--", linewidth=1)
    ax.set_xticks([j + width * (len(settings) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel("requests/s, student / teacher")
    ax.set_title("speed-up over the teacher\n(same backend, precision, lengths and batch)", fontsize=10)
    if settings:
        # headroom above the bars for the legend
        ax.set_ylim(0, 1.35 * max(r["speedup"] for r in rows))
        ax.legend(fontsize=8, loc="upper left", ncol=2)
    else:
        ax.text(
            0.5, 0.5, "no student measured like the teacher", ha="center", va="center", transform=ax.transAxes
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# The report


def _validate(entries: Sequence[ReportEntry | dict[str, Any]]) -> list[ReportEntry]:
    entries = [e if isinstance(e, ReportEntry) else ReportEntry.model_validate(e) for e in entries]
    if not entries:
        raise ValueError("the report needs at least one model entry")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"model names in the report must be unique: {names}")
    if sum(e.role == "teacher" for e in entries) > 1:
        raise ValueError("the report takes one teacher; speed-ups are measured against it")
    for e in entries:
        if e.parent is not None and e.parent not in names:
            raise ValueError(f"{e.name}'s parent {e.parent!r} is not in the report")
    return entries


def write_report(entries: Sequence[ReportEntry | dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.html and the three plots into `out_dir`; returns {kind: path}."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in pipeline steps
    entries = _validate(entries)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "quality_plot": out_dir / "quality_vs_parameters.png",
        "throughput_plot": out_dir / "throughput_vs_parameters.png",
        "speedup_plot": out_dir / "speedup.png",
        "markdown": out_dir / "report.md",
        "html": out_dir / "report.html",
    }
    _plot_quality(entries, paths["quality_plot"])
    _plot_throughput(entries, paths["throughput_plot"])
    _plot_speedup(entries, paths["speedup_plot"])

    tables = [("Models", quality_rows(entries)), ("Throughput", throughput_rows(entries)), *search_tables(entries)]
    plots = [
        ("Quality against size", "quality_plot"),
        ("Throughput against size", "throughput_plot"),
        ("Speed-up over the teacher", "speedup_plot"),
    ]
    if any(e.search for e in entries):
        paths["search_plot"] = out_dir / "search_loss_vs_parameters.png"
        _plot_search(entries, paths["search_plot"])
        plots.append(("Search: validation loss against size", "search_plot"))
    md = ["# secateurs: model family report", ""]
    for title, (header, rows) in tables:
        md += [f"## {title}", "", _markdown_table(header, rows) if rows else "_none measured_", ""]
    md += [f"![{title}]({paths[key].name})" for title, key in plots]
    paths["markdown"].write_text("\n".join(md) + "\n")

    body = [
        f"<h2>{title}</h2>" + (_html_table(header, rows) if rows else "<p>none measured</p>")
        for title, (header, rows) in tables
    ]
    body += [f'<h2>{title}</h2><img src="{paths[key].name}" alt="{title}">' for title, key in plots]
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}"
    )
    paths["html"].write_text(
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>secateurs report</title>'
        f"<style>{style}</style></head><body><h1>secateurs: model family report</h1>"
        f"{''.join(body)}</body></html>\n"
    )
    return paths
