"""Judging clips, the figures per case and source, the bars, and the report files.

    judge(item, clip) -> verdict (a JSON-ready dict: what the evaluator saw, right or wrong)
    aggregate(verdicts) -> {case: {metric: value}, "all": {...}}
    check_bars(aggregates) -> [{bar, target, per source: value, pass}]
    markdown(report) -> str;  contact_sheet(rows) -> PNG bytes
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cineray.evaluator import evaluate_clip, score, seam_score
from cineray.jobs.eval_sources import Clip
from cineray.jobs.eval_suite import CASES, SuiteItem

PSNR_CAP = 99.0  # dB for identical frames (JSON has no infinity)
GRAVITY_MOTIONS = ("fall", "throw")  # the clips whose object falls under gravity
CASE_TITLES = {
    "heldout": "held-out colour/shape/motion combinations, training captions, static camera",
    "phrasing": "captions in words and sentence shapes no training caption uses",
    "camera": "every camera motion, named in the caption and passed as the camera parameter",
    "i2v": "image-to-video: frame 0 of the world's clip + its caption",
    "long": "long clips (>= 4 windows): seams and per-window colour/shape",
    "all": "every clip of every case",
}  # fmt: skip


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images of the same shape, capped at PSNR_CAP."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0**2 / mse))


def judge(item: SuiteItem, clip: Clip) -> dict:
    """The evaluator's verdict on one clip against the item's labels (validity gate on)."""
    report = evaluate_clip(clip.frames, clip.fps)
    right = score(report, item.expected)
    got = {k: getattr(report, k) for k in ("colour", "shape", "motion", "camera")}
    v = {"id": item.id, "case": item.case, "valid": report.valid, "reason": report.reason,
         "got": got, **{k: right[k] for k in ("colour", "shape", "motion", "camera")},
         "all3": right["colour"] and right["shape"] and right["motion"],
         "gravity": right["gravity"], "gravity_down": report.gravity_down,
         "g": _num(report.gravity), "area_variation": _num(report.area_variation),
         "flicker": _num(report.flicker), "seconds": round(clip.seconds, 3)}  # fmt: skip
    if clip.reference is not None:
        v["psnr_first"] = round(psnr(clip.frames[0], clip.reference), 2)
    if item.segments:
        v["seam"] = _num(seam_score(clip.frames, item.boundaries))
        v["windows"] = [_segment(clip.frames[a:b], clip.fps) for a, b in item.segments]
        v["windows_consistent"] = all(w["valid"] and w["colour"] == item.scene.colour
                                      and w["shape"] == item.scene.shape for w in v["windows"])
    return v


def _segment(frames: np.ndarray, fps: float) -> dict:
    r = evaluate_clip(frames, fps)
    return {"valid": r.valid, "colour": r.colour, "shape": r.shape}


def _num(x) -> float | None:
    """A JSON-safe float to 4 significant digits (None for NaN or infinity): flicker of world
    clips is ~1e-4, so a fixed number of decimals would erase it."""
    x = float(x)
    return float(f"{x:.4g}") if math.isfinite(x) else None


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return _num(np.mean(xs)) if xs else None


# Metrics, in table order: rates are fractions of the case's clips; the rest are means.
METRICS = ("n", "valid", "colour", "shape", "motion", "all3", "camera", "gravity",
           "falls_accelerate", "area_variation", "flicker", "psnr_first_mean", "psnr_first_min",
           "seam_mean", "seam_max", "windows_consistent", "seconds_per_clip")  # fmt: skip


def summary(verdicts: Sequence[dict], expected: dict[str, dict]) -> dict:
    """Figures over a group of verdicts; `expected` maps item id -> labels (for gravity)."""
    falls = [v for v in verdicts if expected[v["id"]]["motion"] in GRAVITY_MOTIONS]
    valid = [v for v in verdicts if v["valid"]]
    out = {"n": len(verdicts)}
    for key in ("valid", "colour", "shape", "motion", "all3", "camera", "gravity"):
        out[key] = _mean([v[key] for v in verdicts])
    out["falls_accelerate"] = _mean([v["valid"] and v["gravity_down"] for v in falls])
    out["area_variation"] = _mean([v["area_variation"] for v in valid])
    out["flicker"] = _mean([v["flicker"] for v in valid])
    psnrs = [v["psnr_first"] for v in verdicts if "psnr_first" in v]
    out["psnr_first_mean"], out["psnr_first_min"] = _mean(psnrs), min(psnrs, default=None)
    seams = [v["seam"] for v in verdicts if "seam" in v]
    out["seam_mean"], out["seam_max"] = _mean(seams), max(seams, default=None)
    out["windows_consistent"] = _mean([v["windows_consistent"] for v in verdicts
                                       if "windows_consistent" in v])  # fmt: skip
    out["seconds_per_clip"] = _mean([v["seconds"] for v in verdicts])
    return out


def aggregate(verdicts: Sequence[dict], expected: dict[str, dict]) -> dict[str, dict]:
    """{case: summary} for every case present, plus "all"."""
    out = {c: summary([v for v in verdicts if v["case"] == c], expected) for c in CASES
           if any(v["case"] == c for v in verdicts)}  # fmt: skip
    out["all"] = summary(verdicts, expected)
    return out


# Bars ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    """What a trained model must reach. `relative`: the target is threshold x the real clips'
    figure. `only`: the source it applies to (None: every source but random)."""

    name: str
    case: str  # a case or "all"
    metric: str
    op: str  # ">=" | "<=" | "=="
    threshold: float
    relative: bool = False
    only: str | None = None

    @property
    def target(self) -> str:
        return f"{self.op} {self.threshold:g}" + (" x real" if self.relative else "")


BARS = (
    *(Bar(f"{case}: {m}", case, m, ">=", t) for case in ("heldout", "phrasing")
      for m, t in (("colour", 0.95), ("shape", 0.90), ("motion", 0.90), ("all3", 0.80))),
    Bar("falling objects accelerate down", "all", "falls_accelerate", ">=", 0.90),
    Bar("camera motion recognised", "camera", "camera", ">=", 0.90),
    Bar("i2v: first frame PSNR (dB, worst clip)", "i2v", "psnr_first_min", ">=", 30.0),
    Bar("i2v: motion as asked", "i2v", "motion", ">=", 0.90),
    Bar("long: seam score", "long", "seam_mean", "<=", 1.2),
    Bar("long: colour and shape kept in every window", "long", "windows_consistent", ">=", 0.90),
    Bar("object area variation", "all", "area_variation", "<=", 1.5, relative=True),
    Bar("background flicker", "all", "flicker", "<=", 1.5, relative=True),
    Bar("random weights score 0 valid", "all", "valid", "==", 0.0, only="random"),
)  # fmt: skip


def _passes(value: float | None, op: str, limit: float) -> bool | None:
    if value is None:
        return None
    return {">=": value >= limit, "<=": value <= limit, "==": value == limit}[op]


def check_bars(aggregates: dict[str, dict[str, dict]], bars: Sequence[Bar] = BARS) -> list[dict]:
    """Each bar's value and pass/fail per source (None where the figure is missing, e.g. a
    relative bar without the real source or a case with no valid clip)."""
    real = aggregates.get("real")
    out = []
    for bar in bars:
        row = {"bar": bar.name, "case": bar.case, "metric": bar.metric, "target": bar.target,
               "sources": {}}  # fmt: skip
        for source, agg in aggregates.items():
            value = agg.get(bar.case, {}).get(bar.metric)
            if (source != bar.only) if bar.only else (source == "random"):
                row["sources"][source] = {"value": value, "applies": False}  # context only
                continue
            limit = bar.threshold
            if bar.relative:
                base = None if real is None else real.get(bar.case, {}).get(bar.metric)
                limit = None if not base else bar.threshold * base
            ok = None if limit is None else _passes(value, bar.op, limit)
            row["sources"][source] = {"value": value, "applies": True, "pass": ok,
                                      "limit": None if limit is None else _num(limit)}
        out.append(row)
    return out


# Markdown --------------------------------------------------------------------------------------


def _cell(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _mark(result: dict) -> str:
    """'0.93 PASS'; a source the bar does not apply to shows its figure in brackets."""
    if not result["applies"]:
        return f"({_cell(result['value'])})"
    return f"{_cell(result['value'])} " + {True: "PASS", False: "FAIL", None: "n/a"}[result["pass"]]


def markdown(report: dict) -> str:
    """One table of bars (sources across), then one table per case: rows = metrics,
    columns = sources, plus the bar that case carries."""
    sources = list(report["aggregates"])
    run = report["run"]
    lines = ["# cineray evaluation", "",
             f"checkpoint `{run['checkpoint']}`; sources {', '.join(sources)}; "
             f"{run['per_case']} clips per case; seed {run['seed']}; "
             f"{run['seconds']:.0f} s in all.", "",
             "Every clip is judged from its pixels by `cineray.evaluator` with its validity gate "
             "on (an invalid clip counts as wrong on every attribute). `real` is the world's own "
             "render (the upper bound); `random` is the pipeline with random weights. Figures in "
             "brackets are context: that bar does not apply to that source.", "",
             "## Bars", "", "| bar | target | " + " | ".join(sources) + " |",
             "|---|---|" + "---|" * len(sources)]  # fmt: skip
    for row in report["bars"]:
        cells = [_mark(row["sources"][s]) for s in sources]
        lines.append(f"| {row['bar']} | {row['target']} | " + " | ".join(cells) + " |")
    bars_by = {}
    for bar in BARS:
        bars_by.setdefault((bar.case, bar.metric), bar.target)
    for case in [*CASES, "all"]:
        aggs = {s: report["aggregates"][s].get(case) for s in sources}
        if not any(aggs.values()):
            continue
        lines += ["", f"## {case}: {CASE_TITLES[case]}", "",
                  "| metric | " + " | ".join(sources) + " | bar |",
                  "|---|" + "---|" * (len(sources) + 1)]  # fmt: skip
        for m in METRICS:
            values = [(aggs[s] or {}).get(m) for s in sources]
            if all(v is None for v in values):
                continue
            bar = bars_by.get((case, m), "")
            lines.append(f"| {m} | " + " | ".join(_cell(v) for v in values) + f" | {bar} |")
    return "\n".join(lines) + "\n"


# Contact sheet ---------------------------------------------------------------------------------


def contact_sheet(rows: Sequence[tuple[str, str, np.ndarray]], columns: int = 8,
                  cell: int = 64) -> bytes:  # fmt: skip
    """PNG of labelled rows: each (title, subtitle, frames uint8 (T, H, W, 3)) shows `columns`
    frames spread evenly over the clip, each scaled to `cell` px high (nearest neighbour)."""
    from PIL import Image, ImageDraw, ImageFont  # noqa: PLC0415  (only the report needs it)

    font = ImageFont.load_default()
    label_h, pad = 26, 4
    width = columns * (cell + 2) + pad
    sheet = Image.new("RGB", (width, len(rows) * (cell + label_h + pad) + pad), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for r, (title, subtitle, frames) in enumerate(rows):
        y = pad + r * (cell + label_h + pad)
        draw.text((pad, y), title[: width // 6], fill=(235, 235, 235), font=font)
        draw.text((pad, y + 12), subtitle[: width // 6], fill=(160, 160, 160), font=font)
        picks = np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int)
        for c, i in enumerate(picks):
            h, w = frames[i].shape[:2]
            im = Image.fromarray(frames[i]).resize((max(1, cell * w // h), cell),
                                                   Image.Resampling.NEAREST)  # fmt: skip
            sheet.paste(im, (pad + c * (cell + 2), y + label_h))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def verdict_text(v: dict) -> str:
    """Short label: 'ok red circle fall' with wrong attributes marked, or the invalid reason."""
    if not v["valid"]:
        return f"INVALID: {v['reason']}"
    got = v["got"]
    words = [got[k] + ("" if v[k] else "(x)") for k in ("colour", "shape", "motion")]
    cam = got["camera"] + ("" if v["camera"] else "(x)")
    return " ".join(words) + f", cam {cam}"
