"""storage, shards and stream against a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

import os

import pytest

from pipeline.data import storage
from pipeline.data.shards import read_manifest, shard_urls, verify_shards, write_shards
from pipeline.data.stream import ShardStream

try:
    from tests.data_fixtures import synth_dir  # noqa: F401
except ImportError:
    from data_fixtures import synth_dir  # noqa: F401

BUCKET = "vaepipe-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 (free port) with dummy credentials in the environment."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(key, raising=False)
        storage.s3_client().create_bucket(Bucket=BUCKET)
        try:
            yield endpoint
        finally:
            server.stop()


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
