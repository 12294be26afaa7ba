"""Support sets and the build_prototypes flow: per-class caching on the fingerprint, under Prefect's test harness.

A tiny random SD (micro SD architecture) saved to a temporary folder stands in for the model; a
hand-written dataset run (rendered shapes scenes with exact masks) is the support source, so
the flow tests do not depend on what a random model generates.
"""
from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import numpy as np
import pytest

from maskmill.prototypes import load_bank
from maskmill.prototypes.support import SupportSet, generate_support, masks_at, support_from_run
from maskmill.run.pipelines import PIPELINE_LOADS
from maskmill.shards import RunLayout, SampleRecord, build_meta, sample_key, write_shard
from maskmill.toyworld.render import SHAPES, Scene, ShapeObject, render
from tolerances import assert_same_image_up_to_rounding

RUN_CLASSES = ["circle", "square", "triangle"]


def scene_record(shard_id: int, i: int, shapes: list[str], index: int) -> SampleRecord:
    colours = ["red", "blue", "green"]
    objects = [ShapeObject(s, colours[j], cx=8.0 + 15 * j, cy=10.0 + 12 * j, radius=6.0) for j, s in enumerate(shapes)]
    image, inst = render(Scene(objects))
    ids = [RUN_CLASSES.index(s) + 1 for s in shapes]
    mask = np.zeros(inst.shape, np.uint8)
    for j, cid in enumerate(ids):
        mask[inst == j + 1] = cid
    mask[0, :] = 255  # an ignore row: neither fg nor bg
    meta = build_meta(prompt=" and ".join(f"a {o.phrase}" for o in objects), seed=index, classes=list(shapes),
                      class_ids=ids, model="hand-written", extractor="exact", extractor_params={}, width=32,
                      height=32)
    return SampleRecord(index=index, key=sample_key(shard_id, i, 1), status="accepted", image=image, mask=mask,
                        meta=meta)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    layout = RunLayout(root).create()
    layout.write_classes(RUN_CLASSES)
    scenes = [["circle"], ["square", "circle"], ["triangle"], ["circle", "square"], ["square"]]
    write_shard(layout.root, 0, [scene_record(0, i, s, i) for i, s in enumerate(scenes[:3])])
    write_shard(layout.root, 1, [scene_record(1, i, s, 3 + i) for i, s in enumerate(scenes[3:])])
    return root


@pytest.fixture(scope="module")
def harness():
    """One Prefect test server for the module's flow runs (starting one takes ~6 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):  # a loaded machine can take over 30 s
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from conftest import build_sd1_pipeline

    path = tmp_path_factory.mktemp("tiny-sd")
    build_sd1_pipeline(seed=0).save_pretrained(path, safe_serialization=True)
    return path


def test_support_from_run_masks(run_dir):
    from maskmill.shards import iter_samples

    by_key = {s.key: s for s in iter_samples(run_dir)}
    sup = support_from_run(run_dir, "circle", 10)
    # circles are in samples 0, 1 (shard 0) and 3 (shard 1), in shard order
    assert sup.keys == [sample_key(0, 0, 1), sample_key(0, 1, 1), sample_key(1, 0, 1)]
    assert sup.source == "run" and sup.images.shape == (3, 32, 32, 3)
    for k, key in enumerate(sup.keys):
        mask = by_key[key].mask
        assert np.array_equal(sup.fg[k], mask == 1)
        assert np.array_equal(sup.bg[k], mask == 0)  # other classes and 255 are neither
        assert np.array_equal(sup.images[k], by_key[key].image)
    assert not (sup.fg[1] | sup.bg[1])[mask_of(by_key[sup.keys[1]].mask, 2)].any()  # the square is not bg
    assert len(support_from_run(run_dir, "square", 2)) == 2  # n respected
    with pytest.raises(ValueError, match="star.*circle, square, triangle"):
        support_from_run(run_dir, "star", 4)


def mask_of(mask, cid):
    return mask == cid


def test_masks_at_area_threshold_and_small_object_fallback():
    m = np.zeros((2, 8, 8), bool)
    m[0, :4, :4] = True  # exactly one 4x4 cell block -> cells (0,0),(0,1),(1,0),(1,1) at 4x4
    m[1, 0, 0] = True  # a one-pixel object: below any threshold, keeps its best cell
    out = masks_at(m, (4, 4), 0.5)
    assert out[0].sum() == 4 and out[0, :2, :2].all()
    assert out[1].sum() == 1 and out[1, 0, 0]


def test_generate_support_on_a_tiny_model(model_dir):
    from maskmill.models import load_pipeline

    pipe = load_pipeline(str(model_dir))
    sup = generate_support(pipe, "circle", 2, prompts="shapes", steps=2, guidance=4.0, drop_empty=False)
    assert isinstance(sup, SupportSet) and sup.images.shape == (2, 32, 32, 3) and sup.source == "generate"
    assert not (sup.fg & sup.bg).any()
    assert all(p.startswith("a ") and p.endswith(" circle") for p in sup.prompts)
    again = generate_support(pipe, "circle", 1, prompts="shapes", steps=2, guidance=4.0, drop_empty=False)
    # sample i is fixed by (class, seed, i), not by n: the same prompt and seed exactly; the image is
    # the same up to rounding, since a batch of 2 and a batch of 1 round differently
    assert again.prompts[0] == sup.prompts[0]
    assert_same_image_up_to_rounding(again.images[0], sup.images[0])


def build_prototypes(classes, **settings):
    """The flow on a config object made from keyword settings."""
    from flows.build_prototypes import build_prototypes as flow
    from maskmill.prototypes.build_config import BankBuildConfig

    return flow(BankBuildConfig(classes=classes, **settings))


def test_flow_builds_reuses_and_rebuilds_only_changed_classes(harness, run_dir, model_dir, tmp_path):
    from maskmill.prototypes.build import clear_pipelines

    cache = tmp_path / "cache"
    out = tmp_path / "bank.safetensors"
    kw = dict(cache_root=str(cache), model=str(model_dir), support=str(run_dir), n_support=3, k_parts=4, out=str(out))
    clear_pipelines()
    first = build_prototypes(["circle", "square"], **kw)
    assert first["built"] == ["circle", "square"] and first["reused"] == []
    bank = load_bank(first["bank_path"])
    assert bank.classes == ["circle", "square"] and first["bank_path"] == str(out)
    assert {m.side for m in bank.meta} == {"fg", "bg"}
    assert set(first["per_class"]["circle"]["timings"]) >= {"support", "features_and_bank"}

    loads = PIPELINE_LOADS["count"]
    clear_pipelines()  # a reuse must not even load the model
    second = build_prototypes(["circle", "square"], **kw)
    assert second["built"] == [] and second["reused"] == ["circle", "square"]
    assert PIPELINE_LOADS["count"] == loads
    assert load_bank(second["bank_path"]).vectors.equal(bank.vectors)

    third = build_prototypes(["circle", "square"], stuff_classes=["square"], **kw)
    assert third["built"] == ["square"] and third["reused"] == ["circle"]
    counts = load_bank(third["bank_path"]).counts()
    assert counts["square"]["bg"] == 0 and counts["circle"]["bg"] > 0

    fourth = build_prototypes(["circle", "square", "triangle"], stuff_classes=["square"],
                              class_overrides={"circle": {"k_parts": 2}}, **kw)
    assert fourth["built"] == ["circle", "triangle"] and fourth["reused"] == ["square"]

    with pytest.raises(ValueError, match="not in run"):
        build_prototypes(["circle", "star"], **kw)


def test_flow_generate_support_end_to_end(harness, model_dir, tmp_path):
    kw = dict(cache_root=str(tmp_path / "cache"), model=str(model_dir), support="generate", n_support=2, k_parts=2,
              prompts="shapes", steps=2, guidance=4.0)
    first = build_prototypes(["star", "circle"], **kw)
    second = build_prototypes(["star"], **kw)
    assert first["built"] == ["star", "circle"]
    assert second["reused"] == ["star"] and second["built"] == []
    bank = load_bank(first["bank_path"])
    assert set(bank.classes) == {"star", "circle"} and set(SHAPES) >= set(bank.classes)
    assert all(k.startswith("gen-") for m in bank.meta for k in m.support_keys)


def test_cli_prototypes_build_runs_the_flow_from_a_config_file(harness, run_dir, model_dir, tmp_path, capsys):
    """`maskmill prototypes build --config FILE` (flags over the file's keys) runs this flow."""
    import json

    import yaml

    from maskmill.cli import main

    config = tmp_path / "banks.yaml"
    config.write_text(yaml.safe_dump({"classes": ["circle", "square"], "model": str(model_dir), "support": str(run_dir),
                                      "n_support": 3, "k_parts": 4, "cache_root": str(tmp_path / "cache")}))
    bank = tmp_path / "bank.safetensors"
    assert main(["prototypes", "build", "--config", str(config), "--out", str(bank)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["built"] == ["circle", "square"] and summary["bank_path"] == str(bank)
    fg_classes = {m.class_name for m in load_bank(bank).meta if m.side == "fg"}
    assert fg_classes == {"circle", "square"}
