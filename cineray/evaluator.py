"""Judge a clip from its pixels alone: is there one coherent object, and which colour, shape,
motion and camera motion does it show? The world is known exactly, so these checks are the
project's automatic evaluation of generated video.

Pipeline (frames uint8 (T, H, W, 3), any size; lengths in frame heights, times in seconds):
  1. foreground = saturated or near-white pixels (world backgrounds are muted); connected
     components per frame; the largest is the main object.
  2. validity: a dominant, compact main object in >= 90% of frames that keeps its colour and does
     not teleport, and a background that does not flicker. This gate stops noise from scoring.
  3. colour: hue of the object's core pixels; shape: IoU of the object's soft coverage against
     the world's equal-area ideal shapes placed at its centroid (fill ratio alone confused
     triangles with small circles).
  4. camera: a similarity (shift + scale) per frame pair, fitted by Gauss-Newton on the
     background luma with the objects masked out; a dolly zoom scales the background but not
     the object.
  5. motion: the camera-compensated object track; gravity fitted as a shared parabola over the
     arcs between bounces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from cineray.world import COLOUR_RGB, GRAVITY, SHAPES, inside

MIN_AREA, MAX_AREA = 0.008, 0.25  # main object area, fraction of the frame
MAX_FLICKER = 0.05  # mean abs background luma change after camera compensation
GOOD_FRACTION = 0.9
_EIGHT = np.ones((3, 3), bool)


@dataclass
class ClipReport:
    """What the pixels show. Attributes are None when the clip is invalid."""

    valid: bool
    reason: str
    colour: str | None = None
    shape: str | None = None
    motion: str | None = None
    camera: str | None = None
    gravity: float = 0.0  # fitted vertical acceleration, frame heights / s^2, down positive
    gravity_down: bool = False
    area_variation: float = float("nan")  # std / mean of the object's area over frames
    flicker: float = float("nan")
    track: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (T, 2) [x, y] in [0, 1]
    pan: tuple[float, float] = (0.0, 0.0)  # background content motion, frame heights / s
    zoom: float = 0.0  # background d(ln scale)/dt
    object_zoom: float = 0.0  # object d(ln size)/dt
    shape_iou: dict[str, float] = field(default_factory=dict)


# 1. foreground objects ------------------------------------------------------------------------


def _foreground(f: np.ndarray) -> np.ndarray:
    """Saturated or near-white pixels, bool (T, H, W)."""
    mx, mn = f.max(-1), f.min(-1)
    return ((mx - mn) > 0.45 * np.maximum(mx, 1e-6)) & (mx > 0.3) | (mn > 0.8)


def _components(fg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: main component mask (T, H, W), its area and the area of all other fg pixels."""
    main = np.zeros_like(fg)
    area, rest = np.zeros(len(fg)), np.zeros(len(fg))
    for i, frame in enumerate(fg):
        labels, n = ndimage.label(frame, structure=_EIGHT)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        k = int(np.argmax(sizes))
        main[i] = labels == k + 1
        area[i], rest[i] = sizes[k], sizes.sum() - sizes[k]
    return main, area, rest


def _colour_of(rgb: np.ndarray) -> str:
    """Nearest world colour of an RGB triple in [0, 1]: white by low saturation, else by hue."""
    mx, mn = rgb.max(), rgb.min()
    if mx - mn < 0.3 * mx:
        return "white"
    hue = _hue(rgb)
    named = [c for c in COLOUR_RGB if c != "white"]
    dist = [abs((hue - _hue(np.asarray(COLOUR_RGB[c])) + 180) % 360 - 180) for c in named]
    return named[int(np.argmin(dist))]


def _hue(rgb: np.ndarray) -> float:
    r, g, b = rgb
    return float(np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360)


def _coverage(f: np.ndarray, main: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, ...]:
    """Soft coverage alpha (H, W) of the main object in one frame and its core colour.

    Linear mixing model p = a * c_obj + (1 - a) * c_bg, with c_obj the median of the object's
    core and c_bg the median of a ring around it; exact for the world's anti-aliased edges.
    """
    core = ndimage.binary_erosion(main, _EIGHT) if main.sum() > 30 else main
    c_obj = np.median(f[core if core.any() else main], axis=0)
    grown = ndimage.binary_dilation(main, _EIGHT, iterations=2)
    ring = ndimage.binary_dilation(grown, _EIGHT, iterations=2) & ~grown & ~others
    c_bg = np.median(f[ring], axis=0) if ring.sum() > 4 else np.median(f[~grown], axis=0)
    d = c_obj - c_bg
    alpha = np.clip((f - c_bg) @ d / max(float(d @ d), 1e-6), 0.0, 1.0)
    return np.where(grown & ~others, alpha, 0.0), c_obj


_SS = (np.arange(4) + 0.5) / 4 - 0.5  # 4x4 supersampling offsets within a pixel


def _shape_ious(alpha: np.ndarray) -> np.ndarray:
    """Soft IoU of a coverage map against each equal-area ideal shape at its centroid."""
    area = alpha.sum()
    ys, xs = np.nonzero(alpha > 0)
    cy, cx = (alpha[ys, xs] @ ys) / area + 0.5, (alpha[ys, xs] @ xs) / area + 0.5
    rad = np.sqrt(area / np.pi)
    x = ((np.arange(alpha.shape[1])[:, None] + 0.5 + _SS).ravel() - cx) / rad
    y = ((np.arange(alpha.shape[0])[:, None] + 0.5 + _SS).ravel() - cy) / rad
    out = []
    for shape in SHAPES:
        ideal = inside(shape, x[None, :], y[:, None]).reshape(alpha.shape[0], 4, alpha.shape[1], 4)
        ideal = ideal.mean(axis=(1, 3))
        out.append(np.minimum(alpha, ideal).sum() / max(np.maximum(alpha, ideal).sum(), 1e-6))
    return np.asarray(out)


# 2. camera ------------------------------------------------------------------------------------


def _luma(f: np.ndarray) -> np.ndarray:
    return f @ np.array([0.299, 0.587, 0.114])


FIT_ROWS = 0.75  # camera fit uses the frame above the world's ground band (see _pair_motion)


def _pair_motion(prev, cur, bg_prev, bg_cur, guess) -> tuple[np.ndarray, float]:
    """Similarity q = c + s (p - c) + d taking prev pixels p to cur pixels q (luma (h, w)),
    fitted by Gauss-Newton with Huber weights on background pixels.

    The fit uses the rows above FIT_ROWS: the ground band lies on the subject plane, which holds
    still in a dolly zoom while the far background scales, and its strong edge would pin the
    scale to 1 (measured: 0.03 instead of 0.28 log-scale on a dolly clip). In every other camera
    move the ground moves with the background, so leaving it out loses nothing.
    Returns ((dx, dy, s - 1) in pixels, mean abs luma residual over all background pixels).
    """
    h, w = prev.shape
    py, px = np.mgrid[0:h, 0:w].astype(np.float64)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    gy, gx = np.gradient(cur)
    theta = np.array(guess, dtype=np.float64)
    fit_rows = py < FIT_ROWS * h

    def warp(theta):
        qx = cx + (1 + theta[2]) * (px - cx) + theta[0]
        qy = cy + (1 + theta[2]) * (py - cy) + theta[1]
        coords = np.stack([qy, qx])
        ok = bg_prev & (qx >= 0) & (qx <= w - 1) & (qy >= 0) & (qy <= h - 1)
        ok &= ndimage.map_coordinates(bg_cur.astype(np.float64), coords, order=1) > 0.99
        return coords, ok, ndimage.map_coordinates(cur, coords, order=1) - prev

    for _ in range(8):
        coords, ok, r = warp(theta)
        ok &= fit_rows
        if ok.sum() < 0.1 * h * w:
            return np.zeros(3), np.inf
        r = r[ok]
        gxq = ndimage.map_coordinates(gx, coords, order=1)[ok]
        gyq = ndimage.map_coordinates(gy, coords, order=1)[ok]
        jac = np.stack([gxq, gyq, (gxq * (px - cx)[ok] + gyq * (py - cy)[ok]) / (w / 2)], axis=1)
        k = 1.345 * 1.4826 * max(np.median(np.abs(r)), 1e-3)
        wts = np.minimum(1.0, k / np.maximum(np.abs(r), 1e-9))  # Huber
        hess = jac.T @ (jac * wts[:, None]) + 1e-4 * np.eye(3)
        step = np.linalg.solve(hess, -(jac.T @ (wts * r)))
        step[2] /= w / 2
        theta += step
        if np.abs(step[:2]).max() < 1e-3 and abs(step[2]) < 1e-4:
            break
    _, ok, r = warp(theta)
    return theta, float(np.mean(np.abs(r[ok]))) if ok.any() else np.inf


def _camera(f: np.ndarray, fg: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-frame similarity from frame 0, as scale (T,) and shift (T, 2) in frame heights
    about the frame centre, and the mean background flicker."""
    t, h = f.shape[:2]
    k = max(1, h // 32)  # analyse at ~32 px: same basin at every resolution, and cheap
    luma = _luma(f)
    fgk = fg
    if k > 1:
        hh, ww = (h // k) * k, (f.shape[2] // k) * k
        luma = luma[:, :hh, :ww].reshape(t, hh // k, k, ww // k, k).mean(axis=(2, 4))
        fgk = fg[:, :hh, :ww].reshape(t, hh // k, k, ww // k, k).any(axis=(2, 4))
    luma = ndimage.gaussian_filter(luma, sigma=(0, 0.7, 0.7))
    bg = ~ndimage.binary_dilation(fgk, np.ones((1, 3, 3), bool), iterations=2)
    scale, shift, flick = np.ones(t), np.zeros((t, 2)), []
    theta = np.zeros(3)
    for i in range(1, t):
        theta, resid = _pair_motion(luma[i - 1], luma[i], bg[i - 1], bg[i], theta)
        s, d = 1 + theta[2], theta[:2] / luma.shape[1]
        scale[i], shift[i] = scale[i - 1] * s, shift[i - 1] * s + d  # compose with 0 -> i-1
        flick.append(resid)
    return scale, shift, float(np.mean(flick)) if flick else 0.0


def still_camera(frames: np.ndarray, fps: float) -> bool:
    """Whether uint8 (T, H, W, 3) frames at `fps` read as a still camera: the background (what
    is not an object) neither shifts nor scales by more than the evaluator's camera thresholds.
    Needs no object, so it also reads clips the evaluator would call invalid."""
    if frames.shape[0] < 3:
        return False
    f = frames.astype(np.float64) / 255.0
    scale, shift, _ = _camera(f, _foreground(f))
    return _classify_camera(scale, shift, 0.0, (len(f) - 1) / fps)[0] == "static"


def _classify_camera(scale, shift, obj_zoom: float, dur: float) -> tuple[str, tuple, float]:
    """Camera label from the background's total shift and log-scale rates (per second)."""
    zoom = float(np.log(scale[-1])) / dur
    pan = (float(shift[-1, 0]) / dur, float(shift[-1, 1]) / dur)  # content motion on screen
    if abs(zoom) > 0.03 and 0.35 * abs(zoom) > 0.5 * max(abs(pan[0]), abs(pan[1])):
        if abs(obj_zoom) < 0.5 * abs(zoom):
            return "dolly_zoom", pan, zoom  # the background scales, the subject keeps its size
        return ("zoom_in" if zoom > 0 else "zoom_out"), pan, zoom
    if max(abs(pan[0]), abs(pan[1])) < 0.03:
        return "static", pan, zoom
    if abs(pan[0]) >= abs(pan[1]):  # content moving right means the camera turns left
        return ("pan_left" if pan[0] > 0 else "pan_right"), pan, zoom
    return ("tilt_up" if pan[1] > 0 else "tilt_down"), pan, zoom


# 3. motion ------------------------------------------------------------------------------------


def fit_gravity(t: np.ndarray, y: np.ndarray, tol: float = 0.008) -> float:
    """Vertical acceleration (down positive) over the first arc: the longest run of frames from
    the start that one parabola fits within `tol` frame heights. A bounce breaks the fit, and so
    does an impact between two samples that happen to sit at the same height (common at 4 fps),
    which a search for local extrema would miss. Later arcs are short and, at 8 fps, alias small
    bounces into a creep along the floor, so they would only blur the estimate."""
    if len(y) < 3:
        return 0.0
    g = 2 * np.polyfit(t[:3] - t[0], y[:3], 2)[0]
    for end in range(4, len(y) + 1):
        coef = np.polyfit(t[:end] - t[0], y[:end], 2)
        if np.abs(np.polyval(coef, t[:end] - t[0]) - y[:end]).max() > tol:
            break
        g = 2 * coef[0]
    return float(g)


def _classify_motion(t: np.ndarray, xy: np.ndarray) -> tuple[str, float]:
    """Motion label and fitted gravity from a camera-compensated track (frame heights)."""
    g = fit_gravity(t, xy[:, 1])
    rel = xy - xy[0]
    if np.hypot(rel[:, 0], rel[:, 1]).max() < 0.06:
        return "static", g
    vx, vy = (np.polyfit(t, xy[:, i], 1)[0] for i in (0, 1))
    rise = -rel[:, 1].min()  # how far it went up (y is down)
    if g > 0.4 * GRAVITY:
        return ("throw" if abs(rel[-1, 0]) > 0.1 or rise > 0.06 else "fall"), g
    if abs(vy) > abs(vx):
        return ("up" if vy < 0 else "fall"), g
    return ("right" if vx > 0 else "left"), g


# 4. the report --------------------------------------------------------------------------------


@dataclass
class _Object:
    """The main object in its good frames: coverage maps, centres (frame heights), areas (px)."""

    idx: np.ndarray
    alphas: list[np.ndarray]
    colour: str
    centres: np.ndarray
    sizes: np.ndarray


def _find_object(f: np.ndarray, fg: np.ndarray, fps: float) -> _Object | str:
    """The dominant coherent object, or the reason there is none."""
    n, h, w = f.shape[:3]
    main, area, rest = _components(fg)
    fill = np.array([a / max(_bbox_area(m), 1) for a, m in zip(area, main, strict=True)])
    # dominant: sensible size, larger than every other foreground pixel together, and compact
    good = (area >= MIN_AREA * h * w) & (area <= MAX_AREA * h * w) & (rest <= 0.8 * area)
    good &= fill >= 0.3
    if good.mean() < GOOD_FRACTION:
        return f"one dominant object in only {good.mean():.0%} of frames"
    idx = np.nonzero(good)[0]
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    alphas, colours, centres = [], [], []
    for i in idx:
        alpha, c_obj = _coverage(f[i], main[i], fg[i] & ~main[i])
        alphas.append(alpha)
        colours.append(_colour_of(c_obj))
        centres.append([(alpha * xs).sum(), (alpha * ys).sum()] / alpha.sum() / h)
    sizes = np.array([a.sum() for a in alphas])
    values, counts = np.unique(colours, return_counts=True)
    if counts.max() < 0.8 * len(colours):
        return "the object changes colour"
    centres = np.asarray(centres)
    jumps = np.hypot(*np.diff(centres, axis=0).T)
    if len(idx) > 1 and jumps.max() > max(0.35, 2.5 / fps):  # a fall at 8 fps moves <= 0.24
        return "the object jumps between frames"
    if len(idx) > 1 and np.abs(np.diff(np.log(sizes))).max() > np.log(2.5):
        return "the object's size jumps between frames"
    return _Object(idx, alphas, str(values[np.argmax(counts)]), centres, sizes)


def evaluate_clip(frames: np.ndarray, fps: float) -> ClipReport:
    """Judge a clip, uint8 (T, H, W, 3) RGB at `fps`, from its pixels."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError("frames must be a uint8 array (T, H, W, 3)")
    if frames.shape[0] < 3 or frames.shape[3] != 3 or not fps > 0:
        raise ValueError(f"need >= 3 RGB frames and fps > 0, got {frames.shape} at fps={fps}")
    f = frames.astype(np.float64) / 255.0
    n, h, w = f.shape[:3]
    fg = _foreground(f)
    obj = _find_object(f, fg, fps)
    if isinstance(obj, str):
        return ClipReport(False, obj)
    scale, shift, flicker = _camera(f, fg)
    if flicker > MAX_FLICKER:
        return ClipReport(False, f"background flickers ({flicker:.3f} > {MAX_FLICKER})",
                          flicker=flicker)  # fmt: skip
    t = obj.idx / fps
    k = max(1, len(t) // 5)  # the object's scale from its first and last few frames
    growth = np.log(np.median(obj.sizes[-k:]) / np.median(obj.sizes[:k])) / 2
    obj_zoom = float(growth / max(t[-1] - t[0], 1e-6))
    camera, pan, zoom = _classify_camera(scale, shift, obj_zoom, (n - 1) / fps)
    world = obj.centres
    if camera != "dolly_zoom":  # a dolly zoom leaves the subject plane where it is
        world = _to_middle(obj.centres, obj.idx, scale, shift, w / h, n)
    motion, g = _classify_motion(t, world)
    ious = np.mean([_shape_ious(a) for a in obj.alphas], axis=0)
    track = np.full((n, 2), np.nan)
    track[obj.idx] = obj.centres / np.array([w / h, 1.0])
    return ClipReport(
        True, "ok", colour=obj.colour, shape=SHAPES[int(np.argmax(ious))], motion=motion,
        camera=camera, gravity=g, gravity_down=g > 0.4 * GRAVITY,
        area_variation=float(obj.sizes.std() / obj.sizes.mean()), flicker=flicker, track=track,
        pan=pan, zoom=zoom, object_zoom=obj_zoom,
        shape_iou={s: round(float(v), 3) for s, v in zip(SHAPES, ious, strict=True)},
    )  # fmt: skip


def _bbox_area(mask: np.ndarray) -> int:
    ys, xs = np.nonzero(mask)
    return 0 if len(ys) == 0 else int((np.ptp(ys) + 1) * (np.ptp(xs) + 1))


def _to_middle(centres, idx, scale, shift, aspect: float, n: int) -> np.ndarray:
    """Map screen centres to the middle frame's view (the world's reference camera)."""
    c = np.array([aspect / 2, 0.5])
    first = c + (centres - c - shift[idx]) / scale[idx][:, None]  # in frame 0's view
    m = n // 2
    return c + scale[m] * (first - c) + shift[m]


# 5. scores ------------------------------------------------------------------------------------

ATTRIBUTES = ("colour", "shape", "motion", "camera")


def _expected(expected, key: str):
    return expected.get(key) if isinstance(expected, Mapping) else getattr(expected, key, None)


def score(report: ClipReport, expected) -> dict[str, bool]:
    """Per-attribute correctness against expected labels (a mapping, or an object such as a
    world Scene or an index row with colour/shape/motion/camera). An invalid clip gets every
    attribute wrong. "gravity" is right when the fit is downward exactly for falls and throws."""
    out = {"valid": report.valid}
    for key in ATTRIBUTES:
        want = _expected(expected, key)
        if want is not None:
            out[key] = report.valid and getattr(report, key) == want
    motion = _expected(expected, "motion")
    if motion is not None:
        out["gravity"] = report.valid and report.gravity_down == (motion in ("fall", "throw"))
    return out


def summarise(reports: Sequence[ClipReport], expected: Sequence | None = None) -> dict[str, float]:
    """Rates over many clips: valid, each attribute (with expected labels), and the mean
    flicker and area variation of the valid clips."""
    if not reports:
        raise ValueError("summarise needs at least one report")
    if expected is not None and len(expected) != len(reports):
        raise ValueError(f"{len(reports)} reports but {len(expected)} expected labels")
    valid = [r for r in reports if r.valid]
    out = {"n": float(len(reports)), "valid": len(valid) / len(reports)}
    out["flicker"] = float(np.mean([r.flicker for r in valid])) if valid else float("nan")
    out["area_variation"] = (
        float(np.mean([r.area_variation for r in valid])) if valid else float("nan")
    )
    if expected is not None:
        scores = [score(r, e) for r, e in zip(reports, expected, strict=True)]
        for key in (*ATTRIBUTES, "gravity"):
            hits = [s[key] for s in scores if key in s]
            if hits:
                out[key] = float(np.mean(hits))
    return out


def seam_score(frames: np.ndarray, boundaries: Sequence[int]) -> float:
    """Mean abs frame difference across window boundaries over the mean elsewhere.

    A boundary b sits between frames b-1 and b of frames uint8 (T, H, W, 3). About 1 means the
    seams are invisible; much above 1, the windows jump where they meet.
    """
    diffs = np.abs(np.diff(frames.astype(np.float64), axis=0)).mean(axis=(1, 2, 3))  # (T-1,)
    at = np.zeros(len(diffs), bool)
    for b in boundaries:
        if not 1 <= b < len(frames):
            raise ValueError(f"boundary {b} is outside [1, {len(frames) - 1}] for T={len(frames)}")
        at[b - 1] = True
    if not at.any() or at.all():
        raise ValueError("seam_score needs at least one boundary and one frame pair between them")
    across, elsewhere = diffs[at].mean(), diffs[~at].mean()
    if elsewhere == 0:
        return 1.0 if across == 0 else float("inf")
    return float(across / elsewhere)
