"""Window plans: coverage, blend weights, keyframe alignment, and the streaming blender."""

from __future__ import annotations

import pytest
import torch

from cineray.pipelines.windows import Blender, WindowConfig, average_shared, plan_windows

FRAMES = [1, 2, 4, 5, 9, 16, 17, 18, 21, 33, 34, 49, 64, 65, 66, 100, 129, 257, 300, 1025]
CONFIGS = [(w, o) for w in (5, 9, 17, 33) for o in (1, 2, 3, 4, 5, 8) if o <= (w - 1) // 2]


def _levels(plan):
    while plan is not None:
        yield plan
        plan = plan.keyframes.plan if plan.keyframes else None


@pytest.mark.parametrize(("window", "overlap"), CONFIGS)
def test_every_frame_is_covered_once_after_blending(window, overlap):
    cfg = WindowConfig(window, overlap)
    for frames in FRAMES:
        for plan in _levels(plan_windows(frames, 8.0, cfg)):
            total = torch.zeros(plan.planned, dtype=torch.float64)
            for w in plan.windows:
                assert w.length <= window and (w.length - 1) % 4 == 0
                total[w.start : w.end] += plan.weights(w)
            torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)
            assert plan.windows[0].start == 0
            assert 0 <= plan.planned - plan.frames < 4  # only the rounding to 1 + 4k is trimmed
            ends = [w.end for w in plan.windows]
            starts = [w.start for w in plan.windows]
            assert all(e - s == overlap for s, e in zip(starts[1:], ends[:-1], strict=True))


@pytest.mark.parametrize(("window", "overlap"), CONFIGS)
def test_keyframes_sit_on_window_starts_and_group_ends(window, overlap):
    for frames in FRAMES:
        plan = plan_windows(frames, 8.0, WindowConfig(window, overlap))
        if plan.keyframes is None:
            assert len(plan.windows) == 1 and frames <= window
            continue
        kp = plan.keyframes
        assert kp.plan.frames == kp.count and kp.plan.fps == pytest.approx(8.0 / kp.stride)
        assert (kp.count - 1) * kp.stride < plan.planned <= kp.count * kp.stride
        for w in plan.windows:
            assert w.exact * kp.stride == w.start  # every window starts on a keyframe
            for j, k in w.keys:
                assert k < kp.count and k * kp.stride == w.start + 4 * j and j >= 1
            if (window - overlap) % 4 == 0:  # aligned: every keyframe inside a window is used
                inside = {k for k in range(kp.count) if w.start < k * kp.stride < w.end}
                assert inside == {k for _, k in w.keys}


@pytest.mark.parametrize(("overlap", "starts"), [(5, [0, 12, 24, 36, 48]), (1, [0, 16, 32, 48])])
def test_windows_of_17_make_65_frames_with_a_keyframe_on_every_group_end(overlap, starts):
    plan = plan_windows(65, 8.0, WindowConfig(overlap=overlap))
    assert [(w.start, w.length) for w in plan.windows] == [(s, 17) for s in starts]
    assert plan.keyframes.stride == 4 and plan.keyframes.count == 17
    assert plan.keyframes.plan.windows[0].length == 17 and plan.keyframes.plan.fps == 2.0
    for w in plan.windows:
        assert w.exact == w.start // 4
        assert w.keys == tuple((j, w.start // 4 + j) for j in range(1, 5))
    assert plan.keyframes.plan.keyframes is None  # the keyframe pass is one window


@pytest.mark.parametrize(("window", "overlap"), CONFIGS)
def test_anchors_are_the_keys_on_window_starts(window, overlap):
    for frames in FRAMES:
        plan = plan_windows(frames, 8.0, WindowConfig(window, overlap))
        if plan.keyframes is None:
            continue
        starts, stride = {w.start for w in plan.windows}, plan.keyframes.stride
        for w in plan.windows:
            assert set(w.anchors) == {(j, k) for j, k in w.keys if k * stride in starts}


def test_the_default_windows_are_anchored_on_the_next_window_start_alone():
    plan = plan_windows(65, 8.0)
    assert [w.anchors for w in plan.windows] == [((3, 3),), ((3, 6),), ((3, 9),), ((3, 12),), ()]


def test_the_default_overlap_is_keyed_at_both_ends_in_both_windows():
    """The 5 shared frames start on the later window's exact keyframe and end on its first
    group end; in the earlier window both are group ends: the two windows agree there."""
    plan = plan_windows(65, 8.0)
    assert plan == plan_windows(65, 8.0, WindowConfig(17, 5))
    stride = plan.keyframes.stride
    for a, b in zip(plan.windows, plan.windows[1:], strict=False):
        assert a.end - b.start == 5
        assert b.exact == b.start // stride and (1, (b.start + 4) // stride) in b.keys
        keyed_in_a = {a.start + 4 * j for j, _ in a.keys}
        assert {b.start, b.start + 4} <= keyed_in_a


def test_one_window_clips_have_no_keyframe_pass():
    for frames, length in [(1, 1), (2, 5), (16, 17), (17, 17)]:
        plan = plan_windows(frames, 8.0)
        assert plan.keyframes is None and [w.length for w in plan.windows] == [length]


def test_long_clips_get_a_windowed_keyframe_pass():
    plan = plan_windows(1025, 8.0, WindowConfig(overlap=1))
    levels = list(_levels(plan))
    assert [len(p.windows) for p in levels] == [64, 4, 1]
    assert all(w.length <= 17 for p in levels for w in p.windows)


@pytest.mark.parametrize(("frames", "window", "overlap"),
                         [(1, 17, 1), (17, 17, 1), (18, 17, 1), (65, 17, 1), (70, 9, 2),
                          (100, 17, 5), (41, 9, 3)])
def test_blender_reproduces_consistent_windows_exactly(frames, window, overlap):
    """Windows that agree on their overlap blend back to the same frames, and exactly `frames`
    come out, chunk by chunk, in order."""
    plan = plan_windows(frames, 8.0, WindowConfig(window, overlap))
    clip = torch.arange(plan.planned, dtype=torch.float64)[None, None, :, None, None]
    clip = clip.expand(1, 3, -1, 2, 2)
    blender = Blender(plan)
    out = list(blender.run((w, clip[:, :, w.start : w.end].clone()) for w in plan.windows))
    torch.testing.assert_close(torch.cat(out, dim=2), clip[:, :, :frames], rtol=0, atol=1e-9)


def test_blender_ramps_between_disagreeing_windows():
    plan = plan_windows(33, 8.0, WindowConfig(17, 5))  # windows [0, 17) and [12, 29) + [24, 33)
    blender = Blender(plan)
    out = torch.cat([blender.add(w, torch.full((1, 1, w.length, 1, 1), float(w.index)))
                     for w in plan.windows], dim=2).flatten()
    ramp = out[12:17]
    assert torch.all(ramp[1:] > ramp[:-1]) and 0 < ramp[0] and ramp[-1] < 1
    assert torch.all(out[:12] == 0) and torch.all(out[17:24] == 1)


def test_blender_rejects_out_of_order_windows():
    plan = plan_windows(65, 8.0)
    with pytest.raises(ValueError, match="in order"):
        Blender(plan).add(plan.windows[1], torch.zeros(1, 3, 17, 2, 2))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"frames": 0}, "frames must be an integer >= 1"),
    ({"fps": 0}, "fps must be > 0"),
    ({"config": WindowConfig(16, 1)}, "window frames must be 1 \\+ 4k"),
    ({"config": WindowConfig(17, 9)}, "window overlap must be in \\[1, 8\\]"),
    ({"config": WindowConfig(17, 0)}, "window overlap"),
    ({"config": WindowConfig(17, 1, keyframe_stride=6)}, "keyframe_stride must be a multiple"),
])
def test_bad_plans_name_the_field(kwargs, match):
    args = {"frames": 65, "fps": 8.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        plan_windows(args["frames"], args["fps"], args.get("config"))


def test_plans_are_deterministic_and_small():
    a = plan_windows(257, 8.0, WindowConfig(overlap=1))
    assert a == plan_windows(257, 8.0, WindowConfig(overlap=1))
    n = len(a.all_windows())
    assert n == 17 and len(a.windows) == 16  # 16 windows + one 17-frame keyframe pass
    assert a.keyframes.stride == 16 and a.keyframes.plan.fps == 0.5


def test_a_sparser_keyframe_stride_shortens_the_keyframe_pass():
    plan = plan_windows(65, 8.0, WindowConfig(overlap=1, keyframe_stride=16))
    assert plan.keyframes.count == 5 and plan.keyframes.plan.windows[0].length == 5
    assert [(w.exact, w.keys) for w in plan.windows] == [(i, ((4, i + 1),)) for i in range(4)]


@pytest.mark.parametrize(("window", "overlap", "frames", "shared"), [
    (17, 5, 65, ((0, 4, 1), (1, 4, 1), (2, 4, 1), (3, 4, 1))),  # one group per overlap
    (17, 1, 65, ()),  # a one-frame overlap shares no group
    (17, 7, 41, ()),  # a step of 10 puts the groups out of line
    (33, 9, 65, ((0, 7, 1), (0, 8, 2), (1, 7, 1), (1, 8, 2))),  # two groups per overlap
])
def test_neighbours_share_the_latent_groups_that_cover_the_same_frames(window, overlap, frames,
                                                                        shared):
    plan = plan_windows(frames, 8.0, WindowConfig(window, overlap))
    assert plan.shared == shared
    for i, a, b in shared:  # the same 4 pixel frames, ending on the same clip frame
        assert plan.windows[i].start + 4 * a == plan.windows[i + 1].start + 4 * b
    assert plan_windows(frames, 8.0, WindowConfig(window, overlap, joint=False)).shared == ()


def test_average_shared_makes_both_copies_their_mean():
    a, b = torch.zeros(1, 2, 3, 2, 2), torch.ones(1, 2, 5, 2, 2)
    average_shared([a, b], ((0, 2, 1),))
    assert torch.equal(a[:, :, 2], torch.full((1, 2, 2, 2), 0.5))
    assert torch.equal(a[:, :, 2], b[:, :, 1])
    assert a[:, :, :2].eq(0).all() and b[:, :, 0].eq(1).all() and b[:, :, 2:].eq(1).all()
