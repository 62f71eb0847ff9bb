"""A stand-in for the Kubernetes API server with Kubeflow Trainer v2 installed, on 127.0.0.1.

It answers the REST calls the `kubernetes` Python client makes for TrainJobs (list, get, create, delete under
/apis/trainer.kubeflow.org/v1alpha1) and for their pods (list with a label selector, read a pod's log), with the
shapes of the real API: objects with server-set metadata, `Status` objects for errors, the conditions the Trainer
controller copies from JobSet (`Complete` / `Failed`). A created TrainJob is checked against the CRD's own
openAPIV3Schema (422 Invalid, as the API server answers) and then really runs: one process per node running the
job's command with the PET_* variables the torch-distributed runtime sets (PET_NNODES, PET_NPROC_PER_NODE,
PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT), the master being 127.0.0.1 instead of the headless service of
node 0. A node that fails is restarted in place and the job fails only at the Job's backoffLimit, as the runtime's
JobSet does (notes above `Node`, with the upstream files); a Secret the env references or a PVC that does not
exist keeps the pods Pending with the reason the kubelet or the scheduler gives. Modes: `no_trainer` (the CRD is
absent: 404 on its resources), `pending` (no node fits: pods stay Unschedulable).
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


def _claims(value) -> list[str]:
    """Every persistentVolumeClaim.claimName in a manifest (the TrainJob's runtime patches carry the volumes)."""
    if isinstance(value, dict):
        found = [value["persistentVolumeClaim"]["claimName"]] if "persistentVolumeClaim" in value else []
        return found + [c for v in value.values() for c in _claims(v)]
    if isinstance(value, list):
        return [c for v in value for c in _claims(v)]
    return []


def _status(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details or {}, "code": code}  # fmt: skip


# How a TrainJob of the `torch-distributed` runtime fails and restarts (Kubeflow Trainer v2.3.0, JobSet v0.12.0):
# - The runtime (kubeflow/trainer v2.3.0 manifests/base/runtimes/torch_distributed.yaml) is one replicated job
#   "node" with no restartPolicy, no backoffLimit and no JobSet failurePolicy; Trainer's plugins set none either
#   (no RestartPolicy / BackoffLimit / FailurePolicy in kubeflow/trainer v2.3.0 pkg/ outside generated code).
# - JobSet's webhook defaults the pod restartPolicy to OnFailure (kubernetes-sigs/jobset v0.12.0
#   pkg/webhooks/jobset_webhook.go Default, "Default pod restart policy to OnFailure"): a node whose container
#   exits non-zero is restarted IN PLACE by the kubelet, same pod, same rank and rendezvous, after the kubelet's
#   crash-loop back-off (10 s, doubled per restart, at most 300 s: kubernetes pkg/kubelet/kubelet.go
#   backOffPeriod / MaxContainerBackOff). The pod's phase stays Running meanwhile.
# - The Job's backoffLimit is the batch/v1 default, 6; with OnFailure the Job fails once the restart counts of
#   its pods add up to it (kubernetes pkg/controller/job/job_controller.go pastBackoffLimitOnFailure), and its
#   running pods are terminated.
# - With no failurePolicy, one failed Job fails the JobSet at once, reason FailedJobs, message
#   "jobset failed due to one or more job failures (first failed job: <name>)" (jobset v0.12.0
#   pkg/controllers/failure_policy.go executeFailurePolicy, messageWithFirstFailedJob; pkg/constants).
# - Trainer copies JobSet's Completed / Failed condition onto the TrainJob as Complete / Failed, reason and
#   message unchanged (kubeflow/trainer v2.3.0 pkg/runtime/framework/plugins/jobset/jobset.go, after
#   FindStatusCondition(... JobSetCompleted / JobSetFailed)).
BACKOFF_LIMIT = 6
CRASH_BACKOFF_S, MAX_CRASH_BACKOFF_S = 10.0, 300.0


class Node:
    """One node (pod) of a running TrainJob: the job's command in a process, restarted in place on failure."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path, waiting: dict | None = None,
                 unschedulable: str | None = None):  # fmt: skip
        self.command, self.env, self.log_stem = command, env, log
        self.restarts, self.proc, self.restart_at, self.terminated = 0, None, None, False
        self.waiting, self.unschedulable = waiting, unschedulable  # why the container cannot start, if it cannot
        if waiting is None and unschedulable is None:
            self._run()

    @property
    def log(self) -> Path:
        """The current container's log (`kubectl logs` shows the current one; a restart starts a new one)."""
        return self.log_stem.with_name(f"{self.log_stem.stem}-{self.restarts}.log")

    def _run(self) -> None:
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=f, stderr=subprocess.STDOUT)

    def restart(self) -> None:
        self.restarts, self.restart_at = self.restarts + 1, None
        self._run()

    def kill(self) -> None:
        """SIGKILL to every process of the "container", as the kubelet ends a pod: torchrun's workers too (they
        run in sessions of their own, so the process group alone would leave them training)."""
        import psutil

        if self.proc is not None and self.proc.poll() is None:
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
        if self.proc is not None:
            self.proc.wait()

    @property
    def phase(self) -> str:
        if self.proc is None:
            return "Failed" if self.terminated else "Pending"
        code = self.proc.poll()
        if code == 0:
            return "Succeeded"
        # A failed container of an OnFailure pod is restarted: the pod stays Running until its Job gives up.
        return "Failed" if self.terminated else "Running"


def _pod_status(node: Node | None) -> dict:
    """A pod's status as the API shows it: phase, PodScheduled, and the container's state and restart count."""
    if node is None or node.unschedulable:
        condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": node.unschedulable if node else "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}  # fmt: skip
        return {"phase": "Pending", "conditions": [condition]}
    status = {"phase": node.phase, "conditions": [{"type": "PodScheduled", "status": "True"}]}
    if node.proc is None:
        state = {"waiting": node.waiting or {"reason": "ContainerCreating"}}
    elif node.proc.poll() is None:
        state = {"running": {"startedAt": _now()}}
    elif node.restart_at is not None and not node.terminated:
        state = {"waiting": {"reason": "CrashLoopBackOff",
                             "message": "back-off restarting failed container node"}}  # fmt: skip
    else:
        state = {"terminated": {"exitCode": node.proc.returncode,
                                "reason": "Completed" if node.proc.returncode == 0 else "Error"}}  # fmt: skip
    status["containerStatuses"] = [{"name": "node", "ready": "running" in state, "restartCount": node.restarts,
                                    "image": "", "imageID": "", "state": state}]  # fmt: skip
    return status


class KubernetesApi:
    def __init__(self, workdir: Path, mode: str = "", secrets: dict[str, dict[str, str]] | None = None,
                 pvcs: set[str] | frozenset[str] = frozenset(), crash_backoff_s: float = CRASH_BACKOFF_S):  # fmt: skip
        """`secrets` (name -> data) and `pvcs` (claim names) exist in every namespace; anything else a pod needs is
        missing, as on a real cluster. `crash_backoff_s` scales the kubelet's crash-loop back-off (10 s real) so
        that tests of restarts stay fast; every other rule is the real one."""
        import jsonschema

        self.validator = jsonschema.Draft7Validator(trainjob_schema())
        self.workdir, self.mode, self.secrets, self.pvcs = Path(workdir), mode, secrets or {}, set(pvcs)
        self.crash_backoff_s = crash_backoff_s
        self.lock = threading.RLock()
        self.closed = threading.Event()
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
                    with api.lock:
                        return api.trainjobs(self, url.path[len(PREFIX):].split("/"), body, query)
                match = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods(?:/([^/]+)/log)?", url.path)
                if match and self.command == "GET":
                    return api.pods(self, match.group(1), match.group(2), query)  # locks what it reads
                self._send(404, _status(404, "NotFound", "the server could not find the requested resource"))

            do_GET = do_POST = do_DELETE = _route

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        threading.Thread(target=self._controllers, daemon=True).start()

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
        return h._send(200, job)  # status is kept by the controllers' loop

    def _start(self, namespace: str, job: dict) -> None:
        trainer = job["spec"]["trainer"]
        nodes = trainer.get("numNodes", 1)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env, waiting = dict(os.environ), None
        for var in trainer.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            elif ref := var.get("valueFrom", {}).get("secretKeyRef"):
                # The kubelet resolves env from Secrets when it creates the container; a missing Secret or key is
                # CreateContainerConfigError and the pod stays Pending, retried until the Secret appears
                # (kubernetes pkg/kubelet/kubelet_pods.go makeEnvironmentVariables: the secret manager's
                # NotFound, `secret "<name>" not found`, or "couldn't find key <key> in Secret <ns>/<name>";
                # pkg/kubelet/kuberuntime/kuberuntime_container.go startContainer -> ErrCreateContainerConfig).
                if ref["name"] not in self.secrets:
                    message = f'secret "{ref["name"]}" not found'
                elif ref["key"] not in self.secrets[ref["name"]]:
                    message = f"couldn't find key {ref['key']} in Secret {namespace}/{ref['name']}"
                else:
                    env[var["name"]] = self.secrets[ref["name"]][ref["key"]]
                    continue
                if not ref.get("optional"):
                    waiting = waiting or {"reason": "CreateContainerConfigError", "message": message}
        # A claim that does not exist keeps the pod unscheduled (Pending, PodScheduled False, Unschedulable): the
        # scheduler's VolumeBinding plugin refuses it before any node is tried (kubernetes
        # pkg/scheduler/framework/plugins/volumebinding, `persistentvolumeclaim "<name>" not found`).
        missing = sorted(set(_claims(job)) - self.pvcs)
        unschedulable = (
            f'0/1 nodes are available: persistentvolumeclaim "{missing[0]}" not found. preemption: 0/1 nodes are '
            "available: 1 Preemption is not helpful for scheduling."
        ) if missing else None  # fmt: skip
        command = [sys.executable if trainer["command"][0] == "python" else trainer["command"][0], *trainer["command"][1:]]
        name = job["metadata"]["name"]
        self.nodes[(namespace, name)] = [
            Node(command, {**env, "PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": str(trainer.get("numProcPerNode", 1)),
                           "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)},
                 self.workdir / f"{name}-node-{rank}.log", waiting=None if unschedulable else waiting,
                 unschedulable=unschedulable)
            for rank in range(nodes)
        ]  # fmt: skip

    def _controllers(self) -> None:
        """The kubelet, Job, JobSet and Trainer controllers in one loop (see the notes above Node)."""
        while not self.closed.wait(0.02):
            with self.lock:
                for key in list(self.nodes):
                    self._reconcile(key)

    def _reconcile(self, key) -> None:
        job, nodes = self.jobs.get(key), self.nodes.get(key, [])
        if job is None or not nodes or job["status"].get("conditions"):
            return
        now = time.monotonic()
        for node in nodes:
            if node.proc is None or node.proc.poll() in (None, 0):
                continue
            if node.restart_at is None:  # just exited non-zero: the kubelet backs off, then restarts it in place
                cap = MAX_CRASH_BACKOFF_S / CRASH_BACKOFF_S  # 30 doublings' worth, scaled as the first
                node.restart_at = now + self.crash_backoff_s * min(2**node.restarts, cap)
            elif now >= node.restart_at:
                node.restart()
                if sum(n.restarts for n in nodes) >= BACKOFF_LIMIT:  # pastBackoffLimitOnFailure
                    return self._fail(key)
        if all(n.proc is not None and n.proc.poll() == 0 for n in nodes):
            self._set_condition(job, {"type": "Complete", "status": "True", "reason": "AllJobsCompleted",
                                      "message": "jobset completed successfully"})  # fmt: skip

    def _fail(self, key) -> None:
        """The Job exceeded its backoffLimit: its pods are terminated, the JobSet and so the TrainJob fail."""
        for node in self.nodes[key]:
            node.kill()
            node.terminated = True
        self._set_condition(self.jobs[key], {
            "type": "Failed", "status": "True", "reason": "FailedJobs",
            "message": f"jobset failed due to one or more job failures (first failed job: {key[1]}-node-0)"})  # fmt: skip

    @staticmethod
    def _set_condition(job: dict, condition: dict) -> None:
        job["status"] = {"conditions": [{**condition, "lastTransitionTime": _now()}]}

    def kill_node(self, namespace: str, name: str, rank: int) -> None:
        """SIGKILL to one node's container (as an OOM kill or a lost GPU would): the kubelet restarts it."""
        with self.lock:
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
                    with self.lock:
                        status = _pod_status(nodes[rank] if nodes else None)
                    items.append({
                        "metadata": {"name": f"{name}-node-0-{rank}-abcde", "namespace": ns, "labels": {
                            "jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                            "batch.kubernetes.io/job-completion-index": str(rank)}},
                        "spec": {"containers": [{"name": "node", "image": job["spec"]["trainer"]["image"]}],
                                 "restartPolicy": "OnFailure"},
                        "status": status,
                    })  # fmt: skip
            return h._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
                                 "items": items})  # fmt: skip
        match = re.fullmatch(r"(.+)-node-0-(\d+)-abcde", pod)
        nodes = self.nodes.get((namespace, match.group(1))) if match else None
        if not nodes:
            return h._send(404, _status(404, "NotFound", f'pods "{pod}" not found'))
        node = nodes[int(match.group(2))]
        with self.lock:
            proc, log = node.proc, node.log  # the current container; a restart starts another
        if proc is None:  # waiting to start: the API server answers 400 BadRequest
            reason = (node.waiting or {}).get("reason", "ContainerCreating")
            return h._send(400, _status(400, "BadRequest", f'container "node" in pod "{pod}" is waiting to start: {reason}'))
        if query.get("follow") not in ("1", "t", "T", "true", "True", "TRUE"):  # Go's strconv.ParseBool
            return h._send(200, log.read_bytes(), content_type="text/plain")
        # Followed: the log as it grows, in chunks, until the container ends.
        h.send_response(200)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        sent = 0
        while True:
            ended = proc.poll() is not None
            data = log.read_bytes()[sent:]
            if data:
                h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                h.wfile.flush()
                sent += len(data)
            if ended and not data:
                break
            time.sleep(0.2)
        h.wfile.write(b"0\r\n\r\n")

    def close(self):
        self.closed.set()
        for nodes in self.nodes.values():
            for node in nodes:
                node.kill()
        self.server.shutdown()
        self.server.server_close()
