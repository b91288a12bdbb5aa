"""Training task of the denoiser: rectified flow on frozen-VAE latents of world clips.

Besides plain text-to-video, each batch mixes in the conditioning the generation pipeline uses:
the first latent frame given (image-to-video), a prefix of latent frames given (the previous
window's overlap), and keyframe images guiding later groups (the long-clip keyframe pass).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cineray.models.dit import DiT
from cineray.models.text_encoder import TextEncoder
from cineray.pipelines.conditioning import (
    UNSPECIFIED,
    CachedTextEncoder,
    build_conditioning,
    guided_conditioning,
)
from cineray.pipelines.flow import RectifiedFlow, resample, timesteps
from cineray.pipelines.paraphrase import Paraphrase
from cineray.pipelines.training import DataSpec, TaskConfig, native_bf16, to_video
from cineray.pipelines.weights import DEFAULT_CHECKPOINT, load_component
from cineray.world import _WORDS, WorldConfig, captions, sample_scene


def world_caption_sample(n: int, seed: int = 0) -> list[str]:
    """n training-vocabulary captions of random world scenes (deterministic)."""
    cfg = WorldConfig()
    out = []
    for i in range(n):
        phrasings = captions(sample_scene(cfg, seed + i), seed + i, style="train")
        out.append(phrasings[i % len(phrasings)])
    return out


class UnknownWords:
    """Swaps a caption's colour and shape words for random words of the text encoder's
    vocabulary that no world caption uses, training or held-out.

    The model cannot know what an unfamiliar word means, but it should still render one clean
    object doing what the rest of the prompt asks; without this, a single unknown word pulls the
    prompt off the training distribution and guidance turns it into a smear. Held-out words are
    never drawn, so the evaluation's unseen phrasings stay unseen."""

    def __init__(self, vocabulary: list[str]):
        def words(x) -> set[str]:
            if isinstance(x, str):
                return set(re.findall(r"[a-z]+", x))
            items = x.values() if isinstance(x, dict) else x
            return set().union(*(words(v) for v in items))

        self.targets = words(_WORDS["train"]["colour"]) | words(_WORDS["train"]["shape"])
        world = words(_WORDS)
        self.pool = sorted(w for w in vocabulary if re.fullmatch(r"[a-z]{3,12}", w)
                           and w not in world)

    def __call__(self, caption: str, gen: torch.Generator) -> str:
        """caption with each colour/shape word swapped with probability 1/2 (at least one)."""
        words = caption.split(" ")
        idx = [i for i, w in enumerate(words) if w in self.targets]
        if not idx:
            return caption
        swap = torch.rand(len(idx), generator=gen) < 0.5
        if not swap.any():
            swap[int(torch.randint(len(idx), (1,), generator=gen))] = True
        for i in (i for i, s in zip(idx, swap.tolist(), strict=True) if s):
            words[i] = self.pool[int(torch.randint(len(self.pool), (1,), generator=gen))]
            if i > 0 and words[i - 1] in ("a", "an"):
                words[i - 1] = "an" if words[i][0] in "aeiou" else "a"
        return " ".join(words)


def frozen_denoiser(folder: str | Path, field: str) -> DiT:
    """The exported denoiser in `folder`, frozen; `field` names the setting that gave it."""
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"{field}={folder}: no exported denoiser there; point it at a "
                                f"denoiser export folder")
    return load_component(folder).requires_grad_(False).eval()


def keyframe_latents(vae, x: torch.Tensor) -> torch.Tensor:
    """Each latent group's last pixel frame encoded alone as an image: (B, C, T', h, w).
    Group j >= 1 covers pixel frames 4j-3..4j; group 0 is frame 0."""
    b, _, t = x.shape[:3]
    idx = list(range(0, t, vae.temporal_factor))
    frames = x[:, :, idx].transpose(1, 2).flatten(0, 1)[:, :, None]  # (B*T', 3, 1, H, W)
    z = vae.encode(frames)  # (B*T', C, 1, h, w)
    return z[:, :, 0].unflatten(0, (b, len(idx))).transpose(1, 2)


def training_frames(z: torch.Tensor, keys: torch.Tensor, task: TaskConfig,
                    gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random conditioning per clip -> frames (B, C + 2, T', h, w), exact mask (B, 1, T', 1, 1).
    z: the clips' latents; keys: their keyframe latents (keyframe_latents), both (B, C, T', h, w)."""
    b, c, t = z.shape[:3]
    exact = torch.zeros(b, 1, t, 1, 1)
    key = torch.zeros(b, 1, t, 1, 1)
    u = torch.rand(b, generator=gen)
    p1, p2, p3 = task.p_first_frame, task.p_prefix, task.p_keyframes
    for i in range(b):
        if u[i] < p1:
            exact[i, :, 0] = 1
        elif u[i] < p1 + p2:
            k = int(torch.randint(1, min(3, t), (1,), generator=gen))
            exact[i, :, :k] = 1
        elif u[i] < p1 + p2 + p3 and t > 1:
            exact[i, :, 0] = 1
            key[i, 0, 1:, 0, 0] = (torch.rand(t - 1, generator=gen) < task.key_density).float()
    known = z * exact + keys * key
    ones = torch.ones_like(z[:, :1])
    return torch.cat([known, exact * ones, key * ones], dim=1), exact


class DenoiserTask:
    name = "denoiser"

    def __init__(self, cfg, spec: DataSpec):
        self.cfg, self.task, self.spec = cfg, cfg.task, spec
        self.flow = RectifiedFlow(cfg.flow, cfg.denoiser.prediction)
        self.gen = torch.Generator().manual_seed(cfg.task.seed)
        task = cfg.task
        folder = Path(task.vae_weights) if task.vae_weights else DEFAULT_CHECKPOINT / "vae"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"denoiser training needs a trained VAE: none at {folder}; train and export one "
                f"(train.component=vae) and set task.vae_weights=<its export folder>")
        self.vae = load_component(folder).requires_grad_(False)
        if self.vae.cfg.latent_channels != cfg.denoiser.latent_channels:
            raise ValueError(f"denoiser.latent_channels={cfg.denoiser.latent_channels} but the "
                             f"VAE at {folder} has {self.vae.cfg.latent_channels}")
        self.text = CachedTextEncoder(TextEncoder(cfg.text))
        self.unknown = UnknownWords(list(self.text.encoder.tokenizer.get_vocab()))
        self.paraphrase = Paraphrase()
        shares = {"task.unknown_words": task.unknown_words, "task.paraphrase": task.paraphrase}
        if any(not 0.0 <= v <= 1.0 for v in shares.values()) or sum(shares.values()) > 1.0:
            raise ValueError(f"caption shares must each lie in [0, 1] and sum to at most 1, got "
                             f"{shares}")
        if not 0.0 <= task.pooled_dropout <= 1.0:
            raise ValueError(f"task.pooled_dropout must lie in [0, 1], got {task.pooled_dropout}")
        if not 0.0 <= task.key_density <= 1.0:
            raise ValueError(f"task.key_density must lie in [0, 1], got {task.key_density}")
        for key in ("latent_temporal_weight", "latent_motion_weight"):
            if getattr(task, key) < 0:
                raise ValueError(f"task.{key} must be >= 0, got {getattr(task, key)}")
        self.teacher = None
        if task.teacher:
            if cfg.denoiser.prediction != "x":
                raise ValueError("task.teacher needs an x-prediction student "
                                 "(denoiser.prediction=x)")
            if not 0.0 <= task.teacher_above <= 1.0:
                raise ValueError(f"task.teacher_above must lie in [0, 1], got {task.teacher_above}")
            teacher = frozen_denoiser(task.teacher, "task.teacher")
            channels = cfg.denoiser.latent_channels
            if not isinstance(teacher, DiT) or teacher.cfg.latent_channels != channels:
                raise ValueError(f"task.teacher={task.teacher}: not a denoiser for these latents "
                                 f"({channels} channels)")
            self.teacher = (teacher, RectifiedFlow(cfg.flow, teacher.cfg.prediction))
        # (clip_id, crop start) -> (latents, keyframe latents) in float16, see latents()
        self.latent_cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def build_model(self) -> DiT:
        model = DiT(self.cfg.denoiser)
        emb = self.text.encoder(world_caption_sample(self.task.text_stats_captions))
        model.set_text_stats(emb.tokens, emb.mask, emb.pooled)
        return model

    def data_spec(self) -> DataSpec:
        return self.spec

    def conditioning(self, batch: dict, frames: torch.Tensor):
        b = frames.shape[0]
        drop_text = torch.rand(b, generator=self.gen) < self.task.caption_dropout
        drop_cam = torch.rand(b, generator=self.gen) < self.task.camera_dropout
        # One draw a caption: unknown words below unknown_words, a paraphrase in the next
        # `paraphrase` of [0, 1), the caption as it is above both.
        r = torch.rand(b, generator=self.gen).tolist()
        u, p = self.task.unknown_words, self.task.paraphrase
        prompts = ["" if d else self.unknown(c, self.gen) if x < u
                   else self.paraphrase(c, self.gen) if x < u + p else c
                   for c, d, x in zip(batch["caption"], drop_text, r, strict=True)]
        text = self.text(prompts)
        if self.task.pooled_dropout > 0:
            drop = torch.rand(b, generator=self.gen) < self.task.pooled_dropout
            text.pooled[drop] = self.text([""]).pooled
        cams = [UNSPECIFIED if d else c for c, d in zip(batch["camera"], drop_cam, strict=True)]
        speeds = [0.0 if d else float(s) for s, d in zip(batch["camera_speed"], drop_cam,
                                                          strict=True)]
        return build_conditioning(text, cams, speeds,
                                  [float(f) for f in batch["focal_length_mm"]],
                                  [float(f) for f in batch["fps"]], frames)

    @torch.no_grad()
    def latents(self, batch: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clips' VAE latents and keyframe latents, (B, C, T', h, w) each.

        The VAE is frozen and a clip's frames are fixed by its id and crop start, so up to
        task.latent_cache clips keep theirs (float16, ~20 KB a clip at tiny) and later epochs
        skip the encoder (~25% of a step). Batches without "clip_id"/"start" are encoded."""
        ids, starts = batch.get("clip_id"), batch.get("start")
        names = (None if ids is None or starts is None or self.task.latent_cache <= 0
                 else list(zip(ids, (int(s) for s in starts), strict=True)))
        todo = list(range(len(x))) if names is None else [
            i for i, n in enumerate(names) if n not in self.latent_cache]
        fresh = {}
        if todo:
            bf16 = self.task.encode_bf16 and native_bf16(x.device.type)
            with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
                z, k = self.vae.encode(x[todo]).float(), keyframe_latents(self.vae, x[todo]).float()
            fresh = {i: (z[j], k[j]) for j, i in enumerate(todo)}
            if names is None:
                return z, k
            for i in todo:
                if len(self.latent_cache) < self.task.latent_cache:
                    self.latent_cache[names[i]] = tuple(t.half() for t in fresh[i])
        rows = [fresh[i] if i in fresh else self.latent_cache[n] for i, n in enumerate(names)]
        return (torch.stack([r[0] for r in rows]).float().to(x.device),
                torch.stack([r[1] for r in rows]).float().to(x.device))

    def loss(self, model, batch: dict, step: int):
        x = to_video(batch["video"])
        z, keys = self.latents(batch, x)
        frames, exact = training_frames(z, keys, self.task, self.gen)
        cond = self.conditioning(batch, frames)
        loss, temporal = self.flow.loss(model, z, cond, weight=1 - exact, generator=self.gen,
                                        temporal_weight=self.task.latent_temporal_weight,
                                        motion_weight=self.task.latent_motion_weight,
                                        teacher=self.teacher_estimate if self.teacher else None,
                                        teacher_above=self.task.teacher_above)
        return loss, {"temporal": temporal.item()}

    @torch.no_grad()
    def teacher_estimate(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """task.teacher's clean-latent estimate; in bf16 where native, as the VAE encodes
        (task.encode_bf16)."""
        model, flow = self.teacher
        bf16 = self.task.encode_bf16 and native_bf16(x_t.device.type)
        with torch.autocast(x_t.device.type, torch.bfloat16, enabled=bf16):
            pred = model.to(x_t.device)(x_t, t, cond)
        return flow.clean_estimate(pred.float(), x_t, t)


class DenoiserSamples:
    """Latents finished by an exported denoiser, for fine-tuning the VAE decoder on them.

    A clip's latents are noised to a level t0 drawn from the sampler's grid within
    [t_min, t_max] and sampled back to 0 with the denoiser, its caption and camera, and the
    checkpoint's sampler settings (guidance included): SDEdit (Meng et al. 2022). The result
    keeps the clip's layout but carries the denoiser's own finishing errors (an outline that
    wobbles, a still background that shimmers), so a decoder trained to turn it back into the
    real clip learns to undo them, as LTX-Video's decoder takes over the last denoising step
    (HaCohen et al. 2024)."""

    def __init__(self, folder: str | Path, cfg, t_min: float, t_max: float,
                 generator: torch.Generator):
        from cineray.pipelines.stages import checkpoint_sampler  # noqa: PLC0415

        folder = Path(folder)
        self.model = frozen_denoiser(folder, "task.decoder_samples")
        if not 0.0 < t_min <= t_max <= 1.0:
            raise ValueError(f"task.samples_t_min/t_max must satisfy 0 < min <= max <= 1, got "
                             f"{t_min}, {t_max}")
        self.flow = RectifiedFlow(cfg.flow, self.model.cfg.prediction)
        self.text = CachedTextEncoder(TextEncoder(cfg.text))
        self.sampler = checkpoint_sampler(folder.parent)  # what generation uses with it
        grid = timesteps(self.sampler.steps, self.sampler.shift).tolist()
        self.levels = [t for t in grid if t_min <= t <= t_max] or [t_max]
        self.gen = generator

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, batch: dict) -> torch.Tensor:
        """Normalised latents (B, C, T', h, w) of the batch's clips -> finished latents."""
        b, c = z.shape[:2]
        self.model.to(z.device)
        frames = torch.zeros(b, c + 2, *z.shape[2:], device=z.device)
        negative = (None if self.sampler.guidance == 1.0
                    else self.text([self.sampler.negative_prompt] * b))
        cond, uncond = guided_conditioning(
            self.text(list(batch["caption"])), negative, list(batch["camera"]),
            [float(s) for s in batch["camera_speed"]],
            [float(f) for f in batch["focal_length_mm"]], [float(f) for f in batch["fps"]], frames)
        t0 = self.levels[int(torch.randint(len(self.levels), (1,), generator=self.gen))]
        return resample(self.model, self.flow, self.sampler, z.float(), cond, uncond, t0,
                        self.gen).to(z.dtype)
