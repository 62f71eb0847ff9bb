"""The docs hold together: every link of docs/*.md and README.md, and every `docs/...` path the code names, exists;
the README's shell blocks name real commands and options."""

import re
import subprocess
from pathlib import Path

import pytest
from test_commands import check_syntax, readme_blocks

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
# [text](target) and ![alt](target); the target ends at the first space (a title may follow) or parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)")
# A path under docs/ as code and comments name it: docs/cluster.md, docs/images/x.png.
DOCS_PATH = re.compile(r"\bdocs/[\w./-]*\w")
# Where code names docs: the project's own source, build and chart files (not the docs, which have links).
CODE_GLOBS = ("secateurs/**/*.py", "components/*.py", "pipelines/*.py", "bench/**/*.py", "bench/*.sh", "tests/*.py",
              "configs/*.yaml", "docker/*", "charts/**/*", "Makefile", ".ci/run", "pyproject.toml", "mkdocs.yml")


def test_every_page_is_in_the_site():
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p.name for p in PAGES if p.parent.name == "docs" and f": {p.name}" not in nav]
    assert not missing, f"docs pages not in mkdocs.yml's nav: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_exists(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address, or a heading of the same page (mkdocs --strict checks those)
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to what does not exist: {broken}"


def test_the_link_reader_finds_links():
    # The oracle for LINK: each kind of link the pages use, and a web address.
    text = "[a](docs/x.md) ![b](images/y.png \"t\") [c](z.md#part) [d](https://example.com/p)"
    assert LINK.findall(text) == ["docs/x.md", "images/y.png", "z.md#part", "https://example.com/p"]


def named_docs_paths() -> dict[str, set[str]]:
    """Every `docs/...` path a project file outside docs/ names -> the files that name it."""
    named: dict[str, set[str]] = {}
    for pattern in CODE_GLOBS:
        for path in ROOT.glob(pattern):
            # This file's own examples are not citations.
            if path.is_file() and path.suffix not in (".png", ".tgz", ".whl") and path != Path(__file__).resolve():
                for name in DOCS_PATH.findall(path.read_text(errors="replace")):
                    named.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return named


def test_every_docs_path_the_code_names_exists():
    named = named_docs_paths()
    # The reader reads: the layout test cites this page.
    assert "tests/test_layout.py" in named.get("docs/architecture.md", set())
    # Paths that name a file of a dataset's layout (shards under a `docs` split name), not this folder.
    missing = {name: sorted(where) for name, where in named.items()
               if not (ROOT / name).exists() and not name.startswith("docs/train-")}  # fmt: skip
    assert not missing, f"code names docs that do not exist: {missing}"


def test_the_readme_cluster_path_names_real_commands():
    """The README's cluster path is marked cluster-only: each line's command and options exist (as
    tests/test_commands.py checks the cluster guide's)."""
    [(mark, body, commands)] = readme_blocks("On a cluster")
    assert mark == "cluster-only"
    subprocess.run(["bash", "-n"], input=body, check=True, text=True)
    assert [argv[1] for argv in commands] == ["plan", "rehearse", "submit", "rerun", "lineage"]
    for argv in commands:
        check_syntax(argv)
