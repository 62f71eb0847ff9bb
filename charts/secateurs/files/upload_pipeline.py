"""Upload a compiled secateurs pipeline to Kubeflow Pipelines as version PIPELINE_VERSION of pipeline
PIPELINE_NAME, creating the pipeline on the first install.

Runs in the chart's upload Job (the secateurs image has kfp). Settings come from the Job's environment:
KFP_HOST, PIPELINE_NAME, PIPELINE_VERSION, PIPELINE_PACKAGE (path of the compiled YAML), and optionally
KFP_NAMESPACE (multi-user KFP) and KFP_TOKEN (bearer token). Without KFP_TOKEN, kfp.Client authenticates with
the projected service-account token at KF_PIPELINES_SA_TOKEN_PATH when the Job mounts one.

Re-running with a version that already exists (a retried Job) succeeds without a second upload, so the Job is
idempotent.
"""

import json
import os
import sys

import kfp
from kfp_server_api.exceptions import ApiException


def find_pipeline_id(client: kfp.Client, name: str, namespace: str | None) -> str | None:
    """Returns the id of the pipeline displayed as `name`, or None. (Client.get_pipeline_id takes no namespace.)"""
    by_name = json.dumps(
        {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}
    )
    pipelines = client.list_pipelines(filter=by_name, namespace=namespace).pipelines or []
    return pipelines[0].pipeline_id if pipelines else None


def main() -> None:
    namespace = os.environ.get("KFP_NAMESPACE") or None
    client = kfp.Client(
        host=os.environ["KFP_HOST"],
        existing_token=os.environ.get("KFP_TOKEN") or None,
        namespace=namespace or "kubeflow",
    )
    name, version = os.environ["PIPELINE_NAME"], os.environ["PIPELINE_VERSION"]
    package = os.environ["PIPELINE_PACKAGE"]

    pipeline_id = find_pipeline_id(client, name, namespace)
    if pipeline_id is None:
        # KFP creates the pipeline with a first version named after the pipeline (resource_manager.go
        # CreatePipelineAndPipelineVersion), not after PIPELINE_VERSION: the version is uploaded next, as on upgrade.
        pipeline_id = client.upload_pipeline(package, pipeline_name=name, namespace=namespace).pipeline_id
        print(f"created pipeline {name} ({pipeline_id})")
    try:
        uploaded = client.upload_pipeline_version(package, version, pipeline_id=pipeline_id)
    except ApiException as error:
        if error.status == 409:  # AlreadyExists: this version was uploaded by an earlier try of the Job
            print(f"pipeline {name} already has version {version}")
            return
        raise
    print(f"uploaded version {version} ({uploaded.pipeline_version_id}) of pipeline {name} ({pipeline_id})")


if __name__ == "__main__":
    try:
        main()
    except KeyError as missing:
        sys.exit(f"upload_pipeline: environment variable {missing} is not set")
