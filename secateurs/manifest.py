"""Artifact manifests: what each artifact says about itself, and content hashes.

Every artifact a step produces is one directory holding a small `secateurs.json`: which step made it, from which
inputs (URI + content hash), with which config, with which software versions, and the step's report. MLflow
lineage is rebuilt from these files, and later steps use them to refuse inputs that do not belong together
(an importance artifact of another model, a dataset made with another tokenizer).

Where files are kept and how a directory is written atomically is `secateurs.files`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

MANIFEST = "secateurs.json"


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


