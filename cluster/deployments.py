"""One Ray Serve deployment per generation stage: thin wrappers over cineray.pipelines.

    SafetyFilter -> TextEncoder -> Planner -> Denoiser (xK) -> Decoder -> UpscalerSpatial
    -> UpscalerTemporal -> Watermarker -> Muxer

Each replica loads what its stage needs once (the tiny components load in about a second) and
runs torch single-threaded: the stages scale by replicas, not threads, and on a shared CPU a
second thread mostly spin-waits. Tensors travel between replicas through Ray's object store.
Resources, replica counts and timeouts are set by cineray.cluster.app.build (and the Serve config
YAMLs in infra/serve/), not here.
"""

from __future__ import annotations

import functools
import logging
import time

import ray
from ray import serve
from ray.serve import metrics

logger = logging.getLogger("ray.serve")


# ---------------------------------------------------------------------------------------------
# Shared replica helpers
# ---------------------------------------------------------------------------------------------


class _NoText:
    """Stands in for the text encoder in replicas that never encode text (MiniLM is the slowest
    component to load)."""

    def __call__(self, prompts):
        raise RuntimeError("this replica has no text encoder; the TextEncoder deployment has")


@functools.lru_cache(maxsize=2)
def components(checkpoint: str, with_text: bool = False):
    """The process's Components (once per replica process), torch on one thread."""
    import torch

    from cineray.pipelines.stages import Components

    torch.set_num_threads(1)
    return Components.load(checkpoint, text=None if with_text else _NoText())


def replica_tag() -> str:
    """This replica's id, as the job record shows it (which replica ran which window)."""
    try:
        return serve.get_replica_context().replica_tag
    except Exception:  # noqa: BLE001  (outside a replica, e.g. a unit test calling the class)
        return "local"


@ray.remote(num_cpus=0)
class StageCounters:
    """Calls per stage over the application's life (a named actor): tests and operators read
    it to see which stages a request reached (a blocked prompt never reaches the denoiser)."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.busy: dict[str, int] = {}  # replica tag -> calls it is running

    def add(self, stage: str, n: int = 1, replica: str | None = None, running: int = 0) -> None:
        self.counts[stage] = self.counts.get(stage, 0) + n
        if replica is not None:
            self.busy[replica] = self.busy.get(replica, 0) + running

    def get(self) -> dict[str, int]:
        return dict(self.counts)

    def running(self) -> list[str]:
        """Replicas in the middle of a call (stages that report it: the Denoiser)."""
        return sorted(r for r, n in self.busy.items() if n > 0)


def stage_counters(app_name: str = "cineray"):
    """The application's StageCounters actor (created on first use, outlives replicas)."""
    return StageCounters.options(name=f"cineray-stage-counters-{app_name}", namespace="cineray",
                                 get_if_exists=True, lifetime="detached").remote()


class _Stage:
    """Base of every stage: counts calls (StageCounters + a Prometheus counter)."""

    stage = ""
    _calls = None

    def _setup(self):
        try:
            app = serve.get_replica_context().app_name
        except Exception:  # noqa: BLE001
            app = "cineray"
        self._counters = stage_counters(app)
        if _Stage._calls is None:
            _Stage._calls = metrics.Counter("cineray_stage_calls", "Calls per stage",
                                            tag_keys=("stage",))

    def _count(self, n: int = 1) -> None:
        self._counters.add.remote(self.stage, n)  # fire and forget
        _Stage._calls.inc(n, tags={"stage": self.stage})


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


@serve.deployment(name="SafetyFilter")
class SafetyFilter(_Stage):
    """check_prompt: the first stage of every request (no torch in this process)."""

    stage = "safety"

    def __init__(self):
        self._setup()

    def check(self, prompt: str) -> dict:
        """{"allowed": bool, "category": str | None}."""
        from cineray.pipelines.safety import check_prompt

        self._count()
        v = check_prompt(prompt)
        return {"allowed": v.allowed, "category": v.category}


@serve.deployment(name="TextEncoder")
class TextEncoder(_Stage):
    """encode_text, batched: concurrent requests share one MiniLM forward pass."""

    stage = "text"

    def __init__(self, checkpoint: str):
        self._setup()
        self.c = components(checkpoint, with_text=True)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def encode(self, requests: list) -> list:
        """GenerationRequest -> PromptEmbedding, per request of the batch."""
        from cineray.pipelines.stages import encode_text

        self._count(len(requests))
        prompts = [p for r in requests for p in (r.prompt, r.negative_prompt)]
        self.c.text(prompts)  # one forward pass fills the encoder's cache for the whole batch
        return [encode_text(self.c, r) for r in requests]


@serve.deployment(name="Planner")
class Planner(_Stage):
    """plan_windows and the request checks that depend on the loaded components."""

    stage = "plan"

    def __init__(self, checkpoint: str):
        self._setup()
        self.c = components(checkpoint)

    def check(self, request) -> dict:
        """{"error": None, "plan": WindowPlan} when the components can render `request`, else
        {"error": message, "plan": None}. The ingress asks at admission and hands the plan to
        the orchestrator (one round trip fewer per job)."""
        from cineray.pipelines.generate import check_request

        try:
            check_request(self.c, request)
        except ValueError as e:
            return {"error": str(e), "plan": None}
        return {"error": None, "plan": self.plan(request)}

    def plan(self, request):
        from cineray.pipelines.windows import plan_windows

        self._count()
        return plan_windows(request.frames, request.fps, self.c.windows)


@serve.deployment(name="Denoiser")
class Denoiser(_Stage):
    """denoise_window: one temporal window per call, or one sampler step of it (a pure function
    of its inputs, so a window or step retried on another replica gives the same latents)."""

    stage = "denoise"

    def __init__(self, checkpoint: str):
        self._setup()
        self.c = components(checkpoint)

    def denoise(self, request, text, window, keyframes, seed: int) -> dict:
        """-> {"latents": (1, C, T', h, w), "replica", "seconds", "level", "index"}."""
        from cineray.pipelines.stages import denoise_window

        tag = replica_tag()
        self._counters.add.remote(self.stage, 1, tag, 1)
        _Stage._calls.inc(1, tags={"stage": self.stage})
        t0 = time.perf_counter()
        try:
            z = denoise_window(self.c, request, text, window, keyframes, seed)
        finally:
            self._counters.add.remote(self.stage, 0, tag, -1)
        return {"latents": z, "replica": tag, "seconds": time.perf_counter() - t0,
                "level": window.level, "index": window.index}

    def denoise_step(self, request, text, window, keyframes, seed: int, x, i: int) -> dict:
        """Step i of the window's sampler from latents x (None: its noise), for windows
        denoised jointly: the Orchestrator averages their shared latents between steps.
        -> {"latents", "steps" (the sampler's), "replica", "seconds"}; the last step's latents
        are the window's."""
        from cineray.pipelines.stages import window_run, window_step

        tag, first = replica_tag(), int(i == 0)  # a window counts as one call, at its step 0
        self._counters.add.remote(self.stage, first, tag, 1)
        if first:
            _Stage._calls.inc(1, tags={"stage": self.stage})
        t0 = time.perf_counter()
        try:
            run = window_run(self.c, request, text, window, keyframes, seed)
            z = window_step(run, None if x is None else x.to(self.c.device), i).cpu()
        finally:
            self._counters.add.remote(self.stage, 0, tag, -1)
        return {"latents": z, "steps": len(run.ts) - 1, "replica": tag,
                "seconds": time.perf_counter() - t0}


@serve.deployment(name="Decoder")
class Decoder(_Stage):
    """The VAE: decode a window's latents; encode keyframes and first frames."""

    stage = "decode"

    def __init__(self, checkpoint: str):
        self._setup()
        self.c = components(checkpoint)

    def decode(self, denoised: dict) -> dict:
        """Denoiser output -> the same dict with "video" (1, 3, length, H, W) for "latents"."""
        from cineray.pipelines.stages import decode

        self._count()
        t0 = time.perf_counter()
        out = {k: v for k, v in denoised.items() if k != "latents"}
        out["video"] = decode(self.c, denoised["latents"])
        out["decode_seconds"] = time.perf_counter() - t0
        return out

    def encode_keyframes(self, images, first):
        """Images (N, 3, H, W) -> keyframe latents (N, C, h, w); keyframe 0 is `first`
        (1, C, h, w) itself when given (image-to-video), not its round trip."""
        from cineray.pipelines.stages import encode_images

        keyframes = encode_images(self.c, images)
        if first is not None:
            keyframes[0] = first[0]
        return keyframes

    def image_latent(self, image):
        """uint8 (H, W, 3) -> (1, C, h, w)."""
        from cineray.pipelines.stages import image_latent

        return image_latent(self.c, image)[None]


class _Upscaler(_Stage):
    kind = ""

    def __init__(self, checkpoint: str):
        self._setup()
        self.c = components(checkpoint)

    def config(self) -> dict:
        """What a caller needs to chunk a stream: the model config and the chunk length."""
        return {"cfg": getattr(self.c, f"upscaler_{self.kind}").cfg,
                "chunk": self.c.upscale_chunk}

    def upscale(self, video):
        """(1, 3, T, H, W) -> spatial (1, 3, T, 2H, 2W) | temporal (1, 3, 2T - 1, H, W)."""
        from cineray.pipelines.stages import upscale

        self._count()
        return upscale(self.c, self.kind, video)


@serve.deployment(name="UpscalerSpatial")
class UpscalerSpatial(_Upscaler):
    stage, kind = "upscale_spatial", "spatial"


@serve.deployment(name="UpscalerTemporal")
class UpscalerTemporal(_Upscaler):
    stage, kind = "upscale_temporal", "temporal"


@serve.deployment(name="Watermarker")
class Watermarker(_Stage):
    """provenance.package: watermark -> H.264 -> signed C2PA manifest, one indivisible call, so
    no output can leave without either (no request field reaches it). Also verifies clips."""

    stage = "watermark"

    def __init__(self, checkpoint: str, provenance: dict | None = None):
        from cineray.pipelines.provenance import ProvenanceConfig

        self._setup()
        self.c = components(checkpoint)
        self.cfg = ProvenanceConfig(**(provenance or {}))
        self.cfg.key()  # a bad CINERAY_WATERMARK_KEY fails the deployment, not each request

    def package(self, frames, fps: float, request, job_id: str) -> dict:
        """uint8 (T, H, W, 3) -> {"mp4": signed bytes, "timings": {watermark, mux, sign}}."""
        from cineray.pipelines import provenance
        from cineray.pipelines.generate import manifest_info

        self._count()
        timings: dict[str, float] = {}
        data = provenance.package(frames, fps, manifest_info(self.c, request, job_id),
                                  self.cfg, timings=timings)
        return {"mp4": data, "timings": timings}

    def verify(self, data: bytes) -> dict:
        from cineray.pipelines.provenance import describe

        return describe(data, self.cfg)


@serve.deployment(name="Muxer")
class Muxer(_Stage):
    """Stores finished MP4s (atomic writes; local folder or s3://); returns their URIs."""

    stage = "store"

    def __init__(self, storage: dict):
        from cineray.storage import Storage, StorageConfig

        self._setup()
        self.storage = Storage(StorageConfig(**storage))

    def store(self, packaged: dict, uri: str) -> dict:
        """Watermarker output -> {"uri", "bytes", "timings"}."""
        self._count()
        t0 = time.perf_counter()
        out = self.storage.write_bytes(uri, packaged["mp4"])
        timings = dict(packaged["timings"], store=time.perf_counter() - t0)
        return {"uri": out, "bytes": len(packaged["mp4"]), "timings": timings}


STAGES = {d.name: d for d in (SafetyFilter, TextEncoder, Planner, Denoiser, Decoder,
                              UpscalerSpatial, UpscalerTemporal, Watermarker, Muxer)}
