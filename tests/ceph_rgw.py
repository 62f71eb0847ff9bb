"""A real Ceph object gateway (radosgw) on 127.0.0.1, for the storage tests beside moto.

Debian's Ceph packages (apt-get install ceph-mon ceph-osd radosgw; `.ci/run` installs them as root) hold the whole
server: one monitor, one OSD on memstore (objects in RAM, no disk to prepare) and radosgw serving S3 over HTTP and
HTTPS, with authentication between the daemons off and S3 users as radosgw-admin makes them. That is what Ceph's own
vstart.sh starts for its developers, reduced to what S3 needs. Everything lives in the test's directory; the
daemons run in the foreground as children of the test process and are ended by their ids.

No Python package or npm module holds a MinIO- or Ceph-compatible server (PyPI's `minio` and npm's `minio` are
clients; npm's `s3rver` and PyPI's `localstack`/`moto` are emulators like moto), and Debian 12 ships no MinIO,
Garage, SeaweedFS or versitygw: radosgw is the one real S3 server installable here.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

TOOLS = ("monmaptool", "ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph")
INSTALL = "apt-get install ceph-mon ceph-osd radosgw"


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class CephRGW:
    root: Path
    http: str = ""
    https: str = ""
    ca_bundle: Path = Path()
    daemons: list[subprocess.Popen] = field(default_factory=list)

    def _conf(self) -> Path:
        return self.root / "ceph.conf"

    def _run(self, *args: str, timeout: float = 60) -> str:
        return subprocess.run([*args, "-c", str(self._conf())], check=True, capture_output=True, text=True,
                              timeout=timeout).stdout

    def _daemon(self, *args: str) -> None:
        with open(self.root / "log" / f"{args[0]}.out", "wb") as log:  # the child keeps its own descriptor
            self.daemons.append(subprocess.Popen([*args, "-c", str(self._conf()), "-f"], stdout=log,
                                                 stderr=subprocess.STDOUT))

    def _wait(self, what: str, ready, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for proc in self.daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f"Ceph {proc.args[0]} exited ({proc.returncode}) while waiting for {what}; "
                                       f"logs in {self.root / 'log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ceph: {what} not ready within {timeout:.0f} s; logs in {self.root / 'log'}")
            time.sleep(0.2)

    def start(self) -> CephRGW:
        root = self.root
        (root / "log").mkdir(parents=True)
        (root / "run").mkdir()
        fsid = str(uuid.uuid4())
        mon_port, http_port, https_port = _free_port(), _free_port(), _free_port()
        # Options as src/vstart.sh sets them for a one-OSD cluster: pools of one replica, memstore, no cephx.
        # The msgr2 connection modes are pinned to crc: radosgw (a client that daemonizes) otherwise asks the
        # monitor for "secure" mode only, which needs cephx, and retries forever (get_initial_auth_request -13).
        self._conf().write_text(
            "[global]\n"
            f"fsid = {fsid}\n"
            f"mon host = v2:127.0.0.1:{mon_port}\n"
            "public addr = 127.0.0.1\n"
            "auth cluster required = none\nauth service required = none\nauth client required = none\n"
            "ms mon client mode = crc\nms client mode = crc\n"
            "osd pool default size = 1\nosd pool default min size = 1\nmon allow pool size one = true\n"
            "osd pool default pg num = 8\nosd pool default pgp num = 8\nosd crush chooseleaf type = 0\n"
            "mon warn on pool no redundancy = false\nmon max pg per osd = 1000\n"
            "osd objectstore = memstore\nmemstore device bytes = 1073741824\n"
            f"run dir = {root}/run\nadmin socket = {root}/run/$name.asok\npid file = {root}/run/$name.pid\n"
            f"log file = {root}/log/$name.log\nmon data = {root}/mon.$id\nosd data = {root}/osd.$id\n"
            f"keyring = {root}/keyring\nrgw data = {root}/rgw\n"
        )
        (root / "keyring").touch()
        for data in ("rgw", "mon.a", "osd.0"):
            (root / data).mkdir()
        subprocess.run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v2:127.0.0.1:{mon_port}]",
                        str(root / "monmap")], check=True, capture_output=True)
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(root / "monmap"))
        self._daemon("ceph-mon", "-i", "a")
        osd_uuid = str(uuid.uuid4())
        self._run("ceph", "--connect-timeout", "60", "osd", "new", osd_uuid)
        self._run("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        self._daemon("ceph-osd", "-i", "0")
        self._wait("the OSD", lambda: json.loads(self._run("ceph", "osd", "stat", "-f", "json"))["num_up_osds"] == 1)

        # A self-signed certificate for 127.0.0.1: boto3 sends its checksum trailers only over TLS.
        cert, key = root / "cert.pem", root / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True)
        self._daemon("radosgw", "-n", "client.rgw", "--rgw-frontends",
                     f"beast endpoint=127.0.0.1:{http_port} ssl_endpoint=127.0.0.1:{https_port} "
                     f"ssl_certificate={cert} ssl_private_key={key}")
        self.http, self.https, self.ca_bundle = f"http://127.0.0.1:{http_port}", f"https://127.0.0.1:{https_port}", cert
        self._wait("radosgw", lambda: _accepts(https_port) and _accepts(http_port))
        return self

    def add_user(self, access_key: str, secret_key: str) -> None:
        self._run("radosgw-admin", "user", "create", f"--uid={access_key.lower()}", f"--display-name={access_key}",
                  f"--access-key={access_key}", f"--secret-key={secret_key}")

    def add_key(self, user_access_key: str, access_key: str, secret_key: str) -> None:
        """A second S3 key of the user made by add_user(user_access_key, ...): the same buckets, other secrets."""
        self._run("radosgw-admin", "key", "create", f"--uid={user_access_key.lower()}", "--key-type=s3",
                  f"--access-key={access_key}", f"--secret-key={secret_key}")

    def stop(self) -> None:
        # Killed, not asked to stop: the OSD keeps its objects in memory, so there is nothing to flush, and a clean
        # shutdown of the three daemons takes about 8 s.
        for proc in reversed(self.daemons):
            proc.kill()
        for proc in self.daemons:
            proc.wait()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False
