"""Compiling the pipeline to a KFP spec, and submitting a spec to a Kubeflow Pipelines endpoint.

kfp is imported inside the functions (the library core runs without it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from secateurs.config import PipelineConfig
from secateurs.errors import PipelineError


def resolve_run_settings(cfg: PipelineConfig, pipeline_root: str | None = None,
                         service_account: str | None = None) -> dict[str, str | None]:  # fmt: skip
    """Where a cluster run keeps its artifacts and which ServiceAccount its pods use.

    Each is the command line's value, else the config's (`tracking.pipeline_root`, `placement.service_account`),
    else the chart's defaults ConfigMap variable when it is in the environment (`SECATEURS_PIPELINE_ROOT`,
    `SECATEURS_SERVICE_ACCOUNT`: a notebook or job in the cluster that loads it), else None (KFP's own default).
    """
    return {
        "pipeline_root": pipeline_root or cfg.tracking.pipeline_root or os.environ.get("SECATEURS_PIPELINE_ROOT"),
        "service_account": service_account or cfg.placement.service_account
        or os.environ.get("SECATEURS_SERVICE_ACCOUNT"),
    }  # fmt: skip


def compile_pipeline(cfg: PipelineConfig, output: Path, pipeline_root: str | None = None) -> Path:
    """Compile `cfg`'s pipeline to `output`, with `pipeline_root` as the spec's default root.

    Credentials never enter the spec: secrets are referenced by name.
    """
    from kfp import compiler

    from secateurs.pipelines.recipe import build_pipeline

    output.parent.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(cfg, tracking_uri=cfg.tracking.uri or "", pipeline_root=pipeline_root)
    compiler.Compiler().compile(pipeline, str(output))
    return output


def submit_spec(spec: Path, host: str, arguments: dict, run_name: str, experiment: str, namespace: str | None,
                caching: bool, pipeline_root: str | None = None, service_account: str | None = None) -> str:  # fmt: skip
    """Create a run of a compiled spec on `host`; returns its URL. One-line errors for refused or unreachable.

    `pipeline_root` and `service_account` go on the run (None: KFP's defaults).
    """
    import kfp

    token = os.environ.get("KFP_TOKEN")
    _check_kfp_host(host, token)
    try:
        client = kfp.Client(host=host, existing_token=token, namespace=namespace)
        result = client.create_run_from_pipeline_package(
            str(spec), arguments=arguments, run_name=run_name, experiment_name=experiment,
            namespace=namespace, enable_caching=caching, pipeline_root=pipeline_root,
            service_account=service_account,
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 -- kfp raises urllib3, requests and ApiException errors alike
        status = getattr(e, "status", None)
        if status in (401, 403):
            raise PipelineError(
                f"Kubeflow Pipelines at {host} refused the token (HTTP {status}): set KFP_TOKEN to a valid one"
            ) from None
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        try:  # ApiException's first line is only "(400)": the reason is the API's JSON body (google.rpc.Status)
            body = json.loads(getattr(e, "body", None) or "null")
            text = body.get("message") or body.get("error_message") or text
        except (ValueError, AttributeError):
            pass
        if status is None:
            raise PipelineError(
                f"Kubeflow Pipelines at {host} is unreachable: {type(e).__name__}: {text}"
            ) from None
        raise PipelineError(f"Kubeflow Pipelines at {host} answered HTTP {status}: {text}") from None
    return f"{host.rstrip('/')}/#/runs/details/{result.run_id}"


def _check_kfp_host(host: str, token: str | None) -> None:
    """One authenticated request to the API's health endpoint, so that a refused token or an unreachable host is
    one line at once (kfp.Client retries its own health check five times with pauses and then reports any
    refusal as a timeout)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{host.rstrip('/')}/apis/v2beta1/healthz")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        urllib.request.urlopen(request, timeout=30).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise PipelineError(
                f"Kubeflow Pipelines at {host} refused the token (HTTP {e.code}): set KFP_TOKEN to a valid one"
            ) from None
        raise PipelineError(f"Kubeflow Pipelines at {host} answered HTTP {e.code} on /apis/v2beta1/healthz") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise PipelineError(f"Kubeflow Pipelines at {host} is unreachable: {type(reason).__name__}: {reason}") from None

