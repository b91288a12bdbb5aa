"""Shared fixtures: a real S3 endpoint (moto on loopback) and a real local Ray cluster.

Fixtures:
  s3_server     (session)  endpoint URL of a ThreadedMotoServer; sets the AWS_* variables.
  s3_bucket     (function) "s3://<fresh bucket>" on that server.
  s3_storage    (function) a cineray Storage rooted at s3_bucket.
  local_storage (function) a cineray Storage rooted at a fresh tmp directory.
  ray_cluster   (session)  a local Ray (2 CPUs, no dashboard) whose workers see the S3 endpoint.
"""

from __future__ import annotations

import os
import uuid

import pytest

# Dummy credentials for moto; real credentials in the caller's environment are never used.
_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server():
    """Start moto's S3 server on a free loopback port; yield its endpoint URL.

    The AWS_* variables (endpoint included) are set for the whole session so that s3fs, pyarrow,
    boto3 and Ray workers started afterwards all talk to this server.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**_S3_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(key, value)
        # Never let a proxy from the environment intercept loopback traffic.
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        mp.setenv("no_proxy", "127.0.0.1,localhost")
        yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the moto server, as "s3://<name>"."""
    import boto3

    name = f"cineray-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture
def s3_storage(s3_server, s3_bucket):
    """A Storage whose root is a fresh bucket on the moto server."""
    from cineray.storage import Storage, StorageConfig

    return Storage(StorageConfig(root=s3_bucket, endpoint_url=s3_server))


@pytest.fixture
def local_storage(tmp_path):
    """A Storage whose root is a fresh local directory."""
    from cineray.storage import Storage, StorageConfig

    return Storage(StorageConfig(root=str(tmp_path / "data")))


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A real local Ray cluster (2 CPUs) for the session; yields the ray module.

    Depends on s3_server so the S3 variables are in the environment before ray.init(): the raylet
    and its workers inherit them, and runtime_env passes them on explicitly as well.
    """
    import ray

    env_vars = {k: os.environ[k] for k in (*_S3_ENV, "AWS_ENDPOINT_URL", "NO_PROXY", "no_proxy")}
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=1 << 30,
        runtime_env={"env_vars": env_vars},
        logging_level="WARNING",
    )
    yield ray
    ray.shutdown()
