"""The synthetic physics world: scenes with exact labels, continuous-time physics, rendering.

Coordinates. Screen positions are in frame heights: u in [0, aspect] (rightwards), v in [0, 1]
(downwards). Objects live on a subject plane whose coordinates equal the screen's in the camera's
reference view (mid-clip), so speeds are in frame heights per second and gravity in frame heights
per second^2. The background is a far textured plane. The camera maps each plane to the screen
with a pan offset and a zoom factor, both centred on mid-clip:
    screen = centre + (plane - centre - pan(t)) * zoom(t)
Pan/tilt shift both planes equally (a turning camera); zoom scales both; a dolly zoom scales only
the background, so the subject keeps its size. Positions are functions of seconds and frame i is
shown at i / fps: the same scene rendered at 32/64/128 px or at 8/16 fps is the same motion.
The focal length sets the initial field of view of the background (a long lens magnifies it);
the subject is framed at the sampled size whatever the lens, as a camera operator would.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white")
MOTIONS = ("static", "left", "right", "up", "fall", "throw")
CAMERAS = (
    "static", "pan_left", "pan_right", "tilt_up", "tilt_down", "zoom_in", "zoom_out", "dolly_zoom"
)  # fmt: skip
# Saturated, distinct hues (red 0, orange 32, yellow 56, green 125, cyan 183, blue 224,
# magenta 300 degrees), and white, which stands out from the backgrounds by brightness.
COLOUR_RGB = {
    "red": (0.92, 0.10, 0.10), "green": (0.12, 0.82, 0.18), "blue": (0.15, 0.30, 0.97),
    "yellow": (0.95, 0.90, 0.08), "magenta": (0.90, 0.12, 0.90), "cyan": (0.08, 0.85, 0.92),
    "orange": (0.98, 0.55, 0.04), "white": (0.97, 0.97, 0.97),
}  # fmt: skip
GRAVITY = 2.5  # frame heights / s^2: a fall from the top reaches the floor in ~0.65 s
RESTITUTION = 0.6  # vertical speed kept at each bounce
FLOOR = 0.82  # subject-plane height of the floor (the top of the ground band)
DEFAULT_HOLDOUT = (  # every colour, shape and motion still appears in training
    "red circle fall", "green square throw", "blue triangle left", "yellow diamond right",
    "magenta star up", "cyan circle static", "orange star fall", "white diamond throw",
)  # fmt: skip

# Shapes are defined at equal area (that of the unit disc), so `size` is the equal-area diameter
# and a smaller second object is smaller whatever the two shapes are.
_TRI = float(np.sqrt(4 * np.pi / np.sqrt(3)))  # equilateral side with area pi
_STAR_R, _STAR_RATIO = float(np.sqrt(np.pi / (5 * 0.5 * np.sin(np.pi / 5)))), 0.5
# Bounding box in radii from the centre: (half width, top, bottom).
_TRI_H = _TRI * np.sqrt(3) / 2
BOX = {"circle": (1.0, 1.0, 1.0), "square": (0.8862, 0.8862, 0.8862),
       "diamond": (1.2533, 1.2533, 1.2533), "triangle": (_TRI / 2, 2 * _TRI_H / 3, _TRI_H / 3),
       "star": (_STAR_R * np.sin(2 * np.pi / 5), _STAR_R, _STAR_R * np.cos(np.pi / 5))}  # fmt: skip
EXTENT = {"circle": 1.0, "square": 1.2533, "triangle": 2 * _TRI_H / 3, "diamond": 1.2533,
          "star": _STAR_R}  # max distance from the centre, in radii  # fmt: skip


def inside(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Point-in-shape test in radius units (centre at 0, y down); returns a bool array."""
    if shape == "circle":
        return x * x + y * y <= 1.0
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= np.sqrt(np.pi) / 2
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= np.sqrt(np.pi / 2)
    if shape == "triangle":  # apex up, centroid at the origin
        return (y <= _TRI_H / 3) & (np.abs(x) <= (y + 2 * _TRI_H / 3) / np.sqrt(3))
    if shape == "star":  # five points, one pointing up
        sector = 2 * np.pi / 5
        ang = np.mod(np.arctan2(y, x) + np.pi / 2 + sector / 2, sector) - sector / 2
        rho = np.hypot(x, y)
        px, py = rho * np.cos(ang), rho * np.abs(np.sin(ang))
        ax, inner = _STAR_R, _STAR_R * _STAR_RATIO
        bx, by = inner * np.cos(sector / 2), inner * np.sin(sector / 2)
        return (bx - ax) * py - by * (px - ax) >= 0  # on the centre's side of the outer edge
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


@dataclass
class WorldConfig:
    """Distribution of scenes. Lengths in frame heights, times in seconds."""

    width: int = 32
    height: int = 32
    frames: int = 17
    fps: float = 8.0
    object_size: tuple[float, float] = (0.28, 0.36)  # equal-area diameter: 9-11.5 px at 32 px
    object_speed: tuple[float, float] = (0.12, 0.22)  # left/right/up, frame heights / s
    p_second_object: float = 0.3
    p_camera_motion: float = 0.5
    focal_length_mm: tuple[float, float] = (24.0, 85.0)
    camera_speed: tuple[float, float] = (0.1, 0.2)  # pan: frames/s; zoom: d(ln zoom)/dt
    # relative weights of the moving cameras, CAMERAS[1:] in order (pans, tilts, zooms, dolly zoom)
    camera_weights: list[float] = field(default_factory=lambda: [1.0] * (len(CAMERAS) - 1))
    texture_strength: float = 0.16  # value contrast of the background pattern
    holdout: list[str] = field(default_factory=lambda: list(DEFAULT_HOLDOUT))
    fps_choices: list[float] = field(default_factory=lambda: [8.0])
    fps_weights: list[float] = field(default_factory=lambda: [1.0])

    def __post_init__(self) -> None:
        for item in self.holdout:
            c, s, m = (item.split() + ["", "", ""])[:3]
            if c not in COLOURS or s not in SHAPES or m not in MOTIONS or len(item.split()) != 3:
                raise ValueError(f"holdout entry {item!r} must be 'colour shape motion' from "
                                 f"{COLOURS}, {SHAPES}, {MOTIONS}")  # fmt: skip
        if len(self.fps_choices) != len(self.fps_weights) or not self.fps_choices:
            raise ValueError("fps_choices and fps_weights must be non-empty and the same length")
        if min(self.fps_choices) <= 0 or min(self.fps_weights) < 0 or sum(self.fps_weights) <= 0:
            raise ValueError(f"fps_choices must be > 0 and fps_weights >= 0 with a positive sum, "
                             f"got {self.fps_choices} / {self.fps_weights}")  # fmt: skip
        if len(self.camera_weights) != len(CAMERAS) - 1 or min(self.camera_weights) < 0 \
                or sum(self.camera_weights) <= 0:
            raise ValueError(f"camera_weights={list(self.camera_weights)} must be {len(CAMERAS) - 1} "
                             f"weights >= 0 with a positive sum, one per camera of {CAMERAS[1:]}")
        for name in ("object_size", "object_speed", "focal_length_mm", "camera_speed"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name}=({lo}, {hi}) must be (low, high) with 0 < low <= high")
        for name in ("p_second_object", "p_camera_motion"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be a probability in [0, 1]")
        if self.width < 8 or self.height < 8:
            raise ValueError(f"width x height = {self.width}x{self.height} must be at least 8x8")
        if (self.frames - 1) % 4:
            raise ValueError(f"frames={self.frames} must be 1 + 4k (the causal VAE needs it)")


@dataclass
class Thing:
    """One object on the subject plane; x0, y0 its centre at t=0, vx, vy its initial velocity."""

    shape: str
    colour: str
    size: float
    motion: str
    x0: float
    y0: float
    vx: float = 0.0
    vy: float = 0.0


@dataclass
class Backdrop:
    """Background plane and ground band: pattern kind, two colours each, sine waves
    [freq, angle, phase, amplitude] of the pattern."""

    kind: str
    colours: list[list[float]]
    waves: list[list[float]]
    ground: list[list[float]]
    ground_waves: list[list[float]]
    units: float  # texture units across the frame height at t=0 (from the focal length)


@dataclass
class Scene:
    """One clip's world and its labels. things[0] is the main object (the one the labels and
    the caption describe first); `trajectory` is its centre per frame at the scene's own fps."""

    seed: int
    shape: str
    colour: str
    motion: str
    camera: str
    camera_speed: float
    focal_length_mm: float
    n_objects: int
    heldout: bool
    fps: float
    frames: int
    aspect: float
    things: list[Thing]
    backdrop: Backdrop | None

    @property
    def duration(self) -> float:
        return (self.frames - 1) / self.fps

    @property
    def trajectory(self) -> np.ndarray:
        return trajectory(self, self.frames, self.fps)  # the module-level function


# 1. physics ------------------------------------------------------------------------------------


def bounce_y(t: np.ndarray, y0: float, vy0: float, floor: float) -> np.ndarray:
    """Height (down positive) of a ball under GRAVITY that bounces on `floor`, at times t (s)."""
    out = np.full_like(t, floor, dtype=np.float64)
    start, y, v = 0.0, y0, vy0
    for _ in range(64):
        # time until y + v s + g s^2 / 2 reaches the floor
        hit = (-v + np.sqrt(v * v + 2 * GRAVITY * max(floor - y, 0.0))) / GRAVITY
        seg = (t >= start) & (t < start + hit)
        s = t[seg] - start
        out[seg] = y + v * s + 0.5 * GRAVITY * s * s
        start, y, v = start + hit, floor, -RESTITUTION * (v + GRAVITY * hit)
        if abs(v) < 0.05:  # at rest: the remaining times stay on the floor
            break
    return out


def plane_xy(thing: Thing, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Subject-plane centre (x, y) of a thing at times t (s)."""
    x = thing.x0 + thing.vx * t
    if thing.motion in ("fall", "throw"):
        floor = FLOOR - BOX[thing.shape][2] * thing.size / 2
        return x, bounce_y(t, thing.y0, thing.vy, floor)
    return x, thing.y0 + thing.vy * t


def camera_at(scene: Scene, t: np.ndarray) -> dict[str, np.ndarray]:
    """Pan offsets (frame heights) and zoom of the subject and background planes at t (s).

    Camera paths are centred on the middle of the clip (the view there is the reference one), so
    a pan sweeps symmetrically across the scene and a zoom spans the same factor either way.
    """
    s, cam = scene.camera_speed, scene.camera
    tc, zero = t - scene.duration / 2, np.zeros_like(t, dtype=np.float64)
    pan_x = {"pan_left": -s * tc, "pan_right": s * tc}.get(cam, zero)
    pan_y = {"tilt_up": -s * tc, "tilt_down": s * tc}.get(cam, zero)
    zoom = {"zoom_in": np.exp(s * tc), "zoom_out": np.exp(-s * tc)}.get(cam, zero + 1.0)
    zoom_bg = np.exp(s * tc) if cam == "dolly_zoom" else zoom
    return {"pan_x": pan_x, "pan_y": pan_y, "zoom": zoom, "zoom_bg": zoom_bg}


def to_plane(scene: Scene, u: float, v: float, t: float) -> tuple[float, float]:
    """Inverse of the camera: the subject-plane point seen at screen (u, v) at time t."""
    cam = {k: float(x[0]) for k, x in camera_at(scene, np.array([t])).items()}
    cu, cv = scene.aspect / 2, 0.5
    return cu + (u - cu) / cam["zoom"] + cam["pan_x"], cv + (v - cv) / cam["zoom"] + cam["pan_y"]


def screen_xy(scene: Scene, thing: Thing, t: np.ndarray) -> tuple[np.ndarray, ...]:
    """Screen centre (u, v) in frame heights and the on-screen scale of a thing at t (s)."""
    cam, (x, y) = camera_at(scene, t), plane_xy(thing, t)
    cu, cv = scene.aspect / 2, 0.5
    z = cam["zoom"]
    return cu + (x - cu - cam["pan_x"]) * z, cv + (y - cv - cam["pan_y"]) * z, z


def trajectory(scene: Scene, frames: int, fps: float) -> np.ndarray:
    """Main object centre per frame, float32 (T, 2) as [x, y] in [0, 1] frame coordinates."""
    u, v, _ = screen_xy(scene, scene.things[0], np.arange(frames) / fps)
    return np.stack([u / scene.aspect, v], axis=1).astype(np.float32)


# 2. sampling -----------------------------------------------------------------------------------


def _combos(cfg: WorldConfig, heldout: bool | None) -> list[tuple[str, str, str]]:
    held = {tuple(h.split()) for h in cfg.holdout}
    every = list(itertools.product(COLOURS, SHAPES, MOTIONS))
    if heldout is None:
        return every
    chosen = [c for c in every if (c in held) == heldout]
    if not chosen:
        raise ValueError("WorldConfig.holdout is empty: there are no held-out combinations")
    return chosen


def _motion_params(rng: np.random.Generator, cfg: WorldConfig, scene: Scene, thing: Thing,
                   slow: float) -> None:  # fmt: skip
    """Velocity and start of the thing's motion, placed so its screen path is roughly centred.

    Targets are chosen on screen (at mid-clip for steady motions, at t=0 for a fall) and mapped
    back through the camera, so a panning or zooming camera does not push the object out of view.
    """
    r, m, dur, a = thing.size / 2, thing.motion, scene.duration, scene.aspect
    rest = FLOOR - BOX[thing.shape][2] * r  # centre height when standing on the floor
    top = BOX[thing.shape][1] * r + 0.05
    v = rng.uniform(*cfg.object_speed) * slow
    thing.vx = {"left": -v, "right": v}.get(m, 0.0)
    thing.vy = -v if m == "up" else 0.0
    tm = dur / 2
    x, y = to_plane(scene, a / 2 + rng.uniform(-0.12, 0.12) * a, rng.uniform(0.3, 0.65), tm)
    thing.x0, thing.y0 = x - thing.vx * tm, min(y - thing.vy * tm, rest)
    if m in ("static", "left", "right") and scene.camera != "tilt_up" and rng.random() < 0.4:
        thing.y0 = rest  # standing on (or sliding along) the floor
    if m == "fall":
        thing.y0 = to_plane(scene, 0, rng.uniform(top, top + 0.1), 0.0)[1]
    elif m == "throw":
        thing.vx = rng.choice([-1.0, 1.0]) * rng.uniform(0.15, 0.28) * slow
        thing.vy = -rng.uniform(0.85, 1.2)  # rises 0.14-0.29 frame heights
        thing.x0 = x - thing.vx * min(dur, 2.5) / 2
        thing.y0 = rng.uniform(min(max(top + thing.vy**2 / (2 * GRAVITY), 0.45), rest), rest)


def _in_view(scene: Scene, thing: Thing, t: np.ndarray, margin: float = 0.04) -> bool:
    """Whether the thing's bounding box stays inside the frame (with a margin) at all times t."""
    u, v, z = screen_xy(scene, thing, t)
    hw, top, bottom = (e * thing.size / 2 * z for e in BOX[thing.shape])
    return bool(np.all(u - hw >= margin) and np.all(u + hw <= scene.aspect - margin)
                and np.all(v - top >= margin) and np.all(v + bottom <= 1 - margin))  # fmt: skip


def _backdrop(rng: np.random.Generator, cfg: WorldConfig, focal: float, zoom0: float) -> Backdrop:
    """Low-saturation earth/grey tones with a modest-contrast pattern."""
    def tone(v_lo: float, v_hi: float) -> np.ndarray:
        hue = rng.choice([0.08, 0.1, 0.12, 0.15, 0.55, 0.6, 0.3])  # browns, sand, slate, olive
        sat, val = rng.uniform(0.0, 0.25), rng.uniform(v_lo, v_hi)
        base = np.array([1.0, 1.0 - sat * 0.6, 1.0 - sat])  # warm tint, then rotate for cool hues
        base = base[::-1] if hue > 0.4 else base
        return base * val / base.max()

    def waves(n: int, f_lo: float, f_hi: float) -> list[list[float]]:
        return [[rng.uniform(f_lo, f_hi), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi),
                 rng.uniform(0.5, 1.0)] for _ in range(n)]  # fmt: skip

    kind = str(rng.choice(["noise", "stripes", "tiles"]))
    a = tone(0.35, 0.55)
    b = np.clip(a + rng.choice([-1, 1]) * cfg.texture_strength * rng.uniform(0.8, 1.2), 0.1, 0.7)
    ga = tone(0.2, 0.3)
    gb = np.clip(ga + cfg.texture_strength * 0.7, 0.0, 0.45)
    units = 1.5 * 35.0 / focal * zoom0  # 1.5 texture units across the frame at 35 mm, at t=0
    # two octaves, so a long lens (magnified background) still shows detail to track
    return Backdrop(kind, [a.tolist(), b.tolist()], waves(3, 1.2, 2.6) + waves(2, 2.8, 4.5),
                    [ga.tolist(), gb.tolist()], waves(3, 4.0, 7.0), units)  # fmt: skip


def sample_scene(cfg: WorldConfig, seed: int, heldout: bool | None = False) -> Scene:
    """A scene drawn deterministically from `seed`.

    heldout=False draws only training (colour, shape, motion) combinations, True only held-out
    ones, None any. Placement is redrawn until every object stays fully in view for the whole
    clip at its fps; each retry slows the object and the camera by 8%, down to 60% (less for
    clips over 2 s) of their sampled speeds: a fast tilt against a rising object cannot fit in
    the frame otherwise.
    """
    rng = np.random.default_rng(seed)
    combos = _combos(cfg, heldout)
    colour, shape, motion = combos[rng.integers(len(combos))]
    held = f"{colour} {shape} {motion}" in set(cfg.holdout)
    w = np.asarray(cfg.fps_weights, dtype=np.float64)
    fps = float(cfg.fps_choices[rng.choice(len(w), p=w / w.sum())])
    aspect, t = cfg.width / cfg.height, np.arange(cfg.frames) / fps
    scene_dur = (cfg.frames - 1) / fps
    camera = "static"
    if rng.random() < cfg.p_camera_motion:
        cw = np.asarray(cfg.camera_weights, dtype=np.float64)  # equal weights: the uniform draw
        camera = str(rng.choice(CAMERAS[1:], p=cw / cw.sum() if np.ptp(cw) else None))
    focal = float(np.exp(rng.uniform(*np.log(cfg.focal_length_mm))))
    second = rng.random() < cfg.p_second_object
    misses = 0
    for attempt in range(64):
        slow = max(0.92**misses, 0.6 * min(1.0, 2.0 / scene_dur))
        speed = float(rng.uniform(*cfg.camera_speed)) * slow if camera != "static" else 0.0
        main = Thing(shape, colour, float(rng.uniform(*cfg.object_size)), motion, 0.0, 0.0)
        scene = Scene(int(seed), shape, colour, motion, camera, speed, focal, 1, held, fps,
                      cfg.frames, aspect, [main], None)  # fmt: skip
        scene.backdrop = _backdrop(rng, cfg, focal, float(camera_at(scene, t[:1])["zoom_bg"][0]))
        _motion_params(rng, cfg, scene, main, slow)
        if not _in_view(scene, main, t):
            misses += 1
        elif not second or _add_second(rng, scene, t) or attempt >= 48:
            return scene  # (a second object that never fits is left out)
    raise RuntimeError(f"seed {seed}: no placement keeps the object in view; widen the frame "
                       f"or lower object_speed / camera_speed / frames")  # fmt: skip


def _add_second(rng: np.random.Generator, scene: Scene, t: np.ndarray) -> bool:
    """A smaller static object of another colour and shape, clear of the main object's path.

    Tries a grid of places (in the air and on the floor) in random order; False if none fits.
    """
    main = scene.things[0]
    other = Thing(str(rng.choice([s for s in SHAPES if s != main.shape])),
                  str(rng.choice([c for c in COLOURS if c != main.colour])),
                  main.size * float(rng.uniform(0.5, 0.65)), "static", 0.0, 0.0)  # fmt: skip
    rest = FLOOR - BOX[other.shape][2] * other.size / 2
    mu, mv, mz = screen_xy(scene, main, t)
    gap = (EXTENT[main.shape] * main.size + EXTENT[other.shape] * other.size) / 2 * mz + 0.03
    places = [to_plane(scene, u * scene.aspect, v, scene.duration / 2)
              for u in np.linspace(0.1, 0.9, 9) for v in np.linspace(0.15, 0.75, 7)]  # fmt: skip
    places += [(x, rest) for x, _ in places[::7]]
    for i in rng.permutation(len(places)):
        other.x0, other.y0 = places[i]
        ou, ov, _ = screen_xy(scene, other, t)
        clear = np.all(np.hypot(mu - ou, mv - ov) > gap)
        if other.y0 <= rest and clear and _in_view(scene, other, t):
            scene.things.append(other)
            scene.n_objects = 2
            return True
    return False


# 3. rendering ----------------------------------------------------------------------------------


def _wave(f: float, ang: float, ph: float, tx: np.ndarray, ty: np.ndarray) -> np.ndarray:
    """sin(2 pi f (cos(ang) tx + sin(ang) ty) + ph), split as sin(a + b) so that only the 1-D
    coordinate arrays go through sin/cos (tx varies along columns, ty along rows): 4x faster."""
    a = 2 * np.pi * f * np.cos(ang) * tx + ph
    b = 2 * np.pi * f * np.sin(ang) * ty
    return np.sin(a) * np.cos(b) + np.cos(a) * np.sin(b)


def _pattern(kind: str, waves: list[list[float]], tx: np.ndarray, ty: np.ndarray) -> np.ndarray:
    """Pattern value in [0, 1] at texture coordinates tx (T, 1, W) and ty (T, H, 1)."""
    noise = sum(amp * _wave(f, ang, ph, tx, ty) for f, ang, ph, amp in waves)
    noise /= np.sqrt(sum(w[3] ** 2 for w in waves)) * 1.6
    if kind == "stripes":  # diagonal bands, plus enough noise that motion along them shows
        f, ang = waves[0][0] * 1.5, np.pi / 4 + (waves[0][1] % (np.pi / 2))
        noise = 0.45 * np.tanh(3 * _wave(f, ang, 0.0, tx, ty)) + 0.65 * noise
    elif kind == "tiles":
        f = waves[0][0] * 1.2
        checker = np.sin(2 * np.pi * f * tx) * np.sin(2 * np.pi * f * ty)
        noise = 0.7 * np.tanh(4 * checker) + 0.4 * noise
    return np.clip(0.5 + 0.5 * noise, 0.0, 1.0)


def _background(scene: Scene, width: int, height: int, t: np.ndarray, ss: int = 2) -> np.ndarray:
    """Background plane + ground band, float (T, H, W, 3), supersampled ss x ss, box-filtered."""
    bd, cam = scene.backdrop, camera_at(scene, t)
    cu, cv = width / height / 2, 0.5
    u = (np.arange(width * ss) + 0.5) / (ss * height)
    v = (np.arange(height * ss) + 0.5) / (ss * height)
    u, v = u[None, None, :], v[None, :, None]
    zb, zs = cam["zoom_bg"][:, None, None], cam["zoom"][:, None, None]
    px, py = cam["pan_x"][:, None, None], cam["pan_y"][:, None, None]
    tx, ty = bd.units * ((u - cu) / zb + px), bd.units * ((v - cv) / zb + py)
    p = _pattern(bd.kind, bd.waves, tx, ty)
    gx, gy = (u - cu) / zs + cu + px, (v - cv) / zs + cv + py  # subject-plane coordinates
    ground = gy >= FLOOR  # (T, H, 1): the ground band is whole rows
    g = _pattern("noise", bd.ground_waves, gx * 0.5, gy * 2.0)  # stretched along the floor
    p = np.where(ground, g, p)
    lo = np.where(ground[..., None], np.asarray(bd.ground[0]), np.asarray(bd.colours[0]))
    hi = np.where(ground[..., None], np.asarray(bd.ground[1]), np.asarray(bd.colours[1]))
    img = lo + (hi - lo) * p[..., None]
    t_, h_, w_ = img.shape[:3]
    return img.reshape(t_, h_ // ss, ss, w_ // ss, ss, 3).mean(axis=(2, 4))


def _draw(img: np.ndarray, scene: Scene, thing: Thing, t: np.ndarray, ss: int = 4) -> None:
    """Composite a thing onto img (T, H, W, 3) in place with ss x ss supersampled coverage."""
    n, height, width = img.shape[:3]
    u, v, z = screen_xy(scene, thing, t)
    rgb = np.asarray(COLOUR_RGB[thing.colour])
    offs = (np.arange(ss) + 0.5) / ss
    for i in range(n):
        rad = thing.size / 2 * z[i] * height  # radius in pixels
        ext = EXTENT[thing.shape] * rad + 1
        cx, cy = u[i] * height, v[i] * height
        x0, x1 = max(int(cx - ext), 0), min(int(cx + ext) + 1, width)
        y0, y1 = max(int(cy - ext), 0), min(int(cy + ext) + 1, height)
        if x0 >= x1 or y0 >= y1:
            continue
        xs = ((np.arange(x0, x1)[:, None] + offs).ravel() - cx) / rad
        ys = ((np.arange(y0, y1)[:, None] + offs).ravel() - cy) / rad
        cover = inside(thing.shape, xs[None, :], ys[:, None]).astype(np.float64)
        cover = cover.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))[..., None]
        img[i, y0:y1, x0:x1] = img[i, y0:y1, x0:x1] * (1 - cover) + rgb * cover


def render(scene: Scene, width: int, height: int, frames: int, fps: float) -> np.ndarray:
    """Render frames at times i / fps -> uint8 (T, H, W, 3) RGB."""
    if width < 4 or height < 4 or frames < 1 or not fps > 0:
        raise ValueError(f"bad render size {width}x{height}, frames={frames}, fps={fps}")
    if abs(width / height - scene.aspect) > 1e-6:
        raise ValueError(f"{width}x{height} does not keep the scene's aspect {scene.aspect:.3f}")
    t = np.arange(frames) / fps
    img = _background(scene, width, height, t)
    for thing in reversed(scene.things):  # main object last, i.e. in front
        _draw(img, scene, thing, t)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


# 4. captions -----------------------------------------------------------------------------------
# Two vocabularies with disjoint content words: "train" for the dataset, "heldout" to test whether
# the text encoder generalises to synonyms and sentence shapes it never saw in training.
_WORDS = {
    "train": {
        "colour": {c: (c,) for c in COLOURS},
        "shape": {"circle": ("circle", "ball", "disc"), "square": ("square", "box"),
                  "triangle": ("triangle",), "diamond": ("diamond", "rhombus"), "star": ("star",)},
        "motion": {
            "static": ("sits still", "rests in place", "stays put"),
            "left": ("moves left", "slides to the left", "travels left"),
            "right": ("moves right", "slides to the right", "travels right"),
            "up": ("rises", "moves up", "floats upward"),
            "fall": ("falls and bounces", "drops to the ground and bounces",
                     "falls under gravity and bounces"),
            "throw": ("is thrown in an arc", "flies through the air in an arc",
                      "is tossed across the scene")},
        "camera": {
            "pan_left": ("the camera pans left", "the camera pans to the left"),
            "pan_right": ("the camera pans right", "the camera pans to the right"),
            "tilt_up": ("the camera tilts up", "the camera tilts upward"),
            "tilt_down": ("the camera tilts down", "the camera tilts downward"),
            "zoom_in": ("the camera zooms in",), "zoom_out": ("the camera zooms out",),
            "dolly_zoom": ("the camera does a dolly zoom", "the camera performs a dolly zoom")},
        "second": ("next to a small {c} {s}", "with a small {c} {s} nearby",
                   "beside a small {c} {s}"),
        "templates": ("a {C} {S} {M}{X}{K}", "{C} {S} {M}{X}{K}",
                      "a video of a {C} {S} that {M}{X}{K}", "{K2}the {C} {S} {M}{X}"),
    },
    "heldout": {
        "colour": {"red": ("crimson", "scarlet"), "green": ("emerald", "lime"),
                   "blue": ("azure", "cobalt"), "yellow": ("golden", "lemon"),
                   "magenta": ("fuchsia", "pink"), "cyan": ("turquoise", "aqua"),
                   "orange": ("tangerine", "amber"), "white": ("ivory", "snowy")},
        "shape": {"circle": ("sphere", "orb"), "square": ("cube", "block"),
                  "triangle": ("pyramid", "wedge"), "diamond": ("lozenge", "gem"),
                  "star": ("starburst", "pentagram")},
        "motion": {
            "static": ("remains motionless", "hovers, stationary", "is frozen in position"),
            "left": ("drifts leftward", "heads leftward", "coasts leftward"),
            "right": ("drifts rightward", "heads rightward", "coasts rightward"),
            "up": ("ascends", "climbs skyward", "soars higher"),
            "fall": ("plummets and rebounds", "tumbles onto the floor and springs back",
                     "plunges, then rebounds off the floor"),
            "throw": ("is hurled along a parabola", "is lobbed overhead",
                      "sails on a curved trajectory")},
        "camera": {
            "pan_left": ("the view sweeps leftward", "the shot glides leftward"),
            "pan_right": ("the view sweeps rightward", "the shot glides rightward"),
            "tilt_up": ("the view cranes skyward", "the shot lifts skyward"),
            "tilt_down": ("the view cranes earthward", "the shot sinks earthward"),
            "zoom_in": ("the lens pushes closer", "the shot magnifies"),
            "zoom_out": ("the lens pulls back", "the shot widens"),
            "dolly_zoom": ("the backdrop warps around it in a vertigo shot",)},
        "second": ("alongside a tiny {c} {s}", "accompanied by a little {c} {s}"),
        "templates": ("one {C} {S} {M}{X}{K}", "footage showing a {C} {S} that {M}{X}{K}",
                      "{K2}a lone {C} {S} {M}{X}"),
    },
}  # fmt: skip


def captions(scene: Scene, rng: np.random.Generator | int, style: str = "train") -> list[str]:
    """Distinct phrasings (4 train, 3 heldout) naming colour, shape and motion of the main object,
    the camera motion when the camera moves, and the second object when present."""
    if style not in _WORDS:
        raise ValueError(f"style={style!r}; use 'train' or 'heldout'")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    vocab, out = _WORDS[style], []

    def pick(options: tuple[str, ...]) -> str:
        return str(options[rng.integers(len(options))])

    for template in vocab["templates"]:
        cam = pick(vocab["camera"][scene.camera]) if scene.camera != "static" else ""
        second = ""
        if scene.n_objects > 1:
            other = scene.things[1]
            c2, s2 = pick(vocab["colour"][other.colour]), pick(vocab["shape"][other.shape])
            second = " " + pick(vocab["second"]).format(c=c2, s=s2)
        conj = pick(("as", "while"))
        out.append(template.format(
            C=pick(vocab["colour"][scene.colour]), S=pick(vocab["shape"][scene.shape]),
            M=pick(vocab["motion"][scene.motion]), X=second,
            K=f" {conj} {cam}" if cam else "", K2=f"{conj} {cam}, " if cam else ""))  # fmt: skip
    return [re.sub(r"\ba (?=[aeiou])", "an ", c) for c in out]
