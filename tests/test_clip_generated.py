"""The micro CLIP's generated training pool: its seed stream, its labels (the shape judge's) and its use in batches."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from maskmill.toyworld.clip_generated import SPLIT, load_regions, make_pool, pool_summary
from maskmill.toyworld.evaluate import eval_items
from maskmill.toyworld.render import Scene, ShapeObject, is_held_out, render

SPOTS = [(8.0, 8.0), (24.0, 8.0), (16.0, 24.0)]


class StarsAsCircles:
    """A stand-in pipeline: renders each prompt's objects, but draws every star as a circle."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, generator=None, **_):
        self.calls += 1
        images = []
        for prompt in prompts:
            phrases = prompt.replace(" and ", ", ").split(", ")
            objects = []
            for (cx, cy), phrase in zip(SPOTS, phrases):
                _, colour, shape = phrase.split()
                objects.append(ShapeObject("circle" if shape == "star" else shape, colour, cx, cy, 5.5))
            images.append(render(Scene(objects))[0].astype(np.float32) / 255)
        return SimpleNamespace(images=np.stack(images))


def test_the_clip_train_stream_is_its_own_and_never_uses_held_out_captions():
    train = eval_items(40, SPLIT)
    multi = [it for it in train if it.kind == "multi"]
    assert len(multi) == 20
    assert not any(is_held_out([ShapeObject(s, c, 0, 0, 0) for s, c in zip(it.shapes, it.colours)]) for it in multi)
    seeds = {it.seed for it in train}
    assert seeds.isdisjoint(it.seed for it in eval_items(40, "tune"))
    assert seeds.isdisjoint(it.seed for it in eval_items(40, "eval"))


def test_pool_regions_carry_the_judged_shape_and_a_partial_pool_is_continued(tmp_path):
    out = tmp_path / "pool.npz"
    pipe = StarsAsCircles()
    make_pool(pipe, 6, out, batch=4, log=lambda *_: None)
    assert pipe.calls == 2
    saved = dict(np.load(out))
    np.savez_compressed(out, **{**saved, "images": saved["images"][:4]})  # as if killed after one batch
    with pytest.raises(ValueError, match="unfinished: 4 of 6 images"):
        load_regions(out)
    again = StarsAsCircles()
    make_pool(again, 6, out, batch=4, log=lambda *_: None)
    assert again.calls == 1  # only the missing batch
    assert np.array_equal(np.load(out)["images"], saved["images"])

    regions = load_regions(out)
    items = eval_items(6, SPLIT)
    assert len(regions) == sum(len(it.shapes) for it in items)  # every object drawn, every region found
    assert all(r.shape == ("circle" if r.prompted == "star" else r.prompted) for r in regions)
    summary = pool_summary(out, regions)
    assert summary["judged_not_prompted"] == sum(s == "star" for it in items for s in it.shapes)
    with pytest.raises(ValueError, match="pool of 6 items, not 8"):
        make_pool(StarsAsCircles(), 8, out)


def test_batches_take_generated_regions_with_the_judged_caption(tmp_path):
    from maskmill.toyworld.clip_data import caption_meaning, kind_weights, render_pool, sample_batch

    out = tmp_path / "pool.npz"
    make_pool(StarsAsCircles(), 4, out, log=lambda *_: None)
    regions = load_regions(out)
    weights = {k: (1.0 if k == "gen" else 0.0) for k in kind_weights(0.5)}
    images, captions, meanings = sample_batch(render_pool(2, seed=0), 24, np.random.default_rng(0), 32, weights,
                                              generated=regions)
    assert images.shape == (24, 32, 32, 3) and all(m[0] == "obj" for m in meanings)
    assert "star" not in " ".join(captions)  # the judge saw circles
    assert {caption_meaning(c)[2] for c in captions} <= {r.shape for r in regions}
    w = kind_weights(0.4)
    assert abs(sum(w.values()) - 1) < 1e-9 and abs(w["gen"] + w["genbg"] - 0.4) < 1e-9
    with pytest.raises(ValueError, match="need generated regions"):
        sample_batch(render_pool(2, seed=0), 4, np.random.default_rng(0), 32, weights)


def test_missing_pool_and_bad_settings_are_refused_before_work(tmp_path):
    from maskmill.toyworld.clip_train import ClipTrainSettings

    with pytest.raises(FileNotFoundError, match="clip-pool"):
        load_regions(tmp_path / "none.npz")
    with pytest.raises(ValueError, match="--generated: no such file"):
        ClipTrainSettings(generated=str(tmp_path / "none.npz")).check()
    with pytest.raises(ValueError, match="--generated-share"):
        ClipTrainSettings(generated_share=1.5).check()


def test_training_on_a_generated_pool_says_so_in_the_card(tmp_path):
    from maskmill.toyworld.clip_card import card_text
    from maskmill.toyworld.clip_train import ClipTrainSettings, train

    out = tmp_path / "pool.npz"
    make_pool(StarsAsCircles(), 4, out, log=lambda *_: None)
    tiny = dict(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=8,
                context_length=16, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
    settings = ClipTrainSettings(steps=1, batch=8, warmup=1, pool_scenes=2, eval_scenes=1, architecture=tiny,
                                 generated=str(out), generated_share=0.5)
    summary = train(settings, tmp_path / "m")
    assert summary["generated_pool"]["images"] == 4 and summary["generated_pool"]["judged_not_prompted"] == 1
    card = card_text(summary)
    assert f"--generated {out} --generated-share 0.5" in card
    assert "(50% of them rendered, the rest generated)" in card and "1 judged another shape than prompted" in card
