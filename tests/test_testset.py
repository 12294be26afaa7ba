"""render-testset: the labelled-folder layout, fixed seeds, and a hard split that is harder."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from maskmill.cli import main
from maskmill.toyworld.render import RADIUS_RANGE, SHAPES, render
from maskmill.toyworld.testset import hard_scene, rendered_scenes, split_rng


def test_render_testset_writes_the_mmseg_layout(tmp_path):
    assert main(["toyworld", "render-testset", "--n", "5", "--out", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "classes.json").read_text()) == list(SHAPES)
    masks = sorted((tmp_path / "t" / "masks").glob("*.png"))
    assert [p.name for p in masks] == [f"{i:05d}.png" for i in range(5)]
    with Image.open(masks[0]) as m:
        assert m.mode == "L" and m.size == (32, 32)
    images, labels = rendered_scenes(5)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "t" / "images" / "00000.png")), images[0])
    assert np.array_equal(np.asarray(Image.open(masks[0])), labels[0])


def test_splits_are_fixed_and_distinct():
    a, _ = rendered_scenes(4, "test")
    b, _ = rendered_scenes(4, "test")
    c, _ = rendered_scenes(4, "tune")
    d, _ = rendered_scenes(4, "test", hard=True)
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, d)


def test_hard_scenes_hold_more_smaller_often_touching_objects():
    rng = split_rng("test", True)
    scenes = [hard_scene(rng) for _ in range(40)]
    assert all(len(s.objects) >= 3 for s in scenes)
    assert max(o.radius for s in scenes for o in s.objects) < RADIUS_RANGE[0]  # smaller than any training object
    touching = 0
    for scene in scenes:  # two objects side by side (4-neighbours)
        _, inst = render(scene)
        fg = inst > 0
        across = (inst[:, 1:] != inst[:, :-1]) & fg[:, 1:] & fg[:, :-1]
        down = (inst[1:] != inst[:-1]) & fg[1:] & fg[:-1]
        touching += bool(across.any() or down.any())
    assert touching >= 12  # about half of the scenes


def test_bad_n_is_refused(tmp_path, capsys):
    assert main(["toyworld", "render-testset", "--n", "0", "--out", str(tmp_path / "t")]) == 2
    assert "--n must be positive" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
