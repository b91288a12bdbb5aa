"""Contract suite run on every trainable model at its tiny preset: shapes, seed determinism,
save/load round trip, gradients reaching every parameter."""

from __future__ import annotations

import copy

import pytest
import torch

from cineray.models.dit import DIT_PRESETS, DiT, empty_frames
from cineray.models.upscaler import UPSCALER_PRESETS, Upscaler
from cineray.models.video_vae import VAE_PRESETS, VideoVAE
from cineray.pipelines.weights import load_component, save_component
from tests.models.helpers import random_conditioning


def vae_case():
    model = VideoVAE(VAE_PRESETS["tiny"])
    x = torch.rand(2, 3, 9, 16, 16) * 2 - 1
    return "vae", model, (x,), lambda out: out[0], (2, 3, 9, 16, 16)


def dit_case():
    model = DiT(DIT_PRESETS["tiny"])
    x = torch.randn(2, 8, 3, 4, 4)
    cond = random_conditioning(2, 8, 3, 4, 4)
    return "denoiser", model, (x, torch.rand(2), cond), lambda out: out, (2, 8, 3, 4, 4)


def spatial_case():
    model = Upscaler(UPSCALER_PRESETS["tiny_spatial"])
    x = torch.rand(2, 3, 5, 8, 8) * 2 - 1
    return "upscaler_spatial", model, (x,), lambda out: out, (2, 3, 5, 16, 16)


def temporal_case():
    model = Upscaler(UPSCALER_PRESETS["tiny_temporal"])
    x = torch.rand(2, 3, 5, 8, 8) * 2 - 1
    return "upscaler_temporal", model, (x,), lambda out: out, (2, 3, 9, 8, 8)


CASES = [vae_case, dit_case, spatial_case, temporal_case]


def run(model, args):
    # The VAE's training forward samples its posterior: seed it so outputs are comparable.
    torch.manual_seed(123)
    return model(*args)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_shape_and_dtype(case):
    torch.manual_seed(0)
    _, model, args, pick, shape = case()
    out = pick(run(model, args))
    assert out.shape == shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_seed_determinism(case):
    torch.manual_seed(1)
    _, a, args, pick, _ = case()
    torch.manual_seed(1)
    _, b, _, _, _ = case()
    torch.testing.assert_close(pick(run(a, args)), pick(run(b, args)), rtol=0, atol=0)
    torch.manual_seed(2)
    _, c, _, _, _ = case()
    assert any((p - q).abs().max() > 0 for p, q in zip(a.parameters(), c.parameters(), strict=True))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_save_load_round_trip(case, tmp_path):
    torch.manual_seed(0)
    name, model, args, pick, _ = case()
    _perturb(model)  # zero-initialised heads would make a broken load look right
    save_component(name, model, tmp_path / name, meta={"steps": 3})
    loaded = load_component(tmp_path / name)
    assert type(loaded) is type(model)
    model.eval()
    torch.testing.assert_close(pick(run(loaded, args)), pick(run(model, args)), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_gradients_reach_every_parameter(case):
    torch.manual_seed(0)
    _, model, args, pick, _ = case()
    _perturb(model)  # adaLN-Zero and zero heads block gradients at step 0 by design
    pick(run(model, args)).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert dead == []


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)


def test_dit_conditioning_frames_change_the_output():
    torch.manual_seed(0)
    model = DiT(DIT_PRESETS["tiny"])
    _perturb(model)
    x = torch.randn(1, 8, 3, 4, 4)
    cond = random_conditioning(1, 8, 3, 4, 4)
    other = copy.copy(cond)
    other.frames = empty_frames(1, 8, 3, 4, 4)
    other.frames[:, -2, 0] = 1  # mark frame 0 exact
    t = torch.tensor([0.5])
    assert (model(x, t, cond) - model(x, t, other)).abs().max() > 1e-4


def test_dit_extends_to_longer_clips():
    """Rotary positions: a clip longer than any trained one runs and keeps its shape."""
    model = DiT(DIT_PRESETS["tiny"])
    cond = random_conditioning(1, 8, 17, 4, 4)
    assert model(torch.randn(1, 8, 17, 4, 4), torch.rand(1), cond).shape == (1, 8, 17, 4, 4)


def test_dit_rejects_grid_not_divisible_by_patch():
    model = DiT(DIT_PRESETS["tiny"])
    with pytest.raises(ValueError, match="patch"):
        model(torch.randn(1, 8, 3, 5, 4), torch.rand(1), random_conditioning(1, 8, 3, 5, 4))


def test_presets_exist_for_every_model():
    for presets in (VAE_PRESETS, DIT_PRESETS):
        assert {"tiny", "base"} <= set(presets)
    assert {"tiny_spatial", "tiny_temporal", "base_spatial", "base_temporal"} <= set(UPSCALER_PRESETS)


def test_refine_patches_keeps_the_coarse_models_sub_patch_means():
    """With the blocks left out, a fine model converted from a coarse one embeds a locally
    constant field as the coarse one did and outputs the mean of the coarse head over each
    coarse patch: checks the weight layout of the conversion, axis by axis."""
    from dataclasses import replace

    from cineray.models.dit import refine_patches

    torch.manual_seed(0)
    cfg = replace(DIT_PRESETS["tiny"], depth=0, patch=[2, 2, 2])
    coarse = DiT(cfg)
    _perturb(coarse)
    fine = DiT(replace(cfg, patch=[1, 1, 2], rope_scale=[0.5, 0.5, 1.0]))
    fine.load_state_dict(refine_patches(coarse.state_dict(), [2, 2, 2], [1, 1, 2]))
    small = torch.randn(1, 8, 2, 3, 2)  # one value per coarse patch, per channel
    cond = random_conditioning(1, 8, 4, 6, 4)
    up = lambda v: v.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)  # noqa: E731
    cond.frames = up(torch.randn(1, 10, 2, 3, 2))
    t = torch.tensor([0.4])
    want = torch.nn.functional.avg_pool3d(coarse(up(small), t, cond), (2, 2, 1))
    got = torch.nn.functional.avg_pool3d(fine(up(small), t, cond), (2, 2, 1))
    assert torch.allclose(got, want, atol=1e-5)
    # inside a coarse patch the fine output varies only along w, where its own patch is 2
    out = fine(up(small), t, cond)
    assert torch.equal(out[:, :, 0], out[:, :, 1]) and torch.equal(out[..., 0, :], out[..., 1, :])
    assert not torch.allclose(out[..., 0], out[..., 1])
    # rotary positions in the coarse model's units: half a coarse patch between fine tokens
    assert fine.token_coords(2, 1, 2, "cpu").tolist() == [[0, 0, 0], [0, 0, 1], [0.5, 0, 0],
                                                          [0.5, 0, 1]]
    # a constant field embeds exactly as before (the residual stream keeps its scale)
    ones = torch.ones(1, 18 * 8), torch.ones(1, 18 * 2)
    assert torch.allclose(fine.patch_in(ones[1]), coarse.patch_in(ones[0]), atol=1e-5)
    with pytest.raises(ValueError, match="must divide"):
        refine_patches(coarse.state_dict(), [2, 2, 2], [1, 4, 2])
