"""Split the project's dependencies into what an image build installs and what its base image owns.

Consumes `pyproject.toml` (the `[project]` dependencies and the chosen optional extras) and the distributions
installed in the running interpreter. Produces two pip files:

- a requirements file: every project requirement (core + extras), minus those on distributions the base image
  owns;
- a constraints file: `name==installed-version` for each owned distribution that is installed, so no transitive
  dependency can replace it.

Why this exists: the Dockerfiles install dependencies in a layer built before the source is copied (so editing code
does not reinstall torch), which means `pip install .[extras]` cannot run yet; and GPU base images ship a CUDA
build of torch (and, in the TensorRT-LLM image, the exact transformers/tensorrt stack TensorRT-LLM was built
against) that a plain resolve would silently swap for a PyPI build. pip has no option for either, so this script
does the small amount of bookkeeping by reading pyproject with tomllib and matching names with `packaging`.

Runs with the standard library plus `packaging` (or pip's vendored copy of it, which every pip-equipped Python has);
needs Python >= 3.11.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import tomllib
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a bare venv has packaging only as pip's vendored copy (the local base image, for one)
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name


def project_requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """Returns the core dependency lines plus those of `extras`, verbatim, in pyproject order, without duplicates.

    Raises:
        ValueError: when an extra is not declared in pyproject.toml.
    """
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise ValueError(f"extras {unknown} are not declared in {pyproject}; declared: {sorted(optional)}")
    lines = list(project.get("dependencies", []))
    for extra in extras:
        lines += optional[extra]
    return list(dict.fromkeys(lines))


def split_owned(requirements: list[str], owned: list[str]) -> tuple[list[str], list[str]]:
    """Drops requirements on base-image-owned distributions and pins the owned ones that are installed.

    Returns:
        (requirements to install, constraint lines `name==version`).
    """
    owned_names = {canonicalize_name(name) for name in owned}
    to_install = [r for r in requirements if canonicalize_name(Requirement(r).name) not in owned_names]
    constraints = []
    for name in sorted(owned_names):
        try:
            constraints.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            # Owned but absent: nothing to protect, and the project requirement (if any) is dropped on purpose,
            # so say so instead of failing; the image's own smoke test catches a missing import.
            print(f"project_requirements: {name} is not installed in this image", file=sys.stderr)
    return to_install, constraints


def installed_distributions() -> list[str]:
    """Every distribution installed in this interpreter, except pip's own tooling: an image that must run the
    stack its vendor tested (TensorRT-LLM's) owns all of them, so nothing the project brings can replace one."""
    names = {canonicalize_name(d.metadata["Name"]) for d in importlib.metadata.distributions() if d.metadata["Name"]}
    return sorted(names - {"pip", "setuptools", "wheel"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--extras", default="", help="comma-separated optional extras, e.g. pipeline,engine")
    parser.add_argument("--image-owns", default="", help="comma-separated distributions the base image owns, or "
                        "'*' for every distribution installed in it")
    parser.add_argument("--requirements", type=Path, required=True, help="where to write the requirements")
    parser.add_argument("--constraints", type=Path, required=True, help="where to write the constraints")
    args = parser.parse_args(argv)

    extras = [e for e in args.extras.split(",") if e]
    owned = [o for o in args.image_owns.split(",") if o]
    if owned == ["*"]:
        owned = installed_distributions()
    try:
        to_install, constraints = split_owned(project_requirements(args.pyproject, extras), owned)
    except ValueError as error:
        sys.exit(f"project_requirements: {error}")
    args.requirements.write_text("".join(f"{r}\n" for r in to_install))
    args.constraints.write_text("".join(f"{c}\n" for c in constraints))


if __name__ == "__main__":
    main()
