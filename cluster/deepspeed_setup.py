"""DeepSpeed applied from outside to a plain nn.Module: config, initialisation, EMA, checkpoints.

Order of application (each step takes the previous one's output):
  1. ``ds_config(cfg, world_size)``: ZeRO stage, precision, torch AdamW, accumulation, clipping.
  2. ``apply_deepspeed(model, cfg, world_size)``: deepspeed.initialize with a warm-up/cosine LR
     (the model's forward compiled first when cfg.compile).
  3. ``EMA(engine, cfg.ema_decay, stage)``: fp32 shadow weights on rank 0, updated every step.
  4. ``save_shards`` / ``load_shards``: each rank's DeepSpeed shard (the exact resume state);
     ``full_state_dict`` consolidates the weights on rank 0 for export.

Under ZeRO-3 every rank holds a slice of each parameter; reading full weights (EMA update,
consolidation) is a collective gather that every rank must enter, even though only rank 0 keeps
the result. That is affordable for the small models trained here; a sharded EMA is the way out
for models whose full weights do not fit one rank.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

from cineray.jobs.train_config import TrainConfig

TAG = "ds"  # DeepSpeed's tag directory inside every checkpoint


def ds_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config dict. torch's AdamW ("torch_adam") needs no op compilation on CPU."""
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.lr, "betas": list(cfg.betas), "eps": 1e-8,
            "weight_decay": cfg.weight_decay, "torch_adam": True}},
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        # bf16 as autocast around the engine's forward: weights stay fp32 (so EMA, export and
        # resume see exact fp32 values) while Linear/Conv compute and their gradient
        # all-reduce run in bf16. Frozen helpers the task calls outside the engine (text
        # encoder, the denoiser's VAE) stay fp32, so no task has to cast its inputs.
        "torch_autocast": {"enabled": cfg.precision == "bf16", "dtype": "bfloat16"},
        "steps_per_print": 1 << 30,  # progress goes to our own metrics log
        "checkpoint": {"tag_validation": "Ignore"},
    }


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """LR multiplier at optimizer step s: linear warm-up, then cosine down to min_lr_ratio, or
    flat and, over the last decay_steps before max_steps, linearly down to min_lr_ratio."""

    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if not cfg.cosine:
            if not cfg.decay_steps:
                return 1.0
            left = min(1.0, max(0.0, (cfg.max_steps - step) / cfg.decay_steps))
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * left
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def apply_deepspeed(model: torch.nn.Module, cfg: TrainConfig, world_size: int):
    """Wrap ``model`` in a DeepSpeed engine (the process group must already exist)."""
    import deepspeed

    if cfg.compile:
        model.compile()  # in place: parameter names, state dicts and checkpoints stay the same
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config(cfg, world_size),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
    )
    return engine


@contextlib.contextmanager
def gathered(module: torch.nn.Module, zero_stage: int) -> Iterator[None]:
    """Full parameters visible inside the block (a collective under ZeRO-3: all ranks enter)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield
    else:
        yield


def full_state_dict(module: torch.nn.Module, zero_stage: int, rank: int) -> dict | None:
    """fp32 CPU copy of the whole state dict on rank 0 (None elsewhere); collective."""
    with gathered(module, zero_stage):
        if rank != 0:
            return None
        return {k: (v.float() if v.is_floating_point() else v).detach().cpu().clone()
                for k, v in module.state_dict().items()}


def ema_decay_at(decay: float, step: int) -> float:
    """min(decay, (1 + step) / (10 + step)): the average follows a young model closely (a
    fixed 0.999 lags thousands of steps behind early on) and settles at ``decay`` later."""
    return min(decay, (1 + step) / (10 + step))


class EMA:
    """Exponential moving average of the weights (decay schedule: ema_decay_at), kept in fp32
    on rank 0 only."""

    def __init__(self, module: torch.nn.Module, decay: float, zero_stage: int, rank: int):
        self.decay, self.zero_stage, self.rank = decay, zero_stage, rank
        self.shadow = full_state_dict(module, zero_stage, rank)

    def decay_at(self, step: int) -> float:
        return ema_decay_at(self.decay, step)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = self.decay_at(step)
        with gathered(module, self.zero_stage):
            if self.rank != 0:
                return
            for name, value in module.state_dict().items():
                shadow = self.shadow[name]
                if value.is_floating_point():
                    shadow.lerp_(value.detach().float().cpu(), 1 - d)
                else:  # integer buffers (counters) are copied, not averaged
                    shadow.copy_(value)


def save_shards(engine, directory: str, client_state: dict) -> None:
    """Every rank writes its DeepSpeed shard under ``directory/ds`` (collective)."""
    engine.save_checkpoint(directory, tag=TAG, client_state={"cineray": client_state})


def load_shards(engine, directory: str) -> dict:
    """Restore weights, optimizer and LR schedule from ``save_shards``; returns client_state."""
    path, client = engine.load_checkpoint(directory, tag=TAG)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}/{TAG}")
    return client["cineray"]
