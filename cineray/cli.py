"""The ``cineray`` command line: a thin entry point over the library.

Adding a command (the pattern every subcommand follows):

    @app.command()
    def train(
        component: str = typer.Argument(..., help="vae | denoiser | ..."),
        config: ConfigOption = "tiny",
        overrides: SetOption = None,
    ):
        \"\"\"One line that shows in `cineray --help`.\"\"\"
        cfg = resolve_config(config, overrides)       # typed CinerayConfig (plain dataclasses)
        from cineray.jobs.train import train as run   # import heavy modules inside the command
        start_ray()                                   # entry points start Ray, libraries never do
        run(component, cfg)

Commands raise ordinary exceptions; ``UserError`` (ConfigError included), ``ValueError`` and
file errors become ``error: <message>`` on stderr with exit code 2 (``--debug``: full traceback).
Keep each command a few lines: parse, build, call the library.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from cineray import __version__
from cineray.errors import UserError

# Exceptions that mean "bad input or environment": one line, exit code 2, no traceback.
USER_ERRORS = (
    UserError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
EXIT_USER_ERROR = 2


class _Group(TyperGroup):
    """Root command group: turns user errors raised by any subcommand into one stderr line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            if ctx.meta.get("cineray.debug"):
                raise
            message = str(e).strip() or type(e).__name__
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None


app = typer.Typer(
    name="cineray",
    cls=_Group,
    help="Distributed text-to-video rendering on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # --debug shows a plain traceback
)
config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

# Shared options: every command that needs a config takes exactly these two.
ConfigOption = Annotated[
    str,
    typer.Option(
        "--config", "-c", help="Preset name in configs/ (tiny, base) or a path to a .yaml file."
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override one key, e.g. --set world.frames=9 (repeatable).",
        metavar="KEY=VALUE",
    ),
]


def resolve_config(config: str, overrides: list[str] | None):
    """The typed CinerayConfig for ``--config`` and ``--set`` (raises ConfigError)."""
    from cineray.config import load_config

    return load_config(config, overrides or ())


def start_ray() -> None:
    """Connect to the Ray cluster at RAY_ADDRESS (or one running on this machine), else start a
    local one. Only entry points call this; library code never calls ray.init()."""
    import ray

    if not ray.is_initialized():
        ray.init(logging_level="WARNING")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cineray {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Distributed text-to-video rendering on Ray."""
    ctx.meta["cineray.debug"] = debug


@config_app.command("show")
def config_show(config: ConfigOption = "tiny", overrides: SetOption = None) -> None:
    """Print the resolved config (preset + overrides) as YAML."""
    from cineray.config import to_yaml

    typer.echo(to_yaml(resolve_config(config, overrides)), nl=False)


@app.command()
def dataset(
    out: Annotated[
        str,
        typer.Option(
            help="Dataset root: s3://bucket/prefix, or a path (relative: under storage.root)."
        ),
    ] = "dataset",
    clips: Annotated[int, typer.Option(help="Number of scenes (each in every rendition).")] = 64,
    seed: Annotated[int, typer.Option(help="Same seed, same clips (byte for byte).")] = 0,
    renditions: Annotated[
        str, typer.Option(help="Sizes and rates, WxH@FPS,... (FPS relative to world.fps).")
    ] = "32x32@8,64x64@8,32x32@16",
    shard_size: Annotated[int, typer.Option(help="Clips per clips/<shard>/ folder.")] = 256,
    heldout_fraction: Annotated[
        float, typer.Option(help="Fraction of clips showing held-out combinations.")
    ] = 0.0,
    config: ConfigOption = "tiny",
    overrides: SetOption = None,
) -> None:
    """Render synthetic-world clips into dataset shards (MP4 + index.parquet) with Ray Data."""
    cfg = resolve_config(config, overrides)
    from cineray.jobs.make_dataset import dataset as make  # heavy imports inside the command

    start_ray()
    typer.echo(
        make(out, clips, seed, renditions, shard_size, heldout_fraction, cfg.world, cfg.storage)
    )


@app.command()
def render(
    prompt: Annotated[str, typer.Argument(help="What to render, e.g. 'a red ball falling'.")],
    frames: Annotated[int, typer.Option(help="Frames at the base frame rate (>= 1).")] = 17,
    fps: Annotated[float, typer.Option(help="Base frame rate.")] = 8.0,
    seed: Annotated[int, typer.Option(help="Same seed and settings, same clip.")] = 0,
    camera: Annotated[str | None, typer.Option(help="Camera motion: static, pan_left, ...")] = None,
    camera_speed: Annotated[float | None, typer.Option(help="Camera speed.")] = None,
    focal_length: Annotated[float, typer.Option(help="Focal length in mm.")] = 50.0,
    hold_background: Annotated[bool, typer.Option(
        help="With --camera static (or none, where the first window reads as a still "
             "camera): hold the background still (pixels within a few grey levels of its "
             "plate).")] = True,
    negative_prompt: Annotated[str, typer.Option(help="What to steer away from.")] = "",
    image: Annotated[str | None, typer.Option(help="First frame (PNG/JPEG): image-to-video.")] = None,
    upscale: Annotated[str, typer.Option(help="none | spatial | full (x2 size, x2 fps).")] = "none",
    steps: Annotated[int | None, typer.Option(help="Sampler steps.")] = None,
    guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance scale.")] = None,
    camera_guidance: Annotated[float | None, typer.Option(
        help="Push the asked camera motion further from a still camera, whatever the motion "
             "(0 = off; default: the checkpoint's sampler.json, which may name motions).")] = None,
    sampler: Annotated[str | None, typer.Option(help="euler | heun.")] = None,
    width: Annotated[int, typer.Option(help="Base width in pixels.")] = 32,
    height: Annotated[int, typer.Option(help="Base height in pixels.")] = 32,
    checkpoint: Annotated[str | None, typer.Option(help="Exported components folder.")] = None,
    out: Annotated[str | None, typer.Option(help="Output MP4 (default cineray-data/renders/).")] = None,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0: torch's default).")] = 1,
    in_process: Annotated[bool, typer.Option(
        "--in-process", help="Render in this process instead of on a local Ray Serve app.")] = False,
    config: ConfigOption = "tiny",
    overrides: SetOption = None,
) -> None:
    """Render a clip and print the MP4's path: starts a local Ray cluster, deploys the serving
    app, sends the request over HTTP and follows its progress (--in-process: one process).
    The watermark key and signing material come from the `provenance` section (--set
    provenance.watermark_key=...)."""
    import os

    import torch

    from cineray.pipelines import generate as g
    from cineray.pipelines.stages import Components, GenerationRequest, load_image

    prov = resolve_config(config, overrides).provenance
    prov.key()  # a bad CINERAY_WATERMARK_KEY is named before anything starts
    picture = load_image(image, (width, height)) if image else None
    request = GenerationRequest(
        prompt=prompt, negative_prompt=negative_prompt, seed=seed, frames=frames, fps=fps,
        width=width, height=height, camera=camera, camera_speed=camera_speed,
        focal_length_mm=focal_length, guidance=guidance, steps=steps, sampler=sampler,
        image=picture, upscale=upscale, hold_background=hold_background,
        camera_guidance=camera_guidance)
    if checkpoint and not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"--checkpoint {checkpoint!r} is not a folder; give the folder "
                                f"holding vae/, denoiser/, upscaler_spatial/, upscaler_temporal/")
    if out and "://" not in out:
        out = os.path.abspath(out)  # relative to the working directory, not the storage root
    if not in_process:
        import ray

        from cineray.cluster.local import render_on_cluster
        from cineray.pipelines.safety import check_prompt

        check_prompt(request.prompt).raise_if_blocked()  # refused before any cluster starts

        if not ray.is_initialized():  # a private local cluster (never someone else's); the
            # replicas' logs stay in Ray's log files, not the terminal
            ray.init(address="local", logging_level="WARNING", log_to_driver=False)
        typer.echo(render_on_cluster(request, checkpoint, out,
                                     lambda m: typer.echo(m, err=True), prov))
        return
    if threads > 0:  # the tiny models gain little from threads; on a busy 2-core machine a
        torch.set_num_threads(threads)  # 33-frame render took 12 s with 1 thread, 129 s with 2
    components = Components.load(checkpoint) if checkpoint else Components.load()
    path, _ = g.render_to_file(components, request, out, provenance_cfg=prov)
    typer.echo(path)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    checkpoint: Annotated[str | None, typer.Option(help="Exported components folder.")] = None,
    storage_root: Annotated[str, typer.Option(help="Local folder or s3://bucket/prefix.")] = "cineray-data",
    token: Annotated[str | None, typer.Option(
        help="API token (default: $CINERAY_API_TOKEN, else a generated one).")] = None,
    denoisers: Annotated[int, typer.Option(help="Most Denoiser replicas (autoscaled).")] = 2,
    queue_limit: Annotated[int, typer.Option(help="Unfinished jobs before 429s.")] = 8,
    config: ConfigOption = "tiny",
    overrides: SetOption = None,
) -> None:
    """Serve the HTTP API on a local Ray cluster (Ray Serve); prints the URL and the API token,
    blocks until Ctrl-C. The watermark key and signing material come from the `provenance`
    section (--set provenance.watermark_key=...; default: CINERAY_* environment variables)."""
    import time

    from cineray.cluster.app import AppArgs
    from cineray.cluster.local import deploy

    prov = resolve_config(config, overrides).provenance
    prov.key()  # a bad CINERAY_WATERMARK_KEY is named before anything starts
    args = AppArgs.with_provenance(prov, checkpoint=checkpoint, storage_root=storage_root,
                                   token=token, denoiser_max_replicas=denoisers,
                                   queue_limit=queue_limit)
    start_ray()
    url, key = deploy(args, host, port)
    typer.echo(f"cineray is serving at {url}  (API docs: {url}/docs)")
    typer.echo(f"API token: {key}")
    sys.stdout.flush()  # seen at once when stdout is a file or a pipe (a log, a supervisor)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve as ray_serve

        ray_serve.delete("cineray")  # only this app: the cluster may serve others


@app.command()
def verify(
    clip: Annotated[str, typer.Argument(help="MP4 to check: a local path or s3:// URI.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    config: ConfigOption = "tiny",
    overrides: SetOption = None,
) -> None:
    """Read a clip's watermark (payload, confidence) and C2PA manifest (validation state).
    The watermark key and trust anchor come from the `provenance` section (--set
    provenance.watermark_key=...). Exit code 0: watermark found; 1: none; 2: unreadable file."""
    import json
    import os

    from cineray.pipelines.provenance import describe
    from cineray.storage import Storage

    cfg = resolve_config(config, overrides)
    data = Storage(cfg.storage).read_bytes(clip if "://" in clip else os.path.abspath(clip))
    report = describe(data, cfg.provenance)
    wm, c2 = report["watermark"], report["c2pa"]
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        found = "found" if wm["watermarked"] else "not found"
        typer.echo(f"watermark: {found} (score {wm['score']:.1f}, threshold {wm['threshold']:.1f}"
                   f", confidence {wm['confidence']:.2f})")
        unreadable = "unreadable (checksum failed)" if wm["watermarked"] else "-"
        typer.echo(f"payload: {wm['payload'] or unreadable}")
        failures = f" (failures: {', '.join(c2['failures'])})" if c2["failures"] else ""
        trusted = c2["trusted_with_local_ca"]
        typer.echo(f"c2pa: {c2['state']}{failures}"
                   + (f"; with the local CA as trust anchor: {trusted}" if trusted else ""))
        match = report["payload_matches_manifest"]
        typer.echo(f"payload matches manifest: {'-' if match is None else 'yes' if match else 'NO'}")
        if c2["manifest"] is not None:
            typer.echo("manifest: " + json.dumps(c2["manifest"], indent=2, default=str))
    raise typer.Exit(0 if wm["watermarked"] else 1)


@app.command()
def train(
    component: Annotated[str | None, typer.Argument(
        help="vae | denoiser | upscaler_spatial | upscaler_temporal (default: train.component)")] = None,
    config: ConfigOption = "tiny",
    overrides: SetOption = None,
) -> None:
    """Train (or resume, same train.run_name) a component on Ray Train + DeepSpeed."""
    sets = [*(overrides or []), *([f"train.component={component}"] if component else [])]
    cfg = resolve_config(config, sets)
    from cineray.jobs.train import train as run  # heavy imports inside the command

    start_ray()
    result = run(cfg)
    typer.echo(f"step {result.metrics.get('step')}: {result.checkpoint.path if result.checkpoint else '-'}")


@app.command()
def evaluate(
    out: Annotated[str, typer.Option(help="Report folder: a local path or s3://bucket/prefix.")],
    checkpoint: Annotated[str | None, typer.Option(
        help="Exported components folder (default: the shipped one).")] = None,
    sources: Annotated[str, typer.Option(
        help="Comma-separated: model, real, random, reconstruct, upscale_spatial.")] = "model,real,random",
    per_case: Annotated[int, typer.Option(help="Clips per case of the suite.")] = 16,
    seed: Annotated[int, typer.Option(help="Same seed, same suite.")] = 0,
    steps: Annotated[int | None, typer.Option(help="Sampler steps (default: 20).")] = None,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0: torch's default).")] = 1,
    config: ConfigOption = "tiny",
    overrides: SetOption = None,
) -> None:
    """Judge a checkpoint on the world's prompt suite; write report.json/.md + contact sheet."""
    from cineray.jobs.evaluate import evaluate as run  # heavy imports inside the command

    log = lambda m: typer.echo(m, err=True)  # noqa: E731
    typer.echo(run(checkpoint, out, sources, per_case, seed, steps, threads, config,
                   overrides or (), log))


submit_app = typer.Typer(help="Submit work to a running Ray cluster as Ray jobs.",
                         no_args_is_help=True)
app.add_typer(submit_app, name="submit")
AddressOption = Annotated[str | None, typer.Option(
    help="The cluster's dashboard URL (default: $RAY_ADDRESS if http://..., else "
         "http://127.0.0.1:8265).")]


@submit_app.command("batch")
def submit_batch(
    prompts: Annotated[str, typer.Option(help="Parquet or JSONL prompt list (path or s3://).")],
    out: Annotated[str, typer.Option(help="Output folder (path or s3://bucket/prefix).")],
    address: AddressOption = None,
    python: Annotated[str | None, typer.Option(
        help="Python on the cluster (default: this interpreter).")] = None,
    config: ConfigOption = "tiny",
    overrides: SetOption = None,
) -> None:
    """Submit a batch render (jobs/batch_render.py) as a Ray job; prints the job id."""
    resolve_config(config, overrides)  # fail here, not on the cluster, on a bad config
    from cineray.jobs.batch_submit import submit_batch as submit

    typer.echo(submit(prompts, out, config, overrides or (), address, python))


@app.command()
def status(
    job: Annotated[str, typer.Argument(help="Job id printed by 'cineray submit'.")],
    address: AddressOption = None,
    logs: Annotated[bool, typer.Option("--logs", help="Print the job's logs too.")] = False,
) -> None:
    """Show a Ray job's state (and a batch render's summary line once it is printed)."""
    from cineray.jobs.batch_submit import job_status

    report = job_status(job, address, logs)
    typer.echo(f"{report['job_id']}: {report['status']}"
               + (f" ({report['message']})" if report["message"] else ""))
    if report["summary"]:
        typer.echo(report["summary"])
    if logs:
        typer.echo(report["logs"], nl=False)


if __name__ == "__main__":  # python -m cineray.cli
    sys.exit(app())
