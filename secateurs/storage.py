"""S3 storage for artifacts: `s3://` inputs made local, and a prepared dataset sent to an `s3://` output.

Consumes: `s3://bucket/key` URIs naming one object (a `.gguf` file) or a prefix (an artifact directory: a
model checkpoint, a `save_to_disk` dataset), and local paths, which pass through unchanged.

Configuration is botocore's own, read from the environment and the AWS config files at call time (never from a
secateurs config or a compiled pipeline spec); secateurs reads none of these variables itself:
- credentials: botocore's chain: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN` (on a
  cluster, a Kubernetes secret exposed as env), a profile (`AWS_PROFILE`, `AWS_CONFIG_FILE`,
  `AWS_SHARED_CREDENTIALS_FILE`), web identity, container or instance metadata (`AWS_EC2_METADATA_DISABLED=true`
  skips the latter off-cloud).
- endpoint: `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`, else the profile's `endpoint_url`, else AWS. At a
  custom endpoint (MinIO, Ceph, ...) botocore addresses buckets path-style, which every S3-compatible store
  serves, unless the profile says `s3 = addressing_style = virtual`.
- region: `AWS_DEFAULT_REGION` or the profile's `region`, else us-east-1 (botocore ignores `AWS_REGION`
  outside AWS Lambda).
- retries: `AWS_RETRY_MODE` (`standard`, the default, or `adaptive`) and `AWS_MAX_ATTEMPTS` (first try
  included; 3 in standard mode), or the profile's `retry_mode` / `max_attempts`. botocore retries every request
  (each multipart part too) on connection errors, 5xx and throttling; s3transfer also restarts a download whose
  body stream breaks. secateurs adds no retry loop of its own.

Produces: local files (downloads, under a cache for `localize`) and S3 objects (`upload` of a directory).

Guarantees:
- Objects are moved with boto3's managed transfer: multipart above a threshold, parts in parallel, a download
  written to a temporary sibling and renamed when complete.
- A prefix download mirrors the prefix: files already present with the ETag and size S3 lists are not fetched
  again, and files it downloaded earlier that the prefix no longer holds are removed.
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
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

from secateurs.errors import exception_chain
from secateurs.files import cache_dir as default_cache_dir
from secateurs.manifest import MANIFEST

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig

CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

_T = TypeVar("_T")
_session_lock = threading.Lock()
# Credential values of every client made in this process, wherever botocore found them: redacted from messages.
_secrets: set[str] = set()


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


@functools.lru_cache(maxsize=4)
def _session(aws_env: tuple[tuple[str, str], ...]) -> Any:
    """One boto3 session per set of `AWS_*` variables (the key): it caches the parsed S3 service model (a new
    session costs ~0.4 s a client) and the resolved credentials (an assumed role is not assumed again for every
    object), and a changed environment gets a new one."""
    import boto3

    return boto3.session.Session()


def _checksum_defaults(session: Any) -> dict[str, str]:
    """Request checksums only where an S3 operation requires them, unless the environment or the profile says.

    Since boto3 1.36 every upload over HTTPS goes as aws-chunked with a CRC32 trailer by default; S3-compatible
    servers older than that refuse it (Ceph radosgw 16 answers MissingContentLength; some MinIO releases too), so
    a model that uploads to AWS would not upload to an on-premises store. TLS and the MD5 of each part still guard
    the bytes. An explicit AWS_REQUEST_CHECKSUM_CALCULATION or profile setting is left to botocore."""
    if "AWS_REQUEST_CHECKSUM_CALCULATION" in os.environ:
        return {}
    if "request_checksum_calculation" in session._session.get_scoped_config():
        return {}
    return {"request_checksum_calculation": "when_required"}


def s3_client(*, connect_timeout: float = 10.0, read_timeout: float = 60.0) -> Any:
    """A boto3 S3 client configured by botocore from the environment and config files (see the module docstring).

    Only the timeouts are set here (botocore reads no variable for them): seconds to open a connection, and to
    wait for a response or the next chunk of a body.

    Raises:
        StorageError: no credentials are found, or an `AWS_*` setting or profile is invalid.
    """
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, NoCredentialsError, PartialCredentialsError

    aws_env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    try:
        with _session_lock:  # boto3 sessions are not thread-safe
            session = _session(aws_env)
            credentials = session.get_credentials()
            if credentials is None:
                raise NoCredentialsError()
            _secrets.update(v for v in credentials.get_frozen_credentials() if v and len(v) >= 4)
            return session.client(
                "s3",
                config=Config(
                    connect_timeout=connect_timeout, read_timeout=read_timeout, **_checksum_defaults(session)
                ),
            )
    except (NoCredentialsError, PartialCredentialsError) as exc:
        missing = getattr(exc, "kwargs", {}).get("cred_var")
        raise StorageError(
            f"no S3 credentials: set {missing or 'AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY'} in the environment "
            "(on a cluster, from a Kubernetes secret exposed as env), or AWS_PROFILE"
        ) from None
    except (BotoCoreError, ValueError) as exc:  # botocore reports AWS_MAX_ATTEMPTS=abc as a bare ValueError
        raise StorageError(
            f"invalid S3 configuration (AWS_* variables or AWS_CONFIG_FILE): {_describe(exc)}"
        ) from None


def check_access(uri: str, *, client: Any = None) -> None:
    """Fail fast, with one line, when the bucket of `uri` cannot be used: endpoint unreachable, credentials
    refused, bucket missing. Costs one HEAD request (and botocore's retries); call it before any expensive work.

    The default client for this check gives up on a connection after 3 s, so an unreachable endpoint is reported
    in seconds. HEAD on a bucket needs the `s3:ListBucket` permission, which prefix downloads need anyway.

    Raises:
        StorageError: the bucket is not usable; the message says why.
        ValueError: `uri` is not a valid S3 URI.
    """
    bucket, _ = parse_s3_uri(uri)
    client = client or s3_client(connect_timeout=3.0, read_timeout=10.0)
    _call(f"access bucket {bucket!r}", client, client.head_bucket, Bucket=bucket)


def _transfer_config() -> TransferConfig:
    """boto3's managed-transfer defaults (8 MiB parts, 10 threads), on the classic Python transfer manager: the
    CRT one, which boto3 picks on some GPU instances when awscrt is installed, retries and reports errors
    differently."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(preferred_transfer_client="classic")


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

    Written here because no library compatible with the pinned boto3 mirrors a prefix: s3transfer moves single
    objects; awscli's `s3 sync` is a command, not a library API, compares sizes and modification times rather
    than ETags, and its `--delete` removes every local file the prefix lacks, not only those it wrote; s3fs
    (whose `get` copies everything again anyway) needs aiobotocore, whose botocore pin conflicts with boto3
    1.44.8 (pip resolves `s3fs boto3==1.44.8` only by falling back to s3fs 0.4.2, from 2020).

    Returns:
        `dest_dir` for a prefix, the downloaded file for a single object.

    Raises:
        StorageError: nothing exists at `uri`, a key would land outside `dest_dir`, or a transfer failed after
            botocore's retries.
    """
    bucket, key = parse_s3_uri(uri)
    client = client or s3_client()
    transfer = transfer or _transfer_config()
    dest_dir = Path(dest_dir)

    objects, single = _remote_objects(client, bucket, key, uri)
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
            _call(
                f"download s3://{bucket}/{obj.key}",
                client,
                client.download_file,
                bucket,
                obj.key,
                str(targets[rel]),
                Config=transfer,
                Callback=bar.update,
            )
            index[rel] = {"etag": obj.etag, "size": obj.size}
            # Recorded after every file, so an interrupted download resumes where it stopped.
            _write_index(index_path, index)
    _write_index(index_path, index)
    return dest_dir / next(iter(objects)) if single else dest_dir


def upload(
    local_dir: str | Path, uri: str, *, client: Any = None, transfer: TransferConfig | None = None
) -> str:
    """Upload the directory `local_dir` under the prefix `uri` (relative paths kept, `/`-separated) and return
    the prefix's URI: how `prepare-data` publishes an `s3://` output (a pipeline step's outputs are uploaded by
    KFP's launcher instead).

    Its top-level `secateurs.json` goes last, and a manifest already under the prefix is deleted first, so while
    an artifact is being replaced its prefix never claims to be complete. Other objects under the prefix that
    the directory does not hold are left.

    Raises:
        FileNotFoundError: `local_dir` is not a directory.
        ValueError: `local_dir` holds no files, or `uri` is not a valid S3 URI.
        StorageError: a transfer failed after botocore's retries.
    """
    local_dir = Path(local_dir)
    bucket, key = parse_s3_uri(uri)
    if not local_dir.is_dir():
        raise FileNotFoundError(f"cannot upload {local_dir}: no such directory")
    prefix = key.rstrip("/")
    files = [
        (f, f"{prefix}/{f.relative_to(local_dir).as_posix()}".lstrip("/"))
        for f in sorted(local_dir.rglob("*"))
        if f.is_file()
    ]
    if not files:
        raise ValueError(f"cannot upload {local_dir}: the directory holds no files")
    # The manifest marks a complete artifact, so it goes up only after everything it describes.
    files.sort(key=lambda item: item[0] == local_dir / MANIFEST)
    client = client or s3_client()
    transfer = transfer or _transfer_config()
    if files[-1][0] == local_dir / MANIFEST:
        manifest = files[-1][1]
        # A no-op when there is none.
        _call(
            f"remove the old manifest s3://{bucket}/{manifest}",
            client,
            client.delete_object,
            Bucket=bucket,
            Key=manifest,
        )
    with _progress(sum(f.stat().st_size for f, _ in files), f"upload {uri}") as bar:
        for path, object_key in files:
            _call(
                f"upload {path} to s3://{bucket}/{object_key}",
                client,
                client.upload_file,
                str(path),
                bucket,
                object_key,
                Config=transfer,
                Callback=bar.update,
            )
    return f"s3://{bucket}/{prefix}"


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
        text = os.fspath(uri)
        if text.startswith("s3:/"):
            raise ValueError(f"{text!r} is an S3 URI that was turned into a path; pass it as a string")
        path = Path(text.removeprefix("file://")).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"input {uri} does not exist")
        return path
    from filelock import FileLock

    bucket, key = parse_s3_uri(uri)
    canonical = uri.rstrip("/") if key.rstrip("/") else f"s3://{bucket}"
    name = PurePosixPath(key.rstrip("/")).name or bucket
    target = (
        Path(cache_dir or default_cache_dir())
        / "s3"
        / f"{name}-{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        return download(uri, target, client=client, transfer=transfer)


def list_objects(uri: str, *, client: Any = None) -> dict[str, str]:
    """The objects `uri` names (itself, or those under the prefix): {path relative to the prefix: object URI}.

    Raises:
        StorageError: nothing exists at `uri`, or listing failed after botocore's retries.
    """
    bucket, key = parse_s3_uri(uri)
    client = client or s3_client()
    objects, _ = _remote_objects(client, bucket, key, uri)
    return {rel: f"s3://{bucket}/{obj.key}" for rel, obj in sorted(objects.items())}


def object_sizes(uri: str, *, client: Any = None, missing_ok: bool = False) -> dict[str, int]:
    """The sizes in bytes of the objects `uri` names, by path relative to the prefix (see `list_objects`); {} for
    nothing there when `missing_ok`."""
    bucket, key = parse_s3_uri(uri)
    client = client or s3_client()
    objects, _ = _remote_objects(client, bucket, key, uri, missing_ok)
    return {rel: obj.size for rel, obj in sorted(objects.items())}


# ------------------------------------------------------------------------------------------ helpers


def _remote_objects(client: Any, bucket: str, key: str, uri: str,
                    missing_ok: bool = False) -> tuple[dict[str, _RemoteObject], bool]:  # fmt: skip
    """What `uri` names: ({relative path: object}, is a single object); ({}, False) for nothing when `missing_ok`."""
    from botocore.exceptions import ClientError

    def head_object() -> dict[str, Any] | None:
        try:
            return client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _status(exc) == 404:
                return None
            raise

    if key and not key.endswith("/"):
        head = _call(f"look up {uri}", client, head_object)
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

    objects = _call(f"list {uri}", client, list_prefix)
    if not objects and not missing_ok:
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


def _call(action: str, client: Any, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """`fn(*args, **kwargs)`, its S3 failure (botocore and s3transfer have retried already) turned into a
    one-line `StorageError`."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        if not any(
            type(e).__module__.split(".")[0] in ("botocore", "boto3", "s3transfer")
            for e in exception_chain(exc)
        ):
            raise
        failure = exc
    # Outside the except block: the StorageError carries no implicit __context__, so an original error whose
    # text holds a credential cannot reach a traceback.
    raise _storage_error(action, failure, _endpoint(client)) from _chainable(failure)


def _status(exc: Any) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if status is None and str(exc.response.get("Error", {}).get("Code", "")).isdigit():
        status = int(exc.response["Error"]["Code"])
    return status


def _storage_error(action: str, exc: BaseException, endpoint: str) -> StorageError:
    from botocore import exceptions as bx

    chain = list(exception_chain(exc))
    if any(isinstance(e, (bx.ConnectionError, bx.HTTPClientError)) for e in chain):
        return StorageError(
            f"cannot reach S3 endpoint {endpoint}: {_describe(exc)} (while trying to {_redact(action)})"
        )
    for e in (e for e in chain if isinstance(e, bx.ClientError)):
        if _status(e) in (401, 403):
            return StorageError(
                f"S3 endpoint {endpoint} refused to {_redact(action)}: {_describe(e)} (check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN and the bucket's policy)"
            )
        # HEAD answers a missing bucket with a bare 404; other operations name the error.
        if e.response.get("Error", {}).get("Code") == "NoSuchBucket" or (
            e.operation_name == "HeadBucket" and _status(e) == 404
        ):
            return StorageError(f"cannot {_redact(action)}: no such bucket at S3 endpoint {endpoint}")
    return StorageError(f"cannot {_redact(action)} at S3 endpoint {endpoint}: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    """`Type: message` on one line, with credentials redacted."""
    return _redact(" ".join(f"{type(exc).__name__}: {exc}".split()))


def _credentials() -> set[str]:
    """The credential values to hide: those of every client made here, and those in the environment now."""
    return _secrets | {v for n in CREDENTIAL_ENV if (v := os.environ.get(n)) and len(v) >= 4}


def _redact(text: str) -> str:
    """`text` with credential values, URL user info and presigned-URL secrets replaced by `***`."""
    for value in _credentials():
        text = text.replace(value, "***")
    text = re.sub(r"(?<=://)[^/@\s]+@", "***@", text)
    return re.sub(r"(?i)(X-Amz-(?:Credential|Signature|Security-Token)=)[^&\s\"']+", r"\1***", text)


def _chainable(exc: BaseException) -> BaseException | None:
    """The original exception to chain for debugging, or None when its text carries a credential."""
    secrets = _credentials()
    return None if any(s in str(e) for e in exception_chain(exc) for s in secrets) else exc


def _endpoint(client: Any) -> str:
    return _redact(str(client.meta.endpoint_url))


@contextlib.contextmanager
def _progress(total: int, desc: str) -> Iterator[Any]:
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silence in pipeline logs. s3transfer calls `update` from its worker
    # threads, and takes back the bytes of a download it restarts.
    with tqdm(
        total=total, desc=_redact(desc), unit="B", unit_scale=True, unit_divisor=1024, disable=None
    ) as bar:
        yield bar
