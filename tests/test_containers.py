"""The image built here (`make images-local`, podman, no registry) and the pipeline run in it (`--runner container`).

Slow (the build takes minutes the first time), so `make test` leaves these out and `make test-containers` runs them;
`.ci/run` does both, after installing podman, buildah, runc and debootstrap with apt.
"""

# No `from __future__ import annotations`: kfp reads the component's parameter annotations as objects.
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from secateurs.containers import podman_env

pytestmark = pytest.mark.containers
ROOT = Path(__file__).resolve().parents[1]
# Names a credential would have in an image's environment or build history.
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN", "HF_TOKEN", "KFP_TOKEN", "PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")  # fmt: skip


def _podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], env=podman_env(), capture_output=True, text=True, check=check)


@pytest.fixture(scope="session")
def image(tmp_path_factory) -> str:
    """The secateurs image, built from this checkout by `docker/build_local.py` (as `make images-local` does)."""
    missing = [tool for tool in ("podman", "debootstrap") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install podman buildah runc debootstrap)")
    report = tmp_path_factory.mktemp("build") / "build.json"
    done = subprocess.run([sys.executable, str(ROOT / "docker" / "build_local.py"), "--tensorrt-llm",
                           "--report", str(report)], capture_output=True, text=True, timeout=3600)  # fmt: skip
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    built = json.loads(report.read_text())
    print(f"image build: {built['seconds']}, sizes {built['bytes']}")
    return built["image"]


def test_the_cli_runs_in_the_image_as_its_non_root_user(image):
    assert _podman("run", "--rm", image, "id", "-u").stdout.strip() == "10001"
    done = _podman("run", "--rm", "--read-only", image, "secateurs", "--help")
    assert "prepare-data" in done.stdout and "distill" in done.stdout
    _podman("run", "--rm", image, "python", "-c", "import secateurs, mlflow, boto3, kfp, psycopg2")


def test_a_c_compiler_and_writable_compile_caches_for_an_arbitrary_uid(image):
    """torch.compile on CUDA: Triton builds its launcher with the system C compiler and writes its cache, and
    Inductor writes its own; a pod with an arbitrary uid in group 0 can do all three. (With a read-only root, as
    the chart runs steps, /var/cache/secateurs is the writable volume, and both caches live under it.)"""
    script = ('printf "int main(void){return 0;}" > /tmp/t.c && cc /tmp/t.c -o /tmp/t && /tmp/t'
              ' && touch "$TRITON_CACHE_DIR/w" "$TORCHINDUCTOR_CACHE_DIR/w" && echo ok')
    done = _podman("run", "--rm", "--user", "123456:0", image, "bash", "-c", script, check=False)
    assert done.stdout.strip() == "ok", done.stderr
    env = dict(e.split("=", 1) for e in json.loads(_podman("image", "inspect", image).stdout)[0]["Config"]["Env"])
    assert env["TRITON_CACHE_DIR"].startswith("/var/cache/secateurs/")
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith("/var/cache/secateurs/")


def test_the_tensorrt_llm_image_s_project_layer_resolves(image):
    _podman("run", "--rm", "localhost/secateurs-tensorrt-llm-layer:cpu", "python", "-c",
            "import secateurs, mlflow, kfp; from secateurs.components import steps")  # fmt: skip


def test_no_credential_in_the_image_s_environment_or_history(image):
    for ref in (image, "localhost/secateurs-base:cpu"):
        env = json.loads(_podman("image", "inspect", ref).stdout)[0]["Config"]["Env"]
        names = {entry.split("=", 1)[0] for entry in env}
        assert not names & set(CREDENTIALS), (ref, names)
        history = _podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", ref).stdout
        for name in CREDENTIALS:
            assert name not in history, (ref, name)
        assert "ca-certificates.crt" not in history and "/etc/pip.conf" not in history


@pytest.fixture(scope="module")
def both_runs(image, tmp_path_factory, tiny_models, docs_dir):
    """The tiny pipeline of test_pipeline.py, through the subprocess runner and through the container runner."""
    from test_pipeline import tiny_config

    from secateurs.local_run import read_run
    from secateurs.pipeline_cli import run_cmd
    from secateurs.run_records import recorded_outputs

    config = tmp_path_factory.mktemp("config") / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_models["llama-tied"], docs_dir, placement={"image": image})))
    outputs = {}
    for runner in ("subprocess", "container"):
        run_dir = tmp_path_factory.mktemp(f"runs-{runner}") / "tiny"
        run_cmd(config, run_dir, runner=runner)
        outputs[runner] = recorded_outputs(read_run(run_dir)[1])
    return outputs


def test_a_pipeline_in_containers_gives_the_models_the_subprocess_runner_gives(both_runs):
    local, contained = both_runs["subprocess"], both_runs["container"]
    assert set(local) == set(contained)
    models = [key for key in local if (Path(local[key]) / "model.safetensors").is_file()]
    assert {"distill:a", "distill:b"} <= {task for task, _ in models}
    for key in models:
        a = load_file(Path(local[key]) / "model.safetensors")
        b = load_file(Path(contained[key]) / "model.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            assert (a[name] == b[name]).all(), (key, name)
    # Written by the image's user, on the host.
    assert os.stat(Path(contained[models[0]]) / "model.safetensors").st_uid == 10001


def test_the_root_file_system_is_read_only_for_a_step(image, tmp_path, capsys):
    """A component that writes outside its artifact and the cache fails under the runner's settings, and the run
    sees the failure (podman's early removal would report it as a success: `containers.exit_status_kept`); the same
    component writing into HF_HOME succeeds, so the failure is the read-only root and nothing else."""
    from kfp import dsl, local

    from secateurs import containers

    @dsl.component(base_image=image, install_kfp_package=False)
    def write(path: str, out: dsl.Output[dsl.Artifact]):
        import os

        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("x")
        with open(out.path, "w") as f:
            f.write("done")

    with containers.shared_with_group():
        run_dir = tmp_path / "run"  # as `secateurs run` makes it: group-writable (tmp_path itself is 0o700)
        root = run_dir / "pipeline-root"
        root.mkdir(parents=True)
    with containers.shared_with_group(), containers.podman_service(run_dir) as url:
        runner = local.DockerRunner(**containers.runner_arguments(run_dir, []))
        local.init(runner, pipeline_root=str(root))
        with containers.through(url):
            allowed = write(path="/var/cache/secateurs/huggingface/ok")
            with pytest.raises(RuntimeError, match="FAILURE"):
                write(path="/opt/secateurs/not-allowed")
    assert Path(allowed.output.path).read_text() == "done"
    log = capsys.readouterr().out
    assert re.search(r"OSError\s*:\s*\[Errno 30\] Read-only file system: '/opt/secateurs/not-allowed'", log), log[-2000:]
