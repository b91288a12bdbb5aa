import pytest
import torch

from cineray.models.video_vae import VAE_PRESETS, VideoVAE


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = VideoVAE(VAE_PRESETS["tiny"]).eval()
    with torch.no_grad():  # non-trivial weights everywhere, so equalities below mean something
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@torch.no_grad()
def test_compression_factors(vae):
    x = torch.rand(1, 3, 17, 32, 32) * 2 - 1
    assert vae.encode(x).shape == (1, 8, 5, 8, 8)
    assert vae.decode(vae.encode(x)).shape == x.shape
    assert vae.latent_shape(33, 64, 32) == (9, 16, 8)


@torch.no_grad()
def test_causal_changing_frame_t_never_changes_earlier_latents(vae):
    x = torch.rand(1, 3, 17, 16, 16) * 2 - 1
    z = vae.encode(x)
    for t in (1, 5, 9, 16):
        y = x.clone()
        y[:, :, t:] = torch.rand_like(y[:, :, t:])
        first_affected = (t + 3) // 4  # latent j >= 1 covers frames 4j-3..4j
        zy = vae.encode(y)
        assert torch.equal(zy[:, :, :first_affected], z[:, :, :first_affected])
        assert not torch.equal(zy[:, :, first_affected], z[:, :, first_affected])


@torch.no_grad()
def test_decoder_is_causal(vae):
    z = torch.randn(1, 8, 5, 4, 4)
    x = vae.decode(z)
    z2 = z.clone()
    z2[:, :, 3:] = torch.randn_like(z2[:, :, 3:])
    x2 = vae.decode(z2)
    assert torch.equal(x[:, :, :9], x2[:, :, :9])  # latents 0..2 -> frames 0..8


@torch.no_grad()
@pytest.mark.parametrize("chunk", [4, 8, 16])
def test_chunked_encode_and_decode_equal_whole_clip(vae, chunk):
    x = torch.rand(1, 3, 33, 16, 16) * 2 - 1
    z = vae.encode(x)
    torch.testing.assert_close(vae.encode(x, chunk=chunk), z, rtol=0, atol=2e-5)  # conv algorithms differ by shape
    torch.testing.assert_close(vae.decode(z, chunk=chunk // 4), vae.decode(z), rtol=0, atol=2e-5)  # conv algorithms differ by shape


@torch.no_grad()
def test_an_unchanged_latent_decodes_to_an_unchanged_frame(vae):
    """Only the steady upsampler holds a constant latent still; the plain depth-to-space one
    (older checkpoints, which load into either) gives each sub-frame its own offset."""
    import dataclasses

    z = torch.randn(1, 8, 1, 4, 4).repeat(1, 1, 5, 1, 1)
    frames = vae.decode(z)
    torch.testing.assert_close(frames, frames[:, :, :1].expand_as(frames), rtol=0, atol=1e-5)
    plain = VideoVAE(dataclasses.replace(vae.cfg, steady_upsample=False)).eval()
    plain.load_state_dict(vae.state_dict())
    frames = plain.decode(z)
    assert (frames[:, :, 1:] - frames[:, :, :-1]).abs().amax() > 1e-3
    z[:, :, 3:] += torch.randn(1, 8, 1, 4, 4)  # a change still decodes to motion within a group
    moving = vae.decode(z)[:, :, 9:13]
    assert (moving[:, :, 1:] - moving[:, :, :-1]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-3


@torch.no_grad()
def test_still_image_is_a_one_frame_video(vae):
    x = torch.rand(2, 3, 9, 16, 16) * 2 - 1
    assert torch.equal(vae.encode(x[:, :, :1]), vae.encode(x)[:, :, :1])


@torch.no_grad()
def test_latent_stats_normalise(vae):
    x = torch.rand(4, 3, 9, 16, 16) * 2 - 1
    vae.set_latent_stats(x)
    z = vae.encode(x)
    assert z.mean(dim=(0, 2, 3, 4)).abs().max() < 1e-4
    assert (z.std(dim=(0, 2, 3, 4)) - 1).abs().max() < 1e-3
    torch.testing.assert_close(vae.denormalize(vae.normalize(z)), z)
    vae.latent_mean.zero_()
    vae.latent_std.fill_(1)


def test_bad_frame_count_names_the_rule(vae):
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(torch.zeros(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match="multiple"):
        vae.latent_shape(17, 30, 32)
