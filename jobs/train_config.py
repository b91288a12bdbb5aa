"""Config sections of the training job (no Ray or DeepSpeed imports: cineray.config loads them).

Resolved at the entry point like every section (``train.zero_stage=3`` on the command line).
"""

from __future__ import annotations

from dataclasses import dataclass, field

COMPONENTS = ("vae", "denoiser", "upscaler_spatial", "upscaler_temporal")


@dataclass
class DataConfig:
    """Input pipeline knobs (the dataset location is TrainConfig.data_uri).

    cache: decode every clip once and keep the decoded dataset in Ray's object store; epochs then
        iterate from memory (temporal crops and caption choices are still drawn per epoch).
    max_bad_fraction: fraction of clips allowed to fail decoding before the run stops.
    decode_cpus: CPUs reserved per decode task (fractional, so decoding never starves trainers).
    decode_batch_size: rows per decode task (and per Ray Data block).
    prefetch_batches, shuffle_buffer: worker-side iteration settings (0: no local shuffle).
    include_heldout: train on held-out (colour, shape, motion) combinations too (normally False).
    limit: use only the first N selected clips (0 = all); for smoke runs and benchmarks.
    """

    cache: bool = True
    max_bad_fraction: float = 0.05
    decode_cpus: float = 0.5
    decode_batch_size: int = 16
    prefetch_batches: int = 2
    shuffle_buffer: int = 64
    include_heldout: bool = False
    limit: int = 0

    def __post_init__(self):
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
        if self.decode_cpus <= 0:
            raise ValueError(f"data.decode_cpus={self.decode_cpus} must be > 0")


@dataclass
class TrainConfig:
    """One training run of one component. Steps count optimizer steps.

    storage_path: where runs live (local dir or s3://bucket/prefix; relative paths resolve under
        storage.root); checkpoints, metrics.jsonl and loss.png go to ``storage_path/run_name``.
        Re-running with the same run_name resumes from its newest checkpoint.
    data_uri: dataset root written by jobs.make_dataset (holds index.parquet), relative paths
        under storage.root.
    batch_size: clips per worker per micro-batch; a step sees batch_size*grad_accum*num_workers.
    threads_per_worker: torch intra-op threads per worker (1 on a 2-core box with 2 workers).
    cpus_per_worker: Ray CPUs reserved per worker (leave some for decoding when data.cache=false).
    precision: "fp32" or "bf16" (fp16 has no CPU support in DeepSpeed).
    decay_steps: with cosine=false, the LR stays flat after warm-up and then falls linearly to
        min_lr_ratio over the last decay_steps steps before max_steps (warmup-stable-decay,
        Hägele et al. 2024): a run can go on at a flat LR and be cooled down when it is to ship.
    ema_decay: the target decay; the decay actually used at step s is
        min(ema_decay, (1 + s) / (10 + s)), because a fixed 0.999 lags far behind early on.
    init_from: a directory written by export (model.safetensors) to warm-start from; the
        optimizer starts fresh and the LR warms up over warmup_steps again.
    compile: torch.compile the model's forward (in place, so parameter names, checkpoints and
        exports stay the same); the first step spends about a minute compiling. ZeRO stages
        0-2 only.
    """

    component: str = "denoiser"
    run_name: str = "tiny-denoiser"
    storage_path: str = "runs"
    data_uri: str = "dataset"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 1
    zero_stage: int = 2
    precision: str = "fp32"
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 50
    max_steps: int = 1000
    cosine: bool = True
    min_lr_ratio: float = 0.1
    decay_steps: int = 0
    ema_decay: float = 0.999
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    max_failures: int = 2
    seed: int = 0
    init_from: str | None = None
    compile: bool = False
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        if self.component not in COMPONENTS:
            raise ValueError(f"train.component={self.component!r}: use one of {COMPONENTS}")
        if self.precision not in ("fp32", "bf16"):
            hint = " (fp16 has no CPU support in DeepSpeed; use bf16)" if self.precision == "fp16" else ""
            raise ValueError(f"train.precision={self.precision!r}: use fp32 or bf16{hint}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage={self.zero_stage}: use 0, 1, 2 or 3")
        for name in ("num_workers", "threads_per_worker", "batch_size", "grad_accum", "max_steps",
                     "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.decay_steps < 0 or (self.decay_steps and self.cosine):
            raise ValueError(f"train.decay_steps={self.decay_steps}: use a count >= 0, and only "
                             "with train.cosine=false (the cosine already decays)")
        if self.compile and self.zero_stage == 3:
            raise ValueError("train.compile=true needs train.zero_stage <= 2 (ZeRO-3 gathers "
                             "parameters inside the forward, which the compiled graph would skip)")
        if not self.run_name or "/" in self.run_name:
            raise ValueError(f"train.run_name={self.run_name!r} must be a non-empty name, no '/'")
