import pytest
import torch

from cineray.models.text_encoder import TextEncoder, TextEncoderConfig


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(TextEncoderConfig(max_length=16))


def test_tokens_mask_and_pooled(encoder):
    out = encoder(["a red ball falling and bouncing", ""])
    assert out.tokens.shape == (2, 16, 384) and out.tokens.dtype == torch.float32
    assert out.mask.dtype == torch.bool and out.mask[0].sum() > out.mask[1].sum()
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.ones(2))


def test_pretrained_weights_know_synonyms(encoder):
    """The shipped MiniLM is really pretrained: paraphrases are closer than unrelated text."""
    a, b, c = encoder(["a red ball falling", "a crimson sphere dropping",
                       "the stock market closed higher"]).pooled
    assert (a @ b) > (a @ c) + 0.2


def test_frozen(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.model.training


def test_single_string_is_rejected(encoder):
    with pytest.raises(TypeError):
        encoder("a red ball")


def test_the_prompt_cache_keeps_the_batch_it_serves(encoder):
    """A full LRU cache evicts after the lookup: a prompt hit in this batch is never the one
    dropped to make room for this batch's new prompts."""
    from cineray.pipelines.conditioning import CachedTextEncoder

    cached = CachedTextEncoder(encoder, max_items=2)
    cached(["a red ball", "a blue box"])
    out = cached(["a red ball", "a green star"])  # "a red ball" is the oldest entry
    assert list(cached.cache) == ["a red ball", "a green star"]
    torch.testing.assert_close(out.pooled, encoder(["a red ball", "a green star"]).pooled)
    assert cached(["x", "y", "z"]).tokens.shape[0] == 3 and len(cached.cache) == 2
