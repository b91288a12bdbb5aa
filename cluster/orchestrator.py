"""The Orchestrator deployment: runs one job through the stage deployments.

    plan -> [keyframe pass: every window at once -> decode -> blend -> encode keyframes]
         -> every level-0 window at once on the Denoiser replicas (K replicas: K at a time);
            windows denoised jointly (WindowPlan.shared) go one sampler step at a time, their
            shared latents averaged here between steps
         -> each window's decode chained on its denoise (the response is passed on, not awaited)
         -> blend in order -> preview MP4 (published while the upscalers still run)
         -> UpscalerSpatial / UpscalerTemporal in halo'd chunks -> Watermarker -> Muxer

The order of operations is cineray.pipelines.generate's (the one-process reference), and the
chunked upscaling *is* generate.upscale_stream, pointed at the upscaler deployments; so a clip
rendered here has the same frames as one rendered in one process.

A window (or one step of it) whose replica died (or whose Decoder did) is sent again: windows and
steps are pure functions of their inputs, so the retry yields the same latents and nothing is
lost or counted twice. The job record (jobstore.py) gets progress, per-stage timings and which
replica ran which window (its first step, for windows denoised jointly).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import ray
from ray import serve
from ray.serve import metrics
from ray.serve.exceptions import RayServeException

from cineray.cluster.jobstore import TERMINAL, JobStore

logger = logging.getLogger("ray.serve")
# A replica (or its node) died while holding the request: safe to send the window again.
# (Serve's router already resends a request whose replica died; these are what reaches us when
# it cannot, e.g. the Denoiser died under a Decoder call waiting on its output.)
RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
             ray.exceptions.ObjectLostError)


def retryable(e: BaseException) -> bool:
    return isinstance(e, RETRYABLE) or (isinstance(e, RayServeException)
                                        and isinstance(e.__cause__, RETRYABLE))


class Cancelled(Exception):
    pass


class _RemoteUpscaler:
    """Looks like an upscaler module to generate.upscale_stream (a .cfg and a call), runs on
    the upscaler deployment (asked for its config on first use: a clip that is not upscaled
    never wakes an upscaler scaled to zero)."""

    def __init__(self, handle):
        self.handle, self._config = handle, None

    def config(self) -> dict:
        if self._config is None:
            self._config = self.handle.config.remote().result()
        return self._config

    @property
    def cfg(self):
        return self.config()["cfg"]

    def __call__(self, video):
        return self.handle.upscale.remote(video).result()


class _RemoteComponents:
    """The attributes generate.finish/upscale_stream read, with the upscalers remote."""

    def __init__(self, handles: dict):
        import torch

        self.device = torch.device("cpu")
        self.upscaler_spatial = _RemoteUpscaler(handles["UpscalerSpatial"])
        self.upscaler_temporal = _RemoteUpscaler(handles["UpscalerTemporal"])

    @property
    def upscale_chunk(self) -> int:
        return self.upscaler_spatial.config()["chunk"]


@serve.deployment(name="Orchestrator")
class Orchestrator:
    """run(job_id) renders a queued job and returns its final record. Sync: Serve runs it in a
    thread pool, where blocking on a DeploymentResponse is allowed."""

    def __init__(self, handles: dict, storage: dict, window_retries: int = 3):
        import torch

        from cineray.storage import Storage, StorageConfig

        torch.set_num_threads(1)
        self.h = handles
        self.jobs = JobStore(Storage(StorageConfig(**storage)))
        self.retries = window_retries
        self.remote: _RemoteComponents | None = None
        self.lock = threading.Lock()
        self.m_renders = metrics.Counter("cineray_renders", "Finished jobs by status",
                                         tag_keys=("status",))
        self.m_frames = metrics.Counter("cineray_frames", "Output frames rendered")
        self.m_stage = metrics.Histogram("cineray_stage_seconds", "Seconds per stage per job",
                                         boundaries=[0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60,
                                                     120], tag_keys=("stage",))

    def _components(self) -> _RemoteComponents:
        with self.lock:
            if self.remote is None:
                self.remote = _RemoteComponents(self.h)
        return self.remote

    # Job ---------------------------------------------------------------------------------------
    def run(self, job_id: str, plan=None) -> dict:
        """plan: the Planner's WindowPlan for the request (the ingress got it at admission);
        None: asked for here."""
        from cineray.cluster.api import request_from_record

        t0 = time.perf_counter()
        job = self.jobs.get(job_id)
        if job["status"] in TERMINAL:
            return job
        ctx = _Job(self, job, plan)
        try:
            ctx.update(status="in_progress", stage="text", progress=1)
            request = request_from_record(job["request"], self.jobs)
            outputs = [ctx.render_sample(replace(request, seed=request.seed + i), i)
                       for i in range(job["request"].get("n", 1))]
            ctx.timings["total"] = time.perf_counter() - t0
            done = {"preview_url": f"/v1/videos/{job_id}/content?variant=preview"}
            ctx.update(status="completed", stage="completed", progress=100, outputs=outputs,
                       content_url=f"/v1/videos/{job_id}/content", completed_at=int(time.time()),
                       timings=ctx.rounded(), **(done if request.upscale == "none" else {}))
            self.m_frames.inc(sum(o["frames"] for o in outputs))
        except Cancelled:
            ctx.update(status="cancelled", stage="cancelled", completed_at=int(time.time()),
                       timings=ctx.rounded(), check=False)
        except Exception as e:  # noqa: BLE001  (the job fails; the replica lives on)
            logger.exception("job %s failed", job_id)
            ctx.update(status="failed", stage="failed", completed_at=int(time.time()),
                       error={"code": type(e).__name__, "message": str(e)[:2000]},
                       timings=ctx.rounded(), check=False)
        final = self.jobs.get(job_id)
        self.m_renders.inc(tags={"status": final["status"]})
        for stage, seconds in final["timings"].items():
            self.m_stage.observe(seconds, tags={"stage": stage})
        return final


class _Job:
    """One job's run: its record, timings and the stream of its windows."""

    def __init__(self, orch: Orchestrator, job: dict, plan=None):
        from cineray.pipelines.generate import Timer

        self.o, self.h, self.id, self.plan = orch, orch.h, job["id"], plan
        self.record = job  # this run is the record's only writer: no read before each write
        self.timer = Timer()
        self.timings = self.timer.seconds  # wall seconds the orchestrator waited per stage
        self.windows: list[dict] = []
        self.samples = job["request"].get("n", 1)
        self.done_windows, self.total_windows, self.sample, self.high = 0, 1, 0, 0.0
        self.preview_thread: threading.Thread | None = None

    def rounded(self) -> dict:
        return {k: round(v, 4) for k, v in self.timings.items()}

    def check(self) -> None:
        if self.o.jobs.cancel_requested(self.id):
            raise Cancelled()

    def update(self, check: bool = True, **fields) -> None:
        if check:
            self.check()
        with self.o.lock:
            self.record.update(windows=self.windows, **fields)
            self.o.jobs.put(self.record)

    def progress(self, stage: str, fraction: float) -> None:
        """fraction of this sample in [0, 1]; denoising is most of the work (5..90%). Never
        goes back (jointly denoised windows count as done before their decodes are waited for)."""
        whole = self.high = max(self.high, (self.sample + fraction) / self.samples)
        self.update(stage=stage, progress=int(min(99, 2 + 93 * whole)),
                    timings=self.rounded())

    # One sample --------------------------------------------------------------------------------
    def render_sample(self, request, index: int) -> dict:
        from cineray.pipelines.generate import finish

        self.sample = index
        with self.timer("text"):
            text = self.h["TextEncoder"].encode.remote(request)  # passed on to every window
        plan = self.plan
        if plan is None or plan.frames != request.frames:
            with self.timer("plan"):
                plan = self.h["Planner"].plan.remote(request).result()
        self.total_windows, self.done_windows = len(plan.all_windows()), 0
        first = None
        if request.image is not None:
            first = self.h["Decoder"].image_latent.remote(request.image)
        base = self.base_frames(request, text, plan, first)
        if request.upscale != "none":  # else the preview is the clip itself: packaged once
            base = self._publish_preview_after(request, index, base)
        result = finish(self.o._components(), request, base, request.frames, self.timer, plan)
        with self.timer("package"):
            stored = self.store(result.frames, result.fps, request, f"video_{index}.mp4")
        if self.preview_thread is not None:
            self.preview_thread.join()
        for k, v in stored["timings"].items():
            self.timings[k] = self.timings.get(k, 0.0) + v
        t, h, w = result.frames.shape[:3]
        return {"index": index, "seed": request.seed, "uri": stored["uri"], "frames": t,
                "size": f"{w}x{h}", "fps": result.fps, "bytes": stored["bytes"],
                "url": f"/v1/videos/{self.id}/content?index={index}"}

    def store(self, frames: np.ndarray, fps: float, request, name: str) -> dict:
        """Watermarker -> Muxer, the Watermarker's response passed on unawaited."""
        uri = self.o.jobs.storage.join(self.o.jobs.prefix, self.id, name)
        packaged = self.h["Watermarker"].package.remote(frames, fps, request, self.id)
        return self.h["Muxer"].store.remote(packaged, uri).result()

    # Streams -----------------------------------------------------------------------------------
    def base_frames(self, request, text, plan, first) -> Iterator:
        """Finished base frames (1, 3, n, H, W) of `plan`, in order; generate.base_frames with
        every window of a level submitted at once and waited for in order."""
        import torch

        keyframes = first
        if plan.keyframes is not None:
            images = torch.cat(list(self.base_frames(request, text, plan.keyframes.plan, first)),
                               dim=2)
            keyframes = self.h["Decoder"].encode_keyframes.remote(images[0].transpose(0, 1),
                                                                  first)
        from cineray.pipelines.windows import Blender

        if plan.shared:  # denoised jointly, step by step; then every decode at once
            denoised = self.denoise_jointly(request, text, plan, keyframes)
            resend = [lambda d=d: self.h["Decoder"].decode.remote(d) for d in denoised]
        else:
            resend = [lambda w=w: self.submit(request, text, w, keyframes) for w in plan.windows]
        pending = [send() for send in resend]
        blender = Blender(plan)
        for i, w in enumerate(plan.windows):
            try:
                out = self.wait_window(w, pending[i], resend[i])
            except BaseException:  # cancelled or failed: stop the windows still to come
                for response in pending[i + 1 :]:
                    with contextlib.suppress(Exception):
                        response.cancel()
                raise
            with self.timer("blend"):
                done = blender.add(w, out["video"])
            yield done

    def submit(self, request, text, window, keyframes):
        denoised = self.h["Denoiser"].denoise.remote(request, text, window, keyframes,
                                                     request.seed)
        return self.h["Decoder"].decode.remote(denoised)

    def denoise_jointly(self, request, text, plan, keyframes) -> list[dict]:
        """generate.base_frames's joint path on the Denoiser replicas: one sampler step of
        every window at once, then the latents neighbours share averaged; each window's
        denoiser output as Denoiser.denoise returns it."""
        from cineray.pipelines.windows import average_shared

        stage = "denoise" if plan.windows[0].level == 0 else "denoise_keyframes"
        xs, seconds, replicas = [None] * len(plan.windows), [0.0] * len(plan.windows), {}
        i, steps = 0, 1
        while i < steps:
            def send(w, i=i, xs=xs):
                return self.h["Denoiser"].denoise_step.remote(request, text, w, keyframes,
                                                              request.seed, xs[w.index], i)
            pending = [send(w) for w in plan.windows]
            outs = [self.wait(f"window {w.level}/{w.index} step {i}", stage, pending[w.index],
                              lambda w=w: send(w))[0] for w in plan.windows]
            xs = [out["latents"] for out in outs]
            average_shared(xs, plan.shared)
            for w, out in zip(plan.windows, outs, strict=True):
                seconds[w.index] += out["seconds"]
                replicas.setdefault(w.index, out["replica"])
            steps, i = outs[0]["steps"], i + 1
            self.progress(stage, 0.9 * (self.done_windows + len(xs) * i / steps)
                          / self.total_windows)
        return [{"latents": x, "replica": replicas[k], "seconds": seconds[k],
                 "level": w.level, "index": w.index}
                for k, (w, x) in enumerate(zip(plan.windows, xs, strict=True))]

    def wait(self, what: str, stage: str, response, resend) -> tuple[dict, int]:
        """A response's result, sent again (resend()) when its replica was lost."""
        attempt = 1
        while True:
            self.check()
            try:
                with self.timer("wait_" + stage):
                    return response.result(), attempt
            except Exception as e:
                if not retryable(e):
                    raise
                if attempt > self.o.retries:
                    raise RuntimeError(f"{what} failed {attempt} times; last: {e}") from e
                logger.warning("job %s: %s lost (%s); retrying", self.id, what,
                               type(e).__name__)
                response, attempt = resend(), attempt + 1

    def wait_window(self, window, response, resend) -> dict:
        stage = "denoise" if window.level == 0 else "denoise_keyframes"
        out, attempt = self.wait(f"window {window.level}/{window.index}", stage, response,
                                 resend)
        self.timings[stage] = self.timings.get(stage, 0.0) + out["seconds"]
        self.timings["decode"] = self.timings.get("decode", 0.0) + out["decode_seconds"]
        self.windows.append({"sample": self.sample, "level": window.level, "index": window.index,
                             "replica": out["replica"], "attempts": attempt,
                             "seconds": round(out["seconds"], 4)})
        self.done_windows += 1
        self.progress(stage, 0.9 * self.done_windows / self.total_windows)
        return out

    def _publish_preview_after(self, request, index: int, base: Iterator) -> Iterator:
        """Pass the base stream through; once it ends (every window blended, upscalers still
        running), package and store the base clip as the preview in a side thread."""
        from cineray.pipelines.stages import to_uint8

        chunks = []
        for chunk in base:
            chunks.append(to_uint8(chunk))
            yield chunk
        frames = np.concatenate(chunks)[: request.frames]
        self.check()

        def publish():
            try:
                stored = self.store(frames, request.fps, request, f"preview_{index}.mp4")
                if index == 0:
                    self.update(check=False, preview_url=f"/v1/videos/{self.id}/content"
                                f"?variant=preview")
            except Exception:  # noqa: BLE001  (the final clip still comes; log it)
                logger.exception("job %s: preview failed", self.id)
                return
            self.timings["preview"] = stored["timings"]["store"]

        self.preview_thread = threading.Thread(target=publish, daemon=True)
        self.preview_thread.start()
