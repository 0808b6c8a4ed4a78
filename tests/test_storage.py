"""The URI helper and atomic publishing, on local files and on a real S3 endpoint."""

import os

import pyarrow.fs as pafs
import pytest

from sdm import storage
from sdm.errors import StorageError


def test_round_trip_is_byte_exact(store):
    data = os.urandom(3 * 2**20 + 17)
    uri = storage.join(store, "a", "b.bin")
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    assert storage.exists(uri) and not storage.exists(storage.join(store, "a", "nope.bin"))
    assert storage.list_files(storage.join(store, "a")) == ["b.bin"]
    storage.delete(uri)
    assert not storage.exists(uri)


def test_s3_uses_the_standard_aws_variables(s3_env, s3_server):
    fs, path = storage.resolve(s3_env + "/x/y")
    assert isinstance(fs, pafs.S3FileSystem) and path == s3_env[len("s3://") :] + "/x/y"
    storage.write_bytes(s3_env + "/x/y", b"hello")
    import boto3

    body = boto3.client("s3", endpoint_url=s3_server).get_object(Bucket=path.split("/")[0], Key="x/y")["Body"].read()
    assert body == b"hello"


def test_local_paths_and_file_uris_are_the_same_place(tmp_path):
    storage.write_bytes(f"file://{tmp_path}/f.txt", b"1")
    assert (tmp_path / "f.txt").read_bytes() == b"1"
    assert storage.resolve(str(tmp_path / "f.txt"))[1] == str(tmp_path / "f.txt")


def test_a_failed_local_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    uri = str(tmp_path / "card.json")
    storage.write_bytes(uri, b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(StorageError, match="cannot write"):
        storage.write_bytes(uri, b"new")
    assert (tmp_path / "card.json").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["card.json"]


def test_errors_name_the_uri(tmp_path):
    with pytest.raises(StorageError, match="no such file: .*missing.bin"):
        storage.read_bytes(str(tmp_path / "missing.bin"))
    with pytest.raises(StorageError, match="unsupported URI scheme in 'gs://b/x'"):
        storage.resolve("gs://b/x")
    with pytest.raises(StorageError, match="names no bucket"):
        storage.resolve("s3://")


def test_jobs_hand_ray_workers_absolute_local_paths(tmp_path, monkeypatch):
    """Ray Train runs its workers in their trial directory: a relative run URI would land there."""
    from jobs import evaluate, generate, train

    monkeypatch.chdir(tmp_path)
    assert storage.absolute("runs/r1") == str(tmp_path / "runs/r1")
    assert storage.absolute("s3://b/runs/r1") == "s3://b/runs/r1" and storage.absolute("file:///x/y") == "file:///x/y"
    t = train.parse_args(["--preset", "tiny", "--data", "d", "--run", "r", "--steps", "1"])
    assert (t.data, t.run, t.init_from) == (str(tmp_path / "d"), str(tmp_path / "r"), None)
    g = generate.parse_args(["--model", "m", "--labels", "s3://b/l", "--out", "o"])
    assert (g.model, g.labels, g.out) == (str(tmp_path / "m"), "s3://b/l", str(tmp_path / "o"))
    e = evaluate.parse_args(["--real", "r", "--generated", "g", "--out", "o", "--segmenter", "pkg.mod:fn"])
    assert (e.real, e.generated, e.segmenter) == (str(tmp_path / "r"), str(tmp_path / "g"), "pkg.mod:fn")
