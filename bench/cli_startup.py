"""Wall time of the light commands (`compile --help`, `validate`, `compile`) against a baseline revision.

The baseline is another git revision of this repository (default: the one before `secateurs.config` stopped
importing torch), checked out into a temporary worktree and run with the same interpreter and environment, so
the only difference is the code. Each command runs `--repeats` times per tree, alternating, and the medians are
compared. It also reports whether torch was imported (`python -X importtime`).

    python bench/cli_startup.py [--baseline 8c5f59d] [--repeats 5] [--out runs/bench/cli-startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "llama31-8b-minitron.yaml"


def tree_env(tree: Path) -> dict[str, str]:
    """Run `secateurs` from `tree`: the installed package maps components/ and pipelines/ into secateurs.*, which a
    plain checkout on PYTHONPATH does not, so the baseline tree gets the same mapping as symlinks."""
    for name in ("components", "pipelines"):
        link = tree / "secateurs" / name
        if not link.exists():
            link.symlink_to(tree / name)
    return {**os.environ, "PYTHONPATH": str(tree)}


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    # Outside the repository: `python -m` puts the working directory first on sys.path.
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=tempfile.gettempdir())
    return time.perf_counter() - start


def imports_torch(cmd: list[str], env: dict[str, str]) -> bool:
    done = subprocess.run([sys.executable, "-X", "importtime", *cmd[1:]], env=env, capture_output=True, text=True,
                          cwd=tempfile.gettempdir())  # fmt: skip
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in done.stderr.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="8c5f59d", help="git revision to compare against")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="runs/bench/cli-startup.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.baseline],
                       check=True, capture_output=True)  # fmt: skip
        try:
            trees = {"baseline": (tree_env(base), base), "current": ({**os.environ, "PYTHONPATH": str(ROOT)}, ROOT)}
            spec = str(Path(tmp) / "pipeline.yaml")
            commands = {  # each tree's own copy of the flagship config (its fields differ between revisions)
                "compile --help": lambda root: ["compile", "--help"],
                "validate": lambda root: ["validate", str(root / CONFIG.relative_to(ROOT))],
                "compile": lambda root: ["compile", str(root / CONFIG.relative_to(ROOT)), "-o", spec],
            }
            results = {}
            for name, argv in commands.items():
                cmds = {tree: [sys.executable, "-m", "secateurs.cli", *argv(root)] for tree, (_, root) in trees.items()}
                times = {tree: [] for tree in trees}
                for _ in range(args.repeats):
                    for tree, (env, _) in trees.items():
                        times[tree].append(timed(cmds[tree], env))
                medians = {tree: statistics.median(t) for tree, t in times.items()}
                torch_loaded = {tree: imports_torch(cmds[tree], env) for tree, (env, _) in trees.items()}
                results[name] = {"seconds": times, "median": medians, "torch_imported": torch_loaded,
                                 "speedup": medians["baseline"] / medians["current"]}  # fmt: skip
                print(f"{name:>16}: baseline {medians['baseline']:.2f} s (torch {torch_loaded['baseline']}), "
                      f"current {medians['current']:.2f} s (torch {torch_loaded['current']}), "
                      f"x{results[name]['speedup']:.2f} faster")  # fmt: skip
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"baseline": args.baseline, "repeats": args.repeats, **results}, indent=1))


if __name__ == "__main__":
    main()
