"""Stage functions on tiny random components: guidance, samplers, seeds, exact conditioning."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cineray.models.dit import Conditioning
from cineray.pipelines.conditioning import build_conditioning
from cineray.pipelines.flow import (
    SamplerConfig,
    guided_velocity,
    motion_map,
    resample,
    sample,
    timesteps,
)
from cineray.pipelines.generate import Timer, check_request, extend, upscale_stream
from cineray.pipelines.stages import (
    Components,
    GenerationRequest,
    denoise_latents,
    denoise_window,
    denoise_windows,
    derive_seed,
    encode_text,
    image_latent,
    latents_run,
    prefix_frames,
    sampler_config,
    upscale,
    window_frames,
    window_step,
)
from cineray.pipelines.weights import save_component
from cineray.pipelines.windows import plan_windows

REQ = GenerationRequest("a red circle falling", negative_prompt="blurry", camera="pan_left")


def _conds(components, request=REQ, t_lat=5, speed=0.15):
    text = encode_text(components, request)
    frames = torch.zeros(1, 10, t_lat, 8, 8)
    labels = ([request.camera], [speed], [50.0], [8.0])
    return (build_conditioning(text.cond, *labels, frames),
            build_conditioning(text.uncond, *labels, frames))


def test_cfg_scale_1_equals_the_conditional_prediction(components):
    model, flow = components.denoiser, components.flow
    cond, uncond = _conds(components)
    x = torch.randn(1, 8, 5, 8, 8, generator=torch.Generator().manual_seed(1))
    tt = torch.full((1,), 0.7)
    with torch.no_grad():
        v_c = flow.velocity(model(x, tt, cond), x, tt)
        v_u = flow.velocity(model(x, tt, uncond), x, tt)
        assert torch.equal(guided_velocity(model, flow, cond, uncond, SamplerConfig(guidance=1.0))(x, 0.7), v_c)
        v_3 = guided_velocity(model, flow, cond, uncond, SamplerConfig(guidance=3.0))(x, 0.7)
    assert not torch.allclose(v_c, v_u)  # the negative prompt moves the prediction
    torch.testing.assert_close(v_3, v_u + 3.0 * (v_c - v_u), rtol=1e-4, atol=1e-4)


def test_guidance_applies_only_inside_its_interval(components):
    model, flow = components.denoiser, components.flow
    cond, uncond = _conds(components)
    x = torch.randn(1, 8, 5, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = guided_velocity(model, flow, cond, None, SamplerConfig(guidance=1.0))
    full = guided_velocity(model, flow, cond, uncond, SamplerConfig(guidance=3.0))
    limited = guided_velocity(model, flow, cond, uncond,
                              SamplerConfig(guidance=3.0, guidance_interval=(0.3, 0.8)))
    with torch.no_grad():
        assert torch.equal(limited(x, 0.5), full(x, 0.5))
        for t in (0.1, 0.9):
            assert torch.equal(limited(x, t), plain(x, t))
            assert not torch.allclose(full(x, t), plain(x, t))
    with pytest.raises(ValueError, match="guidance_interval"):
        SamplerConfig(guidance_interval=(0.6, 0.2))


def test_camera_guidance_extrapolates_from_a_still_camera_only_where_one_moves(components):
    model, flow = components.denoiser, components.flow
    moving, uncond = _conds(components)  # pan_left
    still, _ = _conds(components, replace(REQ, camera="static"), speed=0.0)
    free, _ = _conds(components, replace(REQ, camera=None), speed=0.0)
    x = torch.randn(1, 8, 5, 8, 8, generator=torch.Generator().manual_seed(1))
    tt = torch.full((1,), 0.5)
    cfg = SamplerConfig(guidance=3.0, camera_guidance=2.0, camera_interval=(0.3, 0.8))
    with torch.no_grad():
        v_s = flow.velocity(model(x, tt, still), x, tt)
        v_c = flow.velocity(model(x, tt, moving), x, tt)
        base = guided_velocity(model, flow, moving, uncond, replace(cfg, camera_guidance=0.0))
        steered = guided_velocity(model, flow, moving, uncond, cfg)
        torch.testing.assert_close(steered(x, 0.5), base(x, 0.5) + 2.0 * (v_c - v_s),
                                   rtol=1e-4, atol=1e-4)
        assert torch.equal(steered(x, 0.9), base(x, 0.9))  # outside camera_interval
        for c in (still, free):  # nothing to steer: the same as without camera guidance
            no = guided_velocity(model, flow, c, uncond, replace(cfg, camera_guidance=0.0))
            assert torch.equal(guided_velocity(model, flow, c, uncond, cfg)(x, 0.5), no(x, 0.5))
        # a batch mixing both: each row as it would be alone
        both, un2 = Conditioning.cat([moving, still]), Conditioning.cat([uncond, uncond])
        out = guided_velocity(model, flow, both, un2, cfg)(torch.cat([x, x]), 0.5)
        torch.testing.assert_close(out[:1], steered(x, 0.5), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[1:], guided_velocity(model, flow, still, uncond, cfg)(x, 0.5),
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="camera_interval"):
        SamplerConfig(camera_interval=(0.9, 0.1))


def test_camera_guidance_by_motion_sets_the_scale_of_the_motions_it_names(components):
    model, flow = components.denoiser, components.flow
    pan, uncond = _conds(components)  # pan_left
    dolly, _ = _conds(components, replace(REQ, camera="dolly_zoom"))
    x = torch.randn(2, 8, 5, 8, 8, generator=torch.Generator().manual_seed(2))
    both, un2 = Conditioning.cat([pan, dolly]), Conditioning.cat([uncond, uncond])
    base = SamplerConfig(guidance=3.0, camera_interval=(0.3, 0.8))
    dolly_only = replace(base, camera_guidance_by_motion={"dolly_zoom": 2.0})
    with torch.no_grad():
        off = guided_velocity(model, flow, both, un2, base)(x, 0.5)
        uniform = guided_velocity(model, flow, both, un2, replace(base, camera_guidance=2.0))(x, 0.5)
        out = guided_velocity(model, flow, both, un2, dolly_only)(x, 0.5)
        assert torch.equal(out[:1], off[:1])  # the pan is not named: camera_guidance (0) holds
        torch.testing.assert_close(out[1:], uniform[1:], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out[1:], off[1:])
        # a named motion's scale wins over camera_guidance, in both directions
        mixed = replace(base, camera_guidance=2.0, camera_guidance_by_motion={"pan_left": 0})
        out = guided_velocity(model, flow, both, un2, mixed)(x, 0.5)
        assert torch.equal(out[:1], off[:1])
        torch.testing.assert_close(out[1:], uniform[1:], rtol=1e-5, atol=1e-5)
    # a request's own scale holds for every motion
    comp = replace(components, sampler=dolly_only)
    assert sampler_config(comp, replace(REQ, camera_guidance=1.0)).camera_guidance_by_motion == {}
    assert sampler_config(comp, REQ).camera_guidance_by_motion == {"dolly_zoom": 2.0}
    for bad in ({"static": 1.0}, {"orbit": 1.0}, {"zoom_in": -1.0}, {"zoom_in": "2"}, [2.0]):
        with pytest.raises(ValueError, match="camera_guidance_by_motion must map moving cameras"):
            SamplerConfig(camera_guidance_by_motion=bad)


class _Oracle(torch.nn.Module):
    """An x-predictor that knows the clean latents (up to a fixed error, if given)."""

    def __init__(self, x0, error=0.0):
        super().__init__()
        self.x0, self.error = x0, error

    def forward(self, x, t, cond):
        return (self.x0 + self.error).expand_as(x)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_resample_returns_the_latents_an_exact_denoiser_knows(components, method):
    """Straight flow paths: from any noise level, an exact x-prediction leads back to x0; a
    random denoiser does not."""
    cond, uncond = _conds(components)
    x0 = torch.randn(1, 8, 5, 8, 8, generator=torch.Generator().manual_seed(2))
    cfg = SamplerConfig(method=method, steps=10, guidance=3.0)
    for t0 in (0.05, 0.37, 1.0):
        out = resample(_Oracle(x0), components.flow, cfg, x0, cond, uncond, t0,
                       torch.Generator().manual_seed(3))
        torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
    out = resample(components.denoiser, components.flow, cfg, x0, cond, uncond, 0.5,
                   torch.Generator().manual_seed(3))
    assert out.shape == x0.shape and not torch.allclose(out, x0, atol=1e-2)
    with pytest.raises(ValueError, match="t0 must be"):
        resample(components.denoiser, components.flow, cfg, x0, cond, uncond, 0.0)


def test_guidance_drops_the_camera_in_the_unconditional_branch(components, monkeypatch):
    """Guidance pushes towards the asked camera motion too: the unconditional branch has the
    negative prompt and an unspecified camera (measured on the 5,000-step denoiser, 16 clips per
    camera: camera motion recognised in 44% of clips instead of 12%)."""
    import cineray.pipelines.stages as stages
    from cineray.pipelines.conditioning import UNSPECIFIED, camera_index

    seen = {}
    monkeypatch.setattr(stages, "SamplingRun", lambda model, flow, cfg, shape, cond, uncond, *rest:
                        seen.update(cond=cond, uncond=uncond)
                        or SimpleNamespace(run=lambda progress=None: torch.zeros(shape)))
    request = GenerationRequest("a red ball", frames=5, camera="pan_left", camera_speed=0.15,
                                focal_length_mm=35.0, guidance=3.0)
    text = encode_text(components, request)
    denoise_latents(components, request, text, torch.zeros(1, 10, 2, 8, 8), 8.0, 0)
    cond, uncond = seen["cond"], seen["uncond"]
    assert int(cond.camera) == camera_index("pan_left")
    assert int(uncond.camera) == camera_index(UNSPECIFIED)
    assert torch.equal(cond.fps, uncond.fps) and not torch.equal(cond.camera_params,
                                                                  uncond.camera_params)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_timesteps_fall_monotonically_from_noise_to_data(shift):
    ts = timesteps(12, shift)
    assert ts.shape == (13,) and ts[0] == 1.0 and ts[-1] == 0.0
    assert torch.all(ts[1:] < ts[:-1])


def test_euler_and_heun_give_the_same_shape_and_different_paths(components):
    cond, uncond = _conds(components)
    out = {m: sample(components.denoiser, components.flow,
                     SamplerConfig(method=m, steps=3, guidance=2.0), (1, 8, 5, 8, 8), cond,
                     uncond, seed=5) for m in ("euler", "heun")}
    assert out["euler"].shape == out["heun"].shape == (1, 8, 5, 8, 8)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert not torch.allclose(out["euler"], out["heun"])


def test_window_latents_are_a_pure_function_of_window_conditioning_and_seed(components):
    plan = plan_windows(65, 8.0)
    text = encode_text(components, REQ)
    keys = torch.randn(17, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    w = plan.windows[1]
    a = denoise_window(components, REQ, text, w, keys, seed=3)
    assert torch.equal(a, denoise_window(components, REQ, text, w, keys, seed=3))
    assert not torch.allclose(a, denoise_window(components, REQ, text, w, keys, seed=4))
    other = replace(plan.windows[2], exact=w.exact, keys=w.keys)  # same conditioning, index 2
    assert not torch.allclose(a, denoise_window(components, REQ, text, other, keys, seed=3))


def test_joint_windows_agree_on_their_shared_latents_and_are_otherwise_the_same_run(components):
    """Without shared groups joint denoising is denoise_window window by window, bit for bit;
    with them, the groups neighbours share come out identical in both windows."""
    plan = plan_windows(65, 8.0)
    assert plan.shared == ((0, 4, 1), (1, 4, 1), (2, 4, 1), (3, 4, 1))
    text = encode_text(components, REQ)
    keys = torch.randn(17, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    req = replace(REQ, steps=4)
    alone = [denoise_window(components, req, text, w, keys, seed=2) for w in plan.windows]
    apart = denoise_windows(components, req, text, plan.windows, keys, 2, shared=())
    assert all(torch.equal(a, b) for a, b in zip(alone, apart, strict=True))
    calls = []
    joint = denoise_windows(components, req, text, plan.windows, keys, 2, plan.shared,
                            progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    for i, a, b in plan.shared:
        assert torch.equal(joint[i][:, :, a], joint[i + 1][:, :, b])
        assert not torch.allclose(alone[i][:, :, a], alone[i + 1][:, :, b])
    for w, z in zip(plan.windows, joint, strict=True):  # keyframes are still held exactly
        assert torch.equal(z[0, :, 0], keys[w.exact])


def test_key_release_drops_the_in_between_keys_below_its_noise_level(components):
    """Steps at t >= key_release see every key; later steps only the window's anchors, bit for
    bit the two runs spliced. The exact start is held either way."""
    plan = plan_windows(65, 8.0)
    w = plan.windows[1]
    assert w.anchors and w.anchors != w.keys
    text = encode_text(components, REQ)
    keys = torch.randn(17, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    seed, sampler = 3, replace(components.sampler, steps=4)  # t = 1, 0.75, 0.5, 0.25
    late = replace(components, sampler=replace(sampler, key_release=0.6))
    never = replace(components, sampler=replace(sampler, key_release=1e-6))
    plain = replace(components, sampler=sampler)
    released = denoise_window(late, REQ, text, w, keys, seed)
    assert torch.equal(denoise_window(never, REQ, text, w, keys, seed),
                       denoise_window(plain, REQ, text, w, keys, seed))
    assert not torch.allclose(released, denoise_window(plain, REQ, text, w, keys, seed))
    noise_seed = derive_seed(seed, "window", w.level, w.index)
    runs = [latents_run(plain, REQ, text, window_frames(plain, REQ, w, keys, anchors_only=a),
                        w.fps, noise_seed) for a in (False, True)]
    x = None
    for i in range(4):
        x = window_step(runs[i >= 2], x, i)
    assert torch.equal(released, x.cpu())
    assert torch.equal(released[0, :, 0], keys[w.exact])
    with pytest.raises(ValueError, match="key_release"):
        SamplerConfig(key_release=1.5)


def test_exact_frames_come_out_unchanged(components, image):
    """Image-to-video: latent frame 0 is the image's latent, bit for bit; a window of a long
    clip starts exactly on its keyframe."""
    req = replace(REQ, image=image)
    text = encode_text(components, req)
    first = image_latent(components, image)
    window = plan_windows(17, 8.0).windows[0]
    z = denoise_window(components, req, text, window, first[None], seed=0)
    assert torch.equal(z[0, :, 0], first)
    free = denoise_window(components, req, text, window, None, seed=0)
    assert not torch.allclose(free[0, :, 0], first)

    plan = plan_windows(65, 8.0)
    keys = torch.randn(17, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    z = denoise_window(components, REQ, text, plan.windows[2], keys, seed=0)
    assert torch.equal(z[0, :, 0], keys[plan.windows[2].exact])
    frames = window_frames(components, REQ, plan.windows[2], keys)
    assert frames[0, 9, 1:].flatten().unique().tolist() == [1.0]  # the 4 group ends are keys
    assert frames[0, 8].sum() == 64  # only latent frame 0 (8x8) is exact


def test_extension_holds_the_context_prefix_exactly(components):
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    prefix = components.vae.encode(video)  # (1, 8, 2, 8, 8)
    text = encode_text(components, REQ)
    z = denoise_latents(components, REQ, text, prefix_frames(prefix, 5), 8.0, noise_seed=0)
    assert torch.equal(z[:, :, :2], prefix)

    clip = (np.random.default_rng(0).random((7, 32, 32, 3)) * 255).astype(np.uint8)
    result = extend(components, replace(REQ, frames=15), clip, context=5)
    assert result.frames.shape == (22, 32, 32, 3)
    assert np.array_equal(result.frames[:7], clip)


@pytest.mark.parametrize("kind", ["spatial", "temporal"])
def test_chunked_upscaling_equals_whole_clip(components, kind):
    video = torch.rand(1, 3, 23, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole = upscale(components, kind, video)
    sizes = [5, 1, 9, 8]
    chunks = iter(torch.split(video, sizes, dim=2))
    got = torch.cat(list(upscale_stream(replace(components, upscale_chunk=4), kind, chunks,
                                        Timer())), dim=2)
    assert got.shape == whole.shape
    torch.testing.assert_close(got, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("change", "match"), [
    ({"frames": 0}, "frames must be an integer >= 1"),
    ({"fps": -1.0}, "fps must be a number > 0"),
    ({"camera": "spin"}, "camera 'spin' is unknown; use one of static, pan_left"),
    ({"upscale": "x4"}, "upscale must be one of none, spatial, full"),
    ({"sampler": "ddim"}, "sampler must be one of euler, heun"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"focal_length_mm": 0}, "focal_length_mm must be a number > 0"),
    ({"seed": -1}, "seed must be an integer"),
    ({"image": np.zeros((16, 16, 3), np.uint8)}, "image must be a uint8 array \\(32, 32, 3\\)"),
])
def test_bad_requests_name_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        replace(REQ, **change)


def test_base_size_must_fit_the_latent_grid(components):
    with pytest.raises(ValueError, match="width must be a multiple of 8"):
        check_request(components, replace(REQ, width=36))


def test_exported_components_are_loaded_and_missing_ones_are_random(components, tmp_path):
    save_component("vae", components.vae, tmp_path / "vae")
    loaded = Components.load(tmp_path, seed=7)
    assert loaded.random == ("denoiser",)
    # A missing upscaler is its fixed interpolation, not noise.
    x = torch.rand(1, 3, 3, 8, 8) * 2 - 1
    bilinear = torch.nn.functional.interpolate(x[0].transpose(0, 1), scale_factor=2,
                                               mode="bilinear", align_corners=False)
    assert torch.allclose(loaded.upscaler_spatial(x)[0].transpose(0, 1), bilinear, atol=1e-6)
    mid = loaded.upscaler_temporal(x)[:, :, 1::2]
    assert torch.allclose(mid, 0.5 * (x[:, :, :-1] + x[:, :, 1:]), atol=1e-6)
    for k, v in components.vae.state_dict().items():
        assert torch.equal(loaded.vae.state_dict()[k], v)
    assert loaded.text is components.text  # the frozen text encoder is loaded once per process
    check_request(loaded, REQ)


def test_a_checkpoint_ships_its_sampler_defaults(components, tmp_path):
    save_component("vae", components.vae, tmp_path / "vae")
    assert Components.load(tmp_path).sampler == SamplerConfig()
    (tmp_path / "sampler.json").write_text('{"shift": 3.0, "guidance": 5.0}')
    assert Components.load(tmp_path).sampler == SamplerConfig(shift=3.0, guidance=5.0)
    (tmp_path / "sampler.json").write_text('{"guidance_interval": [0.3, 1.0]}')
    assert Components.load(tmp_path).sampler.guidance_interval == (0.3, 1.0)
    (tmp_path / "sampler.json").write_text('{"camera_guidance_by_motion": {"dolly_zoom": 2}}')
    assert Components.load(tmp_path).sampler.camera_guidance_by_motion == {"dolly_zoom": 2.0}
    (tmp_path / "sampler.json").write_text('{"shfit": 3.0}')
    with pytest.raises(ValueError, match="sampler.json: expected an object with keys among"):
        Components.load(tmp_path)


def test_the_motion_weight_charges_errors_where_the_clip_moves_more(components):
    """One latent position changes between frames 1 and 2, the rest of the clip stands still.
    The same error costs the same at that position and at a still one without the weight;
    with it the moving one costs 1 + strength * cap (the per-clip ratio is capped) and the
    still one 1, normalised over the clip's weights. A clip that never moves weighs 1."""
    flow, (cond, _) = components.flow, _conds(components)
    x0 = torch.zeros(1, 8, 5, 8, 8)
    x0[:, :, 2:, 3, 3] = 1.0
    m = motion_map(x0, 2.0)
    assert m[0, 0, :, 3, 3].tolist() == [1.0, 11.0, 11.0, 1.0, 1.0]
    assert (m[0, 0, :, :3] == 1).all() and (m[0, 0, 0] == 1).all()
    assert (motion_map(torch.ones(2, 8, 5, 4, 4), 2.0) == 1).all()

    def run(at, mw):
        error = torch.zeros_like(x0)
        error[:, :, 1, at[0], at[1]] = 0.5
        return flow.loss(_Oracle(x0, error), x0, cond, motion_weight=mw,
                         generator=torch.Generator().manual_seed(5))[0].item()

    n = 5 * 8 * 8
    assert run((3, 3), 0.0) == pytest.approx(0.25 / n) == pytest.approx(run((0, 0), 0.0))
    total = n + 2 * 10.0
    assert run((3, 3), 2.0) == pytest.approx(11 * 0.25 / total, rel=1e-5)
    assert run((0, 0), 2.0) == pytest.approx(0.25 / total, rel=1e-5)


def test_the_temporal_term_charges_errors_that_change_from_frame_to_frame(components):
    """Two errors of the same size: one shared by every frame, one that alternates in sign.
    The plain loss cannot tell them apart; the temporal term is zero for the first and 4 e^2
    per generated pair for the second. Given frames count at their true value."""
    flow, (cond, _) = components.flow, _conds(components)
    x0 = torch.randn(1, 8, 5, 8, 8, generator=torch.Generator().manual_seed(4))
    steady = torch.full_like(x0, 0.1)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0]).view(1, 1, 5, 1, 1)
    shimmer = steady * sign

    def run(error, weight=None, tw=1.0):
        return flow.loss(_Oracle(x0, error), x0, cond, weight=weight, temporal_weight=tw,
                         generator=torch.Generator().manual_seed(5))

    plain_s, temporal_s = run(steady, tw=0.0)
    plain_a, temporal_a = run(shimmer, tw=0.0)
    torch.testing.assert_close(plain_s, torch.tensor(0.01))
    torch.testing.assert_close(plain_a, plain_s)
    assert temporal_s.item() == pytest.approx(0.0, abs=1e-10)
    assert temporal_a.item() == pytest.approx(0.04, rel=1e-5)
    loss, _ = run(shimmer, tw=2.0)
    assert loss.item() == pytest.approx(0.01 + 2 * 0.04, rel=1e-5)
    # frame 0 given exactly: its error does not count, the pair (0, 1) compares frame 1's
    # estimate with the true frame 0, so the steady error now shows there once
    given = torch.ones(1, 1, 5, 1, 1)
    given[:, :, 0] = 0
    _, temporal = run(steady, weight=given)
    assert temporal.item() == pytest.approx(0.01 / 4, rel=1e-5)


def test_a_teacher_replaces_the_target_at_high_noise_only(components):
    """With a teacher, the clips drawn at t >= teacher_above are scored against its estimate
    (frames given exactly keep their own latents); below that, against the clip itself."""
    flow, (cond, _) = components.flow, _conds(components)
    x0 = torch.randn(1, 8, 5, 8, 8, generator=torch.Generator().manual_seed(4))
    shift = torch.full_like(x0, 0.3)

    def teacher(x_t, t, c):
        return (x0 + shift).expand_as(x_t)

    def run(above, weight=None):
        return flow.loss(_Oracle(x0), x0, cond, weight=weight, teacher=teacher,
                         teacher_above=above, generator=torch.Generator().manual_seed(5))[0]

    assert run(0.0).item() == pytest.approx(0.09, rel=1e-5)  # every level: the teacher's target
    assert run(1.0).item() == 0.0  # no level reaches 1: the clip's own latents, which x0 knows
    given = torch.ones(1, 1, 5, 1, 1)
    given[:, :, 0] = 0
    assert run(0.0, given).item() == pytest.approx(0.09, rel=1e-5)
    student = flow.loss(_Oracle(x0 + shift), x0, cond, weight=given, teacher=teacher,
                        teacher_above=0.0, temporal_weight=1.0,
                        generator=torch.Generator().manual_seed(5))
    # a student that predicts what the teacher does has nothing left to learn, in the temporal
    # term too: the target's change from the given frame 0 to frame 1 is the teacher's own
    assert student[0].item() == pytest.approx(0.0, abs=1e-12)
    assert student[1].item() == pytest.approx(0.0, abs=1e-12)
