"""Submitting batch renders to a running Ray cluster as Ray jobs (`cineray submit batch`) and
reading their state (`cineray status JOB`), through Ray's JobSubmissionClient.

The job runs `python -m cineray.jobs.batch_render ...` on the cluster. Its runtime_env carries
no working_dir: cineray's top-level folders map onto `cineray.*` through the installed package
(an editable install's import hook, or the cluster image's install), which an uploaded working
directory would not reproduce. It carries the environment the job needs: the AWS_* variables
(S3 credentials and endpoint), CINERAY_* (signing material, watermark key) and the proxy
exclusions.
"""

from __future__ import annotations

import os
import shlex
import sys

FORWARDED_PREFIXES = ("AWS_", "CINERAY_")
FORWARDED_NAMES = ("NO_PROXY", "no_proxy")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def dashboard_address(address: str | None) -> str:
    """--address, else RAY_DASHBOARD_ADDRESS / RAY_ADDRESS when they hold an http URL, else the
    local dashboard's default."""
    for value in (address, os.environ.get("RAY_DASHBOARD_ADDRESS"), os.environ.get("RAY_ADDRESS")):
        if value and value.startswith(("http://", "https://")):
            return value
        if value and address is value:
            raise ValueError(f"--address {value!r} must be the dashboard's http:// URL, e.g. "
                             f"{DEFAULT_ADDRESS}")
    return DEFAULT_ADDRESS


def _absolute(uri: str) -> str:
    """Local paths become absolute here: the job's working directory is not the caller's."""
    return uri if "://" in uri else os.path.abspath(uri)


def batch_entrypoint(prompts: str, out: str, config: str = "tiny",
                     overrides: list[str] | tuple[str, ...] = (), python: str | None = None) -> str:
    """The job's shell command. python: the cluster's interpreter (default: this one, which is
    right for a cluster started from the same install)."""
    args = [python or sys.executable, "-m", "cineray.jobs.batch_render", "--prompts",
            _absolute(prompts), "--out", _absolute(out), "--config", config]
    for item in overrides:
        args += ["--set", item]
    return shlex.join(args)


def runtime_env(extra: dict[str, str] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k.startswith(FORWARDED_PREFIXES) or k in FORWARDED_NAMES}
    return {"env_vars": {**env, **(extra or {})}}


def submit_batch(prompts: str, out: str, config: str = "tiny",
                 overrides: list[str] | tuple[str, ...] = (), address: str | None = None,
                 python: str | None = None, submission_id: str | None = None) -> str:
    """Submit a batch render to the cluster's dashboard at `address`; returns the job id."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(dashboard_address(address))
    return client.submit_job(entrypoint=batch_entrypoint(prompts, out, config, overrides, python),
                             runtime_env=runtime_env(), submission_id=submission_id,
                             metadata={"cineray": "batch_render"})


def job_status(job_id: str, address: str | None = None, logs: bool = False) -> dict:
    """{"job_id", "status", "message", "summary" (the job's summary line, once printed),
    "logs" (when asked)}."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(dashboard_address(address))
    info = client.get_job_info(job_id)
    text = client.get_job_logs(job_id)
    summary = [line for line in text.splitlines() if line.startswith("batch: ")]
    report = {"job_id": job_id, "status": str(info.status.value), "message": info.message,
              "summary": summary[-1] if summary else None}
    if logs:
        report["logs"] = text
    return report
