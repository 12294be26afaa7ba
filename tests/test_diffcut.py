"""DiffCut on hand-made affinities and features whose right cut is known."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from maskmill.extractors import diffcut
from maskmill.extractors.base import IGNORE, ClassSpec, SampleAttention
from maskmill.extractors.registry import EXTRACTORS
from maskmill.extractors.diffcut import (
    DiffCutExtractor,
    affinity,
    ncut_bipartition,
    recursive_ncut,
    upsample_segments,
)

from tolerances import assert_same_argmax_except_near_ties


def block_affinity(sizes: list[int], between: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Affinity 1 inside each block, between[i, j] across blocks i and j; and the true labels."""
    truth = np.repeat(np.arange(len(sizes)), sizes)
    a = between[truth][:, truth].astype(np.float64)
    a[truth[:, None] == truth[None, :]] = 1.0
    return a, truth


def cluster_features(regions: np.ndarray, channels: int = 16, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """(C, h, w) features: one direction per region plus a little noise."""
    rng = np.random.default_rng(seed)
    h, w = regions.shape
    f = np.eye(channels)[regions.ravel()].T.reshape(channels, h, w)
    return torch.tensor(f + noise * rng.standard_normal(f.shape), dtype=torch.float32)


SQUARE_8 = np.zeros((8, 8), dtype=int)
SQUARE_8[2:6, 2:6] = 1


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renaming the segments."""
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist()))
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


# --- step 1: affinity -------------------------------------------------------------------------

def test_affinity_is_min_max_normalised_cosine_to_the_power_alpha():
    f = cluster_features(SQUARE_8, noise=0.3)
    a1, a10 = affinity(f, alpha=1.0), affinity(f, alpha=10.0)
    assert a1.shape == (64, 64) and np.allclose(a1, a1.T)
    assert a1.min() == pytest.approx(0.0) and a1.max() == pytest.approx(1.0)
    np.testing.assert_allclose(np.diag(a10), 1.0)  # a pixel is most similar to itself
    np.testing.assert_allclose(a10, a1 ** 10)
    # scaling a pixel's feature changes nothing: features are L2-normalised first
    scaled = f.clone()
    scaled[:, 0, 0] *= 7
    np.testing.assert_allclose(affinity(scaled), a10, atol=1e-6)


# --- step 2: normalized cut -------------------------------------------------------------------

def test_ncut_value_is_the_normalized_cut_of_the_returned_parts():
    rng = np.random.default_rng(3)
    x = rng.random((30, 30))
    a = (x + x.T) / 2
    mask, value = ncut_bipartition(a)
    cut = a[mask][:, ~mask].sum()
    assert value == pytest.approx(cut / a[mask].sum() + cut / a[~mask].sum())


def test_two_clusters_are_cut_exactly_and_the_cut_stops():
    a, truth = block_affinity([20, 12], np.array([[1, 0.01], [0.01, 1]]))
    mask, value = ncut_bipartition(a)
    assert value < 0.2 and same_partition(mask.astype(int), truth)
    labels = recursive_ncut(a, ncut_threshold=0.2)
    assert np.array_equal(labels, truth)
    # inside one cluster every cut costs Ncut ~ 1, far above tau: recursion ends there
    for k in (0, 1):
        inside = truth == k
        assert ncut_bipartition(a[np.ix_(inside, inside)])[1] > 0.9


def test_ncut_threshold_controls_how_deep_the_recursion_goes():
    # clusters 0 and 1 are related (0.3); cluster 2 is apart. Splitting 0|1 costs Ncut ~ 0.46.
    between = np.array([[1, 0.3, 0.001], [0.3, 1, 0.001], [0.001, 0.001, 1]])
    a, truth = block_affinity([16, 16, 16], between)
    two = recursive_ncut(a, ncut_threshold=0.2)   # SD1.4 setting: stops at {0, 1} | {2}
    three = recursive_ncut(a, ncut_threshold=0.5)  # SSD-1B setting: goes on to 0 | 1
    assert same_partition(two, np.where(truth == 2, 1, 0))
    assert same_partition(three, truth)


def test_two_cluster_features_are_separated_exactly():
    f = cluster_features(SQUARE_8)
    labels = recursive_ncut(affinity(f)).reshape(8, 8)
    assert np.array_equal(labels, SQUARE_8)  # ids ordered by first pixel: background first


def test_lanczos_path_agrees_with_the_dense_solver(monkeypatch):
    regions = np.zeros((8, 8), dtype=int)
    regions[:, 5:] = 1
    regions[5:, :3] = 2
    a = affinity(cluster_features(regions))
    dense = recursive_ncut(a)
    monkeypatch.setattr(diffcut, "DENSE_EIGEN_LIMIT", 0)  # force scipy.sparse.linalg.eigsh
    assert np.array_equal(recursive_ncut(a), dense)
    assert same_partition(dense.reshape(8, 8), regions)
    # a graph in pieces: eigenvalue 0 twice, still cut along the pieces
    apart, truth = block_affinity([20, 12, 5], np.zeros((3, 3)))
    assert np.array_equal(recursive_ncut(apart), truth)


def test_min_segment_size_stops_peeling_off_outlier_pixels():
    a, truth = block_affinity([15, 15], np.array([[1, 0.01], [0.01, 1]]))
    a[0, 1:] = a[1:, 0] = 1e-6  # pixel 0: an outlier, related to nothing
    assert len(np.unique(recursive_ncut(a))) == 3  # the paper's rule cuts it off alone
    kept = recursive_ncut(a, min_segment_size=2)
    assert len(np.unique(kept)) == 2 and same_partition(kept[1:], truth[1:])


# --- step 3: concept assignment ---------------------------------------------------------------

def test_upsampling_follows_the_features_between_cells():
    stripes = np.zeros((8, 8), dtype=int)
    stripes[:, 3:6] = 1
    f = cluster_features(stripes)
    up = upsample_segments(stripes, f, (32, 32))
    assert np.array_equal(up, np.kron(stripes, np.ones((4, 4), dtype=int)))  # straight edges: exact
    square = upsample_segments(SQUARE_8, cluster_features(SQUARE_8), (32, 32))
    truth = np.kron(SQUARE_8, np.ones((4, 4), dtype=int))
    assert (square != truth).sum() == 4  # bilinear rounds each convex corner by one pixel
    assert set(np.unique(upsample_segments(SQUARE_8 + 5, cluster_features(SQUARE_8), (32, 32)))) == {5, 6}


def test_upsampling_is_the_argmax_cosine_to_upsampled_features():
    rng = np.random.default_rng(0)
    f = torch.tensor(rng.standard_normal((6, 4, 4)), dtype=torch.float32)
    segments = (rng.random((4, 4)) > 0.5).astype(int)
    got = upsample_segments(segments, f, (9, 9))
    # direct: upsample all C channels, cosine to each normalised concept, argmax
    unit = f / f.norm(dim=0, keepdim=True)
    concepts = torch.stack([unit[:, torch.tensor(segments == s)].mean(1) for s in (0, 1)])
    up = torch.nn.functional.interpolate(unit[None], size=(9, 9), mode="bilinear", align_corners=False)[0]
    cos = torch.einsum("sc,chw->shw", torch.nn.functional.normalize(concepts, dim=1),
                       torch.nn.functional.normalize(up, dim=0))
    # the same argmax by another summation order: equal wherever rounding cannot swap the top two
    assert_same_argmax_except_near_ties(got, cos)


# --- the extractor ----------------------------------------------------------------------------

def micro_sd_sample() -> tuple[SampleAttention, list[ClassSpec], np.ndarray]:
    """Features at 8 x 8 (the micro SD's encoder end), cross-attention at 16 and 8, 32 x 32 image."""
    regions = np.zeros((8, 8), dtype=int)
    regions[1:4, 1:5] = 1
    regions[5:8, 4:8] = 2
    cross, res = {}, {}
    for side in (16, 8):
        c = torch.full((77, side, side), 0.02)
        fine = torch.tensor(np.kron(regions, np.ones((side // 8, side // 8), dtype=int)))
        c[2][fine == 1] = 0.9  # class 1's first token
        c[3][fine == 1] = 0.1  # and its second
        c[5][fine == 2] = 0.6
        cross[f"down_{side}"], res[f"down_{side}"] = c, side
    attn = SampleAttention(cross=cross, cross_resolution=res,
                           features={"encoder_last_attn": cluster_features(regions, channels=32)})
    classes = [ClassSpec("red circle", (2, 3)), ClassSpec("green star", (5,))]
    return attn, classes, np.kron(regions, np.ones((4, 4), dtype=int))


def test_extractor_returns_a_valid_mask_result_at_image_size():
    attn, classes, truth = micro_sd_sample()
    extractor = DiffCutExtractor()
    result = extractor.extract(attn, classes, np.zeros((32, 32, 3), dtype=np.uint8))
    assert result.labels.shape == (32, 32) and result.labels.dtype == np.uint8
    assert set(np.unique(result.labels)) <= {0, 1, 2, IGNORE}
    assert result.soft.shape == (2, 32, 32) and 0 <= result.soft.min() and result.soft.max() <= 1
    assert result.confidence.shape == (2,) and ((0.5 < result.confidence) & (result.confidence <= 1)).all()
    # objects recovered up to bilinear corner rounding, and named after their tokens
    for k in (1, 2):
        iou = ((result.labels == k) & (truth == k)).sum() / ((result.labels == k) | (truth == k)).sum()
        assert iou > 0.9
    assert EXTRACTORS["diffcut"] is DiffCutExtractor
    json.dumps(extractor.params())


def test_extractor_needs_its_features():
    attn, classes, _ = micro_sd_sample()
    attn.features = {}
    with pytest.raises(ValueError, match="encoder_last_attn"):
        DiffCutExtractor().extract(attn, classes, np.zeros((32, 32, 3), dtype=np.uint8))


def test_no_classes_gives_all_background():
    attn, _, _ = micro_sd_sample()
    result = DiffCutExtractor().extract(attn, [], np.zeros((32, 32, 3), dtype=np.uint8))
    assert result.soft.shape == (0, 32, 32) and (result.labels == 0).all()
