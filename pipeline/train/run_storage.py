"""Run folders and checkpoints on a local disk or S3, read and written through ``pyarrow.fs``:
the filesystem Ray Train itself persists checkpoints with.

A location is a ``Path`` (local folder, or a ``file://`` URL made one) or an ``s3://`` URL
string; every function here takes either, so the checkpoint logic has one code path. The S3
filesystem is built from the same standard AWS variables boto3 reads for the data
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for MinIO, Ceph or moto, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, ``AWS_MAX_ATTEMPTS``); credentials come from the AWS SDK's own chain
on each node and are never put into the filesystem object (Ray ships it to every worker).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

from pipeline.data import storage

Location = Union[Path, str]


def location(url_or_path: Union[str, os.PathLike]) -> Location:
    """An ``s3://`` URL stays a string; a local path or ``file://`` URL becomes a ``Path``."""
    text = os.fspath(url_or_path)
    return text.rstrip("/") if storage.is_s3(text) else Path(storage.local_path(text))


def is_remote(loc: Location) -> bool:
    return isinstance(loc, str) and storage.is_s3(loc)


def child(loc: Location, name: str) -> Location:
    return storage.join(loc, name) if is_remote(loc) else Path(loc) / name


def s3_filesystem():
    """A ``pyarrow.fs.S3FileSystem`` on the endpoint, region and retry budget of the environment."""
    from pyarrow import fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    retries = fs.AwsStandardS3RetryStrategy(max_attempts=int(os.environ.get("AWS_MAX_ATTEMPTS", "5")))
    return fs.S3FileSystem(endpoint_override=endpoint, region=region, retry_strategy=retries,
                           connect_timeout=10, request_timeout=60)


def _fs_path(url: str) -> str:
    bucket, key = storage.split_s3(url)
    return f"{bucket}/{key}".rstrip("/")


def ray_storage(storage_path: str) -> tuple[str, Optional[object]]:
    """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig``: an ``s3://`` path goes in
    prefix-stripped with our S3 filesystem (so a custom endpoint reaches Ray's uploads too)."""
    if storage.is_s3(storage_path):
        return _fs_path(storage_path), s3_filesystem()
    return storage_path, None


def checkpoint_location(checkpoint) -> Optional[Location]:
    """Where a Ray ``Checkpoint`` lives, as a location (no download); None for other filesystems."""
    from pyarrow import fs

    if isinstance(checkpoint.filesystem, fs.LocalFileSystem):
        return Path(checkpoint.path)
    if checkpoint.filesystem.type_name == "s3":
        return "s3://" + checkpoint.path.lstrip("/")
    return None


def check_bucket(url: str) -> Optional[str]:
    """None when the bucket of ``url`` exists and can be listed, else why not."""
    from pyarrow import fs

    bucket, _ = storage.split_s3(url)
    try:
        found = s3_filesystem().get_file_info(bucket).type != fs.FileType.NotFound
    except OSError as exc:
        return f"the bucket {bucket} could not be reached: {exc}"
    return None if found else f"the bucket {bucket} does not exist: create it first"


def exists(loc: Location) -> bool:
    """A file, or a folder (an S3 prefix with at least one object under it)."""
    if not is_remote(loc):
        return Path(loc).exists()
    from pyarrow import fs

    return s3_filesystem().get_file_info(_fs_path(loc)).type != fs.FileType.NotFound


def read_text(loc: Location) -> str:
    if not is_remote(loc):
        return Path(loc).read_text()
    try:
        with s3_filesystem().open_input_stream(_fs_path(loc)) as f:
            return f.read().decode()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no object at {loc}") from exc


def file_sizes(folder: Location) -> dict[str, int]:
    """``{path relative to folder: size}`` of every file under ``folder`` (one listing on S3)."""
    if not is_remote(folder):
        root = Path(folder)
        return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    from pyarrow import fs

    base = _fs_path(folder)
    selector = fs.FileSelector(base, recursive=True, allow_not_found=True)
    return {i.path[len(base) + 1:]: i.size for i in s3_filesystem().get_file_info(selector) if i.is_file}


def find_folders(root: Location, pattern: str, recursive: bool) -> list[Location]:
    """Folders directly (or, ``recursive``, anywhere) under ``root`` whose name matches ``pattern``."""
    if not is_remote(root):
        found = Path(root).glob(("**/" if recursive else "") + pattern)
        return [p for p in found if p.is_dir()]
    from pyarrow import fs

    selector = fs.FileSelector(_fs_path(root), recursive=recursive, allow_not_found=True)
    infos = s3_filesystem().get_file_info(selector)
    return sorted("s3://" + i.path for i in infos if i.type == fs.FileType.Directory
                  and fnmatch.fnmatch(i.base_name, pattern))


def download(url: str, local: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy the S3 folder ``url`` into ``local``, leaving out top-level entries named in ``skip``."""
    s3 = s3_filesystem()
    base = _fs_path(url)
    for rel, _ in file_sizes(url).items():
        if rel.split("/", 1)[0] in skip:
            continue
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with s3.open_input_stream(f"{base}/{rel}") as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)


def upload(local: Path, dest: Location) -> None:
    """Copy the local folder ``local`` to the folder ``dest`` (on S3, or another local folder)."""
    from pyarrow import fs

    if not is_remote(dest):
        shutil.copytree(local, dest)
        return
    fs.copy_files(str(local), _fs_path(dest), source_filesystem=fs.LocalFileSystem(),
                  destination_filesystem=s3_filesystem())


def remove(loc: Location) -> None:
    """Delete the folder ``loc`` and everything under it."""
    if not is_remote(loc):
        shutil.rmtree(loc)
        return
    s3_filesystem().delete_dir(_fs_path(loc))


@contextlib.contextmanager
def local_copy(loc: Location, skip: tuple[str, ...] = ()) -> Iterator[Path]:
    """A local folder with ``loc``'s files: ``loc`` itself, or a temporary download removed after."""
    if not is_remote(loc):
        yield Path(loc)
        return
    with tempfile.TemporaryDirectory(prefix="vaepipe-ckpt-") as tmp:
        download(loc, Path(tmp), skip)
        yield Path(tmp)
