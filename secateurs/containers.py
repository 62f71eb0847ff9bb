"""`secateurs run --runner container`: every step of a local run in the built image, through podman.

kfp.local's own `DockerRunner` runs each component in its image through a Docker-compatible API. This module
starts podman's (`podman system service` on a socket in the run directory, stopped when the run ends) and gives the
runner what the chart gives a step's pod on a cluster:
- the image's non-root user (uid 10001, group 0) and a read-only root file system;
- a writable `/tmp` (tmpfs) and `/var/cache/secateurs` (HF_HOME and SECATEURS_CACHE: the run directory's
  `container-cache/`, standing in for the cache volume);
- the run directory (artifacts, MLflow's SQLite store) and the config's local inputs (the teacher, local data
  sources), bound at the same paths as on the host, inputs read-only.
Artifacts therefore stay on the host. The image reference is the pipeline's own (placement.image,
$SECATEURS_IMAGE or the release one): `make images-local` tags its build with it, so nothing is pulled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

CONTAINERS_CONF = Path(__file__).resolve().parents[1] / "docker" / "containers.conf"
USER = "10001:0"  # docker/Dockerfile's user; group 0 so that it can write what the host creates group-writable
CACHE_IN_IMAGE = "/var/cache/secateurs"


class ContainerError(RuntimeError):
    """podman is missing, or its service did not start."""


def podman_env() -> dict[str, str]:
    """The project's containers.conf for podman (runc, ulimits the machine allows), when it ships one."""
    env = dict(os.environ)
    if CONTAINERS_CONF.is_file() and "CONTAINERS_CONF" not in env:
        env["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
    return env


@contextlib.contextmanager
def podman_service(run_dir: Path, timeout: float = 60.0) -> Iterator[str]:
    """podman's Docker-compatible API on a unix socket under RUN_DIR, for the duration of the block.

    Yields:
        The `DOCKER_HOST` URL of the socket.
    """
    if shutil.which("podman") is None:
        raise ContainerError("--runner container needs podman (apt-get install podman runc), and the image built "
                             "by `make images-local`")  # fmt: skip
    socket = run_dir / "podman.sock"
    socket.unlink(missing_ok=True)
    url = f"unix://{socket}"
    log = open(run_dir / "podman-service.log", "ab")  # noqa: SIM115 (held for the service's life)
    service = subprocess.Popen(["podman", "system", "service", "--time=0", url], env=podman_env(), stdout=log,
                               stderr=subprocess.STDOUT)  # fmt: skip
    try:
        import docker

        deadline = time.monotonic() + timeout
        while True:
            try:
                docker.DockerClient(base_url=url).ping()
                break
            except Exception as e:  # noqa: BLE001 (not up yet: any error until the deadline)
                if service.poll() is not None or time.monotonic() > deadline:
                    raise ContainerError(f"podman's API service did not start ({e}); its log: "
                                         f"{run_dir / 'podman-service.log'}") from None  # fmt: skip
                time.sleep(0.2)
        yield url
    finally:
        service.terminate()
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
        log.close()
        socket.unlink(missing_ok=True)


def require_image(url: str, image: str) -> None:
    """Refuse, before any step runs, an image that is not built here (the runner would try to pull it)."""
    import docker

    client = docker.DockerClient(base_url=url)
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise ContainerError(f"image {image} is not built on this machine: run `make images-local` (it tags "
                             "its build with the pipeline's image reference)") from None  # fmt: skip
    finally:
        client.close()


def runner_arguments(run_dir: Path, inputs: list[Path]) -> dict:
    """`DockerRunner` keyword arguments: the chart's user and read-only root, the run directory and inputs bound."""
    from docker.types import Mount

    cache = run_dir / "container-cache"
    cache.mkdir(parents=True, exist_ok=True)
    binds = {str(run_dir): False, **{str(p.absolute()): True for p in inputs}}
    mounts = [Mount(target=path, source=path, type="bind", read_only=ro) for path, ro in binds.items()]
    mounts.append(Mount(target=CACHE_IN_IMAGE, source=str(cache), type="bind"))
    # The host's network: a step reaches an MLflow or S3 server on the host's loopback as a local run's steps do,
    # and torchrun's rendezvous stays on 127.0.0.1, with no container network to set up.
    return {"user": USER, "read_only": True, "tmpfs": {"/tmp": "rw,exec,size=4g"}, "mounts": mounts,
            "network_mode": "host"}


def writable_by_steps(tracking_uri: str) -> None:
    """A SQLite tracking store the host created, made writable for the steps' group (SQLite creates it 0o644)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if db.is_file():
            os.chmod(db, db.stat().st_mode | 0o060)


def local_inputs(paths: list[str]) -> list[Path]:
    """The config's inputs that are local paths (a step reads them from inside its container)."""
    return [Path(p).expanduser() for p in paths if "://" not in p and Path(p).expanduser().exists()]


@contextlib.contextmanager
def shared_with_group() -> Iterator[None]:
    """Files and directories the host creates during the block are group-writable, so that the containers' user
    (group 0) can write into the task directories kfp.local creates for it."""
    old = os.umask(0o002)
    try:
        yield
    finally:
        os.umask(old)


@contextlib.contextmanager
def through(url: str) -> Iterator[None]:
    """For the block, docker-py's `from_env()` (what the runner calls) reaches podman's service at URL."""
    previous = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = url
    try:
        with exit_status_kept():
            yield
    finally:
        if previous is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = previous


@contextlib.contextmanager
def exit_status_kept() -> Iterator[None]:
    """kfp.local's DockerRunner starts each container with `auto_remove`, streams its log, then asks for its exit
    status, and reads "no such container" as success. podman 4.3 (Debian 12's) removes an auto-removed container
    as it exits, before the runner asks: its answer is then 404 or an empty status with that error, so a step
    that failed would pass. For the block, docker-py starts such containers without `auto_remove` and removes
    each right after its status is read. The runner has no setting for this (it passes `auto_remove` itself)
    and Debian 12 has no newer podman; this touches only the containers the runner starts.
    """
    from docker.models.containers import ContainerCollection

    original = ContainerCollection.run

    def run(self, image, command=None, stdout=True, stderr=False, remove=False, **kwargs):
        auto_remove = kwargs.pop("auto_remove", False)
        container = original(self, image, command, stdout, stderr, remove, **kwargs)
        if auto_remove:
            wait = container.wait

            def wait_then_remove(**options):
                try:
                    return wait(**options)
                finally:
                    container.remove(force=True)

            container.wait = wait_then_remove
        return container

    ContainerCollection.run = run
    try:
        yield
    finally:
        ContainerCollection.run = original
