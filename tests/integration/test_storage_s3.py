"""storage, shards and stream against a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

import os

import pytest

from conftest import BUCKET
from pipeline.data import storage
from pipeline.data.shards import read_manifest, shard_urls, verify_shards, write_shards
from pipeline.data.stream import ShardStream

try:
    from tests.data_fixtures import synth_dir  # noqa: F401
except ImportError:
    from data_fixtures import synth_dir  # noqa: F401


def test_boto3_takes_endpoint_from_environment(s3_endpoint):
    assert storage.s3_client().meta.endpoint_url == s3_endpoint


def test_storage_round_trip(s3_endpoint, tmp_path):
    base = f"s3://{BUCKET}/io"
    url = storage.join(base, "a.bin")
    assert url == f"s3://{BUCKET}/io/a.bin" and storage.is_s3(url) and not storage.exists(url)
    storage.write_bytes(url, b"hello")
    assert storage.exists(url) and storage.read_bytes(url) == b"hello"
    local = tmp_path / "b.bin"
    local.write_bytes(b"x" * 3000)
    storage.upload_file(str(local), storage.join(base, "b.bin"))
    assert storage.list_files(base) == ["a.bin", "b.bin"]
    assert storage.sha256_of(storage.join(base, "b.bin")) == storage.sha256_of(str(local))
    with pytest.raises(FileNotFoundError, match=f"s3://{BUCKET}/io/missing.bin"):
        storage.read_bytes(storage.join(base, "missing.bin"))
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket/x"):
        storage.read_bytes("s3://no-such-bucket/x")


def test_local_and_file_urls(tmp_path):
    url = f"file://{tmp_path}/sub/c.bin"
    storage.write_bytes(url, b"abc")
    assert (tmp_path / "sub" / "c.bin").read_bytes() == b"abc"
    assert storage.exists(url) and storage.list_files(f"file://{tmp_path}/sub") == ["c.bin"]
    assert storage.join(f"file://{tmp_path}/sub/", "d") == f"file://{tmp_path}/sub/d"
    with pytest.raises(FileNotFoundError, match="no file at .*missing"):
        storage.read_bytes(str(tmp_path / "missing"))


def test_shard_verify_and_stream_from_s3(s3_endpoint, synth_dir):
    url = f"s3://{BUCKET}/synth32"
    manifest = write_shards(synth_dir, url, 32, shard_size=40, workers=2, progress=False)
    assert manifest["splits"]["train"]["num_samples"] == 96
    assert read_manifest(url)["splits"] == manifest["splits"]
    assert {"manifest.json", "train-000000.tar", "valid-000000.tar"} <= set(storage.list_files(url))
    assert shard_urls(url, "train")[0] == f"{url}/train-000000.tar"
    assert all(ok for _, ok, _, _ in verify_shards(url))
    again = write_shards(synth_dir, url, 32, shard_size=40, workers=2, progress=False)
    assert again["last_run"] == {"shards_written": 0, "shards_reused": len(verify_shards(url))}
    for num_workers in (0, 1):  # in-process and in a forked DataLoader worker (its own boto3 client)
        stream = ShardStream(url, "train", 8, 16, 0, 2, num_workers=num_workers)
        batch = next(stream.iter_epoch(0))
        assert batch["image"].shape == (8, 3, 16, 16) and len(set(batch["key"])) == 8
    assert os.environ["AWS_ENDPOINT_URL"] == s3_endpoint


def _inject(event: str, handler):
    client = storage.s3_client()
    client.meta.events.register(event, handler)
    return lambda: client.meta.events.unregister(event, handler)


def test_a_503_on_get_is_retried_by_botocore(s3_endpoint):
    from botocore.awsrequest import AWSResponse

    url = f"s3://{BUCKET}/retry/obj.bin"
    storage.write_bytes(url, b"payload" * 100)
    calls = {"n": 0}

    class _Raw:
        def stream(self, **kw):
            yield b""

    def fail_twice(request, **kwargs):
        if request.method == "GET" and "retry/obj.bin" in request.url and calls["n"] < 2:
            calls["n"] += 1
            return AWSResponse(request.url, 503, {}, _Raw())  # Slow Down: botocore retries it
        return None

    remove = _inject("before-send.s3.GetObject", fail_twice)
    try:
        assert storage.read_bytes(url) == b"payload" * 100
    finally:
        remove()
    assert calls["n"] == 2


def test_a_connection_cut_mid_object_is_resumed_from_the_byte_reached(s3_endpoint):
    from urllib3.exceptions import ProtocolError

    data = bytes(range(256)) * 400
    url = f"s3://{BUCKET}/resume/shard.tar"
    storage.write_bytes(url, data)
    cuts = {"n": 0, "ranges": []}

    class CutBody:
        def __init__(self, body, cut_after):
            self.body, self.left = body, cut_after

        def read(self, n=-1):
            if self.left <= 0:
                raise ProtocolError("Connection broken: connection reset by peer")
            chunk = self.body.read(min(n, self.left) if n and n > 0 else self.left)
            self.left -= len(chunk)
            return chunk

        def close(self):
            self.body.close()

    def cut(http_response, parsed, model, **kwargs):
        if model.name == "GetObject" and cuts["n"] < 2:
            cuts["n"] += 1
            cuts["ranges"].append(http_response.headers.get("Content-Range"))
            parsed["Body"] = CutBody(parsed["Body"], 30_000)

    remove = _inject("after-call.s3.GetObject", cut)
    try:
        with storage.open_read(url) as f:
            got = f.read()
    finally:
        remove()
    assert got == data and cuts["n"] == 2
    assert cuts["ranges"][1].startswith("bytes 30000-")  # the second GET asked for the rest only


def test_permanent_errors_fail_fast_naming_the_url(s3_endpoint):
    import time

    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="bucket of s3://no-such-bucket/x.tar does not exist"):
        storage.read_bytes("s3://no-such-bucket/x.tar")
    assert time.perf_counter() - t0 < 5  # not retried
