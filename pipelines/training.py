"""Training tasks: one small object per trainable component, each owning its loss.

A task builds its model, says which clips it needs (`data_spec`) and turns a batch into a loss.
The training job (jobs/train.py) applies DeepSpeed, data streaming and checkpoints from outside,
so the same task runs in a test, a notebook or a Ray Train worker.

Batch contract (from the data pipeline): "video" uint8 (B, T, H, W, 3) at the task's base
rendition; "video_hr" the higher rendition of the same clip (upscalers only); "caption"
list[str]; "camera" list[str]; "camera_speed", "focal_length_mm", "fps" float tensors (B,);
optionally "clip_id" list[str] and "start" list[int] (crop start), which name the frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cineray.models.upscaler import Upscaler
from cineray.models.video_vae import VideoVAE


def native_bf16(device_type: str) -> bool:
    """Whether the device computes in bf16 rather than emulating it: CUDA, or a CPU with
    AVX512-BF16 or AMX. On an AVX2-only CPU torch's bf16 matmul is emulated, measured ~400x
    slower than fp32 (0.3 against 121 GFLOP/s, 2048^3, 2 threads), so bf16 there is a trap."""
    if device_type != "cpu":
        return device_type == "cuda"
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


@dataclass
class TaskConfig:
    """Loss and augmentation knobs of the training tasks."""

    edge_weight: float = 20.0  # reconstruction weight on edges: 1 + edge_weight * |x - blur(x)|
    kl_weight: float = 1e-4
    # VAE: fine-tune the decoder alone on the frozen encoder. The latent space and its statistics
    # stay as they are, so a denoiser trained on them stays valid.
    decoder_only: bool = False
    # VAE: L1 weight on frame-to-frame differences (reconstruction vs clip). A still background
    # has none; per-frame reconstruction errors add them, which the eye sees as flicker.
    temporal_weight: float = 0.0
    # VAE: L1 weight on the error of the decoded frame-to-frame change at pixels where the clip
    # itself changes by at most still_tolerance grey levels, averaged over those pixels only.
    # The plain temporal term averages over the whole frame, where a halo of small changes a
    # few pixels around a moving object is a small share; this term is the background's own.
    # Its target is the clip's own change, not zero: a slow zoom moves a smooth background by
    # less than a grey level a frame, and the decoder must keep that motion.
    still_weight: float = 0.0
    still_tolerance: float = 1.5
    # VAE: the same term once more on the clips whose camera stands still (batch "camera" is
    # "static"). There the world's background does not change at all, so this pull can be
    # heavy without steadying the slow background motion of zooms and pans, which a heavy
    # still_weight on every clip does.
    still_static_weight: float = 0.0
    # VAE decoder_only: an exported denoiser folder. A share of each batch is decoded from the
    # latents it finishes after noising the clip's own to t in [samples_t_min, samples_t_max]
    # (see DenoiserSamples), so the decoder learns to turn generated latents into clean clips.
    decoder_samples: str = ""
    samples_fraction: float = 0.5
    samples_t_min: float = 0.1
    samples_t_max: float = 0.5
    # Denoiser: weight of the squared error of the clean-latent estimate's frame-to-frame
    # change (RectifiedFlow.loss), which charges errors that differ between neighbouring frames.
    latent_temporal_weight: float = 0.0
    # Denoiser: extra loss weight where the clean latents change from frame to frame
    # (flow.motion_map): a moving object's outline and a moving camera's background. The
    # shipped denoiser does not use it (model card, denoiser stage 23: it cost camera).
    latent_motion_weight: float = 0.0
    # Denoiser: an exported denoiser folder whose clean-latent estimate replaces the clip's own
    # latents as the target at noise levels t >= teacher_above (see RectifiedFlow.loss). At high
    # noise the clip is one of many that fit x_t, so its latents are a noisy target for their
    # mean; a trained model's estimate of that mean is a quiet one. For a new architecture
    # (finer patches) taught by an older one; measured no faster than the data target there
    # (model card, denoiser entry 30), so no shipped weights use it.
    teacher: str = ""
    teacher_above: float = 0.4
    caption_dropout: float = 0.1  # train the unconditional branch for classifier-free guidance
    camera_dropout: float = 0.2  # "unspecified" camera: the prompt alone must carry it
    # Captions whose colour and shape words are swapped for words the world never uses (see
    # UnknownWords): prompts with unfamiliar words must still give one clean object doing the
    # motion asked, rather than a smear pulled off the training distribution.
    unknown_words: float = 0.0
    # Captions rewritten with everyday synonyms and other openings (see Paraphrase), a vocabulary
    # disjoint from the evaluation's held-out phrasings: each label covers a wider region of the
    # text encoder's space than the world's one or two words.
    paraphrase: float = 0.0
    # Denoiser: share of captions whose pooled vector (the adaLN path) is the empty caption's
    # while their tokens stay: the cross-attention path must carry the prompt on its own. The
    # pooled mean moves with every word of a sentence, so unseen words anywhere in it pull it
    # off the training captions' manifold. The shipped denoiser does not use it (model card,
    # denoiser entry 31: unseen phrasings fail on the tokens alone as well).
    pooled_dropout: float = 0.0
    p_first_frame: float = 0.2  # image-to-video: latent frame 0 given exactly
    p_prefix: float = 0.15  # window context: the first 1-2 latent frames given exactly
    p_keyframes: float = 0.15  # keyframe images guide some groups (plus the first frame)
    # Chance that each later group is keyed in a keyframe-guided clip. A long clip's windows
    # are keyed on every group end (the default keyframe pass), a pattern 0.5 rarely shows.
    key_density: float = 0.5
    vae_weights: str = ""  # exported VAE folder for denoiser training ("" -> shipped checkpoint)
    # Encode the frozen VAE in bf16 where the hardware computes in it (native_bf16): 3x faster
    # on such a CPU (the encoder was ~30% of an fp32 denoiser step); the rounding (~1e-2 of a
    # unit-variance latent) is far below the diffusion noise. Elsewhere it stays in fp32.
    encode_bf16: bool = True
    latent_cache: int = 50_000  # denoiser: clips whose latents a worker keeps (0: encode each step)
    text_stats_captions: int = 2000  # world captions used to standardise text inputs
    crop: int = 32  # upscalers: high-resolution crop size (pixels) to keep steps cheap
    seed: int = 0


@dataclass
class DataSpec:
    """Which rendition a task trains on (and which higher one, for upscalers)."""

    width: int
    height: int
    frames: int
    fps: float | None  # None: any frame rate
    hr_width: int | None = None
    hr_height: int | None = None
    hr_frames: int | None = None
    hr_fps: float | None = None


def to_video(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> float (B, 3, T, H, W) in [-1, 1]."""
    return x.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def edge_weights(x: torch.Tensor, strength: float) -> torch.Tensor:
    """(B, 1, T, H, W) weights 1 + strength * local contrast. Object edges are a few pixels at
    32x32, so an unweighted MSE lets an autoencoder turn every shape into the same blob (seen in
    a trial: shape accuracy 37% on its reconstructions)."""
    b = x.shape[0]
    flat = x.transpose(1, 2).flatten(0, 1)  # (B*T, 3, H, W)
    blur = F.avg_pool2d(F.pad(flat, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    e = (flat - blur).abs().mean(1, keepdim=True)
    return 1 + strength * e.unflatten(0, (b, -1)).transpose(1, 2)


def still_change(dr: torch.Tensor, dx: torch.Tensor, tolerance: float,
                 clips: torch.Tensor | None = None) -> torch.Tensor:
    """Mean |dr - dx| over the pixels (and frame pairs) where the clip's own change dx stays
    within `tolerance` grey levels in every channel; dr, dx: (B, 3, T-1, H, W) in [-1, 1].
    clips: optional (B,) 0/1 mask of the clips that count (none counted gives 0)."""
    still = (dx.abs().amax(dim=1, keepdim=True) <= tolerance / 127.5).float()
    if clips is not None:
        still = still * clips.to(still).view(-1, 1, 1, 1, 1)
    return ((dr - dx).abs() * still).sum() / (3 * still.sum()).clamp_min(1.0)


def weighted_l1_l2(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    diff = pred.float() - target
    return ((diff.abs() + diff**2) * weight).mean()


class VAETask:
    name = "vae"

    def __init__(self, cfg, spec: DataSpec):
        self.cfg, self.task, self.spec = cfg, cfg.task, spec
        self.gen = torch.Generator().manual_seed(cfg.task.seed)
        self.samples = None
        for key in ("still_weight", "still_static_weight", "still_tolerance"):
            if getattr(self.task, key) < 0:
                raise ValueError(f"task.{key} must be >= 0, got {getattr(self.task, key)}")
        if self.task.decoder_samples:
            if not self.task.decoder_only:
                raise ValueError("task.decoder_samples needs task.decoder_only=true: the denoiser "
                                 "only knows the latent space of the encoder it was trained on")
            if not 0.0 <= self.task.samples_fraction <= 1.0:
                raise ValueError(f"task.samples_fraction must be in [0, 1], got "
                                 f"{self.task.samples_fraction}")
            from cineray.pipelines.denoiser_task import DenoiserSamples  # noqa: PLC0415

            self.samples = DenoiserSamples(self.task.decoder_samples, cfg, self.task.samples_t_min,
                                           self.task.samples_t_max, self.gen)

    def build_model(self) -> VideoVAE:
        vae = VideoVAE(self.cfg.vae)
        if self.task.decoder_only:
            for name, p in vae.named_parameters():
                p.requires_grad_(not name.startswith("enc_"))
        return vae

    def data_spec(self) -> DataSpec:
        return self.spec

    def loss(self, model, batch: dict, step: int):
        x = to_video(batch["video"]).to(_dtype(model))
        if self.samples is None:
            recon, mean, logvar = model(x)  # a frozen encoder (decoder_only) keeps no graph
        else:
            recon, mean, logvar = self._decode_samples(getattr(model, "module", model), x, batch)
        x = x.float()
        rec = weighted_l1_l2(recon, x, edge_weights(x, self.task.edge_weight))
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).mean()
        dx, dr = x.diff(dim=2), recon.float().diff(dim=2)
        dt = (dr - dx).abs().mean()
        still = still_change(dr, dx, self.task.still_tolerance)
        static = torch.tensor([c == "static" for c in batch["camera"]])
        still_static = still_change(dr, dx, self.task.still_tolerance, static)
        loss = (rec + self.task.temporal_weight * dt + self.task.still_weight * still
                + self.task.still_static_weight * still_static)
        if not self.task.decoder_only:
            loss = loss + self.task.kl_weight * kl
            track_latent_stats(getattr(model, "module", model), mean.detach().float())
        return loss, {"rec": rec.item(), "kl": kl.item(), "dt": dt.item(), "still": still.item(),
                      "still_static": still_static.item()}

    def _decode_samples(self, vae: VideoVAE, x: torch.Tensor, batch: dict):
        """The training pass with the first samples_fraction of the clips decoded from
        denoiser-finished latents instead of posterior samples."""
        with torch.no_grad():
            mean, logvar = vae.encode_dist(x)
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=self.gen).to(
                mean.device)
            z = vae.normalize(z)
            k = round(self.task.samples_fraction * len(x))
            if k:
                rows = {key: v[:k] for key, v in batch.items()}
                z[:k] = self.samples(vae.normalize(mean[:k]), rows).to(z.dtype)
        return vae.decode(z), mean, logvar


@torch.no_grad()
def track_latent_stats(vae: VideoVAE, mean: torch.Tensor, momentum: float = 0.02) -> None:
    """Running per-channel mean/std of posterior means (like BatchNorm's running stats), so an
    exported VAE hands the denoiser unit-variance latents without a separate calibration pass.
    The training forward itself uses raw latents; only encode()/decode() apply them."""
    vae.latent_mean.lerp_(mean.mean(dim=(0, 2, 3, 4)).to(vae.latent_mean.dtype), momentum)
    std = mean.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    vae.latent_std.lerp_(std.to(vae.latent_std.dtype), momentum)


class UpscalerTask:
    def __init__(self, name: str, cfg, spec: DataSpec):
        self.name, self.task, self.spec = name, cfg.task, spec
        self.cfg = getattr(cfg, name)
        self.gen = torch.Generator().manual_seed(cfg.task.seed)

    def build_model(self) -> Upscaler:
        return Upscaler(self.cfg)

    def data_spec(self) -> DataSpec:
        return self.spec

    def loss(self, model, batch: dict, step: int):
        lo, hi = to_video(batch["video"]), to_video(batch["video_hr"])
        lo, hi = self._crop(lo, hi)
        pred = model(lo.to(_dtype(model)))
        loss = weighted_l1_l2(pred, hi, edge_weights(hi, self.task.edge_weight))
        return loss, {"l1": (pred.float() - hi).abs().mean().item()}

    def _crop(self, lo: torch.Tensor, hi: torch.Tensor):
        """Random aligned crop: a `crop`-pixel square of the output, and for the temporal stage
        also a run of 9 input frames (-> 17 output frames)."""
        c = self.task.crop
        h, w = lo.shape[-2:]
        s = 2 if self.cfg.kind == "spatial" else 1  # output pixels per input pixel
        cl = min(c // s, h, w)
        y = int(torch.randint(0, h - cl + 1, (1,), generator=self.gen))
        x = int(torch.randint(0, w - cl + 1, (1,), generator=self.gen))
        lo = lo[..., y : y + cl, x : x + cl]
        hi = hi[..., s * y : s * (y + cl), s * x : s * (x + cl)]
        if self.cfg.kind == "spatial":
            return lo, hi
        t = lo.shape[2]
        n = min(9, t)
        a = int(torch.randint(0, t - n + 1, (1,), generator=self.gen))
        return lo[:, :, a : a + n], hi[:, :, 2 * a : 2 * a + 2 * n - 1]


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def spec_for(component: str, world) -> DataSpec:
    """The renditions a component trains on, from the world config's base clip: the denoiser
    takes base-size clips at every frame rate (low rates feed the keyframe pass)."""
    w, h, t, fps = world.width, world.height, world.frames, world.fps
    if component == "upscaler_spatial":
        return DataSpec(w, h, t, fps, hr_width=2 * w, hr_height=2 * h, hr_frames=t, hr_fps=fps)
    if component == "upscaler_temporal":
        return DataSpec(w, h, t, fps, hr_width=w, hr_height=h, hr_frames=2 * t - 1, hr_fps=2 * fps)
    return DataSpec(w, h, t, None if component == "denoiser" else fps)


def make_task(component: str, cfg, spec: DataSpec | None = None):
    """The training task for `component` (vae, denoiser, upscaler_spatial, upscaler_temporal).

    cfg: the resolved CinerayConfig (sections vae, denoiser, text, flow, upscaler_*, task, world).
    spec: which renditions to train on; default spec_for(component, cfg.world)."""
    spec = spec or spec_for(component, cfg.world)
    if component == "vae":
        return VAETask(cfg, spec)
    if component == "denoiser":
        from cineray.pipelines.denoiser_task import DenoiserTask  # noqa: PLC0415

        return DenoiserTask(cfg, spec)
    if component in ("upscaler_spatial", "upscaler_temporal"):
        return UpscalerTask(component, cfg, spec)
    raise ValueError(
        f"train.component must be one of vae, denoiser, upscaler_spatial, upscaler_temporal; "
        f"got {component!r}")
