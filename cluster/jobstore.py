"""Job records as JSON in Storage: `jobs/<id>.json`, written atomically.

The record is the whole truth about a job, so any ingress replica (or a restarted one) answers
from storage alone. Writers: the ingress creates a record and marks cancellation; the
orchestrator running the job updates it. Cancellation is a separate marker file
(`jobs/<id>.cancel`), so a DELETE never races the orchestrator's progress writes: the
orchestrator reads the marker between stages and ends the job as cancelled.
"""

from __future__ import annotations

import json
import re
import secrets
import time

from cineray.storage import Storage

TERMINAL = ("completed", "failed", "cancelled")
_ID = re.compile(r"^video_[0-9a-f]{24}$")


def new_job_id() -> str:
    """`video_` + 24 hex digits (random; ids never encode the request)."""
    return "video_" + secrets.token_hex(12)


def is_job_id(job_id: str) -> bool:
    return bool(_ID.match(job_id))


def new_job(job_id: str, request: dict, *, model: str, size: str, frames: int, fps: float,
            seconds: float) -> dict:
    """A queued job object shaped like the HTTP API's (see cluster/api.py)."""
    return {
        "id": job_id, "object": "video", "model": model, "status": "queued", "progress": 0,
        "stage": "queued", "created_at": int(time.time()), "completed_at": None,
        "prompt": request["prompt"], "size": size, "seconds": seconds, "frames": frames,
        "fps": fps, "error": None, "preview_url": None, "content_url": None, "outputs": [],
        "timings": {}, "windows": [], "request": request,
    }


class JobStore:
    """Reads and writes job records under `<storage root>/jobs/`."""

    def __init__(self, storage: Storage, prefix: str = "jobs"):
        self.storage, self.prefix = storage, prefix

    def _uri(self, job_id: str, suffix: str) -> str:
        if not is_job_id(job_id):  # ids become file names: never let one escape the folder
            raise KeyError(job_id)
        return self.storage.join(self.prefix, f"{job_id}{suffix}")

    def put(self, job: dict) -> dict:
        self.storage.write_bytes(self._uri(job["id"], ".json"), json.dumps(job).encode())
        return job

    def get(self, job_id: str) -> dict:
        """The record; KeyError if there is none. A cancel request shows even before the
        orchestrator has acknowledged it."""
        try:
            job = json.loads(self.storage.read_bytes(self._uri(job_id, ".json")))
        except FileNotFoundError:
            raise KeyError(job_id) from None
        if job["status"] not in TERMINAL and self.cancel_requested(job_id):
            job.update(status="cancelled", stage="cancelled")
        return job

    def update(self, job_id: str, **fields) -> dict:
        job = self.get(job_id)
        job.update(fields)
        return self.put(job)

    def request_cancel(self, job_id: str) -> None:
        self.storage.write_bytes(self._uri(job_id, ".cancel"), b"cancelled\n")

    def cancel_requested(self, job_id: str) -> bool:
        return self.storage.exists(self._uri(job_id, ".cancel"))

    def put_blob(self, job_id: str, name: str, data: bytes) -> str:
        """A file that belongs to a job (input image, outputs): jobs/<id>/<name>."""
        self._uri(job_id, "")  # validates the id
        return self.storage.write_bytes(self.storage.join(self.prefix, job_id, name), data)

    def read(self, uri: str) -> bytes:
        return self.storage.read_bytes(uri)

    def list(self, limit: int = 20) -> tuple[list[dict], bool]:
        """Newest first (by created_at, then id); (jobs, has_more)."""
        try:
            names = self.storage.ls(self.prefix)
        except FileNotFoundError:
            return [], False
        jobs = []
        for uri in names:
            name = uri.rsplit("/", 1)[-1]
            if name.endswith(".json") and is_job_id(name[:-5]):
                try:
                    jobs.append(self.get(name[:-5]))
                except (KeyError, ValueError):  # removed or half-written by another writer
                    continue
        jobs.sort(key=lambda j: (j["created_at"], j["id"]), reverse=True)
        return jobs[:limit], len(jobs) > limit
