"""Config validation: wrong values fail before any compute, naming the field and the reason."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from secateurs.cli import app
from secateurs.config import ConfigError, load_config

BASE = {
    "teacher": {"source": "smollm2-135m"},
    "data": {"seq_len": 128},
    "students": [
        {"name": "width", "prune": {"hidden_size": 384, "num_attention_heads": 6, "num_key_value_heads": 3}},
        {"name": "small", "parent": "width", "prune": {"num_layers": 10}},
    ],
}


def write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_valid_config_and_lineage_order(tmp_path):
    data = dict(BASE, students=list(reversed(BASE["students"])))
    config = load_config(write(tmp_path, data))
    assert [s.name for s in config.lineage_order()] == ["width", "small"]
    assert config.distill.learning_rate == 1e-4 and config.teacher_correction.max_steps == 30


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["students"][0]["prune"].update(num_attention_heads=20, num_key_value_heads=8),
         "students[0].prune: num_attention_heads=20 is not a multiple of the 8 KV groups"),
        (lambda c: c["students"][1]["prune"].update(hidden_size=0), "students[1].prune.hidden_size=0: Input should be greater than or equal to 1"),
        (lambda c: c["students"][1].update(parent="nobody"), "students[1].parent='nobody' is neither 'teacher' nor a student name"),
        (lambda c: c["students"][0].update(parent="small"), "student chain has a cycle"),
        (lambda c: c["students"][0]["prune"].update(drop_layers="3-1"), "drop_layers: range '3-1' is empty"),
        (lambda c: c["data"].update(seq_len=1), "data.seq_len=1"),
        (lambda c: c.update(distil={}), "distil: Extra inputs are not permitted"),
        (lambda c: c.update(distill={"global_batch_size": 10, "micro_batch_size": 4}), "global_batch_size=10 is not a multiple of micro_batch_size=4"),
        (lambda c: c["students"][0]["prune"].update(depth_criterion="magic"), "students[0].prune.depth_criterion='magic'"),
    ],
)
def test_bad_values_name_the_field(change, message, tmp_path):
    import copy

    data = copy.deepcopy(BASE)
    change(data)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, data))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_reports_one_line_and_exit_code(tmp_path, tiny_models):
    runner = CliRunner()
    result = runner.invoke(app, ["validate", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1 and "config file" in result.output and "does not exist" in result.output
    result = runner.invoke(app, ["prune", "--model", str(tiny_models["llama-tied"]), "--importance", str(tmp_path),
                                 "--out", str(tmp_path / "o"), "--hidden-size", "0"])
    assert result.exit_code == 1
    assert "hidden_size=0" in result.output
    result = runner.invoke(app, ["prune", "--model", str(tmp_path / "nothing"), "--importance", str(tmp_path),
                                 "--out", str(tmp_path / "o"), "--hidden-size", "8"])
    assert result.exit_code == 1 and "error: model directory" in result.output and "does not exist" in result.output
