"""Rectified flow (flow matching): the noising process, its loss, and the samplers.

Convention (SD3 / Wan): x_t = (1 - t) x0 + t eps, t in [0, 1], t = 1 is pure noise. The velocity
is v = dx_t/dt = eps - x0, so a sampler integrates from t = 1 down to t = 0.

The network predicts either x0 ("x") or v ("v"), a config choice. In a small trial here,
x-prediction trained far better than v-prediction with large patches; both convert to the same
velocity for sampling: v = (x_t - x0) / t.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from cineray.models.dit import Conditioning
from cineray.world import CAMERAS


@dataclass
class FlowConfig:
    t_sampling: str = "logit_normal"  # "logit_normal" (SD3) or "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    t_min: float = 1e-3  # x-prediction divides by t: keep it off zero


@dataclass
class SamplerConfig:
    method: str = "euler"  # "euler" or "heun"
    steps: int = 20
    guidance: float = 4.0  # classifier-free guidance scale; 1 = conditional prediction only
    shift: float = 1.0  # timestep shift (SD3): >1 spends more steps at high noise
    negative_prompt: str = ""
    # Guidance only for t in [lo, hi] (Kynkaenniemi et al. 2024); outside it, the conditional
    # prediction alone (one model call a step instead of two).
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    # Camera guidance (guided_velocity): v += camera_guidance (v_c - v_still) for t in
    # camera_interval, on clips asking for a moving camera (one more model call a step for
    # those). 0 = off.
    camera_guidance: float = 0.0
    camera_interval: tuple[float, float] = (0.0, 1.0)
    # Per camera motion (a moving one of CAMERAS): its scale instead of camera_guidance, e.g.
    # {"dolly_zoom": 2.0} steers dolly zooms alone.
    camera_guidance_by_motion: dict[str, float] = field(default_factory=dict)
    # Below this noise level a long clip's windows are guided only by their anchor keyframes
    # (Window.anchors, on window starts), not by every group end: the path between keys is
    # drawn by the window, as a fall's curve needs. 0 = every key to the end.
    key_release: float = 0.0

    def __post_init__(self):
        if isinstance(self.key_release, bool) or not isinstance(self.key_release, (int, float)) \
                or not 0.0 <= self.key_release <= 1.0:
            raise ValueError(f"key_release must be a noise level in [0, 1], got "
                             f"{self.key_release!r}")
        self.key_release = float(self.key_release)
        by = self.camera_guidance_by_motion
        if not isinstance(by, dict) or any(
                k not in CAMERAS[1:] or isinstance(g, bool) or not isinstance(g, (int, float))
                or g < 0 for k, g in by.items()):
            raise ValueError(f"camera_guidance_by_motion must map moving cameras "
                             f"({', '.join(CAMERAS[1:])}) to scales >= 0, got {by!r}")
        self.camera_guidance_by_motion = {k: float(g) for k, g in by.items()}
        for name in ("guidance_interval", "camera_interval"):
            lo, hi = (float(v) for v in getattr(self, name))
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"{name} must be [lo, hi] with 0 <= lo <= hi <= 1, "
                                 f"got {list(getattr(self, name))!r}")
            setattr(self, name, (lo, hi))


class RectifiedFlow:
    def __init__(self, cfg: FlowConfig, prediction: str = "x"):
        if prediction not in ("x", "v"):
            raise ValueError(f"prediction must be 'x' or 'v', got {prediction!r}")
        if cfg.t_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"t_sampling must be 'logit_normal' or 'uniform', got {cfg.t_sampling!r}")
        self.cfg, self.prediction = cfg, prediction

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.view(-1, *([1] * (x0.dim() - 1)))
        return (1 - t) * x0 + t * noise

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.cfg.t_sampling == "uniform":
            t = torch.rand(n, generator=generator)
        else:
            t = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * torch.randn(n, generator=generator))
        return t.clamp(self.cfg.t_min, 1.0)

    def velocity(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "v":
            return pred
        t = t.clamp_min(self.cfg.t_min).view(-1, *([1] * (x_t.dim() - 1)))
        return (x_t - pred) / t

    def clean_estimate(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's estimate of x0 from its output at (x_t, t)."""
        if self.prediction == "x":
            return pred
        return x_t - t.view(-1, *([1] * (x_t.dim() - 1))) * pred

    def loss(self, model, x0: torch.Tensor, cond: Conditioning, weight: torch.Tensor | None = None,
             generator: torch.Generator | None = None, temporal_weight: float = 0.0,
             motion_weight: float = 0.0, teacher: Callable | None = None,
             teacher_above: float = 1.0):
        """Mean squared error of the prediction target, plus temporal_weight times that of the
        clean-latent estimate's frame-to-frame change. x0: (B, C, T, H, W) clean latents;
        weight: (B, 1, T, 1, 1) or broadcastable to it (e.g. 0 on frames given exactly).
        Returns (loss, temporal error).

        The plain loss weighs each frame's error alone, so errors that differ from frame to
        frame cost no more than errors shared by neighbouring frames; decoded, the former are an
        outline that wobbles and a still background that shimmers. The temporal term charges
        them directly (given frames count at their true value, and a pair counts when either
        of its frames is generated). motion_weight > 0 scales the plain loss by
        motion_map(x0, motion_weight): the positions where the clip moves count more.

        teacher: (x_t, t, cond) -> a trained denoiser's clean-latent estimate. For the clips
        drawn at t >= teacher_above it stands in for x0 as the target of the generated frames
        (distillation where the data target is noisiest)."""
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        t = self.sample_t(x0.shape[0], generator).to(x0.device)
        x_t = self.add_noise(x0, noise, t)
        pred = model(x_t, t, cond).float()
        w = torch.ones_like(x0[:, :1]) if weight is None else weight.expand_as(x0[:, :1])
        rows = (t >= teacher_above).nonzero()[:, 0] if teacher is not None else []
        if len(rows):
            x0 = x0.clone()
            x0[rows] = torch.lerp(x0[rows], teacher(x_t[rows], t[rows], cond.select(rows)),
                                  w[rows])
        target = x0 if self.prediction == "x" else noise - x0
        wm = w * motion_map(x0, motion_weight) if motion_weight > 0 else w
        err = (pred - target) ** 2 * wm
        loss = err.sum() / (wm.sum() * x0.shape[1]).clamp_min(1.0)
        if x0.shape[2] < 2:
            return loss, torch.zeros(())
        est = self.clean_estimate(pred, x_t, t)
        est = torch.lerp(x0, est, w)  # given frames at their true value
        pair = torch.maximum(w[:, :, 1:], w[:, :, :-1])
        derr = (est.diff(dim=2) - x0.diff(dim=2)) ** 2 * pair
        temporal = derr.sum() / (pair.sum() * x0.shape[1]).clamp_min(1.0)
        return loss + temporal_weight * temporal, temporal.detach()


def motion_map(x0: torch.Tensor, strength: float, cap: float = 5.0) -> torch.Tensor:
    """(B, 1, T, H, W) loss weights 1 + strength * min(m / mean(m), cap) for clean latents x0
    (B, C, T, H, W), m the larger of a position's mean absolute change (over channels) to the
    frame before and after it, the mean taken over each clip.

    Most of a clip's latent positions do not change, so a per-position loss spends most of its
    weight on a still background; the errors that show are where something moves: a moving
    object's outline (its area wobbles) and, when the camera moves, the whole background (a slow
    zoom comes out as a still camera). Normalising per clip gives both their share, whatever
    the clip's overall amount of motion; the cap keeps a clip with one moving position sane."""
    if x0.shape[2] < 2:
        return torch.ones_like(x0[:, :1])
    d = x0.diff(dim=2).abs().mean(1, keepdim=True)
    m = torch.zeros_like(x0[:, :1])
    m[:, :, 1:] = d
    m[:, :, :-1] = torch.maximum(m[:, :, :-1], d)
    m = m / m.mean(dim=(2, 3, 4), keepdim=True).clamp_min(1e-6)
    return 1 + strength * m.clamp_max(cap)


def timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """(steps + 1,) decreasing from 1 to 0, with SD3's shift t' = s t / (1 + (s - 1) t)."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class EulerSampler:
    """First-order step: one model call per step."""

    def step(self, v_fn: VelocityFn, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        return x + (t_next - t) * v_fn(x, t)


class HeunSampler:
    """Second-order step (EDM's Heun): Euler, then the average of both slopes; two model calls,
    except the last step to t = 0, which is plain Euler."""

    def step(self, v_fn: VelocityFn, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        v = v_fn(x, t)
        x_euler = x + (t_next - t) * v
        if t_next <= 0:
            return x_euler
        return x + (t_next - t) * 0.5 * (v + v_fn(x_euler, t_next))


SAMPLERS = {"euler": EulerSampler, "heun": HeunSampler}


def make_sampler(method: str):
    if method not in SAMPLERS:
        raise ValueError(f"sampler.method must be one of {sorted(SAMPLERS)}, got {method!r}")
    return SAMPLERS[method]()


def still_camera(cond: Conditioning, static: int) -> Conditioning:
    """cond with the camera label `static` (its index) and speed 0 on every clip."""
    params = cond.camera_params.clone()
    params[:, 0] = 0.0
    return replace(cond, camera=torch.full_like(cond.camera, static), camera_params=params)


def guided_velocity(model, flow: RectifiedFlow, cond: Conditioning, uncond: Conditioning | None,
                    cfg: SamplerConfig) -> VelocityFn:
    """Classifier-free guidance (Ho & Salimans 2022) with the negative prompt in `uncond`:
    v = v_u + g (v_c - v_u) at noise levels t in cfg.guidance_interval, the conditional
    prediction alone elsewhere. Scale 1 (or no uncond) is exactly the conditional prediction.

    Camera guidance adds g_cam (v_c - v_s) for t in cfg.camera_interval, where v_s is the
    prediction for the same prompt with a still camera (label "static", speed 0): it
    extrapolates the difference the camera label makes, for a denoiser that moves a zooming
    background less than asked. g_cam is cfg.camera_guidance_by_motion's scale for the row's
    camera motion, else cfg.camera_guidance. Rows that ask for a still camera skip it (the term
    is 0), and so do rows that leave the camera to the prompt. Every branch of a step runs as
    one batch."""
    lo, hi = cfg.guidance_interval
    c_lo, c_hi = cfg.camera_interval
    scale = camera_scales(cond.camera, cfg)
    rows = scale.nonzero().flatten()
    still = still_camera(cond.select(rows), CAMERAS.index("static")) if len(rows) else None
    scale = scale[rows].view(-1, 1, 1, 1, 1)

    def v_fn(x: torch.Tensor, t: float) -> torch.Tensor:
        guided = uncond is not None and cfg.guidance != 1.0 and lo <= t <= hi
        steer = still is not None and c_lo <= t <= c_hi
        xs, conds = [x], [cond]
        if guided:
            xs, conds = xs + [x], conds + [uncond]
        if steer:
            xs, conds = xs + [x[rows]], conds + [still]
        xx = torch.cat(xs)
        tt = torch.full((xx.shape[0],), float(t), device=x.device)
        v = flow.velocity(model(xx, tt, Conditioning.cat(conds)), xx, tt)
        b = x.shape[0]
        v_c, out = v[:b], v[:b]
        if guided:
            v_u = v[b : 2 * b]
            out = v_u + cfg.guidance * (v_c - v_u)
        if steer:
            out = out.clone()
            out[rows] += scale.to(v) * (v_c[rows] - v[-len(rows):])
        return out

    return v_fn


def camera_scales(camera: torch.Tensor, cfg: SamplerConfig) -> torch.Tensor:
    """(B,) camera guidance scale of each row of a batch of camera labels: 0 for a still or
    unspecified camera (index len(CAMERAS))."""
    g = [0.0 if c >= len(CAMERAS) or CAMERAS[c] == "static"
         else cfg.camera_guidance_by_motion.get(CAMERAS[c], cfg.camera_guidance)
         for c in camera.tolist()]
    return torch.tensor(g)


@torch.no_grad()
def sample(model, flow: RectifiedFlow, cfg: SamplerConfig, shape: tuple[int, ...],
           cond: Conditioning, uncond: Conditioning | None, seed: int,
           progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Integrate from noise to latents (B, C, T, H, W).

    Frames marked `exact` in cond.frames are held on their conditioning latents' noising path
    at every step, so they come out equal to the conditioning latents. The same seed and config
    give bit-identical latents on the same CPU (noise comes from a seeded CPU generator).
    """
    return SamplingRun(model, flow, cfg, shape, cond, uncond, seed).run(progress)


class SamplingRun:
    """`sample` one step at a time, for callers that act between steps (joint denoising of
    overlapping windows averages their shared latents after every step). start() -> the
    noise; step(x, i) -> x after step i of cfg.steps; finish(x) -> the latents.

    released: (cond, uncond) that take over for the steps at t < cfg.key_release (the same
    exact frames, fewer keyframe guides); None keeps `cond` throughout."""

    def __init__(self, model, flow: RectifiedFlow, cfg: SamplerConfig, shape: tuple[int, ...],
                 cond: Conditioning, uncond: Conditioning | None, seed: int,
                 released: tuple[Conditioning, Conditioning | None] | None = None):
        gen = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(shape, generator=gen).to(cond.frames.device)
        c = shape[1]
        self.known, self.exact = cond.frames[:, :c], cond.frames[:, c : c + 1]
        self.flow, self.sampler = flow, make_sampler(cfg.method)
        self.v_fn = guided_velocity(model, flow, cond, uncond, cfg)
        self.v_released = (guided_velocity(model, flow, *released, cfg)
                           if released is not None else self.v_fn)
        self.release = cfg.key_release
        self.ts = timesteps(cfg.steps, cfg.shift).tolist()

    def start(self) -> torch.Tensor:
        return self.noise

    @torch.no_grad()
    def step(self, x: torch.Tensor, i: int) -> torch.Tensor:
        t = self.ts[i]
        x = torch.lerp(x, self.flow.add_noise(self.known, self.noise, torch.tensor([t])), self.exact)
        v_fn = self.v_fn if t >= self.release else self.v_released
        return self.sampler.step(v_fn, x, t, self.ts[i + 1])

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return torch.lerp(x, self.known, self.exact)  # exact frames: the conditioning latents

    def run(self, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Every step, start to finish (what `sample` returns)."""
        x, steps = self.start(), len(self.ts) - 1
        for i in range(steps):
            x = self.step(x, i)
            if progress is not None:
                progress(i + 1, steps)
        return self.finish(x)


@torch.no_grad()
def resample(model, flow: RectifiedFlow, cfg: SamplerConfig, x0: torch.Tensor, cond: Conditioning,
             uncond: Conditioning | None, t0: float,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """SDEdit (Meng et al. 2022): latents x0 (B, C, T, H, W) noised to level t0, then sampled
    back to t = 0 along the steps of cfg's grid below t0. The result keeps x0's layout and
    carries the sampler's own finishing errors."""
    if not 0.0 < t0 <= 1.0:
        raise ValueError(f"t0 must be in (0, 1], got {t0}")
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    ts = [t0] + [t for t in timesteps(cfg.steps, cfg.shift).tolist() if t < t0]
    x = flow.add_noise(x0, noise, torch.full((x0.shape[0],), t0, device=x0.device))
    v_fn = guided_velocity(model, flow, cond, uncond, cfg)
    sampler = make_sampler(cfg.method)
    for a, b in zip(ts[:-1], ts[1:], strict=True):
        x = sampler.step(v_fn, x, a, b)
    return x
