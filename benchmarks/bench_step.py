"""One training step of the tiny denoiser by precision and compilation, as ratios to fp32 eager.

For choosing train.precision and train.compile on a given machine: forward, backward and AdamW
step of a batch of 32 clips (5 latent frames of 8x8) with the shipped patch [1, 2, 2] (80 tokens
a clip) and the finer [1, 1, 1] (320). bf16 runs as autocast, as the training job runs it, and
only where the CPU computes in bf16 (AVX512-BF16 or AMX); elsewhere torch emulates it hundreds
of times slower. The variants take turns step by step, so a load from other programs falls on
all of them alike; each figure is a median over the measured steps.

    python benchmarks/bench_step.py [--steps 8] [--threads 2]
writes benchmarks/results/step.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import torch

from cineray.models.dit import DIT_PRESETS, DiT, empty_frames
from cineray.models.text_encoder import TextEmbedding
from cineray.pipelines.conditioning import UNSPECIFIED, build_conditioning
from cineray.pipelines.training import native_bf16

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
BATCH = 32


def variants(bf16: bool) -> list[tuple[str, bool, bool]]:
    """(name, bf16, compiled) in the order they take turns."""
    out = [("fp32", False, False), ("fp32+compile", False, True)]
    if bf16:
        out += [("bf16", True, False), ("bf16+compile", True, True)]
    return out


def step_fn(patch: list[int], bf16: bool, compiled: bool):
    """A closure running one training step of a fresh tiny denoiser; returns its seconds."""
    cfg = dataclasses.replace(DIT_PRESETS["tiny"], patch=patch)
    torch.manual_seed(0)
    model = DiT(cfg)
    if compiled:
        model.compile()
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    c = cfg.latent_channels
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, c, 5, 8, 8, generator=gen)
    text = TextEmbedding(tokens=torch.randn(BATCH, 32, cfg.text_dim, generator=gen),
                         mask=torch.ones(BATCH, 32, dtype=torch.bool),
                         pooled=torch.randn(BATCH, cfg.text_dim, generator=gen))
    cond = build_conditioning(text, [UNSPECIFIED] * BATCH, [0.0] * BATCH, [50.0] * BATCH,
                              [8.0] * BATCH, empty_frames(BATCH, c, 5, 8, 8))
    t = torch.rand(BATCH, generator=gen)

    def run() -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = model(x, t, cond)
        loss = (out.float() - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t0

    return run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    bf16 = native_bf16("cpu")
    result = {"machine": f"{os.cpu_count()} CPUs, torch threads {a.threads}",
              "native_bf16": bf16, "batch": BATCH, "steps_measured": a.steps, "load_avg_1m": None,
              "patches": {}}
    for patch in ([1, 2, 2], [1, 1, 1]):
        runs = {name: step_fn(patch, b, c) for name, b, c in variants(bf16)}
        for run in runs.values():  # warm-up; compiles the compiled variants
            run()
        times = {name: [] for name in runs}
        for _ in range(a.steps):
            for name, run in runs.items():
                times[name].append(run())
        med = {name: statistics.median(v) for name, v in times.items()}
        result["patches"][str(patch)] = {
            name: {"step_s": round(s, 3), "speedup": round(med["fp32"] / s, 2)}
            for name, s in med.items()}
        print(patch, json.dumps(result["patches"][str(patch)]))
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "step.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
