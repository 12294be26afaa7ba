"""Comparisons for results that floating point does not promise bit for bit.

Bitwise by construction (tests use array_equal / torch.equal / byte equality there): the same
pipeline object with the same batch, capture on or off; lossless round trips (PNG, safetensors,
parquet); the same config, batch size, torch build and thread count on one machine (shards byte
for byte).

Not bitwise: a pipeline against its copy reloaded from disk (other memory layout, so other kernel
paths), a sample generated in a batch of two against the same sample alone (batched convolutions
and matmuls round differently), other thread counts, other CPUs. The same sample comes out up to
last-bit float differences, which the uint8 conversion turns into the odd value moved by 1/255.
Measured here on the tiny test pipelines: at most 1/255, on at most 2 of 3,072 values.
"""
from __future__ import annotations

import numpy as np
import torch

MAX_PIXEL_STEP = 2  # of 255: one rounding step, plus one for a few denoising steps amplifying it
MAX_MOVED_FRACTION = 0.05  # another image moves ~99 % of the values by ~45 on average


def assert_same_image_up_to_rounding(got: np.ndarray, expected: np.ndarray) -> None:
    """Same sample: uint8 values within MAX_PIXEL_STEP, and few of them moved at all."""
    assert got.shape == expected.shape and got.dtype == expected.dtype == np.uint8, (got.shape, got.dtype)
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    moved = float((diff > 0).mean())
    assert diff.max() <= MAX_PIXEL_STEP and moved <= MAX_MOVED_FRACTION, (
        f"not the same image up to rounding: max difference {diff.max()}/255 (allowed {MAX_PIXEL_STEP}), "
        f"{moved:.1%} of the values moved (allowed {MAX_MOVED_FRACTION:.0%})")


def assert_same_argmax_except_near_ties(got: torch.Tensor | np.ndarray, scores: torch.Tensor | np.ndarray,
                                        tie: float = 1e-5) -> None:
    """`got` is the argmax over axis 0 of `scores`, computed another way (another summation order).

    Where the best two scores are within `tie`, rounding may pick either; everywhere else the
    argmax must agree exactly, and near-ties must be rare, or the check would be vacuous.
    """
    scores = torch.as_tensor(np.asarray(scores))
    got = torch.as_tensor(np.asarray(got))
    top2 = scores.topk(2, dim=0).values
    decided = (top2[0] - top2[1]) > tie
    assert decided.float().mean() >= 0.95, f"only {decided.float().mean():.1%} of the positions are not near-ties"
    assert torch.equal(got[decided], scores.argmax(0)[decided])
