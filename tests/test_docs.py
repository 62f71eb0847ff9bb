"""The documents that repeat one another stay the same."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_guide_is_the_readme_s_cluster_section():
    """docs/cluster.md is the README's "Run on a cluster" section, with image paths relative to docs/."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Run on a cluster\n")
    end = readme.find("\n## ", start)  # the next section, if one follows it
    section = readme[start : end + 1 if end >= 0 else None].replace("docs/images/", "images/")
    assert (ROOT / "docs" / "cluster.md").read_text() == section
    for image in ("images/mlflow-model-page.png",):
        assert image not in section or (ROOT / "docs" / image).is_file()
