"""The evaluation prompt suite: items drawn deterministically from the synthetic world.

Five cases, `per_case` items each (every item a world scene with exact labels, a prompt and the
generation settings):

    heldout   held-out (colour, shape, motion) combinations, training-vocabulary captions,
              static camera; the combinations are cycled so each one is asked for
    phrasing  "heldout"-style captions (synonyms and sentence shapes no training caption uses),
              alternating held-out and training combinations, motions cycled, static camera
    camera    every camera motion in turn (named in the caption and passed as the camera
              parameter), training combinations
    i2v       image-to-video: frame 0 of the world's clip + its caption, motions cycled
    long      clips of `long_frames` frames (>= 4 windows of the plan), motions cycled; their
              seam pairs and window segments come from the same window plan the pipeline uses

Every item also passes its scene's camera, camera speed and focal length as the request's
camera parameters (training conditions the denoiser on them, with dropout). Scenes are found by
drawing seeds until one shows the wanted labels, so each is a genuine draw of the world's
distribution; seeds derive from (suite seed, case, item, attempt) and never meet the dataset's
(seed, index) seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from cineray.pipelines.windows import WindowConfig, WindowPlan, plan_windows
from cineray.world import CAMERAS, MOTIONS, Scene, WorldConfig, captions, render, sample_scene

CASES = ("heldout", "phrasing", "camera", "i2v", "long")
MIN_LONG_WINDOWS = 4


@dataclass(frozen=True)
class SuiteConfig:
    per_case: int = 16  # items per case (8 = every held-out combination and camera once)
    seed: int = 0
    long_frames: int = 65  # 5 windows of 17 frames with a 5-frame overlap (4 with overlap 1)
    long_fps: float = 16.0  # the dataset's higher frame rate: a 4 s clip, a 4 fps keyframe pass
    windows: WindowConfig = field(default_factory=WindowConfig)

    def __post_init__(self):
        if not isinstance(self.per_case, int) or self.per_case < 1:
            raise ValueError(f"per_case must be an integer >= 1, got {self.per_case!r}")
        n = len(plan_windows(self.long_frames, self.long_fps, self.windows).windows)
        if n < MIN_LONG_WINDOWS:
            raise ValueError(f"long_frames={self.long_frames} makes {n} windows of "
                             f"{self.windows.frames} frames; long clips need >= "
                             f"{MIN_LONG_WINDOWS} (e.g. 65)")


@dataclass
class SuiteItem:
    """One prompt of the suite; `scene` holds the exact labels and renders the real clip."""

    id: str  # "<case>-<nn>"
    case: str
    prompt: str
    scene: Scene
    seed: int  # generation (noise) seed
    frames: int
    fps: float
    width: int
    height: int
    image: np.ndarray | None = None  # uint8 (height, width, 3): the i2v first frame
    boundaries: tuple[int, ...] = ()  # long: seam pairs (b - 1, b) around every window overlap
    segments: tuple[tuple[int, int], ...] = ()  # long: each window's frames [start, end)

    @property
    def expected(self) -> dict[str, str]:
        s = self.scene
        return {"colour": s.colour, "shape": s.shape, "motion": s.motion, "camera": s.camera}

    def to_json(self) -> dict:
        s = self.scene
        return {"id": self.id, "case": self.case, "prompt": self.prompt, **self.expected,
                "scene_seed": s.seed, "camera_speed": round(s.camera_speed, 4),
                "focal_length_mm": round(s.focal_length_mm, 2), "n_objects": s.n_objects,
                "seed": self.seed, "frames": self.frames, "fps": self.fps,
                "size": [self.width, self.height], "boundaries": list(self.boundaries),
                "segments": [list(x) for x in self.segments]}  # fmt: skip


def derive_seed(*parts: int) -> int:
    """A non-negative int63 from integers (stable across processes and numpy versions)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def build_suite(world: WorldConfig | None = None, cfg: SuiteConfig | None = None) -> list[SuiteItem]:
    """Every case's items, in CASES order; the same (world, cfg) gives the same suite."""
    world, cfg = world or WorldConfig(), cfg or SuiteConfig()
    if not world.holdout:
        raise ValueError("the world has no held-out combinations (WorldConfig.holdout is empty); "
                         "the suite's heldout case needs some")
    items = []
    for case in CASES:
        items += [_make(world, cfg, case, i) for i in range(cfg.per_case)]
    return items


def _want(world: WorldConfig, case: str, i: int) -> tuple[dict, bool | None]:
    """The labels item i of a case asks for, and which combinations to draw from."""
    combos = [dict(zip(("colour", "shape", "motion"), h.split(), strict=True))
              for h in world.holdout]  # fmt: skip
    if case == "heldout":
        return {**combos[i % len(combos)], "camera": "static"}, True
    if case == "phrasing":
        if i % 2 == 0:
            return {**combos[(i // 2) % len(combos)], "camera": "static"}, True
        return {"motion": MOTIONS[(i // 2) % len(MOTIONS)], "camera": "static"}, False
    if case == "camera":
        return {"camera": CAMERAS[i % len(CAMERAS)]}, False
    if case == "i2v":
        return {"motion": MOTIONS[i % len(MOTIONS)], "camera": "static"}, None
    return {"motion": MOTIONS[i % len(MOTIONS)]}, None  # long: the world's cameras


def _case_world(world: WorldConfig, cfg: SuiteConfig, case: str, want: dict) -> WorldConfig:
    """The world's distribution, narrowed where the case fixes the camera or the length."""
    if "camera" in want:
        world = replace(world, p_camera_motion=0.0 if want["camera"] == "static" else 1.0)
    if case == "long":
        world = replace(world, frames=cfg.long_frames, fps=cfg.long_fps,
                        fps_choices=[cfg.long_fps], fps_weights=[1.0])  # fmt: skip
    return world


def _find_scene(world: WorldConfig, want: dict, heldout: bool | None, *key: int) -> Scene:
    """The first scene drawn from seeds derive_seed(*key, 0, k), k = 0, 1, ... that shows `want`."""
    for k in range(2000):
        try:
            scene = sample_scene(world, derive_seed(*key, 0, k), heldout=heldout)
        except RuntimeError:  # no placement fits this seed: draw another
            continue
        if all(getattr(scene, name) == value for name, value in want.items()):
            return scene
    raise RuntimeError(f"no world scene shows {want} in 2000 draws; check WorldConfig")


def _make(world: WorldConfig, cfg: SuiteConfig, case: str, i: int) -> SuiteItem:
    want, heldout = _want(world, case, i)
    w = _case_world(world, cfg, case, want)
    key = (cfg.seed, CASES.index(case), i)
    scene = _find_scene(w, want, heldout, *key)
    phrasings = captions(scene, derive_seed(*key, 1), "heldout" if case == "phrasing" else "train")
    prompt = phrasings[derive_seed(*key, 2) % len(phrasings)]
    item = SuiteItem(f"{case}-{i:02d}", case, prompt, scene, derive_seed(*key, 3), w.frames,
                     scene.fps, w.width, w.height)  # fmt: skip
    if case == "i2v":
        item.image = render(scene, w.width, w.height, 1, scene.fps)[0]
    if case == "long":
        plan = plan_windows(w.frames, scene.fps, cfg.windows)
        item.boundaries, item.segments = seam_pairs(plan), window_segments(plan)
    return item


def seam_pairs(plan: WindowPlan) -> tuple[int, ...]:
    """Every b whose frame pair (b - 1, b) touches an overlap between two windows: the blend
    spreads a jump between windows over these pairs (frames start_i - 1 .. end_{i-1})."""
    out = []
    for prev, win in zip(plan.windows, plan.windows[1:], strict=False):
        out += [b for b in range(win.start, prev.end + 1) if 1 <= b < plan.frames]
    return tuple(sorted(set(out)))


def window_segments(plan: WindowPlan) -> tuple[tuple[int, int], ...]:
    """Each window's delivered frames [start, end) (the last one trimmed to the clip)."""
    return tuple((w.start, min(w.end, plan.frames)) for w in plan.windows)
