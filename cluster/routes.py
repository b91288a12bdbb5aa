"""The HTTP routes of the Ingress (the API contract: docs/SERVING shape, OpenAPI at /docs).

    POST   /v1/videos                      202 + job     (JSON, or multipart with input_reference)
    GET    /v1/videos?limit=20             {object: list, data, has_more}, newest first
    GET    /v1/videos/{id}                 job
    GET    /v1/videos/{id}/events          text/event-stream: progress, preview, terminal event
    GET    /v1/videos/{id}/content         video/mp4 (?variant=video|preview&index=0)
    DELETE /v1/videos/{id}                 cancel -> job
    POST   /v1/verify                      watermark + C2PA report (file, or {"video_id"})
    GET    /healthz                        open
"""

from __future__ import annotations

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from cineray.cluster.api import ApiError, VideoRequest

_BODY = {"requestBody": {"content": {
    "application/json": {"schema": VideoRequest.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "prompt": {"type": "string"},
        "input_reference": {"type": "string", "format": "binary"}}}}}}}
_VERIFY = {"requestBody": {"content": {
    "application/json": {"schema": {"type": "object",
                                    "properties": {"video_id": {"type": "string"}}}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary"}}}}}}}


def add_routes(app: FastAPI, ing) -> None:
    """Register the API on `app`; `ing` is the Ingress (auth, jobs, handles)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"] if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        return JSONResponse(ApiError(422, f"{param}: {err['msg']}", param=param,
                                     code="invalid_value").body, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        kind = "not_found" if e.status_code == 404 else "http_error"
        return JSONResponse(ApiError(e.status_code, str(e.detail), code=kind).body,
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        return {"status": "ok"}

    @app.post("/v1/videos", status_code=202, openapi_extra=_BODY, tags=["videos"])
    async def create_video(request: Request):
        """Queue a render; answers 202 with the job object at once."""
        ing.authorize(request)
        return JSONResponse(await ing.create(request), status_code=202)

    @app.get("/v1/videos", tags=["videos"])
    async def list_videos(request: Request, limit: int = Query(20, ge=1, le=100)):
        ing.authorize(request)
        import asyncio

        jobs, more = await asyncio.to_thread(ing.jobs.list, limit)
        return {"object": "list", "data": jobs, "has_more": more}

    @app.get("/v1/videos/{video_id}", tags=["videos"])
    async def get_video(request: Request, video_id: str):
        ing.authorize(request)
        return ing.job(video_id)

    @app.get("/v1/videos/{video_id}/events", tags=["videos"])
    async def video_events(request: Request, video_id: str):
        """Server-sent events: progress, preview, then completed | failed | cancelled."""
        ing.authorize(request)
        ing.job(video_id)  # 404 before the stream starts
        return StreamingResponse(ing.events(video_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.get("/v1/videos/{video_id}/content", tags=["videos"],
             response_class=Response, responses={200: {"content": {"video/mp4": {}}}})
    async def video_content(request: Request, video_id: str, variant: str = "video",
                            index: int = 0):
        ing.authorize(request)
        import asyncio

        data = await asyncio.to_thread(ing.content, video_id, variant, index)
        return Response(data, media_type="video/mp4",
                        headers={"Content-Disposition": f'inline; filename="{video_id}.mp4"'})

    @app.delete("/v1/videos/{video_id}", tags=["videos"])
    async def cancel_video(request: Request, video_id: str):
        ing.authorize(request)
        return ing.cancel(video_id)

    @app.post("/v1/verify", openapi_extra=_VERIFY, tags=["provenance"])
    async def verify(request: Request):
        """Watermark payload + confidence and the C2PA manifest with its validation state."""
        ing.authorize(request)
        return await ing.verify(request)
