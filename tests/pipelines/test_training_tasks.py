"""Training tasks on tiny random components: finite losses that reach every trainable parameter,
the conditioning mixes the denoiser is trained on, and running latent statistics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cineray.config import load_config
from cineray.models.video_vae import VideoVAE
from cineray.pipelines.denoiser_task import UnknownWords, keyframe_latents, training_frames
from cineray.pipelines.training import (
    TaskConfig,
    edge_weights,
    make_task,
    spec_for,
    still_change,
    to_video,
)
from cineray.pipelines.weights import save_component
from cineray.world import _WORDS, WorldConfig, captions, render, sample_scene


def world_batch(n: int, frames: int = 17, size: int = 32, fps: float = 8.0, hr: str = "") -> dict:
    cfg = WorldConfig()
    scenes = [sample_scene(cfg, i) for i in range(n)]
    batch = {
        "video": torch.from_numpy(np.stack([render(s, size, size, frames, fps) for s in scenes])),
        "caption": [captions(s, 0)[0] for s in scenes],
        "camera": [s.camera for s in scenes],
        "camera_speed": torch.full((n,), 0.1), "focal_length_mm": torch.full((n,), 50.0),
        "fps": torch.full((n,), fps),
    }
    if hr == "spatial":
        batch["video_hr"] = torch.from_numpy(np.stack([render(s, 2 * size, 2 * size, frames, fps)
                                                       for s in scenes]))
    elif hr == "temporal":
        batch["video_hr"] = torch.from_numpy(np.stack([render(s, size, size, 2 * frames - 1,
                                                              2 * fps) for s in scenes]))
    return batch


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vae")
    save_component("vae", VideoVAE(load_config("tiny").vae), folder)
    return load_config("tiny", [f"task.vae_weights={folder}", "task.text_stats_captions=64"])


@pytest.mark.parametrize("component, hr", [("vae", ""), ("denoiser", ""),
                                           ("upscaler_spatial", "spatial"),
                                           ("upscaler_temporal", "temporal")])
def test_loss_is_finite_and_trains_the_model(cfg, component, hr):
    torch.manual_seed(0)
    task = make_task(component, cfg)
    model = task.build_model()
    with torch.no_grad():  # zero-initialised heads would hide dead parameters at step 0
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    loss, metrics = task.loss(model, world_batch(2, hr=hr), step=0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(np.isfinite(v) for v in metrics.values())
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().max() > 0]
    assert dead == []


@pytest.mark.parametrize("kind", ["spatial", "temporal"])
def test_upscaler_crops_stay_aligned(cfg, kind):
    """The crop pairs each output pixel and frame with the input it is made from."""
    small = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, crop=16))
    task = make_task(f"upscaler_{kind}", small)
    lo = torch.arange(17 * 24 * 24, dtype=torch.float32).view(1, 1, 17, 24, 24)
    if kind == "spatial":  # each input pixel covers 2x2 output pixels
        hi = lo.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
    else:  # even output frames are the input frames
        hi = torch.zeros(1, 1, 33, 24, 24)
        hi[:, :, ::2] = lo
    for _ in range(5):
        a, b = task._crop(lo, hi)
        if kind == "spatial":
            assert a.shape[-1] == 8 and b.shape[-1] == 16 and a.shape[2] == b.shape[2] == 17
            assert torch.equal(b[..., ::2, ::2], a)
        else:
            assert a.shape[-2:] == b.shape[-2:] == (16, 16)
            assert (a.shape[2], b.shape[2]) == (9, 17)
            assert torch.equal(b[:, :, ::2], a)
            assert a.unique().numel() == a.numel()  # a real crop, not a constant


def test_specs_pick_each_components_renditions():
    world = WorldConfig()
    assert spec_for("denoiser", world).fps is None  # every frame rate (the keyframe pass)
    s = spec_for("upscaler_temporal", world)
    assert (s.hr_frames, s.hr_fps) == (33, 16.0)
    assert (spec_for("upscaler_spatial", world).hr_width, spec_for("vae", world).fps) == (64, 8.0)
    with pytest.raises(ValueError, match="train.component"):
        make_task("decoder", load_config("tiny"))


def test_training_frames_mix_the_pipelines_conditioning(cfg):
    task = make_task("denoiser", cfg)
    x = torch.rand(64, 3, 17, 32, 32) * 2 - 1
    with torch.no_grad():
        z, keys = task.vae.encode(x), keyframe_latents(task.vae, x)
        frames, exact = training_frames(z, keys, cfg.task, torch.Generator().manual_seed(0))
    c = z.shape[1]
    known, ex, key = frames[:, :c], frames[:, c], frames[:, c + 1]
    assert torch.equal(ex[:, :, :1, :1], exact[:, 0]) and ex.amax() == 1
    # exact frames carry the clip's own latents; nothing else is given where both masks are 0
    torch.testing.assert_close(known * ex[:, None], z * ex[:, None])
    assert (known[(ex + key)[:, None].expand_as(known) == 0] == 0).all()
    kinds = {"none": 0, "first": 0, "prefix": 0, "keys": 0}
    for i in range(64):
        e, k = ex[i, :, 0, 0], key[i, :, 0, 0]
        if k.any():
            kinds["keys"] += 1
            assert e[0] == 1 and k[0] == 0
        elif e.sum() == 0:
            kinds["none"] += 1
        else:
            kinds["first" if e.sum() == 1 else "prefix"] += 1
    assert all(v > 0 for v in kinds.values()), kinds


def test_key_density_sets_how_many_groups_a_keyframe_guided_clip_gets(cfg):
    """Every later group keyed at 1, none at 0 (the first frame stays exact), about half at 0.5."""
    z, keys = torch.randn(400, 4, 5, 4, 4), torch.randn(400, 4, 5, 4, 4)
    shares = {}
    for density in (0.0, 0.5, 1.0):
        task = dataclasses.replace(cfg.task, p_first_frame=0.0, p_prefix=0.0, p_keyframes=1.0,
                                   key_density=density)
        frames, exact = training_frames(z, keys, task, torch.Generator().manual_seed(1))
        key = frames[:, z.shape[1] + 1, :, 0, 0]
        assert (exact[:, 0, 0] == 1).all() and (key[:, 0] == 0).all()
        shares[density] = key[:, 1:].mean().item()
    assert shares[0.0] == 0 and shares[1.0] == 1 and 0.45 < shares[0.5] < 0.55, shares
    with pytest.raises(ValueError, match="task.key_density must lie in"):
        make_task("denoiser", dataclasses.replace(cfg, task=dataclasses.replace(
            cfg.task, key_density=1.5)))


def test_denoiser_latents_are_encoded_once_per_clip(cfg):
    """Named clips (clip_id + crop start) keep their latents: the second epoch skips the VAE
    and gets the same latents (to float16 rounding); unnamed batches are always encoded."""
    task = make_task("denoiser", dataclasses.replace(cfg, task=dataclasses.replace(
        cfg.task, latent_cache=3, encode_bf16=False)))
    batch = {**world_batch(4), "clip_id": ["a", "b", "c", "a"], "start": [0, 0, 0, 5]}
    x = to_video(batch["video"])
    calls = []
    encode = task.vae.encode
    task.vae.encode = lambda v: calls.append(len(v)) or encode(v)
    z, keys = task.latents(batch, x)
    assert calls == [4, 4 * 5]  # the clips, then each clip's 5 keyframes as images
    with torch.no_grad():
        torch.testing.assert_close(z, encode(x))
        torch.testing.assert_close(keys, keyframe_latents(task.vae, x))
    calls.clear()
    z2, keys2 = task.latents(batch, x)
    assert calls == [1, 5]  # ("a", 5) did not fit in a cache of 3
    torch.testing.assert_close(z2, z, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(keys2, keys, atol=2e-3, rtol=2e-3)
    calls.clear()
    task.latents({k: v for k, v in batch.items() if k != "start"}, x)
    assert calls == [4, 20]


def test_unknown_words_replace_colour_and_shape_with_words_no_caption_uses():
    vocab = ["red", "crimson", "orb", "ball", "quartz", "lantern", "ox", "##ing", "Paris",
             "falls", "camera", "x1", "maple"]
    unknown = UnknownWords(vocab)
    assert unknown.pool == ["lantern", "maple", "quartz"]  # world words, held-out too, are out
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        words = unknown("an orange ball falls and bounces with a small red disc nearby",
                        gen).split(" ")
        assert words[3:9] == ["falls", "and", "bounces", "with", "a", "small"]
        assert words[11] == "nearby"
        swapped = [words[i] for i in (1, 2, 9, 10) if words[i] in unknown.pool]
        assert swapped and len(swapped) == 4 - sum(
            w == o for w, o in zip([words[i] for i in (1, 2, 9, 10)],
                                   ["orange", "ball", "red", "disc"], strict=True))
        assert words[0] == ("an" if words[1] == "orange" else "a")  # the article follows
        seen.update(swapped)
    assert seen == set(unknown.pool)
    assert unknown("the camera pans left", gen) == "the camera pans left"
    held_out = {w for att in ("colour", "shape") for ws in _WORDS["heldout"][att].values()
                for phrase in ws for w in phrase.split()}
    assert unknown.targets.isdisjoint(held_out)


def test_denoiser_trains_on_unknown_words_only_when_asked(cfg):
    batch = world_batch(16)
    prompts = {}
    for p in (0.0, 1.0):
        task = make_task("denoiser", dataclasses.replace(cfg, task=dataclasses.replace(
            cfg.task, unknown_words=p, caption_dropout=0.0)))
        task.conditioning(batch, torch.zeros(16, 10, 5, 8, 8))
        prompts[p] = list(task.text.cache)
    assert set(prompts[0.0]) == set(batch["caption"])
    assert prompts[1.0] and set(prompts[1.0]).isdisjoint(batch["caption"])


def test_denoiser_paraphrases_captions_in_its_share_and_rejects_bad_shares(cfg):
    batch = world_batch(16)

    def prompts(**shares) -> list[str]:
        task = make_task("denoiser", dataclasses.replace(cfg, task=dataclasses.replace(
            cfg.task, caption_dropout=0.0, **shares)))
        task.conditioning(batch, torch.zeros(16, 10, 5, 8, 8))
        return list(task.text.cache)

    para = prompts(paraphrase=1.0)
    assert len(set(para) - set(batch["caption"])) >= 12  # a few keep every coin's "as it is"
    assert all(w not in p for p in para for w in ("crimson", "orb", "plummets"))
    assert set(prompts(paraphrase=0.0, unknown_words=0.0)) == set(batch["caption"])
    for bad in ({"paraphrase": 0.8, "unknown_words": 0.3}, {"paraphrase": -0.1}):
        with pytest.raises(ValueError, match="task.paraphrase"):
            prompts(**bad)


def test_vae_task_tracks_latent_statistics(cfg):
    task = make_task("vae", dataclasses.replace(cfg, task=TaskConfig(kl_weight=0.0)))
    model = task.build_model()
    for _ in range(3):
        task.loss(model, world_batch(2), step=0)
    assert model.latent_std.ne(1).all() and model.latent_mean.ne(0).all()


def test_vae_decoder_only_keeps_the_latent_space(cfg):
    """Decoder fine-tuning: only decoder parameters train, and the encoder and the latent
    statistics a denoiser was trained against stay exactly as they were."""
    task = make_task("vae", dataclasses.replace(cfg, task=dataclasses.replace(
        cfg.task, decoder_only=True, temporal_weight=1.0)))
    model = task.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, parts = task.loss(model, world_batch(2), step=0)
    loss.backward()
    assert parts["dt"] > 0 and parts["still"] > 0
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (not name.startswith("enc_")), name
    for name, v in model.state_dict().items():
        assert torch.equal(v, before[name]), name


def test_vae_decoder_learns_from_denoiser_finished_latents(cfg, tmp_path):
    """Decoder fine-tuning on SDEdit latents of an exported denoiser: the samples replace the
    posterior for the first share of the batch, only the decoder trains, and the encoder and
    latent statistics stay as they were."""
    from cineray.models.dit import DiT

    torch.manual_seed(0)
    dit = DiT(cfg.denoiser)
    with torch.no_grad():  # a zero-initialised head would predict the same latents for any input
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_component("denoiser", dit, tmp_path / "denoiser")
    task_cfg = dataclasses.replace(cfg.task, decoder_only=True, decoder_samples=str(
        tmp_path / "denoiser"), samples_fraction=0.5, samples_t_min=0.3, samples_t_max=0.6)
    task = make_task("vae", dataclasses.replace(cfg, task=task_cfg))
    assert task.samples.levels and all(0.3 <= t <= 0.6 for t in task.samples.levels)
    model = task.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = world_batch(2)
    seen = []
    original = model._decode_chunk
    model._decode_chunk = lambda z, cache: seen.append(z.clone()) or original(z, cache)
    state = task.gen.get_state()
    loss, parts = task.loss(model, batch, step=0)
    loss.backward()
    assert torch.isfinite(loss) and len(seen) == 1
    # replay the task's random draws: clip 0 is the denoiser's work, clip 1 a posterior sample
    task.gen.set_state(state)
    with torch.no_grad():
        mean, logvar = model.encode_dist(to_video(batch["video"]))
        posterior = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=task.gen)
        finished = model.denormalize(task.samples(model.normalize(mean[:1]), {
            k: v[:1] for k, v in batch.items()}))
    torch.testing.assert_close(seen[0][1], posterior[1])
    torch.testing.assert_close(seen[0][:1], finished)
    assert not torch.allclose(finished, posterior[:1], atol=0.1)
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (not name.startswith("enc_")), name
    for name, v in model.state_dict().items():
        assert torch.equal(v, before[name]), name
    with pytest.raises(ValueError, match="decoder_only=true"):
        make_task("vae", dataclasses.replace(cfg, task=dataclasses.replace(task_cfg,
                                                                           decoder_only=False)))
    with pytest.raises(FileNotFoundError, match="no exported denoiser"):
        make_task("vae", dataclasses.replace(cfg, task=dataclasses.replace(
            task_cfg, decoder_samples=str(tmp_path / "nothing"))))


def test_edge_weights_favour_object_edges():
    x = -torch.ones(1, 3, 1, 16, 16)
    x[..., 4:12, 4:12] = 1.0
    w = edge_weights(x, 10.0)
    assert w[0, 0, 0, 4, 8] > 2 and w[0, 0, 0, 0, 0] == 1 and w[0, 0, 0, 8, 8] == 1


def test_still_change_counts_only_the_clip_s_still_pixels():
    """The still-background term: decoded change where the clip moves costs nothing; a change
    on the still background is its mean over the still pixels alone; and a slow change the clip
    itself makes (below the tolerance) is a target to match, not to suppress."""
    x = torch.zeros(1, 3, 3, 8, 8)
    x[:, :, 1:, 0, 0] = 1.0  # one pixel changes between frames 0 and 1
    recon = x.clone()
    recon[:, :, 1:, 0, 1] += 0.5  # and the decoder moves a pixel next to it, which the clip keeps
    dx, dr = x.diff(dim=2), recon.diff(dim=2)
    assert still_change(x.diff(dim=2), dx, 1.5) == 0
    n_still = 2 * 64 - 1  # frame pairs x pixels, less the one that changes
    assert torch.isclose(still_change(dr, dx, 1.5), torch.tensor(0.5 / n_still))
    all_still = still_change(dr, dx, 255.0)  # every pixel counts; the moving one is matched
    assert torch.isclose(all_still, torch.tensor(0.5 / (2 * 64)))
    drift = torch.linspace(0, 1, 3).view(1, 1, 3, 1, 1) / 127.5 * torch.ones(1, 3, 3, 8, 8)
    assert still_change(drift.diff(dim=2), drift.diff(dim=2), 1.5) == 0  # kept: no cost
    assert still_change(torch.zeros(1, 3, 2, 8, 8), drift.diff(dim=2), 1.5) > 0  # frozen: a cost


def test_still_change_on_chosen_clips_averages_over_their_pixels_alone():
    dx = torch.zeros(2, 3, 2, 4, 4)
    dr = torch.zeros(2, 3, 2, 4, 4)
    dr[1] = 0.25  # the second clip's decoder shimmers everywhere, the first clip's nowhere
    assert torch.isclose(still_change(dr, dx, 1.5), torch.tensor(0.125))
    assert still_change(dr, dx, 1.5, torch.tensor([True, False])) == 0
    assert torch.isclose(still_change(dr, dx, 1.5, torch.tensor([False, True])), torch.tensor(0.25))
    assert still_change(dr, dx, 1.5, torch.tensor([False, False])) == 0  # none chosen: no cost


def test_vae_task_charges_the_still_camera_clips_and_rejects_negative_still_settings(cfg):
    task = make_task("vae", dataclasses.replace(cfg, task=dataclasses.replace(
        cfg.task, still_static_weight=5.0)))
    batch = world_batch(2)
    batch["camera"] = ["static", "pan_left"]
    loss, parts = task.loss(task.build_model(), batch, step=0)
    loss.backward()
    assert torch.isfinite(loss) and parts["still_static"] > 0  # a fresh decoder shimmers
    batch["camera"] = ["pan_left", "zoom_in"]
    assert task.loss(task.build_model(), batch, step=0)[1]["still_static"] == 0
    for key, bad in (("still_weight", -1.0), ("still_static_weight", -2.0),
                     ("still_tolerance", -0.5)):
        with pytest.raises(ValueError, match=f"task.{key} must be >= 0"):
            make_task("vae", dataclasses.replace(cfg, task=dataclasses.replace(
                cfg.task, **{key: bad})))


def test_denoiser_task_reports_its_temporal_error_and_rejects_a_negative_weight(cfg):
    task = make_task("denoiser", dataclasses.replace(cfg, task=dataclasses.replace(
        cfg.task, latent_temporal_weight=2.0, latent_motion_weight=1.0)))
    model = task.build_model()
    loss, parts = task.loss(model, world_batch(2), step=0)
    loss.backward()
    assert torch.isfinite(loss) and parts["temporal"] > 0
    for key in ("latent_temporal_weight", "latent_motion_weight"):
        with pytest.raises(ValueError, match=f"task.{key} must be >= 0"):
            make_task("denoiser", dataclasses.replace(cfg, task=dataclasses.replace(
                cfg.task, **{key: -1.0})))


def test_denoiser_task_distils_from_a_teacher_at_high_noise(cfg, tmp_path):
    """A student taught by an export of itself has nothing to learn where the teacher's
    estimate is the target, and the usual loss below teacher_above. The teacher may use other
    patches (a finer-patch student from a coarse teacher). Bad settings name the field."""
    torch.manual_seed(0)
    base = dataclasses.replace(cfg.task, encode_bf16=False)  # exact arithmetic on both sides
    task = make_task("denoiser", dataclasses.replace(cfg, task=base))
    model = task.build_model()
    with torch.no_grad():  # a zero-initialised head predicts zeros whatever the input
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_component("denoiser", model, tmp_path / "self")
    batch = world_batch(2)

    def loss_with(teacher, above, student=model, config=cfg):
        t = make_task("denoiser", dataclasses.replace(config, task=dataclasses.replace(
            base, teacher=str(teacher), teacher_above=above, latent_temporal_weight=1.0)))
        return t.loss(student, batch, step=0)[0].item()

    assert loss_with(tmp_path / "self", 0.0) == pytest.approx(0.0, abs=1e-10)
    assert loss_with(tmp_path / "self", 1.0) > 0.01
    fine_cfg = dataclasses.replace(cfg, denoiser=dataclasses.replace(cfg.denoiser,
                                                                     patch=[1, 1, 1]))
    fine = make_task("denoiser", fine_cfg).build_model()
    assert loss_with(tmp_path / "self", 0.5, fine, fine_cfg) > 0
    with pytest.raises(FileNotFoundError, match="task.teacher=.*no exported denoiser"):
        loss_with(tmp_path / "nothing", 0.5)
    with pytest.raises(ValueError, match="task.teacher_above must lie in"):
        loss_with(tmp_path / "self", 1.5)
    save_component("vae", VideoVAE(load_config("tiny").vae), tmp_path / "vae")
    with pytest.raises(ValueError, match="not a denoiser"):
        loss_with(tmp_path / "vae", 0.5)


def test_pooled_dropout_keeps_the_tokens_and_blanks_the_pooled_vector(cfg):
    """pooled_dropout=1: every caption's pooled vector is the empty caption's, its tokens its
    own; 0 leaves both as encoded. Out of [0, 1] is refused by name."""
    batch = world_batch(2)
    frames = torch.zeros(2, 10, 5, 8, 8)

    def cond_with(share):
        task = make_task("denoiser", dataclasses.replace(cfg, task=dataclasses.replace(
            cfg.task, pooled_dropout=share, caption_dropout=0.0, unknown_words=0.0,
            paraphrase=0.0)))
        return task, task.conditioning(batch, frames)

    task, kept = cond_with(0.0)
    captions = task.text(list(batch["caption"]))
    empty = task.text([""])
    torch.testing.assert_close(kept.pooled, captions.pooled)
    task, blank = cond_with(1.0)
    torch.testing.assert_close(blank.pooled, empty.pooled.expand(2, -1))
    torch.testing.assert_close(blank.text, captions.tokens)
    assert not torch.allclose(blank.text, empty.tokens.expand(2, -1, -1))
    with pytest.raises(ValueError, match="task.pooled_dropout must lie in"):
        cond_with(1.5)
