"""Config section of the batch render job (no Ray imports: cineray.config loads it).

Resolved at the entry point like every section, e.g. ``--set batch.denoise.max=4``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PoolConfig:
    """One stage's Ray Data actor pool: it starts with `min` actors and grows towards `max`
    while rows wait in front of it (Ray Data's autoscaling actor pool).

    num_cpus: CPUs reserved per actor; fractional, so that every pool fits a small cluster:
        Ray Data starts each pool's `min` actors up front and a pool whose actor cannot be
        placed stalls the whole stream (seen: whole-CPU actors on a 2-CPU cluster hung).
    num_gpus: GPUs per actor (denoise and upscale only; 0 on CPU clusters)."""

    min: int = 1
    max: int = 1
    num_cpus: float = 0.2
    num_gpus: float = 0.0

    def check(self, name: str) -> None:
        if not 1 <= self.min <= self.max:
            raise ValueError(f"batch.{name}: need 1 <= min <= max, got min={self.min}, "
                             f"max={self.max}")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ValueError(f"batch.{name}: num_cpus must be > 0 and num_gpus >= 0, got "
                             f"{self.num_cpus} and {self.num_gpus}")


@dataclass
class BatchConfig:
    """The batch render job (jobs/batch_render.py).

    checkpoint: exported components folder (None: the shipped cineray-tiny).
    seed: rows without a seed get derive_seed(seed, row_id), so a re-run renders the same clip.
    steps: sampler steps for rows that give none (None: the sampler's default).
    width, height: base size of every clip (rows choose frames, fps, camera, ... not the size).
    text_batch: prompts per text-encoder call (one MiniLM forward for the whole batch).
    threads: torch threads per actor (1: actors share the cores; more threads only contend).
    """

    checkpoint: str | None = None
    preset: str = "tiny"
    seed: int = 0
    steps: int | None = None
    width: int = 32
    height: int = 32
    text_batch: int = 16
    threads: int = 1
    text: PoolConfig = field(default_factory=PoolConfig)
    denoise: PoolConfig = field(default_factory=lambda: PoolConfig(1, 2, 0.5))
    decode: PoolConfig = field(default_factory=PoolConfig)
    upscale: PoolConfig = field(default_factory=PoolConfig)
    package: PoolConfig = field(default_factory=PoolConfig)

    def __post_init__(self):
        for name in ("text", "denoise", "decode", "upscale", "package"):
            getattr(self, name).check(name)
        if self.text_batch < 1 or self.threads < 1:
            raise ValueError(f"batch.text_batch ({self.text_batch}) and batch.threads "
                             f"({self.threads}) must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"batch.steps must be >= 1 (or null), got {self.steps}")
