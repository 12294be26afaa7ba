"""bench-downstream's pieces that need no diffusion model: the grid, runs written from arrays, the tables."""
from __future__ import annotations

import numpy as np
import pytest

from maskmill.loader import run_dataset
from maskmill.toyworld.bench_downstream import DownstreamConfig, oracle_data, write_run
from maskmill.toyworld.downstream_report import markdown, summary
from maskmill.toyworld.render import SHAPES


def test_grid_runs_small_sizes_for_everyone_first():
    cfg = DownstreamConfig(methods=["oracle", "ceiling", "seediff", "cross"], sizes=[32, 128], big_sizes=[512],
                           clean_sizes=[128])
    cells = cfg.cells()
    assert cells[:4] == [("oracle", 32), ("ceiling", 32), ("seediff", 32), ("cross", 32)]
    assert cells.index(("ceiling_clean", 128)) < cells.index(("oracle", 512))
    assert ("cross", 512) not in cells and len(cells) == len(set(cells))


def test_written_run_reads_back_through_the_loader(tmp_path):
    objects = [[("red", "circle")], [("blue", "star"), ("green", "square")], [("yellow", "triangle")]]
    images, masks = oracle_data(objects)
    assert [sorted(set(np.unique(m)) - {0}) for m in masks] == [[1], [2, 4], [3]]
    write_run(tmp_path / "run", images, masks, list(SHAPES), shard_size=2)
    rows = list(run_dataset([tmp_path / "run"]))
    assert len(rows) == 3
    for (image, mask), im, m in zip(rows, images, masks):
        assert np.array_equal(mask.numpy(), m) and np.array_equal((image * 255).round().byte().permute(1, 2, 0).numpy(), im)


def _run(method, n, seed, plain, hard):
    score = lambda v: {"miou": v, "per_class_iou": {"background": 1.0, "circle": v}}
    return {"method": method, "n": n, "seed": seed, "plain": score(plain), "hard": score(hard)}


def test_summary_gives_mean_std_and_ratios_to_oracle_and_ceiling():
    runs = [_run("oracle", 32, s, 0.8, v) for s, v in enumerate([0.4, 0.5, 0.6])]
    runs += [_run("ceiling", 32, s, 0.8, 0.4) for s in range(3)]
    runs += [_run("seediff", 32, s, 0.4, v) for s, v in enumerate([0.3, 0.5, 0.4])]
    t = summary({"runs": runs})
    assert t["hard"]["oracle"][32]["mean"] == pytest.approx(0.5) and t["hard"]["oracle"][32]["std"] == pytest.approx(0.1)
    assert t["hard"]["seediff"][32]["vs_oracle"] == pytest.approx(0.8)
    assert t["hard"]["seediff"][32]["vs_ceiling"] == pytest.approx(1.0)
    assert t["plain"]["seediff"][32]["vs_oracle"] == pytest.approx(0.5)
    md = markdown({"runs": runs, "settings": {}}, ["oracle", "ceiling", "seediff", "cross"])
    assert "| seediff | 0.400 ± 0.000 (3) |" in md and "| cross |" not in md


def _hand_made_pool(path, prompted_as):
    """A pool of rendered scenes whose SeeDiff labels say what `prompted_as` says was prompted per sample."""
    from maskmill.toyworld.downstream_pool import Pool
    from maskmill.toyworld.render import sample_scene, render
    from maskmill.toyworld.testset import class_labels

    rng = np.random.default_rng(7)
    pool = Pool(path)
    for prompted in prompted_as:
        scene = sample_scene(rng)
        image, instances = render(scene)
        drawn = [o.shape for o in scene.objects]
        prompts = [p or d for p, d in zip(prompted, drawn)]  # None: the prompted shape was drawn
        labels = class_labels(scene, instances)
        for k, shape in enumerate(prompts, 1):  # the mask is tight around the drawn object, labelled as prompted
            labels[instances == k] = SHAPES.index(shape) + 1
        pool.images.append(image)
        pool.objects.append([(o.colour, s) for o, s in zip(scene.objects, prompts)])
        pool.labels["seediff"].append(labels)
        pool.misdrawn.append(prompts != drawn)
    return pool


def test_seediff_clip_drops_a_sample_whose_region_is_another_shape(tmp_path):
    from maskmill.toyworld.bench_downstream import labelling

    clip = DownstreamConfig().clip
    pool = _hand_made_pool(tmp_path / "pool.npz", [[None] * 3] * 6)
    images, masks = labelling(pool, "seediff_clip", 6, clip)  # rendered shapes labelled right: all kept
    assert np.array_equal(images, np.stack(pool.images)) and np.array_equal(masks, np.stack(pool.labels["seediff"]))

    # sample 2: its first object's region is labelled (prompted) as a shape it is not
    wrong = next(s for s in ("circle", "star", "square", "triangle") if s not in [o[1] for o in pool.objects[2]])
    bad = _hand_made_pool(tmp_path / "pool.npz", [[None] * 3, [None] * 3, [wrong, None, None]] + [[None] * 3] * 3)
    assert bad.misdrawn == [False, False, True, False, False, False]
    images, masks = labelling(bad, "seediff_clip", 5, clip)
    keep = [0, 1, 3, 4, 5]
    assert np.array_equal(images, np.stack([bad.images[i] for i in keep]))
    assert np.array_equal(masks, np.stack([bad.labels["seediff"][i] for i in keep]))
    assert labelling(bad, "seediff_clip", 6, clip) is None  # only 5 pass: N=6 cannot be supplied


def test_report_keeps_the_hand_written_tail_of_the_table(tmp_path):
    from maskmill.toyworld.downstream_report import KEEP_BELOW, write_report

    cfg = DownstreamConfig(results=tmp_path / "r.json", table=tmp_path / "t.md", methods=["oracle"])
    runs = [_run("oracle", 32, 0, 0.8, 0.4)]
    write_report({"runs": runs, "settings": cfg.model_dump(mode="json")}, cfg)
    tail = f"{KEEP_BELOW}\n\n## How the recipe was chosen\n\nby hand\n"
    cfg.table.write_text(cfg.table.read_text() + "\n" + tail)
    write_report({"runs": runs + [_run("oracle", 32, 1, 0.6, 0.4)], "settings": cfg.model_dump(mode="json")}, cfg)
    text = cfg.table.read_text()
    assert "| oracle | 0.700 ± 0.141 (2) |" in text and text.endswith(tail) and text.count(KEEP_BELOW) == 1


def test_seediff_clip_ignore_sets_a_mismatched_class_to_ignore_and_keeps_the_rest(tmp_path):
    from maskmill.toyworld.bench_downstream import labelling, pool_summary
    from maskmill.toyworld.downstream_pool import clip_verdicts

    clip = DownstreamConfig().clip
    pool = _hand_made_pool(tmp_path / "pool.npz", [[None] * 3] * 6)
    wrong = next(s for s in ("circle", "star", "square", "triangle") if s not in [o[1] for o in pool.objects[2]])
    bad = _hand_made_pool(tmp_path / "pool.npz", [[None] * 3, [None] * 3, [wrong, None, None]] + [[None] * 3] * 3)
    images, masks = labelling(bad, "seediff_clip_ignore", 5, clip)
    assert np.array_equal(images, np.stack(bad.images[:5]))  # the first N images, none skipped (seediff's)
    for i in (0, 1, 3, 4):  # labelled right: untouched
        assert np.array_equal(masks[i], bad.labels["seediff"][i])
    before, wrong_id = bad.labels["seediff"][2], SHAPES.index(wrong) + 1
    assert (before == wrong_id).sum() > 0
    assert np.all(masks[2][before == wrong_id] == 255)  # the mismatched class is ignored...
    assert np.array_equal(masks[2][before != wrong_id], before[before != wrong_id])  # ...and nothing else changes
    assert labelling(bad, "seediff_clip_ignore", 7, clip) is None  # the pool holds 6

    # the same check under its two actions: the verdicts are cached apart, the reject one keeps its labels
    rejecting = clip_verdicts(bad, clip)
    assert [v.keep for v in rejecting] == [True, True, False, True, True, True]
    assert rejecting[2].flagged == (wrong,) and np.array_equal(rejecting[2].labels, before)
    summ = pool_summary(bad, clip, clip.model_copy(update={"action": "ignore"}))
    share = summ["clip_ignored_total"]
    n_objects = sum(len(o) for o in bad.objects)
    assert (share["classes"], share["of_classes"], share["samples"], share["samples_misdrawn"]) == (1, n_objects, 1, 1)
    assert share["pixel_share"] == pytest.approx((before == wrong_id).sum() / (6 * before.size))
    assert summ["clip_rejected_total"] == 1


def test_a_run_of_some_labellings_adds_to_the_results_file_without_dropping_rows(tmp_path):
    from maskmill.toyworld.bench_downstream import merged_settings
    from maskmill.toyworld.downstream_report import write_report

    full = DownstreamConfig(results=tmp_path / "r.json", table=tmp_path / "t.md", methods=["oracle", "seediff"],
                            sizes=[32, 128], big_sizes=[512])
    subset = full.model_copy(update={"methods": ["seediff_clip_ignore"], "sizes": [128], "big_sizes": []})
    settings = merged_settings(full.model_dump(mode="json"), subset)
    assert settings["methods"] == ["oracle", "seediff", "seediff_clip_ignore"]
    assert settings["sizes"] == [32, 128] and settings["big_sizes"] == [512]
    runs = [_run("oracle", 128, 0, 0.9, 0.4), _run("seediff", 128, 0, 0.8, 0.3),
            _run("seediff_clip_ignore", 128, 0, 0.85, 0.35)]
    write_report({"runs": runs, "settings": settings}, subset)  # even given only the subset, every row stays
    text = subset.table.read_text()
    assert "| oracle | 0.900" in text and "| seediff | 0.800" in text and "| seediff_clip_ignore | 0.850" in text


def test_the_pool_grows_from_the_shapes_runs_plan_and_reloads(tmp_path):
    """grow_pool generates the shapes config's candidates in order, labels the first ones with every
    method (generating them again: same images) and saves a pool that reloads unchanged."""
    from maskmill.models import load_pipeline
    from maskmill.toyworld.downstream_pool import OTHER_METHODS, Pool, grow_pool

    pipe = load_pipeline("shapes-sd", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    pool = grow_pool(pipe, Pool(tmp_path / "pool.npz"), 2, 1, batch=2, log=lambda *_: None)
    assert len(pool) >= 2 and pool.n_labelled("cross") >= 1
    again = Pool(tmp_path / "pool.npz")
    assert len(again) == len(pool) and again.indices == pool.indices
    assert all(np.array_equal(a, b) for a, b in zip(again.images, pool.images))
    for method in ("seediff", "ceiling", *OTHER_METHODS):
        labels = again.labels[method][0]
        assert labels.shape == again.images[0].shape[:2] and labels.dtype == np.uint8
    assert set(np.unique(again.labels["seediff"][0])) - {0, 255} <= {SHAPES.index(s) + 1 for s in SHAPES}
