"""A stand-in for the Kubeflow Pipelines v2beta1 API server on 127.0.0.1, as strict as the real one.

It answers the REST calls `kfp.Client` makes to upload pipelines and submit runs (healthz, pipelines list /
upload / upload_version, experiments list / create, runs create), records every request, and refuses what the
real server refuses, with the real status and error body. Each behaviour follows kubeflow/pipelines `backend/`
(snapshot 7b70c7b, 2026-08-21):

- JSON bodies are parsed strictly, as grpc-gateway with `DiscardUnknown: false` does
  (`src/apiserver/common/utils.go` CustomMarshaler): an unknown field is 400 with a google.rpc.Status body
  `{"code": 3, "message": ..., "details": []}`. Field names and types come from KFP's own OpenAPI models
  (`kfp_server_api`), which are generated from the same protos.
- A pipeline package (upload, upload_version, a run's `pipeline_spec`) is checked as
  `src/apiserver/template/template.go` New / isPipelineSpec and `v2_template.go` NewV2SpecTemplate do, with KFP's
  own `PipelineSpec` / `PlatformSpec` protos (`kfp.pipeline_spec.pipeline_spec_pb2`): a document is a pipeline
  spec when it parses with a pipelineInfo.name and a root, else "unknown template format"; schemaVersion must be
  2.1.0. A run's `{pipeline_spec, platform_spec}` pair is joined as `src/apiserver/server/api_util.go`
  pipelineSpecStructToYamlString does.
- Upload (`src/apiserver/server/pipeline_upload_server.go` uploadPipeline, and
  `src/apiserver/resource/resource_manager.go` CreatePipelineAndPipelineVersion) creates the pipeline AND a first
  version named after the pipeline; the name is `name`, else `display_name`, else the file name
  (`pipeline_server.go` buildPipelineName). A second pipeline of the same name is 409. Upload errors use
  writeErrorToResponse's body `{"error_message": ..., "error_details": ...}` (apiv1beta1.Error), not a Status.
- upload_version (uploadPipelineVersion): a missing or unknown `pipelineid` is 400 "Failed to create a pipeline
  version"; a version name the pipeline already has is 409.
- Errors of the gRPC services (experiments, runs) are util.UserError statuses (`src/common/util/error.go`
  GRPCStatus): message = the internal wrap chain, details = the external message. A bad spec on a run is 500
  (Internal), not 400: resource_manager.go CreateRun wraps it in NewInternalServerError.
- An unmatched route is grpc-gateway's 404 `{"code": 5, "message": "Not Found"}`.
- Responses are protojson with proto names and no unpopulated fields (`EmitUnpopulated: false`), so an empty list
  is `{}`.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import yaml

API = "/apis/v2beta1"
SCHEMA_VERSION = "2.1.0"  # template/v2_template.go SCHEMA_VERSION_2_1_0


class ApiError(Exception):
    """A refusal: HTTP status and the JSON body the real server sends with it."""

    def __init__(self, status: int, body: dict):
        super().__init__(body)
        self.status, self.body = status, body


def rpc_error(status: int, code: int, message: str) -> ApiError:
    """A gRPC status through grpc-gateway v2's default error handler (google.rpc.Status)."""
    return ApiError(status, {"code": code, "message": message, "details": []})


def user_error(status: int, code: int, message: str, external: str) -> ApiError:
    """A util.UserError through the gateway (`src/common/util/error.go` GRPCStatus): the message is the internal
    error's wrap chain ("outer: inner"), the details carry the external message."""
    detail = {"@type": "type.googleapis.com/google.rpc.Status", "code": code, "message": external}
    return ApiError(status, {"code": code, "message": message, "details": [detail]})


def upload_error(status: int, message: str) -> ApiError:
    """pipeline_upload_server.go writeErrorToResponse: apiv1beta1.Error."""
    return ApiError(status, {"error_message": message, "error_details": message})


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------ strict parsing
def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def check_model(value, type_name: str, where: str = "") -> None:
    """Raises InvalidArgument when `value` does not parse as the OpenAPI type `type_name` of kfp_server_api, the
    way protojson.Unmarshal refuses unknown fields and wrong types (it accepts proto and JSON (camel) names)."""
    import kfp_server_api

    if type_name == "object" or value is None:
        return
    if type_name.startswith("list["):
        if not isinstance(value, list):
            raise rpc_error(400, 3, f"proto: {where}: expected a list")
        for item in value:
            check_model(item, type_name[5:-1], where)
        return
    if type_name.startswith("dict("):
        if not isinstance(value, dict):
            raise rpc_error(400, 3, f"proto: {where}: expected an object")
        inner = type_name[5:-1].split(", ", 1)[1]
        for key, item in value.items():
            check_model(item, inner, f"{where}.{key}")
        return
    scalars = {"str": str, "bool": bool, "int": (int, str), "float": (int, float), "datetime": str}
    if type_name in scalars:
        if not isinstance(value, scalars[type_name]) or (type_name == "int" and isinstance(value, bool)):
            raise rpc_error(400, 3, f"proto: invalid value for {type_name} field {where}: {json.dumps(value)}")
        return
    model = getattr(kfp_server_api, type_name)
    allowed = getattr(model, "allowable_values", None)
    if allowed is not None:  # an enum: its name, or its number (protojson takes both; kfp.Client sends numbers)
        if value not in allowed and not (isinstance(value, int) and 0 <= value < len(allowed)):
            raise rpc_error(400, 3, f"proto: invalid value for enum field {where}: {json.dumps(value)}")
        return
    if not isinstance(value, dict):
        raise rpc_error(400, 3, f"proto: {where}: expected an object")
    names = {json_name: attr for attr, json_name in model.attribute_map.items()}
    names.update({_camel(json_name): attr for json_name, attr in list(names.items())})
    for key, item in value.items():
        if key not in names:
            raise rpc_error(400, 3, f'proto: unknown field "{key}" in {model.__name__}')
        check_model(item, model.openapi_types[names[key]], f"{where}.{key}" if where else key)


def _is_pipeline_spec(document: dict) -> bool:
    """template.go isPipelineSpec: parses as a PipelineSpec with a name and a root."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    spec = pipeline_spec_pb2.PipelineSpec()
    try:
        json_format.ParseDict(document, spec)
    except json_format.ParseError:
        return False
    return bool(spec.pipeline_info.name) and spec.HasField("root")


def check_template(text: str) -> str:
    """template.go New + v2_template.go NewV2SpecTemplate for a v2 package; returns pipelineInfo.name. A refusal
    is InvalidArgument carrying the external message, as util.NewInvalidInputErrorWithDetails builds it."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    def invalid(message: str) -> ApiError:
        return ApiError(400, {"message": message})  # re-shaped by the caller (upload body or rpc status)

    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as error:
        raise invalid(f"failed to parse pipeline spec YAML: {error}") from None
    if not text or "kind: Workflow" in text or not any(isinstance(d, dict) and _is_pipeline_spec(d) for d in documents):
        raise invalid("unknown template format")  # V1 (Argo) packages are refused on a v2-only server too
    name, spec_seen, platform_seen = "", False, False
    for document in documents:
        if not isinstance(document, dict):
            raise invalid("unable to decode yaml document")
        if _is_pipeline_spec(document):
            if spec_seen:
                raise invalid("multiple pipeline specs provided")
            spec_seen = True
            spec = json_format.ParseDict(document, pipeline_spec_pb2.PipelineSpec())
            if spec.schema_version != SCHEMA_VERSION:
                raise invalid(f"KFP only supports schema version 2.1.0, but the pipeline spec has version "
                              f"{spec.schema_version}")  # fmt: skip
            name = spec.pipeline_info.name
            continue
        platform = pipeline_spec_pb2.PlatformSpec()
        try:
            json_format.ParseDict(document, platform)
        except json_format.ParseError:
            continue  # neither spec nor platform spec: ignored, as NewV2SpecTemplate does
        if "kubernetes" in platform.platforms:
            if platform_seen:
                raise invalid("multiple platform specs provided")
            platform_seen = True
    return name


# ------------------------------------------------------------------------------------------------ server
class KfpApi:
    """The server and its state: pipelines (by id, each with its versions), experiments and runs, and the list of
    requests as {"method", "path", "query", "body", "authorization"}. With `refuse`, every call is 401 as the KFP
    auth layer answers a bad token (code 16, Unauthenticated)."""

    def __init__(self, refuse: bool = False):
        self.refuse = refuse
        self.pipelines: dict[str, dict] = {}  # pipeline_id -> V2beta1Pipeline JSON + "versions": [V2beta1PipelineVersion]
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                record = {"method": self.command, "path": url.path, "query": query, "raw": raw,
                          "authorization": self.headers.get("Authorization"), "body": None}  # fmt: skip
                api.requests.append(record)
                try:
                    with api.lock:
                        status, reply = api.route(self, url.path, query, raw, record)
                except ApiError as error:
                    status, reply = error.status, error.body
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def by_name(self, name: str) -> dict | None:
        return next((p for p in self.pipelines.values() if p["name"] == name), None)

    # ------------------------------------------------------------------------------------------ routing
    def route(self, h, path: str, query: dict, raw: bytes, record: dict) -> tuple[int, dict]:
        if self.refuse:
            raise rpc_error(401, 16, "Request header error: unauthenticated: invalid bearer token")
        method = h.command
        if method == "GET" and path == f"{API}/healthz":
            return 200, {"multi_user": False, "pipeline_store": "database"}
        if method == "GET" and path == f"{API}/pipelines":
            return 200, self.list(self.pipelines.values(), query, "pipelines")
        if method == "POST" and path == f"{API}/pipelines/upload":
            return 200, self.upload(h, query, raw)
        if method == "POST" and path == f"{API}/pipelines/upload_version":
            return 200, self.upload_version(h, query, raw)
        if method == "GET" and path == f"{API}/experiments":
            return 200, self.list(self.experiments.values(), query, "experiments")
        if method == "POST" and path == f"{API}/experiments":
            body = record["body"] = self.json_body(raw, "V2beta1Experiment")
            if not body.get("display_name") and not body.get("displayName"):
                # api_converter.go toModelExperiment: an InternalServerError (500) around the InvalidInputError,
                # wrapped by experiment_server.go CreateExperiment.
                raise user_error(500, 13, "[ExperimentServer]: Failed to create a experiment due to conversion error: "
                                 "InternalServerError: Failed to convert API experiment to model experiment: "
                                 "Invalid input error: Experiment must have a non-empty name", "Internal Server Error")  # fmt: skip
            experiment = {**body, "experiment_id": str(uuid.uuid4()), "created_at": _now(), "storage_state": "AVAILABLE"}
            self.experiments[experiment["experiment_id"]] = experiment
            return 200, experiment
        if method == "POST" and path == f"{API}/runs":
            return 200, self.create_run(self.json_body(raw, "V2beta1Run", record))
        raise rpc_error(404, 5, "Not Found")

    @staticmethod
    def json_body(raw: bytes, model: str, record: dict | None = None) -> dict:
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError as error:
            raise rpc_error(400, 3, f"proto: syntax error: {error}") from None
        if record is not None:
            record["body"] = body
        check_model(body, model)
        return body

    @staticmethod
    def list(items, query: dict, key: str) -> dict:
        """A list call with an optional filter of EQUALS predicates (the ones kfp.Client and our scripts send)."""
        found = list(items)
        if "filter" in query:
            try:
                filter_ = json.loads(query["filter"])
            except json.JSONDecodeError:
                raise rpc_error(400, 3, "Invalid input error: failed to parse valid filter") from None
            check_model(filter_, "V2beta1Filter")
            for predicate in filter_.get("predicates", []):
                if predicate.get("operation") not in ("EQUALS", 1):
                    raise rpc_error(400, 3, f"stand-in: unsupported predicate {predicate}")
                wanted = predicate.get("string_value", predicate.get("stringValue"))
                field = predicate["key"]
                found = [item for item in found if item.get(field) == wanted]
        found = [{k: v for k, v in item.items() if k != "versions"} for item in found]
        return {key: found, "total_size": len(found)} if found else {}  # EmitUnpopulated: false

    # ----------------------------------------------------------------------------------------- uploads
    @staticmethod
    def multipart_file(h, raw: bytes, failure: str) -> tuple[str, str]:
        """The `uploadfile` part (r.FormFile(FormFileKey)): (file name, text)."""
        content_type = h.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            raise upload_error(400, failure)
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
        )
        for part in message.iter_parts():
            if part.get_param("name", header="content-disposition") == "uploadfile":
                return part.get_filename() or "", part.get_payload(decode=True).decode()
        raise upload_error(400, failure)

    def version(self, pipeline: dict, name: str, display_name: str, text: str) -> dict:
        return {"pipeline_id": pipeline["pipeline_id"], "pipeline_version_id": str(uuid.uuid4()), "name": name,
                "display_name": display_name or name, "created_at": _now(),
                "pipeline_spec": next(d for d in yaml.safe_load_all(text) if d)}  # fmt: skip

    def upload(self, h, query: dict, raw: bytes) -> dict:
        filename, text = self.multipart_file(h, raw, "Failed to read pipeline from file")
        try:
            spec_name = check_template(text)
        except ApiError as error:
            raise upload_error(400, error.body["message"]) from None
        # buildPipelineName, then CreatePipelineAndPipelineVersion: the version takes the pipeline's name.
        name = query.get("name") or query.get("display_name") or filename or spec_name
        if self.by_name(name) is not None:  # pipelines are unique by (name, namespace)
            raise upload_error(409, "Failed to create a pipeline and a pipeline version")
        pipeline = {"pipeline_id": str(uuid.uuid4()), "name": name, "display_name": query.get("display_name") or name,
                    "created_at": _now()}  # fmt: skip
        if query.get("description"):
            pipeline["description"] = query["description"]
        pipeline["versions"] = [self.version(pipeline, name, "", text)]
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        return {k: v for k, v in pipeline.items() if k != "versions"}

    def upload_version(self, h, query: dict, raw: bytes) -> dict:
        failure = "Failed to create a pipeline version"
        filename, text = self.multipart_file(h, raw, failure)
        try:
            check_template(text)
        except ApiError as error:
            raise upload_error(400, error.body["message"]) from None
        pipeline = self.pipelines.get(query.get("pipelineid", ""))
        if pipeline is None:  # no pipelineid, or FetchNamespaceFromPipelineId finds none
            raise upload_error(400, failure)
        name = query.get("name") or query.get("display_name") or filename
        if any(v["name"] == name for v in pipeline["versions"]):  # unique by (name, pipeline id)
            raise upload_error(409, failure)
        version = self.version(pipeline, name, query.get("display_name", ""), text)
        pipeline["versions"].append(version)
        return version

    # -------------------------------------------------------------------------------------------- runs
    def create_run(self, run: dict) -> dict:
        """run_server.go CreateRun ("Failed to create a new run: ...") -> createRun -> resource_manager.go CreateRun."""
        if not run.get("display_name"):  # run_server.go createRun
            external = "The run name is empty. Please specify a valid name"
            raise user_error(400, 3, "Failed to create a new run: Failed to create a run due to invalid name: "
                             f"Invalid input error: {external}", external)  # fmt: skip
        spec = run.get("pipeline_spec")
        if spec is None and not run.get("pipeline_version_reference"):
            raise rpc_error(400, 3, "stand-in: a run needs pipeline_spec or pipeline_version_reference")
        if spec is not None:
            documents = [spec["pipeline_spec"], spec["platform_spec"]] if "pipeline_spec" in spec else [spec]
            if "pipeline_spec" in spec and "platform_spec" not in spec:
                documents = documents[:1]
            try:
                check_template("\n---\n".join(yaml.safe_dump(d) for d in documents))
            except ApiError as error:
                # A bad spec on a run is a 500: resource_manager.go CreateRun wraps fetchTemplateFromPipelineSpec's
                # InvalidInputError (template.New) in NewInternalServerError.
                raise user_error(500, 13, "Failed to create a new run: InternalServerError: Failed to create a run due "
                                 "to error fetching manifest: Failed to fetch a template with an invalid pipeline spec "
                                 f"manifest: InvalidInputError: {error.body['message']}: pipeline spec is invalid",
                                 "Internal Server Error") from None  # fmt: skip
        if run.get("experiment_id") and run["experiment_id"] not in self.experiments:
            raise rpc_error(404, 5, f"Failed to create a run: experiment {run['experiment_id']} not found")
        created = {**run, "run_id": str(uuid.uuid4()), "state": "PENDING", "created_at": _now(),
                   "storage_state": "AVAILABLE"}  # fmt: skip
        self.runs[created["run_id"]] = created
        return created
