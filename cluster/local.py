"""Entry-point helpers: deploy the app on a local Ray cluster, and a small HTTP client.

Used by `cineray serve`, `cineray render` and benchmarks/bench_serve.py. Library code never
starts Ray; these helpers expect the caller (an entry point) to have called ray.init().
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import httpx

from cineray.cluster.app import AppArgs, build, resolve_token


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def deploy(args: AppArgs, host: str = "127.0.0.1", port: int = 8000,
           name: str = "cineray") -> tuple[str, str]:
    """Start Serve's HTTP proxy on host:port and deploy the app; (base URL, API token)."""
    from ray import serve

    token = resolve_token(args.token)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(args.model_copy(update={"token": token})), name=name, route_prefix="/",
              blocking=False)
    return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}", token


class Client:
    """The HTTP API from Python: submit, follow the event stream, download."""

    def __init__(self, url: str, token: str, timeout: float = 600):
        self.http = httpx.Client(base_url=url, timeout=timeout,
                                 headers={"Authorization": f"Bearer {token}"})

    def submit(self, body: dict) -> dict:
        r = self.http.post("/v1/videos", json=body)
        if r.status_code != 202:
            err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith(
                "application/json") else {"message": r.text}
            raise ValueError(f"{err.get('param') or 'request'}: {err.get('message')}")
        return r.json()

    def follow(self, job_id: str, on_event: Callable[[str, dict], None] | None = None) -> dict:
        """Read the job's events until its terminal one; the final job object."""
        event = None
        with self.http.stream("GET", f"/v1/videos/{job_id}/events") as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if on_event:
                        on_event(event, data)
                    if event in ("completed", "failed", "cancelled"):
                        return data
        return self.http.get(f"/v1/videos/{job_id}").json()

    def content(self, job_id: str, variant: str = "video", index: int = 0) -> bytes:
        r = self.http.get(f"/v1/videos/{job_id}/content",
                          params={"variant": variant, "index": index})
        r.raise_for_status()
        return r.content

    def render(self, body: dict, on_event=None) -> tuple[dict, bytes]:
        """Submit, follow, download: (final job, MP4 bytes); RuntimeError if it failed."""
        job = self.follow(self.submit(body)["id"], on_event)
        if job["status"] != "completed":
            err = job.get("error") or {}
            raise RuntimeError(f"job {job['id']} {job['status']}: {err.get('message', '')}")
        return job, self.content(job["id"])

    def wait_ready(self, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while True:
            try:
                if self.http.get("/healthz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"the API at {self.http.base_url} did not answer in "
                                   f"{timeout} s")
            time.sleep(0.2)


def request_body(request) -> dict:
    """A GenerationRequest as the HTTP API's JSON body."""
    import base64

    from cineray.cluster.api import png_bytes

    body = {"prompt": request.prompt, "negative_prompt": request.negative_prompt,
            "seed": request.seed, "frames": request.frames, "fps": request.fps,
            "size": f"{request.width}x{request.height}", "upscale": request.upscale,
            "camera": {"motion": request.camera, "speed": request.camera_speed,
                       "focal_length_mm": request.focal_length_mm,
                       "hold_background": request.hold_background,
                       "guidance": request.camera_guidance}}
    for name in ("guidance", "steps", "sampler"):
        if getattr(request, name) is not None:
            body[name] = getattr(request, name)
    if request.image is not None:
        body["input_reference"] = ("data:image/png;base64,"
                                   + base64.b64encode(png_bytes(request.image)).decode())
    return body


def render_on_cluster(request, checkpoint: str | None = None, out: str | None = None,
                      log: Callable[[str], None] = print, provenance=None) -> str:
    """Deploy the app on the running (local) Ray cluster, render `request` over HTTP, write
    the MP4 (default: renders/... under the storage root); its absolute URI. The app stays
    deployed (the caller owns the cluster). An upscaler the request does not use is never
    started (scaled to zero). provenance: a ProvenanceConfig (watermark key, signing)."""
    import secrets

    from cineray.pipelines.generate import default_render_path
    from cineray.storage import Storage

    t0 = time.perf_counter()
    from cineray.pipelines.provenance import ProvenanceConfig

    args = AppArgs.with_provenance(provenance or ProvenanceConfig(), checkpoint=checkpoint,
                                   token=secrets.token_urlsafe(16), denoiser_max_replicas=1,
                                   max_replicas=1,
                                   upscaler_min_replicas=0 if request.upscale == "none" else 1)
    url, token = deploy(args, port=free_port())
    log(f"deployed the serving app at {url} in {time.perf_counter() - t0:.1f} s")
    last = [None]

    def show(event: str, data: dict) -> None:
        line = (f"{event}: {data.get('progress', 100)}% {data.get('stage', '')}"
                if event == "progress" else f"{event}")
        if line != last[0]:
            log(line)
            last[0] = line

    job, data = Client(url, token).render(request_body(request), show)
    path = Storage().write_bytes(out or default_render_path(request), data)
    log(f"job {job['id']}: {job['timings'].get('total', 0):.1f} s in the cluster, "
        f"{time.perf_counter() - t0:.1f} s since deploying")
    return path
