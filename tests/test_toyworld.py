"""The shapes world: rendering, ground-truth recovery from colours, and the training command."""
import json

import numpy as np
import pytest

from maskmill.toyworld.recover import classify_shape, recover_masks
from maskmill.toyworld.render import COLOURS, SHAPES, is_held_out, render, sample_scene, shape_mask


def test_recovery_from_colours_is_exact_on_rendered_scenes():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scene = sample_scene(rng)
        image, labels = render(scene)
        recovered, extra = recover_masks(image, [o.colour for o in scene.objects])
        assert (recovered == labels).all()
        assert not extra.any()
        for k, obj in enumerate(scene.objects):
            assert classify_shape(labels == k + 1)[0] == obj.shape


def test_scenes_have_no_overlap_and_distinct_colours():
    rng = np.random.default_rng(4)
    for _ in range(30):
        scene = sample_scene(rng)
        masks = [shape_mask(o.shape, o.cx, o.cy, o.radius) for o in scene.objects]
        assert sum(m.astype(int) for m in masks).max() <= 1
        assert len({o.colour for o in scene.objects}) == len(scene.objects)
        assert 1 <= len(scene.objects) <= 3


def test_unnamed_colour_is_marked_ignore():
    rng = np.random.default_rng(5)
    scene = sample_scene(rng, n_objects=2)
    image, labels = render(scene)
    recovered, extra = recover_masks(image, [scene.objects[0].colour])
    assert (recovered[labels == 2] == 255).all() and extra[labels == 2].all()


def test_held_out_split_is_only_multi_object_and_nonempty():
    rng = np.random.default_rng(6)
    scenes = [sample_scene(rng) for _ in range(300)]
    held = [s for s in scenes if is_held_out(s.objects)]
    assert held and all(len(s.objects) > 1 for s in held)
    assert len(held) < 0.3 * len(scenes)


def test_training_command_runs_a_few_steps_and_saves_a_loadable_pipeline(tmp_path):
    from maskmill.models import load_pipeline
    from maskmill.toyworld.train import main

    out = tmp_path / "m"
    main(["--out", str(out), "--steps", "3", "--vae-steps", "2", "--scenes", "64", "--batch", "4"])
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 3
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    pipe = load_pipeline(str(out))
    assert pipe.unet.dtype.is_floating_point and pipe.tokenizer.model_max_length == 77
    assert pipe.vae.config.scaling_factor != 0.18215  # measured from the latents, not SD's constant
