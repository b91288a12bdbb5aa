"""Prompt safety: normalise, match a maintained denylist by category, ask pluggable classifiers.

    check_prompt(text) -> Verdict          # the stage function every path calls first
    SafetyFilter(terms, classifiers).check(text)

Normalisation defeats the usual evasions before matching:
1. NFKC (fullwidth and styled letters, ligatures), format characters (zero-width joiners)
   dropped, accents stripped, case folded;
2. confusables: Cyrillic and Greek letters that look Latin are mapped to it ("рorn" -> "porn");
3. leetspeak inside words ("p0rn", "s3x", "$uicide"); a "1" or "|" is tried as both i and l;
4. spacing: a run of single characters is read as one word ("k i l l", "k.i.l.l"), and runs of
   one repeated letter are collapsed in both the prompt and the terms ("gooore" ~ "gore").
Terms match whole words only (no substring inside another word, so "skill" never matches
"kill"), with an optional plural "s" / "es".

The denylist is data, pipelines/safety_terms.txt: `[category]` headers and one term per line.
Classifiers (a model, a remote moderation service) plug in as objects with
`classify(normalised, original) -> Verdict | None`; the first block wins. The negative prompt is
not checked: it names what to steer away from, and often lists exactly these words.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cineray.errors import UserError

TERMS_FILE = Path(__file__).with_name("safety_terms.txt")
MAX_PROMPT_CHARS = 4000

# Letters from other scripts that render like Latin ones (the Unicode confusables that matter
# for ASCII words; NFKC leaves them alone because they are distinct letters).
_CONFUSABLES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p",
    "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "ԁ": "d",
    "ԛ": "q", "ԝ": "w", "һ": "h", "ӏ": "l", "ɡ": "g", "ɑ": "a", "ı": "i", "ʟ": "l",
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ς": "s", "σ": "o", "γ": "y", "μ": "u",
})  # fmt: skip
# Leetspeak inside words. "1" and "|" are ambiguous (i or l): both readings are tried.
_LEET = {"0": "o", "3": "e", "4": "a", "5": "s", "6": "g", "7": "t", "8": "b", "9": "g",
         "@": "a", "$": "s", "!": "i", "+": "t", "€": "e", "£": "l", "¢": "c"}  # fmt: skip
_AMBIGUOUS = ({"1": "i", "|": "i"}, {"1": "l", "|": "l"})
_WORD = re.compile(r"[a-z0-9@$!+|€£¢]+")
_REPEATS = re.compile(r"(.)\1+")


@dataclass(frozen=True)
class Verdict:
    """check_prompt's answer. category/term say why a prompt is blocked (None when allowed)."""

    allowed: bool
    category: str | None = None
    term: str | None = None  # the denylist term or the classifier's label
    source: str = "denylist"  # "denylist" or the classifier's name

    def raise_if_blocked(self) -> None:
        if not self.allowed:
            raise BlockedPrompt(self)


class BlockedPrompt(UserError, ValueError):
    """A prompt the safety filter refuses: the CLI exits 2, HTTP answers 400, batch jobs record
    the row as blocked. The message names the category, not the matched term."""

    def __init__(self, verdict: Verdict):
        self.verdict = verdict
        super().__init__(f"prompt blocked by the safety filter (category: {verdict.category}); "
                         f"rephrase the prompt")


class PromptClassifier(Protocol):
    """A pluggable check: return a blocking Verdict, or None to let the prompt through."""

    name: str

    def classify(self, normalised: str, original: str) -> Verdict | None: ...


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


def fold(text: str) -> str:
    """NFKC, drop format characters, strip accents, casefold, map confusables."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(c for c in unicodedata.normalize("NFD", text)
                   if unicodedata.category(c) not in ("Mn", "Me", "Cf"))
    text = text.casefold().translate(_CONFUSABLES)
    return re.sub(r"(\w)['’`](\w)", r"\1\2", text)  # "it's" -> "its": no stray 1-letter words


def words(text: str) -> list[list[str]]:
    """The prompt as word lists, one per reading of the ambiguous leet characters."""
    raw = _WORD.findall(fold(text))
    readings = []
    for amb in _AMBIGUOUS:
        table = str.maketrans({**_LEET, **amb})
        # a token of digits alone ("1990") stays a number; a token with letters is leetspeak
        readings.append([w.translate(table) if re.search(r"[a-z]", w) or len(w) == 1 else w
                         for w in raw])
    return readings if readings[0] != readings[1] else readings[:1]


def squash(word: str) -> str:
    """Collapse runs of one repeated character ("kiiill" -> "kil"); applied to both sides."""
    return _REPEATS.sub(r"\1", word)


def normalise(text: str) -> str:
    """The first reading as one string (what classifiers get)."""
    return " ".join(words(text)[0])


# ---------------------------------------------------------------------------------------------
# Denylist
# ---------------------------------------------------------------------------------------------


def load_terms(path: str | Path = TERMS_FILE) -> dict[tuple[str, ...], tuple[str, str]]:
    """{term as squashed words: (category, term as written)} from `[category]` headers and one
    term per line."""
    terms, category = {}, None
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            category = line[1:-1].strip()
            continue
        if category is None:
            raise ValueError(f"{path}:{n}: term {line!r} comes before any [category] header")
        key = tuple(squash(w) for w in words(line)[0])
        if not key:
            raise ValueError(f"{path}:{n}: term {line!r} has no letters or digits")
        terms[key] = (category, line)
    return terms


class SafetyFilter:
    """Denylist + classifiers. A term matches whole words of the prompt (an optional plural on
    the last), or a run of single characters that spells it ("c h i l d p o r n")."""

    def __init__(self, terms: dict[tuple[str, ...], tuple[str, str]] | None = None,
                 classifiers: Sequence[PromptClassifier] = ()):
        self.terms = load_terms() if terms is None else terms
        self.classifiers = tuple(classifiers)
        self.lengths = sorted({len(t) for t in self.terms})
        self.spelled = {squash("".join(t)): t for t in self.terms}

    def check(self, text: str) -> Verdict:
        if not isinstance(text, str):
            raise ValueError(f"prompt must be a string, got {type(text).__name__}")
        if len(text) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt has {len(text)} characters; the limit is "
                             f"{MAX_PROMPT_CHARS}")
        for reading in words(text):
            hit = self._match([squash(w) for w in reading])
            if hit is not None:
                return Verdict(False, *self.terms[hit], "denylist")
        for clf in self.classifiers:
            verdict = clf.classify(normalise(text), text)
            if verdict is not None and not verdict.allowed:
                return verdict
        return Verdict(True)

    def _match(self, sq: list[str]) -> tuple[str, ...] | None:
        for n in reversed(self.lengths):  # the longest term wins ("suicide bomber")
            for i in range(len(sq) - n + 1):
                window = sq[i : i + n]
                hit = self._lookup(tuple(window))
                if hit:
                    return hit
        for run in _single_runs(sq):  # spaced-out words: every stretch of the run
            for i in range(len(run)):
                for j in range(i + 2, len(run) + 1):
                    term = self.spelled.get(squash("".join(run[i:j])))
                    if term:
                        return term
        return None

    def _lookup(self, key: tuple[str, ...]) -> tuple[str, ...] | None:
        last = key[-1]
        for end in (last, last[:-1] if last.endswith("s") else "",
                    last[:-2] if last.endswith("es") else ""):
            if end and key[:-1] + (end,) in self.terms:
                return key[:-1] + (end,)
        return None


def _single_runs(tokens: list[str]) -> Iterable[list[str]]:
    run: list[str] = []
    for t in [*tokens, ""]:
        if len(t) == 1:
            run.append(t)
            continue
        if len(run) > 1:
            yield run
        run = []


@functools.lru_cache(maxsize=1)
def default_filter() -> SafetyFilter:
    return SafetyFilter()


def check_prompt(text: str, classifiers: Sequence[PromptClassifier] = ()) -> Verdict:
    """The safety stage: Verdict for a prompt (the shipped denylist, then `classifiers`)."""
    if classifiers:
        return SafetyFilter(default_filter().terms, classifiers).check(text)
    return default_filter().check(text)
