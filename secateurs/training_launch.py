"""Running a training step in this process or under torchrun, as its placement asks.

A pipeline step runs in one pod (or, locally, one kfp.local subprocess). With one process it calls the library;
with more it starts `torchrun --standalone --nproc-per-node N -m secateurs <step> ...`, the command a user would
type, with the step's settings in a file, and waits: torchrun starts the processes, gives them their ranks and
rendezvous (on this node), and stops all of them when one fails. The output is written by the main process only
(`secateurs.train`), so the step reads its report back from the output's manifest.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace


class LaunchError(RuntimeError):
    """A torchrun run that failed; the message is its first error line."""


def train(step: str, inputs: dict[str, str], out: str, settings, processes: int = 1, callbacks=(),
          trainjob: str = "") -> dict:  # fmt: skip
    """Run training step `step` ("distill" or "correct-teacher") and return its report.

    Args:
        inputs: the command's input options in the library's argument order, e.g. {"teacher": ..., "student": ...,
            "data": ...} for distill, {"model": ..., "data": ...} for correct-teacher.
        out: the output directory.
        settings: the step's settings model.
        processes: processes on this node; 1 runs in this process.
        callbacks: Trainer callbacks; under torchrun they see the run's logged numbers once it has finished.
        trainjob: JSON of a `secateurs.trainjob.JobPlacement` to run on several nodes as a Kubeflow Trainer
            TrainJob; empty runs on this node.
    """
    from secateurs import train as library
    from secateurs.manifest import read_manifest

    if trainjob:
        from secateurs import trainjob as jobs

        digest = library.run_digest(step, list(inputs.values()), settings)
        report = jobs.train(step, inputs, out, settings, jobs.JobPlacement(**json.loads(trainjob)), digest)
        _replay(report, callbacks)
        return report
    if processes == 1:
        function = {"distill": library.distill, "correct-teacher": library.correct_teacher}[step]
        return function(*inputs.values(), out, settings, callbacks=callbacks)
    with tempfile.TemporaryDirectory() as tmp:
        settings_file = Path(tmp) / "settings.json"
        settings_file.write_text(settings.model_dump_json())
        options = [x for name, path in {**inputs, "out": out}.items() for x in (f"--{name}", str(path))]
        torchrun([step, *options, "--settings", str(settings_file)], processes)
    report = read_manifest(out)["report"]
    _replay(report, callbacks)
    return report


def _replay(report: dict, callbacks) -> None:
    """Hand a finished run's logged numbers to the Trainer callbacks that could not watch it live."""
    for logs in report.get("log_history", []):
        state = SimpleNamespace(global_step=logs["step"])
        for callback in callbacks:
            callback.on_log(None, state, None, logs={k: v for k, v in logs.items() if k != "step"})


def torchrun(command: list[str], processes: int) -> None:
    """`torchrun --standalone --nproc-per-node PROCESSES -m secateurs COMMAND`, its output passed through.

    Raises:
        LaunchError: a process failed; the message holds the first `error:` line the processes printed (the
            command line's one-line reason), else torchrun's exit code.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           "-m", "secateurs", *command]  # fmt: skip
    errors = []
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1) as proc:
        for line in proc.stderr:
            sys.stderr.write(line)
            if line.startswith("error: "):
                errors.append(line.strip().removeprefix("error: "))
    if proc.returncode:
        reason = errors[0] if errors else f"torchrun exited with {proc.returncode} (its log is above)"
        raise LaunchError(f"{command[0]} in {processes} processes failed: {reason}")
