import importlib.util

import pytest
import torch

from cineray.models.layers import attention


def reference(q, k, v, key_mask=None):
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return logits.softmax(-1) @ v


def test_sdpa_matches_reference_with_and_without_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(attention(q, k, v), reference(q, k, v))
    torch.testing.assert_close(attention(q, k, v, mask), reference(q, k, v, mask))


def test_auto_backend_on_cpu_never_needs_xformers():
    q = torch.randn(1, 2, 4, 8)
    assert attention(q, q, q, backend="auto").shape == q.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers kernels need a CUDA device")
@pytest.mark.skipif(importlib.util.find_spec("xformers") is None, reason="xformers not installed")
def test_xformers_matches_sdpa_on_cuda():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 32, device="cuda", dtype=torch.float16) for _ in range(3))
    mask = torch.ones(2, 64, dtype=torch.bool, device="cuda")
    mask[0, 40:] = False
    a = attention(q, k, v, mask, backend="xformers")
    b = attention(q, k, v, mask, backend="sdpa")
    torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
