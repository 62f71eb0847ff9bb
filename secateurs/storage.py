"""S3 storage for artifacts: `s3://` inputs made local, outputs sent to S3 when their destination is S3.

Consumes: `s3://bucket/key` URIs naming one object (a `.gguf` file) or a prefix (an artifact directory: a
model checkpoint, a `save_to_disk` dataset), and local paths, which pass through unchanged. The endpoint,
credentials and retry policy come from the environment at call time, never from a config or a compiled
pipeline spec:

- credentials: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, optional `AWS_SESSION_TOKEN` (on a cluster, a
  Kubernetes secret exposed as env). Nothing else is consulted: no `~/.aws/credentials`, no instance metadata.
- endpoint: `SECATEURS_S3_ENDPOINT`, else boto3's own `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, else AWS.
  S3-compatible stores (MinIO, Ceph, ...) are reached with path-style addressing, which they all serve;
  `SECATEURS_S3_ADDRESSING_STYLE` (auto|path|virtual) overrides that.
- region: `AWS_REGION` / `AWS_DEFAULT_REGION`, else us-east-1.
- per-request retries: botocore's, `AWS_RETRY_MODE` (standard|adaptive|legacy, default standard) and
  `AWS_MAX_ATTEMPTS` (default 5).

Produces: local files (downloads, under a cache for `localize`) and S3 objects (uploads).

Guarantees:
- Objects are moved with boto3's managed transfer: multipart above a threshold, parts in parallel.
- Every object transfer is retried with exponential backoff on transient failures (connection reset or
  refused, timeouts, 5xx, throttling), on top of botocore's per-request retries, which do not cover a failure
  in the middle of a multipart transfer or a stream cut while reading a body.
- A downloaded file appears under its final name only when complete (s3transfer writes a temporary sibling and
  renames it). Files already present with the ETag and size S3 lists are not fetched again; a prefix download
  mirrors the prefix, removing files it downloaded earlier that the prefix no longer holds.
- A directory upload deletes the manifest (`secateurs.json`) already at its prefix first and sends the new one
  last, so an S3 prefix that holds a manifest holds a whole artifact.
- Failures raise `StorageError` with a one-line message naming the endpoint and what failed; credential values
  (and URL user info, presigned signatures) are redacted from every message, and an original exception whose
  text carries a credential is not chained.

boto3 is imported inside the functions that use it, so the core of secateurs imports without it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

from secateurs.manifest import MANIFEST, atomic_output
from secateurs.manifest import cache_dir as manifest_cache_dir

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig

log = logging.getLogger(__name__)

MiB = 1 << 20

CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

# Transfer-level retries, around each whole object transfer (botocore retries single requests underneath).
# 4 attempts with 0.5 s, 1 s, 2 s (jittered) between them ride out a pod restart or a throttling burst without
# hiding a real outage for long.
TRANSFER_ATTEMPTS = 4
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 8.0

# S3 error codes that mean "slow down / try again" rather than "this request is wrong".
_RETRYABLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "TooManyRequestsException",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
}

_T = TypeVar("_T")
_session: Any = None
_session_lock = threading.Lock()


class StorageError(RuntimeError):
    """An S3 transfer or access check failed; the message is one line and free of credentials."""


# --------------------------------------------------------------------------------------------- URIs


def is_s3_uri(uri: str | os.PathLike) -> bool:
    """Whether `uri` names S3 (`s3://...`) rather than a local path."""
    return isinstance(uri, str) and uri.startswith("s3://")


_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/key` into `(bucket, key)`; the key may be empty (the bucket root) or end in `/`.

    Raises:
        ValueError: `uri` is not an `s3://` URI or its bucket name is not a valid one.
        TypeError: `uri` is not a string (an S3 URI passed through `Path()` loses a slash).
    """
    if not isinstance(uri, str):
        if str(uri).startswith("s3:/"):
            raise TypeError(f"{str(uri)!r} is an S3 URI that was turned into a path; pass it as a string")
        raise TypeError(f"expected an s3://bucket/key URI string, got {uri!r}")
    if not uri.startswith("s3://"):
        raise ValueError(f"expected an s3://bucket/key URI, got {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"S3 URI {uri!r} names no bucket (expected s3://bucket/key)")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(
            f"S3 URI {uri!r} has an invalid bucket name {bucket!r} "
            "(3-63 letters, digits, dots, hyphens or underscores, starting and ending with a letter or digit)"
        )
    return bucket, key


# ------------------------------------------------------------------------------------------- client


def s3_client(
    *,
    endpoint_url: str | None = None,
    max_attempts: int | None = None,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
    max_pool_connections: int = 16,
) -> Any:
    """A boto3 S3 client configured from the environment (see the module docstring).

    Args:
        endpoint_url: overrides `SECATEURS_S3_ENDPOINT` / `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`.
        max_attempts: botocore attempts per request (first try included); default `AWS_MAX_ATTEMPTS` or 5.
        connect_timeout: seconds to open a connection.
        read_timeout: seconds to wait for a response or the next chunk of a body.
        max_pool_connections: HTTP connections kept per client; above the transfer concurrency so parallel
            multipart parts do not queue for a connection.

    Raises:
        StorageError: the credential variables are missing.
        ValueError: a retry or addressing setting in the environment is invalid.
    """
    import boto3
    from botocore.config import Config

    key_id, secret, token = (os.environ.get(name) or None for name in CREDENTIAL_ENV)
    if not key_id or not secret:
        missing = [n for n, v in zip(CREDENTIAL_ENV[:2], (key_id, secret)) if not v]
        raise StorageError(
            f"no S3 credentials: set {' and '.join(missing)} in the environment "
            "(on a cluster, from a Kubernetes secret exposed as env)"
        )
    endpoint_url = endpoint_url or os.environ.get("SECATEURS_S3_ENDPOINT") or None
    custom_endpoint = bool(
        endpoint_url
        or (
            (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
            and os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() != "true"
        )
    )
    addressing = os.environ.get("SECATEURS_S3_ADDRESSING_STYLE") or ("path" if custom_endpoint else "auto")
    if addressing not in ("auto", "path", "virtual"):
        raise ValueError(f"SECATEURS_S3_ADDRESSING_STYLE={addressing!r} is not one of auto, path, virtual")
    retry_mode = os.environ.get("AWS_RETRY_MODE") or "standard"
    if retry_mode not in ("standard", "adaptive", "legacy"):
        raise ValueError(f"AWS_RETRY_MODE={retry_mode!r} is not one of standard, adaptive, legacy")
    if max_attempts is None:
        raw = os.environ.get("AWS_MAX_ATTEMPTS") or "5"
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"AWS_MAX_ATTEMPTS={raw!r} is not a positive integer")
        max_attempts = int(raw)

    config = Config(
        retries={"mode": retry_mode, "total_max_attempts": max_attempts},  # first try included
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
        s3={"addressing_style": addressing},
    )
    # One boto3 session per process caches the parsed S3 service model (a new session costs ~0.4 s a client).
    # Credentials are passed to each client explicitly, read from the environment now, so botocore's provider
    # chain (shared files, instance metadata, which can stall for seconds off-cloud) is never consulted.
    global _session
    with _session_lock:  # boto3 sessions are not thread-safe
        if _session is None:
            _session = boto3.session.Session()
        return _session.client(
            "s3",
            endpoint_url=endpoint_url,
            config=config,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            aws_session_token=token,
            region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        )


def transfer_config(
    multipart_threshold: int = 64 * MiB,
    multipart_chunksize: int = 16 * MiB,
    max_concurrency: int = 8,
) -> TransferConfig:
    """The managed-transfer settings used by `download` and `upload`.

    16 MiB parts keep a failed part cheap to resend while a 16 GB checkpoint stays at ~1000 parts, far below
    S3's 10,000-part limit (s3transfer grows the part size on its own for larger files). Files under the
    threshold go in one request.
    """
    from boto3.s3.transfer import TransferConfig

    # "classic" pins the Python transfer manager: the CRT one (used when awscrt is installed) retries and
    # reports errors differently.
    return TransferConfig(
        multipart_threshold=multipart_threshold,
        multipart_chunksize=multipart_chunksize,
        max_concurrency=max_concurrency,
        preferred_transfer_client="classic",
    )


def check_access(uri: str, *, client: Any = None) -> None:
    """Fail fast, with one line, when the bucket of `uri` cannot be used: endpoint unreachable, credentials
    refused, bucket missing. Costs one HEAD request; call it before any expensive work.

    The default client for this check uses short timeouts and 2 attempts so an unreachable endpoint is
    reported in seconds. HEAD on a bucket needs the `s3:ListBucket` permission, which prefix downloads need
    anyway.

    Raises:
        StorageError: the bucket is not usable; the message says why.
        ValueError: `uri` is not a valid S3 URI.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _ = parse_s3_uri(uri)
    client = client or s3_client(max_attempts=2, connect_timeout=3.0, read_timeout=10.0)
    endpoint = _endpoint(client)
    try:
        client.head_bucket(Bucket=bucket)
        return
    except (BotoCoreError, ClientError) as exc:
        failure = exc
    # Raised outside the except block so the original error is attached only when it is safe to show.
    if isinstance(failure, ClientError):
        status, code = _status(failure), _code(failure)
        if status == 404 or code == "NoSuchBucket":
            raise StorageError(f"bucket {bucket!r} does not exist at S3 endpoint {endpoint}") from None
        if status in (401, 403):
            raise StorageError(
                f"S3 endpoint {endpoint} refused access to bucket {bucket!r} ({status} {code}): check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN and the bucket's policy"
            ) from None
    raise _storage_error(f"check bucket {bucket!r}", failure, endpoint) from _chainable(failure)


# ----------------------------------------------------------------------------------------- transfers


@dataclass(frozen=True)
class _RemoteObject:
    key: str
    size: int
    etag: str


def download(
    uri: str, dest_dir: str | Path, *, client: Any = None, transfer: TransferConfig | None = None
) -> Path:
    """Download the object or prefix `uri` into `dest_dir`.

    A prefix (a key ending in `/`, the bucket root, or a key with no object of that exact name) is mirrored:
    `s3://b/run/model/config.json` lands in `dest_dir/config.json`. A single object lands in
    `dest_dir/<its basename>`. Files whose size and ETag match what a previous download recorded are skipped;
    the record lives next to `dest_dir` (`.<name>.s3-etags.json`), outside the artifact, so it never changes
    an artifact's content hash.

    Returns:
        `dest_dir` for a prefix, the downloaded file for a single object.

    Raises:
        StorageError: nothing exists at `uri`, a key would land outside `dest_dir`, or a transfer failed after
            its retries.
    """
    bucket, key = parse_s3_uri(uri)
    client = client or s3_client()
    transfer = transfer or transfer_config()
    endpoint = _endpoint(client)
    dest_dir = Path(dest_dir)

    objects, single = _remote_objects(client, bucket, key, uri, endpoint)
    targets = {rel: _inside(dest_dir, rel, uri) for rel in objects}  # refuse bad keys before writing anything
    dest_dir.mkdir(parents=True, exist_ok=True)
    index_path = dest_dir.parent / f".{dest_dir.name}.s3-etags.json"
    index = _read_index(index_path)
    if not single:
        for rel in sorted(set(index) - set(objects)):
            # Only files this function wrote are removed; anything else in dest_dir is left alone.
            _inside(dest_dir, rel, uri).unlink(missing_ok=True)
            del index[rel]
    todo = {rel: obj for rel, obj in objects.items() if not _is_current(targets[rel], rel, obj, index)}
    with _progress(sum(o.size for o in todo.values()), f"download {uri}") as bar:
        for rel, obj in todo.items():
            targets[rel].parent.mkdir(parents=True, exist_ok=True)
            counter = _Counter(bar)
            _retrying(
                f"download s3://{bucket}/{obj.key}",
                functools.partial(
                    client.download_file,
                    bucket,
                    obj.key,
                    str(targets[rel]),
                    Config=transfer,
                    Callback=counter,
                ),
                endpoint,
                on_retry=counter.rewind,
            )
            index[rel] = {"etag": obj.etag, "size": obj.size}
            # Recorded after every file, so an interrupted download resumes where it stopped.
            _write_index(index_path, index)
    _write_index(index_path, index)
    return dest_dir / next(iter(objects)) if single else dest_dir


def upload(
    local_path: str | Path, uri: str, *, client: Any = None, transfer: TransferConfig | None = None
) -> str:
    """Upload a file or a directory tree to S3 and return the URI it now lives at.

    A file goes to `uri` itself, or to `uri/<its name>` when `uri` ends in `/` or is a bucket root. A
    directory goes under the prefix `uri` (relative paths kept, `/`-separated), with its top-level
    `secateurs.json` last; a manifest already under the prefix is deleted first, so while an artifact is being
    replaced its prefix never claims to be complete. Other objects under the prefix that the directory does
    not hold are left.

    Raises:
        FileNotFoundError: `local_path` does not exist.
        ValueError: `local_path` is an empty directory, or `uri` is not a valid S3 URI.
        StorageError: a transfer failed after its retries.
    """
    local_path = Path(local_path)
    bucket, key = parse_s3_uri(uri)
    if not local_path.exists():
        raise FileNotFoundError(f"cannot upload {local_path}: no such file or directory")
    if local_path.is_file():
        if not key or key.endswith("/"):
            key += local_path.name
        files, result_key = [(local_path, key)], key
    else:
        prefix = key.rstrip("/")
        files = [
            (f, f"{prefix}/{f.relative_to(local_path).as_posix()}".lstrip("/"))
            for f in sorted(local_path.rglob("*"))
            if f.is_file()
        ]
        if not files:
            raise ValueError(f"cannot upload {local_path}: the directory holds no files")
        # The manifest marks a complete artifact, so it goes up only after everything it describes.
        files.sort(key=lambda item: item[0] == local_path / MANIFEST)
        result_key = prefix
    client = client or s3_client()
    transfer = transfer or transfer_config()
    endpoint = _endpoint(client)
    if local_path.is_dir() and files[-1][0] == local_path / MANIFEST:
        manifest_key = files[-1][1]
        _retrying(
            f"remove the old manifest s3://{bucket}/{manifest_key}",
            functools.partial(client.delete_object, Bucket=bucket, Key=manifest_key),  # no-op when absent
            endpoint,
        )
    with _progress(sum(f.stat().st_size for f, _ in files), f"upload {uri}") as bar:
        for path, object_key in files:
            counter = _Counter(bar)
            _retrying(
                f"upload {path} to s3://{bucket}/{object_key}",
                functools.partial(
                    client.upload_file, str(path), bucket, object_key, Config=transfer, Callback=counter
                ),
                endpoint,
                on_retry=counter.rewind,
            )
    return f"s3://{bucket}/{result_key}"


def localize(
    uri: str | Path,
    cache_dir: str | Path | None = None,
    *,
    client: Any = None,
    transfer: TransferConfig | None = None,
) -> Path:
    """A local path for an input: a local path (or `file://` URI) as it is, an `s3://` URI downloaded.

    S3 inputs land in `cache_dir/s3/<name>-<hash of the URI>`; a second call lists the prefix again and
    fetches only what changed. A file lock serialises concurrent steps that localize the same URI on one
    machine.

    Raises:
        FileNotFoundError: a local input does not exist.
        StorageError: see `download`.
    """
    if not is_s3_uri(uri):
        path = _local_path(uri)
        if not path.exists():
            raise FileNotFoundError(f"input {uri} does not exist")
        return path
    from filelock import FileLock

    bucket, key = parse_s3_uri(uri)
    canonical = uri.rstrip("/") if key.rstrip("/") else f"s3://{bucket}"
    name = PurePosixPath(key.rstrip("/")).name or bucket
    target = (
        Path(cache_dir or manifest_cache_dir())
        / "s3"
        / f"{name}-{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        return download(uri, target, client=client, transfer=transfer)


@contextlib.contextmanager
def staged_output(
    uri: str | Path, *, staging_dir: str | Path | None = None, client: Any = None
) -> Iterator[Path]:
    """Yield a local directory for a step to write its artifact into, published to `uri` only on success.

    A local `uri` is written atomically (`manifest.atomic_output`). An S3 `uri` is checked for access before
    the step runs, the artifact is written to a temporary directory under `staging_dir` and uploaded after the
    block succeeds; a failed block uploads nothing, so an existing artifact at `uri` is never replaced by a
    partial one.
    """
    if not is_s3_uri(uri):
        with atomic_output(_local_path(uri)) as tmp:
            yield tmp
        return
    check_access(uri, client=client)  # the quick check's own client when none is given: fails in seconds
    with tempfile.TemporaryDirectory(prefix="secateurs-out-", dir=staging_dir) as tmp:
        yield Path(tmp)
        upload(tmp, uri, client=client)


# ------------------------------------------------------------------------------------------ helpers


def _local_path(uri: str | os.PathLike) -> Path:
    """A local path or `file://` URI as a Path, refusing an S3 URI that lost a slash to `Path()`."""
    text = os.fspath(uri)
    if text.startswith("s3:/"):
        raise ValueError(f"{text!r} is an S3 URI that was turned into a path; pass it as a string")
    return Path(text.removeprefix("file://")).expanduser()


def list_objects(uri: str, *, client: Any = None) -> dict[str, str]:
    """The objects `uri` names (itself, or those under the prefix): {path relative to the prefix: object URI}.

    Raises:
        StorageError: nothing exists at `uri`, or listing failed after its retries.
    """
    bucket, key = parse_s3_uri(uri)
    client = client or s3_client()
    objects, _ = _remote_objects(client, bucket, key, uri, _endpoint(client))
    return {rel: f"s3://{bucket}/{obj.key}" for rel, obj in sorted(objects.items())}


def _remote_objects(
    client: Any, bucket: str, key: str, uri: str, endpoint: str
) -> tuple[dict[str, _RemoteObject], bool]:
    """What `uri` names: ({relative path: object}, is a single object)."""
    from botocore.exceptions import ClientError

    def head_object() -> dict[str, Any] | None:
        try:
            return client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _status(exc) == 404:
                return None
            raise

    if key and not key.endswith("/"):
        head = _retrying(f"look up {uri}", head_object, endpoint)
        if head is not None:
            obj = _RemoteObject(key, head["ContentLength"], head["ETag"].strip('"'))
            return {PurePosixPath(key).name: obj}, True
        key += "/"

    def list_prefix() -> dict[str, _RemoteObject]:
        found = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            for item in page.get("Contents", []):
                if item["Key"].endswith("/"):  # zero-byte "folder" markers some consoles create
                    continue
                found[item["Key"][len(key) :]] = _RemoteObject(
                    item["Key"], item["Size"], item["ETag"].strip('"')
                )
        return found

    objects = _retrying(f"list {uri}", list_prefix, endpoint)
    if not objects:
        raise StorageError(f"nothing at {uri}: no object of that name and no objects under it")
    return objects, False


def _inside(dest_dir: Path, rel: str, uri: str) -> Path:
    """`dest_dir / rel`, refusing keys that would climb out of `dest_dir` (`..`, absolute paths)."""
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
        raise StorageError(f"refusing to download {rel!r} from {uri}: its path leaves {dest_dir}")
    return dest_dir.joinpath(*parts)


def _is_current(path: Path, rel: str, obj: _RemoteObject, index: dict[str, dict[str, Any]]) -> bool:
    """Whether `path` already holds `obj`: recorded with its ETag and size, and still that size on disk."""
    entry = index.get(rel)
    return (
        entry is not None
        and entry.get("etag") == obj.etag
        and entry.get("size") == obj.size
        and path.is_file()
        and path.stat().st_size == obj.size
    )


def _read_index(path: Path) -> dict[str, dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_index(path: Path, index: dict[str, dict[str, Any]]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _retrying(
    action: str, fn: Callable[[], _T], endpoint: str, on_retry: Callable[[], None] | None = None
) -> _T:
    """Run one object transfer, retrying transient failures with jittered exponential backoff.

    Written here rather than taken from a retry library: it is ten lines, and what counts as transient is
    specific to botocore and s3transfer's exception types (see `_is_transient`).
    """
    for attempt in range(1, TRANSFER_ATTEMPTS + 1):
        try:
            return fn()
        except Exception as exc:
            if not _is_s3_error(exc):
                raise
            failure = exc
        # Outside the except block: a StorageError raised here carries no implicit __context__, so an
        # original error whose text holds a credential cannot reach a traceback.
        if attempt == TRANSFER_ATTEMPTS or not _is_transient(failure):
            raise _storage_error(action, failure, endpoint) from _chainable(failure)
        delay = random.uniform(0.5, 1.0) * min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
        log.warning(
            "%s failed (%s); retrying in %.1f s (attempt %d of %d)",
            _redact(action),
            _describe(failure),
            delay,
            attempt + 1,
            TRANSFER_ATTEMPTS,
        )
        if on_retry is not None:
            on_retry()
        time.sleep(delay)
    raise AssertionError("unreachable")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, its causes and contexts, and the last error s3transfer gave up on."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "last_exception", None)]


def _is_s3_error(exc: BaseException) -> bool:
    return any(type(e).__module__.split(".")[0] in ("botocore", "boto3", "s3transfer") for e in _chain(exc))


def _is_transient(exc: BaseException) -> bool:
    """Whether trying the same transfer again can succeed: network trouble, 5xx, throttling."""
    import urllib3.exceptions
    from botocore import exceptions as bx

    chain = list(_chain(exc))
    if any(isinstance(e, bx.SSLError) for e in chain):  # a certificate problem does not heal itself
        return False
    for e in chain:
        if isinstance(
            e,
            (
                bx.ConnectionError,  # refused, connect timeout
                bx.HTTPClientError,  # closed early, read timeout, stream cut
                bx.IncompleteReadError,
                urllib3.exceptions.ProtocolError,
                ConnectionError,  # the builtin: reset, broken pipe
                TimeoutError,
            ),
        ):
            return True
        if isinstance(e, bx.ClientError):
            status = _status(e)
            code = e.response.get("Error", {}).get("Code", "")
            return status is not None and (status >= 500 or status == 429) or code in _RETRYABLE_CODES
    return False


def _status(exc: Any) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if status is None and str(exc.response.get("Error", {}).get("Code", "")).isdigit():
        status = int(exc.response["Error"]["Code"])
    return status


def _code(exc: Any) -> str:
    """The S3 error code, or the HTTP reason where S3 sent none (HEAD responses have no body)."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    return (error.get("Message") or code) if code.isdigit() or not code else code


def _storage_error(action: str, exc: BaseException, endpoint: str) -> StorageError:
    from botocore import exceptions as bx

    chain = list(_chain(exc))
    if any(isinstance(e, (bx.ConnectionError, bx.HTTPClientError)) for e in chain):
        return StorageError(
            f"cannot reach S3 endpoint {endpoint}: {_describe(exc)} (while trying to {_redact(action)})"
        )
    for e in chain:
        if isinstance(e, bx.ClientError) and _status(e) in (401, 403):
            return StorageError(
                f"S3 endpoint {endpoint} refused to {_redact(action)}: {_describe(e)} (check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN and the bucket's policy)"
            )
    return StorageError(f"cannot {_redact(action)} at S3 endpoint {endpoint}: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    """`Type: message` on one line, with credentials redacted."""
    return _redact(" ".join(f"{type(exc).__name__}: {exc}".split()))


def _redact(text: str) -> str:
    """`text` with credential values, URL user info and presigned-URL secrets replaced by `***`."""
    for name in CREDENTIAL_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    text = re.sub(r"(?<=://)[^/@\s]+@", "***@", text)
    return re.sub(r"(?i)(X-Amz-(?:Credential|Signature|Security-Token)=)[^&\s\"']+", r"\1***", text)


def _leaks(exc: BaseException) -> bool:
    secrets = [v for n in CREDENTIAL_ENV if (v := os.environ.get(n)) and len(v) >= 4]
    return any(s in str(e) for e in _chain(exc) for s in secrets)


def _chainable(exc: BaseException) -> BaseException | None:
    """The original exception to chain for debugging, or None when its text carries a credential."""
    return None if _leaks(exc) else exc


def _endpoint(client: Any) -> str:
    return _redact(str(client.meta.endpoint_url))


class _Counter:
    """boto3 progress callback for one object: feeds the shared bar and can take its bytes back on a retry."""

    def __init__(self, bar: Any) -> None:
        self.bar, self.done, self.lock = bar, 0, threading.Lock()

    def __call__(self, n: int) -> None:  # called from the transfer's worker threads
        with self.lock:
            self.done += n
        self.bar.update(n)

    def rewind(self) -> None:
        with self.lock:
            done, self.done = self.done, 0
        self.bar.update(-done)


@contextlib.contextmanager
def _progress(total: int, desc: str) -> Iterator[Any]:
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silence in pipeline logs.
    with tqdm(
        total=total, desc=_redact(desc), unit="B", unit_scale=True, unit_divisor=1024, disable=None
    ) as bar:
        yield bar
