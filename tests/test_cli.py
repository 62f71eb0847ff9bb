"""The command line itself: every command answers --help."""

import typer.main
from typer.testing import CliRunner

from secateurs.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)


def test_every_command_is_listed():
    # The recipe's steps and the pipeline commands; a command dropped from the app fails here.
    assert {"prepare-data", "importance", "prune", "distill", "evaluate", "run", "rerun", "lineage"} <= set(COMMANDS)


def test_help_of_every_command():
    runner = CliRunner()
    for name in [None, *COMMANDS]:
        args = [name, "--help"] if name else ["--help"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"secateurs {' '.join(args)}: {result.output}{result.exception!r}"
        assert "Usage:" in result.output and "Traceback" not in result.output


def test_a_step_runs_with_its_defaults_and_an_option_overrides_the_settings_file(tiny_models, tiny_data, tmp_path):
    """`evaluate` with only its required options: its list-valued default (`--tasks lambada-docs`) is the model's
    own, not typer's rendering of it. An option given equal to its default still overrides `--settings`."""
    import json

    from secateurs.config import EvaluateConfig
    from secateurs.manifest import read_manifest

    runner = CliRunner()
    model = str(tiny_models["llama-tied"])
    assert "[default: lambada-docs]" in " ".join(runner.invoke(app, ["evaluate", "--help"], terminal_width=200).output.split())
    out = tmp_path / "defaults"
    result = runner.invoke(app, ["evaluate", "--model", model, "--data", str(tiny_data), "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert read_manifest(out)["config"] == EvaluateConfig().model_dump()
    assert "lambada-docs" in json.loads((out / "metrics.json").read_text())["tasks"]

    settings = tmp_path / "evaluate.yaml"
    settings.write_text("tasks: [lambada-docs]\nbatch_size: 2\nmax_sequences: 3\nlimit: 4\n")
    out = tmp_path / "overridden"
    result = runner.invoke(app, ["evaluate", "--model", model, "--data", str(tiny_data), "--out", str(out),
                                 "--settings", str(settings), "--batch-size", "8", "--tasks", "lambada-docs"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    config = read_manifest(out)["config"]
    assert (config["batch_size"], config["max_sequences"], config["limit"]) == (8, 3, 4)


def test_list_options_take_commas_or_json():
    """The shapes the README shows for a list-valued option: `--block-sizes 15,18` and the same list as JSON; a list
    of pairs as JSON (`--layer-pairs '[[3, 7], [5, 11]]'`). Read by the mechanism every step command is built with
    (`_model_options` over the step's own settings model), on a command that hands back what it was given."""
    import typer

    from secateurs.cli import _model_options
    from secateurs.config import DistillConfig, ImportanceConfig

    seen = []
    probe = typer.Typer()

    @probe.command("importance")
    @_model_options(ImportanceConfig)
    def importance_settings(settings: ImportanceConfig = None):
        seen.append(settings.block_sizes)

    @probe.command("distill")
    @_model_options(DistillConfig)
    def distill_settings(settings: DistillConfig = None):
        seen.append(settings.layer_pairs)

    runner = CliRunner()
    for shape in ("15,18", "[15, 18]"):
        result = runner.invoke(probe, ["importance", "--block-sizes", shape])
        assert result.exit_code == 0, result.output + repr(result.exception)
    result = runner.invoke(probe, ["distill", "--layer-pairs", "[[3, 7], [5, 11]]"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert seen == [[15, 18], [15, 18], [(3, 7), (5, 11)]]
