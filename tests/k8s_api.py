"""A stand-in for the Kubernetes API server with Kubeflow Trainer v2 installed, on 127.0.0.1.

It answers the REST calls the `kubernetes` Python client makes for TrainJobs (list, get, create, delete under
/apis/trainer.kubeflow.org/v1alpha1) and for their pods (list with a label selector, read a pod's log), with the
shapes of the real API: objects with server-set metadata, `Status` objects for errors, the conditions the Trainer
controller copies from JobSet (`Complete` / `Failed`). A created TrainJob is checked against the CRD's own
openAPIV3Schema (422 Invalid, as the API server answers) and then really runs: one process per node running the
job's command with the PET_* variables the torch-distributed runtime sets (PET_NNODES, PET_NPROC_PER_NODE,
PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT), the master being 127.0.0.1 instead of the headless service of
node 0. Modes: `no_trainer` (the CRD is absent: 404 on its resources), `pending` (pods never start).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import yaml

CRD = Path(__file__).parent / "data" / "trainer.kubeflow.org_trainjobs-v2.3.0.yaml.gz"
PREFIX = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/"


def trainjob_schema() -> dict:
    crd = yaml.safe_load(gzip.decompress(CRD.read_bytes()))
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")["schema"]["openAPIV3Schema"]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details or {}, "code": code}  # fmt: skip


class Node:
    """One node of a running TrainJob: the job's command in a process."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path):
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """SIGKILL to every process of the "container", as the kubelet ends a pod: torchrun's workers too (they
        run in sessions of their own, so the process group alone would leave them training)."""
        import psutil

        if self.proc.poll() is None:
            try:
                processes = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                processes = []
            self.proc.kill()
            for p in processes:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        self.proc.wait()

    @property
    def phase(self) -> str:
        code = self.proc.poll()
        return "Running" if code is None else ("Succeeded" if code == 0 else "Failed")


class KubernetesApi:
    def __init__(self, workdir: Path, mode: str = "", secrets: dict[str, dict[str, str]] | None = None):
        import jsonschema

        self.validator = jsonschema.Draft7Validator(trainjob_schema())
        self.workdir, self.mode, self.secrets = Path(workdir), mode, secrets or {}
        self.jobs: dict[tuple[str, str], dict] = {}
        self.nodes: dict[tuple[str, str], list[Node]] = {}
        self.requests: list[tuple[str, str]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code: int, body, content_type="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self):
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null") if length else None
                api.requests.append((self.command, url.path))
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path.startswith(PREFIX):
                    return api.trainjobs(self, url.path[len(PREFIX):].split("/"), body, query)
                match = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods(?:/([^/]+)/log)?", url.path)
                if match and self.command == "GET":
                    return api.pods(self, match.group(1), match.group(2), query)
                self._send(404, _status(404, "NotFound", "the server could not find the requested resource"))

            do_GET = do_POST = do_DELETE = _route

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def client(self):
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        return client.ApiClient(configuration)

    def posts(self) -> int:
        return sum(1 for method, path in self.requests if method == "POST")

    # ---------------------------------------------------------------------------------------- TrainJobs
    def trainjobs(self, h, parts: list[str], body, query):
        if self.mode == "no_trainer":
            return h._send(404, _status(404, "NotFound", "the server could not find the requested resource"))
        namespace, resource, *rest = parts
        if resource != "trainjobs":
            return h._send(404, _status(404, "NotFound", "the server could not find the requested resource"))
        name = rest[0] if rest else None
        key = (namespace, name)
        if h.command == "GET" and name is None:
            items = [j for (ns, _), j in self.jobs.items() if ns == namespace]
            return h._send(200, {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJobList",
                                 "metadata": {"resourceVersion": "1"}, "items": items})  # fmt: skip
        if h.command == "POST":
            errors = sorted(self.validator.iter_errors(body), key=lambda e: list(e.path))
            if errors:
                message = "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:3])
                return h._send(422, _status(422, "Invalid", f"TrainJob.trainer.kubeflow.org is invalid: {message}"))
            name = body["metadata"]["name"]
            if (namespace, name) in self.jobs:
                return h._send(409, _status(409, "AlreadyExists", f'trainjobs.trainer.kubeflow.org "{name}" already exists'))
            body["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=_now(),
                                    resourceVersion="1", generation=1)  # fmt: skip
            body["status"] = {}
            self.jobs[(namespace, name)] = body
            if self.mode != "pending":
                self._start(namespace, body)
            return h._send(201, body)
        job = self.jobs.get(key)
        if job is None:
            return h._send(404, _status(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found',
                                        {"name": name, "group": "trainer.kubeflow.org", "kind": "trainjobs"}))  # fmt: skip
        if h.command == "DELETE":
            for node in self.nodes.pop(key, []):
                node.kill()
            del self.jobs[key]
            return h._send(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                 "details": {"name": name, "group": "trainer.kubeflow.org", "kind": "trainjobs",
                                             "uid": job["metadata"]["uid"]}})  # fmt: skip
        self._update_status(key)
        return h._send(200, job)

    def _start(self, namespace: str, job: dict) -> None:
        trainer = job["spec"]["trainer"]
        nodes = trainer.get("numNodes", 1)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ)
        for var in trainer.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            elif (ref := var.get("valueFrom", {}).get("secretKeyRef")) and ref["name"] in self.secrets:
                env[var["name"]] = self.secrets[ref["name"]][ref["key"]]
        command = [sys.executable if trainer["command"][0] == "python" else trainer["command"][0], *trainer["command"][1:]]
        name = job["metadata"]["name"]
        self.nodes[(namespace, name)] = [
            Node(command, {**env, "PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": str(trainer.get("numProcPerNode", 1)),
                           "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)},
                 self.workdir / f"{name}-node-{rank}.log")
            for rank in range(nodes)
        ]  # fmt: skip

    def _update_status(self, key) -> None:
        job, nodes = self.jobs[key], self.nodes.get(key, [])
        phases = [n.phase for n in nodes]
        if nodes and all(p == "Succeeded" for p in phases):
            condition = {"type": "Complete", "status": "True", "reason": "AllJobsCompleted",
                         "message": "jobset completed successfully"}  # fmt: skip
        elif "Failed" in phases:
            for node in nodes:  # JobSet's failure policy ends the other jobs
                node.kill()
            condition = {"type": "Failed", "status": "True", "reason": "FailedJobs",
                         "message": "jobset failed due to one or more job failures"}  # fmt: skip
        else:
            return
        job["status"] = {"conditions": [{**condition, "lastTransitionTime": _now()}]}

    def kill_node(self, namespace: str, name: str, rank: int) -> None:
        self.nodes[(namespace, name)][rank].kill()

    # --------------------------------------------------------------------------------------------- pods
    def pods(self, h, namespace: str, pod: str | None, query):
        if pod is None:
            wanted = dict(part.split("=", 1) for part in query.get("labelSelector", "").split(",") if "=" in part)
            items = []
            for (ns, name), job in self.jobs.items():
                if ns != namespace or wanted.get("jobset.sigs.k8s.io/jobset-name") not in (None, name):
                    continue
                nodes = self.nodes.get((ns, name))
                for rank in range(job["spec"]["trainer"].get("numNodes", 1)):
                    phase = nodes[rank].phase if nodes else "Pending"
                    items.append({
                        "metadata": {"name": f"{name}-node-0-{rank}-abcde", "namespace": ns, "labels": {
                            "jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                            "batch.kubernetes.io/job-completion-index": str(rank)}},
                        "spec": {"containers": [{"name": "node", "image": job["spec"]["trainer"]["image"]}]},
                        "status": {"phase": phase},
                    })  # fmt: skip
            return h._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
                                 "items": items})  # fmt: skip
        match = re.fullmatch(r"(.+)-node-0-(\d+)-abcde", pod)
        nodes = self.nodes.get((namespace, match.group(1))) if match else None
        if not nodes:
            return h._send(404, _status(404, "NotFound", f'pods "{pod}" not found'))
        node = nodes[int(match.group(2))]
        if query.get("follow") not in ("1", "t", "T", "true", "True", "TRUE"):  # Go's strconv.ParseBool
            return h._send(200, node.log.read_bytes(), content_type="text/plain")
        # Followed: the log as it grows, in chunks, until the container ends.
        h.send_response(200)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        sent = 0
        while True:
            ended = node.proc.poll() is not None
            data = node.log.read_bytes()[sent:]
            if data:
                h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                h.wfile.flush()
                sent += len(data)
            if ended and not data:
                break
            time.sleep(0.2)
        h.wfile.write(b"0\r\n\r\n")

    def close(self):
        for nodes in self.nodes.values():
            for node in nodes:
                node.kill()
        self.server.shutdown()
        self.server.server_close()
