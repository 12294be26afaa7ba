"""SeeDiff on hand-made attention whose right mask is known, and the extractor contract.

The hand-made sample is a 16 x 16 latent grid with two objects, a square (A) and a disc (B),
on background. Self-attention is block-structured: each pixel attends uniformly to its own
region. Cross-attention is a softmax over 77 tokens with a heavy BOS token (as in SD) and
noise everywhere; token 1 is raised inside A, token 2 inside B. The 32 x 32 image is
coloured by region, so PAMR sees the same boundaries.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from maskmill.extractors import IGNORE, ClassSpec, MaskResult, SampleAttention, extractor_names, get_extractor
from maskmill.extractors.base import resolve_labels
from maskmill.extractors.seediff import SeeDiffExtractor

SIDE = 16
BACKGROUND, OBJECT_A, OBJECT_B = 0, 1, 2
PALETTE = np.array([[128, 128, 128], [220, 40, 30], [30, 60, 220]], dtype=np.uint8)


def regions_16() -> np.ndarray:
    """0 background, 1 a 6x6 square, 2 a disc of radius 3.6 (44 cells)."""
    yy, xx = np.mgrid[:SIDE, :SIDE]
    r = np.zeros((SIDE, SIDE), dtype=int)
    r[2:8, 2:8] = OBJECT_A
    r[(yy - 10.5) ** 2 + (xx - 10.5) ** 2 <= 3.6**2] = OBJECT_B
    return r


def block_attention(regions: np.ndarray) -> torch.Tensor:
    """(n, n) rows: each pixel attends uniformly to the pixels of its own region (rows sum to 1)."""
    flat = regions.ravel()
    member = np.eye(flat.max() + 1)[flat]
    return torch.tensor(member @ (member / member.sum(0)).T, dtype=torch.float32)


def cross_attention(regions: np.ndarray, rng: np.random.Generator, peaks: dict[int, int] | None = None,
                    noise: float = 0.3) -> torch.Tensor:
    """(77, h, w) softmax over tokens: BOS heavy, token t raised by 3 inside region peaks[t], noise everywhere."""
    peaks = {1: OBJECT_A, 2: OBJECT_B} if peaks is None else peaks
    logits = rng.normal(0.0, noise, (77, *regions.shape))
    logits[0] += 4.0
    for token, region in peaks.items():
        logits[token][regions == region] += 3.0
    return torch.tensor(logits).softmax(0).float()


def cluster_features(regions: np.ndarray, rng: np.random.Generator, channels: int = 16) -> torch.Tensor:
    """(C, h, w): one random direction per region plus a little noise (what DiffCut reads)."""
    centres = rng.normal(size=(regions.max() + 1, channels))
    f = centres[regions] + 0.05 * rng.normal(size=(*regions.shape, channels))
    return torch.tensor(f, dtype=torch.float32).permute(2, 0, 1).contiguous()


def hand_made_sample(coarse: bool = False, seed: int = 0) -> tuple[SampleAttention, list[ClassSpec], np.ndarray, np.ndarray]:
    """(attention, classes [A, B], image 32x32x3, true labels 32x32). coarse: also a side-8 level."""
    rng = np.random.default_rng(seed)
    r16 = regions_16()
    cross = {"down_blocks.0.attn2": cross_attention(r16, rng), "up_blocks.1.attn2": cross_attention(r16, rng)}
    res = {name: SIDE for name in cross}
    self_attn = {SIDE: block_attention(r16)}
    r8 = r16[::2, ::2]
    if coarse:
        cross["down_blocks.1.attn2"], res["down_blocks.1.attn2"] = cross_attention(r8, rng), 8
        self_attn[8] = block_attention(r8)
    attn = SampleAttention(cross=cross, self_attn=self_attn, cross_resolution=res,
                           features={"encoder_last_attn": cluster_features(r8, rng)})
    truth = np.kron(r16, np.ones((2, 2), dtype=int))
    classes = [ClassSpec("square", (1,)), ClassSpec("disc", (2,))]
    return attn, classes, PALETTE[truth], truth


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def assert_recovers_both_objects(result: MaskResult, truth: np.ndarray, min_confidence: float = 0.5) -> None:
    """IoU >= 0.9 per object, background left 0, both classes confident.

    Confidence is the class's own normalised cross-attention inside its mask minus outside: about
    0.6-0.7 for these noisy maps at side 16 (seeds 0-9), 0.5-0.6 when seeded from side 8 (the coarse
    map is blurred by upsampling), about 0 for a token that attends everywhere alike."""
    for k in (OBJECT_A, OBJECT_B):
        assert iou(result.labels == k, truth == k) >= 0.9, f"object {k}"
    assert (result.labels[truth == BACKGROUND] == 0).mean() >= 0.98
    assert (result.confidence > min_confidence).all(), result.confidence


# --- SeeDiff ---------------------------------------------------------------------------------

def test_seediff_recovers_two_objects_from_block_attention():
    attn, classes, image, truth = hand_made_sample()
    result = SeeDiffExtractor().extract(attn, classes, image)
    assert result.labels.shape == (32, 32) and result.soft.shape == (2, 32, 32)
    assert_recovers_both_objects(result, truth)


def test_seediff_seeds_coarse_and_refines_the_background_at_the_finer_side():
    attn, classes, image, truth = hand_made_sample(coarse=True)
    extractor = SeeDiffExtractor(seed_side=8)
    # refinement sides default to every captured side finer than the seed side
    assert extractor.soft_maps(attn, classes, (32, 32)).shape == (2, 32, 32)
    result = extractor.extract(attn, classes, image)
    assert_recovers_both_objects(result, truth, min_confidence=0.4)
    explicit = SeeDiffExtractor(seed_side=8, refine_sides=[16]).extract(attn, classes, image)
    assert np.array_equal(explicit.labels, result.labels)


def test_seediff_without_pamr_still_finds_the_objects():
    attn, classes, image, truth = hand_made_sample()
    result = SeeDiffExtractor(pamr_iterations=0).extract(attn, classes, image)
    assert_recovers_both_objects(result, truth)


def test_cross_attention_separates_objects_that_self_attention_groups_together():
    """Self-attention that only tells foreground from background (both objects one group, as the
    micro model's): each class's expansion covers both objects, so only its own cross-attention can
    say which object is which."""
    attn, classes, image, truth = hand_made_sample()
    r16 = regions_16()
    attn.self_attn[SIDE] = block_attention((r16 > 0).astype(int))
    joined = SeeDiffExtractor(separate_by_cross=False).extract(attn, classes, image)
    separated = SeeDiffExtractor().extract(attn, classes, image)
    assert min(iou(joined.labels == k, truth == k) for k in (OBJECT_A, OBJECT_B)) < 0.6
    assert_recovers_both_objects(separated, truth)
    # one class alone: nothing to separate, the same mask either way
    alone = [classes[0]]
    assert np.array_equal(SeeDiffExtractor(separate_by_cross=False).extract(attn, alone, image).labels,
                          SeeDiffExtractor().extract(attn, alone, image).labels)


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_a_class_with_uniform_cross_attention_gets_low_confidence(noise):
    """A token that attends everywhere alike (up to noise) carries no location: it must not look confident."""
    attn, classes, image, _ = hand_made_sample()
    rng = np.random.default_rng(1)
    for name in attn.cross:
        attn.cross[name][3] = torch.tensor(0.01 * (1 + noise * rng.random((SIDE, SIDE))), dtype=torch.float32)
    result = SeeDiffExtractor().extract(attn, classes + [ClassSpec("nowhere", (3,))], image)
    assert result.confidence[2] < 0.2, result.confidence
    assert (result.confidence[:2] > 0.5).all(), result.confidence


def test_two_classes_on_the_same_object_tie_and_are_ignored():
    attn, _, image, truth = hand_made_sample()
    twins = [ClassSpec("square", (1,)), ClassSpec("also square", (1,))]
    result = SeeDiffExtractor().extract(attn, twins, image)
    inside = truth == OBJECT_A
    assert (result.labels[inside] == IGNORE).mean() >= 0.9
    assert not np.isin(result.labels, [1, 2]).any()


def test_resolve_labels_margin():
    soft = np.zeros((2, 2, 3), dtype=np.float32)
    soft[:, 0, 0] = (0.50, 0.52)  # within the margin: tie
    soft[:, 0, 1] = (0.50, 0.60)  # clear winner: class 2
    soft[:, 0, 2] = (0.90, 0.10)  # clear winner: class 1
    soft[:, 1, :] = 0.70  # exact tie, but not foreground
    fg = np.zeros((2, 3), dtype=bool)
    fg[0] = True
    labels = resolve_labels(soft, fg, margin=0.05)
    assert labels.tolist() == [[IGNORE, 2, 1], [0, 0, 0]]
    assert resolve_labels(soft, fg, margin=0.01)[0, 0] == 2
    # per-class foreground: a class only competes where it is foreground
    per_class = np.stack([fg, np.zeros_like(fg)])
    assert resolve_labels(soft, per_class, margin=0.05)[0].tolist() == [1, 1, 1]
    assert resolve_labels(np.zeros((0, 2, 3), np.float32), fg).tolist() == [[0, 0, 0], [0, 0, 0]]


def test_seediff_needs_self_attention_at_its_seed_side():
    attn, classes, image, _ = hand_made_sample()
    with pytest.raises(ValueError, match="seed side 8"):
        SeeDiffExtractor(seed_side=8).extract(attn, classes, image)
    attn.self_attn = {}
    with pytest.raises(ValueError, match="self-attention"):
        SeeDiffExtractor().extract(attn, classes, image)


def test_capture_steps_set_the_recorded_window_and_bad_windows_are_refused(sd1_pipe):
    config = SeeDiffExtractor(capture_steps=(0.5, 1.0)).capture_config(sd1_pipe.unet, (16, 16))
    assert config.steps == (0.5, 1.0) and 16 in config.self_blocks
    assert SeeDiffExtractor().capture_config(sd1_pipe.unet, (16, 16)).steps == (0.0, 1.0)  # the authors': all steps
    for bad in [(0.5, 0.5), (-0.1, 1.0), (0.2, 1.5)]:
        with pytest.raises(ValueError, match="capture_steps"):
            SeeDiffExtractor(capture_steps=bad)


# --- every registered extractor honours the contract ------------------------------------------

@pytest.mark.parametrize("name", extractor_names())
def test_every_extractor_returns_a_valid_mask_result(name):
    attn, classes, image, truth = hand_made_sample(coarse=True)
    extractor = get_extractor(name)
    result = extractor.extract(attn, classes, image)
    k = len(classes)
    assert isinstance(result, MaskResult)
    assert result.labels.shape == image.shape[:2] and result.labels.dtype == np.uint8
    assert set(np.unique(result.labels).tolist()) <= set(range(k + 1)) | {IGNORE}
    assert result.soft.shape == (k, *image.shape[:2])
    assert np.isfinite(result.soft).all() and result.soft.min() >= 0 and result.soft.max() <= 1
    assert result.confidence.shape == (k,)
    assert np.isfinite(result.confidence).all() and (0 <= result.confidence).all() and (result.confidence <= 1).all()
    json.dumps(extractor.params())  # recorded in every sample's metadata
    # no classes: all background, still at image size
    empty = extractor.extract(attn, [], image)
    assert empty.labels.shape == image.shape[:2] and empty.soft.shape == (0, *image.shape[:2])
    assert set(np.unique(empty.labels).tolist()) <= {0, IGNORE}
