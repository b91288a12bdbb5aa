"""Evaluate a checkpoint on the world's prompt suite; write a JSON + Markdown report and a
contact sheet.

    python -m cineray.jobs.evaluate --checkpoint checkpoints/cineray-tiny --out reports/eval \\
        [--sources model,real,random] [--per-case 16] [--seed 0] [--steps N] [--threads 1] \\
        [--config tiny] [--set world.holdout=[...]]

    OUT/report.json        every per-clip verdict, figures per case and source, bars pass/fail
    OUT/report.md          one table per case (rows = metrics, columns = sources) and the bars
    OUT/contact_sheet.png  frames of the first clips of every case, per source, with verdicts

The suite (eval_suite.py) is drawn from the world of the config (its holdout list must be the
one the checkpoint was trained with); each source (eval_sources.py) renders every item, and one
judge (eval_report.py) scores them all. One process: the tiny models run a clip in ~1 s on one
CPU thread, so spreading items over Ray workers would gain little on a small machine; a batch
over a large suite can map `judge(item, source(item))` over items the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

from cineray.jobs.eval_report import (
    aggregate,
    check_bars,
    contact_sheet,
    judge,
    markdown,
    verdict_text,
)
from cineray.jobs.eval_sources import make_sources, parse_sources
from cineray.jobs.eval_suite import CASES, SuiteConfig, build_suite
from cineray.pipelines.weights import DEFAULT_CHECKPOINT
from cineray.storage import Storage
from cineray.world import WorldConfig

DEFAULT_SOURCES = "model,real,random"
# 16 per case: every held-out combination and camera twice, and one miss still clears a 90% bar.
# Measured (tiny components, 20 sampler steps with guidance, one torch thread): ~0.6 s of CPU
# per 17-frame clip and ~2.8 s per 65-frame clip to generate, ~0.3 s to judge a valid clip; so
# model + real + random take ~3.5 CPU-minutes (about as many wall minutes on an idle 2-core
# machine; 7-12 on a busy shared one).
DEFAULT_PER_CASE = 16
SHEET_ITEMS = 2  # clips per case on the contact sheet


def run_evaluation(checkpoint: str | os.PathLike | None, out: str,
                   sources: str | Sequence[str] = DEFAULT_SOURCES,
                   per_case: int = DEFAULT_PER_CASE, seed: int = 0,
                   world: WorldConfig | None = None, steps: int | None = None,
                   storage: Storage | None = None,
                   log: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """Render the suite with every source, judge each clip, write the report files under `out`
    (a local path or s3:// URI) and return the report dict (what report.json holds)."""
    t0 = time.perf_counter()
    names = parse_sources(sources)
    cfg = SuiteConfig(per_case=per_case, seed=seed)
    checkpoint = DEFAULT_CHECKPOINT if checkpoint is None else checkpoint
    built = make_sources(names, checkpoint, cfg.windows, seed, steps)
    items = build_suite(world, cfg)
    expected = {it.id: it.expected for it in items}
    shown = {it.id for c in CASES for it in [i for i in items if i.case == c][:SHEET_ITEMS]}
    verdicts, sheet, runtime = {}, {}, {}
    for source in built:
        start, cpu, made = time.perf_counter(), time.process_time(), 0.0
        verdicts[source.name] = []
        for item in items:
            clip = source(item)
            made += clip.seconds
            v = judge(item, clip)
            verdicts[source.name].append(v)
            if item.id in shown:
                sheet[(item.id, source.name)] = (clip.frames, verdict_text(v))
            if log:
                log(f"[{source.name}] {item.id} {verdict_text(v)} ({clip.seconds:.1f} s)")
        total = time.perf_counter() - start
        runtime[source.name] = {"seconds": round(total, 1), "make_seconds": round(made, 1),
                                "judge_seconds": round(total - made, 1),
                                "cpu_seconds": round(time.process_time() - cpu, 1)}  # fmt: skip
    aggregates = {name: aggregate(vs, expected) for name, vs in verdicts.items()}
    report = {
        "run": {"checkpoint": str(checkpoint), "sources": names, "per_case": per_case,
                "seed": seed, "steps": steps, "seconds": round(time.perf_counter() - t0, 1),
                "runtime": runtime},
        "bars": check_bars(aggregates),
        "aggregates": aggregates,
        "suite": [it.to_json() for it in items],
        "verdicts": verdicts,
    }  # fmt: skip
    rows = [(f"{src} {it.id}: {sheet[(it.id, src)][1]}", it.prompt, sheet[(it.id, src)][0])
            for it in items if it.id in shown for src in names]  # fmt: skip
    write_report(report, rows, out, storage or Storage())
    return report


def write_report(report: dict, sheet_rows, out: str, storage: Storage) -> dict[str, str]:
    """Write report.json, report.md and contact_sheet.png atomically; their URIs."""
    files = {
        "report.json": json.dumps(report, indent=1, allow_nan=False).encode(),
        "report.md": markdown(report).encode(),
        "contact_sheet.png": contact_sheet(sheet_rows),
    }
    return {name: storage.write_bytes(storage.join(out, name), data)
            for name, data in files.items()}  # fmt: skip


def evaluate(checkpoint: str | None, out: str, sources: str = DEFAULT_SOURCES,
             per_case: int = DEFAULT_PER_CASE, seed: int = 0, steps: int | None = None,
             threads: int = 1, config: str = "tiny", overrides: Sequence[str] = (),
             log: Callable[[str], None] | None = None) -> str:  # fmt: skip
    """What `cineray evaluate` and `python -m cineray.jobs.evaluate` run: plain arguments ->
    the report folder's URI. A relative local `out` is relative to the working directory."""
    import torch

    from cineray.config import load_config

    cfg = load_config(config, overrides)
    if checkpoint is not None and not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"--checkpoint {checkpoint!r} is not a folder; give the folder "
                                f"holding vae/, denoiser/, ... (as exported by training)")
    if threads > 0:  # the tiny models gain nothing from threads on a busy 2-core machine
        torch.set_num_threads(threads)
    storage = Storage(cfg.storage)
    if "://" not in out:
        out = os.path.abspath(out)
    run_evaluation(checkpoint, out, sources, per_case, seed, cfg.world, steps, storage, log)
    return storage.resolve(out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cineray.jobs.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--checkpoint", help="exported components folder (default: the shipped one)")
    p.add_argument("--out", required=True, help="report folder: a local path or s3://...")
    p.add_argument("--sources", default=DEFAULT_SOURCES,
                   help="comma-separated: model, real, random, reconstruct, upscale_spatial")
    p.add_argument("--per-case", type=int, default=DEFAULT_PER_CASE, help="clips per case")
    p.add_argument("--seed", type=int, default=0, help="same seed, same suite")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: 20)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    p.add_argument("--config", default="tiny", help="preset name or .yaml path (its world)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="config override (repeatable)")
    return p


def main(argv: list[str] | None = None) -> str:
    a = _parser().parse_args(argv)
    uri = evaluate(a.checkpoint, a.out, a.sources, a.per_case, a.seed, a.steps, a.threads,
                   a.config, a.overrides, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(uri)
    return uri


if __name__ == "__main__":
    from cineray.cli import USER_ERRORS

    try:
        main()
    except USER_ERRORS as e:  # bad input: one line, like the cineray CLI
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
