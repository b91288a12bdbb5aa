"""Training paraphrases: same labels in other words, and none of the evaluation's held-out words."""

from __future__ import annotations

import re

import torch

from cineray.pipelines.paraphrase import PARAPHRASES, Paraphrase
from cineray.world import _WORDS, WorldConfig, captions, sample_scene

FUNCTION_WORDS = {"a", "an", "and", "in", "is", "it", "of", "the", "to", "on", "as", "while"}


def words(x) -> set[str]:
    if isinstance(x, str):
        return set(re.findall(r"[a-z]+", x))
    if isinstance(x, bool):
        return set()
    return set().union(*(words(v) for v in (x.values() if isinstance(x, dict) else x)))


def labels(caption: str, table: dict) -> list[tuple[str, str]]:
    """(attribute, label) of each phrase of `table` in caption, in order, longest phrase first."""
    phrase = {p: (att, key) for att in ("colour", "shape", "motion", "camera")
              for key, ps in table[att].items() for p in ps}
    pattern = r"\b(" + "|".join(map(re.escape, sorted(phrase, key=len, reverse=True))) + r")\b"
    return [phrase[m] for m in re.findall(pattern, caption)]


def test_paraphrases_share_no_content_word_with_held_out_phrasings():
    shared = words(PARAPHRASES) & words(_WORDS["heldout"])
    assert shared <= FUNCTION_WORDS, shared - FUNCTION_WORDS
    assert set(PARAPHRASES["colour"]) == set(_WORDS["train"]["colour"])
    for att in ("shape", "motion", "camera"):
        assert set(PARAPHRASES[att]) == set(_WORDS["train"][att])


def test_paraphrase_keeps_every_label_and_the_articles():
    para, gen, cfg = Paraphrase(), torch.Generator().manual_seed(0), WorldConfig()
    both = {att: {k: (*_WORDS["train"][att][k], *PARAPHRASES[att][k]) for k in PARAPHRASES[att]}
            for att in ("colour", "shape", "motion", "camera")}
    changed, openings, new_words = 0, set(), set()
    for i in range(300):
        for caption in captions(sample_scene(cfg, i), i, style="train"):
            out = para(caption, gen)
            assert labels(out, both) == labels(caption, _WORDS["train"]), (caption, out)
            assert not re.search(r"\ba [aeiou]|\ban [^aeiou ]", out), out
            changed += out != caption
            openings.update(o for o, _ in PARAPHRASES["openings"] if out.startswith(o + " "))
            new_words |= words(out) - words(_WORDS["train"])
    assert 0.8 < changed / 1200 < 1.0  # each phrase flips a coin: most captions change, not all
    assert openings == {o for o, _ in PARAPHRASES["openings"]}
    assert len(new_words) > 100
    assert para("", gen) == "" and para("a purple hat", gen) == "a purple hat"
