"""URL-agnostic byte I/O: local paths, ``file://`` URLs and ``s3://bucket/prefix``.

Every other data module goes through these functions so that a shard set can live on a
laptop disk, a shared filesystem or any S3-compatible store (AWS, MinIO, Ceph, moto) without
code changes. The S3 endpoint is never configured here: boto3 (>= 1.28.57) reads the standard
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` variables itself, as do the AWS CLI and most
tools, so one environment serves them all.

Errors name the URL, because a bare ``NoSuchKey`` from deep inside a Ray worker tells nobody
which of a thousand shards is missing.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from typing import BinaryIO

_CHUNK = 1 << 20
_clients: dict[tuple, object] = {}


def is_s3(url: str) -> bool:
    """True for ``s3://`` URLs."""
    return str(url).startswith("s3://")


def local_path(url: str) -> str:
    """The filesystem path of a local path or ``file://`` URL (error for s3)."""
    url = os.fspath(url)
    if is_s3(url):
        raise ValueError(f"{url} is an s3:// URL, not a local path")
    return url[len("file://"):] if url.startswith("file://") else url


def join(url: str, name: str) -> str:
    """``url`` + ``/`` + ``name``, keeping the URL's scheme (s3 keys always use ``/``)."""
    url = os.fspath(url)
    if is_s3(url) or url.startswith("file://"):
        return url.rstrip("/") + "/" + name
    return os.path.join(url, name)


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{url} has no bucket: expected s3://bucket/prefix")
    return bucket, key


def s3_client():
    """A boto3 S3 client, one per process and endpoint.

    Cached because creating a client costs ~50 ms; keyed by pid because clients must not
    cross a fork (DataLoader and Pool workers make their own), and by the endpoint variables
    so a test that points at a fresh local server gets a fresh client.
    """
    key = (os.getpid(), os.environ.get("AWS_ENDPOINT_URL_S3"), os.environ.get("AWS_ENDPOINT_URL"))
    client = _clients.get(key)
    if client is None:
        import boto3  # imported lazily: local-only users never pay for it
        from botocore.config import Config

        # botocore's own retries for every call: throttling, 5xx and connection errors are
        # retried with backoff; AWS_RETRY_MODE (standard|adaptive) and AWS_MAX_ATTEMPTS set them.
        retries = {"mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                   "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "5"))}
        client = boto3.session.Session().client("s3", config=Config(retries=retries, connect_timeout=10, read_timeout=60))
        _clients[key] = client
    return client


def _s3_error(url: str, err: Exception) -> OSError:
    """Turn a botocore error into an OSError that names the URL and the endpoint."""
    code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS default"
    if code in ("NoSuchKey", "404", "NotFound"):
        return FileNotFoundError(f"no object at {url} (endpoint {endpoint})")
    if code == "NoSuchBucket":
        return FileNotFoundError(f"bucket of {url} does not exist (endpoint {endpoint}): create it first")
    return OSError(f"S3 request for {url} failed (endpoint {endpoint}): {err}")


def open_read(url: str) -> BinaryIO:
    """Open ``url`` for streaming binary reads; the caller closes it.

    For S3 this is the GET response body, so large shards stream instead of downloading, and a
    connection dropped mid-object is resumed (``ResumableS3Read``).
    """
    if is_s3(url):
        return ResumableS3Read(url)
    path = local_path(url)
    try:
        return open(path, "rb")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no file at {url}") from err


class ResumableS3Read(io.RawIOBase):
    """A streaming GET that survives the connection dropping mid-object: it reopens the object
    from the byte it had reached (an HTTP Range request) up to ``MAX_REOPENS`` times, then fails
    naming the URL. Errors before the first byte (no bucket, no key, access denied) fail at once;
    transient ones were already retried by botocore."""

    MAX_REOPENS = 5

    def __init__(self, url: str):
        self.url, self.pos, self.reopens = url, 0, 0
        self.bucket, self.key = split_s3(url)
        self.body = self._get()

    def _get(self):
        from botocore.exceptions import BotoCoreError, ClientError

        extra = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        try:
            return s3_client().get_object(Bucket=self.bucket, Key=self.key, **extra)["Body"]
        except (ClientError, BotoCoreError) as err:
            raise _s3_error(self.url, err) from err

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        while True:
            try:
                data = self.body.read(len(buffer))
                break
            except (BotoCoreError, HTTPError, ConnectionError, TimeoutError) as err:
                self.reopens += 1
                if self.reopens > self.MAX_REOPENS:
                    raise OSError(f"reading {self.url} failed {self.reopens} times mid-stream, last at byte "
                                  f"{self.pos}: {err}") from err
                self.body.close()
                self.body = self._get()
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.body.close()
        super().close()


def read_bytes(url: str) -> bytes:
    """The whole content of ``url``."""
    with open_read(url) as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` atomically (readers never see a half-written file)."""
    if is_s3(url):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(url)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        except (ClientError, BotoCoreError) as err:
            raise _s3_error(url, err) from err
        return
    path = local_path(url)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; data files are meant to be shared
    os.replace(tmp, path)


def exists(url: str) -> bool:
    """Whether a file / object exists at ``url``."""
    if is_s3(url):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(url)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise _s3_error(url, err) from err
    return os.path.exists(local_path(url))


def list_files(url: str) -> list[str]:
    """Sorted names (not full URLs) of the files directly under the folder/prefix ``url``."""
    if is_s3(url):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = split_s3(url)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        names = []
        try:
            pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
            for page in pages:
                names += [obj["Key"][len(prefix):] for obj in page.get("Contents", [])]
        except (ClientError, BotoCoreError) as err:
            raise _s3_error(url, err) from err
        return sorted(names)
    path = local_path(url)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no folder at {url}")
    return sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))


def sha256_of(url: str) -> str:
    """Hex sha256 of the bytes at ``url``, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open_read(url) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def upload_file(local_file: str, url: str) -> None:
    """Copy a local file to ``url`` (multipart upload for s3, atomic rename for local)."""
    if is_s3(url):
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(url)
        try:
            s3_client().upload_file(os.fspath(local_file), bucket, key)
        except (ClientError, BotoCoreError, S3UploadFailedError) as err:
            raise _s3_error(url, err) from err
        return
    path = local_path(url)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    os.close(fd)
    shutil.copyfile(local_file, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
