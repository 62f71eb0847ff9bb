"""Every example config under configs/ validates."""

from pathlib import Path

import pytest

from secateurs.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_configs_exist():
    assert CONFIGS, "no YAML configs found under configs/"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path):
    config = load_config(path)
    assert config.students and [s.name for s in config.lineage_order()]
