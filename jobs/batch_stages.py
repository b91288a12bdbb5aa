"""The batch job's stages: Ray Data callable classes over the same stage functions that the
Serve deployments wrap (cineray.pipelines.stages, generate, provenance).

    CheckRows -> TextEncode -> Denoise -> Decode -> Upscale -> Package (actor pools)

Every stage takes and returns pyarrow blocks of batch_rows.ROW_SCHEMA. Rows whose status is not
"pending" pass through untouched; an exception while rendering a row fails that row only (its
reason names the stage). The work in flight rides in the `state` column, pickled:
{"request"} -> +"text" -> +"plan", "latents", "model_id" -> "video" -> "frames", "fps".
Each stage adds its seconds to `timings` and (actor, ready, start, end) to `trace`, from which the
driver computes clips per minute and the denoiser pool's idle fraction.
"""

from __future__ import annotations

import json
import os
import pickle
import time
import uuid
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from cineray.jobs.batch_rows import check_row, marker_uri, to_table
from cineray.storage import Storage

if TYPE_CHECKING:
    from cineray.config import CinerayConfig


class _Stage:
    """Shared plumbing: torch threads, loading the components, per-row error isolation."""

    name = "stage"
    needs_components = True

    def __init__(self, config: CinerayConfig, out: str, device: str = "cpu", components=None):
        """components: already loaded ones to share (one process running every stage, as the
        tests do); None: load them (each actor loads its own copy)."""
        import torch

        cfg = config.batch
        torch.set_num_threads(cfg.threads)  # actors share the machine's cores
        self.config, self.cfg, self.out, self.components = config, cfg, out, components
        self.storage = Storage(config.storage)
        if self.needs_components and components is None:
            from cineray.pipelines.stages import Components

            kwargs = {"preset": cfg.preset, "device": device}
            if self.name != "encode_text":
                kwargs["text"] = LazyText(cfg.preset, device)
            self.components = (Components.load(cfg.checkpoint, **kwargs) if cfg.checkpoint
                               else Components.load(**kwargs))
        self.actor = f"{self.name}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.ready = time.time()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        pending = [r for r in rows if r["status"] == "pending"]
        self.prepare(pending)
        for row in pending:
            start = time.time()
            try:
                state = pickle.loads(row["state"])
                self.step(row, state)
                row["state"] = pickle.dumps(state, protocol=5)
            except Exception as e:  # noqa: BLE001  (one bad row must not stop the batch)
                row.update(status="failed", reason=f"{self.name}: {e}", state=None)
            end = time.time()
            _add_json(row, "timings", self.name, round(end - start, 4))
            _add_json(row, "trace", self.name, [self.actor, self.ready, start, end])
        return to_table(rows)

    def prepare(self, rows: list[dict[str, Any]]) -> None:
        """Work shared by the rows of one batch (e.g. one text-encoder call)."""

    def step(self, row: dict[str, Any], state: dict[str, Any]) -> None:
        raise NotImplementedError


class LazyText:
    """The shared text encoder, loaded on first use: only the text stage encodes prompts, so
    the other stages' actors skip loading MiniLM (measured: most of an actor's start-up)."""

    def __init__(self, preset: str, device: str):
        self.preset, self.device = preset, device

    def __call__(self, prompts):
        from cineray.pipelines.stages import shared_text_encoder

        return shared_text_encoder(self.preset, str(self.device))(prompts)


def _add_json(row: dict, column: str, key: str, value) -> None:
    data = json.loads(row[column]) if row.get(column) else {}
    data[key] = value
    row[column] = json.dumps(data)


class CheckRows:
    """Validate rows, run the safety filter, load images, skip rows whose MP4 exists (no
    model: a light actor). Input rows: {"row_id", "raw" (JSON), "error"}."""

    def __init__(self, config: CinerayConfig, out: str):
        self.config, self.cfg, self.out = config, config.batch, out
        self.storage = Storage(config.storage)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for item in batch.to_pylist():
            raw = json.loads(item["raw"]) if item["raw"] is not None else None
            row, request = check_row({**item, "raw": raw}, self.cfg, self.storage, self.out)
            if request is not None:
                row["state"] = pickle.dumps({"request": request}, protocol=5)
            elif row["status"] == "done":
                self.recall(row)
            rows.append(row)
        return to_table(rows)

    def recall(self, row: dict[str, Any]) -> None:
        """A row committed by an earlier run: its record, or (killed between the MP4 and the
        record) the watermark payload read back from the MP4, and the record repaired."""
        marker = marker_uri(self.storage, self.out, row["row_id"])
        try:
            record = json.loads(self.storage.read_bytes(marker))
        except FileNotFoundError:
            from cineray.pipelines.provenance import detect_mp4

            data = self.storage.read_bytes(row["uri"])
            payload = detect_mp4(data, self.config.provenance).payload
            record = {**{k: row.get(k) for k in ("row_id", "uri", "seed", "job_id", "prompt")},
                      "watermark_payload": None if payload is None else str(payload)}
            self.storage.write_bytes(marker, json.dumps(record).encode())
        row.update(watermark_payload=record.get("watermark_payload"),
                   frames=record.get("frames", row.get("frames")),
                   fps=record.get("fps", row.get("fps")),
                   timings=json.dumps(record.get("timings") or {}))


class TextEncode(_Stage):
    """encode_text, batched: one MiniLM call for every prompt and negative prompt of the batch
    fills the encoder's cache, then each row's embedding is read from it."""

    name = "encode_text"

    def prepare(self, rows):
        prompts = []
        for row in rows:
            request = pickle.loads(row["state"])["request"]
            prompts += [request.prompt, request.negative_prompt]
        if prompts:
            self.components.text(prompts)

    def step(self, row, state):
        from cineray.pipelines.stages import encode_text

        state["text"] = encode_text(self.components, state["request"])


class Denoise(_Stage):
    """Every window of the row's plan: the keyframe pass first (when the clip spans several
    windows), then the windows with denoise_windows (jointly where the plan shares latents)
    -- a pure function of its inputs."""

    name = "denoise"

    def __init__(self, config, out, components=None):
        device = "cuda" if config.batch.denoise.num_gpus > 0 else "cpu"
        super().__init__(config, out, device, components)
        from cineray.pipelines.generate import manifest_info
        from cineray.pipelines.stages import GenerationRequest

        self.model_id = manifest_info(self.components, GenerationRequest("x")).model_id

    def step(self, row, state):
        from cineray.pipelines.generate import Timer, _Steps, check_request, plan_keyframes
        from cineray.pipelines.stages import denoise_windows, image_latent
        from cineray.pipelines.windows import plan_windows

        c, request, text = self.components, state["request"], state["text"]
        check_request(c, request)  # safety again: a blocked prompt never reaches the denoiser
        plan = plan_windows(request.frames, request.fps, c.windows)
        first = None if request.image is None else image_latent(c, request.image)
        # the coarse pass first, exactly as generate() runs it
        keyframes = plan_keyframes(c, request, text, plan, first, Timer(), _Steps(None, 1))
        state["latents"] = denoise_windows(c, request, text, plan.windows, keyframes,
                                           request.seed, plan.shared)  # [(1, C, T', h, w)]
        state.update(plan=plan, model_id=self.model_id)
        del state["text"]


class Decode(_Stage):
    """decode each window's latents and blend the overlaps -> base video (1, 3, T, H, W)."""

    name = "decode"

    def step(self, row, state):
        import torch

        from cineray.pipelines.stages import decode
        from cineray.pipelines.windows import Blender

        blender, plan = Blender(state["plan"]), state["plan"]
        parts = [blender.add(w, decode(self.components, z))
                 for w, z in zip(plan.windows, state.pop("latents"), strict=True)]
        state["video"] = torch.cat(parts, dim=2)


class Upscale(_Stage):
    """The upscaler cascade the row asks for (none | spatial | full), chunked exactly as the
    one-process path does -> uint8 frames (T, H, W, 3) and their fps."""

    name = "upscale"

    def __init__(self, config, out, components=None):
        device = "cuda" if config.batch.upscale.num_gpus > 0 else "cpu"
        super().__init__(config, out, device, components)

    def step(self, row, state):
        from cineray.pipelines.generate import Timer, finish

        request = state["request"]
        result = finish(self.components, request, iter([state.pop("video")]), request.frames,
                        Timer(), state["plan"])
        state.update(frames=result.frames, fps=result.fps)


class Package(_Stage):
    """provenance.package (watermark + mux + C2PA signature: always) and the atomic write.

    The MP4's existence is the row's commit point: it is written once, under its final key,
    only if no earlier attempt committed it; the row's record (rows/<row_id>.json) follows."""

    name = "package"
    needs_components = False

    def step(self, row, state):
        from cineray.pipelines import provenance

        request, uri, model = state["request"], row["uri"], state["model_id"]
        info = provenance.ManifestInfo(model, request.prompt, row["job_id"],
                                       provenance.Payload.for_job(model, row["job_id"]))
        if self.storage.exists(uri):  # a retried task after a committed write: never rewrite
            row["resumed"] = True
        else:
            data = provenance.package(state["frames"], state["fps"], info, self.config.provenance)
            self.storage.write_bytes(uri, data)
        row["watermark_payload"] = str(info.payload)
        row.update(status="done", fps=float(state["fps"]), frames=len(state["frames"]))
        state.clear()
        record = {k: row[k] for k in ("row_id", "uri", "seed", "frames", "fps", "job_id",
                                      "watermark_payload", "prompt")}
        record["timings"] = json.loads(row["timings"] or "{}")
        self.storage.write_bytes(marker_uri(self.storage, self.out, row["row_id"]),
                                 json.dumps(record).encode())
