"""The Serve application: every stage deployment, the Orchestrator and the Ingress, wired.

    serve run cineray.cluster.app:build                        # typed args, key=value
    serve run cineray.cluster.app:build denoiser_max_replicas=4 use_gpu=true
    serve run infra/serve/local.yaml                           # or serve deploy (a cluster)

Per-deployment settings (replicas, resources) in a Serve config YAML override what build()
sets, by deployment name. Each stage gets its own autoscaling_config, max_ongoing_requests,
ray_actor_options and a graceful_shutdown_timeout_s longer than its longest step.
"""

# No `from __future__ import annotations` here: Serve reads build()'s parameter annotation at
# run time to parse `key=value` arguments into AppArgs.
import dataclasses
import logging
import os
import secrets

from pydantic import BaseModel, Field, field_validator
from ray import serve

from cineray.cluster.deployments import STAGES
from cineray.cluster.ingress import Ingress
from cineray.cluster.orchestrator import Orchestrator

logger = logging.getLogger("ray.serve")
TOKEN_ENV = "CINERAY_API_TOKEN"


class AppArgs(BaseModel):
    """Arguments of build() (`serve run cineray.cluster.app:build key=value ...`)."""

    checkpoint: str | None = Field(None, description="Exported components folder "
                                   "(default: the shipped checkpoints/cineray-tiny).")
    storage_root: str = Field("cineray-data", description="Local folder or s3://bucket/prefix.")
    storage_endpoint_url: str | None = None
    token: str | None = Field(None, description=f"API bearer token (default: ${TOKEN_ENV}, "
                              "else a generated one, printed).")
    budget: int = Field(257 * 64 * 64, ge=1, description="Max frames x width x height.")
    queue_limit: int = Field(8, ge=1, description="Unfinished jobs per Ingress replica.")
    retry_after_s: int = Field(5, ge=1)
    window_retries: int = Field(3, ge=0, description="Resends of a window whose replica died.")
    denoiser_min_replicas: int = Field(1, ge=0)
    denoiser_max_replicas: int = Field(2, ge=1)
    upscaler_min_replicas: int = Field(1, ge=0, description="0: started on first use.")
    min_replicas: int = Field(1, ge=0, description="Every other stage.")
    max_replicas: int = Field(2, ge=1, description="Every other stage.")
    num_cpus: float = Field(0.1, gt=0, description="CPUs per replica (fractional on one box).")
    use_gpu: bool = Field(False, description="Denoiser, Decoder, upscalers: one GPU fraction.")
    gpu_fraction: float = Field(0.5, gt=0, le=1)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    log_encoding: str = Field("JSON", pattern="^(JSON|TEXT)$")
    watermark_key: int | None = Field(None, ge=0, description="Secret watermark key (default: "
                                      "$CINERAY_WATERMARK_KEY, else the public default key).")
    c2pa_cert_chain: str | None = Field(None, description="PEM certificate chain, leaf first "
                                        "(default: $CINERAY_C2PA_CERT, else a local CA).")
    c2pa_private_key: str | None = Field(None, description="PEM private key of the leaf.")
    c2pa_keys_dir: str | None = Field(None, description="The local CA's folder when no chain "
                                      "is given (default: cineray-data/provenance).")

    @field_validator("denoiser_max_replicas")
    @classmethod
    def _max(cls, v, info):
        low = info.data.get("denoiser_min_replicas", 1)
        if v < low:
            raise ValueError(f"denoiser_max_replicas ({v}) must be >= denoiser_min_replicas "
                             f"({low})")
        return v

    def provenance(self) -> dict:
        """The `provenance` config section the Watermarker signs and marks with (plain dict;
        absolute paths, since replicas may not share the caller's working directory)."""
        from cineray.pipelines.provenance import ProvenanceConfig

        paths = [None if p is None else os.path.abspath(p)
                 for p in (self.c2pa_cert_chain, self.c2pa_private_key, self.c2pa_keys_dir)]
        cfg = ProvenanceConfig(self.watermark_key, *paths)
        return dataclasses.asdict(cfg)

    @classmethod
    def with_provenance(cls, cfg, **kwargs) -> "AppArgs":
        """AppArgs whose provenance fields come from a ProvenanceConfig (the config section)."""
        return cls(watermark_key=cfg.watermark_key, c2pa_cert_chain=cfg.cert_chain,
                   c2pa_private_key=cfg.private_key, c2pa_keys_dir=cfg.keys_dir, **kwargs)


# Per stage: (max_ongoing_requests, graceful_shutdown_timeout_s, uses an accelerator).
# Denoiser takes one window at a time, so N windows on K replicas run K at a time.
STAGE_LIMITS = {
    "SafetyFilter": (32, 10, False), "TextEncoder": (32, 30, False), "Planner": (32, 10, False),
    "Denoiser": (1, 300, True), "Decoder": (4, 120, True), "UpscalerSpatial": (2, 120, True),
    "UpscalerTemporal": (2, 120, True), "Watermarker": (4, 120, False), "Muxer": (8, 60, False),
}


def _autoscaling(args: AppArgs, low: int, high: int, target: float) -> dict:
    return {"min_replicas": low, "initial_replicas": low, "max_replicas": max(high, low, 1),
            "target_ongoing_requests": target, "upscale_delay_s": args.upscale_delay_s,
            "downscale_delay_s": args.downscale_delay_s, "metrics_interval_s": 2.0,
            "look_back_period_s": 10.0}


def resolve_token(token: str | None) -> str:
    token = token or os.environ.get(TOKEN_ENV)
    if not token:
        token = secrets.token_urlsafe(24)
        print(f"cineray API token (set {TOKEN_ENV} to choose one): {token}", flush=True)
    return token


def build(args: AppArgs):
    """The cineray Serve application (Ingress at the root)."""
    if isinstance(args, dict):  # called directly with plain arguments
        args = AppArgs(**args)
    from cineray.pipelines.weights import DEFAULT_CHECKPOINT
    from cineray.storage import is_s3

    ckpt = os.path.abspath(args.checkpoint or str(DEFAULT_CHECKPOINT))
    root = args.storage_root if is_s3(args.storage_root) else os.path.abspath(args.storage_root)
    storage = {"root": root, "endpoint_url": args.storage_endpoint_url}
    logging_config = {"encoding": args.log_encoding, "log_level": "INFO"}
    bound = {}
    for name, dep in STAGES.items():
        ongoing, grace, accel = STAGE_LIMITS[name]
        low, high = args.min_replicas, args.max_replicas
        if name == "Denoiser":
            low, high = args.denoiser_min_replicas, args.denoiser_max_replicas
        elif name.startswith("Upscaler"):
            low = args.upscaler_min_replicas
        actor = {"num_cpus": args.num_cpus}
        if accel and args.use_gpu:
            actor["num_gpus"] = 1.0 if name == "Denoiser" else args.gpu_fraction
        dep = dep.options(
            autoscaling_config=_autoscaling(args, low, high, 1 if ongoing == 1 else ongoing / 2),
            max_ongoing_requests=ongoing, ray_actor_options=actor,
            graceful_shutdown_timeout_s=grace, logging_config=logging_config)
        args_of = {"Muxer": (storage,), "SafetyFilter": (),
                   "Watermarker": (ckpt, args.provenance())}
        bound[name] = dep.bind(*args_of.get(name, (ckpt,)))
    orch = Orchestrator.options(
        autoscaling_config=_autoscaling(args, 1, args.max_replicas, 2),
        max_ongoing_requests=4, max_queued_requests=args.queue_limit,
        ray_actor_options={"num_cpus": args.num_cpus}, graceful_shutdown_timeout_s=600,
        logging_config=logging_config).bind(bound, storage, args.window_retries)
    ingress = serve.deployment(Ingress, name="Ingress").options(
        autoscaling_config=_autoscaling(args, 1, args.max_replicas, 50),
        max_ongoing_requests=200, ray_actor_options={"num_cpus": args.num_cpus},
        graceful_shutdown_timeout_s=30, logging_config=logging_config)
    handles = {k: bound[k] for k in ("SafetyFilter", "Planner", "Watermarker")}
    return ingress.bind({**handles, "Orchestrator": orch}, storage,
                        resolve_token(args.token), args.budget, args.queue_limit,
                        args.retry_after_s)
