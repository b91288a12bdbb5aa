"""The serving DAG against the one-process pipeline, and a long clip on 2 Denoiser replicas vs 1.

1. Overhead: a default clip (17 frames, 32x32, default sampler, no upscaling) rendered end to
   end over HTTP (POST -> event stream -> MP4 download; safety, text, plan, denoise, decode,
   watermark, mux, sign, store in separate replicas) over the same clip rendered by
   generate.render_to_file in this process. Goal: ratio <= 1.10. Rounds interleave the two
   paths (so a change in the machine's load hits both) and each request has a new prompt (each
   pays its text encoding); the median per path counts.
2. Scaling: a long clip (129 frames: a keyframe pass and 11 windows; 8 with a 1-frame overlap)
   on 2 Denoiser replicas and on 1, end to end over HTTP; speed-up = time(1) / time(2), best of
   `repeats` each.

Shipped checkpoint (random upscalers are not used here), torch on one thread per process, a
local Ray with 2 CPUs. Wall times: the DAG spans processes, so CPU time of one process says
nothing; the load average at each measurement is recorded beside it.

    python benchmarks/bench_serve.py [--repeats 3] [--long-frames 129]
writes benchmarks/results/serve.json and serve.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _deploy(data: str, denoisers: int):
    from cineray.cluster.app import AppArgs
    from cineray.cluster.local import Client, deploy

    args = AppArgs(storage_root=data, token="bench", denoiser_min_replicas=denoisers,
                   denoiser_max_replicas=denoisers, max_replicas=1, upscaler_min_replicas=0,
                   log_encoding="TEXT")
    url, token = deploy(args, port=_deploy.port)
    return Client(url, token)


_deploy.port = 0


def _timed_http(client, body: dict) -> float:
    t0 = time.perf_counter()
    job, data = client.render(body)
    assert len(data) > 0 and job["status"] == "completed"
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long-frames", type=int, default=129)
    opts = ap.parse_args()

    import ray
    import torch

    from cineray.cluster.local import free_port
    from cineray.pipelines.generate import render_to_file
    from cineray.pipelines.stages import Components, GenerationRequest
    from cineray.storage import Storage, StorageConfig

    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    _deploy.port = free_port()
    data = tempfile.mkdtemp(prefix="bench-serve-")
    storage = Storage(StorageConfig(root=data))
    components = Components.load()
    client = _deploy(data, 2)

    def prompt(i: int) -> str:
        return f"a red ball falling and bouncing, take {i}"

    # Warm-up: first calls load kernels and caches on both paths.
    render_to_file(components, GenerationRequest(prompt(-1)), "warm.mp4", storage)
    _timed_http(client, {"prompt": prompt(-2), "seed": 0})
    local, dag, loads = [], [], []
    for r in range(opts.repeats):
        t0 = time.perf_counter()
        render_to_file(components, GenerationRequest(prompt(2 * r), seed=r), f"l{r}.mp4",
                       storage)
        local.append(time.perf_counter() - t0)
        dag.append(_timed_http(client, {"prompt": prompt(2 * r + 1), "seed": r}))
        loads.append(os.getloadavg()[0])
        print(f"round {r}: one process {local[-1]:.2f} s, DAG {dag[-1]:.2f} s, "
              f"load {loads[-1]:.1f}", flush=True)
    overhead = statistics.median(dag) / statistics.median(local)

    long_body = {"prompt": "a blue square moving left", "frames": opts.long_frames, "seed": 1}
    scaling = {}
    for n in (2, 1):
        client = _deploy(data, n)  # serve.run again: the Denoiser scales to n replicas
        _timed_http(client, {**long_body, "frames": 33})  # settle the new replica set
        times = [_timed_http(client, long_body) for _ in range(opts.repeats)]
        scaling[n] = {"seconds": times, "best": min(times), "load": os.getloadavg()[0]}
        print(f"{opts.long_frames} frames on {n} Denoiser replica(s): {min(times):.2f} s",
              flush=True)
    speedup = scaling[1]["best"] / scaling[2]["best"]
    result = {
        "overhead_ratio": round(overhead, 3), "overhead_goal": 1.10,
        "default_clip": {"one_process_s": local, "dag_s": dag, "load": loads},
        "long_clip_frames": opts.long_frames, "speedup_2_over_1": round(speedup, 3),
        "long_clip": {str(k): v for k, v in scaling.items()},
        "cpus": os.cpu_count(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(result, indent=2))
    _plot(result)
    print(json.dumps({k: result[k] for k in ("overhead_ratio", "speedup_2_over_1")}))
    from ray import serve

    serve.shutdown()


def _plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    c = result["default_clip"]
    a.bar(["one process", "Serve DAG"], [statistics.median(c["one_process_s"]),
                                         statistics.median(c["dag_s"])], color=["grey", "C0"])
    a.set_ylabel("seconds (median)")
    a.set_title(f"default clip: ratio {result['overhead_ratio']:.2f} (goal <= 1.10)")
    lc = result["long_clip"]
    b.bar(["1 Denoiser", "2 Denoisers"], [lc["1"]["best"], lc["2"]["best"]], color=["grey", "C1"])
    b.set_title(f"{result['long_clip_frames']} frames: speed-up {result['speedup_2_over_1']:.2f}x")
    fig.tight_layout()
    fig.savefig(RESULTS / "serve.png", dpi=100)


if __name__ == "__main__":
    main()
