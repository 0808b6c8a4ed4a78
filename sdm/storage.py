"""URIs to pyarrow filesystems, and writes that readers never see half-done.

Every path a user gives may be a local path, `file://...` or `s3://bucket/prefix`. S3 endpoint, region
and credentials come from the standard AWS settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), so AWS,
MinIO and a loopback test server all work unchanged.

Every S3 client is built here, and all of them retry what a store answers while it is briefly unwell (500
InternalError, 503 SlowDown, throttling, a dropped or refused connection) with the AWS SDKs' standard retry
mode: exponential backoff with jitter, at most AWS_MAX_ATTEMPTS attempts per request (the standard AWS
setting; default 8 here, where pyarrow's own default is 3). That covers this module's reads and writes, Ray
Train's checkpoint uploads and Ray Data's reads (both get their filesystem from `resolve`, and it keeps its
retry setting when pickled to a worker). A store that stays down ends each operation in a StorageError naming
the URI; with 8 attempts, a request to a store that is down gave up after 3 to 55 s on loopback (the SDKs'
jittered backoff, each wait capped at 20 s): set AWS_MAX_ATTEMPTS lower to fail faster, higher to ride out more.

boto3 is imported where an S3 write needs it, so local paths work where it is not installed (the GPU check's
machine, `make gpu-check`).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import threading
import uuid
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from sdm.errors import StorageError

MAX_ATTEMPTS_ENV = "AWS_MAX_ATTEMPTS"  # the AWS SDKs' standard setting; both S3 clients below take it from here
DEFAULT_MAX_ATTEMPTS = 8
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0  # a silent connection counts as a failed attempt after this (boto3; pyarrow ignores it on Linux)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def max_attempts() -> int:
    """Attempts per S3 request (the first one included): AWS_MAX_ATTEMPTS, else DEFAULT_MAX_ATTEMPTS."""
    raw = os.environ.get(MAX_ATTEMPTS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_ATTEMPTS
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise StorageError(f"{MAX_ATTEMPTS_ENV}={raw!r}: expected a whole number of attempts >= 1")
    return n


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with the standard retry strategy at `attempts`, which it keeps when pickled (to a
    Ray Train worker, a Ray Data task): pyarrow's own pickling drops the retry strategy for its default of 3."""

    def __init__(self, attempts: int, **kwargs: Any):
        self._options = {"attempts": attempts, **kwargs}
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **kwargs)

    @property
    def max_attempts(self) -> int:
        return self._options["attempts"]

    def __reduce__(self):
        return _rebuild_s3, (self._options,)


def _rebuild_s3(options: dict[str, Any]) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(**options)


def _s3_filesystem() -> RetryingS3FileSystem:
    kwargs: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S, "request_timeout": READ_TIMEOUT_S}
    endpoint = _endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = _region()
    if region:
        kwargs["region"] = region
    return RetryingS3FileSystem(max_attempts(), **kwargs)


_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def _boto3_s3() -> Any:
    """A boto3 S3 client with the same retry policy, one per process and settings (clients are thread-safe;
    creating them is not, nor cheap)."""
    import boto3
    from botocore.config import Config

    attempts = max_attempts()
    env = tuple(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"))
    key = (os.getpid(), _endpoint(), _region(), attempts, env)
    with _clients_lock:
        if key not in _clients:
            config = Config(
                retries={"mode": "standard", "total_max_attempts": attempts},
                connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
            )
            # boto3 reads AWS_ENDPOINT_URL, region and credentials itself
            _clients[key] = boto3.session.Session().client("s3", config=config)
        return _clients[key]


def _failed(what: str, uri: str, e: Exception) -> StorageError:
    """The error for an operation on `uri` that failed; on S3, after every attempt the retry policy allows."""
    tail = f" (each S3 request is tried up to {max_attempts()} times; {MAX_ATTEMPTS_ENV} sets how many)" if is_s3(uri) else ""
    return StorageError(f"cannot {what} {uri}: {e}{tail}")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Map a URI to (filesystem, path inside it)."""
    uri = str(uri)
    if is_s3(uri):
        path = uri[len("s3://") :].rstrip("/")
        if not path:
            raise StorageError(f"{uri!r} names no bucket")
        return _s3_filesystem(), path
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def absolute(uri: str) -> str:
    """A local path made absolute; s3:// and file:// URIs unchanged. Jobs hand URIs to Ray workers, whose working
    directory need not be the driver's (Ray Train runs them in their trial directory)."""
    if is_s3(uri) or str(uri).startswith("file://"):
        return str(uri)
    return os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (posix separators for s3://, the OS's for local paths)."""
    if is_s3(uri) or str(uri).startswith("file://"):
        return posixpath.join(str(uri).rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise _failed("reach", uri, e) from None


def read_bytes(uri: str, limit: int | None = None) -> bytes:
    """The file's bytes; with `limit`, only its first `limit` bytes (a header), the rest never fetched."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read(limit)
    except FileNotFoundError:
        raise StorageError(f"no such file: {uri}") from None
    except OSError as e:
        raise _failed("read", uri, e) from None


def write_bytes(uri: str, data: bytes) -> None:
    """Publish `data` at `uri` atomically: a reader sees the old object, or the whole new one.

    Locally the bytes go to a temporary name in the same directory and are renamed into place.
    On S3 the object is one PUT, visible only once the whole upload succeeded, retried whole (with backoff) when
    the store fails it; a write that fails every attempt raises StorageError and publishes nothing.
    """
    fs, path = resolve(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
            try:
                with fs.open_output_stream(tmp) as f:
                    f.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            _upload(uri, path, data)
    except OSError as e:
        raise _failed("write", uri, e) from None


def _upload(uri: str, path: str, data: bytes) -> None:
    """One PUT through boto3: the object appears whole when it succeeds, and not at all otherwise.

    (A pyarrow S3 output stream cannot be aborted: closing it after a failure would publish a prefix.)
    """
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = path.partition("/")
    if not key:
        raise StorageError(f"s3://{path} names a bucket, not an object")
    try:
        _boto3_s3().put_object(Bucket=bucket, Key=key, Body=data)
    except (BotoCoreError, ClientError) as e:
        raise _failed("write", uri, e) from None


def publish_dir(local_dir: str, uri: str, last: str) -> None:
    """Copy the files under a local directory to directory `uri`, each with write_bytes (atomic, retried), and
    the one named `last` (the directory's marker) after all the others: if any write fails for good, the marker
    is not there. (pyarrow's copy_files, which Ray Train uploads with by default, gives no order, and can lose a
    failed part upload without raising.)"""
    names = []
    for root, _, files in os.walk(local_dir):
        names += [os.path.relpath(os.path.join(root, f), local_dir) for f in files]
    if last not in names:
        raise StorageError(f"{local_dir} has no {last} to publish last")
    for name in sorted(names, key=lambda n: (n == last, n)):
        with open(os.path.join(local_dir, name), "rb") as f:
            write_bytes(join(uri, *name.split(os.sep)), f.read())


def _entries(uri: str) -> list[pafs.FileInfo]:
    """What is directly under a directory URI (one listing); [] when it does not exist."""
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise _failed("list", uri, e) from None


def _list(uri: str, kind: pafs.FileType, suffix: str) -> list[str]:
    return sorted(posixpath.basename(i.path) for i in _entries(uri) if i.type == kind and i.path.endswith(suffix))


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Names (not paths) of the files directly under a directory URI, sorted; [] when it does not exist."""
    return _list(uri, pafs.FileType.File, suffix)


def list_dirs(uri: str) -> list[str]:
    """Names of the directories directly under a directory URI, sorted; [] when it does not exist. (On S3, a
    directory is a common key prefix.)"""
    return _list(uri, pafs.FileType.Directory, "")


def file_sizes(uri: str) -> dict[str, int]:
    """Sizes in bytes of the files directly under a directory URI, by name (one listing); {} when it does not exist."""
    return {posixpath.basename(i.path): i.size for i in _entries(uri) if i.type == pafs.FileType.File}


# A directory whose files are published one by one (by write_bytes, or by another program: Ray Train uploads a
# checkpoint directory file by file, in no set order) is complete when its marker file, which names every other
# file with its size and checksum, is there and so is every file it names, at that size. A marker that arrived
# before the files it names (an upload that failed part-way) marks nothing.


def manifest(files: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """What a marker records of the files it covers: {name: {"size": bytes, "sha256": hex}}."""
    return {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in sorted(files.items())}


def incomplete(uri: str, files: dict[str, dict[str, Any]]) -> list[str]:
    """What keeps directory `uri` from holding every file of a manifest: one line per file missing or of
    another size; [] when all are there."""
    sizes = file_sizes(uri)
    problems = []
    for name, entry in sorted(files.items()):
        if name not in sizes:
            problems.append(f"{name} is missing")
        elif sizes[name] != entry["size"]:
            problems.append(f"{name} has {sizes[name]} bytes where {entry['size']} were written")
    return problems


def verified(uri: str, data: bytes, entry: dict[str, Any] | None) -> bytes:
    """`data` read from `uri`, checked against its manifest entry (when there is one)."""
    if entry is not None and (len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]):
        raise StorageError(f"{uri} does not match the checksum its directory's marker recorded (corrupt or replaced)")
    return data


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as e:
        raise _failed("delete", uri, e) from None
