"""What an MLflow outage costs a step: essential tracking calls (params, tags, ending the run) made while a real
`mlflow server` is down, with the guard's health probe (one GET of /health, no retries, before each call during
the cooldown) against without it (each call pays MLflow's HTTP retries), in the same run.

    python bench/tracking_outage.py [--calls 10]

The server is started, one step run opened, then the server is killed (SIGKILL) and the calls are made; the time
from the kill to the end of the step is printed for both, with their ratio.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path


def outage(calls: int, probe: bool) -> float:
    """Seconds from the server's death to the end of a step that makes `calls` essential calls after it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import MlflowServer  # the same real server the tests use

    from secateurs.tracking import Tracker

    with tempfile.TemporaryDirectory() as tmp:
        server = MlflowServer(Path(tmp))
        try:
            tracker = Tracker(server.wait(), experiment="bench", pipeline_run=f"outage-{probe}")
            if not probe:
                tracker.guard.probe = None
            with tracker.step("distill", student="bench") as run:
                run.log_params({"before": 1})
                os.killpg(server.proc.pid, signal.SIGKILL)
                server.proc.wait()
                start = time.monotonic()
                for i in range(calls // 2):
                    run.log_params({f"p{i}": i})
                    run.set_tags({f"t{i}": i})
            seconds = time.monotonic() - start
            assert len(tracker.failures) == 2 * (calls // 2) + 1, tracker.failures  # every call failed, and said so
            return seconds
        finally:
            if server.proc.poll() is None:
                server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    without = outage(args.calls, probe=False)
    with_probe = outage(args.calls, probe=True)
    print(f"{args.calls} essential calls and the step's end, server down: without the probe {without:.1f} s, "
          f"with it {with_probe:.1f} s ({without / with_probe:.1f}x faster)")  # fmt: skip


if __name__ == "__main__":
    main()
