"""URIs to pyarrow filesystems, and writes that readers never see half-done.

Every path a user gives may be a local path, `file://...` or `s3://bucket/prefix`. S3 endpoint, region
and credentials come from the standard AWS settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), so AWS,
MinIO and a loopback test server all work unchanged.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from urllib.parse import urlparse

import boto3
import pyarrow.fs as pafs
from botocore.exceptions import BotoCoreError, ClientError

from sdm.errors import StorageError


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _s3_filesystem() -> pafs.S3FileSystem:
    kwargs: dict[str, object] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


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
        raise StorageError(f"cannot reach {uri}: {e}") from None


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"no such file: {uri}") from None
    except OSError as e:
        raise StorageError(f"cannot read {uri}: {e}") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Publish `data` at `uri` atomically: a reader sees the old object, or the whole new one.

    Locally the bytes go to a temporary name in the same directory and are renamed into place.
    On S3 the object is one PUT, visible only once the whole upload succeeded.
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
            _upload(path, data)
    except (OSError, BotoCoreError, ClientError) as e:
        raise StorageError(f"cannot write {uri}: {e}") from None


def _upload(path: str, data: bytes) -> None:
    """One PUT through boto3: the object appears whole when it succeeds, and not at all otherwise.

    (A pyarrow S3 output stream cannot be aborted: closing it after a failure would publish a prefix.)
    """
    bucket, _, key = path.partition("/")
    if not key:
        raise StorageError(f"s3://{path} names a bucket, not an object")
    # boto3 reads AWS_ENDPOINT_URL, region and credentials itself
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data)


def _list(uri: str, kind: pafs.FileType, suffix: str) -> list[str]:
    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"cannot list {uri}: {e}") from None
    return sorted(posixpath.basename(i.path) for i in infos if i.type == kind and i.path.endswith(suffix))


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Names (not paths) of the files directly under a directory URI, sorted; [] when it does not exist."""
    return _list(uri, pafs.FileType.File, suffix)


def list_dirs(uri: str) -> list[str]:
    """Names of the directories directly under a directory URI, sorted; [] when it does not exist. (On S3, a
    directory is a common key prefix.)"""
    return _list(uri, pafs.FileType.Directory, "")


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as e:
        raise StorageError(f"cannot delete {uri}: {e}") from None
