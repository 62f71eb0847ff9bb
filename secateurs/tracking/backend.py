"""The MLflow tracking backend: which URI (`resolve_tracking_uri`), whether it answers (`check_reachable`), and
`Guard`, through which every MLflow call goes so that tracking never stops a step."""

from __future__ import annotations

import logging
import os
import posixpath
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlparse

from secateurs.errors import exception_chain

log = logging.getLogger(__package__)
# MLflow's async logging logs each failed batch at ERROR with its whole 400-character exception; the guard says the
# same in one line.
logging.getLogger("mlflow.utils.async_logging.async_logging_queue").addFilter(
    lambda record: "Failed to log run data" not in record.getMessage()
)

# The MLflow client retries 7 times with a backoff factor of 2 and a 120 s timeout by default: minutes per
# call when the server is down. A training step would stall that long at every logging interval.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class TrackingUnreachable(ConnectionError):
    """The MLflow tracking backend cannot be reached (raised by `check_reachable` only)."""


def resolve_tracking_uri(uri: str | None = None, run_dir: str | Path | None = None) -> str:
    """The tracking URI to use: `uri`, else `MLFLOW_TRACKING_URI`, else SQLite under `run_dir`.

    A bare path ending in `.db` is read as a SQLite file. The file store (`file:` URIs, plain directories)
    errors out since MLflow 3.13, so it is refused here with the fix in the message.

    Raises:
        ValueError: no URI can be derived, or the URI names the file store.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        if run_dir is None:
            raise ValueError(
                "no MLflow tracking URI: pass one, set MLFLOW_TRACKING_URI, or give a run directory for "
                "sqlite:///<run_dir>/mlflow.db"
            )
        return f"sqlite:///{(Path(run_dir).absolute() / 'mlflow.db')}"
    scheme = urlparse(uri).scheme
    if not scheme and uri.endswith(".db"):
        return f"sqlite:///{Path(uri).absolute()}"
    if scheme in ("", "file"):
        raise ValueError(
            f"MLflow tracking URI {uri!r} names the file store, which MLflow 3.13+ no longer supports: "
            "use sqlite:///path/mlflow.db or an http(s):// tracking server"
        )
    return uri


def _set_global_tracking_uri(uri: str) -> None:
    """mlflow.set_tracking_uri, without the MLFLOW_TRACKING_URI it also exports: left set, it would become the
    tracking URI of every later run this process starts (a second `run` with another run directory, in tests)."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Check before any compute that the tracking backend answers.

    http(s): GET `<uri>/health`; sqlite: the database's directory exists or can be created and is writable.
    Other schemes (databricks, ...) are not checked.

    Raises:
        TrackingUnreachable: with a one-line reason, e.g.
            "MLflow tracking server at http://mlflow:5000 is unreachable: ConnectionError: ...".
    """
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        reason = health_probe(uri, timeout)()
        if reason is not None:
            hint = " (the server refuses this host name: add it to --allowed-hosts / MLFLOW_SERVER_ALLOWED_HOSTS)"
            raise TrackingUnreachable(f"MLflow tracking server at {uri} is unreachable: {reason}"
                                      + (hint if reason.endswith("HTTP 403") else ""))  # fmt: skip
    elif scheme == "sqlite":
        db = _sqlite_path(uri)
        if db is None:
            return
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingUnreachable(f"MLflow SQLite store {uri} is unusable: {_describe(exc)}") from exc
        if not os.access(db.parent, os.W_OK):
            raise TrackingUnreachable(f"MLflow SQLite store {uri} is unusable: {db.parent} is not writable")


def health_probe(uri: str, timeout: float = 2.0) -> Callable[[], str | None] | None:
    """For `Guard`: one GET of an HTTP tracking server's `/health`, no retries; returns why it failed, or None.
    None for other stores (a SQLite file has no outage to wait out)."""
    if urlparse(uri).scheme not in ("http", "https"):
        return None

    def probe() -> str | None:
        import requests

        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as exc:
            return _describe(exc)
        return None if response.status_code == 200 else f"/health answered HTTP {response.status_code}"

    return probe


def is_rank_zero() -> bool:
    """True unless `RANK` (or, without it, `LOCAL_RANK`) names another process of a distributed job."""
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    return rank.strip() in ("", "0")


def mlflow_key(name: str) -> str:
    """`name` as a valid MLflow param/metric/tag key; one bad key would fail its whole batch.

    Characters outside letters, digits, `_ - . /` and space become `_` (lm-eval reports keys like "acc,none");
    a key that is not a normalised path (MLflow may store it as a file) loses its slashes; at most 250
    characters.
    """
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH

    key = re.sub(r"[^/\w.\- ]", "_", str(name))
    if not key or posixpath.normpath(key) != key or key.startswith(("/", "..")):
        key = key.replace("/", "_") or "_"
    return _truncate(key, MAX_ENTITY_KEY_LENGTH)


class Failure(str):
    """One line of `Guard.failures`, "mlflow: could not <what> (<reason>)", that keeps its two parts."""

    what: str
    reason: str

    def __new__(cls, what: str, reason: str) -> Self:
        line = super().__new__(cls, f"mlflow: could not {what} ({reason})")
        line.what, line.reason = what, reason
        return line


class Guard:
    """Calls MLflow so that tracking never stops a step: on a tracking error it logs one warning line
    ("mlflow: could not log metrics step 120 (ConnectionError: ...)"), records it in `failures`, and returns None.

    After a connection error, non-essential calls (training metrics) are skipped without a network round trip for
    `cooldown_s`; essential ones (runs, models, the final report) are tried when `probe` (one request to the
    server's health endpoint, no retries) finds the server back, and otherwise fail at once: without it each would
    pay MLflow's HTTP retries, several seconds, and a step's end makes a dozen such calls. HTTP retries and
    timeouts are shortened (`HTTP_DEFAULTS`, unless set) so that the first call of an outage costs seconds.

    Args:
        cooldown_s: how long after a connection error the server is taken to be down.
        probe: returns why the server is unreachable, or None when it answers (None: no probe, always try).
    """

    def __init__(self, cooldown_s: float, probe: Callable[[], str | None] | None = None) -> None:
        self.cooldown_s = cooldown_s
        self.probe = probe
        self.failures: list[Failure] = []
        self.down_until = 0.0
        self._warned_skip_until = 0.0

    def __call__(
        self, what: str, fn: Callable[..., Any], *args: Any, essential: bool = True, **kwargs: Any
    ) -> Any:
        now = time.monotonic()
        if not essential and now < self.down_until:
            failure = Failure(what, "server unreachable, skipped")
            self.failures.append(failure)
            if now >= self._warned_skip_until:
                log.warning("%s; skipping training metrics for up to %.0f s", failure, self.down_until - now)
                self._warned_skip_until = self.down_until
            return None
        if now < self.down_until and self.probe is not None:
            reason = self.probe()
            if reason is not None:
                self.down_until = time.monotonic() + self.cooldown_s
                failure = Failure(what, f"{reason}; not tried")
                self.failures.append(failure)
                log.warning(failure)
                return None
        try:
            return fn(*args, **kwargs)
        except _tracking_errors() as exc:
            if _is_connection_error(exc):
                self.down_until = time.monotonic() + self.cooldown_s
            failure = Failure(what, _describe(exc))
            self.failures.append(failure)
            log.warning(failure)
            return None


def _tracking_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean 'tracking failed', not 'our code is wrong' (a TypeError still propagates)."""
    import requests
    from mlflow.exceptions import MlflowException

    errors: tuple[type[BaseException], ...] = (MlflowException, requests.RequestException, OSError)
    try:
        from sqlalchemy.exc import SQLAlchemyError

        errors += (SQLAlchemyError,)
    except ImportError:
        pass
    return errors


def _is_connection_error(exc: BaseException) -> bool:
    import requests

    for e in exception_chain(exc):
        if isinstance(e, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
            return True
        if any(
            s in str(e) for s in ("Max retries exceeded", "Failed to establish a new connection", "timed out")
        ):
            return True
    return False


def _describe(exc: BaseException) -> str:
    """'<cause type>: <reason>', short enough for one log line.

    MLflow wraps transport errors in an MlflowException whose context is the real cause, and whose message
    buries the reason ("[Errno 111] Connection refused") after 300 characters of URL and retry state: name the
    cause's type and pull the reason and the URL out.
    """
    chain = list(exception_chain(exc))
    cause = chain[0]
    if type(cause).__module__.startswith("mlflow"):
        cause = next((e for e in chain[1:] if not type(e).__module__.startswith("mlflow")), cause)
    text = " ".join(str(exc).split())
    reason = re.search(r"\[Errno -?\d+\][^'\")]*", text) or re.search(r"Read timed out[^'\")]*", text)
    if reason:
        url = re.search(r"API request to (\S+)", text)
        return f"{type(cause).__name__}: {reason.group(0).strip()}" + (f" ({url.group(1)})" if url else "")
    return f"{type(cause).__name__}: {_truncate(text, 200)}"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite: URI, or None for other URIs and in-memory databases."""
    from sqlalchemy.engine import make_url

    path = make_url(uri).database if uri.startswith("sqlite:") else None
    return Path(path) if path and path != ":memory:" else None


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
