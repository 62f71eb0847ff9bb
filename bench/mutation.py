"""Mutation score of the core: how many small code changes (mutants) the fast tests that cover each module catch.

mutmut 3 rewrites a copy of the source, one mutant at a time (an operator, a constant, a dropped argument), and
runs only the tests that reached the mutated function. A surviving mutant is a change no test notices: either a
missing test or an equivalent change. This runs it module by module, in a copy of the committed tree (mutmut edits
files in place, so never in the checkout), with the tests that cover each module:

    python bench/mutation.py [--modules prune importance ...] [--work /tmp/secateurs-mutation] [--rev HEAD]

and writes runs/mutation/<module>.json (counts, survivors with their diffs) and prints the table for
docs/mutation.md. mutmut is installed on first use into .cache/mutmut (pip --target), not into the project's venv.

The session fixtures (the real SmolLM2 checkpoint, tiny models, a packed dataset, importance scores) take about
half a minute to build; rebuilt in every mutant's process they would make a run take days. They are built once,
from the unmutated tree, and handed to the mutants' test processes through the pytest_fixture_setup hook below,
except the ones the module under mutation produces (a mutant of importance.run must reach the importance the tests
read), which are rebuilt in every process as in the real suite.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
MUTMUT = "mutmut==3.8.1"
FIXTURES_ENV = "SECATEURS_MUTATION_FIXTURES"

# The session fixtures of tests/conftest.py that are built once; per module, those it produces are rebuilt.
SHARED_FIXTURES = ["smollm2_dir", "tokenizer_dir", "tiny_models", "docs_dir", "tiny_data", "tiny_importance"]

# module -> its file, mutant name patterns ([] for every function), the session fixtures it produces (rebuilt for
# every mutant), and the fast tests that cover it. The data blend and reader: data/blend.py and data/reader.py
# since data.py became a package; in a tree from before, the same functions of data.py by name. The tests
# deselected there are the minute-long resume runs, which exercise preparation, not the blend or the reader.
DATA_TESTS = ["tests/test_data.py", "tests/test_mutants_data.py",
              "-k", "not killed_preparation and not in_every_process and not interrupted_preparation"]
MODULES: dict[str, dict] = {
    "prune": {"file": "secateurs/prune.py", "patterns": [], "produces": [],
              "tests": ["tests/test_prune.py", "tests/test_mutants_prune.py"]},
    "importance": {"file": "secateurs/importance.py", "patterns": [], "produces": ["tiny_importance"],
                   "tests": ["tests/test_importance.py", "tests/test_mutants_importance.py"]},
    "losses": {"file": "secateurs/losses.py", "patterns": [], "produces": [],
               "tests": ["tests/test_losses.py", "tests/test_mutants_losses.py"]},
    "data-blend": {"file": "secateurs/data/blend.py", "patterns": [], "produces": ["tiny_data", "tiny_importance"],
                   "tests": DATA_TESTS},
    "data-reader": {"file": "secateurs/data/reader.py", "patterns": [], "produces": ["tiny_data", "tiny_importance"],
                    "tests": DATA_TESTS},
    "plan": {"file": "secateurs/plan.py", "patterns": [], "produces": [],
             "tests": ["tests/test_plan.py", "tests/test_mutants_plan.py"]},
    "checkpoint": {"file": "secateurs/checkpoint.py", "patterns": [],
                   "produces": ["smollm2_dir", "tokenizer_dir", "tiny_models", "tiny_data", "tiny_importance"],
                   "tests": ["tests/test_checkpoint.py", "tests/test_mutants_checkpoint.py"]},
    # The blend and reader in a tree where they were still functions of data.py.
    "data": {"file": "secateurs/data.py",
             "patterns": ["secateurs.data.x_blend_counts__*", "secateurs.data.x_blend_index__*",
                          "secateurs.data.x__shards__*", "secateurs.data.x__shard_bytes__*",
                          "secateurs.data.x_shard_root__*", "secateurs.data.x__verify_shard__*",
                          "secateurs.data.xǁPackedSplitǁ*", "secateurs.data.xǁPackedDatasetǁ*",
                          "secateurs.data.x_load_packed__*"],
             "produces": ["tiny_data", "tiny_importance"], "tests": DATA_TESTS},
}
DEFAULT_MODULES = ["prune", "importance", "losses", "data-blend", "data-reader", "plan", "checkpoint"]

# mutmut's exit codes (mutmut/stats.py status_by_exit_code): 1 and 3 killed, 0 survived, 33/5 no tests,
# 36/24/-24/152/255 timeout (a mutant that loops forever is caught by the time limit, so it counts as killed).
KILLED = {1, 3}
TIMEOUT = {36, 24, -24, 152, 255}
SURVIVED = {0}
NO_TESTS = {5, 33}


# --- the pytest plugin (loaded in the mutants' test processes with -p mutation) ---------------------------------

def _decode(value):
    if isinstance(value, dict):
        return {k: Path(v) for k, v in value.items()}
    return Path(value)


def pytest_fixture_setup(fixturedef, request):
    """A prebuilt fixture's value, cached as pytest caches a computed one (see _pytest/fixtures.py)."""
    prebuilt_file = os.environ.get(FIXTURES_ENV)
    if not prebuilt_file:
        return None
    prebuilt = json.loads(Path(prebuilt_file).read_text())
    if fixturedef.argname not in prebuilt:
        return None
    value = _decode(prebuilt[fixturedef.argname])
    fixturedef.cached_result = (value, fixturedef.cache_key(request), None)
    return value


pytest_fixture_setup.tryfirst = True  # pluggy reads this attribute, as @pytest.hookimpl(tryfirst=True) sets it

# --- the run ------------------------------------------------------------------------------------------------------

RECORD_TEST = '''
import json, os
from pathlib import Path

def test_record_fixtures({names}):
    values = dict({pairs})
    encode = lambda v: {{k: str(p) for k, p in v.items()}} if isinstance(v, dict) else str(v)
    Path(os.environ["RECORD_TO"]).write_text(json.dumps({{k: encode(v) for k, v in values.items()}}))
'''


def mutmut_path(cache: Path) -> Path:
    target = cache / "mutmut"
    if not (target / "mutmut").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target), MUTMUT], check=True)
    return target


def export_tree(rev: str, dest: Path) -> None:
    """The committed tree at REV, without git metadata (mutmut edits it; the checkout stays untouched)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")


def environment(cache: Path) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               SECATEURS_CACHE=os.environ.get("SECATEURS_CACHE", str(REPO / ".cache" / "secateurs")))
    env["PYTHONPATH"] = os.pathsep.join([str(mutmut_path(cache)), str(BENCH)])
    return env


def build_fixtures(tree: Path, work: Path, env: dict) -> Path:
    """Build the shared session fixtures once, from the unmutated tree; their values as JSON."""
    out = work / "fixtures.json"
    if out.exists():
        return out
    test = tree / "tests" / "test_zz_record_fixtures.py"
    test.write_text(RECORD_TEST.format(names=", ".join(SHARED_FIXTURES),
                                       pairs=", ".join(f"{n}={n}" for n in SHARED_FIXTURES)))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={work / 'fixtures'}",
                    str(test)], cwd=tree, env={**env, "RECORD_TO": str(out)}, check=True)
    test.unlink()
    return out


def write_setup_cfg(tree: Path, module: dict) -> None:
    def lines(items):
        return "\n".join(f"    {x}" for x in items)

    (tree / "setup.cfg").write_text(
        "[mutmut]\n"
        "source_paths =\n    secateurs\n"
        # The tests read the shipped configs (the flagship's plan worked by hand) besides tests/ (copied anyway).
        "also_copy =\n    configs\n"
        f"only_mutate =\n    {module['file']}\n"
        f"pytest_add_cli_args =\n{lines(['-p', 'mutation', '-p', 'no:cacheprovider', '-x', '-q'])}\n"
        f"pytest_add_cli_args_test_selection =\n{lines(t for t in module['tests'] if (tree / t).exists() or not t.startswith('tests/'))}\n"
        "use_git_change_detection = false\n"
        "process_isolation = forkserver\n")


def run_module(name: str, tree: Path, work: Path, env: dict, fixtures: Path, max_children: int, sample: int,
               seed: int, only: list[str]) -> dict:
    module = MODULES[name]
    copy = work / name
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(tree, copy, symlinks=True)
    write_setup_cfg(copy, module)
    prebuilt = {k: v for k, v in json.loads(fixtures.read_text()).items() if k not in module["produces"]}
    (work / f"fixtures-{name}.json").write_text(json.dumps(prebuilt))
    env = {**env, FIXTURES_ENV: str(work / f"fixtures-{name}.json")}
    names = module["patterns"]
    if only:
        names = [n for n in only if n.startswith(module["file"][:-3].replace("/", ".") + ".")]
    elif sample:
        names = sample_mutants(name, copy, env, sample, seed)
    subprocess.run([sys.executable, "-m", "mutmut", "run", f"--max-children={max_children}", *names],
                   cwd=copy, env=env, check=False)
    result = summarize(name, copy, env, names)
    result.update(sample=sample, seed=seed)
    return result


GENERATE = """
import os
from mutmut.__main__ import create_mutants, copy_src_dir, copy_also_copy_files, setup_source_paths
from mutmut.mutation.trampoline import set_mutant_under_test
set_mutant_under_test("mutant_generation")
os.makedirs("mutants", exist_ok=True)
copy_src_dir(); copy_also_copy_files(); setup_source_paths(); create_mutants(1)
"""


def sample_mutants(name: str, copy: Path, env: dict, sample: int, seed: int) -> list[str]:
    """SAMPLE mutant names drawn uniformly (seeded) from the module's mutants (those matching its patterns).

    A uniform sample's killed fraction estimates the module's score with a binomial standard error of
    sqrt(p(1-p)/n); the full run of every mutant takes hours on two shared cores. The mutants are generated here
    (mutmut 3.8's own generation functions, which `mutmut run` calls first) so that their names can be drawn.
    """
    import fnmatch
    import random

    module = MODULES[name]
    subprocess.run([sys.executable, "-c", GENERATE], cwd=copy, env=env, check=True, capture_output=True)
    meta = json.loads((copy / "mutants" / (module["file"] + ".meta")).read_text())
    keys = sorted(k for k in meta["exit_code_by_key"]
                  if not module["patterns"] or any(fnmatch.fnmatch(k, p) for p in module["patterns"]))
    if len(keys) <= sample:
        return keys
    return sorted(random.Random(seed).sample(keys, sample))


def summarize(name: str, copy: Path, env: dict, names: list[str]) -> dict:
    import fnmatch

    module = MODULES[name]
    meta = json.loads((copy / "mutants" / (module["file"] + ".meta")).read_text())
    all_mutants = len(meta["exit_code_by_key"]) if not module["patterns"] else sum(
        any(fnmatch.fnmatch(k, p) for p in module["patterns"]) for k in meta["exit_code_by_key"])
    codes = {k: v for k, v in meta["exit_code_by_key"].items()
             if not names or any(fnmatch.fnmatch(k, p) for p in names)}
    killed = [k for k, c in codes.items() if c in KILLED or c in TIMEOUT]
    survived = sorted(k for k, c in codes.items() if c in SURVIVED)
    untested = sorted(k for k, c in codes.items() if c in NO_TESTS)
    other = sorted(k for k, c in codes.items() if k not in killed and k not in survived and k not in untested)
    diffs = {}
    for key in survived + untested:
        shown = subprocess.run([sys.executable, "-m", "mutmut", "show", key], cwd=copy, env=env,
                               capture_output=True, text=True, check=False)
        diffs[key] = shown.stdout
    return {"module": name, "file": module["file"], "all_mutants": all_mutants, "mutants": len(codes),
            "killed": len(killed), "survived": survived, "no_tests": untested, "other": {k: codes[k] for k in other},
            "score": len(killed) / len(codes) if codes else None, "diffs": diffs, "tests": module["tests"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modules", nargs="+", default=DEFAULT_MODULES, choices=list(MODULES),
                        help="in a tree from before data.py became a package, name `data` for its blend and reader")
    parser.add_argument("--work", type=Path, default=Path("/tmp/secateurs-mutation"))
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "mutation")
    parser.add_argument("--sample", type=int, default=0,
                        help="test this many mutants per module, drawn uniformly (0: every mutant)")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed")
    parser.add_argument("--mutants", nargs="+", default=[],
                        help="test only these mutants (names as in the JSON, e.g. a run's survivors)")
    args = parser.parse_args()

    cache = REPO / ".cache"
    env = environment(cache)
    tree = args.work / "tree"
    if tree.exists():
        shutil.rmtree(tree)
    export_tree(args.rev, tree)
    fixtures = build_fixtures(tree, args.work, env)
    args.out.mkdir(parents=True, exist_ok=True)
    print("| module | mutants (of all) | killed | score |\n| --- | ---: | ---: | ---: |")
    for name in args.modules:
        result = run_module(name, tree, args.work, env, fixtures, args.max_children, args.sample, args.seed,
                            args.mutants)
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
        print(f"| {name} | {result['mutants']} ({result['all_mutants']}) | {result['killed']} "
              f"| {100 * (result['score'] or 0):.0f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
