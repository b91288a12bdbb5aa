"""The Serve application end to end: real local Ray, real HTTP on loopback, tiny random weights.

One application for the module (deploying takes a while): two Denoiser replicas, queue limit 3.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import numpy as np
import pytest

from cineray.video import read_mp4

pytestmark = [pytest.mark.ray]
TOKEN = "test-token-123"
QUEUE_LIMIT = 3
KEY = 0x1234_5678_9ABC  # the deployment's own watermark key (not the public default)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    """The cineray app on a free loopback port; yields (base URL, checkpoint folder)."""
    from ray import serve

    from cineray.cluster.app import AppArgs, build

    root = tmp_path_factory.mktemp("serve")
    (root / "no-checkpoint").mkdir()
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = AppArgs(checkpoint=str(root / "no-checkpoint"), storage_root=str(root / "data"),
                   token=TOKEN, denoiser_min_replicas=2, denoiser_max_replicas=2,
                   max_replicas=1, queue_limit=QUEUE_LIMIT, num_cpus=0.05, window_retries=5,
                   log_encoding="TEXT", watermark_key=KEY, c2pa_keys_dir=str(root / "keys"))
    serve.run(build(args), name="cineray", route_prefix="/", blocking=False)
    yield f"http://127.0.0.1:{port}", str(root / "no-checkpoint"), root
    serve.shutdown()


@pytest.fixture
def client(served):
    with httpx.Client(base_url=served[0], headers={"Authorization": f"Bearer {TOKEN}"},
                      timeout=120) as c:
        yield c


def _wait(client, job_id: str, timeout: float = 240) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.get(f"/v1/videos/{job_id}").json()
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")


def _counters(ray):
    return ray.get(ray.get_actor("cineray-stage-counters-cineray", namespace="cineray")
                   .get.remote())


def _events(client, job_id: str) -> list[tuple[str, dict]]:
    out, event = [], None
    with client.stream("GET", f"/v1/videos/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                out.append((event, json.loads(line[6:])))
    return out


def test_render_preview_and_upscaled_mp4(served, client):
    r = client.post("/v1/videos", json={"prompt": "a red ball falling", "frames": 9, "steps": 2,
                                        "upscale": "full", "seed": 3})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["frames"] == 17 and job["fps"] == 16.0
    done = _wait(client, job["id"])
    assert done["status"] == "completed", done["error"]
    data = client.get(f"/v1/videos/{job['id']}/content").content
    video, fps = read_mp4(data)
    assert video.shape == (17, 64, 64, 3) and fps == 16.0  # temporal x2 (2T - 1), spatial x2
    preview, pfps = read_mp4(client.get(done["preview_url"]).content)
    assert preview.shape == (9, 32, 32, 3) and pfps == 8.0
    assert {"denoise", "decode", "upscale_spatial", "upscale_temporal", "watermark", "mux",
            "sign", "store", "total"} <= set(done["timings"])
    # Every output is watermarked and signed: POST /v1/verify reads the job's payload back.
    report = client.post("/v1/verify", json={"video_id": job["id"]}).json()
    assert report["watermark"]["watermarked"] and report["payload_matches_manifest"], report
    assert report["c2pa"]["valid_apart_from_trust"]
    # ...under the deployment's own key and local CA folder (AppArgs), not the defaults.
    from cineray.pipelines.provenance import ProvenanceConfig, detect_mp4

    assert detect_mp4(data, ProvenanceConfig(watermark_key=KEY)).payload is not None
    assert not detect_mp4(data).watermarked  # the public default key finds nothing
    assert (served[2] / "keys").is_dir() and any((served[2] / "keys").iterdir())
    listed = client.get("/v1/videos", params={"limit": 1}).json()
    assert listed["object"] == "list" and listed["data"][0]["id"] == job["id"]


@pytest.mark.slow
def test_long_clip_on_two_denoiser_replicas_with_ordered_events(client):
    r = client.post("/v1/videos", json={"prompt": "a blue square moving left", "frames": 65,
                                        "steps": 3, "seed": 1})
    assert r.status_code == 202, r.text
    events = _events(client, r.json()["id"])
    names = [e for e, _ in events]
    assert names[-1] == "completed" and names.count("completed") == 1
    assert names.index("preview") < len(names) - 1  # the preview comes before the end
    progress = [d["progress"] for e, d in events if e == "progress"]
    assert progress == sorted(progress) and len(progress) >= 3
    job = events[-1][1]
    keys = sorted((w["level"], w["index"]) for w in job["windows"])
    assert keys == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0)]  # keyframe pass + 5 windows
    assert len({w["replica"] for w in job["windows"] if w["level"] == 0}) == 2
    video, _ = read_mp4(client.get(f"/v1/videos/{job['id']}/content").content)
    assert video.shape == (65, 32, 32, 3)


def test_bad_requests_name_the_field(served, client, ray_cluster):
    cases = [
        ({"prompt": "a ball", "size": "big"}, 422, "size"),
        ({"prompt": "a ball", "size": "36x32"}, 422, "size"),  # not a multiple of the grid
        ({"prompt": "a ball", "camera": {"motion": "spin"}}, 422, "camera.motion"),
        ({"prompt": "a ball", "frames": 0}, 422, "frames"),
        ({"prompt": "a ball", "steps": 0}, 422, "steps"),
        ({"prompt": "a ball", "seconds": 2, "frames": 9}, 422, "seconds"),
        ({"prompt": "a ball", "colour": "red"}, 422, "colour"),
        ({"prompt": "a ball", "input_reference": "data:image/png;base64,AAAA"}, 422,
         "input_reference"),
        ({"prompt": ""}, 422, "prompt"),
        ({"prompt": "a ball", "frames": 257, "size": "256x256"}, 413, "size"),
    ]
    for body, status, param in cases:
        r = client.post("/v1/videos", json=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.json())
    assert "limit" in client.post("/v1/videos", json=cases[-1][0]).json()["error"]["message"]
    # A blocked prompt is a 400 with its category, and never reaches the denoiser.
    before = _counters(ray_cluster)
    r = client.post("/v1/videos", json={"prompt": "g.o.r.e everywhere", "steps": 2})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "blocked_prompt"
    assert err["category"] == "graphic_violence" and err["param"] == "prompt"
    time.sleep(0.5)  # the counters are updated fire-and-forget
    after = _counters(ray_cluster)
    assert after.get("safety", 0) == before.get("safety", 0) + 1
    assert after.get("denoise", 0) == before.get("denoise", 0)
    assert after.get("text", 0) == before.get("text", 0)
    r = client.get("/v1/videos/video_000000000000000000000000")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_token_required(served):
    base = served[0]
    for method, path in [("POST", "/v1/videos"), ("GET", "/v1/videos"),
                         ("GET", "/v1/videos/video_000000000000000000000000"),
                         ("POST", "/v1/verify")]:
        r = httpx.request(method, base + path, json={"prompt": "a ball"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(base + "/v1/videos", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(base + "/v1/videos", params={"access_token": TOKEN}).status_code == 200
    assert httpx.get(base + "/healthz").status_code == 200
    assert httpx.get(base + "/openapi.json").json()["paths"]["/v1/videos"]


def test_cancel(client):
    r = client.post("/v1/videos", json={"prompt": "a cyan star falling", "frames": 65,
                                        "steps": 20})
    job_id = r.json()["id"]
    r = client.delete(f"/v1/videos/{job_id}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    events = _events(client, job_id)
    assert events[-1][0] == "cancelled"
    final = _wait(client, job_id)
    assert final["status"] == "cancelled" and final["outputs"] == []
    assert client.get(f"/v1/videos/{job_id}/content").status_code == 409
    time.sleep(1.0)  # let the orchestrator reach its next stage boundary and stop
    assert client.get(f"/v1/videos/{job_id}").json()["status"] == "cancelled"


@pytest.mark.slow
def test_killed_denoiser_replica_loses_nothing(served, client, ray_cluster):
    from cineray.pipelines.generate import generate
    from cineray.pipelines.stages import Components, GenerationRequest

    # 60 steps: each window runs long enough (about a second) for the kill to land mid-window
    body = {"prompt": "a green circle moving right", "frames": 65, "steps": 60, "seed": 5}
    calls = _counters(ray_cluster).get("denoise", 0)
    replicas = {a["name"]: ray_cluster.get_actor(a["name"], namespace=a["namespace"])
                for a in ray_cluster.util.list_named_actors(all_namespaces=True)
                if "Denoiser" in a["name"]}  # looked up first: the kill must land mid-window
    job_id = client.post("/v1/videos", json=body).json()["id"]
    counters = ray_cluster.get_actor("cineray-stage-counters-cineray", namespace="cineray")
    end, busy = time.monotonic() + 120, []
    while time.monotonic() < end and len(busy) < 2:  # both replicas are running a window
        busy = ray_cluster.get(counters.running.remote())
        time.sleep(0.05)
    assert len(busy) == 2, busy
    victim = [h for name, h in replicas.items() if name.endswith(busy[0])]
    assert len(victim) == 1, (list(replicas), busy)
    ray_cluster.kill(victim[0], no_restart=True)
    job = _wait(client, job_id)
    assert job["status"] == "completed", job["error"]
    keys = sorted((w["level"], w["index"]) for w in job["windows"])
    assert keys == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0)]  # each window once
    # The killed replica's window was sent again (by Serve's router, or by the orchestrator,
    # which counts its own resends in `attempts`): more denoise calls than windows.
    assert _counters(ray_cluster)["denoise"] - calls > 5
    video, _ = read_mp4(client.get(f"/v1/videos/{job_id}/content").content)
    # Nothing lost or duplicated: every run of 8 frames matches its own place in the same clip
    # rendered in one process (up to the watermark and H.264) better than any other place. A
    # lost or repeated window shifts a whole run; single frames are not enough, since a frame of
    # random-weight noise can lie closer to another frame than H.264 and the watermark move it.
    comps = Components.load(served[1])
    ref = generate(comps, GenerationRequest(body["prompt"], seed=5, frames=65, steps=60)).frames
    diff = np.abs(video[:, None].astype(np.float32) - ref[None].astype(np.float32))
    mae = diff.mean(axis=(2, 3, 4))  # (65, 65): decoded frame x reference frame
    run = 8
    for s in range(65 - run + 1):
        at = [mae[s:s + run, t:t + run].diagonal().mean() for t in range(65 - run + 1)]
        assert int(np.argmin(at)) == s, (s, at[s], min(at))
    # Random weights render noise, which H.264 + the watermark change by ~15 levels on average
    # (measured in one process too); other frames of the clip are 18-38 levels away.
    assert mae.diagonal().max() < 20, mae.diagonal().max()


@pytest.mark.slow
def test_burst_above_queue_limit_gets_fast_429s(client):
    body = {"prompt": "a yellow diamond moving up", "frames": 9, "steps": 2}
    answers = []
    for _ in range(QUEUE_LIMIT + 5):
        t0 = time.monotonic()
        r = client.post("/v1/videos", json=body)
        answers.append((r, time.monotonic() - t0))
    admitted = [r.json()["id"] for r, _ in answers if r.status_code == 202]
    refused = [(r, dt) for r, dt in answers if r.status_code != 202]
    assert 1 <= len(admitted) <= QUEUE_LIMIT and len(refused) >= 5
    for r, dt in refused:
        assert r.status_code in (429, 503) and int(r.headers["Retry-After"]) > 0
        assert r.json()["error"]["code"] == "queue_full" and dt < 2.0
    for job_id in admitted:
        assert _wait(client, job_id)["status"] == "completed"


def test_multipart_image_to_video_with_callback(client):
    """A form upload (input_reference as a file) and the completion webhook."""
    import http.server
    import io
    import threading

    from PIL import Image

    received = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    png = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(png, format="PNG")
    r = client.post("/v1/videos", data={
        "prompt": "a red square moving right", "frames": "5", "steps": "2",
        "callback_url": f"http://127.0.0.1:{hook.server_port}/done"},
        files={"input_reference": ("first.png", png.getvalue(), "image/png")})
    assert r.status_code == 202, r.text
    job = _wait(client, r.json()["id"])
    assert job["status"] == "completed", job["error"]
    assert job["request"]["input_reference"].endswith("input.png")
    video, _ = read_mp4(client.get(f"/v1/videos/{job['id']}/content").content)
    assert video.shape == (5, 32, 32, 3)
    end = time.monotonic() + 10
    while not received and time.monotonic() < end:
        time.sleep(0.1)
    hook.shutdown()
    assert received and received[0]["id"] == job["id"]
    assert received[0]["status"] == "completed"
