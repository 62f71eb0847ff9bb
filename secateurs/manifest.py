"""Artifact manifests and atomic artifact writes.

Every artifact a step produces is one directory holding a small `secateurs.json`: which step made it, from which
inputs (URI + content hash), with which config, with which software versions, and the step's report. MLflow
lineage is rebuilt from these files, and later steps use them to refuse inputs that do not belong together
(an importance artifact of another model, a dataset made with another tokenizer).

Directories are written to a temporary sibling and renamed into place, so a half-written artifact is never
mistaken for a result and a failed step leaves an existing output untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "secateurs.json"
# A root for work that must outlive a step's pod (training checkpoints, a preparation's shards): on a cluster, the
# cache volume. A retried step finds its work there by what it computes, wherever its output now goes.
CHECKPOINTS_ENV = "SECATEURS_CHECKPOINTS"
# Where prepare-data publishes a dataset's token shards (a directory on a shared volume, or an `s3://` prefix), so
# that its artifact carries only their index: set on the prepare-data task by the pipeline (`data_store` in
# secateurs.pipelines.recipe), read by the component and by `secateurs prepare-data --store`.
DATA_STORE_ENV = "SECATEURS_DATA_STORE"


def cache_dir() -> Path:
    """Where downloads and S3 inputs are kept between steps: `SECATEURS_CACHE`, else `~/.cache/secateurs`."""
    return Path(os.environ.get("SECATEURS_CACHE") or "~/.cache/secateurs").expanduser()


def software_versions() -> dict[str, str]:
    """Versions of the packages that decide an artifact's numbers."""
    import importlib.metadata as md

    versions = {}
    for name in ("secateurs", "torch", "transformers", "datasets"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def json_digest(value: Any, length: int | None = 16) -> str:
    """sha256 of `value` as JSON with sorted keys (values JSON cannot hold written with `str`), hex, cut to
    `length` characters (None: all 64): equal for equal settings however their dicts were built."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


def content_hash(path: str | Path, patterns: tuple[str, ...] = ("*.json", "*.safetensors", "*.arrow")) -> str:
    """sha256 over the files of an artifact directory (names and bytes), ignoring the manifest itself.

    Large weight files are hashed by size and their first and last MiB: the hash identifies an artifact, it is
    not an integrity check, and reading 16 GB of weights per step would cost minutes.
    """
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for pat in patterns for p in path.rglob(pat))
    for f in files:
        if f.name == MANIFEST or not f.is_file():
            continue
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        size = f.stat().st_size
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            if size <= 2 << 20:
                h.update(fh.read())
            else:
                h.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    return h.hexdigest()


def write_manifest(
    out_dir: str | Path,
    step: str,
    inputs: dict[str, str | Path] | None = None,
    config: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write `secateurs.json` into `out_dir` and return its content."""
    out_dir = Path(out_dir)
    manifest = {
        "step": step,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": {
            name: {"uri": str(uri), "sha256": content_hash(uri) if Path(uri).exists() else None}
            for name, uri in (inputs or {}).items()
        },
        "config": config or {},
        "report": report or {},
        "versions": software_versions(),
        **extra,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an artifact directory, or {} for a directory secateurs did not write."""
    f = Path(path) / MANIFEST
    return json.loads(f.read_text()) if f.is_file() else {}


@contextlib.contextmanager
def atomic_output(out_dir: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that replaces `out_dir` only if the block succeeds.

    The old `out_dir` (if any) is moved aside and deleted only after the new one is in place.
    """
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out_dir)


def permit_as_umask(path: str | Path) -> None:
    """Give PATH and everything under it the modes the process's umask allows (directories 0o777, files 0o666,
    masked), where temporary directories (0o700) and files that libraries write through a temporary file (0o600:
    transformers' model.safetensors) would otherwise leave an artifact readable by its writer's uid alone. On a
    cluster that runs each step under another uid of group 0, or in `--runner container`, the next step reads it.
    """
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    for p in [path, *path.rglob("*")]:
        if not p.is_symlink():
            executable = p.is_dir() or p.stat().st_mode & 0o111
            os.chmod(p, (0o777 if executable else 0o666) & ~umask)


def publish(work: str | Path, out_dir: str | Path) -> None:
    """Rename the finished directory WORK to OUT_DIR; an old OUT_DIR is moved aside and deleted only after.

    WORK on another file system (a volume) is first moved beside OUT_DIR, so that the last step is still a rename.
    """
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    permit_as_umask(work)
    if os.stat(work).st_dev != os.stat(out_dir.parent).st_dev:
        staged = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        staged.rmdir()
        shutil.move(str(work), staged)
        work = staged
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{time.time_ns()}"
        os.replace(out_dir, old)
    os.replace(work, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
