"""The shapes world: rendering, ground-truth recovery from colours, and the training command."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from maskmill.toyworld.recover import classify_shape, recover_masks
from maskmill.toyworld.render import is_held_out, render, sample_scene, shape_mask


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

    # a second run reuses that VAE (stage 1 skipped) with an embeddings-only text encoder
    again = tmp_path / "m2"
    main(["--out", str(again), "--steps", "2", "--scenes", "64", "--batch", "4", "--vae-from", str(out),
          "--text-layers", "0"])
    reloaded = load_pipeline(str(again))
    assert reloaded.text_encoder.config.num_hidden_layers == 0
    assert json.loads((again / "training_summary.json").read_text())["vae_steps"] == 0
    for a, b in zip(pipe.vae.state_dict().values(), reloaded.vae.state_dict().values()):
        assert torch.equal(a, b)

    # and a third continues from the second's UNet and text encoder (their architecture comes along)
    third = tmp_path / "m3"
    main(["--out", str(third), "--steps", "1", "--scenes", "64", "--batch", "4", "--vae-from", str(again),
          "--init-from", str(again)])
    summary = json.loads((third / "training_summary.json").read_text())
    assert summary["init_from"] == str(again) and summary["text_layers"] == 0

    # a fourth grows a text layer and the UNet's transformer blocks, and trains with the grounding
    # loss (labels come from the renderer; it reads the new blocks' cross-attention too)
    fourth = tmp_path / "m4"
    main(["--out", str(fourth), "--steps", "2", "--scenes", "64", "--batch", "4", "--vae-from", str(again),
          "--init-from", str(again), "--text-layers", "1", "--grounding", "0.1", "--unet-transformer-layers", "2"])
    summary = json.loads((fourth / "training_summary.json").read_text())
    assert summary["text_layers"] == 1 and summary["grounding_weight"] == 0.1
    assert summary["unet_transformer_layers"] == 2
    steps = [r for r in json.loads((fourth / "training_log.json").read_text())["history"] if r["stage"] == "unet"]
    assert all(0.0 < r["token_loss"] <= 1.0 for r in steps)
    for bad, why in (("1", "the --init-from UNet has 2 per attention"), ("0", "must be at least 1")):
        with pytest.raises(ValueError, match=f"--unet-transformer-layers {bad}: {why}"):
            main(["--out", str(tmp_path / "never"), "--steps", "1", "--init-from", str(fourth),
                  "--unet-transformer-layers", bad, "--data-cache", str(tmp_path / "never.npz")])
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.npz").exists()
    grown = load_pipeline(str(fourth))
    assert grown.text_encoder.config.num_hidden_layers == 1
    assert len(grown.unet.mid_block.attentions[0].transformer_blocks) == 2


# --- bench-masks: variants files and per-window capture ------------------------------------------

def test_the_committed_sweep_file_loads_and_bad_variants_are_refused(tmp_path):
    from maskmill.toyworld.bench_masks import load_variants

    repo = Path(__file__).resolve().parents[1]
    variants = load_variants(repo / "benchmarks" / "mask_sweeps.yaml")
    assert {name for name, _ in variants.values()} >= {"cross", "propagated", "seediff", "diffseg", "diffcut"}
    cases = {"{a: {extractor: nope}}": "unknown extractor 'nope'",
             "{a: {extractor: seediff, params: {seed_sidee: 8}}}": "variant 'a': bad params for seediff",
             "{a: {extractor: seediff, params: {capture_steps: [0.9, 0.1]}}}": "capture_steps",
             "{a: {name: seediff}}": "variant 'a' must have `extractor`",
             "[]": "expected a mapping"}
    for text, message in cases.items():
        path = tmp_path / "v.yaml"
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_variants(path)


def test_variants_with_different_step_windows_score_the_same_images(monkeypatch):
    from maskmill.toyworld import bench_masks
    from maskmill.toyworld.build import build_pipeline

    calls = []
    real = bench_masks.generate_items

    def counting(pipe, items, capture, batch=16):
        images, attns = real(pipe, items, capture, batch)
        calls.append((capture.steps, images))
        return images, attns

    monkeypatch.setattr(bench_masks, "generate_items", counting)
    pipe = build_pipeline(0)
    variants = {"all steps": ("seediff", {}), "last half": ("seediff", {"capture_steps": [0.5, 1.0]}),
                "cross": ("cross", {})}
    results = bench_masks.run_variants(pipe, 2, variants, batch=2)
    assert sorted(w for w, _ in calls) == [(0.0, 1.0), (0.5, 1.0)]  # one generation per window
    assert all(np.array_equal(a, b) for a, b in zip(calls[0][1], calls[1][1]))
    assert set(results) == set(variants)
    assert all(0.0 <= r["miou_single"] <= 1.0 and 0.0 <= r["pixel_acc"] <= 1.0 for r in results.values())


def test_eval_reports_every_figure_in_range_on_a_random_micro_model():
    from maskmill.toyworld.build import build_pipeline
    from maskmill.toyworld.evaluate import TARGETS, evaluate, format_report

    report = evaluate(build_pipeline(0), n=2, batch=2)
    for key in [*TARGETS, "whole_image_accuracy"]:
        assert 0.0 <= report[key] <= 1.0, key
    assert set(report["word_cross_attention_iou"]) == {"colour", "shape"}
    assert sorted(set(report["layer_sides"].values())) == [8, 16]
    assert all(0.0 <= a <= 1.0 for a in report["grouping_auc"].values())
    assert sorted(report["grouping_auc_per_side"]) == [8, 16]
    assert report["grouping_auc_seediff_maps"] == min(report["grouping_auc_per_side"].values())
    text = format_report(report)
    assert "seed_cross_attention_iou" in text and "colour word cross-attention IoU" in text


def test_the_tune_split_never_uses_held_out_captions_and_eval_uses_only_those():
    from maskmill.toyworld.evaluate import eval_items
    from maskmill.toyworld.render import ShapeObject

    def held_out(item):
        return is_held_out([ShapeObject(s, c, 0, 0, 0, "stripes", 0) for s, c in zip(item.shapes, item.colours)])

    tune, evaluation = eval_items(40, "tune"), eval_items(40, "eval")
    for items, want in [(tune, False), (evaluation, True)]:
        multi = [it for it in items if it.kind == "multi"]
        assert len(multi) == 20 and all(held_out(it) == want for it in multi)
    assert {it.seed for it in tune}.isdisjoint(it.seed for it in evaluation)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        eval_items(4, "test")


# --- bench-ovdiff: splits of rendered scenes ------------------------------------------------------

def test_bench_ovdiff_tune_scenes_are_not_the_test_scenes_and_a_bad_split_is_refused_first():
    from maskmill.toyworld import bench_ovdiff

    from maskmill.toyworld.ovdiff_scoring import CLASS_NAMES, SCENE_SEEDS, rendered_test_set

    test_images, test_labels = rendered_test_set(8, SCENE_SEEDS["test"])
    tune_images, _ = rendered_test_set(8, SCENE_SEEDS["tune"])
    assert not any(np.array_equal(a, b) for a in test_images for b in tune_images)
    assert set(np.unique(test_labels)) <= set(range(len(CLASS_NAMES)))
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        bench_ovdiff.run(None, bench_ovdiff.BenchSettings(split="holdout"))  # before touching the pipeline
    with pytest.raises(ValueError, match="unknown refinement 'crf'"):
        bench_ovdiff.run(None, bench_ovdiff.BenchSettings(refine="crf"))
    with pytest.raises(ValueError, match="support_draws must be at least 1, got 0"):
        bench_ovdiff.run(None, bench_ovdiff.BenchSettings(support_draws=0))
    from maskmill.cli import build_parser

    cli_default = build_parser().parse_args(["toyworld", "bench-ovdiff"]).support_draws
    assert cli_default == bench_ovdiff.BenchSettings.support_draws


def test_bench_ovdiff_prefilter_figures_and_a_missing_clip_is_refused_first(capsys):
    from maskmill.cli import main
    from maskmill.models import ClipNotFoundError
    from maskmill.toyworld import bench_ovdiff
    from maskmill.toyworld.ovdiff_scoring import prefilter_figures
    from maskmill.toyworld.render import SHAPES

    labels = np.zeros((2, 4, 4), np.uint8)
    labels[0, 0, 0], labels[0, 1, 1], labels[1, 2, 2] = 1, 4, 2  # circle + star; square
    keep = iter([["circle", "square"], ["square"]])  # scene 0: star dropped, absent square kept
    figures = prefilter_figures(lambda image, classes: next(keep), np.zeros((2, 4, 4, 3), np.uint8), labels)
    assert figures == {"classes_present_per_image": 1.5, "classes_kept_per_image": 1.5,
                       "present_kept": 2 / 3, "absent_dropped": 4 / 5}
    assert len(SHAPES) == 4
    with pytest.raises(ClipNotFoundError, match="not found"):
        bench_ovdiff.run(None, bench_ovdiff.BenchSettings(prefilter_clip="no/such/clip"))  # before the pipeline
    assert main(["toyworld", "bench-ovdiff", "--model", "no-such-model", "--prefilter-clip", "no/such/clip"]) == 2
    assert "--prefilter-clip" in capsys.readouterr().err  # refused before the model is looked up


def test_bench_ovdiff_averages_iou_tables_over_support_draws():
    from maskmill.toyworld.ovdiff_scoring import CLASS_NAMES, confusion, iou_table, mean_table

    gt = np.zeros((4, 4), np.int64)
    gt[:2] = 1
    perfect = iou_table(confusion(gt, gt, len(CLASS_NAMES)))
    half = gt.copy()
    half[:1] = 0  # one of the two class-1 rows called background
    worse = iou_table(confusion(half, gt, len(CLASS_NAMES)))
    assert perfect["miou"] == 1.0 and worse["per_class"]["circle"] == pytest.approx(0.5)
    m = mean_table([perfect, worse])
    assert m["miou_per_draw"] == [perfect["miou"], worse["miou"]]
    assert m["miou"] == pytest.approx((perfect["miou"] + worse["miou"]) / 2)
    assert m["miou_std"] == pytest.approx(abs(perfect["miou"] - worse["miou"]) / 2)
    assert m["per_class"]["circle"] == pytest.approx(0.75)
    assert np.isnan(m["per_class"]["star"])  # absent in every draw stays absent, not 0



def test_instance_similarity_groups_pairs_by_shape_and_colour():
    """Features that encode only colour: same-colour pairs are identical whatever the shape."""
    from maskmill.prototypes.bank import build_class_bank, merge_banks
    from maskmill.prototypes.support import SupportSet
    from maskmill.toyworld import ovdiff_diagnostics

    colours = ["red", "blue", "red"]
    direction = {"red": [1.0, 0.0, 0.0], "blue": [0.0, 1.0, 0.0]}
    banks, supports = [], []
    for shape in ("circle", "square"):
        feats = torch.tensor([direction[c] for c in colours])[:, :, None, None].expand(3, 3, 4, 4).clone()
        fg = np.zeros((3, 4, 4), bool)
        fg[:, 1:3, 1:3] = True
        keys = [f"{shape}-{i}" for i in range(3)]
        banks.append(build_class_bank(shape, feats, fg, ~fg, keys, k_parts=0))
        supports.append(SupportSet(shape, np.zeros((3, 4, 4, 3), np.uint8), fg, ~fg, keys,
                                   prompts=[f"a {c} {shape}" for c in colours]))
    sims = ovdiff_diagnostics.colour_vs_shape_similarity(merge_banks(banks), supports)
    assert sims["other shape, same colour"] == pytest.approx(1.0)
    assert sims["same shape, same colour"] == pytest.approx(1.0)
    assert sims["same shape, other colour"] == pytest.approx(0.0, abs=1e-6)
    assert sims["other shape, other colour"] == pytest.approx(0.0, abs=1e-6)
    assert ovdiff_diagnostics.prompt_colour("a green star") == "green"
    assert ovdiff_diagnostics.prompt_colour("a star") is None


def test_bench_ovdiff_runs_end_to_end_on_the_embedded_model_and_averages_its_draws():
    from maskmill.models import load_pipeline
    from maskmill.toyworld import bench_ovdiff

    settings = bench_ovdiff.BenchSettings(n_support=2, n_test=3, k_parts=2, support_draws=2, diagnostics=False)
    report = bench_ovdiff.run(load_pipeline("shapes-sd"), settings, log=lambda *_: None)
    full = report["table"]["full"]
    assert len(full["miou_per_draw"]) == 2 and full["miou"] == pytest.approx(np.mean(full["miou_per_draw"]))
    assert set(report["table"]) == set(bench_ovdiff.VARIANTS)
    assert report["extra"]["full, no refinement"]["miou_per_draw"]  # PAMR is the default: unrefined row too
    assert report["support_reuse"]["identical_support"]
    assert set(report["checks"]) == {"full >= 0.80"} | {f"{k} <= full" for k in bench_ovdiff.VARIANTS if k != "full"}
    text = bench_ovdiff.format_report(report)
    assert "mean over 2 support draws (seeds 0..1)" in text and f"| full | {full['miou']:.3f} ± " in text

def test_training_set_cache_is_used_only_when_it_holds_the_requested_scenes(tmp_path):
    from maskmill.toyworld.train import DATA_KEYS, load_training_set

    cache = tmp_path / "scenes.npz"
    first = load_training_set(6, seed=3, workers=1, cache=cache)
    assert cache.exists() and len(first["captions"]) == 6 and set(first) == set(DATA_KEYS)
    marked = dict(first, captions=np.array(["cached"] * 6))
    np.savez(cache, **marked)
    assert list(load_training_set(6, seed=3, workers=1, cache=cache)["captions"]) == ["cached"] * 6
    more = load_training_set(9, seed=3, workers=1, cache=cache)  # a different count: rendered again
    assert len(more["captions"]) == 9
    assert np.array_equal(more["images"][:6], first["images"]) and list(more["captions"][:6]) == list(first["captions"])
    with np.load(cache) as d:
        assert len(d["captions"]) == 9
