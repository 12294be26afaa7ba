"""DiffSeg and segment naming on hand-made attention whose right answer is known.

Self-attention is built block-structured: every pixel attends uniformly (or with a
chosen mixture) to the pixels of its region, so the regions are the true segments.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation
from scipy.stats import entropy

from maskmill.extractors.base import IGNORE, ClassSpec, MaskResult, SampleAttention
from maskmill.extractors.registry import EXTRACTORS
from maskmill.extractors.diffseg import (
    DiffSegExtractor,
    aggregate_self_attention,
    anchor_indices,
    merge_attention_maps,
    nms_segments,
    symmetric_kl,
)
from maskmill.extractors.segments import assign_segments, class_attention_maps, segment_scores

# 12 x 12 grid, three regions of 48 pixels each: top-left, bottom-left, right strip.
# Equal areas give equal map heights, so the upsampled argmax puts boundaries exactly.
REGIONS_12 = np.zeros((12, 12), dtype=int)
REGIONS_12[6:, :8] = 1
REGIONS_12[:, 8:] = 2


def mixed_attention(regions: np.ndarray, mixing: np.ndarray) -> torch.Tensor:
    """(n, n) self-attention: a pixel of region r puts mass mixing[r, s] uniformly on region s."""
    flat = regions.ravel()
    member = np.eye(mixing.shape[0])[flat]  # (n, S)
    rows = mixing[flat] @ (member / member.sum(0)).T
    return torch.tensor(rows, dtype=torch.float32)


def block_attention(regions: np.ndarray) -> torch.Tensor:
    """Each pixel attends uniformly inside its own region."""
    return mixed_attention(regions, np.eye(regions.max() + 1))


def upscale(labels: np.ndarray, factor: int) -> np.ndarray:
    return np.kron(labels, np.ones((factor, factor), dtype=labels.dtype))


def best_match_iou(segments: np.ndarray, truth: np.ndarray) -> list[float]:
    """Per true region, the IoU of the predicted segment that matches it best."""
    out = []
    for t in np.unique(truth):
        true = truth == t
        out.append(max(((segments == s) & true).sum() / ((segments == s) | true).sum() for s in np.unique(segments)))
    return out


# --- step 1: aggregation ----------------------------------------------------------------------

def test_aggregation_weights_resolutions_by_side_and_keeps_rows_normalised():
    fine = block_attention(REGIONS_12)
    uniform_coarse = torch.full((36, 36), 1 / 36)  # a constant key map stays constant when upsampled
    agg = aggregate_self_attention({12: fine, 6: uniform_coarse})
    assert agg.shape == (144, 144)
    torch.testing.assert_close(agg.sum(1), torch.ones(144))
    torch.testing.assert_close(agg, (12 / 18) * fine + (6 / 18) / 144)


def test_aggregation_spreads_a_coarse_query_to_the_fine_pixels_it_covers():
    coarse = torch.softmax(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)), 1)
    agg = aggregate_self_attention({4: coarse}, resolution=8)
    rows = agg.reshape(8, 8, 64)
    # fine pixels (0,0), (0,1), (1,0), (1,1) all lie in coarse pixel (0,0): same key map
    for y, x in [(0, 1), (1, 0), (1, 1)]:
        torch.testing.assert_close(rows[y, x], rows[0, 0])
    assert not torch.allclose(rows[0, 2], rows[0, 0])
    torch.testing.assert_close(agg.sum(1), torch.ones(64))


# --- step 2: KL and merging -------------------------------------------------------------------

def test_chunked_kl_equals_the_definition():
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(3 * torch.randn(7, 20, generator=gen), 1)
    q = torch.softmax(3 * torch.randn(11, 20, generator=gen), 1)
    q[0, :5] = 0  # exact zeros must not give nan
    q[0] /= q[0].sum()
    log = lambda x: x.clamp_min(1e-8).log()  # noqa: E731
    dense = 0.5 * ((p[:, None] - q[None]) * (log(p)[:, None] - log(q)[None])).sum(-1)  # (7, 11, 20) tensor
    torch.testing.assert_close(symmetric_kl(p, q, chunk_size=3), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(symmetric_kl(p, q, chunk_size=3), symmetric_kl(p, q, chunk_size=1000))
    # DiffSeg's definition: the mean of the two directed KLs
    expected = (entropy(p[1].numpy(), q[2].numpy()) + entropy(q[2].numpy(), p[1].numpy())) / 2
    assert symmetric_kl(p, q)[1, 2].item() == pytest.approx(expected, rel=1e-4)


def test_anchor_grid_matches_diffseg_and_is_clipped():
    on_64 = anchor_indices(64, 16)
    assert len(on_64) == 256
    assert sorted({int(i) % 64 for i in on_64}) == list(range(1, 62, 4))
    assert torch.equal(anchor_indices(16, 16), torch.arange(256))  # micro SD: every pixel anchors
    assert len(anchor_indices(8, 16)) == 64


def test_diffseg_recovers_three_regions_exactly():
    attention = aggregate_self_attention({12: block_attention(REGIONS_12)})
    proposals = merge_attention_maps(attention)
    assert proposals.shape == (3, 144)
    torch.testing.assert_close(proposals.sum(1), torch.ones(3))
    segments = nms_segments(proposals, (48, 48))
    assert segments.shape == (48, 48) and sorted(np.unique(segments)) == [0, 1, 2]
    assert best_match_iou(segments, upscale(REGIONS_12, 4)) == [1.0, 1.0, 1.0]


def test_diffseg_recovers_regions_from_two_resolutions():
    coarse_regions = REGIONS_12[::2, ::2]
    attention = aggregate_self_attention({12: block_attention(REGIONS_12), 6: block_attention(coarse_regions)})
    segments = nms_segments(merge_attention_maps(attention), (48, 48))
    assert len(np.unique(segments)) == 3
    assert min(best_match_iou(segments, upscale(REGIONS_12, 4))) > 0.99  # coarse maps blur the T-junction


def test_kl_threshold_sweep_merges_closer_regions_first():
    # regions 0 and 1 share 20 % of their attention (KL 0.73); region 2 stands apart (KL 2.28)
    mixing = np.array([[0.75, 0.20, 0.05], [0.20, 0.75, 0.05], [0.05, 0.05, 0.90]])
    attention = aggregate_self_attention({12: mixed_attention(REGIONS_12, mixing)})
    kl = symmetric_kl(attention[[0, 72, 8]], attention[[0, 72, 8]])
    assert kl[0, 1] < 1.1 < kl[0, 2]

    counts = {}
    for tau in (0.3, 0.5, 1.1, 2.0, 2.5, 3.0):
        counts[tau] = len(np.unique(nms_segments(merge_attention_maps(attention, kl_threshold=tau), (12, 12))))
    assert counts == {0.3: 3, 0.5: 3, 1.1: 2, 2.0: 2, 2.5: 1, 3.0: 1}
    merged = nms_segments(merge_attention_maps(attention, kl_threshold=1.1), (12, 12))
    assert best_match_iou(merged, np.where(REGIONS_12 == 2, 1, 0)) == [1.0, 1.0]


def test_per_iteration_thresholds_and_dedupe():
    attention = aggregate_self_attention({12: block_attention(REGIONS_12)})
    one_pass = merge_attention_maps(attention, kl_threshold=1.1, iterations=1)
    assert one_pass.shape == (144, 144)  # every anchor keeps its own proposal until deduped
    assert merge_attention_maps(attention, kl_threshold=[1.1, 0.5], iterations=2).shape == (3, 144)
    with pytest.raises(ValueError):
        merge_attention_maps(attention, kl_threshold=[1.1, 0.5], iterations=3)


# --- naming segments (segments.py) ------------------------------------------------------------

def test_assign_segments_applies_the_rules():
    segments = np.repeat(np.arange(5), 4).reshape(5, 4)  # five horizontal bands of 4 pixels
    maps = np.zeros((2, 5, 4), dtype=np.float32)
    maps[0, 1] = 0.9              # band 1: clearly class 1
    maps[1, 2] = [0.5, 0.7, 0.6, 0.6]  # band 2: clearly class 2 (mean 0.6)
    maps[0, 3] = 0.3              # band 3: too weak for a class, too strong for background
    maps[:, 4] = 0.8              # band 4: two classes tie
    maps[0, 0] = 0.1              # band 0: background
    result = assign_segments(segments, maps, fg_threshold=0.4, bg_threshold=0.2, margin=0.05)
    assert isinstance(result, MaskResult)
    assert result.labels[:, 0].tolist() == [0, 1, 2, IGNORE, IGNORE]
    np.testing.assert_allclose(result.soft[1, 2], 0.6, rtol=1e-6)  # soft = the segment's score
    np.testing.assert_allclose(result.confidence, [0.9, 0.6], rtol=1e-6)
    absent = assign_segments(segments, np.zeros((1, 5, 4), np.float32))
    assert (absent.labels == 0).all() and absent.confidence.tolist() == [0.0]


def test_segment_scores_accept_any_ids():
    segments = np.array([[7, 7], [-3, 40]])
    index, scores = segment_scores(segments, np.array([[[1.0, 0.5], [0.2, 0.0]]]))
    np.testing.assert_allclose(scores[:, 0], [0.2, 0.75, 0.0])  # ids sorted: -3, 7, 40
    assert index.tolist() == [[1, 1], [0, 2]]


def test_class_attention_maps_normalise_each_layer_and_sum_tokens():
    cross_a = torch.zeros(77, 4, 4)
    cross_a[2, :2, :2] = 1000.0   # first token of the class, on a huge scale
    cross_b = torch.zeros(77, 2, 2)
    cross_b[3, 0, 0] = 0.001      # second token, tiny scale, coarser layer
    attn = SampleAttention(cross={"a": cross_a, "b": cross_b}, cross_resolution={"a": 4, "b": 2})
    spec = ClassSpec("thing", (2, 3))
    maps = class_attention_maps(attn, [spec], (4, 4))
    assert maps.shape == (1, 4, 4) and maps.min() == 0.0 and maps.max() == pytest.approx(1.0)
    assert maps[0, 0, 0] > maps[0, 3, 3]
    only_fine = class_attention_maps(attn, [spec], (4, 4), resolutions=(4,))
    np.testing.assert_allclose(only_fine[0], (cross_a[2] > 0).float().numpy())


# --- the extractor ----------------------------------------------------------------------------

def micro_sd_sample() -> tuple[SampleAttention, list[ClassSpec], np.ndarray]:
    """Like the micro SD: attention at 16 x 16 and 8 x 8, 32 x 32 image, two objects."""
    regions = np.zeros((16, 16), dtype=int)
    regions[2:8, 2:8] = 1     # object 1 ("a red circle")
    regions[10:14, 8:14] = 2  # object 2 ("a blue square"); even offsets keep the 8 x 8 map aligned
    self_attn = {16: block_attention(regions), 8: block_attention(regions[::2, ::2])}
    cross, res = {}, {}
    for side in (16, 8):
        c = torch.full((77, side, side), 0.01)
        step = 16 // side
        c[2][torch.tensor(regions[::step, ::step] == 1)] = 1.0   # "red" localises object 1
        c[6][torch.tensor(regions[::step, ::step] == 2)] = 0.5   # "blue" localises object 2
        cross[f"up_{side}"], res[f"up_{side}"] = c, side
    attn = SampleAttention(cross=cross, self_attn=self_attn, cross_resolution=res)
    classes = [ClassSpec("red circle", (2, 3)), ClassSpec("blue square", (6, 7))]
    return attn, classes, upscale(regions, 2)


def test_extractor_returns_a_valid_mask_result_at_image_size():
    attn, classes, truth = micro_sd_sample()
    extractor = DiffSegExtractor()
    result = extractor.extract(attn, classes, np.zeros((32, 32, 3), dtype=np.uint8))
    assert result.labels.shape == (32, 32) and result.labels.dtype == np.uint8
    assert set(np.unique(result.labels)) <= {0, 1, 2, IGNORE}
    assert result.soft.shape == (2, 32, 32) and 0 <= result.soft.min() and result.soft.max() <= 1
    assert result.confidence.shape == (2,) and ((0 <= result.confidence) & (result.confidence <= 1)).all()
    # both objects found and named, no pixel lost; as in the paper, the smaller segments'
    # taller maps win the boundary pixels, so each object grows by one pixel per side
    for k in (1, 2):
        assert (result.labels[truth == k] == k).all()
        assert (binary_dilation(truth == k) | (result.labels != k)).all()
    assert EXTRACTORS["diffseg"] is DiffSegExtractor
    json.dumps(extractor.params())


def test_peak_normalised_nms_removes_the_size_bias():
    attn, classes, truth = micro_sd_sample()
    result = DiffSegExtractor(nms_peak_normalize=True).extract(attn, classes, np.zeros((32, 32, 3), np.uint8))
    assert np.array_equal(result.labels, truth.astype(np.uint8))
    assert (result.confidence > 0.8).all()  # < 1: the upsampled cross-attention blurs at the edges


def test_extractor_needs_self_attention():
    attn, classes, _ = micro_sd_sample()
    attn.self_attn = {}
    with pytest.raises(ValueError, match="self-attention"):
        DiffSegExtractor().extract(attn, classes, np.zeros((32, 32, 3), dtype=np.uint8))
