"""Where secateurs keeps files, and how it writes an artifact directory.

- The cache (`cache_dir`) and the roots of work that outlives a step's pod (`CHECKPOINTS_ENV`, `DATA_STORE_ENV`).
- Atomic directory writes: a directory is written to a temporary sibling and renamed into place (`atomic_output`,
  `publish`), so a half-written artifact is never mistaken for a result and a failed step leaves an existing output
  untouched.
- Permissions (`permit_as_umask`): what a step writes is readable by the next step, whatever its uid.

What an artifact says about itself (its manifest, content hashes) is `secateurs.manifest`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

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
