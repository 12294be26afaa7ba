"""OVDiff prototype banks: building, segmenting, saving, caching, and the feature extractors.

Most tests use synthetic features where each class is a known direction in feature space, so the
expected segmentation is exact. The SD and CLIP extractors run on tiny random models.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from maskmill.prototypes import (
    BankCache,
    BankCorruptedError,
    CLIPPatchFeatures,
    FeatureExtractor,
    FingerprintMismatchError,
    PrototypeBank,
    SDQueryFeatures,
    UnsafeClassNameError,
    build_class_bank,
    drop_confusing_background,
    load_bank,
    make_class_prefilter,
    make_fingerprint,
    merge_banks,
    save_bank,
    save_segmentation,
    segment_image,
    segment_images,
)
from maskmill.prototypes.segment import prototype_scores

from tolerances import assert_same_argmax_except_near_ties

C, H, W = 8, 8, 8
BG = 0  # feature direction of plain background
DIRECTION = {"cat": 1, "dog": 2}


def unit(i: int, noise: float = 0.0, rng=None) -> torch.Tensor:
    v = torch.zeros(C)
    v[i] = 1.0
    if noise:
        v = v + noise * torch.from_numpy(rng.standard_normal(C)).float()
    return v


def feature_map(regions: dict[int, np.ndarray], rng, noise: float = 0.05) -> torch.Tensor:
    """(C, H, W): pixels in each boolean region point along that region's direction, plus noise."""
    f = torch.zeros(C, H, W)
    for direction, region in regions.items():
        for y, x in zip(*np.nonzero(region)):
            f[:, y, x] = unit(direction, noise, rng)
    return f


def box(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def support_set(name: str, n: int = 3, seed: int = 0, bg_regions=None):
    """n support maps of one class: the object in a box that moves, the rest background."""
    rng = np.random.default_rng(seed)
    feats, fg, bg = [], [], []
    for i in range(n):
        obj = box(i, i + 4, 1, 5)
        regions = {BG: ~obj} if bg_regions is None else dict(bg_regions(obj))
        regions[DIRECTION[name]] = obj
        feats.append(feature_map(regions, rng))
        fg.append(obj)
        bg.append(~obj)
    return torch.stack(feats), np.stack(fg), np.stack(bg), [f"{name}-{i:03d}" for i in range(n)]


FP = make_fingerprint({"name": "synthetic", "model": {"id": "none"}}, {"k_parts": 4, "seed": 0})


def class_bank(name: str, stuff: bool = False, **kw) -> PrototypeBank:
    feats, fg, bg, keys = support_set(name, **kw)
    return build_class_bank(name, feats, fg, bg, keys, k_parts=4, stuff=stuff, fingerprint=FP)


def two_class_query():
    cat, dog = box(0, 3, 0, 3), box(4, 8, 4, 8)
    background = ~(cat | dog)
    feats = feature_map({BG: background, DIRECTION["cat"]: cat, DIRECTION["dog"]: dog}, np.random.default_rng(7))
    return feats, cat, dog, background


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


# ------------------------------------------------------------------------------------------ banks


def test_bank_contents_and_metadata():
    bank = class_bank("cat")
    counts = bank.counts()["cat"]
    # per side: 1 class mean + 3 instances + parts (<= 4)
    assert 5 <= counts["fg"] <= 8 and 5 <= counts["bg"] <= 8
    assert torch.allclose(bank.vectors.norm(dim=1), torch.ones(len(bank)))
    kinds = {(m.side, m.kind) for m in bank.meta}
    assert kinds == {(s, k) for s in ("fg", "bg") for k in ("class", "instance", "part")}
    instance_keys = [m.support_keys for m in bank.meta if m.kind == "instance" and m.side == "fg"]
    assert instance_keys == [("cat-000",), ("cat-001",), ("cat-002",)]
    assert next(m for m in bank.meta if m.kind == "class").support_keys == ("cat-000", "cat-001", "cat-002")

    # k-means on a seeded subsample of the pixels: same bank twice, parts still name real support images.
    feats, fg, bg, keys = support_set("cat")
    small = [build_class_bank("cat", feats, fg, bg, keys, k_parts=4, max_kmeans_points=10) for _ in range(2)]
    assert torch.equal(small[0].vectors, small[1].vectors)
    assert all(m.support_keys and set(m.support_keys) <= set(keys) for m in small[0].meta if m.kind == "part")


def test_fewer_points_than_parts():
    feats, fg, bg, keys = support_set("cat", n=1)
    fg = np.zeros_like(fg)
    fg[0, 0, 0] = fg[0, 0, 1] = True  # two pixels, K = 32
    bank = build_class_bank("cat", feats, fg, bg, keys, k_parts=32)
    assert sum(m.kind == "part" and m.side == "fg" for m in bank.meta) == 2


def test_stuff_classes_have_no_background_prototypes():
    bank = class_bank("cat", stuff=True)
    assert bank.meta and all(m.side == "fg" for m in bank.meta)


# ----------------------------------------------------------------------------------- segmentation


def test_segment_recovers_known_regions():
    bank = merge_banks([class_bank("cat"), class_bank("dog", seed=1)])
    feats, cat, dog, background = two_class_query()
    labels, scores = segment_image(feats, bank, ["cat", "dog"])
    assert labels.dtype == np.uint8 and labels.shape == (H, W) and scores.shape == (3, H, W)
    assert iou(labels == 1, cat) == 1.0
    assert iou(labels == 2, dog) == 1.0
    assert iou(labels == 0, background) == 1.0


def test_background_prototypes_matter():
    bank = merge_banks([class_bank("cat"), class_bank("dog", seed=1)])
    feats, cat, dog, background = two_class_query()
    truth = np.where(cat, 1, np.where(dog, 2, 0))
    with_bg, _ = segment_image(feats, bank, ["cat", "dog"])
    without_bg, _ = segment_image(feats, bank, ["cat", "dog"], use_background=False)
    assert (with_bg == truth).mean() == 1.0
    assert (without_bg == truth).mean() < 0.6  # background pixels have nowhere to go


def test_confusing_background_dropped_at_threshold():
    # Every cat support image has a dog in its background (right half): its bg parts include "dog".
    def cat_with_dog_behind(obj):
        dog_behind = box(0, H, 6, 8) & ~obj
        return {BG: ~obj & ~dog_behind, DIRECTION["dog"]: dog_behind}

    cat = class_bank("cat", bg_regions=cat_with_dog_behind)
    bank = merge_banks([cat, class_bank("dog", seed=1)])
    dog_fg = bank.vectors[bank.mask(classes=["dog"], side="fg")]

    def max_sim_to_dog(b: PrototypeBank) -> torch.Tensor:
        return (b.vectors[b.mask(classes=["cat"], side="bg")] @ dog_fg.T).max(1).values

    assert (max_sim_to_dog(bank) > 0.85).any()
    cleaned = drop_confusing_background(bank, threshold=0.85)
    assert len(cleaned) < len(bank)
    assert (max_sim_to_dog(cleaned) <= 0.85).all()
    assert cleaned.mask(classes=["cat"], side="bg").any()  # the genuine background survives
    assert cleaned.mask(side="fg").sum() == bank.mask(side="fg").sum()  # fg never dropped

    feats, _, dog, _ = two_class_query()
    labels_raw, _ = segment_image(feats, bank, ["cat", "dog"])
    labels_clean, _ = segment_image(feats, cleaned, ["cat", "dog"])
    assert iou(labels_clean == 2, dog) == 1.0
    assert iou(labels_raw == 2, dog) < 1.0  # the dog was called background before


def test_chunked_similarity_equals_unchunked():
    rng = np.random.default_rng(3)
    feats = torch.from_numpy(rng.standard_normal((C, H, W))).float()
    banks = [class_bank("cat", seed=4), class_bank("dog", seed=5)]
    bank = merge_banks(banks)
    full = prototype_scores(feats, bank, ["cat", "dog"], chunk=4096)
    for chunk in (1, 3, 7):
        part = prototype_scores(feats, bank, ["cat", "dog"], chunk=chunk)
        assert torch.allclose(full, part, atol=1e-6)
        # other chunk sizes, other matmul shapes: rounding may only swap near-tied classes
        assert_same_argmax_except_near_ties(part.argmax(0), full)


def test_unknown_class_and_wrong_feature_size_refused():
    bank = class_bank("cat")
    feats, *_ = two_class_query()
    with pytest.raises(ValueError, match="no foreground prototypes for \\['dog'\\]"):
        segment_image(feats, bank, ["cat", "dog"])
    with pytest.raises(ValueError, match="channels"):
        segment_image(feats[:4], bank, ["cat"])


class FixedFeatures(FeatureExtractor):
    """A feature extractor is one class: here, the same synthetic map for every image."""

    name = "fixed"

    def __init__(self, features: torch.Tensor):
        self.features = features

    def fingerprint(self) -> dict:
        return {"name": self.name}

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        return self.features[None].expand(len(images), -1, -1, -1)


def test_segment_images_upsamples_prefilters_refines_and_saves(tmp_path):
    bank = merge_banks([class_bank("cat"), class_bank("dog", seed=1)])
    feats, cat, dog, _ = two_class_query()
    images = np.zeros((2, 32, 32, 3), np.uint8)
    refined = []

    def refine(scores, image):
        refined.append(scores.shape)
        return scores

    # Logits favour "cat" only: the pre-filter drops "dog", which then labels no pixel.
    prefilter = make_class_prefilter(lambda image, classes: np.array([5.0, 0.0]))
    out = segment_images(FixedFeatures(feats), images, bank, ["cat", "dog"], prefilter=prefilter, refine=refine)
    assert len(out) == 2 and refined == [(3, 32, 32)] * 2
    seg = out[0]
    assert seg.labels.shape == (32, 32) and seg.scores.shape == (3, 32, 32) and seg.candidates == ["cat"]
    assert 2 not in seg.labels
    # Away from the (now unclaimed) dog, the cat box comes back at image scale; bilinear moves
    # its corner by at most a pixel.
    upsampled_cat = np.kron(cat, np.ones((4, 4), bool))
    assert iou(seg.labels[:16, :16] == 1, upsampled_cat[:16, :16]) > 0.95

    paths = save_segmentation(seg.labels, images[0], ["cat", "dog"], tmp_path, "img0")
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(paths["labels"])), seg.labels)
    assert np.asarray(Image.open(paths["overlay"])).shape == (32, 32, 3)
    assert json.loads(paths["legend"].read_text())["1"]["name"] == "cat"
    with pytest.raises(ValueError, match="plain file name"):
        save_segmentation(seg.labels, images[0], ["cat", "dog"], tmp_path, "../escape")


def test_prefilter_keeps_likely_classes_at_most_ten():
    classes = [f"c{i}" for i in range(30)]
    logits = np.zeros(30)
    logits[:12] = 3.0  # twelve likely classes, all >= 1/30
    keep = make_class_prefilter(lambda image, cs: logits)(None, classes)
    assert len(keep) == 10 and set(keep) <= set(classes[:12])
    assert make_class_prefilter(lambda image, cs: np.zeros(3))(None, ["a", "b", "c"]) == ["a", "b", "c"]


# ------------------------------------------------------------------------------------------ files


def test_save_load_roundtrip(tmp_path):
    bank = merge_banks([class_bank("cat"), class_bank("dog", seed=1, stuff=True)])
    path = save_bank(bank, tmp_path / "bank.safetensors")
    loaded = load_bank(path, expected_fingerprint=FP)
    assert torch.equal(loaded.vectors, bank.vectors)
    assert loaded.meta == bank.meta
    assert loaded.fingerprint == json.loads(json.dumps(FP))


def test_corrupted_and_mismatched_banks_refused(tmp_path):
    path = save_bank(class_bank("cat"), tmp_path / "bank.safetensors")
    good = path.read_bytes()

    data = bytearray(good)
    data[-5] ^= 0xFF  # flip bits inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(BankCorruptedError, match="corrupted: sha256"):
        load_bank(path)

    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(BankCorruptedError, match="unreadable"):
        load_bank(path)

    path.write_bytes(good)
    other = make_fingerprint({"name": "synthetic", "model": {"id": "none"}}, {"k_parts": 8, "seed": 0})
    with pytest.raises(FingerprintMismatchError, match=r"settings\.k_parts: bank has 4, expected 8"):
        load_bank(path, expected_fingerprint=other)
    assert len(load_bank(path, expected_fingerprint=FP)) > 0


def test_bank_whose_json_was_edited_refused_naming_the_key(tmp_path):
    """A timestep edited in the sidecar (fingerprint_hash left as it was) must not pass as another bank."""
    fp = make_fingerprint({"name": "sd_query", "timestep": 200, "model": {"id": "none"}}, {"k_parts": 4})
    path = save_bank(class_bank("cat"), tmp_path / "bank.safetensors", fp)
    sidecar_path = path.with_suffix(".json")
    original = sidecar_path.read_text()
    assert len(load_bank(path)) > 0  # untouched: loads

    sidecar = json.loads(original)
    sidecar["fingerprint"]["feature_extractor"]["timestep"] = 400
    sidecar_path.write_text(json.dumps(sidecar, indent=1))
    with pytest.raises(BankCorruptedError) as err:
        load_bank(path)
    msg = str(err.value)
    assert "\n" not in msg and "was edited" in msg and "feature_extractor.timestep changed" in msg
    assert sidecar["fingerprint_hash"] in msg
    # the caller's expected fingerprint says 400 too: still refused (the bank was built at 200)
    expected = json.loads(json.dumps(sidecar["fingerprint"]))
    with pytest.raises(BankCorruptedError, match="feature_extractor.timestep changed"):
        load_bank(path, expected_fingerprint=expected)

    sidecar["fingerprint"]["settings"]["extra"] = 1  # a key added, the timestep edit kept
    sidecar_path.write_text(json.dumps(sidecar))
    with pytest.raises(BankCorruptedError, match=r"settings.extra added"):
        load_bank(path)

    old_format = json.loads(original)  # banks saved before per-key hashes: refused without the key
    del old_format["fingerprint_key_hashes"]
    assert len(load_bank_from(sidecar_path, old_format, path)) > 0
    old_format["fingerprint"]["feature_extractor"]["timestep"] = 400
    with pytest.raises(BankCorruptedError, match="hashes to .*, not to the recorded fingerprint_hash"):
        load_bank_from(sidecar_path, old_format, path)


def load_bank_from(sidecar_path, sidecar: dict, path):
    sidecar_path.write_text(json.dumps(sidecar))
    return load_bank(path)


# ------------------------------------------------------------------------------------------ cache


def test_cache_reuses_built_classes(tmp_path):
    cache = BankCache(tmp_path / "banks")
    calls: list[str] = []

    def build(name: str) -> PrototypeBank:
        calls.append(name)
        return class_bank(name)

    first = cache.get_or_build(["cat"], FP, build)
    assert first.built == ["cat"] and first.reused == [] and calls == ["cat"]

    second = cache.get_or_build(["cat", "dog"], FP, build)
    assert second.built == ["dog"] and second.reused == ["cat"] and calls == ["cat", "dog"]
    assert second.bank.classes == ["cat", "dog"]
    assert torch.equal(second.bank.vectors[second.bank.mask(classes=["cat"])], first.bank.vectors)

    changed = make_fingerprint({"name": "synthetic", "model": {"id": "other"}}, {"k_parts": 4, "seed": 0})
    third = cache.get_or_build(["cat"], changed, build)
    assert third.built == ["cat"] and calls == ["cat", "dog", "cat"]

    # A corrupted cached bank is rebuilt, and the report says why.
    tensor_file = cache.entry_path("dog", FP)
    tensor_file.write_bytes(tensor_file.read_bytes()[:-8] + b"\0" * 8)
    fourth = cache.get_or_build(["cat", "dog"], FP, build)
    assert fourth.built == ["dog"] and "dog" in fourth.rebuilt_after_error


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "a\\b", "x/../../y", "", "nul\x00"])
def test_cache_refuses_path_traversal(tmp_path, name):
    root = tmp_path / "banks"
    calls = []
    with pytest.raises(UnsafeClassNameError):
        BankCache(root).get_or_build(["cat", name], FP, lambda c: calls.append(c) or class_bank("cat"))
    assert calls == []  # refused before building anything
    assert not any(p for p in tmp_path.rglob("*") if root not in p.parents and p != root)


def test_cache_keeps_odd_but_safe_names_apart(tmp_path):
    cache = BankCache(tmp_path)
    names = ["potted plant", "potted_plant", ".hidden", "Ünïcode"]
    dirs = {cache.entry_path(n, FP).parent.parent for n in names}
    assert len(dirs) == len(names) and all(d.parent == tmp_path for d in dirs)


# ------------------------------------------------------------------------------------- extractors


@pytest.fixture(scope="module")
def tiny_pipe():
    import diffusers

    from maskmill.toyworld.build import build_models, clip_tokenizer

    torch.manual_seed(0)
    vae, text_encoder, unet = build_models()
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def test_sd_query_features_shape_determinism_and_hooks(tiny_pipe):
    extractor = SDQueryFeatures(tiny_pipe, timestep=200)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    a = extractor(images)
    b = extractor(images)
    # 4 up-block cross-attentions: two at 8x8 (64 channels), two at 16x16 (32), all upsampled to 16x16.
    assert len(extractor.layers) == 4 and a.shape == (2, 2 * 64 + 2 * 32, 16, 16)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert not any(m._forward_hooks for m in tiny_pipe.unet.modules())  # hooks removed
    fp = extractor.fingerprint()
    assert fp["timestep"] == 200 and fp["layers"] == extractor.layers and json.dumps(fp)
    assert SDQueryFeatures(tiny_pipe, timestep=300).fingerprint() != fp
    with pytest.raises(ValueError, match="not attention layers"):
        SDQueryFeatures(tiny_pipe, layers=["up_blocks.9.attn2"])


def test_clip_patch_features_tiny_random_model(tmp_path):
    from safetensors.torch import save_file

    from maskmill.clip_model import _load_clip_submodule

    clip_model = _load_clip_submodule("model")
    torch.manual_seed(0)
    # embed 32; ViT: 32 px input, patch 8 (4x4 grid), width 64, 1 layer; text: width 64, 1 layer
    tiny = clip_model.CLIP(32, 32, 1, 64, 8, 77, 49408, 64, 1, 1)
    path = tmp_path / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))

    extractor = CLIPPatchFeatures(path)
    images = np.random.default_rng(0).integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)
    features = extractor(images)
    assert features.shape == (2, 32, 4, 4) and features.dtype == torch.float32
    logits = extractor.class_logits(images[0], ["cat", "potted plant"])
    assert logits.shape == (2,) and np.isfinite(logits).all()
    assert extractor.fingerprint()["model"]["sha256"]

    with pytest.raises(FileNotFoundError, match="not found"):
        CLIPPatchFeatures(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read CLIP weights"):
        CLIPPatchFeatures(tmp_path / "junk.pt")


def test_capture_hooks_removed_even_when_the_forward_pass_fails():
    from maskmill.prototypes.features import capture_outputs

    layer = torch.nn.Linear(3, 2)
    with pytest.raises(RuntimeError):
        with capture_outputs({"layer": layer}) as outputs:
            layer(torch.zeros(1, 3))
            assert outputs["layer"].shape == (1, 2)
            layer(torch.zeros(1, 5))  # shape error inside the context
    assert not layer._forward_hooks


def test_pamr_refiner_snaps_noisy_scores_to_the_image_regions():
    from maskmill.prototypes.segment import make_refiner

    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16] = (200, 40, 40)
    image[:, 16:] = (40, 40, 200)
    truth = np.zeros((32, 32), bool)
    truth[:, 16:] = True
    rng = np.random.default_rng(0)
    scores = torch.from_numpy(np.stack([~truth, truth]).astype(np.float32) * 0.2
                              + rng.normal(0, 0.2, (2, 32, 32)).astype(np.float32))
    raw = (scores.argmax(0).numpy() == 1) == truth
    refined = (make_refiner("pamr")(scores, image).argmax(0).numpy() == 1) == truth
    assert raw.mean() < 0.85 and refined.mean() > 0.97
    assert make_refiner("none") is None
    with pytest.raises(ValueError, match="unknown refinement 'crf'; choose one of: none, pamr"):
        make_refiner("crf")
