"""How secateurs turns an exception into the one line a user reads.

Every command fails on bad input with one line naming the problem (`one_line_errors`), and the S3 and MLflow
layers name the real cause of a wrapped error (`exception_chain`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

# What a command reports in one line: bad input (ValueError and its subclasses: config, checkpoint, data errors),
# missing or unwritable files, an unreachable server, and the storage and pipeline errors (RuntimeError). Anything
# else is a bug and keeps its traceback.
EXPECTED = (ValueError, ConnectionError, FileNotFoundError, FileExistsError, PermissionError, RuntimeError)


class PipelineError(ValueError):
    """A pipeline that cannot be run, compiled, submitted or rerun as asked; the message says why."""


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, its causes and contexts, and the last error s3transfer gave up on, each once."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        pending += [e.__cause__, e.__context__, getattr(e, "last_exception", None)]


def first_line(exc: BaseException) -> str:
    """The first line of the message, or the exception's type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def fail(exc: BaseException) -> None:
    """Print `error: <first line>` on stderr and exit 1."""
    import typer

    typer.secho(f"error: {first_line(exc)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1) from None


def one_line_errors(fn):
    """Decorate a command: expected failures (`EXPECTED`) print one line on stderr and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EXPECTED as e:
            import click
            import typer

            if isinstance(e, (typer.Exit, click.exceptions.Exit)):  # RuntimeErrors too: an error already printed
                raise
            fail(e)

    return wrapper
