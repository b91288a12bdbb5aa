"""Training-time paraphrases of world captions.

World captions use a small fixed grammar ("a red ball falls and bounces"); users do not. The
frozen text encoder places a synonym near its word only sometimes (benchmarks/bench_text_vocab.py),
so a denoiser that only ever saw one or two words per colour learns a narrow patch of the
encoder's space. Paraphrase swaps colour, shape, motion and camera phrases of a training caption
for everyday synonyms, and the opening of the sentence for other openings, so each label covers
a wider region and the model leans on meaning rather than on one token.

The vocabulary (paraphrases.json beside this file) shares no content word with the evaluation's
held-out phrasings (cineray.world._WORDS["heldout"]); tests/pipelines/test_paraphrase.py checks
that, so the evaluation's unseen phrasings stay unseen.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from cineray.world import _WORDS

# The vocabulary is data: {attribute: {label: [phrases]}} for colour, shape, motion and camera,
# and "openings": [opening, whether "that" stays] pairs that replace "a video of a ... that".
PARAPHRASES = json.loads(Path(__file__).with_name("paraphrases.json").read_text())


class Paraphrase:
    """Rewrites a training caption with PARAPHRASES: each colour, shape, motion and camera phrase
    is swapped with probability 1/2 for a synonym of the same label, and the opening
    "a video of a" likewise. Labels come from the caption's own words, so a second object's
    colour and shape are swapped for synonyms of its own."""

    def __init__(self):
        self.label = {phrase: (att, key) for att in ("colour", "shape", "motion", "camera")
                      for key, phrases in _WORDS["train"][att].items() for phrase in phrases}
        alternatives = sorted(self.label, key=len, reverse=True)  # longest phrase first
        self.pattern = re.compile(r"\b(" + "|".join(map(re.escape, alternatives)) + r")\b")
        self.opening = re.compile(r"^a video of an? (.*?) that ")

    def __call__(self, caption: str, gen: torch.Generator) -> str:
        def coin() -> bool:
            return bool(torch.rand((), generator=gen) < 0.5)

        def pick(options: list):
            return options[int(torch.randint(len(options), (), generator=gen))]

        def swap(m: re.Match) -> str:
            att, key = self.label[m.group(1)]
            return pick(PARAPHRASES[att][key]) if coin() else m.group(1)

        out = self.pattern.sub(swap, caption)
        m = self.opening.match(out)
        if m and coin():
            opening, keep_that = pick(PARAPHRASES["openings"])
            out = f"{opening} {m.group(1)} {'that ' if keep_that else ''}{out[m.end():]}"
        out = re.sub(r"\ban (?=[^aeiou])", "a ", out)
        return re.sub(r"\ba (?=[aeiou])", "an ", out)
