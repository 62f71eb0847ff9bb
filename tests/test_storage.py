"""secateurs.storage against two S3 servers on 127.0.0.1: moto's server mode, and a real Ceph object gateway
(tests/ceph_rgw.py; skipped with its reason where Debian's Ceph packages are not installed).

Faults are injected by a small TCP proxy between the client and the server, so every request still travels
over a real socket and is answered by real S3 code: the proxy only resets a connection or answers one request
itself.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import botocore.exceptions
import pytest
from boto3.s3.transfer import TransferConfig
from ceph_rgw import INSTALL, CephRGW, missing_tools

from secateurs import storage
from secateurs.manifest import MANIFEST

MiB = 1 << 20
# Small multipart settings so a 12 MiB file goes up and down in 3 parts (5 MiB is S3's minimum part size).
SMALL = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4)
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIASECATEURSTEST042",
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-value-that-must-not-leak-9f2c",
    "AWS_SESSION_TOKEN": "session-token-that-must-not-leak-51ab",
}
PROFILE_KEY, PROFILE_SECRET = "AKIAPROFILEKEY000017", "profile-secret-that-must-not-leak-77e1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(extra_env: dict[str, str], log_path: Path):
    port = free_port()
    # The server logs every request: to a file, since an unread pipe would fill up and stall it.
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env={**os.environ, **extra_env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited: {log_path.read_text(errors='replace')[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start within 60 s") from None
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    proc, url = start_moto({}, tmp_path_factory.mktemp("moto") / "server.log")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def moto_server_with_auth(tmp_path_factory):
    """A server that checks every request against its (empty) IAM: any access key is refused."""
    proc, url = start_moto(
        {"INITIAL_NO_AUTH_ACTION_COUNT": "0"}, tmp_path_factory.mktemp("moto") / "server.log"
    )
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ceph_rgw(tmp_path_factory):
    """Ceph's radosgw with users for the tests' credentials (a session token is ignored by radosgw without STS)."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"Ceph's radosgw is not installed (no {', '.join(missing)}): {INSTALL}, as root")
    server = CephRGW(tmp_path_factory.mktemp("ceph") / "cluster")
    try:
        server.start()
        server.add_user(CREDENTIALS["AWS_ACCESS_KEY_ID"], CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        # The profile's key belongs to the same user: radosgw, unlike moto, keeps each user's buckets to itself.
        server.add_key(CREDENTIALS["AWS_ACCESS_KEY_ID"], PROFILE_KEY, PROFILE_SECRET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", params=["moto", "ceph"])
def s3_server(request) -> str:
    """The endpoint of each S3 server the storage tests run against."""
    if request.param == "moto":
        return request.getfixturevalue("moto_server")
    return request.getfixturevalue("ceph_rgw").http


class FaultyProxy:
    """A TCP proxy to the S3 server that logs every request and can break chosen ones once.

    Each forwarded request gets `Connection: close`, so every request opens its own connection and the proxy
    sees each request line (keep-alive would hide later requests inside one byte stream).
    """

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.requests: list[tuple[str, str]] = []
        self.faults: list[tuple[str, str, object]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def fail_once(self, method: str, path: str, action: object) -> None:
        """Break the next `method path` request: "reset" (TCP RST), or (status, code, message) to answer."""
        with self.lock:
            self.faults.append((method, path, action))

    def count(self, method: str, path: str) -> int:
        with self.lock:
            return self.requests.count((method, path))

    def close(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept() in the proxy's thread
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, rest = data.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            method, target, _ = lines[0].decode().split(" ", 2)
            path = urlsplit(target).path
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (ln.decode().partition(":") for ln in lines[1:])
            }
            with self.lock:
                self.requests.append((method, path))
                fault = next((f for f in self.faults if f[:2] == (method, path)), None)
                if fault is not None:
                    self.faults.remove(fault)
            if fault is not None and fault[2] == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            if fault is not None:
                status, code, message = fault[2]
                if "100-continue" not in headers.get("expect", "").lower():
                    # Read the body first: closing with unread data would reset the connection instead.
                    remaining = int(headers.get("content-length", 0)) - len(rest)
                    while remaining > 0:
                        chunk = conn.recv(min(remaining, 65536))
                        if not chunk:
                            break
                        remaining -= len(chunk)
                body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
                conn.sendall(
                    f"HTTP/1.1 {status} {code}\r\nContent-Type: application/xml\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode()
                )
                return
            kept = [ln for ln in lines[1:] if not ln.lower().startswith(b"connection:")]
            with socket.create_connection(self.upstream) as up:
                up.sendall(b"\r\n".join([lines[0], b"Connection: close", *kept]) + b"\r\n\r\n" + rest)
                self._pump(conn, up)

    @staticmethod
    def _pump(conn: socket.socket, up: socket.socket) -> None:
        while True:
            ready, _, _ = select.select([conn, up], [], [], 30)
            if not ready:
                return
            for src in ready:
                chunk = src.recv(65536)
                if not chunk:
                    return
                (up if src is conn else conn).sendall(chunk)


@pytest.fixture
def s3_env(monkeypatch, tmp_path, s3_server):
    """The test credentials and the server's endpoint, set the way botocore reads them, for this test only."""
    return set_s3_env(monkeypatch, tmp_path, s3_server)


def set_s3_env(monkeypatch, tmp_path, s3_server: str) -> str:
    for name in (
        "AWS_ENDPOINT_URL",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_REGION",
        "AWS_MAX_ATTEMPTS",
        "AWS_RETRY_MODE",
        "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probe for credentials
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    return s3_server


@pytest.fixture
def bucket(s3_env) -> str:
    name = f"secateurs-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxy(s3_env, monkeypatch):
    """Route this test's S3 traffic through a FaultyProxy."""
    p = FaultyProxy(s3_env)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", p.url)
    yield p
    p.close()


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_parse_s3_uri():
    assert storage.parse_s3_uri("s3://bucket/a/b/model.safetensors") == ("bucket", "a/b/model.safetensors")
    assert storage.parse_s3_uri("s3://my.bucket-1/prefix/") == ("my.bucket-1", "prefix/")
    assert storage.parse_s3_uri("s3://bucket") == ("bucket", "")
    assert storage.is_s3_uri("s3://bucket/k") and not storage.is_s3_uri("/data/s3/bucket")
    assert not storage.is_s3_uri(Path("s3://bucket/k"))
    for bad, why in [
        ("s3://", "names no bucket"),
        ("s3:///key", "names no bucket"),
        ("s3://ab/key", "invalid bucket name"),
        ("s3://bad bucket/key", "invalid bucket name"),
        ("https://bucket/key", "expected an s3://"),
    ]:
        with pytest.raises(ValueError, match=why):
            storage.parse_s3_uri(bad)
    with pytest.raises(TypeError, match="turned into a path"):
        storage.parse_s3_uri(Path("s3://bucket/key"))


def test_model_directory_round_trip_multipart_and_cache(bucket, proxy, tmp_path):
    model = tmp_path / "model"
    (model / "extra").mkdir(parents=True)
    (model / MANIFEST).write_text('{"step": "prune"}')
    (model / "config.json").write_text('{"model_type": "llama", "head_dim": 64}')
    (model / "tokenizer.json").write_text('{"version": "1.0"}')
    (model / "model.safetensors").write_bytes(os.urandom(12 * MiB))
    (model / "extra" / "notes.txt").write_text("pruned from 30 to 24 layers")
    uri = f"s3://{bucket}/runs/r1/model"
    transfer = SMALL

    assert storage.upload(model, uri, transfer=transfer) == uri
    # botocore addresses the bucket path-style at a custom endpoint (/bucket/key, not bucket.host/key).
    manifest_path = f"/{bucket}/runs/r1/model/{MANIFEST}"
    # The manifest marks a complete artifact: an old one is removed first, the new one goes up last.
    assert proxy.requests[0] == ("DELETE", manifest_path) and proxy.requests[-1] == ("PUT", manifest_path)
    client = storage.s3_client()
    # A multipart ETag ends in -<parts>: 12 MiB in 5 MiB parts is 3 parts.
    etag = client.head_object(Bucket=bucket, Key="runs/r1/model/model.safetensors")["ETag"]
    assert etag.strip('"').endswith("-3")

    copy = tmp_path / "copy"
    assert storage.download(uri, copy, transfer=transfer) == copy
    assert files_of(copy) == files_of(model)
    weights_path = f"/{bucket}/runs/r1/model/model.safetensors"
    assert proxy.count("GET", weights_path) == 3  # ranged GETs, one per part

    # A second download lists the prefix and fetches nothing: the files stay the very same inodes.
    inodes = {rel: (copy / rel).stat().st_ino for rel in files_of(copy)}
    proxy.requests.clear()
    storage.download(uri, copy, transfer=transfer)
    assert [m for m, _ in proxy.requests] == ["HEAD", "GET"]  # HEAD of the exact key (404), then the listing
    assert {rel: (copy / rel).stat().st_ino for rel in files_of(copy)} == inodes

    # Change one object (same size, new content) and delete another: only those two change locally.
    client.put_object(
        Bucket=bucket, Key="runs/r1/model/config.json", Body=b'{"model_type": "qwen2", "head_dim": 64}'
    )
    client.delete_object(Bucket=bucket, Key="runs/r1/model/extra/notes.txt")
    proxy.requests.clear()
    storage.download(uri, copy, transfer=transfer)
    assert (copy / "config.json").read_bytes() == b'{"model_type": "qwen2", "head_dim": 64}'
    assert not (copy / "extra" / "notes.txt").exists()
    assert (copy / "model.safetensors").stat().st_ino == inodes["model.safetensors"]
    assert proxy.count("GET", weights_path) == 0
    assert proxy.count("GET", f"/{bucket}/runs/r1/model/config.json") == 1


def test_single_file_round_trip(s3_env, bucket, tmp_path):
    gguf = tmp_path / "SmolLM2-135M.Q4_1.gguf"
    gguf.write_bytes(os.urandom(300_000))
    storage.s3_client().upload_file(str(gguf), bucket, f"weights/{gguf.name}")
    uri = f"s3://{bucket}/weights/{gguf.name}"
    local = storage.localize(uri, tmp_path / "cache")
    assert local.name == gguf.name and local.read_bytes() == gguf.read_bytes()
    assert storage.localize(str(gguf)) == gguf and storage.localize(f"file://{gguf}") == gguf
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.localize(str(tmp_path / "missing"))
    with pytest.raises(storage.StorageError, match=f"nothing at s3://{bucket}/weights/other"):
        storage.download(f"s3://{bucket}/weights/other", tmp_path / "out")
    for call in (
        lambda: storage.check_access(f"s3://no-{bucket}/weights/"),
        lambda: storage.download(f"s3://no-{bucket}/weights/", tmp_path / "out"),
    ):
        with pytest.raises(storage.StorageError, match=f": no such bucket at S3 endpoint {s3_env}$"):
            call()


# prepare-data's own S3 paths go through the calls the other tests make against both servers: moto alone here
# keeps `make test` within its time (each takes 10-20 s).
@pytest.mark.parametrize("s3_server", ["moto"], indirect=True)
def test_prepare_data_reads_an_s3_source_and_writes_an_s3_output(bucket, tokenizer_dir, tmp_path, monkeypatch):
    from secateurs.config import DataConfig
    from secateurs.data import load_packed, prepare_data

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for part in range(2):
        lines = [json.dumps({"text": f"document {part}-{i} " * (10 + i % 7)}) for i in range(40)]
        (corpus / f"part-{part}.jsonl").write_text("\n".join(lines))
    storage.upload(corpus, f"s3://{bucket}/corpus/")
    settings = DataConfig(source=f"s3://{bucket}/corpus/", seq_len=16, shard_tokens=16 * 20, shuffle_buffer=0)
    # Through the command line as typed: an s3:// --out stays a URI (a Path option made it s3:/bucket/...).
    from typer.testing import CliRunner

    from secateurs.cli import app

    done = CliRunner().invoke(app, ["prepare-data", "--tokenizer", str(tokenizer_dir), "--out",
                                    f"s3://{bucket}/runs/r1/data", "--source", settings.source, "--seq-len", "16",
                                    "--shard-tokens", str(16 * 20), "--shuffle-buffer", "0"])  # fmt: skip
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout[done.stdout.index("{"):])
    local = prepare_data(tokenizer_dir, tmp_path / "local", settings.model_copy(update={"source": str(corpus)}))
    assert report["sources"]["corpus"]["content_sha256"] == local["sources"]["corpus"]["content_sha256"]
    # The corpus was streamed object by object, not mirrored: nothing of it is left in the cache.
    assert not (tmp_path / "cache" / "s3").exists() and not list((tmp_path / "cache" / "streams").iterdir())

    remote, config = load_packed(f"s3://{bucket}/runs/r1/data")
    assert remote.path.is_relative_to(tmp_path / "cache") and config["source"] == f"s3://{bucket}/corpus/"
    here = load_packed(tmp_path / "local")[0]
    for split in ("train", "validation"):
        assert remote[split].head(None).tolist() == here[split].head(None).tolist()
    assert len(list(remote.path.rglob("*.bin"))) > 2  # several shards went up and came back
    assert not list((tmp_path / "cache" / "prepare").iterdir())  # the work directory went once uploaded


@pytest.mark.parametrize("s3_server", ["moto"], indirect=True)
def test_prepare_data_publishes_its_shards_to_an_s3_store_read_through_the_cache(
    bucket, tokenizer_dir, docs_dir, tmp_path, monkeypatch
):
    """A pipeline with an `s3://` root and no cache volume: the shards go to `<root>/datasets/<digest>`, the KFP
    artifact is their index (under 1 MB), and a reader fetches them into its node's cache once, checked by sha256."""
    from secateurs.data import prepare as data  # the step's module, whose names prepare_data calls
    from secateurs.config import DataConfig
    from secateurs.data import DataError, load_packed, prepare_data

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    settings = DataConfig(source=str(docs_dir), seq_len=32, val_fraction=0.2, shard_tokens=32 * 200)
    prepare_data(tokenizer_dir, tmp_path / "whole", settings)
    whole = json.loads((tmp_path / "whole" / "index.json").read_text())
    store = f"s3://{bucket}/pipeline-root/datasets"
    report = prepare_data(tokenizer_dir, tmp_path / "artifact", settings, store=store)
    files = [p for p in (tmp_path / "artifact").rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["index.json", MANIFEST]
    assert sum(p.stat().st_size for p in files) < MiB
    index = json.loads((tmp_path / "artifact" / "index.json").read_text())
    location = index.pop("location")
    config = json.loads((tmp_path / "artifact" / MANIFEST).read_text())["config"]
    assert index == whole and location == f"{store}/{data._digest(config)[:16]}"
    shards = {shard["file"] for shard in data._shards(whole)}
    assert set(storage.list_objects(location)) == {"index.json", MANIFEST, *shards}
    assert not (tmp_path / "cache" / "prepare").exists() or not list((tmp_path / "cache" / "prepare").iterdir())

    dd = load_packed(tmp_path / "artifact")[0]
    assert dd.root.is_relative_to(tmp_path / "cache" / "s3")
    here = load_packed(tmp_path / "whole")[0]
    for split in ("train", "validation"):
        assert dd[split].head(None).tolist() == here[split].head(None).tolist()
    dd["train"].verify()
    # Once per node: a second reader finds the shards in the cache and downloads none.
    stamps = {p: p.stat().st_mtime_ns for p in dd.root.rglob("*.bin")}
    assert len(stamps) == len(shards)
    load_packed(tmp_path / "artifact")[0]["validation"].verify()
    assert {p: p.stat().st_mtime_ns for p in dd.root.rglob("*.bin")} == stamps

    # A second preparation of the same settings reuses the store's copy: nothing read, nothing uploaded.
    def refused(*args, **kwargs):
        raise AssertionError("the store's copy was not reused")

    with monkeypatch.context() as m:
        m.setattr(data, "_prepare_source", refused)
        m.setattr(storage, "upload", refused)
        assert prepare_data(tokenizer_dir, tmp_path / "again", settings, store=store) == report
    assert (tmp_path / "again" / "index.json").read_text() == (tmp_path / "artifact" / "index.json").read_text()

    # A shard altered in the store reaches the reader (its ETag changed) and fails it in one line.
    first = whole["sources"][0]["shards"]["train"][0]["file"]
    bucket_name, key = storage.parse_s3_uri(f"{location}/{first}")
    body = bytearray((tmp_path / "whole" / first).read_bytes())
    body[0] ^= 1
    storage.s3_client().put_object(Bucket=bucket_name, Key=key, Body=bytes(body))
    with pytest.raises(DataError, match=r"^shard .*/docs/train-00000.bin was altered after preparation") as e:
        load_packed(tmp_path / "artifact")[0]["train"].verify()
    assert "\n" not in str(e.value)


def test_download_retries_follow_aws_max_attempts(bucket, proxy, tmp_path, monkeypatch):
    payload = os.urandom(100_000)
    storage.s3_client().put_object(Bucket=bucket, Key="obj/shard.bin", Body=payload)
    path, uri = f"/{bucket}/obj/shard.bin", f"s3://{bucket}/obj/shard.bin"

    # Two connection resets: 2 attempts per request are not enough, and the error is one line.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    proxy.fail_once("GET", path, "reset")
    proxy.fail_once("GET", path, "reset")
    with pytest.raises(storage.StorageError, match=f"^cannot reach S3 endpoint {proxy.url}: ") as err:
        storage.download(uri, tmp_path / "dl")
    assert "\n" not in str(err.value) and "while trying to download" in str(err.value)
    assert proxy.count("GET", path) == 2 and not proxy.faults
    assert list((tmp_path / "dl").iterdir()) == []  # no partial file left

    # 3 attempts ride out the same two resets.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    assert storage.s3_client().meta.config.retries == {"mode": "standard", "total_max_attempts": 3}
    proxy.fail_once("GET", path, "reset")
    proxy.fail_once("GET", path, "reset")
    proxy.requests.clear()
    local = storage.download(uri, tmp_path / "dl")
    assert local.read_bytes() == payload
    assert proxy.count("GET", path) == 3 and not proxy.faults
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["shard.bin"]


def test_upload_retries_a_503_within_aws_max_attempts(bucket, proxy, tmp_path, monkeypatch):
    src = tmp_path / "run"
    src.mkdir()
    (src / "metrics.json").write_text('{"val_loss": 2.5}')
    path = f"/{bucket}/runs/r1/metrics.json"
    slow_down = (503, "SlowDown", "Please reduce your request rate.")

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    proxy.fail_once("PUT", path, slow_down)
    with pytest.raises(storage.StorageError, match="^cannot upload .*SlowDown"):
        storage.upload(src, f"s3://{bucket}/runs/r1")
    assert proxy.count("PUT", path) == 1

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    proxy.fail_once("PUT", path, slow_down)
    proxy.requests.clear()
    assert storage.upload(src, f"s3://{bucket}/runs/r1/") == f"s3://{bucket}/runs/r1"
    assert proxy.count("PUT", path) == 2 and not proxy.faults
    body = storage.s3_client().get_object(Bucket=bucket, Key="runs/r1/metrics.json")["Body"].read()
    assert body == b'{"val_loss": 2.5}'


def test_unreachable_endpoint_is_one_line(s3_env, tmp_path, monkeypatch):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(storage.StorageError) as err:
        storage.check_access("s3://models/llama")
    message = str(err.value)
    assert message.startswith(f"cannot reach S3 endpoint http://127.0.0.1:{port}: ")
    assert "\n" not in message
    assert isinstance(err.value.__cause__, botocore.exceptions.EndpointConnectionError)  # kept for debugging
    with pytest.raises(storage.StorageError, match=f"^cannot reach S3 endpoint http://127.0.0.1:{port}: "):
        storage.download("s3://models/llama", tmp_path / "dl")
    assert not (tmp_path / "dl").exists()


def test_endpoint_variables_as_botocore_reads_them(bucket, s3_env, monkeypatch):
    # The generic AWS_ENDPOINT_URL serves every service; AWS_ENDPOINT_URL_S3 wins over it for S3.
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
    assert storage.s3_client().meta.endpoint_url == s3_env
    storage.check_access(f"s3://{bucket}/anything")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env)
    storage.check_access(f"s3://{bucket}/anything")
    # An invalid setting is one line naming where settings come from.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "three")
    with pytest.raises(storage.StorageError, match=r"^invalid S3 configuration \(AWS_\* variables"):
        storage.s3_client()


def test_config_file_profile(bucket, proxy, tmp_path, monkeypatch):
    """Endpoint, region, retries, addressing and credentials from a named profile in the AWS config files."""
    secret = PROFILE_SECRET
    (tmp_path / "config").write_text(
        "[default]\nregion = ap-south-1\n\n"
        f"[profile store]\nregion = eu-west-3\nendpoint_url = {proxy.url}\nretry_mode = adaptive\n"
        "max_attempts = 4\ns3 =\n  addressing_style = path\n"
    )
    (tmp_path / "credentials").write_text(
        f"[store]\naws_access_key_id = {PROFILE_KEY}\naws_secret_access_key = {secret}\n"
    )
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", *CREDENTIALS):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "store")

    client = storage.s3_client()
    assert client.meta.endpoint_url == proxy.url and client.meta.region_name == "eu-west-3"
    assert client.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 4}
    assert client.meta.config.s3 == {"addressing_style": "path"}
    storage.check_access(f"s3://{bucket}/anything")
    assert proxy.count("HEAD", f"/{bucket}") == 1

    # The profile's secret, echoed back by a server, is redacted too: not only secrets found in env.
    proxy.fail_once("GET", f"/{bucket}", (403, "SignatureDoesNotMatch", f"secret {secret} did not sign this"))
    with pytest.raises(storage.StorageError, match=f"^S3 endpoint {proxy.url} refused to list ") as err:
        storage.download(f"s3://{bucket}/models/", tmp_path / "dl")
    assert "secret *** did not sign" in str(err.value)
    assert err.value.__cause__ is None and secret not in "".join(traceback.format_exception(err.value))


def assert_no_credentials(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))
    for name, value in CREDENTIALS.items():
        assert value not in text, f"{name} leaked into an error"


@pytest.fixture
def refusing_server(s3_env, request, monkeypatch) -> str:
    """An endpoint that refuses the test's credentials: moto checking against its empty IAM, or radosgw asked
    with an access key it has no user for."""
    if request.node.callspec.params["s3_server"] == "moto":
        url = request.getfixturevalue("moto_server_with_auth")
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", url)
        return url
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHUSER000000")
    return s3_env


def test_refused_credentials(refusing_server, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f.txt").write_text("x")
    with pytest.raises(storage.StorageError) as err:
        storage.check_access("s3://models/llama")
    assert str(err.value).startswith(f"S3 endpoint {refusing_server} refused to access bucket 'models'")
    assert "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in str(err.value)
    assert_no_credentials(err.value)
    for call in (
        lambda: storage.download("s3://models/llama", tmp_path / "dl"),
        lambda: storage.upload(tmp_path / "out", "s3://models/run"),
    ):
        with pytest.raises(
            storage.StorageError, match=f"^S3 endpoint {refusing_server} refused to "
        ) as err:
            call()
        assert "\n" not in str(err.value)
        assert_no_credentials(err.value)


def test_credentials_echoed_by_a_server_are_redacted(bucket, proxy, tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f.txt").write_text("x")
    message = (
        f"Key {CREDENTIALS['AWS_ACCESS_KEY_ID']} with secret {CREDENTIALS['AWS_SECRET_ACCESS_KEY']} "
        f"and token {CREDENTIALS['AWS_SESSION_TOKEN']} did not sign this request"
    )
    echo = (403, "SignatureDoesNotMatch", message)
    proxy.fail_once("PUT", f"/{bucket}/f.txt", echo)
    with pytest.raises(storage.StorageError, match="SignatureDoesNotMatch") as err:
        storage.upload(tmp_path / "out", f"s3://{bucket}")
    assert "Key *** with secret *** and token ***" in str(err.value)
    # The original error carries the secrets, so it is neither chained nor kept as context.
    assert err.value.__cause__ is None and err.value.__context__ is None
    assert_no_credentials(err.value)


def test_missing_credentials(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(
        storage.StorageError, match="^no S3 credentials: set AWS_SECRET_ACCESS_KEY in the environment"
    ):
        storage.s3_client()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")  # and no profile, no instance metadata
    with pytest.raises(
        storage.StorageError, match="^no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    ):
        storage.check_access("s3://models/llama")


def test_keys_that_leave_the_destination_are_refused(bucket, tmp_path):
    storage.s3_client().put_object(Bucket=bucket, Key="p/../../escaped", Body=b"x")
    with pytest.raises(storage.StorageError, match="its path leaves"):
        storage.download(f"s3://{bucket}/p/", tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "escaped").exists()


def test_uploads_over_tls_reach_radosgw_with_boto3_checksum_defaults(ceph_rgw, tmp_path, monkeypatch):
    """Over HTTPS, boto3 >= 1.36 sends every upload as aws-chunked with a CRC32 trailer unless told otherwise;
    radosgw 16 (Debian 12's) answers that with MissingContentLength, for single and multipart uploads alike, which
    moto accepts. secateurs.storage asks for checksums only where an operation requires them, so a model and a
    dataset go up and come back intact from a server that predates the trailers."""
    set_s3_env(monkeypatch, tmp_path, ceph_rgw.https)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ceph_rgw.ca_bundle))
    for name in ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"secateurs-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(os.urandom(12 * MiB))  # 3 parts of 5 MiB
    uri = f"s3://{bucket}/runs/r1/model"
    storage.upload(model, uri, transfer=SMALL)
    storage.download(uri, tmp_path / "copy", transfer=SMALL)
    assert files_of(tmp_path / "copy") == files_of(model)

    # A user's own choice stays theirs: with the trailers asked for, this server refuses the upload.
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")
    with pytest.raises(storage.StorageError, match="MissingContentLength"):
        storage.upload(model, f"s3://{bucket}/runs/r2/model", transfer=SMALL)
