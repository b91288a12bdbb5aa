"""The Ingress deployment: the FastAPI HTTP API (OpenAPI at /docs) in front of the DAG.

POST /v1/videos checks the request (fields, budget, safety, the components' size rules), writes a
queued job record and hands the job to the Orchestrator without waiting: 202 at once. Admission
is bounded: with `queue_limit` unfinished jobs from this replica a new one gets 429 and a
Retry-After header at once instead of piling up (and the Orchestrator's own queue bound answers
503 through BackPressureError). Everything else reads the job records in storage, so any replica,
or a restarted one, answers for every job. The web playground's static files are mounted at /
after the API routes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError

from cineray.cluster import api
from cineray.cluster.api import ApiError
from cineray.cluster.jobstore import TERMINAL, JobStore, new_job, new_job_id

logger = logging.getLogger("ray.serve")
SSE_POLL_S = 0.05  # a local record read; keeps the end of a job visible at once


@serve.ingress()
class Ingress:
    def __init__(self, handles: dict, storage: dict, token: str, budget: int,
                 queue_limit: int, retry_after_s: int = 5):
        from cineray.storage import Storage, StorageConfig

        self.h, self.token, self.budget = handles, token, budget
        self.queue_limit, self.retry_after_s = queue_limit, retry_after_s
        self.jobs = JobStore(Storage(StorageConfig(**storage)))
        self.inflight: dict[str, object] = {}  # job id -> Orchestrator response
        self.m_rejections = metrics.Counter("cineray_rejections", "Refused requests by reason",
                                            tag_keys=("reason",))

    def __serve_build_asgi_app__(self):
        return create_app(self)

    # Auth and errors ---------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else None
        if given is None and request.method == "GET":  # EventSource / <video> cannot set headers
            given = request.query_params.get("access_token")
        if not given or not secrets.compare_digest(given, self.token):
            self.m_rejections.inc(tags={"reason": "auth"})
            raise ApiError(401, "missing or wrong API token: send 'Authorization: Bearer <token>' "
                           "(GET routes also take ?access_token=)", type="authentication_error",
                           code="invalid_api_key")

    def job(self, job_id: str) -> dict:
        try:
            return self.jobs.get(job_id)
        except KeyError:
            raise ApiError(404, f"no video job with id {job_id!r}", type="invalid_request_error",
                           param="id", code="not_found") from None

    # Create ------------------------------------------------------------------------------------
    async def create(self, request: Request) -> dict:
        data, image_bytes = await _body(request)
        req = api.parse_request(data)
        record = api.to_record(req)
        try:
            gen = api.generation_request(record)
        except ValueError as e:
            raise ApiError(422, str(e), param=api.param_of(str(e)), code="invalid_value") from None
        try:
            api.budget_check(record, self.budget)
        except ApiError:
            self.m_rejections.inc(tags={"reason": "over_budget"})
            raise
        # Safety and the planner's checks at once (the plan never starts a render by itself).
        verdict, planned = await asyncio.gather(self.h["SafetyFilter"].check.remote(req.prompt),
                                                self.h["Planner"].check.remote(gen))
        if not verdict["allowed"]:
            self.m_rejections.inc(tags={"reason": "blocked_prompt"})
            raise ApiError(400, f"prompt blocked by the safety filter (category: "
                           f"{verdict['category']}); rephrase the prompt", param="prompt",
                           code="blocked_prompt", category=verdict["category"])
        if planned["error"]:
            problem = planned["error"]
            raise ApiError(422, problem, param=api.param_of(problem), code="invalid_value")
        image = None
        if image_bytes is not None or req.input_reference is not None:
            image = api.decode_image(image_bytes if image_bytes is not None
                                     else req.input_reference, req.width, req.height)
        self.admit()
        job_id = new_job_id()
        if image is not None:
            record["input_reference"] = self.jobs.put_blob(job_id, "input.png",
                                                           api.png_bytes(image))
        frames = api.output_frames(record)
        job = new_job(job_id, record, model=req.model, size=req.size, frames=frames,
                      fps=record["fps"] * (2 if req.upscale == "full" else 1),
                      seconds=round(record["frames"] / record["fps"], 3))
        self.jobs.put(job)
        response = self.h["Orchestrator"].run.remote(job_id, planned["plan"])
        self.inflight[job_id] = response
        asyncio.get_running_loop().create_task(self.watch(job_id, response))
        return job

    def admit(self) -> None:
        if len(self.inflight) >= self.queue_limit:
            self.m_rejections.inc(tags={"reason": "queue_full"})
            raise ApiError(429, f"the render queue is full ({self.queue_limit} jobs); retry in "
                           f"{self.retry_after_s} s", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.retry_after_s)})

    async def watch(self, job_id: str, response) -> None:
        """Drop the job from the admission count when it ends; a job the Orchestrator refused
        (its queue bound) or lost is marked failed, so no record stays 'queued' forever."""
        try:
            final = await response
        except BackPressureError as e:
            self.m_rejections.inc(tags={"reason": "backpressure"})
            final = self._fail(job_id, "queue_full", f"the cluster is busy: {e}")
        except Exception as e:  # noqa: BLE001
            final = self._fail(job_id, type(e).__name__, str(e)[:2000])
        finally:
            self.inflight.pop(job_id, None)
        url = final["request"].get("callback_url") if final else None
        if url:
            await asyncio.to_thread(_post_json, url, final)

    def _fail(self, job_id: str, code: str, message: str) -> dict | None:
        try:
            job = self.jobs.get(job_id)
            if job["status"] not in TERMINAL:
                job.update(status="failed", stage="failed", completed_at=int(time.time()),
                           error={"code": code, "message": message})
                self.jobs.put(job)
            return job
        except Exception:  # noqa: BLE001
            logger.exception("job %s: cannot record failure", job_id)
            return None

    # Cancel ------------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> dict:
        job = self.job(job_id)
        if job["status"] in TERMINAL:
            raise ApiError(409, f"job {job_id} is already {job['status']}", param="id",
                           code="not_cancellable")
        self.jobs.request_cancel(job_id)  # the orchestrator stops at its next stage boundary
        return self.jobs.get(job_id)

    # Events ------------------------------------------------------------------------------------
    async def events(self, job_id: str):
        """SSE: progress on every change, preview once, then one terminal event."""
        last, preview_sent = None, False
        while True:
            job = await asyncio.to_thread(self.job, job_id)
            now = (job["status"], job["progress"], job["stage"])
            if now != last and job["status"] not in TERMINAL:
                last = now
                yield _sse("progress", {"status": now[0], "progress": now[1], "stage": now[2]})
            if job.get("preview_url") and not preview_sent:
                preview_sent = True
                yield _sse("preview", {"preview_url": job["preview_url"]})
            if job["status"] in TERMINAL:
                yield _sse(job["status"], job)
                return
            await asyncio.sleep(SSE_POLL_S)

    # Content -----------------------------------------------------------------------------------
    def content(self, job_id: str, variant: str, index: int) -> bytes:
        job = self.job(job_id)
        if variant not in ("video", "preview"):
            raise ApiError(422, "variant must be 'video' or 'preview'", param="variant",
                           code="invalid_value")
        n = job["request"].get("n", 1)
        if not 0 <= index < n:
            raise ApiError(422, f"index must be in [0, {n - 1}]", param="index",
                           code="invalid_value")
        if variant == "video" and job["status"] == "completed":
            return self.jobs.read(job["outputs"][index]["uri"])
        if variant == "preview" and job.get("preview_url"):
            if job["request"].get("upscale") == "none":  # the base clip is the video itself
                return self.jobs.read(job["outputs"][index]["uri"])
            name = f"preview_{index}.mp4"
            try:
                return self.jobs.read(self.jobs.storage.join(self.jobs.prefix, job_id, name))
            except FileNotFoundError:
                pass
        raise ApiError(409, f"the {variant} of job {job_id} is not ready (status "
                       f"{job['status']})", param="variant", code="not_ready")

    async def verify(self, request: Request) -> dict:
        data, file = await _body(request, file_field="file")
        if file is None:
            job = self.job(str(data.get("video_id", "")))
            if job["status"] != "completed":
                raise ApiError(409, f"job {job['id']} has no video yet", param="video_id",
                               code="not_ready")
            file = await asyncio.to_thread(self.jobs.read, job["outputs"][0]["uri"])
        return await self.h["Watermarker"].verify.remote(file)


def create_app(ingress: Ingress) -> FastAPI:
    from cineray.cluster.routes import add_routes

    app = FastAPI(title="cineray", version="0.1.0",
                  description="Text-to-video rendering on Ray Serve (OpenAI Videos API shape).")
    add_routes(app, ingress)
    web = resources.files("cineray.cluster").joinpath("web")
    if web.is_dir():  # the playground; mounted last so the API routes win
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=str(web), html=True), name="web")
    return app


async def _body(request: Request, file_field: str = "input_reference") -> tuple[dict, bytes | None]:
    """JSON or multipart/form-data -> (fields, the named file's bytes or None)."""
    kind = request.headers.get("content-type", "")
    if kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()
        fields, file = {}, None
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                if key == file_field:
                    file = await value.read()
            else:
                fields[key] = value
        return fields, file
    try:
        return await request.json(), None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(422, "the body must be JSON (or multipart/form-data)", param=None,
                       code="invalid_json") from None


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _post_json(url: str, body: dict) -> None:
    """The webhook: POST the final job object (best effort, logged on failure)."""
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=10).close()
    except Exception as e:  # noqa: BLE001
        logger.warning("callback %s failed: %s", url, e)


__all__ = ["Ingress", "create_app", "JSONResponse", "Response", "StreamingResponse"]
