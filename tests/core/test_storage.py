"""Storage against a local directory and a real S3 endpoint (moto on loopback)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cineray.storage import Storage, StorageConfig


@pytest.fixture(params=["local", "s3"])
def storage(request) -> Storage:
    return request.getfixturevalue(f"{request.param}_storage")


def test_write_read_exists(storage):
    uri = storage.write_bytes("a/b/c.bin", b"hello")
    assert uri == storage.join("a", "b", "c.bin")
    assert storage.exists(uri) and storage.exists("a/b/c.bin")
    assert storage.read_bytes("a/b/c.bin") == b"hello"
    storage.write_bytes(uri, b"again")  # overwrite
    assert storage.read_bytes(uri) == b"again"
    assert not storage.exists("a/b/missing.bin")


def test_read_missing_names_the_uri(storage):
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        storage.read_bytes("missing.bin")


def test_ls_lists_absolute_uris(storage):
    for name in ("x/2.txt", "x/1.txt", "x/sub/3.txt"):
        storage.write_bytes(name, name.encode())
    listed = storage.ls("x")
    assert listed == sorted(
        [storage.join("x", "1.txt"), storage.join("x", "2.txt"), storage.join("x", "sub")]
    )
    assert storage.read_bytes(listed[0]) == b"x/1.txt"
    storage.rm("x", recursive=True)
    assert not storage.exists("x/1.txt")


def test_open_write_and_read(storage):
    with storage.open("doc/t.txt", "w") as f:
        f.write("line 1\n")
        f.write("line 2\n")
    with storage.open("doc/t.txt", "r") as f:
        assert f.read() == "line 1\nline 2\n"
    with storage.open("doc/b.bin", "wb") as f:
        f.write(b"\x00" * 1000)
    with storage.open("doc/b.bin") as f:
        assert f.read() == b"\x00" * 1000


def test_failed_writer_leaves_nothing(storage):
    """An exception mid-write never leaves a (partial) file under the final name."""
    with pytest.raises(RuntimeError, match="killed"):
        with storage.open("k/clip.mp4", "wb") as f:
            f.write(b"partial data")
            raise RuntimeError("killed mid-write")
    assert not storage.exists("k/clip.mp4")
    # An earlier complete version survives a failed overwrite untouched.
    storage.write_bytes("k/clip.mp4", b"complete")
    with pytest.raises(RuntimeError):
        with storage.open("k/clip.mp4", "wb") as f:
            f.write(b"par")
            raise RuntimeError("killed")
    assert storage.read_bytes("k/clip.mp4") == b"complete"
    assert storage.ls("k") == [storage.join("k", "clip.mp4")]  # no temp files left


def test_write_bytes_failure_leaves_nothing(storage):
    class Exploding:
        def __bytes__(self):
            raise RuntimeError("killed")

        def __len__(self):
            return 10

    with pytest.raises((RuntimeError, TypeError)):
        storage.write_bytes("w/x.bin", Exploding())
    assert not storage.exists("w/x.bin")


def test_pyarrow_fs_parquet_round_trip(storage):
    table = pa.table({"clip_id": ["a", "b"], "seed": pa.array([1, 2], pa.int64())})
    fs, path = storage.pyarrow_fs(storage.join("pq", "index.parquet"))
    storage.write_bytes("pq/placeholder", b"")  # S3 has no directories; local needs the parent
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert storage.exists("pq/index.parquet")


def test_storage_pickles(storage):
    clone = pickle.loads(pickle.dumps(storage))
    storage.write_bytes("p.bin", b"1")
    assert clone.read_bytes("p.bin") == b"1"


def test_resolve_and_join(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Storage()  # default root: cineray-data/ in the current directory
    assert s.root == str(tmp_path / "cineray-data")
    assert s.resolve("a/b") == str(tmp_path / "cineray-data" / "a" / "b")
    assert s.resolve("/abs/x") == "/abs/x"
    assert s.resolve(f"file://{tmp_path}/y") == str(tmp_path / "y")
    assert s.resolve("s3://bucket/k") == "s3://bucket/k"
    assert s.join("s3://bucket/pre/", "/clips/", "a.mp4") == "s3://bucket/pre/clips/a.mp4"
    assert s.join("out", "clips") == os.path.join(s.root, "out", "clips")
    s3 = Storage(StorageConfig(root="s3://bucket/prefix/"))
    assert s3.resolve("clips/a.mp4") == "s3://bucket/prefix/clips/a.mp4"
    assert s3.resolve("/tmp/x") == "/tmp/x"


def test_unsupported_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="gs://b.*s3://"):
        Storage(StorageConfig(root="gs://b"))
    with pytest.raises(ValueError, match="unsupported mode"):
        Storage().open("x", "ab")


def test_s3_settings_come_from_config(s3_server, s3_bucket, monkeypatch):
    """Explicit endpoint and credentials in StorageConfig work without any AWS_* variable."""
    for var in (
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    ):
        monkeypatch.delenv(var, raising=False)
    s = Storage(
        StorageConfig(
            root=s3_bucket, endpoint_url=s3_server, key="k", secret="s", region="us-east-1"
        )
    )
    s.write_bytes("cfg.bin", b"ok")
    assert s.read_bytes("cfg.bin") == b"ok"


def test_ray_workers_reach_s3(ray_cluster, s3_storage):
    """A Storage shipped to a Ray task reads and writes the same bucket."""
    s3_storage.write_bytes("from-driver.txt", b"driver")

    @ray_cluster.remote
    def roundtrip(storage):
        storage.write_bytes("from-worker.txt", storage.read_bytes("from-driver.txt") + b"+worker")
        return os.environ.get("AWS_ENDPOINT_URL")

    endpoint = ray_cluster.get(roundtrip.remote(s3_storage))
    assert endpoint == os.environ["AWS_ENDPOINT_URL"]
    assert s3_storage.read_bytes("from-worker.txt") == b"driver+worker"


_KILLED_WRITER = """
import sys, time
from cineray.storage import Storage, StorageConfig
storage = Storage(StorageConfig(root=sys.argv[1]))
with storage.open("killed/clip.mp4", "wb") as f:
    f.write(b"x" * 100_000)
    f.flush()
    print("writing", flush=True)
    time.sleep(120)
"""


def test_killed_writer_process_leaves_nothing(storage):
    """A writer process killed (SIGKILL) mid-write leaves no file under the final name."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, storage.root], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()
        proc.wait()
    assert not storage.exists("killed/clip.mp4")
