"""The CLIP consistency check, its loader and the micro CLIP (shipped in maskmill/assets/shapes-clip)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from maskmill.clip_model import architecture_of, load_clip, new_clip
from maskmill.models import ClipNotFoundError
from maskmill.clipcheck import FILL, IGNORE, ClipCheck, ClipCheckConfig, region_crop
from maskmill.toyworld.render import Scene, ShapeObject, render

REPO = Path(__file__).resolve().parents[1]

TINY = dict(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=8,
            context_length=16, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)


@pytest.fixture(scope="module")
def shipped():
    return load_clip("shapes-clip")


def _save_tiny(folder, config: dict | None = None):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = new_clip(TINY)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return model


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_loads_from_safetensors_and_refuses_a_pickle(tmp_path):
    model = _save_tiny(tmp_path / "tiny", {"architecture": TINY})
    loaded = load_clip(tmp_path / "tiny")  # a folder holding model.safetensors
    assert (loaded.resolution, loaded.context_length) == (32, 16)
    image = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    # build_model rounds most weights to fp16: the same embeddings up to that rounding
    ref = model.half().float().eval().encode_image(loaded.normalise(image))
    assert torch.allclose(loaded.encode_images(image), torch.nn.functional.normalize(ref, dim=-1), atol=1e-3)

    torch.save(model.state_dict(), tmp_path / "plain.pt")  # a plain state dict: weights_only reads it
    assert load_clip(tmp_path / "plain.pt").resolution == 32

    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"visual.proj": _Payload(marker)}, f)
    with pytest.raises(ValueError, match="cannot read CLIP weights"):
        load_clip(tmp_path / "evil.pt")
    torch.save({"visual.proj": _Payload(marker)}, tmp_path / "evil2.pt")
    with pytest.raises(ValueError, match="cannot read CLIP weights"):
        load_clip(tmp_path / "evil2.pt")
    assert not marker.exists()  # the payload never ran


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(ClipNotFoundError, match="not found"):
        load_clip(tmp_path / "missing.safetensors")
    _save_tiny(tmp_path / "bad", {"architecture": {**TINY, "vision_layers": 3}})
    with pytest.raises(ValueError, match="vision_layers 3 in config, 1 in weights"):
        load_clip(tmp_path / "bad")
    with pytest.raises(ValueError, match="multiple of 64"):
        new_clip({**TINY, "vision_width": 48})


def test_shipped_model_is_the_documented_architecture(shipped):
    from safetensors.torch import load_file

    state = load_file(str(shipped.source))
    config = json.loads((shipped.source.parent / "config.json").read_text())
    assert architecture_of(state) == config["architecture"]
    assert all(v.dtype == torch.float16 for v in state.values())
    used = (state["token_embedding.weight"] != 0).any(1)
    assert int(used.sum()) == config["trained_token_rows"]
    ids = shipped.tokenize(["a red circle", "background"])
    assert used[ids[ids > 0]].all()  # every token of the training captions was trained


def test_region_crop_fills_outside_the_mask_and_keeps_the_region():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[...] = (200, 10, 10)
    mask = np.zeros((32, 32), bool)
    mask[4:12, 8:16] = True  # an 8x8 square
    crop = region_crop(image, mask, 8, box_margin=0.0)
    assert (crop == (200, 10, 10)).all()  # the box is exactly the mask: nothing filled
    crop = region_crop(image, mask, 16, box_margin=1.0)  # 16x16 box, mask in its centre
    assert (crop[4:12, 4:12] == (200, 10, 10)).all() and (crop[0, 0] == FILL).all()
    edge = np.zeros((32, 32), bool)
    edge[0:4, 0:2] = True  # square box runs past the image: filled, not wrapped
    crop = region_crop(image, edge, 4, box_margin=0.0)
    assert (crop[:, 1:3] == (200, 10, 10)).all() and (crop[:, 0] == FILL).all() and (crop[:, 3] == FILL).all()
    with pytest.raises(ValueError, match="empty mask"):
        region_crop(image, np.zeros((32, 32), bool), 8)


def test_config_is_validated():
    cfg = ClipCheckConfig(model="shapes-clip", min_margin=0.05, action="ignore")
    assert cfg.template == "a {}" and cfg.background_prompt
    with pytest.raises(ValidationError, match="action"):
        ClipCheckConfig(model="shapes-clip", action="drop")
    with pytest.raises(ValidationError, match="exactly one"):
        ClipCheckConfig(model="shapes-clip", template="a photo")
    with pytest.raises(ValidationError, match="extra"):
        ClipCheckConfig(model="shapes-clip", min_margn=0.1)


def _scene():
    """A red star and a blue circle, rendered: image and label map (1 star, 2 circle)."""
    scene = Scene([ShapeObject("star", "red", 9.0, 9.0, 7.0), ShapeObject("circle", "blue", 23.0, 22.0, 6.5)],
                  background_value=0.5)
    image, labels = render(scene)
    return image, labels.astype(np.uint8)


CLASSES = ["circle", "square", "triangle", "star"]


def test_filter_rejects_a_region_of_another_class_and_keeps_a_right_one(shipped):
    image, labels = _scene()
    check = ClipCheck(ClipCheckConfig(model="shapes-clip", min_margin=0.0), shipped)
    right, wrong = check.check([image, image], [labels, labels], [["star", "circle"], ["square", "circle"]], CLASSES)
    assert right.keep and right.reason == "" and right.flagged == [] and right.labels is labels
    assert all(m > 0 for m in right.margins)
    assert not wrong.keep and wrong.reason == "clip mismatch: square" and wrong.flagged == ["square"]
    assert wrong.margins[0] < 0 < wrong.margins[1]

    empty = np.zeros_like(labels)  # a "circle" mask on empty background: the background prompt wins
    empty[2:10, 20:28] = 1
    (nothing,) = check.check([image], [empty], [["circle"]], CLASSES)
    assert not nothing.keep and nothing.reason == "clip mismatch: circle"


def test_ignore_action_sets_the_flagged_class_to_255(shipped):
    image, labels = _scene()
    labels[0, 0] = IGNORE
    check = ClipCheck(ClipCheckConfig(model="shapes-clip", min_margin=0.0, action="ignore"), shipped)
    (d,) = check.check([image], [labels], [["square", "circle"]], CLASSES)
    assert d.keep and d.flagged == ["square"] and d.reason == ""
    assert (d.labels[labels == 1] == IGNORE).all()
    assert np.array_equal(d.labels[labels != 1], labels[labels != 1])  # circle, background, 255 untouched
    assert labels.max() == IGNORE and (labels == 1).any()  # the input is not modified


def test_filter_refuses_bad_input_before_scoring(shipped):
    image, labels = _scene()
    check = ClipCheck(ClipCheckConfig(model="shapes-clip"), shipped)
    with pytest.raises(ValueError, match="labels \\[2\\] beyond its 1 classes"):
        check.check([image], [labels], [["star"]], CLASSES)
    with pytest.raises(ValueError, match="as many"):
        check.check([image], [labels, labels], [["star", "circle"]], CLASSES)
    with pytest.raises(ValueError, match="not among the prompt classes"):
        check.check([image], [labels], [["star", "moon"]], CLASSES)
    with pytest.raises(ValueError, match="uint8"):
        check.check([image.astype(np.float32)], [labels], [["star", "circle"]], CLASSES)


def test_captions_describe_items_and_the_loss_prefers_matching_embeddings():
    from maskmill.toyworld.clip_data import caption_meaning, describes
    from maskmill.toyworld.clip_train import contrastive_loss

    red_circle = ("obj", "red", "circle")
    assert describes(caption_meaning("a circle"), red_circle)
    assert describes(caption_meaning("a red circle"), red_circle)
    assert not describes(caption_meaning("a blue circle"), red_circle)
    assert not describes(caption_meaning("a star"), red_circle)
    assert describes(caption_meaning("a red circle"), ("scene", "red circle"))  # a one-object scene
    scene = ("scene", "blue star + red circle")
    assert describes(caption_meaning("a red circle and a blue star"), scene)
    assert not describes(caption_meaning("a red circle and a blue square"), scene)
    # an object caption is true of a scene holding such an object (OVDiff's pre-filter asks that of images)
    assert describes(caption_meaning("a circle"), scene) and describes(caption_meaning("a blue star"), scene)
    assert not describes(caption_meaning("a square"), scene) and not describes(caption_meaning("a red star"), scene)
    assert describes(caption_meaning("background"), ("bg",)) and not describes(caption_meaning("a star"), ("bg",))

    emb = torch.eye(3)
    positives = torch.eye(3, dtype=torch.bool)
    scale = torch.tensor(10.0)
    assert contrastive_loss(emb, emb, positives, scale) < contrastive_loss(emb, emb[[1, 2, 0]], positives, scale)


def test_train_writes_weights_that_load_and_a_card(tmp_path):
    from maskmill.toyworld.clip_card import write_card
    from maskmill.toyworld.clip_train import ClipTrainSettings, train

    settings = ClipTrainSettings(steps=2, batch=8, warmup=1, pool_scenes=4, eval_scenes=3, architecture=dict(TINY))
    summary = train(settings, tmp_path / "m")
    loaded = load_clip(tmp_path / "m")  # config.json agrees with the weights
    assert loaded.resolution == 32 and summary["trained_token_rows"] > 5
    assert 0 <= summary["rendered_accuracy"]["shape"] <= 1
    (tmp_path / "m" / "README.md").write_text("old\n## Measured\nkept figures\n")
    card = write_card(tmp_path / "m", summary).read_text()
    assert "--steps 2 --batch 8" in card and card.endswith("## Measured\nkept figures\n")
    with pytest.raises(ValueError, match="--lr"):
        ClipTrainSettings(lr=5).check()


def test_cli_defaults_agree_with_the_trainer():
    from dataclasses import fields

    from maskmill.cli import build_parser
    from maskmill.toyworld.clip_cli import TRAIN_DEFAULTS
    from maskmill.toyworld.clip_train import ClipTrainSettings

    defaults = {f.name: f.default for f in fields(ClipTrainSettings)}
    assert all(defaults[k] == v for k, v in TRAIN_DEFAULTS.items())
    a = build_parser().parse_args(["toyworld", "eval-clip", "--margins", "0.1,-0.1"])
    assert a.margins == (-0.1, 0.1) and a.fn.__name__ == "_cmd_eval_clip"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["toyworld", "eval-clip", "--margins", "x"])


def test_catch_rates_and_the_chosen_margin():
    from maskmill.toyworld.clip_eval import best_margin, catch_rates

    margins = [[0.3, -0.1], [0.05, None], [-0.2]]  # None: an empty mask is never flagged
    wrong = [[False, True], [True, False], [True]]
    at0 = catch_rates(margins, wrong, 0.0)
    assert (at0["precision"], at0["recall"], at0["flagged"], at0["wrong"]) == (1.0, 2 / 3, 2, 3)
    assert at0["rejected_share"] == 2 / 3
    at4 = catch_rates(margins, wrong, 0.4)
    assert (at4["precision"], at4["recall"], at4["rejected_share"]) == (0.75, 1.0, 1.0)
    sweep = [catch_rates(margins, wrong, t) for t in (-0.5, 0.0, 0.1, 0.4)]
    assert best_margin(sweep)["min_margin"] == 0.1  # full recall at precision 1, before precision drops


def test_train_continues_from_given_weights(tmp_path):
    from maskmill.toyworld.clip_train import ClipTrainSettings, train

    _save_tiny(tmp_path / "start")
    settings = ClipTrainSettings(steps=1, batch=4, warmup=1, pool_scenes=2, eval_scenes=1, init=str(tmp_path / "start"))
    summary = train(settings, tmp_path / "next")
    assert summary["architecture"] == TINY  # taken from the weights, not the default micro architecture
    assert summary["settings"]["init"] == str(tmp_path / "start")


def test_run_config_takes_filter_clip_and_refuses_a_missing_model(tmp_path):
    import yaml

    from maskmill.config import ConfigError, load_config

    base = yaml.safe_load((REPO / "configs" / "shapes.yaml").read_text())
    base["filter"]["clip"] = {"model": "shapes-clip", "min_margin": -0.05, "action": "ignore"}
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(base))
    cfg = load_config(tmp_path / "ok.yaml")
    assert cfg.filter.clip.action == "ignore" and cfg.filter.clip.min_margin == -0.05
    base["filter"]["clip"]["model"] = str(tmp_path / "absent.safetensors")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError, match=r"key 'filter.clip.model': CLIP model .*absent.safetensors.* not found") as e:
        load_config(tmp_path / "bad.yaml")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("action", ["reject", "ignore"])
def test_the_run_applies_filter_clip_to_every_accepted_sample(tmp_path, action):
    """A margin no region can reach (2.0) flags every class: rejected with the reason, or its pixels ignored."""
    import pyarrow.parquet as pq

    from maskmill.config import load_config
    from maskmill.run.direct import run_direct
    from maskmill.shards import iter_samples
    from runs import save_tiny_pipeline, write_config

    model = save_tiny_pipeline(tmp_path / "model")
    clip = {"model": "shapes-clip", "min_margin": 2.0, "action": action}
    cfg = load_config(write_config(tmp_path / "c.yaml", model, tmp_path / "run", filter__clip=clip,
                                   filter__max_retries_factor=1.0))
    run_direct(cfg, progress=False, finalize=False)
    rows = pq.read_table(sorted((tmp_path / "run" / "manifests").glob("*.parquet"))).to_pylist()
    assert rows, "no samples planned"
    if action == "reject":
        assert all(r["status"] == "rejected" and r["reason"].startswith("clip mismatch: ") for r in rows)
    else:
        samples = list(iter_samples(tmp_path / "run"))
        assert samples and all(r["status"] == "accepted" for r in rows)
        assert all(set(np.unique(s.mask)) <= {0, 255} for s in samples)  # every class region flagged -> ignored
        assert any((s.mask == 255).any() for s in samples)
