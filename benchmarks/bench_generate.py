"""Generation cost as clips grow: time per frame and peak memory for 17, 65 and 257 frames.

Windows stream through decode and blending, so both should stay flat with length: the goal is
time per frame and peak memory within 1.3x of the one-window clip (windows overlapping by 1
frame; the default 5-frame overlap denoises 17 frames per 12 delivered, so expect ~1.4x more
there: both are measured). Tiny components with random
weights (an empty checkpoint folder), base resolution 32x32, the default sampler (20 Euler steps
with classifier-free guidance), torch on one thread.

Memory: each length runs in a fresh process, which renders it once to warm up (lazy allocations
of the kernels and the text encoder are a one-off ~60 MB that would hide the working set); the
peak is VmHWM during the next render (reset through /proc/self/clear_refs) minus the RSS before
it. These processes run with MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns freed activation
buffers to the system and RSS follows live memory (with its default dynamic threshold the freed
heap stays mapped and the peak measures fragmentation); the timing process keeps glibc's
defaults. tracemalloc's peak (numpy and Python objects; torch's CPU allocator is not traced) is
recorded beside it.

Time: one process renders the three lengths in turn, `repeats` rounds, each render with a new
prompt (every request pays its text encoding); the fastest round per length counts. Interleaving
keeps a change in the machine's load from favouring one length. CPU time of the single-threaded
process is the figure compared; wall time on a shared machine mostly measures the other load
(both are recorded).

    python benchmarks/bench_generate.py [--repeats 3] [--steps 20]
writes benchmarks/results/generate.json and generate.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

LENGTHS = (17, 65, 257)  # 16, 64 and 256 frame intervals: 1, 5 and 21 windows of 17
# 65 frames with other window settings (WindowConfig keyword arguments): the 1-frame overlap the
# goal was set for, and that with keyframes on window starts only (a 5-frame keyframe pass).
VARIANTS = {"65-overlap-1": {"overlap": 1},
            "65-overlap-1-keyframe-stride-16": {"overlap": 1, "keyframe_stride": 16}}
RESULTS = Path(__file__).resolve().parent / "results"


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _load(steps: int):
    import torch

    from cineray.pipelines.stages import Components, GenerationRequest

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as empty:
        components = Components.load(empty, seed=0)

    def request(frames: int, take: int) -> GenerationRequest:
        return GenerationRequest(f"a red ball falling and bouncing, take {take}", frames=frames,
                                 steps=steps)

    return components, request


def measure_memory(frames: int, steps: int) -> dict:
    """Peak memory of one render of `frames` frames, in this (fresh) process."""
    from cineray.pipelines.generate import generate

    components, request = _load(steps)
    generate(components, request(frames, 0))  # warm-up
    rss0 = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    tracemalloc.start()
    result = generate(components, request(frames, 1))
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    output = result.frames.nbytes + result.preview.nbytes  # must grow with length
    return {"frames": frames, "peak_rss_delta_mb": (_status_kb("VmHWM") - rss0) / 1024,
            "tracemalloc_peak_mb": traced / 2**20, "output_mb": output / 2**20,
            "tracemalloc_peak_minus_output_mb": (traced - output) / 2**20}


def measure_time(lengths: tuple[int, ...], repeats: int, steps: int) -> list[dict]:
    """CPU and wall time of each length, interleaved over `repeats` rounds, in this process.
    Then 65 frames with each of VARIANTS' window settings."""
    from dataclasses import replace

    from cineray.pipelines.generate import generate
    from cineray.pipelines.windows import WindowConfig

    components, request = _load(steps)
    cases = [(str(n), n, components) for n in lengths] + [
        (name, 65, replace(components, windows=WindowConfig(**kw))) for name, kw in VARIANTS.items()]
    generate(components, request(lengths[0], 0))  # warm-up
    cpu, wall, results = {c[0]: [] for c in cases}, {c[0]: [] for c in cases}, {}
    for r in range(repeats):
        for name, n, comps in cases:
            t0, c0 = time.perf_counter(), time.process_time()
            results[name] = generate(comps, request(n, 1 + r))
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return [{"case": name, "frames": n, "steps": steps,
             "windows": len(results[name].plan.windows),
             "window_passes": len(results[name].plan.all_windows()),
             "keyframe_pass_frames": results[name].plan.keyframes.count
             if results[name].plan.keyframes else 0,
             "cpu_ms_per_frame": 1000 * min(cpu[name]) / n,
             "wall_ms_per_frame": 1000 * min(wall[name]) / n,
             "cpu_runs_s": cpu[name], "wall_runs_s": wall[name],
             "timings_s": results[name].timings} for name, n, _ in cases]


def _child(args: list[str], env: dict[str, str] | None = None) -> object:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True,
                         text=True, env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["frames"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    series = [("cpu_ms_per_frame", "CPU time per frame (ms)"),
              ("peak_rss_delta_mb", "peak RSS over the loaded process (MB)")]
    for ax, (key, label) in zip(axes, series, strict=True):
        ax.plot(x, [r[key] for r in rows], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_ylim(0, max(r[key] for r in rows) * 1.4)
        ax.set_xlabel("clip frames")
        ax.set_title(label)
    fig.suptitle("cineray generate, tiny random components, 32x32, 1 thread")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--memory", type=int, help=argparse.SUPPRESS)  # child: one length's memory
    ap.add_argument("--time", action="store_true", help=argparse.SUPPRESS)  # child: timings
    args = ap.parse_args()
    if args.memory:
        print(json.dumps(measure_memory(args.memory, args.steps)))
        return
    if args.time:
        print(json.dumps(measure_time(LENGTHS, args.repeats, args.steps)))
        return
    # Only the memory runs change the allocator: mmapping every freed buffer costs page faults
    # (measured: ~1.5x CPU time), which would distort the timings.
    memory = [_child(["--memory", str(n), "--steps", str(args.steps)],
                     {"MALLOC_MMAP_THRESHOLD_": "65536"}) for n in LENGTHS]
    timing = _child(["--time", "--repeats", str(args.repeats), "--steps", str(args.steps)])
    rows = [{**t, **m} for t, m in zip(timing[: len(LENGTHS)], memory, strict=True)]
    base = rows[0]
    ratios = {r["case"]: {
        "cpu_time_per_frame": r["cpu_ms_per_frame"] / base["cpu_ms_per_frame"],
        "wall_time_per_frame": r["wall_ms_per_frame"] / base["wall_ms_per_frame"],
        "peak_rss_delta": r["peak_rss_delta_mb"] / base["peak_rss_delta_mb"],
    } for r in rows}
    variants = timing[len(LENGTHS):]
    for v in variants:
        ratios[v["case"]] = {
            "cpu_time_per_frame": v["cpu_ms_per_frame"] / base["cpu_ms_per_frame"],
            "wall_time_per_frame": v["wall_ms_per_frame"] / base["wall_ms_per_frame"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"goal": "time per frame and peak memory within 1.3x of the 17-frame clip",
              "rows": rows, "variants": variants, "ratios_vs_17": ratios}
    (RESULTS / "generate.json").write_text(json.dumps(report, indent=2))
    plot(rows, RESULTS / "generate.png")
    for r in rows:
        q = ratios[r["case"]]
        print(f"{r['frames']:4d} frames ({r['window_passes']:2d} window passes): "
              f"{r['cpu_ms_per_frame']:5.1f} ms CPU/frame x{q['cpu_time_per_frame']:.2f} "
              f"(wall {r['wall_ms_per_frame']:.1f} x{q['wall_time_per_frame']:.2f}); peak RSS "
              f"+{r['peak_rss_delta_mb']:.1f} MB x{q['peak_rss_delta']:.2f}; traced "
              f"{r['tracemalloc_peak_mb']:.2f} MB of which output {r['output_mb']:.2f} MB")
    for v in variants:
        q = ratios[v["case"]]
        print(f"  {v['case']} ({v['window_passes']} passes, a {v['keyframe_pass_frames']}-frame "
              f"keyframe pass): {v['cpu_ms_per_frame']:.1f} ms CPU/frame "
              f"x{q['cpu_time_per_frame']:.2f}")


if __name__ == "__main__":
    main()
