"""The batch render job: row validation, the stage chain against the one-process reference, and
Ray jobs on a head started with `ray start --head` writing to an S3 endpoint (moto), killed part
way and re-run."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cineray.cli import app
from cineray.config import load_config
from cineray.jobs import batch_stages as st
from cineray.jobs.batch_render import INPUT_SCHEMA
from cineray.jobs.batch_rows import check_row, marker_uri, read_rows
from cineray.pipelines.provenance import detect_mp4
from cineray.storage import Storage, StorageConfig
from cineray.video import read_mp4

BLOCKED = "some porn video"  # a denylist term (pipelines/safety_terms.txt, category "sexual")
SHAPES, COLOURS = ("circle", "square", "triangle", "diamond"), ("red", "green", "blue", "yellow")


def _prompts(n: int) -> list[dict]:
    return [{"prompt": f"a {COLOURS[i % 4]} {SHAPES[i // 4 % 4]} falling"} for i in range(n)]


def _write_jsonl(storage: Storage, uri: str, rows: list) -> str:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    return storage.write_bytes(uri, ("\n".join(lines) + "\n").encode())


def _checked(storage, uri, out, overrides=()):
    cfg = load_config("tiny", ["batch.steps=2", *overrides]).batch
    return [check_row(r, cfg, storage, out) for r in read_rows(storage, uri)]


# ---------------------------------------------------------------------------------------------
# Rows (no Ray)
# ---------------------------------------------------------------------------------------------


def test_invalid_and_blocked_rows_are_reported_with_the_field(local_storage):
    uri = _write_jsonl(local_storage, "in/p.jsonl", [
        {"prompt": "a red circle falling", "id": "ok-1", "seed": 5, "frames": 9.0},
        {"prompt": BLOCKED},
        {"prompt": "a blue square", "camera": "warp"},
        {"prompt": "a blue square", "sed": 3},
        {"prompt": "   "},
        "not json",
        "[1, 2]",
        {"prompt": "a green star", "id": "ok-1"},
        {"prompt": "a green star", "id": "../x"},
        {"prompt": "a green star", "steps": 0},
        {"prompt": "a green star", "image": "in/missing.png"},
        {"prompt": "a green star", "upscale": "huge"},
    ])  # fmt: skip
    got = _checked(local_storage, uri, local_storage.resolve("out"))
    rows = [r for r, _ in got]
    assert [r["status"] for r in rows] == ["pending", "blocked"] + ["failed"] * 10
    assert rows[0]["row_id"] == "ok-1" and rows[2]["row_id"] == "r000002"
    assert got[0][1].seed == 5 and got[0][1].frames == 9 and got[0][1].steps == 2
    assert rows[1]["reason"] == "sexual" and got[1][1] is None
    reasons = [r["reason"] for r in rows[2:]]
    for reason, word in zip(reasons, ["camera 'warp'", "unknown field 'sed'", "prompt is missing",
                                      "line 6 is not valid JSON", "line 7 must be a JSON object",
                                      "appears twice", "'../x'", "steps must be",
                                      "missing.png", "upscale must be"], strict=True):
        assert word in reason, (word, reason)


def test_parquet_rows_seed_default_is_stable_and_done_rows_are_skipped(local_storage):
    table = pa.table({"prompt": ["a red circle", "a blue square"], "seed": [7.0, None],
                      "frames": [17, None]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    uri = local_storage.write_bytes("in/p.parquet", buf.getvalue())
    out = local_storage.resolve("out")
    first = _checked(local_storage, uri, out)
    assert [r["status"] for r, _ in first] == ["pending", "pending"]
    assert first[0][1].seed == 7 and first[0][1].frames == 17
    again = _checked(local_storage, uri, out)
    assert [r["uri"] for r, _ in again] == [r["uri"] for r, _ in first]  # deterministic keys
    assert again[1][1].seed == first[1][1].seed  # the derived seed is stable
    other = _checked(local_storage, uri, out, ["batch.seed=1"])
    assert other[1][1].seed != first[1][1].seed and other[1][0]["uri"] != first[1][0]["uri"]
    local_storage.write_bytes(first[0][0]["uri"], b"committed")
    local_storage.write_bytes(marker_uri(local_storage, out, "r000000"),
                              json.dumps({"watermark_payload": "abcd", "frames": 17}).encode())
    rows = st.CheckRows(load_config("tiny", ["batch.steps=2", f"storage.root={out}"]), out)(
        _input(read_rows(local_storage, uri))).to_pylist()
    assert [(r["status"], r["resumed"]) for r in rows] == [("done", True), ("pending", False)]
    assert rows[0]["watermark_payload"] == "abcd" and rows[0]["state"] is None


def test_image_rows_load_the_first_frame_through_storage(local_storage):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, format="PNG")
    image = local_storage.write_bytes("in/first.png", buf.getvalue())
    uri = _write_jsonl(local_storage, "in/p.jsonl", [{"prompt": "a red circle", "image": image}])
    (row, request), = _checked(local_storage, uri, local_storage.resolve("out"))
    assert row["status"] == "pending" and request.image.shape == (32, 32, 3)
    assert tuple(request.image[16, 16]) == (200, 10, 10)  # centre-cropped and resized


def _input(rows) -> pa.Table:
    items = [{"row_id": r["row_id"], "raw": None if r["raw"] is None else json.dumps(r["raw"]),
              "error": r["error"]} for r in rows]
    return pa.Table.from_pylist(items, schema=INPUT_SCHEMA)


# ---------------------------------------------------------------------------------------------
# The stage chain in one process (the same classes the actor pools run)
# ---------------------------------------------------------------------------------------------


def test_stage_chain_equals_generate_and_package_writes_once(local_storage):
    from cineray.pipelines.generate import generate
    from cineray.pipelines.stages import Components

    components = Components.load()
    out = local_storage.resolve("out")
    config = load_config("tiny", ["batch.steps=2", f"storage.root={out}"])
    uri = _write_jsonl(local_storage, "in/p.jsonl", [
        {"prompt": "a red circle falling", "frames": 33, "upscale": "spatial", "seed": 4},
        {"prompt": BLOCKED}, {"prompt": "a blue square", "fps": -1},
    ])  # fmt: skip
    table = st.CheckRows(config, out)(_input(read_rows(local_storage, uri)))
    for stage in (st.TextEncode, st.Denoise, st.Decode, st.Upscale):
        table = stage(config, out, components=components)(table)
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["pending", "blocked", "failed"]
    assert "fps must be" in rows[2]["reason"]
    import pickle

    state = pickle.loads(rows[0]["state"])
    reference = generate(components, state["request"])  # keyframe pass + 3 joint windows + x2
    assert state["frames"].shape == (33, 64, 64, 3)
    np.testing.assert_array_equal(state["frames"], reference.frames)

    package = st.Package(config, out)
    done = package(table).to_pylist()[0]
    assert done["status"] == "done" and not done["resumed"]
    path = Path(done["uri"])
    frames, fps = read_mp4(path.read_bytes())
    assert frames.shape == (33, 64, 64, 3) and fps == 8.0
    assert str(detect_mp4(path.read_bytes()).payload) == done["watermark_payload"]
    record = json.loads(local_storage.read_bytes(marker_uri(local_storage, out, done["row_id"])))
    assert record["watermark_payload"] == done["watermark_payload"]
    assert set(record["timings"]) >= {"encode_text", "denoise", "decode", "upscale"}
    before = path.stat().st_mtime_ns
    retried = package(table).to_pylist()[0]  # a retried task after the commit: no rewrite
    assert retried["status"] == "done" and retried["resumed"]
    assert path.stat().st_mtime_ns == before
    local_storage.rm(marker_uri(local_storage, out, done["row_id"]))  # killed before the record
    again = st.CheckRows(config, out)(_input(read_rows(local_storage, uri))).to_pylist()[0]
    assert again["status"] == "done" and again["watermark_payload"] == done["watermark_payload"]
    assert local_storage.exists(marker_uri(local_storage, out, done["row_id"]))


# ---------------------------------------------------------------------------------------------
# Ray jobs on a `ray start --head` cluster, S3 on moto
# ---------------------------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _start_head(temp: str) -> tuple[subprocess.Popen, str]:
    """`ray start --head` on free loopback ports; its output goes to temp/head.log."""
    gcs, dash, node, obj, client, agent, grpc, metrics, renv, w0 = _free_ports(10)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # loopback test cluster (see NOTES)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--node-manager-port={node}", f"--object-manager-port={obj}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={renv}", f"--min-worker-port={w0 % 20000 + 30000}",
           f"--max-worker-port={w0 % 20000 + 30200}", "--object-store-memory=400000000",
           f"--temp-dir={temp}"]  # fmt: skip
    with open(Path(temp) / "head.log", "ab") as log:
        head = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log,
                                stderr=subprocess.STDOUT)
    return head, f"http://127.0.0.1:{dash}"


def _log(temp: str) -> str:
    return "its log:\n" + (Path(temp) / "head.log").read_text(errors="replace")[-3000:]


def _stop_head(head: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if head.poll() is None:
            os.killpg(head.pid, sig)
            try:
                head.wait(wait)
            except subprocess.TimeoutExpired:
                pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # Ray processes left in the group
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def ray_head(s3_server):
    """A Ray head (2 CPUs, dashboard for job submission) in its own process group on free
    loopback ports and its own temp dir; yields the dashboard URL. Stopped by signalling its
    process group (`ray stop` would stop every Ray on the machine). A head that exits while
    starting (another process took one of its ports between the probe and `ray start`) is
    started again on new ports, up to 3 times; its log is in the error."""
    from ray.job_submission import JobSubmissionClient

    temp = tempfile.mkdtemp(prefix="crb", dir="/tmp")  # short: Ray's socket paths have a limit
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    head = None
    try:
        for attempt in range(3):
            head, address = _start_head(temp)
            deadline = time.time() + 300
            while head.poll() is None:  # ready when it runs a job (the dashboard answers first)
                try:
                    probe = JobSubmissionClient(address).submit_job(entrypoint="true")
                    break
                except Exception:
                    if time.time() > deadline:
                        raise RuntimeError(f"ray head did not answer in 300 s; {_log(temp)}") from None
                    time.sleep(1)
            if head.poll() is None:
                break
            _stop_head(head)
            if attempt == 2:
                raise RuntimeError(f"ray head exited ({head.poll()}) 3 times; {_log(temp)}")
        _wait(address, probe)
        yield address
    finally:
        if head is not None:
            _stop_head(head)
        os.environ.pop("RAY_AUTH_MODE") if old is None else os.environ.update(RAY_AUTH_MODE=old)
        shutil.rmtree(temp, ignore_errors=True)  # the head's logs and sockets


def _wait(address: str, job: str, timeout: float = 600) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client, deadline = JobSubmissionClient(address), time.time() + timeout
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                         JobStatus.STOPPED):
        assert time.time() < deadline, f"job {job} still {status} after {timeout} s"
        time.sleep(1)
    if status != JobStatus.SUCCEEDED:
        pytest.fail(f"job {job} {status}:\n{client.get_job_logs(job)[-4000:]}")
    return client.get_job_logs(job)


def _objects(s3_server, bucket: str, prefix: str) -> dict[str, tuple[str, object]]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket.removeprefix("s3://"),
                                                         Prefix=prefix)
    return {o["Key"]: (o["ETag"], o["LastModified"]) for p in pages for o in p.get("Contents", [])}


def _manifest(storage: Storage, out: str) -> list[dict]:
    return pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/manifest.parquet"))).to_pylist()


def _check_videos(storage, manifest, s3_server, bucket, out) -> None:
    """Exactly one valid, watermarked MP4 per done row, and nothing else under videos/."""
    done = [r for r in manifest if r["status"] == "done"]
    keys = set(_objects(s3_server, bucket, f"{out.split('/', 3)[3]}/videos/"))
    assert keys == {r["uri"].split("/", 3)[3] for r in done}
    for row in done:
        data = storage.read_bytes(row["uri"])
        frames, fps = read_mp4(data)
        assert frames.shape == (row["frames"], *frames.shape[1:]) and fps == row["fps"]
        assert str(detect_mp4(data).payload) == row["watermark_payload"]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_batch_submitted_as_ray_job_writes_every_mp4_and_manifest_to_s3(
        ray_head, s3_server, s3_bucket):  # fmt: skip
    storage = Storage(StorageConfig(root=s3_bucket, endpoint_url=s3_server))
    rows = _prompts(12)
    rows[1].update(frames=9, camera="pan_left", seed=11)
    rows[2].update(upscale="spatial", negative_prompt="blurry", guidance=3.0)
    rows[3].update(steps=1, fps=16, focal_length_mm=24)
    rows += [{"prompt": BLOCKED}, {"prompt": "a red circle", "frames": 0}]
    import pandas as pd

    table = pa.Table.from_pandas(pd.DataFrame(rows))  # absent: NaN, int columns become floats
    buf = io.BytesIO()
    pq.write_table(table, buf)
    prompts = storage.write_bytes("in/prompts.parquet", buf.getvalue())
    out = f"{s3_bucket}/run1"
    runner = CliRunner()
    result = runner.invoke(app, ["submit", "batch", "--prompts", prompts, "--out", out,
                                 "--address", ray_head, "--set", "batch.steps=2",
                                 "--set", "batch.denoise.max=1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    job = result.output.strip().splitlines()[-1]
    logs = _wait(ray_head, job)
    assert "Total Progress" in logs or "Running Dataset" in logs  # Ray Data's progress
    status = runner.invoke(app, ["status", job, "--address", ray_head])
    assert "SUCCEEDED" in status.output
    assert "batch: 14 rows: 12 done (12 rendered now), 1 blocked, 1 failed" in status.output
    manifest = _manifest(storage, out)
    assert [r["row_id"] for r in manifest] == [f"r{i:06d}" for i in range(14)]
    assert [r["status"] for r in manifest] == ["done"] * 12 + ["blocked", "failed"]
    assert manifest[12]["reason"] == "sexual" and "frames must be" in manifest[13]["reason"]
    assert manifest[1]["frames"] == 9 and manifest[1]["seed"] == 11
    assert manifest[3]["fps"] == 16.0
    assert all(json.loads(r["timings"])["denoise"] > 0 for r in manifest[:12])
    _check_videos(storage, manifest, s3_server, s3_bucket, out)
    assert read_mp4(storage.read_bytes(manifest[2]["uri"]))[0].shape[1:3] == (64, 64)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_killed_job_rerun_renders_each_row_exactly_once(ray_head, s3_server, s3_bucket):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from cineray.jobs.batch_submit import submit_batch

    storage = Storage(StorageConfig(root=s3_bucket, endpoint_url=s3_server))
    rows = [*_prompts(12), {"prompt": BLOCKED}, "{broken"]
    prompts = _write_jsonl(storage, "in/prompts.jsonl", rows)
    out, prefix = f"{s3_bucket}/run2", "run2/videos/"
    sets = ["batch.steps=4", "batch.denoise.max=1"]  # slow enough to stop part way
    client = JobSubmissionClient(ray_head)
    first = submit_batch(prompts, out, "tiny", sets, ray_head)
    deadline = time.time() + 600
    while len(_objects(s3_server, s3_bucket, prefix)) < 3:
        status = client.get_job_status(first)
        assert status in (JobStatus.PENDING, JobStatus.RUNNING), client.get_job_logs(first)
        assert time.time() < deadline, "no MP4 appeared"
        time.sleep(0.2)
    client.stop_job(first)  # killed part way
    while client.get_job_status(first) not in (JobStatus.STOPPED, JobStatus.FAILED):
        time.sleep(0.5)
    time.sleep(3)  # let any in-flight write of the killed job land or die
    committed = _objects(s3_server, s3_bucket, prefix)
    assert 3 <= len(committed) < 12, "the kill did not land part way"

    second = submit_batch(prompts, out, "tiny", sets, ray_head)
    logs = _wait(ray_head, second)
    manifest = _manifest(storage, out)
    assert [r["status"] for r in manifest] == ["done"] * 12 + ["blocked", "failed"]
    _check_videos(storage, manifest, s3_server, s3_bucket, out)
    after = _objects(s3_server, s3_bucket, prefix)
    assert {k: after[k] for k in committed} == committed  # never rewritten
    resumed = {r["uri"].split("/", 3)[3] for r in manifest if r["resumed"]}
    assert resumed == set(committed)
    assert f"12 done ({12 - len(committed)} rendered now), 1 blocked, 1 failed" in logs
