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
