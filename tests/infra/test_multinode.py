"""The Serve application across two Ray nodes that are separate `ray start` processes in separate
network namespaces; a render served over HTTP; the worker node stopped; the app still answering.

The deployment is `serve run` of infra/serve/local.yaml as shipped, with one change: its storage
root points at this test's temp folder (both nodes share this machine's filesystem, as nodes of
a real cluster share an S3 bucket). Every wait is bounded, and the namespaces and Ray processes are removed on
any exit (tests/infra/netns.py). The probe inside the head's namespace does the HTTP and Ray
queries (the test's own process cannot reach the namespaces).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.infra.netns import GCS_PORT, HEAD_IP, NamespaceCluster, netns_available, worker_ip

ROOT = Path(__file__).resolve().parents[2]
LOCAL_YAML = ROOT / "infra" / "serve" / "local.yaml"
TOKEN = "multinode-test-token"
# Logical CPUs per node: every replica of local.yaml (0.1 CPU each) fits on either node alone,
# so the head can take over everything the worker ran.
NODE_CPUS = 2
# Bounds for each step on a shared 2-core machine (measured: nodes up ~60 s, app ~90 s).
START_S, DEPLOY_S, RENDER_S, RECOVER_S = 240, 420, 240, 300

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _config(tmp_path: Path) -> Path:
    """local.yaml with its storage root (and nothing else) moved under tmp_path."""
    cfg = yaml.safe_load(LOCAL_YAML.read_text())
    (app,) = [a for a in cfg["applications"] if a["import_path"] == "cineray.cluster.app:build"]
    app["args"]["storage_root"] = str(tmp_path / "data")
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _render(probe, prompt: str, seed: int) -> tuple[dict, dict]:
    """POST a 2-step render, poll it to completion, fetch the MP4; (job, content reply)."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = f"http://127.0.0.1:{_port()}/v1/videos"
    body = {"prompt": prompt, "steps": 2, "seed": seed}
    r = probe.call(60, cmd="http", method="POST", url=url, json=body, headers=auth, timeout=50)
    assert r["status"] == 202, r
    job_id = yaml.safe_load(r["text"])["id"]
    deadline = time.monotonic() + RENDER_S
    while time.monotonic() < deadline:
        r = probe.call(40, cmd="http", method="GET", url=f"{url}/{job_id}", headers=auth,
                       timeout=30)
        job = yaml.safe_load(r["text"])
        if job["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(1.0)
    else:
        raise AssertionError(f"job {job_id} not finished after {RENDER_S} s: {job}")
    assert job["status"] == "completed", job
    content = probe.call(60, cmd="http", method="GET", url=f"{url}/{job_id}/content",
                         headers=auth, timeout=50)
    return job, content


def _port() -> int:
    return yaml.safe_load(LOCAL_YAML.read_text())["http_options"]["port"]


def test_app_survives_losing_a_worker_node(tmp_path):
    reason = netns_available()
    if reason:
        pytest.skip(f"needs Linux network namespaces: {reason}")
    t0, marks = time.monotonic(), {}
    env = {"CINERAY_API_TOKEN": TOKEN, "CINERAY_C2PA_DIR": str(tmp_path / "c2pa")}
    with NamespaceCluster(workers=1, env=env) as cluster:
        cluster.start_head(num_cpus=NODE_CPUS)
        cluster.wait_started("head", START_S)
        cluster.start_worker(0, num_cpus=NODE_CPUS)
        probe = cluster.start_probe("head", timeout=START_S)
        try:
            deadline = time.monotonic() + START_S
            while len(alive := probe.call(30, cmd="nodes")["alive"]) < 2:
                cluster.check_alive()
                assert time.monotonic() < deadline, f"worker never joined: {alive}\n" + \
                    cluster.log_tail("w0")
                time.sleep(1.0)
            assert alive == sorted([HEAD_IP, worker_ip(0)])
            marks["nodes_up"] = time.monotonic() - t0

            # 1. Deploy the Serve config across both nodes, the operator's way.
            serve = str(Path(sys.executable).with_name("serve"))
            cluster.run_in("head", [serve, "run", str(_config(tmp_path)), "--non-blocking",
                                    "--address", f"{HEAD_IP}:{GCS_PORT}"], timeout=DEPLOY_S)
            before = probe.call(DEPLOY_S + 30, cmd="wait_app", app="cineray", wait_s=DEPLOY_S,
                                alive_ips=alive)
            marks["app_running"] = time.monotonic() - t0
            on_worker = sorted(d for d, ips in before.items() if worker_ip(0) in ips)
            assert on_worker, f"no replica was placed on the worker node: {before}"

            # 2. A render served over HTTP while both nodes run.
            job, mp4 = _render(probe, "a red circle falling", seed=1)
            assert mp4["status"] == 200 and mp4["headers"]["content-type"] == "video/mp4"
            assert bytes.fromhex(mp4["head"])[4:8] == b"ftyp" and mp4["size"] > 1000
            marks["first_render"] = time.monotonic() - t0

            # 3. Stop the worker node; Serve replaces its replicas on the head.
            cluster.stop_worker(0)
            marks["worker_stopped"] = time.monotonic() - t0
            counts = {d: len(ips) for d, ips in before.items()}
            after = probe.call(RECOVER_S + 30, cmd="wait_app", app="cineray", wait_s=RECOVER_S,
                               alive_ips=[HEAD_IP], counts=counts)
            assert probe.call(30, cmd="nodes")["alive"] == [HEAD_IP]
            assert set(after) == set(before)
            marks["recovered"] = time.monotonic() - t0

            # 4. The app still answers: the old job from storage, and a new render.
            auth = {"Authorization": f"Bearer {TOKEN}"}
            url = f"http://127.0.0.1:{_port()}/v1/videos/{job['id']}"
            old = probe.call(60, cmd="http", method="GET", url=url, headers=auth, timeout=50)
            assert old["status"] == 200 and yaml.safe_load(old["text"])["status"] == "completed"
            job2, mp4_2 = _render(probe, "a blue square moving left", seed=2)
            assert mp4_2["status"] == 200 and bytes.fromhex(mp4_2["head"])[4:8] == b"ftyp"
            marks["second_render"] = time.monotonic() - t0
        finally:
            probe.close()
    print("multinode timings (s):", {k: round(v, 1) for k, v in marks.items()},
          "moved from worker:", on_worker)
